"""Objectives on the final samples of a flow policy instead of its sampler's steps (a mixin of DiffusionPolicy).

``objective=flow_matching``: advantage-weighted flow matching (AWM); ``objective=nft``: DiffusionNFT's
negative-aware matching (Zheng et al. 2025) against the sampling policy's velocity. The action units of a row are
``fm_timesteps`` (sigma, noise) draws on its final sample x0; the sampler is free (noise_level 0 = the ODE that
evaluation uses), and with ``old_policy_ema`` > 0 it is an EMA of the trained weights (DiffusionNFT's soft update),
kept here and checkpointed through ``training_state``.

Shapes: N rows, K = fm_timesteps units, latents ``[N, *latent_shape]``; (row, unit) pairs flatten row-major.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from mmgrpo.core.ema import EMA
from mmgrpo.core.errors import UserError
from mmgrpo.core.seeding import generator_for
from mmgrpo.core.types import LogProbs, Rollout


class FinalSampleObjectives:
    """The flow_matching / nft half of :class:`~mmgrpo.policies.diffusion.DiffusionPolicy`. It uses the policy's
    ``opts``, ``adapter``, ``model``, ``unwrapped()``, ``reference()``, ``_finish()`` and ``_cond_rows()``."""

    def _init_old_policy(self) -> None:
        o = self.opts
        self._old: EMA | None = None
        """the sampling policy's trainable weights (old_policy_ema > 0; else the trained weights sample)"""
        self._old_step: int | None = None  # the training step whose rollouts last updated _old
        if o.old_policy_ema > 0:
            self._old = EMA(self.trainable_parameters(), o.old_policy_ema, "policy.options.old_policy_ema")

    @contextlib.contextmanager
    def _sampling_policy(self, step: int) -> Iterator[None]:
        """Training rollouts of objective flow_matching/nft sample with the old policy: its EMA is updated once
        per training step (at the step's first rollout), then its weights are swapped in while sampling.
        generate() samples as objective=sde, i.e. with the trained weights."""
        if self._old is None or self.opts.objective == "sde":
            yield
            return
        if self._old_step != step:
            self._old.update()
            self._old_step = step
        with self._old.swapped():
            yield

    def training_state(self) -> dict[str, Any] | None:
        """What a checkpoint keeps besides the trained weights: the old policy's EMA (None without one)."""
        if self._old is None:
            return None
        return {"old_policy": self._old.state_dict(), "old_step": -1 if self._old_step is None else self._old_step}

    def load_training_state(self, state: dict[str, Any]) -> None:
        if self._old is not None and state.get("old_policy") is not None:
            self._old.load_state_dict(state["old_policy"])
            self._old_step = None if state["old_step"] < 0 else int(state["old_step"])

    def _finish_flow_matching(self, batch, G, latents, cond, gens) -> Rollout:
        """Rollout whose units are fm_timesteps (sigma, noise) draws on each final sample x0.

        Each row gets a seed from its prompt's generator (layout independent); the draws are regenerated from
        it whenever the log-prob is recomputed. objective=nft also stores the sampling policy's velocity at every
        draw, ``extras["fm_v_old"] [N, K, *latent]`` fp32 (one forward here instead of one per update), and its
        logp_old is the sampling policy's own error (v+ = v- = v_old): the behaviour policy's, as in PPO, so the
        ratio exp(logp - logp_old) measures how far the trained positive policy moved from the sampler.
        """
        n, K = latents.shape[0], self.opts.fm_timesteps
        if self.opts.fm_shared_draws:
            seeds = torch.cat([torch.randint(0, 2**62, (1,), generator=g).expand(G) for g in gens])  # [N]
        else:
            seeds = torch.cat([torch.randint(0, 2**62, (G,), generator=g) for g in gens])  # [N]
        rollout = self._finish(batch, G, latents[:, -1:], torch.zeros(n, K), torch.ones(n, K), cond, {})
        rollout.extras["fm_seeds"] = seeds
        rows, units = torch.arange(n), torch.arange(K)
        if self.opts.objective != "nft":
            rollout.logp_old = self._fm_log_prob(rollout, rows, units, grad=False).logp.detach()
            return rollout
        xt, x0, _, sig, t, cond_k = self._fm_inputs(rollout, rows, units)
        with self._old.swapped() if self._old is not None else contextlib.nullcontext():  # the sampler's weights
            v_old = self.adapter.predict(self.unwrapped(), xt.to(self.adapter.dtype), t, cond_k).float()
        rollout.extras["fm_v_old"] = v_old.view(n, K, *v_old.shape[1:])
        rollout.logp_old = -self._nft_errors(v_old, v_old, xt, x0, sig)[0].view(n, K)
        return rollout

    def _fm_draws(self, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas [n, K], noise [n, K, *latent]) of rows with these seeds; the same seed gives the same draws."""
        lo, hi = self.opts.fm_sigma_range
        shape, K = self.adapter.latent_shape(), self.opts.fm_timesteps
        uniq, inverse = torch.unique(seeds, return_inverse=True)  # shared draws: one generation per group
        sig, eps = [], []
        for s in uniq.tolist():
            g = generator_for(int(s))
            sig.append(lo + (hi - lo) * torch.rand(K, generator=g))
            eps.append(torch.randn((K, *shape), generator=g))
        return torch.stack(sig)[inverse], torch.stack(eps)[inverse]

    def _fm_log_prob(self, rollout: Rollout, rows: torch.Tensor, units: torch.Tensor, grad: bool = True) -> LogProbs:
        """Per-unit surrogate log-likelihood: minus the flow-matching error of the velocity at a noised x0.

        unit u of row r: x_t = (1 - sigma) x0 + sigma eps, logp = -w(sigma) mean((v(x_t, sigma) - (eps - x0))^2)
        over the latent's elements, w = sigma^2 (fm_weighting x0) or 1 (v). It is a (weighted) per-(sigma, noise)
        term of the flow-matching ELBO, so advantage x grad(logp) is AWM's advantage-weighted matching (and, on
        policy, DiffusionNFT's update direction). No CFG: the conditional velocity is trained, as both papers do.
        objective=nft: logp and neg_logp are minus the errors of DiffusionNFT's implicit policies (``_nft_errors``).
        """
        o = self.opts
        xt, x0r, eps, sig, t, cond = self._fm_inputs(rollout, rows, units)
        n, k = len(rows), len(units)
        neg = None
        with torch.set_grad_enabled(grad):
            v = self.adapter.predict(self.model, xt.to(self.adapter.dtype), t, cond).float()
            if o.objective == "nft":  # the sampling policy's velocity, stored by the rollout
                v_old = rollout.extras["fm_v_old"][rows][:, units.to(xt.device)].flatten(0, 1)
                err, neg = self._nft_errors(v, v_old, xt, x0r, sig)
            else:
                err = (v - (eps - x0r)).pow(2).flatten(1).mean(1)  # [n*k]
                if o.fm_weighting == "x0":
                    err = sig.flatten().square() * err  # x0 - x0_hat = sigma (v_hat - v)
        kl = None
        if o.reference_kl:
            with torch.no_grad(), self.reference() as ref_model:
                v_ref = self.adapter.predict(ref_model, xt.to(self.adapter.dtype), t, cond).float()
            kl = (v - v_ref).pow(2).flatten(1).mean(1).view(n, k)  # v-space KL surrogate (Flow-Factory "v-based")
        return LogProbs(logp=-err.view(n, k), kl=kl, neg_logp=None if neg is None else -neg.view(n, k))

    def _fm_inputs(self, rollout: Rollout, rows: torch.Tensor, units: torch.Tensor):
        """Flattened (row, unit) pairs, row-major: x_t = (1 - sigma) x0 + sigma eps [n*k, *latent], x0, eps,
        sigma [n*k, 1, ...] (broadcastable), the model's timesteps [n*k] and conditioning."""
        x0 = rollout.extras["latents"][rows, -1]  # [n, *latent]
        sig, eps = self._fm_draws(rollout.extras["fm_seeds"][rows.cpu()])
        sig, eps = sig[:, units], eps[:, units]  # [n, k], [n, k, *latent]
        n, k = sig.shape
        dev = x0.device
        sig = sig.to(dev).reshape((n * k,) + (1,) * (x0.dim() - 1))
        x0r = x0.repeat_interleave(k, 0)
        eps = eps.reshape(n * k, *x0.shape[1:]).to(dev)
        xt = (1.0 - sig) * x0r + sig * eps
        t = self.adapter.timestep_from_sigma(sig.flatten()).to(dev)
        cond = self._cond_rows(rollout.extras["cond"], rows.repeat_interleave(k))
        return xt, x0r, eps, sig, t, cond

    def _nft_errors(self, v, v_old, xt, x0, sig) -> tuple[torch.Tensor, torch.Tensor]:
        """DiffusionNFT's errors [n*k] of the implicit positive policy v+ = b v + (1 - b) v_old and negative
        policy v- = (1 + b) v_old - b v (b = nft_beta): the x0-prediction error mean((x_t - sigma v' - x0)^2)
        divided by its own detached mean absolute value (the paper's adaptive weighting), then by b."""
        b = self.opts.nft_beta
        out = []
        for pred in (b * v + (1.0 - b) * v_old, (1.0 + b) * v_old - b * v):
            diff = (xt - sig * pred) - x0  # [n*k, *latent]
            scale = diff.detach().abs().flatten(1).mean(1).clamp_min(1e-5)
            out.append(diff.pow(2).flatten(1).mean(1) / scale / b)
        return out[0], out[1]


def check_loss(opts: Any, loss_name: str) -> None:
    """At build time (``opts``: the policy's DiffusionPolicyOptions): objective=nft and loss.name=nft go together
    (the loss combines the two implicit policies'
    errors that only that objective computes)."""
    if opts.objective == "nft" and loss_name != "nft":
        raise UserError(
            f"policy.options.objective=nft trains DiffusionNFT's implicit policies, which only loss.name=nft "
            f"combines (got loss.name={loss_name!r}): set loss.name=nft and loss.adv_clip"
        )
    if loss_name == "nft" and opts.objective != "nft":
        raise UserError(f"loss.name=nft needs policy.options.objective=nft (got objective={opts.objective!r})")
