"""The multimodal methods wired into the vlm_reasoning recipe, on the tiny REAL Qwen2-VL asset, numbers by hand:
PEARL's two streams, fidelity gate and loss weights; TempSamp-R1's injected ground truth and anchored advantage;
MM-UPT's vote inside a run; the method configs; the switches' errors."""

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.methods.tempsamp import TempSampPolicy, format_ground_truth
from mmgrpo.pipelines.vlm_reasoning import shapes_question
from mmgrpo.rewards.text import extract_answer, extract_choice
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
ASSET = REPO / "assets" / "tiny_qwen2_vl"
METHOD_CONFIGS = [
    "vlm_pearl",
    "vlm_listener",
    "vlm_acre",
    "vlm_mmupt",
    "vlm_tempsamp",
    "vlm_scaf_grpo",
    "vlm_hill",
    "vlm_cog_drift",
]
NAN = math.nan


def trainer_for(tmp_path, name, *overrides):
    """A Trainer of configs/<name>.yaml on the asset, tiny sizes; nothing trained until asked."""
    cfg = load_config(
        REPO / "configs" / f"{name}.yaml",
        [
            f"run.output_dir={tmp_path}",
            f"policy.options.path={ASSET}",
            "policy.options.max_new_tokens=24",
            "data.options.num_examples=12",
            "trainer.prompts_per_step=2",
            "trainer.progress=false",
            *overrides,
        ],
    )
    return Trainer(cfg, tmp_path / name)


# ----------------------------------------------------------------------------------------------- PEARL


def test_shapes_checklists_are_answered_by_the_scene():
    for i in range(30):
        _, meta = shapes_question(i, seed=0, size=32)
        (q_count, n), (q_shape, present) = meta["checklist"]
        color = q_count.split()[2]  # "How many red objects are there?"
        shape = q_shape.rstrip("?").split()[-1]  # "Is there a triangle?"
        assert n == str(sum(c == color for c, _ in meta["objects"]))
        assert present == ("yes" if any(s == shape for _, s in meta["objects"]) else "no")
        assert shapes_question(i, seed=0, size=32)[1]["checklist"] == meta["checklist"]  # deterministic


def test_pearl_two_streams_gate_and_loss_weights(tmp_path):
    tr = trainer_for(tmp_path, "vlm_pearl", "trainer.group_size=2")
    rollout, cols, _ = tr.collect(0)
    G, names = 2, ["format", "accuracy", "pearl_checklist"]
    assert rollout.num_rows == 8 and rollout.num_groups == 4  # B = 2 prompts -> 4 groups: r0 c0 r1 c1
    assert [m["stream"] for m in rollout.meta[::G]] == ["reasoning", "checklist"] * 2
    assert rollout.loss_weight.tolist() == pytest.approx([1, 1, 0.1, 0.1, 1, 1, 0.1, 0.1])  # lambda = 0.1
    check = rollout.prompts[2]["question"]
    assert check.startswith("Answer each question") and rollout.meta[2]["checklist"][0][0] in check
    assert rollout.meta[2].get("answer") is None and rollout.meta[2]["images"] is rollout.meta[0]["images"]
    # each stream's rewards are None (NaN) on the other stream's rows
    acc, r_p = cols[0, names.index("accuracy")], cols[0, names.index("pearl_checklist")]
    assert acc.view(4, G)[1::2].isnan().all() and not acc.view(4, G)[0::2].isnan().any()
    assert r_p.view(4, G)[0::2].isnan().all() and not r_p.view(4, G)[1::2].isnan().any()
    # hand-made rewards (weights 0.5, 1, 1) through the trainer's advantage phase (grpo, then the PEARL hook)
    hand = torch.tensor(
        [
            [1, 0, 1, 1, 1, 0, 0, 0],  # format
            [1, 0, NAN, NAN, 0, 0, NAN, NAN],  # accuracy
            [NAN, NAN, 0, 0, NAN, NAN, 0.2, 0.4],  # pearl_checklist: R_p means 0 (c0) and 0.3 (c1)
        ]
    )[None]
    adv, row_w, metrics = tr.advantage(hand, rollout, 0)
    # weighted totals: r0 [1.5, 0] -> grpo +-1/sqrt2 = +-0.70711, gated x 0 (mean R_p 0: update skipped);
    # c0 [0.5, 0.5] -> zero variance -> 0; r1 [0.5, 0] -> +-0.70711 x min(0.3, cap 0.5) = +-0.21213;
    # c1 [0.2, 0.4] -> -+0.70711, not gated
    assert adv.tolist() == pytest.approx([0, 0, 0, 0, 0.21213, -0.21213, -0.70711, 0.70711], abs=1e-4)
    assert metrics["pearl/gate_mean"] == pytest.approx(0.15)  # (0 + 0.3) / 2
    assert metrics["pearl/skipped_groups"] == 1.0
    assert row_w.tolist() == [1.0] * 8  # the estimator's weights; rollout.loss_weight multiplies them in update


