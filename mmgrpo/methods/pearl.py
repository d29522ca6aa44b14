"""PEARL perception checklists: reason only as far as you have seen. The whole method, switched on by
``methods: {pearl: {cap: 0.5, checklist_weight: 0.1}}``.

PEARL, "Perceptual-Evidence Anchored Reinforced Learning for Multimodal Reasoning" (Zhang et al. 2025, arXiv
2511.18437), trains a VLM on two streams per prompt. Beside the usual reasoning rollouts, the policy answers a
*perception checklist*: short questions about the image with known answers ("how many red circles?" -> "3"). The
checklist score R_p of a group measures how well the policy actually perceived the image, and it gates the reasoning
update:

- ``checklist_reward``: R_p of one checklist answer sheet = the fraction of items graded correct
  (:func:`mmgrpo.rewards.text.grade`, the ``accuracy`` reward's grader);
- ``fidelity_gate``: per prompt, scale = 0 when the group's mean R_p is 0 (the policy saw nothing right: its
  reasoning update is skipped, whatever the reasoning reward says), else min(mean R_p, cap);
- ``apply_gate``: reasoning advantages times the prompt's scale;
- ``stream_weights``: per-row loss weights for one update over both streams: 1 for reasoning rows, lambda for
  checklist rows (the checklist stream trains perception without dominating the loss).

What the method registers (:data:`METHOD`): the reward ``pearl_checklist``; the policy wrapper :class:`PearlPolicy`
(each of the B prompts becomes TWO groups, interleaved ``[reasoning_0, checklist_0, reasoning_1, ...]``: 2B groups,
N = 2BG rows; checklist rows get loss weight lambda through ``rollout.loss_weight``); the advantage hook
:func:`pearl_gate_hook` (each reasoning group's advantages x ``fidelity_gate`` of the next, checklist, group); the
data need ``meta["checklist"]`` (the synthetic shapes QA has it).

Letters: B prompts, G rows per group; ``perception_rewards [B, G]`` holds R_p of each reasoning row's checklist
sheet (one sheet per reasoning row). NaN means "no checklist for this row" and is left out of the mean.

>>> fidelity_gate(torch.tensor([[0.0, 0.0], [0.2, 0.4], [1.0, 1.0]]))  # means 0, 0.3, 1 -> 0, 0.3, cap 0.5
tensor([0.0000, 0.3000, 0.5000])

The reward ``pearl_checklist``: every example adds a *checklist group*: G rows answering all its checklist questions in
one completion, ``<answer>2; yes</answer>``, the answers in the order of the questions, separated by ``;``. The
reward scores those rows (``meta["stream"] == "checklist"``) with :func:`checklist_reward` (each item graded like the
``accuracy`` reward); reasoning rows, and rows of runs without PEARL, get None.

>>> items = [["How many red objects are there?", "2"], ["Is there a triangle?", "yes"]]
>>> checklist_question(items)[-58:], checklist_answer(items)
('1. How many red objects are there? 2. Is there a triangle?', '2; yes')
>>> split_answers("2; no", 2), split_answers("2", 2)  # a missing answer is "" (graded wrong)
(['2', 'no'], ['2', ''])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch, Rollout
from mmgrpo.methods.registry import Method, PolicyWrapper, register_method
from mmgrpo.policies.vlm_inputs import MEDIA_KEYS
from mmgrpo.rewards.registry import register
from mmgrpo.rewards.text import ACCURACY_MODES, answer_or_completion, completion_text, grade


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


# ---------------------------------------- the reward
SEPARATOR = ";"
STREAM_KEY = "stream"  # row meta: "reasoning" | "checklist"


def checklist_question(items: Sequence[Sequence[Any]], separator: str = SEPARATOR) -> str:
    """The checklist group's question: every item's question, numbered, with the answer-sheet instruction."""
    if not items:
        raise UserError("PEARL: an example has an empty checklist; give checklist: [[question, answer], ...]")
    questions = " ".join(f"{i + 1}. {str(q).strip()}" for i, (q, _) in enumerate(items))
    return f"Answer each question about the image, in order, separated by {separator!r}: {questions}"


def checklist_answer(items: Sequence[Sequence[Any]], separator: str = SEPARATOR) -> str:
    """The ground-truth answer sheet: ``"2; yes"``."""
    return f"{separator} ".join(str(a) for _, a in items)


def split_answers(text: str, m: int, separator: str = SEPARATOR) -> list[str]:
    """An answer sheet split into exactly ``m`` answers: extra ones dropped, missing ones "" (graded wrong)."""
    parts = [p.strip() for p in text.split(separator)]
    return (parts + [""] * m)[:m]


@register("pearl_checklist")
def pearl_checklist(mode: str = "auto", separator: str = SEPARATOR, answer_tag: str = "answer"):
    """PEARL R_p: fraction of meta["checklist"] items answered right by a checklist row's answer sheet, else None.

    Checklist rows are those with ``meta["stream"] == "checklist"`` (made by :class:`PearlPolicy`, ``methods:
    {pearl: ...}``); their answer block (or whole completion) is split at ``separator``.
    """
    if mode not in ACCURACY_MODES:
        raise UserError(f"pearl_checklist: unknown mode {mode!r}; known: {', '.join(ACCURACY_MODES)}")

    def fn(samples, prompts, meta, ctx) -> list[float | None]:  # samples: N completions; meta: N dicts
        if len(samples) != len(meta):
            raise ValueError(f"pearl_checklist: {len(samples)} samples but {len(meta)} meta dicts")
        out: list[float | None] = []
        for s, m in zip(samples, meta):
            items = m.get("checklist")
            if m.get(STREAM_KEY) != "checklist" or not items:
                out.append(None)
                continue
            answers = split_answers(answer_or_completion(completion_text(s), answer_tag), len(items), separator)
            out.append(checklist_reward(answers, items, mode))
        return out

    return fn


# ---------------------------------------- the method: options, the two-stream policy, the gate


@dataclass
class PearlOptions:
    cap: float = 0.5
    """fidelity gate: reasoning advantages x min(mean R_p of the checklist group, cap); x 0 when mean R_p = 0"""
    checklist_weight: float = 0.1
    """lambda: loss weight of every checklist row (reasoning rows weigh 1)"""
    reward: str = "pearl_checklist"
    """the reward (name in rewards:) whose value on the checklist rows is R_p"""


REASONING, CHECKLIST = 0, 1  # rollout.extras["pearl_stream"] values


def stream_seed(seed: int, stream: int) -> int:
    """A seed for another stream of the same prompt (independent of ``seed``'s own draws and of the layout)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def checklist_prompt(meta: dict) -> tuple[dict, dict]:
    """(prompt, meta) of an example's checklist group: its media, its checklist, no answer (other rewards: None)."""
    items = meta.get("checklist")
    if not items:
        raise UserError(
            "methods.pearl is on but an example has no checklist; give each example "
            "checklist: [[question, answer], ...] (the synthetic shapes QA has them) or remove methods.pearl"
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


class PearlPolicy(PolicyWrapper):
    """A policy whose rollout of B prompts holds 2B groups: reasoning b, then checklist b.

    ``rollout.loss_weight [N]``: 1 on reasoning rows, ``checklist_weight`` on checklist rows;
    ``rollout.extras["pearl_stream"] [N]``: 0 reasoning, 1 checklist. Everything else (evaluation's ``generate``,
    log-probs, the trained model) is the wrapped policy's.
    """

    def __init__(self, inner: Any, checklist_weight: float = 0.1):
        super().__init__(inner)
        self._own("checklist_weight", float(checklist_weight))

    def rollout(self, batch: PromptBatch, group_size: int, generator: torch.Generator | None = None) -> Rollout:
        out = self.inner.rollout(pearl_batch(batch), group_size, generator)
        stream = torch.tensor([REASONING, CHECKLIST]).repeat(len(batch)).repeat_interleave(group_size)  # [N]
        out.loss_weight = torch.where(stream == CHECKLIST, self.checklist_weight, 1.0)  # [N]
        out.extras["pearl_stream"] = stream
        return out


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
            raise ValueError("PEARL: groups must alternate reasoning, checklist (rollout of PearlPolicy)")
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


def check_pearl(opts: PearlOptions, cfg: Any, key: str) -> None:
    """Refuse options that cannot work with the rest of ``cfg`` (``key``: ``methods.pearl in <file>``)."""
    if opts.cap <= 0 or opts.checklist_weight < 0:
        raise UserError(
            f"{key}: cap={opts.cap} must be > 0 and checklist_weight={opts.checklist_weight} >= 0 (PEARL: 0.5 and 0.1)"
        )
    if opts.reward not in [r.name for r in cfg.rewards]:
        raise UserError(
            f"{key}: PEARL is on but rewards: has no {opts.reward!r}; add {{name: {opts.reward}}} (it scores the "
            "checklist rows) or set methods.pearl.reward"
        )
    if cfg.advantage.dynamic_sampling:
        raise UserError(f"{key}: PEARL does not work with advantage.dynamic_sampling; turn one off")


METHOD = register_method(
    Method(
        name="pearl",
        paper="PEARL perception checklists (Zhang et al. 2025, arXiv 2511.18437): fidelity-gated reasoning",
        options=PearlOptions,
        pipelines=("vlm_reasoning",),
        rewards=("pearl_checklist",),
        data_keys=("checklist",),
        data_keys_needed="each",  # an example without a checklist stops the run (checklist_prompt)
        conflicts=("tempsamp",),
        check=check_pearl,
        wrap_policy=lambda policy, opts: PearlPolicy(policy, opts.checklist_weight),
        advantage_hooks=lambda opts: [pearl_gate_hook(opts.cap, opts.reward)],
    )
)
