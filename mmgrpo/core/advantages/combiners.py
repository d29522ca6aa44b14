"""Multi-reward combination: the built-in combiners, ``[R, B, G]`` reward columns -> one advantage ``[B, G]``
through an estimator, the reward streams (``kinds``) handed to those that declare them, and :func:`combine`, what
the trainer calls."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from mmgrpo.core.advantages.registry import COMBINER_INPUTS, COMBINERS, REWARD_KINDS, Estimator, get_estimator
from mmgrpo.core.errors import UserError, bad_option
from mmgrpo.core.schema import check_options


@COMBINERS.register("sum_then_normalize")
def sum_then_normalize(
    rewards: torch.Tensor, weights: torch.Tensor, estimator: Estimator, options: dict[str, Any]
) -> torch.Tensor:
    """Weighted sum of the R rewards, then one estimator call.

    rewards [R, B, G] (NaN: does not apply), weights [R] -> advantages [B, G]. A NaN entry contributes 0 and the
    other weights are NOT renormalised; a row where no reward applies is NaN for the estimator, so it is left out
    of the statistics and gets advantage 0.
    """
    return estimator(summed(rewards, weights), **options)


def summed(rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted sum [B, G] of ``rewards [R, B, G]`` (a NaN entry counts 0), NaN where no reward applies: what
    :func:`sum_then_normalize` hands the estimator."""
    valid = ~rewards.isnan()  # [R, B, G]
    total = (weights[:, None, None] * torch.where(valid, rewards, 0.0)).sum(0)  # [B, G]
    return torch.where(valid.any(0), total, math.nan)


sum_then_normalize.total = summed  # type: ignore[attr-defined]  (the one total its estimator call reads)


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
    return estimator(posterior_total(rewards, weights, kinds=kinds, threshold=threshold), **options)


def posterior_total(
    rewards: torch.Tensor, weights: torch.Tensor, *, kinds: list[str] | None = None, threshold: float = 1.0
) -> torch.Tensor:
    """R [B, G] of :func:`posterior`: the process rewards of the rows that are not correct set to 0, then
    :func:`summed`."""
    kinds = check_kinds(kinds, rewards.shape[0], "posterior")
    _check_posterior(kinds, threshold)
    outcome = torch.tensor([k == "outcome" for k in kinds], device=rewards.device)  # [R]
    out_r = rewards[outcome]  # [Ro, B, G]
    applies = ~out_r.isnan()
    correct = applies.any(0) & torch.where(applies, out_r >= threshold, True).all(0)  # [B, G]
    gate = outcome[:, None, None] | correct[None]  # [R, B, G]: outcome columns always, process ones when correct
    return summed(torch.where(gate | rewards.isnan(), rewards, 0.0), weights)


posterior.check = _check_posterior  # type: ignore[attr-defined]
posterior.total = posterior_total  # type: ignore[attr-defined]


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
    r, w, extra = _inputs(combiner, rewards, weights, kinds, combine_options)
    return combiner(r, w, est, dict(options or {}), **extra)


def _inputs(
    fn: Any, rewards: torch.Tensor, weights: torch.Tensor, kinds: list[str] | None, combine_options: dict | None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(rewards [R, B, G] fp32, weights [R] fp32, keyword arguments) for a combiner ``fn`` (or its ``total``): its
    options, and the reward streams when it declares ``kinds``."""
    r = torch.as_tensor(rewards).to(torch.float32)
    w = torch.as_tensor(weights, dtype=torch.float32, device=r.device).reshape(-1)
    if r.dim() != 3:
        raise UserError(f"combine: rewards must be [R, B, G] (rewards x prompts x group), got {tuple(r.shape)}")
    if w.numel() != r.shape[0]:
        raise UserError(f"combine: {w.numel()} weights for {r.shape[0]} reward columns; give one weight per reward")
    extra = dict(combine_options or {})
    params = inspect.signature(fn).parameters
    if "kinds" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        extra["kinds"] = check_kinds(kinds, r.shape[0])
    return r, w, extra


def row_weight_total(
    name: str,
    rewards: torch.Tensor,
    weights: torch.Tensor,
    kinds: list[str] | None = None,
    combine_options: dict[str, Any] | None = None,
) -> torch.Tensor | None:
    """What an estimator's row weights (MC-GRPO's pivot, the median row whose advantage is 0) read [B, G]: the one
    reward total combiner ``name`` hands its estimator (its ``total``, with the inputs :func:`combine` gives it: the
    same weights and gates as the advantages), or, for a combiner without one, the only reward column with a weight
    (the one estimator call whose pivot reaches the advantage); None when several weighted columns are normalised
    each on its own (:func:`normalize_then_sum`: each has its own pivot row)."""
    total = getattr(COMBINERS.get(name), "total", None)
    if total is not None:
        r, w, extra = _inputs(total, rewards, weights, kinds, combine_options)
        return total(r, w, **extra)
    used = [k for k in range(len(weights)) if float(weights[k]) != 0.0]
    return torch.as_tensor(rewards[used[0]]).to(torch.float32) if len(used) == 1 else None
