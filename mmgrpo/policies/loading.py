"""Options of a generator policy (a diffusion family, its weights and output size) and loading its adapter.

Shared by every generator recipe and by Best-of-N sampling, so a model is loaded the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmgrpo.core.errors import UserError
from mmgrpo.policies.diffusion import ADAPTERS, DiffusionPolicyOptions


@dataclass
class GeneratorPolicyOptions(DiffusionPolicyOptions):
    family: str = "sd3"
    """model family: sd3, flux, wan, hunyuan_video, sd (SD1.5/SDXL)"""
    path: str = ""
    """local checkpoint folder (diffusers layout) or hub id"""
    dtype: str = "float32"
    """weights dtype: float32, bfloat16, float16"""
    height: int = 0
    """image height (0 = the model's default)"""
    width: int = 0
    """image width (0 = the model's default)"""
    num_frames: int = 0
    """video families: frames per sample (0 = the model's default)"""
    adapter_options: dict[str, Any] = field(default_factory=dict)
    """family-specific adapter options passed to its from_pretrained (flux: guidance, max_sequence_length)"""


def load_adapter(opts: GeneratorPolicyOptions, device: Any = "cpu") -> Any:
    """Load ``opts.path`` through the registered family adapter's from_pretrained."""
    if opts.family not in ADAPTERS:
        raise UserError(f"policy.options.family: {ADAPTERS.unknown_message(opts.family)}")
    if not opts.path:
        raise UserError("policy.options.path is empty: point it at a local checkpoint folder (diffusers layout)")
    kwargs: dict[str, Any] = {"device": str(device), "dtype": opts.dtype}
    if opts.height:
        kwargs["height"] = opts.height
    if opts.width:
        kwargs["width"] = opts.width
    if opts.num_frames:
        kwargs["num_frames"] = opts.num_frames
    kwargs.update(opts.adapter_options)
    try:
        return ADAPTERS.get(opts.family).from_pretrained(opts.path, **kwargs)
    except TypeError as e:
        msg = f"policy.options.adapter_options {opts.adapter_options} for family {opts.family!r}: {e}"
        raise UserError(msg) from e
