"""The generic VLM family: any transformers ``AutoModelForImageTextToText`` with 1-D positions.

Also the base class of the Qwen families, which override only what their models do differently. A model fits here
when its ``get_image_features`` (``get_video_features``) returns the projected features of the image (video) tokens,
its config names the placeholder token (``image_token_id`` or ``image_token_index``), and its decoder takes
``inputs_embeds`` and 1-D ``position_ids``. Boxes are read as absolute pixels of the original image.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from mmgrpo.core.extras import needs
from mmgrpo.policies.vlm_families import VLM_FAMILIES
from mmgrpo.policies.vlm_inputs import PromptInputs


def first_attr(objs: list[Any], names: tuple[str, ...]) -> Any:
    """The first attribute of ``names`` that is set on one of ``objs`` (None objects are skipped), or None."""
    for obj in objs:
        for name in names:
            if obj is not None and getattr(obj, name, None) is not None:
                return getattr(obj, name)
    return None


def flat_features(out: Any) -> torch.Tensor:
    """get_image_features' output (a model output with pooler_output, a tuple of tensors, a tensor) -> [n_tok, D]."""
    if getattr(out, "pooler_output", None) is not None:
        out = out.pooler_output
    if isinstance(out, (list, tuple)):
        out = torch.cat([o.reshape(-1, o.shape[-1]) for o in out])
    return out.reshape(-1, out.shape[-1])


class GenericFamily:
    """Any AutoModelForImageTextToText whose get_image_features returns projected features (1-D positions)."""

    name = "generic"
    box_convention = "absolute"

    def model_class(self) -> type:
        with needs("vlm", "the generic VLM family"):
            from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    def backbone(self, hf: nn.Module) -> nn.Module:
        return first_attr([getattr(hf, "model", None)], ("language_model",)) or hf.get_decoder()

    def vision_tower(self, hf: nn.Module) -> nn.Module | None:
        return first_attr([getattr(hf, "model", None), hf], ("visual", "vision_tower", "vision_model"))

    def cache_kwarg(self, backbone: nn.Module) -> str:
        return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"

    def video_kwargs(self, num_frames: int, fps: float) -> dict[str, Any]:
        return {}  # the processor samples frames its own way; 1-D positions have no time axis

    def prompt_positions(self, hf, ids, token_types, vision) -> tuple[torch.Tensor, int]:
        Lp = ids.shape[0]
        return torch.arange(Lp, device=ids.device)[None], Lp  # [1, Lp]

    def expand_positions(self, full: torch.Tensor, rows: int) -> torch.Tensor:
        return full[0][None, :].expand(rows, full.shape[1])  # [r, L]

    def vision_features(self, hf: nn.Module, prompt: PromptInputs, kind: str) -> dict[str, torch.Tensor]:
        v = prompt.vision
        if kind == "image" and "pixel_values" in v:
            extra = {k: x for k, x in v.items() if k.startswith("image_")}
            return {kind: flat_features(hf.get_image_features(pixel_values=v["pixel_values"], **extra))}
        if kind == "video" and "pixel_values_videos" in v:
            return {kind: flat_features(hf.get_video_features(v["pixel_values_videos"], v.get("video_grid_thw")))}
        return {}

    def token_id(self, hf: nn.Module, kind: str) -> int | None:
        """The placeholder id of ``kind`` ("image" / "video") tokens in the prompt."""
        return first_attr([hf.config], (f"{kind}_token_id", f"{kind}_token_index"))

    def decoder_kwargs(self, hf, prompt, feats, rows, start, length) -> dict[str, Any]:
        return {}  # the features entered through the prompt's embeddings; nothing else reaches the decoder


VLM_FAMILIES.add("generic", GenericFamily)
