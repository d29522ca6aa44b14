"""Experiment trackers (TensorBoard, W&B, trackio, ... : ``trainer.log_with``) through accelerate's tracking API.

Every scalar the trainer writes to ``metrics.jsonl`` also goes to ``accelerator.log`` with its step; the run's
trackers are started with the flattened config and ended when training stops (also on an error or a signal).
Local trackers (TensorBoard) write under the run directory. Empty ``log_with`` (the default) touches nothing.

At each evaluation, :func:`log_evaluation` also hands every tracker that takes them the evaluation's sample grid
(``eval/samples``) and its completion records as a table (``eval/completions``), each in the form that tracker's
accelerate class accepts:

| tracker | image grid | video | completion table |
|---|---|---|---|
| tensorboard | ``log_images`` (NHWC) | animated GIF (image summary, no moviepy needed) | markdown text (``log``) |
| wandb, swanlab, custom | ``log_images`` (a list of one image) | first-frame grid | ``log_table`` where defined |
| aim, clearml | ``log_images`` (one image) | first-frame grid | ``log_table`` (clearml) |

Trackers without ``log_images`` / ``log_table`` (mlflow, comet_ml, trackio, dvclive) get the scalars only.

A resumed run continues its trackers' records: W&B gets the run id kept in ``<run_dir>/trackers.json`` (``resume:
allow``), TensorBoard purges the events after the resumed step (a crash after the last checkpoint logged steps the
resumed run logs again). A tracker is a copy of ``metrics.jsonl``, so one that fails mid-run (network, quota, disk)
is dropped with a warning and training goes on; one that cannot start stops the run before training, in one
paragraph.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import json
import math
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmgrpo.core.errors import UserError
from mmgrpo.core.files import write_atomic
from mmgrpo.train.media import IMAGES, VIDEOS, checked_images, image_grid

SINGLE_IMAGE_TRACKERS = ("aim", "clearml")  # their log_images takes one image per key, not a list


def known_trackers() -> list[str]:
    """Tracker names accelerate accepts here: its built-ins, any registered custom tracker, and ``all``."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return ["all", *sorted(LOGGER_TYPE_TO_CLASS)]


def check_tracker_names(names: list[str], where: str) -> None:
    """Refuse a ``trainer.log_with`` entry accelerate does not know, naming the nearest one."""
    known = known_trackers()
    for i, name in enumerate(names):
        if str(name) not in known:
            near = difflib.get_close_matches(str(name), known, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise UserError(
                f"trainer.log_with.{i} in {where}: unknown tracker {name!r}; {hint}accelerate knows "
                f"{', '.join(known)} (set trainer.log_with=[] to log only to metrics.jsonl)"
            )


def check_trackers_installed(names: list[str]) -> None:
    """Refuse a tracker whose package is missing (accelerate would silently drop it)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    builtin = {"aim", "comet_ml", "mlflow", "tensorboard", "wandb", "clearml", "dvclive", "swanlab", "trackio"}
    for name in names:
        name = str(name)
        if name in builtin and name not in available and name in LOGGER_TYPE_TO_CLASS:
            raise UserError(
                f"trainer.log_with: the {name!r} tracker's package is not installed; run `pip install {name}` "
                f"or remove {name!r} from trainer.log_with"
            )


def flat_config(cfg: Any) -> dict[str, Any]:
    """The config as ``{"trainer.lr": 1e-3, ...}`` with tracker-friendly values (scalars; others as text)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, (bool, int, float, str)):
            out[prefix[:-1]] = node
        else:
            out[prefix[:-1]] = str(node)

    walk(dataclasses.asdict(cfg), "")
    return out


TRACKERS_FILE = "trackers.json"
"""in the run directory: what a resumed run needs to continue its trackers' records (the W&B run id)"""


