"""YAML as configs, overrides and ``key=value`` options are read: PyYAML's safe loader with YAML 1.2's numbers.

PyYAML implements YAML 1.1, whose number rules surprise: ``run.seed=010`` is octal (8), ``1:30`` is sexagesimal
(90), and ``3e-1`` (no dot) is a string, so ``loss.options.clip_high=3e-1`` reached ``config.yaml`` as text. Here a
decimal integer is decimal whatever its leading zeros, ``0o`` / ``0x`` mark octal / hexadecimal, a float needs no
dot (``3e-1``, ``1e6``), and ``.inf`` / ``.nan`` keep their meaning (the schema refuses them where a number must be
finite). Booleans keep YAML 1.1's words (yes / no / on / off), which the schema names when a string was meant.

A key given twice in one mapping is an error (:class:`DuplicateKeyError`; PyYAML keeps the last silently, so
``trainer: {lr: 1.0e-4, lr: 5.0e-1}`` trained at 0.5), and :func:`yaml_error_message` turns it or a syntax error
into a paragraph naming the source, line and column, followed by the offending lines with a caret under the spot.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from mmgrpo.core.errors import UserError

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


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A key given twice in one mapping: ``path`` its dotted key, ``first`` / ``problem_mark`` its two places."""

    def __init__(self, path: str, first: yaml.Mark, second: yaml.Mark) -> None:
        super().__init__(problem=f"the key {path!r} is given twice", problem_mark=second)
        self.path, self.first = path, first


_MERGE = "tag:yaml.org,2002:merge"


def _no_duplicate_keys(node: yaml.Node, path: str, checked: set[int] | None = None) -> None:
    """Raise :class:`DuplicateKeyError` for a key given twice in one mapping under ``node``; each node is checked
    once (``checked``: an alias shares its anchor's node, which may hold itself or be shared many times)."""
    checked = set() if checked is None else checked
    if id(node) in checked:
        return
    checked.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[tuple[str, str], yaml.Mark] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE:  # ``<<: *base`` may be overridden: not here
                name = f"{path}.{key.value}" if path else str(key.value)
                if (key.tag, key.value) in seen:
                    raise DuplicateKeyError(name, seen[key.tag, key.value], key.start_mark)
                seen[key.tag, key.value] = key.start_mark
                _no_duplicate_keys(value, name, checked)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _no_duplicate_keys(item, f"{path}.{i}" if path else str(i), checked)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2's numbers (see the module docstring); a key given twice in one mapping raises
    :class:`DuplicateKeyError` instead of keeping the last."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _no_duplicate_keys(node, "")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def yaml_error_message(error: yaml.YAMLError, source: str, text: str) -> str:
    """``error`` (raised by :func:`load_yaml` on ``text``) as a message: one paragraph naming ``source`` (e.g.
    "config file 'x.yaml'"), the line and the column, then each line it points at with a caret under the spot."""
    lines = text.splitlines()
    if isinstance(error, DuplicateKeyError):
        first, second = error.first, error.problem_mark
        places = (
            f"on line {first.line + 1} (columns {first.column + 1} and {second.column + 1})"
            if first.line == second.line
            else f"at line {first.line + 1} and at line {second.line + 1}"
        )
        head = (f"{source}: the key {error.path!r} is given twice, {places} (YAML would keep only the last, "
                "silently); remove one of them")  # fmt: skip
        return head + _snippet(lines, [first, second])
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return f"{source} is not valid YAML: {error}"
    mark, context = error.problem_mark, error.context_mark
    at = "at its end" if mark.line >= len(lines) else f"line {mark.line + 1}, column {mark.column + 1}"
    head = f"{source} is not valid YAML: {at}: {error.problem}"
    if error.context and context is not None:
        head += f" ({error.context} that starts at line {context.line + 1}, column {context.column + 1})"
    elif error.context:
        head += f" ({error.context})"
    head += (
        "; the mistake is there or just before it (an unclosed quote or bracket, a colon without a space after it, a "
        "value starting with a character YAML reserves such as @ or `, or a tab in the indentation)"
    )
    return head + _snippet(lines, [m for m in (context, mark) if m is not None])


def _snippet(lines: list[str], marks: list[yaml.Mark]) -> str:
    """The lines of ``marks`` in order, each followed by a line with a caret under each mark's column (a mark past
    the last line, the end of the text, points at the end of the last line)."""
    carets: dict[int, set[int]] = {}
    for m in marks:
        line, column = m.line, m.column
        if line >= len(lines):  # the end of the text (an unclosed quote or bracket)
            line = len(lines) - 1
            column = len(lines[line]) if line >= 0 else 0
        if line >= 0:
            carets.setdefault(line, set()).add(column)
    width = len(str(max(carets, default=0) + 1))
    out = []
    for line in sorted(carets):
        under = "".join("^" if c in carets[line] else " " for c in range(max(carets[line]) + 1))
        out += [f"  {line + 1:>{width}} | {lines[line].replace(chr(9), ' ')}", f"  {'':>{width}} | {under}"]
    return "".join("\n" + row for row in out)


def option_value(raw: str, what: str, as_string: str) -> Any:
    """The value of a ``key=value`` given on a command line (``what``: that argument, for errors; ``as_string``: the
    same argument with the value quoted), read as the config's overrides read theirs: a YAML scalar, list or
    mapping; text that YAML does not read (a prompt with ': ' in it, "[cinematic] a cat") is that text, but a list
    or mapping left unclosed (``[0.9,``) is its YAML error, and duplicate keys are refused. ``mmgrpo train``'s
    overrides, ``mmgrpo sample --reward-option`` and ``mmgrpo serve-reward --option`` all read values here."""
    try:
        return load_yaml(raw) if raw.strip() else ""
    except DuplicateKeyError as e:
        raise UserError(yaml_error_message(e, f"the value of {what}", raw)) from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        unclosed = mark is not None and mark.index >= len(raw.rstrip())  # the text ended inside the list / mapping
        if raw.lstrip().startswith(("[", "{")) and unclosed:  # a list or mapping meant: its error, not a string
            raise UserError(
                yaml_error_message(e, f"the value of {what}", raw)
                + f"\n(to give that text as a string, quote it: {as_string})"
            ) from e
        return raw


def dump_yaml(data: Any, **kwargs: Any) -> str:
    """``yaml.safe_dump`` whose output :func:`load_yaml` reads back as the same values."""
    return yaml.dump(data, Dumper=_Dumper, **kwargs)
