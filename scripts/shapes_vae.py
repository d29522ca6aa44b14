"""The tiny AutoencoderKL of the latent-space shapes model.

With ``--vae-steps N`` (:mod:`scripts.pretrain_shapes_t2i`) the transformer learns, like SD3, in the latent space
of an ``AutoencoderKL`` trained first on rendered scenes: a tiny VAE, 32 px -> 8x8x4 latents normalised by its
shift/scaling factors, then frozen. ``config`` arguments are the ``PretrainConfig`` of that script.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from mmgrpo.data.shapes import split_prompts
from mmgrpo.policies.models.sd3 import decode_latents
from mmgrpo.rewards.shapes import score
from scripts.shapes_scenes import cosine_lr, num_params, render_batch, train_batch


def build_vae(config: Any) -> AutoencoderKL:
    """A tiny ``AutoencoderKL`` (SD's VAE class): log2(vae_downsample) halvings, one ResNet block per level."""
    levels = int(math.log2(config.vae_downsample)) + 1
    w = config.vae_width
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(w, *[2 * w] * (levels - 1)),
        layers_per_block=1,
        latent_channels=config.vae_latent_channels,
        norm_num_groups=8,
        sample_size=config.resolution,
    )


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float, generator: torch.Generator) -> torch.Tensor:
    """L1 + L2 reconstruction error per pixel of x [N, 3, H, W] in [-1, 1] from a posterior sample, plus
    ``kl_weight`` x the KL to N(0, 1) per latent element."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator)
    err = vae.decode(z).sample - x
    return err.abs().mean() + err.square().mean() + kl_weight * posterior.kl().mean() / z[0].numel()


def to_latents(vae: AutoencoderKL, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x [N, 3, H, W] in [-1, 1] -> normalised latents (posterior sample - shift_factor) * scaling_factor."""
    c = vae.config
    return (vae.encode(x).latent_dist.sample(generator=generator) - c.shift_factor) * c.scaling_factor


def train_vae(config: Any, progress: bool = True, log=tqdm.write) -> tuple[AutoencoderKL, dict]:
    """Train the VAE on fresh random train scenes (captions unused); returns (vae in eval mode, stats).

    The latents are normalised as SD3's are: ``shift_factor`` and ``scaling_factor`` (stored in the VAE's config)
    map posterior samples of 256 train scenes to mean 0 and std 1. stats: final loss, minutes and the verifier's
    ``shapes`` score of reconstructed held-out scenes (1.0 = the decoder loses nothing the verifier reads).
    """
    t0 = time.time()
    torch.manual_seed(config.seed + 3)
    vae = build_vae(config)
    train_prompts, heldout = split_prompts(config.split_seed, config.heldout_fraction)
    rng, gen = np.random.default_rng([config.seed, 4]), torch.Generator().manual_seed(config.seed + 5)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    run_loss = None
    bar = tqdm(range(config.vae_steps), disable=not progress, desc="pretrain shapes_t2i VAE")
    for step in bar:
        _, x = train_batch(train_prompts, config.vae_batch_size, config.resolution, 0.0, rng)
        loss = vae_loss(vae, x, config.vae_kl_weight, gen)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, config.vae_lr, config.vae_steps, warmup=config.warmup, final_fraction=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
        opt.step()
        run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
        bar.set_postfix(loss=f"{run_loss:.4f}")
    vae.eval()
    with torch.no_grad():
        _, x = train_batch(train_prompts, 256, config.resolution, 0.0, np.random.default_rng([config.seed, 6]))
        z = vae.encode(x).latent_dist.sample(generator=gen)
        vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1.0 / z.std().item())
        scene_rng = np.random.default_rng([config.seed, 7])  # one scene per held-out prompt
        x = render_batch(heldout, config.resolution, scene_rng)
        recon = decode_latents(vae, to_latents(vae, x, gen))
        recon_score = float(np.mean([score(p, img)[0] for p, img in zip(heldout, recon)]))
    stats = {
        "params": num_params(vae),
        "minutes": round((time.time() - t0) / 60, 2),
        "final_loss": run_loss,
        "heldout_recon_shapes": recon_score,
        "scaling_factor": vae.config.scaling_factor,
        "shift_factor": vae.config.shift_factor,
    }
    log(json.dumps({"vae": stats}))
    return vae, stats
