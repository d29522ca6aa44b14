"""PEARL perception checklists: reason only as far as you have seen.

PEARL, "Perceptual-Evidence Anchored Reinforced Learning for Multimodal Reasoning" (Zhang et al. 2025, arXiv
2511.18437), trains a VLM on two streams per prompt. Beside the usual reasoning rollouts, the policy answers a
*perception checklist*: short questions about the image with known answers ("how many red circles?" -> "3"). The
checklist score R_p of a group measures how well the policy actually perceived the image, and it gates the reasoning
update:

- ``checklist_reward``: R_p of one checklist answer sheet = the fraction of items graded correct
  (:func:`rewards.text.grade`, the ``accuracy`` reward's grader);
- ``fidelity_gate``: per prompt, scale = 0 when the group's mean R_p is 0 (the policy saw nothing right: its
  reasoning update is skipped, whatever the reasoning reward says), else min(mean R_p, cap);
- ``apply_gate``: reasoning advantages times the prompt's scale;
- ``stream_weights``: per-row loss weights for one update over both streams: 1 for reasoning rows, lambda for
  checklist rows (the checklist stream trains perception without dominating the loss).

Letters: B prompts, G rows per group; ``perception_rewards [B, G]`` holds R_p of each reasoning row's checklist
sheet (one sheet per reasoning row). NaN means "no checklist for this row" and is left out of the mean.

>>> fidelity_gate(torch.tensor([[0.0, 0.0], [0.2, 0.4], [1.0, 1.0]]))  # means 0, 0.3, 1 -> 0, 0.3, cap 0.5
tensor([0.0000, 0.3000, 0.5000])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmgrpo.core.errors import UserError
from rewards.text import answer_or_completion, grade


def checklist_reward(answers: Sequence[str], checklist: Sequence[tuple[str, Any]], mode: str = "auto") -> float:
    """R_p: mean over checklist items of 1[answer graded correct] (each answer's ``<answer>`` block if it has one).

    answers [M] model answers, checklist [M] (question, ground truth) pairs in the same order -> float in [0, 1].
    """
    if not checklist:
        raise UserError("checklist_reward: the checklist is empty; give at least one (question, answer) item")
    if len(answers) != len(checklist):
        raise UserError(f"checklist_reward: {len(answers)} answers for {len(checklist)} checklist items; one each")
    hits = [grade(answer_or_completion(a), gt, mode) for a, (_, gt) in zip(answers, checklist)]
    return sum(hits) / len(hits)


def fidelity_gate(perception_rewards: torch.Tensor, cap: float = 0.5) -> torch.Tensor:
    """Per-prompt scale of the reasoning advantages: 0 if the group's mean R_p is 0, else min(mean R_p, cap).

    perception_rewards [B, G] (NaN: no checklist, ignored; a group with none counts as mean 0) -> scale [B] fp32.
    """
    if cap <= 0:
        raise UserError(f"fidelity_gate: cap={cap} must be > 0 (PEARL uses 0.5)")
    r = torch.as_tensor(perception_rewards).to(torch.float32)
    if r.dim() != 2:
        raise UserError(f"fidelity_gate: perception rewards must be [B, G], got shape {tuple(r.shape)}")
    valid = ~r.isnan()
    mean = torch.where(valid, r, 0.0).sum(-1) / valid.sum(-1).clamp_min(1)  # [B]
    return torch.where(mean == 0, 0.0, mean.clamp(max=cap))


def apply_gate(adv: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adv [B, G] (or [B, G, K]) * scale [B] broadcast over the group (and units)."""
    if adv.dim() < 2 or scale.shape != (adv.shape[0],):
        raise ValueError(
            f"apply_gate: adv {tuple(adv.shape)} needs [B, G, ...] and scale [B]; got {tuple(scale.shape)}"
        )
    return adv * scale.to(adv.dtype).view(-1, *([1] * (adv.dim() - 1)))


def stream_weights(n_reasoning: int, n_checklist: int, lam: float = 0.1) -> torch.Tensor:
    """Row loss weights [n_reasoning + n_checklist]: 1 for the reasoning rows (first), ``lam`` for checklist rows."""
    if n_reasoning < 0 or n_checklist < 0 or lam < 0:
        raise UserError(f"stream_weights: counts and lam must be >= 0; got {n_reasoning}, {n_checklist}, lam={lam}")
    return torch.cat([torch.ones(n_reasoning), torch.full((n_checklist,), float(lam))])
