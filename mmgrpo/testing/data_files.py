"""What the hostile-data tests share (``tests/data/test_hostile_*.py``): rows written as JSON lines, and the check
that a loader refuses a file with one UserError paragraph."""

from __future__ import annotations

import json
from typing import Any

from mmgrpo.core.errors import UserError


def jsonl(*rows: Any) -> str:
    """Rows as JSON lines; a str row is written as it is (a torn or hostile line)."""
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"


def raises(loader: Any, path: Any, match: str, *args: Any) -> str:
    """``loader(path, *args)`` raises a UserError matching ``match`` (no traceback text in it); -> its message."""
    import pytest  # a test dependency: imported when a test calls this

    with pytest.raises(UserError, match=match) as e:
        loader(path, *args)
    assert "Traceback" not in str(e.value)
    return str(e.value)
