"""The watcher that stops a run's other processes when one stops on an error (mmgrpo.train.peer_watch), on a real
in-process store (torch's HashStore); the 2-process run launched as srun launches is in test_distributed.py."""

import signal
from pathlib import Path
from types import SimpleNamespace

import torch.distributed as dist

from mmgrpo.core.errors import UserError
from mmgrpo.train.peer_watch import KEY, PeerWatch, grace_s
from mmgrpo.train.signals import Interrupted


def processes(rank: int, size: int = 2) -> SimpleNamespace:
    return SimpleNamespace(process_index=rank, num_processes=size)


def test_the_first_error_is_announced_with_its_process_and_first_line():
    store = dist.HashStore()
    one, zero = PeerWatch(processes(1), str, store), PeerWatch(processes(0), str, store)
    assert zero.stopped() is None
    one.announce(UserError("reward 'x' raised ValueError in step 2 (ctx.step 1): 'boom'\nsecond line"))
    zero.announce(RuntimeError("[gloo] Connection closed by peer"))  # the consequence: the first one is kept
    assert zero.stopped() == ("1", "UserError: reward 'x' raised ValueError in step 2 (ctx.step 1): 'boom'")
    assert one.done.is_set() and zero.done.is_set()  # a process that stops says so itself: its watcher ends


def test_a_stop_on_a_signal_is_not_announced_and_one_process_watches_nothing(monkeypatch):
    """A launcher sends SIGTERM / Ctrl-C to every process, which stop together; the main process may still be writing
    the last checkpoint, and the others must not end it."""
    store = dist.HashStore()
    for error in (KeyboardInterrupt(), Interrupted(signal.SIGTERM, Path("runs/x"), 3)):
        PeerWatch(processes(1), str, store).announce(error)
    assert not store.check([KEY])
    alone = PeerWatch(processes(0, size=1), str, store)
    with alone:
        assert alone.store is None and alone.thread is None
    monkeypatch.setenv("MMGRPO_PEER_GRACE_S", "soon")
    assert grace_s() == 30.0
    monkeypatch.setenv("MMGRPO_PEER_GRACE_S", "2.5")
    assert grace_s() == 2.5
