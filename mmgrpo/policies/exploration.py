"""Exploration schedules: which of the T denoising steps are stochastic (SDE) and which are trained.

Pure, seeded planning with no model code. A planner returns an :class:`ExplorationPlan`: two ``[T]`` boolean
masks over the sampling steps (``sde_mask``: sample this step with the SDE, otherwise take the deterministic
ODE step; ``train_mask``: the update may use this step's log-prob, always a subset of ``sde_mask`` because a
deterministic step has no log-prob) and, for G²RPO, the branch step. Call a planner once per batch, or once
per group for a plan per group; the policy broadcasts a plan over the group's rows.

Each schedule is also a registered strategy (:data:`EXPLORATION`, YAML ``policy.options.exploration: {name, ...}``)
that owns its options and checks them when the config is loaded; the policy only calls ``schedule.plan(...)``.

- :func:`full` -- DanceGRPO / Flow-GRPO: SDE everywhere, train a fraction of the steps (``timestep_fraction``).
- :func:`window` -- MixGRPO: SDE only inside a window that slides over training (ODE elsewhere), train the window.
- :func:`singular` -- G²RPO singular stochastic sampling: one SDE branch step k, ODE before and after.

For G²RPO's multi-granularity integration, :func:`coarse_schedule` gives the coarser ODE continuations after
the branch step and :func:`multi_granularity_advantages` normalises rewards per granularity and sums them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mmgrpo.core.advantages import get_estimator
from mmgrpo.core.errors import UserError
from mmgrpo.core.registry import Registry
from mmgrpo.policies.strategy import Strategy


@dataclass
class ExplorationPlan:
    """Which sampling steps are stochastic and which are trained.

    ``sde_mask [T]`` bool: steps sampled with the SDE (the others take the ODE step); ``train_mask [T]`` bool:
    steps whose log-prob the update uses (a subset of ``sde_mask``; with ``per_row``, the steps each row draws its
    own subset from); ``branch_step``: G²RPO's single SDE step
    k, else None; ``granularities``: with a branch step, the strides of the ODE continuations after it (1 = the
    original schedule; each other one is one more decoded version of every sample).
    """

    sde_mask: torch.Tensor
    train_mask: torch.Tensor
    branch_step: int | None = None
    granularities: tuple[int, ...] = (1,)
    per_row: int | None = None
    """DanceGRPO's per-row selection: each row trains its own random ``per_row`` of the ``train_mask`` steps, drawn
    from its prompt's generator when the rollout ends (:func:`per_row_steps`); None: every row trains ``train_mask``"""

    def __post_init__(self) -> None:
        if self.sde_mask.ndim != 1 or self.sde_mask.shape != self.train_mask.shape:
            raise UserError(
                f"ExplorationPlan: sde_mask {tuple(self.sde_mask.shape)} and train_mask "
                f"{tuple(self.train_mask.shape)} must both be [T]"
            )
        if self.sde_mask.dtype != torch.bool or self.train_mask.dtype != torch.bool:
            raise UserError("ExplorationPlan: sde_mask and train_mask must be bool tensors")
        if bool((self.train_mask & ~self.sde_mask).any()):
            bad = torch.nonzero(self.train_mask & ~self.sde_mask).flatten().tolist()
            raise UserError(f"ExplorationPlan: steps {bad} are trained but deterministic (ODE); make them SDE steps")
        if self.per_row is not None and not 1 <= self.per_row <= int(self.train_mask.sum()):
            raise UserError(f"ExplorationPlan: per_row={self.per_row} steps a row, but {int(self.train_mask.sum())} "
                            "steps are trainable")  # fmt: skip

    @property
    def num_steps(self) -> int:
        """T."""
        return int(self.sde_mask.shape[0])

    @property
    def train_steps(self) -> list[int]:
        """The trained step indices, ascending."""
        return torch.nonzero(self.train_mask).flatten().tolist()


