"""TempSamp-R1 (mmgrpo/methods/tempsamp.py): ground-truth injection and anchored advantages, pinned numbers."""

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.methods.tempsamp import anchor_advantages, format_ground_truth, inject_ground_truth, tempsamp_advantages

ROWS = ["a0", "a1", "a2", "b0", "b1", "b2"]  # B = 2 groups of G = 3


def test_inject_ground_truth_positions():
    out, mask = inject_ground_truth(ROWS, 3, ["GA", "GB"])  # position "last": slot 2
    assert out == ["a0", "a1", "GA", "b0", "b1", "GB"]
    assert mask.tolist() == [False, False, True, False, False, True] and mask.dtype == torch.bool
    out, mask = inject_ground_truth(ROWS, 3, ["GA", "GB"], position="first")
    assert out == ["GA", "a1", "a2", "GB", "b1", "b2"] and mask.tolist() == [True, False, False, True, False, False]
    out, _ = inject_ground_truth(ROWS, 3, ["GA", "GB"], position=1)
    assert out == ["a0", "GA", "a2", "b0", "GB", "b2"]
    assert ROWS == ["a0", "a1", "a2", "b0", "b1", "b2"]  # the input is not modified


def test_inject_ground_truth_errors():
    with pytest.raises(UserError, match="one per group"):
        inject_ground_truth(ROWS, 3, ["GA"])
    with pytest.raises(UserError, match="position"):
        inject_ground_truth(ROWS, 3, ["GA", "GB"], position=3)
    with pytest.raises(UserError, match="group_size=1"):
        inject_ground_truth(ROWS, 1, ["G"] * 6)
    with pytest.raises(ValueError, match="multiple"):
        inject_ground_truth(ROWS[:5], 3, ["GA", "GB"])


def test_format_ground_truth():
    assert format_ground_truth("12.5 to 17.0 seconds") == "<think></think><answer>12.5 to 17.0 seconds</answer>"
    assert format_ground_truth("B", "the ball is red") == "<think>the ball is red</think><answer>B</answer>"


def test_anchor_is_factor_times_the_best_on_policy_advantage():
    mask = torch.tensor([[False, False, False, True]])
    # on-policy max 0.05 > 0 -> 1.2 * 0.05 = 0.06 (the estimator gave the GT row 0.45)
    adv = torch.tensor([[-0.35, -0.15, 0.05, 0.45]])
    torch.testing.assert_close(anchor_advantages(adv, mask), torch.tensor([[-0.35, -0.15, 0.05, 0.06]]))
    # factor 2: 2 * 0.05 = 0.1
    torch.testing.assert_close(anchor_advantages(adv, mask, factor=2.0)[0, 3], torch.tensor(0.1))


def test_anchor_when_no_on_policy_row_is_positive():
    mask = torch.tensor([[False, False, False, True], [False, False, False, True]])
    # group 0: only the GT is good; on-policy all -0.5 (max <= 0) -> 1.2 * max |A_on| = 1.2 * 0.5 = 0.6
    # group 1: zero-variance group, every advantage 0 -> 0
    adv = torch.tensor([[-0.5, -0.5, -0.5, 1.5], [0.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[-0.5, -0.5, -0.5, 0.6], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(anchor_advantages(adv, mask), expected)
    # mixed signs, max exactly 0: on-policy [-0.4, 0.0, -0.2] -> 1.2 * 0.4 = 0.48
    out = anchor_advantages(torch.tensor([[-0.4, 0.0, -0.2, 0.9]]), mask[:1])
    torch.testing.assert_close(out[0, 3], torch.tensor(0.48))


def test_anchor_leaves_groups_without_off_policy_rows_and_rejects_all_off_policy():
    adv = torch.tensor([[1.0, -1.0], [0.3, -0.3]])
    mask = torch.tensor([[False, False], [True, False]])
    # group 0 unchanged; group 1: the off-policy row 0 gets 1.2 * (-0.3 <= 0 -> |-0.3|) = 0.36
    torch.testing.assert_close(anchor_advantages(adv, mask), torch.tensor([[1.0, -1.0], [0.36, -0.3]]))
    with pytest.raises(UserError, match="only off-policy"):
        anchor_advantages(adv, torch.tensor([[True, True], [False, True]]))
    with pytest.raises(UserError, match="factor"):
        anchor_advantages(adv, mask, factor=0.0)


def test_tempsamp_advantages_chain_soft_shaping_estimator_anchor():
    # rewards [0.5, 0.5, 1.0 | GT 1.0]; tempsamp_soft (tau 0.8, a1 0.01, a2 1): f(0.5) = 0.59639, f(1.0) = 0.80182
    # dr_grpo: mean (2 * 0.59639 + 2 * 0.80182) / 4 = 0.699105 -> A_on = [-0.102715, -0.102715, 0.102715]
    # anchor: 1.2 * 0.102715 = 0.123258
    rewards = torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    mask = torch.tensor([[False, False, False, True]])
    adv = tempsamp_advantages(rewards, mask, estimator="dr_grpo")
    torch.testing.assert_close(adv, torch.tensor([[-0.102715, -0.102715, 0.102715, 0.123258]]), atol=1e-5, rtol=0)
    # estimator options pass through: grpo with scale=False is dr_grpo's mean-centring
    same = tempsamp_advantages(rewards, mask, estimator="grpo", estimator_options={"scale": False})
    torch.testing.assert_close(same, adv)
    with pytest.raises(UserError, match="has no option 'taus'"):
        tempsamp_advantages(rewards, mask, shaping_options={"taus": 0.5})
