"""One self-contained adapter per model family (see ``mmgrpo.policies.diffusion.DiffusionAdapter``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmgrpo.core.dtypes import resolve_dtype
from mmgrpo.core.errors import UserError

__all__ = [
    "DECODE_LATENT_PIXELS",
    "MAX_FPS",
    "MAX_VIDEO_FRAMES",
    "MAX_VIDEO_SIDE",
    "MIN_FPS",
    "check_fps",
    "check_pipeline_class",
    "decode_in_parts",
    "place",
    "refuse_above",
    "resolve_dtype",
]

MIN_FPS, MAX_FPS = 1.0, 240.0
"""the frame rates (frames per second) a video family's samples may be written at: what video players and H.264
levels handle (fps=1e9 was written at ffmpeg's 1,001,000 fps, over libx264's level limit; fps=0.001 made a 5-frame
clip last 5000 s). The models' own rates are 16 (Wan 2.1 / 2.2) and 24 (Wan 2.2 TI2V-5B, HunyuanVideo)."""
MAX_VIDEO_SIDE = 4096
"""the largest video height or width (pixels) a video family takes: 5x Wan's 832, 3.2x HunyuanVideo's 1280. A
larger one only runs out of memory, minutes later (HunyuanVideo's rotary embedding has no size limit of its own:
height=100000 computed for minutes before the out-of-memory error); Wan's checkpoints may allow less
(``rope_max_seq_len``, see ``mmgrpo.policies.models.wan.check_size``)."""
MAX_VIDEO_FRAMES = 1025
"""the most frames a video family takes (4 x 256 + 1: both families need 4k + 1): 8x HunyuanVideo's 129 frames,
12x Wan's 81, about 43 s at 24 fps in one sample."""

DECODE_LATENT_PIXELS = 8 * 128 * 128
"""Latent pixels an image VAE decodes in one call: 8 images of 1024 px (128 x 128 latents), 32 of 512 px. A rollout
of B x G images is decoded in parts of this size, so the VAE's activations (a few GB for 8 images of 1024 px in
bf16) do not grow with the batch; a smaller rollout is one call, as before."""


def decode_in_parts(decode, latents: torch.Tensor) -> torch.Tensor:
    """``decode`` (latents ``[n, C, h, w]`` -> images ``[n, ...]``) over parts of at most
    :data:`DECODE_LATENT_PIXELS` latent pixels (at least one row each), concatenated."""
    rows = max(1, DECODE_LATENT_PIXELS // (latents.shape[-2] * latents.shape[-1]))
    if latents.shape[0] <= rows:
        return decode(latents)
    return torch.cat([decode(part) for part in latents.split(rows)])


def place(module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Move ``module`` to ``device``; cast it only when it was built in another dtype. A module loaded in ``dtype``
    (``from_pretrained(torch_dtype=...)``) keeps the parts its loader holds in fp32 (T5's ``wo`` in fp16, Wan's rope,
    time embedder and norms): a cast on the way to the device would demote them (fp16 T5 overflows there)."""
    first = next(module.parameters(), None)
    if first is not None and first.dtype != dtype:
        module.to(dtype=dtype)
    module.to(device)


def check_fps(family: str, fps: float) -> float:
    """A video family's frame rate (frames per second its written samples play at) as a float: a positive, finite
    number (0 or less made ffmpeg fail, or a GIF with no delay between frames, only when the first sample was
    written) in [:data:`MIN_FPS`, :data:`MAX_FPS`]."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise UserError(f"{family} fps={fps!r}: the frame rate of the written samples must be a positive number of "
                        "frames per second; set policy.options.fps, e.g. 16 (0: the model's own)")  # fmt: skip
    if not MIN_FPS <= fps <= MAX_FPS:
        raise UserError(f"{family} fps={fps!r}: the frame rate of the written samples must be from {MIN_FPS:g} to "
                        f"{MAX_FPS:g} frames per second (what video players play); set policy.options.fps, e.g. 16 "
                        "(0: the model's own)")  # fmt: skip
    return float(fps)


def refuse_above(family: str, key: str, value: int, largest: int, why: str) -> None:
    """A UserError when the video size ``key`` (height, width, num_frames) is above ``largest``, naming the option
    and the largest value allowed; ``why`` says what sets that limit ("... is more than {why}")."""
    if value > largest:
        raise UserError(f"{family} {key}={value} is more than {why}: set policy.options.{key} to at most {largest}")


PIPELINE_FAMILIES = {
    "StableDiffusion3": "sd3",
    "StableDiffusionXL": "sd",
    "StableDiffusion": "sd",
    "Flux": "flux",
    "Wan": "wan",
    "HunyuanVideo": "hunyuan_video",
}
"""the family that loads a diffusers pipeline class, by the start of its model_index.json ``_class_name``"""


def family_of(class_name: str) -> str | None:
    """The built-in family whose adapter loads the diffusers pipeline ``class_name`` (the longest known prefix)."""
    prefixes = sorted((p for p in PIPELINE_FAMILIES if class_name.startswith(p)), key=len, reverse=True)
    return PIPELINE_FAMILIES[prefixes[0]] if prefixes else None


def pipeline_class(src: Any) -> str | None:
    """The ``_class_name`` of the model_index.json of ``src`` (a :class:`~mmgrpo.policies.sources.ModelSource`; a
    hub id's is that small file alone, before any download), None when it has none."""
    if src.local:
        file = Path(src.path) / "model_index.json"
        if not file.is_file():
            return None
    else:
        from huggingface_hub import hf_hub_download

        with src.errors():
            file = Path(hf_hub_download(src.path, "model_index.json", revision=src.revision))
    name = json.loads(file.read_text()).get("_class_name")
    return name if isinstance(name, str) else None


def check_pipeline_class(src: Any, family: str, accepted: tuple[str, ...], example: str) -> None:
    """Refuse a checkpoint whose model_index.json names a pipeline class outside ``accepted`` before anything of it
    loads, naming the folder, its class and the family that loads it (a Wan loader reading a HunyuanVideo or SD3
    transformer config failed with "'int' object is not iterable", blamed on adapter_options). A folder without a
    model_index.json is left to the loader."""
    name = pipeline_class(src)
    if name is None or name in accepted:
        return
    other = family_of(name)
    fix = (f"set policy.options.family={other}" if other and other != family else
           f"point policy.options.path at a {' or '.join(accepted)} checkpoint")  # fmt: skip
    raise UserError(f"model path {src.describe()} holds a {name}, not a {' / '.join(accepted)} checkpoint "
                    f"(what family {family!r} loads, e.g. {example}); {fix}")  # fmt: skip
