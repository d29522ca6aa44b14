"""Beyond Variance: positive-negative prompt pairing and Weighted GRPO (Sheng, Li, Pang, Peng, Ma 2026, "Beyond
Variance: Prompt-Efficient RLVR via Rare-Event Amplification and Bidirectional Pairing", arXiv 2602.03452).

An effective minibatch holds (i) a reliable positive anchor, a hard-but-solvable prompt q+ (low but non-zero success
rate), and (ii) an explicit negative signal, an easy-but-brittle prompt q- (high success rate, not perfect); Weighted
GRPO amplifies the rare successes on q+ and the rare failures on q-. Switch (both parts)::

    sampler: {name: pairing, options: {tau_pos: 0.4, tau_neg: 0.6}}
    advantage: {estimator: weighted_grpo, options: {w_pos: 2.0, w_neg: 2.0}}

Equations (p̂(x): the prompt's empirical success rate, an EMA over its visits of its group's mean reward in [0, 1]):

- roles: q+ if 0 < p̂(x) <= tau_pos (role +1), q- if tau_neg <= p̂(x) < 1 (role -1), else 0 (never seen, never
  solved, always solved, or in between);
- pairing: the step's B prompts are B/2 pairs (q+_k, q-_k), each drawn uniformly among the prompts of that role
  (without repeats); a role with too few prompts is filled with prompts never seen (their p̂ is unknown: visiting
  them finds new anchors), then with any prompt. Every minibatch holds a slice of every group (the trainer's split),
  so each minibatch holds both prompts of every pair;
- Weighted GRPO: A = (r - mean_g) / (std_g + eps) (group-normalised, binary outcomes), then
  A <- w_pos A for the successes (A > 0) of q+ and A <- w_neg A for the failures (A < 0) of q-: a rare success on a
  hard prompt (A = sqrt((1 - p) / p) already large) becomes a sharp positive step, a rare failure on an easy prompt a
  strong penalty.

What the abstract leaves open and is our choice: the success rates come from the training visits themselves (the
paper measures them with multiple rollouts before selection), the role thresholds and the pair-level weights are
options (w_pos, w_neg), and a pair is drawn uniformly within its roles. Modality-free; the success rates need
rewards in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmgrpo.core.advantages import check_eps, finite, grpo, register_estimator
from mmgrpo.core.errors import UserError
from mmgrpo.core.sampling import PoolStats, PromptSampler, StepPlan, check_unit_rewards, register_sampler

PAPER = "Beyond Variance: rare-event amplification and bidirectional pairing (Sheng et al. 2026, arXiv 2602.03452)"


def _check_weighted_grpo(w_pos: float = 2.0, w_neg: float = 2.0, eps: float = 1e-6) -> None:
    for key, value in (("w_pos", w_pos), ("w_neg", w_neg)):
        finite(f"advantage.options.{key}", value, "must be a finite number > 0: the factor on the rare events' "
               "advantages (1 = plain GRPO, the paper's 2.0)", low=0.0)  # fmt: skip
    check_eps(eps)


@register_estimator("weighted_grpo", check=_check_weighted_grpo)
def weighted_grpo(rewards: torch.Tensor, *, roles: torch.Tensor | None = None, w_pos: float = 2.0,
                  w_neg: float = 2.0, eps: float = 1e-6, unbiased: bool = True) -> torch.Tensor:  # fmt: skip
    """Weighted GRPO (Beyond Variance): group-normalised advantages, successes of q+ prompts x ``w_pos``, failures of
    q- prompts x ``w_neg``.

    rewards [B, G], roles [B, 1] (+1: q+, hard-but-solvable; -1: q-, easy-but-brittle; 0: neither; from the
    ``pairing`` sampler) -> advantages [B, G]. Sheng et al. 2026, arXiv 2602.03452.
    """
    if roles is None:
        raise UserError(
            "estimator 'weighted_grpo' needs the prompt roles of the pairing sampler; set sampler: pairing"
        )
    if not (w_pos > 0 and w_neg > 0):
        raise UserError(f"weighted_grpo: w_pos={w_pos} and w_neg={w_neg} must be > 0 (1 = plain GRPO)")
    a = grpo(rewards, eps=eps, unbiased=unbiased)
    role = torch.as_tensor(roles, device=a.device).reshape(-1, 1)
    scale = torch.where((role > 0) & (a > 0), w_pos, torch.where((role < 0) & (a < 0), w_neg, 1.0))
    return a * scale


@dataclass
class PairingOptions:
    tau_pos: float = 0.4
    """q+ (hard but solvable): 0 < success rate <= tau_pos"""
    tau_neg: float = 0.6
    """q- (easy but brittle): tau_neg <= success rate < 1"""
    pass_ema: float = 0.5
    """decay of each prompt's success-rate EMA over its visits"""


