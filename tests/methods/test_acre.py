"""ACRE answer consistency (mmgrpo/methods/acre.py): shuffles, letter mapping, reasoning rewrite, reward table."""

import random
from itertools import permutations

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.methods.acre import (
    DEFAULT_TABLE,
    acre_reward,
    build_reask_prompt,
    map_back,
    map_forward,
    rewrite_letter_mentions,
    shuffle_options,
)
from mmgrpo.rewards.text import extract_choice


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_shuffle_is_never_the_identity(n):
    options = [f"opt{i}" for i in range(n)]
    for seed in range(50):
        shuffled, perm = shuffle_options(options, random.Random(seed))
        assert perm != list(range(n)) and sorted(perm) == list(range(n))
        assert shuffled == [options[p] for p in perm]  # shuffled[i] = options[perm[i]]
    assert shuffle_options(["x", "y"], random.Random(0)) == (["y", "x"], [1, 0])  # the only non-identity of 2


def test_shuffle_is_uniform_over_non_identity_and_reproducible():
    rng = random.Random(0)
    seen = {tuple(shuffle_options("abc", rng)[1]) for _ in range(300)}
    assert seen == set(permutations(range(3))) - {(0, 1, 2)}  # all 5 non-identity permutations, never the identity
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert shuffle_options(["a", "b", "c", "d"], g1) == shuffle_options(["a", "b", "c", "d"], g2)
    assert shuffle_options(["only"], random.Random(0)) == (["only"], [0])  # one option cannot move


def test_map_back_and_forward():
    # options [red, green, blue], perm [2, 0, 1] -> shown as A blue, B red, C green
    perm = [2, 0, 1]
    assert [map_back(x, perm) for x in "ABC"] == ["C", "A", "B"]  # new A (blue) was C, ...
    assert [map_forward(x, perm) for x in "ABC"] == ["B", "C", "A"]  # old A (red) is now B, ...
    assert all(map_back(map_forward(x, perm), perm) == x for x in "ABC")
    assert map_back(" b ", perm) == "A"  # case and spaces forgiven
    with pytest.raises(UserError, match="ABC"):
        map_back("D", perm)


def test_consistency_check_end_to_end():
    options = ["2", "3", "4", "5"]
    shuffled, perm = shuffle_options(options, random.Random(1))
    first = "B"  # the first answer: "3"
    second = map_forward(first, perm)  # a consistent second answer names "3" in the new order
    assert shuffled[ord(second) - 65] == "3"
    assert map_back(extract_choice(f"the answer is ({second})"), perm) == first


@pytest.mark.parametrize(
    "reasoning, expected",
    [
        # perm [2, 0, 1]: old A -> B, old B -> C, old C -> A
        ("Option A is too dark.", "Option B is too dark."),  # keyword + letter
        ("options B and C are both wrong", "options C and A are both wrong"),  # a list after the keyword
        ("choices: A, C or B", "choices: B, A or C"),
        ("So the answer is (C).", "So the answer is (A)."),  # parenthesised letter after a keyword
        ("I rule out (A) and (B)", "I rule out (B) and (C)"),  # parentheses anywhere
        ("A. too dark\n  B) too light\nC: just right", "B. too dark\n  C) too light\nA: just right"),  # line starts
        ("ANSWER IS B", "ANSWER IS C"),  # the keyword in any case
        ("option A/B", "option B/C"),
        # left alone: bare capitals, lower case, letters past the options, words
        ("A cat sits at point A near vitamin B", "A cat sits at point A near vitamin B"),
        ("option b looks fine", "option b looks fine"),
        ("option F and (E)", "option F and (E)"),  # only 3 options: F and E do not exist
        ("Answers vary. Optional.", "Answers vary. Optional."),
    ],
)
def test_rewrite_letter_mentions(reasoning, expected):
    assert rewrite_letter_mentions(reasoning, [2, 0, 1]) == expected


def test_rewrite_renames_each_letter_once():
    # a swap: a sequential rewrite would turn "A or B" into "B or B" (or "A or A"); one pass gives "B or A"
    assert rewrite_letter_mentions("option A or B, not (A)", [1, 0]) == "option B or A, not (B)"


def test_acre_reward_table():
    assert DEFAULT_TABLE == {
        "correct_consistent": 1.0,
        "correct_inconsistent": 0.5,
        "wrong_consistent": 0.0,
        "wrong_inconsistent": 0.0,
    }
    assert [acre_reward(c, k) for c in (True, False) for k in (True, False)] == [1.0, 0.5, 0.0, 0.0]
    table = {"correct_inconsistent": 0.25, "wrong_inconsistent": -0.5}  # partial override
    assert [acre_reward(c, k, table) for c in (True, False) for k in (True, False)] == [1.0, 0.25, 0.0, -0.5]
    with pytest.raises(UserError, match="correct_consistent"):
        acre_reward(True, True, {"right_consistent": 1.0})
    # the reward refuses a table that pays an answer its reasoning does not carry more than one it does (the method
    # walkthrough of 2026-12-07: wrong_inconsistent=2 trained)
    from mmgrpo.rewards import registry

    with pytest.raises(UserError, match="wrong_inconsistent=2 is above wrong_consistent=0.0: it would pay"):
        registry.get("acre", table={"wrong_inconsistent": 2})
    with pytest.raises(UserError, match="correct_inconsistent=1.5 is above correct_consistent=1.0"):
        registry.get("acre", table={"correct_inconsistent": 1.5})
    registry.get("acre", table={"correct_inconsistent": 0.25, "wrong_inconsistent": -0.5})


def test_build_reask_prompt():
    reasoning = "<think>The ball is red, not option A.</think><answer>B</answer>"
    prompt = build_reask_prompt(
        "What colour is the ball?\n", ["blue", "red"], rewrite_letter_mentions(reasoning, [1, 0])
    )
    assert prompt == (
        "What colour is the ball?\n\nOptions:\nA. blue\nB. red\n\n"
        "Here is a reasoning process for this question:\n<think>The ball is red, not option B.</think>\n\n"
        "Based only on this reasoning, give the letter of the correct option in <answer> </answer> tags."
    )
    assert "<answer>B</answer>" not in prompt  # the first answer does not leak
