"""Prompt samplers: which prompts a step trains on and how many rollouts each gets (phase 1 of the loop).

Letters: B prompts per step (over all processes), G the configured group size, P the size of the prompt pool.

A sampler is chosen by the config's top-level ``sampler:`` block (``sampler: {name: spo, options: {...}}``, or just
``sampler: spo``); ``uniform`` (the default) is today's stream: step s trains stream positions s*B .. s*B + B - 1
with G rollouts each, and leaves runs bit for bit as they were without a sampler.

Stateful samplers choose from a *pool*: stream positions 0 .. P - 1, which are the P prompts of the source once each
(a prompt source maps position i of its first pass to a distinct prompt; P is ``len(source)``). Every step:

1. ``plan(step) -> StepPlan``: B pool positions and, optionally, B group sizes (ragged groups). Its randomness comes
   from ``prompt_seed(run seed, step, 0, stream=SAMPLER_STREAM)`` only, and its statistics are the same on every
   process, so every process computes the same plan and takes its own slice of it (layout-free);
2. the trainer samples and scores; prompt b's sampling seed is its *slot*'s (``prompt_seed(seed, step, s*B + b)``,
   as the uniform stream seeds it), so a prompt chosen twice in a run never repeats its noise;
3. ``observe(step, positions [B], rewards [B, G_max])``: the step's weighted rewards of every process (gathered,
   NaN-padded for ragged groups and rows where no reward applies) update the per-prompt statistics. Positions
   outside the pool (DAPO refills) are ignored;
4. ``state_dict()`` / ``load_state_dict()``: saved in the trainer's checkpoint, so a resumed run plans exactly what
   the uninterrupted run plans.

A sampler may also hand the estimator per-prompt inputs (``estimator_inputs(positions, rewards) -> {name: [B, 1]}``:
SPO's tracked value ``baseline``, the pairing sampler's ``roles``); an estimator receives one when it declares it as
a keyword parameter (:data:`mmgrpo.core.advantages.ESTIMATOR_INPUTS`), and a config whose estimator declares an input
its sampler does not provide fails at load.

:class:`PoolStats` keeps the statistics most samplers need ([P] tensors, fp64): visits, rollouts, the last step a
prompt was seen, the last group mean and variance of its rewards and their exponential moving averages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.registry import Registry
from mmgrpo.core.schema import options_from
from mmgrpo.core.seeding import generator_for, prompt_seed

SAMPLER_STREAM = 1009
"""seeding stream of a sampler's draws (distinct from the step generator's 1 and the minibatch permutations' 2+e)"""

SAMPLERS: Registry[type] = Registry("sampler", plugins="samplers")


@dataclass
class SamplerContext:
    """What a sampler knows about the run."""

    prompts_per_step: int  # B over all processes
    group_size: int  # G
    seed: int  # run seed
    pool: int | None = None  # P: prompts in the source (len(source)); None when the source has no length
    minibatches: int = 1  # trainer.minibatches: every group needs at least this many rows


@dataclass
class StepPlan:
    """One step's prompts: ``positions [B]`` stream positions; ``group_sizes [B]`` rollouts each (empty: G each)."""

    positions: list[int]
    group_sizes: list[int] = field(default_factory=list)


@dataclass
class NoOptions:
    """A sampler without options."""


def register_sampler(name: str):
    """Decorator: register a :class:`PromptSampler` subclass under ``name`` (its docstring's first line is its
    description; its ``Options`` dataclass is the schema of ``sampler.options``)."""
    return SAMPLERS.register(name)


