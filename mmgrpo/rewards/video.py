"""Video rewards: any image reward applied per frame, temporal consistency, motion energy; reading videos.

Videos are ``Float[N, F, 3, H, W]`` in [0, 1] (a list of N ``Float[F, 3, H, W]`` or of video file paths is
accepted too; paths are read with :func:`mmgrpo.core.files.open_video`). Rows of one group are contiguous, as
everywhere.

- ``video_frames``: score every ``frame_stride``-th frame with an image reward, aggregate per video (mean | min).
- ``temporal_consistency``: mean cosine similarity of consecutive frame embeddings (CLIP or pixels), in [-1, 1].
- ``motion``: mean |x_{f+1} - x_f| (frame-difference energy); with ``target`` set, -|energy - target|,
  which penalises frozen videos as well as flicker.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmgrpo.core.errors import UserError
from mmgrpo.core.files import open_video
from mmgrpo.rewards.image import make_image_embedder
from mmgrpo.rewards.registry import get, register


def read_video(path: str | os.PathLike, num_frames: int | None = None, size: int | Sequence[int] | None = None):
    """Read a video file (:func:`mmgrpo.core.files.open_video`) -> Float[F, 3, H, W] in [0, 1].

    ``num_frames``: that many frames, evenly spaced over the whole clip (first and last included; frames repeat
    when the clip is shorter); None reads every frame. ``size``: resize (antialiased bilinear) to an int (square)
    or (H, W).
    """
    path = str(path)
    video = open_video(path, "a video reward")
    n = len(video)
    if num_frames is None:
        idx = list(range(n))
    else:
        if num_frames < 1:
            raise UserError(f"num_frames must be >= 1 or None; got {num_frames}")
        idx = np.linspace(0, n - 1, num_frames).round().astype(int).tolist()
    frames = video.frames(idx)  # [F, H, W, 3] uint8
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0  # [F, 3, H, W]
    if size is not None:  # resized in torch, the same whichever library decoded the video
        hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        x = F.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return x


SCORES_VIDEOS = "videos"
"""the ``scores`` attribute of a video reward's factory and callable: it takes Float[N, F, 3, H, W], not images (a
config pairing it with an image recipe is refused when it loads; ``video_frames`` refuses it as its inner reward)"""


def as_videos(samples: Any, reward: str = "a video reward") -> torch.Tensor:
    """Samples -> Float[N, F, 3, H, W] in [0, 1]; a list of tensors or paths must share F, H, W. Images
    [N, 3, H, W] are a UserError naming ``reward`` and the fix."""
    if isinstance(samples, torch.Tensor):
        x = samples
    elif isinstance(samples, Sequence) and len(samples) > 0:
        items = [read_video(s) if isinstance(s, (str, os.PathLike)) else torch.as_tensor(s) for s in samples]
        shapes = sorted({tuple(t.shape) for t in items})
        if len(shapes) != 1:
            raise UserError(f"videos in a batch must share [F, 3, H, W]; got shapes {shapes}")
        x = torch.stack(items)
    else:
        raise UserError(f"video rewards expect a Tensor [N, F, 3, H, W] or a list of videos; got {type(samples)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if x.ndim == 4:
        raise UserError(f"{reward} scores videos Float[N, F, 3, H, W], but got images of shape {tuple(x.shape)}: use "
                        "it with a text_to_video / image_to_video recipe, and an image reward (or video_frames "
                        "around one, for videos) with images")  # fmt: skip
    if x.ndim != 5 or x.shape[2] != 3:
        raise UserError(f"{reward} expects samples Float[N, F, 3, H, W]; got shape {tuple(x.shape)}")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise UserError(
            f"video frames must lie in [0, 1]; got values in [{lo:.3f}, {hi:.3f}] (map [-1, 1] by (x + 1) / 2)"
        )
    return x.float()


def frame_energy(videos: torch.Tensor) -> torch.Tensor:
    """Float[N, F, 3, H, W] -> Float[N]: mean |x_{f+1} - x_f| over frames and pixels (0 for a single frame)."""
    if videos.shape[1] < 2:
        return torch.zeros(videos.shape[0])
    return (videos[:, 1:] - videos[:, :-1]).abs().flatten(1).mean(1)


def consecutive_cosine(emb: torch.Tensor) -> torch.Tensor:
    """Float[N, F, D] -> Float[N]: mean over f of cosine(e_f, e_{f+1})."""
    e = F.normalize(emb.float(), dim=-1)
    return (e[:, 1:] * e[:, :-1]).sum(-1).mean(1)


def aggregate_frames(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Float[N, F] -> Float[N] by 'mean' or 'min' (NaN, a frame the reward skipped, propagates to its video)."""
    if how == "mean":
        return scores.mean(1)
    if how == "min":
        return torch.where(scores.isnan().any(1), torch.nan, scores.min(1).values)
    raise UserError(f"aggregate {how!r} is not supported; use 'mean' or 'min'")