EXPLORATION: Registry[type[ExplorationSchedule]] = Registry("exploration", plugins="exploration")


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise UserError(f"num_steps must be a positive int (the number of sampling steps T), got {num_steps!r}")


SELECTIONS = ("first", "random", "random_per_row")
"""the ``selection`` of the steps a full-exploration rollout trains (:func:`full`)"""


def _mask(num_steps: int, steps: list[int] | torch.Tensor) -> torch.Tensor:
    m = torch.zeros(num_steps, dtype=torch.bool)
    m[torch.as_tensor(steps, dtype=torch.long)] = True
    return m  # [T]


def full(
    num_steps: int,
    timestep_fraction: float = 1.0,
    selection: str = "random",
    generator: torch.Generator | None = None,
) -> ExplorationPlan:
    """SDE at every step, train a fraction of them (DanceGRPO / Flow-GRPO ``timestep_fraction``).

    Trains ``k = max(1, int(timestep_fraction * T))`` steps, rounded down as both papers' code does
    (``int(num_steps * timestep_fraction)``: Flow-GRPO's 0.99 of 10 steps trains 9, DanceGRPO's 0.6 of 16 trains
    9): ``selection="random"`` one uniformly random subset for the whole rollout (returned sorted), ``"first"``
    steps 0..k-1 (Flow-GRPO), ``"random_per_row"`` a random subset of its own for every row (DanceGRPO's code: a
    ``randperm`` of the T steps per row, the first k trained): the plan then marks every step trainable and sets
    ``per_row = k``, and :func:`per_row_steps` draws the rows' subsets when the rollout ends. Returns masks [T].
    """
    _check_steps(num_steps)
    if not 0 < timestep_fraction <= 1:
        raise UserError(f"timestep_fraction must be in (0, 1], got {timestep_fraction!r}")
    k = max(1, int(timestep_fraction * num_steps))
    if selection == "random":
        steps = torch.randperm(num_steps, generator=generator)[:k].sort().values
    elif selection == "first":
        steps = torch.arange(k)
    elif selection == "random_per_row":
        every = torch.ones(num_steps, dtype=torch.bool)
        return ExplorationPlan(every, every.clone(), per_row=k if k < num_steps else None)
    else:
        raise UserError(f"unknown selection {selection!r}; known: {', '.join(SELECTIONS)}")
    return ExplorationPlan(torch.ones(num_steps, dtype=torch.bool), _mask(num_steps, steps))


def per_row_steps(plan: ExplorationPlan, gens: list[torch.Generator], G: int) -> torch.Tensor:
    """The train mask [N, T] of a rollout of ``len(gens)`` prompts x ``G`` rows: every row trains ``plan.per_row``
    of the plan's trainable steps, a uniformly random subset of its own (DanceGRPO), drawn from its prompt's
    generator after the prompt's sampling noise (so the samples do not change, and a row's subset depends only on
    its prompt's seed and its place in the group, not on the batch layout); without ``per_row``, the plan's mask
    on every row."""
    if plan.per_row is None:
        return plan.train_mask[None, :].expand(len(gens) * G, -1).clone()
    steps = plan.train_mask.nonzero().reshape(-1)  # [c] trainable steps
    rows = torch.zeros(len(gens) * G, plan.num_steps, dtype=torch.bool)
    for b, g in enumerate(gens):
        for j in range(G):
            rows[b * G + j, steps[torch.randperm(len(steps), generator=g)[: plan.per_row]]] = True
    return rows


