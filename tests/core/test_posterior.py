"""Posterior-GRPO's ``posterior`` combiner: process rewards gated on a correct outcome (hand-computed), its load-time
checks, and a run with it."""

import json
from pathlib import Path

import pytest
import torch

from mmgrpo.core import advantages as adv
from mmgrpo.core.errors import UserError
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

BASE = {
    "pipeline": "bandit",
    "run": {"name": "p", "seed": 0},
    "data": {"options": {"num_prompts": 6, "num_arms": 5}},
    "rewards": [{"name": "bandit_arm_value"}, {"name": "bandit_arm_value", "weight": 0.5}],
    "trainer": {"max_steps": 3, "prompts_per_step": 3, "group_size": 4, "lr": 0.1, "progress": False},
}


def cfg_for(tmp_path, *overrides):
    return load_config(None, [f"run.output_dir={tmp_path}", "trainer.checkpoint_every=0", *overrides], base=BASE)


def metrics(run_dir):
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in lines]


def test_posterior_gates_process_rewards_on_a_correct_outcome():
    # accuracy (outcome, w 1) [1, 1, 0, 0]; reasoning quality (process, w 0.5) [0.8, 0.2, 1.0, 0.6].
    # Gated: rows 2 and 3 are wrong, their process reward counts 0 -> totals [1.4, 1.1, 0, 0];
    # mean 0.625, unbiased std sqrt(1.6075 / 3) = 0.732006 -> A = [1.058733, 0.648901, -0.853817, -0.853817].
    # Ungated (sum_then_normalize) the wrong row 2 with the best reasoning would score 0.5 > row 3's 0.3.
    r = torch.tensor([[[1.0, 1.0, 0.0, 0.0]], [[0.8, 0.2, 1.0, 0.6]]])
    w = torch.tensor([1.0, 0.5])
    a = adv.combine("posterior", r, w, "grpo", {}, ["outcome", "process"])
    assert torch.allclose(a, torch.tensor([[1.058733, 0.648901, -0.853817, -0.853817]]), atol=1e-5)
    plain = adv.combine("sum_then_normalize", r, w, "grpo", {})  # totals [1.4, 1.1, 0.5, 0.3]
    assert torch.allclose(plain, torch.tensor([[1.122283, 0.536744, -0.634334, -1.024693]]), atol=1e-5)
    # a threshold: outcome 0.7 counts as correct at threshold 0.5 only
    r2 = torch.tensor([[[0.7, 0.0]], [[1.0, 1.0]]])
    k = ["outcome", "process"]
    assert torch.allclose(adv.combine("posterior", r2, torch.ones(2), "dr_grpo", {}, k), torch.tensor([[0.35, -0.35]]))
    gated = adv.combine("posterior", r2, torch.ones(2), "dr_grpo", {}, k, {"threshold": 0.5})
    assert torch.allclose(gated, torch.tensor([[0.85, -0.85]]))  # totals [1.7, 0]
    # a row whose outcome reward does not apply (NaN) is not correct: its process reward is gated too
    r3 = torch.tensor([[[1.0, float("nan"), 0.0]], [[1.0, 1.0, 1.0]]])
    a3 = adv.combine("posterior", r3, torch.ones(2), "dr_grpo", {}, k)
    assert torch.allclose(a3, torch.tensor([[4 / 3, -2 / 3, -2 / 3]]))  # totals [2, 0, 0]


def test_posterior_without_a_process_or_outcome_reward_fails_at_load(tmp_path):
    with pytest.raises(UserError, match="advantage.combine=posterior .*kind: process"):
        cfg_for(tmp_path, "advantage.combine=posterior")
    with pytest.raises(UserError, match="kind: outcome"):
        cfg_for(tmp_path, "advantage.combine=posterior", "rewards.0.kind=process", "rewards.1.kind=process")
    with pytest.raises(UserError, match="advantage.combine_options.threshhold"):
        cfg_for(
            tmp_path,
            "advantage.combine=posterior",
            "rewards.1.kind=process",
            "advantage.combine_options={threshhold: 1}",
        )
    cfg = cfg_for(
        tmp_path, "advantage.combine=posterior", "rewards.1.kind=process", "advantage.combine_options={threshold: 0.5}"
    )
    assert cfg.advantage.combine_options == {"threshold": 0.5}


def test_a_run_with_the_posterior_combiner_trains_something_else(tmp_path):
    b = train(cfg_for(tmp_path / "b", "run.name=b", "rewards.1.kind=process"))
    c = train(
        cfg_for(
            tmp_path / "c",
            "run.name=c",
            "rewards.1.kind=process",
            "advantage.combine=posterior",
            "advantage.combine_options={threshold: 0.5}",
        )
    )
    assert metrics(c.run_dir) != metrics(b.run_dir) and len(metrics(c.run_dir)) == 3


