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

import copy
import math
import warnings
from typing import Any

import torch

from mmgrpo import rewards as reward_registry
from mmgrpo.core.advantages import row_weight_total, summed, zero_variance_groups
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
        out.append((name, float(s.weight), StreamFilter(fn, s.streams, name) if s.streams else fn))
    return out


class StreamFilter:
    """A reward applied only to rows whose ``meta['stream']`` is in ``streams``; other rows get None (NaN)."""

    def __init__(self, fn: Any, streams: list[str], name: str | None = None):
        self.fn, self.streams = fn, set(streams)
        self.name = name or getattr(fn, "__name__", "reward")  # its errors name the configured reward, not 'fn'
        self.nan_means_not_applicable = True  # its NaN rows are the other streams' (fn's own output is checked)
        self.group_aware = getattr(fn, "group_aware", False)
        self.uses_policy = getattr(fn, "uses_policy", False)  # scored in the main thread (Trainer.sample_and_score)
        for attr in ("state_dict", "load_state_dict", "last_metrics"):
            if hasattr(fn, attr):
                setattr(self, attr, getattr(fn, attr))

    def __call__(self, samples: Any, prompts: list, meta: list[dict], ctx: Any) -> torch.Tensor:
        col = call_reward(self.name, self.fn, samples, prompts, meta, ctx)
        keep = torch.tensor([m.get("stream") in self.streams for m in meta])
        return torch.where(keep, col, torch.full_like(col, math.nan))


def call_reward(
    name: str, fn: Any, samples: Any, prompts: list, meta: list[dict], ctx: Any, where: str | None = None
) -> torch.Tensor:
    """``fn``'s column for these rows; an exception inside the reward (``sys.exit`` too) becomes a UserError naming
    it. The reward gets its own lists of prompts and meta dicts, so what it changes there reaches no later reward;
    samples are the rollout's own tensors (a copy of every image a reward is too dear), so a reward that changes
    them in place is a UserError: the update would train on what it wrote (the samples are the actions), and the
    later rewards and ``mmgrpo sample``'s saved pictures would show it. ``where`` names the call in a message
    (default: the training step, counted from 1 as the progress bar, metrics.jsonl and the run's own messages count
    it, with the 0-based ``ctx.step`` the reward reads)."""
    tensors = [t for t in _tensors_of(samples) if not t.is_inference()]  # those keep no version counter
    versions = [t._version for t in tensors]
    try:
        own_meta = [copy.copy(m) if isinstance(m, dict) else m for m in meta] if isinstance(meta, list) else meta
        value = fn(samples, list(prompts) if isinstance(prompts, (list, tuple)) else prompts, own_meta, ctx)
    except UserError:
        raise
    except (Exception, SystemExit) as e:  # noqa: BLE001  the reward is user code: name it, keep the cause chained
        where = where or step_phrase(getattr(ctx, "step", None))
        if isinstance(e, SystemExit):  # the run ended with its code and no message; its directory was removed
            raise UserError(f"reward {name!r} called sys.exit({quoted(e.code, 60)}) {where}; a reward "
                            "returns its scores (raise an exception to stop the run with a message)"
                            ) from e  # fmt: skip
        raise UserError(f"reward {name!r} raised {type(e).__name__} {where}: {quoted(str(e), 300)}") from e
    if any(t._version != v for t, v in zip(tensors, versions)):
        where = where or step_phrase(getattr(ctx, "step", None))
        raise UserError(f"reward {name!r} changed the samples it scores in place {where} (e.g. "
                        "samples.mul_(), samples[i] = ...): the later rewards, the saved pictures and, where the "
                        "samples are the actions (the bandit's arms), the update would read what it wrote; work on a "
                        "copy (x = samples.clone()) or out of place (samples * 255)")  # fmt: skip
    return to_column(name, value, len(meta), getattr(fn, "nan_means_not_applicable", False))


def step_phrase(step: Any) -> str:
    """``in step 3 (ctx.step 2)``: a training step as the run's messages, progress bar and metrics.jsonl count it
    (from 1), with the 0-based index a reward reads as ``ctx.step`` (a message said "at step 2" of the step the rest
    of the paragraph called step 3)."""
    return f"in step {step + 1} (ctx.step {step})" if isinstance(step, int) else "in a training step"


def _tensors_of(samples: Any) -> list[torch.Tensor]:
    """The tensors of a batch of samples: itself, or those of a list (ragged videos, a VLM's completions hold
    none)."""
    if isinstance(samples, torch.Tensor):
        return [samples]
    if isinstance(samples, (list, tuple)):
        return [x for x in samples if isinstance(x, torch.Tensor)]
    return []


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
        check_magnitudes(cols, rewards, step)
        for (name, _, _), col in zip(rewards, cols):
            if v == 0 and bool(col.isnan().all()):
                warnings.warn(f"reward {name!r} applies to none of the {n} rows of step {step + 1}: it trains nothing "
                              "this step (check its streams / meta keys)", stacklevel=2)  # fmt: skip
        out.append(torch.stack(cols))
    return torch.stack(out)


