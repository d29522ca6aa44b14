"""objective=nft (DiffusionNFT) and the old (sampling) policy's EMA, on tiny real SD3 checkpoints."""

import copy

import pytest
import torch
import yaml

from mmgrpo.core.errors import UserError
from mmgrpo.core.losses import policy_loss
from mmgrpo.core.seeding import generator_for
from mmgrpo.core.types import PromptBatch
from mmgrpo.policies.diffusion import DiffusionPolicy, DiffusionPolicyOptions
from mmgrpo.testing.checks import assert_ratio_one
from mmgrpo.testing.tiny_sd3 import save_tiny_sd3, tiny_sd3_adapter
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

NFT = dict(sde={"noise_level": 0.0}, num_steps=3)


def nft(**objective):
    """Options of DiffusionNFT with 3 draws per sample on ODE rollouts of T = 3 steps."""
    return DiffusionPolicyOptions(objective={"name": "nft", "timesteps": 3, **objective}, **NFT)


PROMPTS = ["a red circle", "two blue squares"]


def batch(step=0, seeds=(11, 12)):
    return PromptBatch(prompts=list(PROMPTS), seeds=list(seeds), step=step)


def perturb(policy, scale=0.02, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def velocity(denoiser, xt, sig, cond):
    with torch.no_grad():
        return denoiser(
            hidden_states=xt, timestep=sig * 1000, encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled"], return_dict=False,
        )[0]  # fmt: skip


def test_errors_are_the_implicit_policies_against_the_sampling_policy():
    """Rebuild row r, units 0..2 by hand after the trained weights moved away from the sampling policy:
    v_old from a copy of the weights that sampled, v from the moved ones, v+ = b v + (1 - b) v_old,
    v- = (1 + b) v_old - b v, error = mean((x_t - sigma v' - x0)^2) / mean|x_t - sigma v' - x0| / b."""
    b = 0.5
    policy = DiffusionPolicy(tiny_sd3_adapter(), nft(beta=b, old_policy_ema=0.5))
    sampler = copy.deepcopy(policy.adapter.denoiser)
    r = policy.rollout(batch(), group_size=2)
    assert_ratio_one(policy, r)  # nothing moved yet: logp_old is the same computation
    perturb(policy)
    row = 2
    lp = policy.log_prob(r, torch.tensor([row]))
    g = generator_for(int(r.extras["fm_seeds"][row]))
    sig = torch.rand(3, generator=g)
    eps = torch.randn((3, *policy.adapter.latent_shape()), generator=g)
    x0 = r.extras["latents"][row, -1]
    cond = {k: v[row : row + 1].expand(3, *v.shape[1:]) for k, v in r.extras["cond"].items()}
    s4 = sig[:, None, None, None]
    xt = (1 - s4) * x0 + s4 * eps
    v_old, v = velocity(sampler, xt, sig, cond), velocity(policy.adapter.denoiser, xt, sig, cond)
    assert not torch.allclose(v, v_old, atol=1e-4)  # the two policies differ
    for got, pred in ((lp.logp, b * v + (1 - b) * v_old), (lp.neg_logp, (1 + b) * v_old - b * v)):
        diff = xt - s4 * pred - x0
        want = -(diff**2).flatten(1).mean(1) / diff.abs().flatten(1).mean(1) / b
        assert torch.allclose(got[0], want, atol=1e-5), (got, want)


def test_at_the_sampling_policy_positive_and_negative_coincide_and_a_zero_advantage_has_no_gradient():
    policy = DiffusionPolicy(tiny_sd3_adapter(), nft())
    r = policy.rollout(batch(), group_size=2)
    lp = policy.log_prob(r, torch.arange(4))
    assert torch.allclose(lp.logp, lp.neg_logp, atol=1e-6)  # v = v_old: v+ = v- = v
    mask = torch.ones(4, 3, dtype=torch.bool)
    loss, _ = policy_loss(lp.logp, r.logp_old, torch.zeros(4), mask, loss="nft", adv_clip=2.0, neg_logp=lp.neg_logp)
    loss.backward()
    grads = [p.grad.abs().max() for p in policy.trainable_parameters() if p.grad is not None]
    assert grads and max(grads) < 1e-6  # r = 1/2: the two branches' gradients cancel exactly


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_advantage_moves_the_sample_error_its_way_and_the_step_is_bounded(sign):
    """A step on the NFT loss lowers the sample's matching error for A > 0 and raises it for A < 0, as AWM does;
    unlike AWM's, the loss is a quadratic bowl around v_old + A/c (v_target - v_old): many steps on a negative
    advantage settle, they do not diverge."""
    policy = DiffusionPolicy(tiny_sd3_adapter(), nft())
    r = policy.rollout(batch(), group_size=2)
    rows, mask = torch.arange(4), torch.ones(4, 3, dtype=torch.bool)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.02)

    def loss():
        lp = policy.log_prob(r, rows)
        return policy_loss(lp.logp, r.logp_old, torch.full((4,), sign), mask, loss="nft", adv_clip=2.0,
                           neg_logp=lp.neg_logp)[0]  # fmt: skip

    losses = []
    for _ in range(30):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
        losses.append(value.item())
        if len(losses) == 1:
            with torch.no_grad():
                delta = (policy.log_prob(r, rows).logp - r.logp_old).mean()
            assert sign * delta > 0, delta  # the positive policy's error fell (A > 0) or rose (A < 0)
    assert losses[-1] <= losses[0] and abs(losses[-1] - losses[-2]) < 0.05 * abs(losses[0]), losses


