"""The built-in reward shapings, elementwise ``fn(rewards [...], **options) -> [...]`` applied to the raw rewards
before any estimator."""

from __future__ import annotations

import math

import torch

from mmgrpo.core.advantages.registry import finite, register_shaping
from mmgrpo.core.errors import bad_option


@register_shaping("none")
def no_shaping(rewards: torch.Tensor) -> torch.Tensor:
    """Identity: rewards unchanged (fp32)."""
    return torch.as_tensor(rewards).to(torch.float32)


def _check_tempsamp_soft(tau: float = 0.8, a1: float = 0.01, a2: float = 1.0) -> None:
    key = "advantage.shaping_options"
    finite(f"{key}.tau", tau, "must be a finite number: the reward above which tempsamp_soft compresses, e.g. 0.8")
    finite(f"{key}.a1", a1, "must be a finite number >= 0: how much rewards above tau still rise (0: all equal tau; "
           "a negative a1 would rank them in reverse), e.g. 0.01", low=0.0, strict=False)  # fmt: skip
    finite(f"{key}.a2", a2, "must be a finite number other than 0: the curvature of the stretch below tau (0 divides "
           "by zero and makes every shaped reward NaN or tau), e.g. 1.0")  # fmt: skip
    if a2 == 0:
        raise bad_option(f"{key}.a2", a2, "must not be 0: the stretch below tau divides by exp(a2) - 1; e.g. 1.0")


@register_shaping("tempsamp_soft")
def tempsamp_soft(rewards: torch.Tensor, *, tau: float = 0.8, a1: float = 0.01, a2: float = 1.0) -> torch.Tensor:
    """TempSamp-R1 non-linear soft shaping: compress rewards above tau, stretch those below.

    rewards [...] -> [...] elementwise: r >= tau -> tau + a1 ln(r - tau + 1);
    r < tau -> tau - (exp(a2 (tau - r)) - 1) / (exp(a2) - 1). E.g. f(1) = 0.80182, f(0.5) = 0.59639.
    TempSamp-R1, "Effective Temporal Sampling with Reinforcement Fine-Tuning for Video LLMs" (2025).
    """
    r = torch.as_tensor(rewards).to(torch.float32)
    above = tau + a1 * torch.log1p((r - tau).clamp_min(0.0))
    below = tau - torch.expm1(a2 * (tau - r).clamp_min(0.0)) / math.expm1(a2)
    return torch.where(r >= tau, above, torch.where(r < tau, below, r))  # NaN stays NaN


tempsamp_soft.check = _check_tempsamp_soft  # type: ignore[attr-defined]
