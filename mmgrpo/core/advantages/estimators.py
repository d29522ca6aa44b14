"""The built-in advantage estimators, ``fn(rewards [B, G], *, <options>) -> advantages [B, G]``, and the masked
group statistics they share (NaN rewards left out, zero-variance groups at exactly 0: the conventions of
:mod:`mmgrpo.core.advantages`)."""

from __future__ import annotations

import math
from typing import Any

import torch

from mmgrpo.core.advantages.registry import check_eps, finite, register_estimator
from mmgrpo.core.errors import UserError, bad_option


def _as_groups(rewards: torch.Tensor, who: str) -> torch.Tensor:
    """fp32 view/copy of ``rewards``, checked to be ``[B, G]``."""
    r = torch.as_tensor(rewards).to(torch.float32)
    if r.dim() != 2:
        raise UserError(f"{who}: rewards must be [B, G] (prompts x group size), got shape {tuple(r.shape)}")
    return r


def _masked_mean(r: torch.Tensor, valid: torch.Tensor, dim: int | None = -1) -> torch.Tensor:
    """Mean over the valid (non-NaN) entries; 0 where none is valid. keepdim along ``dim``."""
    if dim is None:
        return torch.where(valid, r, 0.0).sum() / valid.sum().clamp_min(1)
    return torch.where(valid, r, 0.0).sum(dim, keepdim=True) / valid.sum(dim, keepdim=True).clamp_min(1)


def _masked_std(r: torch.Tensor, valid: torch.Tensor, unbiased: bool, dim: int | None = -1) -> torch.Tensor:
    """Std over the valid entries (Bessel-corrected when ``unbiased``); 0 with fewer than 2 valid entries."""
    mean = _masked_mean(r, valid, dim)
    sq = torch.where(valid, (r - mean) ** 2, 0.0)
    count = valid.sum() if dim is None else valid.sum(dim, keepdim=True)
    total = sq.sum() if dim is None else sq.sum(dim, keepdim=True)
    return (total / (count - int(unbiased)).clamp_min(1)).sqrt()


def _finish(adv: torch.Tensor, valid: torch.Tensor, zero_groups: torch.Tensor | None = None) -> torch.Tensor:
    """Advantage 0 on rows where the reward does not apply and, if given, on zero-variance groups [B]."""
    keep = valid if zero_groups is None else valid & ~zero_groups[:, None]
    return torch.where(keep, adv, 0.0)


