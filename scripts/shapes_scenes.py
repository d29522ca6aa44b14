"""Scene and schedule helpers shared by the shapes pretraining recipes.

Fresh random scenes of grammar prompts (:mod:`mmgrpo.data.shapes`) rendered as training batches, kind-balanced
prompt probabilities, the warmup + cosine learning-rate schedule and a parameter count.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mmgrpo.data.shapes import parse_prompt, render, sample_scene


def train_batch(
    prompts: list[str],
    batch_size: int,
    resolution: int,
    cfg_dropout: float,
    rng: np.random.Generator,
    probs: np.ndarray | None = None,
):
    """(captions [N] with ~cfg_dropout of them "", x0 [N, 3, H, W] in [-1, 1]) of fresh random train scenes.

    Prompts are drawn uniformly, or with probabilities ``probs`` [len(prompts)] (see :func:`kind_balanced`).
    """
    idx = (
        rng.integers(len(prompts), size=batch_size) if probs is None else rng.choice(len(prompts), batch_size, p=probs)
    )
    chosen = [prompts[i] for i in idx]
    x0 = render_batch(chosen, resolution, rng)
    drop = rng.random(batch_size) < cfg_dropout
    return ["" if d else p for p, d in zip(chosen, drop)], x0


def render_batch(prompts: list[str], resolution: int, rng: np.random.Generator) -> torch.Tensor:
    """x0 [N, 3, H, W] in [-1, 1]: a fresh random scene of each prompt, rendered."""
    images = np.stack([render(sample_scene(p, rng), size=resolution) for p in prompts])  # [N, H, W, 3] uint8
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def kind_balanced(prompts: list[str]) -> np.ndarray:
    """Probabilities [len(prompts)] giving every prompt kind the same mass (uniform within a kind)."""
    kinds = [parse_prompt(p).kind for p in prompts]
    counts = {k: kinds.count(k) for k in set(kinds)}
    return np.array([1.0 / (len(counts) * counts[k]) for k in kinds])


def cosine_lr(
    step: int, lr: float, steps: int, warmup: int = 0, final_fraction: float = 0.0, horizon: int = 0
) -> float:
    """Learning rate at ``step``: linear warmup over ``warmup`` steps, then cosine from ``lr`` down to
    ``lr * final_fraction`` over ``horizon or steps`` steps (counted from the start, warmup included)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, (horizon or steps) - warmup)
    lo = lr * final_fraction
    return lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * frac))


def num_params(*modules: torch.nn.Module) -> int:
    """Total number of parameters of ``modules``."""
    return sum(p.numel() for m in modules for p in m.parameters())
