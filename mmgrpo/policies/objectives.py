"""What the loss trains in a diffusion policy: registered objectives (``policy.options.objective: {name, ...}``).

An objective owns its options (checked when the config is loaded), its checks against the model family and the
loss, and its part of the rollout and of the log-prob; :class:`~mmgrpo.policies.diffusion.DiffusionPolicy` samples
and calls it. Built in:

- ``sde`` (here) -- the sampler's stochastic steps: log-probs of the SDE transitions (DanceGRPO, Flow-GRPO,
  MixGRPO, G²RPO); the units of a row are its T steps.
- ``flow_matching`` (AWM) and ``nft`` (DiffusionNFT) -- ``mmgrpo.policies.flow_matching``: the final samples.

An objective's methods take the policy as their first argument and use its public helpers (``adapter``,
``model``, ``guided``, ``cond_rows``, ``uncond``, ``score_steps``, ``reference``, ``finish``).

Shapes: B prompts, G samples per prompt, N = B*G rows, T steps, K units per row.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from mmgrpo.core.errors import UserError, bad_option
from mmgrpo.core.registry import Registry
from mmgrpo.core.types import LogProbs, PromptBatch, Rollout
from mmgrpo.policies import sde
from mmgrpo.policies.exploration import ExplorationPlan, per_row_steps
from mmgrpo.policies.strategy import Strategy


class DiffusionObjective(Strategy):
    """Base of the registered objectives; the defaults are those of an objective on the sampler's steps."""

    loss: ClassVar[str | None] = None
    """the loss this objective needs (its log-probs only mean something to that loss), None = any"""
    loss_hint: ClassVar[str] = ""
    """what else to set with that loss (appended to the error)"""
    scores_pairs: ClassVar[bool] = False
    """its ``log_prob`` takes ``pairs`` [n, k] (bool) and forwards only those (row, unit) pairs (rows that train
    different units, e.g. DanceGRPO's per-row steps, then cost their own units, not the union's)"""
    trains_guided: ClassVar[bool] = False
    """its log-probs come from the guided output (``DiffusionPolicy.guided`` under grad), so classifier-free
    guidance's branches carry the loss's gradient (``policy.options.guidance_uncond_grad``)"""

    @classmethod
    def check_options(cls, opts: Any) -> None:
        """Checks across the policy's options (``opts``: DiffusionPolicyOptions), when the config is loaded."""

    def check_adapter(self, adapter: Any) -> None:
        """Checks against the model family, when the policy is built."""

    def attach(self, policy: Any) -> None:
        """Called once the policy's trainable parameters exist (e.g. to copy them)."""

    def guidance_scale(self, opts: Any) -> float:
        """The CFG scale training rollouts sample with."""
        return opts.guidance_scale

    @contextlib.contextmanager
    def sampling_weights(self, policy: Any, step: int) -> Iterator[None]:
        """The weights training rollouts sample with (default: the trained weights as they are)."""
        yield

    @abc.abstractmethod
    def finish_rollout(
        self, policy: Any, batch: PromptBatch, G: int, latents: torch.Tensor, logp: torch.Tensor,
        plan: ExplorationPlan, cond: dict[str, torch.Tensor], gens: list[torch.Generator],
    ) -> Rollout:  # fmt: skip
        """The rollout of sampled ``latents [N, T+1, ...]`` with the step log-probs ``logp [N, T]``."""

    @abc.abstractmethod
    def log_prob(self, policy: Any, rollout: Rollout, rows: torch.Tensor, units: torch.Tensor | None) -> LogProbs:
        """Log-probs (with grad) of ``units`` of ``rows``: what the loss trains."""

    def training_state(self) -> dict[str, Any] | None:
        """What a checkpoint keeps besides the trained weights (None: nothing)."""
        return None

    def load_training_state(self, state: dict[str, Any]) -> None:
        pass


OBJECTIVES: Registry[type[DiffusionObjective]] = Registry("diffusion objective", plugins="diffusion_objectives")


def objective_class(opts: Any) -> type[DiffusionObjective]:
    """The registered objective of a DiffusionPolicyOptions."""
    return OBJECTIVES.get(opts.objective.name)


def check_loss(opts: Any, loss_name: str) -> None:
    """At build time (``opts``: the policy's DiffusionPolicyOptions): an objective that needs a loss gets it, and
    a loss that only one objective's log-probs feed (``nft``: the two implicit policies' errors) gets that one."""
    name = opts.objective.name
    need = objective_class(opts).loss
    if need is not None and loss_name != need:
        raise UserError(
            f"policy.options.objective={name} trains log-probs that only loss.name={need} combines "
            f"(got loss.name={loss_name!r}): set loss.name={need}{objective_class(opts).loss_hint}"
        )
    owners = [n for n in OBJECTIVES.names() if OBJECTIVES.get(n).loss == loss_name]
    if owners and name not in owners:
        raise UserError(f"loss.name={loss_name} needs policy.options.objective={' or '.join(owners)} "
                        f"(got objective={name!r})")  # fmt: skip


