"""One training run around a trainer: its run directory prepared (or resumed), the trainer built and run, and what a
failure leaves behind (:mod:`mmgrpo.train.run_dir`).

:func:`mmgrpo.train.trainer.train` is :func:`run_training` with the :class:`~mmgrpo.train.trainer.Trainer`; the
trainer is handed in (``make_trainer``) so this module, which only reads its ``cfg``, ``policy``, ``step``,
``load`` and ``train``, does not import the loop that imports it.

A failure says how to go on: a new run that fails while its models load, or before it trained anything, removes
the directory it made (the same command starts again); running out of memory names the settings that bound what
one forward holds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed
from accelerate import Accelerator

from mmgrpo.core.errors import UserError, add_note, first_line, out_of_memory
from mmgrpo.core.files import missing_parents
from mmgrpo.train import checkpoint as ckpt
from mmgrpo.train.accelerator import make_accelerator
from mmgrpo.train.config import Config, resolved_config
from mmgrpo.train.peer_watch import PeerWatch
from mmgrpo.train.run_dir import (
    check_resume_config,
    discard_unstarted,
    discard_untrained,
    prepare_run_dir,
    resume_checkpoint,
    truncate_metrics,
    write_config,
)

T = TypeVar("T")
"""the trainer: a :class:`~mmgrpo.train.trainer.Trainer`"""


def run_training(
    cfg: Config, make_trainer: Callable[[Config, Path, Accelerator], T], accelerator: Accelerator | None = None
) -> T:
    """Run (or resume) training for ``cfg`` with the trainer ``make_trainer(cfg, run_dir, accelerator)``; returns
    the finished trainer (see :mod:`mmgrpo.train.run_dir`).

    The run uses, and its ``config.yaml`` stores, :func:`~mmgrpo.train.config.resolved_config` of ``cfg``: every
    option written out and relative paths made absolute, so the run directory works from any directory."""
    cfg = resolved_config(cfg)
    acc = accelerator or make_accelerator(cfg.trainer.mixed_precision)
    cfg.trainer.mixed_precision = str(acc.mixed_precision)  # config.yaml records the precision the run used
    # every rank checks the run directory before the main process creates it (else the others would find it
    # "already existing"), so a refusal stops all of them alike
    run_dir = prepare_run_dir(cfg, is_main=False)
    if cfg.resume:
        check_resume_config(cfg, run_dir, cfg.resume_force)
    # a directory this run creates (not one run.overwrite reuses: it may hold the user's own files) is removed again
    # if the run fails before it trained anything
    fresh = not cfg.resume and not (run_dir.is_dir() and any(run_dir.iterdir()))
    made = missing_parents(run_dir) if fresh else []  # e.g. run.output_dir itself: removed with the directory
    acc.wait_for_everyone()
    if acc.is_main_process:
        prepare_run_dir(cfg, is_main=True)
    acc.wait_for_everyone()
    trainer: Any = _build(make_trainer, cfg, run_dir, acc, made)
    if cfg.resume:
        latest = resume_checkpoint(run_dir)
        if latest is not None:
            trainer.load(latest)
        if acc.is_main_process:
            truncate_metrics(run_dir / "metrics.jsonl", trainer.step)
        acc.wait_for_everyone()
    if acc.is_main_process:
        write_config(run_dir, cfg)

    def removed() -> str | None:  # a new run's main process, nothing trained: its directory goes (the note)
        if acc.is_main_process and fresh and trainer.step == 0 and discard_untrained(run_dir, made):
            return (f"nothing was trained, so the new run directory {run_dir} was removed: once the cause is fixed, "
                    "the same command starts the run again")  # fmt: skip
        return None

    def watcher_words() -> str:  # what the watcher says (and does) as it ends this process: as the error path
        note = removed()
        return note[0].upper() + note[1:] if note else how_to_continue(trainer, run_dir)

    watch = PeerWatch(acc, watcher_words)  # this process stops when another stops and it does not notice
    try:
        with watch:
            trainer.train()
    except BaseException as error:
        watch.announce(error)
        if out_of_memory(error):
            raise _out_of_memory(trainer, run_dir, error, made if acc.is_main_process and fresh else None) from error
        e = _with_how_to_go_on(_peer_stopped(error, acc.num_processes) or error, trainer, run_dir, removed(),
                               untrained=not acc.is_main_process and fresh and trainer.step == 0)  # fmt: skip
        if e is error:
            raise
        raise e from error
    return trainer


def _build(
    make_trainer: Callable[[Config, Path, Accelerator], T],
    cfg: Config,
    run_dir: Path,
    acc: Accelerator,
    made: list[Path],
) -> T:
    """``make_trainer(cfg, run_dir, acc)``; a new run's directory is removed again when it fails (the models did not
    load), and running out of memory there names what must fit."""
    try:
        return make_trainer(cfg, run_dir, acc)
    except BaseException as e:
        if acc.is_main_process and not cfg.resume:
            discard_unstarted(run_dir, made)
        if out_of_memory(e):
            raise UserError(
                f"out of memory while loading the run's models ({first_line(e)}): the policy, its optimizer state "
                "and the frozen models (reference, reward models) must fit on the device. Load the weights in "
                "bfloat16 (policy.options.dtype=bfloat16), train LoRA adapters instead of every weight "
                "(policy.options.lora_rank for the image and video families, policy.options.finetune=lora for the "
                "VLMs), or shard the model over several GPUs (accelerate launch --config_file "
                "configs/accelerate/fsdp.yaml -m mmgrpo.train.cli train ...)"
            ) from e
        raise


def _with_how_to_go_on(e: BaseException, trainer: Any, run_dir: Path, removed: str | None, untrained: bool):
    """``e`` with what the user does next: ``removed``, the note of a new run's directory removed (the main process,
    nothing trained); ``untrained``: another process of such a run; else how to continue from the last checkpoint
    (into a UserError's paragraph, else a note)."""
    if removed:
        if isinstance(e, UserError) and e.args:
            e.args = (f"{e.args[0]} ({removed})", *e.args[1:])
        else:
            add_note(e, removed)
    elif untrained and isinstance(e, UserError) and e.args:
        note = (f"nothing was trained: the main process removes the new run directory {run_dir} when it stops too, "
                "unless it holds a debug/ dump; once the cause is fixed, the same command starts the run again, or, "
                f"if the directory is still there, resume={run_dir}")  # fmt: skip
        e.args = (f"{e.args[0]} ({note})", *e.args[1:])
    elif isinstance(e, (UserError, KeyboardInterrupt)):
        add_note(e, how_to_continue(trainer, run_dir))
    return e


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
             "NCCL communicator was aborted")  # fmt: skip
