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

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from mmgrpo.core.errors import UserError
from mmgrpo.rewards.clip_models import HFClip, _clip_loader
from mmgrpo.rewards.image_utils import _Lazy, as_images, parse_dtype, preprocess, read_state_dict, text_prompts
from mmgrpo.rewards.registry import register

# LAION improved-aesthetic-predictor head: Linear layers at these indices of `layers` (Dropouts between them).
AESTHETIC_LINEAR_IDX = (0, 2, 4, 6, 7)
AESTHETIC_HIDDEN = (1024, 128, 64, 16, 1)


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
    clip = _Lazy(lambda: HFClip(model, processor or model, device, dt), key=("hf_clip", model, processor, device, dt))

    def fn(samples, prompts, meta, ctx) -> torch.Tensor:
        m = clip()
        img = m.embed_images(as_images(samples), batch_size)  # [N, D]
        txt = m.embed_texts(text_prompts(prompts, "pickscore"), batch_size)  # [N, D]
        return m.net.logit_scale.float().exp().cpu() * (img * txt).sum(-1)  # [N]; exp in fp32 (bf16: 99, not 100)

    fn.model = clip
    return fn


# ---------------------------------------------------------------- diversity (group-aware)


def pixel_embed(images: Any, pixel_size: int = 16) -> torch.Tensor:
    """Images in [0, 1] -> Float[N, 3 * s * s]: antialiased downsample to s x s, mapped to [-1, 1], flattened.

    Mapping to [-1, 1] makes black and white opposite (cosine -1) rather than orthogonal-ish. Computed on the host:
    CUDA's antialiased resize refuses downscale factors above ~94 (its filter outgrows a block's shared memory; e.g.
    1024 px to 8), and the thumbnails are tiny.
    """
    imgs = as_images(images)
    imgs = imgs.cpu() if isinstance(imgs, torch.Tensor) else [t.cpu() for t in imgs]
    x = preprocess(imgs, (pixel_size, pixel_size), (0.5,) * 3, (0.5,) * 3, "squash", "bilinear")
    return x.flatten(1)


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
