"""Classifier-free guidance in training: the sde objective's gradient is Flow-GRPO's / DDPO's (``train.cfg``: one
forward of the doubled batch [uncond; cond], both halves under grad, combined uncond + s (cond - uncond)), computed
here the way their training step does it on a tiny real SD3 transformer; ``guidance_uncond_grad: false`` detaches
the unconditional half, and that is a different gradient."""

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch
from mmgrpo.policies.diffusion import DiffusionPolicy, DiffusionPolicyOptions
from mmgrpo.testing.tiny_sd3 import tiny_sd3_adapter

SCALE = 4.5  # Flow-GRPO's SD3 guidance


def policy_and_rollout(**opts):
    torch.manual_seed(0)
    policy = DiffusionPolicy(tiny_sd3_adapter(), DiffusionPolicyOptions(num_steps=3, guidance_scale=SCALE, **opts))
    rollout = policy.rollout(PromptBatch(prompts=["a red circle", "two blue squares"], seeds=[3, 4]), group_size=2)
    return policy, rollout


def grads(policy, loss) -> torch.Tensor:
    params = policy.trainable_parameters()
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


WEIGHTS = torch.tensor([[0.7, -1.3, 0.4], [-0.2, 0.9, -1.1], [1.5, 0.3, -0.6], [-0.8, -0.4, 1.2]])  # [rows, steps]


def mmgrpo_logp(policy, rollout) -> torch.Tensor:
    rows, units = torch.arange(rollout.num_rows), torch.arange(3)
    return policy.objective.log_prob(policy, rollout, rows, units).logp  # [4, 3]


def their_logp(policy, rollout, detach_uncond: bool) -> torch.Tensor:
    """Flow-GRPO's compute_log_prob with train.cfg: the transformer on cat([x] * 2) with [negative; prompt]
    embeddings, chunked and combined; the SDE transition's log-density of the stored next state."""
    sched = policy.adapter.schedule(3)
    lat, cond = rollout.extras["latents"], rollout.extras["cond"]
    neg = policy.adapter.encode_negative(rollout.num_rows)
    out = []
    for j in range(3):
        x, t = lat[:, j], sched.timesteps[j].expand(rollout.num_rows)
        both = policy.model(
            hidden_states=torch.cat([x] * 2),
            timestep=torch.cat([t] * 2),
            encoder_hidden_states=torch.cat([neg["prompt_embeds"], cond["prompt_embeds"]]),
            pooled_projections=torch.cat([neg["pooled"], cond["pooled"]]),
            return_dict=False,
        )[0]
        uncond, text = both.chunk(2)
        if detach_uncond:
            uncond = uncond.detach()
        v = uncond + SCALE * (text - uncond)
        out.append(policy.step(v, x, j, sched, policy.noise_level, prev=lat[:, j + 1]).log_prob)
    return torch.stack(out, 1)


def test_the_gradient_through_guidance_is_flow_grpos_and_detaching_the_uncond_branch_is_another():
    policy, rollout = policy_and_rollout()
    ours = mmgrpo_logp(policy, rollout)
    theirs = their_logp(policy, rollout, detach_uncond=False)
    assert torch.allclose(ours, theirs, atol=1e-5)
    g_ours, g_theirs = grads(policy, (ours * WEIGHTS).sum()), grads(policy, (theirs * WEIGHTS).sum())
    assert torch.allclose(g_ours, g_theirs, rtol=1e-4, atol=1e-6), (g_ours - g_theirs).abs().max()

    detached, roll_d = policy_and_rollout(guidance_uncond_grad=False)
    assert torch.equal(roll_d.extras["latents"], rollout.extras["latents"])  # sampling is not affected
    ours_d = mmgrpo_logp(detached, roll_d)
    assert torch.allclose(ours_d, ours, atol=1e-6)  # the same log-probs (the ratio), another gradient
    g_d = grads(detached, (ours_d * WEIGHTS).sum())
    g_ref_d = grads(detached, (their_logp(detached, roll_d, detach_uncond=True) * WEIGHTS).sum())
    assert torch.allclose(g_d, g_ref_d, rtol=1e-4, atol=1e-6)
    # at s = 4.5 the dropped (1 - s) d(uncond) term is most of the gradient, not a rounding matter
    assert (g_d - g_ours).norm() > 0.5 * g_ours.norm()


