"""Sharded training (FSDP2) with 2 CPU processes: save -> kill -9 -> resume equals the uninterrupted sharded run and
the unsharded 1-process run; the sharded checkpoint is verified file by file and reads back as full tensors.

The runs are real ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` launches of the CLI with
``ACCELERATE_USE_CPU=true`` (2 gloo processes; mmgrpo turns accelerate's state into FSDP there, see
``mmgrpo.train.accelerator.enable_cpu_fsdp``). The bandit's logits table [8, 5] is the model: FSDP2 gives each rank 4
of its 8 rows, and the AdamW moments are sharded the same way. A crash run is the CLI behind a small script that sends
SIGKILL at one point. Real models with several shard units: a tiny SD3 (DiffusionNFT) and a tiny Qwen2-VL (GRPO, rows
of different lengths)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open

from mmgrpo.core.errors import UserError
from mmgrpo.testing.launch import free_port
from mmgrpo.train import checkpoint as ckpt
from mmgrpo.train.accelerator import enable_cpu_fsdp
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

ROOT = Path(__file__).parents[2]
NEEDS_CPU_FSDP = pytest.mark.skipif(
    not hasattr(torch.cpu.Stream, "record_event"),
    reason=f"FSDP on CPU processes needs a torch newer than {torch.__version__} (its CPU streams record no events); "
    "mmgrpo refuses it with one message (test_fsdp_on_cpu_with_a_torch_whose_cpu_streams_record_no_events_...)",
)
FSDP = ROOT / "configs" / "accelerate" / "fsdp.yaml"
CONFIG = {
    "pipeline": "bandit",
    "run": {"seed": 3},
    "data": {"options": {"num_prompts": 8, "num_arms": 5}},
    "rewards": [{"name": "bandit_arm_value"}],
    "advantage": {"estimator": "batch_std"},
    "loss": {"options": {"clip_high": 0.28}, "beta": 0.02},
    "trainer": {
        "max_steps": 4, "prompts_per_step": 4, "group_size": 6, "lr": 0.05, "epochs": 2, "minibatches": 2,
        "micro_batch_size": 4, "progress": False, "checkpoint_every": 2, "keep_checkpoints": 1, "ema_decay": 0.9,
    },
}  # fmt: skip

CRASH = r"""
import os, signal, sys
from mmgrpo.train import checkpoint as ckpt, trainer as tr
from mmgrpo.train.cli import main

point, argv = sys.argv[1], sys.argv[2:]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "after_checkpoint":  # every rank dies in step 3, after the checkpoint of step 2
    real_update = tr.Trainer.update
    def update(self, *a, **k):
        if self.step == 2:
            die()
        return real_update(self, *a, **k)
    tr.Trainer.update = update
elif point == "rank1_before_rename":  # rank 1 dies with its shards of step 4 written, before the marker and rename
    real_digest = ckpt._digest
    def digest(path):
        if ".tmp-step_000004" in str(path) and int(os.environ["RANK"]) == 1:
            die()
        return real_digest(path)
    ckpt._digest = digest
else:
    sys.exit(4)
sys.exit(main(argv))
"""


def _launch(tmp_path: Path, *args: str, script: list[str] | None = None, processes: int = 2):
    """``accelerate launch --config_file configs/accelerate/fsdp.yaml`` of CPU processes (the CLI, or ``script``)."""
    exe = Path(sys.executable).with_name("accelerate")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    target = script or ["-m", "mmgrpo.train.cli"]
    cmd = [str(exe), "launch", "--config_file", str(FSDP), "--num_processes", str(processes), "--mixed_precision",
           "no", "--main_process_port", str(port), *target, *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)


def _said(proc: subprocess.CompletedProcess) -> str:
    """What a failed launch said: every process's error lines (a rank's own traceback or abort reason comes long
    before the launcher's summary, which alone filled the last 3000 characters), then the end of stderr."""
    lines = proc.stderr.splitlines()
    errors = [x for x in lines if any(w in x for w in ("Error", "error:", "terminate", "Traceback", "Exception"))]
    return "\n".join(errors[:40]) + "\n...\n" + proc.stderr[-2000:]