def test_mc_grpo_leaves_out_the_median_row_of_the_total_its_estimator_reads(tmp_path):
    """MC-GRPO's pivot (loss weight 0) is the median row of the reward total, whose advantage is 0. Its row weights
    read the configured weights' plain sum, while the posterior combiner hands the estimator the gated sum (and
    dynamic reward weights another sum): another row was left out, one with an advantage.

    outcome (w 0.5) [1, 1, 1, 0, 0], process (w 1) [0, 0.1, 0.2, 0.9, 1.0]: gated totals [0.5, 0.6, 0.7, 0, 0],
    median 0.5 (row 0, advantage 0); MAD median(|r - 0.5|) = median[0, 0.1, 0.2, 0.5, 0.5] = 0.2, so advantages
    [0, 0.5, 1, -2.5, -2.5]. The plain sum [0.5, 0.6, 0.7, 0.9, 1.0] has its median at row 2, advantage 1."""
    from mmgrpo.train.trainer import Trainer

    cfg = cfg_for(tmp_path, "advantage.estimator=mc_grpo", "advantage.combine=posterior", "rewards.0.weight=0.5",
                  "rewards.1.weight=1.0", "rewards.1.kind=process", "trainer.prompts_per_step=1",
                  "trainer.group_size=5")  # fmt: skip
    tr = Trainer(cfg, tmp_path / "p")
    rollout, _, _ = tr.collect(0)
    cols = torch.tensor([[[1.0, 1.0, 1.0, 0.0, 0.0], [0.0, 0.1, 0.2, 0.9, 1.0]]])  # [V, R, N]
    a, row_w, _ = tr.advantage(cols, rollout, 0)
    assert torch.allclose(a, torch.tensor([0.0, 0.5, 1.0, -2.5, -2.5]), atol=1e-5)
    assert row_w.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]
    # sum_then_normalize: the plain sum's median, row 2
    tr.cfg.advantage.combine = "sum_then_normalize"
    a, row_w, _ = tr.advantage(cols, rollout, 0)
    assert a[2] == 0 and row_w.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]


def test_mc_grpo_with_several_rewards_normalised_each_on_its_own_is_refused_at_load(tmp_path):
    """normalize_then_sum gives each weighted reward its own median row: no row's advantage is 0, and the pivot left
    out was the median of the rewards' sum, a row with an advantage."""
    with pytest.raises(UserError, match="advantage.estimator=mc_grpo leaves each group's pivot row .* "
                                        "advantage.combine=normalize_then_sum normalises each of the 2 weighted "
                                        "rewards on its own"):  # fmt: skip
        cfg_for(tmp_path, "advantage.estimator=mc_grpo", "advantage.combine=normalize_then_sum")
    # one weighted reward (the other logged only): its own median row, as sum_then_normalize's
    from mmgrpo.train.trainer import Trainer

    cfg = cfg_for(tmp_path, "advantage.estimator=mc_grpo", "advantage.combine=normalize_then_sum",
                  "rewards.1.weight=0", "trainer.prompts_per_step=1", "trainer.group_size=5")  # fmt: skip
    tr = Trainer(cfg, tmp_path / "p")
    rollout, _, _ = tr.collect(0)
    cols = torch.tensor([[[0.2, 0.9, 0.5, 0.1, 0.7], [9.0, 0.0, 0.0, 0.0, 0.0]]])  # [V, R, N]
    a, row_w, _ = tr.advantage(cols, rollout, 0)
    assert a[2] == 0 and row_w.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]  # reward 0's median 0.5, row 2


def test_mc_grpo_with_a_plug_in_combiner_without_a_total_reads_the_applicable_sum(tmp_path, monkeypatch):
    """The end review of 2026-12-07: the refusal for normalize_then_sum had caught every plug-in combiner that declares
    no ``total``; such a combiner's pivot is the median of the applicable weighted sum, as before."""
    from mmgrpo.core.advantages import COMBINERS, sum_then_normalize
    from mmgrpo.train.trainer import Trainer

    def plain_sum(r, w, est, opts):  # registered for this test only
        return sum_then_normalize(r, w, est, opts)

    monkeypatch.setitem(COMBINERS._items, "test_plain_sum", plain_sum)
    cfg = cfg_for(tmp_path, "advantage.estimator=mc_grpo", "advantage.combine=test_plain_sum",
                  "trainer.prompts_per_step=1", "trainer.group_size=5")  # fmt: skip
    tr = Trainer(cfg, tmp_path / "p")
    rollout, _, _ = tr.collect(0)
    cols = torch.tensor([[[0.2, 0.9, 0.5, 0.1, 0.7], [0.0, 0.0, 0.0, 0.0, 0.0]]])  # sum 0.2 0.9 0.5 0.1 0.7
    _, row_w, _ = tr.advantage(cols, rollout, 0)
    assert row_w.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]  # the median 0.5, row 2
