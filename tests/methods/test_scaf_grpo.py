"""Scaf-GRPO (mmgrpo/methods/scaf_grpo.py): the exemption period, tier escalation, the row swap on the tiny REAL
Qwen2-VL asset (ratio 1 for the hinted row, GRPO advantages by hand), the shapes world's tiered hints."""

from pathlib import Path

import pytest
import torch

from mmgrpo.core.advantages import grpo
from mmgrpo.core.errors import UserError
from mmgrpo.core.rewriting import REWRITERS, RewriteRequest, question_of
from mmgrpo.data import shapes_qa
from mmgrpo.methods.scaf_grpo import ScafHints, exemption_steps
from mmgrpo.pipelines.vlm_reasoning import shapes_question
from mmgrpo.rewards.registry import REWARDS, register
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
ASSET = REPO / "assets" / "tiny_qwen2_vl"

if "test_scaf_tier" not in REWARDS:

    @register("test_scaf_tier")
    def _tier(tier: int = 0):
        """1 for rows whose question holds the example's hint of ``tier`` (test reward)."""
        return lambda samples, prompts, meta, ctx: [
            float(m["hints"][tier] in question_of(p)) for p, m in zip(prompts, meta)
        ]


def trainer_for(tmp_path, *overrides):
    cfg = load_config(
        REPO / "configs" / "vlm_scaf_grpo.yaml",
        [
            f"run.output_dir={tmp_path}",
            f"policy.options.path={ASSET}",
            "data.options.num_examples=12",
            "trainer.prompts_per_step=2",
            "trainer.group_size=3",
            "trainer.progress=false",
            "trainer.logp_old=rollout",  # recorded by the rollout, so the ratio is checked against it
            "rewards=[{name: test_scaf_tier}]",
            "methods.scaf_grpo.reward=test_scaf_tier",
            *overrides,
        ],
    )
    return Trainer(cfg, tmp_path / "run")


def test_exemption_period_and_tiers():
    assert [exemption_steps(0.15, n) for n in (100, 20, 2, 1)] == [15, 3, 1, 1]  # ceil(15), ceil(3), ceil(0.3)...
    assert exemption_steps(0.0, 10) == 0
    hints = ScafHints(start_step=3)
    meta = {"hints": ["concept", "plan", "steps"], "answer": "B"}
    request = RewriteRequest([{"question": "Q?", "options": ["x", "y"]}], [meta], [[]], torch.zeros(1, 3), 0, 2, [0])
    assert hints(request) == [None]  # step 2 < 3: the exemption period
    got = []
    for attempt in range(4):
        request.step, request.attempt = 3, attempt
        got.append(hints(request)[0])
    assert [g[0]["question"] for g in got[:3]] == ["Q?\nHint: concept", "Q?\nHint: plan", "Q?\nHint: steps"]
    assert got[0][0]["options"] == ["x", "y"] and got[0][1]["answer"] == "B" and got[3] is None
    assert "scaf_tiered_hints" in REWRITERS.names()


def test_the_augmented_group_advantages_by_hand():
    # the row swap turns rewards [0, 0, 0, 0] into [0, 0, 0, 1]: mean 1/4, Bessel std 1/2 -> [-1/2, -1/2, -1/2, 3/2]
    torch.testing.assert_close(grpo(torch.tensor([[0.0, 0.0, 0.0, 1.0]])), torch.tensor([[-0.5, -0.5, -0.5, 1.5]]))
    assert grpo(torch.zeros(1, 4)).abs().sum() == 0  # before: the learning cliff, no advantage at all


def test_shapes_questions_carry_three_tiers_answered_by_the_scene():
    for seed in range(6):
        ex = shapes_qa.make_example(seed, kind="count")
        color, shape = ex.target
        n = "ABCD".index(ex.answer)  # the count is the option index
        t1, t2, t3 = ex.meta()["hints"]
        assert f"both {color} and {shape}s" in t1 and "one by one" in t2
        assert t3.endswith(f"{n} {'is a' if n == 1 else 'are'} {color} {shape}{'' if n == 1 else 's'}.")
        assert all(f"a {o.color} {o.shape}" in t3 for o in ex.scene.objects)
    pos = shapes_qa.make_example(5, kind="position")
    obj = next(o for o in pos.scene.objects if (o.color, o.shape) == pos.target)
    assert f"{round(obj.cx * 100)}% of the width" in pos.hints[2]
    again = shapes_qa.make_example(5, kind="position")
    assert again.hints == pos.hints and (again.image == pos.image).all()  # deterministic, no extra draw
    for i in range(8):  # the recipe's default shapes questions (count / existence) carry tiers too
        prompt, meta = shapes_question(i)
        words = prompt["question"].rstrip("?").split()  # "How many red circles are there" / "Is there a red circle"
        color, shape = (words[2], words[3][:-1]) if words[0] == "How" else (words[-2], words[-1])
        listing = [f"a {c} {s}" for c, s in meta["objects"]]
        assert len(meta["hints"]) == 3 and all(x in meta["hints"][2] for x in listing)
        if prompt["question"].startswith("How many"):
            n = sum((c, s) == (color, shape) for c, s in meta["objects"])
            assert n == "ABC".index(meta["answer"]) + 1 and f" {n} " in meta["hints"][2]
        else:
            assert f"both {color} and a {shape}" in meta["hints"][0]


