"""Advantage estimators, reward shaping and multi-reward combination (phase 3 of the loop, docs/architecture.md).

Letters: B prompts, G rows per group, N = B*G rows, R reward columns. Rows of one group are one row of the
``[B, G]`` reward tensor.

Three open registries of small pure functions (built-ins, entry points of the groups ``mmgrpo.estimators``,
``mmgrpo.shaping``, ``mmgrpo.combine``, or a dotted path in YAML):

- ``ESTIMATORS``: ``fn(rewards [B, G], *, <options>) -> advantages [B, G]``. Its keyword parameters are its options
  (``advantage.options``, checked at config load by :func:`estimator_options`), except the inputs the trainer
  supplies (:data:`ESTIMATOR_INPUTS`: ``keys``). An estimator may also carry a per-row loss-weight function as
  ``fn.row_weights`` (MC-GRPO zeroes its pivot row); :func:`get_row_weights` returns it, or ones.
- ``SHAPERS``: elementwise ``fn(rewards [...], **options) -> [...]``, applied to raw rewards *before* any
  estimator (TempSamp-R1's soft shaping).
- ``COMBINERS``: turn R reward columns ``[R, B, G]`` into one advantage ``[B, G]`` (sum-then-normalise, or
  normalise-each-then-sum as in GDPO). A combiner may declare the inputs of :data:`COMBINER_INPUTS` (``kinds``: the
  reward stream of each column) and options of its own (``advantage.combine_options``, checked at config load by
  :func:`combine_options`).

Reward streams: every configured reward is an ``outcome`` reward (is the final answer right: accuracy, IoU, test
cases; the default) or a ``process`` reward (how the answer was reached: the quality of the reasoning, format,
intermediate steps), set per reward in YAML with ``kind`` (:data:`REWARD_KINDS`). The built-in combiners ignore the
kind (so a config that sets none computes what it always did); a combiner or a method's advantage hook that declares a
``kinds`` keyword receives one kind per reward column, in the order of ``rewards:`` (Posterior-GRPO's
:func:`posterior` gates the process rewards on the outcome).

Conventions shared by every built-in estimator:

- All maths is fp32: the input is cast to float32 (a copy when it is not fp32 already); inputs are never modified.
- NaN means "this reward does not apply to this row": NaN rows are left out of every statistic (group
  mean/std/median, batch std, BNPO moments, strata) and get advantage exactly 0.
- Zero-variance groups (all valid rewards equal, see :func:`zero_variance_groups`) get advantage exactly 0
  for grpo, dr_grpo, batch_std, mc_grpo and bnpo: mathematically r - mean = 0 there, but in fp32 the mean of
  equal values can differ from them by an ulp, and dividing that by ``std + eps`` would turn rounding noise
  into an advantage of order 1e-2. NGRPO is the exception by design (see :func:`ngrpo`).
- Statistics that span the batch (batch_std, bnpo, stratified) are over the tensor given; under data
  parallelism the caller gathers the rewards of all ranks first (docs/architecture.md, "The seeding contract").
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from mmgrpo.core.errors import UserError, bad_option
from mmgrpo.core.registry import Registry, nearest
from mmgrpo.core.schema import check_options, check_values

Estimator = Callable[..., torch.Tensor]

ESTIMATORS: Registry[Estimator] = Registry("estimator", plugins="estimators")
SHAPERS: Registry[Callable[..., torch.Tensor]] = Registry("shaping", plugins="shaping")
COMBINERS: Registry[Callable[..., torch.Tensor]] = Registry("combine", plugins="combine")

REWARD_KINDS: tuple[str, ...] = ("outcome", "process")
"""the reward streams a reward may belong to (``rewards: [{name: accuracy, kind: outcome}, {name: think_quality,
kind: process}]``); outcome is the default"""

COMBINER_INPUTS: tuple[str, ...] = ("kinds",)
"""keyword parameters a combiner may declare to receive from the trainer (``kinds``: [R] the stream of each reward
column, one of :data:`REWARD_KINDS`); its other keyword parameters are options (``advantage.combine_options``)"""

ESTIMATOR_INPUTS: tuple[str, ...] = ("keys", "baseline", "roles")
"""keyword parameters an estimator may declare to receive from the trainer (``keys`` [B, G]: each row's stratum,
from ``Rollout.group_keys``; from the prompt sampler, ``baseline`` [B, 1]: SPO's per-prompt value, ``roles`` [B, 1]:
Beyond Variance's +1 / -1 / 0 prompt roles); its other keyword parameters are options"""


def register_estimator(
    name: str, weights: Callable[..., torch.Tensor] | None = None, check: Callable[..., None] | None = None
) -> Callable[[Estimator], Estimator]:
    """Decorator: register an estimator ``fn(rewards [B, G], **options) -> [B, G]`` under ``name``.

    ``weights``, when given, is ``fn(rewards [B, G], **options) -> [B, G]`` per-row loss weights, called with
    the same options as the estimator; it is kept as ``fn.row_weights`` (a plug-in estimator sets that itself).
    ``check``, when given, is kept as ``fn.check`` and called at config load with the options it names (defaults
    filled in); it raises a UserError naming ``advantage.options.<key>`` for a value out of range
    (:func:`check_values`).
    An estimator that gives groups of one row (``trainer.group_size=1``) a useful advantage declares
    ``fn.allows_single = True``; otherwise the config load refuses G < 2 (ngrpo, stratified and spo do).
    """

    def deco(fn: Estimator) -> Estimator:
        if weights is not None:
            fn.row_weights = weights  # type: ignore[attr-defined]
        if check is not None:
            fn.check = check  # type: ignore[attr-defined]
        return ESTIMATORS.register(name)(fn)

    return deco


def register_shaping(name: str) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator: register an elementwise reward shaping ``fn(rewards [...], **options) -> [...]``."""
    return SHAPERS.register(name)


def _checked(fn: Callable[..., torch.Tensor], kind: str, name: str) -> Callable[..., torch.Tensor]:
    """``fn`` with its keyword options checked: an unknown option is a UserError naming the valid ones."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return fn
    allowed = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]

    @functools.wraps(fn)
    def call(rewards: torch.Tensor, **options: Any) -> torch.Tensor:
        for key in options:
            if key not in allowed:
                hint = nearest(key, allowed)
                raise UserError(
                    f"{kind} {name!r} has no option {key!r}; valid options: {', '.join(allowed) or '(none)'}"
                    + (f" (did you mean {hint!r}?)" if hint else "")
                )
        return fn(rewards, **options)

    return call


