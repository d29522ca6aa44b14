"""A tiny but complete SD 1.5-style or SDXL-style checkpoint (UNet, VAE, CLIP encoders, tokenizers, DDIM).

The scheduler is SD's (scaled-linear betas 0.00085..0.012, set_alpha_to_one false, steps_offset 1, no clipping);
``xl=True`` adds a second CLIP encoder with projection and a ``text_time`` UNet, as SDXL has. 16x16 images,
8x8x4 latents.
"""

from __future__ import annotations

import torch

from mmgrpo.policies.models.sd import SDAdapter
from mmgrpo.testing.tokenizers import word_tokenizer


def tiny_sd_components(seed: int = 0, xl: bool = False, prediction_type: str = "epsilon", **scheduler_kw) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = word_tokenizer(max_length=12)
    clip_cfg = dict(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=12, projection_dim=16, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    out = {"text_encoder": CLIPTextModel(CLIPTextConfig(**clip_cfg)), "tokenizer": tok}
    unet_kw: dict = {"cross_attention_dim": 16}
    if xl:
        out["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg))
        out["tokenizer_2"] = word_tokenizer(max_length=12)
        # SDXL: cross-attention on both encoders' states (16 + 16); added embedding = 6 time ids x 8 + pooled 16
        unet_kw = dict(cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=6 * 8 + 16, use_linear_projection=True)  # fmt: skip
    out["unet"] = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2, norm_num_groups=4, **unet_kw,
    )  # fmt: skip
    out["vae"] = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, layers_per_block=1, sample_size=16, scaling_factor=0.13025 if xl else 0.18215,
    )  # fmt: skip
    sched = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)  # fmt: skip
    out["scheduler"] = DDIMScheduler(**(sched | scheduler_kw))
    for m in out.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    return out


def tiny_sd_pipeline(seed: int = 0, xl: bool = False, **kwargs):
    """The diffusers pipeline (StableDiffusionPipeline or StableDiffusionXLPipeline) over the tiny components."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    c = tiny_sd_components(seed, xl=xl, **kwargs)
    if xl:
        return StableDiffusionXLPipeline(**c, add_watermarker=False)
    return StableDiffusionPipeline(**c, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_sd_adapter(seed: int = 0, xl: bool = False, prediction_type: str = "epsilon", **kwargs):

    sched_kw = {k: kwargs.pop(k) for k in ("timestep_spacing", "set_alpha_to_one") if k in kwargs}
    c = tiny_sd_components(seed, xl=xl, prediction_type=prediction_type, **sched_kw)
    return SDAdapter(
        c["unet"], c["scheduler"], c["text_encoder"], c["tokenizer"], c["vae"], c.get("text_encoder_2"),
        c.get("tokenizer_2"), **kwargs,
    )  # fmt: skip


def save_tiny_sd(path, seed: int = 0, xl: bool = False, **kwargs) -> str:
    """Write a tiny SD (or SDXL) checkpoint in the diffusers folder layout (model_index.json + sub-folders)."""
    tiny_sd_pipeline(seed, xl=xl, **kwargs).save_pretrained(str(path), safe_serialization=True)
    return str(path)
