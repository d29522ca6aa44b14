"""Qwen2-VL (Wang et al. 2024): M-RoPE 3-D positions from ``get_rope_index``; boxes on a 0..1000 grid.

A prompt's positions are (temporal, height, width) triples: text tokens advance all three together, an image's
tokens take their grid coordinates (``get_rope_index``, computed once per prompt); completion tokens continue as text
from the prompt's largest position + 1. Also the base of Qwen2.5-VL and Qwen3-VL, which share this layout.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from mmgrpo.core.extras import needs
from mmgrpo.policies.vlm_families import VLM_FAMILIES
from mmgrpo.policies.vlm_families.generic import GenericFamily


class Qwen2VLFamily(GenericFamily):
    """Qwen2-VL (M-RoPE 3-D positions; boxes on the 0..1000 grid of the image)."""

    name = "qwen2_vl"
    box_convention = "qwen2_vl"

    def model_class(self) -> type:
        with needs("vlm", "the qwen2_vl VLM family"):
            from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    def video_kwargs(self, num_frames: int, fps: float) -> dict[str, Any]:
        # frames are already sampled (mmgrpo.policies.vlm_inputs.read_video); the fps sets the temporal positions
        return {"video_metadata": [{"fps": fps, "total_num_frames": num_frames}], "do_sample_frames": False}

    def prompt_positions(self, hf: nn.Module, ids, token_types, vision) -> tuple[torch.Tensor, int]:
        """[3, Lp] positions from the model's own ``get_rope_index`` (text-only prompts: 0..Lp-1 on all three)."""
        Lp = ids.shape[0]
        if "image_grid_thw" not in vision and "video_grid_thw" not in vision:
            return torch.arange(Lp, device=ids.device)[None].expand(3, -1), Lp
        fn = hf.model.get_rope_index
        kw = {"mm_token_type_ids": None if token_types is None else token_types[None], **vision}
        params = inspect.signature(fn).parameters
        kw = {k: v for k, v in kw.items() if k in params and k != "input_ids"}
        pos, _ = fn(ids[None], **kw)  # [3, 1, Lp]
        return pos[:, 0], int(pos.max()) + 1

    def expand_positions(self, full: torch.Tensor, rows: int) -> torch.Tensor:
        return full[:, None, :].expand(full.shape[0], rows, full.shape[1])  # [3, r, L]


VLM_FAMILIES.add("qwen2_vl", Qwen2VLFamily)
