"""One denoising step of a diffusion / flow sampler, seen as a Gaussian policy step (pure fp32 maths, no model).

A sampler that adds fresh Gaussian noise at a step is a stochastic policy: given the state ``x_t`` and the
network output, the next state is drawn from ``N(mean, std^2)`` with a mean and std that depend on the
dynamics. Every function here returns :class:`StepOutput` ``(prev_sample, log_prob, mean, std)`` for one step
of one dynamics:

- ``flow_grpo`` -- Flow-GRPO (Liu et al. 2025) flow-SDE with a sigma-dependent diffusion coefficient.
- ``dance``     -- DanceGRPO (Xue et al. 2025) flow-SDE with a constant eta.
- ``cps``       -- Coefficients-Preserving Sampling (Wang & Yu 2025), a DDIM-like flow step.
- :func:`ddim_step` -- DDIM with eta for epsilon / v-prediction UNets (DDPO, Black et al. 2023).

Flow conventions: ``x_sigma = (1 - sigma) x0 + sigma * noise`` and the model predicts the velocity
``v = noise - x0``; sampling goes from sigma = 1 (noise) to sigma = 0 (data), so ``dt = sigma_next - sigma < 0``
and the deterministic (ODE, Euler) step is ``x + dt * v``. Noise level 0 reproduces that Euler step exactly
(bit for bit) for all three flow kinds.

Shapes: ``sample``, ``model_output``, ``prev_sample``, ``mean`` are ``[N, ...]`` (e.g. ``[N, C, H, W]`` or
``[N, C, F, H, W]``); sigma / alpha-bar values and noise levels are python floats, 0-d tensors or one value
per row ``[N]``; ``std`` comes back broadcastable to ``[N, ...]``; ``log_prob`` is ``[N]``.

**log_prob is averaged, not summed, over the D non-batch elements** (as Flow-GRPO, DanceGRPO and DDPO do).
The per-row ratio ``exp(logp_new - logp_old)`` is then the *geometric mean* of the D per-element ratios, and
its log is 1/D of the summed log-ratio. With D = 16*64*64 = 65536 latent elements, a policy update that moves
the summed log-density by O(1) moves the averaged one by ~1e-5: that is why the clip ranges used with these
policies are ~1e-4 (Flow-GRPO) rather than PPO's 0.2, and why they must not be reused with a summed log-prob.

Everything is computed in fp32 (inputs are cast; outputs are fp32): the ratios above are exp of log-density
differences of order 1e-6, far below bf16's resolution (~4e-3 relative), so in bf16 they would round to 0
and every ratio would be exactly 1.

Steps whose std is 0 (noise level 0, CPS at sigma_next = 0, DDIM with eta = 0 or at alpha_bar_prev = 1) are
deterministic: a Dirac has no density, so such rows get ``log_prob = 0`` and ``prev_sample = mean`` exactly.
Exploration schedules never train those steps (``mmgrpo.policies.exploration``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.registry import Registry

Scalar = float | torch.Tensor
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepOutput:
    """One stochastic step: ``prev_sample ~ N(mean, std^2)`` and its log-density.

    ``prev_sample [N, ...]``, ``mean [N, ...]``, ``log_prob [N]`` (mean over non-batch dims) and ``std``
    (broadcastable to ``[N, ...]``), all fp32.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


SDE_KINDS: Registry[Callable[..., StepOutput]] = Registry("sde kind", plugins="sde")


