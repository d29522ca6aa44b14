"""Recipe: pretrain the shipped tiny text-to-image flow model of the shapes world (``assets/shapes_t2i/``).

Rectified-flow / flow-matching pretraining as in SD3 (Esser et al., 2024, "Scaling Rectified Flow Transformers
for High-Resolution Image Synthesis"), shrunk to CPU size: an ``SD3Transformer2DModel`` conditioned on a
``CLIPTextModelWithProjection`` trained jointly from scratch, with a word-level tokenizer over the grammar of
:mod:`mmgrpo.data.shapes`, either in pixel space (``--vae-steps 0``: in/out channels 3) or, like SD3, in the latent
space of an ``AutoencoderKL`` that is trained first on rendered scenes (``--vae-steps N``: a tiny VAE, 32 px ->
8x8x4 latents normalised by its shift/scaling factors, then frozen). Every batch renders fresh random scenes of
TRAIN-split prompts; held-out prompts are only sampled for evaluation.

Conventions (the SD3 adapter uses exactly these; training and :func:`sample` follow them)::

    x0 in [-1, 1] (image = (x0 + 1) / 2)        x_t = (1 - sigma) x0 + sigma noise        v = noise - x0
    v = transformer(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=prompt_embeds,
                    pooled_projections=pooled, return_dict=False)[0]
    prompt_embeds = text_encoder(ids, output_hidden_states=True).hidden_states[-2]   # penultimate, as SD3
    pooled = text_encoder(...).text_embeds                                          # the projection
    ids = tokenizer(..., padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    sampling: sigmas = FlowMatchEulerDiscreteScheduler.set_timesteps(T).sigmas (ends with 0);
              x <- x + (sigma_next - sigma) v

The shipped model is deliberately mediocre (held-out ``shapes`` score in [0.2, 0.7]) and cheap, so that
GRPO with an SDE sampler can visibly improve it on two CPU cores. Run::

    python -m scripts.pretrain_shapes_t2i --out assets/shapes_t2i [--steps N] [--seed S] [--lr LR] ...

Calibration (held-out ``shapes`` at T=10, 1 thread of a shared 2-core machine; every run learns colour ~perfectly;
scores of one run move by +-0.05 between checkpoints). Beware: fragmented samples score as well as clean ones,
because any stray fragment of the right colour and shape satisfies a "present" atom, so look at samples.png too.

* 32 px, patch 4, 6 blocks x 128 (3.5M): logit-normal sigmas 1200 x 64 -> 0.29, 2000 x 32 -> 0.30 (+EMA 0.998);
  its x0-prediction at sigma = 1 was noise, not the blurry mean: logit-normal almost never trains sigma ~ 1.
  Uniform sigmas fixed that: 2000 x 32 -> 0.27 (0.41 at step 1000). With the x0 weighting: 1000 x 32 -> 0.39 and
  kind-balanced prompts 1500 x 32 -> 0.36, both as 4x4-pixel confetti; 1500 x 32 -> 0.30, constant lr -> 0.29;
  3000 x 32 -> 0.30 as coherent blobs with the right object count in 59% of samples (shipped: the fairest start
  for RL; shapes and positions are what it gets wrong).
* patch 2 (3 heads x 32, 4 blocks): 1.6x the time per step and 0.16-0.24 at step 500; 4 blocks x 192: 0.31.
* 2 threads instead of 1: 5-10x slower per step while other jobs share the two cores.
* none of the pixel-space models learned SHAPES: asked for a circle they drew a blob the verifier read as a circle
  15% of the time (square 50%, triangle 34%), so RL had nothing to sharpen (docs/results.md).
* latent space (``--vae-steps 1500 --patch-size 1 --loss-weighting v``): the VAE (242k parameters, 1500 x 64,
  8.6 min alone) reconstructs held-out scenes so that the verifier scores them 1.000; the transformer (same 6 x 128,
  64 tokens of 8x8x4 latents, 0.35 s per step instead of 0.53) draws crisp circles, squares and triangles:
  3000 x 32 -> 0.54 (0.67 with guidance 2), the 2000-step snapshot of that run 0.36, and its mistakes are mixed
  colours, swapped shapes and relations -- what RL can fix. v weighting: the latents carry no pixel noise to waste
  capacity on. Shipped: 2000 steps of a 3000-step cosine (``--steps 2000 --lr-horizon 3000``), which RL moved the
  most; that command alone takes 22.9 min (VAE 8.2) and gives 0.32 (the shipped weights, from a first run of the
  same recipe: 0.365); a full 2000-step cosine gave 0.32 too but RL barely moved it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from PIL import Image, ImageDraw
from tqdm import tqdm
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from mmgrpo.core.ema import EMA
from mmgrpo.core.errors import UserError
from mmgrpo.data.shapes import KINDS, all_prompts, parse_prompt, split_prompts
from mmgrpo.policies.models.sd3 import decode_latents
from mmgrpo.rewards.shapes import score
from mmgrpo.train.components import EvalResult
from scripts.shapes_scenes import cosine_lr, kind_balanced, num_params, train_batch
from scripts.shapes_vae import to_latents, train_vae

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
"""ids 0..3; EOS is not 2, so CLIP pools at the first EOS (transformers treats eos_token_id == 2 as legacy)"""


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run (the CLI exposes each field as ``--field-name``)."""

    resolution: int = 32
    """image side in pixels (the transformer's sample_size: pixel space, no VAE)"""
    patch_size: int = 4
    """cells per patch side: pixels in pixel space (32 px / 4 = an 8x8 token grid), latent cells with a VAE"""
    vae_steps: int = 0
    """> 0: first train a tiny AutoencoderKL on rendered scenes for this many steps (batch vae_batch_size), then
    train the transformer in its latent space, as SD3 does; 0: pixel space, no VAE"""
    vae_width: int = 16
    """channels of the VAE's first block (the deeper blocks have twice as many); a multiple of 8"""
    vae_downsample: int = 4
    """pixels per latent cell side, a power of 2: 32 px / 4 = an 8x8 latent grid"""
    vae_latent_channels: int = 4
    vae_kl_weight: float = 1e-3
    """weight of the KL term (per latent element) against the L1 + L2 reconstruction error (per pixel)"""
    vae_batch_size: int = 64
    vae_lr: float = 1e-3
    num_layers: int = 6
    """joint (MM-DiT) transformer blocks"""
    num_heads: int = 4
    head_dim: int = 32
    """width = num_heads * head_dim"""
    text_hidden: int = 64
    """text encoder width (= the transformer's joint_attention_dim)"""
    text_layers: int = 3
    """text encoder layers; the transformer reads the penultimate one, the pooled projection the last"""
    text_heads: int = 2
    text_ffn: int = 256
    projection_dim: int = 64
    """pooled text projection (= the transformer's pooled_projection_dim)"""
    max_length: int = 16
    """tokenizer model_max_length: the longest grammar prompt is 8 words + BOS + EOS"""
    shift: float = 1.0
    """scheduler sigma shift (SD3 uses 3.0 for 1024 px latents; small pixel images need none)"""
    steps: int = 3000
    """3000 x 32: coherent blobs with the right object count; 1000-1500 steps scored as well but as fragments"""
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    """linear warmup steps, then cosine decay to lr_final_fraction * lr"""
    lr_final_fraction: float = 0.1
    lr_horizon: int = 0
    """length of the cosine in steps (0: = steps); > steps stops training part-way down the decay, at a higher lr
    than the end of a full schedule (the shipped model: 2000 steps of a 3000-step schedule)"""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    """> 0: keep an exponential moving average of the weights and ship/evaluate it (0 disables)"""
    sigma_sampling: str = "uniform"
    """training noise levels: uniform or logit_normal (SD3's default, which puts 2% of samples above sigma 0.88:
    the tiny model then never learned v at sigma ~1, where sampling starts, and its x0-prediction there was noise)"""
    prompt_sampling: str = "uniform"
    """uniform over train prompts (69% relation, like the held-out split) or kind (each kind 20%)"""
    loss_weighting: str = "x0"
    """per-sample weight of the v-loss: x0 (sigma^2: the x0-prediction error) or v (1, SD3)"""
    cfg_dropout: float = 0.1
    """fraction of training captions replaced by "" so classifier-free guidance is possible"""
    seed: int = 0
    split_seed: int = 0
    """seed of mmgrpo.data.shapes.split_prompts (the held-out split every recipe uses)"""
    heldout_fraction: float = 0.2
    eval_num_steps: int = 10
    """T of the held-out evaluation (the T recommended for RL); guidance 1 (no CFG)"""
    eval_samples_per_prompt: int = 2
    eval_every: int = 0
    """evaluate on the held-out split every this many steps during training (0: only at the end)"""
    threads: int = 1
    """torch.set_num_threads; 1 because on a shared 2-core machine 2 threads ran 5-8x SLOWER per step (spinning
    OpenMP workers descheduled by other processes: 10.6 s vs 1.3 s per 64-row step, measured); 2 on an idle one"""

    @property
    def latent_size(self) -> int:
        """side of the transformer's input grid: resolution / vae_downsample with a VAE, else resolution"""
        return self.resolution // self.vae_downsample if self.vae_steps else self.resolution

    @property
    def latent_channels(self) -> int:
        return self.vae_latent_channels if self.vae_steps else 3

    def __post_init__(self) -> None:
        d = self.vae_downsample
        if self.vae_steps < 0 or d < 2 or d & (d - 1) or self.vae_width < 8 or self.vae_width % 8:
            raise UserError(
                f"vae_steps={self.vae_steps}, vae_downsample={d}, vae_width={self.vae_width}: use vae_steps >= 0 "
                "(0 = pixel space), vae_downsample a power of 2 >= 2 (e.g. 4) and vae_width a multiple of 8 (e.g. 16)"
            )
        cells = "latent cells" if self.vae_steps else "pixels"
        if self.resolution % (d if self.vae_steps else 1) or self.latent_size % self.patch_size:
            raise UserError(
                f"resolution={self.resolution} is {self.latent_size} {cells} a side, not a multiple of "
                f"patch_size={self.patch_size}; e.g. patch_size 4 in pixel space, 1 or 2 with a VAE"
            )
        if self.resolution < 32:
            raise UserError(f"resolution={self.resolution} is below the shapes world's minimum; use 32 or 48")
        if self.text_layers < 2:
            raise UserError(f"text_layers={self.text_layers}: the transformer reads the penultimate layer; use >= 2")
        if self.max_length < 10:
            raise UserError(f"max_length={self.max_length} cannot hold the longest prompt (8 words + 2); use 16")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise UserError(f"cfg_dropout={self.cfg_dropout} must be in [0, 1), e.g. 0.1")
        if self.sigma_sampling not in SIGMA_SAMPLERS:
            raise UserError(
                f"sigma_sampling={self.sigma_sampling!r} is unknown; use one of {', '.join(SIGMA_SAMPLERS)}"
            )
        if self.prompt_sampling not in ("uniform", "kind"):
            raise UserError(f"prompt_sampling={self.prompt_sampling!r} is unknown; use uniform or kind")
        if self.loss_weighting not in LOSS_WEIGHTS:
            raise UserError(f"loss_weighting={self.loss_weighting!r} is unknown; use one of {', '.join(LOSS_WEIGHTS)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"ema_decay={self.ema_decay} must be in [0, 1), e.g. 0.998 (0 disables the EMA)")
        if self.lr_horizon and self.lr_horizon < self.steps:
            raise UserError(f"lr_horizon={self.lr_horizon} < steps={self.steps}; use 0 (= steps) or >= steps")
        if self.eval_samples_per_prompt < 1 or self.steps < 0 or self.batch_size < 1:
            raise UserError("eval_samples_per_prompt and batch_size must be >= 1 and steps >= 0")


# ------------------------------------------------------------------------------------------------ models
def grammar_words() -> list[str]:
    """Every word of every grammar prompt, in first-seen order (the tokenizer's vocabulary after specials)."""
    return list(dict.fromkeys(w for p in all_prompts() for w in p.split()))


def build_tokenizer(max_length: int = 16) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (``tokenizers`` library): lowercase, split on whitespace/punctuation, [BOS] .. [EOS]."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *grammar_words()])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = vocab["[BOS]"], vocab["[EOS]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", bos), ("[EOS]", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_max_length=max_length,
        padding_side="right",
    )


