"""Reading the rows of a data file (JSONL, JSON, CSV) so that every bad one is a UserError naming the file and the
line, never a silently changed value: the one place that parses a dataset's text (docs/data.md).

JSON is parsed strictly: a repeated key (``{"answer": "a", "answer": "b"}``, where ``json.loads`` silently keeps the
last), a non-finite number (``NaN``, ``Infinity``, ``1e999``, which Python's ``json`` accepts but no other JSON
reader does, and which would reach a reward or a box), an integer too large for a float (``1`` and 400 zeros:
``float()`` raised an OverflowError at a box; past 4300 digits ``int`` raises a bare ValueError) and nesting deeper
than Python's parser recurses (a RecursionError) are errors. Lines are split at ``\\n``, ``\\r\\n`` and ``\\r``
only, never at the Unicode line separators that ``str.splitlines`` also splits at (U+2028 is legal inside a JSON
string, and ``json.dumps(..., ensure_ascii=False)`` writes it as is). CSV is parsed strictly too: a repeated column
name, a row with more or fewer fields than the header and an unterminated quote are errors. The rows of a Hugging
Face dataset (``hf:``), which arrive as Python values and not as text, get the same check of their numbers
(:func:`check_finite_row`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import re
from typing import Any

from mmgrpo.core.errors import UserError, quoted


def text_lines(text: str) -> list[str]:
    """The lines of ``text``, split at ``\\n``, ``\\r\\n`` or ``\\r`` only (so line numbers match an editor's)."""
    return re.split(r"\r\n|\r|\n", text)


class _BadJSON(ValueError):
    """A JSON value that parses but must not be read: a repeated key or a non-finite number."""


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _BadJSON(f"the key {quoted(k, 60)} appears twice in one object (JSON keeps only the last); "
                           "remove one")  # fmt: skip
        out[k] = v
    return out


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadJSON(f"the number {quoted(text, 40)} is not finite; write a finite number")
    return value


def _integer(text: str) -> int:
    """An integer that a float can hold (boxes, weights and rewards are floats); a longer one is refused here, before
    ``int`` reads it (past 4300 digits ``int`` raises a bare ValueError)."""
    shown = text if len(text) <= 40 else f"{text[:20]}... ({len(text.lstrip('-'))} digits)"
    too_large = _BadJSON(f"the integer {shown} is too large for a float; write a number below 1e308")
    if len(text) > 320:  # 10**308 has 309 digits: this one cannot fit, and is not read
        raise too_large
    value = int(text)
    try:
        float(value)
    except OverflowError:
        raise too_large from None
    return value


def _constant(name: str) -> float:
    raise _BadJSON(f"{name} is not a JSON number (and not finite); write a finite number, or null for none")


_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_repeated_keys, parse_float=_finite, parse_int=_integer, parse_constant=_constant
)


def parse_json(text: str, where: str, pos: int = 0, torn: bool = False, fix: str = "") -> tuple[Any, int]:
    """(value, end) of the JSON value in ``text`` at ``pos``; a UserError naming ``where`` when it is not valid,
    repeats a key, holds a non-finite number or one too large for a float, or nests too deeply (``torn``: invalid
    JSON there is a file's unterminated last line; ``fix`` ends the message of invalid JSON)."""
    try:
        return _DECODER.raw_decode(text, pos)
    except _BadJSON as e:
        raise UserError(f"{where}: {e}") from None
    except json.JSONDecodeError as e:
        cut = " (the file's last line, with no line end: it looks cut off; was the file written completely?)"
        raise UserError(f"{where} is not valid JSON ({e.msg}, column {e.colno}){cut if torn else ''}{fix}") from None
    except RecursionError:  # ~1000 levels of [ or {: the parser recurses once a level
        raise UserError(f"{where}: the JSON nests lists or objects too deeply to read (more levels than Python's "
                        "recursion limit); flatten the value") from None  # fmt: skip
    except ValueError as e:  # any other number or value the parser refuses: named, never a bare traceback
        raise UserError(f"{where} cannot be read as JSON ({quoted(str(e), 120)}){fix}") from None


def jsonl_rows(text: str, name: str) -> list[tuple[str, Any]]:
    """(``"NAME line N"``, value) of every non-blank line of a JSONL text; a line that is not one JSON value is a
    UserError naming it (a cut-off last line says that the file looks truncated)."""
    lines = text_lines(text)
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{name} line {i + 1}"
        start, torn = len(line) - len(line.lstrip()), i == len(lines) - 1
        fix = "; a .jsonl file holds one JSON object a line"
        if not out and line.strip() in ("[", "{") or line.strip().startswith("[{"):
            fix += (" (this one looks like pretty-printed JSON: name a list of objects .json, or write one object a "
                    "line, e.g. jq -c '.[]' IN.json > OUT.jsonl)")  # fmt: skip
        value, end = parse_json(line, where, start, torn, fix)
        if not out and isinstance(value, list) and all(isinstance(v, dict) for v in value) and len(lines) <= 2:
            raise UserError(f"{where} holds a JSON list of {len(value)} object(s): the file is one JSON list, which "
                            "a .json file holds; rename it to .json (or write one object a line)")  # fmt: skip
        if line[end:].strip() == ",":
            raise UserError(f"{where} ends with ',' after its object; a .jsonl file has no commas between lines "
                            "(a list of objects [{...}, {...}] belongs in a .json file)")  # fmt: skip
        if line[end:].strip():
            raise UserError(f"{where} holds more than one JSON value ({quoted(line[end:].strip(), 40)} after the "
                            "first); a .jsonl file holds one JSON object a line")  # fmt: skip
        out.append((where, value))
    return out


