"""TempSamp-R1: put the ground-truth solution in every group as an off-policy anchor.

TempSamp-R1, "Effective Temporal Sampling with Reinforcement Fine-Tuning for Video LLMs" (2025). On temporal
grounding the on-policy samples of a hard video are often all poor, so GRPO's group comparison has nothing good to
move towards. TempSamp-R1 replaces one rollout per group with the ground-truth answer written as a completion
(an off-policy sample) and tempers its influence:

1. ``inject_ground_truth``: row ``position`` of every group becomes the formatted ground truth; the returned mask
   says which rows are off-policy (the policy then teacher-forces them to get their log-probs);
2. the raw rewards go through the soft shaping ``tempsamp_soft`` (:func:`mmgrpo.core.advantages.tempsamp_soft`:
   compress rewards above tau, stretch those below), then any estimator;
3. ``anchor_advantages``: the off-policy row's advantage is pinned to ``factor`` times the best on-policy advantage
   of its group, so the ground truth leads the group by a bounded margin instead of dwarfing it.

``tempsamp_advantages`` chains 2 and 3. Letters: B prompts, G rows per group, N = B*G.

>>> anchor_advantages(torch.tensor([[-0.5, 0.25, 1.0]]), torch.tensor([[False, False, True]]))  # 1.2 * 0.25
tensor([[-0.5000,  0.2500,  0.3000]])
"""

from __future__ import annotations

from typing import Any

import torch

from mmgrpo.core.advantages import get_estimator, get_shaping
from mmgrpo.core.errors import UserError
from mmgrpo.policies.offpolicy import format_ground_truth, inject_ground_truth  # noqa: F401  (step 1)


def anchor_advantages(adv: torch.Tensor, offpolicy_mask: torch.Tensor, factor: float = 1.2) -> torch.Tensor:
    """Off-policy rows get ``factor`` times the best on-policy advantage of their group.

    adv [B, G], offpolicy_mask [B, G] bool -> adv [B, G] (fp32, a new tensor). With m the max on-policy advantage:
    A_off = factor * m when m > 0. When m <= 0 (every on-policy row is at or below the group mean, typically because
    the ground truth is the only good row) we use A_off = factor * max |A_on|: the ground truth stays positive, on the
    scale of its group, instead of taking a negative or zero advantage for the best answer in the group (our choice).
    All on-policy advantages 0 (e.g. a zero-variance group) -> A_off = 0. Groups without an off-policy row are
    unchanged; a group with no on-policy row is an error.
    """
    if factor <= 0:
        raise UserError(f"anchor_advantages: factor={factor} must be > 0 (TempSamp-R1 style anchoring uses ~1.2)")
    a = torch.as_tensor(adv).to(torch.float32)
    off = torch.as_tensor(offpolicy_mask, dtype=torch.bool, device=a.device)
    if a.dim() != 2 or off.shape != a.shape:
        raise UserError(f"anchor_advantages: adv {tuple(a.shape)} and mask {tuple(off.shape)} must both be [B, G]")
    on = ~off
    if bool((off.any(-1) & ~on.any(-1)).any()):
        raise UserError("anchor_advantages: a group has only off-policy rows; keep at least one on-policy row")
    best = torch.where(on, a, float("-inf")).amax(-1)  # [B]
    spread = torch.where(on, a.abs(), 0.0).amax(-1)  # [B]
    anchor = factor * torch.where(best > 0, best, spread)  # [B]
    return torch.where(off, anchor[:, None], a)


def tempsamp_advantages(
    rewards: torch.Tensor,
    offpolicy_mask: torch.Tensor,
    *,
    estimator: str = "grpo",
    estimator_options: dict[str, Any] | None = None,
    shaping_options: dict[str, Any] | None = None,
    factor: float = 1.2,
) -> torch.Tensor:
    """TempSamp-R1 advantages: ``tempsamp_soft`` shaping -> ``estimator`` -> :func:`anchor_advantages`.

    rewards [B, G] raw (the off-policy rows included), offpolicy_mask [B, G] -> advantages [B, G].
    """
    shaped = get_shaping("tempsamp_soft")(rewards, **(shaping_options or {}))  # [B, G]
    adv = get_estimator(estimator)(shaped, **(estimator_options or {}))  # [B, G]
    return anchor_advantages(adv, offpolicy_mask, factor)
