"""A faithful re-implementation of Flow-GRPO's SD3 training step: the diffusion peer of ``bench/peers.py``.

Written from reading https://github.com/yifan123/flow_grpo at commit ac4c86e8cae021841f1fde853d340e0db67690dd
(2025-07-18), not copied from it:

- ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`` ``sde_step_with_logprob`` -> :func:`sde_step_with_logprob`:
  the flow SDE step x_{t-1} ~ N(mean, (std_t sqrt(-dt))^2) with std_t = a sqrt(sigma / (1 - sigma)) (sigma = 1
  replaced by sigmas[1] in the denominator), mean = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma)
  / (2 sigma)) dt, and its log-density averaged over the latent's elements, all in fp32; the step indices come from
  ``scheduler.index_for_timestep`` row by row, as theirs do.
- ``flow_grpo/diffusers_patch/sd3_pipeline_with_logprob.py`` ``pipeline_with_logprob`` -> :meth:`FlowGRPOLoop.sample`:
  per sampling batch, latents drawn by the pipeline's ``prepare_latents``, ``retrieve_timesteps`` for T steps, one
  transformer forward and one SDE step per timestep, every latent and log-prob kept in Python lists and stacked,
  VAE decoding, ``image_processor.postprocess(output_type="pt")``.
- ``scripts/train_sd3.py`` ``main`` (sampling, advantages, training) and ``compute_log_prob`` ->
  :meth:`FlowGRPOLoop.step`: ``sample.num_batches_per_epoch`` batches of ``sample.train_batch_size`` rows sampled
  in turn, the rewards, the per-prompt advantages of ``PerPromptStatTracker`` (``flow_grpo/stat_tracking.py``) with
  ``global_std``, the filter of rows whose advantages are all 0 (not trained at all; some are put back so that the
  count divides by the number of batches), one shuffle of the rows, re-batching into ``num_batches_per_epoch``
  training batches, and for each batch a loop over the ``int(T * timestep_fraction)`` *first* timesteps: one
  forward of the batch at timestep j, the SDE log-prob of the stored next latent, ratio = exp(logp - logp_old), the
  clipped loss mean(max(-A ratio, -A clip(ratio, 1 - clip_range, 1 + clip_range))) with A clamped to
  +-adv_clip_max, their per-timestep info tensors (approx_kl, clipfrac, ...), and ``accelerator.backward``; an
  optimizer step (gradient clipping, AdamW) every ``gradient_accumulation_steps * num_train_timesteps`` backward
  passes.
- ``config/grpo.py`` ``general_ocr_sd3_1gpu`` (their 1-GPU recipe) for the batching and the hyper-parameters:
  train_batch_size = train.batch_size = 8 (capped at B x G), num_batches_per_epoch = B x G / 8,
  gradient_accumulation_steps = num_batches_per_epoch // 2 (two optimizer steps per rollout), timestep_fraction 0.99,
  noise_level 0.7, clip_range 1e-4, adv_clip_max 5, AdamW lr 3e-4 (betas 0.9 / 0.999, weight decay 1e-4, eps 1e-8),
  max_grad_norm 1, num_inner_epochs 1.

Simplifications (none changes the work of a step except as stated):

- one process, no ``accelerate``: its gradient accumulation is written out (each loss divided by
  gradient_accumulation_steps x num_train_timesteps, as ``accelerator.backward`` does while accumulating; clip, step
  and zero_grad at every accumulation boundary); no gather of rewards across processes;
- classifier-free guidance only when ``guidance_scale`` > 1 (default 1: the shapes model samples without it, and so
  does the mmgrpo side); with it, their ``train.cfg`` path: the empty negative prompt encoded once, sampling and
  ``compute_log_prob`` run the transformer on the doubled batch [negative; prompt] and combine
  uncond + s (text - uncond), the gradient through both halves (their recipes use 4.5);
- full fine-tuning of the model (their SD3.5-M recipes train LoRA r32; the bench's shapes model is tiny, and mmgrpo
  trains it fully too); fp32 on both sides, on CPU or on one GPU (``device``: the pipeline and the advantages are
  moved there, as their ``accelerator.device``);
- beta 0 (no reference forward), no EMA, no evaluation, no wandb logging, no checkpoints (none is part of a step);
- prompt encoding by diffusers' ``StableDiffusion3Pipeline.encode_prompt`` (their copy of it needs a T5 encoder, which
  the shapes model has none of: diffusers gives the same zero T5 block mmgrpo uses), once per sampling batch of
  train_batch_size prompts, repeats included, as theirs;
- prompts: the shapes world's training prompts, each repeated G times in order (their ``DistributedKRepeatSampler``
  shuffles the repeats; the order changes no cost);
- rewards: a reward of mmgrpo's registry (``bench/peers.py`` passes the same one to both sides) on the decoded images,
  called when a sampling batch is done (they submit it to
  a thread pool and wait for it before the advantages; on one CPU process the cost is the same).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

SOURCE = "yifan123/flow_grpo@ac4c86e8cae021841f1fde853d340e0db67690dd"


@dataclass
class FlowGRPOConfig:
    """The fields of their config this step reads (``config/base.py`` + ``config/grpo.py:general_ocr_sd3_1gpu``)."""

    num_steps: int = 10  # sample.num_steps
    noise_level: float = 0.7  # sample.noise_level
    train_batch_size: int = 8  # sample.train_batch_size = train.batch_size
    num_image_per_prompt: int = 8  # sample.num_image_per_prompt (G)
    prompts_per_epoch: int = 1  # B: sample.num_batches_per_epoch = B * G / train_batch_size
    timestep_fraction: float = 0.99  # train.timestep_fraction
    clip_range: float = 1e-4  # train.clip_range
    adv_clip_max: float = 5.0  # train.adv_clip_max
    learning_rate: float = 3e-4  # train.learning_rate
    adam_betas: tuple[float, float] = (0.9, 0.999)  # train.adam_beta1/2
    adam_weight_decay: float = 1e-4  # train.adam_weight_decay
    adam_epsilon: float = 1e-8  # train.adam_epsilon
    max_grad_norm: float = 1.0  # train.max_grad_norm
    num_inner_epochs: int = 1  # train.num_inner_epochs
    global_std: bool = True  # sample.global_std
    max_sequence_length: int = 0  # the shapes model has no T5 tokens (theirs: 128)
    guidance_scale: float = 1.0  # sample.guidance_scale (theirs 4.5); > 1 turns on train.cfg

    @property
    def rows(self) -> int:
        return self.prompts_per_epoch * self.num_image_per_prompt

    @property
    def batch_size(self) -> int:
        """Rows per sampling batch and per training batch (their 8, capped at the rows of a rollout)."""
        return min(self.train_batch_size, self.rows)

    @property
    def num_batches_per_epoch(self) -> int:
        if self.rows % self.batch_size:
            raise ValueError(f"B x G = {self.rows} must divide by the train batch size {self.batch_size}")
        return self.rows // self.batch_size

    @property
    def gradient_accumulation_steps(self) -> int:
        return max(1, self.num_batches_per_epoch // 2)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.num_steps * self.timestep_fraction)

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps per rollout (mmgrpo's side makes as many: ``trainer.minibatches``)."""
        return math.ceil(self.num_batches_per_epoch / self.gradient_accumulation_steps)


