"""The run configuration: a typed schema, YAML files in ``configs/``, dotted ``key=value`` overrides.

Every field is documented next to it. Loading is strict: an unknown key, a wrong type, a missing file
are one-paragraph :class:`UserError`s naming the key, the file and the nearest valid key.
Component options (``policy.options``, ``data.options``, each reward's ``options``) are checked
against the options dataclass that the named component registers; those checks, the numbers' ranges and the parts
that must fit one another are :mod:`mmgrpo.train.config_checks`.
"""

from __future__ import annotations

import copy
import inspect
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmgrpo import rewards as reward_registry
from mmgrpo.core.config_yaml import dump_yaml, load_yaml, option_value, yaml_error_message
from mmgrpo.core.errors import UserError, quoted
from mmgrpo.core.files import read_utf8
from mmgrpo.core.schema import from_dict, options_from, to_dict  # noqa: F401  (options_from: recipes)
from mmgrpo.methods.registry import enabled_methods
from mmgrpo.train import components
from mmgrpo.train.config_checks import (  # noqa: F401  (re-exported: the checks lived here)
    RUN_NAME,
    SAMPLER_INPUTS,
    check_numbers,
    check_run_name,
    validate_advantage_and_loss,
    validate_components,
)


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

    @staticmethod
    def unknown_key_hint(key: str, data: dict, prefix: str) -> str | None:
        """``{name: remote, url: ...}``: an option of the reward written next to its name, where the nearest key
        ('name') was suggested; say it goes under ``options``."""
        try:
            factory = reward_registry.resolve(str(data.get("name", "")))
            params = inspect.signature(factory).parameters
        except Exception:  # noqa: BLE001  (no such reward, no signature: the usual hint)
            return None
        if key not in params or not reward_registry.is_factory(factory):  # a plain reward's 'meta' is no option
            return None
        return f"{key!r} is an option of reward {data.get('name')!r}: write it under options ({prefix}.options.{key})"


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
    budget, not by B x G x T; at least one row, and a row whose trained units exceed the budget is split into parts
    of its units where the loss allows it exactly: grpo, pg or nft with token_mean or constant aggregation), other
    policies the whole minibatch. Only float rounding depends on it"""
    micro_batch_units: int = 16
    """with micro_batch_size auto: about the most (row, unit) forwards of a diffusion policy in one micro-batch (the
    nearest whole number of rows, or of parts of one row's units: at most ~1.5 budgets). 16 kept
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
    """EMA of the trainable parameters (used for evaluation, ``mmgrpo sample --ema`` and ``mmgrpo export --ema``);
    null = off"""
    ema_every: int = 1
    """move the EMA at optimizer steps n with (n + 1) % ema_every == 0 (Flow-GRPO's update_step_interval: 8, i.e.
    steps 7, 15, 23, ...); 1 = every step"""
    ema_warmup: bool = False
    """EMA decay min(ema_decay, (1 + n) / (10 + n)) at optimizer step n (Flow-GRPO's EMA), so the average does not
    hold on to the initial weights early in a run; false = ema_decay from the first step. Flow-GRPO's SD3 recipe:
    ema_decay 0.9, ema_every 8, ema_warmup true"""
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
    return key.split("."), option_value(raw, f"command-line override {text!r}", f"\"{key}='{raw}'\"")


def apply_override(data: dict, keys: list[str], value: Any, text: str = "") -> None:
    """Set the dotted ``keys`` of ``data`` to ``value`` (``text``: the override, for its warning).

    A name given for a block that holds a strategy's ``{name, ...options}`` (``policy.options.objective=nft`` over
    ``objective: {name: nft, timesteps: 4}``) is the shorthand ``{name: nft}``: naming the block's own strategy keeps
    the block and its options; naming another replaces the block, and its options (they belong to the other
    strategy) are dropped with a warning that names them."""
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
    slot = _list_index(node, last, keys) if isinstance(node, list) else last
    old = node[slot] if isinstance(node, list) or slot in node else None
    if isinstance(value, str) and isinstance(old, dict) and isinstance(old.get("name"), str):
        if value == old["name"]:
            return  # the block's own strategy: its options stay
        dropped = {k: v for k, v in old.items() if k != "name" and v not in (None, {}, [])}
        if dropped:
            shown = ", ".join(f"{k}: {quoted(v, 40)}" for k, v in dropped.items())
            key = ".".join(keys)
            warnings.warn(
                f"command-line override {text or f'{key}={value}'!r} replaces {key} {{name: {old['name']}, "
                f"{shown}}} with {{name: {value}}}: those options belong to {old['name']!r} and are dropped, and "
                f"{value!r} takes its defaults. To set options of {value!r}, give them with it, e.g. "
                f'"{key}={{name: {value}, ...}}"',
                UserWarning,
                stacklevel=3,
            )
    node[slot] = value


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
        data = load_yaml(text)
    except yaml.YAMLError as e:
        raise UserError(yaml_error_message(e, f"config file '{path}'", text)) from e
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
    steps = [(copy.deepcopy(data), where)]  # the data before each override, and after the last
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value, text)
        from_dict(Config, data, f"command-line override '{text}'")
        steps.append((copy.deepcopy(data), f"command-line override '{text}'"))
    folder = Path(path).parent if path is not None else None
    try:
        return _checked(data, where, folder)
    except UserError as e:
        blamed = _blamed(steps, folder, e) if len(steps) > 1 else e
        if blamed is e:
            raise
        raise blamed from e


