"""Install a plug-in distribution the way a user's ``pip install`` would, for tests of entry points."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def installed(src: Path, target: Path) -> Iterator[Path]:
    """``pip install`` the distribution in ``src`` (no deps, no index) into ``target``, on sys.path while inside."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
           "--target", str(target), str(src)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install {src} failed:\n{proc.stderr}")
    sys.path.insert(0, str(target))
    try:
        yield target
    finally:
        sys.path.remove(str(target))
