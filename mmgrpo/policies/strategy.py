"""Registered strategy objects that own their options (diffusion objectives, exploration schedules).

A strategy class is registered under a name and carries ``Options``, its option dataclass, whose first field is
``name``. In YAML the strategy is a nested block::

    exploration: {name: window, size: 4, shift_every: 25}
    objective: nft                      # a bare name = that strategy with its default options

:func:`resolve_options` turns such a value into the strategy's options dataclass, strictly (an unknown key is a
did-you-mean error, and a key that belongs to another strategy of the registry says which), so a config is checked
when it is loaded, before any model is. The policy then builds the strategy with ``cls(options)``.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

from mmgrpo.core.errors import UserError
from mmgrpo.core.registry import Registry
from mmgrpo.core.schema import from_dict


class Strategy(abc.ABC):
    """A registered part with its own options: ``Options`` is the dataclass of its YAML block (field ``name``).

    Abstract: each kind (exploration schedule, diffusion objective) declares the methods its strategies implement.
    """

    Options: ClassVar[type]

    def __init__(self, options: Any):
        self.opts = options


def _foreign_key_hint(registry: Registry[Any], name: str, keys: list[str], prefix: str) -> None:
    """A key of another strategy in this block: say which strategies own it instead of a bare 'unknown key'."""
    own = {f.name for f in dataclasses.fields(registry.get(name).Options)}
    for key in keys:
        if key in own:
            continue
        owners = [n for n in registry.names() if key in {f.name for f in dataclasses.fields(registry.get(n).Options)}]
        if owners:
            raise UserError(
                f"{prefix}.{key}: {registry.kind} {name!r} has no option {key!r}; it is an option of "
                f"{' and '.join(owners)}: use {prefix.rsplit('.', 1)[-1]}={' or '.join(owners)} or drop {key}"
            )


def resolve_options(registry: Registry[Any], value: Any, prefix: str, where: str = "the config") -> Any:
    """The options dataclass of the strategy that ``value`` names.

    ``value`` is a name (``"full"``), a mapping ``{name: ..., **options}`` or an options instance already built;
    ``prefix`` is the dotted key of the block (``policy.options.exploration``) that errors name.
    """
    if isinstance(value, str):
        value = {"name": value}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = registry.get(getattr(value, "name", ""))
        if isinstance(value, cls.Options):
            return value
        raise UserError(f"{prefix}: {type(value).__name__} is not the options of {registry.kind} {value.name!r} "
                        f"({cls.Options.__name__})")  # fmt: skip
    if isinstance(value, dict) and "name" not in value:  # options given alone, e.g. by a KEY=VALUE override
        keys = list(value)
        fields = {n: {f.name for f in dataclasses.fields(registry.get(n).Options)} for n in registry.names()}
        owners = [n for n, f in fields.items() if set(keys) <= f]
        fix = (f"add {prefix}.name={owners[0]}" + (f" (or {' or '.join(owners[1:])})" if owners[1:] else "")
               if owners else f"no {registry.kind} takes all of them")  # fmt: skip
        raise UserError(
            f"{prefix} in {where} gives options ({', '.join(keys)}) but no {registry.kind} name: {fix}; known: "
            f"{', '.join(registry.names())}"
        )
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise UserError(
            f"{prefix} in {where}: expected a name or a mapping with its name and options, e.g. "
            f"{{name: {registry.names()[0]}}}, got {value!r}; known: {', '.join(registry.names())}"
        )
    try:
        cls = registry.get(value["name"])
    except UserError as e:
        raise UserError(f"{prefix}.name in {where}: {e}") from e
    _foreign_key_hint(registry, value["name"], list(value), prefix)
    return from_dict(cls.Options, value, where, prefix=prefix)
