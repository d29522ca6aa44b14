"""Qwen3-VL (Qwen team 2025): interleaved M-RoPE and deepstack visual features; boxes on a 0..1000 grid.

What changes against Qwen2-VL, all inside transformers' own classes except the deepstack injection:

- positions: the same (temporal, height, width) triples from the model's ``get_rope_index`` (videos are split into
  one grid per frame, each frame preceded by its timestamp as text); the decoder interleaves the three sections over
  the rotary frequencies (``mrope_interleaved``), which is the model's business, not ours;
- deepstack: the vision tower also returns features of some of its intermediate layers (``deepstack_visual_indexes``,
  one merger each), and the decoder adds the i-th of them to its hidden states at the vision tokens after its i-th
  layer. A forward over our own embeddings must therefore pass them itself: :meth:`Qwen3VLFamily.decoder_kwargs`
  gives ``visual_pos_masks [r, L]`` and ``deepstack_visual_embeds`` (one [r * n_vis, D] per layer), the prompt's
  features repeated for its r rows, exactly as ``Qwen3VLModel.forward`` builds them for one sequence;
- grounding: Qwen3-VL writes boxes relative to the image on a 0..1000 grid, i.e. the ``qwen2_vl`` convention of
  ``mmgrpo/rewards/boxes.py``.

Decoding steps after the prompt hold no vision token, so they get no deepstack arguments.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmgrpo.core.extras import needs
from mmgrpo.policies.vlm_families import VLM_FAMILIES
from mmgrpo.policies.vlm_families.generic import flat_features
from mmgrpo.policies.vlm_families.qwen2_vl import Qwen2VLFamily
from mmgrpo.policies.vlm_inputs import PromptInputs

KINDS = ("image", "video")


class Qwen3VLFamily(Qwen2VLFamily):
    """Qwen3-VL (interleaved M-RoPE, deepstack visual features; boxes on the 0..1000 grid)."""

    name = "qwen3_vl"
    box_convention = "qwen2_vl"  # relative coordinates on a 0..1000 grid, as Qwen2-VL

    def model_class(self) -> type:
        with needs("vlm", "the qwen3_vl VLM family"):
            from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    def video_kwargs(self, num_frames: int, fps: float) -> dict[str, Any]:
        # the processor writes each frame pair's timestamp "<t seconds>" from these indices at this fps
        kw = super().video_kwargs(num_frames, fps)
        kw["video_metadata"][0]["frames_indices"] = list(range(num_frames))
        return kw

    def vision_features(self, hf: nn.Module, prompt: PromptInputs, kind: str) -> dict[str, torch.Tensor]:
        """``{kind: [n_tok, D], kind + "_deepstack": [n_layers, n_tok, D]}`` from one vision pass."""
        v = prompt.vision
        if kind == "image" and "pixel_values" in v:
            out = hf.get_image_features(pixel_values=v["pixel_values"], image_grid_thw=v.get("image_grid_thw"))
        elif kind == "video" and "pixel_values_videos" in v:
            out = hf.get_video_features(v["pixel_values_videos"], v.get("video_grid_thw"))
        else:
            return {}
        deep = torch.stack([torch.cat(list(layer)) for layer in out.deepstack_features])  # per layer: split per media
        return {kind: flat_features(out), f"{kind}_deepstack": deep}

    def decoder_kwargs(self, hf, prompt, feats, rows, start, length) -> dict[str, Any]:
        """Deepstack arguments for slots [start, start + length): the vision tokens among them, for ``rows`` rows."""
        kinds = [k for k in KINDS if f"{k}_deepstack" in feats]
        Lp = prompt.input_ids.shape[0]
        if not kinds or start >= Lp:
            return {}
        ids = prompt.input_ids  # [Lp]
        is_kind = {k: ids == self.token_id(hf, k) for k in kinds}
        vis = torch.stack(list(is_kind.values())).any(0)  # [Lp]: every vision token of the prompt
        if len(kinds) == 1:
            deep = feats[f"{kinds[0]}_deepstack"]  # [n_layers, n_vis, D]
        else:  # images and a video: their features in the order their tokens appear, as Qwen3VLModel joins them
            first = feats[f"{kinds[0]}_deepstack"]
            deep = first.new_zeros(first.shape[0], int(vis.sum()), first.shape[-1])
            for k in kinds:
                deep[:, is_kind[k][vis]] = feats[f"{k}_deepstack"].to(deep.dtype)
        skipped = int(vis[:start].sum())  # vision tokens before the window are not in it
        window = torch.zeros(length, dtype=torch.bool, device=ids.device)
        inside = vis[start : start + length]
        window[: inside.shape[0]] = inside
        deep = deep[:, skipped : skipped + int(inside.sum())]
        return {
            "visual_pos_masks": window[None].expand(rows, -1),  # [r, L]
            "deepstack_visual_embeds": [layer.repeat(rows, 1) for layer in deep],  # row-major, as hidden[mask]
        }


VLM_FAMILIES.add("qwen3_vl", Qwen3VLFamily)
