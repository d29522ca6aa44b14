"""The run configuration: a typed schema, YAML files in ``configs/``, dotted ``key=value`` overrides.

Every field is documented next to it. Loading is strict: an unknown key, a wrong type, a missing file
are one-paragraph :class:`UserError`s naming the key, the file and the nearest valid key.
Component options (``policy.options``, ``data.options``, each reward's ``options``) are checked
against the options dataclass that the named component registers.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmgrpo import rewards as reward_registry
from mmgrpo.core.advantages import (
    COMBINERS,
    ESTIMATORS,
    SHAPERS,
    combine_options,
    estimator_options,
    shaping_options,
)
from mmgrpo.core.errors import UserError, quoted
from mmgrpo.core.files import read_utf8
from mmgrpo.core.losses import AGGREGATIONS, LOSSES, loss_options, make_aggregation
from mmgrpo.core.sampling import SAMPLERS, check_sampler
from mmgrpo.core.schema import declared_options, from_dict, options_from, to_dict  # noqa: F401  (options_from: recipes)
from mmgrpo.methods.registry import check_methods, check_moved_keys, enabled_methods
from mmgrpo.train import components
from mmgrpo.train.tracking import check_tracker_names


@dataclass
class RunConfig:
    name: str = "run"
    """run directory name under ``output_dir``"""
    output_dir: str = "runs"
    """parent folder of run directories"""
    seed: int = 0
    """seeds prompts order, sampling noise and initialisation; the same seed gives the same run"""
    overwrite: bool = False
    """allow writing into an existing run directory that was not given as ``resume=``"""


@dataclass
class ComponentConfig:
    name: str = ""
    """registered name (see ``mmgrpo list``)"""
    options: dict[str, Any] = field(default_factory=dict)
    """options of that component; checked against its options schema"""


@dataclass
class RewardSpec:
    name: str = ""
    """registered reward name, entry-point name, or dotted path ``my_pkg.my_reward``"""
    weight: float = 1.0
    """weight of this reward when several are combined"""
    options: dict[str, Any] = field(default_factory=dict)
    """options passed to the reward factory"""
    streams: list[str] = field(default_factory=list)
    """score only rows whose meta['stream'] is listed (e.g. [reasoning] with PEARL); empty = every row"""
    kind: Literal["outcome", "process"] = "outcome"
    """the reward's stream for advantage code: outcome (is the final answer right: accuracy, IoU, tests) or process
    (how it was reached: reasoning quality, format). Built-in combiners ignore it; a combiner or method hook that
    declares ``kinds`` gets one per reward (Posterior-GRPO: ``advantage.combine: posterior``)"""


@dataclass
class AdvantageConfig:
    estimator: str = "grpo"
    """advantage estimator (grpo, dr_grpo, batch_std, mc_grpo, ngrpo, bnpo, stratified), an entry-point name or a
    dotted path"""
    options: dict[str, Any] = field(default_factory=dict)
    """estimator options, checked against its signature (e.g. {unbiased: false} for grpo, {scale: mad} for
    mc_grpo)"""
    combine: str = "sum_then_normalize"
    """how several rewards combine: sum_then_normalize, normalize_then_sum (GDPO / MixGRPO) or posterior
    (Posterior-GRPO: process rewards count only where the outcome is correct)"""
    combine_options: dict[str, Any] = field(default_factory=dict)
    """options of the combiner, checked against its signature (posterior: {threshold: 1.0})"""
    shaping: str = "none"
    """reward shaping applied before normalisation (none, tempsamp_soft)"""
    shaping_options: dict[str, Any] = field(default_factory=dict)
    """options of the shaping function (tempsamp_soft: tau, a1, a2)"""
    min_advantage: float | None = None
    """lower bound on the advantages (None: unbounded). 0 reinforces only better-than-average samples of each
    group (reward-filtered fine-tuning, RAFT / ReST style). With policy objective=flow_matching a negative weight
    pushes a sample's error up without bound, but 0 is no cure there: on the shapes demo it reinforced the
    artefacts all samples share and collapsed (held-out 0.37 -> 0.03 in 40 steps); objective=nft bounds the
    negative term instead (docs/results.md)"""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop zero-variance groups and refill the batch from new prompts"""
    max_refill_rounds: int = 3
    """dynamic sampling: at most this many extra sampling rounds per step"""