def _state(run_dir: Path) -> dict:
    path, notes = ckpt.latest_valid_checkpoint(run_dir / "checkpoints")
    assert path is not None, notes
    return ckpt.load_checkpoint(path)


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    """Every tensor of a loaded checkpoint state by its path (model, AdamW moments and steps, EMA shadow)."""
    out: dict[str, torch.Tensor] = {}
    ckpt.flatten_state(state, "", out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(folder, the uninterrupted 2-process FSDP run's directory, the unsharded 1-process run's directory)."""
    root = tmp_path_factory.mktemp("sharded")
    (root / "cfg.yaml").write_text(yaml.safe_dump(CONFIG))
    one = train(load_config(root / "cfg.yaml", [f"run.output_dir={root}", "run.name=one"]))
    proc = _launch(root, "train", str(root / "cfg.yaml"), f"run.output_dir={root}", "run.name=fsdp")
    assert proc.returncode == 0, _said(proc)
    return root, root / "fsdp", one.run_dir


@NEEDS_CPU_FSDP
def test_fsdp_run_is_sharded_and_equals_the_unsharded_run(runs):
    root, fsdp, one = runs
    path = ckpt.latest_checkpoint(fsdp / "checkpoints")
    marker = json.loads((path / "COMPLETE").read_text())
    assert marker["sharded"] == {"world_size": 2} and ckpt.is_sharded(path)
    shards = sorted(n for n in marker["files"] if n.startswith("shards/"))
    assert len(shards) == 2  # one file per rank, each holding its 4 rows of every sharded tensor
    for name in shards:
        with safe_open(str(path / name), "pt") as f:
            assert f.get_slice("/model/logits").get_shape() == [4, 5]
            assert f.get_slice("/optimizer/state/0/exp_avg").get_shape() == [4, 5]
    skeleton = json.loads((path / "state.json").read_text())
    assert '"__sharded__": "/ema/shadow/0"' in json.dumps(skeleton)  # the EMA shadow is sharded too
    got, want = _tensors(_state(fsdp)), _tensors(_state(one))
    assert got.keys() == want.keys() and got["/model/logits"].shape == (8, 5)
    assert not torch.equal(want["/model/logits"], torch.zeros(8, 5))
    # FSDP2 reduce-scatters (averages) the same per-row gradients DDP all-reduces: the weights agree exactly here;
    # the second moments differ in the last bits of float32 (reduction order), hence the tolerance
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-7), (k, (got[k] - want[k]).abs().max())


@NEEDS_CPU_FSDP
@pytest.mark.parametrize("point", ["after_checkpoint", "rank1_before_rename"])
def test_fsdp_kill_9_then_resume_equals_the_uninterrupted_sharded_run(runs, point):
    root, fsdp, one = runs
    (root / "crash.py").write_text(CRASH)
    crashed = _launch(root, point, "train", str(root / "cfg.yaml"), f"run.output_dir={root}", f"run.name={point}",
                      script=[str(root / "crash.py")])  # fmt: skip
    run_dir = root / point
    assert crashed.returncode != 0 and "SIGKILL" in crashed.stderr, _said(crashed)
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["step_000002"]
    if point == "rank1_before_rename":  # the half-written step 4: shards there, no marker, not a checkpoint
        (tmp,) = (run_dir / "checkpoints").glob(".tmp-step_000004-*")
        assert list((tmp / "shards").glob("*.safetensors")) and not (tmp / "COMPLETE").exists()
    resumed = _launch(root, "train", str(root / "cfg.yaml"), f"resume={run_dir}")
    assert resumed.returncode == 0, _said(resumed)
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["step_000004"]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # the next save cleaned up the half-written one
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    state = _state(run_dir)
    got, want, unsharded = _tensors(state), _tensors(_state(fsdp)), _tensors(_state(one))
    assert state["step"] == 4 and got.keys() == want.keys() == unsharded.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), (point, k)  # bit for bit: the same sharded computation
        assert torch.allclose(got[k], unsharded[k], rtol=1e-5, atol=1e-7), (point, k)


@NEEDS_CPU_FSDP
def test_a_sharded_checkpoint_resumes_on_one_process_sharded_or_not(runs, tmp_path):
    """The 2-process checkpoint of step 2, resumed by 1 FSDP process (the slices resharded over a mesh of 1) and by a
    plain unsharded process (the shards joined): both end where the uninterrupted runs end."""
    import shutil

    root, fsdp, one = runs
    part = _launch(root, "train", str(root / "cfg.yaml"), f"run.output_dir={tmp_path}", "run.name=part",
                   "trainer.stop_after_steps=2")  # fmt: skip
    assert part.returncode == 0, _said(part)
    shutil.copytree(tmp_path / "part", tmp_path / "plain")
    resumed = _launch(root, "train", str(root / "cfg.yaml"), f"resume={tmp_path / 'part'}", processes=1)
    assert resumed.returncode == 0, _said(resumed)
    plain = train(load_config(root / "cfg.yaml", [f"resume={tmp_path / 'plain'}"]))
    assert plain.mesh is None and plain.step == 4
    assert not ckpt.is_sharded(ckpt.latest_checkpoint(tmp_path / "plain" / "checkpoints"))
    marker = json.loads((ckpt.latest_checkpoint(tmp_path / "part" / "checkpoints") / "COMPLETE").read_text())
    assert marker["sharded"] == {"world_size": 1}
    want = _tensors(_state(fsdp))
    for run in ("part", "plain"):
        got = _tensors(_state(tmp_path / run))
        assert got.keys() == want.keys()
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-7), (run, k, (got[k] - want[k]).abs().max())


@NEEDS_CPU_FSDP
def test_sharded_checkpoint_verifies_every_shard(runs, tmp_path):
    import shutil

    root, fsdp, one = runs
    src = ckpt.latest_checkpoint(fsdp / "checkpoints")
    ckpt.verify_checkpoint(src)
    shard = sorted((src / "shards").iterdir())[1]
    flipped = tmp_path / "flipped" / src.name
    shutil.copytree(src, flipped)
    data = bytearray((flipped / "shards" / shard.name).read_bytes())
    data[-1] ^= 1  # one bit of the last tensor value of rank 1's slice
    (flipped / "shards" / shard.name).write_bytes(bytes(data))
    with pytest.raises(ckpt.CorruptCheckpoint, match=f"shards/{shard.name} does not match its SHA-256"):
        ckpt.load_checkpoint(flipped)
    deleted = tmp_path / "deleted" / src.name
    shutil.copytree(src, deleted)
    (deleted / "shards" / shard.name).unlink()
    with pytest.raises(ckpt.CorruptCheckpoint, match=f"shards/{shard.name} is missing"):
        ckpt.verify_checkpoint(deleted)
    added = tmp_path / "added" / src.name
    shutil.copytree(src, added)
    shutil.copy(added / "shards" / shard.name, added / "shards" / "shard-00003-model-00001-of-00001.safetensors")
    with pytest.raises(ckpt.CorruptCheckpoint, match="shard-00003-model-00001-of-00001.safetensors is not in the"):
        ckpt.verify_checkpoint(added)
    # the newest checkpoint failing, resume falls back to an older one that verifies (here: none is left)
    assert ckpt.latest_valid_checkpoint(tmp_path / "flipped")[0] is None


@NEEDS_CPU_FSDP
def test_full_tensors_of_a_sharded_checkpoint_are_the_ranks_slices_joined(runs):
    root, fsdp, one = runs
    path = ckpt.latest_checkpoint(fsdp / "checkpoints")
    full = ckpt.load_checkpoint(path)["model"]["logits"]
    rows = []
    for name in sorted((path / "shards").iterdir()):  # shard-00001 is rank 0's rows 0-3, shard-00002 rank 1's
        with safe_open(str(name), "pt") as f:
            rows.append(f.get_tensor("/model/logits"))
            assert json.loads(f.metadata()["DCP_SHARDING_INFO"])["/model/logits"]["saved_offsets"] == [
                4 * len(rows[:-1]),
                0,
            ]
    assert torch.equal(full, torch.cat(rows))


@NEEDS_CPU_FSDP
def test_an_unsharded_checkpoint_resumes_sharded(runs, tmp_path):
    """The unsharded 1-process run's step-4 checkpoint continued to step 6 on 2 FSDP processes (weights, AdamW
    moments and EMA shadow split like the parameters) ends where the same continuation in one process ends."""
    import shutil

    root, fsdp, one = runs
    for name in ("sharded", "plain"):
        shutil.copytree(one, tmp_path / name)
    proc = _launch(root, "train", str(root / "cfg.yaml"), f"resume={tmp_path / 'sharded'}", "trainer.max_steps=6")
    assert proc.returncode == 0, _said(proc)
    train(load_config(root / "cfg.yaml", [f"resume={tmp_path / 'plain'}", "trainer.max_steps=6"]))
    path = ckpt.latest_checkpoint(tmp_path / "sharded" / "checkpoints")
    assert path.name == "step_000006" and ckpt.is_sharded(path)
    got, want = _tensors(ckpt.load_checkpoint(path)), _tensors(_state(tmp_path / "plain"))
    start = _tensors(_state(one))
    assert got.keys() == want.keys() and "/optimizer/state/0/exp_avg_sq" in got and "/ema/shadow/0" in got
    assert not torch.allclose(want["/model/logits"], start["/model/logits"], atol=1e-3)  # steps 5-6 trained
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-7), (k, (got[k] - want[k]).abs().max())


def test_fsdp_on_cpu_with_a_torch_whose_cpu_streams_record_no_events_is_one_error(monkeypatch):
    """torch 2.6 (mmgrpo's minimum) runs FSDP2 on GPUs but not on CPU processes: its CPU stream has no
    record_event, and the first forward's all-gather failed with an AttributeError on every rank."""

    class OldCPUStream:  # torch 2.6's torch.cpu.Stream: no record_event
        pass

    monkeypatch.setattr(torch.cpu, "Stream", OldCPUStream)
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(UserError, match=r"needs a torch whose CPU streams record events .* torch 2\.\d+"):
        enable_cpu_fsdp()


def test_fsdp_on_cpu_in_bf16_is_refused_not_trained_in_float32_under_a_bf16_record(monkeypatch):
    """configs/accelerate/fsdp.yaml sets bf16 (for GPUs): on CPU processes the plugin never got it, so the run
    trained in float32 while config.yaml recorded bf16 (the same grad norms as float32 to 1e-7)."""
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(UserError, match=r"FSDP on CPU processes runs in float32 only \(mixed precision bf16: the "
                                        r"launcher's, .*or the config's trainer.mixed_precision\); launch with "
                                        r"--mixed_precision no and leave trainer.mixed_precision unset"):  # fmt: skip
        enable_cpu_fsdp("bf16")


def test_several_processes_without_a_gpu_or_cpu_flag_are_an_error(tmp_path):
    """Without ACCELERATE_USE_CPU=true accelerate makes each CPU process a separate 1-process run (all writing the
    same run directory); mmgrpo stops with the fix instead."""
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(FSDP), "--num_processes",
           "2", "--mixed_precision", "no", "--main_process_port", str(port), "-m", "mmgrpo.train.cli", "train",
           str(tmp_path / "cfg.yaml"), f"run.output_dir={tmp_path}", "run.name=x"]  # fmt: skip
    if torch.cuda.is_available():
        pytest.skip("with a GPU the processes find it")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    err = " ".join(proc.stderr.split())
    assert "the launcher started 2 processes (WORLD_SIZE=2), but accelerate found no GPU" in err
    assert "ACCELERATE_USE_CPU=true" in err
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "name, kind, key, value",
    [
        ("fsdp", "FSDP", "fsdp_version", 2),
        ("deepspeed_zero2", "DEEPSPEED", "zero_stage", 2),
        ("deepspeed_zero3", "DEEPSPEED", "zero_stage", 3),
    ],
)
def test_accelerate_configs_parse_as_accelerate_reads_them(name, kind, key, value):
    """accelerate's own parser of ``--config_file`` (the DeepSpeed ones run in tests/core/test_deepspeed.py)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert cfg.distributed_type == kind and cfg.mixed_precision == "bf16" and not cfg.use_cpu
    section = cfg.fsdp_config if kind == "FSDP" else cfg.deepspeed_config
    assert section[key] == value


def _fsdp_and_unsharded(tmp_path: Path, cfg: dict) -> tuple[Path, Any]:
    """Train ``cfg`` on 2 FSDP processes (run ``fsdp``) and in this process (run ``one``): (the FSDP run's latest
    checkpoint, the unsharded trainer)."""
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = _launch(tmp_path, "train", str(tmp_path / "cfg.yaml"), f"run.output_dir={tmp_path}", "run.name=fsdp")
    assert proc.returncode == 0, _said(proc)
    one = train(load_config(tmp_path / "cfg.yaml", [f"run.output_dir={tmp_path}", "run.name=one"]))
    return ckpt.latest_checkpoint(tmp_path / "fsdp" / "checkpoints"), one


@NEEDS_CPU_FSDP
def test_fsdp_tiny_sd3_nft_matches_the_unsharded_run_and_exports_full_weights(tmp_path):
    """A real model with several FSDP units (tiny SD3, one unit per JointTransformerBlock), the README demo's objective
    (DiffusionNFT: its sampling policy is an EMA of the trained, here sharded, weights), full fine-tuning: 3 steps on
    2 processes equal the unsharded run within float32 rounding, and the checkpoint's export (written by the main
    process from the joined shards) is a diffusers pipeline holding exactly the checkpoint's full weights."""
    from diffusers import SD3Transformer2DModel

    from mmgrpo.testing.tiny_sd3 import save_tiny_sd3

    base = save_tiny_sd3(tmp_path / "base")
    cfg = {
        "pipeline": "text_to_image",
        "run": {"seed": 1},
        "policy": {"options": {"family": "sd3", "path": base, "num_steps": 2, "lora_rank": 0,
                               "sde": {"noise_level": 0.0},
                               "objective": {"name": "nft", "old_policy_ema": 0.5, "timesteps": 2}}},
        "data": {"options": {"heldout_prompts": "", "prompts": "shapes"}},
        "rewards": [{"name": "shapes"}],
        "loss": {"name": "nft", "adv_clip": 1.0},
        "trainer": {"max_steps": 3, "prompts_per_step": 2, "group_size": 2, "lr": 1e-2, "progress": False,
                    "checkpoint_every": 0, "export_checkpoints": True},
    }  # fmt: skip
    path, one = _fsdp_and_unsharded(tmp_path, cfg)
    assert ckpt.is_sharded(path) and len(list((path / "shards").glob("*.safetensors"))) == 2
    got, want = _tensors(ckpt.load_checkpoint(path)), _tensors(_state(one.run_dir))
    assert got.keys() == want.keys()
    assert any(k.startswith("/policy/old_policy/shadow/") for k in got)  # the sampling policy's EMA, sharded
    moved = max(float((want[k] - w).abs().max()) for k, w in _tensors(_state_at_start(one)).items() if k in want)
    assert moved > 1e-3  # training moved the weights: the comparison below is not of untouched tensors
    # float32 rounding of other reduction orders only (2 DDP processes differ from 1 by ~1e-5 here too); without
    # resharding after the rollout's forwards the nft sampling EMA is missed and they differ by ~3e-2
    diff = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert diff <= 5e-5, diff
    exported = dict(SD3Transformer2DModel.from_pretrained(str(path / "export" / "transformer")).named_parameters())
    weights = ckpt.load_checkpoint(path)["model"]  # every parameter: full fine-tuning
    assert set(weights) == set(exported), set(weights) ^ set(exported)
    assert all(torch.equal(exported[n].detach(), w) for n, w in weights.items())


