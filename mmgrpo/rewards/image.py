"""Model-backed image rewards: CLIP score, LAION aesthetic, PickScore, HPSv2, in-group diversity.

Images are ``Float[N, 3, H, W]`` in [0, 1] (a list of PIL images or of ``Float[3, H, W]`` is accepted too).
Every factory here is cheap: weights load on the first call (``_Lazy``), then stay on the options' ``device``
in the options' ``dtype``. Scoring runs without grad, ``batch_size`` rows at a time, and preprocesses in torch
the way each model was trained: resize (antialiased, the model's interpolation) to the model's input size,
center crop (or pad, HPSv2), normalise with the model's mean/std.

Scales (what a user sees in ``reward/*`` curves):

- ``clip_score``: raw cosine(image, prompt) in [-1, 1] (x1; CLIPScore of Hessel et al. 2021 reports
  2.5 * max(cos, 0), DDPO-style pipelines often log cos * 100 -- scale with the reward's weight instead).
- ``aesthetic``: the LAION predictor's score, roughly 1..10 (DDPO's aesthetic reward).
- ``pickscore``: logit_scale.exp() * cosine, as PickScore reports it (~20..23 for real weights).
- ``hpsv2``: cosine(image, prompt), as HPSv2 reports it (~0.2..0.35 for real weights).
- ``diversity``: mean (1 - cosine) to the other members of the group, in [0, 2].
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmgrpo.core.errors import UserError
from mmgrpo.core.registry import nearest
from mmgrpo.core.safe_weights import refuse_pickle_weights
from mmgrpo.rewards.registry import register

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# LAION improved-aesthetic-predictor head: Linear layers at these indices of `layers` (Dropouts between them).
AESTHETIC_LINEAR_IDX = (0, 2, 4, 6, 7)
AESTHETIC_HIDDEN = (1024, 128, 64, 16, 1)


# ---------------------------------------------------------------- options and inputs


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or fp32/bf16/fp16) -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise UserError(f"dtype {name!r} is not supported; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


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


def _check_unit_range(x: torch.Tensor) -> None:
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


class _Lazy:
    """Calls ``loader()`` once, on first use, so building a reward never loads weights."""

    def __init__(self, loader: Callable[[], Any]):
        self._loader = loader
        self._value: Any = None

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def __call__(self) -> Any:
        if self._value is None:
            self._value = self._loader()
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


# ---------------------------------------------------------------- open_clip backbone (clip_score, aesthetic, hpsv2)


class OpenClip:
    """An open_clip model plus its tokenizer and eval preprocessing, all in torch."""

    def __init__(self, net: torch.nn.Module, tokenizer: Any, pp: dict, device: str, dtype: torch.dtype):
        self.net, self.tokenizer, self.device, self.dtype = net.eval().requires_grad_(False), tokenizer, device, dtype
        self.size = pair(pp.get("size", 224))
        self.mean, self.std = tuple(pp.get("mean", OPENAI_MEAN)), tuple(pp.get("std", OPENAI_STD))
        self.resize_mode, self.interpolation = pp.get("resize_mode", "shortest"), pp.get("interpolation", "bicubic")

    @torch.no_grad()
    def embed_images(self, images: Any, batch_size: int, normalize: bool = True) -> torch.Tensor:
        """Images in [0, 1] -> Float[N, D] fp32 (L2-normalised unless ``normalize=False``)."""

        def run(chunk):
            chunk = _to(chunk, self.device)
            x = preprocess(chunk, self.size, self.mean, self.std, self.resize_mode, self.interpolation)
            return self.net.encode_image(x.to(self.dtype), normalize=normalize).float().cpu()

        return _batched(run, images, batch_size)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int) -> torch.Tensor:
        """N prompts -> Float[N, D] fp32, L2-normalised (each distinct prompt encoded once)."""
        uniq, idx = _unique_texts(texts)

        def run(chunk):
            return self.net.encode_text(self.tokenizer(chunk).to(self.device), normalize=True).float().cpu()

        return _batched(run, uniq, batch_size)[idx]


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{what} {path!r} does not exist; give the path to an open_clip model config JSON")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _open_clip_from_config(path: str, quick_gelu: bool) -> tuple[torch.nn.Module, Any, dict]:
    """Build an open_clip model from a JSON config (bare model config or open_clip_config.json's {model_cfg})."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    raw = _read_json(path, "model_config")
    cfg = dict(raw.get("model_cfg", raw))
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise UserError(f"model_config {path!r} needs keys embed_dim, vision_cfg, text_cfg (an open_clip config)")
    cfg["quick_gelu"] = quick_gelu or cfg.get("quick_gelu", False)
    text_cfg = cfg["text_cfg"]
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in text_cfg
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = False  # weights come from our checkpoint, never the hub
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    net = cls(**cfg)
    ctx_len = text_cfg.get("context_length", 77)
    if "hf_tokenizer_name" in text_cfg:
        tok = open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=ctx_len)
    else:
        tok = open_clip.tokenizer.SimpleTokenizer(context_length=ctx_len)
    pp = merge_preprocess_dict(PreprocessCfg(), raw.get("preprocess_cfg", {}))
    pp["size"] = net.visual.image_size
    return net, tok, pp


