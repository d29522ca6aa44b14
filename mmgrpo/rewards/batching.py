"""The reward server's batching worker (:mod:`mmgrpo.rewards.server` is its HTTP side).

Why a batching worker: a reward model is fastest on big batches and is not thread-safe, while several ranks
(or processes) send small requests at the same time. Handler threads only parse and validate; one worker
thread merges queued requests of the same kind, sample shape, group size G and step -- up to
``max_batch_rows`` rows, waiting at most ``batch_wait_s`` for more -- into ONE reward call, and splits the
[N] result back by request. Each request holds whole groups (its N is a multiple of G), so the merged rows
are still grouped contiguously and ``ctx.group = arange(N) // G`` is right for group-aware rewards.

A request of more than ``max_batch_rows`` rows is scored in parts of whole groups (one group when G is larger),
so the bound holds for every reward call. When a merged batch fails, each request in it is scored alone, so only
the request whose rows made the reward raise gets the 500.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmgrpo.core.types import RewardContext
from mmgrpo.rewards.wire import WireRequest, rewards_to_list, samples_for_reward

log = logging.getLogger("mmgrpo.rewards.server")


@dataclass
class Job:
    request: WireRequest
    done: threading.Event = field(default_factory=threading.Event)
    result: list[float | None] | None = None
    error: str | None = None
    code: int = 500  # the HTTP status of ``error``
    cancelled: bool = False  # its client has gone: the worker drops it unscored if it has not started it


def merge_requests(requests: list[WireRequest]) -> tuple[Any, list[Any], list[dict], RewardContext]:
    """Concatenate requests of one batch key into the reward's arguments (samples [N, ...], prompts, meta, ctx)."""
    first = requests[0]
    if first.kind == "text":
        raw: Any = [s for r in requests for s in r.samples]
    else:
        raw = np.concatenate([r.samples for r in requests]) if len(requests) > 1 else first.samples
    samples = samples_for_reward(first.kind, raw, first.dtype)
    prompts = [p for r in requests for p in r.prompts]
    meta = [m for r in requests for m in r.meta]
    n, g = len(prompts), first.group_size
    ctx = RewardContext(group_size=g, step=first.step, group=torch.arange(n) // g)  # group: [N]
    return samples, prompts, meta, ctx


def request_rows(request: WireRequest, start: int, stop: int) -> WireRequest:
    """Rows ``start:stop`` of ``request`` (whole groups) as a request of their own."""
    return WireRequest(
        kind=request.kind,
        samples=request.samples[start:stop],
        prompts=request.prompts[start:stop],
        meta=request.meta[start:stop],
        group_size=request.group_size,
        step=request.step,
        dtype=request.dtype,
    )


def split_rows(values: list[Any], sizes: list[int]) -> list[list[Any]]:
    """Split N values back into consecutive pieces of ``sizes`` (sum(sizes) == N)."""
    out, start = [], 0
    for s in sizes:
        out.append(values[start : start + s])
        start += s
    return out


class Batcher:
    """One worker thread: merges compatible queued jobs into one reward call (see the module docstring).

    ``failed`` is set (a message) when the reward raised a BaseException (SystemExit, KeyboardInterrupt): the
    worker stops there, since the reward's state is unknown, and every later request is answered 503 at once
    instead of waiting on a worker that is gone.
    """

    def __init__(self, reward_fn: Any, max_batch_rows: int, batch_wait_s: float):
        self.reward_fn, self.max_batch_rows, self.batch_wait_s = reward_fn, max_batch_rows, batch_wait_s
        self.nan_ok = bool(getattr(reward_fn, "nan_means_not_applicable", False))
        self.calls = 0  # reward calls made (batches), for logs and tests
        self.dropped = 0  # cancelled jobs dropped unscored (their clients had gone), for logs and tests
        self.failed: str | None = None
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._held: collections.deque[Job] = collections.deque()  # taken off the queue, incompatible so far
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reward-batcher", daemon=True)
        self._thread.start()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def submit(self, request: WireRequest) -> Job:
        job = Job(request)
        if self.failed is not None:
            job.error, job.code = self.failed, 503
            job.done.set()
        elif self._stop.is_set():
            job.error = "the reward server is shutting down"
            job.done.set()
        else:
            self._queue.put(job)
        return job

    @property
    def alive(self) -> bool:
        """False once the worker has stopped (failed, or stopped by ``stop()``): nothing queued will be scored."""
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _take_compatible(self, key: tuple, batch: list[Job], rows: int) -> int:
        """Move held jobs with ``key`` that still fit into ``batch`` (FIFO); returns the new row count."""
        keep: collections.deque[Job] = collections.deque()
        while self._held:
            job = self._held.popleft()
            if job.request.batch_key() == key and rows + job.request.num_rows <= self.max_batch_rows:
                batch.append(job)
                rows += job.request.num_rows
            else:
                keep.append(job)
        self._held = keep
        return rows

    def _collect(self) -> list[Job] | None:
        """The next batch, or None when stopping. Waits at most batch_wait_s after its first job."""
        if self._stop.is_set():
            return None
        first = self._held.popleft() if self._held else self._queue.get()
        if first is None:
            return None
        key, batch = first.request.batch_key(), [first]
        rows = self._take_compatible(key, batch, first.request.num_rows)
        deadline = time.monotonic() + self.batch_wait_s
        while rows < self.max_batch_rows:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                job = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if job is None:  # stop() was called: score what we hold, then leave
                break
            if job.request.batch_key() == key and rows + job.request.num_rows <= self.max_batch_rows:
                batch.append(job)
                rows += job.request.num_rows
            else:
                self._held.append(job)
        return batch

    def _call(self, requests: list[WireRequest]) -> list[float | None]:
        """ONE reward call on the merged rows of ``requests`` (at most max_batch_rows, or one group)."""
        t0 = time.perf_counter()
        samples, prompts, meta, ctx = merge_requests(requests)
        self.calls += 1
        values = rewards_to_list(self.reward_fn(samples, prompts, meta, ctx), len(prompts), self.nan_ok)
        log.info("scored %d rows (%d requests) in %.3f s", len(prompts), len(requests), time.perf_counter() - t0)
        return values

    def _score(self, requests: list[WireRequest]) -> list[float | None]:
        """The values of all rows of ``requests``. One request over max_batch_rows rows is scored in parts of
        whole groups (one group when G > max_batch_rows): the bound holds for every reward call, so one request
        of many tiny rows cannot make a resizing reward allocate memory in proportion to its rows."""
        if len(requests) > 1 or requests[0].num_rows <= self.max_batch_rows:
            return self._call(requests)
        request = requests[0]
        g = request.group_size
        step = max(g, self.max_batch_rows // g * g)
        values: list[float | None] = []
        for start in range(0, request.num_rows, step):
            values += self._call([request_rows(request, start, start + step)])
        return values

    def _fail(self, job: Job, e: Exception) -> None:
        log.exception("reward failed on %d rows", job.request.num_rows)
        job.error = f"reward failed: {type(e).__name__}: {e}"

    def _run(self, batch: list[Job]) -> None:
        for job in [j for j in batch if j.cancelled]:  # their clients have gone: nobody would read the answer
            self.dropped += 1
            job.error = "cancelled: the client disconnected"
            job.done.set()
            log.info("dropped a request of %d rows: its client disconnected", job.request.num_rows)
        batch = [j for j in batch if not j.cancelled]
        if not batch:
            return
        sizes = [j.request.num_rows for j in batch]
        try:
            try:
                for job, part in zip(batch, split_rows(self._score([j.request for j in batch]), sizes)):
                    job.result = part
            except Exception as e:  # noqa: BLE001  a failing reward answers 500 and the server keeps serving
                if len(batch) == 1:
                    self._fail(batch[0], e)
                    return
                # one request's bad rows must not fail the others merged with it: score each alone, so that
                # only the guilty request gets the 500
                log.warning("reward failed on %d merged requests (%s); scoring each alone", len(batch), e)
                for job in batch:
                    if job.cancelled:
                        job.error = "cancelled: the client disconnected"
                        continue
                    try:
                        job.result = self._score([job.request])
                    except Exception as e1:  # noqa: BLE001
                        self._fail(job, e1)
        except BaseException as e:  # SystemExit / KeyboardInterrupt from the reward: stop serving it
            self.failed = (
                f"the reward server's worker stopped: the reward raised {type(e).__name__}: {e}; restart the "
                "server (`mmgrpo serve-reward`) once the reward is fixed"
            )
            log.critical("%s", self.failed, exc_info=True)
            for job in batch:
                if job.result is None and job.error is None:
                    job.error = self.failed
        finally:
            for job in batch:
                job.done.set()

    def _loop(self) -> None:
        try:
            while self.failed is None and (batch := self._collect()) is not None:
                self._run(batch)
        except BaseException as e:  # a bug of the worker itself: record it rather than leave requests hanging
            self.failed = self.failed or f"the reward server's worker stopped ({type(e).__name__}: {e}); restart it"
            log.critical("%s", self.failed, exc_info=True)
        leftover = list(self._held)
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is not None:
                leftover.append(job)
        for job in leftover:
            job.error = self.failed or "the reward server is shutting down"
            job.code = 503
            job.done.set()
