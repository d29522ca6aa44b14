"""The reference bandit's reward: the value of the chosen arm."""

from __future__ import annotations

import torch

from mmgrpo.rewards.registry import register


@register("bandit_arm_value")
def bandit_arm_value():
    """Bandit: reward = value of the chosen arm (meta['arm_values'][arm])."""

    def fn(samples, prompts, meta, ctx) -> torch.Tensor:  # samples: LongTensor [N] chosen arms
        return torch.tensor([float(m["arm_values"][int(a)]) for a, m in zip(samples, meta)], dtype=torch.float32)

    return fn
