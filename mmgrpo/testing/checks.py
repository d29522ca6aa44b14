"""Invariants every policy is tested for, as reusable assertions."""

from __future__ import annotations

import torch


def assert_ratio_one(policy, rollout, micro_sizes: tuple[int, ...] | None = None, atol: float = 1e-5) -> None:
    """Recomputed log-probs right after ``rollout`` give exp(logp - logp_old) = 1 (within ``atol``) for every
    micro-batch size (default: 1 and G), on every unit some row trains."""
    units = rollout.train_mask.any(0).nonzero().reshape(-1)
    assert len(units) > 0, "the rollout trains no unit"
    for micro in micro_sizes or (1, rollout.group_size):
        for lo in range(0, rollout.num_rows, micro):
            rows = torch.arange(lo, min(lo + micro, rollout.num_rows))
            lp = policy.log_prob(rollout, rows, units).logp
            ratio = torch.exp(lp - rollout.logp_old[rows][:, units])
            assert torch.allclose(ratio, torch.ones_like(ratio), atol=atol, rtol=0), (micro, ratio)


def assert_only_lora_changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """After training ``model`` (a LoRA-wrapped denoiser): some ``lora_B`` weight moved off its initial 0, and
    every tensor of ``before`` (the denoiser's state dict as loaded, before LoRA) is bit-identical."""
    after = model.state_dict()
    lora = [k for k in after if "lora" in k]
    assert lora and any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in lora if "lora_B" in k)
    for k, v in before.items():  # every base weight unchanged (peft renames wrapped ones to *.base_layer.*)
        stem, _, leaf = k.rpartition(".")
        key = k if k in after else f"{stem}.base_layer.{leaf}"
        assert torch.equal(after[key], v), k
