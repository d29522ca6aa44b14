"""Similarity-to-a-reference image rewards (StyleVAR-style): LPIPS and DreamSim. ImageReward is not built in.

Each row n is compared with its reference image: the fixed ``reference`` option (a path) when given, else
``meta[n][reference_key]`` (a path, a PIL image or a ``Float[3, H, W]`` tensor in [0, 1]). A reference given as a
path is read once and cached for the reward's lifetime (with what the model derives from it); rows sharing a
reference are scored together. The reward is the *negative* distance, so higher means closer to the reference:

- ``lpips``: -LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"),
  v0.1 linear heads shipped inside the ``lpips`` package on an ImageNet AlexNet / VGG16 / SqueezeNet1.1 trunk.
  Samples are resized to the reference's size. 0 for an identical image; ~0.1..0.7 for real pairs.
- ``dreamsim``: -(1 - cosine) of DreamSim embeddings (Fu et al. 2023, "DreamSim: Learning New Dimensions of Human
  Visual Similarity using Synthetic Data"), samples and reference resized to 224 x 224. In [-2, 0].

Nothing is downloaded at runtime: lpips' trunk comes from ``backbone_weights`` (a torchvision state dict), DreamSim
from ``cache_dir`` (its unzipped release checkpoint), and types whose loader fetches code or weights are refused.
Both need ``pip install "mmgrpo[similarity]"`` (the packages ``lpips`` and ``dreamsim``).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mmgrpo.core.errors import UserError
from mmgrpo.core.extras import installed, missing_extra, needs
from mmgrpo.core.files import check_image
from mmgrpo.core.registry import nearest
from mmgrpo.rewards.image_utils import _batched, _Lazy, _to, as_images, preprocess, read_state_dict
from mmgrpo.rewards.registry import register

# lpips net -> (torchvision architecture, the file torchvision would download for it)
LPIPS_BACKBONES = {
    "alex": ("alexnet", "alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16", "vgg16-397923af.pth"),
    "squeeze": ("squeezenet1_1", "squeezenet1_1-b8a52dc0.pth"),
}
DREAMSIM_SIZE = 224  # dreamsim's own preprocessing: bicubic resize to 224 x 224, no crop, [0, 1]
# dreamsim_type -> (backbone file, LoRA adapter folder) its loader reads from cache_dir, nothing else
DREAMSIM_LOCAL = {
    "open_clip_vitb32": ("open_clip_vitb32_pretrain.pth.tar", "open_clip_vitb32_single_lora"),
    "clip_vitb32": ("clip_vitb32_pretrain.pth.tar", "clip_vitb32_single_lora"),
}
_DINO_HUB = "builds its DINO ViT-B/16 with torch.hub.load('facebookresearch/dino:main'), code and weights from GitHub"
DREAMSIM_REFUSED = {
    "ensemble": _DINO_HUB,
    "dino_vitb16": _DINO_HUB,
    "dino_vitb16_patch": _DINO_HUB,
    "dinov2_vitb14": "builds its backbone with torch.hub.load('facebookresearch/dinov2'), which queries GitHub",
    "dinov2_vitb14_patch": "builds its backbone with torch.hub.load('facebookresearch/dinov2'), which queries GitHub",
    "synclr_vitb16": "reads synclr_vit_b_16.pth with torch.load without weights_only=True (a pickle on torch < 2.6)",
}
DREAMSIM_RELEASES = "https://github.com/ssundaram21/dreamsim/releases/tag/v0.2.0-checkpoints"


def _need(package: str, reward: str) -> None:
    if not installed(package):
        raise missing_extra("similarity", f"reward {reward!r}", package)


# ---------------------------------------------------------------- references


def load_reference(ref: Any) -> torch.Tensor:
    """A path, PIL image or tensor -> Float[3, H, W] in [0, 1] on the CPU."""
    if isinstance(ref, (str, os.PathLike)):
        if not os.path.isfile(ref):
            raise UserError(f"reference image {os.fspath(ref)!r} does not exist; give the path to an image file")
        from PIL import Image, ImageOps

        check_image(ref, "reference image")  # a corrupt file: a UserError naming it
        with Image.open(ref) as im:
            ref = ImageOps.exif_transpose(im).convert("RGB")  # upright, as the samples it is compared with
    if isinstance(ref, torch.Tensor) and ref.ndim == 4 and ref.shape[0] == 1:
        ref = ref[0]  # [1, 3, H, W] -> [3, H, W]
    if isinstance(ref, torch.Tensor) or hasattr(ref, "convert"):
        (t,) = as_images([ref])  # checks [3, H, W], the range, and converts uint8 / PIL
        return t.detach().float().cpu()
    raise UserError(f"a reference image must be a path, a PIL image or a Float[3, H, W] tensor; got {type(ref)}")


def reference_specs(meta: Sequence[dict] | None, n: int, reference_key: str, reference: Any, reward: str) -> list:
    """The reference of each of the N rows: the fixed ``reference`` option, else ``meta[i][reference_key]``."""
    if reference is not None:
        return [reference] * n
    rows = list(meta) if meta is not None else []
    if len(rows) != n:
        raise UserError(
            f"reward {reward!r} reads each row's reference image from meta[i][{reference_key!r}], but got "
            f"{len(rows)} meta rows for {n} samples; put the reference in the prompt's meta, or set reference=PATH"
        )
    missing = [i for i, m in enumerate(rows) if not isinstance(m, dict) or m.get(reference_key) is None]
    if missing:
        raise UserError(
            f"reward {reward!r}: rows {missing[:8]} have no meta[{reference_key!r}] (the reference image path or "
            f"tensor); add it to the prompts' meta, set reference_key= to the key that holds it, or set reference=PATH"
        )
    return [m[reference_key] for m in rows]


class References:
    """Prepares each distinct reference once per call, and each reference *path* once for the reward's lifetime.

    ``prepare(Float[3, H, W]) -> anything`` (the image on the device, or its embedding) runs lazily, after the model.
    """

    def __init__(self, prepare: Callable[[torch.Tensor], Any]):
        self.prepare = prepare
        self.cache: dict[str, Any] = {}

    def groups(self, specs: list) -> list[tuple[Any, list[int]]]:
        """N reference specs -> [(prepared reference, its row indices)], one entry per distinct reference."""
        by_key: dict[tuple[str, Any], tuple[Any, list[int]]] = {}
        for i, s in enumerate(specs):
            is_path = isinstance(s, (str, os.PathLike))
            key = ("path", os.path.abspath(s)) if is_path else ("object", id(s))  # id is stable within one call
            by_key.setdefault(key, (s, []))[1].append(i)
        out = []
        for (kind, k), (spec, rows) in by_key.items():
            if kind == "path":
                if k not in self.cache:
                    self.cache[k] = self.prepare(load_reference(spec))
                out.append((self.cache[k], rows))
            else:
                out.append((self.prepare(load_reference(spec)), rows))
        return out


def _rows(images: torch.Tensor | list[torch.Tensor], rows: list[int]) -> torch.Tensor | list[torch.Tensor]:
    return images[rows] if isinstance(images, torch.Tensor) else [images[i] for i in rows]


def score_against_references(
    samples: Any, specs: list, refs: References, distance: Callable[[Any, Any], torch.Tensor]
) -> torch.Tensor:
    """-distance(rows' images, their reference) for every row: Float[N] (fp32, CPU)."""
    images = as_images(samples)
    out = torch.empty(len(specs))
    for ref, rows in refs.groups(specs):
        out[rows] = -distance(_rows(images, rows), ref)
    return out


# ---------------------------------------------------------------- LPIPS


def lpips_backbone_state(trunk: torch.nn.Module, sd: dict[str, torch.Tensor], path: str, net: str) -> dict:
    """A torchvision state dict (``features.<i>.*``; ``classifier.*`` ignored) -> lpips' ``slice<k>.<i>.*`` keys.

    lpips splits ``tv.<arch>().features`` into slices but keeps torchvision's layer index ``i`` as the child name.
    """
    arch, fname = LPIPS_BACKBONES[net]
    out, missing, bad = {}, [], []
    for key, own in trunk.state_dict().items():
        src = "features." + key.split(".", 1)[1]  # 'slice2.3.weight' -> 'features.3.weight'
        if src not in sd:
            missing.append(src)
        elif sd[src].shape != own.shape:
            bad.append(f"{src} {tuple(sd[src].shape)} vs {tuple(own.shape)}")
        else:
            out[key] = sd[src]
    if missing or bad:
        raise UserError(
            f"backbone_weights {path!r} is not a torchvision {arch} state dict (missing {missing[:4]}, wrong shapes "
            f"{bad[:4]}); give torchvision's {fname} (or the same keys in .safetensors) for net={net!r}"
        )
    return out


def load_lpips(net: str, backbone_weights: str, device: str) -> torch.nn.Module:
    """lpips.LPIPS v0.1 with its shipped linear heads and the trunk from ``backbone_weights`` (never downloaded)."""
    with needs("similarity", "the lpips reward"):
        import lpips

    with warnings.catch_warnings():  # lpips passes torchvision the deprecated pretrained=False
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(pretrained=True, net=net, version="0.1", pnet_rand=True, verbose=False)
    trunk_sd = lpips_backbone_state(model.net, read_state_dict(backbone_weights), backbone_weights, net)
    model.net.load_state_dict(trunk_sd, strict=True)
    return model.to(device).eval().requires_grad_(False)


def lpips_distance(model: torch.nn.Module, images: Any, ref: torch.Tensor, batch_size: int) -> torch.Tensor:
    """LPIPS between n images (Float[n, 3, H, W] or a list) and one reference Float[3, h, w] -> Float[n].

    Images are resized (antialiased bilinear) to the reference's (h, w); lpips takes inputs in [-1, 1].
    """
    device = ref.device
    half = (0.5, 0.5, 0.5)  # (x - 0.5) / 0.5 maps [0, 1] to [-1, 1]

    @torch.no_grad()
    def run(chunk):
        x = preprocess(_to(chunk, str(device)), tuple(ref.shape[-2:]), half, half, "squash", "bilinear")  # [b,3,h,w]
        r = (ref * 2 - 1).expand(x.shape[0], -1, -1, -1)  # [b, 3, h, w]
        return model(x, r).flatten().float().cpu()  # [b]

    return _batched(run, images, batch_size)


@register("lpips")
def lpips(
    net: str = "alex",
    backbone_weights: str | None = None,
    reference_key: str = "reference",
    reference: str | None = None,
    batch_size: int = 16,
    device: str = "cpu",
):
    """-LPIPS distance to a reference image (Zhang et al. 2018), as StyleVAR-style similarity rewards use it.

    Options: ``net`` 'alex' | 'vgg' | 'squeeze'; ``backbone_weights`` the trunk's ImageNet state dict in torchvision's
    format (alexnet-owt-7be5be79.pth / vgg16-397923af.pth / squeezenet1_1-b8a52dc0.pth, or .safetensors); the
    reference is ``reference`` (a path, for every row) or ``meta[i][reference_key]``. Returns Tensor[N] <= 0.

    >>> fn = lpips(backbone_weights="alexnet-owt-7be5be79.pth")    # doctest: +SKIP
    >>> fn(images, prompts, [{"reference": "style.png"}] * N, ctx)  # doctest: +SKIP  -> Tensor[N]
    """
    if net not in LPIPS_BACKBONES:
        hint = nearest(net, list(LPIPS_BACKBONES))
        raise UserError(
            f"reward 'lpips': net {net!r} is not known; use one of {', '.join(LPIPS_BACKBONES)}"
            + (f" (did you mean {hint!r}?)" if hint else "")
        )
    arch, fname = LPIPS_BACKBONES[net]
    if backbone_weights is None or not os.path.isfile(backbone_weights):
        raise UserError(
            f"reward 'lpips' needs backbone_weights=PATH, a local torchvision {arch} ImageNet state dict ({fname}, "
            f"as in ~/.cache/torch/hub/checkpoints, or .safetensors); got {backbone_weights!r}. mmgrpo does not let "
            "torchvision download it"
        )
    _need("lpips", "lpips")
    model = _Lazy(lambda: load_lpips(net, backbone_weights, device), key=("lpips", net, backbone_weights, device))
    refs = References(lambda img: img.to(device))  # the reference image, on the model's device

    def fn(samples, prompts, meta, ctx) -> torch.Tensor:
        m = model()
        specs = reference_specs(meta, len(samples), reference_key, reference, "lpips")
        return score_against_references(samples, specs, refs, lambda x, ref: lpips_distance(m, x, ref, batch_size))

    fn.model, fn.references = model, refs
    return fn


# ---------------------------------------------------------------- DreamSim


def check_dreamsim_files(cache_dir: str | None, dreamsim_type: str) -> None:
    """Refuse, before anything loads, every setup in which dreamsim would download code or weights."""
    if dreamsim_type in DREAMSIM_REFUSED:
        raise UserError(
            f"reward 'dreamsim': dreamsim_type {dreamsim_type!r} cannot be built from local files (dreamsim "
            f"{DREAMSIM_REFUSED[dreamsim_type]}); use dreamsim_type='open_clip_vitb32' or 'clip_vitb32'"
        )
    if dreamsim_type not in DREAMSIM_LOCAL:
        hint = nearest(dreamsim_type, list(DREAMSIM_LOCAL))
        raise UserError(
            f"reward 'dreamsim': dreamsim_type {dreamsim_type!r} is not known; use one of {', '.join(DREAMSIM_LOCAL)}"
            + (f" (did you mean {hint!r}?)" if hint else "")
        )
    if cache_dir is None or not os.path.isdir(cache_dir):
        raise UserError(
            f"reward 'dreamsim' needs cache_dir=DIR, a local folder holding the unzipped "
            f"dreamsim_{dreamsim_type}_checkpoint.zip ({DREAMSIM_RELEASES}); got {cache_dir!r}"
        )
    backbone, lora = DREAMSIM_LOCAL[dreamsim_type]
    need = [backbone, f"{lora}/adapter_config.json"]
    missing = [f for f in need if not os.path.isfile(os.path.join(cache_dir, f))]
    adapters = ("adapter_model.safetensors", "adapter_model.bin")
    if not any(os.path.isfile(os.path.join(cache_dir, lora, a)) for a in adapters):
        missing.append(f"{lora}/adapter_model.safetensors (or .bin)")
    if missing:
        raise UserError(
            f"reward 'dreamsim': cache_dir {cache_dir!r} lacks {', '.join(missing)}; unzip "
            f"dreamsim_{dreamsim_type}_checkpoint.zip ({DREAMSIM_RELEASES}) there (dreamsim would download it)"
        )


def load_dreamsim(cache_dir: str, dreamsim_type: str, device: str) -> torch.nn.Module:
    """The DreamSim model (backbone + LoRA, PEFT-wrapped) through dreamsim's own loader, from checked local files."""
    with needs("similarity", "the dreamsim reward"):
        from dreamsim import dreamsim as build

    check_dreamsim_files(cache_dir, dreamsim_type)  # the files must still be there: dreamsim downloads otherwise
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # "Using cached ..."
        warnings.simplefilter("ignore")
        model, _ = build(
            pretrained=True, device=device, cache_dir=cache_dir, normalize_embeds=True, dreamsim_type=dreamsim_type
        )
    return model.eval().requires_grad_(False)


def dreamsim_embed(model: torch.nn.Module, images: Any, batch_size: int, device: str) -> torch.Tensor:
    """Images in [0, 1] -> DreamSim embeddings Float[n, D] (fp32, on ``device``), resized to 224 x 224 bicubic."""
    zero, one = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # dreamsim normalises inside its extractor

    @torch.no_grad()
    def run(chunk):
        x = preprocess(_to(chunk, device), (DREAMSIM_SIZE, DREAMSIM_SIZE), zero, one, "squash", "bicubic")
        return model.embed(x).float()  # [b, D]

    return _batched(run, images, batch_size)


@register("dreamsim")
def dreamsim(
    cache_dir: str | None = None,
    dreamsim_type: str = "open_clip_vitb32",
    reference_key: str = "reference",
    reference: str | None = None,
    batch_size: int = 16,
    device: str = "cpu",
):
    """-(1 - cosine) of DreamSim embeddings (Fu et al. 2023) to a reference image; Tensor[N] in [-2, 0].

    Options: ``cache_dir`` the folder dreamsim itself caches into, holding the unzipped release checkpoint of
    ``dreamsim_type`` ('open_clip_vitb32' | 'clip_vitb32': a ``<type>_pretrain.pth.tar`` backbone and a
    ``<type>_single_lora/`` PEFT adapter); the reference is ``reference`` (a path) or ``meta[i][reference_key]``.
    The reference's embedding is computed once per path and cached.

    >>> fn = dreamsim(cache_dir="models/dreamsim")                         # doctest: +SKIP
    >>> fn(images, prompts, [{"reference": "style.png"}] * N, ctx)         # doctest: +SKIP  -> Tensor[N]
    """
    check_dreamsim_files(cache_dir, dreamsim_type)
    _need("dreamsim", "dreamsim")
    model = _Lazy(
        lambda: load_dreamsim(cache_dir, dreamsim_type, device), key=("dreamsim", cache_dir, dreamsim_type, device)
    )
    refs = References(lambda img: dreamsim_embed(model(), img[None], 1, device))  # [1, D], once per reference path

    def distance(images, ref_emb) -> torch.Tensor:
        emb = dreamsim_embed(model(), images, batch_size, device)  # [n, D]
        return (1 - F.cosine_similarity(emb, ref_emb, dim=-1)).cpu()  # [n]

    def fn(samples, prompts, meta, ctx) -> torch.Tensor:
        specs = reference_specs(meta, len(samples), reference_key, reference, "dreamsim")
        return score_against_references(samples, specs, refs, distance)

    fn.model, fn.references = model, refs
    return fn


# ---------------------------------------------------------------- ImageReward (not built in)


@register("image_reward")
def image_reward(**options):
    """(not available) ImageReward (Xu et al. 2023): its package pins timm==0.6.13 and fairscale; see the error."""
    raise UserError(
        "reward 'image_reward' is not built in: `pip install image-reward` (1.5, the latest) pins timm==0.6.13 and "
        "fairscale==0.4.13, which would downgrade the timm 1.x that open_clip and dreamsim use, and its loader "
        "fetches ImageReward.pt and med_config.json from the Hugging Face hub. Serve it from a separate environment "
        "with `mmgrpo serve-reward` and score with the 'remote' reward, or register your own factory through the "
        "'mmgrpo.rewards' entry point"
    )
