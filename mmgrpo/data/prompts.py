"""Text prompt sources: a prompt file or the built-in shapes world, and a seeded, layout-independent stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmgrpo.core.errors import UserError
from mmgrpo.core.files import read_utf8
from mmgrpo.core.types import PromptBatch
from mmgrpo.data.shapes import split_prompts


def read_prompts(spec: str, split: str, seed: int) -> list[str]:
    if spec == "":
        return []
    if spec == "shapes":
        train, heldout = split_prompts(seed=seed)
        return train if split == "train" else heldout
    p = Path(spec)
    if not p.is_file():
        raise UserError(f"prompt file '{spec}' not found (use 'shapes' for the built-in world)")
    lines = [x.strip() for x in read_utf8(p, "prompt file").splitlines() if x.strip() and not x.startswith("#")]
    if not lines:
        raise UserError(f"prompt file '{spec}' holds no prompts")
    return lines


class PromptList:
    """Stream position i -> a prompt; a fresh seeded permutation of the list for each pass."""

    def __init__(self, prompts: list[str], seed: int):
        if not prompts:
            raise UserError("no training prompts")
        self.prompts, self.seed = prompts, seed

    def get(self, indices: list[int]) -> PromptBatch:
        P = len(self.prompts)
        out = []
        for i in indices:
            epoch, pos = divmod(i, P)
            out.append(self.prompts[int(np.random.default_rng([self.seed, epoch]).permutation(P)[pos])])
        return PromptBatch(prompts=out)