"""what a collective with a process that went away says (gloo's TCP pair; NCCL's watchdog)"""


def _peer_stopped(error: BaseException, processes: int) -> UserError | None:
    """The paragraph of a process whose collective failed because another process of the run went away (it stopped
    on its own error, whose paragraph that process prints, or was killed): it was gloo's traceback of 44 lines after
    the other process's clean message (the walkthrough of 2026-12-07), and nothing at all said how to go on."""
    text = str(error)
    backend = isinstance(error, getattr(torch.distributed, "DistError", ())) or "gloo" in text or "NCCL" in text
    if processes < 2 or not isinstance(error, RuntimeError) or not backend or not any(w in text for w in PEER_GONE):
        return None
    return UserError(f"another of the run's {processes} processes stopped (a collective between them failed: "
                     f"{first_line(error)}): its own message, if it wrote one, is above; this process cannot go on "
                     "without it")  # fmt: skip


def how_to_continue(trainer: Any, run_dir: Path) -> str:
    """What an error (or a second Ctrl-C) after training started adds: where the run stopped (the trainer's
    ``doing``, else the last finished step), the newest checkpoint kept, and the command that continues the run
    from it: the run's own resolved config.yaml with ``resume=`` (the shipped config would need every override of
    the first command again)."""
    doing = getattr(trainer, "doing", "") or f"after step {trainer.step}"
    last = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if last is not None:
        kept = f"the last checkpoint kept is {last.name} ({last})"
    else:
        kept = "no checkpoint had been written, so the run continues from step 0"
    processes = getattr(getattr(trainer, "acc", None), "num_processes", 1)
    launch = (f" (through the launcher, as this run of {processes} processes was: accelerate launch ... -m "
              "mmgrpo.train.cli train ...; alone it resumes on one process)" if processes > 1 else "")  # fmt: skip
    return (
        f"The run stopped {doing} (of {trainer.cfg.trainer.max_steps} steps); {kept}. Once the cause is fixed, "
        f"continue with: mmgrpo train {run_dir / 'config.yaml'} resume={run_dir}{launch}"
    )


def _out_of_memory(trainer: Any, run_dir: Path, error: BaseException, made: list[Path] | None) -> UserError:
    """The paragraph of a run that ran out of memory: the settings that bound what one forward holds, and how to go
    on (the checkpoints already written are kept; a new run stopped in its first step leaves no directory).
    ``made``: the folders above the run directory a new run created (None: not a new run, or not the main process)."""
    t, opts = trainer.cfg.trainer, getattr(trainer.policy, "opts", None)
    if t.micro_batch_size == "auto" and hasattr(trainer.policy, "micro_batch_rows"):
        lower = [f"lower trainer.micro_batch_units (now {t.micro_batch_units} (row, step) forwards a micro-batch)"]
    else:
        now = "all the minibatch's rows" if t.micro_batch_size in ("auto", 0) else f"{t.micro_batch_size} rows"
        lower = [f"set trainer.micro_batch_size to fewer rows a forward (now {now})"]
    lower.append(f"raise trainer.rollout_chunks (now {t.rollout_chunks}: the rollout's rows in that many parts)")
    other = []
    adapter = getattr(trainer.policy, "adapter", None)
    if getattr(adapter, "num_frames", None):  # a video's activations grow with its frames and pixels
        now = f"now {adapter.num_frames} frames of {adapter.width}x{adapter.height}"
        other.append(f"shorter or smaller videos: policy.options.num_frames / height / width ({now})")
    if getattr(opts, "gradient_checkpointing", None) is False:
        other.append("policy.options.gradient_checkpointing=true")
    if t.mixed_precision in (None, "no"):
        other.append("trainer.mixed_precision=bf16")
    last = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if last is not None:
        then = f"the checkpoints are kept (the last: {last.name}): continue with resume={run_dir} and the new values"
    elif made is not None and trainer.step == 0 and discard_untrained(run_dir, made):
        then = f"nothing was trained, so the new run directory {run_dir} was removed: the same command starts again"
    else:
        then = f"no checkpoint had been written yet: restart with resume={run_dir} (from step 0) and the new values"
    more = f"; or {' / '.join(other)} (a resume that changes these needs resume_force=true)" if other else ""
    return UserError(
        f"out of memory in step {trainer.step + 1} ({first_line(error)}). Make one forward hold less: "
        f"{', or '.join(lower)}{more}. {then[0].upper()}{then[1:]}"
    )
