"""Objectives on the final samples of a flow policy instead of its sampler's steps (registered objectives).

``objective: {name: flow_matching}``: advantage-weighted flow matching (AWM); ``objective: {name: nft}``:
DiffusionNFT's negative-aware matching (Zheng et al. 2025) against the sampling policy's velocity. The action units
of a row are ``timesteps`` (sigma, noise) draws on its final sample x0; the sampler is free (sde.noise_level 0 = the
ODE that evaluation uses), and with ``old_policy_ema`` > 0 it is an EMA of the trained weights (DiffusionNFT's soft
update), kept by the objective and checkpointed through ``training_state``.

Shapes: N rows, K = timesteps units, latents ``[N, *latent_shape]``; (row, unit) pairs flatten row-major.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mmgrpo.core.ema import EMA
from mmgrpo.core.errors import UserError
from mmgrpo.core.seeding import generator_for
from mmgrpo.core.types import LogProbs, Rollout
from mmgrpo.policies.exploration import FullOptions
from mmgrpo.policies.objectives import OBJECTIVES, DiffusionObjective

P = "policy.options.objective"


@dataclass
class FinalSampleOptions:
    """Options shared by the objectives on the final samples."""

    name: str = "flow_matching"
    timesteps: int = 2
    """(sigma, noise) draws per sample, each an action unit of the loss"""
    sigma_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    """the draws' sigmas are uniform in [lo, hi] (1 = pure noise: layout; 0 = clean: detail)"""
    shared_draws: bool = True
    """the G samples of a prompt share their (sigma, noise) draws (common random numbers, as DiffusionNFT/DGPO share
    noise in a group): with group-centred advantages the part of the gradient that comes from the draws themselves
    cancels, and what remains is the difference between the samples"""
    old_policy_ema: float = 0.0
    """the sampling ("old") policy is an EMA of the trained weights, updated once per training step before its
    rollouts: theta_old <- d theta_old + (1 - d) theta (DiffusionNFT's soft update; the rollouts and nft's v_old use
    it). 0 = the weights as they are at the rollout (on-policy). > 0 costs one fp32 copy of the trainable
    parameters, checkpointed with the run"""

    def __post_init__(self) -> None:
        rng = list(self.sigma_range)
        if len(rng) != 2 or not 0.0 <= rng[0] < rng[1] <= 1.0:
            raise UserError(f"{P}.sigma_range must be [lo, hi] with 0 <= lo < hi <= 1, got {self.sigma_range}")
        if self.timesteps < 1:
            raise UserError(f"{P}.timesteps must be >= 1, got {self.timesteps}")
        if not 0.0 <= self.old_policy_ema < 1.0:
            raise UserError(f"{P}.old_policy_ema must be in [0, 1) (0 = on-policy), got {self.old_policy_ema}")


