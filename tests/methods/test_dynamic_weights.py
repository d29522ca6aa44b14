"""Dynamic reward weighting: the multiplicative-weights update by hand, the weights as state (a run resumed from a
checkpoint continues exactly), load-time checks."""

import json
from pathlib import Path

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.methods.dynamic_weights import DynamicWeights, DynamicWeightsOptions
from mmgrpo.rewards.registry import REWARDS, register
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

if "test_dynw_first_arm" not in REWARDS.names():

    @register("test_dynw_first_arm")
    def _first_arm():
        """Bandit: 1 for arm 0, else 0 -- an objective that conflicts with the arm value."""
        return lambda samples, prompts, meta, ctx: [float(int(a) == 0) for a in samples]


BASE = {
    "pipeline": "bandit",
    "run": {"name": "d", "seed": 0},
    "data": {"options": {"num_prompts": 6, "num_arms": 5}},
    "rewards": [{"name": "bandit_arm_value"}, {"name": "test_dynw_first_arm", "weight": 0.5}],
    "methods": {"dynamic_weights": {"lr": 0.5, "ema": 0.5}},
    "trainer": {
        "max_steps": 6,
        "prompts_per_step": 3,
        "group_size": 4,
        "lr": 0.1,
        "progress": False,
        "checkpoint_every": 2,
    },  # fmt: skip
}


def test_the_update_by_hand():
    dw = DynamicWeights(DynamicWeightsOptions(lr=0.5, ema=0.5, floor=0.05))
    base = torch.tensor([1.0, 0.5])
    # step 0: uniform w -> the config's weights; mu = [0.5, 0.3], s = [0.5, 0.1] (population std)
    used, m = dw(base, torch.tensor([[[1.0, 0.0], [0.2, 0.4]]]), ["outcome", "outcome"], 0)
    assert torch.allclose(used, base) and m == {"dynw/w0": 1.0, "dynw/w1": 0.5}
    # step 1 still uses uniform w (the update comes after); g = [(1 - 0.5) / 0.5, 0] = [1, 0]:
    # w = softmax(log 0.5 - 0.5 g) = [e^-0.5, 1] / (1 + e^-0.5) = [0.377541, 0.622459]; floor mix 0.9 w + 0.05
    # -> [0.389787, 0.610213]; mu = [0.75, 0.3], s = [0.25, 0.05]
    used, _ = dw(base, torch.tensor([[[1.0, 1.0], [0.3, 0.3]]]), ["outcome", "outcome"], 1)
    assert torch.allclose(used, base)
    assert torch.allclose(dw.w, torch.tensor([0.389787, 0.610213]), atol=1e-5)
    assert torch.allclose(dw.mu, torch.tensor([0.75, 0.3])) and torch.allclose(dw.s, torch.tensor([0.25, 0.05]))
    # step 2 uses base * R * w = [2 * 0.389787, 0.5 * 2 * 0.610213] = [0.779573, 0.610213]
    used, _ = dw(base, torch.tensor([[[1.0, 1.0], [0.3, 0.3]]]), ["outcome", "outcome"], 2)
    assert torch.allclose(used, torch.tensor([0.779573, 0.610213]), atol=1e-5)
    # the state round-trips
    fresh = DynamicWeights(DynamicWeightsOptions(lr=0.5, ema=0.5, floor=0.05))
    fresh.load_state_dict(dw.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), dw.state_dict().values()))


def metrics(run_dir):
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in lines]


def test_a_resumed_run_continues_the_weights_exactly(tmp_path):
    cfg = lambda *o: load_config(None, [f"run.output_dir={tmp_path}", *o], base=BASE)  # noqa: E731
    full = train(cfg("run.name=full"))
    part = train(cfg("run.name=part", "trainer.stop_after_steps=3"))
    assert part.step == 3
    resumed = train(cfg("run.name=part", f"resume={part.run_dir}"))
    a, b = metrics(full.run_dir), metrics(resumed.run_dir)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6] and a == b
    ws = [(m["dynw/w0"], m["dynw/w1"]) for m in a]
    assert ws[0] == (1.0, 0.5) and len(set(ws)) > 2  # the weights moved
    assert torch.equal(full.comp.reward_weighters[0].w, resumed.comp.reward_weighters[0].w)


def test_bad_options_fail_at_load(tmp_path):
    with pytest.raises(UserError, match="methods.dynamic_weights .*floor=0.6"):
        load_config(None, ["methods.dynamic_weights.floor=0.6"], base=BASE)
    with pytest.raises(UserError, match="lists 1"):
        load_config(None, ["rewards=[{name: bandit_arm_value}]"], base=BASE)
    with pytest.raises(UserError, match="lr=0.0"):
        load_config(None, ["methods.dynamic_weights.lr=0"], base=BASE)


if "test_dynw_arm_value_complement" not in REWARDS.names():

    @register("test_dynw_arm_value_complement")
    def _complement():
        """Bandit: 1 - the arm value, so the arm value plus this is 1 on every row."""
        return lambda samples, prompts, meta, ctx: [
            1.0 - float(m["arm_values"][int(a)]) for a, m in zip(samples, meta)
        ]


def test_dapo_dynamic_sampling_tests_a_groups_spread_under_the_steps_weights(tmp_path):
    """DAPO's refill tested a group's spread under the configured weights while the advantage used the dynamic ones:
    two rewards that sum to 1 on every row tie under weights 1 and 1, so every group was dropped and refilled in
    vain (dynamic/unfilled_groups = 3 at every step) although from step 3 the weights differ and every group with
    two arms has spread (its advantages are not 0)."""
    over = [f"run.output_dir={tmp_path}", "rewards=[{name: bandit_arm_value}, {name: test_dynw_arm_value_complement}]",
            "advantage.dynamic_sampling=true", "advantage.max_refill_rounds=1", "methods.dynamic_weights.lr=2.0",
            "trainer.checkpoint_every=0"]  # fmt: skip
    tr = train(load_config(None, over, base=BASE))
    ms = metrics(tr.run_dir)
    assert ms[0]["dynw/w0"] == ms[0]["dynw/w1"] == 1.0  # steps 1-2: uniform, every group ties
    assert ms[0]["dynamic/unfilled_groups"] == 3
    later = ms[2:]
    assert all(m["dynw/w0"] != m["dynw/w1"] for m in later)
    assert all(m["dynamic/unfilled_groups"] == 0 and m["dynamic/refill_rounds"] == 0 for m in later), later
    assert all(m["adv/zero_variance_groups"] == 0 for m in later)
    # the weights the refill read are those the step's advantage used
    w = tr.comp.reward_weighters[0]
    assert torch.equal(w.current(torch.tensor([1.0, 1.0])), torch.tensor([1.0, 1.0]) * 2 * w.w)
