"""Several CPU processes of a real ``accelerate launch`` (gloo), for the tests that compare a multi-process run with
a one-process run.

``accelerate launch --cpu --num_processes 2`` starts one process (its simple launcher); several gloo processes are
torchrun's (``--multi_gpu``) with ``ACCELERATE_USE_CPU=true``, which is what :func:`accelerate_launch` runs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for the launcher's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_exe() -> str:
    """The ``accelerate`` command installed next to this Python (the same environment as the test)."""
    exe = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if exe is None:
        raise RuntimeError(f"the 'accelerate' command is not installed next to {sys.executable}")
    return exe


def accelerate_launch(
    args: Sequence[str],
    processes: int = 2,
    pythonpath: Sequence[str | Path] = (),
    cwd: str | Path | None = None,
    timeout: float = 300.0,
) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``args`` (a script and its arguments, or ``-m module ...``) on ``processes`` CPU
    processes of one thread each; ``pythonpath`` goes in front of the environment's. Returns the finished process
    (stdout and stderr captured as text)."""
    path = os.pathsep.join([*map(str, pythonpath), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "PYTHONPATH": path}
    cmd = [accelerate_exe(), "launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), *map(str, args)]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
