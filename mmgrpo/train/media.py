"""The pictures, videos and completion records a run writes: checked sample tensors, image grids, mp4 files (the
rate a policy's videos play at), ``samples/`` files and completion JSONL."""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmgrpo.core.errors import UserError
from mmgrpo.core.extras import installed, missing_extra
from mmgrpo.core.files import write_atomic

IMAGES = "[n, 3, H, W]"
VIDEOS = "[n, F, 3, H, W]"


def checked_images(images: object, where: str, shapes: dict[int, str]) -> torch.Tensor:
    """``images`` (a tensor or NumPy array whose rank is a key of ``shapes``, e.g. ``{4: IMAGES}``) as a float
    tensor on the CPU, else a ValueError naming ``where``, the shape or dtype and the fix (a UserError for values that
    are not finite: the model's, in a run). A saved picture of the
    wrong thing is worse than an error: uint8 0..255 images were clamped to an all-white grid, NaN ones written
    with only a NumPy warning, an empty batch was a ZeroDivisionError, and an image of the wrong rank 'not enough
    values to unpack'."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.array(images))  # a copy: read-only arrays too
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{where}: images are a {type(images).__name__}, not a tensor; give a torch tensor (or "
                         f"NumPy array) {' or '.join(shapes.values())} of floats in [0, 1]")  # fmt: skip
    shape = tuple(images.shape)
    if images.dim() not in shapes:
        hint = " (a single image [3, H, W] as image[None])" if images.dim() == 3 else ""
        raise ValueError(f"{where}: images of shape {shape} have {images.dim()} dimensions; give "
                         f"{' or '.join(shapes.values())}{hint}")  # fmt: skip
    if not images.is_floating_point():
        raise ValueError(f"{where}: images of dtype {images.dtype} (shape {shape}); images are floats in [0, 1]: "
                         "divide uint8 0..255 images by 255 (images.float() / 255)")  # fmt: skip
    if images.shape[-3] not in (1, 3):
        raise ValueError(f"{where}: images of shape {shape} have {images.shape[-3]} channels where "
                         f"{shapes[images.dim()]} has 3 (RGB; 1: grey): channels come before H and W "
                         "(permute an array of [..., H, W, 3] to [..., 3, H, W])")  # fmt: skip
    if images.numel() == 0:
        raise ValueError(f"{where}: images of shape {shape} are empty; there is nothing to save")
    imgs = images.detach().float().cpu()
    bad = int((~torch.isfinite(imgs)).sum())
    if bad:
        # a UserError: in a run, the model's own samples (the trainer's paragraph then says where the run stopped)
        raise UserError(f"{where}: {bad} of the {imgs.numel()} values of the images {shape} are not finite "
                        "(NaN or inf): the model's output is broken; fix it or replace them "
                        "(torch.nan_to_num) to save the rest")  # fmt: skip
    return imgs


def image_grid(images: torch.Tensor, ncol: int | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """[n, 3, H, W] in [0, 1] (a single [3, H, W] image is a batch of one; images that are not floats, not finite,
    or empty are a ValueError, :func:`checked_images`) -> one PIL image (rows of ``ncol``); ``scale`` enlarges tiny
    images."""
    imgs = checked_images(images, "image_grid", {3: "[3, H, W]", 4: IMAGES})
    imgs = (imgs[None] if imgs.dim() == 3 else imgs).clamp(0, 1)
    n, _, H, W = imgs.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    canvas = torch.ones(3, nrow * (H + pad) + pad, ncol * (W + pad) + pad)
    for i in range(n):
        r, c = divmod(i, ncol)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        canvas[:, y : y + H, x : x + W] = imgs[i]
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def can_write_mp4() -> bool:
    """imageio and its ffmpeg plug-in (the 'video' extra) are installed. imageio alone falls back to a PyAV writer
    that refuses ``macro_block_size`` (a TypeError mid-run), or to none at all."""
    return installed("imageio") and installed("imageio_ffmpeg")


FALLBACK_FPS = 8.0
"""frames per second of the video samples of a family whose adapter declares no ``fps`` (a plug-in's); the built-in
video families declare theirs (wan 16, hunyuan_video 24; ``policy.options.fps`` sets another)"""


def video_fps(policy: Any) -> float:
    """The frame rate a policy's video samples play at: its adapter's ``fps`` (a method's policy wrapper reads
    through to the recipe's policy), else :data:`FALLBACK_FPS`. Written videos take it from here, so that a clip
    lasts as long as the model made it to (Wan's 81 frames are 5 s at 16 fps; at a fixed 8 fps they played 10 s)."""
    fps = getattr(getattr(policy, "adapter", None), "fps", None)
    return float(fps) if fps else FALLBACK_FPS


def checked_fps(fps: object, where: str) -> float:
    """``fps`` as a float when it is a finite number > 0, else a ValueError naming ``where`` and the value: a video
    at a guessed rate plays too fast or too slow (None and 0 were written at ffmpeg's 16 fps, a negative rate
    failed inside ffmpeg, NaN as 'cannot convert NaN to integer ratio')."""
    if fps is None:
        raise ValueError(f"{where}: videos need their frame rate (fps=video_fps(policy))")
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"{where}: fps={fps!r} is not a frame rate; give a finite number of frames per second > 0 "
                         "(the model's: fps=video_fps(policy))")  # fmt: skip
    return float(fps)


def write_mp4(path: str | Path, frames: list[np.ndarray], fps: float) -> Path:
    """H.264 mp4 of HWC uint8 ``frames`` (at least one, all of one shape) playing at ``fps`` (a finite number > 0,
    the model's rate: :func:`video_fps`) through imageio's ffmpeg writer; a UserError naming the 'video' extra when
    it is missing. Bad arguments are a ValueError before anything is written (no frames returned the path of a file
    that was never written)."""
    fps = checked_fps(fps, "write_mp4")
    frames = [np.asarray(f) for f in frames]
    if not frames:
        raise ValueError(f"write_mp4: no frames to write to {path}; give at least one HWC uint8 frame")
    first = frames[0]
    for i, f in enumerate(frames):
        if f.dtype != np.uint8 or f.ndim != 3 or f.shape != first.shape:
            raise ValueError(f"write_mp4: frame {i} is {f.dtype} {f.shape}; frames are HWC uint8 (0..255) of one "
                             f"shape, like frame 0's {first.shape} (a float frame x in [0, 1]: "
                             "(x * 255).round().astype(np.uint8))")  # fmt: skip
    if not can_write_mp4():
        raise missing_extra("video", "writing mp4 videos", "imageio_ffmpeg" if installed("imageio") else "imageio")
    import imageio.v2 as imageio

    imageio.mimwrite(path, frames, format="FFMPEG", fps=fps, macro_block_size=1)
    return Path(path)


def save_samples(images: torch.Tensor, path: str | Path, ncol: int | None = None, fps: float | None = None) -> Path:
    """Save a grid PNG for images [n, 3, H, W] (a single [3, H, W] image is a batch of one), or an mp4 (frames side
    by side) for videos [n, F, 3, H, W] playing at ``fps`` (the model's rate, :func:`video_fps`; a video without it,
    or with one that is not a finite number > 0, is a ValueError, not a guess). Images that are not floats in
    [0, 1] (uint8 0..255), not finite, or empty are a ValueError (:func:`checked_images`), not a blank picture."""
    images = checked_images(images, "save_samples", {3: "[3, H, W]", 4: IMAGES, 5: VIDEOS})
    images = images[None] if images.dim() == 3 else images
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = max(1, 128 // images.shape[-1])
    if images.dim() == 5:
        fps = checked_fps(fps, "save_samples")
        frames = [np.asarray(image_grid(images[:, f], ncol, scale=scale)) for f in range(images.shape[1])]
        if can_write_mp4():
            return write_mp4(path.with_suffix(".mp4"), frames, fps)
        # the 'video' extra is not (wholly) installed: the first frame, rather than stopping the run
        Image.fromarray(frames[0]).save(path.with_suffix(".png"))
        return path.with_suffix(".png")
    image_grid(images, ncol, scale=scale).save(path.with_suffix(".png"))
    return path.with_suffix(".png")


def save_completions(records: list[dict], path: str | Path) -> Path:
    """Write an evaluation's completion records (:func:`~mmgrpo.train.components.completion_records`) as JSONL, one
    object per line (values JSON cannot hold are written as text), whole or not at all: a resumed VLM run reads the
    step-0 file back as the baseline of its gains, and a kill mid-write left a file of fewer examples."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in records).encode("utf-8"))
    return path