@register_sampler("pairing")
class PairingSampler(PromptSampler):
    """Beyond Variance: prompt pairs of a hard-but-solvable anchor and an easy-but-brittle prompt.

    The roles come from online success rates and go to the weighted_grpo estimator."""

    Options = PairingOptions
    stateful = True
    needs_pool = True
    provides = ("roles",)

    def __init__(self, ctx: Any, options: PairingOptions | None = None):
        super().__init__(ctx, options)
        self.stats = PoolStats(int(ctx.pool), decay=self.options.pass_ema)

    @classmethod
    def check(cls, options: PairingOptions, cfg: Any, where: str) -> None:
        o = options
        if not 0.0 < o.tau_pos < o.tau_neg < 1.0:
            raise UserError(f"sampler.options.tau_pos={o.tau_pos}, tau_neg={o.tau_neg} in {where} must satisfy "
                            "0 < tau_pos < tau_neg < 1, e.g. 0.4 and 0.6")  # fmt: skip
        if not 0.0 <= o.pass_ema < 1.0:
            raise UserError(f"sampler.options.pass_ema={o.pass_ema} in {where} must lie in [0, 1), e.g. 0.5")
        if cfg.trainer.prompts_per_step % 2:
            raise UserError(
                f"trainer.prompts_per_step={cfg.trainer.prompts_per_step} in {where}: the pairing sampler draws pairs "
                "(a hard-but-solvable and an easy-but-brittle prompt); make it even"
            )

    def roles(self) -> torch.Tensor:
        """[P] +1 (q+), -1 (q-), 0 (neither or never seen)."""
        o, p = self.options, self.stats.mean_ema
        seen = self.stats.visits > 0
        pos = seen & (p > 0) & (p <= o.tau_pos)
        neg = seen & (p >= o.tau_neg) & (p < 1)
        return pos.long() - neg.long()

    def plan(self, step: int) -> StepPlan:
        g = self.generator(step)
        role, unseen = self.roles(), self.stats.visits == 0
        P, pairs = len(role), self.ctx.prompts_per_step // 2
        order = torch.randperm(P, generator=g).tolist()  # one shuffle: uniform choice within every role
        taken: set[int] = set()

        def pick(want: int) -> list[int]:
            out = []
            for pool in ([i for i in order if role[i] == want], [i for i in order if unseen[i]], order):
                for i in pool:
                    if len(out) == pairs:
                        return out
                    if i not in taken:
                        taken.add(i)
                        out.append(i)
            return out

        pos, neg = pick(1), pick(-1)
        return StepPlan(positions=[x for pair in zip(pos, neg) for x in pair])

    def estimator_inputs(self, positions: list[int], rewards: torch.Tensor) -> dict[str, torch.Tensor]:
        role = self.roles()
        out = torch.tensor([int(role[p]) if 0 <= p < len(role) else 0 for p in positions], dtype=torch.float32)
        return {"roles": out[:, None]}

    def observe(self, step: int, positions: list[int], rewards: torch.Tensor) -> dict[str, float]:
        check_unit_rewards("pairing", step, rewards)
        role = self.roles()  # the roles the step was planned with
        step_roles = [int(role[p]) for p in positions if 0 <= p < len(role)]
        self.stats.update(step, positions, rewards)
        n = max(len(step_roles), 1)
        return {
            "pairing/pos_frac": sum(x > 0 for x in step_roles) / n,
            "pairing/neg_frac": sum(x < 0 for x in step_roles) / n,
            "pairing/seen_frac": float((self.stats.visits > 0).double().mean()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state["stats"])
