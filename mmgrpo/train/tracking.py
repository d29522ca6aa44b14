"""Experiment trackers (TensorBoard, W&B, trackio, ... : ``trainer.log_with``) through accelerate's tracking API.

Every scalar the trainer writes to ``metrics.jsonl`` also goes to ``accelerator.log`` with its step; the run's
trackers are started with the flattened config and ended when training stops (also on an error or a signal).
Local trackers (TensorBoard) write under the run directory. Empty ``log_with`` (the default) touches nothing.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

from mmgrpo.core.errors import UserError


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


def start_trackers(acc: Any, cfg: Any, run_dir: Path) -> bool:
    """Start the trackers of ``cfg.trainer.log_with`` on ``acc`` (local ones write under ``run_dir``)."""
    names = list(cfg.trainer.log_with)
    if not names:
        return False
    from accelerate.tracking import filter_trackers

    check_trackers_installed(names)
    acc.project_configuration.set_directories(str(run_dir))
    acc.project_configuration.logging_dir = str(run_dir)  # TensorBoard: <run_dir>/<run.name>/events.*
    acc.log_with = filter_trackers(names, acc.logging_dir)
    acc.init_trackers(cfg.run.name, config=flat_config(cfg))
    return True


def log_scalars(acc: Any, step: int, metrics: dict[str, Any]) -> None:
    """The scalar metrics to every started tracker (main process only, as accelerate does)."""
    if not getattr(acc, "trackers", None):
        return
    values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if values:
        acc.log(values, step=step)


def end_trackers(acc: Any) -> None:
    """Flush and close the trackers (safe to call when none were started)."""
    if getattr(acc, "trackers", None):
        acc.end_training()
