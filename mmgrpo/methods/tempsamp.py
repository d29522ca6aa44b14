"""TempSamp-R1: put the ground-truth solution in every group as an off-policy anchor. The whole method, switched on by
``methods: {tempsamp: {anchor_factor: 1.2, position: last}}``.

TempSamp-R1, "Effective Temporal Sampling with Reinforcement Fine-Tuning for Video LLMs" (2025). On temporal
grounding the on-policy samples of a hard video are often all poor, so GRPO's group comparison has nothing good to
move towards. TempSamp-R1 replaces one rollout per group with the ground-truth answer written as a completion
(an off-policy sample) and tempers its influence:

1. ``inject_ground_truth``: row ``position`` of every group becomes the formatted ground truth; the returned mask
   says which rows are off-policy (the policy then teacher-forces them to get their log-probs). In a run the policy
   wrapper :class:`TempSampPolicy` writes each prompt's formatted ground truth into its meta
   (:data:`mmgrpo.policies.offpolicy.OFFPOLICY_KEY`) and the VLM policy's generic off-policy-row mechanism does this;
2. the raw rewards go through the soft shaping ``tempsamp_soft`` (:func:`mmgrpo.core.advantages.tempsamp_soft`:
   compress rewards above tau, stretch those below), then any estimator. In a config this is
   ``advantage.shaping: tempsamp_soft``, a core shaping that the method does not switch on by itself;
3. ``anchor_advantages``: the off-policy row's advantage is pinned to ``factor`` times the best on-policy advantage
   of its group, so the ground truth leads the group by a bounded margin instead of dwarfing it.

``tempsamp_advantages`` chains 2 and 3; in a run, 3 is the advantage hook :func:`tempsamp_anchor_hook`. What the
method registers (:data:`METHOD`): the policy wrapper, the anchoring hook, options ``anchor_factor`` (null: inject
without anchoring), ``position`` and ``ground_truth_key``. Letters: B prompts, G rows per group, N = B*G.

>>> anchor_advantages(torch.tensor([[-0.5, 0.25, 1.0]]), torch.tensor([[False, False, True]]))  # 1.2 * 0.25
tensor([[-0.5000,  0.2500,  0.3000]])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmgrpo.core.advantages import get_estimator, get_shaping
from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch, Rollout
from mmgrpo.methods.registry import Method, PolicyWrapper, register_method
from mmgrpo.policies.offpolicy import (  # noqa: F401  (inject_ground_truth: step 1, re-exported)
    OFFPOLICY_KEY,
    OFFPOLICY_POSITION_KEY,
    format_ground_truth,
    inject_ground_truth,
    offpolicy_slot,
)


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


# ---------------------------------------- the method: options, the ground-truth rows, the anchoring hook


@dataclass
class TempSampOptions:
    anchor_factor: float | None = 1.2
    """the ground-truth row's advantage = factor x the best on-policy advantage of its group; null = no anchoring"""
    position: str | int = "last"
    """the row of every group that holds the ground truth: last, first or a slot index in [0, G)"""
    ground_truth_key: str = "answer"
    """meta key of the ground truth, written as <think>meta["reasoning"]</think><answer>GT</answer>"""


class TempSampPolicy(PolicyWrapper):
    """A policy whose every group holds the prompt's ground truth, teacher-forced, at row ``position``.

    The wrapper only writes each prompt's formatted ground truth into its meta; the wrapped policy's off-policy-row
    mechanism (:mod:`mmgrpo.policies.offpolicy`) teacher-forces it and sets ``rollout.extras["offpolicy_mask"]``.
    """

    def __init__(self, inner: Any, position: str | int = "last", ground_truth_key: str = "answer"):
        super().__init__(inner)
        self._own("position", position)
        self._own("ground_truth_key", ground_truth_key)

    def rollout(self, batch: PromptBatch, group_size: int, generator: torch.Generator | None = None) -> Rollout:
        key = self.ground_truth_key
        missing = [b for b, m in enumerate(batch.meta) if m.get(key) is None]
        if missing:
            raise UserError(
                f"methods.tempsamp (TempSamp-R1): prompt {missing[0]} has no meta[{key!r}]; give every example a "
                "ground truth, set methods.tempsamp.ground_truth_key, or remove methods.tempsamp"
            )
        meta = [
            {
                **m,
                OFFPOLICY_KEY: format_ground_truth(str(m[key]), str(m.get("reasoning") or "")),
                OFFPOLICY_POSITION_KEY: self.position,
            }
            for m in batch.meta
        ]
        batch = PromptBatch(prompts=batch.prompts, meta=meta, seeds=batch.seeds, step=batch.step)
        return self.inner.rollout(batch, group_size, generator)


def tempsamp_anchor_hook(factor: float = 1.2):
    """TempSamp-R1 anchoring as an advantage hook: off-policy rows get factor x the best on-policy advantage.

    ``adv [B, G]``, ``rollout.extras["offpolicy_mask"] [N]`` -> adv [B, G] and ``tempsamp/anchor_adv`` (mean
    advantage of the ground-truth rows).
    """

    def hook(adv: torch.Tensor, rollout: Any, cols: torch.Tensor, names: list[str]):
        off = rollout.extras["offpolicy_mask"].reshape(adv.shape).to(adv.device)  # [B, G]
        out = anchor_advantages(adv, off, factor)
        return out, {"tempsamp/anchor_adv": out[off].mean().item() if off.any() else 0.0}

    return hook


def check_tempsamp(opts: TempSampOptions, cfg: Any, key: str) -> None:
    """Refuse options that cannot work with the rest of ``cfg`` (``key``: ``methods.tempsamp in <file>``)."""
    G = cfg.trainer.group_size
    if G < 2:
        raise UserError(f"{key}: TempSamp-R1 needs trainer.group_size >= 2 (one GT row + samples); got {G}")
    if opts.anchor_factor is not None and opts.anchor_factor <= 0:
        raise UserError(f"{key}: anchor_factor={opts.anchor_factor} must be > 0 (1.2) or null (no anchoring)")
    try:
        offpolicy_slot(opts.position, G)
    except UserError as e:
        raise UserError(f"{key}: position={opts.position!r} is not a row of a group of {G}: {e}") from e


METHOD = register_method(
    Method(
        name="tempsamp",
        paper="TempSamp-R1 (2025): the ground truth as a teacher-forced off-policy row, its advantage anchored",
        options=TempSampOptions,
        pipelines=("vlm_reasoning",),
        data_keys=("answer",),
        conflicts=("pearl", "scaf_grpo"),  # its ground-truth row makes no group all-fail: Scaf-GRPO never fires
        check=check_tempsamp,
        wrap_policy=lambda policy, opts: TempSampPolicy(policy, opts.position, opts.ground_truth_key),
        advantage_hooks=lambda opts: [] if opts.anchor_factor is None else [tempsamp_anchor_hook(opts.anchor_factor)],
    )
)
