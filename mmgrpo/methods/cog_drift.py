"""Cog-DRIFT: hard items whose groups all fail are reformulated into easier variants that keep the answer (cloze,
multiple choice), and the group is sampled again on the variant. Switched on by ``methods: {cog_drift: {variants:
[cloze, multiple_choice]}}`` (configs/vlm_cog_drift.yaml).

Justin Chih-Yao Chen, Archiki Prasad, Zaid Khan, Joykirat Singh, Runchu Tian, Elias Stengel-Eskin, Mohit Bansal,
"Cog-DRIFT: Exploration on Adaptively Reformulated Instances Enables Learning from Hard Reasoning Problems" (2026,
arXiv 2604.04767).

The paper: an item too hard for the current policy gives every rollout reward 0, so GRPO's advantage
``A_i = (r_i - mean r) / std r`` is 0 for the whole group. Reformulating the open-ended item x with answer y into a
cognitively simpler variant x' with the same answer y -- multiple choice (y among distractors: a discriminative
task, a search space of k options) or cloze (y with some characters blanked: a partly given answer) -- shrinks the
search space, so some rollouts succeed, the group has variance again, and what is learnt on x' transfers back to x.
Variants are organised in an adaptive curriculum from easier to harder formats as the model improves.

What this module implements (rules, no model):

- ``cloze`` (open-ended items only): the answer's alphanumeric characters, ``ceil(cloze_fraction * n)`` of them
  blanked (at least one blanked, at least one kept), chosen by the rewriter's seed; the question becomes
  ``cloze_template`` ("{question}\\nThe answer has the form: 4_2"). The ground truth is unchanged.
- ``multiple_choice``: an open-ended item gets ``choices`` options: its answer and ``choices - 1`` distractors, the
  answers of other examples of the data set (the recipe's prompt source at stream positions drawn from the
  rewriter's seed; distractors of the same kind -- number, text, letter -- as the answer, none that grades as the
  answer, no duplicates), in a seeded order; an item that is already multiple choice with more than ``choices``
  options keeps its correct option and ``choices - 1`` of the others (in their order). The ground truth is kept as
  the letter of the correct option (``meta["answer"]``; the original answer stays in ``meta["open_answer"]``).
- attempt a of the re-roll hook (:mod:`mmgrpo.core.rewriting`) uses the a-th variant of ``variants`` that applies to
  the item, so the default ``[cloze, multiple_choice]`` escalates from the least reformulated variant (cloze, still
  generative) to the easiest (discriminative), with ``keep: signal``: a variant's group is trained only if it has
  learning signal; otherwise the next variant is tried.

Worked example (hand-checked in tests/methods/test_cog_drift.py): answer "B" of options [0, 1, 2, 3] with
``choices: 2`` keeps option "1" (the correct one) and one other, e.g. [0, 1]: the new answer is "B"; with [1, 3] it
would be "A".

Compared with the paper: the paper builds the variants offline (with an LLM for the multiple-choice distractors)
and trains on a curriculum over the whole data set that moves each item from easier to harder formats as its
accuracy rises; here variants come from rules, online, only for groups that all fail, the hardest applicable
variant first (minimal reformulation), and no per-item curriculum state is kept. Diffusion: not applicable -- an
image generator has no answer to pose as options or to blank, and its rewards are continuous scores of the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmgrpo.core.errors import UserError
from mmgrpo.core.rewriting import (
    RerollOptions,
    RewriteRequest,
    check_reroll,
    question_of,
    register_rewriter,
    with_question,
)
from mmgrpo.methods.registry import Method, Rewrite, register_method
from mmgrpo.rewards.text import grade, infer_mode, normalize_text

VARIANTS = ("cloze", "multiple_choice")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class CogDriftOptions(RerollOptions):
    """Cog-DRIFT's options: the re-roll options (trigger all_fail on ``reward``) and the variants' rules."""

    max_rounds: int = 2
    """variants tried per failing group and step (the a-th applicable variant at attempt a)"""
    keep: str = "signal"
    """signal: a variant's group is trained only if it has learning signal (else the next variant is tried)"""
    variants: list[str] = field(default_factory=lambda: ["cloze", "multiple_choice"])
    """reformulations in the order they are tried: cloze, multiple_choice"""
    choices: int = 4
    """options of a multiple-choice variant (the answer + choices - 1 distractors)"""
    cloze_fraction: float = 0.5
    """fraction of the answer's letters and digits blanked in a cloze variant"""
    cloze_template: str = "{question}\nThe answer has the form: {cloze}"
    answer_key: str = "answer"
    """meta key of the ground truth"""
    draws: int = 32
    """examples of the data set read to find the distractors of one item"""


