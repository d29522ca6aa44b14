"""ACRE answer consistency: re-ask with shuffled options and the same reasoning; reward only answers that survive.

ACRE, "Answer-Consistent Chain-of-thought Reinforcement Learning for Multi-modal Large Language Models" (Huang et al.
2025, arXiv 2510.10104). After the policy writes a chain of thought and a first answer to a multiple-choice question,
the options are shuffled and the policy is asked again *with its own reasoning*; the second answer, mapped back to
the original letters, must agree with the first. The consistency-verification reward is high only when the first
answer is correct and the second agrees with it.

The pieces here are pure; the re-asking itself (a policy call) is wired by the trainer through ``ctx.policy``:

1. ``shuffled, perm = shuffle_options(options, rng)`` -- ``shuffled[i] = options[perm[i]]``, never the identity;
2. ``prompt = build_reask_prompt(question, shuffled, rewrite_letter_mentions(reasoning, perm))``;
3. ``second = map_back(letter_of_second_answer, perm)``; ``consistent = second == first``;
4. ``acre_reward(first_correct, consistent)``.

Letters are A, B, C, ... for options 0, 1, 2, ...

>>> shuffled, perm = ["blue", "red", "green"], [2, 0, 1]  # as if shuffle_options(["red", "green", "blue"], ...)
>>> map_back("A", perm), map_forward("A", perm)  # new A is blue = old C; old A (red) is now B
('C', 'B')
>>> rewrite_letter_mentions("Option A is too dark, so (C).", perm)
'Option B is too dark, so (A).'

The reward ``acre`` is the whole method (:data:`METHOD`; listing it under ``rewards:`` runs it). For each
multiple-choice row (a prompt dict with >= 2 ``options`` and a letter ground truth in ``meta[answer_key]``):

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

import random
import re
import string
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mmgrpo.core.errors import UserError, bad_option
from mmgrpo.core.types import PromptBatch
from mmgrpo.methods.listener import strip_answer
from mmgrpo.methods.registry import Method, register_method
from mmgrpo.policies.vlm_inputs import MEDIA_KEYS
from mmgrpo.rewards.registry import register
from mmgrpo.rewards.text import answer_or_completion, completion_text, extract_choice, grade, infer_mode

LETTERS = string.ascii_uppercase

# (first answer correct, second answer agrees with the first) -> reward.
DEFAULT_TABLE: dict[str, float] = {
    "correct_consistent": 1.0,  # right, and the reasoning carries the answer through the shuffle: full reward
    "correct_inconsistent": 0.5,  # right but the reasoning does not determine it (guess, position bias): half
    "wrong_consistent": 0.0,  # faithfully reasoned to a wrong answer: no reward
    "wrong_inconsistent": 0.0,  # wrong and unfaithful: no reward (never above wrong_consistent: that would pay
    # the policy for reasoning that does not support its answer)
}


def _permutation(n: int, rng: random.Random | torch.Generator) -> list[int]:
    if isinstance(rng, torch.Generator):
        return torch.randperm(n, generator=rng).tolist()
    return rng.sample(range(n), n)


def shuffle_options(options: Sequence[str], rng: random.Random | torch.Generator) -> tuple[list[str], list[int]]:
    """A uniformly random NON-identity reordering of ``options`` (>= 2 of them): ``(shuffled, perm)``.

    ``shuffled[i] = options[perm[i]]``. Rejection sampling (probability of a redraw 1/n! <= 1/2) keeps the result
    uniform over the n! - 1 non-identity permutations and reproducible for a seeded ``rng`` (``random.Random`` or
    ``torch.Generator``). One option (or none) cannot be reordered: it comes back as is.
    """
    n = len(options)
    if n > len(LETTERS):
        raise UserError(f"shuffle_options: {n} options; at most {len(LETTERS)} can be labelled A-Z")
    perm = list(range(n))
    while n >= 2 and perm == list(range(n)):
        perm = _permutation(n, rng)
    return [options[p] for p in perm], perm


def _check_letter(letter: str, perm: Sequence[int]) -> int:
    i = LETTERS.find(letter.strip().upper()) if len(letter.strip()) == 1 else -1
    if not 0 <= i < len(perm):
        raise UserError(f"option letter {letter!r} is not one of {LETTERS[: len(perm)]}; pass a single letter")
    return i


def map_back(letter: str, perm: Sequence[int]) -> str:
    """The original letter of the option shown as ``letter`` after the shuffle: ``LETTERS[perm[i]]``."""
    return LETTERS[perm[_check_letter(letter, perm)]]


def map_forward(letter: str, perm: Sequence[int]) -> str:
    """Where original option ``letter`` is shown after the shuffle: the i with ``perm[i] == index(letter)``."""
    return LETTERS[list(perm).index(_check_letter(letter, perm))]


# A letter mentioned as an option: a capital A-Z not touching other letters.
_L = r"\(?[A-Z]\)?(?![A-Za-z])"
_MENTION_RE = re.compile(
    # 1. after a keyword: "option B", "Options B and C", "answer is (D)", "choices: A, C or D", "option A/B"
    rf"(?P<kw>\b(?i:options?|choices?|answers?)(?:\s+(?i:is|are|was|were))?\s*:?\s*)"
    rf"(?P<list>{_L}(?:\s*(?:,|/|&|\band\b|\bor\b)\s*{_L})*)"
    # 2. in parentheses anywhere: "(C)"
    r"|\((?P<paren>[A-Z])\)"
    # 3. an enumeration at the start of a line: "B. too dark", "  C) ...", "D: ..."
    r"|^(?P<lead>[ \t]*)(?P<line>[A-Z])(?P<punct>[.):])(?=\s)",
    re.MULTILINE,
)
_LONE_LETTER_RE = re.compile(r"(?<![A-Za-z])[A-Z](?![A-Za-z])")


def rewrite_letter_mentions(reasoning: str, perm: Sequence[int]) -> str:
    """Rename the option letters a reasoning mentions so they point at the same options after the shuffle.

    The reasoning was written for the original order; re-asked with ``shuffled[i] = options[perm[i]]``, original
    letter j becomes ``LETTERS[i]`` with ``perm[i] == j`` (:func:`map_forward`). Rewritten, in one pass (a letter is
    never renamed twice), only capital letters of existing options:

    1. a letter or list of letters after "option(s)", "choice(s)", "answer(s)" (any case, optionally followed by
       "is/are/was/were" and ":"), letters optionally in parentheses, lists joined by ",", "/", "&", "and", "or":
       "option B", "Options B and C", "the answer is (D)", "choices: A, C or D";
    2. a letter in parentheses anywhere: "(C)";
    3. a letter opening a line, followed by ".", ")" or ":" and a space: "B. too dark".

    Anything else stays, on purpose: a bare capital is too ambiguous ("vitamin B", "point A", "A cat"), as are lower
    case letters. Letters past the number of options ("option F" with 4 options) are left alone.
    """
    n = len(perm)

    def rename(letter: str) -> str:
        j = LETTERS.find(letter)
        return map_forward(letter, perm) if 0 <= j < n else letter

    def sub(m: re.Match) -> str:
        if m.group("list") is not None:
            renamed = _LONE_LETTER_RE.sub(lambda x: rename(x.group(0)), m.group("list"))
            return m.group("kw") + renamed
        if m.group("paren") is not None:
            return f"({rename(m.group('paren'))})"
        return m.group("lead") + rename(m.group("line")) + m.group("punct")

    return _MENTION_RE.sub(sub, reasoning)


def acre_reward(first_correct: bool, consistent: bool, table: Mapping[str, float] | None = None) -> float:
    """The consistency-verification reward for one row, looked up in ``table`` (defaults: :data:`DEFAULT_TABLE`).

    ``table`` may override any of "correct_consistent" (1.0), "correct_inconsistent" (0.5), "wrong_consistent" (0.0),
    "wrong_inconsistent" (0.0). ACRE grants the high reward only when both answers agree and are correct and "a lower
    reward accordingly" otherwise; these values are our choice: correctness still pays half without consistency,
    and inconsistency is never rewarded above consistency.
    """
    values = dict(DEFAULT_TABLE)
    for key, v in (table or {}).items():
        if key not in DEFAULT_TABLE:
            raise UserError(f"acre_reward: unknown table key {key!r}; known: {', '.join(DEFAULT_TABLE)}")
        values[key] = float(v)
    key = f"{'correct' if first_correct else 'wrong'}_{'consistent' if consistent else 'inconsistent'}"
    return values[key]


def build_reask_prompt(question: str, shuffled_options: Sequence[str], reasoning: str) -> str:
    """The second-pass prompt: the question, the shuffled options labelled A., B., ..., and the reasoning.

    ``question`` must not already list the options (the old order would leak). Any ``<answer>`` block left in
    ``reasoning`` is removed (:func:`mmgrpo.methods.listener.strip_answer`): the first answer's letter must not be
    shown.
    Pass the reasoning through :func:`rewrite_letter_mentions` first.
    """
    if len(shuffled_options) > len(LETTERS):
        raise UserError(f"build_reask_prompt: {len(shuffled_options)} options; at most {len(LETTERS)} (A-Z)")
    options = "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(shuffled_options))
    return (
        f"{question.strip()}\n\nOptions:\n{options}\n\n"
        f"Here is a reasoning process for this question:\n<think>{strip_answer(reasoning)}</think>\n\n"
        "Based only on this reasoning, give the letter of the correct option in <answer> </answer> tags."
    )


# ---------------------------------------- the reward
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

    uses_policy = True
    """it runs the policy (``ctx.policy.generate``): the trainer scores it beside no sampling (``rollout_chunks``)"""

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
    t = {**DEFAULT_TABLE, **table}
    for right in ("correct", "wrong"):  # an answer its own reasoning does not carry through the shuffle pays more
        low, high = f"{right}_inconsistent", f"{right}_consistent"
        if t[low] > t[high]:
            raise UserError(f"acre: table {low}={t[low]} is above {high}={t[high]}: it would pay the policy for "
                            "reasoning that does not support its answer, the opposite of ACRE's consistency check; "
                            "keep it at or below")  # fmt: skip
    return AcreReward(table, answer_key, seed, think_tag, answer_tag)


def _check_acre(prefix: str, seed: int = 0) -> None:
    if seed < 0:  # numpy's seed sequence refused it in the first step's re-ask
        raise bad_option(f"{prefix}.seed", seed, "a seed is an integer >= 0; e.g. 0")


acre.check = _check_acre  # type: ignore[attr-defined]


METHOD = register_method(
    Method(
        name="acre",
        paper="ACRE answer consistency (Huang et al. 2025, arXiv 2510.10104): re-ask with shuffled options",
        pipelines=("vlm_reasoning",),
        rewards=("acre",),
        reward_switched=True,
        data_keys=("answer", "options"),
        local_forwards="its reward re-asks the policy only for this process's multiple-choice rows",
    )
)
