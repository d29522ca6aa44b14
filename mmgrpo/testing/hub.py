"""A Hugging Face hub cache on disk, filled from local folders, so hub ids load offline in tests (no network).

The layout is huggingface_hub's own (``models--<org>--<name>/snapshots/<commit>/...`` and ``refs/<revision>``
holding the commit), so loading a hub id from it runs the real hub code path: revision resolution, the cache
lookup, ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def add_snapshot(cache: str | Path, repo_id: str, folder: str | Path, revision: str = "main") -> str:
    """Copy ``folder`` into the hub cache ``cache`` as ``repo_id`` at ``revision`` (a branch or tag name, which
    ``refs/`` points at the commit); returns the commit hash (40 hex digits, as the hub's)."""
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


@contextlib.contextmanager
def offline_hub(cache: str | Path) -> Iterator[Path]:
    """Inside: huggingface_hub reads the cache ``cache`` and never the network, as ``HF_HUB_CACHE=cache
    HF_HUB_OFFLINE=1`` would make it from the start (huggingface_hub reads both variables once, at import)."""
    from huggingface_hub import constants

    saved = (constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_CACHE"))
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(cache), True
    os.environ["HF_HUB_CACHE"] = str(cache)
    try:
        yield Path(cache)
    finally:
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = saved[0], saved[1]
        if saved[2] is None:
            os.environ.pop("HF_HUB_CACHE", None)
        else:
            os.environ["HF_HUB_CACHE"] = saved[2]
