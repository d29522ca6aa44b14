"""The run directory: where it may be, what overwrite may delete, what resume accepts, and metrics that survive.

- ``run.name`` is one plain path component (letters, digits, ``.``, ``_``, ``-``; not ``.``/``..``), so a run never
  lands outside ``run.output_dir``.
- A run directory carries the marker file ``.mmgrpo-run``; ``run.overwrite=true`` wipes only a folder that has it
  (never another project's folder that happens to have the same name). A new run whose build fails (a model path
  that does not load, a bad dataset) removes the directory it made, so the same command works once the cause is
  fixed; while a run builds, its directory (the marker alone) keeps a second run of the same name out. A new run
  that fails in its first step (a key its data lacks, non-finite rewards) removes the directory it made too:
  nothing was trained, and what it held (the config, the step-0 evaluation) the same command writes again (a
  directory reused by ``run.overwrite=true`` is kept, as is one with a ``debug/`` dump).
- ``resume=DIR`` continues from the newest checkpoint that verifies (a damaged newer one is skipped with a note);
  a run that stopped before its first checkpoint restarts from step 0. The config may change only in keys that
  do not change what the run computes (``RESUMABLE``), unless ``resume_force=true``; every other changed key is
  named with its old and new value.
- ``metrics.jsonl`` is rewritten atomically on resume (temporary file, fsync, rename), and a torn line left by a
  crash is dropped with a warning instead of breaking every later resume.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmgrpo.core.config_yaml import load_yaml
from mmgrpo.core.errors import UserError, quoted
from mmgrpo.core.files import remove_empty, write_atomic
from mmgrpo.train import checkpoint as ckpt
from mmgrpo.train.config import (
    Config,
    check_run_name,
    config_diff,
    dump_config,
    load_config,
    read_yaml,
    resolved_config,
    to_dict,
)

RUN_MARKER = ".mmgrpo-run"
STALE = ("metrics.jsonl", "checkpoints", "samples", "debug", "report.html", "reward_curve.png", "training_curves.png",
         "method_curves.png", "trackers.json", "wandb")  # fmt: skip
"""what a fresh (or overwritten) run starts without (and the TensorBoard folder ``<run.name>/``)"""
RESUMABLE = (
    "trainer.max_steps", "trainer.stop_after_steps", "trainer.time_budget_s", "trainer.time_budget_clock",
    "trainer.progress",
    "trainer.log_every", "trainer.eval_every", "trainer.sample_every", "trainer.checkpoint_every",
    "trainer.keep_checkpoints", "trainer.dump_advantages", "trainer.micro_batch_size", "trainer.micro_batch_units",
    "trainer.rollout_chunks", "trainer.log_with", "run.name", "run.output_dir", "run.overwrite", "resume",
    "resume_force", "policy.options.fps",  # the frame rate written samples play at: no sample changes
)  # fmt: skip
"""config keys a resume may change: how long, how often to log/evaluate/save, where metrics go besides
metrics.jsonl, how rows are chunked in memory"""


def prepare_run_dir(cfg: Config, is_main: bool = True) -> Path:
    """The run directory: ``resume`` if given (a run directory), else output_dir/name (new, or overwritable).

    A resume runs under its directory's name: ``cfg.run.name`` / ``run.output_dir`` are set to the directory's
    (the config it reuses may name another run; those keys are ``RESUMABLE``), so the progress bar, the trackers'
    run (TensorBoard's ``<run_dir>/<run.name>/``) and config.yaml go on under the name the run started with."""
    if cfg.resume:
        run_dir = _resume_dir(cfg.resume)
        cfg.run.name, cfg.run.output_dir = run_dir.name, str(run_dir.absolute().parent)
        return run_dir
    check_run_name(cfg.run.name, "the config")
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    if run_dir.exists() and any(run_dir.iterdir()):
        if not cfg.run.overwrite:
            raise UserError(
                f"run directory '{run_dir}' already exists; continue it with resume={run_dir}, "
                "pick another run.name=..., or set run.overwrite=true"
            )
        if not (run_dir / RUN_MARKER).is_file():
            raise UserError(
                f"run.overwrite=true only replaces an mmgrpo run directory (one holding {RUN_MARKER}); '{run_dir}' "
                "is not one, so nothing was deleted: pick another run.name or run.output_dir"
            )
    if is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"cannot create the run directory '{run_dir}' ({e.strerror or e}): run.output_dir="
                f"{cfg.run.output_dir!r} must be a folder you can write (or one that can be made)"
            ) from e
        for stale in (*STALE, cfg.run.name):  # run.name: TensorBoard's events (a run overwritten in place)
            p = run_dir / stale  # run.overwrite: start clean, never append to another run's metrics
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        (run_dir / RUN_MARKER).write_text("mmgrpo run directory: run.overwrite=true may replace it\n")
    return run_dir


