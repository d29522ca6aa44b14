"""DaGRPO: the pairwise rectified advantage and the anchors, by hand; load-time checks."""

from pathlib import Path

import pytest
import torch

from mmgrpo.core import advantages as adv_lib
from mmgrpo.core.errors import UserError
from mmgrpo.methods.dagrpo import anchored_include, rectified_advantages
from mmgrpo.train.config import load_config

REPO = Path(__file__).resolve().parents[2]
NO_MODEL = "policy.options.path=/nonexistent/vlm"


def test_with_every_pair_it_is_grpo():
    r = torch.tensor([[1.0, 0.9, 0.0, 0.0], [0.2, 0.5, 0.1, 0.7]])
    a, masked = rectified_advantages(r, r, min_distinct=0.0)
    assert torch.allclose(a, adv_lib.grpo(r), atol=1e-5) and torch.equal(masked, torch.zeros(2))


def test_homogeneous_pairs_are_masked_by_hand():
    # r = s = [1, 0.9, 0, 0], min_distinct 0.2: pairs (0, 1) (|0.1|) and (2, 3) (|0|) are masked.
    # mean 0.475, unbiased std sqrt(0.9075 / 3) = 0.55; G' = 4 -> divisor 4 * 0.55 = 2.2
    # A_0 = (1 + 1) / 2.2 = 0.909091, A_1 = (0.9 + 0.9) / 2.2 = 0.818182, A_2 = A_3 = (-1 - 0.9) / 2.2 = -0.863636
    # (GRPO: 0.954545, 0.772727, -0.863636, -0.863636); 4 of the 12 ordered pairs masked
    r = torch.tensor([[1.0, 0.9, 0.0, 0.0]])
    a, masked = rectified_advantages(r, r, min_distinct=0.2)
    assert torch.allclose(a, torch.tensor([[0.909091, 0.818182, -0.863636, -0.863636]]), atol=1e-5)
    assert torch.allclose(masked, torch.tensor([4 / 12]))
    # a separate fine-grained score: every score equal -> every pair masked, A = 0
    a, masked = rectified_advantages(r, torch.full_like(r, 0.5), min_distinct=0.2)
    assert torch.equal(a, torch.zeros_like(a)) and masked.item() == 1.0


def test_anchors_take_part_only_in_hard_groups():
    # group 0: on-policy [0, 0, 0], anchor 1 -> hard: all four rows, std of [0, 0, 0, 1] = 0.5, divisor 4 * 0.5 = 2:
    #   A_anchor = 3 / 2 = 1.5, on-policy (0 + 0 - 1) / 2 = -0.5
    # group 1: on-policy [1, 0, 0], anchor 1 -> not hard: the anchor gets 0; std of [1, 0, 0] = 0.57735,
    #   divisor 3 * 0.57735 = 1.73205: A = [2, -1, -1] / 1.73205 = [1.154701, -0.577350, -0.577350]
    r = torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]])
    off = torch.tensor([[False, False, False, True]] * 2)
    include, hard = anchored_include(r, off)
    assert hard.tolist() == [True, False]
    a, _ = rectified_advantages(r, r, 0.0, include)
    want = torch.tensor([[-0.5, -0.5, -0.5, 1.5], [1.154701, -0.57735, -0.57735, 0.0]])
    assert torch.allclose(a, want, atol=1e-5)


def test_dagrpo_options_are_checked_at_load():
    cfg = load_config(REPO / "configs" / "vlm_reasoning_tiny.yaml", [NO_MODEL, "methods.dagrpo={}"])
    assert "dagrpo" in cfg.methods
    with pytest.raises(UserError, match="set advantage.estimator: grpo"):
        load_config(REPO / "configs" / "vlm_reasoning_tiny.yaml",
                    [NO_MODEL, "methods.dagrpo={}", "advantage.estimator=dr_grpo"])  # fmt: skip
    with pytest.raises(UserError, match="score='nope'"):
        load_config(REPO / "configs" / "vlm_reasoning_tiny.yaml", [NO_MODEL, "methods.dagrpo={score: nope}"])
    with pytest.raises(UserError, match="anchors=false"):
        load_config(REPO / "configs" / "bandit.yaml", ["methods.dagrpo={}"])
    cfg = load_config(REPO / "configs" / "bandit.yaml", ["methods.dagrpo={anchors: false}"])
    with pytest.raises(UserError, match="cannot be combined"):
        load_config(REPO / "configs" / "vlm_tempsamp.yaml", [NO_MODEL, "methods.dagrpo={}"])


def test_a_prompt_without_ground_truth_is_named_as_dagrpos():
    from mmgrpo.core.types import PromptBatch
    from mmgrpo.methods.dagrpo import AnchorPolicy

    with pytest.raises(UserError, match=r"methods.dagrpo \(anchors\): prompt 1 has no meta\['answer'\]"):
        AnchorPolicy(object()).rollout(PromptBatch(["q1", "q2"], [{"answer": "A"}, {}]), 2)