@dataclass
class SDEOptions:
    """The sampler's dynamics (``policy.options.sde``): which SDE a stochastic step follows, and how noisy it is."""

    kind: str = "flow_grpo"
    """flow families: flow_grpo (Flow-GRPO), dance (DanceGRPO), cps (a name in SDE_KINDS); UNet families: ddim"""
    noise_level: float = 0.7
    """flow_grpo: a; dance: eta; cps: a in [0, 1]; ddim: eta in [0, 1] (0 = the deterministic ODE everywhere)"""

    UNET_KIND: ClassVar[str] = "ddim"
    MAX_NOISE_LEVEL: ClassVar[dict[str, float]] = {"cps": 1.0, "ddim": 1.0, "flow_grpo": 5.0, "dance": 5.0}
    """cps, ddim: the noise level is a fraction of the step's noise (sin(a pi / 2), DDIM's eta), above 1 undefined;
    flow_grpo, dance: a scale of the step's noise, published at 0.3-1 (Flow-GRPO's a = 0.7, DanceGRPO's eta = 0.3),
    so 5 leaves room to explore while 1e30 (which passed) made every sample NaN"""

    def __post_init__(self) -> None:
        # checked when the config is loaded, so a bad value fails before any model loads
        if self.kind != self.UNET_KIND and self.kind not in SDE_KINDS:
            raise UserError(f"policy.options.sde.kind: {SDE_KINDS.unknown_message(self.kind)}; UNet families "
                            f"(sd) use {self.UNET_KIND}")  # fmt: skip
        top = self.MAX_NOISE_LEVEL.get(self.kind, float("inf"))
        if not (math.isfinite(self.noise_level) and 0.0 <= self.noise_level <= top):  # inf: NaN samples
            raise UserError(
                f"policy.options.sde.noise_level={self.noise_level} is out of range for sde.kind={self.kind}: it "
                + (f"must be in [0, {top}]" if top < float("inf") else "must be a finite number >= 0")
                + " (0 = the deterministic ODE step); lower it, or use kind flow_grpo or dance"
            )


# ----------------------------------------------------------------------------------------------- helpers


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)


def _per_row(value: Scalar, like: torch.Tensor, name: str) -> torch.Tensor:
    """``value`` (float, 0-d, [N] or [N, 1, ..., 1]) as an fp32 tensor broadcastable to ``like`` [N, ...], on the
    value's own device (a float: the CPU): the caller checks it there, then moves it to ``like``'s device with
    :func:`_to`. So a step whose scalars come from the host makes no host-device synchronisation."""
    t = torch.as_tensor(value).to(torch.float32)
    n, nd = like.shape[0], like.ndim
    if t.ndim == 0:
        return t.reshape([1] * nd)
    if t.ndim == 1 and t.shape[0] in (1, n):
        return t.reshape(-1, *[1] * (nd - 1))
    if t.ndim == nd and t.shape[0] in (1, n) and all(s == 1 for s in t.shape[1:]):
        return t
    raise UserError(
        f"{name} has shape {tuple(t.shape)} for a sample of shape {tuple(like.shape)}; "
        f"give a float, a 0-d tensor or one value per row (shape [{n}])"
    )


