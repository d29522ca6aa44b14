"""bench/learning_stats.py's paired time ratio: its median by hand, its bootstrap interval, and bad input."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench"
spec = importlib.util.spec_from_file_location("bench_learning_stats", BENCH / "learning_stats.py")
stats = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stats)


def test_paired_ratio_is_the_median_of_neighbour_ratios_with_a_bootstrap_interval():
    # the machine slows down over the run (both sides x1.0 .. x1.6); ours is always 0.9 of the call next to it
    theirs = [1.0, 1.1, 1.3, 1.6, 1.2]
    ours = [0.9 * t for t in theirs]
    med, lo, hi = stats.paired_ratio(ours, theirs)
    assert (med, lo, hi) == pytest.approx((0.9, 0.9, 0.9))  # every pair says 0.9: no spread to resample
    # the ratio of the medians compares calls of different moments: here ours' median call (1.0) is one of the fast
    # moments and theirs' (2.0) a slow one, 0.5, while four of five neighbours say 1.0 or more
    med, _, _ = stats.paired_ratio([1.0, 1.0, 1.0, 2.2, 2.2], [1.0, 1.0, 2.0, 2.0, 2.0])  # ratios 1, 1, 0.5, 1.1, 1.1
    assert med == pytest.approx(1.0)
    # spread: ratios 0.8, 0.9, 1.0, 1.1, 1.2 -> median 1.0, interval inside [0.8, 1.2] and around it
    med, lo, hi = stats.paired_ratio([0.8, 0.9, 1.0, 1.1, 1.2], [1.0] * 5)
    assert med == pytest.approx(1.0) and 0.8 <= lo < 1.0 < hi <= 1.2
    assert stats.paired_ratio([0.8, 0.9, 1.0, 1.1, 1.2], [1.0] * 5) == (med, lo, hi)  # seeded: the same interval
    assert stats.paired_ratio([2.0], [1.0]) == (2.0, 2.0, 2.0)  # one repeat: that ratio
    with pytest.raises(ValueError, match="as many repeats on both sides"):
        stats.paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="as many repeats on both sides"):
        stats.paired_ratio([], [])
