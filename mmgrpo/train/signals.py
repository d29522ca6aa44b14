"""Stopping on SIGINT / SIGTERM without losing the run.

Schedulers (Slurm, Kubernetes) send SIGTERM before they kill a job, and a person presses Ctrl-C. Either one, while
training, lets the current step finish; the trainer then writes a checkpoint and raises :class:`Interrupted`,
which the CLI turns into a message with the ``resume=`` to use and exit code 128 + the signal number (130 for
SIGINT, 143 for SIGTERM). A second Ctrl-C abandons the step at once (KeyboardInterrupt), keeping the checkpoints
already written.

A run stopping on an error is on its way out: inside :func:`last_words` (around the CLI's commands), a SIGTERM that
comes after the training loop failed is ignored, so it cannot cut the process's last message or its clean-up
(removing a new run directory) short. torchrun sends SIGTERM to every process as soon as one of them exits with an
error, and the others' own paragraphs ("another of the run's 2 processes stopped ...") then raced it, now and then
losing. A SIGTERM at any other time acts as before; SIGINT is never held.
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
    """Catch SIGINT and SIGTERM into a :class:`StopFlag` while inside (main thread only; elsewhere a no-op). Left on
    an error (not a second Ctrl-C, not a stop on a signal) inside :func:`last_words`, SIGTERM is then ignored until
    :func:`last_words` ends."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, flag.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    failed = False
    try:
        yield flag
    except BaseException as error:
        failed = not isinstance(error, (KeyboardInterrupt, Interrupted))  # a second Ctrl-C means now
        raise
    finally:
        for s, handler in previous.items():
            held = s == signal.SIGTERM and failed and _HOLDING.is_set()
            signal.signal(s, signal.SIG_IGN if held else handler)


_HOLDING = threading.Event()
"""set while inside :func:`last_words` (read by :func:`stop_on_signals`)"""


@contextmanager
def last_words() -> Iterator[None]:
    """While inside, a training loop that fails leaves SIGTERM ignored (the process is writing its message and
    removing what it made, then exits); SIGTERM is left as it is until then (the default: the process ends at once,
    also inside a C call) and restored at the end. Main thread only, and not where a handler installed outside
    Python holds SIGTERM; elsewhere a no-op. The CLI prints a traceback (``--debug``, an error that is not mmgrpo's)
    inside, so it is held too."""
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if previous is None:
        yield
        return
    was = _HOLDING.is_set()
    _HOLDING.set()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not was:
            _HOLDING.clear()