class PromptSampler:
    """The uniform stream (``sampler: uniform``): step s trains stream positions s*B .. s*B + B - 1, G rollouts each.

    Subclasses override :meth:`plan` / :meth:`observe` and keep their statistics in :meth:`state_dict`.
    """

    Options: type = NoOptions
    stateful: bool = False
    """plans from statistics (the trainer then records each row's stream position and calls :meth:`observe`)"""
    varies_group_size: bool = False
    """may give prompts different numbers of rollouts (ragged groups)"""
    needs_pool: bool = False
    """chooses among the pool positions 0 .. P - 1 (the prompt source must have a length)"""
    provides: tuple[str, ...] = ()
    """the estimator inputs :meth:`estimator_inputs` gives (``baseline``, ``roles``)"""

    def __init__(self, ctx: SamplerContext, options: Any = None):
        self.ctx = ctx
        self.options = options if options is not None else self.Options()

    @classmethod
    def check(cls, options: Any, cfg: Any, where: str) -> None:
        """Load-time checks against the rest of the config (UserErrors naming ``sampler.options...``)."""

    def plan(self, step: int) -> StepPlan:
        B = self.ctx.prompts_per_step
        return StepPlan(positions=[step * B + b for b in range(B)])

    def refill(self, step: int, round: int, main: StepPlan) -> StepPlan | None:
        """B prompts for DAPO's refill round ``round`` >= 1 of ``step`` (``advantage.dynamic_sampling``), given the
        step's ``main`` plan; None (the default): fresh stream positions >= 2^40, G rollouts each."""
        return None

    def observe(self, step: int, positions: list[int], rewards: torch.Tensor) -> dict[str, float]:
        """Update statistics from the step's rewards ``[B, G_max]`` (NaN: padding / no reward); returns metrics."""
        return {}

    def estimator_inputs(self, positions: list[int], rewards: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-prompt estimator inputs ``{name: [B, 1]}`` for the step's ``rewards [B, G_max]``, from the statistics
        *before* this step (``observe`` runs after the estimator); the names are :attr:`provides`."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def generator(self, step: int) -> torch.Generator:
        """The step's generator of sampler draws: the same on every process, and on a resumed run."""
        return generator_for(prompt_seed(self.ctx.seed, step, 0, stream=SAMPLER_STREAM))


register_sampler("uniform")(PromptSampler)


class PoolStats:
    """Per-prompt statistics over the pool (tensors [P], fp64), updated from each step's gathered rewards.

    For a visit of prompt p with valid rewards r_1..r_n (n >= 1, mean m, population variance v):
    visits += 1, rollouts += n, last_step = step, last_mean = m, last_var = v,
    mean_ema = m on the first visit, else decay * mean_ema + (1 - decay) * m (var_ema likewise with v).
    A prompt visited twice in one step is updated twice, in the order of the plan.
    """

    KEYS = ("visits", "rollouts", "last_step", "last_mean", "last_var", "mean_ema", "var_ema")

    def __init__(self, pool: int, decay: float = 0.9):
        self.pool, self.decay = pool, decay
        self.visits = torch.zeros(pool, dtype=torch.float64)
        self.rollouts = torch.zeros(pool, dtype=torch.float64)
        self.last_step = torch.full((pool,), -1.0, dtype=torch.float64)
        self.last_mean = torch.full((pool,), math.nan, dtype=torch.float64)
        self.last_var = torch.full((pool,), math.nan, dtype=torch.float64)
        self.mean_ema = torch.full((pool,), math.nan, dtype=torch.float64)
        self.var_ema = torch.full((pool,), math.nan, dtype=torch.float64)

    def update(self, step: int, positions: list[int], rewards: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Fold the step in; returns (pool position, valid rewards [n] fp64) of every group that counted."""
        seen = []
        for p, row in zip(positions, rewards.to(torch.float64)):
            r = row[~row.isnan()]
            if not (0 <= p < self.pool) or r.numel() == 0:
                continue
            m, v = r.mean(), ((r - r.mean()) ** 2).mean()
            first = self.visits[p] == 0
            self.visits[p] += 1
            self.rollouts[p] += r.numel()
            self.last_step[p] = float(step)
            self.last_mean[p], self.last_var[p] = m, v
            d = self.decay
            self.mean_ema[p] = m if first else d * self.mean_ema[p] + (1 - d) * m
            self.var_ema[p] = v if first else d * self.var_ema[p] + (1 - d) * v
            seen.append((p, r))
        return seen

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).clone() for k in self.KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self.KEYS:
            t = torch.as_tensor(state[k], dtype=torch.float64)
            if t.shape != (self.pool,):
                raise UserError(
                    f"sampler checkpoint: statistic {k!r} holds {tuple(t.shape)} values for a pool of {self.pool} "
                    "prompts; the prompt source changed since the checkpoint (resume with the same data)"
                )
            setattr(self, k, t.clone())


def check_unit_rewards(sampler: str, step: int, rewards: torch.Tensor) -> None:
    """Samplers that read rewards as success rates need them in [0, 1]: a UserError naming the range otherwise."""
    r = rewards[~rewards.isnan()]
    if bool(((r < 0) | (r > 1)).any()):
        raise UserError(
            f"sampler {sampler} in step {step + 1}: it reads rewards as success rates and needs them in [0, 1], got "
            f"{r.min().item():.4g} .. {r.max().item():.4g}; rescale the reward (its weight) or use another sampler"
        )


def weighted_draw(weights: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
    """k distinct indices drawn with probability proportional to ``weights [P]`` (> 0), sequentially without
    replacement (torch.multinomial, fp64 weights: the same draw on every process)."""
    if k > int((weights > 0).sum()):
        raise UserError(f"a sampler must choose {k} distinct prompts but only {int((weights > 0).sum())} can be drawn")
    return torch.multinomial(weights.to(torch.float64), k, replacement=False, generator=generator).tolist()


def largest_remainder(target: torch.Tensor, total: int, lo: int, hi: int) -> list[int]:
    """Integers n_b in [lo, hi] with sum ``total`` closest to ``target [B]`` (>= 0): floor, then +1 to the largest
    remainders (ties: lower index first); needs B*lo <= total <= B*hi."""
    B = target.numel()
    if not B * lo <= total <= B * hi:
        raise UserError(f"cannot give {B} prompts {total} rollouts with {lo} to {hi} each")
    t = target.to(torch.float64).clamp(lo, hi)
    n = t.floor().clamp(lo, hi)
    rem = t - n
    while int(n.sum()) != total:
        if int(n.sum()) < total:
            room = n < hi
            score = torch.where(room, rem, -math.inf)
            b = int(torch.argmax(score))  # first maximum
            n[b] += 1
            rem[b] = -1.0
        else:
            room = n > lo
            score = torch.where(room, rem, math.inf)
            b = int(torch.argmin(score))
            n[b] -= 1
            rem[b] = 2.0
    return [int(x) for x in n]


def make_sampler(cfg_sampler: Any, ctx: SamplerContext, where: str = "the config") -> PromptSampler:
    """The sampler the config's ``sampler:`` block names, built with its checked options."""
    cls = SAMPLERS.get(cfg_sampler.name)
    opts = options_from(cls.Options, cfg_sampler.options, where, "sampler.options")
    if cls.needs_pool and ctx.pool is None:
        raise UserError(
            f"sampler {cfg_sampler.name!r} in {where} chooses prompts from the pool of the prompt source, but this "
            "recipe's prompt source has no length (len()); use sampler: uniform with this recipe"
        )
    if cls.needs_pool and ctx.pool < ctx.prompts_per_step:
        raise UserError(
            f"sampler {cfg_sampler.name!r} in {where} draws trainer.prompts_per_step={ctx.prompts_per_step} distinct "
            f"prompts a step from a pool of {ctx.pool}; lower trainer.prompts_per_step or give more prompts"
        )
    return cls(ctx, opts)


def check_sampler(cfg: Any, where: str) -> None:
    """At config load: ``sampler.name`` registered, ``sampler.options`` its schema, and the sampler's own checks."""
    try:
        cls = SAMPLERS.get(cfg.sampler.name)
    except UserError as e:
        raise UserError(f"sampler.name in {where}: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, PromptSampler)):
        raise UserError(f"sampler.name in {where}: {cfg.sampler.name!r} is not a PromptSampler subclass")
    opts = options_from(cls.Options, cfg.sampler.options, where, "sampler.options")
    cls.check(opts, cfg, where)


@dataclass
class FixedSizesOptions:
    group_sizes: list[int] = field(default_factory=list)
    """rollouts of the step's prompt slots 0, 1, 2, ... (repeated cyclically over the B slots), e.g. [2, 8, 4]"""


@register_sampler("fixed_sizes")
class FixedSizesSampler(PromptSampler):
    """The uniform stream with set rollouts per slot (group_sizes, cyclic): ragged groups without statistics.

    For ablations, and for checking that a run with ragged groups does what it should."""

    Options = FixedSizesOptions
    varies_group_size = True

    @classmethod
    def check(cls, options: FixedSizesOptions, cfg: Any, where: str) -> None:
        sizes, m = options.group_sizes, cfg.trainer.minibatches
        if not sizes or any(int(s) < max(1, m) for s in sizes):
            raise UserError(
                f"sampler.options.group_sizes={sizes} in {where} must be a non-empty list of sizes >= "
                f"max(1, trainer.minibatches={m}) (each minibatch holds a slice of every group), e.g. [2, 8, 4]"
            )

    def plan(self, step: int) -> StepPlan:
        B, sizes = self.ctx.prompts_per_step, self.options.group_sizes
        return StepPlan(
            positions=[step * B + b for b in range(B)], group_sizes=[int(sizes[b % len(sizes)]) for b in range(B)]
        )
