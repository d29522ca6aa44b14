"""MM-UPT majority vote (mmgrpo/methods/mmupt.py): ties, unparseable rows, numeric equivalence, groups."""

import pytest

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import RewardContext
from mmgrpo.methods.mmupt import answer_key, majority_index
from mmgrpo.rewards import registry


def _a(text: str) -> str:
    return f"<think>...</think><answer>{text}</answer>"


def _vote(answers: list[str], G: int, **options) -> list[float]:
    fn = registry.get("majority_vote", **options)
    assert fn.group_aware
    return fn(answers, None, None, RewardContext(group_size=G))


def test_majority_wins_minority_and_unparseable_score_zero():
    # B, (B), B) blue -> three votes for B; A one vote; "no tag" has no answer block -> unparseable
    answers = [_a("B"), _a("(B)"), _a("A"), "B", _a("B) blue")]
    assert _vote(answers, 5, mode="choice") == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_ties_go_to_the_earliest_appearing_answer():
    # 2 votes A (rows 0, 3), 2 votes B (rows 1, 2): A appeared first (Counter.most_common order, as MM-UPT)
    assert _vote([_a("A"), _a("B"), _a("B"), _a("A")], 4, mode="choice") == [1.0, 0.0, 0.0, 1.0]
    # all different: the first row's answer wins the 1-1-1 tie
    assert _vote([_a("C"), _a("A"), _a("B")], 3, mode="choice") == [1.0, 0.0, 0.0]


def test_unparseable_never_wins():
    # three unparseable rows (no letter; no answer block; empty block) would be the majority if they voted
    answers = [_a("hmm?"), "A", _a(""), _a("C"), _a("D")]
    assert _vote(answers, 5, mode="choice") == [0.0, 0.0, 0.0, 1.0, 0.0]  # C and D tie 1-1: C is first
    # a group with nothing parseable scores all 0
    assert _vote([_a("?"), "no tag", _a("")], 3, mode="choice") == [0.0, 0.0, 0.0]
    # without require_answer_tag the bare completion "A" is read as the answer and now votes
    assert _vote(["A", _a("A"), _a("C")], 3, mode="choice", require_answer_tag=False) == [1.0, 1.0, 0.0]


def test_numeric_equivalence():
    # 0.5 = 1/2 = \frac{1}{2} = .5 (4 votes) vs 2 and 0.25 (one each)
    answers = [_a("0.5"), _a("1/2"), _a("2"), _a("\\frac{1}{2}"), _a(".5"), _a("0.25")]
    assert _vote(answers, 6, mode="numeric") == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    # tolerance: |0.5000001 - 0.5| = 1e-7 <= 1e-6 + 1e-6 * 0.5 agrees; 0.51 does not
    assert _vote([_a("0.5"), _a("0.5000001"), _a("0.51")], 3, mode="numeric") == [1.0, 1.0, 0.0]
    # "1,000" = "1000"; an answer with no number is unparseable
    assert _vote([_a("no idea"), _a("1,000"), _a("1000"), _a("7")], 4, mode="numeric") == [0.0, 1.0, 1.0, 0.0]


def test_string_and_auto_modes():
    # normalised: "The red car!" = "red car" = "RED  car"
    assert _vote([_a("The red car!"), _a("blue car"), _a("red car"), _a("RED  car")], 4, mode="string") == [
        1.0,
        0.0,
        1.0,
        1.0,
    ]
    # auto: "1/2" and "0.5" are numbers (agree); "(B) blue" and "B" are choices; "0.5" never equals "B"
    assert answer_key("1/2", "auto") == ("numeric", 0.5)
    assert answer_key("(B) blue", "auto") == ("choice", "B")
    assert answer_key("the red car", "auto") == ("string", "red car")
    assert _vote([_a("B"), _a("1/2"), _a("0.5"), _a("(B) blue"), _a("0.5")], 5) == [0.0, 1.0, 1.0, 0.0, 1.0]


def test_groups_are_independent():
    # G = 3, B = 2: group 0 majority A, group 1 majority 4
    answers = [_a("A"), _a("A"), _a("B"), _a("4"), _a("3"), _a("4.0")]
    assert _vote(answers, 3) == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]


def test_majority_index_is_first_row_of_the_largest_cluster():
    keys = [None, ("choice", "B"), ("choice", "A"), ("choice", "A"), ("choice", "B"), ("choice", "A")]
    assert majority_index(keys) == 2  # A: 3 votes (rows 2, 3, 5), B: 2 votes
    assert majority_index([None, None]) is None


def test_errors():
    with pytest.raises(UserError, match="auto, choice, numeric, string"):
        registry.get("majority_vote", mode="letters")
    with pytest.raises(ValueError, match="multiple of the group size 4"):
        _vote([_a("A")] * 6, 4)
