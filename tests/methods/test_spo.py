"""SPO (Single-stream Policy Optimization): the estimator and the tracker by hand, prioritised plans, a G = 1
bandit run that learns and resumes exactly."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmgrpo.core.advantages import get_estimator
from mmgrpo.core.errors import UserError
from mmgrpo.core.sampling import SamplerContext
from mmgrpo.methods.spo import SPOOptions, SPOSampler, spo
from mmgrpo.testing.launch import accelerate_launch
from mmgrpo.train import checkpoint as ckpt
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train


def test_spo_advantage_is_reward_minus_tracker_normalised_over_the_batch():
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    base = torch.tensor([[0.5], [0.8]])
    # A = [.5, -.5, .2, .2]; batch mean .1 -> [.4, -.6, .1, .1]; unbiased var (.16 + .36 + .01 + .01) / 3 = .18,
    # std .424264 -> [.942809, -1.414214, .235702, .235702]
    got = spo(r, baseline=base)
    want = torch.tensor([[0.942809, -1.414214], [0.235702, 0.235702]])
    assert torch.allclose(got, want, atol=1e-5), got
    # a group where every row is right still learns (GRPO would give it 0): its rows beat the tracker's 0.8
    assert (got[1] > 0).all()
    # G = 1 works, NaN rows get 0 and are left out of the statistics
    one = spo(torch.tensor([[1.0], [0.0], [float("nan")]]), baseline=torch.tensor([[0.5], [0.5], [0.1]]))
    assert torch.allclose(one.reshape(-1), torch.tensor([0.707106, -0.707106, 0.0]), atol=1e-5)
    with pytest.raises(UserError, match="spo sampler"):
        spo(r)
    assert get_estimator("spo") is not None


def _sampler(pool=3, B=2, **opts):
    return SPOSampler(SamplerContext(prompts_per_step=B, group_size=4, seed=0, pool=pool), SPOOptions(**opts))


def test_tracker_initialises_forgets_and_updates_as_the_paper_says():
    s = _sampler(rho_min=0.5, rho_max=0.96, d_half=0.06, kl_source="steps", kl_per_step=0.03)
    nan = float("nan")
    # step 0: prompt 1 first seen with rewards [1, 0, 1, 1]: v0 = .75, N0 = 1 / (1 - .5) = 2 -> alpha 1.5, beta .5
    rewards0 = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(s.baseline([1], rewards0), torch.tensor([0.75], dtype=torch.float64))  # first visit: mean
    s.observe(0, [1], rewards0)
    assert s.alpha[1].item() == pytest.approx(1.5) and s.beta[1].item() == pytest.approx(0.5)
    # step 2: D = .03 * 2 = .06 = d_half -> rho = 1/2; baseline before the update is .75; prompt 0 unseen: its mean
    rewards2 = torch.tensor([[0.0, 0.0, nan, nan], [1.0, 0.0, nan, nan]])
    base = s.baseline([1, 0], rewards2)
    assert torch.allclose(base, torch.tensor([0.75, 0.5], dtype=torch.float64))
    assert s.rho(2)[1].item() == pytest.approx(0.5)
    m = s.observe(2, [1, 0], rewards2)
    # alpha = .5 * 1.5 + 0 = .75; beta = .5 * .5 + 2 = 2.25 -> v = .75 / 3 = .25
    assert s.alpha[1].item() == pytest.approx(0.75) and s.beta[1].item() == pytest.approx(2.25)
    assert s.value()[1].item() == pytest.approx(0.25)
    assert m["spo/rho_mean"] == pytest.approx(0.5) and m["spo/seen_frac"] == pytest.approx(2 / 3)
    # no drift: rho = rho_max; a long gap: clipped at rho_min
    assert _sampler(kl_source="steps", kl_per_step=0.0).rho(5)[0].item() == pytest.approx(0.96)
    s.last_step[2] = 0.0
    assert s.rho(100)[2].item() == pytest.approx(0.5)
    with pytest.raises(UserError, match=r"needs them in \[0, 1\]"):
        s.observe(3, [2], torch.tensor([[2.0, 0.0, nan, nan]]))


def test_measured_drift_accumulates_from_the_last_visit():
    s = _sampler(rho_min=0.5, rho_max=0.96, d_half=0.06)  # kl_source measured
    s.observe(0, [1], torch.tensor([[1.0, 0.0]]))  # first visit: alpha = beta = N0 * .5 = 1
    s.observe_drift(0, 0.02)  # after step 0's update
    s.observe(1, [0], torch.tensor([[1.0, 1.0]]))
    s.observe_drift(1, 0.04)
    # step 2: D(1) = .02 + .04 = .06 = d_half -> rho .5; D(0) = .04 (seen at step 1) -> 2^(-2/3) = .629961
    rho = s.rho(2)
    assert rho[1].item() == pytest.approx(0.5) and rho[0].item() == pytest.approx(0.629961, abs=1e-6)
    s.observe(2, [1], torch.tensor([[0.0, 0.0]]))  # alpha = .5 * 1 + 0, beta = .5 * 1 + 2 -> v = .5 / 3
    assert s.value()[1].item() == pytest.approx(1 / 6)
    assert s.rho(3)[1].item() == pytest.approx(0.96)  # no drift since this visit: rho_max
    with pytest.raises(UserError, match="drift"):
        s.observe_drift(3, float("nan"))


def test_plans_are_prioritised_deterministic_and_distinct():
    s = _sampler(pool=3, B=1, eps_priority=0.05)
    s.alpha[:] = torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)
    s.beta[:] = torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64)
    s.last_step[:] = torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64)
    # v = [.5 (unseen), .25, 1] -> weights sqrt(v(1-v)) + .05 = [.55, .483013, .05]
    v = s.value()
    w = (v * (1 - v)).sqrt() + 0.05
    assert torch.allclose(w, torch.tensor([0.55, 0.483013, 0.05], dtype=torch.float64), atol=1e-6)
    draws = [s.plan(step).positions[0] for step in range(3000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).double() / len(draws)
    assert torch.allclose(freq, w / w.sum(), atol=0.03), freq  # .511, .449, .046
    assert s.plan(7).positions == s.plan(7).positions  # the same on every process and on a resumed run
    two = _sampler(pool=3, B=3)
    assert sorted(two.plan(0).positions) == [0, 1, 2]  # a prompt at most once a step


BASE = {
    "pipeline": "bandit",
    "run": {"name": "spo", "seed": 0},
    "data": {"options": {"num_prompts": 8, "num_arms": 5}},
    "rewards": [{"name": "bandit_arm_value"}],
    "advantage": {"estimator": "spo"},
    "sampler": {"name": "spo"},  # kl_source measured: the trainer measures each step's drift
    "trainer": {"max_steps": 40, "prompts_per_step": 4, "group_size": 1, "lr": 0.2, "progress": False,
                "checkpoint_every": 0, "eval_every": 40},
}  # fmt: skip


def _metrics(run_dir):
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in lines]


def test_spo_with_one_rollout_per_prompt_learns_the_bandit(tmp_path):
    trainer = train(load_config(None, [f"run.output_dir={tmp_path}"], base=BASE))
    evals = [m for m in _metrics(trainer.run_dir) if "eval/expected_reward" in m]
    assert evals[-1]["eval/expected_reward"] > evals[0]["eval/expected_reward"] + 0.1, evals
    lines = [m for m in _metrics(trainer.run_dir) if "spo/seen_frac" in m]
    assert lines[-1]["spo/seen_frac"] == 1.0
    kls = [m["policy/kl_step"] for m in lines]
    assert all(0 <= k < 1 for k in kls) and max(kls) > 0  # the measured drift of each step's update
    assert trainer.sampler.cum_kl.item() == pytest.approx(sum(kls), rel=1e-6)


def test_spo_without_its_sampler_fails_at_load(tmp_path):
    with pytest.raises(UserError, match="sampler: spo"):
        load_config(None, [f"run.output_dir={tmp_path}", "sampler=uniform"], base=BASE)
    with pytest.raises(UserError, match="rho_min"):
        load_config(None, [f"run.output_dir={tmp_path}", "sampler.options.rho_min=1.5"], base=BASE)


def test_an_spo_run_resumes_exactly(tmp_path):
    short = {**BASE, "trainer": {**BASE["trainer"], "max_steps": 6, "eval_every": 0}}
    full = train(load_config(None, [f"run.output_dir={tmp_path}", "run.name=full"], base=short))
    part = ["run.name=part", f"run.output_dir={tmp_path}"]
    train(load_config(None, [*part, "trainer.stop_after_steps=3"], base=short))
    resumed = train(load_config(None, [*part, f"resume={tmp_path / 'part'}"], base=short))
    assert _metrics(full.run_dir) == _metrics(resumed.run_dir)
    assert torch.equal(full.sampler.alpha, resumed.sampler.alpha)
    assert torch.equal(full.policy.probs(), resumed.policy.probs())


def test_two_processes_track_and_sample_as_one_process(tmp_path):
    """Layout-free: 2 CPU processes (each 2 of the 4 prompts a step) draw the same prioritised plans, see the same
    tracker values, normalise over the whole batch, measure the same drift and end with the same tracker and model
    as 1 process (the tracker observes every rank's rewards; the drift is reduced over ranks)."""
    cfg = {**BASE, "trainer": {**BASE["trainer"], "max_steps": 5, "eval_every": 0, "dump_advantages": True}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    one = train(load_config(path, [f"run.output_dir={tmp_path}", "run.name=one"]))
    proc = accelerate_launch(["-m", "mmgrpo.train.cli", "train", path, f"run.output_dir={tmp_path}", "run.name=two"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    for step in range(5):
        name = f"debug/adv_step_{step:06d}.safetensors"
        a, b = load_file(str(one.run_dir / name)), load_file(str(two / name))
        assert torch.equal(a["rewards"], b["rewards"]), f"step {step}: different prompts or samples"
        assert torch.allclose(a["advantages"], b["advantages"], atol=1e-6), f"step {step}"
    keys = ("spo/", "policy/kl_step")
    pick = lambda ms: [{k: v for k, v in m.items() if k.startswith(keys)} for m in ms]  # noqa: E731
    m1, m2 = pick(_metrics(one.run_dir)), pick(_metrics(two))
    assert len(m1) == len(m2) == 5 and all(m1)
    for a, b in zip(m1, m2):
        assert a.keys() == b.keys() and a == pytest.approx(b, rel=1e-5, abs=1e-7), (a, b)
    s1 = ckpt.load_checkpoint(ckpt.latest_checkpoint(one.run_dir / "checkpoints"))
    s2 = ckpt.load_checkpoint(ckpt.latest_checkpoint(two / "checkpoints"))
    for k, v in s1["sampler"].items():
        if isinstance(v, torch.Tensor):
            assert torch.allclose(v, s2["sampler"][k], atol=1e-6), k
    assert s1["sampler"]["cum_kl"] == pytest.approx(s2["sampler"]["cum_kl"], rel=1e-5) and s1["sampler"]["cum_kl"] > 0
    assert torch.allclose(s1["model"]["logits"], s2["model"]["logits"], atol=1e-6)
