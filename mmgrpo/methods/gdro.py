"""GDRO: Multi-Adversary Group Distributionally Robust Optimization for RL post-training (Panaganti, Liang, Yu, Mi,
Yu 2026, "Group Distributionally Robust Optimization-Driven Reinforcement Learning for LLM Reasoning", arXiv
2601.19280).

Instead of uniform prompts and a fixed G, two adversaries adapt the training distribution over *difficulty bins*
(an online difficulty classifier); each can be switched on alone (the paper runs them as independent games)::

    sampler: {name: gdro, options: {bins: 4, eta: 2.0, prompt_gdro: true, rollout_gdro: true, n_min: 2, n_max: 16}}

Equations (p̂(x): prompt x's pass rate, an EMA over its visits of its group's mean reward in [0, 1]; K bins):

- online difficulty classifier: bin(x) = min(floor(K p̂(x)), K - 1); a prompt never seen counts as p̂ = 0.5;
- Prompt-GDRO (data adversary): each step, bin b's loss is ℓ_b = 1 - (mean reward of the step's groups in b); an EMA
  with Adam-style debiasing, m_b <- β m_b + (1 - β) ℓ_b, L̂_b = m_b / (1 - β^{t_b}) (t_b: the bin's updates), and the
  entropy-regularised multiplicative-weights best response q_b ∝ exp(η L̂_b) (bins with prompts only), mixed with
  uniform: q = (1 - γ) q + γ / K'. A prompt is drawn with weight q_bin(x) / |bin(x)|: a bin's mass is q_b whatever
  its size (the intensive "no frequency bias" score), B distinct prompts per step;
- Rollout-GDRO (compute adversary): rollouts go where the gradient's variance proxy falls most. With the Bernoulli
  std σ_b = sqrt(p̄_b (1 - p̄_b)) of the bin's mean pass rate, minimising Σ_b σ_b² / n_b under Σ n = B G gives the
  square-root rule n_b = σ_b / sqrt(λ); the shadow price λ is set so that the step's rollouts add up to B·G (the
  compute-neutral mean budget G = trainer.group_size), with n_b clipped to [n_min, n_max] and rounded by largest
  remainders.

Where this differs from the paper, and why: the paper's shadow price is an online (no-regret) controller; here the
step's constrained problem is solved exactly (bisection on λ), which is the point such a controller tracks, and needs
no state. Bins are on p̂ (pass@1); pass@k = 1 - (1 - p)^k is monotone in p, so the same bins up to their edges.
Modality-free (a "rollout" is a completion or an image); rewards are read as pass rates, so they must lie in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.sampling import (
    PoolStats,
    PromptSampler,
    StepPlan,
    check_unit_rewards,
    largest_remainder,
    register_sampler,
    weighted_draw,
)

PAPER = "GDRO: multi-adversary group DRO for RL post-training (Panaganti et al. 2026, arXiv 2601.19280)"


@dataclass
class GDROOptions:
    bins: int = 4
    """K difficulty bins on the pass rate"""
    prompt_gdro: bool = True
    """the data adversary: draw prompts by bin weights q (false: uniformly over the pool)"""
    rollout_gdro: bool = True
    """the compute adversary: square-root allocation of rollouts (false: trainer.group_size each)"""
    eta: float = 2.0
    """step size of the multiplicative weights: q_b ∝ exp(eta L̂_b)"""
    ema: float = 0.9
    """β of the bins' debiased loss EMA"""
    mix: float = 0.1
    """γ: share of uniform bin weight (every bin with prompts keeps being visited)"""
    pass_ema: float = 0.5
    """decay of each prompt's pass-rate EMA over its visits"""
    n_min: int = 2
    """fewest rollouts of a prompt (rollout_gdro)"""
    n_max: int = 16
    """most rollouts of a prompt (rollout_gdro)"""


def sqrt_allocation(sigma: torch.Tensor, total: int, n_min: int, n_max: int) -> list[int]:
    """Rollouts per prompt [B] minimising Σ σ_b² / n_b with Σ n_b = total, n_b in [n_min, n_max]: n_b = clip(σ_b /
    sqrt(λ)) with the shadow price λ found by bisection on s = 1 / sqrt(λ), then rounded by largest remainders.
    All σ equal (or 0): total / B each."""
    s = sigma.to(torch.float64).clamp_min(0)
    B = s.numel()
    if float(s.max()) <= 0 or float(s.max() - s.min()) <= 1e-12:
        return largest_remainder(torch.full((B,), total / B, dtype=torch.float64), total, n_min, n_max)
    lo, hi = 0.0, 1.0
    while float((s * hi).clamp(n_min, n_max).sum()) < total and hi < 1e12:
        hi *= 2
    for _ in range(100):  # sum(clip(s * x)) is non-decreasing in x
        mid = (lo + hi) / 2
        if float((s * mid).clamp(n_min, n_max).sum()) < total:
            lo = mid
        else:
            hi = mid
    return largest_remainder((s * hi).clamp(n_min, n_max), total, n_min, n_max)


