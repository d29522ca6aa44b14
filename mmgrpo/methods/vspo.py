"""PRS / VSPO: Progressive Reward Shaping and Value-based Sampling Policy Optimization (Zhuang, Chen, Su, Chao, Liu,
Zeng 2025, "Enhancing Agentic RL with Progressive Reward Shaping and Value-based Sampling Policy Optimization", arXiv
2512.07478).

Two parts, each switched on alone:

- **VSPO** (``sampler: vspo`` with ``advantage.dynamic_sampling: true``): groups whose rewards are all equal (zero
  advantage) are replaced, not by the next prompts of the stream (DAPO), but by the prompts of highest *task value*,
  a score balancing difficulty and uncertainty from each prompt's online success rate p̂(x) (an EMA over its visits
  of its group's mean reward in [0, 1]):

      V(x) = λ (1 - p̂(x)) + (1 - λ) 4 p̂(x) (1 - p̂(x))      (λ = ``difficulty_weight``; a prompt never seen: p̂ = 0.5)

  Refill round k takes the ranks k B .. k B + B - 1 of the prompts by V (highest first, ties by pool position),
  leaving out the step's main prompts, so every process computes the same replacement prompts. The step's main
  prompts are drawn uniformly from the pool (B distinct ones).

      sampler: {name: vspo, options: {difficulty_weight: 0.5}}
      advantage: {dynamic_sampling: true, max_refill_rounds: 2}

- **PRS** (reward ``prs``): a curriculum of reward stages, each counting only once the earlier stages pass (first a
  parseable, well-formatted answer, then a correct one):

      r_PRS = Σ_k w_k r_k Π_{j<k} 1[r_j >= τ_j]

      rewards: [{name: prs, options: {stages: [{name: format, threshold: 1.0, weight: 0.5}, {name: accuracy}]}}]

What the abstract does not fix and is our choice: the form of V (a convex mix of the failure rate and the Bernoulli
variance, both maximal-signal terms the abstract names), the gate of PRS (a stage passes at ``threshold``), and the
source of p̂ (the training visits). Not implemented: VSPO's value-smoothing clipping (its form is not in the
abstract). Modality-free: the stages may be any registered rewards (VLM text, diffusion images).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mmgrpo import rewards as reward_registry
from mmgrpo.core.errors import UserError
from mmgrpo.core.sampling import (
    PoolStats,
    PromptSampler,
    StepPlan,
    check_unit_rewards,
    register_sampler,
    weighted_draw,
)
from mmgrpo.rewards.registry import register

PAPER = "PRS / VSPO: progressive reward shaping, value-based sampling (Zhuang et al. 2025, arXiv 2512.07478)"


@dataclass
class VSPOOptions:
    difficulty_weight: float = 0.5
    """λ of the task value V = λ (1 - p̂) + (1 - λ) 4 p̂ (1 - p̂)"""
    pass_ema: float = 0.5
    """decay of each prompt's success-rate EMA over its visits"""


def task_value(p: torch.Tensor, lam: float) -> torch.Tensor:
    """V = λ (1 - p) + (1 - λ) 4 p (1 - p) for success rates ``p [P]`` in [0, 1]."""
    return lam * (1 - p) + (1 - lam) * 4 * p * (1 - p)


