"""ACRE's answer-consistency reward: re-ask the policy with shuffled options and its own reasoning.

ACRE, "Answer-Consistent Chain-of-thought Reinforcement Learning for Multi-modal Large Language Models" (Huang et al.
2025, arXiv 2510.10104); the pure pieces are in :mod:`mmgrpo.methods.acre`. For each multiple-choice row (a prompt
dict with >= 2 ``options`` and a letter ground truth in ``meta[answer_key]``):

1. the first answer is the letter of the row's ``<answer>`` block; ``first_correct`` grades it;
2. the options are shuffled (``shuffle_options``, never the identity) with a generator seeded by
   (``seed``, ``ctx.step``, the question, the row's slot in its group): independent of the process layout and of
   the other rows, so a resumed or 2-process run re-asks exactly the same way;
3. the reasoning (``<think>`` content) has its letter mentions renamed (``rewrite_letter_mentions``) and is shown
   back with the shuffled options (``build_reask_prompt``), with the SAME images, to ``ctx.policy.generate`` (greedy);
4. the second letter is mapped back to the original order (``map_back``); ``consistent`` = it equals the first;
5. reward = ``acre_reward(first_correct, consistent, table)`` (overrides: ``table: {correct_inconsistent: 0.3}``).

Rows that are not multiple choice get None. Logged: ``acre/consistent`` (fraction of MC rows whose answers agree).
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch
from mmgrpo.methods.acre import (
    DEFAULT_TABLE,
    LETTERS,
    acre_reward,
    build_reask_prompt,
    map_back,
    rewrite_letter_mentions,
    shuffle_options,
)
from mmgrpo.policies.vlm_inputs import MEDIA_KEYS
from rewards.listener import strip_answer
from rewards.registry import register
from rewards.text import answer_or_completion, completion_text, extract_choice, grade, infer_mode


def reask_generator(seed: int, step: int, question: str, slot: int) -> torch.Generator:
    """The shuffle's generator for one row: seeded by (seed, step, crc32(question), slot in the group)."""
    entropy = [seed, step, zlib.crc32(question.encode()), slot]
    return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1))


def choice_letter(text: str, n_options: int, answer_tag: str = "answer") -> str | None:
    """The option letter of a completion's answer, or None if it has none among the first ``n_options`` letters."""
    letter = extract_choice(answer_or_completion(text, answer_tag))
    return letter if letter is not None and letter in LETTERS[:n_options] else None


class AcreReward:
    """The ``acre`` reward callable (see the module doc); ``last_reasks`` holds the last call's re-ask prompts."""

    def __init__(self, table: dict[str, float], answer_key: str, seed: int, think_tag: str, answer_tag: str):
        self.table, self.answer_key, self.seed = table, answer_key, seed
        self.think_tag, self.answer_tag = think_tag, answer_tag
        self.last_reasks: list[str] = []
        self._consistent: list[bool] = []

    def is_multiple_choice(self, prompt: Any, meta: dict) -> bool:
        options = prompt.get("options") if isinstance(prompt, dict) else None
        gt = meta.get(self.answer_key)
        return bool(options) and len(options) >= 2 and gt is not None and infer_mode(gt) == "choice"

    def __call__(self, samples, prompts, meta, ctx) -> list[float | None]:  # samples: N completions; meta: N dicts
        G = int(ctx.group_size)
        rows = [n for n in range(len(samples)) if self.is_multiple_choice(prompts[n], meta[n])]
        out: list[float | None] = [None] * len(samples)
        self.last_reasks, self._consistent = [], []
        if not rows:
            return out
        if getattr(ctx, "policy", None) is None:
            raise UserError("the acre reward re-asks the policy: it needs ctx.policy (run it inside `mmgrpo train`)")
        texts = [completion_text(samples[n]) for n in rows]
        perms, asks = [], []
        for n, text in zip(rows, texts):
            question, options = str(prompts[n]["question"]), list(prompts[n]["options"])
            shuffled, perm = shuffle_options(options, reask_generator(self.seed, ctx.step, question, n % G))
            reasoning = rewrite_letter_mentions(strip_answer(text, self.think_tag, self.answer_tag), perm)
            perms.append(perm)
            asks.append(build_reask_prompt(question, shuffled, reasoning))
        media = [{k: meta[n][k] for k in MEDIA_KEYS if k in meta[n]} for n in rows]
        second = ctx.policy.generate(PromptBatch(prompts=[{"question": a} for a in asks], meta=media), greedy=True)
        self.last_reasks = asks
        for n, text, perm, answer in zip(rows, texts, perms, second):
            first = choice_letter(text, len(perm), self.answer_tag)
            again = choice_letter(answer, len(perm), self.answer_tag)
            consistent = first is not None and again is not None and map_back(again, perm) == first
            correct = first is not None and grade(first, meta[n][self.answer_key], "choice")
            out[n] = acre_reward(correct, consistent, self.table)
            self._consistent.append(consistent)
        return out

    def last_metrics(self) -> dict[str, float]:
        if not self._consistent:
            return {}
        return {"acre/consistent": sum(self._consistent) / len(self._consistent)}


@register("acre")
def acre(
    table: dict[str, float] | None = None,
    answer_key: str = "answer",
    seed: int = 0,
    think_tag: str = "think",
    answer_tag: str = "answer",
):
    """ACRE answer consistency: re-ask MC rows with shuffled options + their own reasoning; acre_reward table.

    ``table`` overrides any of correct_consistent (1.0), correct_inconsistent (0.5), wrong_consistent (0.0),
    wrong_inconsistent (0.0). Needs the policy (``ctx.policy.generate``); non-MC rows get None.
    """
    table = dict(table or {})
    for key in table:
        if key not in DEFAULT_TABLE:
            raise UserError(f"acre: unknown table key {key!r}; known: {', '.join(DEFAULT_TABLE)}")
    return AcreReward(table, answer_key, seed, think_tag, answer_tag)