def json_list_rows(text: str, name: str) -> list[tuple[str, Any]]:
    """(``"NAME line N"``, item) of each item of a .json file holding one list (N: the line its item starts on);
    another top-level value (an object, a number) is a UserError saying that a list is expected."""
    ws = re.compile(r"\s*")
    i = ws.match(text, 0).end()
    if i == len(text):
        return []
    if text[i] != "[":
        top, _ = parse_json(text, name, i)
        keys = f" with the keys {quoted(sorted(top), 80)}" if isinstance(top, dict) else ""
        raise UserError(f"{name} holds a JSON {type(top).__name__}{keys}, not a list; a .json data file is one list "
                        "of examples [{...}, {...}] (or write a .jsonl file, one object a line)")  # fmt: skip
    out: list[tuple[str, Any]] = []
    i = ws.match(text, i + 1).end()
    line, counted = 1, 0  # the line of text[counted]
    while i < len(text) and text[i] != "]":
        # the line ends since the previous item (counted from the start for each item: 39 s for 40k items)
        line, counted = line + text.count("\n", counted, i), i
        where = f"{name} line {line}"
        value, i = parse_json(text, where, i)
        out.append((where, value))
        i = ws.match(text, i).end()
        if i < len(text) and text[i] == ",":
            i = ws.match(text, i + 1).end()
        elif i < len(text) and text[i] != "]":
            raise UserError(f"{name} line {text.count(chr(10), 0, i) + 1} is not valid JSON (a ',' or ']' expected "
                            "between the list's items)")  # fmt: skip
    if i >= len(text):
        raise UserError(f"{name} ends before its list is closed with ']'; it looks cut off (was the file written "
                        "completely?)")  # fmt: skip
    if text[i + 1 :].strip():
        raise UserError(f"{name} line {text.count(chr(10), 0, i) + 1}: text after the list's closing ']'; a .json "
                        "data file is one list")  # fmt: skip
    return out


def csv_rows(text: str, name: str) -> tuple[list[str], list[tuple[str, dict[str, str]]]]:
    """(header, [(``"NAME line N"``, row)]) of a CSV text with a header line; a repeated column name, a row with
    more or fewer fields than the header or an unterminated quote is a UserError naming the line."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[str, dict[str, str]]] = []
    header: list[str] | None = None
    try:
        for fields in reader:
            where = f"{name} line {reader.line_num}"
            if header is None:
                header = fields
                repeated = sorted({h for h in header if header.count(h) > 1})
                if repeated:
                    raise UserError(f"{where}: the header names the column(s) {quoted(repeated)} twice; give every "
                                    "column its own name")  # fmt: skip
                continue
            if not any(f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise UserError(f"{where} has {len(fields)} field(s) but the header {quoted(header, 80)} has "
                                f"{len(header)}; quote fields that hold a comma (\"a, b\")")  # fmt: skip
            rows.append((where, dict(zip(header, fields))))
    except csv.Error as e:
        raise UserError(f"{name} line {reader.line_num} is not valid CSV ({e}); close every quoted field with "
                        '" and write a quote inside one as ""') from e  # fmt: skip
    return header or [], rows


def _non_finite(value: Any, path: str) -> tuple[str, Any] | None:
    """(where inside a value, the number) of the first NaN or infinite number in ``value`` (lists, tuples and dicts
    are searched), or None."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return None if math.isfinite(value) else (path, value)
    if isinstance(value, dict):
        items: Any = ((f"{path}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((found for p, v in items if (found := _non_finite(v, p)) is not None), None)


def check_finite_row(row: dict, where: str) -> None:
    """A UserError naming ``where`` (``"hf:NAME row N"``) and the column when a value of a dataset row (a float
    column, or a number inside a list or struct column) is NaN or infinite: what a JSON file may not hold
    (:func:`parse_json`) and a dataset's float column can (a missing value written as NaN), which would reach a
    reward or a box as is."""
    for column, value in row.items():
        found = _non_finite(value, "")
        if found is not None:
            inside, number = found
            at = f" at {inside}" if inside else ""
            raise UserError(f"{where}: column {quoted(column, 60)} holds {float(number)!r}{at}, which is not a finite "
                            "number; write a finite number, or None for a missing value (e.g. with Dataset.map), "
                            "or remove the row (Dataset.filter)")  # fmt: skip


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for an error message ("got a JSON array")."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def read_rows(text: str, name: str, suffix: str) -> list[tuple[str, Any]]:
    """(where, row) of the records of a data file's text by its ``suffix``: .jsonl, .json (a list) or .csv."""
    if suffix == ".jsonl":
        return jsonl_rows(text, name)
    if suffix == ".json":
        return json_list_rows(text, name)
    if suffix == ".csv":
        return csv_rows(text, name)[1]
    raise ValueError(f"no reader for {suffix!r}")