@dataclass
class SamplerConfig:
    """``sampler``: which prompts a step trains on and how many rollouts each gets (``mmgrpo.core.sampling``);
    ``{name, options}``, or just the name (``sampler: spo``)."""

    __shorthand__ = "name"
    name: str = "uniform"
    """uniform (the stream in order, trainer.group_size rollouts each: runs as without a sampler), spo (SPO's
    prioritised prompts and value tracker), gdro (GDRO's difficulty-adaptive prompts and rollouts), an entry-point
    name or a dotted path"""
    options: dict[str, Any] = field(default_factory=dict)
    """options of that sampler, checked against its Options schema"""


@dataclass
class AggregationConfig:
    """``loss.aggregation``: ``{name, options}``, or just the name (``aggregation: seq_mean``)."""

    __shorthand__ = "name"
    name: str = "token_mean"
    """token_mean (DAPO), seq_mean (GRPO), constant (Dr. GRPO), an entry-point name or a dotted path"""
    options: dict[str, Any] = field(default_factory=dict)
    """options of that aggregation, checked against it (constant: {constant: max completion length in tokens /
    number of trained steps})"""


@dataclass
class LossConfig:
    """``loss``: the surrogate ``{name, options}`` plus the knobs every loss shares (aggregation, KL, advantage
    clipping, zero-advantage masking)."""

    __moved__ = {  # old flat key -> (where it lives now, its old default); see mmgrpo.core.schema
        "clip_low": ("options.clip_low", 0.2),
        "clip_high": ("options.clip_high", 0.2),
        "dual_clip": ("options.dual_clip", None),
        "constant": ("aggregation.options.constant", None),
    }
    name: str = "grpo"
    """policy loss: grpo (token/step-level ratio), gspo (sequence-level ratio), pg (no clipping), nft (DiffusionNFT),
    an entry-point name or a dotted path"""
    options: dict[str, Any] = field(default_factory=dict)
    """options of that loss, checked against its signature: grpo/gspo {clip_low: 0.2, clip_high: 0.2 (DAPO
    clip-higher: 0.28), dual_clip: null (dual-clip PPO c > 1)}; pg and nft take none"""
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    """how per-unit losses reduce to a scalar (and what their normaliser counts)"""
    beta: float = 0.0
    """weight of the KL to the reference policy (0 = no reference forward)"""
    adv_clip: float | None = None
    """clamp advantages to [-adv_clip, adv_clip]; null = off (nft: its c, required)"""
    mask_zero_adv: bool = False
    """drop units of zero-advantage rows from the loss and its normaliser (DAPO)"""