def _load_open_clip_weights(net: torch.nn.Module, path: str) -> None:
    """Load a checkpoint into an open_clip model, massaged as open_clip.load_checkpoint does, strictly."""
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    sd = read_state_dict(path)
    if "positional_embedding" in sd and not hasattr(net, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(net, key, None)
        if key in sd and own is not None and own.ndim != sd[key].ndim:
            sd[key] = sd[key].reshape(own.shape)
    if "logit_bias" not in sd and getattr(net, "logit_bias", None) is not None:
        sd["logit_bias"] = torch.zeros_like(net.logit_bias)
    sd.pop("text.transformer.embeddings.position_ids", None)
    resize_pos_embed(sd, net)
    resize_text_pos_embed(sd, net)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # missing/unexpected keys or size mismatches: the wrong architecture
        raise UserError(
            f"checkpoint {path!r} does not fit the model ({str(e)[:300]}...); check the model name / model_config"
        ) from e


def load_open_clip(
    model: str,
    pretrained: str | None,
    model_config: str | None,
    device: str,
    dtype: str | torch.dtype,
    quick_gelu: bool = False,
    reward: str = "clip_score",
) -> OpenClip:
    """open_clip model + tokenizer + preprocessing from a built-in name, 'local-dir:'/'hf-hub:' or a JSON config.

    ``pretrained`` is a local checkpoint file (.safetensors, or a torch state dict read with weights_only) or,
    for built-in names, an open_clip pretrained tag (which downloads). A reward from random weights is refused.
    """
    import open_clip

    dt = parse_dtype(dtype)
    schema = model.startswith(("local-dir:", "hf-hub:"))
    if pretrained is None and not schema:
        raise UserError(f"reward {reward!r}: refusing a randomly initialised CLIP; give a checkpoint file")
    if model_config is not None:
        net, tok, pp = _open_clip_from_config(model_config, quick_gelu)
    else:
        if not schema and model not in open_clip.list_models():
            hint = nearest(model, open_clip.list_models())
            raise UserError(
                f"reward {reward!r}: unknown open_clip model {model!r}"
                + (f" (did you mean {hint!r}?)" if hint else "")
                + "; or give model_config=/path/to/config.json"
            )
        file_weights = pretrained is not None and os.path.isfile(pretrained)
        tag = None if (schema or file_weights) else pretrained
        try:
            net = open_clip.create_model(
                model, pretrained=tag, force_quick_gelu=quick_gelu, pretrained_image=False, pretrained_text=False
            )
        except RuntimeError as e:
            raise UserError(f"reward {reward!r}: open_clip could not build {model!r} with {pretrained!r}: {e}") from e
        tok = open_clip.get_tokenizer(model)
        pp = dict(open_clip.get_model_preprocess_cfg(net))
    if pretrained is not None and (model_config is not None or os.path.isfile(pretrained)):
        _load_open_clip_weights(net, pretrained)
    return OpenClip(net.to(device=device, dtype=dt), tok, pp, device, dt)


def _clip_loader(
    opts: dict, reward: str, quick_gelu: bool = False, resize_mode: str | None = None, option: str = "pretrained"
) -> _Lazy:
    """A lazy ``load_open_clip`` from a reward's options (model, pretrained, model_config, device, dtype)."""
    if resize_mode not in (None, "shortest", "longest", "squash"):
        raise UserError(f"reward {reward!r}: resize_mode {resize_mode!r} is unknown; use shortest, longest or squash")
    parse_dtype(opts["dtype"])  # fail at build time, not at the first step
    if opts["pretrained"] is None and not str(opts["model"]).startswith(("local-dir:", "hf-hub:")):
        raise UserError(
            f"reward {reward!r} needs CLIP weights: set {option}=/path/to/open_clip_model.safetensors "
            f"(or model='local-dir:/path/to/dir' holding open_clip_config.json and the weights)"
        )

    def load() -> OpenClip:
        m = load_open_clip(
            opts["model"], opts["pretrained"], opts["model_config"], opts["device"], opts["dtype"], quick_gelu, reward
        )
        m.resize_mode = resize_mode or m.resize_mode
        return m

    return _Lazy(load)


# ---------------------------------------------------------------- rewards


@register("clip_score")
def clip_score(
    model: str = "ViT-B-32",
    pretrained: str | None = None,
    model_config: str | None = None,
    quick_gelu: bool = False,
    batch_size: int = 32,
    device: str = "cpu",
    dtype: str = "float32",
):
    """CLIP score (open_clip): cosine(image, prompt) in [-1, 1].

    Options: ``model`` an open_clip name ('ViT-B-32', or 'local-dir:DIR'), ``pretrained`` a local checkpoint file,
    ``model_config`` a JSON open_clip config (custom/tiny architectures), ``quick_gelu`` True for OpenAI weights
    under a non '-quickgelu' name. Returns Tensor[N] (raw cosine, x1).

    >>> fn = clip_score(model="ViT-B-32", pretrained="open_clip_model.safetensors")  # loads on first call
    """
    clip = _clip_loader(dict(locals()), "clip_score", quick_gelu)  # loads on the first call

    return _image_text_cosine(clip, batch_size, "clip_score")


def _image_text_cosine(clip: Any, batch_size: int, name: str) -> Any:
    """The reward ``fn`` scoring each row by the cosine of its image and prompt embeddings under ``clip()`` [N]."""

    def fn(samples, prompts, meta, ctx) -> torch.Tensor:
        m = clip()
        img = m.embed_images(as_images(samples), batch_size)  # [N, D]
        txt = m.embed_texts(text_prompts(prompts, name), batch_size)  # [N, D]
        return (img * txt).sum(-1)  # [N]

    fn.model = clip
    return fn


def aesthetic_head(in_dim: int = 768) -> torch.nn.Sequential:
    """The LAION improved-aesthetic-predictor MLP (no activations, as released): in_dim-1024-128-64-16-1.

    State-dict keys ``layers.{0,2,4,6,7}.{weight,bias}`` (Dropouts sit at 1, 3, 5), as in
    ``sac+logos+ava1-l14-linearMSE.pth``.
    """
    return torch.nn.Sequential(
        torch.nn.Linear(in_dim, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    )


def load_aesthetic_head(path: str) -> torch.nn.Sequential:
    """Read the head from ``.pth`` (weights_only) or ``.safetensors``; keys ``layers.N.*`` (a bare ``N.*`` too)."""
    sd = read_state_dict(path)
    sd = {k.removeprefix("layers."): v for k, v in sd.items()}
    want = {f"{i}.{p}" for i in AESTHETIC_LINEAR_IDX for p in ("weight", "bias")}
    if set(sd) != want:
        raise UserError(
            f"aesthetic head {path!r} has keys {sorted(sd)[:6]}...; expected the LAION predictor layout "
            f"{sorted('layers.' + k for k in want)}"
        )
    head = aesthetic_head(int(sd["0.weight"].shape[1]))
    try:
        head.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"aesthetic head {path!r} has the wrong layer sizes: {e}") from e
    return head.eval().requires_grad_(False)


@register("aesthetic")
def aesthetic(
    head: str | None = None,
    clip_model: str = "ViT-L-14",
    clip_pretrained: str | None = None,
    clip_config: str | None = None,
    quick_gelu: bool = True,
    batch_size: int = 32,
    device: str = "cpu",
    dtype: str = "float32",
):
    """LAION aesthetic predictor v2 (DDPO): MLP on L2-normalised CLIP ViT-L/14 image features, ~1..10.

    Options: ``head`` the MLP weights (sac+logos+ava1-l14-linearMSE.pth or .safetensors), ``clip_pretrained``
    the CLIP checkpoint, ``clip_config`` an open_clip JSON config instead of ``clip_model``. ``quick_gelu`` defaults
    to True: the head was trained on OpenAI's ViT-L/14, which uses QuickGELU. Returns Tensor[N].
    """
    if head is None:
        raise UserError("reward 'aesthetic' needs head=/path/to/sac+logos+ava1-l14-linearMSE.pth (or .safetensors)")
    opts = {"model": clip_model, "pretrained": clip_pretrained, "model_config": clip_config}
    clip = _clip_loader(opts | {"device": device, "dtype": dtype}, "aesthetic", quick_gelu, option="clip_pretrained")

    def load_head():
        mlp = load_aesthetic_head(head)
        dim = clip().net.visual.output_dim
        if mlp[0].in_features != dim:
            raise UserError(f"aesthetic head {head!r} takes {mlp[0].in_features}-d features; the CLIP gives {dim}")
        return mlp.to(device)

    mlp = _Lazy(load_head)

    @torch.no_grad()
    def fn(samples, prompts, meta, ctx) -> torch.Tensor:
        emb = clip().embed_images(as_images(samples), batch_size)  # [N, D] fp32, L2-normalised
        return mlp()(emb.to(device)).squeeze(-1).float().cpu()  # [N]; head in fp32 (tiny)

    fn.model = clip
    return fn


@register("hpsv2")
def hpsv2(
    checkpoint: str | None = None,
    model: str = "ViT-H-14",
    model_config: str | None = None,
    resize_mode: str = "longest",
    batch_size: int = 16,
    device: str = "cpu",
    dtype: str = "float32",
):
    """HPSv2 / HPSv2.1 human preference score: cosine(image, prompt) of the fine-tuned open_clip ViT-H-14.

    Options: ``checkpoint`` HPS_v2_compressed.pt / HPS_v2.1_compressed.pt (bare open_clip state dict or
    {"state_dict": ...}, 'module.' prefixes stripped; torch weights_only or .safetensors), ``model_config`` an
    open_clip JSON config for custom sizes. ``resize_mode`` 'longest' (pad to square) is HPSv2's eval transform.
    Returns Tensor[N], the raw cosine (~0.2..0.35 for real weights; HPSv2's papers report it x100).
    """
    if checkpoint is None:
        raise UserError("reward 'hpsv2' needs checkpoint=/path/to/HPS_v2.1_compressed.pt (or .safetensors)")
    opts = {"model": model, "pretrained": checkpoint, "model_config": model_config, "device": device, "dtype": dtype}
    clip = _clip_loader(opts, "hpsv2", resize_mode=resize_mode)

    return _image_text_cosine(clip, batch_size, "hpsv2")


# ---------------------------------------------------------------- PickScore (transformers CLIPModel)


class HFClip:
    """A transformers CLIPModel + tokenizer + image-processor settings, preprocessing in torch."""

    def __init__(self, model_dir: str, processor_dir: str, device: str, dtype: torch.dtype):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        for d in (model_dir, processor_dir):
            if not os.path.isdir(d):
                raise UserError(f"pickscore: {d!r} is not a directory; give a local CLIPModel / processor directory")
        refuse_pickle_weights(model_dir, "pickscore model", "transformers.CLIPModel")
        self.net = CLIPModel.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
        self.net = self.net.to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(processor_dir)
        self.max_len = int(self.net.config.text_config.max_position_embeddings)
        self.device, self.dtype = device, dtype
        if (Path(processor_dir) / "preprocessor_config.json").is_file():
            ip = CLIPImageProcessor.from_pretrained(processor_dir)
            crop = ip.crop_size if getattr(ip, "do_center_crop", True) else ip.size
            self.size = (int(crop["height"]), int(crop["width"])) if "height" in crop else pair(crop["shortest_edge"])
            self.mean, self.std = tuple(ip.image_mean), tuple(ip.image_std)
        else:  # no processor config: CLIP's defaults at the model's image size
            self.size = pair(int(self.net.config.vision_config.image_size))
            self.mean, self.std = OPENAI_MEAN, OPENAI_STD

    @staticmethod
    def _pooled(out: Any) -> torch.Tensor:  # transformers 5 returns a model output, 4.x a tensor
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def embed_images(self, images: Any, batch_size: int) -> torch.Tensor:
        def run(chunk):
            x = preprocess(_to(chunk, self.device), self.size, self.mean, self.std, "shortest", "bicubic")
            e = self._pooled(self.net.get_image_features(pixel_values=x.to(self.device, self.dtype))).float()
            return F.normalize(e, dim=-1).cpu()

        return _batched(run, images, batch_size)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int) -> torch.Tensor:
        uniq, idx = _unique_texts(texts)

        def run(chunk):
            tok = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
            e = self._pooled(self.net.get_text_features(**{k: v.to(self.device) for k, v in tok.items()})).float()
            return F.normalize(e, dim=-1).cpu()

        return _batched(run, uniq, batch_size)[idx]


