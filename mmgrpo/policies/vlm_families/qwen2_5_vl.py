"""Qwen2.5-VL (Bai et al. 2025): Qwen2-VL's layout, absolute-time video positions, boxes in resized pixels.

The model differs from Qwen2-VL inside transformers (window attention in the vision tower, ``second_per_grid_ts``
in ``get_rope_index``, which the processor fills from the video's fps); what this library sees differs only in the
class that loads it and in its grounding format: absolute pixels of the image as the processor resized it.
"""

from __future__ import annotations

from mmgrpo.core.extras import needs
from mmgrpo.policies.vlm_families import VLM_FAMILIES
from mmgrpo.policies.vlm_families.qwen2_vl import Qwen2VLFamily


class Qwen2_5_VLFamily(Qwen2VLFamily):
    """Qwen2.5-VL (M-RoPE with absolute video time; boxes in pixels of the resized image)."""

    name = "qwen2_5_vl"
    box_convention = "qwen2_5_vl"

    def model_class(self) -> type:
        with needs("vlm", "the qwen2_5_vl VLM family"):
            from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration


VLM_FAMILIES.add("qwen2_5_vl", Qwen2_5_VLFamily)
