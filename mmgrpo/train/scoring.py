"""Phase 2 of the loop: score a rollout with every configured reward.

Each reward returns Tensor[N] or a list of N floats / None (None = does not apply to this row); the
result is one column per reward, [R, N] fp32, with NaN where a reward does not apply. Group-aware
rewards (``fn.group_aware = True``) receive the rows grouped contiguously and ``ctx.group``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mmgrpo import rewards as reward_registry
from mmgrpo.core.errors import UserError
from mmgrpo.core.types import RewardContext, Rollout


def build_rewards(specs: list[Any]) -> list[tuple[str, float, Any]]:
    """[(name, weight, callable)] from the config's reward list (restricted to ``streams`` where given)."""
    out = []
    for s in specs:
        fn = reward_registry.get(s.name, **s.options)
        out.append((s.name, float(s.weight), StreamFilter(fn, s.streams) if s.streams else fn))
    return out


class StreamFilter:
    """A reward applied only to rows whose ``meta['stream']`` is in ``streams``; other rows get None (NaN)."""

    def __init__(self, fn: Any, streams: list[str]):
        self.fn, self.streams = fn, set(streams)
        self.group_aware = getattr(fn, "group_aware", False)
        for attr in ("state_dict", "load_state_dict", "last_metrics"):
            if hasattr(fn, attr):
                setattr(self, attr, getattr(fn, attr))

    def __call__(self, samples: Any, prompts: list, meta: list[dict], ctx: Any) -> torch.Tensor:
        n = len(meta)
        col = to_column(getattr(self.fn, "__name__", "reward"), self.fn(samples, prompts, meta, ctx), n)
        keep = torch.tensor([m.get("stream") in self.streams for m in meta])
        return torch.where(keep, col, torch.full_like(col, math.nan))


def to_column(name: str, value: Any, n: int) -> torch.Tensor:
    """A reward's output as fp32 [N] with NaN for None."""
    if isinstance(value, torch.Tensor):
        col = value.detach().float().reshape(-1).cpu()
    else:
        try:
            col = torch.tensor([math.nan if v is None else float(v) for v in value], dtype=torch.float32)
        except (TypeError, ValueError) as e:
            raise UserError(f"reward {name!r} returned {type(value).__name__}; expected Tensor[N] or a list") from e
    if col.numel() != n:
        raise UserError(f"reward {name!r} returned {col.numel()} values for {n} rows")
    return col


def score(rollout: Rollout, rewards: list[tuple[str, float, Any]], step: int, policy: Any = None) -> torch.Tensor:
    """[V, R, N] reward columns for the rollout's rows: V = 1 + len(rollout.variants) versions of the samples."""
    n, G = rollout.num_rows, rollout.group_size
    ctx = RewardContext(group_size=G, step=step, group=torch.arange(n) // G, policy=policy)
    out = []
    for v, samples in enumerate([rollout.samples, *rollout.variants]):
        ctx.update_state = v == 0  # stateful rewards (curricula) advance once per step, on the main samples
        cols = [to_column(name, fn(samples, rollout.prompts, rollout.meta, ctx), n) for name, _, fn in rewards]
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
