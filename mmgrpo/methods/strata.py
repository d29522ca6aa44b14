"""Strata from the data: each row's stratum for the ``stratified`` estimator, read from a meta field or counted in the
completion (Stratified GRPO; Dr. MAS). Switched on by ``methods: {strata: {meta_key: task}}`` (or
``{count: "<search>"}``) together with ``advantage.estimator: stratified``.

Stratified GRPO, "Handling Structural Heterogeneity in Reinforcement Learning of LLM Search Agents" (2025): search
trajectories with different structure (e.g. how many search calls they make) have different reward distributions,
and one global baseline mixes them ("cross-stratum bias"). Stratified Advantage Normalization computes the baseline
and scale inside each stratum:

    A_i = (r_i - mean_{s(i)}) / (std_{s(i)} + eps),   mean_s, std_s over the batch rows of stratum s,

blended with the group advantage by ``alpha`` (:func:`mmgrpo.core.advantages.stratified`). Dr. MAS (multi-agent
systems, 2025) normalises each agent's rewards with that agent's own statistics: the same estimator with the agent
as the stratum. The estimator has existed for a while but only the bandit emitted strata; this module gives every
recipe's rows a stratum, exactly one of:

- ``meta_key``: the value of ``meta[meta_key]`` of the row's prompt (task type, agent name, difficulty, ...; any
  JSON value). It is turned into an int by a CRC32 of its ``repr``, the same on every process, so a 2-process run
  forms the same strata;
- ``count``: the number of matches of a regular expression in the row's completion text (tool calls: "<search>",
  "<tool_call>"), VLM recipes only (a diffusion sample has no text).

The policy wrapper :class:`StrataPolicy` writes ``Rollout.group_keys``; the trainer gathers them over the processes
and hands them to the estimator's ``keys`` input, so the statistics span the global batch.

>>> meta_stratum("math") == meta_stratum("math"), meta_stratum("math") == meta_stratum("code")
(True, False)
"""

from __future__ import annotations

import inspect
import re
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from mmgrpo.core.advantages import ESTIMATORS
from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch, Rollout
from mmgrpo.methods.registry import Method, PolicyWrapper, register_method
from mmgrpo.rewards.text import completion_text


def meta_stratum(value: Any) -> int:
    """A stable int id of a meta value (CRC32 of its ``repr``): the same in every process and run."""
    return zlib.crc32(repr(value).encode("utf-8")) & 0x7FFFFFFF


def count_stratum(text: str, pattern: re.Pattern) -> int:
    """The number of non-overlapping matches of ``pattern`` in ``text`` (e.g. tool calls)."""
    return len(pattern.findall(text))


@dataclass
class StrataOptions:
    meta_key: str | None = None
    """the prompt meta field whose value is the row's stratum (task type, agent, ...)"""
    count: str | None = None
    """a regular expression; the stratum is the number of its matches in the completion (VLM: tool calls)"""


class StrataPolicy(PolicyWrapper):
    """A policy whose rollouts carry each row's stratum in ``group_keys`` (from meta or counted in the text)."""

    def __init__(self, inner: Any, meta_key: str | None = None, count: str | None = None):
        super().__init__(inner)
        self._own("meta_key", meta_key)
        self._own("pattern", re.compile(count) if count is not None else None)

    def rollout(self, batch: PromptBatch, group_size: int, generator: torch.Generator | None = None) -> Rollout:
        out = self.inner.rollout(batch, group_size, generator)
        if self.meta_key is not None:
            missing = [i for i, m in enumerate(out.meta) if self.meta_key not in m]
            if missing:
                raise UserError(
                    f"methods.strata.meta_key={self.meta_key!r}: row {missing[0]}'s prompt has no meta field "
                    f"{self.meta_key!r}; give every example that field or name another with methods.strata.meta_key"
                )
            out.group_keys = [meta_stratum(m[self.meta_key]) for m in out.meta]
        else:
            if isinstance(out.samples, torch.Tensor):
                raise UserError("methods.strata.count counts matches in completion texts, but this policy's samples "
                                "are tensors (images/videos); use methods.strata.meta_key instead")  # fmt: skip
            out.group_keys = [count_stratum(completion_text(s), self.pattern) for s in out.samples]
        return out


def check_strata(opts: StrataOptions, cfg: Any, key: str) -> None:
    if (opts.meta_key is None) == (opts.count is None):
        raise UserError(f"{key}: give exactly one of meta_key (a prompt meta field) or count (a regular expression "
                        "counted in the completion), e.g. methods: {strata: {meta_key: task}}")  # fmt: skip
    if opts.count is not None:
        try:
            re.compile(opts.count)
        except re.error as e:
            raise UserError(f"{key}: count={opts.count!r} is not a regular expression ({e})") from e
        if not cfg.pipeline.startswith("vlm"):
            raise UserError(f"{key}: count reads completion texts (VLM recipes); pipeline {cfg.pipeline!r} samples "
                            "images or videos: use meta_key")  # fmt: skip
    est = ESTIMATORS.get(cfg.advantage.estimator)
    if "keys" not in inspect.signature(est).parameters:
        raise UserError(f"{key}: strata only matter to an estimator that reads them; advantage.estimator="
                        f"{cfg.advantage.estimator!r} does not; set advantage.estimator: stratified")  # fmt: skip


METHOD = register_method(
    Method(
        name="strata",
        paper="Stratified GRPO (2025) / Dr. MAS (2025): per-stratum normalisation, strata from data fields or counts",
        options=StrataOptions,
        check=check_strata,
        wrap_policy=lambda policy, opts: StrataPolicy(policy, opts.meta_key, opts.count),
    )
)
