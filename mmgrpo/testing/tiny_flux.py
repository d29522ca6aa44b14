"""A tiny but complete FLUX.1 checkpoint (transformer, VAE, CLIP, T5, tokenizers) built from config.

``variant="dev"``: guidance-embedding transformer and FLUX.1-dev's dynamic-shifting scheduler;
``variant="schnell"``: no guidance embedding, fixed shift 1 (FLUX.1-schnell's scheduler config).
16x16 images: VAE x2 -> latents [4, 8, 8] -> 16 packed tokens of 16 channels.
"""

from __future__ import annotations

from typing import Literal

import torch

from mmgrpo.policies.models.flux import FluxAdapter
from mmgrpo.testing.tokenizers import word_tokenizer

TINY_SIZE = 16  # image height = width in pixels
TINY_T5_LENGTH = 16


def tiny_flux_components(seed: int = 0, variant: Literal["dev", "schnell"] = "dev") -> dict:
    """The keyword arguments of ``diffusers.FluxPipeline`` with tiny, seeded, real modules."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok = word_tokenizer(max_length=12)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=12, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    ))  # fmt: skip
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8,
    ))  # fmt: skip
    # in_channels = 4 latent channels x 2x2 packing; rope axes (4, 6, 6) sum to the head dim 16
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        guidance_embeds=variant == "dev", axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    # FLUX's VAE: no quant convs, latents normalised with both a scale and a shift
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, layers_per_block=1, sample_size=TINY_SIZE, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    if variant == "dev":  # black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        )  # fmt: skip
    else:  # FLUX.1-schnell: no dynamic shifting, shift 1
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    out = {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": clip,
        "tokenizer": tok,
        "text_encoder_2": t5,
        "tokenizer_2": word_tokenizer(max_length=TINY_T5_LENGTH),
        "transformer": transformer,
    }
    for m in out.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    return out


def tiny_flux_adapter(seed: int = 0, variant: Literal["dev", "schnell"] = "dev", **kwargs):
    """A :class:`~mmgrpo.policies.models.flux.FluxAdapter` over :func:`tiny_flux_components` (16x16 images)."""

    kwargs = {"height": TINY_SIZE, "width": TINY_SIZE, **kwargs}
    return FluxAdapter(**tiny_flux_components(seed, variant), **kwargs)


def save_tiny_flux(path, seed: int = 0, variant: Literal["dev", "schnell"] = "dev") -> str:
    """Write a tiny FLUX checkpoint in the diffusers folder layout (``FluxPipeline.save_pretrained``)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**tiny_flux_components(seed, variant))
    pipe.save_pretrained(str(path), safe_serialization=True)
    return str(path)