@dataclass
class SDEObjectiveOptions:
    name: str = "sde"
    kl: Literal["exact", "flow_grpo"] = "exact"
    """the reference KL of a trained step (policy.options.reference_kl, weighted by loss.beta). exact: the KL of the
    step's two Gaussians, (mean - mean_ref)^2 / (2 std^2) with the step's std = std_t sqrt(|dt|). flow_grpo:
    Flow-GRPO's code, which divides by std_t^2 (its std_dev_t has no sqrt(|dt|)), i.e. the exact KL times |dt|, about
    1/T of it; their betas (0.01-0.04) were tuned for this form (sde.kind flow_grpo only)"""


@OBJECTIVES.register("sde")
class SDEObjective(DiffusionObjective):
    """The sampler's stochastic steps: log-probs of its SDE transitions (DanceGRPO, Flow-GRPO, MixGRPO, G2RPO)."""

    Options = SDEObjectiveOptions
    trains_guided = True
    scores_pairs = True

    @classmethod
    def check_options(cls, opts: Any) -> None:
        kl = opts.objective.kl
        if kl == "flow_grpo" and opts.sde.kind != "flow_grpo":
            raise bad_option("policy.options.objective.kl", kl, "Flow-GRPO's KL is defined for its own step "
                             f"(policy.options.sde.kind flow_grpo, here {opts.sde.kind}); use kl: exact")  # fmt: skip
        if kl != "exact" and not opts.reference_kl:
            raise bad_option("policy.options.objective.kl", kl, "it does nothing without a reference KL: set "
                             "policy.options.reference_kl: true (and loss.beta > 0), or remove it")  # fmt: skip

    def finish_rollout(self, policy, batch, G, latents, logp, plan, cond, gens) -> Rollout:
        train = per_row_steps(plan, gens, G)  # [N, T]: the plan's steps, or each row's own (DanceGRPO)
        return policy.finish(batch, G, latents, logp, train, cond, extras={})

    def log_prob(
        self, policy: Any, rollout: Rollout, rows: torch.Tensor, units: torch.Tensor | None,
        pairs: torch.Tensor | None = None,
    ) -> LogProbs:  # fmt: skip
        """Log-probs (with grad) of steps ``units`` for ``rows``: one batched forward over rows x units, or over the
        (row, unit) pairs marked in ``pairs`` [n, k] only (the others are 0 and carry no gradient)."""
        sched = policy.adapter.schedule(policy.opts.num_steps)
        units = torch.arange(sched.num_steps) if units is None else units.cpu()
        n, k = len(rows), len(units)
        lat = rollout.extras["latents"]
        rr, uu = rows.repeat_interleave(k), units.repeat(n)  # [n*k] pairs, row-major
        where = None
        if pairs is not None:
            if pairs.shape != (n, k):
                raise ValueError(f"pairs of shape {tuple(pairs.shape)}; expected [n, k] = [{n}, {k}]")
            where = pairs.reshape(-1).cpu().bool().nonzero().reshape(-1)  # [p] of the n*k pairs
            if len(where):
                rr, uu = rr[where], uu[where]
            else:  # no pair marked: forward them all, as without pairs (their loss is 0 under the mask), so the
                where = None  # forward and its graph exist as before (collective forwards, DDP's gradient hooks)
        if rollout.extras.get("state_shared_in_group"):
            # G2RPO: the G rows of a group share x_k, so one forward per (group, unit) serves all of them
            fwd_rows = (rr // rollout.group_size) * rollout.group_size
            uniq, inverse = torch.unique(torch.stack([fwd_rows, uu], 1), dim=0, return_inverse=True)
            fwd_rows, fwd_units = uniq[:, 0], uniq[:, 1]
        else:  # every (row, unit) pair is its own state: no deduplication, no second copy of the states
            fwd_rows, fwd_units, inverse = rr, uu, None
        x = lat[fwd_rows, fwd_units]  # [f, *latent]: the one gathered copy of the states this micro-batch trains on
        cond = policy.cond_rows(rollout.extras["cond"], fwd_rows)
        t = sched.timesteps[fwd_units].to(x.device)
        uncond = policy.uncond(len(fwd_rows))
        x_all = x if inverse is None else x[inverse]  # [n*k, *latent]
        prev = lat[rr, uu + 1]

        def scored(module):
            out = policy.guided(module, x, t, cond, uncond)
            return policy.score_steps(out if inverse is None else out[inverse], x_all, uu, sched, prev)

        res = scored(policy.model)
        kl = None
        if policy.opts.reference_kl:
            with torch.no_grad(), policy.reference() as ref_model:
                ref = scored(ref_model)
            kl = sde.gaussian_kl(res.mean, ref.mean, res.std)
            if self.opts.kl == "flow_grpo":  # their (mean - mean_ref)^2 / (2 std_t^2) = the exact KL times |dt|
                kl = kl * (sched.sigmas[uu] - sched.sigmas[uu + 1]).abs().to(kl)
        if where is None:
            return LogProbs(logp=res.log_prob.view(n, k), kl=None if kl is None else kl.view(n, k))
        at = (where.to(res.log_prob.device),)

        def spread(v: torch.Tensor) -> torch.Tensor:  # [p] -> [n, k], 0 off the pairs
            return v.new_zeros(n * k).index_put(at, v).view(n, k)

        return LogProbs(logp=spread(res.log_prob), kl=None if kl is None else spread(kl))
