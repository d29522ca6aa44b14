"""One self-contained adapter per model family (see ``mmgrpo.policies.diffusion.DiffusionAdapter``)."""

from __future__ import annotations

import torch
from torch import nn

from mmgrpo.core.dtypes import resolve_dtype

__all__ = ["place", "resolve_dtype"]


def place(module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Move ``module`` to ``device``; cast it only when it was built in another dtype. A module loaded in ``dtype``
    (``from_pretrained(torch_dtype=...)``) keeps the parts its loader holds in fp32 (T5's ``wo`` in fp16, Wan's rope,
    time embedder and norms): a cast on the way to the device would demote them (fp16 T5 overflows there)."""
    first = next(module.parameters(), None)
    if first is not None and first.dtype != dtype:
        module.to(dtype=dtype)
    module.to(device)
