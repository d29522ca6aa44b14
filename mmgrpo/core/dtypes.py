"""The dtype names a config may use (``dtype: bfloat16``), checked in one place."""

from __future__ import annotations

import torch

from mmgrpo.core.errors import UserError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bfloat16' / 'bf16' / torch.bfloat16 -> torch.bfloat16 (the config's dtype names, checked)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]
