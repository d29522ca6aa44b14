"""Off-policy rows in a group: a known completion (e.g. the ground truth) written into one slot of every group.

The mechanism TempSamp-R1 (:mod:`mmgrpo.methods.tempsamp`) builds on: the VLM policy teacher-forces such a row, so
its ``logp_old`` is its log-prob under the sampling parameters and its ratio starts at 1 like every other row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmgrpo.core.errors import UserError


def format_ground_truth(answer: str, reasoning: str = "", think_tag: str = "think", answer_tag: str = "answer") -> str:
    """The ground truth as an R1-style completion: ``<think>reasoning</think><answer>answer</answer>``."""
    return f"<{think_tag}>{reasoning}</{think_tag}><{answer_tag}>{answer}</{answer_tag}>"


def _slot(position: str | int, group_size: int) -> int:
    if position == "first":
        return 0
    if position == "last":
        return group_size - 1
    if isinstance(position, int) and not isinstance(position, bool) and 0 <= position < group_size:
        return position
    raise UserError(f"inject_ground_truth: position={position!r}; use 'first', 'last' or an int in [0, {group_size})")


def inject_ground_truth(
    completions: Sequence[str], group_size: int, gt_completions: Sequence[str], position: str | int = "last"
) -> tuple[list[str], torch.Tensor]:
    """Replace one row per group with its prompt's ground-truth completion.

    completions [N] (groups of ``group_size`` contiguous rows), gt_completions [B] -> (completions [N] with row
    ``b * G + slot`` replaced by ``gt_completions[b]``, offpolicy_mask BoolTensor [N]). ``position``: "last"
    (slot G - 1), "first" (slot 0) or a slot index. The input list is not modified.
    """
    G, N = int(group_size), len(completions)
    if G < 2:
        raise UserError(f"inject_ground_truth: group_size={G}; need >= 2 so a group keeps an on-policy row")
    if N % G:
        raise ValueError(f"inject_ground_truth: {N} completions is not a multiple of group_size {G}")
    if len(gt_completions) != N // G:
        raise UserError(f"inject_ground_truth: {len(gt_completions)} ground truths for {N // G} groups; one per group")
    slot = _slot(position, G)
    out = list(completions)
    mask = torch.zeros(N, dtype=torch.bool)
    for b, gt in enumerate(gt_completions):
        out[b * G + slot] = gt
        mask[b * G + slot] = True
    return out, mask