def get_estimator(name: str) -> Estimator:
    """The estimator ``name``: ``fn(rewards [B, G], **options) -> [B, G]`` (unknown options raise UserError)."""
    return _checked(ESTIMATORS.get(name), "estimator", name)


def _unit_weights(rewards: torch.Tensor, **options: Any) -> torch.Tensor:
    """Every row weighs 1: ``[B, G]`` ones (fp32)."""
    return torch.ones(rewards.shape, dtype=torch.float32, device=rewards.device)


def get_row_weights(name: str) -> Callable[..., torch.Tensor]:
    """Per-row loss weights of estimator ``name``: ``fn(rewards [B, G], **options) -> [B, G]`` (default ones)."""
    return getattr(ESTIMATORS.get(name), "row_weights", _unit_weights)  # unknown name: UserError listing known


def get_shaping(name: str) -> Callable[..., torch.Tensor]:
    """The reward shaping ``name``: elementwise ``fn(rewards [...], **options) -> [...]``."""
    return _checked(SHAPERS.get(name), "shaping", name)


def estimator_options(name: str, options: dict[str, Any], where: str) -> dict[str, Any]:
    """At config load: ``advantage.options`` checked against estimator ``name``'s signature (did-you-mean UserError
    naming ``advantage.options.x``; the trainer's inputs such as ``keys`` are not options) and type-converted."""
    fn = ESTIMATORS.get(name)
    what = f"estimator {name!r}"
    opts = check_options(
        fn, options, what=what, prefix="advantage.options", where=where, skip=1, inputs=ESTIMATOR_INPUTS
    )
    check_values(fn, opts)
    return opts


