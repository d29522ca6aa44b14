"""The seeding contract: every random draw derives from (run seed, step, global position, stream).

Nothing depends on the process layout or on micro-batching, so a resumed run replays exactly and a 2-process run
samples exactly what the 1-process run samples.
"""

from __future__ import annotations

import numpy as np
import torch


def prompt_seed(run_seed: int, step: int, position: int, stream: int = 0) -> int:
    """Seed of the group at global ``position`` of ``step``: independent of ranks and micro-batching.

    ``stream`` separates independent uses (0: sampling a group; others: trainer-internal shuffles).
    """
    entropy = [run_seed, step, position, stream]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def generator_for(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
