"""POISE: the cross-rollout pairing, the probe's statistics and update by hand, the advantage hook with a probe of
known weights, and a VLM run that resumes exactly (probe, optimizer and buffer in the checkpoint)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.methods.poise import POISEOptions, POISEState, ValueProbe, cross_rollout_partner, poise_hook
from mmgrpo.testing.checks import cut_and_resume, logged_metrics
from mmgrpo.testing.tiny_vlm import save_tiny, tiny_qwen2_vl
from mmgrpo.train.config import load_config, read_yaml
from mmgrpo.train.trainer import train

REPO = Path(__file__).resolve().parents[2]


def test_each_rollout_is_valued_from_the_next_one_of_its_group():
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert cross_rollout_partner(v).tolist() == [[2.0, 1.0], [4.0, 3.0]]  # G = 2: the pair swaps
    assert cross_rollout_partner(torch.tensor([[1.0, 2.0, 3.0]])).tolist() == [[2.0, 3.0, 1.0]]


def test_the_probe_standardises_with_running_statistics():
    probe = ValueProbe(2, torch.Generator().manual_seed(0))
    a, b = torch.tensor([[1.0, 0.0], [3.0, 2.0]]), torch.tensor([[5.0, 4.0]])
    probe.observe(a)
    probe.observe(b)
    allx = torch.cat([a, b]).double()
    assert torch.allclose(probe.mean, allx.mean(0)) and probe.count.item() == 3
    assert torch.allclose(probe.m2 / 3, allx.var(0, unbiased=False))  # [8/3, 8/3]


def test_one_probe_step_is_an_adamw_sign_step():
    state = POISEState(POISEOptions(buffer_size=8, probe_steps=1, lr=0.1), seed=0)
    f, r = torch.tensor([[0.0], [2.0]]), torch.tensor([1.0, 3.0])
    state.build(1)
    w0, b0 = state.probe.head.weight.item(), state.probe.head.bias.item()
    state.learn(f, r)
    # standardised z = [-1, 1]; prediction w0 z (|w0| ~ 0.01, b0 = 0) is below both targets r = [1, 3]:
    # dMSE/dw = mean(2 (pred - r) z) = 2 w0 - 2 < 0, dMSE/db = mean(2 (pred - r)) = -4 < 0, and Adam's first step is
    # -lr g / |g| (bias-corrected moments): each parameter moves by +lr
    assert state.probe.head.weight.item() == pytest.approx(w0 + 0.1, abs=1e-6)
    assert state.probe.head.bias.item() == pytest.approx(b0 + 0.1, abs=1e-6)
    assert state.feats.shape == (2, 1) and state.rewards.tolist() == [1.0, 3.0]


def test_the_buffer_keeps_the_newest_rows_and_the_state_round_trips():
    state = POISEState(POISEOptions(buffer_size=3, probe_steps=2, lr=0.05), seed=0)
    for k in range(3):
        state.learn(torch.tensor([[float(k)], [float(k) + 0.5]]), torch.tensor([float(k), 1.0]))
    assert state.rewards.tolist() == [1.0, 2.0, 1.0]  # rows 3..5 of the 6 seen
    copy = POISEState(POISEOptions(buffer_size=3, probe_steps=2, lr=0.05), seed=5)
    copy.load_state_dict(state.state_dict())
    x = torch.tensor([[0.25], [4.0]])
    assert torch.equal(copy.predict(x), state.predict(x))
    state.learn(x, torch.tensor([0.0, 2.0]))
    copy.learn(x, torch.tensor([0.0, 2.0]))
    assert torch.equal(copy.probe.head.weight, state.probe.head.weight)  # the optimizer's moments came along


def test_the_hook_subtracts_the_partners_predicted_value():
    feats = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    policy = SimpleNamespace(value_features=lambda rollout, rows: feats[rows])
    state = POISEState(POISEOptions(probe_steps=1, lr=1e-3), seed=0)
    hook = poise_hook(policy, state, torch.tensor([1.0, 0.5]))
    rollout = SimpleNamespace(num_rows=4)
    cols = torch.tensor([[[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 2.0]]])  # [V, R, N]: r = [1, 0, 1, 2]
    adv, m = hook(torch.zeros(2, 2), rollout, cols, ["a", "b"])
    assert adv.tolist() == [[1.0, 0.0], [1.0, 2.0]]  # step 0: no probe yet, V = 0
    with torch.no_grad():  # a probe of known weights: V(f) = 2 (f - 0) / 1 + 0.5
        state.probe.head.weight.fill_(2.0)
        state.probe.head.bias.fill_(0.5)
        state.probe.count.fill_(1.0), state.probe.mean.zero_(), state.probe.m2.fill_(1.0)
    adv, m = hook(torch.zeros(2, 2), rollout, cols, ["a", "b"])
    # V = [2.5, 4.5, 6.5, 8.5]; partners: [4.5, 2.5 | 8.5, 6.5]; A = r - V_partner
    assert adv.tolist() == [[-3.5, -2.5], [-7.5, -4.5]]
    assert m["poise/value_mean"] == pytest.approx(5.5) and m["poise/buffer"] == 8.0


def poise_config(tmp_path, model_dir, **trainer):
    data = read_yaml(REPO / "configs" / "vlm_poise.yaml")
    data["run"].update(name="poise", output_dir=str(tmp_path))
    data["policy"]["options"].update(path=str(model_dir), max_new_tokens=8, lora_rank=4)
    data["data"]["options"].update(num_examples=12, eval_examples=2)
    data["trainer"].update(max_steps=4, prompts_per_step=2, group_size=2, micro_batch_size=4, lr=0.05,
                           eval_every=0, checkpoint_every=0, progress=False, **trainer)  # fmt: skip
    return load_config(None, base=data)


def test_poise_refuses_groups_of_one(tmp_path):
    data = read_yaml(REPO / "configs" / "vlm_poise.yaml")
    data["run"]["output_dir"] = str(tmp_path)
    data["trainer"]["group_size"] = 1
    with pytest.raises(UserError, match="group_size >= 2"):
        load_config(None, base=data)


def test_a_vlm_run_with_poise_trains_and_resumes_exactly(tmp_path):
    model_dir = save_tiny(*tiny_qwen2_vl(0), tmp_path / "m")
    full, resumed = cut_and_resume(lambda out: poise_config(out, model_dir), tmp_path)
    a, b = logged_metrics(full), logged_metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4] and a == b
    assert [m["poise/buffer"] for m in a] == [4.0, 8.0, 12.0, 16.0]  # B * G = 4 rows a step
    assert a[0]["poise/value_mean"] == 0.0 and a[1]["poise/value_mean"] != 0.0  # the probe is the baseline from step 2
    assert all(m["extra/poise_probe/mib"] > 0 for m in a)
    sa, sb = full.comp.method_state["poise"], resumed.comp.method_state["poise"]
    assert torch.equal(sa.probe.head.weight, sb.probe.head.weight) and torch.equal(sa.feats, sb.feats)


def test_two_processes_train_the_same_probe_as_one(tmp_path):
    """Layout-free: every process's rows are gathered before the probe trains, so a 2-process run (gloo, one prompt
    per process) trains the probe and the policy the 1-process run does."""
    import yaml

    from mmgrpo.testing.launch import accelerate_launch
    from mmgrpo.train import checkpoint as ckpt

    model_dir = save_tiny(*tiny_qwen2_vl(0), tmp_path / "m")
    data = read_yaml(REPO / "configs" / "vlm_poise.yaml")
    data["run"].update(output_dir=str(tmp_path))
    data["policy"]["options"].update(path=str(model_dir), max_new_tokens=8, lora_rank=4)
    data["data"]["options"].update(num_examples=12, eval_examples=2)
    data["trainer"].update(max_steps=2, prompts_per_step=2, group_size=2, micro_batch_size=4, lr=0.05, eval_every=0,
                           checkpoint_every=0, progress=False)  # fmt: skip
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    one = train(load_config(path, ["run.name=one"]))
    proc = accelerate_launch(["-m", "mmgrpo.train.cli", "train", path, "run.name=two"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = ckpt.load_checkpoint(ckpt.latest_checkpoint(one.run_dir / "checkpoints"))
    b = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "two" / "checkpoints"))
    pa, pb = a["methods"]["poise"], b["methods"]["poise"]
    assert torch.allclose(pa["feats"], pb["feats"], atol=1e-5) and torch.equal(pa["rewards"], pb["rewards"])
    assert torch.allclose(pa["probe"]["head.weight"], pb["probe"]["head.weight"], atol=1e-5)
    # the policy (DDP over the LoRA adapters of a Qwen2-VL) took the same two steps: its trained weights moved from
    # their initial values (LoRA B starts at 0 and moves by about lr = 0.05 an AdamW step) and agree with the
    # 1-process run's: 90% of each tensor's elements within 1e-5, the tensor within 20% of its norm. (AdamW divides
    # by the gradient's running RMS, so an element whose gradient nearly cancels over the rows, ~1e-7, moves by ~lr
    # all the same, and the float32 rounding of DDP's gradient average, ~1e-9, shows in it: up to 8e-4 on single
    # elements with the installed libraries, 2e-3 on 6 of 256 with the lowest supported ones, measured 2026-12-05;
    # under torch 2.6 4 of 256 elements moved the other way, ~lr each: 7.7% of the tensor's norm, 2026-12-06.
    # Gradients not averaged over the processes would move most elements by ~lr: a difference of the tensor's size.)
    ma, mb = a["model"], b["model"]
    lora_b = [k for k in ma if k.endswith("lora_B.default.weight")]
    assert ma.keys() == mb.keys() and lora_b and all(ma[k].abs().max() > 0.01 for k in lora_b)
    for k in ma:
        d = (ma[k] - mb[k]).abs()
        assert (d <= 1e-5).float().mean() >= 0.9 and d.norm() <= 0.2 * ma[k].norm(), (k, d.max(), (d > 1e-5).sum())
