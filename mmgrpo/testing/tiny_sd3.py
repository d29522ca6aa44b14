"""A tiny but complete SD3 checkpoint (transformer, VAE, CLIP-L/G, T5, tokenizers) built from config."""

from __future__ import annotations

import torch

from mmgrpo.policies.models.sd3 import SD3Adapter
from mmgrpo.testing.tokenizers import word_tokenizer


def tiny_sd3_components(seed: int = 0, with_vae: bool = True, with_t5: bool = True) -> dict:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok = word_tokenizer(max_length=12)
    clip_cfg = dict(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=12, projection_dim=16, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    te1 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg))
    latent_c = 4 if with_vae else 3
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=latent_c, out_channels=latent_c, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
        pooled_projection_dim=32, pos_embed_max_size=16,
    )  # fmt: skip
    out = {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "text_encoder": te1,
        "tokenizer": tok,
        "text_encoder_2": te2,
        "tokenizer_2": word_tokenizer(max_length=12),
        "text_encoder_3": None,
        "tokenizer_3": None,
        "vae": None,
    }
    if with_t5:
        t5 = T5Config(
            vocab_size=len(tok), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
            relative_attention_num_buckets=8,
        )  # fmt: skip
        out["text_encoder_3"] = T5EncoderModel(t5)
        out["tokenizer_3"] = word_tokenizer(max_length=16)
    if with_vae:  # shift_factor 0.0: what sd3.decode_latents did with None, and a value diffusers' pipeline decodes
        out["vae"] = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
            norm_num_groups=4, layers_per_block=1, sample_size=16, shift_factor=0.0,
        )  # fmt: skip
    for m in out.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    return out


def tiny_sd3_adapter(seed: int = 0, **kwargs):

    c = tiny_sd3_components(seed, **{k: kwargs.pop(k) for k in ("with_vae", "with_t5") if k in kwargs})
    return SD3Adapter(
        c["transformer"], c["scheduler"], [c["text_encoder"], c["text_encoder_2"], c["text_encoder_3"]],
        [c["tokenizer"], c["tokenizer_2"], c["tokenizer_3"]], c["vae"], max_sequence_length=16, **kwargs,
    )  # fmt: skip


def save_tiny_sd3(path, seed: int = 0, **kwargs) -> str:
    """Write a tiny SD3 checkpoint in the diffusers folder layout (model_index.json + sub-folders)."""
    from diffusers import StableDiffusion3Pipeline

    c = tiny_sd3_components(seed, **kwargs)
    pipe = StableDiffusion3Pipeline(**c)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return str(path)
