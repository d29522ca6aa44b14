"""Dynamic reward weighting: the weights of several rewards adapted online from how each objective is progressing,
kept as training state (checkpointed, resumed exactly). Switched on by ``methods: {dynamic_weights: {lr: 0.5}}``
with two or more rewards.

Lu et al. 2025, "Learning to Optimize Multi-Objective Alignment Through Dynamic Reward Weighting" (arXiv
2509.11452). Linear scalarisation with fixed weights provably misses the non-convex parts of a Pareto front, and
objectives saturate at different times; the paper adapts the weights during online RL (hypervolume-guided
adaptation, and gradient-based weight optimisation over the objectives' influence on the policy). Only the
abstract was available here: the update below is OUR multiplicative-weights rule in that spirit, not the paper's
equations (its gradient-based variant needs one policy gradient per objective per step, which we do not compute).

State: a point w on the simplex (R rewards, w = 1/R at the start), the running level mu_k and spread s_k (EMAs)
of each reward's batch mean m_k and batch std sd_k. Step t uses the weights

    weight_k(t) = base_k * R * w_k(t)          (base_k: the config's weight; w uniform -> exactly the config's)

and then, from that step's rewards of ALL processes (so every rank holds the same state):

    g_k   = (m_k - mu_k) / (s_k + eps)                           progress of objective k, in its own spread
    w_k  <- w_k exp(-lr g_k) / Z                                  exponentiated gradient (mirror descent) on the
    w    <- (1 - R floor) w + floor                               simplex, then every objective keeps >= floor
    mu_k <- (1 - ema) mu_k + ema m_k,   s_k <- (1 - ema) s_k + ema sd_k

so an objective that is improving fast (or saturating above its running level) hands weight to the ones that lag or
regress, and the weights move through the front instead of fixing one trade-off. On the first step mu and s are set
to that step's m and sd (g = 0). A reward that applies to no row of a step leaves its weight and statistics alone.
Logged: ``dynw/w<k>`` (the weight of reward k used this step, base included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mmgrpo.core.errors import UserError
from mmgrpo.methods.registry import Method, register_method


@dataclass
class DynamicWeightsOptions:
    lr: float = 0.5
    """step size of the exponentiated-gradient update of the weights"""
    ema: float = 0.1
    """EMA rate of each reward's running level and spread"""
    floor: float = 0.05
    """every reward keeps at least this share of the simplex (< 1 / number of rewards)"""
    eps: float = 1e-6


def update_simplex(w: torch.Tensor, g: torch.Tensor, lr: float, floor: float) -> torch.Tensor:
    """One exponentiated-gradient step on the simplex: w [R] * exp(-lr g [R]), normalised, mixed with ``floor``."""
    z = torch.log(w) - lr * g
    w = torch.softmax(z, dim=0)
    return (1.0 - floor * w.numel()) * w + floor


class DynamicWeights:
    """The stateful reward weighter (module doc): ``self(weights [R], rewards [V, R, N], kinds, step)``."""

    def __init__(self, opts: DynamicWeightsOptions):
        self.opts = opts
        self.w: torch.Tensor | None = None  # [R] on the simplex
        self.mu: torch.Tensor | None = None  # [R]
        self.s: torch.Tensor | None = None  # [R]

    def __call__(self, weights: torch.Tensor, rewards: torch.Tensor, kinds: list[str], step: int):
        o = self.opts
        cols = torch.as_tensor(rewards, dtype=torch.float32)[0]  # [R, N] the main samples
        R = cols.shape[0]
        if self.w is None:
            self.w = torch.full((R,), 1.0 / R)
        if self.w.numel() != R:
            raise UserError(f"methods.dynamic_weights: the state holds {self.w.numel()} weights but the run has {R} "
                            "rewards; resume with the same rewards: list")  # fmt: skip
        used = self.current(weights)  # [R]
        valid = ~cols.isnan()
        have = valid.any(-1)  # [R]
        m = torch.where(valid, cols, 0.0).sum(-1) / valid.sum(-1).clamp_min(1)  # [R]
        dev = torch.where(valid, (cols - m[:, None]) ** 2, 0.0).sum(-1) / valid.sum(-1).clamp_min(1)
        sd = dev.sqrt()
        if self.mu is None:
            self.mu, self.s = m.clone(), sd.clone()
        else:
            g = torch.where(have, (m - self.mu) / (self.s + o.eps), 0.0)
            self.w = update_simplex(self.w, g, o.lr, o.floor)
            self.mu = torch.where(have, (1 - o.ema) * self.mu + o.ema * m, self.mu)
            self.s = torch.where(have, (1 - o.ema) * self.s + o.ema * sd, self.s)
        if not bool(torch.isfinite(self.w).all()):
            raise UserError("methods.dynamic_weights: the weights became non-finite; lower methods.dynamic_weights.lr")
        return used, {f"dynw/w{k}": float(used[k]) for k in range(R)}

    def current(self, weights: torch.Tensor) -> torch.Tensor:
        """The weights [R] the next call uses with the config's ``weights`` [R] (its state unchanged): what DAPO's
        dynamic sampling tests a group's spread under, before the step's advantage."""
        R = weights.numel()
        w = torch.full((R,), 1.0 / R) if self.w is None or self.w.numel() != R else self.w
        return weights.float() * R * w

    def state_dict(self) -> dict[str, Any]:
        if self.w is None:
            return {}
        out = {"w": self.w.clone()}
        if self.mu is not None:
            out.update(mu=self.mu.clone(), s=self.s.clone())
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.w = state["w"].float().clone() if "w" in state else None
        self.mu = state["mu"].float().clone() if "mu" in state else None
        self.s = state["s"].float().clone() if "s" in state else None


def check_dynamic_weights(opts: DynamicWeightsOptions, cfg: Any, key: str) -> None:
    R = len(cfg.rewards)
    if R < 2:
        raise UserError(f"{key}: dynamic reward weighting balances several rewards, but rewards: lists {R}; add "
                        "another reward or remove methods.dynamic_weights")  # fmt: skip
    if not (math.isfinite(opts.lr) and opts.lr > 0):
        raise UserError(f"{key}: lr={opts.lr} must be a finite number > 0, e.g. 0.5")
    if not 0.0 < opts.ema <= 1.0:
        raise UserError(f"{key}: ema={opts.ema} must lie in (0, 1], e.g. 0.1")
    if not 0.0 <= opts.floor < 1.0 / R:
        raise UserError(f"{key}: floor={opts.floor} must lie in [0, 1/{R}) (every reward's minimum share)")
    if not opts.eps > 0:
        raise UserError(f"{key}: eps={opts.eps} must be > 0")


METHOD = register_method(
    Method(
        name="dynamic_weights",
        paper="Dynamic reward weighting (Lu et al. 2025, arXiv 2509.11452): reward weights adapted online, as state",
        options=DynamicWeightsOptions,
        check=check_dynamic_weights,
        reward_weights=lambda opts: DynamicWeights(opts),
    )
)
