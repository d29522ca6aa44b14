"""The dtype names a config may use (``dtype: bfloat16``), checked in one place; and whether this machine has a
device a command or a reward names."""

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


def missing_device(device: torch.device) -> str | None:
    """Why this machine cannot run on ``device`` ("torch sees no CUDA GPU on this machine", ...), or None when it
    can (cpu, a cuda index it has, available MPS; other kinds are the caller's to judge)."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return "torch sees no CUDA GPU on this machine"
        if device.index is not None and device.index >= count:
            return f"torch sees {count} CUDA GPU(s), cuda:0..cuda:{count - 1}"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available on this machine"
    return None
