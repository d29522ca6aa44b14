"""YAML as configs, overrides and ``key=value`` options are read: PyYAML's safe loader with YAML 1.2's numbers.

PyYAML implements YAML 1.1, whose number rules surprise: ``run.seed=010`` is octal (8), ``1:30`` is sexagesimal
(90), and ``3e-1`` (no dot) is a string, so ``loss.options.clip_high=3e-1`` reached ``config.yaml`` as text. Here a
decimal integer is decimal whatever its leading zeros, ``0o`` / ``0x`` mark octal / hexadecimal, a float needs no
dot (``3e-1``, ``1e6``), and ``.inf`` / ``.nan`` keep their meaning (the schema refuses them where a number must be
finite). Booleans keep YAML 1.1's words (yes / no / on / off), which the schema names when a string was meant.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


_INT_RE = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT_RE = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    """Quotes a string that the loader would read as a number (``'010'``, ``'3e-1'``), so it reads back a string."""


for _cls in (_Loader, _Dumper):
    _cls.yaml_implicit_resolvers = {
        first: [r for r in resolvers if r[0] not in (_INT, _FLOAT)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    _cls.add_implicit_resolver(_INT, _INT_RE, list("-+0123456789"))
    _cls.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))


def _int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")
    return int(text, 0) if text.lower().lstrip("+-").startswith(("0o", "0x")) else int(text, 10)


_Loader.add_constructor(_INT, _int)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2's numbers (see the module docstring)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)


def dump_yaml(data: Any, **kwargs: Any) -> str:
    """``yaml.safe_dump`` whose output :func:`load_yaml` reads back as the same values."""
    return yaml.dump(data, Dumper=_Dumper, **kwargs)
