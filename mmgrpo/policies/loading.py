"""Options of a generator policy (a diffusion family, its weights and output size) and loading its adapter.

Shared by every generator recipe and by Best-of-N sampling, so a model is loaded the same way everywhere.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmgrpo.core.errors import UserError, bad_option
from mmgrpo.policies.diffusion import ADAPTERS, DEFAULT_LORA_TARGETS
from mmgrpo.policies.diffusion_options import DiffusionPolicyOptions, check_attention
from mmgrpo.policies.init_lora import diffusers_pipeline_class, digest, merge_diffusers_lora
from mmgrpo.policies.models import MAX_FPS, MIN_FPS
from mmgrpo.policies.sources import check_source_options, refuse_cached_lora, refuse_lora_folder, resolve_source


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
    fps: float = 0.0
    """video families: frames per second the written samples (samples/*.mp4, tracker GIFs, mmgrpo sample's
    best_*.mp4) play at; it changes no sample, only their timing (0 = the model's own rate: wan 16, Wan 2.2 TI2V-5B
    24, hunyuan_video 24)"""
    adapter_options: dict[str, Any] = field(default_factory=dict)
    """family-specific adapter options passed to its from_pretrained (flux: guidance, max_sequence_length)"""
    init_lora: str = ""
    """a diffusers LoRA to start from (a folder or hub repository with pytorch_lora_weights.safetensors, as
    save_lora_weights and mmgrpo export write it, or with one .safetensors file of any name, or that file: kohya /
    ComfyUI layouts too), fused into the denoiser as it loads: the run starts from (and its KL reference is) base +
    LoRA; exports then hold merged weights (mmgrpo.policies.init_lora)"""
    init_lora_sha256: str = ""
    """the sha256 of init_lora's weights file, written into the run's config.yaml as the run starts: its resume,
    mmgrpo sample --run and mmgrpo export refuse an adapter file that changed since"""

    def with_defaults(self) -> GeneratorPolicyOptions:
        """These options with the family's defaults written out (a run's config.yaml stores them, so a later
        version with other defaults rebuilds the same policy): ``lora_targets`` becomes the family's list, and
        ``init_lora_sha256`` the start adapter's digest."""
        out = self
        if not out.lora_targets and out.family in ADAPTERS:
            targets = list(getattr(ADAPTERS.get(out.family), "lora_targets", None) or DEFAULT_LORA_TARGETS)
            out = dataclasses.replace(out, lora_targets=targets)
        if out.init_lora and not out.init_lora_sha256:
            out = dataclasses.replace(out, init_lora_sha256=digest(out.init_lora, peft=False))
        return out

    def __post_init__(self) -> None:
        super().__post_init__()
        check_source_options("policy.options.path", self.revision, self.variant, self.denoiser_file)
        for key, example in (("height", 512), ("width", 512), ("num_frames", 33)):  # -1: a negative tensor dim
            if getattr(self, key) < 0:
                raise bad_option(f"policy.options.{key}", getattr(self, key),
                                 f"must be >= 0; set it to 0 (the model's default) or e.g. {example}")  # fmt: skip
        if not (math.isfinite(self.fps) and self.fps >= 0):  # ffmpeg fails on it when the first sample is written
            raise bad_option("policy.options.fps", self.fps, "frames per second must be a number >= 0; set it to 0 "
                             "(the model's own rate) or e.g. 16")  # fmt: skip
        if self.fps and not MIN_FPS <= self.fps <= MAX_FPS:  # 1e9 played at 1,001,000 fps; 0.001: 5 frames, 5000 s
            raise bad_option("policy.options.fps", self.fps, f"frames per second must be from {MIN_FPS:g} to "
                             f"{MAX_FPS:g} (what video players play); set it to 0 (the model's own rate) or e.g. "
                             "16")  # fmt: skip
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
    if source.local:
        refuse_lora_folder(source.path, "policy.options.path")
    else:
        refuse_cached_lora(source)
    kwargs: dict[str, Any] = {"device": str(device), "dtype": opts.dtype}
    if opts.height:
        kwargs["height"] = opts.height
    if opts.width:
        kwargs["width"] = opts.width
    if opts.num_frames:
        kwargs["num_frames"] = opts.num_frames
    if opts.fps:
        kwargs["fps"] = opts.fps
    kwargs.update(opts.adapter_options)
    refuse_video_options(ADAPTERS.get(opts.family), opts)
    check_attention(opts.attention, device)  # before the weights load (diffusers' own error comes after them)
    adapter = ADAPTERS.get(opts.family)
    try:
        loaded = adapter.from_pretrained(source, **kwargs)
    except TypeError as e:
        if not bad_keyword(e, adapter):  # a TypeError inside the loading is not the options' fault: as it is
            raise
        msg = f"policy.options.adapter_options {opts.adapter_options} for family {opts.family!r}: {e}"
        raise UserError(msg) from e
    if opts.init_lora:  # a LoRA to start from: fused before the trainable one is added
        base = Path(getattr(loaded, "source", None).path if getattr(loaded, "source", None) else opts.path)
        cls = diffusers_pipeline_class(base, opts.family)
        merge_diffusers_lora(loaded.denoiser, opts.init_lora, cls, opts.path, opts.init_lora_sha256)
    return loaded


CALL_ERROR = re.compile(r"unexpected keyword argument|multiple values for|missing \d+ required|positional argument")
"""how Python words a call's refusal of its arguments"""


def bad_keyword(error: TypeError, adapter: type) -> bool:
    """Whether ``error`` is a call's refusal of its keywords (an unexpected or doubled keyword, a missing argument)
    at the call into ``adapter.from_pretrained`` or, from it, into ``adapter.__init__``: such a TypeError is raised in
    the calling frame (the callee never starts), so its innermost frame is ``load_adapter``'s or the adapter's
    ``from_pretrained``'s. A TypeError raised deeper, inside the loading ('int' object is not iterable in a diffusers
    model's __init__ reading another family's config), is no adapter_options error and is not reported as one."""
    tb = error.__traceback__
    if tb is None or not CALL_ERROR.search(str(error)):
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    own = getattr(getattr(adapter, "from_pretrained", None), "__func__", None)
    return code is load_adapter.__code__ or (own is not None and code is getattr(own, "__code__", None))


def refuse_video_options(adapter: type, opts: GeneratorPolicyOptions) -> None:
    """``num_frames`` / ``fps`` set for a family whose adapter takes none (an image family): refused before the
    weights load, naming the option (its adapter's TypeError, after the weights, blamed adapter_options). What
    takes them is ``from_pretrained`` (the call the options go to): its own parameters, or, where it passes
    ``**kwargs`` on (the built-in adapters), the ``__init__`` it passes them to."""

    def takes(fn: Any) -> tuple[set[str], bool]:
        params = inspect.signature(fn).parameters.values()
        return {p.name for p in params}, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)

    named, passes_on = takes(adapter.from_pretrained)
    if passes_on:
        init_named, init_any = takes(adapter.__init__)
        if init_any:
            return
        named |= init_named
    for key in ("num_frames", "fps"):
        if getattr(opts, key) and key not in named:
            raise bad_option(f"policy.options.{key}", getattr(opts, key), f"family {opts.family!r} takes no {key} "
                             f"(its {adapter.__name__} makes images); set it to 0 or remove it")  # fmt: skip


def runnable_attention(opts: GeneratorPolicyOptions, device: Any, what: str) -> GeneratorPolicyOptions:
    """``opts`` for ``what`` (``mmgrpo export``, ``mmgrpo sample``) of a run: its ``attention`` where it runs on
    ``device``, else ``sdpa`` with a warning. A run trained with xformers on a GPU is exported or sampled on a
    machine without one: its weights do not depend on the attention kernel (sdpa computes the same attention, to
    float rounding), so refusing, as training must, would only stop the user."""
    if opts.attention != "xformers":
        return opts
    try:
        check_attention(opts.attention, device)
        return opts
    except UserError:
        why = "PyTorch's attention: the same weights, the same attention to float rounding"
        warnings.warn(f"the run's policy.options.attention=xformers cannot run on {device} here; {what} uses sdpa "
                      f"({why})", stacklevel=2)  # fmt: skip
        return dataclasses.replace(opts, attention="sdpa")