@register("video_frames")
def video_frames(
    reward: str | None = None, reward_options: dict | None = None, aggregate: str = "mean", frame_stride: int = 1
):
    """Per-frame image reward on videos: score every frame_stride-th frame with `reward`, aggregate mean|min.

    Options: ``reward`` the image reward's name (e.g. 'clip_score'), ``reward_options`` its options, ``aggregate``
    'mean' | 'min', ``frame_stride`` >= 1. Frames of a video share its prompt and meta. Returns Tensor[N], or a
    list with None for videos whose frames the image reward skipped.
    """

    if reward is None:
        raise UserError("reward 'video_frames' needs reward=<an image reward name>, e.g. reward: clip_score")
    if aggregate not in ("mean", "min"):
        raise UserError(f"video_frames: aggregate {aggregate!r} is not supported; use 'mean' or 'min'")
    if int(frame_stride) < 1:
        raise UserError(f"video_frames: frame_stride must be >= 1; got {frame_stride}")
    inner = get(reward, **(reward_options or {}))
    if getattr(inner, "scores", None) == SCORES_VIDEOS:  # it would get single frames [N*F, 3, H, W]
        raise UserError(f"video_frames: {reward!r} scores whole videos; video_frames scores each frame with an "
                        f"image reward (clip_score, aesthetic, ...): name {reward!r} itself as the reward "
                        "instead")  # fmt: skip
    if getattr(inner, "group_aware", False):
        raise UserError(f"video_frames: {reward!r} is group-aware; frames of one video are not a group of samples")

    def fn(samples, prompts, meta, ctx):
        v = as_videos(samples, "reward 'video_frames'")[:, :: int(frame_stride)]  # [N, F', 3, H, W]
        N, Fk = v.shape[:2]
        frames = v.flatten(0, 1)  # [N*F', 3, H, W], frames of a video contiguous
        rep_prompts = [p for p in prompts for _ in range(Fk)]
        rep_meta = [m for m in (meta if meta is not None else [{}] * N) for _ in range(Fk)]
        fctx = dataclasses.replace(ctx, group=None) if dataclasses.is_dataclass(ctx) else ctx
        out = inner(frames, rep_prompts, rep_meta, fctx)
        if not isinstance(out, torch.Tensor):
            out = torch.tensor([float("nan") if s is None else float(s) for s in out])
        scores = aggregate_frames(out.float().view(N, Fk), aggregate)  # [N]
        if scores.isnan().any():
            return [None if s != s else float(s) for s in scores.tolist()]
        return scores

    fn.inner = inner
    fn.scores = SCORES_VIDEOS
    return fn


video_frames.scores = SCORES_VIDEOS


@register("temporal_consistency")
def temporal_consistency(
    embedder: str = "clip",
    pixel_size: int = 16,
    model: str = "ViT-B-32",
    pretrained: str | None = None,
    model_config: str | None = None,
    quick_gelu: bool = False,
    batch_size: int = 32,
    device: str = "cpu",
    dtype: str = "float32",
):
    """Temporal consistency: mean cosine similarity of consecutive frame embeddings, in [-1, 1].

    ``embedder`` 'clip' (open_clip image embeddings, options as clip_score) or 'pixels' (``pixel_size`` thumbnails
    in [-1, 1]). Needs F >= 2 frames. Returns Tensor[N].
    """
    embed = make_image_embedder(embedder, pixel_size, dict(locals()), "temporal_consistency")

    def fn(samples, prompts, meta, ctx) -> torch.Tensor:
        v = as_videos(samples, "reward 'temporal_consistency'")  # [N, F, 3, H, W]
        N, Fn = v.shape[:2]
        if Fn < 2:
            raise UserError(f"temporal_consistency needs videos with F >= 2 frames; got F={Fn}")
        emb = embed(v.flatten(0, 1))  # [N*F, D]
        return consecutive_cosine(emb.view(N, Fn, -1))  # [N]

    fn.scores = SCORES_VIDEOS
    return fn


temporal_consistency.scores = SCORES_VIDEOS


@register("motion")
def motion(target: float | None = None):
    """Motion energy: mean |x_{f+1} - x_f| per video; with `target`, -|energy - target| (penalises frozen videos).

    Pixels in [0, 1], so the energy lies in [0, 1]. Returns Tensor[N].
    """

    def fn(samples, prompts, meta, ctx) -> torch.Tensor:
        videos = as_videos(samples, "reward 'motion'")
        if videos.shape[1] < 2:  # its energy was 0 on every row: nothing learned, nothing said
            raise UserError(f"reward 'motion' compares consecutive frames, but the videos have {videos.shape[1]} "
                            "frame; generate more (policy.options.num_frames)")  # fmt: skip
        energy = frame_energy(videos).cpu()  # [N]
        return energy if target is None else -(energy - float(target)).abs()

    fn.scores = SCORES_VIDEOS
    return fn


motion.scores = SCORES_VIDEOS
