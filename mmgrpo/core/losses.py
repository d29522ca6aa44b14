"""Policy losses of the group-relative optimizer: per-unit surrogates, aggregations, reference KL.

A loss is three small pieces, each an open registry (built-ins, entry points of the groups ``mmgrpo.losses`` /
``mmgrpo.aggregations``, or a dotted path in YAML), so a variant is a new strategy, not a branch:

1. a **surrogate** (``LOSSES``) turns log-probs and advantages into a per-unit loss ``[n, k]`` (to be minimised):
   ``grpo`` (PPO/GRPO clipped token ratio, DAPO clip-higher, dual clip), ``gspo`` (sequence-level ratio),
   ``pg`` (unclipped importance-weighted policy gradient), ``nft`` (DiffusionNFT's negative-aware matching),
   ``pacs`` (PACS's supervised cross-entropy, at the sampling parameters).
   Its signature is its contract: ``fn(logp, logp_old, adv, mask, *, <inputs>, <options>)``. Keyword parameters
   named in :data:`LOSS_INPUTS` are *inputs* the library hands over when the loss declares them (``neg_logp`` from
   the policy, ``adv_clip`` from the config); every other keyword parameter is an *option*, set in YAML under
   ``loss.options`` and checked against the signature at config load (:func:`loss_options`): an option the loss
   does not declare is an error, never silently ignored. ``fn.check`` (set by :func:`register_loss`) validates
   option values at load time too; ``fn.one_step = True`` says the loss is exact only when a rollout feeds one
   optimizer step (trainer.epochs x trainer.minibatches = 1) and ``fn.estimators`` names the only estimators it is
   valid with (both checked at config load);
2. an **aggregation** (``AGGREGATIONS``, :class:`Aggregation`; in :mod:`mmgrpo.core.aggregations`, re-exported
   here) reduces ``[n, k]`` to a scalar *and* says what its normaliser counts (:meth:`Aggregation.local_count`):
   ``token_mean`` (DAPO), ``seq_mean`` (original GRPO), ``constant`` (Dr. GRPO; option ``constant``);
3. an optional **KL to the reference**, supplied per unit by the policy (k3 for tokens, closed-form Gaussian
   mean difference for SDE steps), weighted by ``beta`` and aggregated the same way.

Letters: n rows of the minibatch (a slice of N = B*G), k action units per row (tokens or denoising steps).
``mask [n, k]`` (bool, or 0/1) marks the units the update may use; masked-out units never contribute a value *or* a NaN
gradient (their log-ratio is zeroed before ``exp``, so padding with -inf log-probs is safe).

All maths is fp32: ratios are exponentials of log-prob differences, and in bf16 a log-ratio of 0.01 already
rounds to a ratio error comparable to GSPO's clip range (3e-4).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from mmgrpo.core.aggregations import (  # re-exported: aggregations lived here before core/aggregations.py
    AGGREGATIONS,
    Aggregation,
    ConstantNorm,
    SeqMean,
    TokenMean,
    aggregate,
    make_aggregation,
    unit_additive,
)
from mmgrpo.core.errors import UserError
from mmgrpo.core.registry import Registry
from mmgrpo.core.schema import check_options

__all__ = [
    "AGGREGATIONS",
    "LOSSES",
    "LOSS_INPUTS",
    "Aggregation",
    "ConstantNorm",
    "LossFn",
    "SeqMean",
    "TokenMean",
    "aggregate",
    "get_loss",
    "k3_kl",
    "loss_options",
    "make_aggregation",
    "mask_zero_advantages",
    "policy_loss",
    "register_loss",
    "unit_additive",
    "zero_adv_no_grad",
    "unit_local",
]

LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]

LOSSES: Registry[LossFn] = Registry("loss", plugins="losses")

LOSS_INPUTS: dict[str, str] = {
    "neg_logp": "[n, k] log-prob of the policy's implicit negative policy (LogProbs.neg_logp; DiffusionNFT)",
    "adv_clip": "loss.adv_clip, the bound the advantages were clamped to (None when off)",
}
"""keyword parameters a loss may declare to receive from the library; its other keyword parameters are options"""


def register_loss(
    name: str, check: Callable[..., None] | None = None, zero_adv_no_grad: bool = False, unit_local: bool = False
) -> Callable[[LossFn], LossFn]:
    """Decorator: register a surrogate ``fn(logp, logp_old, adv, mask, *, <inputs>, <options>)`` as ``name``.

    ``check``, when given, is called at config load with the keyword arguments it names, taken from the loss's
    options (defaults filled in) and its inputs known then (``adv_clip``); it raises UserError on bad values.
    ``zero_adv_no_grad`` declares that a row whose advantage is 0 on every unit gets loss 0 and gradient exactly 0
    whatever its ratio (true of the clipped and plain ratio surrogates): the trainer may then leave such rows out of
    the update's forwards (:func:`zero_adv_no_grad`). A plug-in loss says nothing and is never skipped.
    ``unit_local`` declares that each unit's loss depends on that unit's inputs alone (not on the row's other units,
    as GSPO's sequence ratio does): the update may then split a row's units across micro-batches
    (:func:`unit_local`). A plug-in loss says nothing and is never split.
    """

    def deco(fn: LossFn) -> LossFn:
        if check is not None:
            fn.check = check  # type: ignore[attr-defined]
        fn.zero_adv_no_grad = zero_adv_no_grad  # type: ignore[attr-defined]
        fn.unit_local = unit_local  # type: ignore[attr-defined]
        return LOSSES.register(name)(fn)

    return deco


def get_loss(name: str) -> LossFn:
    """The per-unit surrogate registered as ``name`` (UserError listing the known ones otherwise)."""
    return LOSSES.get(name)


def zero_adv_no_grad(name: str) -> bool:
    """Whether loss ``name`` gives a row with advantage 0 on every unit exactly zero loss and gradient
    (``register_loss(..., zero_adv_no_grad=True)``: grpo, gspo, pg)."""
    return bool(getattr(LOSSES.get(name), "zero_adv_no_grad", False))


def unit_local(name: str) -> bool:
    """Whether loss ``name``'s per-unit values depend on each unit's own inputs only
    (``register_loss(..., unit_local=True)``: grpo, pg, nft), so a row's units may be computed in separate parts."""
    return bool(getattr(LOSSES.get(name), "unit_local", False))


def loss_options(
    name: str, options: dict[str, Any] | None, *, adv_clip: float | None = None, where: str = "policy_loss"
) -> dict[str, Any]:
    """Loss ``name``'s ``options`` checked against its signature (did-you-mean UserError naming ``loss.options.x``)
    and converted to their annotated types; the loss's ``check`` then validates the values."""
    fn = get_loss(name)
    opts = check_options(
        fn, options or {}, what=f"loss {name!r}", prefix="loss.options", where=where, skip=4, inputs=tuple(LOSS_INPUTS)
    )
    check = getattr(fn, "check", None)
    if check is not None:
        params = inspect.signature(fn).parameters
        known = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
        known.update(opts, adv_clip=adv_clip)
        check(**{k: known[k] for k in inspect.signature(check).parameters if k in known})
    return opts


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _as_unit_adv(adv: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Advantages [n] (one per row) or [n, k] (one per unit) -> fp32 [n, k]."""
    adv = adv.float()
    if adv.dim() == 1:
        adv = adv[:, None]  # [n, 1]
    if adv.dim() != 2 or adv.shape[0] != like.shape[0] or adv.shape[1] not in (1, like.shape[1]):
        raise ValueError(f"advantages of shape {tuple(adv.shape)} do not fit log-probs {tuple(like.shape)}")
    return adv.expand_as(like)  # [n, k]


def _masked_log_ratio(logp: torch.Tensor, logp_old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(pi / pi_old) per unit, 0 on masked-out units (so exp gives 1 and no inf/NaN reaches the gradient)."""
    diff = logp.float() - logp_old.float()  # [n, k]
    return torch.where(mask.bool(), diff, torch.zeros_like(diff))


def _check_clip(clip_low: float, clip_high: float, dual_clip: float | None) -> None:
    """The clip options of ``grpo``/``gspo`` (at config load and at every call)."""
    if not 0.0 <= clip_low <= 1.0:
        raise UserError(f"loss.options.clip_low={clip_low} must be in [0, 1] (the ratio is clipped at 1 - clip_low)")
    if not clip_high >= 0.0:  # NaN too
        raise UserError(f"loss.options.clip_high={clip_high} must be >= 0 (the ratio is clipped at 1 + clip_high)")
    if dual_clip is not None and not (math.isfinite(dual_clip) and dual_clip > 1.0):  # nan / inf: never capped
        raise UserError(
            f"loss.options.dual_clip={dual_clip} must be > 1 and finite (Dual-clip PPO uses c = 3), or null to "
            "disable it"
        )


def _clipped_surrogate(
    ratio: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float, dual_clip: float | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A), optionally capped at -c A for A < 0. All [n, k].

    ``clipped`` is 1 where a clip is active, i.e. where the unit's gradient is cut to 0; it is the union of three
    disjoint sides (float 0/1 each, the definitions of TRL's ``clip_ratio/low_mean`` / ``high_mean`` and verl's
    dual-clip ``pg_clipfrac_lower``):

    - ``clipped_low``: r < 1 - clip_low with A < 0 (the clipped term won the min: a negative-advantage unit whose
      probability already fell enough);
    - ``clipped_high``: r > 1 + clip_high with A > 0 (a positive-advantage unit whose probability already rose
      enough; DAPO's clip-higher widens exactly this side);
    - ``clipped_dual`` (only with ``dual_clip``): A < 0 and the loss capped at -c A (r above c).
    """
    unclipped = ratio * adv  # [n, k]
    clipped_obj = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv  # [n, k]
    loss = -torch.minimum(unclipped, clipped_obj)  # [n, k]
    low = (ratio < 1.0 - clip_low) & (adv < 0)  # exactly where the clipped branch wins the min for A < 0
    high = (ratio > 1.0 + clip_high) & (adv > 0)  # ... and for A > 0 (ties are not clips)
    clipped = low | high
    stats = {"ratio": ratio.detach(), "clipped_low": low.float(), "clipped_high": high.float()}
    if dual_clip is not None:
        # Dual-clip PPO (Ye et al. 2020): for A < 0 a huge ratio would give an unbounded loss; cap it at -c A
        cap = -dual_clip * adv  # [n, k]
        dual = (adv < 0) & (loss > cap)  # r > c > 1: disjoint from the low side (r < 1 - clip_low)
        loss = torch.where(dual, cap, loss)
        clipped = clipped | dual
        stats["clipped_dual"] = dual.float()
    return loss, {**stats, "clipped": clipped.float()}


# ---------------------------------------------------------------------------------------------------------------
# per-unit surrogates: fn(logp, logp_old, adv, mask, *, <inputs>, <options>) -> (loss [n, k], stats)


@register_loss("grpo", check=_check_clip, zero_adv_no_grad=True, unit_local=True)
def grpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped unit-level ratio surrogate (PPO, Schulman et al. 2017; GRPO, Shao et al. 2024).

    r = exp(logp - logp_old) per unit; loss = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A).
    Separate ``clip_low``/``clip_high`` give DAPO's clip-higher (0.2 / 0.28) and NGRPO's asymmetric clipping;
    ``dual_clip`` c > 1 caps the loss of negative-advantage units at -c A (Dual-clip PPO).

    Shapes: logp, logp_old, mask [n, k]; adv [n] or [n, k]. Returns loss [n, k] and stats
    ``ratio`` [n, k], ``clipped`` [n, k] (float 0/1) and its sides ``clipped_low`` / ``clipped_high`` (/
    ``clipped_dual``) [n, k] (:func:`_clipped_surrogate`).
    """
    _check_clip(clip_low, clip_high, dual_clip)
    ratio = torch.exp(_masked_log_ratio(logp, logp_old, mask))  # [n, k]
    return _clipped_surrogate(ratio, _as_unit_adv(adv, ratio), clip_low, clip_high, dual_clip)


@register_loss("gspo", check=_check_clip, zero_adv_no_grad=True)
def gspo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sequence-level ratio surrogate, in its GSPO-token form (Zheng et al. 2025, Group Sequence Policy Optimization).

    The row's ratio is the geometric mean of its unit ratios, s_i = exp(mean_{t in mask} (logp_t - logp_old_t)),
    and every unit of row i uses (GSPO eq. for GSPO-token)

        s_i,t = sg[s_i] * exp(logp_t - sg[logp_t])            # value s_i, d s_i,t / d logp_t = s_i

    in the same clipped objective as ``grpo``. So clipping is decided per *sequence*, and the unclipped gradient
    of unit t is -A s_i grad(logp_t); the 1/|y_i| of GSPO's sequence objective comes from the aggregation
    (``seq_mean`` reproduces GSPO exactly; with per-row advantages GSPO-token equals GSPO).
    Because s_i is a geometric mean over many units, it stays close to 1: GSPO's clip ranges are
    ``clip_low=3e-4``, ``clip_high=4e-4``, not 0.2.

    Shapes: logp, logp_old, mask [n, k]; adv [n] or [n, k]. Returns loss [n, k] and stats
    ``ratio`` [n, k] (s_i repeated over the row), ``clipped`` [n, k] and its sides ``clipped_low`` /
    ``clipped_high`` (/ ``clipped_dual``) [n, k]: the side is decided per sequence (s_i against the clip range),
    its fraction is over units, like TRL's ``clip_ratio/*`` with ``importance_sampling_level: sequence``.
    """
    _check_clip(clip_low, clip_high, dual_clip)
    m = mask.bool()
    log_ratio = _masked_log_ratio(logp, logp_old, m)  # [n, k]
    count = m.sum(-1, keepdim=True).clamp_min(1)  # [n, 1] (empty rows: s_i = 1)
    log_s = (log_ratio.sum(-1, keepdim=True) / count).detach()  # [n, 1]  log s_i, stop-gradient
    lp = torch.where(m, logp.float(), torch.zeros_like(log_ratio))  # [n, k]  no -inf padding in the graph
    ratio = torch.exp(log_s + lp - lp.detach())  # [n, k]  value s_i, gradient s_i * grad(logp_t)
    return _clipped_surrogate(ratio, _as_unit_adv(adv, ratio), clip_low, clip_high, dual_clip)


def _check_nft(adv_clip: float | None) -> None:
    if adv_clip is None:
        raise UserError("loss.name=nft (DiffusionNFT's loss, for the diffusion flow families with "
                        "policy.options.objective=nft) maps advantages to r = 1/2 + A / (2c) with c = loss.adv_clip: "
                        "set it (e.g. loss.adv_clip=2); token-level NFT, e.g. on a VLM, is methods: {nft: {reward: "
                        "accuracy}} with loss.name=grpo")  # fmt: skip


@register_loss("nft", check=_check_nft, unit_local=True)
def nft_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    neg_logp: torch.Tensor | None = None,
    adv_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's negative-aware matching loss (Zheng et al. 2025), with the advantage as optimality probability.

    DiffusionNFT: Online Diffusion Reinforcement with Forward Process.

    The policy (diffusion ``objective=nft``) supplies per unit minus the matching errors of two implicit
    policies built from the trained velocity v and the sampling policy's v_old: ``logp`` of the positive
    v+ = beta v + (1 - beta) v_old and ``neg_logp`` of the negative v- = (1 + beta) v_old - beta v. The
    advantage, already clamped to [-c, c] with c = ``adv_clip``, becomes an optimality probability
    r = 1/2 + A / (2c) in [0, 1], and

        loss = c * (r * (-logp) + (1 - r) * (-neg_logp))

    (times c as the paper's code does, so the gradient scales like the advantage). For beta = 1 and plain
    sigma^2-weighted errors its gradient w.r.t. v is 2 sigma^2 (c (v - v_old) + A (v_old - u)), u the target
    velocity: advantage-weighted matching (AWM) at v = v_old, plus a pull of strength c back to the sampling
    policy, so a negative advantage pushes v away from the sample only as far as v_old - A/c (v_old - u) and a
    run does not drift the way AWM's unbounded negative term lets it.

    ``neg_logp`` and ``adv_clip`` are declared inputs (:data:`LOSS_INPUTS`); nft has no options.
    Shapes: logp, neg_logp, logp_old, mask [n, k]; adv [n, k]. Returns loss [n, k] and stats ``ratio``
    (exp(logp - logp_old), a monitor of how far the positive policy moved; never clipped), ``clipped`` (all 0).
    """
    if neg_logp is None:
        raise UserError("loss.name=nft needs the implicit negative policy's error: set policy.options.objective=nft "
                        "(diffusion flow families); token-level NFT, e.g. on a VLM, is methods: {nft: {reward: "
                        "accuracy}} with loss.name=grpo")  # fmt: skip
    _check_nft(adv_clip)
    adv = _as_unit_adv(adv, logp)
    r = (0.5 + 0.5 * adv / adv_clip).clamp(0.0, 1.0)  # [n, k]
    loss = adv_clip * (r * -logp.float() + (1.0 - r) * -neg_logp.float())
    ratio = torch.exp(_masked_log_ratio(logp, logp_old, mask)).detach()
    return loss, {"ratio": ratio, "clipped": torch.zeros_like(ratio)}


@register_loss("pg", zero_adv_no_grad=True, unit_local=True)
def pg_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain policy gradient with importance ratio, no clipping (REINFORCE; Williams 1992): -A exp(logp - logp_old).

    At logp = logp_old its gradient is -A grad(logp), the REINFORCE estimator. No options (a clip option is an
    error at config load).
    Shapes: logp, logp_old, mask [n, k]; adv [n] or [n, k]. Returns loss [n, k] and stats ``ratio``,
    ``clipped`` (all 0).
    """
    ratio = torch.exp(_masked_log_ratio(logp, logp_old, mask))  # [n, k]
    loss = -_as_unit_adv(adv, ratio) * ratio  # [n, k]
    return loss, {"ratio": ratio.detach(), "clipped": torch.zeros_like(ratio)}


@register_loss("pacs")
def pacs_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PACS's supervised (implicit actor-critic) loss at the sampling parameters: -A_i log(pi / pi_old) per unit.

    Li et al. 2025, "Implicit Actor Critic Coupling via a Supervised Learning Framework for RLVR" (PACS, arXiv
    2509.02522): the outcome reward is a label, the score psi_i is the RLOO-centred implicit reward
    rhat_i = beta sum_t log(pi / pi_old), and the loss is the binary cross-entropy of sigmoid(psi_i) against the
    label. The estimator ``pacs`` (:func:`mmgrpo.core.advantages.pacs`) turns the labels into A_i = -beta c_i, the
    coefficient of grad rhat_i / beta in that cross-entropy's gradient at pi = pi_old; this surrogate's gradient is
    then exactly PACS's, unit by unit (its value is 0 there, as log(pi / pi_old) = 0). PACS sums over a row's
    units and averages over rows: ``loss.aggregation: {name: constant, options: {constant: 1}}``; token_mean
    rescales. Valid for one optimizer step per rollout only (``one_step``: epochs x minibatches = 1, checked at
    load) and with the ``pacs`` estimator (``estimators``). No options.
    Shapes: logp, logp_old, mask [n, k]; adv [n] or [n, k]. Returns loss [n, k] and stats ``ratio``, ``clipped`` (0).
    """
    log_ratio = _masked_log_ratio(logp, logp_old, mask)  # [n, k]
    loss = -_as_unit_adv(adv, log_ratio) * log_ratio
    ratio = torch.exp(log_ratio).detach()
    return loss, {"ratio": ratio, "clipped": torch.zeros_like(ratio)}


pacs_loss.one_step = True  # type: ignore[attr-defined]
pacs_loss.zero_adv_no_grad = True  # type: ignore[attr-defined]  # A = 0: loss 0 and gradient exactly 0 (row skippable)
pacs_loss.estimators = ("pacs",)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------------------
# masking


def mask_zero_advantages(mask: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """``loss.mask_zero_adv``: units whose advantage is exactly 0 leave the mask. mask [n, k], adv [n] or [n, k]
    -> bool [n, k].

    DAPO: zero-advantage rows add no gradient but dilute a token mean; with per-row advantages this removes whole
    rows, with per-unit advantages single units. The trainer applies it to the whole rollout before counting the
    normaliser, so the count and the loss agree (advantage clipping never turns a non-zero advantage into 0).
    """
    return mask.bool() & (_as_unit_adv(adv, mask) != 0)


# ---------------------------------------------------------------------------------------------------------------
# KL to the reference


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per unit (Schulman 2020, "Approximating KL Divergence"). [n, k] -> [n, k].

    With d = ref_logp - logp on a sample from pi: exp(d) - d - 1 >= 0, unbiased, low variance. fp32.
    """
    d = ref_logp.float() - logp.float()  # [n, k]
    return torch.exp(d) - d - 1.0


# ---------------------------------------------------------------------------------------------------------------
# the loss the trainer calls


def policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss: str = "grpo",
    options: dict[str, Any] | None = None,
    aggregation: str | Aggregation = "token_mean",
    beta: float = 0.0,
    kl: torch.Tensor | None = None,
    adv_clip: float | None = None,
    row_weight: torch.Tensor | None = None,
    denom: float | None = None,
    neg_logp: torch.Tensor | None = None,
    surrogate: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss of one (micro-)batch: aggregate(surrogate) + beta * aggregate(kl), and its metrics.

    Shapes: logp, logp_old, mask [n, k]; adv [n] or [n, k]; kl [n, k] or None; row_weight [n] or None;
    neg_logp [n, k] or None (handed to a loss that declares it, e.g. ``nft``; an error for one that does not).
    ``options`` are the surrogate's own options (``loss.options``, checked against its signature); ``aggregation``
    is a name or an :class:`Aggregation` (``make_aggregation``). Steps: advantages are clamped to
    [-adv_clip, adv_clip] (if set); the surrogate ``loss`` gives per-unit values; policy and KL terms use the same
    aggregation, weights and ``denom``. Zero-advantage masking (``loss.mask_zero_adv``) is the caller's, on the
    mask, with :func:`mask_zero_advantages`, because it changes the normaliser of the whole minibatch.

    Metrics (python floats): ``loss/policy``, ``loss/kl`` (aggregated KL before beta; only when kl is given),
    ``loss/total``, ``loss/ratio_mean``, ``loss/ratio_max``, ``loss/clip_frac``, ``loss/adv_mean`` (over the
    masked units that remain) and, for the clipped surrogates (``grpo``, ``gspo``), the fraction of each clip side
    ``loss/clip_frac_low`` / ``loss/clip_frac_high`` (+ ``loss/clip_frac_dual`` with ``dual_clip``), whose sum is
    ``loss/clip_frac`` (:func:`_clipped_surrogate`).

    ``surrogate=False``: a method's loss term is the whole policy objective (:class:`mmgrpo.core.extra.LossTerm`
    ``replaces_surrogate``, e.g. token-level NFT): the surrogate is evaluated without gradient for its metrics only,
    ``loss/policy`` is 0 and the total is the KL term alone (the caller adds the method's terms).
    """
    if beta < 0:
        raise UserError(f"loss.beta={beta} must be >= 0 (the weight of the KL to the reference)")
    if beta > 0 and kl is None:
        raise UserError(
            f"loss.beta={beta} but this policy supplies no reference KL; set loss.beta=0 or enable a reference"
        )
    if logp.shape != logp_old.shape or logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, logp_old {tuple(logp_old.shape)}, mask {tuple(mask.shape)}")
    fn = get_loss(loss)
    opts = loss_options(loss, options, adv_clip=adv_clip)
    inputs = _declared_inputs(fn, loss, neg_logp=neg_logp, adv_clip=adv_clip)
    agg = make_aggregation(aggregation) if isinstance(aggregation, str) else aggregation
    unit_adv = _as_unit_adv(adv, logp)  # [n, k] fp32
    if adv_clip is not None:
        if not adv_clip > 0:
            raise UserError(f"loss.adv_clip={adv_clip} must be > 0, or null to disable advantage clipping")
        unit_adv = unit_adv.clamp(-adv_clip, adv_clip)
    m = mask.bool()

    with contextlib.nullcontext() if surrogate else torch.no_grad():
        per_unit, stats = fn(logp, logp_old, unit_adv, m, **inputs, **opts)
    for what, x in (("per-unit loss", per_unit), ("kl", kl)):
        if x is not None and x.shape != m.shape:
            raise ValueError(f"{what} {tuple(x.shape)} and mask {tuple(m.shape)} differ in shape")
    pol = agg(per_unit, m, row_weight, denom) if surrogate else logp.new_zeros((), dtype=torch.float32)
    total = pol
    metrics = {"loss/policy": pol.item()}
    if kl is not None:
        kl_term = agg(kl.float(), m, row_weight, denom)
        total = pol + beta * kl_term
        metrics["loss/kl"] = kl_term.item()
    metrics["loss/total"] = total.item()
    metrics.update(_unit_metrics(stats, unit_adv, m))
    return total, metrics


def _declared_inputs(fn: LossFn, name: str, **available: Any) -> dict[str, Any]:
    """The :data:`LOSS_INPUTS` that loss ``fn`` declares, from ``available``; a policy output (``neg_logp``) that the
    loss does not declare is a UserError, since silently dropping it would train something else."""
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if available.get("neg_logp") is not None and "neg_logp" not in params and not takes_any:
        raise UserError(
            f"loss.name={name!r}: this policy trains DiffusionNFT's implicit policies "
            "(policy.options.objective=nft), whose negative-policy errors (neg_logp) only a loss that declares them "
            "combines; set loss.name=nft"
        )
    return {k: v for k, v in available.items() if takes_any or k in params}


CLIP_SIDES = {"clipped_low": "loss/clip_frac_low", "clipped_high": "loss/clip_frac_high",
              "clipped_dual": "loss/clip_frac_dual"}  # fmt: skip
"""per-unit stats of a clipped surrogate -> the metric of their fraction over the masked units"""


def _unit_metrics(stats: dict[str, torch.Tensor], unit_adv: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Means/max over the masked units of ratio, clip indicators (all sides, and each side the loss reports) and
    advantage (0 / 1 when no unit is masked)."""
    sides = [k for k in CLIP_SIDES if k in stats]
    count = int(mask.sum())
    if count == 0:
        out = {"loss/ratio_mean": 1.0, "loss/ratio_max": 1.0, "loss/clip_frac": 0.0, "loss/adv_mean": 0.0}
        return {**out, **{CLIP_SIDES[k]: 0.0 for k in sides}}
    ones = torch.ones_like(unit_adv)
    ratio = stats.get("ratio", ones).detach()[mask]  # a third-party loss may omit ratio/clipped
    clipped = stats.get("clipped", torch.zeros_like(ones)).detach()[mask]
    out = {
        "loss/ratio_mean": ratio.mean().item(),
        "loss/ratio_max": ratio.max().item(),
        "loss/clip_frac": clipped.float().mean().item(),
        "loss/adv_mean": unit_adv[mask].mean().item(),
    }
    for k in sides:
        out[CLIP_SIDES[k]] = stats[k].detach()[mask].float().mean().item()
    return out