def build_models(config: PretrainConfig) -> tuple[SD3Transformer2DModel, CLIPTextModelWithProjection, object, object]:
    """(transformer, text_encoder, tokenizer, scheduler), freshly initialised from ``config`` (seeded by the caller).

    The transformer gets DiT's adaLN-Zero init (Peebles & Xie, 2023): every block's modulation and the output
    projection start at zero, so the untrained model predicts v = 0 and each block starts as the identity.
    """
    tokenizer = build_tokenizer(config.max_length)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden,
        intermediate_size=config.text_ffn,
        projection_dim=config.projection_dim,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    text_encoder = CLIPTextModelWithProjection(text_config)
    width = config.num_heads * config.head_dim
    transformer = SD3Transformer2DModel(
        sample_size=config.latent_size,
        patch_size=config.patch_size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        num_layers=config.num_layers,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.text_hidden,
        caption_projection_dim=width,
        pooled_projection_dim=config.projection_dim,
        pos_embed_max_size=config.latent_size // config.patch_size,
    )
    _adaln_zero_(transformer)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.shift)
    return transformer, text_encoder, tokenizer, scheduler


def _adaln_zero_(transformer: SD3Transformer2DModel) -> None:
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and (
            name.endswith("norm1.linear") or name.endswith("norm1_context.linear")
        ):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    torch.nn.init.zeros_(transformer.proj_out.weight)
    torch.nn.init.zeros_(transformer.proj_out.bias)


