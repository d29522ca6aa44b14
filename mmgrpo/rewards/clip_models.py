"""The CLIP backbones of the image rewards: open_clip models (clip_score, aesthetic, hpsv2) and transformers'
CLIPModel (PickScore), each with its tokenizer and its eval preprocessing in torch, loaded from local weights."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmgrpo.core.errors import UserError
from mmgrpo.core.extras import needs
from mmgrpo.core.registry import nearest
from mmgrpo.core.safe_weights import NO_HUB_KERNELS, refuse_pickle_weights
from mmgrpo.rewards.image_utils import (
    OPENAI_MEAN,
    OPENAI_STD,
    _batched,
    _Lazy,
    _to,
    _unique_texts,
    pair,
    parse_dtype,
    preprocess,
    read_state_dict,
)

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
    with needs("rewards", "an open_clip model"):
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
    with needs("rewards", "an open_clip model"):
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
    try:  # open_clip's resizing asserts on a text width that differs (a checkpoint of another architecture)
        resize_pos_embed(sd, net)
        resize_text_pos_embed(sd, net)
        net.load_state_dict(sd, strict=True)
    except (RuntimeError, AssertionError, ValueError) as e:  # missing/unexpected keys or size mismatches
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
    with needs("rewards", "an open_clip model"):
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
    local = str(opts["model"]).removeprefix("local-dir:") if str(opts["model"]).startswith("local-dir:") else None
    if local is not None and not (Path(local) / "open_clip_config.json").is_file():  # open_clip's FileNotFoundError
        where = "is not a folder" if not Path(local).is_dir() else "holds no open_clip_config.json"
        raise UserError(f"reward {reward!r}: model={opts['model']!r}: {local!r} {where}; a local-dir: model is "
                        "a folder holding open_clip_config.json and the weights "
                        "(open_clip_model.safetensors)")  # fmt: skip
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

    key = ("open_clip", *(opts[k] for k in ("model", "pretrained", "model_config", "device", "dtype")), quick_gelu)
    return _Lazy(load, key=(*key, resize_mode))


# ---------------------------------------------------------------- PickScore (transformers CLIPModel)


class HFClip:
    """A transformers CLIPModel + tokenizer + image-processor settings, preprocessing in torch."""

    def __init__(self, model_dir: str, processor_dir: str, device: str, dtype: torch.dtype):
        with needs("rewards", "a transformers CLIP model"):
            from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        for d in (model_dir, processor_dir):
            if not os.path.isdir(d):
                raise UserError(f"pickscore: {d!r} is not a directory; give a local CLIPModel / processor directory")
        refuse_pickle_weights(model_dir, "pickscore model", "transformers.CLIPModel")
        self.net = CLIPModel.from_pretrained(model_dir, dtype=dtype, use_safetensors=True, **NO_HUB_KERNELS)
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