def window_start(
    num_steps: int, window_size: int, training_step: int, shift_every: int = 1, stride: int = 1, at_end: str = "stick"
) -> int:
    """MixGRPO's progressive window start at ``training_step``.

    The window moves ``stride`` steps every ``shift_every`` training steps: ``start = (training_step //
    shift_every) * stride``, capped at the last position ``T - w``. ``at_end="stick"`` keeps it there
    (MixGRPO's default, clipping); ``"wrap"`` starts over at 0 after the last position (MixGRPO's roll_back),
    cycling through exactly the positions ``stick`` visits.
    """
    last = num_steps - window_size
    shifts = training_step // shift_every
    if at_end == "stick":
        return min(shifts * stride, last)
    if at_end == "wrap":
        positions = -(-last // stride) + 1  # 0, stride, 2 stride, ..., then last (ceil(last / stride) moves)
        return min((shifts % positions) * stride, last)
    raise UserError(f"unknown at_end {at_end!r}; known: stick, wrap")


def window(
    num_steps: int,
    window_size: int,
    training_step: int = 0,
    mode: str = "progressive",
    shift_every: int = 1,
    stride: int = 1,
    at_end: str = "stick",
    generator: torch.Generator | None = None,
) -> ExplorationPlan:
    """MixGRPO sliding window: SDE and training inside [start, start + w), ODE elsewhere (Li et al. 2025).

    ``mode="progressive"``: start from :func:`window_start` (moves ``stride`` steps every ``shift_every``
    training steps, from the noisy end toward the clean end; ``at_end`` = stick | wrap). ``mode="random"``:
    start uniform in [0, T - w] from ``generator``. Returns masks [T].
    """
    _check_steps(num_steps)
    if not isinstance(window_size, int) or not 1 <= window_size <= num_steps:
        raise UserError(f"window_size must be an int in [1, {num_steps}] (T), got {window_size!r}")
    if training_step < 0 or shift_every < 1 or stride < 1:
        raise UserError(
            f"window: need training_step >= 0, shift_every >= 1, stride >= 1; got training_step={training_step}, "
            f"shift_every={shift_every}, stride={stride}"
        )
    if mode == "progressive":
        start = window_start(num_steps, window_size, training_step, shift_every, stride, at_end)
    elif mode == "random":
        start = int(torch.randint(0, num_steps - window_size + 1, (1,), generator=generator))
    else:
        raise UserError(f"unknown window mode {mode!r}; known: progressive, random")
    m = _mask(num_steps, list(range(start, start + window_size)))
    return ExplorationPlan(m, m.clone())


def singular(num_steps: int, branch_steps: list[int], generator: torch.Generator | None = None) -> ExplorationPlan:
    """G²RPO singular stochastic sampling: one SDE branch step k from ``branch_steps``, ODE elsewhere.

    All G rows of a group share the ODE trajectory up to step k (the anchor), branch with one SDE step at k
    and continue with the ODE, so reward differences are attributable to step k alone (Granular-GRPO,
    2025). k is drawn uniformly from ``branch_steps``; both masks [T] are one-hot at k.
    """
    _check_steps(num_steps)
    if len(branch_steps) == 0 or any(not 0 <= int(k) < num_steps for k in branch_steps):
        raise UserError(
            f"branch_steps must be a non-empty list of steps in [0, {num_steps - 1}], got {branch_steps!r}"
        )
    k = int(branch_steps[int(torch.randint(0, len(branch_steps), (1,), generator=generator))])
    m = _mask(num_steps, [k])
    return ExplorationPlan(m, m.clone(), branch_step=k)


class ExplorationSchedule(Strategy):
    """Base of the registered schedules: ``plan`` is called once per rollout batch."""

    @abc.abstractmethod
    def plan(self, num_steps: int, training_step: int, generator: torch.Generator | None) -> ExplorationPlan:
        """Which of the ``num_steps`` steps are stochastic and which are trained, at ``training_step``."""


def _check_options(*checks: tuple[bool, str]) -> None:
    """Option checks of a schedule, in order: the first ``(ok, message)`` that fails raises a UserError
    ``policy.options.exploration<message>``."""
    for ok, message in checks:
        if not ok:
            raise UserError(f"policy.options.exploration{message}")


@dataclass
class FullOptions:
    name: str = "full"
    timestep_fraction: float = 1.0
    """fraction of the T steps trained (DanceGRPO's timestep_fraction)"""
    selection: Literal["random", "first", "random_per_row"] = "random"
    """which steps are trained: one random subset per rollout, the first ones (Flow-GRPO), or a random subset of
    its own for every row (DanceGRPO's code: a random permutation of the steps per row, the first
    timestep_fraction x T of it trained)"""

    def __post_init__(self) -> None:
        _check_options(
            (0 < self.timestep_fraction <= 1, f".timestep_fraction must be in (0, 1], got {self.timestep_fraction!r}"),
            (self.selection in SELECTIONS,
             f".selection: unknown {self.selection!r}; known: {', '.join(SELECTIONS)}"),
        )  # fmt: skip


@EXPLORATION.register("full")
class FullExploration(ExplorationSchedule):
    """DanceGRPO / Flow-GRPO: SDE at every step, train a fraction of them (timestep_fraction)."""

    Options = FullOptions

    def plan(self, num_steps: int, training_step: int, generator: torch.Generator | None) -> ExplorationPlan:
        return full(num_steps, self.opts.timestep_fraction, self.opts.selection, generator)


@dataclass
class WindowOptions:
    name: str = "window"
    size: int = 4
    """w: SDE (and trained) steps in the window; capped at T (a window of T or more is warned about when training
    starts: it never slides)"""
    mode: Literal["progressive", "random"] = "progressive"
    """slide the window with training progress, or draw a random window per rollout"""
    shift_every: int = 10
    """progressive: advance the window one step every this many training steps"""

    def __post_init__(self) -> None:
        _check_options(
            (self.size >= 1 and self.shift_every >= 1,
             f": size and shift_every must be >= 1, got size={self.size}, shift_every={self.shift_every}"),
            (self.mode in ("progressive", "random"), f".mode: unknown {self.mode!r}; known: progressive, random"),
        )  # fmt: skip

    def training_warnings(self, num_steps: int) -> list[str]:
        """Against policy.options.num_steps, when training starts (not at every load of the run's config: sampling
        and exporting a run do not train): a window as long as the sampling covers every step, so nothing slides
        and MixGRPO is Flow-GRPO's full exploration (it was capped silently)."""
        if self.size < num_steps:
            return []
        shorter = max(1, num_steps // 4)
        return [f"policy.options.exploration.size={self.size} covers all {num_steps} sampling steps "
                "(policy.options.num_steps): the window never slides, every step is SDE and trained, as with "
                f"exploration=full; MixGRPO's window is shorter than T (e.g. size={shorter})"]  # fmt: skip


@EXPLORATION.register("window")
class WindowExploration(ExplorationSchedule):
    """MixGRPO: SDE and training inside a window that slides over training, ODE elsewhere."""

    Options = WindowOptions

    def plan(self, num_steps: int, training_step: int, generator: torch.Generator | None) -> ExplorationPlan:
        o = self.opts
        return window(num_steps, min(o.size, num_steps), training_step, o.mode, o.shift_every, generator=generator)


@dataclass
class SingularOptions:
    name: str = "singular"
    branch_steps: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """candidate branch steps k (0 = the first step); those >= T are dropped (none left: refused at load)"""
    granularities: list[int] = field(default_factory=lambda: [1])
    """ODE continuation strides after k; [1, 2, 3] = G²RPO's multi-granularity advantages"""

    def __post_init__(self) -> None:
        _check_options(
            (bool(self.branch_steps) and min(self.branch_steps) >= 0,
             f".branch_steps must be a non-empty list of steps >= 0, got {self.branch_steps}"),
            (bool(self.granularities) and min(self.granularities) >= 1,
             f".granularities must be >= 1, got {self.granularities}"),
        )  # fmt: skip

    def check_steps(self, num_steps: int) -> None:
        """At load, against policy.options.num_steps: branch steps past the sampling are dropped (documented); none
        left was an error at the first rollout, after the models loaded, naming an empty list."""
        if min(self.branch_steps) >= num_steps:
            example = list(range(min(4, num_steps)))
            raise UserError(f"policy.options.exploration.branch_steps={self.branch_steps}: every branch step is past "
                            f"the {num_steps} sampling steps (policy.options.num_steps; steps count from 0), so "
                            f"none is left; use steps in [0, {num_steps - 1}], e.g. {example}")  # fmt: skip


@EXPLORATION.register("singular")
class SingularExploration(ExplorationSchedule):
    """G²RPO: one SDE branch step shared by the group's ODE anchor, ODE continuations at several granularities."""

    Options = SingularOptions

    def plan(self, num_steps: int, training_step: int, generator: torch.Generator | None) -> ExplorationPlan:
        plan = singular(num_steps, [k for k in self.opts.branch_steps if k < num_steps], generator)
        plan.granularities = tuple(self.opts.granularities)
        return plan


def coarse_schedule(sigmas: torch.Tensor, k: int, granularity: int) -> torch.Tensor:
    """The sigmas of G²RPO's lambda-coarser ODE continuation after branch step k.

    ``sigmas [T + 1]`` is the full schedule (``sigmas[-1]`` the final sigma, 0). Branch step k goes from
    ``sigmas[k]`` to ``sigmas[k + 1]`` with the SDE; the continuation then visits ``sigmas[k + 1]``, every
    lambda-th sigma after it, and always ends at ``sigmas[-1]``. E.g. T = 10, k = 2, lambda = 3: indices
    3, 6, 9, 10. lambda = 1 is the original schedule. Returns [S] with S = ceil((T - k - 1) / lambda) + 1.
    """
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise UserError(f"sigmas must be a 1-D schedule [T + 1] with T >= 1, got shape {tuple(sigmas.shape)}")
    num_steps = sigmas.shape[0] - 1
    if not 0 <= k < num_steps:
        raise UserError(f"branch step k must be in [0, {num_steps - 1}] for {num_steps} steps, got {k!r}")
    if not isinstance(granularity, int) or granularity < 1:
        raise UserError(f"granularity must be an int >= 1 (1: the original schedule), got {granularity!r}")
    idx = list(range(k + 1, num_steps + 1, granularity))
    if idx[-1] != num_steps:
        idx.append(num_steps)
    return sigmas[idx]


def multi_granularity_advantages(
    rewards: torch.Tensor,
    estimator: str = "grpo",
    estimator_fn: Callable[..., torch.Tensor] | None = None,
    **opts: Any,
) -> torch.Tensor:
    """G²RPO multi-granularity advantage integration: normalise per granularity, then sum. [L, B, G] -> [B, G].

    ``rewards[l, b, g]`` is the reward of row g of group b when its continuation after the shared branch step k
    used the l-th granularity (:func:`coarse_schedule`). Each granularity is normalised within its group
    separately -- the group shares k, so this is per (granularity, k) -- and the L advantages are summed.

    The normaliser is ``estimator_fn`` when given, else the estimator registered under ``estimator``; each is
    called as ``fn(rewards[l] [B, G], **opts) -> [B, G]``.
    """
    if rewards.ndim != 3:
        raise UserError(f"rewards must be [L, B, G] (one reward per granularity), got shape {tuple(rewards.shape)}")
    num_b, num_g = rewards.shape[1], rewards.shape[2]
    if num_g < 2:
        raise UserError(f"group normalisation needs rewards [L, B, G] with G >= 2, got shape {tuple(rewards.shape)}")
    fn = estimator_fn or get_estimator(estimator)
    per_level = [fn(rewards[lvl], **opts).reshape(num_b, num_g) for lvl in range(rewards.shape[0])]  # L x [B, G]
    return torch.stack(per_level).sum(0)  # [B, G]