def discard_unstarted(run_dir: Path, parents: Sequence[Path] = ()) -> None:
    """Remove ``run_dir`` if it holds the marker and nothing else: a new run that failed before it wrote anything;
    then ``parents`` (:func:`~mmgrpo.core.files.missing_parents`, before the run made them) while they are empty."""
    try:
        if [p.name for p in run_dir.iterdir()] == [RUN_MARKER]:
            (run_dir / RUN_MARKER).unlink()
            run_dir.rmdir()
            remove_empty(parents)
    except OSError:
        pass  # gone already, or something appeared in it: leave it


def discard_untrained(run_dir: Path, parents: Sequence[Path] = ()) -> bool:
    """Remove the directory of a new run that failed before its first step finished (no checkpoint, no
    ``debug/`` dump a user asked for to look at), then ``parents`` while they are empty; True when it was removed."""
    try:
        if not (run_dir / RUN_MARKER).is_file() or (run_dir / "debug").exists():
            return False
        if ckpt.list_checkpoints(run_dir / "checkpoints"):
            return False
        shutil.rmtree(run_dir)
    except OSError:
        return False
    remove_empty(parents)
    return True


def _resume_dir(resume: str) -> Path:
    run_dir = Path(resume)
    if run_dir.is_file():
        raise UserError(f"resume='{resume}' is a file; resume takes a run directory (runs/<name>, the folder holding "
                        "config.yaml and checkpoints/)")  # fmt: skip
    if not run_dir.is_dir():
        parent = run_dir.parent
        runs = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
        hint = f"; runs in {parent}/: {', '.join(runs[:20])}" if runs else ""
        raise UserError(f"resume directory '{resume}' not found{hint}")
    if not ckpt.list_checkpoints(run_dir / "checkpoints") and not (run_dir / RUN_MARKER).is_file():
        raise UserError(
            f"resume directory '{resume}' has no complete checkpoint under checkpoints/ and is not an mmgrpo run "
            "directory; it cannot be resumed (start a new run with another run.name)"
        )
    return run_dir


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` that verifies (notes about skipped ones are warned), or None: the run
    stopped before its first checkpoint and restarts from step 0."""
    path, notes = ckpt.latest_valid_checkpoint(run_dir / "checkpoints")
    for note in notes:
        warnings.warn(f"resume: skipping a damaged checkpoint: {note}", stacklevel=2)
    if path is None:
        had = bool(ckpt.list_checkpoints(run_dir / "checkpoints"))
        if had:
            raise UserError(
                f"resume directory '{run_dir}': no checkpoint under checkpoints/ verifies ({'; '.join(notes)}); "
                "the run cannot continue exactly. Start a new run (another run.name), or remove the damaged "
                "checkpoints to restart this one from step 0"
            )
        warnings.warn(
            f"resume: '{run_dir}' stopped before its first checkpoint; it restarts from step 0", stacklevel=2
        )
    return path


def check_resume_config(cfg: Config, run_dir: Path, force: bool) -> None:
    """Refuse a resume whose config changed what the run computes (seed, batch, model, rewards, ...)."""
    saved = run_dir / "config.yaml"
    if force or not saved.is_file():
        return
    try:  # a run written before config.yaml was resolved: as if it were
        old = resolved_config(load_config(saved, base=with_resumable_values(read_yaml(saved), cfg)))
    except UserError as e:
        raise UserError(
            f"resume={run_dir}: its config.yaml no longer loads ({e}); pass resume_force=true to resume anyway"
        ) from e
    added = options_added_since(saved, cfg)
    if added:
        shown = "; ".join(f"{k}: {quoted(v, 40)}" for k, v in added[:8])
        more = f" (and {len(added) - 8} more)" if len(added) > 8 else ""
        warnings.warn(
            f"resume={run_dir}: the run's config.yaml has no {shown}{more}: options this version of mmgrpo added "
            "after the run was started. The resumed steps use these values (today's defaults), and mmgrpo's own "
            "changes since then may make them compute differently from the run's first steps; set them in the "
            "command to choose others. config.yaml records them from now on",
            stacklevel=2,
        )
    changed = config_diff(old, cfg, ignore=RESUMABLE)
    if changed:
        shown = "; ".join(f"{k}: {quoted(x, 40)} -> {quoted(y, 40)}" for k, x, y in changed[:8])
        more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
        raise UserError(
            f"resume={run_dir}: the config differs from the run's config.yaml in {shown}{more}. A resumed run must "
            "compute what the original would have; revert these, start a new run (another run.name), or pass "
            "resume_force=true to continue with the new values"
        )


def with_resumable_values(raw: dict, cfg: Config) -> dict:
    """The saved config ``raw`` with ``cfg``'s value at each key a resume may change (``RESUMABLE``) that both hold:
    a value this version refuses there (a run's ``fps: 300`` from before fps was bounded) is one the resume replaces
    anyway, so it must not stop the saved config from loading (which asked for ``resume_force``, turning off every
    resume check)."""
    now = to_dict(cfg)

    def walk(node: Any, have: Any, prefix: str) -> None:
        if not isinstance(node, dict) or not isinstance(have, dict):
            return
        for k in node:
            key = f"{prefix}{k}"
            if k not in have:
                continue
            if key in RESUMABLE:
                node[k] = copy.deepcopy(have[k])
            elif any(r.startswith(key + ".") for r in RESUMABLE):
                walk(node[k], have[k], key + ".")

    out = copy.deepcopy(raw)
    walk(out, now, "")
    return out


def options_added_since(saved: Path, cfg: Config) -> list[tuple[str, Any]]:
    """``(dotted key, value in cfg)`` of each option of ``cfg`` (resolved, as the run uses it) that the run's
    ``saved`` config.yaml (resolved too: every option written out) lacks, i.e. that mmgrpo added after the run was
    written; a missing
    block is named once, at its own key. A key written in short form there (``objective: sde`` for ``{name: sde}``)
    is not a missing one. Keys a resume may change (``RESUMABLE``) are left out."""
    raw = load_yaml(saved.read_text()) or {}
    out: dict[str, Any] = {}

    def walk(node: Any, have: Any, prefix: str) -> None:
        if not isinstance(node, dict) or not isinstance(have, dict):
            return
        for k, v in node.items():
            key = f"{prefix}{k}"
            if key.startswith(RESUMABLE):
                continue
            if k not in have:
                out[key] = v
            else:
                walk(v, have[k], key + ".")

    walk(to_dict(cfg), raw, "")
    return list(out.items())


def write_config(run_dir: Path, cfg: Config) -> None:
    """``run_dir/config.yaml``: the run's configuration, not the invocation's, so that the file used as a config
    (``mmgrpo train runs/x/config.yaml run.name=y``, the way to start a variant) starts a new run. The invocation's
    ``resume`` / ``resume_force`` are left out (with them it continued this run), as is ``run.overwrite`` (with it,
    the same command without a new run.name wiped this run); ``run.name`` / ``run.output_dir`` are the directory's
    own: a resume may give others (they are in ``RESUMABLE``: the config file it reuses may name the run
    differently), but the run stays where it is, and its config.yaml names it there."""
    out = copy.copy(cfg)
    where = {"name": run_dir.name, "output_dir": str(run_dir.absolute().parent), "overwrite": False}
    out.run = dataclasses.replace(cfg.run, **where)
    out.resume, out.resume_force = None, False
    _atomic_write(run_dir / "config.yaml", dump_config(out))


def truncate_metrics(path: Path, step: int) -> None:
    """Keep metric lines up to ``step`` (the resumed run writes the rest again), atomically; drop torn lines. A run
    resumed at step 0 starts again, its step-0 evaluation included: nothing is kept."""
    if not path.is_file():
        return
    keep, torn = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            torn += 1
            continue
        if isinstance(record, dict) and step > 0 and record.get("step", 0) <= step:
            keep.append(line)
    if torn:
        warnings.warn(f"{path}: dropped {torn} unreadable line(s), left by an interrupted write", stacklevel=2)
    _atomic_write(path, "".join(line + "\n" for line in keep))


def _atomic_write(path: Path, text: str) -> None:
    write_atomic(path, text.encode("utf-8"))