def test_pearl_cap_and_switch_errors(tmp_path):
    tr = trainer_for(tmp_path, "vlm_pearl", "trainer.group_size=2", "methods.pearl.cap=0.25")
    rollout, _, _ = tr.collect(0)
    hand = torch.tensor([[1, 0, 1, 1, 1, 0, 1, 1], [NAN] * 8, [NAN, NAN, 1, 1, NAN, NAN, 0.2, 0.4]])[None]
    adv, _, metrics = tr.advantage(hand, rollout, 0)
    # r0 gated by min(1.0, cap 0.25) = 0.25: 0.70711 x 0.25 = 0.17678; r1 by min(0.3, 0.25) = 0.25
    assert adv.tolist()[:2] == pytest.approx([0.17678, -0.17678], abs=1e-4)
    assert adv.tolist()[4:6] == pytest.approx([0.17678, -0.17678], abs=1e-4)
    assert metrics["pearl/gate_mean"] == pytest.approx(0.25) and metrics["pearl/skipped_groups"] == 0.0
    with pytest.raises(UserError, match="pearl_checklist"):
        trainer_for(tmp_path / "a", "vlm_pearl", "rewards.2.name=accuracy")
    with pytest.raises(UserError, match="cannot be combined"):
        trainer_for(tmp_path / "b", "vlm_pearl", "methods.tempsamp={}")
    with pytest.raises(UserError, match="methods.pearl.cap"):
        load_config(REPO / "configs" / "vlm_pearl.yaml", ["methods.pearl.cpa=0.3"])  # a typo


# ----------------------------------------------------------------------------------------------- TempSamp-R1