def _answer(meta: dict, key: str) -> str | None:
    gt = meta.get(key)
    if isinstance(gt, list | tuple):
        gt = gt[0] if gt else None
    return None if gt is None else str(gt)


def cloze(answer: str, fraction: float, rng: np.random.Generator) -> str | None:
    """The answer with ``ceil(fraction * n)`` of its n letters/digits replaced by "_" (at least one blanked and one
    kept; None when n < 2). "1234", fraction 0.5 -> two of the four digits blanked, e.g. "1_3_"."""
    slots = [i for i, c in enumerate(answer) if c.isalnum()]
    if len(slots) < 2:
        return None
    k = min(max(1, math.ceil(fraction * len(slots) - 1e-9)), len(slots) - 1)
    blank = {slots[int(i)] for i in rng.choice(len(slots), size=k, replace=False)}
    return "".join("_" if i in blank else c for i, c in enumerate(answer))


def fewer_options(options: list[str], correct: int, choices: int, rng: np.random.Generator) -> tuple[list[str], int]:
    """A multiple-choice item with ``choices`` of its options: the correct one and ``choices - 1`` others drawn by
    ``rng``, in their original order -> (options, index of the correct one)."""
    others = [i for i in range(len(options)) if i != correct]
    kept = sorted([correct, *(others[int(i)] for i in rng.choice(len(others), size=choices - 1, replace=False))])
    return [options[i] for i in kept], kept.index(correct)


def distractors(answer: str, pool: list[str], k: int) -> list[str]:
    """Up to ``k`` answers of ``pool`` (in order) usable as distractors of ``answer``: of the same kind
    (:func:`mmgrpo.rewards.text.infer_mode`: number, text, letter), not graded correct for ``answer``, distinct."""
    mode, seen, out = infer_mode(answer), {normalize_text(answer)}, []
    for cand in pool:
        key = normalize_text(cand)
        if len(out) == k:
            break
        if key in seen or not key or infer_mode(cand) != mode or grade(cand, answer):
            continue
        seen.add(key)
        out.append(cand)
    return out


