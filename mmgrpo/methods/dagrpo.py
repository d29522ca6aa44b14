"""DaGRPO: distinctiveness-aware masking of homogeneous rollout pairs, plus off-policy anchors for hard prompts.
Switched on by ``methods: {dagrpo: {min_distinct: 0.1, anchors: true}}``.

Xie, Wang, Wang, Chen & Lin 2025, "DaGRPO: Rectifying Gradient Conflict in Reasoning via Distinctiveness-Aware Group
Relative Policy Optimization" (arXiv 2512.06337). For routine prompts, near-identical rollouts pull the gradient in
conflicting directions; for hard prompts, too few positives leave nothing to learn from. Two mechanisms:

1. **Sequence-level gradient rectification**: GRPO's advantage is a sum over pairs,
   A_i = (r_i - mean r) / sigma = 1/G sum_j (r_i - r_j) / sigma; DaGRPO masks the pairs whose fine-grained scores
   are not distinct:

       A_i = 1/G' sum_{j in group} m_ij (r_i - r_j) / (sigma + eps),   m_ij = 1[|s_i - s_j| >= min_distinct]

   with r the weighted reward, sigma its (unbiased) group std, G' the rows taking part, and s the fine-grained
   score: the reward named by ``score`` (e.g. a process reward listed with weight 0) or, by default, r itself. With
   ``min_distinct: 0`` every pair counts and A is exactly GRPO's. A pair of homogeneous rollouts then adds nothing,
   and a group whose rollouts are all alike gets A = 0. The abstract says "fine-grained scoring to dynamically mask
   sample pairs with low distinctiveness"; the paper scores with an LLM, here any configured reward can be the
   scorer (our reading; the threshold form is ours).
2. **Off-policy anchors** (VLM recipes; ``anchors: true``): every group holds the prompt's ground truth as a
   teacher-forced row, through the same mechanism as TempSamp-R1 (:mod:`mmgrpo.policies.offpolicy`: the policy
   wrapper writes ``meta[OFFPOLICY_KEY]``, the VLM policy teacher-forces the row and marks it in
   ``rollout.extras["offpolicy_mask"]``). The anchor takes part only where it recovers a signal: in a *hard* group
   (no on-policy row reaches the anchor's reward) the pairs above include the anchor; in the other groups the anchor
   gets advantage 0 and the on-policy rows are compared among themselves.

The hook replaces the estimator's advantage (the load check requires ``advantage.estimator: grpo``, whose statistics
it generalises). Diffusion: rectification applies (``anchors: false``); anchors do not (a diffusion group has no
ground-truth sample to teacher-force). Logged: ``dagrpo/masked_pairs`` (fraction of ordered pairs i != j masked),
``dagrpo/anchored_groups`` (groups whose anchor took part).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmgrpo.core.errors import UserError
from mmgrpo.methods.registry import Method, register_method
from mmgrpo.methods.tempsamp import TempSampPolicy
from mmgrpo.policies.offpolicy import offpolicy_slot


def rectified_advantages(
    rewards: torch.Tensor,
    scores: torch.Tensor,
    min_distinct: float = 0.1,
    include: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DaGRPO's pairwise advantage. rewards, scores [B, G]; include [B, G] bool (rows taking part; default all) ->
    (advantages [B, G] with 0 on excluded rows and zero-variance groups, masked-pair fraction [B])."""
    r, s = rewards.float(), scores.float()
    inc = torch.ones_like(r, dtype=torch.bool) if include is None else include.bool()
    both = inc[:, :, None] & inc[:, None, :]  # [B, G, G]
    eye = torch.eye(r.shape[1], dtype=torch.bool, device=r.device)[None]
    distinct = (s[:, :, None] - s[:, None, :]).abs() >= min_distinct  # [B, G, G]
    m = both & distinct & ~eye
    n = inc.sum(-1, keepdim=True).float()  # [B, 1] G'
    mean = torch.where(inc, r, 0.0).sum(-1, keepdim=True) / n.clamp_min(1)
    std = (torch.where(inc, (r - mean) ** 2, 0.0).sum(-1, keepdim=True) / (n - 1).clamp_min(1)).sqrt()  # [B, 1]
    diff = r[:, :, None] - r[:, None, :]  # [B, G, G] r_i - r_j
    adv = torch.where(m, diff, 0.0).sum(-1) / (n.clamp_min(1) * (std + eps))  # [B, G]
    spread = torch.where(inc, r, -torch.inf).amax(-1) - torch.where(inc, r, torch.inf).amin(-1)  # [B]
    keep = inc & (spread > eps)[:, None] & (n > 1)
    pairs = (both & ~eye).sum((-1, -2)).float()  # [B]
    masked = torch.where(pairs > 0, 1.0 - m.sum((-1, -2)).float() / pairs.clamp_min(1), 0.0)
    return torch.where(keep, adv, 0.0), masked


