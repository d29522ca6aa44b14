"""Options of a generator policy (a diffusion family, its weights and output size) and loading its adapter.

Shared by every generator recipe and by Best-of-N sampling, so a model is loaded the same way everywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mmgrpo.core.errors import UserError, bad_option
from mmgrpo.policies.diffusion import ADAPTERS, DEFAULT_LORA_TARGETS, DiffusionPolicyOptions
from mmgrpo.policies.sources import check_source_options, resolve_source


@dataclass
class GeneratorPolicyOptions(DiffusionPolicyOptions):
    family: str = "sd3"
    """model family: sd3, flux, wan, hunyuan_video, sd (SD1.5/SDXL)"""
    path: str = ""
    """local checkpoint folder (diffusers layout), or a hub repository id org/name read through the Hugging Face
    cache (HF_HUB_OFFLINE=1 reads a cached snapshot); docs/models.md"""
    revision: str | None = None
    """hub ids: the branch, tag or commit hash to read (null = the default branch); not for local folders"""
    variant: str | None = None
    """weights variant: read the *.<variant>.safetensors files that save_pretrained(variant=...) writes (fp16,
    bf16, ...), in a local folder as on the hub; null = the plain files"""
    denoiser_file: str | None = None
    """one .safetensors file (original / ComfyUI or diffusers key layout; a local path or a hub file URL
    https://huggingface.co/<org>/<name>/blob/<revision>/<file>) that replaces the denoiser (the transformer; sd: the
    UNet) of the pipeline at path, which still gives its config, the text encoders and the VAE"""
    dtype: str = "float32"
    """weights dtype: float32, bfloat16, float16 (diffusers' torch_dtype)"""
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

    def __post_init__(self) -> None:
        super().__post_init__()
        check_source_options("policy.options.path", self.revision, self.variant, self.denoiser_file)
        for key, example in (("height", 512), ("width", 512), ("num_frames", 33)):  # -1: a negative tensor dim
            if getattr(self, key) < 0:
                raise bad_option(f"policy.options.{key}", getattr(self, key),
                                 f"must be >= 0; set it to 0 (the model's default) or e.g. {example}")  # fmt: skip
        why = getattr(ADAPTERS.get(self.family), "no_xformers", None) if self.family in ADAPTERS else None
        if self.attention == "xformers" and why:
            raise bad_option("policy.options.attention", "xformers",
                             f"the {self.family} family runs with attention: sdpa ({why})")  # fmt: skip


def load_adapter(opts: GeneratorPolicyOptions, device: Any = "cpu") -> Any:
    """Load ``opts.path`` (a local folder or a hub id, with its revision, variant and denoiser file: a
    :class:`~mmgrpo.policies.sources.ModelSource`) through the registered family adapter's from_pretrained."""
    if opts.family not in ADAPTERS:
        raise UserError(f"policy.options.family: {ADAPTERS.unknown_message(opts.family)}")
    if not opts.path:
        raise UserError("policy.options.path is empty: point it at a local checkpoint folder (diffusers layout) "
                        "or a hub repository id (org/name)")  # fmt: skip
    source = resolve_source(opts.path, "policy.options.path", opts.revision, opts.variant, opts.denoiser_file)
    kwargs: dict[str, Any] = {"device": str(device), "dtype": opts.dtype}
    if opts.height:
        kwargs["height"] = opts.height
    if opts.width:
        kwargs["width"] = opts.width
    if opts.num_frames:
        kwargs["num_frames"] = opts.num_frames
    kwargs.update(opts.adapter_options)
    try:
        return ADAPTERS.get(opts.family).from_pretrained(source, **kwargs)
    except TypeError as e:
        msg = f"policy.options.adapter_options {opts.adapter_options} for family {opts.family!r}: {e}"
        raise UserError(msg) from e