def resume_kwargs(names: list[str], run_dir: Path, step: int) -> dict[str, dict[str, Any]]:
    """accelerate ``init_kwargs`` that continue the run's records from ``step`` (0: a new run): W&B's run id (made
    once, kept in ``trackers.json``) with ``resume="allow"`` and its files under ``run_dir``; TensorBoard's
    ``purge_step`` past the resumed step."""
    out: dict[str, dict[str, Any]] = {}
    if "wandb" in names or "all" in names:
        path = run_dir / TRACKERS_FILE
        try:
            kept = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            kept = {}
        kept = kept if isinstance(kept, dict) else {}
        run_id = kept.get("wandb_id")
        if not isinstance(run_id, str) or not run_id:
            run_id = uuid.uuid4().hex[:12]
            write_atomic(path, (json.dumps({**kept, "wandb_id": run_id}) + "\n").encode("utf-8"))
        out["wandb"] = {"id": run_id, "resume": "allow", "dir": str(run_dir)}
    if step > 0 and ("tensorboard" in names or "all" in names):
        out["tensorboard"] = {"purge_step": step + 1}
    return out


def start_trackers(acc: Any, cfg: Any, run_dir: Path, step: int = 0) -> bool:
    """Start the trackers of ``cfg.trainer.log_with`` on ``acc`` (local ones write under ``run_dir``), continuing
    their records when the run resumes at ``step``. A tracker that cannot start is a UserError."""
    names = [str(n) for n in cfg.trainer.log_with]
    if not names:
        return False
    from accelerate.tracking import filter_trackers

    check_trackers_installed(names)
    acc.project_configuration.set_directories(str(run_dir))
    acc.project_configuration.logging_dir = str(run_dir)  # TensorBoard: <run_dir>/<run.name>/events.*
    acc.log_with = filter_trackers(names, acc.logging_dir)
    try:  # accelerate starts them on the main process only; it alone keeps trackers.json
        kwargs = resume_kwargs(names, run_dir, step) if acc.is_main_process else {}
        acc.init_trackers(cfg.run.name, config=flat_config(cfg), init_kwargs=kwargs)
    except Exception as e:  # noqa: BLE001  a tracker's own failure (no login, no network, a bad option)
        for t in list(getattr(acc, "trackers", None) or []):  # closed quietly: the one that failed never started
            try:  # (W&B's finish then raised AttributeError: no 'run', a spurious warning before this paragraph)
                t.finish()
            except Exception:  # noqa: BLE001  the start's error below is the one to report
                pass
        if getattr(acc, "trackers", None):
            acc.trackers.clear()
        raise UserError(
            f"trainer.log_with={names}: a tracker could not start ({type(e).__name__}: {e}); fix it (e.g. `wandb "
            "login`, or WANDB_MODE=offline without a network) or remove it from trainer.log_with (metrics.jsonl "
            "holds every metric either way)"
        ) from e
    return True


def _each_tracker(acc: Any, what: str, call: Any) -> None:
    """``call(tracker)`` for every started tracker; one that raises is dropped with a warning (the run goes on:
    ``metrics.jsonl`` keeps every metric)."""
    for t in list(getattr(acc, "trackers", None) or []):
        try:
            call(t)
        except Exception as e:  # noqa: BLE001  network, quota, disk: the tracker's failure, not the run's
            name = str(getattr(t, "name", type(t).__name__))
            warnings.warn(f"the {name} tracker failed while {what} ({type(e).__name__}: {e}); it is dropped for "
                          "the rest of the run (metrics.jsonl keeps every metric)", stacklevel=3)  # fmt: skip
            acc.trackers.remove(t)


def log_scalars(acc: Any, step: int, metrics: dict[str, Any]) -> None:
    """The finite scalar metrics to every started tracker (main process only, as accelerate does)."""
    if not getattr(acc, "trackers", None):
        return
    values = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
    if values:
        _each_tracker(acc, f"logging step {step}", lambda t: t.log(values, step=step))


def end_trackers(acc: Any) -> None:
    """Flush and close the trackers (safe to call when none were started, or twice; one that fails to close is
    dropped). Unlike ``acc.end_training`` it leaves the process group alone: the run still checkpoints after it."""
    _each_tracker(acc, "closing", lambda t: t.finish())
    if getattr(acc, "trackers", None):
        acc.trackers.clear()