@register("pickscore")
def pickscore(
    model: str | None = None,
    processor: str | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    dtype: str = "float32",
):
    """PickScore (Kirstain et al. 2023): logit_scale.exp() * cosine(image, prompt) of a CLIP-H fine-tune.

    Options: ``model`` a local directory with the PickScore_v1 CLIPModel (config.json + weights), ``processor`` a
    directory with the tokenizer and preprocessor_config.json (PickScore uses laion/CLIP-ViT-H-14-laion2B-s32B-b79K's;
    defaults to ``model``). Returns Tensor[N] (~20..23 for real weights).
    """
    if model is None:
        raise UserError("reward 'pickscore' needs model=/path/to/PickScore_v1 (a local CLIPModel directory)")
    dt = parse_dtype(dtype)
    clip = _Lazy(lambda: HFClip(model, processor or model, device, dt))

    def fn(samples, prompts, meta, ctx) -> torch.Tensor:
        m = clip()
        img = m.embed_images(as_images(samples), batch_size)  # [N, D]
        txt = m.embed_texts(text_prompts(prompts, "pickscore"), batch_size)  # [N, D]
        return m.net.logit_scale.exp().float().cpu() * (img * txt).sum(-1)  # [N]

    fn.model = clip
    return fn


# ---------------------------------------------------------------- diversity (group-aware)


