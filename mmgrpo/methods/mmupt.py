"""MM-UPT's self-rewarding majority vote: reward the rows that agree with their group's most common answer.
The whole method: the reward ``majority_vote`` (listing it under ``rewards:`` runs it; ``methods: {mmupt: {}}`` also
checks that it is listed and that the recipe is ``vlm_reasoning``, :data:`METHOD`).

MM-UPT ("Unsupervised Post-Training for Multi-Modal LLM Reasoning via GRPO", Wei et al. 2025, arXiv 2505.22453),
after TTRL (Zuo et al. 2025): no ground truth is used. Each row's final answer is extracted; the group's majority
answer is the most frequent one; a row scores 1.0 iff its answer equals the majority, else 0.0.

Rules (ours where MM-UPT is silent or differs, marked):

- **Answers** are read from the last ``<answer>`` block (``require_answer_tag=True``, the default; a completion
  without one is unparseable) or, with ``require_answer_tag=False``, from the whole completion when there is no block.
  Requiring the tag is our choice: without ground truth a number picked out of the reasoning would vote.
- **Equality** by ``mode``: "choice" -> the option letter (:func:`mmgrpo.rewards.text.extract_choice`); "numeric"
-> the
  first number (:func:`mmgrpo.rewards.text.extract_number`, so "0.5", "1/2" and "\\frac{1}{2}" agree), two numbers
  being
  equal when ``|x - y| <= atol + rtol * |y|``; "string" -> :func:`mmgrpo.rewards.text.normalize_text`; "auto" ->
  per answer,
  numeric if the whole answer is a number, else its choice letter if it has one, else string.
  Answers of different kinds never agree.
- **Unparseable** answers (no letter / no number / empty after normalisation / no answer block) never vote and
  score 0 (MM-UPT's code lets an empty extraction vote and even win; we do not).
- **Ties**: the earliest-appearing answer among the tied wins -- what MM-UPT's ``Counter(answers).most_common(1)``
  does (Counter keeps first-insertion order and ``most_common`` sorts stably). A group with no parseable answer
  scores all 0.

>>> from mmgrpo.core.types import RewardContext
>>> fn = majority_vote(mode="choice")
>>> fn(["<answer>B</answer>", "<answer>(B)</answer>", "<answer>A</answer>", "B"], None, None, RewardContext(4))
[1.0, 1.0, 0.0, 0.0]
"""

from __future__ import annotations

import math
from typing import Any

from mmgrpo.core.errors import UserError
from mmgrpo.methods.registry import Method, register_method
from mmgrpo.rewards.registry import register
from mmgrpo.rewards.text import (
    ACCURACY_MODES,
    answer_or_completion,
    completion_text,
    extract_answer,
    extract_choice,
    extract_number,
    is_number,
    normalize_text,
)

Key = tuple[str, Any]  # ("choice", "B") | ("numeric", 0.5) | ("string", "red car")


def answer_key(answer: str | None, mode: str) -> Key | None:
    """The comparable form of one extracted answer under ``mode``; None when it is unparseable."""
    if answer is None:
        return None
    if mode == "auto":
        mode = "numeric" if is_number(answer) else "choice" if extract_choice(answer) is not None else "string"
    if mode == "choice":
        letter = extract_choice(answer)
        return None if letter is None else ("choice", letter)
    if mode == "numeric":
        x = extract_number(answer)
        return None if x is None or not math.isfinite(x) else ("numeric", x)
    s = normalize_text(answer)
    return ("string", s) if s else None


def same_answer(a: Key, b: Key, atol: float = 1e-6, rtol: float = 1e-6) -> bool:
    """Two keys agree: same kind and equal (numbers within atol + rtol * |b|)."""
    if a[0] != b[0]:
        return False
    if a[0] == "numeric":
        return abs(a[1] - b[1]) <= atol + rtol * abs(b[1])
    return a[1] == b[1]


def majority_index(keys: list[Key | None], atol: float = 1e-6, rtol: float = 1e-6) -> int | None:
    """Index of the first row holding the group's majority answer; None if no row is parseable.

    Answers are clustered in order of appearance (each joins the first earlier cluster it agrees with); the
    largest cluster wins and ties go to the cluster that appeared first.
    """
    clusters: list[tuple[int, Key]] = []  # (first row, representative key), in order of appearance
    counts: list[int] = []
    for i, k in enumerate(keys):
        if k is None:
            continue
        for c, (_, rep) in enumerate(clusters):
            if same_answer(k, rep, atol, rtol):
                counts[c] += 1
                break
        else:
            clusters.append((i, k))
            counts.append(1)
    if not clusters:
        return None
    best = max(range(len(counts)), key=lambda c: (counts[c], -c))  # most votes, then earliest
    return clusters[best][0]


def vote_rewards(keys: list[Key | None], atol: float = 1e-6, rtol: float = 1e-6) -> list[float]:
    """One group's rewards: 1.0 for rows agreeing with the majority answer, 0.0 otherwise (unparseable: 0.0)."""
    m = majority_index(keys, atol, rtol)
    if m is None:
        return [0.0] * len(keys)
    major = keys[m]
    return [float(k is not None and same_answer(k, major, atol, rtol)) for k in keys]


@register("majority_vote")
def majority_vote(
    mode: str = "auto",
    atol: float = 1e-6,
    rtol: float = 1e-6,
    answer_tag: str = "answer",
    require_answer_tag: bool = True,
):
    """MM-UPT self-reward: 1.0 if a row's answer equals its group's majority answer, else 0.0 (no ground truth).

    Group-aware (uses ``ctx.group_size``). ``mode``: "auto" | "choice" | "numeric" | "string". Unparseable answers
    never win and score 0; ties go to the earliest-appearing answer (as MM-UPT's ``Counter.most_common``).
    """
    if mode not in ACCURACY_MODES:
        raise UserError(f"majority_vote: unknown mode {mode!r}; known: {', '.join(ACCURACY_MODES)}")
    if atol < 0 or rtol < 0:
        raise UserError(f"majority_vote: atol and rtol must be >= 0; got atol={atol}, rtol={rtol}")

    def fn(samples, prompts, meta, ctx) -> list[float]:  # samples: N = B*G completions, groups contiguous
        G = int(ctx.group_size)
        if G < 1 or len(samples) % G:
            raise ValueError(f"majority_vote: {len(samples)} rows is not a multiple of the group size {G}")
        texts = [completion_text(s) for s in samples]
        answers = [
            extract_answer(t, answer_tag) if require_answer_tag else answer_or_completion(t, answer_tag) for t in texts
        ]
        keys = [answer_key(a, mode) for a in answers]  # N
        out: list[float] = []
        for g in range(len(keys) // G):
            out += vote_rewards(keys[g * G : (g + 1) * G], atol, rtol)
        return out

    fn.group_aware = True
    return fn


METHOD = register_method(
    Method(
        name="mmupt",
        paper="MM-UPT (Wei et al. 2025, arXiv 2505.22453): unsupervised GRPO rewarded by the group's majority vote",
        pipelines=("vlm_reasoning",),
        rewards=("majority_vote",),
        reward_switched=True,
    )
)
