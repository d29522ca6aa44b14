"""The config's load-time checks (:func:`~mmgrpo.train.config.load_config` runs :func:`validate_components`):
every registered name and its options, every number in its range, and the parts that must fit one another (the
group split, the loss and its estimator, the prompt sampler and the methods), each a one-paragraph UserError naming
the key, the value and the file, before a run directory exists or any model loads.

``cfg`` is a :class:`~mmgrpo.train.config.Config`; it is untyped here, as in the registries' own checks, because
:mod:`mmgrpo.train.config` imports this module. Ranges: docs/reliability.md.
"""

from __future__ import annotations

import math
import re
from typing import Any

from mmgrpo import rewards as reward_registry
from mmgrpo.core.advantages import (
    COMBINERS,
    ESTIMATORS,
    SHAPERS,
    combine_options,
    estimator_options,
    has_row_weights,
    shaping_options,
)
from mmgrpo.core.aggregations import AGGREGATIONS, make_aggregation
from mmgrpo.core.errors import UserError, quoted
from mmgrpo.core.losses import LOSSES, loss_options
from mmgrpo.core.sampling import SAMPLERS, check_sampler
from mmgrpo.core.schema import declared_options, options_from
from mmgrpo.methods.registry import METHODS, check_methods, check_moved_keys
from mmgrpo.train import components
from mmgrpo.train.scoring import MAX_REWARD
from mmgrpo.train.tracking import check_tracker_names


def validate_components(cfg: Any, where: str) -> None:
    """Check component names and options against what each registered component accepts."""
    validate_advantage_and_loss(cfg.advantage, cfg.loss, where, [r.kind for r in cfg.rewards])
    check_row_weights(cfg.advantage, [float(r.weight) for r in cfg.rewards], where)
    if cfg.pipeline not in components.PIPELINES:
        raise UserError(f"pipeline in {where}: " + components.PIPELINES.unknown_message(cfg.pipeline))
    pipeline = components.PIPELINES.get(cfg.pipeline)
    check_moved_keys(cfg, where)  # before the recipe's schema, which would only call them unknown keys
    pipeline.check(cfg, where)
    check_numbers(cfg, where)
    if not cfg.rewards:
        raise UserError(f"rewards in {where}: give at least one reward, e.g. rewards: [{{name: shapes}}]")
    for i, spec in enumerate(cfg.rewards):
        try:
            reward_registry.resolve(spec.name)
        except UserError as e:
            raise UserError(f"rewards.{i}.name in {where}: {e}") from e
        spec.options = reward_registry.check_reward_options(spec.name, spec.options, f"rewards.{i}.options", where)
        if cfg.pipeline in NO_VIDEOS and getattr(reward_registry.resolve(spec.name), "scores", None) == "videos":
            raise UserError(f"rewards.{i}.name in {where}: reward {spec.name!r} scores videos, but pipeline "
                            f"{cfg.pipeline!r} makes no videos; use it with text_to_video or image_to_video, or "
                            "pick an image reward (`mmgrpo list` shows them)")  # fmt: skip
        # nan / inf: every combined reward nan / inf, nothing learned; so beyond fp32 (1e39 passed, then was inf)
        if not (math.isfinite(spec.weight) and abs(spec.weight) <= MAX_REWARD):
            raise _bad(f"rewards.{i}.weight", spec.weight, where, f"({spec.name}) must be a finite number of size at "
                       f"most {MAX_REWARD:g} (0 logs the reward without training on it; a negative weight penalises "
                       "it)")  # fmt: skip
    methods = check_methods(cfg, where)
    check_sampler(cfg, where)
    _check_sampler_fits(cfg, methods, where)
    check_tracker_names(cfg.trainer.log_with, where)


NO_VIDEOS = ("text_to_image", "vlm_reasoning", "vlm_grounding", "bandit")
"""mmgrpo's recipes whose samples are not videos: a video reward (``scores = "videos"``) there failed at the first
step, after the model had loaded and a group had been sampled"""
SAMPLER_INPUTS = {"baseline": "spo (SPO's value tracker)", "roles": "pairing (Beyond Variance's prompt pairs)"}
"""estimator inputs that come from the prompt sampler -> the sampler that gives them"""


