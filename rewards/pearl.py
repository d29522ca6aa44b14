"""PEARL's perception-checklist reward: R_p of one answer sheet = the fraction of checklist items answered right.

PEARL ("Perceptual-Evidence Anchored Reinforced Learning for Multimodal Reasoning", Zhang et al. 2025, arXiv
2511.18437; the maths in :mod:`mmgrpo.methods.pearl`). With PEARL on (``data.options.methods.pearl`` of the
``vlm_reasoning`` recipe) every example adds a *checklist group*: G rows answering all its checklist questions in one
completion, ``<answer>2; yes</answer>``, the answers in the order of the questions, separated by ``;``. This reward
scores those rows (``meta["stream"] == "checklist"``) with :func:`mmgrpo.methods.pearl.checklist_reward`
(each item graded like the ``accuracy`` reward); reasoning rows, and rows of runs without PEARL, get None.

>>> items = [["How many red objects are there?", "2"], ["Is there a triangle?", "yes"]]
>>> checklist_question(items)[-58:], checklist_answer(items)
('1. How many red objects are there? 2. Is there a triangle?', '2; yes')
>>> split_answers("2; no", 2), split_answers("2", 2)  # a missing answer is "" (graded wrong)
(['2', 'no'], ['2', ''])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmgrpo.core.errors import UserError
from mmgrpo.methods.pearl import checklist_reward
from rewards.registry import register
from rewards.text import ACCURACY_MODES, answer_or_completion, completion_text

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

    Checklist rows are those with ``meta["stream"] == "checklist"`` (made by the ``vlm_reasoning`` recipe with
    ``data.options.methods.pearl.enabled``); their answer block (or whole completion) is split at ``separator``.
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