@dataclass
class FlowMatchingOptions(FinalSampleOptions):
    name: str = "flow_matching"
    weighting: Literal["x0", "v"] = "x0"
    """per-draw weight of the velocity error. x0: sigma^2, i.e. the x0-prediction error (near sigma 0 the velocity
    target is the noise itself, which a clean image cannot predict: unweighted, those draws dominate and the shapes
    model degraded into a patch-grid pattern in 20 steps); v: 1 (SD3's plain v-loss)"""
    rollout_guidance_scale: float | None = None
    """classifier-free guidance of the training rollouts (None = policy.options.guidance_scale). Evaluation and
    generate() keep guidance_scale, so e.g. 2 here with guidance_scale 1 trains the unguided model on guided samples,
    weighted by their advantages (it learns what guidance adds, and what the reward adds). The sde objective scores
    the sampler's own steps and nft its unguided velocity, so they have no such option"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weighting not in ("x0", "v"):
            raise UserError(f"{P}.weighting: unknown {self.weighting!r}; known: v, x0")
        g = self.rollout_guidance_scale
        if g is not None and not (math.isfinite(g) and g >= 1.0):  # nan / inf: NaN rollouts, every step skipped
            raise UserError(f"{P}.rollout_guidance_scale must be >= 1 and finite (1 = off), or null, got {g}")


@dataclass
class NFTOptions(FinalSampleOptions):
    name: str = "nft"
    beta: float = 1.0
    """beta of the implicit policies v+ = beta v + (1 - beta) v_old and v- = (1 + beta) v_old - beta v (v the
    trained velocity, v_old the sampling policy's); the errors are divided by beta. DiffusionNFT's own weighting
    always applies: the x0 error divided by its (detached) mean absolute value"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise UserError(f"{P}.beta must be > 0 and finite (DiffusionNFT uses 1), got {self.beta}")


class FinalSampleObjective(DiffusionObjective):
    """Base of the objectives on the final samples x0: units are ``timesteps`` (sigma, noise) draws per sample."""

    Options = FinalSampleOptions

    def __init__(self, options: FinalSampleOptions):
        super().__init__(options)
        self.ema: EMA | None = None
        """the sampling policy's trainable weights (old_policy_ema > 0; else the trained weights sample)"""
        self._ema_step: int | None = None  # the training step whose rollouts last updated the EMA

    @classmethod
    def check_options(cls, opts: Any) -> None:
        if not isinstance(opts.exploration, FullOptions):
            raise UserError(
                f"{P}={opts.objective.name} trains the final samples, not sampler steps: exploration "
                f"{opts.exploration.name!r} means nothing there; set exploration=full (or leave it out)"
            )

    def check_adapter(self, adapter: Any) -> None:
        if adapter.parameterization != "flow":
            raise UserError(f"{P}={self.opts.name} needs a flow-matching family; {adapter.family} is a DDIM UNet: "
                            "use objective=sde with sde.kind=ddim")  # fmt: skip

    def attach(self, policy: Any) -> None:
        if self.opts.old_policy_ema > 0:
            self.ema = EMA(policy.trainable_parameters(), self.opts.old_policy_ema, f"{P}.old_policy_ema")

    @contextlib.contextmanager
    def sampling_weights(self, policy: Any, step: int) -> Iterator[None]:
        """Training rollouts sample with the old policy: its EMA is updated once per training step (at the step's
        first rollout), then its weights are swapped in while sampling. generate() samples with the sde objective,
        i.e. with the trained weights."""
        if self.ema is None:
            yield
            return
        if self._ema_step != step:
            self.ema.update()
            self._ema_step = step
        with self.ema.swapped():
            yield

    def training_state(self) -> dict[str, Any] | None:
        """The old policy's EMA (None without one)."""
        if self.ema is None:
            return None
        return {"old_policy": self.ema.state_dict(), "old_step": -1 if self._ema_step is None else self._ema_step}

    def load_training_state(self, state: dict[str, Any]) -> None:
        if self.ema is not None and state.get("old_policy") is not None:
            self.ema.load_state_dict(state["old_policy"])
            self._ema_step = None if state["old_step"] < 0 else int(state["old_step"])

    def finish_rollout(self, policy, batch, G, latents, logp, plan, cond, gens) -> Rollout:
        """Rollout whose units are ``timesteps`` (sigma, noise) draws on each final sample x0.

        Each row gets a seed from its prompt's generator (layout independent); the draws are regenerated from it
        whenever the log-prob is recomputed. ``logp_old`` comes from :meth:`behaviour_logp`, or from the update's own
        forward when the trainer says the rollout feeds one optimizer step (``policy.logp_old_from_update``) and the
        objective allows it.
        """
        n, K = latents.shape[0], self.opts.timesteps
        if self.opts.shared_draws:
            seeds = torch.cat([torch.randint(0, 2**62, (1,), generator=g).expand(G) for g in gens])  # [N]
        else:
            seeds = torch.cat([torch.randint(0, 2**62, (G,), generator=g) for g in gens])  # [N]
        # only the final states are kept: a copy of them, so the sampler's [N, T+1, ...] buffer is freed
        final = latents[:, -1:].contiguous()
        rollout = policy.finish(batch, G, final, torch.zeros(n, K), torch.ones(n, K), cond, {})
        rollout.extras["fm_seeds"] = seeds
        if policy.logp_old_from_update and self.logp_old_is_the_update_forward:  # one optimizer step: skip the forward
            rollout.logp_old_from_update = True
        else:
            # on the host, with the advantages and the mask (the update moves the recomputed log-probs there); in
            # forwards of at most the sampler's N samples (K draws a row: N * K at once could exhaust a GPU where the
            # sampling and the update fit)
            units = torch.arange(K)
            parts = torch.arange(n).split(max(1, n // K))
            rollout.logp_old = torch.cat([self.behaviour_logp(policy, rollout, r, units).cpu() for r in parts])
        return rollout

    logp_old_is_the_update_forward = True
    """:meth:`behaviour_logp` is the update's own computation at unchanged weights (so a rollout feeding one optimizer
    step may leave it to the update's forward); false when it records something else the loss needs (nft's v_old)"""

    def behaviour_logp(self, policy: Any, rollout: Rollout, rows: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """logp_old [N, K]: the trained weights' own surrogate at the rollout (ratio 1 before any update)."""
        return self._log_prob(policy, rollout, rows, units, grad=False).logp.detach()

    def draws(self, policy: Any, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas [n, K], noise [n, K, *latent]) of rows with these seeds; the same seed gives the same draws."""
        lo, hi = self.opts.sigma_range
        shape, K = policy.adapter.latent_shape(), self.opts.timesteps
        uniq, inverse = torch.unique(seeds, return_inverse=True)  # shared draws: one generation per group
        sig, eps = [], []
        for s in uniq.tolist():
            g = generator_for(int(s))
            sig.append(lo + (hi - lo) * torch.rand(K, generator=g))
            eps.append(torch.randn((K, *shape), generator=g))
        return torch.stack(sig)[inverse], torch.stack(eps)[inverse]

    def log_prob(self, policy: Any, rollout: Rollout, rows: torch.Tensor, units: torch.Tensor | None) -> LogProbs:
        units = torch.arange(self.opts.timesteps) if units is None else units.cpu()
        return self._log_prob(policy, rollout, rows, units)

    def _log_prob(self, policy, rollout: Rollout, rows: torch.Tensor, units: torch.Tensor, grad: bool = True):
        """Per-unit surrogate log-likelihood: minus the error of the velocity at a noised x0 (:meth:`errors`).

        No CFG: the conditional velocity is trained, as both papers do. With reference_kl, the KL is the v-space
        surrogate mean((v - v_ref)^2) (Flow-Factory's "v-based").
        """
        xt, x0r, eps, sig, t, cond = self.inputs(policy, rollout, rows, units)
        n, k = len(rows), len(units)
        with torch.set_grad_enabled(grad):
            v = policy.adapter.predict(policy.model, xt.to(policy.adapter.dtype), t, cond).float()
            err, neg = self.errors(v, rollout, rows, units, xt, x0r, eps, sig)
        kl = None
        if policy.opts.reference_kl:
            with torch.no_grad(), policy.reference() as ref_model:
                v_ref = policy.adapter.predict(ref_model, xt.to(policy.adapter.dtype), t, cond).float()
            kl = (v - v_ref).pow(2).flatten(1).mean(1).view(n, k)
        return LogProbs(logp=-err.view(n, k), kl=kl, neg_logp=None if neg is None else -neg.view(n, k))

    @abc.abstractmethod
    def errors(self, v, rollout, rows, units, xt, x0, eps, sig) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The error [n*k] the loss lowers (and, for nft, the implicit negative policy's) of velocity v [n*k, ...]."""

    def inputs(self, policy: Any, rollout: Rollout, rows: torch.Tensor, units: torch.Tensor):
        """Flattened (row, unit) pairs, row-major: x_t = (1 - sigma) x0 + sigma eps [n*k, *latent], x0, eps,
        sigma [n*k, 1, ...] (broadcastable), the model's timesteps [n*k] and conditioning."""
        x0 = rollout.extras["latents"][rows, -1]  # [n, *latent]
        sig, eps = self.draws(policy, rollout.extras["fm_seeds"][rows.cpu()])
        sig, eps = sig[:, units], eps[:, units]  # [n, k], [n, k, *latent]
        n, k = sig.shape
        dev = x0.device
        sig = sig.to(dev).reshape((n * k,) + (1,) * (x0.dim() - 1))
        x0r = x0.repeat_interleave(k, 0)
        eps = eps.reshape(n * k, *x0.shape[1:]).to(dev)
        xt = (1.0 - sig) * x0r + sig * eps
        t = policy.adapter.timestep_from_sigma(sig.flatten()).to(dev)
        cond = policy.cond_rows(rollout.extras["cond"], rows.repeat_interleave(k))
        return xt, x0r, eps, sig, t, cond


@OBJECTIVES.register("flow_matching")
class FlowMatchingObjective(FinalSampleObjective):
    """Advantage-weighted flow matching on the final samples (AWM, on-policy DiffusionNFT; flow families)."""

    Options = FlowMatchingOptions

    def guidance_scale(self, opts: Any) -> float:
        return opts.guidance_scale if self.opts.rollout_guidance_scale is None else self.opts.rollout_guidance_scale

    def errors(self, v, rollout, rows, units, xt, x0, eps, sig) -> tuple[torch.Tensor, None]:
        """unit u of row r: logp = -w(sigma) mean((v(x_t, sigma) - (eps - x0))^2) over the latent's elements, w =
        sigma^2 (weighting x0) or 1 (v). It is a (weighted) per-(sigma, noise) term of the flow-matching ELBO, so
        advantage x grad(logp) is AWM's advantage-weighted matching (and, on policy, DiffusionNFT's direction)."""
        err = (v - (eps - x0)).pow(2).flatten(1).mean(1)  # [n*k]
        if self.opts.weighting == "x0":
            err = sig.flatten().square() * err  # x0 - x0_hat = sigma (v_hat - v)
        return err, None


@OBJECTIVES.register("nft")
class NFTObjective(FinalSampleObjective):
    """DiffusionNFT: implicit positive and negative policies around the sampling policy's velocity (loss nft)."""

    Options = NFTOptions
    loss = "nft"
    logp_old_is_the_update_forward = False  # behaviour_logp stores v_old, which every nft loss needs
    loss_hint = " and loss.adv_clip"

    def behaviour_logp(self, policy: Any, rollout: Rollout, rows: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """Stores the sampling policy's velocity at every draw, ``extras["fm_v_old"] [N, K, *latent]`` fp32 (one
        forward here instead of one per update); logp_old is the sampling policy's own error (v+ = v- = v_old): the
        behaviour policy's, as in PPO, so the ratio exp(logp - logp_old) measures how far the trained positive
        policy moved from the sampler."""
        xt, x0, _, sig, t, cond_k = self.inputs(policy, rollout, rows, units)
        with self.ema.swapped() if self.ema is not None else contextlib.nullcontext():  # the sampler's weights
            v_old = policy.adapter.predict(policy.unwrapped(), xt.to(policy.adapter.dtype), t, cond_k).float()
        n, K = len(rows), len(units)
        if "fm_v_old" not in rollout.extras:  # the rollout's first part (finish_rollout calls this in parts)
            rollout.extras["fm_v_old"] = v_old.new_empty((rollout.num_rows, K, *v_old.shape[1:]))
        rollout.extras["fm_v_old"][rows.to(v_old.device)] = v_old.view(n, K, *v_old.shape[1:])
        return -self.nft_errors(v_old, v_old, xt, x0, sig)[0].view(n, K)

    def errors(self, v, rollout, rows, units, xt, x0, eps, sig) -> tuple[torch.Tensor, torch.Tensor]:
        v_old = rollout.extras["fm_v_old"][rows][:, units.to(xt.device)].flatten(0, 1)  # stored by the rollout
        return self.nft_errors(v, v_old, xt, x0, sig)

    def nft_errors(self, v, v_old, xt, x0, sig) -> tuple[torch.Tensor, torch.Tensor]:
        """DiffusionNFT's errors [n*k] of the implicit positive policy v+ = b v + (1 - b) v_old and negative
        policy v- = (1 + b) v_old - b v (b = beta): the x0-prediction error mean((x_t - sigma v' - x0)^2)
        divided by its own detached mean absolute value (the paper's adaptive weighting), then by b."""
        b = self.opts.beta
        out = []
        for pred in (b * v + (1.0 - b) * v_old, (1.0 + b) * v_old - b * v):
            diff = (xt - sig * pred) - x0  # [n*k, *latent]
            scale = diff.detach().abs().flatten(1).mean(1).clamp_min(1e-5)
            out.append(diff.pow(2).flatten(1).mean(1) / scale / b)
        return out[0], out[1]
