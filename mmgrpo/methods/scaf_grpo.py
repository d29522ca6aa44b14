"""Scaf-GRPO: tiered in-prompt hints for prompts whose groups all fail, once independent learning has stalled.
Switched on by ``methods: {scaf_grpo: {exemption_fraction: 0.15, max_rounds: 3}}`` (configs/vlm_scaf_grpo.yaml).

Xichen Zhang, Sitong Wu, Yinghao Zhu, Haoru Tan, Shaozuo Yu, Ziyi He, Jiaya Jia, "Scaf-GRPO: Scaffolded Group
Relative Policy Optimization for Enhancing LLM Reasoning" (2025, arXiv 2510.19807; ICLR 2026).

The "learning cliff": when every one of the G rollouts of prompt q fails (R(o_i) = 0 for all i), GRPO's advantage

    A_i = (R(o_i) - mean_j R(o_j)) / std_j R(o_j) = 0          for every i

and the prompt is invisible to the gradient. Scaf-GRPO (as its abstract and method section state it):

1. **Diagnosis of stagnation / guidance exemption.** For the first ``t0 = ceil(exemption_fraction * max_steps)``
   steps the run is plain GRPO: problems the model can learn by itself ("pseudo-hard") are left to it, and guidance
   is given only to problems that still fail afterwards ("true-hard"). (The paper's exemption period; a plateau
   detector on the solve rate is not implemented.)
2. **Hierarchical hints.** A true-hard prompt q (all G rows fail) is re-sampled with a hint h_k appended,
   k = 1, 2, 3 in order: knowledge (an abstract concept) -> planning (the steps to take) -> solution (concrete
   steps), stopping at the first tier whose hinted rollouts hold a success o* ~ pi(. | q + h_k): minimal guidance.
3. **On-policy batch augmentation.** One failed row of the group is replaced by the hinted success, so the group
   becomes {o_1, ..., o_{G-1}} + {o*} and has an advantage again. With a 0/1 reward and m hinted successes
   (``mix_rows``) among G rows the GRPO advantages are, with p = m / G and s the group's std,
   A(o*) = (1 - p) / s and A(o_i) = -p / s; e.g. G = 4, m = 1: rewards [0, 0, 0, 1], mean 1/4, Bessel std 1/2,
   A = [-1/2, -1/2, -1/2, 3/2]. The hinted row's log-probs are those of o* given q + h_k (the prompt it was
   sampled from), so its ratio starts at 1: the update stays on-policy, unlike a solution prefix (LUFFY).

In mmgrpo: the trainer's prompt-rewriting hook (:mod:`mmgrpo.core.rewriting`, ``mmgrpo.train.reroll``) with trigger
``all_fail`` on ``reward`` (accuracy < ``threshold``), ``max_rounds`` = the number of tiers tried, ``mode: mix``
(``mix_rows`` successful hinted rows replace the last failed rows; ``mode: replace`` re-rolls the whole group with
the hint instead). The rewriter ``scaf_tiered_hints`` writes attempt a's prompt as ``template`` with
``hint = meta[hints_key][a]``.

Data: each example's meta holds ``hints: [tier1 concept, tier2 plan, tier3 concrete steps]`` (any number of tiers;
a missing or shorter list stops the escalation there). The shapes worlds write them for every question
(:func:`mmgrpo.data.shapes_qa.tiered_hints`: ``data.options.source: shapes_qa`` and the recipe's default ``shapes``
questions); a JSONL data set adds a ``hints`` list to each record (other keys go to meta).

Not done versus the paper: the hints of its data sets were written offline by a stronger model; a data set here
brings its own (the shapes world's are written from the scene). The paper's finer progressive disclosure inside the
solution tier is expressed by listing more tiers. Diffusion: not applicable -- the method answers the reasoning
"learning cliff" of a verifiable reward where every row fails; a text-to-image reward is a continuous score of the
image, there is no solution a tier could spell out, and a hint appended to the prompt would change the image the
reward judges. The re-roll hook itself is policy-free (tested on the bandit, tests/core/test_rewriting.py).

>>> ScafHints(start_step=0).one({"question": "How many?"}, {"hints": ["Count.", "List."]}, 1)[0]
{'question': 'How many?\\nHint: List.'}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mmgrpo.core.errors import UserError
from mmgrpo.core.rewriting import HintField, RerollOptions, RewriteRequest, check_reroll, register_rewriter
from mmgrpo.methods.registry import Method, Rewrite, register_method


@dataclass
class ScafOptions(RerollOptions):
    """Scaf-GRPO's options: the re-roll options (trigger all_fail on ``reward``) with the paper's defaults."""

    max_rounds: int = 3
    """hint tiers tried, in order, for a group that keeps failing (knowledge, planning, solution)"""
    mode: str = "mix"
    """mix: the paper's batch augmentation (hinted successes replace failed rows); replace: the hinted group"""
    hints_key: str = "hints"
    """meta key of each example's tiered hints: [tier1, tier2, ...] (abstract -> concrete)"""
    template: str = "{question}\nHint: {hint}"
    """the hinted question; {question} and {hint} are filled in"""
    exemption_fraction: float = 0.15
    """no hint before step ceil(fraction * trainer.max_steps): the guidance exemption period"""


@register_rewriter("scaf_tiered_hints")
@dataclass
class ScafHints(HintField):
    """Scaf-GRPO tiered hints: attempt a appends meta[key][a]; nothing before ``start_step`` (exemption period)."""

    start_step: int = 0

    def __call__(self, request: RewriteRequest) -> list[tuple[Any, dict] | None]:
        if request.step < self.start_step:
            return [None] * len(request.prompts)
        return super().__call__(request)


def exemption_steps(fraction: float, max_steps: int) -> int:
    """t0 = ceil(fraction * max_steps): the first step that may give hints (0.15 of 100 steps -> 15)."""
    return math.ceil(fraction * max_steps - 1e-9)


def check_scaf(opts: ScafOptions, cfg: Any, key: str) -> None:
    check_reroll(opts, cfg, key)
    if not 0.0 <= opts.exemption_fraction < 1.0:
        raise UserError(f"{key}: exemption_fraction={opts.exemption_fraction} must be in [0, 1) (the paper: 0.15)")
    if "{question}" not in opts.template or "{hint}" not in opts.template:
        raise UserError(f"{key}: template={opts.template!r} must contain {{question}} and {{hint}}")
    if opts.mode == "add":
        raise UserError(f"{key}: mode=add is not Scaf-GRPO's; use mix (the paper) or replace")


METHOD = register_method(
    Method(
        name="scaf_grpo",
        paper="Scaf-GRPO (Zhang et al. 2025, arXiv 2510.19807): tiered in-prompt hints for all-fail groups",
        options=ScafOptions,
        pipelines=("vlm_reasoning",),
        data_keys=("hints",),
        conflicts=("tempsamp",),  # TempSamp's ground-truth row makes no group all-fail: the hints never fire
        check=check_scaf,
        rewrite=lambda opts, cfg: Rewrite(
            "scaf_grpo",
            ScafHints(
                opts.hints_key, opts.template, 0, exemption_steps(opts.exemption_fraction, cfg.trainer.max_steps)
            ),
            opts,
        ),
    )
)
