"""Strict, typed conversion of plain dicts (from YAML and ``key=value`` overrides) into dataclasses.

Unknown keys and wrong types are :class:`UserError`s that name the key, where it came from, and the
nearest valid key::

    unknown key 'trainer.lr_rate' in configs/x.yaml; did you mean 'trainer.lr'?
    trainer.lr in configs/x.yaml: expected float, got 'fast' (str)

Two class attributes of a schema dataclass refine this: ``__shorthand__ = "name"`` lets a plain string stand for
``{name: that string}`` (``aggregation: seq_mean``), and ``__moved__ = {"old_key": ("new.key", old default)}``
reads a key that moved at its new place, with a warning. :func:`check_options` checks a strategy's own options,
declared by its signature, the same strict way.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import types
import typing
import warnings
from typing import Any, Literal, Union

from mmgrpo.core.errors import UserError
from mmgrpo.core.registry import nearest

_MISSING = dataclasses.MISSING


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


_BATCH = (
    "prompts a step over all processes, each sampled trainer.group_size times: a step's batch is "
    "prompts_per_step x group_size rows"
)
_INNER = "passes over one rollout"
COMMON_NAMES: dict[str, tuple[str, str]] = {
    # TRL (GRPOConfig, PPOConfig), Hugging Face TrainingArguments, diffusers' training scripts, peft, Flow-GRPO / DDPO
    "learning_rate": ("lr", ""),
    "num_generations": ("group_size", "samples per prompt"),
    "num_images_per_prompt": ("group_size", "samples per prompt"),
    "num_image_per_prompt": ("group_size", "samples per prompt"),
    "num_iterations": ("epochs", _INNER),
    "num_inner_epochs": ("epochs", _INNER),
    "num_train_epochs": (
        "max_steps",
        f"a run's length counts steps, one rollout and its update each; epochs counts {_INNER}",
    ),  # fmt: skip
    "max_train_steps": ("max_steps", ""),
    "num_train_steps": ("max_steps", ""),
    "total_steps": ("max_steps", ""),
    "gradient_accumulation_steps": (
        "micro_batch_size",
        "rows a forward/backward; a minibatch accumulates the gradients of its micro-batches",
    ),  # fmt: skip
    "per_device_train_batch_size": ("prompts_per_step", _BATCH),
    "train_batch_size": ("prompts_per_step", _BATCH),
    "batch_size": ("prompts_per_step", _BATCH),
    "adam_beta1": ("adam_betas", "the pair [beta1, beta2]"),
    "adam_beta2": ("adam_betas", "the pair [beta1, beta2]"),
    "adam_epsilon": ("adam_eps", ""),
    "lr_scheduler_type": ("lr_schedule", ""),
    "lr_scheduler": ("lr_schedule", ""),
    "lr_warmup_steps": ("warmup_steps", ""),
    "warmup_ratio": ("warmup_steps", "a number of steps, not a fraction of the run"),
    "save_steps": ("checkpoint_every", ""),
    "checkpointing_steps": ("checkpoint_every", ""),
    "save_total_limit": ("keep_checkpoints", ""),
    "checkpoints_total_limit": ("keep_checkpoints", ""),
    "logging_steps": ("log_every", ""),
    "eval_steps": ("eval_every", ""),
    "report_to": ("log_with", ""),
    "bf16": ("mixed_precision", "e.g. mixed_precision: bf16"),
    "fp16": ("mixed_precision", "e.g. mixed_precision: fp16"),
    "use_ema": ("ema_decay", "the EMA's decay, e.g. 0.999; null = off"),
    "kl_coef": ("beta", "the weight of the KL to the reference"),
    "init_kl_coef": ("beta", "the weight of the KL to the reference"),
    "kl_beta": ("beta", "the weight of the KL to the reference"),
    "adv_clip_max": ("adv_clip", ""),
    "epsilon": ("clip_low", ""),
    "epsilon_low": ("clip_low", ""),
    "epsilon_high": ("clip_high", ""),
    "cliprange": ("clip_low", "and clip_high"),
    "clip_range": ("clip_low", "and clip_high"),
    "num_inference_steps": ("num_steps", ""),
    "lora_r": ("lora_rank", ""),
    "max_completion_length": ("max_new_tokens", ""),
    "torch_dtype": ("dtype", ""),
    "pretrained_model_name_or_path": ("path", "a local folder or a hub id"),
    "model_name_or_path": ("path", "a local folder or a hub id"),
    "run_name": ("name", ""),
}
"""names users bring from other libraries -> (mmgrpo's key of the same meaning, a note where it differs), for the
did-you-mean of an unknown key: string similarity alone sends ``learning_rate`` to ``minibatches``"""


def suggestion(key: str, candidates: list[str], prefix: str = "") -> tuple[str, str] | None:
    """The did-you-mean of an unknown ``key`` (its last part) among the dotted ``candidates``, and a note where the
    meaning differs: the library name of :data:`COMMON_NAMES` first, else the nearest spelling of ``prefix.key``
    (None: neither)."""
    if key in COMMON_NAMES:
        target, note = COMMON_NAMES[key]
        full = f"{prefix}.{target}" if prefix else target
        hits = [full] if full in candidates else [c for c in candidates if c.endswith(f".{target}")]
        if len(hits) == 1:
            return hits[0], note
    hint = nearest(f"{prefix}.{key}" if prefix else key, candidates)
    return (hint, "") if hint else None


def did_you_mean(hint: tuple[str, str] | None, prefix: str = "") -> str:
    """``; did you mean 'trainer.lr'?`` (with the note of :func:`suggestion`), or "" for no hint."""
    if hint is None:
        return ""
    key, note = hint
    return f"; did you mean {(f'{prefix}.{key}' if prefix else key)!r}?" + (f" ({note})" if note else "")


def _fail(path: str, where: str, expected: Any, value: Any) -> UserError:
    msg = f"{path} in {where}: expected {_type_name(expected)}, got {value!r} ({type(value).__name__})"
    wants_str = expected is str or str in typing.get_args(expected)
    if isinstance(value, bool) and wants_str:  # run.name=on, prompts: no
        key = path.rsplit(".", 1)[-1]
        msg += (f" (YAML reads an unquoted yes/no/on/off/true/false as a boolean: quote the word, in a file "
                f"{key}: 'on', on the command line \"{path}='on'\")")  # fmt: skip
    elif isinstance(value, (int, float)) and wants_str:  # run.name=123, revision: 1234e56 (a commit hash)
        key = path.rsplit(".", 1)[-1]
        msg += (f" (YAML reads unquoted digits, with an e between them too, as a number: quote the text, in a file "
                f"{key}: '...', on the command line \"{path}='...'\")")  # fmt: skip
    elif (
        isinstance(value, (str, int, float))
        and any(  # trainer.log_with=tensorboard (not a fixed-size pair)
            typing.get_origin(t) is list or (typing.get_origin(t) is tuple and typing.get_args(t)[-1:] == (...,))
            for t in (expected, *typing.get_args(expected))
        )
    ):
        msg += f" (a list, even of one: {path}=[{value}])"
    return UserError(msg)


def convert(value: Any, tp: Any, path: str, where: str) -> Any:
    """Check/convert ``value`` to type ``tp``; ``path`` is the dotted key, ``where`` the source (a file)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert(value, a, path, where)
            except UserError as e:
                errors.append(e)
        raise _fail(path, where, tp, value)
    if origin is Literal:
        args = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/off/yes/on as a bool: `mixed_precision: no`
            value = next((w for w in (("no", "off") if not value else ("yes", "on")) if w in args), value)
        if any(type(value) is type(a) and value == a for a in args):  # typed: 1 is not True, nor "1"
            return value
        raise _fail(path, where, tp, value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _fail(path, where, tp, value)
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [convert(v, item_tp, f"{path}.{i}", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(path, where, tp, value)
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {k: convert(v, val_tp, f"{path}.{k}", where) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        shorthand = getattr(tp, "__shorthand__", None)
        if shorthand is not None and isinstance(value, str):  # ``aggregation: seq_mean`` = ``{name: seq_mean}``
            value = {shorthand: value}
        if not isinstance(value, dict):
            raise _fail(path, where, tp, value)
        return from_dict(tp, value, where, prefix=path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(path, where, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(path, where, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads '3e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _fail(path, where, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(path, where, tp, value)
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise _fail(path, where, tp, value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _fail(path, where, tp, value)


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass schema (for did-you-mean suggestions)."""
    out = []
    for name, tp in field_types(cls).items():
        key = f"{prefix}{name}"
        out.append(key)
        if dataclasses.is_dataclass(tp):
            out.extend(valid_keys(tp, key + "."))
    return out


def _root_keys(cls: type, prefix: str) -> list[str]:
    return [f"{prefix}.{k}" if prefix else k for k in valid_keys(cls)]


def from_dict(cls: type, data: dict, where: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, strictly."""
    if not isinstance(data, dict):
        raise UserError(f"{prefix or 'config'} in {where}: expected a mapping, got {data!r}")
    if any(key in getattr(cls, "__moved__", {}) for key in data):
        data = _moved_keys(cls, data, where, prefix)
    types_ = field_types(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in types_:
            renamed = getattr(cls, "__renamed__", {}).get(key)
            hint = suggestion(str(key), _root_keys(cls, prefix), prefix)
            msg = f"unknown key {path!r} in {where}"
            own = getattr(cls, "unknown_key_hint", None)  # the class knows better (an option one level too high)
            own = own(str(key), data, prefix) if own is not None else None
            if renamed:  # an option of an older layout: say where it went, not merely the nearest spelling
                new_path = f"{prefix}.{renamed}" if prefix else renamed
                msg += f"; it was renamed to {new_path!r} (see docs/architecture.md)"
            elif own:
                msg += f"; {own}"
            elif hint:
                msg += did_you_mean(hint)
            else:
                msg += f"; valid keys here: {', '.join(sorted(types_))}"
            raise UserError(msg)
        kwargs[key] = convert(value, types_[key], path, where)
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is _MISSING and f.default_factory is _MISSING:
            path = f"{prefix}.{f.name}" if prefix else f.name
            raise UserError(f"missing required key {path!r} in {where}")
    return cls(**kwargs)


def _moved_keys(cls: type, data: dict, where: str, prefix: str) -> dict:
    """``data`` with the keys of ``cls.__moved__ = {old: (new.dotted.key, old default)}`` read at their new place.

    A value equal to the old default is dropped (configs written before the move carry every default, and the
    part's own default is the same); any other value moves, with a warning, so older configs and run directories
    keep loading and mean what they meant. Giving both the old and the new key is an error.
    """
    data = copy.deepcopy(data)
    for old, (new, old_default) in cls.__moved__.items():
        if old not in data:
            continue
        value = data.pop(old)
        if value == old_default:
            continue
        *parents, last = new.split(".")
        node = data
        for part in parents:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, str):  # a shorthand name (aggregation: constant) grows its mapping
                child = node[part] = {"name": child}
            elif not isinstance(child, dict):
                raise UserError(f"{prefix}.{part} in {where}: expected a mapping to hold {prefix}.{new}")
            node = child
        full_old, full_new = (f"{prefix}.{old}", f"{prefix}.{new}") if prefix else (old, new)
        if last in node:
            raise UserError(f"{where} gives both {full_old!r} and {full_new!r}; keep only {full_new!r}")
        node[last] = value
        warnings.warn(f"{full_old} in {where} is read as {full_new}; move it there", UserWarning, stacklevel=2)
    return data


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (for writing the resolved config)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def options_from(cls: type, options: dict, where: str, prefix: str) -> Any:
    """Build a component's options dataclass strictly (errors name ``prefix.key`` and ``where``)."""
    return from_dict(cls, options or {}, where, prefix=prefix)


def declared_options(fn: Any, skip: int = 0, inputs: tuple[str, ...] = ()) -> dict[str, inspect.Parameter] | None:
    """The options a strategy declares: its keyword parameters after the first ``skip`` (its data arguments),
    less the ``inputs`` the library supplies itself; None if it takes ``**kwargs`` (any option).

    A function declares them in its signature, a class in its ``__init__`` (a dataclass in its fields).
    """
    params = list(inspect.signature(fn).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    keyword = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {p.name: p for p in params if p.kind in keyword and p.name not in inputs}


def check_values(fn: Any, options: dict[str, Any], *leading: Any) -> None:
    """Call ``fn.check`` (if set) with ``leading`` (e.g. the options' key prefix), then the options it names, taken
    from ``options`` over ``fn``'s own defaults (all of them when it takes ``**options``): a part's option values
    checked when the config loads, before a run directory exists (estimators, shapings, reward factories)."""
    check = getattr(fn, "check", None)
    if check is None:
        return
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    known = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    known.update(options)
    takes = list(inspect.signature(check).parameters.values())[len(leading) :]
    if not any(p.kind is p.VAR_KEYWORD for p in takes):
        known = {p.name: known[p.name] for p in takes if p.name in known}
    check(*leading, **known)


def check_options(
    fn: Any, options: dict, *, what: str, prefix: str, where: str, skip: int = 0, inputs: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``options`` checked against the options ``fn`` declares (:func:`declared_options`) and converted to their
    annotated types. An undeclared option is a UserError naming ``prefix.key``, ``where``, the options ``what``
    (e.g. "loss 'grpo'") takes and the nearest one: an option is never silently ignored."""
    declared = declared_options(fn, skip, inputs)
    if declared is None:
        return dict(options)
    try:
        dataclass_or_fn = fn if dataclasses.is_dataclass(fn) or not isinstance(fn, type) else fn.__init__
        hints = typing.get_type_hints(dataclass_or_fn)
    except Exception:  # an annotation that does not resolve (a plug-in's forward reference): check names only
        hints = {}
    out = {}
    for key, value in options.items():
        if key not in declared:
            clear = f" (clear the previous one's: {prefix}={{}})" if not declared else ""  # e.g. after a switch
            raise UserError(
                f"unknown option '{prefix}.{key}' in {where}: {what} takes {', '.join(declared) or 'no options'}"
                + clear
                + did_you_mean(suggestion(str(key), list(declared)), prefix)
            )
        out[key] = convert(value, hints.get(key, Any), f"{prefix}.{key}", where)
    return out
