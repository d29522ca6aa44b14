"""Phase 2 of the loop: score a rollout with every configured reward.

Each reward returns Tensor[N] (or a numpy array) or a list of N numbers / None (None = does not apply to this
row); the result is one column per reward, [R, N] fp32, with NaN where a reward does not apply. Group-aware
rewards (``fn.group_aware = True``) receive the rows grouped contiguously and ``ctx.group``.

Nothing non-finite gets past here: ±inf from a reward is a UserError naming the reward and the rows, and so is
NaN unless the reward declares ``fn.nan_means_not_applicable = True`` (then NaN reads as None). Strings, dicts
and other non-numbers are refused (a "111" is not 111.0), and a reward that raises is named in the error. A
reward that applies to none of a step's rows warns: it trains nothing that step.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from mmgrpo import rewards as reward_registry
from mmgrpo.core.advantages import zero_variance_groups
from mmgrpo.core.errors import UserError, quoted
from mmgrpo.core.types import RewardContext, Rollout, pad_groups, select_groups
from mmgrpo.rewards.columns import FLOAT32_MAX, _check_finite, _one_number, to_column  # noqa: F401  (moved there)


def build_rewards(specs: list[Any]) -> list[tuple[str, float, Any]]:
    """[(name, weight, callable)] from the config's reward list (restricted to ``streams`` where given). A name the
    list holds more than once (two ``remote`` servers, one reward with two option sets) is ``<name>_<i>`` after its
    first place (``i`` its index in ``rewards:``), so each keeps its own ``reward/<name>`` metric and its own state
    in checkpoints, while the first keeps the name a method's ``reward:`` option refers to."""
    names = [s.name for s in specs]
    out = []
    for i, s in enumerate(specs):
        try:
            fn = reward_registry.get(s.name, **s.options)
        except UserError as e:  # the factory's own check ("accuracy: atol ... must be >= 0"): name where it is set
            raise UserError(f"rewards.{i}.options ({s.name}): {e}") from e
        name = f"{s.name}_{i}" if s.name in names[:i] else s.name
        out.append((name, float(s.weight), StreamFilter(fn, s.streams) if s.streams else fn))
    return out


class StreamFilter:
    """A reward applied only to rows whose ``meta['stream']`` is in ``streams``; other rows get None (NaN)."""

    def __init__(self, fn: Any, streams: list[str]):
        self.fn, self.streams = fn, set(streams)
        self.nan_means_not_applicable = True  # its NaN rows are the other streams' (fn's own output is checked)
        self.group_aware = getattr(fn, "group_aware", False)
        self.uses_policy = getattr(fn, "uses_policy", False)  # scored in the main thread (Trainer.sample_and_score)
        for attr in ("state_dict", "load_state_dict", "last_metrics"):
            if hasattr(fn, attr):
                setattr(self, attr, getattr(fn, attr))

    def __call__(self, samples: Any, prompts: list, meta: list[dict], ctx: Any) -> torch.Tensor:
        col = call_reward(getattr(self.fn, "__name__", "reward"), self.fn, samples, prompts, meta, ctx)
        keep = torch.tensor([m.get("stream") in self.streams for m in meta])
        return torch.where(keep, col, torch.full_like(col, math.nan))


def call_reward(name: str, fn: Any, samples: Any, prompts: list, meta: list[dict], ctx: Any) -> torch.Tensor:
    """``fn``'s column for these rows; an exception inside the reward becomes a UserError naming it."""
    try:
        value = fn(samples, prompts, meta, ctx)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  the reward is user code: name it, keep the cause chained
        step = getattr(ctx, "step", "?")
        raise UserError(f"reward {name!r} raised {type(e).__name__} at step {step}: {quoted(str(e), 300)}") from e
    return to_column(name, value, len(meta), getattr(fn, "nan_means_not_applicable", False))


