"""kill -9 at every point of a checkpoint write, a prune and the metrics rewrite: the run resumes and ends with the
weights of the uninterrupted run, bit for bit.

Each crash runs in a child process that patches one crash point and sends itself SIGKILL there (no handler, no
cleanup, like a power cut or the OOM killer); one helper process imports the library once and forks a child per
crash point, all running concurrently, to keep the suite fast. The resume runs
in this process. Checkpoints: every 2 steps, keep 1, so the save at step 4 writes step_000004 and prunes step_000002.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmgrpo.train import checkpoint as ckpt
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

BASE = {
    "pipeline": "bandit",
    "data": {"options": {"num_prompts": 6, "num_arms": 4}},
    "rewards": [{"name": "bandit_arm_value"}],
    "trainer": {"max_steps": 6, "prompts_per_step": 2, "group_size": 4, "lr": 0.1, "epochs": 2, "minibatches": 2,
                "progress": False, "checkpoint_every": 2, "keep_checkpoints": 1},
}  # fmt: skip

CHILD = r"""
import json, os, shutil, signal, sys
from pathlib import Path
from mmgrpo.train import checkpoint as ckpt, run_dir as rd
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

def crash_run(point, nth, base, overrides):
    seen = [0]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def hit(match=True):
        if match:
            seen[0] += 1
        return match and seen[0] == nth

    def wrap(obj, name, before=None, after=None):
        real = getattr(obj, name)
        def f(*a, **k):
            if before and before(*a, **k):
                die()
            out = real(*a, **k)
            if after and after(*a, **k):
                die()
            return out
        setattr(obj, name, f)

    is_ckpt = lambda src, *a, **k: Path(src).name.startswith(".tmp-step")
    if point == "before_tensors":
        wrap(ckpt, "save_file", before=lambda *a, **k: hit())
    elif point == "torn_tensors":
        real = ckpt.save_file
        def torn(tensors, path, *a, **k):
            real(tensors, path, *a, **k)
            if hit():
                data = Path(path).read_bytes()
                Path(path).write_bytes(data[: len(data) // 2])
                die()
        ckpt.save_file = torn
    elif point == "before_marker":
        real_dumps = ckpt.json.dumps
        class J:
            loads = staticmethod(json.loads)
            @staticmethod
            def dumps(obj, *a, **k):
                if isinstance(obj, dict) and "files" in obj and hit():
                    die()
                return real_dumps(obj, *a, **k)
        ckpt.json = J
    elif point == "before_fsync":
        wrap(ckpt, "_fsync_files", before=lambda *a, **k: hit())
    elif point == "before_rename":
        wrap(os, "replace", before=lambda src, *a, **k: hit(is_ckpt(src)))
    elif point == "after_rename":
        wrap(os, "replace", after=lambda src, *a, **k: hit(is_ckpt(src)))
    elif point == "prune_after_marker":
        wrap(ckpt, "_fsync_dir", after=lambda p: hit(Path(p).name.startswith("step_")))
    elif point == "prune_mid_rmtree":
        real_rmtree = shutil.rmtree
        def rmtree(p, *a, **k):
            if Path(p).name.startswith("step_") and hit():
                (Path(p) / "tensors.safetensors").unlink()
                die()
            return real_rmtree(p, *a, **k)
        shutil.rmtree = rmtree
    elif point == "metrics_torn_tmp":
        def torn_write(path, text):
            if path.name == "metrics.jsonl" and hit():
                path.with_name(f".{path.name}.tmp-{os.getpid()}").write_text(text[: len(text) // 2])
                die()
            return real_write(path, text)
        real_write, rd._atomic_write = rd._atomic_write, torn_write
    elif point == "metrics_before_rename":
        wrap(os, "replace", before=lambda src, *a, **k: hit(Path(src).name.startswith(".metrics.jsonl.tmp")))
    else:
        os._exit(4)  # unknown crash point
    train(load_config(None, overrides, base=base))
    os._exit(3)  # the crash point was never reached

# imported once, then one fork per crash point (torch is single-threaded here: OMP_NUM_THREADS=1, nothing run yet)
children = {}
for point, nth, base, overrides in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        try:
            crash_run(point, nth, base, overrides)
        finally:
            os._exit(5)
    children[pid] = point
status = {}
for _ in range(len(children)):
    pid, st = os.wait()
    status[children[pid]] = -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
print(json.dumps(status))
"""

CHECKPOINT_POINTS = ["before_tensors", "torn_tensors", "before_marker", "before_fsync", "before_rename",
                     "after_rename", "prune_after_marker", "prune_mid_rmtree"]  # fmt: skip
METRICS_POINTS = ["metrics_torn_tmp", "metrics_before_rename"]


def cfg(tmp_path, *overrides):
    return load_config(None, [f"run.output_dir={tmp_path}", *overrides], base=BASE)


def final_weights(run_dir):
    path, notes = ckpt.latest_valid_checkpoint(Path(run_dir) / "checkpoints")
    state = ckpt.load_checkpoint(path)
    return state["model"], state["step"]


def no_complete_looking_shell(run_dir):
    for d in (Path(run_dir) / "checkpoints").glob("step_*"):
        if (d / "COMPLETE").is_file():
            ckpt.verify_checkpoint(d)  # a folder marked complete always verifies


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """The folder holding, for each crash point, the run directory a child killed at that point left behind."""
    root = tmp_path_factory.mktemp("faults")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])
    jobs = [[point, 2, BASE, [f"run.output_dir={root}", f"run.name={point}"]] for point in CHECKPOINT_POINTS]
    for point in METRICS_POINTS:
        # a run killed after step 4 whose newest checkpoint is step 2, then resumed: it dies rewriting metrics.jsonl
        part = train(cfg(root, f"run.name={point}", "trainer.stop_after_steps=4", "trainer.keep_checkpoints=2"))
        ckpt.remove_checkpoint(part.run_dir / "checkpoints" / "step_000004")
        assert len((part.run_dir / "metrics.jsonl").read_text().splitlines()) == 4
        jobs.append([point, 1, BASE, [f"resume={part.run_dir}"]])
    argv = [sys.executable, "-c", CHILD, json.dumps(jobs)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    assert status == {point: -signal.SIGKILL for point, *_ in jobs}, (status, proc.stderr[-3000:])
    return root


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return final_weights(train(cfg(tmp_path_factory.mktemp("full"), "run.name=full")).run_dir)


@pytest.mark.parametrize("point", CHECKPOINT_POINTS + METRICS_POINTS)
def test_kill_9_then_resume_equals_the_uninterrupted_run(crashed, uninterrupted, point):
    run_dir = crashed / point
    no_complete_looking_shell(run_dir)
    resumed = train(cfg(crashed, f"resume={run_dir}"))
    assert resumed.step == 6
    no_complete_looking_shell(run_dir)
    (want, want_step), (got, got_step) = uninterrupted, final_weights(run_dir)
    assert want_step == got_step == 6 and want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), point
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6], steps
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # a half-written save is cleaned up by the next
    shutil.rmtree(run_dir)
