"""Diffusion and flow samplers as SDE policies (DanceGRPO, Flow-GRPO, MixGRPO, G2RPO).

A sampler of T steps is a policy whose action units are its steps (K = T): step i maps the state x_i to
x_{i+1} ~ N(mean(x_i, model(x_i)), std_i^2) (``mmgrpo.policies.sde``); the exploration planner
(``mmgrpo.policies.exploration``) decides which steps are stochastic (SDE) and which are trained;
ODE steps are deterministic and never trained.

Per-family code lives in an **adapter** (``mmgrpo/policies/models/<family>.py``) that only knows how to
encode a condition, call the denoiser, give the noise schedule and decode latents. :class:`DiffusionPolicy`
does everything else, once, for every family: group sampling with per-prompt seeds, CFG, log-prob recording,
recomputation with gradient, the KL to the reference (LoRA adapter disabled), G2RPO branching. The two
objectives on the final samples instead of the sampler's steps (AWM, DiffusionNFT) and the EMA sampling policy are
its mixin in ``mmgrpo.policies.flow_matching``.

Shapes: B prompts, G samples per prompt, N = B*G rows, T steps, latents ``[N, *latent_shape]``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from mmgrpo.core.errors import UserError
from mmgrpo.core.registry import Registry
from mmgrpo.core.seeding import generator_for
from mmgrpo.core.types import LogProbs, PromptBatch, Rollout
from mmgrpo.policies import exploration, sde
from mmgrpo.policies.flow_matching import FinalSampleObjectives

Cond = dict[str, torch.Tensor]  # conditioning tensors, batch first


@dataclass
class Schedule:
    """The sampling schedule of T steps.

    flow: ``sigmas [T+1]`` from 1 towards 0 (ends at 0) and ``timesteps [T]`` (the model's time input).
    ddim: ``alpha_bars [T+1]`` (alpha-bar at each state; the last is alpha-bar-prev of the final step) and
    ``timesteps [T]``.
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor | None = None
    alpha_bars: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


class DiffusionAdapter(Protocol):
    """What a model family provides. ``denoiser`` is the trainable network (transformer or UNet)."""

    family: str
    parameterization: Literal["flow", "ddim"]  # velocity on sigmas, or epsilon/v UNet on alpha-bars
    prediction_type: str  # "flow" | "epsilon" | "v_prediction"
    denoiser: nn.Module
    device: torch.device
    dtype: torch.dtype  # of latents and model inputs

    def encode(self, prompts: list[Any], meta: list[dict]) -> Cond:
        """Conditioning for B prompts (no grad), every tensor [B, ...]."""
        ...

    def encode_negative(self, n: int) -> Cond:
        """Unconditional (negative / empty prompt) conditioning [n, ...] for classifier-free guidance."""
        ...

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latent, e.g. (C, h, w) or (C, F, h, w)."""
        ...

    def schedule(self, num_steps: int) -> Schedule: ...

    def timestep_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Model time input at noise level sigma (flow families; G2RPO's coarse schedules need it)."""
        ...

    def predict(self, module: nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """One forward of ``module`` (the possibly DDP-wrapped denoiser) at model times ``t [n]``."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [n, ...] -> images [n, 3, H, W] or videos [n, F, 3, H, W] in [0, 1]."""
        ...


ADAPTERS: Registry[Any] = Registry("diffusion model family", plugins="diffusion_families")


@dataclass
class DiffusionPolicyOptions:
    num_steps: int = 10
    """T: sampling steps"""
    guidance_scale: float = 1.0
    """classifier-free guidance (1 = off); the unconditional branch never carries gradient"""
    rollout_guidance_scale: float | None = None
    """objective=flow_matching only: classifier-free guidance of the training rollouts (None = guidance_scale).
    Evaluation and generate() keep guidance_scale, so e.g. 2 here with guidance_scale 1 trains the unguided
    model on guided samples, weighted by their advantages (it learns what guidance adds, and what the reward
    adds). The SDE objective scores the sampler's own steps, so its rollouts must use guidance_scale"""
    sde: str = "flow_grpo"
    """SDE dynamics for flow models: flow_grpo (Flow-GRPO), dance (DanceGRPO), cps; UNet families use ddim"""
    noise_level: float = 0.7
    """flow_grpo: a; dance: eta; cps: a; ddim: eta"""
    exploration: Literal["full", "window", "singular"] = "full"
    """which steps are SDE/trained: full (DanceGRPO/Flow-GRPO), window (MixGRPO), singular (G2RPO)"""
    timestep_fraction: float = 1.0
    """full: fraction of the T steps trained (DanceGRPO's timestep_fraction)"""
    selection: Literal["random", "first"] = "random"
    """full: which steps are trained"""
    window_size: int = 4
    """window: w SDE steps (MixGRPO)"""
    window_mode: Literal["progressive", "random"] = "progressive"
    """window: slide with training progress, or a random window per step"""
    shift_every: int = 10
    """window (progressive): advance the window one step every this many training steps"""
    branch_steps: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """singular (G2RPO): candidate branch steps k (0 = the first step)"""
    granularities: list[int] = field(default_factory=lambda: [1])
    """singular (G2RPO): ODE continuation strides after k; [1, 2, 3] = multi-granularity advantages"""
    shared_init_noise: bool = False
    """all G samples of a prompt start from the same noise (DanceGRPO); singular always shares"""
    reference_kl: bool = False
    """compute the KL to the reference for loss.beta > 0: the LoRA adapter disabled, or with full fine-tuning
    (lora_rank 0) a frozen copy of the initial denoiser (one more copy of its weights in memory)"""
    lora_rank: int = 0
    """LoRA rank on the denoiser's attention projections (0 = full fine-tuning)"""
    lora_alpha: float | None = None
    """LoRA alpha (default = rank)"""
    lora_targets: list[str] = field(default_factory=list)
    """LoRA target modules (default: the family's attention projections)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass"""
    attention: Literal["sdpa", "xformers"] = "sdpa"
    """attention kernel (xformers needs the gpu extra)"""
    objective: Literal["sde", "flow_matching", "nft"] = "sde"
    """what the loss trains. sde: the sampler's stochastic steps (log-probs of the SDE transitions; DanceGRPO,
    Flow-GRPO, MixGRPO, G2RPO). flow_matching: advantage-weighted flow matching on the final samples (AWM,
    on-policy DiffusionNFT; flow families): the units are fm_timesteps (sigma, noise) draws per sample, the
    sampler is free (noise_level 0 = the ODE that evaluation uses). nft: DiffusionNFT on the same draws: the
    loss contrasts an implicit positive and negative policy around the sampling policy's velocity (pair with
    loss.name=nft and loss.adv_clip; see nft_beta, old_policy_ema)"""
    nft_beta: float = 1.0
    """objective=nft: beta of the implicit policies v+ = beta v + (1 - beta) v_old and v- = (1 + beta) v_old -
    beta v (v the trained velocity, v_old the sampling policy's); the errors are divided by beta"""
    old_policy_ema: float = 0.0
    """objective=flow_matching or nft: the sampling ("old") policy is an EMA of the trained weights, updated once
    per training step before its rollouts: theta_old <- d theta_old + (1 - d) theta (DiffusionNFT's soft update;
    the rollouts and nft's v_old use it). 0 = the weights as they are at the rollout (on-policy). > 0 costs one
    fp32 copy of the trainable parameters, checkpointed with the run"""
    fm_timesteps: int = 2
    """flow_matching: (sigma, noise) draws per sample, each an action unit of the loss"""
    fm_sigma_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    """flow_matching: the draws' sigmas are uniform in [lo, hi] (1 = pure noise: layout; 0 = clean: detail)"""
    fm_shared_draws: bool = True
    """flow_matching: the G samples of a prompt share their (sigma, noise) draws (common random numbers, as
    DiffusionNFT/DGPO share noise in a group): with group-centred advantages the part of the gradient that comes
    from the draws themselves cancels, and what remains is the difference between the samples"""
    fm_weighting: Literal["x0", "v"] = "x0"
    """flow_matching: per-draw weight of the velocity error. x0: sigma^2, i.e. the x0-prediction error (near
    sigma 0 the velocity target is the noise itself, which a clean image cannot predict: unweighted, those draws
    dominate and the shapes model degraded into a patch-grid pattern in 20 steps); v: 1 (SD3's plain v-loss).
    objective=nft always uses DiffusionNFT's own weighting: the x0 error divided by its (detached) mean absolute
    value"""


class DiffusionPolicy(FinalSampleObjectives):
    """Policy protocol over a :class:`DiffusionAdapter`.

    Rollout samples are the decoded images [N, 3, H, W] (videos [N, F, 3, H, W]) in [0, 1]; units are
    the T sampling steps; ``extras["latents"] [N, T+1, ...]`` stores every state.
    """

    def __init__(self, adapter: DiffusionAdapter, options: DiffusionPolicyOptions | None = None):
        self.adapter = adapter
        self.opts = options or DiffusionPolicyOptions()
        self._check_options()
        self.training_step = 0
        if self.opts.lora_rank > 0:
            add_lora(adapter.denoiser, self.opts, getattr(adapter, "lora_targets", None))
        else:
            adapter.denoiser.requires_grad_(True)
        self._frozen_reference: nn.Module | None = None
        if self.opts.reference_kl and self.opts.lora_rank <= 0:  # full fine-tuning: the initial weights, frozen
            self._frozen_reference = copy.deepcopy(adapter.denoiser).requires_grad_(False).eval()
        if self.opts.gradient_checkpointing:
            adapter.denoiser.enable_gradient_checkpointing()
        if self.opts.attention == "xformers":
            adapter.denoiser.enable_xformers_memory_efficient_attention()
        self.model: nn.Module = adapter.denoiser
        self._init_old_policy()

    def _check_options(self) -> None:
        o, a = self.opts, self.adapter
        if a.parameterization == "ddim" and o.sde != "ddim":
            raise UserError(f"policy.options.sde={o.sde!r}: the {a.family} family is a UNet sampled with DDIM; "
                            "set policy.options.sde=ddim")  # fmt: skip
        if a.parameterization == "flow" and o.sde not in sde.SDE_KINDS:
            raise UserError(f"policy.options.sde: {sde.SDE_KINDS.unknown_message(o.sde)}")
        if o.exploration == "singular" and o.granularities and min(o.granularities) < 1:
            raise UserError(f"policy.options.granularities must be >= 1, got {o.granularities}")
        if o.rollout_guidance_scale is not None and o.objective != "flow_matching":
            raise UserError(
                f"policy.options.rollout_guidance_scale={o.rollout_guidance_scale}: only objective=flow_matching "
                f"trains on rollouts sampled differently from the policy; with objective={o.objective} the loss "
                "needs the sampler's own outputs (sde: its log-probs; nft: its unguided velocity), so set "
                "guidance_scale instead"
            )
        if o.rollout_guidance_scale is not None and o.rollout_guidance_scale < 1.0:
            raise UserError(f"policy.options.rollout_guidance_scale must be >= 1 (1 = off), "
                            f"got {o.rollout_guidance_scale}")  # fmt: skip
        if o.num_steps < 1:
            raise UserError(f"policy.options.num_steps must be >= 1, got {o.num_steps}")
        if not 0.0 <= o.old_policy_ema < 1.0:
            raise UserError(f"policy.options.old_policy_ema must be in [0, 1) (0 = on-policy), got {o.old_policy_ema}")
        if o.old_policy_ema > 0 and o.objective == "sde":
            raise UserError(
                f"policy.options.old_policy_ema={o.old_policy_ema}: objective=sde scores the sampler's own steps, "
                "so it samples with the trained weights; use objective=nft or flow_matching"
            )
        if o.objective == "nft" and not o.nft_beta > 0:
            raise UserError(f"policy.options.nft_beta must be > 0 (DiffusionNFT uses 1), got {o.nft_beta}")
        if o.objective in ("flow_matching", "nft"):
            if a.parameterization != "flow":
                raise UserError(f"policy.options.objective={o.objective} needs a flow-matching family; {a.family} "
                                "is a DDIM UNet: use objective=sde with sde=ddim")  # fmt: skip
            if o.exploration != "full":
                raise UserError(
                    f"policy.options.objective={o.objective} trains the final samples, not sampler steps: "
                    f"exploration={o.exploration!r} means nothing there; set exploration=full"
                )
            rng = list(o.fm_sigma_range)
            if len(rng) != 2 or not 0.0 <= rng[0] < rng[1] <= 1.0:
                raise UserError(f"policy.options.fm_sigma_range must be [lo, hi] with 0 <= lo < hi <= 1, "
                                f"got {o.fm_sigma_range}")  # fmt: skip
            if o.fm_timesteps < 1:
                raise UserError(f"policy.options.fm_timesteps must be >= 1, got {o.fm_timesteps}")

    # ------------------------------------------------------------------ helpers
    def unwrapped(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unwrapped().parameters() if p.requires_grad]

    def plan(self, generator: torch.Generator | None) -> exploration.ExplorationPlan:
        o, T = self.opts, self.opts.num_steps
        if o.exploration == "full":
            return exploration.full(T, o.timestep_fraction, o.selection, generator)
        if o.exploration == "window":
            return exploration.window(
                T, min(o.window_size, T), self.training_step, o.window_mode, o.shift_every, generator=generator
            )
        return exploration.singular(T, [k for k in o.branch_steps if k < T], generator)

    def guided(self, module: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond | None):
        """Model output with CFG; the unconditional branch is computed without gradient."""
        out = self.adapter.predict(module, x, t, cond)
        scale = self._guidance()
        if uncond is None or scale == 1.0:
            return out
        with torch.no_grad():  # keys the negative condition lacks (e.g. I2V first-frame latents) stay the row's own
            base = self.adapter.predict(module, x, t, {**cond, **uncond})
        return base + scale * (out - base)

    def _guidance(self) -> float:
        """The CFG scale sampling uses now: rollout_guidance_scale in flow-matching training rollouts (generate()
        samples as objective=sde, so evaluation keeps guidance_scale), else guidance_scale."""
        o = self.opts
        if o.objective == "flow_matching" and o.rollout_guidance_scale is not None:
            return o.rollout_guidance_scale
        return o.guidance_scale

    def step(self, out, x, i: int, sched: Schedule, noise_level: float, prev=None, noise=None) -> sde.StepOutput:
        """Step i of the schedule from state x (sampling when prev is None, else scoring prev)."""
        if self.adapter.parameterization == "ddim":
            a, a_prev = sched.alpha_bars[i], sched.alpha_bars[i + 1]
            return sde.ddim_step(out, x, a, a_prev, noise_level, self.adapter.prediction_type, prev, noise=noise)
        sig, sig_next = sched.sigmas[i], sched.sigmas[i + 1]
        return sde.step(self.opts.sde, out, x, sig, sig_next, noise_level, prev_sample=prev, noise=noise)

    def _cond_rows(self, cond: Cond, rows: torch.Tensor) -> Cond:
        return {k: v[rows] for k, v in cond.items()}

    def _uncond(self, n: int) -> Cond | None:
        return self.adapter.encode_negative(n) if self._guidance() != 1.0 else None

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def rollout(self, batch: PromptBatch, group_size: int, generator: torch.Generator | None = None) -> Rollout:
        G, B, o = group_size, len(batch), self.opts
        self.training_step = batch.step  # the MixGRPO window slides with training progress
        sched = self.adapter.schedule(o.num_steps)
        plan = self.plan(generator)
        seeds = batch.seeds or [int(torch.randint(0, 2**62, (1,), generator=generator)) for _ in range(B)]
        gens = [generator_for(s) for s in seeds]
        cond_b = self.adapter.encode(batch.prompts, batch.meta)  # [B, ...]
        rows = torch.arange(B).repeat_interleave(G)
        cond = self._cond_rows(cond_b, rows)  # [N, ...]
        if o.exploration == "singular":
            return self._rollout_singular(batch, G, sched, plan, gens, cond)
        shared = o.shared_init_noise
        x = self._noise(gens, G, shared_per_group=shared)
        latents, logp = [x], torch.zeros(B * G, sched.num_steps)
        uncond = self._uncond(B * G)
        with self._sampling_policy(batch.step):
            for i in range(sched.num_steps):
                out = self.guided(self.model, x, self._t(sched, i, x), cond, uncond)
                level = o.noise_level if plan.sde_mask[i] else 0.0
                noise = self._noise(gens, G, shared_per_group=False) if plan.sde_mask[i] else None
                res = self.step(out, x, i, sched, level, noise=noise)
                x = res.prev_sample
                latents.append(x)
                logp[:, i] = res.log_prob
        if o.objective in ("flow_matching", "nft"):
            return self._finish_flow_matching(batch, G, torch.stack(latents, 1), cond, gens)
        train = plan.train_mask[None, :].expand(B * G, -1).clone()
        return self._finish(batch, G, torch.stack(latents, 1), logp, train, cond, extras={})

    def _rollout_singular(self, batch, G, sched, plan, gens, cond) -> Rollout:
        """G2RPO: shared ODE anchor to step k, one SDE branch step, ODE continuations (several granularities)."""
        o, B = self.opts, len(batch)
        k = int(plan.branch_step)
        x = self._noise(gens, G, shared_per_group=True)
        uncond = self._uncond(B * G)
        latents, logp = [x], torch.zeros(B * G, sched.num_steps)
        for i in range(sched.num_steps):
            out = self.guided(self.model, x, self._t(sched, i, x), cond, uncond)
            noise = self._noise(gens, G, shared_per_group=False) if i == k else None
            res = self.step(out, x, i, sched, o.noise_level if i == k else 0.0, noise=noise)
            if i == k:
                logp[:, i] = res.log_prob
                x_branch = res.prev_sample
            x = res.prev_sample
            latents.append(x)
        variants = []
        for lam in o.granularities:
            if lam == 1:
                continue
            variants.append(self.adapter.decode(self._coarse(x_branch, k, lam, sched, cond, uncond)).float())
        train = plan.train_mask[None, :].expand(B * G, -1).clone()
        extras = {"state_shared_in_group": True}
        rollout = self._finish(batch, G, torch.stack(latents, 1), logp, train, cond, extras)
        if 1 not in o.granularities:
            rollout.samples, variants = variants[0], variants[1:]
        rollout.variants = variants
        return rollout

    def _coarse(self, x, k, lam, sched, cond, uncond) -> torch.Tensor:
        """ODE from x_{k+1} on the lambda-coarser sigmas after k (G2RPO multi-granularity)."""
        if self.adapter.parameterization != "flow":
            raise UserError("G2RPO granularities > 1 need a flow-matching family (sigma schedule)")
        sig = exploration.coarse_schedule(sched.sigmas, k, lam)
        for j in range(len(sig) - 1):
            t = self.adapter.timestep_from_sigma(sig[j]).expand(x.shape[0])
            out = self.guided(self.model, x, t, cond, uncond)
            x = sde.step(self.opts.sde, out, x, sig[j], sig[j + 1], 0.0).prev_sample
        return x

    def _finish(self, batch, G, latents, logp, train, cond, extras) -> Rollout:
        images = self.adapter.decode(latents[:, -1]).float()
        return Rollout(
            samples=images,
            logp_old=logp,
            train_mask=train.bool(),
            group_size=G,
            prompts=[p for p in batch.prompts for _ in range(G)],
            meta=[m for m in batch.meta for _ in range(G)],
            extras={"latents": latents, "cond": cond, **extras},
        )

    def _noise(self, gens: list[torch.Generator], G: int, shared_per_group: bool) -> torch.Tensor:
        """[N, *latent] Gaussian noise, drawn group by group from each prompt's generator (layout independent)."""
        shape = self.adapter.latent_shape()
        dev = self.adapter.device
        parts = []
        for g in gens:
            z = torch.randn((1 if shared_per_group else G, *shape), generator=g).to(dev)
            parts.append(z.expand(G, *shape) if shared_per_group else z)
        # states stay fp32 whatever the model dtype: logp_old is computed against the fp32 next state, so
        # storing it rounded to bf16 would make the recomputed log-prob differ (ratio != 1)
        return torch.cat(parts).float()

    @staticmethod
    def _t(sched: Schedule, i: int, x: torch.Tensor) -> torch.Tensor:
        return sched.timesteps[i].expand(x.shape[0]).to(x.device)

    # ------------------------------------------------------------------ recomputation
    def log_prob(self, rollout: Rollout, rows: torch.Tensor, units: torch.Tensor | None = None) -> LogProbs:
        """Log-probs (with grad) of steps ``units`` for ``rows``: one batched forward over rows x units."""
        o = self.opts
        if o.objective in ("flow_matching", "nft"):
            units = torch.arange(o.fm_timesteps) if units is None else units.cpu()
            return self._fm_log_prob(rollout, rows, units)
        sched = self.adapter.schedule(o.num_steps)
        units = torch.arange(sched.num_steps) if units is None else units.cpu()
        n, k = len(rows), len(units)
        if k == 0:
            zero = self.unwrapped_zero()
            return LogProbs(logp=zero.expand(n, 0), kl=None)
        lat = rollout.extras["latents"]
        rr, uu = rows.repeat_interleave(k), units.repeat(n)  # [n*k] pairs, row-major
        # G2RPO: the G rows of a group share x_k, so one forward per (group, unit) serves all of them
        fwd_rows = rr
        if rollout.extras.get("state_shared_in_group"):
            fwd_rows = (rr // rollout.group_size) * rollout.group_size
        key = torch.stack([fwd_rows, uu], 1)
        uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
        x = lat[uniq[:, 0], uniq[:, 1]]
        cond = self._cond_rows(rollout.extras["cond"], uniq[:, 0])
        t = sched.timesteps[uniq[:, 1]].to(x.device)
        uncond = self._uncond(len(uniq))
        out = self.guided(self.model, x, t, cond, uncond)[inverse]  # [n*k, ...]
        x_all, prev = lat[fwd_rows, uu], lat[rr, uu + 1]
        res = self._step_rows(out, x_all, uu, sched, prev)
        logp = res.log_prob.view(n, k)
        kl = None
        if o.reference_kl:
            with torch.no_grad(), self.reference() as ref_model:
                ref_out = self.guided(ref_model, x, t, cond, uncond)[inverse]
                ref = self._step_rows(ref_out, x_all, uu, sched, prev)
            kl = sde.gaussian_kl(res.mean, ref.mean, res.std).view(n, k)
        return LogProbs(logp=logp, kl=kl)

    def unwrapped_zero(self) -> torch.Tensor:
        p = next(iter(self.trainable_parameters()))
        return (p.sum() * 0.0).float().reshape(1, 1)

    def _step_rows(self, out, x, units, sched: Schedule, prev) -> sde.StepOutput:
        """Score ``prev`` under the step-``units`` Gaussian for a batch mixing different steps."""
        if self.adapter.parameterization == "ddim":
            a, a_prev = sched.alpha_bars[units].to(x.device), sched.alpha_bars[units + 1].to(x.device)
            return sde.ddim_step(out, x, a, a_prev, self.opts.noise_level, self.adapter.prediction_type, prev)
        sig, sig_next = sched.sigmas[units].to(x.device), sched.sigmas[units + 1].to(x.device)
        return sde.step(self.opts.sde, out, x, sig, sig_next, self.opts.noise_level, prev_sample=prev)

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The reference policy's denoiser: the LoRA adapter disabled, or (full fine-tuning) the frozen copy."""
        if self._frozen_reference is not None:
            yield self._frozen_reference
            return
        m = self.unwrapped()
        m.disable_adapters()
        try:
            yield m
        finally:
            m.enable_adapters()

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(self, prompts: list[Any], seeds: list[int], meta: list[dict] | None = None, noise_level: float = 0.0):
        """One deterministic (ODE, noise 0) or stochastic sample per prompt: [n, 3, H, W] in [0, 1]."""
        batch = PromptBatch(prompts=list(prompts), meta=meta or [{} for _ in prompts], seeds=list(seeds))
        saved = (self.opts.noise_level, self.opts.exploration, self.opts.objective)
        self.opts.noise_level, self.opts.exploration, self.opts.objective = noise_level, "full", "sde"
        try:
            return self.rollout(batch, 1).samples
        finally:
            self.opts.noise_level, self.opts.exploration, self.opts.objective = saved


def add_lora(denoiser: nn.Module, opts: DiffusionPolicyOptions, default_targets: list[str] | None) -> None:
    """Freeze the denoiser and add a trainable LoRA adapter (peft, through diffusers' adapter API)."""
    from peft import LoraConfig

    targets = opts.lora_targets or default_targets or ["to_q", "to_k", "to_v", "to_out.0"]
    denoiser.requires_grad_(False)
    config = LoraConfig(
        r=opts.lora_rank,
        lora_alpha=opts.lora_alpha or opts.lora_rank,
        init_lora_weights="gaussian",
        target_modules=targets,
    )
    denoiser.add_adapter(config)
    if not any(p.requires_grad for p in denoiser.parameters()):
        raise UserError(f"policy.options.lora_targets {targets} matched no module of the denoiser")