def score(rollout: Rollout, rewards: list[tuple[str, float, Any]], step: int, policy: Any = None) -> torch.Tensor:
    """[V, R, N] reward columns for the rollout's rows: V = 1 + len(rollout.variants) versions of the samples."""
    n, G = rollout.num_rows, rollout.group_size
    ctx = RewardContext(group_size=G, step=step, group=rollout.row_group(), policy=policy,
                        group_sizes=rollout.group_sizes)  # fmt: skip
    if rollout.ragged:
        aware = [name for name, _, fn in rewards if getattr(fn, "group_aware", False)]
        if aware:
            raise UserError(
                f"reward {aware[0]!r} is group-aware (it reads groups of ctx.group_size rows), but this step's groups "
                f"have different sizes {rollout.group_sizes[:8]}... (a prompt sampler varies the rollouts per "
                "prompt); use a sampler with a fixed group size with this reward"
            )
    out = []
    for v, samples in enumerate([rollout.samples, *rollout.variants]):
        ctx.update_state = v == 0  # stateful rewards (curricula) advance once per step, on the main samples
        cols = [call_reward(name, fn, samples, rollout.prompts, rollout.meta, ctx) for name, _, fn in rewards]
        for (name, _, _), col in zip(rewards, cols):
            if v == 0 and bool(col.isnan().all()):
                warnings.warn(f"reward {name!r} applies to none of the {n} rows of step {step}: it trains nothing "
                              "this step (check its streams / meta keys)", stacklevel=2)  # fmt: skip
        out.append(torch.stack(cols))
    return torch.stack(out)


def reward_metrics(columns: torch.Tensor, rewards: list[tuple[str, float, Any]]) -> dict[str, float]:
    """reward/<name> raw means (over rows where it applies) and the weighted total's mean/std."""
    out = {}
    for (name, _, _), col in zip(rewards, columns):
        valid = ~torch.isnan(col)
        out[f"reward/{name}"] = col[valid].mean().item() if valid.any() else math.nan
    w = torch.tensor([wt for _, wt, _ in rewards], dtype=torch.float32)[:, None]
    total = (torch.nan_to_num(columns) * w).sum(0)
    out["reward/mean"] = total.mean().item()
    for _, _, fn in rewards:  # rewards that report their own state (e.g. curriculum/tau)
        if hasattr(fn, "last_metrics"):
            out.update(fn.last_metrics())
    out["reward/std"] = total.std().item() if total.numel() > 1 else 0.0
    return out


def stateful_rewards(rewards: list[tuple[str, float, Any]]) -> dict[str, Any]:
    """Rewards with state_dict()/load_state_dict() (curricula), keyed by position and name."""
    return {f"{i}:{name}": fn for i, (name, _, fn) in enumerate(rewards) if hasattr(fn, "state_dict")}


def weighted_total(cols: torch.Tensor, rewards: list[tuple[str, float, Any]]) -> torch.Tensor:
    """The configured weighted sum of reward columns ``cols [R, n]`` -> [n] (NaN, a reward's "no score", counts 0)."""
    w = torch.tensor([wt for _, wt, _ in rewards], dtype=torch.float32)[:, None]
    return (torch.nan_to_num(cols) * w).sum(0)


def applicable_total(cols: torch.Tensor, rewards: list[tuple[str, float, Any]]) -> torch.Tensor:
    """:func:`weighted_total` with NaN on the rows no reward applies to: what the ``sum_then_normalize`` combiner
    hands the estimator (such a row is left out of its group's statistics, not counted as a reward of 0)."""
    return torch.where((~cols.isnan()).any(0), weighted_total(cols, rewards), math.nan)


def uninformative_groups(
    cols: torch.Tensor, rewards: list[tuple[str, float, Any]], sizes: list[int], combine: str
) -> torch.Tensor:
    """The groups [B] whose advantages are all 0 because their rewards tie, from reward columns ``cols [R, N]``:
    under ``normalize_then_sum`` (each reward normalised on its own) those where every weighted reward's applicable
    values tie; otherwise those where the applicable totals tie. Rows a reward does not apply to (NaN) are left out,
    as the estimators leave them out: counted as 0, a group whose scored rows all tie looked spread, so DAPO's
    dynamic sampling kept it (an update with advantage 0 everywhere) and ``adv/zero_variance_groups`` missed it."""
    if combine == "normalize_then_sum":
        ties = [zero_variance_groups(pad_groups(col, sizes)) for col, (_, w, _) in zip(cols, rewards) if w != 0]
        return torch.stack(ties).all(0) if ties else torch.ones(len(sizes), dtype=torch.bool)
    return zero_variance_groups(pad_groups(applicable_total(cols, rewards), sizes))


def take_groups(rollout: Rollout, cols: torch.Tensor, groups: list[int]) -> tuple[Rollout, torch.Tensor]:
    """Groups ``groups`` of ``rollout`` with their reward columns ``cols [..., N]``."""
    return select_groups(rollout, groups), cols[..., rollout.group_rows(groups)]
