"""What every model-backed image reward shares: options, inputs, torch preprocessing, safe weights, lazy loading.

Images are ``Float[N, 3, H, W]`` in [0, 1] (a list of PIL images or of ``Float[3, H, W]`` is accepted too);
preprocessing resizes (antialiased, the model's interpolation) to the model's input size, center-crops (or pads),
and normalises with the model's mean/std, in torch on the model's device.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmgrpo.core.dtypes import resolve_dtype as parse_dtype  # noqa: F401  (the rewards' name for it)
from mmgrpo.core.errors import UserError, listed

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------- options and inputs


def as_images(samples: Any) -> torch.Tensor | list[torch.Tensor]:
    """Samples -> Float[N, 3, H, W] in [0, 1], or a list of N Float[3, H_i, W_i] when sizes differ (PIL lists)."""
    if isinstance(samples, torch.Tensor):
        x = samples
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        if x.ndim != 4 or x.shape[1] != 3:
            raise UserError(f"image rewards expect samples Float[N, 3, H, W]; got shape {tuple(x.shape)}")
        _check_unit_range(x)
        return x.float()
    if isinstance(samples, Sequence) and len(samples) > 0:
        out = []
        for s in samples:
            if isinstance(s, torch.Tensor):
                t = s.float() / 255.0 if s.dtype == torch.uint8 else s.float()
            elif hasattr(s, "convert"):  # PIL image
                t = torch.from_numpy(np.asarray(s.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
            else:
                raise UserError(f"image rewards accept tensors or PIL images; got a {type(s).__name__}")
            if t.ndim != 3 or t.shape[0] != 3:
                raise UserError(f"each image must be Float[3, H, W]; got shape {tuple(t.shape)}")
            _check_unit_range(t)
            out.append(t)
        return out
    raise UserError(f"image rewards expect a Tensor [N, 3, H, W] or a non-empty list of images; got {type(samples)}")


def nonfinite_rows(x: torch.Tensor) -> list[int]:
    """The rows of ``x [N, ...]`` holding a NaN or an infinity."""
    return (~torch.isfinite(x)).flatten(1).any(1).nonzero().reshape(-1).tolist() if len(x) else []


def _check_unit_range(x: torch.Tensor) -> None:
    """Images [N, 3, H, W] (or one [3, H, W]) must be finite and in [0, 1]. Finiteness is checked first: NaN
    compares False with both bounds, so a NaN image would pass the range check and be scored."""
    if not bool(torch.isfinite(x).all()):
        rows = nonfinite_rows(x) if x.ndim == 4 else []
        where = f" at rows {listed(rows)}" if rows else ""
        raise UserError(
            f"images hold non-finite values (NaN/inf){where}; a diverged sample cannot be scored -- find why the "
            "sampler produced it"
        )
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise UserError(
            f"images must lie in [0, 1]; got values in [{lo:.3f}, {hi:.3f}] "
            "(decoded VAE output in [-1, 1] needs (x + 1) / 2 first)"
        )


def text_prompts(prompts: Sequence[Any], reward: str) -> list[str]:
    """Prompts as strings; a text-conditioned reward cannot score a non-text prompt."""
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise UserError(f"reward {reward!r} needs text prompts; got a {type(bad[0]).__name__} ({bad[0]!r})")
    return list(prompts)


# ---------------------------------------------------------------- torch preprocessing


def resize_for_model(
    x: torch.Tensor, size: tuple[int, int], mode: str = "shortest", interpolation: str = "bicubic"
) -> torch.Tensor:
    """Float[n, 3, H, W] -> Float[n, 3, h, w], the torch twin of open_clip's / CLIPImageProcessor's eval transform.

    mode 'shortest': scale so the image covers (h, w), then center crop (CLIP, PickScore).
    mode 'longest':  scale so the image fits in (h, w), then center pad with black (HPSv2's ResizeMaxSize).
    mode 'squash':   resize straight to (h, w).
    """
    th, tw = size
    H, W = x.shape[-2:]
    if (H, W) == (th, tw):
        return x
    if mode == "squash":
        new = (th, tw)
    elif mode in ("shortest", "longest"):
        pick = max if mode == "shortest" else min
        scale = pick(th / H, tw / W)
        new = (max(1, round(H * scale)), max(1, round(W * scale)))
    else:
        raise UserError(f"resize_mode {mode!r} is not supported; use 'shortest', 'longest' or 'squash'")
    if interpolation not in ("bicubic", "bilinear"):
        interpolation = "bicubic"  # open_clip's 'random' and PIL 'lanczos' have no antialiased torch twin
    # antialias=True matches PIL's (and torchvision's) filtered downsampling; bicubic overshoots, PIL clips
    x = F.interpolate(x, size=new, mode=interpolation, antialias=True, align_corners=False).clamp(0, 1)
    h, w = new
    if h < th or w < tw:  # pad to (th, tw), centred, left/top getting the smaller half (CenterCropOrPad)
        pl, pt = (tw - w) // 2 if tw > w else 0, (th - h) // 2 if th > h else 0
        x = F.pad(x, (pl, max(tw - w - pl, 0), pt, max(th - h - pt, 0)), value=0.0)
        h, w = x.shape[-2:]
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return x[..., top : top + th, left : left + tw]


def preprocess(
    images: torch.Tensor | list[torch.Tensor],
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    mode: str = "shortest",
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Images in [0, 1] -> normalised Float[n, 3, h, w] (fp32), ready for the vision tower."""
    if isinstance(images, torch.Tensor):
        x = resize_for_model(images.float(), size, mode, interpolation)
    else:
        x = torch.cat([resize_for_model(t[None].float(), size, mode, interpolation) for t in images])
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


# ---------------------------------------------------------------- weights


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file loaded with ``weights_only=True`` (never pickle).

    Unwraps ``{"state_dict": ...}`` (HPSv2 checkpoints, Lightning) and strips DDP's ``module.`` prefixes.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"weights file {path!r} does not exist; give the path to a local checkpoint file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd: Any = load_file(path, device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickled object or a TorchScript archive: refuse, say what to do
            raise UserError(
                f"cannot load {path!r} with torch.load(weights_only=True) ({type(e).__name__}: {str(e)[:200]}); "
                "give a plain state-dict file or a .safetensors file (e.g. open_clip_model.safetensors from the hub)"
            ) from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path!r} does not hold a state dict of tensors (or {{'state_dict': ...}})")
    return {k.removeprefix("module."): v for k, v in sd.items()}


