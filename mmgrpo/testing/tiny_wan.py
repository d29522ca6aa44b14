"""A tiny but complete Wan checkpoint (transformer(s), Wan VAE, UMT5, tokenizer; CLIP vision for I2V) from config.

Videos are 5 frames of 32x32 pixels; latents [4, 2, 4, 4] (VAE: 4x temporal, 8x spatial compression; z_dim 4
with non-trivial latents_mean/std so the normalisation is exercised). Like the real checkpoints it ships a UniPC
scheduler with ``flow_shift``.
"""

from __future__ import annotations

import torch

from mmgrpo.policies.models.wan import WanAdapter, unipc_flow_sigmas
from mmgrpo.testing.tokenizers import word_tokenizer

SIZE = {"height": 32, "width": 32, "num_frames": 5}
MAX_SEQUENCE_LENGTH = 16


def tiny_wan_components(
    seed: int = 0, image_to_video: bool = False, clip: bool = True, two_experts: bool = False
) -> dict:
    """Components of ``WanPipeline`` (or ``WanImageToVideoPipeline`` with ``image_to_video``).

    ``clip``: Wan 2.1 I2V (CLIP image embeddings); False is Wan 2.2 A14B I2V (condition channels only).
    ``two_experts``: Wan 2.2 A14B (``transformer_2`` below the boundary timestep 0.6 * 1000).
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tok = word_tokenizer(max_length=MAX_SEQUENCE_LENGTH)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tok), d_model=16, d_kv=8, d_ff=16, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id,
    ))  # fmt: skip
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0],
    )  # fmt: skip
    use_clip = image_to_video and clip

    def transformer() -> torch.nn.Module:
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
            in_channels=2 * 4 + 4 if image_to_video else 4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16,
            num_layers=2, rope_max_seq_len=32, image_dim=8 if use_clip else None,
        )  # fmt: skip

    out = {
        "transformer": transformer(),
        "transformer_2": transformer() if two_experts else None,
        "boundary_ratio": 0.6 if two_experts else None,
        "scheduler": UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tok,
    }
    if image_to_video:
        out["image_encoder"], out["image_processor"] = None, None
        if use_clip:
            out["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(
                hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                patch_size=4,
            ))  # fmt: skip
            out["image_processor"] = CLIPImageProcessor(crop_size=16, size=16)
    for m in out.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    return out


def tiny_wan_adapter(seed: int = 0, **kwargs):
    """A WanAdapter over :func:`tiny_wan_components` (same seed -> same weights as the pipeline's)."""

    model = {k: kwargs.pop(k) for k in ("image_to_video", "clip", "two_experts") if k in kwargs}
    c = tiny_wan_components(seed, **model)
    kwargs = {**SIZE, "max_sequence_length": MAX_SEQUENCE_LENGTH, **kwargs}
    return WanAdapter(
        c["transformer"], c["scheduler"], c["vae"], c["text_encoder"], c["tokenizer"], c.get("image_encoder"),
        c.get("image_processor"), c["transformer_2"], c["boundary_ratio"], **kwargs,
    )  # fmt: skip


def save_tiny_wan(path, seed: int = 0, **kwargs) -> str:
    """Write a tiny Wan checkpoint in the diffusers folder layout (model_index.json + sub-folders)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    c = tiny_wan_components(seed, **kwargs)
    pipe = (WanImageToVideoPipeline if "image_encoder" in c else WanPipeline)(**c)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def euler_on_unipc_grid(shift: float = 3.0):
    """A ``FlowMatchEulerDiscreteScheduler(shift=shift)`` whose ``set_timesteps(N)`` steps on the UniPC flow grid
    of the checkpoints (:func:`~mmgrpo.policies.models.wan.unipc_flow_sigmas`, the grid the adapter's schedule
    uses): diffusers' Wan pipelines pass no sigmas, so this is the pipeline the adapter's Euler steps must equal."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    class UniPCGridEuler(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, **kwargs):
            if sigmas is None:
                sigmas = unipc_flow_sigmas(num_inference_steps, self.config.num_train_timesteps)
            super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, **kwargs)

    return UniPCGridEuler(shift=shift)