def _checked(data: dict, where: str, folder: Path | None) -> Config:
    cfg = from_dict(Config, data, where)
    if folder is not None:  # before the recipe's checks, some of which read a model's files (a hub id: download)
        check_relative_paths(cfg, where, folder)
    validate_components(cfg, where)
    return cfg


_WHERE = "\x00where\x00"


def _blamed(steps: list[tuple[dict, str]], folder: Path | None, error: UserError) -> UserError:
    """``error`` (the checks of the whole config failed) blamed on where it came from: the first of the config file
    and its overrides from which on every step gives the same error; a nested key or a value an override set
    (``policy.options.num_step=4``, ``loss.name=grpoo``) is the override's error, not the file's."""

    def message(data: dict) -> str | None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                _checked(copy.deepcopy(data), _WHERE, folder)
            except UserError as e:
                return str(e)
            except Exception as e:  # noqa: BLE001  (a part that fails on the file alone: not this error)
                return repr(e)
        return None

    said = [message(data) for data, _ in steps]
    if said[-1] is None or _WHERE not in said[-1]:
        return error
    k = len(steps) - 1
    while k > 0 and said[k - 1] == said[-1]:
        k -= 1
    return UserError(said[-1].replace(_WHERE, steps[k][1]))


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


_PATH_KEYS = re.compile(
    r"(^|_)(path|paths|file|files|dir|dirs|root|checkpoint|prompts|images|image|video|videos|lora)$"
)  # init_lora: a LoRA adapter's folder
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


TEXT_LISTS = ("prompts", "heldout_prompts")
"""keys whose value is a file name, or, as a list, the texts themselves (``data.options.prompts: [a dog, ...]``):
a prompt that happens to name a file next to the config is a prompt, never made a path"""


def _absolute_paths(value: Any, base: Path, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _absolute_paths(v, base, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return value if key in TEXT_LISTS else [_absolute_paths(v, base, key) for v in value]
    if not isinstance(value, str) or not value or Path(value).is_absolute() or "://" in value:
        return value
    if value.startswith("hf:"):  # hf:NAME[:SPLIT[:COLUMN]]: NAME a local dataset folder or file, or a hub id
        name, sep, rest = value[3:].partition(":")
        local = _absolute_paths(name, base, "path") if name else name
        return value if local == name else f"hf:{local}{sep}{rest}"
    looks_like_path = "/" in value or "\\" in value or Path(value).suffix != "" or bool(_PATH_KEYS.search(key))
    candidate = base / value
    try:
        exists = looks_like_path and candidate.exists()
    except OSError:  # a name too long for the file system, ...
        return value
    return str(candidate.absolute()) if exists else value


def check_relative_paths(cfg: Config, where: str, folder: Path) -> None:
    """Refuse a relative path of the config (in ``policy.options``, ``data.options``, a reward's or a method's
    options) that does not exist under the working directory, which is what relative paths are read against, but
    does under the config file's ``folder`` or a folder above it: the config was meant to be run from there (``mmgrpo
    train /work/proj/configs/x.yaml`` run from /tmp with ``path: assets/model``). Said at load, before a model
    loads: such a path with a ``/`` reads as a hub id, whose download would be tried, and fail, first."""
    cwd = Path.cwd().absolute()
    sections = [("policy.options", cfg.policy.options), ("data.options", cfg.data.options), ("methods", cfg.methods)]
    sections += [(f"rewards.{i}.options", spec.options) for i, spec in enumerate(cfg.rewards)]
    for prefix, value in sections:
        for key, text in _strings(value, prefix):
            local = text[3:].partition(":")[0] if text.startswith("hf:") else text
            if not local or "://" in local or Path(local).is_absolute():
                continue
            if not ("/" in local or "\\" in local or Path(local).suffix):  # a bare name (family: sd3, shapes)
                continue
            try:
                if (cwd / local).exists():
                    continue
                above = [d for d in (folder.absolute(), *folder.absolute().parents) if d.parent != d and d != cwd]
                home = next((d for d in above if (d / local).exists()), None)
            except OSError:  # a name too long for the file system, ...
                continue
            if home is None:
                continue
            fixed = text.replace(local, str(home / local), 1)
            place = "the config file's folder" if home == folder.absolute() else "a folder above the config file"
            raise UserError(
                f"{key}={quoted(text, 80)} in {where} is a relative path, and relative paths in a config are read "
                f"from the working directory ({cwd}), where it does not exist; it exists under {home}, {place}. Run "
                f"the command from that folder (cd {home}), or give the absolute path: {key}={fixed}"
            )


def _strings(value: Any, key: str) -> list[tuple[str, str]]:
    """``(dotted key, string)`` of every string in a tree of mappings and lists."""
    if isinstance(value, dict):
        return [hit for k, v in value.items() for hit in _strings(v, f"{key}.{k}")]
    if isinstance(value, list):
        if key.rpartition(".")[2] in TEXT_LISTS:  # texts, not paths
            return []
        return [hit for i, v in enumerate(value) for hit in _strings(v, f"{key}.{i}")]
    return [(key, value)] if isinstance(value, str) else []


def dump_config(cfg: Config) -> str:
    return dump_yaml(to_dict(cfg), sort_keys=False)


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
