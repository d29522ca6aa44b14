"""A tiny real open_clip CLIP (16-dim embeddings, 32 px images), built with a fixed seed and saved in open_clip's
formats, for the CLIP-backed rewards (clip_score, aesthetic, hpsv2, diversity, temporal_consistency, ...)."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
"""CLIP's pixel normalisation, [1, 3, 1, 1]: the model sees (x - MEAN) / STD for pixels x in [0, 1]"""
STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
"""open_clip model config of the tiny CLIP"""


def tiny_clip(quick_gelu: bool = False) -> torch.nn.Module:
    """The tiny CLIP in eval mode, weights drawn after ``torch.manual_seed(0)``."""
    torch.manual_seed(0)
    return open_clip.CLIP(**TINY_CLIP, quick_gelu=quick_gelu).eval()


def save_tiny_clip(directory: str | Path) -> tuple[Path, torch.nn.Module]:
    """Write the tiny CLIP to ``directory``: its config ``tiny.json`` and its weights as
    ``open_clip_model.safetensors`` and as a torch ``open_clip_pytorch_model.bin`` state dict. Returns the
    directory and the model."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "tiny.json").write_text(json.dumps(TINY_CLIP))
    net = tiny_clip()
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(sd, str(d / "open_clip_model.safetensors"))
    torch.save(sd, d / "open_clip_pytorch_model.bin")
    return d, net