def _check_sampler_fits(cfg: Any, methods: list, where: str) -> None:
    """A sampler that varies the rollouts per prompt (ragged groups) refuses, at load, the parts that read groups of
    equal size: group-aware rewards and methods with a policy wrapper or advantage hooks that do not declare
    ``ragged``. An estimator that takes a ``baseline`` needs a sampler that gives one."""
    sampler = SAMPLERS.get(cfg.sampler.name)
    declared = declared_options(ESTIMATORS.get(cfg.advantage.estimator), skip=1) or {}
    for name, who in SAMPLER_INPUTS.items():
        if name in declared and name not in getattr(sampler, "provides", ()):
            raise UserError(
                f"advantage.estimator={cfg.advantage.estimator} in {where} takes the per-prompt input {name!r} from "
                f"the prompt sampler, but sampler {cfg.sampler.name!r} gives none; set sampler: {who}"
            )
    # only where every part is mmgrpo's own, which is known to give no strata: a plug-in recipe's policy, a plug-in
    # method's policy wrapper or a plug-in estimator (whose keys may be optional) may give or need none
    own = (
        ESTIMATORS.builtin(cfg.advantage.estimator)
        and components.PIPELINES.builtin(cfg.pipeline)
        and all(METHODS.builtin(method.name) for method, _ in methods)
    )
    strata = any(method.name == "strata" for method, _ in methods)
    if own and "keys" in declared and not strata and not components.PIPELINES.get(cfg.pipeline).group_keys:
        raise UserError(
            f"advantage.estimator={cfg.advantage.estimator} in {where} normalises each row within its stratum, but "
            f"nothing gives the rows strata (pipeline {cfg.pipeline!r} has none of its own); add methods: {{strata: "
            "{meta_key: <a prompt meta field, e.g. task>}} (or {count: '<a regex counted in the completion>'}, VLM "
            "recipes), or pick another estimator"
        )
    if not getattr(sampler, "varies_group_size", False):
        return
    for method, _ in methods:
        if (method.wrap_policy or method.advantage_hooks) and not method.ragged:
            raise UserError(
                f"methods.{method.name} in {where} reads groups of equal size, but sampler {cfg.sampler.name!r} "
                "gives prompts different numbers of rollouts (ragged groups); remove one of them, or fix the group "
                "size of the sampler"
            )
    for i, spec in enumerate(cfg.rewards):
        if getattr(reward_registry.resolve(spec.name), "group_aware", False):
            raise UserError(
                f"rewards.{i} ({spec.name}) in {where} is group-aware (reads groups of trainer.group_size rows), but "
                f"sampler {cfg.sampler.name!r} gives prompts different numbers of rollouts; use another sampler"
            )


RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
"""``run.name``: one plain path component, so a run never lands outside ``run.output_dir``"""


def check_run_name(name: str, where: str) -> None:
    if not RUN_NAME.match(name) or name in (".", ".."):
        raise UserError(
            f"run.name {quoted(name, 60)} in {where} must be one plain folder name (letters, digits, '.', '_', '-'), "
            "e.g. run.name=shapes_lr3e-4; the folder goes under run.output_dir"
        )


def _bad(key: str, value: Any, where: str, rule: str) -> UserError:
    return UserError(f"{key}={quoted(value, 60)} in {where} {rule}")