def _grid_frames(images: torch.Tensor) -> list[np.ndarray]:
    """[n, 3, H, W] -> [one HWC uint8 grid]; videos [n, F, 3, H, W] -> F grids, frame by frame (as samples/)."""
    scale = max(1, 128 // images.shape[-1])
    clips = images[:, None] if images.dim() == 4 else images
    return [np.asarray(image_grid(clips[:, f], scale=scale)) for f in range(clips.shape[1])]


def _gif(frames: list[np.ndarray], fps: float) -> bytes:
    """An animated GIF of ``frames`` at ``fps`` (GIF delays are whole hundredths of a second: 16 fps plays at 60 ms
    a frame, 24 fps at 40 ms)."""
    buf = io.BytesIO()
    pics = [Image.fromarray(f) for f in frames]
    pics[0].save(buf, format="GIF", save_all=True, append_images=pics[1:], duration=round(1000 / fps), loop=0)
    return buf.getvalue()


def _tensorboard_video(writer: Any, tag: str, frames: list[np.ndarray], step: int, fps: float) -> None:
    """An animated GIF image summary (what SummaryWriter.add_video writes, without its moviepy dependency)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    H, W, C = frames[0].shape
    image = Summary.Image(height=H, width=W, colorspace=C, encoded_image_string=_gif(frames, fps))
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
    writer.flush()


def _markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A markdown table (TensorBoard's text plugin renders it); cells on one line, pipes escaped."""

    def cell(v: Any) -> str:
        return " ".join(str("" if v is None else v).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def completion_table(records: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) of completion records: every key in order of first appearance; a missing key is None."""
    columns: list[str] = []
    for r in records:
        columns += [k for k in r if k not in columns]
    return columns, [[r.get(k) for k in columns] for r in records]


def log_evaluation(
    acc: Any,
    step: int,
    images: torch.Tensor | None = None,
    records: list[dict[str, Any]] | None = None,
    fps: float | None = None,
) -> list[str]:
    """An evaluation's sample grid / video (``images`` [n, 3, H, W] or [n, F, 3, H, W] in [0, 1]; a video plays at
    ``fps``, the model's rate: :func:`~mmgrpo.train.media.video_fps`) as ``eval/samples`` and its completion
    ``records`` as the table ``eval/completions``, to every started tracker that takes them (see the module's
    table). Returns ``"<tracker>:<what>"`` for each thing logged."""
    trackers = getattr(acc, "trackers", None) or []
    if not trackers or (images is None and not records):
        return []
    if images is not None:  # uint8 0..255 images were made floats first, then clamped to an all-white grid
        images = checked_images(images, "log_evaluation", {4: IMAGES, 5: VIDEOS})
        if images.dim() == 5 and fps is None:
            raise ValueError("log_evaluation: videos need their frame rate (fps=video_fps(policy))")
    frames = _grid_frames(images) if images is not None else None
    table = completion_table(records) if records else None
    done: list[str] = []

    def one(t: Any) -> None:
        name = str(getattr(t, "name", type(t).__name__))
        if frames is not None and name == "tensorboard" and len(frames) > 1:
            _tensorboard_video(t.tracker, "eval/samples", frames, step, fps)
            done.append(f"{name}:video")
        elif frames is not None and name == "tensorboard":
            t.log_images({"eval/samples": np.stack(frames[:1])}, step=step, dataformats="NHWC")
            done.append(f"{name}:images")
        elif frames is not None and hasattr(t, "log_images"):
            grid = frames[0]  # other trackers: a video shows its first frame
            t.log_images({"eval/samples": grid if name in SINGLE_IMAGE_TRACKERS else [grid]}, step=step)
            done.append(f"{name}:images")
        if table is not None and name == "tensorboard":
            t.log({"eval/completions": _markdown_table(*table)}, step=step)
            done.append(f"{name}:table")
        elif table is not None and hasattr(t, "log_table"):
            t.log_table("eval/completions", columns=table[0], data=table[1], step=step)
            done.append(f"{name}:table")

    _each_tracker(acc, f"logging the evaluation of step {step}", one)
    return done
