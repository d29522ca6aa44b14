"""How the method pieces plug into the VLM recipe (``vlm_reasoning``): switches, PEARL's second stream, the hooks.

The maths lives in :mod:`mmgrpo.methods.pearl` / :mod:`mmgrpo.methods.tempsamp`; this module only wires it onto the
seams of the loop (DESIGN.md, docs/hooks.md), under ``data.options.methods`` of the recipe:

- **PEARL** (Zhang et al. 2025, arXiv 2511.18437), ``methods.pearl.enabled``: :class:`PearlVLMPolicy` turns each of
  the B prompts into TWO groups, interleaved ``[reasoning_0, checklist_0, reasoning_1, ...]`` (2B groups, N = 2BG
  rows): the reasoning group answers the question; the checklist group answers all of ``meta["checklist"]`` in one
  completion (scored by the ``pearl_checklist`` reward, mmgrpo/methods/pearl.py). Checklist rows get loss weight lambda
  (``rollout.loss_weight``); :func:`pearl_gate_hook` scales each reasoning group's advantages by
  ``fidelity_gate`` = min(mean R_p of its checklist group, cap), 0 when that mean is 0 (the update is skipped).
- **TempSamp-R1**, ``methods.tempsamp.enabled``: the policy option ``inject_ground_truth`` writes the ground truth
  as the last row of every group (teacher-forced, ``rollout.extras["offpolicy_mask"]``); with ``anchor_factor`` set,
  :func:`tempsamp_anchor_hook` pins its advantage to factor x the best on-policy advantage of its group. The soft
  reward shaping is the core's ``advantage.shaping: tempsamp_soft``.

Hooks run in the order TempSamp anchor, then PEARL gate; both act on this rank's groups ``adv [B', G]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch, Rollout
from mmgrpo.methods.pearl import STREAM_KEY, apply_gate, checklist_question, fidelity_gate
from mmgrpo.methods.tempsamp import anchor_advantages
from mmgrpo.policies.vlm import VLMPolicy
from mmgrpo.policies.vlm_inputs import MEDIA_KEYS

REASONING, CHECKLIST = 0, 1  # rollout.extras["pearl_stream"] values


@dataclass
class PearlOptions:
    enabled: bool = False
    """PEARL: every example also contributes a checklist group (G rows answering its meta["checklist"])"""
    cap: float = 0.5
    """fidelity gate: reasoning advantages x min(mean R_p of the checklist group, cap); x 0 when mean R_p = 0"""
    checklist_weight: float = 0.1
    """lambda: loss weight of every checklist row (reasoning rows weigh 1)"""
    reward: str = "pearl_checklist"
    """the reward (name in rewards:) whose value on the checklist rows is R_p"""


@dataclass
class TempSampOptions:
    enabled: bool = False
    """TempSamp-R1: the last row of every group is the ground truth <think>...</think><answer>GT</answer>"""
    anchor_factor: float | None = 1.2
    """the ground-truth row's advantage = factor x the best on-policy advantage of its group; null = no anchoring"""


@dataclass
class VLMMethodsOptions:
    pearl: PearlOptions = field(default_factory=PearlOptions)
    """PEARL perception checklists (fidelity-gated reasoning)"""
    tempsamp: TempSampOptions = field(default_factory=TempSampOptions)
    """TempSamp-R1 ground-truth injection and advantage anchoring"""


# ---------------------------------------------------------------------------------------------- PEARL stream


def stream_seed(seed: int, stream: int) -> int:
    """A seed for another stream of the same prompt (independent of ``seed``'s own draws and of the layout)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def checklist_prompt(meta: dict) -> tuple[dict, dict]:
    """(prompt, meta) of an example's checklist group: its media, its checklist, no answer (other rewards: None)."""
    items = meta.get("checklist")
    if not items:
        raise UserError(
            "data.options.methods.pearl is on but an example has no checklist; give each example "
            "checklist: [[question, answer], ...] (the synthetic shapes QA has them) or disable PEARL"
        )
    media = {k: meta[k] for k in MEDIA_KEYS if k in meta}
    return {"question": checklist_question(items)}, {**media, "checklist": items, STREAM_KEY: "checklist"}


def pearl_batch(batch: PromptBatch) -> PromptBatch:
    """B prompts -> 2B: each reasoning prompt followed by its checklist prompt (seeded from the same prompt seed)."""
    prompts, meta, seeds = [], [], []
    for b, (p, m) in enumerate(zip(batch.prompts, batch.meta)):
        cp, cm = checklist_prompt(m)
        prompts += [p, cp]
        meta += [{**m, STREAM_KEY: "reasoning"}, cm]
        if batch.seeds:
            seeds += [batch.seeds[b], stream_seed(batch.seeds[b], CHECKLIST)]
    return PromptBatch(prompts=prompts, meta=meta, seeds=seeds, step=batch.step)


