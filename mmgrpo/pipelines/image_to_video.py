"""Recipe: image-to-video GRPO (Wan 2.x I2V; DanceGRPO, Flow-GRPO, MixGRPO, G2RPO) from first frames.

    mmgrpo train configs/wan_i2v_dance.yaml        # point policy.options.path at real weights

Each training condition is a prompt plus a first frame: ``data.options.pairs`` is a JSONL file of
``{"prompt": ..., "image": path}`` / ``{"prompt": ..., "video": path}`` objects, a CSV file with the columns
``prompt,image,video`` (one of the two paths per row), or a folder of .mp4 files (each one's FIRST frame, read with
PyAV, prompted with ``default_prompt``). Relative paths are relative to the JSONL/CSV file. The frame travels with
its prompt (:class:`FramePrompt`, a ``str`` carrying ``meta``), so prompts, the rollout's meta and the held-out
evaluation (reused from ``mmgrpo/pipelines/text_to_image.py``) all know it; the Wan adapter reads ``meta['image']`` or
``meta['video']``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmgrpo.core.errors import UserError, quoted
from mmgrpo.core.files import check_image, open_video, read_utf8
from mmgrpo.core.types import PromptBatch
from mmgrpo.data.hf_datasets import content_identity
from mmgrpo.data.prompts import PromptList
from mmgrpo.data.records import read_rows
from mmgrpo.pipelines.text_to_image import check_eval_numbers, generator_components, generator_options
from mmgrpo.pipelines.text_to_video import VideoPolicyOptions, load_video_adapter
from mmgrpo.policies.diffusion import DiffusionPolicy
from mmgrpo.train.components import PIPELINES, Components, Pipeline
from mmgrpo.train.config import Config

VIDEO_SUFFIXES = (".mp4",)


class FramePrompt(str):
    """A prompt text that carries its first frame: ``meta`` is ``{"image": path}`` or ``{"video": path}``."""

    meta: dict[str, Any]

    def __new__(cls, text: str, meta: dict[str, Any] | None = None) -> FramePrompt:
        obj = super().__new__(cls, text)
        obj.meta = dict(meta or {})
        return obj


@dataclass
class FrameDataOptions:
    pairs: str = ""
    """training conditions: a JSONL/CSV file of {prompt, image | video} rows, or a folder of .mp4 files"""
    heldout_pairs: str = ""
    """held-out conditions in the same formats ('' = no evaluation)"""
    default_prompt: str = ""
    """the prompt of every video in a folder, and of JSONL/CSV rows without one"""
    eval_samples_per_prompt: int = 2
    """samples per held-out condition at evaluation"""
    eval_max_prompts: int = 0
    """evaluate on at most this many held-out conditions (0 = all)"""
    eval_reward: str = ""
    """reward used for evaluation (default: the first training reward)"""
    eval_batch_size: int = 4
    """videos per evaluation forward batch"""
    grid_images: int = 8
    """evaluation videos shown side by side in each saved mp4"""

    def __post_init__(self) -> None:
        check_eval_numbers(self)  # checked when the config loads (Pipeline.check), before the model does


def _row(obj: Any, base: Path, default_prompt: str, where: str) -> FramePrompt:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: each row is an object {{prompt, image | video}}, got {quoted(obj, 80)}")
    image, video = obj.get("image") or None, obj.get("video") or None
    if (image is None) == (video is None):
        raise UserError(f"{where}: give exactly one of 'image' or 'video' (a path), got {quoted(obj, 160)}")
    key, rel = ("image", image) if image is not None else ("video", video)
    if not isinstance(rel, str):
        raise UserError(f"{where}: '{key}' must be one path (a string), got {quoted(rel, 80)}")
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise UserError(f"{where}: 'prompt' must be text, got {quoted(prompt, 80)}")
    if prompt is None and not default_prompt:  # a misnamed column ('caption', 'text') would train on ''
        raise UserError(f"{where}: the row has no 'prompt' (keys: {quoted(sorted(obj), 80)}) and "
                        "data.options.default_prompt is empty; name the prompt field 'prompt', or set "
                        "default_prompt (the prompt of rows without one)")  # fmt: skip
    path = base / rel  # an absolute rel stays as it is
    looks = {"image": (".mp4", ".mov", ".webm", ".avi", ".mkv"), "video": (".png", ".jpg", ".jpeg", ".webp", ".bmp")}
    if path.suffix.lower() in looks[key]:
        other = "video" if key == "image" else "image"
        raise UserError(f"{where}: '{key}' names {quoted(rel, 80)}, which is named like a{'n' * (other == 'image')} "
                        f"{other} file; give it as '{other}'")  # fmt: skip
    if key == "image":  # opened once, at load: a missing or corrupt file is named now, not mid-training
        check_image(path, where)
    else:
        open_video(path, where)
    return FramePrompt((prompt or "").strip() or default_prompt, {key: str(path)})


def read_pairs(spec: str, default_prompt: str = "") -> list[FramePrompt]:
    """Conditions from a JSONL / CSV file of {prompt, image | video} rows or a folder of .mp4 files."""
    if spec == "":
        return []
    p = Path(spec)
    if p.is_dir():
        videos = sorted(q for q in p.iterdir() if q.suffix.lower() in VIDEO_SUFFIXES)
        if not videos:
            raise UserError(f"data folder '{spec}' holds no .mp4 files")
        if not default_prompt:
            raise UserError(f"data folder '{spec}': its videos are prompted with data.options.default_prompt, which "
                            "is empty; set it (e.g. default_prompt='a video with smooth motion')")  # fmt: skip
        for v in videos:
            open_video(v, f"data folder '{spec}'")  # opened once, at load
        return [FramePrompt(default_prompt, {"video": str(v)}) for v in videos]
    if not p.is_file():
        raise UserError(f"data file '{spec}' not found (give a .jsonl / .json / .csv file or a folder of .mp4 files)")
    if p.suffix.lower() not in (".jsonl", ".json", ".csv"):
        raise UserError(f"data file '{spec}' must end in .jsonl, .json or .csv (or be a folder of .mp4 files)")
    rows = read_rows(read_utf8(p, "data file"), f"data file '{spec}'", p.suffix.lower())
    if not rows:
        raise UserError(f"data file '{spec}' holds no rows")
    return [_row(obj, p.parent, default_prompt, where) for where, obj in rows]


class FramePromptList(PromptList):
    """PromptList over FramePrompts whose batches also carry each frame in ``meta`` (for rewards and the adapter)."""

    fingerprint_scheme = 3  # 1 (before 2026-12-07): the prompt texts alone; 2: each frame file's name and size

    def identity(self, prompt: str) -> str:
        """A condition is its text AND its first frame (an image, or a video whose first frame is read): a file
        replaced under the same name is another condition, so the fingerprint names the file by its name and the
        hash of its bytes (a video: its size and the hash of its ends; :func:`~mmgrpo.data.hf_datasets.
        content_identity`; name and size alone missed an image replaced by one of the same size)."""
        media = {k: content_identity(v, video=k == "video") for k, v in sorted(getattr(prompt, "meta", {}).items())}
        return json.dumps([str(prompt), media])

    def get(self, indices: list[int]) -> PromptBatch:
        batch = super().get(indices)
        batch.meta = [dict(p.meta) for p in batch.prompts]
        return batch


def warn_shared_pairs(train: list[FramePrompt], heldout: list[FramePrompt]) -> None:
    """Warn when held-out conditions (prompt and first frame file) are training conditions too, as text-to-image
    warns of shared prompts (the evaluation would score what the policy trains on)."""
    key = lambda p: (str(p), tuple(sorted(p.meta.items())))  # noqa: E731
    seen = {key(p) for p in train}
    both = [p for p in heldout if key(p) in seen]
    if both:
        warnings.warn(f"{len(both)} of the {len(heldout)} held-out conditions are training conditions too (the "
                      f"first: {str(both[0])[:80]!r} with {quoted(both[0].meta, 120)}): the evaluation scores "
                      "conditions the policy trains on; give data.options.heldout_pairs other pairs",
                      stacklevel=2)  # fmt: skip


def build_image_to_video(cfg: Config, accelerator=None) -> Components:
    popts, data, device = generator_options(cfg, accelerator, VideoPolicyOptions, FrameDataOptions)
    if not data.pairs:
        raise UserError("data.options.pairs is empty: give a JSONL/CSV of {prompt, image|video} or a folder of mp4")
    train = read_pairs(data.pairs, data.default_prompt)  # the data first: named before the weights load (minutes)
    heldout = read_pairs(data.heldout_pairs, data.default_prompt)  # generate() reads each FramePrompt's frame
    warn_shared_pairs(train, heldout)
    policy = DiffusionPolicy(load_video_adapter(popts, device, image_conditioned=True), popts)
    return generator_components(cfg, data, policy, train, heldout, FramePromptList)


PIPELINES.add(
    "image_to_video",
    Pipeline(
        build=build_image_to_video,
        policy_options=VideoPolicyOptions,
        data_options=FrameDataOptions,
        description="image-to-video GRPO on Wan 2.x I2V from first frames (images or mp4 files)",
    ),
)
