"""GDRO: the square-root rollout allocation, the bins and their multiplicative weights by hand, a ragged bandit run
that resumes exactly."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmgrpo.core.errors import UserError
from mmgrpo.core.sampling import SamplerContext, largest_remainder
from mmgrpo.methods.gdro import GDROOptions, GDROSampler, sqrt_allocation
from mmgrpo.rewards.registry import register
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train


def test_largest_remainder_and_the_square_root_allocation():
    assert largest_remainder(torch.tensor([6.667, 3.333, 2.0]), 12, 2, 16) == [7, 3, 2]
    assert largest_remainder(torch.tensor([1.5, 1.5]), 3, 1, 4) == [2, 1]  # ties: the lower index first
    # sigma [.5, .25, 0], 12 rollouts in [2, 16]: the third is clipped at 2, .5x + .25x = 10 -> x = 13.33,
    # [6.67, 3.33, 2] -> [7, 3, 2]
    assert sqrt_allocation(torch.tensor([0.5, 0.25, 0.0]), 12, 2, 16) == [7, 3, 2]
    assert sqrt_allocation(torch.tensor([0.3, 0.3, 0.3]), 12, 2, 16) == [4, 4, 4]  # equal: the mean budget
    assert sqrt_allocation(torch.tensor([1.0, 0.01, 0.01]), 12, 2, 8) == [8, 2, 2]  # n_max binds
    with pytest.raises(UserError):
        largest_remainder(torch.ones(3), 30, 2, 8)


def test_bins_weights_and_allocation_follow_the_hand_computed_values():
    ctx = SamplerContext(prompts_per_step=2, group_size=4, seed=0, pool=4)
    s = GDROSampler(ctx, GDROOptions(bins=2, eta=1.0, ema=0.5, mix=0.0, pass_ema=0.5, n_min=2, n_max=6))
    assert s.bin_of().tolist() == [1, 1, 1, 1]  # unseen: p = .5 -> floor(.5 * 2) = bin 1
    nan = float("nan")
    # step 0: prompt 0 passes 2 of 4, prompt 1 none (2 rows, ragged): bin 1 loss = mean(.5, 1) = .75;
    # m = .5 * 0 + .5 * .75 = .375, t = 1 -> debiased .375 / (1 - .5) = .75
    m = s.observe(0, [0, 1], torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, nan, nan]]))
    assert s.bin_m.tolist() == [0.0, 0.375] and s.bin_t.tolist() == [0.0, 1.0]
    assert s.pass_rate().tolist() == [0.5, 0.0, 0.5, 0.5] and s.bin_of().tolist() == [1, 0, 1, 1]
    # q = softmax([0, .75]) = [.320821, .679179]; bin 1 holds 3 prompts: .226393 each
    q = s.bin_weights(s.bin_of())
    assert torch.allclose(q, torch.tensor([0.320821, 0.679179], dtype=torch.float64), atol=1e-6)
    assert m["gdro/q_bin0"] == pytest.approx(0.320821, abs=1e-6)
    # allocation: bin 0's mean pass rate 0 (sigma 0) -> n_min 2; bin 1's .5 (sigma .5) -> the rest of 2 * 4 = 8;
    # two prompts of bin 1: equal sigmas -> 4 each
    plans = [s.plan(t) for t in range(40)]
    with_hopeless = next(p for p in plans if 1 in p.positions)
    assert dict(zip(with_hopeless.positions, with_hopeless.group_sizes))[1] == 2
    assert sorted(with_hopeless.group_sizes) == [2, 6]
    without = next(p for p in plans if 1 not in p.positions)
    assert without.group_sizes == [4, 4] and len(set(without.positions)) == 2
    # the first pick of each step follows q / |bin|: [.226393, .320821, .226393, .226393]
    draws = torch.tensor([s.plan(t).positions[0] for t in range(3000)])
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    want = torch.tensor([0.226393, 0.320821, 0.226393, 0.226393], dtype=torch.float64)
    assert torch.allclose(freq, want, atol=0.035), freq


@register("test_gdro_hopeless_half")
def _hopeless_half(samples, prompts, meta, ctx):
    """0 on bandit prompts 0..3 (never solved), 1 for the best arm elsewhere: pass rates that differ by prompt."""
    return [0.0 if int(p) < 4 else float(int(a) == m["best_arm"]) for a, p, m in zip(samples.tolist(), prompts, meta)]


BASE = {
    "pipeline": "bandit",
    "run": {"name": "gdro", "seed": 0},
    "data": {"options": {"num_prompts": 8, "num_arms": 5}},
    "rewards": [{"name": "test_gdro_hopeless_half"}],
    "sampler": {"name": "gdro", "options": {"n_min": 2, "n_max": 8}},
    "trainer": {"max_steps": 6, "prompts_per_step": 4, "group_size": 4, "lr": 0.1, "progress": False,
                "checkpoint_every": 0, "dump_advantages": True},
}  # fmt: skip


def _metrics(run_dir):
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in lines]


def test_a_gdro_run_has_ragged_groups_within_the_budget_and_resumes_exactly(tmp_path):
    full = train(load_config(None, [f"run.output_dir={tmp_path}", "run.name=full"], base=BASE))
    sizes_seen = set()
    for step in range(6):
        dump = load_file(str(full.run_dir / f"debug/adv_step_{step:06d}.safetensors"))
        assert dump["rewards"].shape[-1] == 16  # B x mean budget G = 4 x 4 rows, always
        sizes_seen.add(dump["advantages"].shape[1])
    assert max(sizes_seen) > 4  # some step gave a prompt more than G rollouts
    lines = _metrics(full.run_dir)
    assert all(math.isfinite(m["loss/total"]) for m in lines) and "gdro/q_bin0" in lines[-1]
    part = ["run.name=part", f"run.output_dir={tmp_path}"]
    train(load_config(None, [*part, "trainer.stop_after_steps=3"], base=BASE))
    resumed = train(load_config(None, [*part, f"resume={tmp_path / 'part'}"], base=BASE))
    assert _metrics(full.run_dir) == _metrics(resumed.run_dir)
    assert torch.equal(full.sampler.bin_m, resumed.sampler.bin_m)
    assert torch.equal(full.policy.probs(), resumed.policy.probs())


def test_gdro_settings_that_cannot_work_fail_at_load(tmp_path):
    with pytest.raises(UserError, match="bracket the mean budget"):
        load_config(None, [f"run.output_dir={tmp_path}", "sampler.options.n_max=3"], base=BASE)
    with pytest.raises(UserError, match="bins"):
        load_config(None, [f"run.output_dir={tmp_path}", "sampler.options.bins=0"], base=BASE)
    with pytest.raises(UserError, match="unknown key 'sampler.options.binz'"):
        load_config(None, [f"run.output_dir={tmp_path}", "sampler.options.binz=3"], base=BASE)