@register_sampler("vspo")
class VSPOSampler(PromptSampler):
    """VSPO: zero-advantage groups are replaced by the pool prompts of highest task value.

    The value balances difficulty and uncertainty; the step's main prompts are uniform over the pool."""

    Options = VSPOOptions
    stateful = True
    needs_pool = True

    def __init__(self, ctx: Any, options: VSPOOptions | None = None):
        super().__init__(ctx, options)
        self.stats = PoolStats(int(ctx.pool), decay=self.options.pass_ema)

    @classmethod
    def check(cls, options: VSPOOptions, cfg: Any, where: str) -> None:
        if not 0.0 <= options.difficulty_weight <= 1.0:
            raise UserError(f"sampler.options.difficulty_weight={options.difficulty_weight} in {where} must lie in "
                            "[0, 1] (1 = difficulty only, 0 = uncertainty only), e.g. 0.5")  # fmt: skip
        if not 0.0 <= options.pass_ema < 1.0:
            raise UserError(f"sampler.options.pass_ema={options.pass_ema} in {where} must lie in [0, 1), e.g. 0.5")
        if not cfg.advantage.dynamic_sampling:
            raise UserError(
                f"sampler vspo in {where} replaces zero-advantage groups, which only happens with "
                "advantage.dynamic_sampling: true; set it (and advantage.max_refill_rounds), or use sampler: uniform"
            )

    def value(self) -> torch.Tensor:
        """[P] task value V(x) (p̂ = 0.5 for prompts never seen)."""
        p = torch.where(self.stats.visits > 0, self.stats.mean_ema, 0.5)
        return task_value(p, self.options.difficulty_weight)

    def plan(self, step: int) -> StepPlan:
        weights = torch.ones(self.stats.pool, dtype=torch.float64)
        return StepPlan(positions=weighted_draw(weights, self.ctx.prompts_per_step, self.generator(step)))

    def refill(self, step: int, round: int, main: StepPlan) -> StepPlan | None:
        B, v = self.ctx.prompts_per_step, self.value()
        used = set(main.positions)
        ranked = [int(i) for i in torch.argsort(-v, stable=True) if int(i) not in used]  # highest value first
        picked = ranked[(round - 1) * B : round * B]
        if len(picked) < B:  # the pool ran out of unused prompts: fresh stream positions (as DAPO)
            return None
        return StepPlan(positions=picked)

    def observe(self, step: int, positions: list[int], rewards: torch.Tensor) -> dict[str, float]:
        check_unit_rewards("vspo", step, rewards)
        self.stats.update(step, positions, rewards)
        v = self.value()
        return {"vspo/value_mean": float(v.mean()), "vspo/seen_frac": float((self.stats.visits > 0).double().mean())}

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state["stats"])


@dataclass
class Stage:
    name: str = ""
    """a registered reward"""
    weight: float = 1.0
    """w_k"""
    threshold: float = 1.0
    """τ_k: later stages count for a row only once this stage's reward reaches it"""
    options: dict[str, Any] = field(default_factory=dict)
    """the reward's options"""


@register("prs")
def prs(stages: list[dict] | None = None):
    """Progressive Reward Shaping (PRS): stage k's reward counts only once every earlier stage passed its threshold,
    r = Σ_k w_k r_k Π_{j<k} 1[r_j >= τ_j]; a stage that does not apply to a row (None) blocks the later ones."""
    if not stages:
        raise UserError("reward prs: give options.stages, e.g. [{name: format, threshold: 1.0}, {name: accuracy}]")
    parsed = []
    for i, st in enumerate(stages):
        if not isinstance(st, dict) or not st.get("name"):
            raise UserError(f"reward prs: stages.{i} must be a mapping with a reward name, e.g. {{name: format}}")
        unknown = set(st) - {"name", "weight", "threshold", "options"}
        if unknown:
            raise UserError(f"reward prs: stages.{i} has unknown key(s) {sorted(unknown)}; valid: name, weight, "
                            "threshold, options")  # fmt: skip
        s = Stage(**st)
        if reward_registry.resolve(s.name) is None:
            raise UserError(f"reward prs: stages.{i}: unknown reward {s.name!r}")
        parsed.append((s, reward_registry.get(s.name, **s.options)))

    def reward(samples: Any, prompts: list, meta: list[dict], ctx: Any) -> torch.Tensor:
        n = len(meta)
        total = torch.zeros(n, dtype=torch.float64)
        gate = torch.ones(n, dtype=torch.bool)
        for s, fn in parsed:
            col = fn(samples, prompts, meta, ctx)
            vals = torch.tensor([float("nan") if v is None else float(v) for v in _as_list(col)], dtype=torch.float64)
            ok = ~vals.isnan()
            total += torch.where(gate & ok, s.weight * vals, 0.0)
            gate &= ok & (vals >= s.threshold)
        return total.float()

    reward.group_aware = any(getattr(fn, "group_aware", False) for _, fn in parsed)
    reward.uses_policy = any(getattr(fn, "uses_policy", False) for _, fn in parsed)  # a stage may run the policy
    return reward


def _as_list(col: Any) -> list:
    if isinstance(col, torch.Tensor):
        return col.detach().reshape(-1).tolist()
    if hasattr(col, "tolist"):
        return list(col.tolist())
    return list(col)
