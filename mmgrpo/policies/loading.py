"""Options of a generator policy (a diffusion family, its weights and output size) and loading its adapter.

Shared by every generator recipe and by Best-of-N sampling, so a model is loaded the same way everywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mmgrpo.core.errors import UserError
from mmgrpo.policies.diffusion import ADAPTERS, DEFAULT_LORA_TARGETS, DiffusionPolicyOptions


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

    def with_defaults(self) -> GeneratorPolicyOptions:
        """These options with the family's defaults written out (a run's config.yaml stores them, so a later
        version with other defaults rebuilds the same policy): ``lora_targets`` becomes the family's list."""
        if self.lora_targets or self.family not in ADAPTERS:
            return self
        targets = list(getattr(ADAPTERS.get(self.family), "lora_targets", None) or DEFAULT_LORA_TARGETS)
        return dataclasses.replace(self, lora_targets=targets)


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
