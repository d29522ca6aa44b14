"""When one process of a multi-process run stops on an error, the others stop too, saying why, instead of waiting in
a collective for the hour of :data:`~mmgrpo.train.accelerator.COLLECTIVE_TIMEOUT`.

torchrun (``accelerate launch``) ends a run's other processes on one machine when one exits with an error; gloo's
collectives fail as soon as a peer's connection closes. NCCL notices neither: under a launcher that leaves each
process alone (``srun`` without ``--kill-on-bad-exit``, ``mpirun``, one torchrun per node of a multi-node run) the
others waited in their next collective until its timeout, an hour of held GPUs with nothing printed.

So a process that leaves the training loop on an error writes one line into the run's rendezvous store (the
key-value store every process already reaches: :data:`KEY`, its rank and the error's first line) before it writes
its own message, and every process runs a watcher thread that reads the key every :data:`POLL_S` seconds. When
another process has announced a stop and this one's loop is still running :data:`GRACE_S` seconds later (it did
not get the collective's error itself, as under gloo it does within a second), the watcher prints one paragraph,
naming that process, its error and how to continue the run, and ends this process (``os._exit``: its main thread
is inside a C call that does not return; what it was writing is a staged checkpoint, which a resume removes). A
store that becomes unreachable (its host process went away) counts as such an announcement from the store's host.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from mmgrpo.core.errors import as_shown, first_line
from mmgrpo.train.signals import Interrupted

KEY = "mmgrpo/stopped"
"""the store key (``/<torchrun's restart count>``: a restarted round's workers do not read the last round's)"""
POLL_S = 2.0
"""how often the watcher reads the store (one small request a process: light on the store of a large run)"""
GRACE_S = 30.0
"""how long after another process announced its stop this one's loop may still run (it is then waiting in a
collective that does not fail); ``MMGRPO_PEER_GRACE_S`` sets it"""
EXIT_CODE = 2
"""the exit status of a process the watcher ends (as the CLI's for an error it explains)"""


def default_store() -> Any | None:
    """The process group's key-value store (the launcher's rendezvous: TCPStore, torchrun's agent store), or None
    when there is no process group or this torch keeps it elsewhere."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    get = getattr(dist.distributed_c10d, "_get_default_store", None)
    try:
        return get() if get is not None else None
    except (RuntimeError, ValueError):
        return None


def grace_s() -> float:
    """:data:`GRACE_S`, or ``MMGRPO_PEER_GRACE_S`` when it is a number > 0."""
    try:
        value = float(os.environ.get("MMGRPO_PEER_GRACE_S", GRACE_S))
    except ValueError:
        return GRACE_S
    return value if value > 0 else GRACE_S


class PeerWatch:
    """Around a multi-process run's training loop (``with PeerWatch(acc, describe): ...``): :meth:`announce` this
    process's stop; the watcher thread ends this process when another's stop goes unnoticed (module doc).
    ``describe()``: the sentence on how to continue the run, called when the watcher fires, before this process
    ends (the run's main process removes a new run's directory there if nothing was trained, as its error path
    does). A no-op for one process or without a store."""

    def __init__(self, accelerator: Any, describe: Callable[[], str], store: Any | None = None):
        many = getattr(accelerator, "num_processes", 1) > 1
        self.store = (store or default_store()) if many else None
        self.rank = int(getattr(accelerator, "process_index", 0))
        self.size = int(getattr(accelerator, "num_processes", 1))
        self.describe = describe
        self.grace = grace_s()
        self.done = threading.Event()
        self.thread: threading.Thread | None = None
        self.seen: tuple[str | None, str] | None = None
        self.key = f"{KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"  # a restarted worker's own round

    def __enter__(self) -> PeerWatch:
        if self.store is not None:
            self.thread = threading.Thread(target=self._watch, name="mmgrpo-peer-watch", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.done.set()

    def announce(self, error: BaseException) -> None:
        """Tell the other processes this one stopped on ``error`` (the first announcement is kept); this process's
        own message follows, so its watcher stops. Not a stop on a signal or Ctrl-C: launchers send those to every
        process, which stop together (the main process may still be writing the last checkpoint or report)."""
        self.done.set()
        if self.store is None or isinstance(error, (KeyboardInterrupt, Interrupted)):
            return
        try:  # set only where no process has (atomic: two failing at once keep the first)
            self.store.compare_set(self.key, "", f"{self.rank}\n{type(error).__name__}: {first_line(error)}")
        except Exception:  # noqa: BLE001  (the store is gone too: the others' own watchers notice that)
            pass

    def stopped(self) -> tuple[str | None, str] | None:
        """(the process that announced a stop, what it said), or None. The first announcement read is kept: the
        store may go away later with the process that holds it, once that one stops too. A store that cannot be
        read before any announcement: (None, why), its holder went away (kept too)."""
        if self.seen is not None:
            return self.seen
        try:
            if not self.store.check([self.key]):
                return None
            rank, _, what = self.store.get(self.key).decode("utf-8", "replace").partition("\n")
        except Exception as e:  # noqa: BLE001  (TCPStore's errors once its host process has exited)
            self.seen = (None, first_line(e))  # not read again: each failed read prints torch's C++ warning
            return self.seen
        self.seen = (rank, what)
        return self.seen

    def _watch(self) -> None:
        since: float | None = None
        holder = "the launcher's agent" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else "process 0"
        while not self.done.wait(POLL_S):
            seen = self.stopped()
            if seen is None or seen[0] == str(self.rank) or (seen[0] is None and holder == f"process {self.rank}"):
                since = None
                continue
            since = since if since is not None else time.monotonic()
            if time.monotonic() - since < self.grace or self.done.is_set():
                continue
            rank, what = seen
            try:
                how = self.describe()
            except Exception:  # noqa: BLE001  (the paragraph is said without it)
                how = ""
            if rank is None:
                who = f"{holder}, which holds the run's rendezvous store, stopped (the store cannot be read: {what})"
            else:
                who = f"process {rank} of the run's {self.size} processes stopped ({what})"
            text = (f"{who}, and this process (process {self.rank}) was still in its step {self.grace:g} s later "
                    "(an NCCL collective waits for a process that went away instead of failing), so it stops too; "
                    f"that process's own message says why. {how}").strip()  # fmt: skip
            sys.stderr.write(f"error: {as_shown(text)}\n")
            sys.stderr.flush()
            os._exit(EXIT_CODE)