def zero_variance_groups(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Groups whose valid rewards are all equal (max - min <= eps): BoolTensor [B].

    rewards: [B, G]; NaN entries are ignored, a group with no valid entry counts as zero-variance.
    """
    r = _as_groups(rewards, "zero_variance_groups")
    valid = ~r.isnan()
    hi = torch.where(valid, r, -math.inf).amax(-1)  # [B]
    lo = torch.where(valid, r, math.inf).amin(-1)  # [B]
    return ~(hi - lo > eps)  # all-NaN: -inf - inf = -inf -> True


@register_estimator("grpo", check=check_eps)
def grpo(rewards: torch.Tensor, *, eps: float = 1e-6, unbiased: bool = True, scale: bool = True) -> torch.Tensor:
    """Group-normalised advantage (r - group mean) / (group std + eps).

    rewards [B, G] -> advantages [B, G]. ``unbiased`` picks the Bessel-corrected std (torch.std default);
    ``scale=False`` skips the division. GRPO: Shao et al. 2024, "DeepSeekMath" (arXiv 2402.03300).
    """
    r = _as_groups(rewards, "grpo")
    valid = ~r.isnan()
    adv = r - _masked_mean(r, valid)  # [B, G]
    if scale:
        adv = adv / (_masked_std(r, valid, unbiased) + eps)  # [B, G] / [B, 1]
    return _finish(adv, valid, zero_variance_groups(r, eps))


@register_estimator("dr_grpo", check=check_eps)
def dr_grpo(rewards: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """Mean-centred advantage r - group mean, no std division (Dr. GRPO).

    rewards [B, G] -> advantages [B, G]. Dividing by the group std up-weights near-unanimous groups (too easy
    or too hard prompts); Dr. GRPO drops it. Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
    Perspective". ``eps`` only sets the zero-variance test.
    """
    r = _as_groups(rewards, "dr_grpo")
    valid = ~r.isnan()
    return _finish(r - _masked_mean(r, valid), valid, zero_variance_groups(r, eps))


@register_estimator("batch_std", check=check_eps)
def batch_std(rewards: torch.Tensor, *, eps: float = 1e-6, unbiased: bool = True) -> torch.Tensor:
    """Group-mean baseline, batch-std scale: (r - group mean) / (std over all N rows + eps).

    rewards [B, G] -> advantages [B, G]; the std is over the B*G valid rewards of the batch. The
    "REINFORCE++-baseline" of REINFORCE++ (Hu 2025) and the "Lite PPO" normalisation of "Tricks or Traps?
    A Deep Dive into RL for LLM Reasoning" (2025).
    """
    r = _as_groups(rewards, "batch_std")
    valid = ~r.isnan()
    adv = (r - _masked_mean(r, valid)) / (_masked_std(r, valid, unbiased, dim=None) + eps)
    return _finish(adv, valid, zero_variance_groups(r, eps))


def _median_pivot(r: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group median [B, 1] (lower median for an even count), pivot index [B], pivot mask [B, G].

    The pivot is the *first* row equal to the median. torch.median's own index is not guaranteed to be the
    first occurrence (and may differ between CPU and CUDA), so it is recomputed here.
    """
    med = torch.nanmedian(r, dim=-1, keepdim=True).values  # [B, 1]
    hit = (r == med) & valid  # [B, G]; NaN never equals
    pivot = hit.to(torch.uint8).argmax(-1)  # [B] first hit (argmax returns the first maximum)
    mask = torch.zeros_like(hit)
    mask[torch.arange(r.shape[0], device=r.device), pivot] = True
    return med, pivot, mask & hit.any(-1, keepdim=True)  # an all-NaN group has no pivot


def mc_grpo_weights(rewards: torch.Tensor, **options: Any) -> torch.Tensor:
    """MC-GRPO per-row loss weights [B, G]: 0 at each group's pivot (median) row, 1 elsewhere."""
    r = _as_groups(rewards, "mc_grpo")
    _, _, pivot = _median_pivot(r, ~r.isnan())
    return (~pivot).to(torch.float32)


def _check_mc_grpo(scale: str = "mad", eps: float = 1e-6) -> None:
    if scale not in ("none", "std", "mad"):
        raise bad_option("advantage.options.scale", scale, "mc_grpo's scale is one of 'none', 'std', 'mad'; pick one")
    check_eps(eps)


@register_estimator("mc_grpo", weights=mc_grpo_weights, check=_check_mc_grpo)
def mc_grpo(
    rewards: torch.Tensor,
    *,
    scale: str = "mad",
    eps: float = 1e-6,
    unbiased: bool = True,
    mad_consistency: bool = False,
) -> torch.Tensor:
    """Median-centred GRPO: baseline = group median; the median (pivot) row gets advantage 0 and loss weight 0.

    rewards [B, G+1] -> advantages [B, G+1] (the group holds G+1 rollouts so that G rows carry gradient).
    MC-GRPO (median-centred GRPO). The median is torch's *lower* median for an even count (e.g. [1, 2, 3, 4]
    -> 2); the pivot is the first row equal to it; its loss weight is 0 (see :func:`get_row_weights`).

    ``scale``: "none" -> r - median; "std" -> divide by the group std (Bessel-corrected when ``unbiased``);
    "mad" -> divide by MAD = median(|r - median|), times 1.4826 only when ``mad_consistency``.
    Guard (our choice): a divisor below ``eps`` falls back to the group std, and if that is also below ``eps``
    the advantage is r - median unscaled. Binary rewards often have MAD = 0; the authors' code then divides
    by ~1e-3 and gives |A| = 1000, which swamps the loss. The MAD is the paper's scale, kept as it is: with
    continuous rewards and few rows it can be tiny without falling below ``eps`` (G + 1 = 3: the median's distance
    to its nearer neighbour; [0.5, 0.5001, 0.9] -> MAD 1e-4, A = [-1, 0, 3998]), so for continuous rewards at small
    G prefer ``scale: std`` (A = [-0.0005, 0, 1.73] there), and watch ``adv/abs_mean``.
    """
    if scale not in ("none", "std", "mad"):
        raise UserError(f"mc_grpo: scale={scale!r} is not one of 'none', 'std', 'mad'; pick one of those")
    r = _as_groups(rewards, "mc_grpo")
    valid = ~r.isnan()
    med, _, pivot = _median_pivot(r, valid)
    centred = r - med  # [B, G+1]
    std = _masked_std(r, valid, unbiased)  # [B, 1]
    one = torch.ones_like(std)
    if scale == "none":
        div = one
    else:
        if scale == "mad":
            div = torch.nanmedian(centred.abs(), dim=-1, keepdim=True).values * (1.4826 if mad_consistency else 1.0)
        else:
            div = std
        div = torch.where(div >= eps, div, torch.where(std >= eps, std, one))  # [B, 1]
    adv = torch.where(pivot, 0.0, centred / div)
    return _finish(adv, valid, zero_variance_groups(r, eps))


def _check_ngrpo(r_max: float = 1.0, eps: float = 1e-6) -> None:
    finite("advantage.options.r_max", r_max, "must be a finite number: the best reward a row can get (1.0 for 0/1 "
           "rewards), added to every group as its virtual reward")  # fmt: skip
    check_eps(eps)


@register_estimator("ngrpo", check=_check_ngrpo)
def ngrpo(rewards: torch.Tensor, *, r_max: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """Group normalisation with one virtual reward r_max added to every group's statistics (NGRPO).

    rewards [B, G] -> advantages [B, G]: A = (r - mean') / (std' + eps), mean' and the unbiased std' over the
    group's valid rewards plus r_max. NGRPO, "Negative-enhanced Group Relative Policy Optimization" (2025).
    Zero-variance groups are NOT zeroed: the virtual reward makes an all-wrong group negative (G = 8 zeros,
    r_max = 1: mean' 1/9, std' 1/3, every A = -1/3) -- learning from such groups is the point of NGRPO.
    """
    r = _as_groups(rewards, "ngrpo")
    valid = ~r.isnan()
    virtual = torch.full_like(r[:, :1], float(r_max))  # [B, 1]
    aug = torch.cat([r, virtual], dim=-1)  # [B, G+1]
    aug_valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=-1)
    adv = (r - _masked_mean(aug, aug_valid)) / (_masked_std(aug, aug_valid, unbiased=True) + eps)
    return _finish(adv, valid)


ngrpo.allows_single = True  # type: ignore[attr-defined]  # the virtual reward gives a group of one row a signal


def _beta_log_pdf(p: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """log Beta(p; alpha, beta) with p clamped to [1e-6, 1 - 1e-6]."""
    p = p.clamp(1e-6, 1 - 1e-6)
    log_norm = torch.lgamma(alpha + beta) - torch.lgamma(alpha) - torch.lgamma(beta)
    return (alpha - 1) * p.log() + (beta - 1) * torch.log1p(-p) + log_norm


def _check_bnpo(r_min: float | None = None, r_max: float | None = None, eps: float = 1e-6) -> None:
    for key, value in (("r_min", r_min), ("r_max", r_max)):
        if value is not None:
            finite(f"advantage.options.{key}", value, "must be a finite reward bound, or null (the batch's own)")
    if r_min is not None and r_max is not None and r_max <= r_min:
        raise bad_option("advantage.options.r_max", r_max, f"must be greater than advantage.options.r_min={r_min}; "
                         "fix the reward bounds")  # fmt: skip
    check_eps(eps)


@register_estimator("bnpo", check=_check_bnpo)
def bnpo(
    rewards: torch.Tensor, *, r_min: float | None = None, r_max: float | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """Beta-normalised advantage (r - p) / BetaPDF(p; alpha, beta), p = group mean of [0, 1]-scaled rewards.

    rewards [B, G] -> advantages [B, G]. BNPO, "Beta Normalization Policy Optimization" (2025).
    1. Rewards are min-max scaled to [0, 1] with ``r_min``/``r_max`` (default: the batch min/max; values outside
       fixed bounds are clamped). If max == min every advantage is 0.
    2. p_b = group mean [B]; mu, var = mean and unbiased variance of p over the groups;
       a = (mu(1-mu)/var - 1) mu, b = (mu(1-mu)/var - 1)(1-mu); alpha = max(1 + a/3, 1), beta = max(1 + b/3, 1).
    3. A = (r - p) * min(1 / BetaPDF(p; alpha, beta), 1e6).
    With fewer than 2 groups or var <= 1e-12 the moments say nothing: alpha = beta = 1 (uniform, pdf 1), so
    A = r - p (our choice, documented here).
    """
    r = _as_groups(rewards, "bnpo")
    valid = ~r.isnan()
    if r_min is not None and r_max is not None and r_max <= r_min:
        raise UserError(f"bnpo: r_max={r_max} must be greater than r_min={r_min}; fix the reward bounds")
    lo = torch.where(valid, r, math.inf).amin() if r_min is None else torch.tensor(float(r_min), device=r.device)
    hi = torch.where(valid, r, -math.inf).amax() if r_max is None else torch.tensor(float(r_max), device=r.device)
    if not bool(hi - lo > 0):  # also all-NaN: inf - inf, -inf - inf
        return torch.zeros_like(r)
    x = ((r - lo) / (hi - lo)).clamp(0.0, 1.0)  # [B, G], NaN stays NaN
    p = _masked_mean(x, valid)  # [B, 1]
    has_rows = valid.any(-1)  # [B]
    p_groups = p[has_rows, 0]  # [B'] groups with at least one valid reward
    one = torch.ones((), dtype=torch.float32, device=r.device)
    alpha = beta = one
    if p_groups.numel() >= 2:
        mu, var = p_groups.mean(), p_groups.var(unbiased=True)
        if var > 1e-12:
            k = mu * (1 - mu) / var - 1
            alpha = torch.maximum(1 + k * mu / 3, one)
            beta = torch.maximum(1 + k * (1 - mu) / 3, one)
    weight = torch.exp(-_beta_log_pdf(p, alpha, beta)).clamp(max=1e6)  # [B, 1]
    return _finish((x - p) * weight, valid, zero_variance_groups(r, eps))


def _stratum_ids(keys: Any, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Dense stratum ids LongTensor [B*G] from per-row keys (Tensor [B, G] or [N], or a (nested) list)."""
    if keys is None:
        raise UserError(
            "stratified: no per-row strata (keys=Tensor[B, G] of ints, or a nested list, e.g. the agent or the "
            "search-trajectory type of each row); in a run, methods: {strata: {meta_key: <field>}} gives them"
        )
    if isinstance(keys, torch.Tensor):
        flat = keys.reshape(-1)
    else:

        def leaves(x: Any) -> list[Any]:
            return [y for item in x for y in leaves(item)] if isinstance(x, (list, tuple)) else [x]

        ids: dict[Any, int] = {}
        flat = torch.tensor([ids.setdefault(k, len(ids)) for k in leaves(keys)], dtype=torch.long)
    n = shape[0] * shape[1]
    if flat.numel() != n:
        raise UserError(f"stratified: got {flat.numel()} keys for rewards of shape {tuple(shape)}; pass one per row")
    return torch.unique(flat.to(device), return_inverse=True)[1]


def _check_stratified(alpha: float = 1.0, eps: float = 1e-6) -> None:
    finite("advantage.options.alpha", alpha, "must lie in [0, 1] (1 = strata only, 0 = plain grpo)", low=0.0,
           strict=False)  # fmt: skip
    if alpha > 1.0:
        raise bad_option("advantage.options.alpha", alpha, "must lie in [0, 1] (1 = strata only, 0 = plain grpo)")
    check_eps(eps)


@register_estimator("stratified", check=_check_stratified)
def stratified(
    rewards: torch.Tensor, *, keys: Any = None, alpha: float = 1.0, eps: float = 1e-6, unbiased: bool = True
) -> torch.Tensor:
    """Per-stratum normalisation across the batch, blended with group normalisation (Stratified GRPO).

    rewards [B, G], keys [B, G] (each row's stratum) -> advantages [B, G]:
    A = alpha * (r - mean_s) / (std_s + eps) + (1 - alpha) * grpo(r), where mean_s, std_s are over all valid rows
    of the row's stratum in the whole batch (Bessel-corrected when ``unbiased``). A stratum with one row, or whose
    rewards are all equal, gives 0 for its strata term. Stratified GRPO ("Handling Structural Heterogeneity in
    RL of LLM Search Agents", 2025); also Dr. MAS's per-agent normalisation (strata = agents).
    Zero-variance *groups* are not zeroed: their rows still compare with the rest of their stratum.
    """
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"stratified: alpha={alpha} must lie in [0, 1] (1 = strata only, 0 = plain grpo)")
    r = _as_groups(rewards, "stratified")
    ids = _stratum_ids(keys, r.shape, r.device)  # [N]
    flat, valid = r.reshape(-1), ~r.isnan().reshape(-1)  # [N]
    rv, iv = flat[valid], ids[valid]  # [n] valid rows only
    k = int(ids.max()) + 1 if ids.numel() else 0
    zeros = torch.zeros(k, dtype=torch.float32, device=r.device)
    count = zeros.index_add(0, iv, torch.ones_like(rv))  # [S]
    mean = zeros.index_add(0, iv, rv) / count.clamp_min(1)  # [S]
    dev = rv - mean[iv]  # [n]
    std = (zeros.index_add(0, iv, dev**2) / (count - int(unbiased)).clamp_min(1)).sqrt()  # [S]
    spread = zeros.scatter_reduce(0, iv, rv, "amax", include_self=False) - zeros.scatter_reduce(
        0, iv, rv, "amin", include_self=False
    )  # [S]
    flat_ok = (count[iv] > 1) & (spread[iv] > eps)
    strata = torch.zeros_like(flat).masked_scatter(valid, torch.where(flat_ok, dev / (std[iv] + eps), 0.0))
    adv = strata.view_as(r)
    if alpha < 1.0:
        adv = alpha * adv + (1.0 - alpha) * grpo(r, eps=eps, unbiased=unbiased)
    return _finish(adv, ~r.isnan())


stratified.allows_single = True  # type: ignore[attr-defined]  # strata span the batch: G = 1 rows still compare


def _check_mapo(success: float = 1.0, eps: float = 1e-6) -> None:
    finite("advantage.options.success", success, "must be a finite number: the reward at which a row counts as a "
           "success (1.0 for a 0/1 verifier)")  # fmt: skip
    check_eps(eps)


@register_estimator("mapo", check=_check_mapo)
def mapo(rewards: torch.Tensor, *, success: float = 1.0, eps: float = 1e-6, unbiased: bool = True) -> torch.Tensor:
    """Mixed advantage: the group-std advantage and the advantage percent deviation, weighted by trajectory
    certainty (MAPO).

    rewards [B, G] -> advantages [B, G]. Huang et al. 2025, "MAPO: Mixed Advantage Policy Optimization"
    (arXiv 2509.18849). With p the fraction of the group's valid rows that succeeded (r >= ``success``; 1.0: a 0/1
    verifier passed), mu and sigma the group mean and (unbiased) std:

        A_std = (r - mu) / (sigma + eps)                 GRPO's advantage
        A_apd = (r - mu) / (|mu| + eps)                  advantage percent deviation
        lambda(p) = 1 - 4 p (1 - p)                      trajectory certainty: 0 at p = 1/2, 1 at p in {0, 1}
        A = (1 - lambda(p)) A_std + lambda(p) A_apd

    Near-certain groups (almost all right or all wrong) have a tiny sigma, so GRPO's A_std blows a single
    dissenting row up to ~sqrt(G) ("advantage reversion/mirror"); their advantage moves towards the relative
    deviation from the mean instead. E.g. G = 4, r = [1, 1, 1, 0]: p = 3/4, lambda = 1/4, mu = 3/4, sigma = 1/2:
    A_std = [0.5, 0.5, 0.5, -1.5], A_apd = [1/3, 1/3, 1/3, -1]; A = [0.4583, 0.4583, 0.4583, -1.375].
    |mu| (the paper divides by mu, with rewards >= 0) keeps the sign of r - mu for negative rewards, and A_apd is
    clamped to [-(G - 1), G - 1], the range it always has for rewards >= 0 (our guards: with rewards of both signs
    mu can be ~0 and the percent deviation unbounded; for non-negative rewards both are no-ops).
    Zero-variance groups get 0. The mix is per group: the issue's "step-level and batch-level" wording describes
    a different reading; this is the paper's.
    """
    r = _as_groups(rewards, "mapo")
    valid = ~r.isnan()
    mean = _masked_mean(r, valid)  # [B, 1]
    a_std = (r - mean) / (_masked_std(r, valid, unbiased) + eps)  # [B, G]
    bound = (valid.sum(-1, keepdim=True) - 1).clamp_min(0).float()  # [B, 1] G - 1
    a_apd = torch.maximum(torch.minimum((r - mean) / (mean.abs() + eps), bound), -bound)  # [B, G]
    p = _masked_mean((r >= success).float(), valid)  # [B, 1] success fraction (NaN >= x is False; masked anyway)
    lam = 1.0 - 4.0 * p * (1.0 - p)  # [B, 1]
    return _finish((1.0 - lam) * a_std + lam * a_apd, valid, zero_variance_groups(r, eps))


def _check_pacs(beta: float = 1.0) -> None:
    finite("advantage.options.beta", beta, "must be a finite number > 0 (the scale of PACS's implicit reward), e.g. "
           "advantage.options.beta=1.0", low=0.0)  # fmt: skip


@register_estimator("pacs", check=_check_pacs)
def pacs(rewards: torch.Tensor, *, beta: float = 1.0, balance: bool = False) -> torch.Tensor:
    """PACS's gradient coefficient of each row at the sampling parameters (use with ``loss.name: pacs``).

    rewards [B, G] (labels in [0, 1]) -> [B, G]. Li et al. 2025, "Implicit Actor Critic Coupling via a Supervised
    Learning Framework for RLVR" (PACS, arXiv 2509.02522). PACS treats the outcome reward r_i as a label and
    trains a score psi_i = rhat_i - mean_{j != i} rhat_j (RLOO), rhat_i = beta * sum_t log(pi / pi_old)(o_i,t), with
    the binary cross-entropy  L = sum_i w_i BCE(sigmoid(psi_i), r_i). Its gradient is

        grad L = sum_i c_i grad rhat_i,   c_i = e_i - 1/(G-1) sum_{j != i} e_j,   e_i = w_i (sigmoid(psi_i) - r_i).

    At the sampling parameters every rhat = 0, so psi = 0 and sigmoid(psi) = 1/2: c_i depends on the labels only.
    This estimator returns A_i = -beta * c_i, and the ``pacs`` loss's per-unit term -A_i log(pi / pi_old) then has
    exactly PACS's gradient (beta * c_i * grad log pi per unit, summed over the row's units). Unweighted this is
    beta times the RLOO advantage r_i - mean_{j != i} r_j: the paper's "recovers the classical policy gradient".
    ``balance`` sets w to the class-balanced weights of the group (sklearn's "balanced": w = G / (2 n_class)),
    as the authors' code can. Groups of one row get 0. Exact for one optimizer step per rollout (the config load
    enforces epochs x minibatches = 1 for the ``pacs`` loss): later steps would need every row of the group's
    current psi in the same loss call.
    """
    if not (math.isfinite(beta) and beta > 0):
        raise UserError(f"pacs: beta={beta} must be a finite number > 0 (the scale of the implicit reward)")
    r = _as_groups(rewards, "pacs")
    valid = ~r.isnan()
    if bool(((r < 0) | (r > 1))[valid].any()):
        raise UserError("pacs: rewards are BCE labels and must lie in [0, 1]; use 0/1 verifiable rewards")
    w = torch.ones_like(r)
    if balance:
        pos = (r >= 0.5) & valid
        n_pos, n = pos.sum(-1, keepdim=True).float(), valid.sum(-1, keepdim=True).float()  # [B, 1]
        both = (n_pos > 0) & (n_pos < n)
        w_pos = torch.where(both, n / (2 * n_pos.clamp_min(1)), 1.0)
        w_neg = torch.where(both, n / (2 * (n - n_pos).clamp_min(1)), 1.0)
        w = torch.where(pos, w_pos, w_neg)
    e = torch.where(valid, w * (0.5 - r), 0.0)  # [B, G]  sigmoid(0) - r, weighted
    count = valid.sum(-1, keepdim=True).float()  # [B, 1]
    others = (e.sum(-1, keepdim=True) - e) / (count - 1).clamp_min(1)  # [B, G]  mean of e_j over j != i
    c = e - others
    return torch.where(valid & (count > 1), -beta * c, 0.0)
