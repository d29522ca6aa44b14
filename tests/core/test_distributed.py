"""A 2-process CPU run (gloo, accelerate launch) makes the same advantages and update as the 1-process run."""

import json
import os
import re
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmgrpo.testing.launch import accelerate_exe, accelerate_launch
from mmgrpo.train import checkpoint as ckpt
from mmgrpo.train.accelerator import COLLECTIVE_TIMEOUT
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

CONFIG = {
    "pipeline": "bandit",
    "run": {"name": "x", "seed": 3},
    "data": {"options": {"num_prompts": 8, "num_arms": 5}},
    "rewards": [{"name": "bandit_arm_value"}],
    "advantage": {"estimator": "batch_std"},  # its std spans the whole batch: must be gathered over ranks
    "loss": {"options": {"clip_high": 0.28}, "beta": 0.02},
    "trainer": {
        "max_steps": 3, "prompts_per_step": 4, "group_size": 6, "lr": 0.05, "epochs": 2, "minibatches": 2,
        "micro_batch_size": 4, "progress": False, "dump_advantages": True, "checkpoint_every": 0,
    },
}  # fmt: skip


CLI_SAYING_ITS_RANK = """
import sys
from accelerate.state import PartialState
from mmgrpo.train.cli import main
import torch
import torch.distributed as dist
from mmgrpo.train.trainer import Trainer
wait, real = [], Trainer.train
def train(self):  # the process group is gone after the run: read its timeout while it trains
    wait.append(dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout)
    return real(self)
Trainer.train = train
code = main(sys.argv[1:])
wait = wait[0] if wait else None
print(f"process {PartialState().process_index} of {PartialState().num_processes}, collectives wait {wait}", flush=True)
sys.exit(code)
"""


def _accelerate():
    try:
        return accelerate_exe()
    except RuntimeError as e:
        pytest.fail(str(e))


