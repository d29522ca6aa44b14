"""What a benchmark of many hours needs besides its measurements: a run log that survives being killed, a gate
that lets its worker processes run only while the machine is otherwise idle, and the end of those workers when it is
interrupted (``bench/learning_vlm.py``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


# ------------------------------------------------------------------------------------------------------- run log
def read_log(path: Path | None) -> dict[str, dict]:
    """The run log: key -> the last record with that key (one JSON object per line; a torn last line from a killed
    process is skipped with a warning, the lines before it are kept)."""
    if path is None or not path.exists():
        return {}
    out: dict[str, dict] = {}
    for i, line in enumerate(path.read_text().splitlines()):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            print(f"{path}:{i + 1}: unreadable line skipped (a run killed while writing it)", file=sys.stderr)
            continue
        out[rec["key"]] = rec
    return out


def append_log(path: Path | None, rec: dict) -> None:
    """One finished run, appended and fsync'd: a killed benchmark loses at most the runs in flight."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def git_commit(root: Path) -> str:
    """The short commit of the repository at ``root`` ("unknown" outside git)."""
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------- idle gate
class IdleGate:
    """``--idle-only``: the benchmark's worker processes run only while nothing else uses the machine's CPU.

    Every ``period`` seconds the gate reads the machine's busy CPU time (``/proc/stat``) and the workers' own
    (``/proc/PID/stat``); when the rest of the machine used more than ``busy`` cores it stops the workers
    (SIGSTOP), and continues them (SIGCONT) after ``calm`` readings in a row under ``quiet`` cores. A run's budget
    counts its own CPU seconds (``--clock process``), which a stopped process does not spend, so every run gets its
    budget on an otherwise idle machine however much else ran meanwhile. (Counting CPU seconds alone is not enough:
    measured 2026-12-05, GRPO runs of 300 CPU s did 455-496 steps beside light work and 270-379 beside a test suite,
    since a busy machine slows each CPU second through shared caches and memory.) Linux only (``/proc``).
    """

    def __init__(self, pids, period: float = 5.0, busy: float = 0.25, quiet: float = 0.15, calm: int = 3):
        self.pids, self.period, self.busy, self.quiet, self.calm = pids, period, busy, quiet, calm
        self.stopped, self._calm, self.log = False, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def decide(self, others: float) -> str | None:
        """'stop', 'cont' or None for one reading of the other processes' load (cores); updates the state."""
        if not self.stopped:
            if others > self.busy:
                self.stopped, self._calm = True, 0
                return "stop"
            return None
        self._calm = self._calm + 1 if others < self.quiet else 0
        if self._calm >= self.calm:
            self.stopped = False
            return "cont"
        return None

    @staticmethod
    def machine_busy() -> int:
        """Busy clock ticks of the whole machine since boot (all CPUs; idle and iowait left out)."""
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4]

    @staticmethod
    def process_busy(pids) -> int:
        """Clock ticks the processes ``pids`` spent (user + system); gone processes count 0."""
        total = 0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total

    def _signal(self, sig: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _loop(self) -> None:
        hz = os.sysconf("SC_CLK_TCK")
        pids = list(self.pids())
        machine, mine = self.machine_busy(), self.process_busy(pids)
        while not self._stop.wait(self.period):
            pids = list(self.pids())
            m2, w2 = self.machine_busy(), self.process_busy(pids)
            others = max(0, (m2 - machine) - (w2 - mine)) / hz / self.period
            machine, mine = m2, w2
            action = self.decide(others)
            if action:
                self._signal(signal.SIGSTOP if action == "stop" else signal.SIGCONT)
                self.log.append((time.strftime("%H:%M:%S"), action, round(others, 2)))
                print(f"idle gate: {action} the runs (other processes used {others:.2f} cores)", flush=True)

    def __enter__(self) -> IdleGate:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.stopped:
            self._signal(signal.SIGCONT)


def end_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's worker processes (continued first: the idle gate may have stopped them, and a stopped
    process does not act on SIGTERM), so an interrupted benchmark leaves none behind; their runs are not logged."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
    for proc in procs:
        proc.join(timeout=10)
    pool.shutdown(wait=False, cancel_futures=True)