@register_rewriter("cog_drift_variants")
@dataclass
class CogDriftVariants:
    """Cog-DRIFT reformulations by rule: cloze and multiple choice (distractors from the data set) keeping the
    answer; attempt a uses the a-th variant that applies to the item."""

    variants: tuple[str, ...] = VARIANTS
    choices: int = 4
    cloze_fraction: float = 0.5
    cloze_template: str = "{question}\nThe answer has the form: {cloze}"
    answer_key: str = "answer"
    draws: int = 32

    def __call__(self, request: RewriteRequest) -> list[tuple[Any, dict] | None]:
        out = []
        for b, (prompt, meta) in enumerate(zip(request.prompts, request.meta)):
            applicable = [v for v in self.variants if self.applies(v, prompt, meta)]
            if request.attempt >= len(applicable):
                out.append(None)
                continue
            rng = np.random.default_rng(request.seeds[b])
            out.append(self.variant(applicable[request.attempt], prompt, meta, rng, request.source))
        return out

    def applies(self, variant: str, prompt: Any, meta: dict) -> bool:
        answer, options = _answer(meta, self.answer_key), _options(prompt)
        if answer is None:
            return False
        if variant == "cloze":
            return not options and sum(c.isalnum() for c in answer) >= 2
        return len(options) > self.choices if options else True

    def variant(self, name: str, prompt: Any, meta: dict, rng: np.random.Generator, source: Any):
        answer, options = _answer(meta, self.answer_key), _options(prompt)
        question = question_of(prompt)
        if name == "cloze":
            text = self.cloze_template.format(question=question, cloze=cloze(answer, self.cloze_fraction, rng))
            return with_question(prompt, text), {**meta, "rewrite": "cloze"}
        if options:  # already multiple choice: fewer options
            correct = correct_option(answer, options)
            if correct is None:
                return None
            new, at = fewer_options(options, correct, self.choices, rng)
        else:
            pool = self._pool(source, rng)
            found = distractors(answer, pool, self.choices - 1)
            if not found:
                return None
            new = [answer, *found]
            order = rng.permutation(len(new)).tolist()
            new, at = [new[i] for i in order], order.index(0)
        gt = {self.answer_key: LETTERS[at], "open_answer": meta.get(self.answer_key), "options": new}
        return with_question(prompt, question, options=new), {**meta, **gt, "rewrite": "multiple_choice"}

    def _pool(self, source: Any, rng: np.random.Generator) -> list[str]:
        """Answers of ``draws`` examples of the data set at stream positions drawn by ``rng``."""
        if source is None:
            raise UserError("cog_drift: multiple-choice distractors need the recipe's prompt source; none was given")
        positions = [int(p) for p in rng.integers(0, 1 << 30, size=self.draws)]
        batch = source.get(positions)
        return [a for a in (_answer(m, self.answer_key) for m in batch.meta) if a is not None]


def correct_option(answer: str, options: list[str]) -> int | None:
    """Index of the correct option: the answer's letter ("B" -> 1), or the first option graded as the answer."""
    if infer_mode(answer) == "choice":
        i = LETTERS.index(answer.strip("() .").upper())
        return i if i < len(options) else None
    return next((i for i, o in enumerate(options) if grade(o, answer)), None)


def _options(prompt: Any) -> list[str]:
    opts = prompt.get("options") if isinstance(prompt, dict) else None
    return [str(o) for o in opts] if opts else []


def check_cog_drift(opts: CogDriftOptions, cfg: Any, key: str) -> None:
    check_reroll(opts, cfg, key)
    bad = [v for v in opts.variants if v not in VARIANTS]
    if not opts.variants or bad:
        raise UserError(f"{key}: variants={opts.variants} must be a non-empty list of {', '.join(VARIANTS)}")
    if not 2 <= opts.choices <= len(LETTERS):
        raise UserError(f"{key}: choices={opts.choices} must be in 2..26 (options of a multiple-choice variant)")
    if not 0.0 < opts.cloze_fraction < 1.0:
        raise UserError(f"{key}: cloze_fraction={opts.cloze_fraction} must be in (0, 1)")
    if "{question}" not in opts.cloze_template or "{cloze}" not in opts.cloze_template:
        raise UserError(f"{key}: cloze_template={opts.cloze_template!r} must contain {{question}} and {{cloze}}")
    if opts.draws < 1:
        raise UserError(f"{key}: draws={opts.draws} must be >= 1")
    if opts.mode == "mix":
        raise UserError(
            f"{key}: mode=mix is Scaf-GRPO's row swap; Cog-DRIFT trains the variant's whole group: use replace or add"
        )


METHOD = register_method(
    Method(
        name="cog_drift",
        paper="Cog-DRIFT (Chen et al. 2026, arXiv 2604.04767): failed hard items re-posed as cloze / multiple choice",
        options=CogDriftOptions,
        pipelines=("vlm_reasoning",),
        data_keys=("answer",),
        check=check_cog_drift,
        rewrite=lambda opts, cfg: Rewrite(
            "cog_drift",
            CogDriftVariants(
                tuple(opts.variants),
                opts.choices,
                opts.cloze_fraction,
                opts.cloze_template,
                opts.answer_key,
                opts.draws,
            ),
            opts,
        ),
    )
)