def pixel_embed(images: Any, pixel_size: int = 16) -> torch.Tensor:
    """Images in [0, 1] -> Float[N, 3 * s * s]: antialiased downsample to s x s, mapped to [-1, 1], flattened.

    Mapping to [-1, 1] makes black and white opposite (cosine -1) rather than orthogonal-ish.
    """
    x = preprocess(as_images(images), (pixel_size, pixel_size), (0.5,) * 3, (0.5,) * 3, "squash", "bilinear")
    return x.flatten(1).cpu()


def make_image_embedder(embedder: str, pixel_size: int, clip_opts: dict, reward: str) -> Callable[[Any], torch.Tensor]:
    """'pixels' | 'clip' -> a function images -> Float[n, D] (the clip one loads lazily)."""
    if embedder == "pixels":
        return lambda images: pixel_embed(images, pixel_size)
    if embedder == "clip":
        clip = _clip_loader(clip_opts, reward, clip_opts.get("quick_gelu", False))
        return lambda images: clip().embed_images(images, clip_opts["batch_size"])
    raise UserError(f"reward {reward!r}: embedder {embedder!r} is not known; use 'clip' or 'pixels'")


def group_diversity(emb: torch.Tensor, group_size: int) -> torch.Tensor:
    """SD-E2-style diversity: per row, mean over the other G-1 rows of its group of (1 - cosine).

    emb Float[N, D] with groups contiguous -> Float[N]; 0 when G == 1.
    """
    N = emb.shape[0]
    if group_size < 1 or N % group_size:
        raise UserError(f"diversity: {N} rows do not split into groups of G={group_size}")
    if group_size == 1:
        return torch.zeros(N)
    e = F.normalize(emb.float(), dim=-1).view(N // group_size, group_size, -1)  # [B, G, D]
    dist = 1.0 - e @ e.transpose(1, 2)  # [B, G, G]; diagonal is 0
    return (dist.sum(-1) / (group_size - 1)).reshape(N)  # [N]


@register("diversity")
def diversity(
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
    """In-group diversity (SD-E2-style): mean (1 - cosine) of a row's embedding to its group's others, in [0, 2].

    Group-aware. ``embedder`` 'clip' (open_clip image embeddings, options as clip_score) or 'pixels' (flattened
    ``pixel_size`` x ``pixel_size`` thumbnails in [-1, 1]). Returns Tensor[N]; a group of one scores 0.
    """
    opts = dict(locals())
    embed = make_image_embedder(embedder, pixel_size, opts, "diversity")

    def fn(samples, prompts, meta, ctx) -> torch.Tensor:
        if ctx is None or not getattr(ctx, "group_size", None):
            raise UserError("reward 'diversity' is group-aware and needs ctx.group_size (the group size G)")
        return group_diversity(embed(samples), int(ctx.group_size))  # [N]

    fn.group_aware = True
    return fn