def test_old_policy_is_an_ema_updated_once_per_step_and_samples_the_rollouts():
    d = 0.75
    policy = DiffusionPolicy(tiny_sd3_adapter(), nft(old_policy_ema=d))
    params = policy.trainable_parameters()
    init = [p.detach().clone() for p in params]
    policy.rollout(batch(step=0), group_size=1)  # step 0: the EMA of the initial weights is themselves
    perturb(policy)
    moved = [p.detach().clone() for p in params]
    r1 = policy.rollout(batch(step=1), group_size=2)
    want = [d * a + (1 - d) * m for a, m in zip(init, moved)]
    assert all(torch.allclose(s, w, atol=1e-7) for s, w in zip(policy.objective.ema.shadow, want))
    assert all(torch.equal(p, m) for p, m in zip(params, moved))  # the trained weights are back after sampling
    policy.rollout(batch(step=1), group_size=2)  # a second rollout of the same step (DAPO refill): no update
    assert all(torch.allclose(s, w, atol=1e-7) for s, w in zip(policy.objective.ema.shadow, want))
    # the rollout is the old policy's: an on-policy twin holding the EMA weights gives the same samples, the same
    # stored velocities v_old and the same logp_old (the sampler's own error, as PPO's behaviour log-prob)
    twin = DiffusionPolicy(tiny_sd3_adapter(), nft())
    with torch.no_grad():
        for p, w in zip(twin.trainable_parameters(), want):
            p.copy_(w)
    r_twin = twin.rollout(batch(step=1), group_size=2)
    assert torch.allclose(r1.samples, r_twin.samples, atol=1e-6)
    assert torch.allclose(r1.extras["fm_v_old"], r_twin.extras["fm_v_old"], atol=1e-5)
    assert torch.allclose(r1.logp_old, r_twin.logp_old, atol=1e-5)
    assert_ratio_one(twin, r_twin)
    ratio = torch.exp(policy.log_prob(r1, torch.arange(4)).logp - r1.logp_old)
    assert (ratio - 1).abs().max() > 1e-4  # the trained weights are not the sampler's: the monitor shows it
    # generate() (evaluation) samples with the trained weights
    live = DiffusionPolicy(tiny_sd3_adapter(), DiffusionPolicyOptions(**NFT))  # objective sde: the trained weights
    with torch.no_grad():
        for p, m in zip(live.trainable_parameters(), moved):
            p.copy_(m)
    seeds = [int(s) for s in batch().seeds]
    assert torch.allclose(policy.generate(PROMPTS, seeds), live.generate(PROMPTS, seeds), atol=1e-6)


