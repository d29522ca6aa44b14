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

Sharded checkpoints (FSDP2: parameters, optimizer moments and EMA shadows are DTensors, each rank holding a slice)
are written by :func:`save_sharded_checkpoint`, called on every rank, with the same protocol: every rank writes its
slices with torch's distributed checkpoint into ``shards/`` of the shared temp folder (safetensors files, each
slice's offsets in the file's header: ``torch.distributed.checkpoint.HuggingFaceStorageWriter``), rank 0 writes
``tensors.safetensors`` (the unsharded tensors) and ``state.json`` (the sharded ones as ``{"__sharded__": key,
"shape", "dtype", "placements"}`` stubs), the ranks hash the files between them, and rank 0 writes the marker (with
``"sharded": {"world_size": N}`` and a SHA-256 for every file, shards included) and renames the folder only after
every rank has finished writing. Loading verifies every file the marker names (and that ``shards/`` holds no other
tensor file); in a process group (:func:`load_checkpoint` with ``mesh``) each rank reads only its slices, on any
number of ranks (torch resharding), and without one the shards are assembled into full tensors, so ``mmgrpo sample``,
``export`` and an unsharded resume read a sharded checkpoint like any other.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DeviceMesh, DTensor, Replicate, Shard

from mmgrpo.core.errors import UserError

_STEP_DIR = re.compile(r"^step_(\d+)$")
_COMPLETE = "COMPLETE"
_FILES = ("tensors.safetensors", "state.json")
SHARDS = "shards"


class CorruptCheckpoint(Exception):
    """A checkpoint folder whose files do not match its completion marker (the message names the file)."""


def flatten_state(
    obj: Any, prefix: str, tensors: dict[str, torch.Tensor], sharded: dict[str, DTensor] | None = None
) -> Any:
    """Replace every tensor in a nested dict/list with a ``{"__tensor__": key}`` stub, collecting tensors; with
    ``sharded``, a DTensor becomes a ``{"__sharded__": key, ...}`` stub and is collected there."""
    if isinstance(obj, DTensor):
        if sharded is None:
            raise TypeError(f"{prefix!r} is a sharded tensor (DTensor): save it with save_sharded_checkpoint")
        key = prefix or "_"
        sharded[key] = obj.detach()
        placements = [_placement_name(p) for p in obj.placements]
        return {"__sharded__": key, "shape": list(obj.shape), "dtype": str(obj.dtype)[6:], "placements": placements}
    if isinstance(obj, torch.Tensor):
        key = prefix or "_"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), flatten_state(v, f"{prefix}/{k}", tensors, sharded)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, f"{prefix}/{i}", tensors, sharded) for i, v in enumerate(obj)]
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
        if "__sharded__" in obj:
            return tensors[obj["__sharded__"]]
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