@dataclass
class TrainerConfig:
    max_steps: int = 100
    """training steps (one rollout + update each)"""
    prompts_per_step: int = 4
    """B: prompts per step over all processes (must divide by the number of processes)"""
    group_size: int = 8
    """G: samples per prompt"""
    epochs: int = 1
    """inner epochs over one rollout (old log-probs come from the rollout)"""
    minibatches: int = 1
    """optimizer steps per epoch: the rollout's rows split into this many minibatches"""
    logp_old: Literal["auto", "rollout"] = "auto"
    """where the loss's old log-probs come from. auto: when the rollout feeds one optimizer step (epochs x
    minibatches = 1) and the policy can skip a forward for them (VLM, diffusion objective flow_matching), from the
    update's own forward (logp.detach(): ratio exactly 1, one forward per step less, as TRL does); otherwise from the
    rollout. rollout: always recorded by the rollout (to check the ratio = 1 invariant on trainer rollouts, or with
    LoRA dropout, where the update's forward is noisier than the rollout's)"""
    rollout_chunks: int = 1
    """sample the step's prompts in this many chunks, scoring each in a background thread while the next
    is sampled (overlaps remote/threaded rewards with sampling); 1 = sample everything, then score"""
    micro_batch_size: int | Literal["auto"] = "auto"
    """rows per forward/backward (gradient accumulation inside a minibatch); 0 = the whole minibatch; auto = the
    policy's choice: a diffusion policy, whose every trained step (or draw) of a row is one denoiser forward, takes the
    number of rows that brings rows x trained units nearest to micro_batch_units (so memory is bounded by about that
    budget, not by B x G x T; at least one row), other policies the whole minibatch. Only float rounding depends on
    it"""
    micro_batch_units: int = 16
    """with micro_batch_size auto: the most (row, unit) forwards of a diffusion policy in one micro-batch. 16 kept
    the update of the shapes SD3 (B 8 x G 8, 7 trained steps: 2 rows at a time) at or below the peak memory of
    Flow-GRPO's batches of 8 rows, with no loss of speed on CPU against 32; 8 was slower there (bench/peers.py)"""
    skip_zero_advantage: bool = True
    """leave rows whose advantage is 0 on every unit out of the update's forwards and backwards (Flow-GRPO filters
    them too): it only changes float rounding, so it applies only where such a row's gradient is exactly 0 (a loss
    registered with zero_adv_no_grad: grpo, gspo, pg; loss.beta = 0) and in a single process (ranks would make
    different numbers of forwards). The loss normaliser still counts them, so the loss and gradient are unchanged.
    A minibatch whose rows all have advantage 0 still forwards one row, so the optimizer sees the same (zero)
    gradients"""
    lr: float = 1e-3
    """peak learning rate of AdamW"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas"""
    adam_eps: float = 1e-8
    """AdamW epsilon"""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """learning-rate decay after warmup, as a function of the training step"""
    warmup_steps: int = 0
    """linear warmup steps"""
    max_grad_norm: float | None = 1.0
    """clip the gradient norm; null = off"""
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    """autocast precision of forwards (log-prob maths stays fp32); null = as launched (``accelerate launch
    --mixed_precision bf16``, or accelerate's config file), else no. Set here and in the launcher with different
    values is an error that names both; a run's config.yaml stores the precision it ran with"""
    ema_decay: float | None = None
    """EMA of the trainable parameters (used for evaluation); null = off"""
    shuffle: bool = True
    """shuffle rows between minibatches"""
    log_every: int = 1
    """write metrics every this many steps"""
    eval_every: int = 0
    """held-out evaluation every this many steps (also before the first and after the last); 0 = off"""
    sample_every: int = 0
    """save a sample grid every this many steps; 0 = only at evaluations"""
    checkpoint_every: int = 50
    """checkpoint every this many steps (and at the end); 0 = only at the end"""
    keep_checkpoints: int = 2
    """keep the last K checkpoints"""
    export_checkpoints: bool = False
    """also write each checkpoint's weights as diffusers / peft / transformers files in its export/ folder (as
    ``mmgrpo export`` does, with the live weights, not the EMA; mmgrpo.train.export); off by default"""
    stop_after_steps: int | None = None
    """stop (checkpointing) after this many steps of this invocation, as if interrupted; null = off"""
    time_budget_s: float | None = None
    """stop (checkpointing) when this much time has passed since this invocation started; null = off"""
    time_budget_clock: str = "wall"
    """what the time budget counts: ``wall`` (wall-clock) or ``process`` (this process's CPU seconds, all its threads:
    runs stay comparable when they share a machine or are paused; with one torch thread on an idle core it is the
    wall-clock of the work)"""
    dump_advantages: bool = False
    """write each step's advantages (all ranks gathered) under debug/ (for checking runs agree)"""
    progress: bool = True
    """show a progress bar"""
    log_with: list[str] = field(default_factory=list)
    """experiment trackers that also get every logged scalar, through accelerate: tensorboard (files under the run
    directory), wandb, trackio, mlflow, ... or all (every installed one); [] = only metrics.jsonl"""
    max_nonfinite_steps: int = 3
    """stop the run after this many optimizer steps in a row were skipped because the loss or the gradient norm was
    not finite (each skipped minibatch is logged as ``skipped/nonfinite``; the last good checkpoint is kept)"""


@dataclass
class Config:
    pipeline: str = "bandit"
    """recipe that builds the policy, prompts and evaluation (see ``mmgrpo list``)"""
    run: RunConfig = field(default_factory=RunConfig)
    policy: ComponentConfig = field(default_factory=ComponentConfig)
    data: ComponentConfig = field(default_factory=ComponentConfig)
    rewards: list[RewardSpec] = field(default_factory=list)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    methods: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    """paper methods switched on, each with its options: {pearl: {cap: 0.5}, tempsamp: {}} (see ``mmgrpo list``);
    a method listed is on, null turns it off; checked against the method's options schema at load"""
    resume: str | None = None
    """a run directory to continue exactly where it stopped"""
    resume_force: bool = False
    """resume even though the config changed keys that change what the run computes (seed, batch, model, ...)"""


