"""PRS / VSPO: the task value, the value-ranked refill and the progressive reward by hand; a bandit run whose
zero-advantage groups are replaced from the pool, resumed exactly."""

import json
from pathlib import Path

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.sampling import SamplerContext, StepPlan
from mmgrpo.methods.vspo import VSPOOptions, VSPOSampler, prs, task_value
from mmgrpo.rewards.registry import register
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import Trainer, prepare_run_dir, train


def test_task_value_and_the_value_ranked_refill():
    # V = .5 (1 - p) + .5 * 4 p (1 - p): p 0 -> .5, .5 -> .75, .2 -> .4 + .32 = .72, 1 -> 0
    got = task_value(torch.tensor([0.0, 0.5, 0.2, 1.0], dtype=torch.float64), 0.5)
    assert torch.allclose(got, torch.tensor([0.5, 0.75, 0.72, 0.0], dtype=torch.float64))
    s = VSPOSampler(SamplerContext(prompts_per_step=2, group_size=4, seed=0, pool=6), VSPOOptions())
    for p, k in [(0, 4), (1, 0), (2, 2), (5, 4)]:  # successes of 4: rates 1, 0, .5, 1 (prompt 5 then 3 of 4 later)
        s.observe(0, [p], torch.tensor([[1.0] * k + [0.0] * (4 - k)]))
    s.observe(1, [3], torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]]))  # rate .2
    s.observe(2, [5], torch.tensor([[1.0, 1.0, 1.0, 0.0]]))  # EMA .5 * 1 + .5 * .75 = .875
    # V: 0 -> 0, 1 -> .5, 2 -> .75, 3 -> .72, 4 (unseen) -> .75, 5 -> .0625 + 4 * .5 * .875 * .125 = .28125
    assert torch.allclose(s.value(), torch.tensor([0, 0.5, 0.75, 0.72, 0.75, 0.28125], dtype=torch.float64))
    main = StepPlan(positions=[2, 0])
    assert s.refill(3, 1, main).positions == [4, 3]  # highest value not in the main plan (ties: lower position)
    assert s.refill(3, 2, main).positions == [1, 5]
    assert s.refill(3, 3, main) is None  # the pool is used up: fresh stream positions, as DAPO


_STAGE_A = [1.0, 0.5, 1.0, None]
_STAGE_B = [1.0, 1.0, 0.0, 1.0]


@register("test_prs_stage_a")
def _stage_a(samples, prompts, meta, ctx):
    return _STAGE_A


@register("test_prs_stage_b")
def _stage_b(samples, prompts, meta, ctx):
    return _STAGE_B


def test_progressive_reward_counts_a_stage_only_once_the_earlier_ones_pass():
    fn = prs(stages=[{"name": "test_prs_stage_a", "weight": 0.5, "threshold": 1.0}, {"name": "test_prs_stage_b"}])
    # row 0: .5 * 1 + 1 = 1.5; row 1: .5 * .5, stage a fails -> .25; row 2: .5 + 0 = .5; row 3: a does not apply -> 0
    got = fn([None] * 4, [0] * 4, [{}] * 4, None)
    assert torch.allclose(got, torch.tensor([1.5, 0.25, 0.5, 0.0]))
    with pytest.raises(UserError, match="stages"):
        prs()
    with pytest.raises(UserError, match="unknown key"):
        prs(stages=[{"name": "test_prs_stage_a", "tresh": 1}])


@register("test_vspo_reward")
def _half_hopeless():
    """Bandit reward that is 0 on prompts 0..3 (every group zero-variance) and the arm's value elsewhere."""
    return lambda samples, prompts, meta, ctx: [
        0.0 if int(p) < 4 else m["arm_values"][int(a)] for a, p, m in zip(samples.tolist(), prompts, meta)
    ]


BASE = {
    "pipeline": "bandit",
    "run": {"name": "vspo", "seed": 0},
    "data": {"options": {"num_prompts": 8, "num_arms": 5}},
    "rewards": [{"name": "test_vspo_reward"}],
    "sampler": {"name": "vspo"},
    "advantage": {"dynamic_sampling": True, "max_refill_rounds": 2},
    "trainer": {"max_steps": 5, "prompts_per_step": 2, "group_size": 4, "lr": 0.1, "progress": False,
                "checkpoint_every": 0},
}  # fmt: skip


def _metrics(run_dir):
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in lines]


def test_zero_advantage_groups_are_replaced_from_the_pool_by_value(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=collect"], base=BASE)
    trainer = Trainer(cfg, prepare_run_dir(cfg))
    rollout, cols, m = trainer.collect(0)
    pos = rollout.extras["stream_position"].view(-1, 4)[:, 0].tolist()  # each kept group's pool position
    main = trainer.sampler.plan(0).positions
    # nothing seen yet: every V = .75, so refill round k takes the non-main positions 2(k-1), 2k - 1 in order
    rest = [p for p in range(8) if p not in main]
    assert set(pos) <= set(main) | set(rest[:4])  # from the pool (not stream positions >= 2^40), by value rank
    hopeless = [p for p in main if trainer.comp.prompts.prompt_at(p) < 4]  # their groups are all-zero: replaced
    assert m["dynamic/refill_rounds"] >= (1 if hopeless else 0)
    if not m["dynamic/unfilled_groups"]:
        assert all(trainer.comp.prompts.prompt_at(p) >= 4 for p in pos)


def test_a_vspo_run_resumes_exactly_and_needs_dynamic_sampling(tmp_path):
    full = train(load_config(None, [f"run.output_dir={tmp_path}", "run.name=full"], base=BASE))
    part = ["run.name=part", f"run.output_dir={tmp_path}"]
    train(load_config(None, [*part, "trainer.stop_after_steps=2"], base=BASE))
    resumed = train(load_config(None, [*part, f"resume={tmp_path / 'part'}"], base=BASE))
    assert _metrics(full.run_dir) == _metrics(resumed.run_dir)
    assert torch.equal(full.sampler.stats.mean_ema.nan_to_num(-1), resumed.sampler.stats.mean_ema.nan_to_num(-1))
    with pytest.raises(UserError, match="dynamic_sampling"):
        load_config(None, [f"run.output_dir={tmp_path}", "advantage.dynamic_sampling=false"], base=BASE)
