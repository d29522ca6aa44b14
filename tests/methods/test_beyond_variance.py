"""Beyond Variance: Weighted GRPO and the positive-negative pairing by hand; a bandit run that resumes exactly."""

import json
import math
from pathlib import Path

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.sampling import SamplerContext
from mmgrpo.methods.beyond_variance import PairingOptions, PairingSampler, weighted_grpo
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train


def test_weighted_grpo_amplifies_rare_successes_of_q_plus_and_rare_failures_of_q_minus():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    roles = torch.tensor([[1.0], [-1.0], [0.0]])
    # grpo, group 0: mean .25, unbiased std sqrt((.5625 + 3 * .0625) / 3) = .5 -> [1.5, -.5, -.5, -.5]; q+: the
    # success x 2 -> 3. Group 1: mean .75, std .5 -> [.5, .5, .5, -1.5]; q-: the failure x 2 -> -3. Group 2: plain.
    got = weighted_grpo(r, roles=roles, w_pos=2.0, w_neg=2.0)
    want = torch.tensor([[3.0, -0.5, -0.5, -0.5], [0.5, 0.5, 0.5, -3.0], [1.5, -0.5, -0.5, -0.5]])
    assert torch.allclose(got, want, atol=1e-4), got
    assert torch.allclose(weighted_grpo(r, roles=roles, w_pos=1.0, w_neg=1.0)[2], want[2], atol=1e-4)
    with pytest.raises(UserError, match="pairing"):
        weighted_grpo(r)


def test_pairs_are_a_hard_but_solvable_and_an_easy_but_brittle_prompt():
    s = PairingSampler(SamplerContext(prompts_per_step=4, group_size=4, seed=0, pool=6), PairingOptions())
    nan = float("nan")
    # rates: 0 .1 (q+), 1 .9 (q-), 2 0 (never solved), 3 1 (always), 4 unseen, 5 .3 (q+)
    rates = [0.1, 0.9, 0.0, 1.0, None, 0.3]
    for p, rate in enumerate(rates):
        if rate is not None:  # 10 rollouts with that success rate
            k = round(rate * 10)
            s.observe(0, [p], torch.tensor([[1.0] * k + [0.0] * (10 - k)]))
    assert s.roles().tolist() == [1, -1, 0, 0, 0, 1]
    plan = s.plan(1)
    pos, neg = plan.positions[0::2], plan.positions[1::2]
    assert sorted(pos) == [0, 5]  # both q+ prompts are anchors
    assert neg == [1, 4]  # the one q- prompt, then the unseen prompt 4 (its rate is unknown)
    inputs = s.estimator_inputs(plan.positions, torch.full((4, 2), nan))
    assert inputs["roles"].reshape(-1).tolist() == [float(s.roles()[p]) for p in plan.positions]
    assert s.plan(1).positions == plan.positions  # deterministic per step


BASE = {
    "pipeline": "bandit",
    "run": {"name": "bv", "seed": 0},
    "data": {"options": {"num_prompts": 8, "num_arms": 5}},
    "rewards": [{"name": "bandit_arm_value"}],
    "sampler": {"name": "pairing", "options": {"tau_pos": 0.6, "tau_neg": 0.7}},
    "advantage": {"estimator": "weighted_grpo"},
    "trainer": {"max_steps": 6, "prompts_per_step": 4, "group_size": 4, "lr": 0.1, "progress": False,
                "checkpoint_every": 0},
}  # fmt: skip


def _metrics(run_dir):
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in lines]


def test_a_pairing_run_resumes_exactly_and_bad_settings_fail_at_load(tmp_path):
    full = train(load_config(None, [f"run.output_dir={tmp_path}", "run.name=full"], base=BASE))
    lines = _metrics(full.run_dir)
    assert all(math.isfinite(m["loss/total"]) for m in lines) and lines[-1]["pairing/seen_frac"] == 1.0
    part = ["run.name=part", f"run.output_dir={tmp_path}"]
    train(load_config(None, [*part, "trainer.stop_after_steps=3"], base=BASE))
    resumed = train(load_config(None, [*part, f"resume={tmp_path / 'part'}"], base=BASE))
    assert _metrics(full.run_dir) == _metrics(resumed.run_dir)
    assert torch.equal(full.policy.probs(), resumed.policy.probs())
    with pytest.raises(UserError, match="make it even"):
        load_config(None, [f"run.output_dir={tmp_path}", "trainer.prompts_per_step=3"], base=BASE)
    with pytest.raises(UserError, match="sampler: pairing"):
        load_config(None, [f"run.output_dir={tmp_path}", "sampler=uniform"], base=BASE)