def test_a_micro_batch_counts_both_guided_forwards_when_both_carry_gradient():
    both, _ = policy_and_rollout()
    detached, _ = policy_and_rollout(guidance_uncond_grad=False)
    unguided = DiffusionPolicy(tiny_sd3_adapter(), DiffusionPolicyOptions(num_steps=3))
    # budget 16 (row, step) forwards, 4 trained steps a row: 16 / (4 x 2) = 2 rows; detached or unguided 4
    assert both.micro_batch_rows(4, 16) == 2
    assert detached.micro_batch_rows(4, 16) == 4 and unguided.micro_batch_rows(4, 16) == 4
    # a row's 12 trained steps are 24 forwards with both: 2 parts of 6 steps; detached or unguided 12: one part
    assert both.micro_batch_pieces(12, 16) == 2
    assert detached.micro_batch_pieces(12, 16) == 1 and unguided.micro_batch_pieces(12, 16) == 1


@pytest.mark.parametrize(
    "opts",
    [
        dict(guidance_scale=1.0, guidance_uncond_grad=False),
        dict(guidance_scale=SCALE, guidance_uncond_grad=False, objective="flow_matching"),
    ],
)
def test_detaching_where_no_guided_output_is_trained_is_refused(opts):
    with pytest.raises(UserError, match=r"guidance_uncond_grad=false: it does nothing here.*remove it"):
        DiffusionPolicyOptions(num_steps=3, **opts)


def test_both_branches_run_as_one_forward_of_the_doubled_batch():
    """Sampling, and training through both branches, run the transformer once per step on [uncond; cond] (as diffusers'
    pipeline and Flow-GRPO do), with the numbers of two separate forwards within float rounding; the detached variant's
    training keeps two forwards (its unconditional one without activations). Conditions that cannot be stacked
    (embeddings of different lengths) fall back to two forwards."""
    from mmgrpo.policies.diffusion import stack_conds

    policy, rollout = policy_and_rollout()
    calls = []
    hook = policy.model.register_forward_hook(lambda m, a, k, out: calls.append(len(k["hidden_states"])),
                                              with_kwargs=True)  # fmt: skip
    try:
        again = policy.rollout(PromptBatch(prompts=["a red circle", "two blue squares"], seeds=[3, 4]), group_size=2)
        assert calls == [8, 8, 8]  # 3 steps, one forward of 2 x 4 rows each
        assert torch.equal(again.extras["latents"], rollout.extras["latents"])
        calls.clear()
        mmgrpo_logp(policy, rollout)  # 4 rows x 3 steps under grad: one forward of 2 x 12 rows
        assert calls == [24]
        detached, roll_d = policy_and_rollout(guidance_uncond_grad=False)
        hook_d = detached.model.register_forward_hook(lambda m, a, k, out: calls.append(len(k["hidden_states"])),
                                                      with_kwargs=True)  # fmt: skip
        calls.clear()
        mmgrpo_logp(detached, roll_d)
        assert calls == [12, 12]
        hook_d.remove()
    finally:
        hook.remove()

    # the doubled forward against two separate ones, on the rollout's states
    sched = policy.adapter.schedule(3)
    x, t = rollout.extras["latents"][:, 1], sched.timesteps[1].expand(rollout.num_rows)
    cond, uncond = rollout.extras["cond"], policy.uncond(rollout.num_rows)
    with torch.no_grad():
        one = policy.guided(policy.model, x, t, cond, uncond)
        text = policy.adapter.predict(policy.model, x, t, cond)
        base = policy.adapter.predict(policy.model, x, t, {**cond, **uncond})
    assert torch.allclose(one, base + SCALE * (text - base), atol=1e-5)

    neg = {**cond, **uncond}
    assert stack_conds(neg, cond, 4)["prompt_embeds"].shape[0] == 8
    shorter = {**neg, "prompt_embeds": neg["prompt_embeds"][:, :-1]}  # padded to another length
    assert stack_conds(shorter, cond, 4) is None
    assert stack_conds({**neg, "extra": torch.ones(4)}, cond, 4) is None  # different keys
    assert stack_conds({**neg, "pooled": 1.0}, {**cond, "pooled": 1.0}, 4) is None  # not a tensor of 4 rows