class PearlVLMPolicy(VLMPolicy):
    """:class:`VLMPolicy` whose rollout of B prompts holds 2B groups: reasoning b, then checklist b.

    ``rollout.loss_weight [N]``: 1 on reasoning rows, ``checklist_weight`` on checklist rows;
    ``rollout.extras["pearl_stream"] [N]``: 0 reasoning, 1 checklist. Evaluation (``generate``) is unchanged.
    """

    checklist_weight: float = 0.1

    def rollout(self, batch: PromptBatch, group_size: int, generator: torch.Generator | None = None) -> Rollout:
        out = super().rollout(pearl_batch(batch), group_size, generator)
        stream = torch.tensor([REASONING, CHECKLIST]).repeat(len(batch)).repeat_interleave(group_size)  # [N]
        out.loss_weight = torch.where(stream == CHECKLIST, float(self.checklist_weight), 1.0)  # [N]
        out.extras["pearl_stream"] = stream
        return out


# ---------------------------------------------------------------------------------------------- hooks


def pearl_gate_hook(cap: float = 0.5, reward: str = "pearl_checklist"):
    """PEARL's fidelity gate as an advantage hook: reasoning groups x fidelity_gate(R_p of the next group).

    ``adv [2B, G]`` (groups alternate reasoning, checklist), ``cols [V, R, N]`` -> adv [2B, G] and metrics
    ``pearl/gate_mean`` (mean scale over reasoning groups), ``pearl/skipped_groups`` (reasoning groups with scale 0),
    ``pearl/checklist_reward`` (mean R_p). Checklist groups keep their own advantages.
    """

    def hook(adv: torch.Tensor, rollout: Any, cols: torch.Tensor, names: list[str]):
        if reward not in names:
            raise UserError(f"PEARL needs the {reward!r} reward in rewards: (its R_p gates the reasoning groups)")
        G = adv.shape[1]
        stream = rollout.extras["pearl_stream"].view(-1, G)[:, 0]  # [2B]
        if stream.numel() % 2 or (stream[0::2] != REASONING).any() or (stream[1::2] != CHECKLIST).any():
            raise ValueError("PEARL: groups must alternate reasoning, checklist (rollout of PearlVLMPolicy)")
        r_p = cols[0, names.index(reward)].reshape(-1, G)[1::2]  # [B, G]: R_p of each checklist group's rows
        scale = fidelity_gate(r_p, cap)  # [B]
        out = adv.clone()
        out[0::2] = apply_gate(adv[0::2], scale.to(adv.device))
        metrics = {
            "pearl/gate_mean": scale.mean().item(),
            "pearl/skipped_groups": float((scale == 0).sum().item()),
            "pearl/checklist_reward": torch.nan_to_num(r_p).mean().item(),
        }
        return out, metrics

    return hook


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


def check_methods(methods: VLMMethodsOptions, cfg: Any) -> None:
    """Refuse switches that cannot work with the rest of ``cfg`` (errors name the key and the fix)."""
    pearl, ts = methods.pearl, methods.tempsamp
    if pearl.enabled:
        if pearl.cap <= 0 or pearl.checklist_weight < 0:
            raise UserError(
                f"data.options.methods.pearl: cap={pearl.cap} must be > 0 and checklist_weight="
                f"{pearl.checklist_weight} >= 0 (PEARL: 0.5 and 0.1)"
            )
        if pearl.reward not in [r.name for r in cfg.rewards]:
            raise UserError(
                f"data.options.methods.pearl is on but rewards: has no {pearl.reward!r}; add "
                f"{{name: {pearl.reward}}} (it scores the checklist rows) or set methods.pearl.reward"
            )
        if cfg.advantage.dynamic_sampling:
            raise UserError("data.options.methods.pearl does not work with advantage.dynamic_sampling; turn one off")
        if ts.enabled:
            raise UserError("data.options.methods: PEARL and TempSamp-R1 cannot be combined yet; enable one of them")
    if ts.enabled:
        if cfg.trainer.group_size < 2:
            raise UserError(
                f"TempSamp-R1 needs trainer.group_size >= 2 (one GT row + samples); got {cfg.trainer.group_size}"
            )
        if ts.anchor_factor is not None and ts.anchor_factor <= 0:
            raise UserError(
                f"data.options.methods.tempsamp.anchor_factor={ts.anchor_factor} must be > 0 (1.2) or null"
            )


def method_hooks(methods: VLMMethodsOptions) -> list:
    """The advantage hooks of the enabled methods, in order: TempSamp anchor, PEARL gate."""
    hooks = []
    if methods.tempsamp.enabled and methods.tempsamp.anchor_factor is not None:
        hooks.append(tempsamp_anchor_hook(methods.tempsamp.anchor_factor))
    if methods.pearl.enabled:
        hooks.append(pearl_gate_hook(methods.pearl.cap, methods.pearl.reward))
    return hooks