def parse_override(text: str) -> tuple[list[str], Any]:
    """``trainer.lr=3e-4`` -> (['trainer', 'lr'], 3e-4). Values are YAML scalars/lists."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form key=value (e.g. trainer.lr=3e-4)")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise UserError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(data: dict, keys: list[str], value: Any) -> None:
    node: Any = data
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, k, keys[: i + 1])]
            continue
        if k not in node or node[k] is None:
            node[k] = {}
        if not isinstance(node[k], (dict, list)):  # e.g. aggregation: token_mean, then aggregation.options.x=...
            where = ".".join(keys[: i + 1])
            raise UserError(f"override key {'.'.join(keys)!r}: {where} is {node[k]!r}, not a mapping; give the whole "
                            f"value instead, e.g. {where}={{name: {node[k]}, options: {{...}}}}")  # fmt: skip
        node = node[k]
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last, keys)] = value
    else:
        node[last] = value


def _list_index(node: list, k: str, keys: list[str]) -> int:
    if not k.isdigit() or int(k) >= len(node):
        raise UserError(f"override key {'.'.join(keys)!r}: {k!r} is not an index of a list of {len(node)} items")
    return int(k)


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        inside = sorted(q.name for q in p.glob("*.yaml"))[:8]
        hint = f", e.g. {', '.join(str(p / q) for q in inside)}" if inside else " (configs/*.yaml)"
        raise UserError(f"config file '{path}' is a directory; give a YAML file{hint}")
    if not p.is_file():
        here = sorted(str(q) for q in Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []
        hint = f"; available: {', '.join(here)}" if here else ""
        raise UserError(f"config file '{path}' not found{hint}")
    text = read_utf8(p, "config file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"config file '{path}' is not valid YAML: {e}") from e
    if data is None:  # empty, or only comments: not a config with every key at its default
        raise UserError(f"config file '{path}' is empty (or only comments); give a config with at least pipeline: "
                        "and rewards:, e.g. copy configs/bandit.yaml")  # fmt: skip
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Read ``path`` (or start from ``base``/defaults), apply ``overrides``, validate everything."""
    data = copy.deepcopy(base) if base is not None else (read_yaml(path) if path is not None else {})
    where = str(path) if path is not None else "the config"
    from_dict(Config, data, where)  # report file errors against the file, before overrides
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value)
        from_dict(Config, data, f"command-line override '{text}'")
    cfg = from_dict(Config, data, where)
    validate_components(cfg, where)
    return cfg


def validate_components(cfg: Config, where: str) -> None:
    """Check component names and options against what each registered component accepts."""
    validate_advantage_and_loss(cfg.advantage, cfg.loss, where, [r.kind for r in cfg.rewards])
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
        if not math.isfinite(spec.weight):  # nan / inf: every combined reward nan / inf, nothing learned
            raise _bad(f"rewards.{i}.weight", spec.weight, where, f"({spec.name}) must be a finite number (0 logs the "
                       "reward without training on it; a negative weight penalises it)")  # fmt: skip
    methods = check_methods(cfg, where)
    check_sampler(cfg, where)
    _check_sampler_fits(cfg, methods, where)
    check_tracker_names(cfg.trainer.log_with, where)


SAMPLER_INPUTS = {"baseline": "spo (SPO's value tracker)", "roles": "pairing (Beyond Variance's prompt pairs)"}
"""estimator inputs that come from the prompt sampler -> the sampler that gives them"""


def _check_sampler_fits(cfg: Config, methods: list, where: str) -> None:
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


def check_numbers(cfg: Config, where: str) -> None:
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
        ("trainer.max_steps", t.max_steps, 0, ""),
        ("trainer.micro_batch_size", None if t.micro_batch_size == "auto" else t.micro_batch_size, 0, " (or auto)"),
        ("trainer.micro_batch_units", t.micro_batch_units, 1, ""),
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


