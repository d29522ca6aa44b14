"""Layout-free: a 2-process CPU run (gloo) with dynamic reward weighting and strata from a meta field makes the same
reward weights, advantages and update as the 1-process run (the weighter sees all ranks' rewards, the strata ids are
the same on every process)."""

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from mmgrpo.testing.launch import accelerate_launch
from mmgrpo.train import checkpoint as ckpt
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

REPO = Path(__file__).resolve().parents[2]
REWARD = '''
def first_arm():
    """Bandit: 1 for arm 0, else 0 -- an objective that conflicts with the arm value."""
    return lambda samples, prompts, meta, ctx: [float(int(a) == 0) for a in samples]
'''
CONFIG = {
    "pipeline": "bandit",
    "run": {"name": "x", "seed": 3},
    "data": {"options": {"num_prompts": 8, "num_arms": 5}},
    "rewards": [{"name": "bandit_arm_value"}, {"name": "h17_rewards.first_arm", "weight": 0.5}],
    "advantage": {"estimator": "stratified", "options": {"alpha": 0.5}},
    "methods": {"dynamic_weights": {"lr": 1.0, "ema": 0.5}, "strata": {"meta_key": "best_arm"}},
    "trainer": {
        "max_steps": 3, "prompts_per_step": 4, "group_size": 4, "lr": 0.05, "progress": False,
        "dump_advantages": True, "checkpoint_every": 0,
    },
}  # fmt: skip


def test_two_processes_match_one_process(tmp_path, monkeypatch):
    (tmp_path / "h17_rewards.py").write_text(REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(CONFIG))
    one = train(load_config(cfg_path, [f"run.output_dir={tmp_path}", "run.name=one"]))
    args = ["-m", "mmgrpo.train.cli", "train", cfg_path, f"run.output_dir={tmp_path}", "run.name=two"]
    proc = accelerate_launch(args, pythonpath=[tmp_path, REPO], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in range(3):
        name = f"debug/adv_step_{step:06d}.safetensors"
        a, b = load_file(str(one.run_dir / name)), load_file(str(tmp_path / "two" / name))
        assert torch.equal(a["rewards"], b["rewards"]), f"step {step}: different samples"
        assert torch.allclose(a["advantages"], b["advantages"], atol=1e-6), f"step {step}"
    lines = lambda run: [yaml.safe_load(x) for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    w1 = [(m["dynw/w0"], m["dynw/w1"]) for m in lines(one.run_dir)]
    w2 = [(m["dynw/w0"], m["dynw/w1"]) for m in lines(tmp_path / "two")]
    assert w1 == w2 and len(set(w1)) > 1  # the same weights, and they moved
    p1 = ckpt.load_checkpoint(ckpt.latest_checkpoint(one.run_dir / "checkpoints"))["model"]["logits"]
    p2 = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "two" / "checkpoints"))["model"]["logits"]
    assert torch.allclose(p1, p2, atol=1e-6), (p1 - p2).abs().max()
