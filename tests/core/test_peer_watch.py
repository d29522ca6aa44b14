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
    assert not store.check([f"{KEY}/0"])
    alone = PeerWatch(processes(0, size=1), str, store)
    with alone:
        assert alone.store is None and alone.thread is None
    monkeypatch.setenv("MMGRPO_PEER_GRACE_S", "soon")
    assert grace_s() == 30.0
    monkeypatch.setenv("MMGRPO_PEER_GRACE_S", "2.5")
    assert grace_s() == 2.5


def test_the_first_announcement_read_is_kept_when_the_store_goes_away(monkeypatch):
    """The store lives in process 0 under srun: once process 0 stops too, the others read nothing (with 3 processes
    a late watcher named process 0 and lost process 1's error); a store gone before any announcement names its
    holder, and is read once (each failed read prints torch's C++ warning)."""
    import datetime

    from mmgrpo.testing.launch import free_port

    port, wait = free_port(), datetime.timedelta(seconds=5)
    server = dist.TCPStore("127.0.0.1", port, None, True, timeout=wait, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", port, None, False, timeout=wait)
    two, late = PeerWatch(processes(2, 3), str, client), PeerWatch(processes(0, 3), str, server)
    late.announce(UserError("boom on process 0"))
    assert two.stopped() == ("0", "UserError: boom on process 0")
    del late, server  # the holder exits
    assert two.stopped() == ("0", "UserError: boom on process 0")
    other = PeerWatch(processes(1, 3), str, client)
    gone = other.stopped()
    assert gone[0] is None and gone == other.stopped()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")  # a restarted round reads its own key
    assert PeerWatch(processes(1, 3), str, dist.HashStore()).key == f"{KEY}/2"
