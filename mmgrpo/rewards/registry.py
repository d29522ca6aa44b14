"""The reward registry.

A reward is a plain callable ``reward(samples, prompts, meta, ctx) -> Tensor[N] | list[float | None]``
(None: the reward does not apply to that row). Rewards are registered by *factory*: a function taking
the reward's options and returning the callable, so model-backed rewards can load weights lazily::

    @register("jpeg_compressibility")
    def jpeg_compressibility(quality: int = 95):
        '''Negative JPEG size in kB (DDPO).'''
        def fn(samples, prompts, meta, ctx): ...
        return fn

Names resolve, in order: built-ins (the modules listed in :mod:`mmgrpo.core.plugins`); third-party rewards
published through the
``mmgrpo.rewards`` entry-point group (the entry point names a factory); a dotted path
``my_pkg.my_module.my_reward`` naming a factory or a plain reward callable.

A reward that needs the whole group at once (majority vote, diversity) sets ``group_aware = True`` on
the returned callable; it then receives rows grouped contiguously and ``ctx.group``.
A reward that runs the policy itself (``ctx.policy``, e.g. ACRE's re-asking) sets ``uses_policy = True``: with
``trainer.rollout_chunks`` > 1 the trainer then scores each chunk between the chunks' sampling, not beside it in a
thread (the model would run in two threads at once).

Options are checked when the config loads (:func:`check_reward_options`), before a model or a run directory exists:
against the factory's signature (an unknown option is an error, a value is converted to its annotated type), every
float finite, then by the factory's own ``factory.check(prefix, **options)`` when it has one (given the options it
names, or all of them with the defaults filled in when it takes ``**options``): a cheap range check raising
:func:`mmgrpo.core.errors.bad_option` for ``{prefix}.<option>`` (``rewards.0.options.connectivity=3: ...``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from mmgrpo.core.dtypes import missing_device
from mmgrpo.core.errors import UserError, bad_option, out_of_memory, quoted
from mmgrpo.core.registry import Registry
from mmgrpo.core.schema import check_options, check_values

ENTRY_POINT_GROUP = "mmgrpo.rewards"
REWARDS: Registry[Callable[..., Any]] = Registry("reward", plugins="rewards")


def register(name: str, description: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a reward factory under ``name``."""
    return REWARDS.register(name, description)


REWARD_ARGUMENTS = ("samples", "prompts", "meta", "ctx")
"""the parameters a plain reward callable is called with, positionally"""


