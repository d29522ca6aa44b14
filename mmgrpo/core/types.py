"""The objects that cross the seams of the loop (docs/architecture.md): prompts in, rollouts out, log-probs back.

Letters: B prompts per step, G samples per prompt, N = B*G rows, K action units per row.
Rows of one group are contiguous: row n belongs to prompt n // G. Ragged groups (a different G_b per prompt, asked by
a prompt sampler through ``PromptBatch.group_sizes``) stay contiguous too: group b holds rows
offsets[b] .. offsets[b+1] - 1 (``Rollout.group_offsets``), N = sum_b G_b, and ``group_size`` is G_max.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class PromptBatch:
    """B prompts of one step on this rank.

    ``seeds[b]`` seeds everything random about prompt b's group (its G samples). It is derived from the
    run seed, the step and the prompt's *global* position in the step, so samples do not depend on how
    prompts are split across ranks or micro-batches.
    """

    prompts: list[Any]  # B prompts: text, or any object the policy understands (the bandit: an int)
    meta: list[dict] = field(default_factory=list)  # B per-prompt metadata (ground truth, images, ...)
    seeds: list[int] = field(default_factory=list)  # B
    step: int = 0
    group_sizes: list[int] = field(default_factory=list)  # B rollouts asked per prompt; empty = the G of rollout()
    positions: list[int] = field(default_factory=list)  # B global stream positions (set by the trainer)

    def __post_init__(self) -> None:
        if not self.meta:
            self.meta = [{} for _ in self.prompts]
        if len(self.meta) != len(self.prompts):
            raise ValueError(f"PromptBatch: {len(self.prompts)} prompts but {len(self.meta)} meta entries")
        if self.seeds and len(self.seeds) != len(self.prompts):
            raise ValueError(f"PromptBatch: {len(self.prompts)} prompts but {len(self.seeds)} seeds")
        if self.group_sizes and len(self.group_sizes) != len(self.prompts):
            raise ValueError(f"PromptBatch: {len(self.prompts)} prompts but {len(self.group_sizes)} group sizes")
        if any(int(s) < 1 for s in self.group_sizes):
            raise ValueError(f"PromptBatch: group sizes must be >= 1, got {self.group_sizes}")

    def sizes(self, group_size: int) -> list[int]:
        """[B] rollouts of each prompt: ``group_sizes`` when given, else ``group_size`` each."""
        return [int(s) for s in self.group_sizes] if self.group_sizes else [int(group_size)] * len(self.prompts)

    def ragged(self, group_size: int) -> bool:
        """True when some prompt asks for a number of rollouts other than ``group_size``."""
        return any(s != group_size for s in self.sizes(group_size))

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, idx: list[int]) -> PromptBatch:
        return PromptBatch(
            prompts=[self.prompts[i] for i in idx],
            meta=[self.meta[i] for i in idx],
            seeds=[self.seeds[i] for i in idx] if self.seeds else [],
            step=self.step,
            group_sizes=[self.group_sizes[i] for i in idx] if self.group_sizes else [],
            positions=[self.positions[i] for i in idx] if self.positions else [],
        )


@dataclass
class Rollout:
    """N = B*G sampled rows, everything the update needs.

    ``logp_old [N, K]`` (fp32) is the log-prob of each action unit under the *sampling* parameters;
    ``train_mask [N, K]`` says which units the update may use. ``samples`` is what rewards score
    (a Tensor [N, ...] or a list of N objects). ``variants`` are further versions of the same N rows that
    are scored with the same rewards and whose advantages are *summed* with the main one (the hook G2RPO's
    multi-granularity continuations use; empty for everything else). ``extras`` holds policy-private tensors needed to
    recompute log-probs (latents, token ids, ...); tensors in it are indexed by row on dim 0.

    ``logp_old_from_update``: the policy did not compute ``logp_old`` (it holds zeros) because the trainer asked it
    not to (``Policy.logp_old_from_update``): the rollout feeds one optimizer step, whose forward runs at the sampling
    parameters, so the update takes ``logp_old = logp.detach()`` from its own forward (ratio exactly 1).

    ``group_sizes``: ragged groups, [B] rows of each group (contiguous, in order); None = every group has
    ``group_size`` rows. When given, ``group_size`` is set to their maximum G_max, and sizes that are all equal are
    folded back into the uniform form (``group_sizes`` None, ``group_size`` that size).
    """

    samples: Any
    logp_old: torch.Tensor  # [N, K] fp32
    train_mask: torch.Tensor  # [N, K] bool
    group_size: int  # G
    prompts: list[Any]  # N (prompt of each row)
    meta: list[dict]  # N
    extras: dict[str, Any] = field(default_factory=dict)
    loss_weight: torch.Tensor | None = None  # [N] per-row weight (MC-GRPO pivot, per-stream weights)
    group_keys: list[Any] | None = None  # N optional stratum key per row (stratified estimator)
    variants: list[Any] = field(default_factory=list)  # extra versions of the N samples, each scored too
    logp_old_from_update: bool = False  # logp_old not computed: the update's own forward gives it (one step only)
    group_sizes: list[int] | None = None  # B rows per group when groups are ragged; None = group_size each

    def __post_init__(self) -> None:
        if self.group_sizes is None:
            return
        sizes = [int(s) for s in self.group_sizes]
        if any(s < 1 for s in sizes) or sum(sizes) != self.num_rows:
            raise ValueError(f"Rollout: group sizes {sizes} must be >= 1 and add up to the {self.num_rows} rows")
        if sizes and len(set(sizes)) == 1:  # uniform after all: the plain form
            self.group_size, self.group_sizes = sizes[0], None
        else:
            self.group_size, self.group_sizes = max(sizes, default=self.group_size), sizes

    @property
    def num_rows(self) -> int:
        return int(self.logp_old.shape[0])

    @property
    def ragged(self) -> bool:
        """Whether groups have different sizes (``group_sizes`` given)."""
        return self.group_sizes is not None

    @property
    def num_groups(self) -> int:
        return len(self.group_sizes) if self.group_sizes is not None else self.num_rows // self.group_size

    @property
    def sizes(self) -> list[int]:
        """[B] rows of each group."""
        return list(self.group_sizes) if self.group_sizes is not None else [self.group_size] * self.num_groups

    @property
    def group_offsets(self) -> list[int]:
        """[B + 1] first row of each group, then N."""
        return offsets_of(self.sizes)

    def group_rows(self, groups: list[int]) -> list[int]:
        """The rows of ``groups``, group by group in the order given."""
        off = self.group_offsets
        return [n for g in groups for n in range(off[g], off[g + 1])]

    def row_group(self) -> torch.Tensor:
        """LongTensor [N]: the group of each row."""
        return torch.repeat_interleave(torch.arange(self.num_groups), torch.tensor(self.sizes, dtype=torch.long))


@dataclass
class LogProbs:
    """Recomputed log-probs (with grad) for chosen rows/units.

    ``logp [n, k]`` fp32; ``kl [n, k]`` the per-unit KL to the reference policy, or None when the
    policy has no reference (beta = 0). ``neg_logp [n, k]``: DiffusionNFT's implicit *negative* policy
    (diffusion objective=nft, loss ``nft``); there ``logp`` is the implicit positive policy's. None elsewhere.
    """

    logp: torch.Tensor
    kl: torch.Tensor | None = None
    neg_logp: torch.Tensor | None = None


@dataclass
class RewardContext:
    """What a reward may need beyond samples and prompts."""

    group_size: int  # G
    step: int = 0
    group: torch.Tensor | None = None  # [N] group index of each row (n // G, or by Rollout.group_offsets if ragged)
    policy: Any = None  # for rewards that query the policy (answer-consistency re-asking)
    device: torch.device | str = "cpu"
    update_state: bool = True  # False when rows are scored again (variants, evaluation): curricula must not advance
    group_sizes: list[int] | None = None  # [B] rows per group when groups are ragged; None = group_size each (last:
    # rewards and plug-ins build contexts positionally)


@runtime_checkable
class Policy(Protocol):
    """A stochastic policy the group-relative optimizer can train.

    ``model`` is the trainable ``torch.nn.Module``; the trainer replaces it with its accelerate-prepared
    wrapper (DDP/FSDP), so policies must call ``self.model(...)`` for forwards that carry gradient.

    Invariant (tested for every adapter): ``log_prob`` right after ``rollout``, with unchanged parameters,
    gives exp(logp - logp_old) = 1 within 1e-5 in fp32, for any micro-batch size.

    Optional: a policy whose ``logp_old`` costs a forward of its own after sampling (the VLM's teacher-forced
    scoring, the flow-matching objective's) has a bool attribute ``logp_old_from_update`` (False by default). The
    trainer sets it True around ``rollout`` when the rollout feeds exactly one optimizer step (epochs x minibatches
    = 1); the policy may then skip that forward and return a rollout with ``logp_old_from_update = True``.
    """

    model: torch.nn.Module

    def rollout(self, batch: PromptBatch, group_size: int, generator: torch.Generator | None = None) -> Rollout:
        """Sample G rows per prompt without grad; record logp_old [N, K] and train_mask [N, K]."""
        ...

    def log_prob(self, rollout: Rollout, rows: torch.Tensor, units: torch.Tensor | None = None) -> LogProbs:
        """Recompute log-probs with grad for ``rows`` [n] (and ``units`` [k], default all): logp [n, k]."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates (LoRA weights, or all)."""
        ...


def _take(value: Any, rows: list[int], n: int) -> Any:
    """Index a per-row value (Tensor [N, ...] or list of N) by rows; leave other values alone."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value[torch.as_tensor(rows, dtype=torch.long)]
    if isinstance(value, list) and len(value) == n:
        return [value[i] for i in rows]
    if isinstance(value, dict):  # nested per-row tensors (e.g. a diffusion policy's conditioning)
        return {k: _take(v, rows, n) for k, v in value.items()}
    return value


def offsets_of(sizes: list[int]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + int(s))
    return out


def _pad_index(sizes: list[int]) -> tuple[torch.Tensor, int]:
    """LongTensor [N]: where row n sits in the flattened [B, G_max] padded layout; and G_max."""
    gmax = max(sizes, default=1)
    idx = [b * gmax + j for b, s in enumerate(sizes) for j in range(int(s))]
    return torch.tensor(idx, dtype=torch.long), gmax


def pad_groups(x: torch.Tensor, sizes: list[int], fill: float = math.nan) -> torch.Tensor:
    """Per-row values ``x [..., N]`` as ``[..., B, G_max]``, group b's G_b rows first in its row, ``fill`` after.

    With every size equal to G this is ``x.view(..., B, G)`` (the same values, bit for bit). NaN (the default fill)
    is what every built-in estimator reads as "does not apply": left out of the statistics, advantage 0.
    """
    idx, gmax = _pad_index(sizes)
    if len(idx) != x.shape[-1]:
        raise ValueError(f"pad_groups: {x.shape[-1]} rows for group sizes adding up to {len(idx)}")
    out = torch.full((*x.shape[:-1], len(sizes) * gmax), fill, dtype=x.dtype, device=x.device)
    out[..., idx.to(x.device)] = x
    return out.view(*x.shape[:-1], len(sizes), gmax)


def unpad_groups(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Inverse of :func:`pad_groups`: ``[..., B, G_max] -> [..., N]`` (the padding dropped)."""
    idx, gmax = _pad_index(sizes)
    if x.shape[-2:] != (len(sizes), gmax):
        raise ValueError(f"unpad_groups: shape {tuple(x.shape)} is not [..., {len(sizes)}, {gmax}]")
    return x.reshape(*x.shape[:-2], -1)[..., idx.to(x.device)]


def _subset(rollout: Rollout, rows: list[int], group_sizes: list[int] | None) -> Rollout:
    """The rollout's ``rows`` (in that order) as a rollout of groups of ``group_sizes`` (None: of ``group_size``)."""
    n = rollout.num_rows
    return Rollout(
        samples=_take(rollout.samples, rows, n),
        logp_old=rollout.logp_old[rows],
        train_mask=rollout.train_mask[rows],
        group_size=rollout.group_size,
        prompts=[rollout.prompts[i] for i in rows],
        meta=[rollout.meta[i] for i in rows],
        extras={k: _take(v, rows, n) for k, v in rollout.extras.items()},
        loss_weight=None if rollout.loss_weight is None else rollout.loss_weight[rows],
        group_keys=None if rollout.group_keys is None else [rollout.group_keys[i] for i in rows],
        variants=[_take(v, rows, n) for v in rollout.variants],
        logp_old_from_update=rollout.logp_old_from_update,
        group_sizes=group_sizes,
    )


def select_groups(rollout: Rollout, groups: list[int]) -> Rollout:
    """The rollout restricted to whole groups (their rows, group by group in the order of ``groups``)."""
    sizes = rollout.sizes
    return _subset(rollout, rollout.group_rows(groups), [sizes[g] for g in groups] if rollout.ragged else None)


def select_rows(rollout: Rollout, rows: list[int]) -> Rollout:
    """The rollout restricted to ``rows`` (in that order), grouped by ``rollout.group_size`` again: e.g. a group whose
    rows come from two rollouts of the same prompt (Scaf-GRPO's hinted rows in a failed group)."""
    if len(rows) % rollout.group_size:
        raise ValueError(f"select_rows: {len(rows)} rows do not make whole groups of {rollout.group_size}")
    return _subset(rollout, rows, None)


def _cat(values: list[Any], sizes: list[int]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] == sizes[0]:
        return torch.cat(values)
    if isinstance(first, list) and len(first) == sizes[0]:
        return [x for v in values for x in v]
    if isinstance(first, dict):
        return {k: _cat([v[k] for v in values], sizes) for k in first}
    return first


def concat_rollouts(parts: list[Rollout]) -> Rollout:
    """Rows of several rollouts (same K) stacked in order; parts with different group sizes give ragged groups."""
    if len(parts) == 1:
        return parts[0]
    sizes = [p.num_rows for p in parts]
    G = parts[0].group_size
    group_sizes = [s for p in parts for s in p.sizes]
    if len({p.logp_old_from_update for p in parts}) > 1:
        raise ValueError("concat_rollouts: some rollouts recorded logp_old and some left it to the update")
    weights = None
    if any(p.loss_weight is not None for p in parts):
        weights = torch.cat([p.loss_weight if p.loss_weight is not None else torch.ones(p.num_rows) for p in parts])
    keys = None
    if any(p.group_keys is not None for p in parts):
        keys = [k for p in parts for k in (p.group_keys or [None] * p.num_rows)]
    return Rollout(
        samples=_cat([p.samples for p in parts], sizes),
        logp_old=torch.cat([p.logp_old for p in parts]),
        train_mask=torch.cat([p.train_mask for p in parts]),
        group_size=G,
        prompts=[x for p in parts for x in p.prompts],
        meta=[x for p in parts for x in p.meta],
        extras={k: _cat([p.extras[k] for p in parts], sizes) for k in parts[0].extras},
        loss_weight=weights,
        group_keys=keys,
        variants=[_cat([p.variants[i] for p in parts], sizes) for i in range(len(parts[0].variants))],
        logp_old_from_update=parts[0].logp_old_from_update,
        group_sizes=group_sizes,  # uniform sizes fold back into group_size (Rollout.__post_init__)
    )


def rollout_by_size(
    rollout: Callable[[PromptBatch, int, torch.Generator | None], Rollout],
    batch: PromptBatch,
    group_size: int,
    generator: torch.Generator | None = None,
) -> Rollout:
    """A policy's ``rollout`` for a batch whose prompts ask for different numbers of rollouts (``group_sizes``).

    The prompts are split by their size, ``rollout(sub_batch, G_b, generator)`` runs once per distinct size (each
    with a copy of ``generator`` in its current state, so step-wide draws such as the trained denoising steps are the
    same in every call), and the groups are put back in the batch's order (ragged :class:`Rollout`). Samples depend
    only on each prompt's seed (the seeding contract), so a prompt's rows are what a uniform batch would give it.
    A batch with one size is one plain call.
    """
    sizes = batch.sizes(group_size)
    if len(set(sizes)) <= 1:
        return rollout(batch, sizes[0] if sizes else group_size, generator)
    parts, order = [], []
    for s in sorted(set(sizes)):
        idx = [b for b, sb in enumerate(sizes) if sb == s]
        sub = batch.select(idx)
        sub.group_sizes = []
        gen = None
        if generator is not None:
            gen = torch.Generator(device=generator.device)
            gen.set_state(generator.get_state())
        parts.append(rollout(sub, s, gen))
        order += idx
    joined = concat_rollouts(parts)
    where = {b: i for i, b in enumerate(order)}  # prompt b of the batch is group where[b] of ``joined``
    return select_groups(joined, [where[b] for b in range(len(sizes))])