@NEEDS_CPU_FSDP
def test_fsdp_lora_on_bf16_weights_trains_fp32_adapters_as_the_unsharded_run(tmp_path):
    """bf16 weights with fp32 LoRA adapters (the diffusion families' LoRA is fp32 whatever the weights) in one FSDP2
    unit: FSDP2 needs uniform dtypes only among the trained parameters and all-gathers a mixed unit as bytes. 2 steps
    on 2 processes: the adapters stay fp32, train, and equal the unsharded run's within bf16 forwards' rounding."""
    from mmgrpo.testing.tiny_sd3 import save_tiny_sd3

    base = save_tiny_sd3(tmp_path / "base")
    cfg = {
        "pipeline": "text_to_image",
        "run": {"seed": 1},
        "policy": {"options": {"family": "sd3", "path": base, "num_steps": 2, "lora_rank": 2, "dtype": "bfloat16"}},
        "data": {"options": {"heldout_prompts": "", "prompts": "shapes"}},
        "rewards": [{"name": "jpeg_compressibility"}],  # continuous: every group has an advantage
        "trainer": {"max_steps": 2, "prompts_per_step": 2, "group_size": 2, "lr": 1e-2, "progress": False,
                    "checkpoint_every": 0},
    }  # fmt: skip
    path, one = _fsdp_and_unsharded(tmp_path, cfg)
    assert ckpt.is_sharded(path)
    got, want = ckpt.load_checkpoint(path)["model"], _state(one.run_dir)["model"]
    assert got.keys() == want.keys() and all("lora_" in k for k in got)
    assert {v.dtype for v in got.values()} == {torch.float32}
    moved = max(float(v.abs().max()) for k, v in want.items() if "lora_B" in k)  # B starts at 0
    diff = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert moved > 1e-3 and diff <= 1e-3 * moved, (diff, moved)  # measured: 2.8e-7 against 0.02