@pytest.mark.parametrize(
    "opts, match",
    [
        (dict(objective={"name": "nft", "beta": 0.0}), "objective.beta must be > 0"),
        (dict(objective={"name": "nft", "beta": float("inf")}), "objective.beta must be > 0 and finite"),
        (dict(objective={"name": "nft", "old_policy_ema": 1.0}), r"old_policy_ema must be in \[0, 1\)"),
        (dict(objective={"name": "sde", "old_policy_ema": 0.5}), "use objective=flow_matching or nft"),
        (dict(objective={"name": "nft", "rollout_guidance_scale": 2.0}), "use objective=flow_matching or drop"),
        (dict(objective="nft", exploration="window"), "objective=nft trains the final samples"),
    ],
)
def test_bad_options_are_one_clear_error(opts, match):
    """Checked when the options are built (at config load), before any model is."""
    with pytest.raises(UserError, match=match):
        DiffusionPolicyOptions(**{**NFT, **opts})


def recipe(tmp_path, ckpt, name, *extra):
    cfg = {
        "pipeline": "text_to_image",
        "run": {"name": name, "output_dir": str(tmp_path)},
        "policy": {"options": {"family": "sd3", "path": ckpt, **NFT,
                               "objective": {"name": "nft", "timesteps": 3, "old_policy_ema": 0.5}}},
        "data": {"options": {"heldout_prompts": "", "prompts": "shapes"}},
        "rewards": [{"name": "jpeg_incompressibility"}],
        "loss": {"name": "nft", "adv_clip": 2.0},
        "trainer": {"max_steps": 3, "prompts_per_step": 2, "group_size": 2, "lr": 1e-3, "progress": False,
                    "checkpoint_every": 1},
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return train(load_config(path, list(extra)))


def test_nft_trains_through_the_recipe_and_resumes_exactly(tmp_path):
    """The old policy's EMA is checkpointed: 2 steps + resume = 3 uninterrupted steps, bit for bit."""
    ckpt = save_tiny_sd3(tmp_path / "ckpt")
    full = recipe(tmp_path, ckpt, "full")
    part = recipe(tmp_path, ckpt, "part", "trainer.stop_after_steps=2")
    assert part.step == 2
    resumed = recipe(tmp_path, ckpt, "part", f"resume={part.run_dir}")
    assert resumed.step == 3
    a, b = full.policy.unwrapped().state_dict(), resumed.policy.unwrapped().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema, resumed_ema = full.policy.objective.ema, resumed.policy.objective.ema
    assert all(torch.equal(x, y) for x, y in zip(ema.shadow, resumed_ema.shadow))
    lagging = zip(full.policy.objective.ema.shadow, full.policy.trainable_parameters())
    assert any(not torch.equal(s, p.float()) for s, p in lagging)  # the sampling policy lags the trained weights


def test_nft_needs_its_loss_and_the_loss_needs_nft():
    policy = DiffusionPolicy(tiny_sd3_adapter(), nft())
    r = policy.rollout(batch(), group_size=2)
    lp = policy.log_prob(r, torch.arange(4))
    mask = torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(UserError, match="set loss.name=nft"):
        policy_loss(lp.logp, r.logp_old, torch.ones(4), mask, loss="grpo", neg_logp=lp.neg_logp)
    with pytest.raises(UserError, match=r"set it .*token-level NFT, e.g. on a VLM, is methods: \{nft"):
        policy_loss(lp.logp, r.logp_old, torch.ones(4), mask, loss="nft", neg_logp=lp.neg_logp)
    with pytest.raises(UserError, match="set policy.options.objective=nft") as e:
        policy_loss(lp.logp, r.logp_old, torch.ones(4), mask, loss="nft", adv_clip=2.0)
    assert "token-level NFT, e.g. on a VLM, is methods: {nft: {reward: accuracy}}" in str(e.value)  # both say where