def sde_step_with_logprob(
    scheduler, model_output, timestep, sample, noise_level=0.7, prev_sample=None, generator=None
):
    """Their SDE step of a batch at per-row ``timestep [n]``: (prev_sample, log_prob [n], prev_sample_mean, std_dev_t).

    All in fp32; the log-density is averaged over the non-batch dimensions."""
    from diffusers.utils.torch_utils import randn_tensor

    model_output, sample = model_output.float(), sample.float()
    if prev_sample is not None:
        prev_sample = prev_sample.float()
    step_index = [scheduler.index_for_timestep(t) for t in timestep]
    prev_step_index = [s + 1 for s in step_index]
    sigma = scheduler.sigmas[step_index].view(-1, *[1] * (sample.ndim - 1))
    sigma_prev = scheduler.sigmas[prev_step_index].view(-1, *[1] * (sample.ndim - 1))
    sigma_max = scheduler.sigmas[1].item()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    prev_sample_mean = (
        sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
        + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    if prev_sample is None:
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)  # fmt: skip
        prev_sample = prev_sample_mean + std_dev_t * torch.sqrt(-1 * dt) * noise
    scale = std_dev_t * torch.sqrt(-1 * dt)
    log_prob = (
        -((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * scale**2)
        - torch.log(scale)
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, prev_sample_mean, std_dev_t


def per_prompt_advantages(prompts: list[str], rewards: np.ndarray, global_std: bool) -> np.ndarray:
    """``PerPromptStatTracker.update`` (type grpo) on one rollout: (r - mean of the prompt's rewards) / (std + 1e-4),
    std of all rewards with ``global_std``, else of the prompt's."""
    prompts_a, rewards = np.array(prompts), np.asarray(rewards, dtype=np.float64)
    adv = np.empty_like(rewards) * 0.0
    for prompt in np.unique(prompts_a):
        mine = rewards[prompts_a == prompt]
        std = (np.std(rewards, axis=0, keepdims=True) if global_std else np.std(mine, axis=0, keepdims=True)) + 1e-4
        adv[prompts_a == prompt] = (mine - np.mean(mine, axis=0, keepdims=True)) / std
    return adv


class FlowGRPOLoop:
    """Their SD3 training step on a diffusers-layout SD3 folder: :meth:`step` = sample, score, advantages, train."""

    def __init__(
        self, path: str, cfg: FlowGRPOConfig, prompts: list[str], reward_fn: Any, seed: int = 0, device: str = "cpu"
    ):
        from diffusers import StableDiffusion3Pipeline

        torch.manual_seed(seed)
        self.cfg, self.prompts, self.reward_fn = cfg, prompts, reward_fn
        pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None).to(device)
        self.device = torch.device(device)
        pipe.set_progress_bar_config(disable=True)
        for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            m.requires_grad_(False)
        pipe.transformer.requires_grad_(True)  # full fine-tuning (``not config.use_lora``)
        self.pipe, self.transformer = pipe, pipe.transformer
        self.params = [p for p in self.transformer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, betas=cfg.adam_betas,
                                           weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)  # fmt: skip
        self.height = self.width = pipe.default_sample_size * pipe.vae_scale_factor
        self.epoch = 0
        self.neg = self.encode([""]) if cfg.guidance_scale > 1 else None  # their neg_prompt_embed, once

    def predict(self, latents, t, embeds, pooled) -> torch.Tensor:
        """The transformer's output, with CFG (``train.cfg``) when guidance_scale > 1: one forward of the doubled
        batch [negative; prompt], chunked and combined."""
        n = latents.shape[0]
        if self.neg is None:
            return self.transformer(hidden_states=latents, timestep=t, encoder_hidden_states=embeds,
                                    pooled_projections=pooled, return_dict=False)[0]  # fmt: skip
        neg_embeds, neg_pooled = (x.repeat(n, *[1] * (x.ndim - 1)) for x in self.neg)
        out = self.transformer(hidden_states=torch.cat([latents] * 2), timestep=torch.cat([t] * 2),
                               encoder_hidden_states=torch.cat([neg_embeds, embeds]),
                               pooled_projections=torch.cat([neg_pooled, pooled]), return_dict=False)[0]  # fmt: skip
        uncond, text = out.chunk(2)
        return uncond + self.cfg.guidance_scale * (text - uncond)

    # ------------------------------------------------------------------ pipeline_with_logprob
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=prompts, prompt_3=prompts, do_classifier_free_guidance=False,
            max_sequence_length=self.cfg.max_sequence_length,
        )  # fmt: skip
        return embeds, pooled

    @torch.no_grad()
    def sample(self, prompt_embeds, pooled) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``pipeline_with_logprob``: (images [n, 3, H, W] in [0, 1], T+1 latents, T log-probs)."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

        pipe, n = self.pipe, prompt_embeds.shape[0]
        latents = pipe.prepare_latents(n, self.transformer.config.in_channels, self.height, self.width,
                                       prompt_embeds.dtype, prompt_embeds.device, None, None)  # fmt: skip
        timesteps, _ = retrieve_timesteps(pipe.scheduler, self.cfg.num_steps, prompt_embeds.device)
        all_latents, all_log_probs = [latents], []
        for t in timesteps:
            noise_pred = self.predict(latents, t.expand(n), prompt_embeds, pooled).to(prompt_embeds.dtype)
            latents_dtype = latents.dtype
            latents, log_prob, _, _ = sde_step_with_logprob(
                pipe.scheduler, noise_pred.float(), t.unsqueeze(0), latents.float(), noise_level=self.cfg.noise_level
            )
            all_latents.append(latents)
            all_log_probs.append(log_prob)
            if latents.dtype != latents_dtype:
                latents = latents.to(latents_dtype)
        vae = pipe.vae
        z = (latents / vae.config.scaling_factor) + (vae.config.shift_factor or 0.0)
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        image = pipe.image_processor.postprocess(image, output_type="pt")
        return image, all_latents, all_log_probs

    # ------------------------------------------------------------------ train_sd3.main, one epoch
    def step(self) -> dict[str, float]:
        """One epoch of ``train_sd3.main``: sampling, rewards, advantages, filtering, training. Returns the mean
        reward and the number of optimizer steps made."""
        cfg = self.cfg
        G, bs = cfg.num_image_per_prompt, cfg.batch_size
        first = self.epoch * cfg.prompts_per_epoch
        rows = [self.prompts[(first + b) % len(self.prompts)] for b in range(cfg.prompts_per_epoch) for _ in range(G)]
        self.transformer.eval()
        samples, all_prompts = [], []
        num_train_timesteps = cfg.num_train_timesteps
        for i in range(cfg.num_batches_per_epoch):  # ---- sampling
            prompts = rows[i * bs : (i + 1) * bs]
            prompt_embeds, pooled = self.encode(prompts)
            images, latents, log_probs = self.sample(prompt_embeds, pooled)
            latents = torch.stack(latents, dim=1)  # [bs, T+1, ...]
            log_probs = torch.stack(log_probs, dim=1)  # [bs, T]
            timesteps = self.pipe.scheduler.timesteps.repeat(bs, 1)  # [bs, T]
            rewards = torch.as_tensor(self.reward_fn(images, prompts, [{} for _ in prompts], None)).float()
            samples.append({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled, "timesteps": timesteps,
                            "latents": latents[:, :-1], "next_latents": latents[:, 1:], "log_probs": log_probs,
                            "rewards": rewards})  # fmt: skip
            all_prompts += prompts
        samples = {k: torch.cat([s[k] for s in samples], dim=0) for k in samples[0]}
        reward_mean = float(samples["rewards"].mean())
        avg = samples["rewards"].unsqueeze(1).repeat(1, num_train_timesteps)  # [N, K]
        adv = per_prompt_advantages(all_prompts, avg.numpy(), cfg.global_std)
        samples["advantages"] = torch.as_tensor(adv).to(self.device)  # theirs: .to(accelerator.device)
        del samples["rewards"]
        mask = samples["advantages"].abs().sum(dim=1) != 0  # ---- rows whose advantages are all 0 are dropped
        nb = cfg.num_batches_per_epoch
        true_count = mask.sum()
        if true_count % nb != 0:
            false_indices = torch.where(~mask)[0]
            num_to_change = nb - (true_count % nb)
            if len(false_indices) >= num_to_change:
                mask[false_indices[torch.randperm(len(false_indices))[:num_to_change]]] = True
        samples = {k: v[mask] for k, v in samples.items()}
        total_batch_size = samples["timesteps"].shape[0]
        self.transformer.train()
        accumulation = cfg.gradient_accumulation_steps * num_train_timesteps
        backward_passes = optimizer_steps = 0
        # every row filtered out: nothing to train (their reshape of the empty batch would raise)
        for _ in range(cfg.num_inner_epochs if total_batch_size else 0):  # ---- training
            perm = torch.randperm(total_batch_size)
            samples = {k: v[perm] for k, v in samples.items()}
            batched = {k: v.reshape(-1, total_batch_size // nb, *v.shape[1:]) for k, v in samples.items()}
            batched = [dict(zip(batched, x)) for x in zip(*batched.values())]
            info: dict[str, list[torch.Tensor]] = defaultdict(list)
            for sample in batched:
                for j in range(num_train_timesteps):
                    log_prob = self.compute_log_prob(sample, j)
                    advantages = torch.clamp(sample["advantages"][:, j], -cfg.adv_clip_max, cfg.adv_clip_max)
                    ratio = torch.exp(log_prob - sample["log_probs"][:, j])
                    unclipped_loss = -advantages * ratio
                    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - cfg.clip_range, 1.0 + cfg.clip_range)
                    loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
                    info["approx_kl"].append(0.5 * torch.mean((log_prob - sample["log_probs"][:, j]) ** 2))
                    info["clipfrac"].append(torch.mean((torch.abs(ratio - 1.0) > cfg.clip_range).float()))
                    info["clipfrac_gt_one"].append(torch.mean((ratio - 1.0 > cfg.clip_range).float()))
                    info["clipfrac_lt_one"].append(torch.mean((1.0 - ratio > cfg.clip_range).float()))
                    info["policy_loss"].append(loss)
                    info["loss"].append(loss)
                    (loss / accumulation).backward()  # accelerator.backward while accumulating
                    backward_passes += 1
                    if backward_passes % accumulation == 0:  # accelerator.sync_gradients
                        torch.nn.utils.clip_grad_norm_(self.transformer.parameters(), cfg.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad()
                        optimizer_steps += 1
                        info = {k: torch.mean(torch.stack(v)) for k, v in info.items()}  # what they log
                        info = defaultdict(list)
        self.epoch += 1
        return {
            "reward_mean": reward_mean,
            "optimizer_steps": float(optimizer_steps),
            "trained_rows": float(total_batch_size),
        }

    def compute_log_prob(self, sample: dict[str, torch.Tensor], j: int) -> torch.Tensor:
        """``compute_log_prob``: the batch's forward at timestep j and the SDE log-prob of next_latents."""
        noise_pred = self.predict(sample["latents"][:, j], sample["timesteps"][:, j], sample["prompt_embeds"],
                                  sample["pooled_prompt_embeds"])  # fmt: skip
        _, log_prob, _, _ = sde_step_with_logprob(
            self.pipe.scheduler, noise_pred.float(), sample["timesteps"][:, j], sample["latents"][:, j].float(),
            prev_sample=sample["next_latents"][:, j].float(), noise_level=self.cfg.noise_level,
        )  # fmt: skip
        return log_prob