def anchored_include(rewards: torch.Tensor, offpolicy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards [B, G], offpolicy [B, G] bool -> (include [B, G], hard [B]): a group is hard when no on-policy row
    reaches its anchor's reward; the anchor takes part only there."""
    on = ~offpolicy
    best_on = torch.where(on, rewards, -torch.inf).amax(-1)  # [B]
    anchor = torch.where(offpolicy, rewards, -torch.inf).amax(-1)  # [B]
    hard = offpolicy.any(-1) & (best_on < anchor)
    return on | (offpolicy & hard[:, None]), hard


@dataclass
class DaGRPOOptions:
    min_distinct: float = 0.1
    """pairs whose scores differ by less than this are masked (0: every pair, plain GRPO)"""
    score: str | None = None
    """the reward (name in rewards:) that scores distinctiveness; null: the weighted reward itself"""
    anchors: bool = True
    """VLM recipes: a teacher-forced ground-truth row in every group, used only in hard groups"""
    position: str | int = "last"
    """the row of every group that holds the anchor: last, first or a slot index"""
    ground_truth_key: str = "answer"
    """meta key of the ground truth written as the anchor's answer"""


def dagrpo_hook(opts: DaGRPOOptions):
    """The rectified (and anchored) advantage on this rank's groups: adv [B, G] -> [B, G] (module doc)."""

    def hook(adv: torch.Tensor, rollout: Any, cols: torch.Tensor, names: list[str], weights: torch.Tensor):
        raw = cols[0].float()  # [R, N] main samples
        w = torch.as_tensor(weights, dtype=torch.float32)[:, None]
        r = (torch.nan_to_num(raw) * w).sum(0).reshape(adv.shape)  # [B, G]
        s = r if opts.score is None else torch.nan_to_num(raw[names.index(opts.score)]).reshape(adv.shape)
        include, metrics = None, {}
        if opts.anchors and "offpolicy_mask" in rollout.extras:
            off = rollout.extras["offpolicy_mask"].bool().reshape(adv.shape)
            include, hard = anchored_include(r, off)
            metrics["dagrpo/anchored_groups"] = float(hard.sum())
        out, masked = rectified_advantages(r, s, opts.min_distinct, include)
        metrics["dagrpo/masked_pairs"] = float(masked.mean())
        return out.to(adv.dtype), metrics

    return hook


class AnchorPolicy(TempSampPolicy):
    """TempSamp-R1's ground-truth rows as DaGRPO's anchors (a missing ground truth is named as DaGRPO's)."""

    def rollout(self, batch: Any, group_size: int, generator: Any = None) -> Any:
        missing = [b for b, m in enumerate(batch.meta) if m.get(self.ground_truth_key) is None]
        if missing:
            raise UserError(
                f"methods.dagrpo (anchors): prompt {missing[0]} has no meta[{self.ground_truth_key!r}] to write as "
                "its anchor; give every example a ground truth, set methods.dagrpo.ground_truth_key, or anchors: false"
            )
        return super().rollout(batch, group_size, generator)


def check_dagrpo(opts: DaGRPOOptions, cfg: Any, key: str) -> None:
    if not opts.min_distinct >= 0:
        raise UserError(f"{key}: min_distinct={opts.min_distinct} must be >= 0 (0 keeps every pair: plain GRPO)")
    if cfg.advantage.estimator != "grpo":
        raise UserError(f"{key}: DaGRPO's rectified advantage replaces GRPO's; set advantage.estimator: grpo "
                        f"(got {cfg.advantage.estimator!r})")  # fmt: skip
    if opts.score is not None and opts.score not in [r.name for r in cfg.rewards]:
        raise UserError(f"{key}: score={opts.score!r} is not in rewards: ({[r.name for r in cfg.rewards]}); list the "
                        "scoring reward (weight 0 keeps it out of the reward) or set score: null")  # fmt: skip
    if opts.anchors:
        if cfg.pipeline != "vlm_reasoning":
            raise UserError(f"{key}: anchors are teacher-forced ground-truth completions (vlm_reasoning); on "
                            f"pipeline {cfg.pipeline!r} set methods.dagrpo.anchors=false")  # fmt: skip
        if cfg.trainer.group_size < 2:
            raise UserError(f"{key}: anchors take one row of every group; trainer.group_size must be >= 2")
        try:  # at load, not in the first step's rollout (a bad position left a run directory behind)
            offpolicy_slot(opts.position, cfg.trainer.group_size)
        except UserError as e:
            raise UserError(f"{key}: position={opts.position!r} is not a row of a group of "
                            f"{cfg.trainer.group_size}: {e}") from e  # fmt: skip


METHOD = register_method(
    Method(
        name="dagrpo",
        paper="DaGRPO (Xie et al. 2025, arXiv 2512.06337): distinctiveness-aware pair masking, off-policy anchors",
        options=DaGRPOOptions,
        conflicts=("tempsamp", "pearl"),
        check=check_dagrpo,
        wrap_policy=lambda policy, o: AnchorPolicy(policy, o.position, o.ground_truth_key) if o.anchors else policy,
        advantage_hooks=lambda o: [dagrpo_hook(o)],
    )
)