def _state_at_start(trainer) -> dict:
    """The trainable weights the run started from (the base checkpoint's), as a checkpoint state's ``model``."""
    from mmgrpo.train.export import build_policy

    policy = build_policy(load_config(trainer.run_dir / "config.yaml"))
    return {"model": {n: p.detach() for n, p in policy.model.named_parameters() if p.requires_grad}}


# ------------------------------------------------------------------------------------------ a VLM (issue 16)
VLM_K = 8  # policy.options.max_new_tokens
VLM_EOS_SCALE = 15.0  # the EOS row of the head (see save_vlm_that_stops)
VLM_SEED = 8

VLM_RECORD = r"""
import json, os, sys
from torch.distributed.fsdp import FSDPModule
from mmgrpo.policies.vlm_decode import Decoder
from mmgrpo.train import trainer as tr
from mmgrpo.train.cli import main

loops, units = [], []
real_loop, real_init = Decoder.loop, tr.Trainer.__init__
def loop(self, prompts, cache, last, G, generators, greedy):
    out = real_loop(self, prompts, cache, last, G, generators, greedy)
    loops.append({"greedy": greedy, "steps": out[0].shape[1], "lengths": out[1].tolist()})
    return out
def init(self, *a, **k):
    real_init(self, *a, **k)
    units.extend(type(m).__name__ for m in self.policy.model.modules() if isinstance(m, FSDPModule))
Decoder.loop, tr.Trainer.__init__ = loop, init
code = main(sys.argv[1:])
with open(f"record_rank{os.environ['RANK']}.json", "w") as f:
    json.dump({"loops": loops, "units": units}, f)
sys.exit(code)
"""

