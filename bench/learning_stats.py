"""The statistics of ``bench/learning_vlm.py``: mean +- SE over seeds, the paired difference to the baseline, and the
share of trained groups that all fail (read from the trainer's advantage dumps)."""

from __future__ import annotations

import math
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