def shaping_options(name: str, options: dict[str, Any], where: str) -> dict[str, Any]:
    """At config load: ``advantage.shaping_options`` checked against shaping ``name``'s signature, then its values
    (``fn.check``, :func:`check_values`)."""
    fn = SHAPERS.get(name)
    opts = check_options(
        fn, options, what=f"shaping {name!r}", prefix="advantage.shaping_options", where=where, skip=1
    )
    check_values(fn, opts)
    return opts


def finite(key: str, value: Any, rule: str, low: float | None = None, strict: bool = True) -> None:
    """UserError (:func:`bad_option`, ``key=value: rule``) unless ``value`` is a finite number, above ``low``
    (strictly, or at least ``low`` with ``strict=False``) when ``low`` is given."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if not ok:
        raise bad_option(key, value, rule)


def check_eps(eps: float = 1e-6) -> None:
    """``advantage.options.eps``: a finite number > 0 (0 lets a zero std divide, a negative one flips it)."""
    finite("advantage.options.eps", eps, "must be a finite number > 0 (it guards the division by the group std and "
           "is the tolerance of the zero-variance test); e.g. advantage.options.eps=1e-6", low=0.0)  # fmt: skip


# ----------------------------------------------------------------------------------------------- helpers


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


# --------------------------------------------------------------------------------------------- estimators


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
    by ~1e-3 and gives |A| = 1000, which swamps the loss.
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
            "stratified: missing option 'keys'; pass per-row stratum keys, keys=Tensor[B, G] of ints "
            "(or a nested list), e.g. the agent or search-trajectory type of each row"
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


# ------------------------------------------------------------------------------------------------ shaping


@register_shaping("none")
def no_shaping(rewards: torch.Tensor) -> torch.Tensor:
    """Identity: rewards unchanged (fp32)."""
    return torch.as_tensor(rewards).to(torch.float32)


def _check_tempsamp_soft(tau: float = 0.8, a1: float = 0.01, a2: float = 1.0) -> None:
    key = "advantage.shaping_options"
    finite(f"{key}.tau", tau, "must be a finite number: the reward above which tempsamp_soft compresses, e.g. 0.8")
    finite(f"{key}.a1", a1, "must be a finite number >= 0: how much rewards above tau still rise (0: all equal tau; "
           "a negative a1 would rank them in reverse), e.g. 0.01", low=0.0, strict=False)  # fmt: skip
    finite(f"{key}.a2", a2, "must be a finite number other than 0: the curvature of the stretch below tau (0 divides "
           "by zero and makes every shaped reward NaN or tau), e.g. 1.0")  # fmt: skip
    if a2 == 0:
        raise bad_option(f"{key}.a2", a2, "must not be 0: the stretch below tau divides by exp(a2) - 1; e.g. 1.0")


@register_shaping("tempsamp_soft")
def tempsamp_soft(rewards: torch.Tensor, *, tau: float = 0.8, a1: float = 0.01, a2: float = 1.0) -> torch.Tensor:
    """TempSamp-R1 non-linear soft shaping: compress rewards above tau, stretch those below.

    rewards [...] -> [...] elementwise: r >= tau -> tau + a1 ln(r - tau + 1);
    r < tau -> tau - (exp(a2 (tau - r)) - 1) / (exp(a2) - 1). E.g. f(1) = 0.80182, f(0.5) = 0.59639.
    TempSamp-R1, "Effective Temporal Sampling with Reinforcement Fine-Tuning for Video LLMs" (2025).
    """
    r = torch.as_tensor(rewards).to(torch.float32)
    above = tau + a1 * torch.log1p((r - tau).clamp_min(0.0))
    below = tau - torch.expm1(a2 * (tau - r).clamp_min(0.0)) / math.expm1(a2)
    return torch.where(r >= tau, above, torch.where(r < tau, below, r))  # NaN stays NaN


tempsamp_soft.check = _check_tempsamp_soft  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------- combiners


@COMBINERS.register("sum_then_normalize")
def sum_then_normalize(
    rewards: torch.Tensor, weights: torch.Tensor, estimator: Estimator, options: dict[str, Any]
) -> torch.Tensor:
    """Weighted sum of the R rewards, then one estimator call.

    rewards [R, B, G] (NaN: does not apply), weights [R] -> advantages [B, G]. A NaN entry contributes 0 and the
    other weights are NOT renormalised; a row where no reward applies is NaN for the estimator, so it is left out
    of the statistics and gets advantage 0.
    """
    valid = ~rewards.isnan()  # [R, B, G]
    total = (weights[:, None, None] * torch.where(valid, rewards, 0.0)).sum(0)  # [B, G]
    return estimator(torch.where(valid.any(0), total, math.nan), **options)


@COMBINERS.register("normalize_then_sum")
def normalize_then_sum(
    rewards: torch.Tensor, weights: torch.Tensor, estimator: Estimator, options: dict[str, Any]
) -> torch.Tensor:
    """Each reward column through the estimator separately, then the weighted sum (GDPO-style decoupling).

    rewards [R, B, G] (NaN: does not apply), weights [R] -> advantages [B, G]. NaN rows are left out of that
    column's statistics and get 0 from it, so a sparse reward cannot be drowned by a dense one of larger scale.
    GDPO, "Group reward-Decoupled Normalization Policy Optimization".
    """
    per_reward = torch.stack([estimator(col, **options) for col in rewards])  # [R, B, G]
    return (weights[:, None, None] * per_reward).sum(0)


def _check_posterior(kinds: list[str], threshold: float = 1.0) -> None:
    """Posterior-GRPO needs an outcome reward (what decides "correct") and a process reward (what it gates)."""
    if "outcome" not in kinds or "process" not in kinds:
        raise UserError(
            f"the posterior combiner gates process rewards on the outcome, but the rewards' kinds are {kinds}; mark "
            "the answer's reward kind: outcome and the reasoning's reward kind: process, e.g. rewards: [{name: "
            "accuracy, kind: outcome}, {name: format, kind: process}]"
        )
    if not math.isfinite(threshold):
        raise bad_option("advantage.combine_options.threshold", threshold, "must be a finite number: the outcome "
                         "reward at which a row counts as correct (1.0 for 0/1 rewards)")  # fmt: skip


@COMBINERS.register("posterior")
def posterior(
    rewards: torch.Tensor,
    weights: torch.Tensor,
    estimator: Estimator,
    options: dict[str, Any],
    *,
    kinds: list[str] | None = None,
    threshold: float = 1.0,
) -> torch.Tensor:
    """Posterior-GRPO: process rewards count only for rows whose outcome is correct, then sum-then-normalise.

    rewards [R, B, G] (NaN: does not apply), weights [R], kinds [R] (``outcome`` / ``process``) -> advantages
    [B, G]. A row is *correct* when it has at least one applicable outcome reward and every applicable outcome reward
    is >= ``threshold`` (1.0: a 0/1 verifier passed). With c_i that indicator,

        R_i = sum_{k outcome} w_k r_k,i + c_i * sum_{k process} w_k r_k,i,     A = estimator(R)

    so a wrong answer cannot earn reasoning reward, and the reasoning reward ranks only the successful rows (their
    process reward sets how far above the failures each lands). Fan, Zhang, Chen & Liu 2025, "Posterior-GRPO:
    Rewarding Reasoning Processes in Code Generation" (arXiv 2508.05170): "conditions process-based rewards on task
    success ... selectively applying rewards to the reasoning processes of only successful outcomes", which
    mitigates reward hacking of the process reward. The abstract gives the rule, not a formula: this gate on the
    summed reward before one group normalisation is our reading of it (a gated process reward of a wrong row is 0,
    not NaN: the row still competes on its outcome).
    """
    kinds = check_kinds(kinds, rewards.shape[0], "posterior")
    _check_posterior(kinds, threshold)
    outcome = torch.tensor([k == "outcome" for k in kinds], device=rewards.device)  # [R]
    out_r = rewards[outcome]  # [Ro, B, G]
    applies = ~out_r.isnan()
    correct = applies.any(0) & torch.where(applies, out_r >= threshold, True).all(0)  # [B, G]
    gate = outcome[:, None, None] | correct[None]  # [R, B, G]: outcome columns always, process ones when correct
    gated = torch.where(gate | rewards.isnan(), rewards, 0.0)
    return sum_then_normalize(gated, weights, estimator, options)


posterior.check = _check_posterior  # type: ignore[attr-defined]


def combine_options(name: str, options: dict[str, Any], where: str, kinds: list[str] | None = None) -> dict[str, Any]:
    """At config load: ``advantage.combine_options`` checked against combiner ``name``'s signature (its four
    positional parameters and the inputs of :data:`COMBINER_INPUTS` are not options), then, when the combiner has a
    ``check(kinds, **options)``, the options' values and the reward streams ``kinds`` [R] against it (UserError)."""
    fn = COMBINERS.get(name)
    opts = check_options(
        fn, options, what=f"combiner {name!r}", prefix="advantage.combine_options", where=where, skip=4,
        inputs=COMBINER_INPUTS,
    )  # fmt: skip
    check = getattr(fn, "check", None)
    if check is not None and kinds is not None:
        try:
            check(kinds=list(kinds), **opts)
        except UserError as e:
            raise UserError(f"advantage.combine={name} in {where}: {e}") from e
    return opts


