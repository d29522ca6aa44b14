"""Prompt rewriting before a re-roll: groups without learning signal are sampled again from a rewritten prompt.

After a step's groups are scored, a group that gives GRPO nothing to learn from (every row failed, or every row
scored the same) can be re-rolled from a *rewritten* prompt: a hint added (Scaf-GRPO's tiers, a HiLL hinter's
hint), or the item reformulated into an easier variant (Cog-DRIFT's multiple choice / cloze). The rewritten group
then replaces the original, is added beside it, or (``mix``) lends its successful rows to it. The trainer runs this
once per sampled batch (``mmgrpo.train.reroll``, docs/architecture.md "Hooks"); a paper method contributes the rewriter
and its :class:`RerollOptions` (``Method.rewrite``).

A rewriter is a registered part (:data:`REWRITERS`, kind ``rewriters``, shown by ``mmgrpo list``)::

    rewriter(request: RewriteRequest) -> [ (prompt, meta) | None ]     # one entry per requested group

None means "nothing to rewrite this group with" (no hint tier left, no reformulation applies): the group stays as
it is. The rewritten meta must keep the media (images, video) and the ground truth; the rewriter may re-express
the ground truth (a multiple-choice variant's answer is the letter of the original answer).

Rounds: attempt a = 0, 1, ..., ``max_rounds`` - 1 re-rolls the groups that still trigger, so a rewriter can
escalate (hint tier a). Seeds (the seeding contract, :mod:`mmgrpo.core.seeding`): the re-rolled group of the
prompt at global stream position p samples with ``prompt_seed(run_seed, step, p, REWRITE_STREAM + 2a)`` and the
rewriter draws with ``request.seeds`` = ``prompt_seed(run_seed, step, p, REWRITE_STREAM + 2a + 1)``: separate
streams, the same on any number of processes (the trainer keeps the processes' re-rolls in step, so 2 processes
train exactly what 1 does; mode ``add`` is for 1 process).

Triggers on a group's rows (``[B, G]``; ``score`` is the reward named by ``RerollOptions.reward``, or the weighted
total when it is null; ``total`` is the weighted total of all rewards):

- ``all_fail``: every row's score < ``threshold`` (e.g. accuracy 0 everywhere);
- ``zero_variance``: every row's total is equal (DAPO's definition: no advantage at all).

>>> trigger_mask(torch.tensor([[0.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [1.0, 2.0]]), "all_fail", 0.5)
tensor([ True, False])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from mmgrpo.core.advantages import zero_variance_groups
from mmgrpo.core.errors import UserError
from mmgrpo.core.registry import Registry

REWRITE_STREAM = 1 << 20
"""first ``prompt_seed`` stream of re-rolls (attempt a: 2a for sampling, 2a + 1 for the rewriter's own draws)"""
TRIGGERS = ("all_fail", "zero_variance")
MODES = ("replace", "add", "mix")
KEEPS = ("always", "signal")


@dataclass
class RewriteRequest:
    """The groups to rewrite (b of this rank's groups that still trigger) and what a rewriter may read.

    ``prompts`` / ``meta`` [b]: the original prompts as the recipe gave them (never an earlier rewrite);
    ``completions`` [b][G]: the rows of the group as it stands (the failed attempts a hinter may read);
    ``scores`` [b, G]: their scores; ``attempt``: 0 for the first re-roll; ``seeds`` [b]: the rewriter's seeds;
    ``policy``: the policy being trained (a rewriter may query it, e.g. as a hinter); ``source``: the recipe's
    prompt source (``get(positions) -> PromptBatch``, e.g. other examples of the data set for distractors).
    """

    prompts: list[Any]
    meta: list[dict]
    completions: list[list[Any]]
    scores: torch.Tensor
    attempt: int
    step: int
    seeds: list[int]
    policy: Any = None
    source: Any = None


class Rewriter(Protocol):
    """``rewriter(request) -> [(prompt, meta) | None]``, one entry per group of the request."""

    def __call__(self, request: RewriteRequest) -> list[tuple[Any, dict] | None]: ...


REWRITERS: Registry[Any] = Registry("rewriter", plugins="rewriters")


def register_rewriter(name: str):
    """Decorator: register a rewriter factory ``factory(**options) -> Rewriter`` under ``name``."""

    def deco(factory):
        REWRITERS.add(name, factory)
        return factory

    return deco


@dataclass
class RerollOptions:
    """When a group is re-rolled from a rewritten prompt and what becomes of it (each rewriting method's options
    start with these)."""

    trigger: str = "all_fail"
    """all_fail: every row's score < threshold; zero_variance: every row's weighted total equal (DAPO's test)"""
    reward: str | None = "accuracy"
    """the reward (its name under rewards:) whose score says fail / success; null = the weighted total"""
    threshold: float = 0.5
    """a row succeeds when its score >= threshold"""
    max_rounds: int = 1
    """re-roll attempts per group and step (attempt a escalates: hint tier a, reformulation a)"""
    keep: str = "always"
    """always: the re-rolled group is kept; signal: only if it has learning signal (rows not all equal)"""
    mode: str = "replace"
    """replace: the re-rolled group replaces the original; add: it is trained beside it (1 process only); mix: its
    successful rows replace failed rows of the original (up to mix_rows; trigger all_fail)"""
    mix_rows: int = 1
    """mode mix: how many successful re-rolled rows replace failed original rows"""


def check_reroll(opts: RerollOptions, cfg: Any, key: str) -> None:
    """Load-time checks of :class:`RerollOptions` against ``cfg`` (UserErrors naming ``key``)."""
    for name, value, known in (
        ("trigger", opts.trigger, TRIGGERS),
        ("mode", opts.mode, MODES),
        ("keep", opts.keep, KEEPS),
    ):
        if value not in known:
            raise UserError(f"{key}: {name}={value!r} is not one of {', '.join(known)}; pick one of them")
    if not 1 <= opts.max_rounds <= 16:
        raise UserError(f"{key}: max_rounds={opts.max_rounds} must be in 1..16 (re-roll attempts per group and step)")
    names = [r.name for r in cfg.rewards]
    if opts.reward is not None and opts.reward not in names:
        raise UserError(
            f"{key}: reward={opts.reward!r} is not listed under rewards: ({', '.join(names)}); name one of them, or "
            "null for the weighted total"
        )
    G = cfg.trainer.group_size
    if opts.mix_rows < 1:  # read only by mode=mix, but never a row count in any mode
        raise UserError(f"{key}: mix_rows={opts.mix_rows} must be >= 1 (rows a rescued group lends with mode=mix)")
    if opts.mode == "mix":
        if opts.trigger != "all_fail":
            raise UserError(f"{key}: mode=mix needs trigger=all_fail (successful rows replace failed ones)")
        if not 1 <= opts.mix_rows < G:
            raise UserError(f"{key}: mix_rows={opts.mix_rows} must be in 1..{G - 1} (trainer.group_size={G})")
    if opts.mode == "add" and cfg.advantage.dynamic_sampling:
        raise UserError(f"{key}: mode=add cannot be combined with advantage.dynamic_sampling (it keeps B groups)")


def trigger_mask(score: torch.Tensor, total: torch.Tensor, trigger: str, threshold: float) -> torch.Tensor:
    """Which groups trigger a re-roll: score [B, G], total [B, G] -> [B] bool (see the module doc)."""
    if trigger == "all_fail":
        return (torch.nan_to_num(score.float(), nan=float("-inf")) < threshold).all(-1)
    if trigger == "zero_variance":
        return zero_variance_groups(total)
    raise UserError(f"unknown re-roll trigger {trigger!r}; known: {', '.join(TRIGGERS)}")


def has_signal(total: torch.Tensor) -> torch.Tensor:
    """Learning signal of groups: total [B, G] -> [B] bool, True where the rows are not all equal."""
    return ~zero_variance_groups(total)


def mix_plan(score: torch.Tensor, new_score: torch.Tensor, threshold: float, k: int) -> list[tuple[int, int]]:
    """Scaf-GRPO's batch augmentation for one group: (original row, re-rolled row) pairs, the first ``k`` successful
    re-rolled rows (score >= threshold) replacing the last failed original rows. score, new_score [G] -> pairs
    ([] when no re-rolled row succeeded).

    >>> mix_plan(torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 1.0]), 0.5, 1)
    [(2, 1)]
    """
    ok = [j for j in range(len(new_score)) if float(new_score[j]) >= threshold][:k]
    failed = [i for i in range(len(score)) if not float(score[i]) >= threshold]
    return list(zip(reversed(failed), ok))


# ------------------------------------------------------------------ prompts: the question of a prompt, rewritten


def question_of(prompt: Any) -> str:
    """The question text of a prompt: a str, or a dict's ``question`` (or ``text``)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        for key in ("question", "text"):
            if isinstance(prompt.get(key), str):
                return prompt[key]
    raise UserError(
        f"prompt rewriting needs a str prompt or a dict with 'question' (or 'text'); got {str(prompt)[:80]!r} "
        "(chat 'messages' prompts cannot be rewritten yet)"
    )


def with_question(prompt: Any, text: str, **fields: Any) -> Any:
    """A copy of ``prompt`` whose question is ``text`` (and, for a dict, ``fields`` set, e.g. new ``options``)."""
    question_of(prompt)  # a prompt that has no question is refused here
    if isinstance(prompt, str):
        if fields:
            return {"question": text, **fields}
        return text
    key = "question" if isinstance(prompt.get("question"), str) else "text"
    return {**prompt, key: text, **fields}


@register_rewriter("hint_field")
@dataclass
class HintField:
    """Data-field hints: attempt a appends ``meta[key][a]`` (or ``meta[key]`` when it is a str, attempt 0 only) to
    the question through ``template``; None when the example has no such hint."""

    key: str = "hints"
    template: str = "{question}\nHint: {hint}"
    offset: int = 0
    """the hint of attempt a is meta[key][offset + a]"""

    def __call__(self, request: RewriteRequest) -> list[tuple[Any, dict] | None]:
        return [self.one(p, m, request.attempt) for p, m in zip(request.prompts, request.meta)]

    def hint(self, meta: dict, attempt: int) -> str | None:
        hints = meta.get(self.key)
        if isinstance(hints, str):
            hints = [hints]
        i = self.offset + attempt
        if not isinstance(hints, list | tuple) or i >= len(hints) or not str(hints[i]).strip():
            return None
        return str(hints[i])

    def one(self, prompt: Any, meta: dict, attempt: int) -> tuple[Any, dict] | None:
        hint = self.hint(meta, attempt)
        if hint is None:
            return None
        text = self.template.format(question=question_of(prompt), hint=hint)
        return with_question(prompt, text), {**meta, "rewrite": f"hint {self.offset + attempt}"}