def test_scaf_swaps_a_failed_row_for_the_hinted_success_with_ratio_one(tmp_path):
    tr = trainer_for(tmp_path, "methods.scaf_grpo.exemption_fraction=0")
    rollout, cols, m = tr.collect(0)
    # no row of the plain groups holds a hint (reward 0): both groups trigger; tier 1 makes every hinted row succeed,
    # so the last row of each group becomes the first hinted row
    assert (m["rewrite/groups"], m["rewrite/rerolled"], m["rewrite/rescued"]) == (2.0, 2.0, 2.0)
    assert cols[0, 0].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    for g in range(2):
        first, hinted = rollout.prompts[3 * g], rollout.prompts[3 * g + 2]
        assert rollout.prompts[3 * g + 1] == first and "Hint:" not in first["question"]
        assert hinted["question"] == first["question"] + "\nHint: " + rollout.meta[3 * g]["hints"][0]
        assert (
            hinted["options"] == first["options"]
            and rollout.meta[3 * g + 2]["answer"] == rollout.meta[3 * g]["answer"]
        )
        assert rollout.extras["prompt"][3 * g + 2] is not rollout.extras["prompt"][3 * g]  # its own prompt forward
    # the hinted row's log-probs are those of its hinted prompt: the ratio starts at 1 for every row
    lp = tr.policy.log_prob(rollout, torch.arange(6)).logp
    mask = rollout.train_mask
    assert (lp - rollout.logp_old).abs().masked_select(mask).max() < 1e-5
    adv, row_w, _ = tr.advantage(cols, rollout, 0)
    # totals [0, 0, 1]: mean 1/3, Bessel std sqrt(1/3) = 0.57735 -> [-0.57735, -0.57735, 1.15470] per group
    assert adv.tolist() == pytest.approx([-0.57735, -0.57735, 1.15470] * 2, abs=1e-4)
    out = tr.update(rollout, adv, row_w, 0)
    assert torch.isfinite(torch.tensor(out["loss/policy"]))


def test_scaf_waits_out_the_exemption_and_escalates_tiers(tmp_path):
    tr = trainer_for(tmp_path, "methods.scaf_grpo.exemption_fraction=0.5", "trainer.max_steps=4")
    _, cols, m = tr.collect(0)  # step 0 < ceil(0.5 * 4) = 2: plain GRPO, the groups stay at 0
    assert (m["rewrite/groups"], m["rewrite/rerolled"]) == (2.0, 0.0) and cols.sum() == 0
    tr2 = trainer_for(
        tmp_path / "b",
        "methods.scaf_grpo.exemption_fraction=0",
        "rewards=[{name: test_scaf_tier, options: {tier: 1}}]",
    )
    rollout, cols, m = tr2.collect(0)  # only tier 2 succeeds: tier 1 is tried, then tier 2
    assert (m["rewrite/groups"], m["rewrite/rerolled"], m["rewrite/rescued"]) == (2.0, 4.0, 2.0)
    assert all(rollout.prompts[3 * g + 2]["question"].endswith(rollout.meta[3 * g]["hints"][1]) for g in range(2))


def test_scaf_options_are_checked_at_load():
    base = REPO / "configs" / "vlm_scaf_grpo.yaml"
    with pytest.raises(UserError, match="exemption_fraction=1.0 must be in"):
        load_config(base, ["methods.scaf_grpo.exemption_fraction=1.0"])
    with pytest.raises(UserError, match="must contain {question} and {hint}"):
        load_config(base, ["methods.scaf_grpo.template=no hint here"])
    with pytest.raises(UserError, match="mode=add is not Scaf-GRPO's"):
        load_config(base, ["methods.scaf_grpo.mode=add"])
    with pytest.raises(UserError, match="applies to the vlm_reasoning recipe"):
        load_config(REPO / "configs" / "bandit.yaml", ["methods.scaf_grpo={}"])
