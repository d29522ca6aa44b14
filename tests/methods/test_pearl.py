"""PEARL perception checklists (mmgrpo/methods/pearl.py): pinned checklist rewards, gates and stream weights."""

import math

import pytest
import torch

from mmgrpo.core.aggregations import aggregate
from mmgrpo.core.errors import UserError
from mmgrpo.methods.pearl import apply_gate, checklist_reward, fidelity_gate, stream_weights

CHECKLIST = [
    ("How many red circles are there?", 3),
    ("What colour is the square?", "red"),
    ("Which shape is on the left? A) circle B) square", "B"),
]


def test_checklist_reward_is_the_fraction_graded_correct():
    # 3 -> "<answer>3</answer>" right; "red" -> "The red." right (normalised); "B" -> "A" wrong: 2 / 3
    assert checklist_reward(["<think>count</think><answer>3</answer>", "The red.", "A"], CHECKLIST) == 2 / 3
    assert checklist_reward(["three?", "blue", "(A)"], CHECKLIST) == 0.0
    assert checklist_reward(["3.0", "RED", "(B)"], CHECKLIST) == 1.0
    assert checklist_reward(["1/2"], [("What fraction is shaded?", "0.5")]) == 1.0  # numeric grading


def test_checklist_reward_errors():
    with pytest.raises(UserError, match="2 answers for 3"):
        checklist_reward(["3", "red"], CHECKLIST)
    with pytest.raises(UserError, match="empty"):
        checklist_reward([], [])


def test_fidelity_gate():
    r = torch.tensor(
        [
            [0.0, 0.0, 0.0],  # mean 0 -> 0: the reasoning update is skipped
            [0.2, 0.4, 0.6],  # mean 0.4 -> 0.4
            [1.0, 1.0, 0.4],  # mean 0.8 -> capped at 0.5
            [math.nan, 0.3, math.nan],  # NaN rows left out: mean 0.3
            [math.nan, math.nan, math.nan],  # no checklist at all: mean 0 -> 0
        ]
    )
    assert fidelity_gate(r).tolist() == pytest.approx([0.0, 0.4, 0.5, 0.3, 0.0])
    assert fidelity_gate(r, cap=1.0).tolist() == pytest.approx([0.0, 0.4, 0.8, 0.3, 0.0])
    with pytest.raises(UserError, match=r"\[B, G\]"):
        fidelity_gate(torch.zeros(3))
    with pytest.raises(UserError, match="cap"):
        fidelity_gate(r, cap=0.0)


def test_apply_gate():
    adv = torch.tensor([[1.0, -1.0], [0.5, -0.5]])  # [B=2, G=2]
    scale = torch.tensor([0.0, 0.4])
    torch.testing.assert_close(apply_gate(adv, scale), torch.tensor([[0.0, 0.0], [0.2, -0.2]]))
    adv_k = torch.ones(2, 2, 3)  # [B, G, K] per-unit advantages
    torch.testing.assert_close(apply_gate(adv_k, scale)[:, :, 0], torch.tensor([[0.0, 0.0], [0.4, 0.4]]))
    with pytest.raises(ValueError, match="scale"):
        apply_gate(adv, torch.ones(3))


def test_stream_weights_as_row_weights_of_the_loss():
    w = stream_weights(3, 2, lam=0.1)
    assert w.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.1])
    assert stream_weights(2, 0).tolist() == [1.0, 1.0]
    # through the loss's constant-normaliser aggregation: per-row sums [2, 2, 2, 2, 2] weighted -> 6 + 0.4 = 6.4,
    # divided by rows * constant = 5 * 2 = 10 -> 0.64
    per_unit, mask = torch.ones(5, 2), torch.ones(5, 2, dtype=torch.bool)
    assert aggregate("constant", per_unit, mask, row_weight=w, constant=2).item() == pytest.approx(0.64)
    with pytest.raises(UserError, match="lam"):
        stream_weights(1, 1, lam=-0.1)