# ---------------------------------------------------------------------------------------------- the maths
def encode_prompts(text_encoder, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's CLIP conditioning: (penultimate hidden states [N, L, D], pooled projection [N, P])."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids  # [N, L]
    out = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds


def predict_velocity(transformer, x_t, sigma, prompt_embeds, pooled) -> torch.Tensor:
    """v [N, 3, H, W] for x_t [N, 3, H, W] at noise level sigma [N] (the transformer's timestep is sigma * 1000)."""
    return transformer(
        hidden_states=x_t,
        timestep=sigma * 1000,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled,
        return_dict=False,
    )[0]


def flow_matching_loss(transformer, x0, noise, sigma, prompt_embeds, pooled, weight=None) -> torch.Tensor:
    """Rectified-flow loss (SD3 eq. 2 with the v-target): mean_n w_n || v_theta(x_t, sigma_n) - (noise - x0) ||^2.

    x0, noise [N, 3, H, W]; sigma [N] in [0, 1]; x_t = (1 - sigma) x0 + sigma noise; weight [N] (None: all 1).
    """
    s = sigma.view(-1, 1, 1, 1)  # [N, 1, 1, 1]
    x_t = (1 - s) * x0 + s * noise
    v = predict_velocity(transformer, x_t, sigma, prompt_embeds, pooled)
    per_row = (v.float() - (noise - x0).float()).square().mean(dim=(1, 2, 3))  # [N]
    return per_row.mean() if weight is None else (weight * per_row).mean()


LOSS_WEIGHTS = {
    "v": lambda sigma: torch.ones_like(sigma),
    # x0 - x0_hat = sigma (v_hat - v): sigma^2 turns the v-loss into the x0-loss, so capacity is not spent on
    # reproducing the noise at low sigma, where the image is already there (pixel space, 48-dim patches)
    "x0": lambda sigma: sigma.square(),
}


def logit_normal_sigmas(n: int, generator: torch.Generator) -> torch.Tensor:
    """Training noise levels [n]: logit-normal(0, 1), SD3's default ("rf/lognorm(0.00, 1.00)")."""
    return torch.sigmoid(torch.randn(n, generator=generator))


def uniform_sigmas(n: int, generator: torch.Generator) -> torch.Tensor:
    """Training noise levels [n]: uniform on [0, 1] (rectified flow's original choice)."""
    return torch.rand(n, generator=generator)


SIGMA_SAMPLERS = {"logit_normal": logit_normal_sigmas, "uniform": uniform_sigmas}


def initial_noise(seeds: list[int], resolution: int, channels: int = 3) -> torch.Tensor:
    """x_1 [N, C, H, W]: row n is drawn from its own generator seeded by seeds[n] (batch-size independent)."""
    shape = (channels, resolution, resolution)
    return torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample(
    transformer,
    text_encoder,
    tokenizer,
    prompts: list[str],
    seeds: list[int],
    num_steps: int,
    guidance: float = 1.0,
    scheduler: FlowMatchEulerDiscreteScheduler | None = None,
    vae: AutoencoderKL | None = None,
) -> torch.Tensor:
    """Euler ODE samples of the flow, Float[N, 3, H, W] in [0, 1], one per (prompt, seed) row (decoded by ``vae``
    when the transformer works in its latent space).

    sigmas come from ``scheduler.set_timesteps(num_steps)`` (default: a fresh FlowMatchEulerDiscreteScheduler,
    shift 1, the shipped model's); guidance != 1 is classifier-free guidance against the empty prompt:
    v = v_uncond + guidance * (v_cond - v_uncond).
    """
    if len(prompts) != len(seeds):
        raise UserError(f"sample: {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
    if num_steps < 1:
        raise UserError(f"sample: num_steps={num_steps} must be >= 1, e.g. 10")
    scheduler = scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(num_steps)
    sigmas = scheduler.sigmas.float().tolist()  # T + 1, ends with 0
    embeds, pooled = encode_prompts(text_encoder, tokenizer, prompts)  # [N, L, D], [N, P]
    if guidance != 1.0:
        e_u, p_u = encode_prompts(text_encoder, tokenizer, [""] * len(prompts))
        embeds, pooled = torch.cat([e_u, embeds]), torch.cat([p_u, pooled])  # [2N, ...]
    device, dtype = next(transformer.parameters()).device, next(transformer.parameters()).dtype
    c = transformer.config
    x = initial_noise(seeds, c.sample_size, c.in_channels).to(device=device, dtype=dtype)  # [N, C, h, w]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x_in = x if guidance == 1.0 else torch.cat([x, x])
        t = torch.full((x_in.shape[0],), sigma, device=device, dtype=dtype)
        v = predict_velocity(transformer, x_in, t, embeds.to(dtype), pooled.to(dtype))
        if guidance != 1.0:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance * (v_c - v_u)
        x = x + (sigma_next - sigma) * v
    return decode_latents(vae, x)


# ---------------------------------------------------------------------------------------------- schedule
def lr_at(step: int, config: PretrainConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from lr down to lr * lr_final_fraction over ``lr_horizon``
    (0: ``steps``) steps: :func:`~scripts.shapes_scenes.cosine_lr` with the config's fields."""
    return cosine_lr(
        step,
        config.lr,
        config.steps,
        warmup=config.warmup,
        final_fraction=config.lr_final_fraction,
        horizon=config.lr_horizon,
    )


# ---------------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(
    transformer,
    text_encoder,
    tokenizer,
    prompts: list[str],
    num_steps: int = 10,
    samples_per_prompt: int = 2,
    seed: int = 0,
    guidance: float = 1.0,
    scheduler: FlowMatchEulerDiscreteScheduler | None = None,
    batch_size: int = 64,
    vae: AutoencoderKL | None = None,
) -> EvalResult:
    """Held-out verifier scores: mean ``shapes`` (fraction of atoms) and ``shapes_strict`` over all samples, and
    per prompt kind (``shapes/relation``, ``shapes_strict/relation``, ...). Sample j of prompt i is seeded
    ``seed * 1_000_003 + i * samples_per_prompt + j`` (fixed, batch-size independent).
    Returns EvalResult(metrics, images [n, 3, H, W], captions [n]) with n = len(prompts) * samples_per_prompt.
    """
    rows = [
        (p, seed * 1_000_003 + i * samples_per_prompt + j)
        for i, p in enumerate(prompts)
        for j in range(samples_per_prompt)
    ]
    images, frac, strict = [], [], []
    for k in range(0, len(rows), batch_size):
        chunk = rows[k : k + batch_size]
        imgs = sample(
            transformer,
            text_encoder,
            tokenizer,
            [p for p, _ in chunk],
            [s for _, s in chunk],
            num_steps,
            guidance,
            scheduler,
            vae,
        )  # [n, 3, H, W]
        for (p, _), img in zip(chunk, imgs):
            f, ok, _ = score(p, img)
            frac.append(f)
            strict.append(float(ok))
        images.append(imgs)
    kinds = [parse_prompt(p).kind for p, _ in rows]
    metrics = {"shapes": float(np.mean(frac)), "shapes_strict": float(np.mean(strict)), "num_images": len(rows)}
    for kind in KINDS:
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if idx:
            metrics[f"shapes/{kind}"] = float(np.mean([frac[i] for i in idx]))
            metrics[f"shapes_strict/{kind}"] = float(np.mean([strict[i] for i in idx]))
            metrics[f"n/{kind}"] = len(idx)
    return EvalResult(metrics=metrics, images=torch.cat(images), captions=[p for p, _ in rows])


def save_grid(images: torch.Tensor, captions: list[str], path: str | Path, ncol: int = 8, scale: int = 4) -> None:
    """A PNG grid of images [n, 3, H, W] in [0, 1], each upscaled ``scale`` x (nearest) with its caption below."""
    n, _, h, w = images.shape
    tw, th, cap = w * scale, h * scale, 24
    nrow = math.ceil(n / ncol)
    grid = Image.new("RGB", (ncol * tw, nrow * (th + cap)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()  # [n, H, W, 3]
    for i in range(n):
        r, c = divmod(i, ncol)
        tile = Image.fromarray(arr[i]).resize((tw, th), Image.NEAREST)
        grid.paste(tile, (c * tw, r * (th + cap)))
        words = captions[i].split()
        for line, text in enumerate((" ".join(words[:4]), " ".join(words[4:]))):
            draw.text((c * tw + 2, r * (th + cap) + th + 1 + 11 * line), text, fill=(0, 0, 0))
    grid.save(path)


def grid_prompts(heldout: list[str], per_kind: int = 4) -> list[str]:
    """Up to ``per_kind`` held-out prompts of each kind, in kind order (the before-RL sample grid)."""
    return [p for kind in KINDS for p in [q for q in heldout if parse_prompt(q).kind == kind][:per_kind]]


# --------------------------------------------------------------------------------------------- save/load
def save_folder(out: str | Path, transformer, text_encoder, tokenizer, scheduler, vae=None) -> None:
    """Write the diffusers-style folder (safetensors only) that ``StableDiffusion3Pipeline.from_pretrained(out)`` and
    the SD3 adapter load.

    The model has one CLIP encoder and no T5 block; diffusers' SD3 pipeline always calls a second CLIP encoder and
    requires a T5 one, so the folder carries placeholders (all weights zero, so their outputs are exactly zero) with
    copies of the tokenizer: a CLIP of width :data:`PLACEHOLDER_WIDTH`, matched by zero input columns of the
    transformer's pooled projection, and a one-layer T5 of the transformer's joint width, whose tokens are the zeros
    diffusers itself uses without T5. None changes an output; :func:`load_models` strips them again. The model was
    trained with no T5 tokens: ``pipe(prompt, max_sequence_length=0)`` needs ``text_encoder_3=None,
    tokenizer_3=None`` (a tokenizer ignores ``max_length=0``), as the SD3 adapter does by itself.
    """
    import diffusers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    widen_pooled(transformer, text_encoder.config.projection_dim + PLACEHOLDER_WIDTH).save_pretrained(
        out / "transformer", safe_serialization=True
    )
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    placeholder_clip(text_encoder.config).save_pretrained(out / "text_encoder_2", safe_serialization=True)
    joint = transformer.config.joint_attention_dim
    placeholder_t5(tokenizer, joint).save_pretrained(out / "text_encoder_3", safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer.save_pretrained(out / sub)
    scheduler.save_pretrained(out / "scheduler")
    if vae is not None:
        vae.save_pretrained(out / "vae", safe_serialization=True)
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"],
        "tokenizer_3": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"] if vae is not None else [None, None],
    }  # components SD3 has and this model lacks are null, as diffusers' save_pretrained writes them
    index.update({k: [None, None] for k in NULL_COMPONENTS})
    index = dict(sorted(index.items()))
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


NULL_COMPONENTS = ("feature_extractor", "image_encoder")
PLACEHOLDER_WIDTH = 8  # the placeholder CLIP's width (the smallest that is a valid CLIP model is 1; 8 reads better)


def placeholder_clip(like: CLIPTextConfig) -> CLIPTextModelWithProjection:
    """A one-layer CLIP text model with the vocabulary and length of ``like`` and every weight zero: its penultimate
    hidden states (the embeddings) and its pooled projection are exactly zero for any prompt."""
    config = CLIPTextConfig(
        vocab_size=like.vocab_size,
        hidden_size=PLACEHOLDER_WIDTH,
        intermediate_size=PLACEHOLDER_WIDTH,
        projection_dim=PLACEHOLDER_WIDTH,
        num_hidden_layers=1,
        num_attention_heads=1,
        max_position_embeddings=like.max_position_embeddings,
        pad_token_id=like.pad_token_id,
        bos_token_id=like.bos_token_id,
        eos_token_id=like.eos_token_id,
    )
    model = CLIPTextModelWithProjection(config)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    return model


def placeholder_t5(tokenizer, width: int) -> T5EncoderModel:
    """A one-layer T5 encoder over ``tokenizer``'s vocabulary with output width ``width`` (the transformer's
    ``joint_attention_dim``) and every weight zero: its last hidden state is exactly zero for any prompt (zero
    embeddings, zero attention and feed-forward outputs, and a final RMS norm with weight 0), as diffusers' T5 block
    is when an SD3 pipeline has no T5."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=8,
        d_ff=8,
        num_layers=1,
        num_heads=1,
        feed_forward_proj="relu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    model = T5EncoderModel(config)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    return model


def widen_pooled(transformer: SD3Transformer2DModel, width: int) -> SD3Transformer2DModel:
    """A copy of ``transformer`` whose pooled projection takes ``width`` inputs: the extra input columns are zero,
    so the placeholder encoder's zeros add nothing. ``width`` equal to today's returns ``transformer`` itself."""
    key = "time_text_embed.text_embedder.linear_1.weight"
    old = transformer.config.pooled_projection_dim
    if width == old:
        return transformer
    state = transformer.state_dict()
    w = state[key]
    state[key] = torch.cat([w[:, : min(old, width)], w.new_zeros(w.shape[0], max(width - old, 0))], dim=1)
    if width < old and w[:, width:].count_nonzero():
        raise UserError(f"cannot narrow the pooled projection to {width}: its columns {width}.. are not zero")
    resized = SD3Transformer2DModel.from_config({**transformer.config, "pooled_projection_dim": width})
    resized.load_state_dict(state)
    return resized.train(transformer.training)


def load_models(path: str | Path):
    """(transformer, text_encoder, tokenizer, scheduler, vae or None) from a folder written by :func:`save_folder`,
    in eval mode, without the placeholder: the pooled projection takes the text encoder's width again."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise UserError(f"{path} is not a model folder (no model_index.json); pass e.g. assets/shapes_t2i")
    text_encoder = CLIPTextModelWithProjection.from_pretrained(path / "text_encoder").eval()
    transformer = SD3Transformer2DModel.from_pretrained(path / "transformer")
    transformer = widen_pooled(transformer, text_encoder.config.projection_dim).eval()
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")
    vae = AutoencoderKL.from_pretrained(path / "vae").eval() if (path / "vae").is_dir() else None
    return transformer, text_encoder, tokenizer, scheduler, vae


# ----------------------------------------------------------------------------------------------- pretrain
def train(config: PretrainConfig, progress: bool = True, log=tqdm.write):
    """Train from scratch; returns (transformer, text_encoder, tokenizer, scheduler, vae or None, history [dict
    per log]). With ``vae_steps`` > 0 the VAE is trained first (:func:`~scripts.shapes_vae.train_vae`, its stats
    the first history row) and frozen; the transformer then learns its normalised latents.

    With ``ema_decay`` > 0 the returned models hold the EMA weights; ``eval_every`` logs both (``ema/...``).
    """
    vae, history = None, []
    if config.vae_steps:
        vae, stats = train_vae(config, progress, log)
        history.append({"step": 0, "vae": stats})
    torch.manual_seed(config.seed)
    transformer, text_encoder, tokenizer, scheduler = build_models(config)
    train_prompts, heldout = split_prompts(config.split_seed, config.heldout_fraction)
    params = [*transformer.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99))
    ema = EMA(params, config.ema_decay) if config.ema_decay > 0 else None
    rng = np.random.default_rng([config.seed, 1])  # scenes and caption dropout
    gen = torch.Generator().manual_seed(config.seed + 2)  # noise and sigmas
    draw_sigmas = SIGMA_SAMPLERS[config.sigma_sampling]
    probs = kind_balanced(train_prompts) if config.prompt_sampling == "kind" else None

    def held_out_metrics(prefix: str) -> dict:
        transformer.eval(), text_encoder.eval()
        res = evaluate(transformer, text_encoder, tokenizer, heldout, config.eval_num_steps,
                       config.eval_samples_per_prompt, scheduler=scheduler, vae=vae)  # fmt: skip
        return {f"{prefix}{k}": v for k, v in res.metrics.items() if not k.startswith("n/")}

    ema_loss = None
    bar = tqdm(range(config.steps), disable=not progress, desc="pretrain shapes_t2i")
    for step in bar:
        captions, x0 = train_batch(train_prompts, config.batch_size, config.resolution, config.cfg_dropout, rng, probs)
        if vae is not None:
            with torch.no_grad():
                x0 = to_latents(vae, x0, gen)  # [N, C, h, w]
        noise = torch.randn(x0.shape, generator=gen)  # [N, C, h, w]
        sigma = draw_sigmas(x0.shape[0], gen)  # [N]
        transformer.train(), text_encoder.train()
        embeds, pooled = encode_prompts(text_encoder, tokenizer, captions)
        loss = flow_matching_loss(
            transformer, x0, noise, sigma, embeds, pooled, LOSS_WEIGHTS[config.loss_weighting](sigma)
        )
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        if ema is not None:
            ema.update()
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema_loss:.4f}")
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            row = {"step": step + 1, "loss": ema_loss, **held_out_metrics("")}
            if ema is not None:
                with ema.swapped():
                    row.update(held_out_metrics("ema/"))
            history.append(row)
            log(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    if ema is not None:  # ship the average
        with torch.no_grad():
            for shadow, p in zip(ema.shadow, params):
                p.copy_(shadow)
    transformer.eval(), text_encoder.eval()
    history.append({"step": config.steps, "loss": ema_loss})
    return transformer, text_encoder, tokenizer, scheduler, vae, history


def pretrain(config: PretrainConfig, out: str | Path | None, progress: bool = True, command: str = "", log=tqdm.write):
    """Train, evaluate on the held-out split (no CFG, T = eval_num_steps), write ``out`` (if given) with a
    README and the before-RL grid ``samples.png``.

    Returns (summary dict, also ``summary.json`` in ``out``; (transformer, text_encoder, tokenizer, scheduler,
    vae or None)).
    """
    torch.set_num_threads(config.threads)
    t0 = time.time()
    transformer, text_encoder, tokenizer, scheduler, vae, history = train(config, progress, log)
    train_minutes = (time.time() - t0) / 60
    _, heldout = split_prompts(config.split_seed, config.heldout_fraction)
    res = evaluate(
        transformer,
        text_encoder,
        tokenizer,
        heldout,
        config.eval_num_steps,
        config.eval_samples_per_prompt,
        scheduler=scheduler,
        vae=vae,
    )
    params = {"transformer": num_params(transformer), "text_encoder": num_params(text_encoder)}
    summary = {
        "config": dataclasses.asdict(config),
        "params": {**params, **({"vae": num_params(vae)} if vae is not None else {})},
        "train_minutes": round(train_minutes, 2),
        "final_loss": history[-1]["loss"],
        "heldout": res.metrics,
        "history": history,
        "speed": measure_speed(transformer, text_encoder, tokenizer, scheduler, config.eval_num_steps, vae=vae),
    }
    if vae is not None:
        summary["vae"] = history[0]["vae"]
    if out is not None:
        save_folder(out, transformer, text_encoder, tokenizer, scheduler, vae)
        grid = [p for p in grid_prompts(heldout) for _ in range(2)]  # two seeds per prompt, side by side
        imgs = sample(
            transformer,
            text_encoder,
            tokenizer,
            grid,
            list(range(len(grid))),
            config.eval_num_steps,
            scheduler=scheduler,
            vae=vae,
        )
        save_grid(imgs, grid, Path(out) / "samples.png")
        (Path(out) / "README.md").write_text(readme(summary, command))
        (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary, (transformer, text_encoder, tokenizer, scheduler, vae)


@torch.no_grad()
def _time(fn, repeats: int = 3) -> float:
    fn()
    t0 = time.time()
    for _ in range(repeats):
        fn()
    return (time.time() - t0) / repeats


def measure_speed(transformer, text_encoder, tokenizer, scheduler, num_steps: int, n: int = 64, vae=None) -> dict:
    """Seconds per n-image rollout at T=num_steps (no grad, decoding included) and per forward+backward of an
    n-row batch."""
    train_prompts, _ = split_prompts()
    prompts = [train_prompts[i % len(train_prompts)] for i in range(n)]
    rollout = _time(
        lambda: sample(
            transformer, text_encoder, tokenizer, prompts, list(range(n)), num_steps, scheduler=scheduler, vae=vae
        ),
        repeats=2,
    )
    embeds, pooled = encode_prompts(text_encoder, tokenizer, prompts)
    c = transformer.config
    x, sigma = torch.randn(n, c.in_channels, c.sample_size, c.sample_size), torch.rand(n)

    def fwd_bwd():
        with torch.enable_grad():
            predict_velocity(transformer, x, sigma, embeds.detach(), pooled.detach()).square().mean().backward()

    fb = _time(fwd_bwd)
    transformer.zero_grad(set_to_none=True)
    return {
        f"rollout_{n}x{num_steps}_s": round(rollout, 3),
        f"fwd_bwd_{n}_s": round(fb, 3),
        "threads": torch.get_num_threads(),
    }


def readme(summary: dict, command: str) -> str:
    """The asset folder's README: what the model is, how it was made, its held-out scores and speed."""
    c, h, p = summary["config"], summary["heldout"], summary["params"]
    kinds = "\n".join(
        f"| {k} | {h[f'n/{k}']} | {h[f'shapes/{k}']:.3f} | {h[f'shapes_strict/{k}']:.3f} |"
        for k in KINDS
        if f"n/{k}" in h
    )
    speed = ", ".join(f"{k} = {v}" for k, v in summary["speed"].items())
    r = c["resolution"]
    if c["vae_steps"]:
        v, cells = summary["vae"], r // c["vae_downsample"]
        space = (
            f"LATENT space ({cells}x{cells}x{c['vae_latent_channels']} latents of the VAE below), "
            f"patch {c['patch_size']}"
        )
        vae = (
            f"* vae: `AutoencoderKL`, {r}x{r} RGB <-> {cells}x{cells}x{c['vae_latent_channels']}, width "
            f"{c['vae_width']}: {v['params']:,} parameters, trained first for {c['vae_steps']} steps x batch "
            f"{c['vae_batch_size']} (L1 + L2 + {c['vae_kl_weight']} x KL, {v['minutes']} min); latents normalised by "
            f"shift_factor {v['shift_factor']:.4f} and scaling_factor {v['scaling_factor']:.4f}; the verifier scores "
            f"its reconstructions of held-out scenes {v['heldout_recon_shapes']:.3f}\n"
        )
    else:
        space, vae = f"PIXEL space ({r}x{r} RGB, no VAE, in/out channels 3), patch {c['patch_size']}", ""
    return f"""# shapes_t2i — the shipped tiny text-to-image flow model of the shapes world

A deliberately small and mediocre SD3-family model, the starting point of the README's GRPO demo: RL should raise
its held-out verifier score within minutes on a CPU.

* transformer: `SD3Transformer2DModel`, {space}, {c["num_layers"]} joint blocks, width
  {c["num_heads"] * c["head_dim"]} ({c["num_heads"]} heads x {c["head_dim"]}): {p["transformer"]:,} parameters
* text_encoder: `CLIPTextModelWithProjection`, {c["text_layers"]} layers, width {c["text_hidden"]}, projection
  {c["projection_dim"]}: {p["text_encoder"]:,} parameters, trained jointly from scratch
* tokenizer: word-level over the grammar's words + [PAD] [UNK] [BOS] [EOS], model_max_length {c["max_length"]}
* scheduler: `FlowMatchEulerDiscreteScheduler`, shift {c["shift"]}, 1000 train timesteps
{vae}
Conventions: x0 in [-1, 1] (image = (x0 + 1) / 2; with a VAE x0 are its normalised latents,
image = (vae.decode(x0 / scaling_factor + shift_factor) + 1) / 2); x_t = (1 - sigma) x0 + sigma noise; the transformer
predicts v = noise - x0 at timestep = sigma * 1000; prompt_embeds = penultimate text-encoder hidden states,
pooled = text_embeds; Euler steps x <- x + (sigma_next - sigma) v over `scheduler.set_timesteps(T).sigmas`.

## How it was made

`{command}`

{c["steps"]} steps x batch {c["batch_size"]}, AdamW lr {c["lr"]} (warmup {c["warmup"]}, cosine to
{c["lr_final_fraction"]} x lr), {c["sigma_sampling"]} training sigmas, {c["loss_weighting"]}-weighted v-loss,
{c["cfg_dropout"]:.0%} empty-prompt dropout,
weight EMA {c["ema_decay"] or "off"}, fresh random scenes of the TRAIN split every batch, seed {c["seed"]}:
{summary["train_minutes"]} minutes on {c["threads"]} CPU thread(s) of a shared 2-core machine. Final training loss
(running mean) {summary["final_loss"]:.4f}.

## Held-out score (before RL)

{h["num_images"] // c["eval_samples_per_prompt"]} held-out prompts (split_prompts(seed={c["split_seed"]})),
{c["eval_samples_per_prompt"]} seeds each, Euler ODE, T = {c["eval_num_steps"]}, guidance 1 (no CFG):
**shapes = {h["shapes"]:.3f}**, shapes_strict = {h["shapes_strict"]:.3f}.

| kind | images | shapes | shapes_strict |
|---|---|---|---|
{kinds}

`samples.png`: held-out prompts (up to 4 per kind), two seeds each.

Speed on CPU: {speed}.
"""


# ---------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> tuple[PretrainConfig, str | None]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output folder, e.g. assets/shapes_t2i (omit to only evaluate)")
    defaults = PretrainConfig()
    for f in dataclasses.fields(PretrainConfig):
        ap.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name)
        )
    args = vars(ap.parse_args(argv))
    out = args.pop("out")
    return PretrainConfig(**args), out


def main(argv: list[str] | None = None) -> dict:
    import sys

    config, out = parse_args(argv)
    command = "python -m scripts.pretrain_shapes_t2i " + " ".join(sys.argv[1:] if argv is None else argv)
    summary, _ = pretrain(config, out, command=command)
    h = summary["heldout"]
    print(f"params: {summary['params']}  train: {summary['train_minutes']} min  speed: {summary['speed']}")
    if "vae" in summary:
        print(f"vae: {summary['vae']}")
    print(f"held-out (T={config.eval_num_steps}, no CFG): shapes {h['shapes']:.3f}  strict {h['shapes_strict']:.3f}")
    for kind in KINDS:
        if f"n/{kind}" in h:
            print(
                f"  {kind:9s} n={h[f'n/{kind}']:4d}  shapes {h[f'shapes/{kind}']:.3f}  "
                f"strict {h[f'shapes_strict/{kind}']:.3f}"
            )
    return summary


if __name__ == "__main__":
    main()
