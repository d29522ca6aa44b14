"""The three registries of phase 3 (estimators, reward shapings, combiners), their decorators and getters, and the
checks of their options at config load (:mod:`mmgrpo.core.advantages` describes the contract of each)."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from mmgrpo.core.errors import UserError, bad_option
from mmgrpo.core.registry import Registry, nearest
from mmgrpo.core.schema import check_options, check_values

Estimator = Callable[..., torch.Tensor]

ESTIMATORS: Registry[Estimator] = Registry("estimator", plugins="estimators")
SHAPERS: Registry[Callable[..., torch.Tensor]] = Registry("shaping", plugins="shaping")
COMBINERS: Registry[Callable[..., torch.Tensor]] = Registry("combine", plugins="combine")

REWARD_KINDS: tuple[str, ...] = ("outcome", "process")
"""the reward streams a reward may belong to (``rewards: [{name: accuracy, kind: outcome}, {name: think_quality,
kind: process}]``); outcome is the default"""

COMBINER_INPUTS: tuple[str, ...] = ("kinds",)
"""keyword parameters a combiner may declare to receive from the trainer (``kinds``: [R] the stream of each reward
column, one of :data:`REWARD_KINDS`); its other keyword parameters are options (``advantage.combine_options``)"""

ESTIMATOR_INPUTS: tuple[str, ...] = ("keys", "baseline", "roles")
"""keyword parameters an estimator may declare to receive from the trainer (``keys`` [B, G]: each row's stratum,
from ``Rollout.group_keys``; from the prompt sampler, ``baseline`` [B, 1]: SPO's per-prompt value, ``roles`` [B, 1]:
Beyond Variance's +1 / -1 / 0 prompt roles); its other keyword parameters are options"""


def register_estimator(
    name: str, weights: Callable[..., torch.Tensor] | None = None, check: Callable[..., None] | None = None
) -> Callable[[Estimator], Estimator]:
    """Decorator: register an estimator ``fn(rewards [B, G], **options) -> [B, G]`` under ``name``.

    ``weights``, when given, is ``fn(rewards [B, G], **options) -> [B, G]`` per-row loss weights, called with
    the same options as the estimator; it is kept as ``fn.row_weights`` (a plug-in estimator sets that itself).
    ``check``, when given, is kept as ``fn.check`` and called at config load with the options it names (defaults
    filled in); it raises a UserError naming ``advantage.options.<key>`` for a value out of range
    (:func:`check_values`).
    An estimator that gives groups of one row (``trainer.group_size=1``) a useful advantage declares
    ``fn.allows_single = True``; otherwise the config load refuses G < 2 (ngrpo, stratified and spo do).
    """

    def deco(fn: Estimator) -> Estimator:
        if weights is not None:
            fn.row_weights = weights  # type: ignore[attr-defined]
        if check is not None:
            fn.check = check  # type: ignore[attr-defined]
        return ESTIMATORS.register(name)(fn)

    return deco


def register_shaping(name: str) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator: register an elementwise reward shaping ``fn(rewards [...], **options) -> [...]``."""
    return SHAPERS.register(name)


def _checked(fn: Callable[..., torch.Tensor], kind: str, name: str) -> Callable[..., torch.Tensor]:
    """``fn`` with its keyword options checked: an unknown option is a UserError naming the valid ones."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return fn
    allowed = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]

    @functools.wraps(fn)
    def call(rewards: torch.Tensor, **options: Any) -> torch.Tensor:
        for key in options:
            if key not in allowed:
                hint = nearest(key, allowed)
                raise UserError(
                    f"{kind} {name!r} has no option {key!r}; valid options: {', '.join(allowed) or '(none)'}"
                    + (f" (did you mean {hint!r}?)" if hint else "")
                )
        return fn(rewards, **options)

    return call


def get_estimator(name: str) -> Estimator:
    """The estimator ``name``: ``fn(rewards [B, G], **options) -> [B, G]`` (unknown options raise UserError)."""
    return _checked(ESTIMATORS.get(name), "estimator", name)


def _unit_weights(rewards: torch.Tensor, **options: Any) -> torch.Tensor:
    """Every row weighs 1: ``[B, G]`` ones (fp32)."""
    return torch.ones(rewards.shape, dtype=torch.float32, device=rewards.device)


def get_row_weights(name: str) -> Callable[..., torch.Tensor]:
    """Per-row loss weights of estimator ``name``: ``fn(rewards [B, G], **options) -> [B, G]`` (default ones)."""
    return getattr(ESTIMATORS.get(name), "row_weights", _unit_weights)  # unknown name: UserError listing known


def has_row_weights(name: str) -> bool:
    """Whether estimator ``name`` weighs its rows (``fn.row_weights``, MC-GRPO's pivot), not every row 1."""
    return get_row_weights(name) is not _unit_weights


def get_shaping(name: str) -> Callable[..., torch.Tensor]:
    """The reward shaping ``name``: elementwise ``fn(rewards [...], **options) -> [...]``."""
    return _checked(SHAPERS.get(name), "shaping", name)


def estimator_options(name: str, options: dict[str, Any], where: str) -> dict[str, Any]:
    """At config load: ``advantage.options`` checked against estimator ``name``'s signature (did-you-mean UserError
    naming ``advantage.options.x``; the trainer's inputs such as ``keys`` are not options) and type-converted."""
    fn = ESTIMATORS.get(name)
    what = f"estimator {name!r}"
    opts = check_options(
        fn, options, what=what, prefix="advantage.options", where=where, skip=1, inputs=ESTIMATOR_INPUTS
    )
    check_values(fn, opts)
    return opts


def shaping_options(name: str, options: dict[str, Any], where: str) -> dict[str, Any]:
    """At config load: ``advantage.shaping_options`` checked against shaping ``name``'s signature, then its values
    (``fn.check``, :func:`check_values`)."""
    fn = SHAPERS.get(name)
    opts = check_options(
        fn, options, what=f"shaping {name!r}", prefix="advantage.shaping_options", where=where, skip=1
    )
    check_values(fn, opts)
    return opts


def finite(key: str, value: Any, rule: str, low: float | None = None, strict: bool = True) -> None:
    """UserError (:func:`bad_option`, ``key=value: rule``) unless ``value`` is a finite number, above ``low``
    (strictly, or at least ``low`` with ``strict=False``) when ``low`` is given."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if not ok:
        raise bad_option(key, value, rule)


def check_eps(eps: float = 1e-6) -> None:
    """``advantage.options.eps``: a finite number > 0 (0 lets a zero std divide, a negative one flips it)."""
    finite("advantage.options.eps", eps, "must be a finite number > 0 (it guards the division by the group std and "
           "is the tolerance of the zero-variance test); e.g. advantage.options.eps=1e-6", low=0.0)  # fmt: skip