def _to(like: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``values`` (checked by the caller where they were) on ``like``'s device."""
    return tuple(v.to(like.device, non_blocking=True) for v in values)


def _require(ok: torch.Tensor, message: str, values: torch.Tensor) -> None:
    if not bool(ok.all()):
        shown = values.detach().flatten()[:8].tolist()
        raise UserError(f"{message}; got {shown}")


def _check_sample(sample: torch.Tensor, model_output: torch.Tensor) -> None:
    if sample.ndim < 2:
        raise UserError(
            f"sample has shape {tuple(sample.shape)}; it needs a batch dim and at least one more [N, ...] "
            "(log_prob averages over the non-batch dims); add one with sample[:, None]"
        )
    if model_output.shape != sample.shape:
        raise UserError(
            f"model_output has shape {tuple(model_output.shape)} but sample has {tuple(sample.shape)}; they must match"
        )


def _flow_inputs(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    level_top: tuple[float, str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``(v, x, sigma, sigma_next, noise_level)``, validated where the scalars were given (``level_top``: a
    kind's (largest noise level, message)); scalars broadcastable to ``x`` [N, ...] on its device."""
    _check_sample(sample, model_output)
    v, x = _f32(model_output), _f32(sample)
    s = _per_row(sigma, x, "sigma")
    s_next = _per_row(sigma_next, x, "sigma_next")
    a = _per_row(noise_level, x, "noise_level")
    _require((s > 0) & (s <= 1), "sigma must be in (0, 1] (flow matching: 1 is pure noise)", s)
    _require(s_next >= 0, "sigma_next must be >= 0", s_next)
    _require(
        s_next < s, "sigma_next must be < sigma (sampling runs from noise, sigma = 1, to data, sigma = 0)", s_next
    )
    _require(a >= 0, "noise_level must be >= 0 (0 is the deterministic ODE step)", a)
    if level_top is not None:
        _require(a <= level_top[0], level_top[1], a)
    return (v, x, *_to(x, s, s_next, a))


def _draw_noise(like: torch.Tensor, generator: torch.Generator | None, noise: torch.Tensor | None) -> torch.Tensor:
    """Standard normal eps [N, ...] fp32: ``noise`` if given, else drawn on the generator's device."""
    if noise is not None:
        if noise.shape != like.shape:
            raise UserError(
                f"noise has shape {tuple(noise.shape)} but sample has {tuple(like.shape)}; they must match"
            )
        return _f32(noise).to(like.device)
    device = generator.device if generator is not None else like.device
    # drawn on the generator's device (a CPU generator with a CUDA sample stays reproducible), then moved
    return torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


def _gaussian_step(
    mean: torch.Tensor,
    std: torch.Tensor,
    prev_sample: torch.Tensor | None,
    generator: torch.Generator | None,
    noise: torch.Tensor | None,
) -> StepOutput:
    """Sample ``prev ~ N(mean, std^2)`` (or take the given one) and its per-row averaged log-density.

    mean [N, ...], std broadcastable [N, 1, ...] or [1, ...]. Rows with std == 0 are deterministic:
    prev = mean and log_prob = 0. The given prev_sample is detached: it is the recorded action (data), so the
    gradient of log_prob reaches the parameters only through ``mean`` (as in Flow-GRPO and DDPO).
    """
    if prev_sample is None:
        prev = mean + std * _draw_noise(mean, generator, noise)  # std == 0 rows: mean + 0 * eps == mean exactly
    else:
        if prev_sample.shape != mean.shape:
            raise UserError(
                f"prev_sample has shape {tuple(prev_sample.shape)} but sample has {tuple(mean.shape)}; they must match"
            )
        prev = _f32(prev_sample).detach()
    noisy = std > 0  # broadcastable [N, 1, ...]
    safe_std = torch.where(noisy, std, torch.ones_like(std))  # avoids 0/0 and log(0) on deterministic rows
    # -(d^2) / (2 std^2) as d^2 / -(2 std^2): the same bits (IEEE division is symmetric in sign), one pass less
    elem = (prev.detach() - mean) ** 2 / -(2 * safe_std**2) - torch.log(safe_std) - LOG_SQRT_2PI  # [N, ...]
    log_prob = elem.mean(dim=tuple(range(1, elem.ndim)))  # [N]: mean, not sum, over the D non-batch elements
    # deterministic rows get 0, chosen per row after the mean (the same values and gradient as choosing each element,
    # without a pass over [N, ...])
    log_prob = torch.where(noisy.reshape(noisy.shape[0]), log_prob, 0.0)
    return StepOutput(prev_sample=prev, log_prob=log_prob, mean=mean, std=std.expand([mean.shape[0], *std.shape[1:]]))


# ----------------------------------------------------------------------------------------------- flow kinds


@SDE_KINDS.register("flow_grpo")
def flow_grpo_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> StepOutput:
    """Flow-GRPO flow-SDE step (Liu et al. 2025): marginal-preserving SDE with std_t = a*sqrt(sigma/(1-sigma)).

    With a = noise_level and dt = sigma_next - sigma < 0::

        std_t = a * sqrt(sigma / (1 - sigma))        # at sigma == 1, sigma_next replaces sigma in 1 - sigma
        mean  = x * (1 + std_t^2 dt / (2 sigma)) + v * (1 + std_t^2 (1 - sigma) / (2 sigma)) * dt
        std   = std_t * sqrt(-dt)

    Equivalently ``mean = x + dt v + dt std_t^2 / (2 sigma) * x1`` with ``x1 = x + (1 - sigma) v`` the predicted
    noise: the same drift as DanceGRPO's step with eta = std_t. Shapes: model_output (velocity), sample [N, ...];
    sigma, sigma_next, noise_level float or [N]; returns StepOutput (log_prob [N]).
    """
    v, x, s, s_next, a = _flow_inputs(model_output, sample, sigma, sigma_next, noise_level)
    dt = s_next - s  # < 0
    std_t = a * torch.sqrt(s / (1 - torch.where(s == 1, s_next, s)))  # sigma = 1 would divide by 0
    mean = x * (1 + std_t**2 * dt / (2 * s)) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt  # a = 0: x + v dt
    return _gaussian_step(mean, std_t * torch.sqrt(-dt), prev_sample, generator, noise)


@SDE_KINDS.register("dance")
def dance_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> StepOutput:
    """DanceGRPO flow-SDE step (Xue et al. 2025): constant diffusion coefficient eta = noise_level.

    With dt = sigma_next - sigma < 0 and the predicted data ``x0 = x - sigma v``::

        mean = x + dt v + dt (eta^2 / 2) (x - (1 - sigma) x0) / sigma^2     # score term -(x - (1-s) x0) / s^2
        std  = eta * sqrt(-dt)

    Unlike DanceGRPO's reference code (whose constant terms are dropped by a stray line break), log_prob here
    is the full Gaussian log-density. Shapes as :func:`flow_grpo_step`.
    """
    v, x, s, s_next, eta = _flow_inputs(model_output, sample, sigma, sigma_next, noise_level)
    dt = s_next - s  # < 0
    x0 = x - s * v
    mean = x + dt * v + dt * (eta**2 / 2) * (x - (1 - s) * x0) / s**2  # eta = 0: x + dt v (+ 0) exactly
    return _gaussian_step(mean, eta * torch.sqrt(-dt), prev_sample, generator, noise)


@SDE_KINDS.register("cps")
def cps_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> StepOutput:
    """Coefficients-Preserving Sampling step (Wang & Yu 2025): DDIM-like, the noise coefficient stays sigma_next.

    With a = noise_level in [0, 1], ``x0 = x - sigma v`` (predicted data), ``x1 = x + (1 - sigma) v`` (predicted
    noise)::

        std  = sigma_next * sin(a pi / 2)
        mean = (1 - sigma_next) x0 + sqrt(sigma_next^2 - std^2) x1

    so ``prev = (1 - sigma_next) x0 + sqrt(sigma_next^2 - std^2) x1 + std eps`` has total noise variance exactly
    sigma_next^2. Computed in the algebraically equal form ``x + dt v + (sqrt(sigma_next^2 - std^2) - sigma_next)
    x1`` so that a = 0 gives the Euler step bit for bit. At sigma_next = 0 (the last step) std = 0 for every a:
    the step is deterministic (prev = x0, log_prob 0), with no NaN. Shapes as :func:`flow_grpo_step`.
    """
    top = (1.0, "noise_level for cps must be in [0, 1] (std = sigma_next * sin(noise_level * pi / 2))")
    v, x, s, s_next, a = _flow_inputs(model_output, sample, sigma, sigma_next, noise_level, top)
    dt = s_next - s  # < 0
    std = s_next * torch.sin(a * (math.pi / 2))
    x1 = x + (1 - s) * v
    keep = torch.sqrt((s_next**2 - std**2).clamp_min(0))  # clamp: a = 1 gives s_next^2 - s_next^2 = 0, not -1ulp
    mean = x + dt * v + (keep - s_next) * x1  # == (1 - s_next) x0 + keep x1; a = 0: keep == s_next exactly
    return _gaussian_step(mean, std, prev_sample, generator, noise)


def step(
    kind: str,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> StepOutput:
    """One flow-SDE step of the dynamics ``kind`` (a name in :data:`SDE_KINDS`: flow_grpo, dance, cps).

    ``model_output`` is the velocity v [N, ...] at ``sample`` x [N, ...] and noise level ``sigma``; the step goes
    to ``sigma_next``. With ``prev_sample`` None a new state is sampled (eps from ``noise`` if given, else
    ``torch.randn`` with ``generator``); otherwise the log-prob of the given ``prev_sample`` is evaluated (the
    update phase, with grad through ``model_output``). Returns StepOutput, log_prob [N] fp32.
    """
    fn = SDE_KINDS.get(kind)
    return fn(model_output, sample, sigma, sigma_next, noise_level, prev_sample, generator, noise)


# ----------------------------------------------------------------------------------------------- DDIM

PREDICTION_TYPES = ("epsilon", "v_prediction")


def ddim_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_bar: Scalar,
    alpha_bar_prev: Scalar,
    eta: Scalar,
    prediction_type: str = "epsilon",
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    clip_sample: float | None = None,
) -> StepOutput:
    """DDIM step with eta as a Gaussian policy (Song et al. 2021; DDPO's ``ddim_step_with_logprob``, Black et al.).

    ``alpha_bar`` / ``alpha_bar_prev`` are the cumulative alphas at the current and the next (less noisy)
    timestep, float or [N] -- take them from the scheduler (``alphas_cumprod[t]``, and ``final_alpha_cumprod``
    past the first timestep) so timestep spacing and ``set_alpha_to_one`` stay the scheduler's business::

        x0   = (x - sqrt(1 - a) eps) / sqrt(a)                     # epsilon
        x0   = sqrt(a) x - sqrt(1 - a) v;  eps = sqrt(a) v + sqrt(1 - a) x   # v_prediction
        x0   = clamp(x0, -clip_sample, clip_sample)                 # if clip_sample
        std  = eta * sqrt((1 - a_prev) / (1 - a)) * sqrt(1 - a / a_prev)
        mean = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps

    eta = 0 is diffusers' ``DDIMScheduler.step(eta=0)`` (deterministic, log_prob 0). model_output, sample
    [N, ...]; eta in [0, 1]; returns StepOutput with log_prob [N] fp32.
    """
    _check_sample(sample, model_output)
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"unknown prediction_type {prediction_type!r}; known: {', '.join(PREDICTION_TYPES)}")
    e_or_v, x = _f32(model_output), _f32(sample)
    a = _per_row(alpha_bar, x, "alpha_bar")
    a_prev = _per_row(alpha_bar_prev, x, "alpha_bar_prev")
    eta_t = _per_row(eta, x, "eta")
    _require((a > 0) & (a < 1), "alpha_bar must be in (0, 1)", a)
    _require(
        (a_prev >= a) & (a_prev <= 1), "alpha_bar_prev must be in [alpha_bar, 1] (the next step is less noisy)", a_prev
    )
    _require((eta_t >= 0) & (eta_t <= 1), "eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like)", eta_t)
    a, a_prev, eta_t = _to(x, a, a_prev, eta_t)
    beta = 1 - a
    if prediction_type == "epsilon":
        x0 = (x - beta**0.5 * e_or_v) / a**0.5
        eps = e_or_v
    else:
        x0 = (a**0.5) * x - (beta**0.5) * e_or_v
        eps = (a**0.5) * e_or_v + (beta**0.5) * x
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    variance = ((1 - a_prev) / beta) * (1 - a / a_prev)
    std = eta_t * variance**0.5
    mean = a_prev**0.5 * x0 + (1 - a_prev - std**2).clamp_min(0) ** 0.5 * eps  # same op order as diffusers
    return _gaussian_step(mean, std, prev_sample, generator, noise)


# ----------------------------------------------------------------------------------------------- KL


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: Scalar) -> torch.Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) per row, averaged over non-batch dims: [N].

    Two Gaussians with the same std differ only in their means, so the KL is closed-form:
    ``(mean - mean_ref)^2 / (2 std^2)`` per element, averaged over the D elements like ``log_prob`` (Flow-GRPO's
    KL penalty). mean, mean_ref [N, ...]; std float, [N] or broadcastable. Rows with std == 0 (deterministic
    steps, never trained) get 0.
    """
    if mean.shape != mean_ref.shape or mean.ndim < 2:
        raise UserError(
            f"gaussian_kl: mean {tuple(mean.shape)} and mean_ref {tuple(mean_ref.shape)} must have the same "
            "shape [N, ...] with at least one non-batch dim"
        )
    m, m_ref = _f32(mean), _f32(mean_ref)
    s = _per_row(std, m, "std")
    _require(s >= 0, "std must be >= 0", s)
    (s,) = _to(m, s)
    noisy = s > 0
    safe = torch.where(noisy, s, torch.ones_like(s))
    elem = (m - m_ref) ** 2 / (2 * safe**2)  # [N, ...]
    return torch.where(noisy.reshape(noisy.shape[0]), elem.mean(dim=tuple(range(1, elem.ndim))), 0.0)  # 0: std 0
