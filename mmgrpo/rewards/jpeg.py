"""JPEG (in)compressibility rewards of DDPO (Black et al. 2023, "Training Diffusion Models with Reinforcement
Learning", sec. 6.1): the size of an image's JPEG encoding is a cheap, model-free proxy for visual complexity.

As in ddpo-pytorch's ``rewards.py``: images in [0, 1] become uint8 with ``(x * 255).round()``, are encoded by PIL
at ``quality`` (95), and the size is counted in kB = bytes / 1000. ``jpeg_compressibility`` = -kB (rewards simple
images), ``jpeg_incompressibility`` = +kB (rewards detailed ones).

>>> import torch
>>> jpeg_compressibility()(torch.zeros(2, 3, 8, 8), None, None, None).shape
torch.Size([2])
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmgrpo.core.errors import UserError, bad_option
from mmgrpo.rewards.registry import register


def _tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """One image [C, H, W] (C = 1 or 3; float in [0, 1] or uint8) -> RGB PIL image."""
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise UserError(f"jpeg rewards take images [3, H, W] (or a batch [N, 3, H, W]); got shape {tuple(x.shape)}")
    x = x.detach().cpu()
    if x.dtype != torch.uint8:
        x = x.float()
        lo, hi = x.min().item(), x.max().item()
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise UserError(
                f"jpeg rewards take float images in [0, 1]; got values in [{lo:.3g}, {hi:.3g}] "
                "(map [-1, 1] outputs with (x + 1) / 2, or pass uint8 images)"
            )
        x = (x * 255).round().clamp(0, 255).to(torch.uint8)
    arr = x.expand(3, -1, -1).permute(1, 2, 0).contiguous().numpy()  # [H, W, 3] uint8
    return Image.fromarray(arr)


def to_pil_images(samples: Any) -> list[Image.Image]:
    """Samples -> N RGB PIL images: a Tensor [N, C, H, W] (float in [0, 1] or uint8), or a list of PIL images /
    [C, H, W] tensors / [H, W, 3] uint8 numpy arrays."""
    if isinstance(samples, torch.Tensor):
        if samples.ndim != 4:
            raise UserError(f"jpeg rewards take images [N, 3, H, W]; got shape {tuple(samples.shape)}")
        return [_tensor_to_pil(x) for x in samples]
    out = []
    for s in samples:
        if isinstance(s, Image.Image):
            out.append(s if s.mode == "RGB" else s.convert("RGB"))
        elif isinstance(s, torch.Tensor):
            out.append(_tensor_to_pil(s))
        elif isinstance(s, np.ndarray) and s.dtype == np.uint8 and s.ndim == 3 and s.shape[-1] == 3:
            out.append(Image.fromarray(s))
        else:
            raise UserError(
                "jpeg rewards take a Tensor [N, 3, H, W] or a list of PIL images / [3, H, W] tensors / "
                f"[H, W, 3] uint8 arrays; got an element of type {type(s).__name__}"
            )
    return out


def jpeg_size_kb(image: Image.Image, quality: int = 95) -> float:
    """Size in kB (bytes / 1000, as DDPO) of ``image``'s JPEG encoding by PIL at ``quality``."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000


def _check_quality(quality: int) -> int:
    if not (isinstance(quality, int) and 1 <= quality <= 100):
        raise UserError(f"jpeg rewards: quality must be an integer in 1..100 (DDPO uses 95); got {quality!r}")
    return quality


@register("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95):
    """DDPO compressibility: -(JPEG size in kB) at quality 95; simpler images score higher."""
    quality = _check_quality(quality)

    def fn(samples, prompts, meta, ctx) -> torch.Tensor:  # samples: [N, 3, H, W] in [0, 1] or N PIL -> [N]
        return -torch.tensor([jpeg_size_kb(im, quality) for im in to_pil_images(samples)], dtype=torch.float32)

    return fn


def _check_at_load(prefix: str, quality: int = 95) -> None:
    if not 1 <= quality <= 100:  # at config load (the text-to-image recipe builds its reward before the run)
        raise bad_option(f"{prefix}.quality", quality, "the JPEG quality is an integer in 1..100 (DDPO uses 95)")


jpeg_compressibility.check = _check_at_load  # type: ignore[attr-defined]


@register("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = 95):
    """DDPO incompressibility: +(JPEG size in kB) at quality 95; detailed images score higher."""
    quality = _check_quality(quality)

    def fn(samples, prompts, meta, ctx) -> torch.Tensor:  # samples: [N, 3, H, W] in [0, 1] or N PIL -> [N]
        return torch.tensor([jpeg_size_kb(im, quality) for im in to_pil_images(samples)], dtype=torch.float32)

    return fn


jpeg_incompressibility.check = _check_at_load  # type: ignore[attr-defined]