VLM_REWARD = '''
def length(samples, prompts, meta, ctx):
    """Characters of each completion / 10: a dense reward, so the random model's groups have advantages."""
    return [len(s) / 10.0 for s in samples]
'''


def save_vlm_that_stops(directory, eos_scale: float) -> str:
    """The tiny Qwen2-VL (seed 0) with its head's EOS row turned towards the mean final hidden state of a text, so
    EOS is likely at every token and completions end at different lengths (a random head almost never ends one)."""
    from mmgrpo.testing.tiny_vlm import save_tiny, tiny_qwen2_vl

    model, processor = tiny_qwen2_vl()
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        hidden = model.model.language_model(input_ids=torch.arange(20, 120)[None]).last_hidden_state[0]  # [100, D]
        u = hidden.mean(0)
        model.lm_head.weight[eos] = eos_scale * u / u.norm()
    return str(save_tiny(model, processor, directory))


@NEEDS_CPU_FSDP
@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_fsdp_tiny_vlm_grpo_with_rows_ending_at_different_tokens_matches_the_unsharded_run(
    tmp_path, monkeypatch, finetune
):
    """The tiny Qwen2-VL, fully fine-tuned, or LoRA with a KL term (its reference: the adapters disabled, one more
    forward per micro-batch), (vlm_reasoning, 2 steps of 2 prompts x 3 rows, temperature 1, old log-probs scored
    after the rollout, greedy evaluation at steps 0 and 2) on 2 FSDP processes, each sampling one
    prompt: every shard unit's forward is a collective, so the decode loop runs until no process has a row left
    without EOS (``VLMPolicy.any_process``); a process whose rows all ended first decodes padding meanwhile. The
    sharded run goes through a small script around the CLI that records each decode loop's steps and row lengths
    and the FSDP units on every process; its checkpoint equals the unsharded run's within float32 rounding."""
    from mmgrpo.policies.vlm_decode import Decoder

    base = save_vlm_that_stops(tmp_path / "base", eos_scale=VLM_EOS_SCALE)
    (tmp_path / "vlm_length_reward.py").write_text(VLM_REWARD)
    (tmp_path / "record.py").write_text(VLM_RECORD)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = {
        "pipeline": "vlm_reasoning",
        "run": {"seed": VLM_SEED},
        "policy": {"options": {"path": base, "finetune": finetune, "lora_rank": 4, "max_new_tokens": VLM_K}},
        "loss": {"beta": 0.0 if finetune == "full" else 0.02},
        "data": {"options": {"num_examples": 12, "eval_examples": 2, "eval_batch": 2}},
        "rewards": [{"name": "format", "weight": 0.5}, {"name": "vlm_length_reward.length"}],
        "trainer": {"max_steps": 2, "prompts_per_step": 2, "group_size": 3, "micro_batch_size": 2, "lr": 1e-2,
                    "logp_old": "rollout", "eval_every": 2, "checkpoint_every": 0, "progress": False},
    }  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = _launch(tmp_path, "train", str(tmp_path / "cfg.yaml"), f"run.output_dir={tmp_path}", "run.name=fsdp",
                   script=[str(tmp_path / "record.py")])  # fmt: skip
    assert proc.returncode == 0, _said(proc)

    plain: list[dict] = []  # the unsharded run's decode loops
    real_loop = Decoder.loop

    def loop(self, prompts, cache, last, G, generators, greedy):
        out = real_loop(self, prompts, cache, last, G, generators, greedy)
        plain.append({"greedy": greedy, "steps": out[0].shape[1], "lengths": out[1].tolist()})
        return out

    monkeypatch.setattr(Decoder, "loop", loop)
    one = train(load_config(tmp_path / "cfg.yaml", [f"run.output_dir={tmp_path}", "run.name=one"]))

    ranks = [json.loads((tmp_path / f"record_rank{r}.json").read_text()) for r in (0, 1)]
    # one shard unit per decoder layer (2) and vision block (1), the rest in the root (VLMScorer._no_split_modules)
    assert sorted(ranks[0]["units"]) == sorted(
        ["FSDPVLMScorer", "FSDPQwen2VLDecoderLayer", "FSDPQwen2VLDecoderLayer", "FSDPQwen2VLVisionBlock"]
    )
    # evaluation at steps 0 and 2 (greedy, the 1 held-out prompt on each process), a rollout of 1 prompt x 3 rows on
    # each process at steps 1 and 2: every loop ran as many steps on both processes
    loops = [r["loops"] for r in ranks]
    assert [x["greedy"] for x in loops[0]] == [True, False, False, True] == [x["greedy"] for x in loops[1]]
    assert [x["steps"] for x in loops[0]] == [x["steps"] for x in loops[1]]
    sampled = [(a, b) for a, b in zip(loops[0], loops[1]) if not a["greedy"]]
    for a, b in sampled:  # the loop stops when no process has a row left, i.e. at the longest row of either
        assert a["steps"] == min(VLM_K, max(a["lengths"] + b["lengths"]))
    # the early exit was exercised: in some rollout a process had every row ended before the other's last one and
    # ran the remaining steps on padding; its rows ended at different tokens
    early = [(a, b) for a, b in sampled for x in (a, b) if max(x["lengths"]) < x["steps"]]
    assert early, sampled
    assert any(len(set(x["lengths"])) > 1 for a, b in early for x in (a, b)), early
    # the unsharded run sampled the same rows (layout-free seeds): its loops over both prompts' 6 rows
    assert [x["lengths"] for x in plain if not x["greedy"]] == [a["lengths"] + b["lengths"] for a, b in sampled]
    # the logged metrics are both processes' rows, as the unsharded run logs them (the completion lengths, entropy
    # and loss were the main process's own)
    logged = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"loss/' in x]
              for d in (one.run_dir, tmp_path / "fsdp")]  # fmt: skip
    keys = [k for k in logged[0][0] if k.startswith(("completion/", "loss/", "update/"))]
    if finetune == "full":  # one process leaves zero-advantage rows out (trainer.skip_zero_advantage), two do not
        keys = [k for k in keys if k not in ("update/skipped_rows_frac", "loss/adv_mean")]
    assert "completion/length_mean" in keys and "loss/policy" in keys
    for a, b in zip(*logged):
        assert {k: b[k] for k in keys} == {k: pytest.approx(a[k], rel=1e-4, abs=1e-6) for k in keys}

    path = ckpt.latest_checkpoint(tmp_path / "fsdp" / "checkpoints")
    assert ckpt.is_sharded(path) and len(list((path / "shards").glob("*.safetensors"))) == 2
    got, want = _tensors(ckpt.load_checkpoint(path)), _tensors(_state(one.run_dir))
    assert got.keys() == want.keys()
    start = _tensors(_state_at_start(one))
    if finetune == "full":  # every weight but the frozen vision tower's; else the adapters only
        assert any(k.startswith("/model/vlm.model.language_model.layers.1.") for k in got)
    else:
        assert got and all("lora_" in k for k in got if k.startswith("/model/"))
    moved = max(float((want[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3  # training moved the weights (2 AdamW steps of lr 1e-2)
    diff = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert diff <= 5e-5, diff  # float32 rounding of other reduction orders only


@NEEDS_CPU_FSDP
def test_fsdp_vlm_prompts_with_different_media_on_the_processes_stop_with_the_fix(tmp_path):
    """A JSONL dataset mixing image and text-only questions on 2 FSDP processes (one prompt each a step): the first
    step whose two prompts need different vision passes ends both processes with the message naming the counts and
    the fix (a vision block's forward is a collective: without the check the image process would wait for ever)."""
    from PIL import Image

    from mmgrpo.testing.tiny_vlm import save_tiny, tiny_qwen2_vl

    torch.manual_seed(0)
    base = save_tiny(*tiny_qwen2_vl(), tmp_path / "base")
    lines = []
    for i in range(12):
        rec = {"question": f"Which colour is shape {i}?", "options": ["red", "blue"], "answer": "A"}
        if i % 2 == 0:
            Image.new("RGB", (56, 56), (200, 20 * i, 30)).save(tmp_path / f"im{i}.png")
            rec["image"] = f"im{i}.png"
        lines.append(json.dumps(rec))
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    cfg = {
        "pipeline": "vlm_reasoning",
        "run": {"seed": 0},
        "policy": {"options": {"path": str(base), "lora_rank": 4, "max_new_tokens": 4}},
        "data": {"options": {"path": str(tmp_path / "mixed.jsonl"), "heldout_fraction": 0.2}},
        "rewards": [{"name": "format"}],
        "trainer": {"max_steps": 6, "prompts_per_step": 2, "group_size": 2, "eval_every": 0, "checkpoint_every": 0,
                    "progress": False},
    }  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = _launch(tmp_path, "train", str(tmp_path / "cfg.yaml"), f"run.output_dir={tmp_path}", "run.name=mixed")
    err = " ".join(proc.stderr.split())
    assert proc.returncode != 0, "no step had prompts of different media on the two processes: " + err[-1000:]
    assert "prompts with different media on different processes: this process's 1 prompts need" in err, err[-3000:]
    assert "and the processes need between 0 and 1" in err and "train with DDP" in err


def test_with_collective_forwards_every_process_makes_as_many_micro_batches(tmp_path, monkeypatch):
    """``Trainer.micro_batches`` under FSDP with several processes (``collective``): the count is the largest any
    process needs (the max-reduce is faked here: "the other process" needs ``other`` micro-batches), this process's
    rows split evenly into it; when this process already needs the most, its micro-batches are the plain ones."""
    from mmgrpo.train.trainer import Trainer, prepare_run_dir

    cfg = load_config(None, base={**CONFIG, "run": {"seed": 3, "output_dir": str(tmp_path), "name": "mb"}})
    trainer = Trainer(cfg, prepare_run_dir(cfg))  # micro_batch_size 4
    rows, mask = torch.arange(10, 16), torch.ones(16, 3, dtype=torch.bool)
    assert [r.tolist() for r in trainer.micro_batches(rows, mask)] == [[10, 11, 12, 13], [14, 15]]  # 1 process
    other = {"n": 0}
    monkeypatch.setattr(trainer, "collective", True)
    monkeypatch.setattr(trainer.acc, "reduce", lambda t, reduction: torch.maximum(t, torch.tensor([other["n"]])))
    other["n"] = 1  # this process needs ceil(6 / 4) = 2, the most: unchanged
    assert [r.tolist() for r in trainer.micro_batches(rows, mask)] == [[10, 11, 12, 13], [14, 15]]
    other["n"] = 3  # the other process needs 3: 6 rows in 3 even parts
    assert [r.tolist() for r in trainer.micro_batches(rows, mask)] == [[10, 11], [12, 13], [14, 15]]
    other["n"] = 7  # more micro-batches than rows here: no forward to run in one of them
    with pytest.raises(ValueError, match="6 rows cannot fill the 7 micro-batches"):
        trainer.micro_batches(rows, mask)


def test_with_collective_forwards_every_process_samples_as_many_refill_rounds(tmp_path, monkeypatch):
    """DAPO's refills under FSDP with several processes: a process whose groups are all kept goes on sampling refill
    rounds while another process still refills (faked: ``any_process`` says "some process is not full" twice), so
    both run the same forwards; the extra rounds' groups are not used: the step's rollout is the one without them."""
    from mmgrpo.train.trainer import Trainer, prepare_run_dir

    base = {**CONFIG, "advantage": {"estimator": "batch_std", "dynamic_sampling": True, "max_refill_rounds": 3}}
    cfg = load_config(None, base={**base, "run": {"seed": 3, "output_dir": str(tmp_path), "name": "dyn"}})
    trainer = Trainer(cfg, prepare_run_dir(cfg))
    alone, _, timers = trainer.collect(0)
    assert timers["dynamic/refill_rounds"] == 0 and alone.num_groups == 4  # every group had signal at round 0
    asked = []

    def any_process(flag: bool) -> bool:  # this process is full (flag False); the other needs 2 more rounds
        asked.append(flag)
        return flag or len(asked) <= 2

    monkeypatch.setattr(trainer, "collective", True)
    monkeypatch.setattr(trainer, "any_process", any_process)
    both, _, timers = trainer.collect(0)
    assert asked == [False, False, False] and timers["dynamic/refill_rounds"] == 2
    assert both.samples.tolist() == alone.samples.tolist() and torch.equal(both.logp_old, alone.logp_old)