def test_tempsamp_injects_the_teacher_forced_ground_truth_and_anchors_it(tmp_path):
    tr = trainer_for(
        tmp_path, "vlm_tempsamp", "trainer.group_size=3", "advantage.shaping=none", "advantage.shaping_options={}",
        "trainer.logp_old=rollout",  # recorded by the rollout, so the ratio below is checked against it
    )  # fmt: skip
    rollout, cols, _ = tr.collect(0)
    off = rollout.extras["offpolicy_mask"]
    assert off.tolist() == [False, False, True] * 2  # the last row of each group
    policy = tr.policy
    for n in (2, 5):
        gt = format_ground_truth(rollout.meta[n]["answer"])  # e.g. "<think></think><answer>B</answer>"
        assert rollout.samples[n] == gt
        ids = rollout.extras["completion_ids"][n, : int(rollout.extras["completion_len"][n])]
        assert policy._decode(ids) == gt and int(ids[-1]) in policy.eos_ids and rollout.extras["finished"][n]
        assert cols[0, :, n].tolist() == [1.0, 1.0]  # format and accuracy of the ground truth
    # completion/* describe what was sampled: the teacher-forced rows (no sampling distribution, entropy 0) are out
    ent, lengths = rollout.extras["token_entropy"], rollout.extras["completion_len"]
    assert ent[off].eq(0).all()
    sampled = [ent[n, : int(lengths[n])] for n in range(6) if not off[n]]
    m = policy.rollout_metrics(rollout)
    assert m["completion/entropy"] == pytest.approx(torch.cat(sampled).mean().item(), rel=1e-6)
    assert m["completion/length_mean"] == pytest.approx(sum(len(x) for x in sampled) / 4)
    # its logp_old is its log-prob under the sampling parameters: the ratio starts at 1 (and its log-prob trains)
    rows = torch.tensor([2, 5])
    lp = policy.log_prob(rollout, rows).logp
    m = rollout.train_mask[rows]
    assert (lp - rollout.logp_old[rows]).abs().masked_select(m).max() < 1e-5 and (lp.masked_select(m) < 0).all()
    # hand-made rewards through the advantage phase (weights format 0.5, accuracy 1; shaping off to keep it by hand)
    hand = torch.tensor([[0, 0, 1, 1, 0, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.float32)[None]
    adv, _, metrics = tr.advantage(hand, rollout, 0)
    # group 0 totals [0, 1, 1.5]: mean 0.8333, std 0.76376 -> [-1.09109, 0.21822, 0.87287]; GT -> 1.2 x 0.21822
    # group 1 totals [1.5, 0, 0.5]: -> [1.09109, -0.87287, -0.21822]; GT -> 1.2 x 1.09109 = 1.30931
    expected = [-1.09109, 0.21822, 0.26186, 1.09109, -0.87287, 1.30931]
    assert adv.tolist() == pytest.approx(expected, abs=1e-4)
    assert metrics["tempsamp/anchor_adv"] == pytest.approx((0.26186 + 1.30931) / 2, abs=1e-4)
    # reward/* are the sampled rows' (the ground truth, always right, inflated reward/accuracy): rows 0, 1, 3, 4
    assert metrics["reward/format"] == 0.25 and metrics["reward/accuracy"] == 0.5  # all 6 rows: 0.5, 0.5
    assert metrics["reward/mean"] == pytest.approx((0 + 1 + 1.5 + 0) / 4)


def test_tempsamp_config_shapes_rewards_and_the_switch_is_checked(tmp_path):
    cfg = load_config(REPO / "configs" / "vlm_tempsamp.yaml")
    assert cfg.advantage.shaping == "tempsamp_soft" and cfg.methods["tempsamp"]["anchor_factor"] == 1.2
    tr = trainer_for(tmp_path, "vlm_tempsamp", "trainer.group_size=2", "methods.tempsamp.anchor_factor=null")
    assert tr.comp.advantage_hooks == [] and isinstance(tr.policy, TempSampPolicy)  # injection without anchoring
    with pytest.raises(UserError, match="max_new_tokens"):
        trainer_for(tmp_path / "a", "vlm_tempsamp", "trainer.group_size=2", "policy.options.max_new_tokens=4").collect(
            0
        )
    with pytest.raises(UserError, match="group_size >= 2"):
        trainer_for(tmp_path / "b", "vlm_tempsamp", "trainer.group_size=1")
    with pytest.raises(UserError, match="methods: {tempsamp"):
        trainer_for(tmp_path / "c", "vlm_mmupt", "policy.options.inject_ground_truth=true")


def test_tempsamp_position_and_ground_truth_key_are_its_options(tmp_path):
    tr = trainer_for(tmp_path, "vlm_tempsamp", "trainer.group_size=3", "methods.tempsamp.position=first")
    rollout, _, _ = tr.collect(0)
    assert rollout.extras["offpolicy_mask"].tolist() == [True, False, False] * 2  # slot 0 of each group
    assert [rollout.samples[n] for n in (0, 3)] == [format_ground_truth(rollout.meta[n]["answer"]) for n in (0, 3)]
    with pytest.raises(UserError, match=r"no meta\['label'\].*methods.tempsamp.ground_truth_key"):
        trainer_for(tmp_path / "a", "vlm_tempsamp", "methods.tempsamp.ground_truth_key=label").collect(0)


# ----------------------------------------------------------------------------------------------- MM-UPT, configs


def test_majority_vote_inside_a_vlm_run_votes_within_each_group(tmp_path):
    tr = trainer_for(tmp_path, "vlm_mmupt", "trainer.group_size=6")
    rollout, cols, _ = tr.collect(0)
    vote = cols[0, 1].view(-1, 6)  # [B, G]
    for g, group in enumerate(vote):
        answers = [extract_answer(s) for s in rollout.samples[g * 6 : (g + 1) * 6]]
        letters = [extract_choice(a) if a is not None else None for a in answers]
        counts = Counter(x for x in letters if x is not None)
        top = max(counts.values()) if counts else 0
        winner = next((x for x in letters if x is not None and counts[x] == top), None)  # ties: the earliest
        assert group.tolist() == [float(x is not None and x == winner) for x in letters]
    assert vote.sum() > 0  # the asset writes <answer> letters: some rows agree


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_method_configs_open_with_their_command_and_run_on_the_tiny_asset(name):
    path = REPO / "configs" / f"{name}.yaml"
    assert path.read_text().splitlines()[0] == f"# mmgrpo train configs/{name}.yaml"
    cfg = load_config(path)
    # PEARL on the shapes demo's VLM: on the tiny asset every checklist sheet scored 0 and nothing trained
    asset = "assets/shapes_vlm" if name == "vlm_pearl" else "assets/tiny_qwen2_vl"
    assert cfg.pipeline == "vlm_reasoning" and cfg.policy.options["path"] == asset