_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.RLock()  # a loader may call another lazy loader (aesthetic's head reads the CLIP)


class _Lazy:
    """Calls ``loader()`` once, on first use, so building a reward never loads weights.

    ``key`` (what the loader reads: weights, device, dtype...): rewards whose loaders have the same key share one
    model while any of them holds it, e.g. the evaluation's reward and the training reward of the same name and
    options, or ``clip_score`` and ``diversity`` on the same CLIP weights (a second copy of PickScore's ViT-H would
    take ~4 GB of the GPU)."""

    def __init__(self, loader: Callable[[], Any], key: tuple | None = None):
        self._loader, self._key = loader, key
        self._value: Any = None

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def __call__(self) -> Any:
        if self._value is None and self._key is None:
            self._value = self._loader()
        elif self._value is None:
            with _SHARED_LOCK:
                value = _SHARED.get(self._key)
                if value is None:
                    value = _SHARED[self._key] = self._loader()
                self._value = value
        return self._value


def _to(images: torch.Tensor | list[torch.Tensor], device: str) -> torch.Tensor | list[torch.Tensor]:
    """Move a chunk of images to the model's device, so resizing runs there too."""
    return images.to(device) if isinstance(images, torch.Tensor) else [t.to(device) for t in images]


def _batched(fn: Callable[[Any], torch.Tensor], items: Any, batch_size: int) -> torch.Tensor:
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1; got {batch_size}")
    return torch.cat([fn(items[i : i + batch_size]) for i in range(0, len(items), batch_size)])


def _unique_texts(texts: list[str]) -> tuple[list[str], torch.Tensor]:
    """G rows share a prompt: encode each distinct prompt once. Returns (uniques, index [N])."""
    uniq = list(dict.fromkeys(texts))
    pos = {t: i for i, t in enumerate(uniq)}
    return uniq, torch.tensor([pos[t] for t in texts], dtype=torch.long)
