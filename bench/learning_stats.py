"""The statistics of the benchmarks: for ``bench/learning_vlm.py`` mean +- SE over seeds, the paired difference to the
baseline and the share of trained groups that all fail (read from the trainer's advantage dumps); for the timed
side-by-side comparisons (``bench/rollout.py``, ``bench/peers.py``) the paired time ratio with its interval."""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path


def mean_se(values: list[float]) -> tuple[float, float]:
    """(mean, standard error std / sqrt(n)) of ``values``; the SE is nan for a single value."""
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return mean, se


def paired_diff(method: list[float], baseline: list[float]) -> tuple[float, float]:
    """(mean difference, paired SE) of ``method[s] - baseline[s]`` over the same seeds s."""
    if len(method) != len(baseline):
        raise ValueError(f"paired_diff needs the same seeds on both sides; got {len(method)} and {len(baseline)}")
    return mean_se([a - b for a, b in zip(method, baseline)])


def paired_ratio(
    ours: list[float], theirs: list[float], resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(median, low, high) of the per-repeat ratios ``ours[i] / theirs[i]``, with a 95% percentile-bootstrap interval
    of that median (``resamples`` resamplings of the repeats, seeded: the same times give the same interval).

    Repeat i timed both sides next to each other, so a ratio of the pair cancels what drifts slowly on a shared
    machine (other load, clock, caches), which a ratio of the two sides' medians does not. With one repeat the
    interval is that ratio."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError(f"paired_ratio needs as many repeats on both sides (>= 1); got {len(ours)}, {len(theirs)}")
    ratios = [a / b for a, b in zip(ours, theirs)]
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    lo, hi = meds[int(0.025 * (resamples - 1))], meds[int(math.ceil(0.975 * (resamples - 1)))]
    return statistics.median(ratios), lo, hi


def all_fail_fraction(accuracy: list[list[float]]) -> float:
    """Share of groups whose accuracy is 0 on every row; ``accuracy``: per group its rows' values (nan = no
    accuracy, e.g. PEARL's checklist rows); groups with no accuracy at all are left out (nan if none is left)."""
    groups = [[v for v in g if not math.isnan(v)] for g in accuracy]
    groups = [g for g in groups if g]
    return sum(max(g) <= 0.0 for g in groups) / len(groups) if groups else math.nan


def dumped_accuracy(debug_dir: Path, reward_index: int, group_size: int) -> list[list[float]]:
    """Per group over all steps, the accuracy rewards of its rows, from ``debug/adv_step_*.safetensors``
    (``rewards [V, R, N]``, rows in group order; ``group_sizes [B]``, ragged groups included; a dump without it has
    groups of ``group_size``)."""
    from safetensors.torch import load_file

    out: list[list[float]] = []
    for f in sorted(debug_dir.glob("adv_step_*.safetensors")):
        dump = load_file(str(f))
        acc = dump["rewards"][0, reward_index].double()  # [N]
        sizes = dump["group_sizes"].tolist() if "group_sizes" in dump else [group_size] * (acc.numel() // group_size)
        if sum(sizes) != acc.numel():
            raise ValueError(f"{f}: group sizes {sizes} do not add up to its {acc.numel()} rows")
        out += [g.tolist() for g in acc.split(sizes)]
    return out
