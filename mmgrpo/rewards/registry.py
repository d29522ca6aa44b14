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
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from mmgrpo.core.errors import UserError
from mmgrpo.core.registry import Registry

ENTRY_POINT_GROUP = "mmgrpo.rewards"
REWARDS: Registry[Callable[..., Any]] = Registry("reward", plugins="rewards")


def register(name: str, description: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a reward factory under ``name``."""
    return REWARDS.register(name, description)


def is_factory(obj: Any) -> bool:
    """A factory takes only options; a reward callable takes (samples, prompts, meta, ctx)."""
    try:
        params = [
            p
            for p in inspect.signature(obj).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
    except (TypeError, ValueError):
        return False
    return len(params) < 4


def resolve(name: str) -> Callable[..., Any]:
    """The factory (or plain reward callable) registered, published by entry point, or importable as ``name``."""
    return REWARDS.get(name)  # the registry also resolves entry points and dotted paths


def get(name: str, **options: Any) -> Callable[..., Any]:
    """Build the reward callable ``name`` with ``options``."""
    obj = resolve(name)
    if is_factory(obj):
        try:
            fn = obj(**options)
        except TypeError as e:
            raise UserError(f"reward {name!r}: bad options {options} ({e})") from e
        return fn
    if options:
        raise UserError(f"reward {name!r} is a plain callable and takes no options; got {sorted(options)}")
    return obj


def available() -> dict[str, str]:
    """Every known reward name (built-in and entry-point) with its one-line description."""
    return {n: REWARDS.describe(n) for n in REWARDS.names()}