MAX_REWARD = 1e15
"""the largest size of a reward, and of the weighted sum of a row's rewards: the advantage statistics square them in
fp32, over a group or, for batch_std / bnpo / stratified, over the whole batch (512 rows of 9e17 overflowed 3.4e38:
the std was inf, so every advantage 0, silently); at 1e15 a batch of 10**8 rows still fits"""


def check_magnitudes(cols: list[torch.Tensor], rewards: list[tuple[str, float, Any]], step: int) -> None:
    """Every reward column [N] and the rows' weighted totals at most :data:`MAX_REWARD` in size, else a UserError
    naming the reward (or the weights) and the first row past it."""
    for (name, weight, _), col in zip(rewards, cols):
        big = col.abs() > MAX_REWARD  # NaN (does not apply) compares False
        if weight != 0 and bool(big.any()):  # weight 0: logged only, never in a statistic
            row = int(big.nonzero()[0])
            raise UserError(f"reward {name!r} returned {col[row].item():.3g} for row {row} {step_phrase(step)} "
                            f"({int(big.sum())} of {col.numel()} rows beyond {MAX_REWARD:g} in size): the advantage "
                            "statistics square the rewards in fp32, which overflows and made every advantage 0; "
                            "scale the reward down")  # fmt: skip
    total = weighted_total(torch.stack(cols).double(), rewards)
    big = total.abs() > MAX_REWARD
    if bool(big.any()):
        row = int(big.nonzero()[0])
        weights = ", ".join(f"{name}: {w:g}" for name, w, _ in rewards)
        raise UserError(f"the weighted sum of the rewards is {total[row].item():.3g} for row {row} "
                        f"{step_phrase(step)} (weights {weights}), beyond {MAX_REWARD:g} in size: the advantage "
                        "statistics square it in fp32, which overflows; scale the weights down")  # fmt: skip


def reward_metrics(columns: torch.Tensor, rewards: list[tuple[str, float, Any]]) -> dict[str, float]:
    """reward/<name> raw means (over rows where it applies) and the weighted total's mean/std, of the rows given (the
    trainer gives the sampled ones: :meth:`~mmgrpo.train.trainer.Trainer._sampled_rows`)."""
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
    w = torch.tensor([wt for _, wt, _ in rewards], dtype=cols.dtype)[:, None]
    return (torch.nan_to_num(cols) * w).sum(0)


def uninformative_groups(
    cols: torch.Tensor,
    rewards: list[tuple[str, float, Any]],
    sizes: list[int],
    combine: str,
    kinds: list[str] | None = None,
    combine_options: dict[str, Any] | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The groups [B] whose advantages are all 0 because their rewards tie, from reward columns ``cols [R, N]``:
    under ``normalize_then_sum`` (each reward normalised on its own) those where every weighted reward's applicable
    values tie; otherwise those where the total the combiner hands its estimator ties (Posterior-GRPO's gated sum:
    a group of wrong answers whose process rewards differ has advantages all 0 there; ``weights`` [R]: this step's,
    else the configured ones). Rows a reward does not apply to (NaN) are left out, as the estimators leave them
    out: counted as 0, a group whose scored rows all tie looked spread, so DAPO's dynamic sampling kept it (an update
    with advantage 0 everywhere) and ``adv/zero_variance_groups`` missed it."""
    w = torch.tensor([wt for _, wt, _ in rewards], dtype=torch.float32) if weights is None else weights
    if combine == "normalize_then_sum":
        ties = [zero_variance_groups(pad_groups(col, sizes)) for col, wt in zip(cols, w.tolist()) if wt != 0]
        return torch.stack(ties).all(0) if ties else torch.ones(len(sizes), dtype=torch.bool)
    return zero_variance_groups(estimator_total(cols, rewards, sizes, combine, kinds, combine_options, w))


def estimator_total(
    cols: torch.Tensor,
    rewards: list[tuple[str, float, Any]],
    sizes: list[int],
    combine: str,
    kinds: list[str] | None = None,
    combine_options: dict[str, Any] | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, G_max] the reward total combiner ``combine`` hands its estimator, from columns ``cols [R, N]`` (NaN where
    no reward applies, and on the padding): Posterior-GRPO's gated sum, the sum under ``weights`` [R] (this step's,
    else the configured ones); for a combiner that normalises each reward on its own (or a plug-in that does not say
    what it normalises), the applicable weighted sum."""
    w = torch.tensor([wt for _, wt, _ in rewards], dtype=torch.float32) if weights is None else weights
    padded = pad_groups(cols, sizes)  # [R, B, G_max]
    total = row_weight_total(combine, padded, w, kinds, combine_options)
    return summed(padded, w) if total is None else total


def take_groups(rollout: Rollout, cols: torch.Tensor, groups: list[int]) -> tuple[Rollout, torch.Tensor]:
    """Groups ``groups`` of ``rollout`` with their reward columns ``cols [..., N]``."""
    return select_groups(rollout, groups), cols[..., rollout.group_rows(groups)]
