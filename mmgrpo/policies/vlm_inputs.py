"""What a VLM prompt becomes before the model sees it: media loading, the chat turn, the processed prompt.

Shared by the policy (:mod:`mmgrpo.policies.vlm`) and by components that must show a VLM the same prompt the same
way (the frozen listener of ``mmgrpo/rewards/vlm_listener.py``, ACRE's re-asking):

- :func:`load_image` / :func:`read_video`: PIL RGB images and uint8 frames [F, H, W, 3], shrunk to a pixel budget;
- :func:`question_text`: a prompt (str, ``{question|text, options?}``) as one user text, options lettered A) B) ...;
- :func:`chat_messages`: the chat turns (system prompt, images / video placeholders, the question);
- :class:`PromptInputs`: one prompt after the chat template and the processor, shared by its G rows.

>>> question_text({"question": "How many red circles are there?", "options": ["1", "2"]})
'How many red circles are there? A) 1 B) 2'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.files import open_video
from mmgrpo.data.hf_datasets import StoredImage

MEDIA_KEYS = ("images", "image", "video", "image_size")  # meta keys that describe a prompt's media

R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question about the image, and the Assistant "
    "solves it. The Assistant first thinks about the reasoning process in the mind and then provides the user "
    "with the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>"
)


@dataclass(eq=False)
class PromptInputs:
    """One prompt after the processor, shared (by reference) by its G rows; never copied per row."""

    input_ids: torch.Tensor  # [Lp]
    positions: torch.Tensor  # [P, Lp]: P = 3 (Qwen M-RoPE) or 1
    next_position: int  # position of the first completion token
    vision: dict[str, torch.Tensor]  # processor outputs: pixel_values, image_grid_thw, pixel_values_videos, ...
    mm_token_type_ids: torch.Tensor | None = None  # [Lp]
    resized_size: tuple[int, int] | None = None  # (W', H') of the first image as the model saw it
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # vision features [n_tok, D], cached in rollout

    @property
    def attention_mask(self) -> torch.Tensor:  # [Lp]: every prompt is its own forward, so no padding
        return torch.ones_like(self.input_ids)


def load_image(image: Any, max_pixels: int | None = None):
    """A PIL RGB image from a PIL image, a uint8 array [H, W, 3], a path or an image stored in a dataset
    (:class:`~mmgrpo.data.hf_datasets.StoredImage`, a ``hf:`` prompt's meta) (turned upright by its EXIF
    orientation, as transformers' ``load_image`` does); shrunk to ``max_pixels`` if given."""
    from PIL import Image, ImageOps

    if isinstance(image, StoredImage):
        image = image.open()
    elif isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise UserError(f"image file {str(image)!r} not found; give an existing path, a PIL image or an array")
        image = ImageOps.exif_transpose(Image.open(image))  # as a viewer shows it (a phone photo's EXIF rotation)
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image))
    elif not isinstance(image, Image.Image):
        raise UserError(f"images must be PIL images, uint8 arrays [H, W, 3] or paths; got {type(image).__name__}")
    image = to_rgb(image)
    if max_pixels and image.width * image.height > max_pixels:
        s = math.sqrt(max_pixels / (image.width * image.height))
        image = image.resize((max(1, int(image.width * s)), max(1, int(image.height * s))), Image.BICUBIC)
    return image


def to_rgb(image: Any) -> Any:
    """A PIL image as 8-bit RGB, read the way it looks: 16-bit and 32-bit greyscale (``I;16``, ``I``, ``F``) scaled
    from their value range (``convert("RGB")`` clips them: a 16-bit PNG turned white, a float one black), and
    transparent pixels (RGBA, LA, a palette with transparency) laid on white, as ``qwen_vl_utils`` does (``convert``
    drops alpha, so a transparent background turned black or whatever colour it hid)."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        peak = float(np.nanmax(a, initial=0.0))
        # the smallest usual range that holds the values: 0..1 (float), 0..255, 0..65535 (16-bit), else the peak
        top = next(t for t in (1.0, 255.0, 65535.0, max(peak, 1.0)) if peak <= t and (t > 1.0 or image.mode == "F"))
        if image.mode.startswith("I;16"):
            top = 65535.0
        a = np.nan_to_num(np.clip(a / top, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return image.convert("RGB")


def read_video(
    path: str | Path, fps: float = 2.0, max_frames: int = 16, max_pixels: int | None = None
) -> tuple[np.ndarray, float]:
    """Frames uint8 [F, H, W, 3] of a video file sampled at ``fps`` (at most ``max_frames``, F even), and the
    effective fps of the returned frames (for Qwen2.5-VL's temporal positions). Read with
    :func:`mmgrpo.core.files.open_video` (PyAV, the ``video`` extra), which refuses frames of more pixels than an
    image may hold (``PIL.Image.MAX_IMAGE_PIXELS``) before any is decoded at full size."""
    if not Path(path).is_file():
        raise UserError(f"video file {str(path)!r} not found; give the path of an existing mp4")
    video = open_video(path, "a video prompt")
    n, native = len(video), float(video.fps or fps)
    idx = np.arange(0.0, n, max(native / fps, 1.0)).astype(int)
    if len(idx) > max_frames:
        idx = np.linspace(0, n - 1, max_frames).round().astype(int)
    if len(idx) % 2:  # Qwen patches 2 frames at a time
        idx = np.append(idx, idx[-1]) if len(idx) == 1 else idx[:-1]
    frames = video.frames(idx.tolist())  # [F, H, W, 3]
    effective_fps = len(idx) / max(n / native, 1e-6)
    if max_pixels:
        frames = np.stack([np.asarray(load_image(f, max_pixels)) for f in frames])
    return frames, effective_fps


def question_text(prompt: Any) -> str:
    """The user text of a prompt: a str, or a dict {question|text, options?} with the options appended as A) B) ..."""
    text = prompt if isinstance(prompt, str) else (prompt.get("question") or prompt.get("text"))
    if not isinstance(text, str):
        raise UserError(f"a VLM prompt is a str or a dict with 'question' (or 'text'); got {str(prompt)[:80]!r}")
    options = prompt.get("options") if isinstance(prompt, dict) else None
    if options:
        text += " " + " ".join(f"{chr(65 + i)}) {opt}" for i, opt in enumerate(options))
    return text


def chat_messages(prompt: Any, n_images: int, has_video: bool, system: str = "") -> list[dict]:
    """Chat messages of a prompt: ``{messages}`` as given, else a system turn (if any) and one user turn holding
    ``n_images`` image placeholders, a video placeholder and :func:`question_text`."""
    if isinstance(prompt, dict) and "messages" in prompt:
        return prompt["messages"]
    content = [{"type": "image"} for _ in range(n_images)] + ([{"type": "video"}] if has_video else [])
    turns = [{"role": "user", "content": [*content, {"type": "text", "text": question_text(prompt)}]}]
    return ([{"role": "system", "content": system}] if system else []) + turns