def check_kinds(kinds: Any, count: int, who: str = "combine") -> list[str]:
    """``kinds`` as a list of ``count`` reward streams (None: every reward is an outcome reward)."""
    if kinds is None:
        return ["outcome"] * count
    out = list(kinds)
    if len(out) != count or any(k not in REWARD_KINDS for k in out):
        raise UserError(f"{who}: kinds={out} must give one of {list(REWARD_KINDS)} for each of the {count} rewards")
    return out


def combine(
    name: str,
    rewards: torch.Tensor,
    weights: torch.Tensor,
    estimator: str,
    options: dict[str, Any],
    kinds: list[str] | None = None,
    combine_options: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Combine R reward columns into one advantage with combiner ``name`` and estimator ``estimator``.

    rewards [R, B, G] (NaN = the reward does not apply to that row), weights [R] -> advantages [B, G] fp32.
    ``options`` are the estimator's options; ``kinds`` [R] the stream of each column (None: all ``outcome``), handed
    to a combiner that declares ``kinds``; ``combine_options`` the combiner's own options.
    """
    combiner = COMBINERS.get(name)
    est = get_estimator(estimator)
    r = torch.as_tensor(rewards).to(torch.float32)
    w = torch.as_tensor(weights, dtype=torch.float32, device=r.device).reshape(-1)
    if r.dim() != 3:
        raise UserError(f"combine: rewards must be [R, B, G] (rewards x prompts x group), got {tuple(r.shape)}")
    if w.numel() != r.shape[0]:
        raise UserError(f"combine: {w.numel()} weights for {r.shape[0]} reward columns; give one weight per reward")
    extra = dict(combine_options or {})
    params = inspect.signature(combiner).parameters
    if "kinds" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        extra["kinds"] = check_kinds(kinds, r.shape[0])
    return combiner(r, w, est, dict(options or {}), **extra)
