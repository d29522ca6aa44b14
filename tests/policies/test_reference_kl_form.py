"""The sde objective's reference KL, by hand on a tiny real SD3 transformer: ``kl: exact`` is the KL of the step's
two Gaussians, ``kl: flow_grpo`` Flow-GRPO's code (mean gap squared over 2 std_t^2, their std_dev_t without
sqrt(|dt|)), i.e. the exact KL times |dt|."""

import copy
import math

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch
from mmgrpo.policies.diffusion import DiffusionPolicy, DiffusionPolicyOptions
from mmgrpo.testing.tiny_sd3 import tiny_sd3_adapter

A = 0.7  # Flow-GRPO's noise level


def kl_of(form: str):
    torch.manual_seed(0)
    opts = DiffusionPolicyOptions(num_steps=4, reference_kl=True, sde={"kind": "flow_grpo", "noise_level": A},
                                  objective={"name": "sde", "kl": form})  # fmt: skip
    policy = DiffusionPolicy(tiny_sd3_adapter(), opts)
    reference = copy.deepcopy(policy.model)  # full fine-tuning: the reference is the initial weights
    with torch.no_grad():  # move the trained weights away from the reference
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rollout = policy.rollout(PromptBatch(prompts=["a red circle", "two blue squares"], seeds=[5, 6]), group_size=2)
    units = torch.tensor([0, 2, 3])
    res = policy.objective.log_prob(policy, rollout, torch.arange(4), units)
    return policy, reference, rollout, units, res.kl


def their_mean(model, x, t, cond, s, dt, std_t):
    """Flow-GRPO's prev_sample_mean of the SDE step from x at sigma s (dt < 0)."""
    v = model(hidden_states=x, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
              pooled_projections=cond["pooled"], return_dict=False)[0]  # fmt: skip
    return x * (1 + std_t**2 * dt / (2 * s)) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt


def their_kl_terms(policy, reference, rollout, units):
    """Per (row, unit): Flow-GRPO's mean-over-elements (mean - mean_ref)^2 / (2 std_dev_t^2), and |dt|."""
    sched = policy.adapter.schedule(4)
    lat, cond = rollout.extras["latents"], rollout.extras["cond"]
    out, dts = [], []
    for u in units.tolist():
        x, t = lat[:, u], sched.timesteps[u].expand(4)
        s, s_next = float(sched.sigmas[u]), float(sched.sigmas[u + 1])
        dt = s_next - s
        std_t = A * math.sqrt(s / (1 - (s_next if s == 1 else s)))

        with torch.no_grad():
            gap = their_mean(policy.model, x, t, cond, s, dt, std_t) - their_mean(reference, x, t, cond, s, dt, std_t)
        out.append((gap**2).mean(dim=(1, 2, 3)) / (2 * std_t**2))
        dts.append(abs(dt))
    return torch.stack(out, 1), torch.tensor(dts)


def test_flow_grpo_kl_is_their_code_and_exact_kl_divides_it_by_dt():
    policy, reference, rollout, units, kl_fg = kl_of("flow_grpo")
    theirs, dt = their_kl_terms(policy, reference, rollout, units)
    assert (theirs > 0).all()
    assert torch.allclose(kl_fg.detach(), theirs, rtol=1e-4, atol=1e-9)
    *_, kl_exact = kl_of("exact")
    assert torch.allclose(kl_exact.detach(), theirs / dt, rtol=1e-4, atol=1e-9)
    assert kl_fg.requires_grad  # the penalty trains


@pytest.mark.parametrize(
    "opts, says",
    [
        (dict(reference_kl=True, sde={"kind": "dance", "noise_level": 0.3}), "use kl: exact"),
        (dict(reference_kl=False, sde={"kind": "flow_grpo", "noise_level": A}), "reference_kl: true"),
    ],
)
def test_flow_grpo_kl_where_it_means_nothing_is_refused(opts, says):
    with pytest.raises(UserError, match=rf"policy.options.objective.kl='flow_grpo'.*{says}"):
        DiffusionPolicyOptions(num_steps=4, objective={"name": "sde", "kl": "flow_grpo"}, **opts)
