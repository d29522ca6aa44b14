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
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Mapping, Sequence

import torch

from mmgrpo.core.errors import UserError
from rewards.listener import strip_answer

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
    ``reasoning`` is removed (:func:`rewards.listener.strip_answer`): the first answer's letter must not be shown.
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
