"""SPO: Single-stream Policy Optimization (Xu & Ding, 2025, arXiv 2509.13232).

A persistent, KL-adaptive value tracker per prompt replaces the group baseline; advantages are normalised globally
over the batch; prompts are drawn with priorities from the tracker; it works with G = 1 (one rollout per prompt).
Switch (both parts)::

    sampler: {name: spo, options: {rho_min: 0.875, rho_max: 0.96, d_half: 0.06, kl_source: measured}}
    advantage: {estimator: spo}
    trainer: {group_size: 1}   # or any G: each row is compared with the tracker, not with its group

Equations (binary or [0, 1] rewards r; v̂(x) the tracked success probability of prompt x):

- tracker (a discounted Beta-Bernoulli posterior): v̂(x) = α(x) / (α(x) + β(x)); after a visit with rewards
  r_1..r_n: α <- ρ(x) α + Σ r_i, β <- ρ(x) β + Σ (1 - r_i) (the paper updates per sample; the n rollouts of one
  visit share one discount here);
- forgetting: ρ(x) = clip(2^(-D(x) / D_half), ρ_min, ρ_max), D(x) the policy's KL divergence since x was last seen;
- initialisation: α_0 = N_0 v̂_0, β_0 = N_0 (1 - v̂_0), N_0 = 1 / (1 - ρ_min) (effective memory of the slowest
  forgetting); v̂_0 is estimated from rollouts of x;
- advantage: A(x, y) = r(x, y) - v̂_{-1}(x) (the tracker *before* this visit), then over the whole batch
  Â = (A - mean_batch(A)) / (std_batch(A) + eps);
- prioritised sampling: prompt x drawn with weight sqrt(v̂(x) (1 - v̂(x))) + ε (the tracker's Bernoulli std: prompts
  neither always solved nor never solved first).

Where this implementation differs from the paper, and why:

- D(x) is the policy's KL *accumulated step by step* since x's last visit, not the KL between the two endpoint
  policies (the trainer keeps no old policies). With ``kl_source: measured`` (the default) the trainer measures each
  step's drift after the update, d_t = mean over the step's trained units of the k3 estimate
  exp(l) - 1 - l, l = log π_new(a) - log π_old(a) (an unbiased, non-negative estimate of KL(π_old || π_new) on the
  step's own samples; one no-grad forward of the step's rows, and the rollout records its ``logp_old``), and
  D(x) = Σ_{t since x's last visit} d_t. ``kl_source: steps`` takes a constant ``kl_per_step`` instead (no forward:
  D(x) = kl_per_step x steps since the last visit; ``kl_per_step: 0`` makes ρ = ρ_max).
- v̂_0 comes from x's first visit in training (its own rollouts' mean), instead of an offline pre-pass of the
  initial policy: the first visit's advantage is r - mean of that visit (with G = 1: 0, the warm-up sample).
- A prompt is drawn at most once per step (weighted sampling without replacement over the pool).

Modality-free: on the VLM policy a row is a completion, on the diffusion policy an image; the tracker needs rewards
in [0, 1] (a reward outside that range stops the run with a UserError naming the fix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mmgrpo.core.advantages import _as_groups, _masked_mean, _masked_std, check_eps, register_estimator
from mmgrpo.core.errors import UserError
from mmgrpo.core.sampling import PromptSampler, StepPlan, check_unit_rewards, register_sampler, weighted_draw

PAPER = "SPO: Single-stream Policy Optimization (Xu & Ding 2025, arXiv 2509.13232)"


@register_estimator("spo", check=check_eps)
def spo(rewards: torch.Tensor, *, baseline: torch.Tensor | None = None, eps: float = 1e-6,
        unbiased: bool = True) -> torch.Tensor:  # fmt: skip
    """SPO advantage: r - v̂(x) (the prompt sampler's tracked value), normalised over the whole batch.

    rewards [B, G], baseline [B, 1] (the ``spo`` sampler's tracker before this step) -> advantages [B, G]:
    A = r - baseline; Â = (A - mean(A)) / (std(A) + eps), mean and std (Bessel-corrected when ``unbiased``) over
    every valid row of the batch. NaN rows (the reward does not apply, ragged padding) are left out and get 0.
    SPO (Xu & Ding 2025, arXiv 2509.13232).
    """
    if baseline is None:
        raise UserError("estimator 'spo' needs the per-prompt baseline of the spo sampler; set sampler: spo")
    r = _as_groups(rewards, "spo")
    valid = ~r.isnan()
    a = r - torch.as_tensor(baseline, dtype=torch.float32, device=r.device).reshape(-1, 1)
    a = (a - _masked_mean(a, valid, dim=None)) / (_masked_std(a, valid, unbiased, dim=None) + eps)
    return torch.where(valid, a, 0.0)


spo.allows_single = True  # type: ignore[attr-defined]  # the tracker is the baseline: G = 1 rows learn


@dataclass
class SPOOptions:
    rho_min: float = 0.875
    """slowest... fastest forgetting: ρ(x) is clipped to [rho_min, rho_max]; N_0 = 1 / (1 - rho_min)"""
    rho_max: float = 0.96
    """the slowest forgetting (ρ when the policy has not moved)"""
    d_half: float = 0.06
    """KL at which the tracker's old evidence counts half: ρ = 2^(-D / d_half)"""
    kl_source: Literal["measured", "steps"] = "measured"
    """measured: each step's policy drift d_t measured after the update (one no-grad forward); steps: kl_per_step"""
    kl_per_step: float = 0.01
    """with kl_source steps: the policy's KL drift taken per training step (D(x) = kl_per_step x steps since x was
    last seen)"""
    prioritized: bool = True
    """draw prompts with weight sqrt(v̂(1 - v̂)) + eps_priority; false: uniformly (without replacement)"""
    eps_priority: float = 0.05
    """floor of the sampling weight, so solved and hopeless prompts are still revisited"""


@register_sampler("spo")
class SPOSampler(PromptSampler):
    """SPO: prioritised prompts from a per-prompt KL-adaptive Beta value tracker, which is also the baseline."""

    Options = SPOOptions
    stateful = True
    needs_pool = True
    provides = ("baseline",)

    def __init__(self, ctx: Any, options: SPOOptions | None = None):
        super().__init__(ctx, options)
        P = int(ctx.pool)
        self.alpha = torch.zeros(P, dtype=torch.float64)
        self.beta = torch.zeros(P, dtype=torch.float64)
        self.last_step = torch.full((P,), -1.0, dtype=torch.float64)  # -1: never seen
        self.cum_kl = torch.zeros((), dtype=torch.float64)  # Σ_t d_t over the steps so far (kl_source measured)
        self.kl_at_visit = torch.zeros(P, dtype=torch.float64)  # cum_kl when each prompt was last seen

    @property
    def needs_policy_drift(self) -> bool:
        """The trainer measures each step's policy drift after the update and calls :meth:`observe_drift`."""
        return self.options.kl_source == "measured"

    def observe_drift(self, step: int, kl: float) -> None:
        """d_t: the step's KL(π_old || π_new) estimate, added to the accumulated drift."""
        if not math.isfinite(kl):
            raise UserError(
                f"sampler spo in step {step + 1}: the measured policy drift is {kl}; the update is not finite"
            )
        self.cum_kl = self.cum_kl + max(float(kl), 0.0)

    @classmethod
    def check(cls, options: SPOOptions, cfg: Any, where: str) -> None:
        o = options
        if not 0.0 < o.rho_min <= o.rho_max < 1.0:
            raise UserError(f"sampler.options.rho_min={o.rho_min}, rho_max={o.rho_max} in {where} must satisfy "
                            "0 < rho_min <= rho_max < 1, e.g. 0.875 and 0.96")  # fmt: skip
        if not (o.d_half > 0 and math.isfinite(o.d_half)):
            raise UserError(f"sampler.options.d_half={o.d_half} in {where} must be a finite number > 0, e.g. 0.06")
        if not (o.kl_per_step >= 0 and math.isfinite(o.kl_per_step)):
            raise UserError(f"sampler.options.kl_per_step={o.kl_per_step} in {where} must be >= 0, e.g. 0.01")
        if not o.eps_priority > 0:
            raise UserError(f"sampler.options.eps_priority={o.eps_priority} in {where} must be > 0, e.g. 0.05")

    # ------------------------------------------------------------------ tracker
    @property
    def seen(self) -> torch.Tensor:
        return self.last_step >= 0

    def value(self) -> torch.Tensor:
        """[P] v̂(x) = α / (α + β); 0.5 for prompts never seen."""
        return torch.where(self.seen, self.alpha / (self.alpha + self.beta).clamp_min(1e-12), 0.5)

    def rho(self, step: int) -> torch.Tensor:
        """[P] ρ(x) = clip(2^(-D(x)/d_half), rho_min, rho_max); D(x) = the drift measured since x was last seen
        (kl_source measured), or kl_per_step * (step - last seen) (kl_source steps)."""
        o = self.options
        if o.kl_source == "measured":
            d = (self.cum_kl - self.kl_at_visit).clamp_min(0.0)
        else:
            d = o.kl_per_step * (float(step) - self.last_step).clamp_min(0.0)
        return torch.exp2(-d / o.d_half).clamp(o.rho_min, o.rho_max)

    def plan(self, step: int) -> StepPlan:
        o = self.options
        v = self.value()
        weights = (v * (1 - v)).clamp_min(0).sqrt() + o.eps_priority if o.prioritized else torch.ones_like(v)
        return StepPlan(positions=weighted_draw(weights, self.ctx.prompts_per_step, self.generator(step)))

    def estimator_inputs(self, positions: list[int], rewards: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"baseline": [B, 1]}``: :meth:`baseline` for the estimator ``spo``."""
        return {"baseline": self.baseline(positions, rewards).to(torch.float32)[:, None]}

    def baseline(self, positions: list[int], rewards: torch.Tensor) -> torch.Tensor:
        """[B] v̂_{-1}(x) of each group's prompt; a prompt never seen (or outside the pool): its group's mean."""
        v = self.value()
        r = rewards.to(torch.float64)
        valid = ~r.isnan()
        mean = torch.where(valid, r, 0.0).sum(-1) / valid.sum(-1).clamp_min(1)
        out = mean.clone()
        for b, p in enumerate(positions):
            if 0 <= p < len(v) and bool(self.seen[p]):
                out[b] = v[p]
        return out

    def observe(self, step: int, positions: list[int], rewards: torch.Tensor) -> dict[str, float]:
        o = self.options
        r = rewards.to(torch.float64)
        valid = ~r.isnan()
        check_unit_rewards("spo", step, r)
        rho = self.rho(step)
        n0 = 1.0 / (1.0 - o.rho_min)
        used = []
        for b, p in enumerate(positions):
            x = r[b][valid[b]]
            if not (0 <= p < len(self.alpha)) or x.numel() == 0:
                continue
            if bool(self.seen[p]):
                used.append(float(rho[p]))
                self.alpha[p] = rho[p] * self.alpha[p] + x.sum()
                self.beta[p] = rho[p] * self.beta[p] + (1 - x).sum()
            else:  # v̂_0 from the first visit, with the effective memory N_0 of the slowest forgetting
                self.alpha[p], self.beta[p] = n0 * x.mean(), n0 * (1 - x.mean())
            self.last_step[p] = float(step)
            self.kl_at_visit[p] = self.cum_kl
        v = self.value()
        pos = [p for p in positions if 0 <= p < len(v)]
        out = {"spo/seen_frac": float(self.seen.double().mean())}
        if pos:
            out["spo/value_mean"] = float(v[pos].mean())
        if used:  # revisits this step: their forgetting factor
            out["spo/rho_mean"] = sum(used) / len(used)
        return out

    def state_dict(self) -> dict[str, Any]:
        keys = ("alpha", "beta", "last_step", "kl_at_visit")
        return {**{k: getattr(self, k).clone() for k in keys}, "cum_kl": float(self.cum_kl)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cum_kl = torch.tensor(float(state["cum_kl"]), dtype=torch.float64)
        for k in ("alpha", "beta", "last_step", "kl_at_visit"):
            t = torch.as_tensor(state[k], dtype=torch.float64)
            if t.shape != self.alpha.shape:
                raise UserError(f"sampler spo checkpoint: {k} holds {tuple(t.shape)} values for a pool of "
                                f"{len(self.alpha)} prompts; resume with the same data")  # fmt: skip
            setattr(self, k, t.clone())