def save_sharded_checkpoint(root: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """:func:`save_checkpoint` for a state holding DTensors, called on every rank of the default process group.

    Each rank writes its slices of every DTensor into ``shards/`` of one temp folder (named by rank 0); rank 0
    writes the rest; the files are hashed (each rank a share); rank 0 writes the marker and renames the folder
    into place only after all of that (the ranks wait for it, so none goes on before the checkpoint exists)."""
    root = Path(root)
    rank, world = dist.get_rank(), dist.get_world_size()
    name = [f".tmp-{step_dir_name(step)}-{os.getpid()}"]
    dist.broadcast_object_list(name, src=0)
    tmp, final = root / name[0], root / step_dir_name(step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / SHARDS).mkdir(parents=True)
    dist.barrier()
    tensors: dict[str, torch.Tensor] = {}
    sharded: dict[str, DTensor] = {}
    skeleton = flatten_state(state, "", tensors, sharded)
    # returns on every rank only once all ranks have written (and fsynced) their files
    dcp.save(sharded, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True))
    if rank == 0:
        save_file(tensors, str(tmp / "tensors.safetensors"))
        (tmp / "state.json").write_text(json.dumps(skeleton))
    dist.barrier()
    names = [sorted(f.relative_to(tmp).as_posix() for f in tmp.rglob("*") if f.is_file()) if rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    mine = {n: _digest(tmp / n) for i, n in enumerate(names[0]) if i % world == rank}
    digests: list[Any] = [None] * world
    dist.all_gather_object(digests, mine)
    if rank == 0:
        files = {n: d for part in digests for n, d in part.items()}
        marker = {"step": step, "sharded": {"world_size": world}, "files": dict(sorted(files.items()))}
        (tmp / _COMPLETE).write_text(json.dumps(marker))
        _fsync_files(tmp)
        _fsync_files(tmp / SHARDS)
        _fsync_dir(tmp / SHARDS)
        _fsync_dir(tmp)
        if final.exists():
            remove_checkpoint(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(root, keep)
    dist.barrier()
    return final


def is_sharded(path: str | Path) -> bool:
    """Whether the checkpoint at ``path`` was written by :func:`save_sharded_checkpoint`."""
    try:
        marker = json.loads((Path(path) / _COMPLETE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and bool(marker.get("sharded"))


def _placement_name(p: Any) -> str:
    if isinstance(p, Shard):
        return f"S{p.dim}"
    if isinstance(p, Replicate):
        return "R"
    raise TypeError(f"cannot checkpoint a DTensor placed as {p!r}; only Shard(d) and Replicate()")


def _placement(name: str) -> Shard | Replicate:
    return Replicate() if name == "R" else Shard(int(name[1:]))


def _sharded_stubs(obj: Any, out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(obj, dict):
        if "__sharded__" in obj:
            out.append(obj)
        else:
            for v in obj.values():
                _sharded_stubs(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _sharded_stubs(v, out)
    return out


def _load_shards(folder: Path, stubs: list[dict[str, Any]], mesh: DeviceMesh | None) -> dict[str, torch.Tensor]:
    """The sharded tensors of a checkpoint: this rank's slices as DTensors on ``mesh``, or (no mesh) full tensors
    assembled from every rank's slices in this process."""
    out: dict[str, torch.Tensor] = {}
    for st in stubs:
        dtype = getattr(torch, st["dtype"])
        if mesh is None:
            out[st["__sharded__"]] = torch.empty(st["shape"], dtype=dtype)
            continue
        placements = [_placement(x) for x in st["placements"]]
        if len(placements) != mesh.ndim:
            raise UserError(
                f"{folder.parent}: {st['__sharded__']} was sharded over a {len(placements)}-dimensional device mesh, "
                f"this run has a {mesh.ndim}-dimensional one; resume with the accelerate config that wrote it"
            )
        out[st["__sharded__"]] = torch.distributed.tensor.empty(
            st["shape"], dtype=dtype, device_mesh=mesh, placements=placements
        )
    with warnings.catch_warnings():  # without a mesh: one process on purpose, which torch would warn about
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(out, storage_reader=dcp.HuggingFaceStorageReader(str(folder)), no_dist=mesh is None)
    return out


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


def verify_checkpoint(path: str | Path) -> bool:
    """Raise :class:`CorruptCheckpoint` unless every file matches the SHA-256 and size in the completion marker;
    True when the marker holds hashes.

    Checkpoints written before markers held hashes (the marker is the bare step number) are checked for presence
    here (False), and for parseability by :func:`latest_valid_checkpoint`."""
    path = Path(path)
    try:
        marker = json.loads((path / _COMPLETE).read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{path}: unreadable completion marker {_COMPLETE} ({e})") from e
    files = marker.get("files") if isinstance(marker, dict) else None
    for name in [*_FILES, *(n for n in files or {} if n not in _FILES)]:  # a sharded one's shards/ files too
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
    if files is not None and marker.get("sharded"):  # the shard reader reads every tensor file in shards/
        extra = sorted(f"{SHARDS}/{f.name}" for f in (path / SHARDS).glob("*") if f"{SHARDS}/{f.name}" not in files)
        if extra:
            raise CorruptCheckpoint(f"{path}: {extra[0]} is not in the completion marker (a file was added)")
    return files is not None


def latest_valid_checkpoint(root: str | Path) -> tuple[Path | None, list[str]]:
    """(newest checkpoint under ``root`` that verifies, or None; one note per newer checkpoint that did not)."""
    notes = []
    for path in reversed(list_checkpoints(root)):
        try:
            if not verify_checkpoint(path):  # a legacy marker carries no hashes: parseable too (reads it whole; with
                load_checkpoint(path, verify=False)  # hashes, every rank of a sharded resume would join all shards)
        except CorruptCheckpoint as e:
            notes.append(str(e))
            continue
        return path, notes
    return None, notes


def load_checkpoint(path: str | Path, verify: bool = True, mesh: DeviceMesh | None = None) -> dict[str, Any]:
    """The nested state saved at ``path``; with ``verify``, the files are checked against the marker first.

    A sharded checkpoint's DTensors come back as full tensors, or, with ``mesh`` (called on every rank of a sharded
    run), as DTensors on ``mesh`` holding this rank's slices, read from the shards (resharded when the number of
    ranks changed)."""
    path = Path(path)
    if not path.is_dir() or not any((path / name).exists() for name in (_COMPLETE, *_FILES)):
        raise UserError(f"'{path}' is not a checkpoint folder (it holds none of {_COMPLETE}, {', '.join(_FILES)}); a "
                        "run's checkpoints are the folders checkpoints/step_NNNNNN of its run directory")  # fmt: skip
    if verify:
        verify_checkpoint(path)
    try:
        tensors = load_file(str(path / "tensors.safetensors"))
        skeleton = json.loads((path / "state.json").read_text())
        stubs = _sharded_stubs(skeleton, [])
        if stubs:
            tensors.update(_load_shards(path / SHARDS, stubs, mesh))
        return unflatten_state(skeleton, tensors)
    except UserError:
        raise
    except Exception as e:  # safetensors / JSON errors of a damaged file, named instead of a raw traceback
        raise CorruptCheckpoint(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