def test_two_processes_match_one_process(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(CONFIG))
    one = train(load_config(cfg_path, [f"run.output_dir={tmp_path}", "run.name=one"]))
    (tmp_path / "cli.py").write_text(CLI_SAYING_ITS_RANK)
    proc = accelerate_launch([tmp_path / "cli.py", "train", cfg_path, f"run.output_dir={tmp_path}", "run.name=two"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(re.findall(r"process \d of \d", proc.stdout)) == ["process 0 of 2", "process 1 of 2"], proc.stdout
    # the main process alone writes and exports checkpoints while the others wait (NCCL's default: 10 minutes)
    assert proc.stdout.count(f"collectives wait {COLLECTIVE_TIMEOUT}") == 2, proc.stdout
    for step in range(3):
        name = f"debug/adv_step_{step:06d}.safetensors"
        a, b = load_file(str(one.run_dir / name)), load_file(str(tmp_path / "two" / name))
        assert torch.equal(a["rewards"], b["rewards"]), f"step {step}: different samples"
        assert torch.allclose(a["advantages"], b["advantages"], atol=1e-6), f"step {step}"
    # the logged update metrics are every process's rows, as the one process logs them (they were the main
    # process's own: its share of the loss, its rows' ratios and skipped rows)
    m1 = [json.loads(x) for x in (one.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss/' in x]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if '"loss/' in x]
    keys = [k for k in m1[0] if k.startswith(("loss/", "update/", "grad_norm"))]
    assert len(m1) == len(m2) == 3 and {"loss/policy", "loss/kl", "loss/ratio_max"} <= set(keys), keys
    for a, b in zip(m1, m2):
        assert {k: pytest.approx(a[k], rel=1e-5, abs=1e-7) for k in keys} == {k: b[k] for k in keys}
    p1 = ckpt.load_checkpoint(ckpt.latest_checkpoint(one.run_dir / "checkpoints"))["model"]["logits"]
    p2 = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "two" / "checkpoints"))["model"]["logits"]
    assert not torch.equal(p1, torch.zeros_like(p1))
    assert torch.allclose(p1, p2, atol=1e-6), (p1 - p2).abs().max()


def test_launcher_precision_applies_unless_the_config_sets_one_and_a_conflict_names_both(monkeypatch):
    from mmgrpo.core.errors import UserError
    from mmgrpo.train.accelerator import launch_precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert launch_precision(None) == "no" and launch_precision("bf16") == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    assert launch_precision(None) == "bf16" and launch_precision("bf16") == "bf16"
    with pytest.raises(UserError, match=r"trainer.mixed_precision=no in the config, but the launcher asks for bf16"):
        launch_precision("no")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # the launcher's default: no request
    assert launch_precision("fp16") == "fp16"


def test_accelerate_launch_mixed_precision_reaches_the_run_and_its_config_yaml(tmp_path):
    """A real `accelerate launch --mixed_precision bf16` of a config that does not set one: the run uses bf16 and its
    config.yaml records it; the same launch of a config that says `no` fails with both values named."""
    cfg = {**CONFIG, "trainer": {**CONFIG["trainer"], "max_steps": 1, "epochs": 1, "minibatches": 1}}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [_accelerate(), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "bf16",
            "--dynamo_backend", "no", "--cpu", "-m", "mmgrpo.train.cli", "train", str(cfg_path),
            f"run.output_dir={tmp_path}"]  # fmt: skip
    proc = subprocess.run([*base, "run.name=bf16"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load((tmp_path / "bf16" / "config.yaml").read_text())["trainer"]["mixed_precision"] == "bf16"
    proc = subprocess.run([*base, "run.name=clash", "trainer.mixed_precision=no"], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    assert "trainer.mixed_precision=no in the config, but the launcher asks for bf16" in proc.stderr
    assert "mmgrpo/" not in "".join(line for line in proc.stderr.splitlines() if line.lstrip().startswith("File "))
    # (accelerate's launcher prints its own traceback for the child's exit status 2; mmgrpo's frames are not in it)


RANK_ONE_FAILS = """
import os

def arm_value(samples, prompts, meta, ctx):
    if os.environ.get("RANK") == "1" and ctx.step == int(os.environ["FAIL_AT"]):
        raise ValueError("boom on rank 1")
    return [float(m["arm_values"][int(a)]) for a, m in zip(samples, meta)]
"""


@pytest.mark.parametrize("fail_at", [2, 0])
def test_when_one_process_stops_the_others_say_so_in_one_paragraph_not_a_gloo_traceback(tmp_path, fail_at):
    """The walkthrough of 2026-12-07: a reward raising on rank 1 printed rank 1's paragraph, then rank 0's 44 lines of
    gloo traceback ("Connection closed by peer") with no way to go on; in a new run's first step rank 1 said
    "continue with resume=" of a directory rank 0 then removed."""
    (tmp_path / "rank_one_fails.py").write_text(RANK_ONE_FAILS)
    cfg = {**CONFIG, "rewards": [{"name": "rank_one_fails.arm_value"}], "run": {"name": "r", "seed": 3}}
    cfg["trainer"] = {**CONFIG["trainer"], "max_steps": 4, "checkpoint_every": 1, "dump_advantages": False}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    os.environ["FAIL_AT"] = str(fail_at)
    try:
        proc = accelerate_launch(["-m", "mmgrpo.train.cli", "train", "c.yaml", f"run.output_dir={tmp_path}"],
                                 pythonpath=[tmp_path], cwd=tmp_path)  # fmt: skip
    finally:
        del os.environ["FAIL_AT"]
    err = " ".join(proc.stderr.split())
    assert proc.returncode != 0
    said = f"raised ValueError in step {fail_at + 1} (ctx.step {fail_at}): 'boom on rank 1'"
    assert f"error: reward 'rank_one_fails.arm_value' {said}" in err
    assert "error: another of the run's 2 processes stopped (a collective between them failed:" in err, err[-3000:]
    assert "its own message, if it wrote one, is above" in err
    assert not re.search(r'File "[^"]*/mmgrpo/', proc.stderr)  # no process's traceback (the launcher's own remains)
    if fail_at:  # both name the checkpoint that continues the run
        assert err.count(f"continue with: mmgrpo train {tmp_path / 'r' / 'config.yaml'} resume={tmp_path / 'r'} "
                         "(through the launcher, as this run of 2 processes was: accelerate launch ... -m "
                         "mmgrpo.train.cli train ...; alone it resumes on one process)") == 2  # fmt: skip
    else:  # nothing trained: both say the same command starts again, and the directory is gone
        assert err.count("the same command starts the run again") == 2 and "continue with:" not in err
        assert not (tmp_path / "r").exists()


def test_combined_metrics_by_hand():
    """Two processes' minibatch metrics as one process holding both logs them. Process 1 has no masked unit: its unit
    means and its ratio_max are placeholders (the end review of 2026-12-07: ratio_max took its 1.0)."""
    from mmgrpo.train.update import combined_metrics

    p0 = ({"loss/policy": -0.2, "loss/ratio_mean": 0.95, "loss/ratio_max": 0.97, "update/skipped_rows_frac": 0.5},
          10.0, 8, 4)  # fmt: skip
    p1 = ({"loss/policy": 0.0, "loss/ratio_mean": 1.0, "loss/ratio_max": 1.0, "update/skipped_rows_frac": 0.0},
          0.0, 8, 8)  # fmt: skip
    p2 = ({"loss/policy": 0.4, "loss/ratio_mean": 1.05, "loss/ratio_max": 1.2}, 30.0, 8, 6)
    out = combined_metrics([p0, p1, p2], {"loss/policy"})
    assert out["loss/policy"] == pytest.approx((-0.2 + 0.0 + 0.4) / 3)  # shares of the loss / world size: their mean
    assert out["loss/ratio_mean"] == pytest.approx((0.95 * 10 + 1.05 * 30) / 40)  # per masked unit
    assert out["loss/ratio_max"] == 1.2 and combined_metrics([p0, p1], set())["loss/ratio_max"] == 0.97
    assert out["update/skipped_rows_frac"] == pytest.approx((24 - 18) / 24)
    # no process with a masked unit: the placeholders' plain mean and max
    none = combined_metrics([p1, (p1[0], 0.0, 8, 8)], set())
    assert none["loss/ratio_mean"] == 1.0 and none["loss/ratio_max"] == 1.0


def test_a_broken_pipe_outside_a_collective_is_not_called_another_process_stopping():
    """Only a collective's failure (gloo / NCCL / torch.distributed's error) is reworded; the end review of
    2026-12-07: any RuntimeError saying "Broken pipe" (a reward's own socket) was."""
    from mmgrpo.train.run import _peer_stopped

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [1.2.3.4]:5")
    assert "another of the run's 2 processes stopped" in str(_peer_stopped(gloo, 2))
    assert _peer_stopped(gloo, 1) is None
    assert _peer_stopped(RuntimeError("judge: [Errno 32] Broken pipe"), 2) is None
    assert _peer_stopped(ValueError("Connection closed by peer gloo"), 2) is None


RANK_ZERO_WAITS = """
import os, time

def arm_value(samples, prompts, meta, ctx):
    if ctx.step == int(os.environ["FAIL_AT"]) and os.environ.get("RANK") == "1":
        raise ValueError("boom on rank 1")
    if ctx.step == int(os.environ["FAIL_AT"]):  # process 0 waits, as in an NCCL collective with a process gone
        time.sleep(300)
    return [float(m["arm_values"][int(a)]) for a, m in zip(samples, meta)]
"""


@pytest.mark.parametrize("fail_at", [1, 0])
def test_under_a_launcher_that_leaves_each_process_alone_the_others_stop_within_seconds(tmp_path, fail_at):
    """Launched as srun launches (one process per task, no torchrun to end the others) with NCCL, a process whose
    collective waits for one that stopped on an error waited the whole collective timeout (an hour), silently. Here
    process 0 waits in its reward as it would in such a collective; it stops once the grace (2 s here) has passed,
    naming process 1's error and how to continue, instead of after the 300 s wait."""
    import sys
    import time

    from mmgrpo.testing.launch import free_port

    (tmp_path / "rank_zero_waits.py").write_text(RANK_ZERO_WAITS)
    cfg = {**CONFIG, "rewards": [{"name": "rank_zero_waits.arm_value"}], "run": {"name": "w", "seed": 3}}
    cfg["trainer"] = {**CONFIG["trainer"], "max_steps": 4, "checkpoint_every": 1, "dump_advantages": False}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    port, path = free_port(), os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    procs = []
    for rank in (0, 1):  # what srun gives each task: its rank and the rendezvous, nothing that watches the others
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "ACCELERATE_USE_CPU": "true",
               "OMP_NUM_THREADS": "1", "MMGRPO_PEER_GRACE_S": "2", "PYTHONPATH": path,
               "FAIL_AT": str(fail_at)}  # fmt: skip
        cmd = [sys.executable, "-m", "mmgrpo.train.cli", "train", "c.yaml", f"run.output_dir={tmp_path}"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True))
    start = time.monotonic()
    try:
        errs = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert time.monotonic() - start < 200, errs  # not the 300 s wait
    zero, one = (" ".join(e.split()) for e in errs)
    assert procs[1].returncode == 2 and "error: reward 'rank_zero_waits.arm_value' raised ValueError" in one, one
    assert procs[0].returncode == 2, zero[-3000:]
    assert ("error: process 1 of the run's 2 processes stopped (UserError: reward 'rank_zero_waits.arm_value' raised "
            f"ValueError in step {fail_at + 1}") in zero, zero[-3000:]  # fmt: skip
    assert "and this process (process 0) was still in its step 2 s later" in zero
    if fail_at:
        assert f"continue with: mmgrpo train {tmp_path / 'w' / 'config.yaml'} resume={tmp_path / 'w'}" in zero
    else:  # nothing trained: the main process removes the new run directory, as its error path would
        assert f"Nothing was trained, so the new run directory {tmp_path / 'w'} was removed" in zero
        assert not (tmp_path / "w").exists()
