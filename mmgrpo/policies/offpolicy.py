"""Off-policy rows in a group: a known completion (e.g. the ground truth) written into one slot of every group.

The mechanism TempSamp-R1 (:mod:`mmgrpo.methods.tempsamp`) builds on: a prompt whose meta carries
``meta[OFFPOLICY_KEY]`` (a completion text) and optionally ``meta[OFFPOLICY_POSITION_KEY]`` ("last", "first" or a
slot) gets that completion in that row of its group; the VLM policy teacher-forces the row, so its ``logp_old`` is its
log-prob under the sampling parameters and its ratio starts at 1 like every other row
(``rollout.extras["offpolicy_mask"]`` marks it). The policy has no option for it: whoever fills the meta (a method's
policy wrapper) decides.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmgrpo.core.errors import UserError

OFFPOLICY_KEY = "offpolicy_completion"
"""prompt meta: the completion written (teacher-forced) into one row of the prompt's group"""
OFFPOLICY_POSITION_KEY = "offpolicy_position"
"""prompt meta: the row of the group it replaces: "last" (default), "first" or a slot index"""


def format_ground_truth(answer: str, reasoning: str = "", think_tag: str = "think", answer_tag: str = "answer") -> str:
    """The ground truth as an R1-style completion: ``<think>reasoning</think><answer>answer</answer>``."""
    return f"<{think_tag}>{reasoning}</{think_tag}><{answer_tag}>{answer}</{answer_tag}>"


def offpolicy_slot(position: str | int, group_size: int) -> int:
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
    slot = offpolicy_slot(position, G)
    out = list(completions)
    mask = torch.zeros(N, dtype=torch.bool)
    for b, gt in enumerate(gt_completions):
        out[b * G + slot] = gt
        mask[b * G + slot] = True
    return out, mask


def offpolicy_completions(metas: Sequence[dict]) -> tuple[list[str], str | int] | None:
    """The off-policy completions [B] of a batch's prompt metas and their common position; None when there are none.

    Either every prompt carries ``meta[OFFPOLICY_KEY]`` or none does (a group without its row would be scored
    against a different baseline), and they share one position.
    """
    have = [OFFPOLICY_KEY in m for m in metas]
    if not any(have):
        return None
    if not all(have):
        raise UserError(
            f"off-policy rows: prompt {have.index(False)} has no meta[{OFFPOLICY_KEY!r}] while others do; every "
            "prompt of a batch needs its off-policy completion"
        )
    positions = {m.get(OFFPOLICY_POSITION_KEY, "last") for m in metas}
    if len(positions) > 1:
        raise UserError(
            f"off-policy rows: the prompts of one batch ask for different positions {sorted(map(str, positions))}"
        )
    return [str(m[OFFPOLICY_KEY]) for m in metas], positions.pop()