def _data_sizes(cfg: Config, where: str) -> list[tuple[str, Any, int, str]]:
    """The recipe's evaluation batch sizes (``data.options.eval_batch_size`` / ``eval_batch``), which must be >= 1."""
    data_cls = components.PIPELINES.get(cfg.pipeline).data_options
    if data_cls is None:
        return []
    opts = options_from(data_cls, cfg.data.options, where, "data.options")
    keys = [k for k in ("eval_batch_size", "eval_batch") if hasattr(opts, k)]
    return [(f"data.options.{k}", getattr(opts, k), 1, "") for k in keys]


def _check_group_split(cfg: Config, where: str) -> None:
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


def validate_advantage_and_loss(
    a: AdvantageConfig, lc: LossConfig, where: str, kinds: list[str] | None = None
) -> None:
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


def resolved_config(cfg: Config, base: str | Path | None = None) -> Config:
    """``cfg`` made self-contained, as a run's ``config.yaml`` stores it: every component option written out with
    its default (``policy.options``, ``data.options``, each method's and each reward factory's options), and every
    relative path that exists under ``base`` (default: the working directory) made absolute, so that ``mmgrpo
    sample --run``, ``export`` and a resume read the same run from any directory.

    A string counts as a path when it names an existing file or folder under ``base`` and either holds a path
    separator or a suffix (``assets/shapes_t2i``, ``prompts.jsonl``) or sits under a path-like key (``path``,
    ``*_file``, ``*_dir``, ``checkpoint``, ``prompts``...); a bare name such as ``family: sd3`` is never touched.
    Resolving twice gives the same config.
    """
    base = Path(base) if base is not None else Path.cwd()
    out = copy.deepcopy(cfg)
    pipeline = components.PIPELINES.get(out.pipeline)
    if pipeline.policy_options is not None:
        opts = options_from(pipeline.policy_options, out.policy.options, "", "policy.options")
        out.policy.options = to_dict(opts.with_defaults() if hasattr(opts, "with_defaults") else opts)
    if pipeline.data_options is not None:
        out.data.options = to_dict(options_from(pipeline.data_options, out.data.options, "", "data.options"))
    for (_method, opts), name in zip(
        enabled_methods(out), [k for k, v in (out.methods or {}).items() if v is not None]
    ):
        out.methods[name] = to_dict(opts)
    for spec in out.rewards:
        spec.options = {**_factory_defaults(reward_registry.resolve(spec.name)), **spec.options}
    out.run.output_dir = str((base / out.run.output_dir).absolute())
    for section in (out.policy, out.data, *out.rewards):
        section.options = _absolute_paths(section.options, base)
    out.methods = _absolute_paths(out.methods, base)
    if out.resume:
        out.resume = _absolute_paths({"path": out.resume}, base)["path"]
    return out


_PATH_KEYS = re.compile(r"(^|_)(path|paths|file|files|dir|dirs|root|checkpoint|prompts|images|image|video|videos)$")
_JSONABLE = (str, int, float, bool, type(None))


def _factory_defaults(obj: Any) -> dict[str, Any]:
    """The keyword defaults of a reward factory that a YAML file can hold (none for a plain reward callable)."""
    if not reward_registry.is_factory(obj):
        return {}
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for p in params
        if p.default is not p.empty and p.kind is not p.VAR_KEYWORD and isinstance(p.default, _JSONABLE)
    }


def _absolute_paths(value: Any, base: Path, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _absolute_paths(v, base, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute_paths(v, base, key) for v in value]
    if not isinstance(value, str) or not value or Path(value).is_absolute() or "://" in value:
        return value
    looks_like_path = "/" in value or "\\" in value or Path(value).suffix != "" or bool(_PATH_KEYS.search(key))
    candidate = base / value
    try:
        exists = looks_like_path and candidate.exists()
    except OSError:  # a name too long for the file system, ...
        return value
    return str(candidate.absolute()) if exists else value


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_diff(a: Config, b: Config, ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """``(dotted key, value in a, value in b)`` for every key whose value differs, except keys starting with an
    ``ignore`` prefix; an empty mapping is a value of its own (``methods: {}`` vs ``methods: {pearl: {}}``)."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict) and d:
            out = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: d}

    fa, fb = flat(to_dict(a)), flat(to_dict(b))
    keys = sorted(set(fa) | set(fb))
    return [(k, fa.get(k), fb.get(k)) for k in keys if fa.get(k) != fb.get(k) and not k.startswith(ignore)]
