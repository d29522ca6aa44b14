"""Atomic, verified, safetensors-only checkpoints.

A checkpoint is a folder ``checkpoints/step_000100/`` holding ``tensors.safetensors`` (every tensor),
``state.json`` (everything else) and the completion marker ``COMPLETE``: JSON with the step and the SHA-256 and
size of each file. It is written to ``checkpoints/.tmp-step_000100-<pid>/``, every file and the folder fsynced,
and renamed into place only when complete (the parent folder fsynced after the rename), so an interrupted write
leaves the previous checkpoint usable; a half-written temp folder is ignored (and cleaned up by the next save).
Loading checks every file against the marker: a truncated, emptied, deleted or bit-flipped file is a
:class:`CorruptCheckpoint` naming the file, and :func:`latest_valid_checkpoint` falls back to the newest
checkpoint that verifies. Pruning removes the marker (fsynced) before the files, so a kill mid-prune can never
leave a complete-looking folder without its tensors. Nothing is pickled: nested state (optimizer state, EMA,
reward curricula) is flattened into tensors + JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step_(\d+)$")
_COMPLETE = "COMPLETE"
_FILES = ("tensors.safetensors", "state.json")


class CorruptCheckpoint(Exception):
    """A checkpoint folder whose files do not match its completion marker (the message names the file)."""


def flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list with a ``{"__tensor__": key}`` stub, collecting tensors."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "_"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), flatten_state(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix!r}; only tensors and plain data")


def _key(k: Any) -> Any:
    if isinstance(k, (str, int)):
        return k
    raise TypeError(f"checkpoint dict keys must be str or int, got {k!r}")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: unflatten_state(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(root: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` (nested dict of tensors/plain data) atomically to ``root/step_XXXXXX``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_state(state, "", tensors)
    save_file(tensors, str(tmp / "tensors.safetensors"))
    (tmp / "state.json").write_text(json.dumps(skeleton))
    marker = {"step": step, "files": {name: _digest(tmp / name) for name in _FILES}}
    (tmp / _COMPLETE).write_text(json.dumps(marker))
    _fsync_files(tmp)
    _fsync_dir(tmp)
    if final.exists():
        remove_checkpoint(final)
    os.replace(tmp, final)
    _fsync_dir(root)  # the rename itself is durable only once the parent folder is synced
    _prune(root, keep)
    return final


def _digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"sha256": h.hexdigest(), "size": path.stat().st_size}


def _fsync_files(path: Path) -> None:
    for f in path.iterdir() if path.is_dir() else []:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder so that no crash point leaves it looking complete: the marker goes first."""
    marker = path / _COMPLETE
    if marker.exists():
        marker.unlink()
        _fsync_dir(path)
    shutil.rmtree(path, ignore_errors=True)


def _prune(root: Path, keep: int) -> None:
    for stale in root.glob(".tmp-*"):  # left by an interrupted save (ours was renamed already)
        shutil.rmtree(stale, ignore_errors=True)
    if keep <= 0:
        return
    for old in list_checkpoints(root)[:-keep]:
        remove_checkpoint(old)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / _COMPLETE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def verify_checkpoint(path: str | Path) -> None:
    """Raise :class:`CorruptCheckpoint` unless every file matches the SHA-256 and size in the completion marker.

    Checkpoints written before markers held hashes (the marker is the bare step number) are checked for presence
    and parseability only."""
    path = Path(path)
    try:
        marker = json.loads((path / _COMPLETE).read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{path}: unreadable completion marker {_COMPLETE} ({e})") from e
    files = marker.get("files") if isinstance(marker, dict) else None
    for name in _FILES:
        f = path / name
        if not f.is_file():
            raise CorruptCheckpoint(f"{path}: {name} is missing")
        if files is None:
            continue
        want = files.get(name) or {}
        got = _digest(f)
        if got["size"] != want.get("size"):
            raise CorruptCheckpoint(f"{path}: {name} has {got['size']} bytes, the marker says {want.get('size')}")
        if got["sha256"] != want.get("sha256"):
            raise CorruptCheckpoint(f"{path}: {name} does not match its SHA-256 (the file was altered or damaged)")


def latest_valid_checkpoint(root: str | Path) -> tuple[Path | None, list[str]]:
    """(newest checkpoint under ``root`` that verifies, or None; one note per newer checkpoint that did not)."""
    notes = []
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
            load_checkpoint(path, verify=False)  # parseable too (legacy markers carry no hashes)
        except CorruptCheckpoint as e:
            notes.append(str(e))
            continue
        return path, notes
    return None, notes


def load_checkpoint(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The nested state saved at ``path``; with ``verify``, the files are checked against the marker first."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    try:
        tensors = load_file(str(path / "tensors.safetensors"))
        skeleton = json.loads((path / "state.json").read_text())
        return unflatten_state(skeleton, tensors)
    except Exception as e:  # safetensors / JSON errors of a damaged file, named instead of a raw traceback
        raise CorruptCheckpoint(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