def is_factory(obj: Any) -> bool:
    """Whether ``obj`` is a reward factory (called with the reward's options, returning the reward callable) rather
    than a plain reward callable (called with ``samples, prompts, meta, ctx``).

    The rule: a callable is a plain reward when its first four positional parameters are named ``samples, prompts,
    meta, ctx`` (defaults or not: ``def r(samples, prompts, meta, ctx=None)``), or when it has at least four
    positional parameters without a default (the rule before names counted, kept for rewards named otherwise);
    anything else is a factory. So a factory whose options have defaults (``def make(model="x", size=224, batch=8,
    device="cpu")``) or with three required options and a fourth with a default (``def make(path, threshold,
    scale, device="cpu")``) stays a factory.
    """
    try:
        params = [
            p
            for p in inspect.signature(obj).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return False
    named = tuple(p.name for p in params[:4]) == REWARD_ARGUMENTS
    required = sum(p.default is p.empty for p in params) >= 4
    return not (named or required)


def _refuse_short_reward(name: str, obj: Any) -> None:
    """A reward written with fewer than the four arguments (``def r(samples, prompts, meta)``) reads as a factory,
    whose call with the options then failed with "missing 3 required positional arguments": say what it lacks."""
    names = [p.name for p in inspect.signature(obj).parameters.values() if p.kind in (p.POSITIONAL_ONLY,
             p.POSITIONAL_OR_KEYWORD)]  # fmt: skip
    if "completions" in names[:2]:  # TRL's reward functions: (completions, **kwargs) or (prompts, completions, ...)
        raise UserError(f"reward {name!r} takes ({', '.join(names)}), a TRL reward function's arguments; mmgrpo "
                        f"calls a reward with ({', '.join(REWARD_ARGUMENTS)}): samples are the completions (their "
                        "text: mmgrpo.rewards.text.completion_text(sample)) and each row's meta holds its example's "
                        "other fields (e.g. meta[i]['solution']). Wrap it: def reward(samples, prompts, meta, "
                        "ctx): return fn([completion_text(s) for s in samples], solution=[m['solution'] for m in "
                        "meta])")  # fmt: skip
    if names and tuple(names) == REWARD_ARGUMENTS[: len(names)]:
        missing = ", ".join(REWARD_ARGUMENTS[len(names) :])
        raise UserError(f"reward {name!r} takes ({', '.join(names)}), but a reward is called with "
                        f"({', '.join(REWARD_ARGUMENTS)}); add {missing} to its parameters ({missing}=None where it "
                        "is not used)")  # fmt: skip


def resolve(name: str) -> Callable[..., Any]:
    """The factory (or plain reward callable) registered, published by entry point, or importable as ``name``; a
    name that resolves to something not callable (a dotted path to a constant) is a UserError (it failed at step 0
    as "reward raised TypeError: 'int' object is not callable")."""
    obj = REWARDS.get(name)  # the registry also resolves entry points and dotted paths
    if not callable(obj):
        raise UserError(f"reward {name!r} is {quoted(obj, 60)} (of type {type(obj).__name__}), not a reward: name a "
                        f"function ({', '.join(REWARD_ARGUMENTS)}) or a factory that returns one")  # fmt: skip
    return obj


def get(name: str, **options: Any) -> Callable[..., Any]:
    """Build the reward callable ``name`` with ``options``. Whatever the factory raises (a model file it cannot
    find, its own assert) is a UserError naming the reward and its options, the cause chained (``--debug`` shows
    it); so is a factory that returns something not callable."""
    obj = resolve(name)
    if is_factory(obj):
        _refuse_short_reward(name, obj)
        try:
            inspect.signature(obj).bind(**options)
        except TypeError as e:
            raise UserError(f"reward {name!r}: bad options {options} ({e})") from e
        except ValueError:  # no signature to read (a builtin): the call says
            pass
        _check_device_option(name, options.get("device"))
        try:
            fn = obj(**options)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001  the factory is user code: name it, keep the cause chained
            if out_of_memory(e):  # the run's out-of-memory paragraph names what to lower
                raise
            raise UserError(f"reward {name!r} could not be built with options {options}: {type(e).__name__}: "
                            f"{quoted(str(e), 300)}") from e  # fmt: skip
        if not callable(fn):
            raise UserError(f"reward {name!r}: its factory returned {quoted(fn, 60)} (of type "
                            f"{type(fn).__name__}), not a reward; a factory returns the function "
                            f"({', '.join(REWARD_ARGUMENTS)}) -> scores")  # fmt: skip
        return fn
    if options:
        raise UserError(f"reward {name!r} is a plain callable and takes no options; got {sorted(options)}")
    return obj


def _check_device_option(name: str, device: Any) -> None:
    """A reward's ``device`` option names a device this machine has: ``cuda`` without a GPU was torch's "Found no
    NVIDIA driver" at the first reward call, after the policy had loaded. Checked when the reward is built, not when
    the config loads (a config written for a GPU machine still loads, and is checked, elsewhere)."""
    if not isinstance(device, str):
        return
    try:
        why = missing_device(torch.device(device))
    except (RuntimeError, ValueError):  # a plug-in's own device word ('auto', 'balanced'): the factory reads it
        return
    if why:
        raise UserError(f"reward {name!r}: device={device!r}, but {why}; set the reward's device option to one it "
                        "has (device: cpu)")  # fmt: skip


def check_reward_options(name: str, options: dict[str, Any], prefix: str, where: str) -> dict[str, Any]:
    """At config load: reward ``name``'s ``options`` checked and converted (see the module doc); ``prefix`` is their
    key (``rewards.0.options``). Returns the converted options. A plain reward callable takes none."""
    obj = resolve(name)
    if not is_factory(obj):
        if options:
            raise UserError(f"{prefix} in {where}: reward {name!r} is a plain callable and takes no options; got "
                            f"{sorted(options)}")  # fmt: skip
        return dict(options)
    opts = check_options(obj, options, what=f"reward {name!r}", prefix=prefix, where=where)
    for key, value in opts.items():  # nan / inf reached the factory's comparisons as a string, or passed them
        if isinstance(value, float) and not math.isfinite(value):
            raise bad_option(f"{prefix}.{key}", value, f"reward {name!r} takes a finite number here")
    check_values(obj, opts, prefix)
    return opts


def check_command_line_options(name: str, options: dict[str, Any], flag: str) -> dict[str, Any]:
    """:func:`check_reward_options` for options a command takes as ``flag key=value`` (``sample --reward-option``,
    ``serve-reward --option``): the same checks as a config's, the errors naming ``flag key`` (they skipped every
    check: ``scale=nan`` served NaN, a factory's own range check never ran)."""
    try:
        return check_reward_options(name, options, flag, "the command line")
    except UserError as e:
        raise UserError(str(e).replace(f"{flag}.", f"{flag} ").replace(" in the command line", "")) from e


def available() -> dict[str, str]:
    """Every known reward name (built-in and entry-point) with its one-line description."""
    return {n: REWARDS.describe(n) for n in REWARDS.names()}