@register_sampler("gdro")
class GDROSampler(PromptSampler):
    """GDRO: prompts by multiplicative weights over difficulty bins, rollouts by the square-root rule (mean G).

    The bins come from online pass rates; the rollouts add up to B x G every step (ragged groups)."""

    Options = GDROOptions
    stateful = True
    needs_pool = True
    varies_group_size = True

    def __init__(self, ctx: Any, options: GDROOptions | None = None):
        super().__init__(ctx, options)
        K = self.options.bins
        self.stats = PoolStats(int(ctx.pool), decay=self.options.pass_ema)
        self.bin_m = torch.zeros(K, dtype=torch.float64)  # EMA of each bin's loss
        self.bin_t = torch.zeros(K, dtype=torch.float64)  # updates of each bin (for the debiasing)

    @classmethod
    def check(cls, options: GDROOptions, cfg: Any, where: str) -> None:
        o, t = options, cfg.trainer
        if o.bins < 1:
            raise UserError(f"sampler.options.bins={o.bins} in {where} must be >= 1, e.g. 4")
        if not (0 <= o.ema < 1 and 0 <= o.pass_ema < 1 and 0 <= o.mix <= 1 and math.isfinite(o.eta)):
            raise UserError(f"sampler options in {where}: ema and pass_ema must lie in [0, 1), mix in [0, 1] and eta "
                            "be finite (e.g. ema 0.9, pass_ema 0.5, mix 0.1, eta 2.0)")  # fmt: skip
        if o.rollout_gdro and not (max(1, t.minibatches) <= o.n_min <= t.group_size <= o.n_max):
            raise UserError(
                f"sampler.options n_min={o.n_min}, n_max={o.n_max} in {where} must bracket the mean budget "
                f"trainer.group_size={t.group_size} (n_min <= G <= n_max), with n_min >= trainer.minibatches="
                f"{t.minibatches} (each minibatch takes a slice of every group), e.g. n_min 2, n_max "
                f"{2 * t.group_size}"
            )

    # ------------------------------------------------------------------ classifier and adversaries
    def pass_rate(self) -> torch.Tensor:
        """[P] p̂(x): the pass-rate EMA; 0.5 for prompts never seen."""
        return torch.where(self.stats.visits > 0, self.stats.mean_ema, 0.5)

    def bin_of(self) -> torch.Tensor:
        """[P] LongTensor: bin(x) = min(floor(K p̂(x)), K - 1)."""
        K = self.options.bins
        return (self.pass_rate() * K).floor().clamp(0, K - 1).long()

    def bin_weights(self, bins: torch.Tensor) -> torch.Tensor:
        """[K] q: softmax(eta L̂) over the bins that hold prompts, mixed with uniform (mix); 0 for empty bins."""
        o, K = self.options, self.options.bins
        filled = torch.bincount(bins, minlength=K) > 0
        debiased = torch.where(self.bin_t > 0, self.bin_m / (1 - o.ema**self.bin_t).clamp_min(1e-12), 0.0)
        if o.ema == 0:
            debiased = self.bin_m.clone()
        logits = torch.where(filled, o.eta * debiased, -math.inf)
        q = torch.softmax(logits, 0)
        q = (1 - o.mix) * q + o.mix * filled.double() / filled.sum()
        return torch.where(filled, q, 0.0)

    def plan(self, step: int) -> StepPlan:
        o, B, G = self.options, self.ctx.prompts_per_step, self.ctx.group_size
        bins = self.bin_of()
        if o.prompt_gdro:
            q = self.bin_weights(bins)
            size = torch.bincount(bins, minlength=o.bins).double()
            weights = q[bins] / size[bins]  # [P]: bin b holds mass q_b whatever its size
        else:
            weights = torch.ones(len(bins), dtype=torch.float64)
        positions = weighted_draw(weights, B, self.generator(step))
        if not o.rollout_gdro:
            return StepPlan(positions=positions)
        p = self.pass_rate()
        pbar = torch.zeros(o.bins, dtype=torch.float64).index_add(0, bins, p) / torch.bincount(
            bins, minlength=o.bins
        ).double().clamp_min(1)  # [K] mean pass rate of each bin
        sigma = (pbar * (1 - pbar)).clamp_min(0).sqrt()[bins[positions]]  # [B]
        return StepPlan(positions=positions, group_sizes=sqrt_allocation(sigma, B * G, o.n_min, o.n_max))

    def observe(self, step: int, positions: list[int], rewards: torch.Tensor) -> dict[str, float]:
        o = self.options
        r = rewards.to(torch.float64)
        check_unit_rewards("gdro", step, r)
        bins = self.bin_of()  # the bins the step was planned with
        loss_sum = torch.zeros(o.bins, dtype=torch.float64)
        count = torch.zeros(o.bins, dtype=torch.float64)
        for p_pos, row in zip(positions, r):
            x = row[~row.isnan()]
            if 0 <= p_pos < len(bins) and x.numel():
                b = int(bins[p_pos])
                loss_sum[b] += 1 - x.mean()
                count[b] += 1
        hit = count > 0
        loss = loss_sum / count.clamp_min(1)
        self.bin_m = torch.where(hit, o.ema * self.bin_m + (1 - o.ema) * loss, self.bin_m)
        self.bin_t = self.bin_t + hit.double()
        self.stats.update(step, positions, rewards)
        q = self.bin_weights(self.bin_of())
        out = {f"gdro/q_bin{b}": float(q[b]) for b in range(o.bins)}
        out["gdro/seen_frac"] = float((self.stats.visits > 0).double().mean())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict(), "bin_m": self.bin_m.clone(), "bin_t": self.bin_t.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state["stats"])
        for k in ("bin_m", "bin_t"):
            t = torch.as_tensor(state[k], dtype=torch.float64)
            if t.shape != (self.options.bins,):
                raise UserError(
                    f"sampler gdro checkpoint: {k} has {tuple(t.shape)} bins, the config {self.options.bins}"
                )
            setattr(self, k, t.clone())