def check_numbers(cfg: Any, where: str) -> None:
    """Every numeric field in range, at load (before a run directory exists): a UserError naming the key, the
    value, the file and the valid range. Ranges: docs/reliability.md."""
    t = cfg.trainer
    check_run_name(cfg.run.name, where)
    if cfg.resume is not None and not cfg.resume.strip():  # e.g. resume=$RUN with RUN unset: not a new run
        raise UserError(
            f"resume={quoted(cfg.resume, 20)} in {where} is empty: give the run directory to continue, "
            "e.g. resume=runs/<name>, or leave resume out (or resume=null) to start a new run"
        )
    if not 0 <= cfg.run.seed < 2**64:  # numpy's seed sequences take no negative entropy, torch no more than 64 bits
        raise _bad("run.seed", cfg.run.seed, where, "must be an integer in [0, 2**64 - 1], e.g. run.seed=0")
    if not (math.isfinite(t.lr) and t.lr > 0):
        raise _bad("trainer.lr", t.lr, where, "must be a finite number > 0, e.g. trainer.lr=3e-4")
    betas = t.adam_betas
    if len(betas) != 2 or not all(math.isfinite(b) and 0.0 <= b < 1.0 for b in betas):
        raise _bad("trainer.adam_betas", betas, where, "must be a pair [beta1, beta2] in [0, 1), e.g. [0.9, 0.999]")
    if not (math.isfinite(t.adam_eps) and t.adam_eps > 0):
        raise _bad("trainer.adam_eps", t.adam_eps, where, "must be a finite number > 0, e.g. 1e-8")
    if not (math.isfinite(t.weight_decay) and t.weight_decay >= 0):
        raise _bad("trainer.weight_decay", t.weight_decay, where, "must be a finite number >= 0 (0 = off)")
    if t.max_grad_norm is not None and not (math.isfinite(t.max_grad_norm) and t.max_grad_norm > 0):
        raise _bad("trainer.max_grad_norm", t.max_grad_norm, where, "must be a finite number > 0, or null (off)")
    if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
        raise _bad("trainer.ema_decay", t.ema_decay, where, "must lie in (0, 1), e.g. 0.999, or null (off)")
    if t.ema_decay is None and (t.ema_every != 1 or t.ema_warmup):
        key, value = ("trainer.ema_every", t.ema_every) if t.ema_every != 1 else ("trainer.ema_warmup", t.ema_warmup)
        raise _bad(key, value, where, "shapes the EMA, which is off (trainer.ema_decay: null); set trainer.ema_decay "
                   "too, e.g. Flow-GRPO's trainer: {ema_decay: 0.9, ema_every: 8, ema_warmup: true}")  # fmt: skip
    if t.time_budget_s is not None and not t.time_budget_s > 0:
        raise _bad("trainer.time_budget_s", t.time_budget_s, where, "must be > 0 seconds, or null (no budget)")
    if t.time_budget_clock not in ("wall", "process"):
        raise _bad("trainer.time_budget_clock", t.time_budget_clock, where, "must be 'wall' or 'process'")
    for key, value, lo, meaning in [
        ("trainer.prompts_per_step", t.prompts_per_step, 1, ""),
        ("trainer.group_size", t.group_size, 1, ""),
        ("trainer.epochs", t.epochs, 1, ""),
        ("trainer.minibatches", t.minibatches, 1, ""),
        ("trainer.rollout_chunks", t.rollout_chunks, 1, ""),
        ("trainer.max_steps", t.max_steps, 1, " (0 would train nothing: a run directory with no checkpoint)"),
        ("trainer.micro_batch_size", None if t.micro_batch_size == "auto" else t.micro_batch_size, 0, " (or auto)"),
        ("trainer.micro_batch_units", t.micro_batch_units, 1, ""),
        ("trainer.ema_every", t.ema_every, 1, " (1 = every optimizer step)"),
        ("trainer.log_every", t.log_every, 1, ""),
        ("trainer.eval_every", t.eval_every, 0, " (0 = off)"),
        ("trainer.sample_every", t.sample_every, 0, " (0 = only at evaluations)"),
        ("trainer.checkpoint_every", t.checkpoint_every, 0, " (0 = only at the end)"),
        ("trainer.warmup_steps", t.warmup_steps, 0, " (0 = no warmup)"),
        ("trainer.keep_checkpoints", t.keep_checkpoints, 1, ""),
        ("trainer.stop_after_steps", t.stop_after_steps, 1, " (or null)"),
        ("trainer.max_nonfinite_steps", t.max_nonfinite_steps, 1, ""),
        ("advantage.max_refill_rounds", cfg.advantage.max_refill_rounds, 0, ""),
        *_data_sizes(cfg, where),
    ]:
        if value is not None and value < lo:
            raise _bad(key, value, where, f"must be >= {lo}{meaning}")
    _check_group_split(cfg, where)


def _data_sizes(cfg: Any, where: str) -> list[tuple[str, Any, int, str]]:
    """The recipe's evaluation batch sizes (``data.options.eval_batch_size`` / ``eval_batch``), which must be >= 1."""
    data_cls = components.PIPELINES.get(cfg.pipeline).data_options
    if data_cls is None:
        return []
    opts = options_from(data_cls, cfg.data.options, where, "data.options")
    keys = [k for k in ("eval_batch_size", "eval_batch") if hasattr(opts, k)]
    return [(f"data.options.{k}", getattr(opts, k), 1, "") for k in keys]


