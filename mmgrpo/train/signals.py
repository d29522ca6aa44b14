"""Stopping on SIGINT / SIGTERM without losing the run.

Schedulers (Slurm, Kubernetes) send SIGTERM before they kill a job, and a person presses Ctrl-C. Either one, while
training, lets the current step finish; the trainer then writes a checkpoint and raises :class:`Interrupted`,
which the CLI turns into a message with the ``resume=`` to use and exit code 128 + the signal number (130 for
SIGINT, 143 for SIGTERM). A second Ctrl-C abandons the step at once (KeyboardInterrupt), keeping the checkpoints
already written.

A run stopping on an error is on its way out: inside :func:`last_words` (the CLI's ``train``), a SIGTERM that comes
after the training loop failed is held, so it cannot cut the process's last message or its clean-up (removing a new
run directory) short. torchrun sends SIGTERM to every process as soon as one of them exits with an error, and the
others' own paragraphs ("another of the run's 2 processes stopped ...") then raced it, now and then losing. A SIGTERM
at any other time acts as before; SIGINT is never held.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint at ``step``."""

    def __init__(self, signum: int, run_dir: Path, step: int):
        self.signum, self.run_dir, self.step = signum, run_dir, step
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} after step {step}; its checkpoint was written ({run_dir / 'checkpoints'}/"
            f"step_{step:06d}). Continue with: mmgrpo train {run_dir / 'config.yaml'} resume={run_dir}"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopFlag:
    """Set by the first SIGINT/SIGTERM; ``signum`` says which (0 = none)."""

    def __init__(self) -> None:
        self.signum = 0

    def handle(self, signum: int, frame: object) -> None:
        if self.signum and signum == signal.SIGINT:  # the second Ctrl-C: abandon the step now
            raise KeyboardInterrupt
        self.signum = signum


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Catch SIGINT and SIGTERM into a :class:`StopFlag` while inside (main thread only; elsewhere a no-op)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, flag.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    except BaseException as error:
        if not isinstance(error, KeyboardInterrupt):  # a second Ctrl-C means now; an error is on its way out
            _FAILING.set()
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


_FAILING = threading.Event()
"""set once the training loop left on an error (:func:`stop_on_signals`); read by :func:`last_words`"""


@contextmanager
def last_words() -> Iterator[None]:
    """Hold SIGTERM while inside once the training loop has failed (the process is writing its message and removing
    what it made, then exits); before that, SIGTERM does what it did (the default: the process ends at once). Main
    thread only; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _FAILING.clear()
    previous = signal.getsignal(signal.SIGTERM)

    def handle(signum: int, frame: object) -> None:
        if _FAILING.is_set():
            return  # held: the process stops by itself once its message is out
        signal.signal(signal.SIGTERM, previous)  # as if this handler were not here
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.raise_signal(signum)

    signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _FAILING.clear()