def _check_group_split(cfg: Any, where: str) -> None:
    """G >= 2 (a group-relative advantage of one row is 0) unless the estimator declares ``allows_single``; every
    minibatch gets rows of every group (G >= minibatches)."""
    t = cfg.trainer
    if t.group_size < 2 and not getattr(ESTIMATORS.get(cfg.advantage.estimator), "allows_single", False):
        raise UserError(
            f"trainer.group_size={t.group_size} in {where}: group-relative advantages need trainer.group_size >= 2 "
            f"(estimator {cfg.advantage.estimator!r} gives a group of one row advantage 0, so nothing would be "
            "learned); raise it, e.g. trainer.group_size=8, or use an estimator that allows G = 1 (ngrpo, stratified)"
        )
    loss_fn = LOSSES.get(cfg.loss.name)
    if getattr(loss_fn, "one_step", False) and t.epochs * t.minibatches != 1:
        raise UserError(
            f"loss.name={cfg.loss.name} in {where} is exact only when a rollout feeds one optimizer step, but "
            f"trainer.epochs={t.epochs} x trainer.minibatches={t.minibatches} = {t.epochs * t.minibatches}; set "
            "trainer.epochs=1 and trainer.minibatches=1"
        )
    pairs = getattr(loss_fn, "estimators", None)
    if pairs is not None and cfg.advantage.estimator not in pairs:
        raise UserError(
            f"loss.name={cfg.loss.name} in {where} needs advantage.estimator to be one of {list(pairs)} (it reads "
            f"their output, not an advantage), got {cfg.advantage.estimator!r}; set advantage.estimator={pairs[0]}"
        )
    if t.minibatches > t.group_size:
        raise UserError(
            f"trainer.minibatches={t.minibatches} in {where} must be <= trainer.group_size={t.group_size}: each "
            "minibatch holds a slice of every group, so some minibatches would get no rows; lower "
            "trainer.minibatches or raise trainer.group_size"
        )


def row_weights_refusal(estimator: str, combine: str, weighted: int) -> str:
    """Why estimator ``estimator``'s row weights cannot be read with combiner ``combine`` over ``weighted`` rewards."""
    return (f"advantage.estimator={estimator} leaves each group's pivot row (its median, advantage 0) out of the "
            f"loss, but advantage.combine={combine} normalises each of the {weighted} weighted rewards on its own: "
            "each has its own median row, and no row's advantage is 0 (the pivot left out was the median of the "
            "rewards' sum, a row that had an advantage); use advantage.combine=sum_then_normalize (or posterior) "
            "with it, or another estimator")  # fmt: skip


def check_row_weights(a: Any, weights: list[float], where: str) -> None:
    """At config load: an estimator that weighs its rows (MC-GRPO) reads one reward total, which ``normalize_then_sum``
    over several weighted rewards (each normalised on its own) does not have
    (:func:`~mmgrpo.core.advantages.combiners.row_weight_total`)."""
    if not has_row_weights(a.estimator) or a.combine != "normalize_then_sum":
        return
    weighted = sum(w != 0 for w in weights)
    if weighted > 1:
        raise UserError(f"{row_weights_refusal(a.estimator, a.combine, weighted)} (in {where})")


def validate_advantage_and_loss(a: Any, lc: Any, where: str, kinds: list[str] | None = None) -> None:
    """Names (registered, entry point or dotted path) and options of the estimator, shaping, combiner, loss and
    aggregation: an unknown name or option is a UserError naming its key here, before any model loads."""
    for reg, name, key in [
        (ESTIMATORS, a.estimator, "advantage.estimator"),
        (SHAPERS, a.shaping, "advantage.shaping"),
        (COMBINERS, a.combine, "advantage.combine"),
        (LOSSES, lc.name, "loss.name"),
        (AGGREGATIONS, lc.aggregation.name, "loss.aggregation.name"),
    ]:
        try:
            reg.get(name)
        except UserError as e:
            raise UserError(f"{key} in {where}: {e}") from e
    # kept converted: the trainer hands these to the estimator, shaping and combiner as they are (a YAML '1e-6',
    # read as a string, or an override eps=nan reached the estimator's arithmetic as a str)
    a.options = estimator_options(a.estimator, a.options, where)
    a.shaping_options = shaping_options(a.shaping, a.shaping_options, where)
    a.combine_options = combine_options(a.combine, a.combine_options, where, kinds)
    if a.min_advantage is not None and not math.isfinite(a.min_advantage):  # nan / inf: every advantage nan / inf
        raise _bad("advantage.min_advantage", a.min_advantage, where, "must be a finite number (0 keeps only the "
                   "better-than-average rows of each group), or null for no bound")  # fmt: skip
    if not (math.isfinite(lc.beta) and lc.beta >= 0):
        raise UserError(f"loss.beta={lc.beta} in {where} must be a finite number >= 0 (the weight of the KL to the "
                        "reference; 0 = off)")  # fmt: skip
    if lc.adv_clip is not None and not (math.isfinite(lc.adv_clip) and lc.adv_clip > 0):
        raise UserError(f"loss.adv_clip={lc.adv_clip} in {where} must be a finite number > 0, or null to disable "
                        "advantage clipping")  # fmt: skip
    loss_options(lc.name, lc.options, adv_clip=lc.adv_clip, where=where)
    make_aggregation(lc.aggregation.name, lc.aggregation.options, where)
