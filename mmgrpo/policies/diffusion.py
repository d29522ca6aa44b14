"""Diffusion and flow samplers as SDE policies (DanceGRPO, Flow-GRPO, MixGRPO, G2RPO).

A sampler of T steps is a policy whose action units are its steps (K = T): step i maps the state x_i to
x_{i+1} ~ N(mean(x_i, model(x_i)), std_i^2) (``mmgrpo.policies.sde``); the exploration planner
(``mmgrpo.policies.exploration``) decides which steps are stochastic (SDE) and which are trained;
ODE steps are deterministic and never trained.

Per-family code lives in an **adapter** (``mmgrpo/policies/models/<family>.py``) that only knows how to
encode a condition, call the denoiser, give the noise schedule and decode latents. :class:`DiffusionPolicy`
does everything else, once, for every family: group sampling with per-prompt seeds, CFG, log-prob recording,
recomputation with gradient, the KL to the reference (LoRA adapter disabled), G2RPO branching. What the loss
trains is a registered **objective** (``mmgrpo.policies.objectives``: the SDE steps; ``mmgrpo.policies.flow_matching``:
AWM and DiffusionNFT on the final samples, with the EMA sampling policy); which steps explore, a registered
**exploration schedule** (``mmgrpo.policies.exploration``). Both own their options (``policy.options.objective``,
``policy.options.exploration``), checked when the config is loaded.

Shapes: B prompts, G samples per prompt, N = B*G rows, T steps, latents ``[N, *latent_shape]``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn

from mmgrpo.core.errors import UserError
from mmgrpo.core.extras import needs
from mmgrpo.core.registry import Registry
from mmgrpo.core.seeding import generator_for
from mmgrpo.core.types import LogProbs, PromptBatch, Rollout, rollout_by_size
from mmgrpo.policies import exploration, sde
from mmgrpo.policies.diffusion_options import DiffusionPolicyOptions, check_attention
from mmgrpo.policies.exploration import EXPLORATION, ExplorationSchedule
from mmgrpo.policies.objectives import DiffusionObjective, SDEObjective, objective_class

Cond = dict[str, torch.Tensor]  # conditioning tensors, batch first


@dataclass
class Schedule:
    """The sampling schedule of T steps.

    flow: ``sigmas [T+1]`` from 1 towards 0 (ends at 0) and ``timesteps [T]`` (the model's time input).
    ddim: ``alpha_bars [T+1]`` (alpha-bar at each state; the last is alpha-bar-prev of the final step) and
    ``timesteps [T]``.
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor | None = None
    alpha_bars: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


class DiffusionAdapter(Protocol):
    """What a model family provides. ``denoiser`` is the trainable network (transformer or UNet)."""

    family: str
    parameterization: Literal["flow", "ddim"]  # velocity on sigmas, or epsilon/v UNet on alpha-bars
    prediction_type: str  # "flow" | "epsilon" | "v_prediction"
    denoiser: nn.Module
    device: torch.device
    dtype: torch.dtype  # of latents and model inputs

    def encode(self, prompts: list[Any], meta: list[dict]) -> Cond:
        """Conditioning for B prompts (no grad), every tensor [B, ...]."""
        ...

    def encode_negative(self, n: int) -> Cond:
        """Unconditional (negative / empty prompt) conditioning [n, ...] for classifier-free guidance."""
        ...

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latent, e.g. (C, h, w) or (C, F, h, w)."""
        ...

    def schedule(self, num_steps: int) -> Schedule: ...

    def timestep_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Model time input at noise level sigma (flow families; G2RPO's coarse schedules need it)."""
        ...

    def predict(self, module: nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """One forward of ``module`` (the possibly DDP-wrapped denoiser) at model times ``t [n]``."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [n, ...] -> images [n, 3, H, W] or videos [n, F, 3, H, W] in [0, 1]."""
        ...


ADAPTERS: Registry[Any] = Registry("diffusion model family", plugins="diffusion_families")


def stack_conds(first: Cond, second: Cond, n: int) -> Cond | None:
    """One condition for the doubled batch [first; second] of ``n`` rows each: every key's tensors concatenated
    along the batch; None when the two cannot be (different keys, a value that is not a tensor of ``n`` rows, or
    shapes that differ beyond the batch, e.g. prompt embeddings padded to different lengths)."""
    if first.keys() != second.keys():
        return None
    out = {}
    for k, a in first.items():
        b = second[k]
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() > 0 and len(a) == n
        if not (ok and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device):
            return None
        out[k] = torch.cat([a, b])
    return out


class DiffusionPolicy:
    """Policy protocol over a :class:`DiffusionAdapter`.

    Rollout samples are the decoded images [N, 3, H, W] (videos [N, F, 3, H, W]) in [0, 1]; units are
    the T sampling steps; ``extras["latents"] [N, T+1, ...]`` stores every state. What the loss trains is the
    registered objective ``self.objective``; which steps explore, the schedule ``self.exploration``.
    """

    def __init__(self, adapter: DiffusionAdapter, options: DiffusionPolicyOptions | None = None):
        self.adapter = adapter
        self.opts = options or DiffusionPolicyOptions()
        self.noise_level = self.opts.sde.noise_level
        self.exploration: ExplorationSchedule = EXPLORATION.get(self.opts.exploration.name)(self.opts.exploration)
        self.objective: DiffusionObjective = objective_class(self.opts)(self.opts.objective)
        self._check_adapter()
        self.training_step = 0
        if self.opts.lora_rank > 0:
            add_lora(adapter.denoiser, self.opts, getattr(adapter, "lora_targets", None))
        else:
            adapter.denoiser.requires_grad_(True)
        self._frozen_reference: nn.Module | None = None
        if self.opts.reference_kl and self.opts.lora_rank <= 0:  # full fine-tuning: the initial weights, frozen
            self._frozen_reference = copy.deepcopy(adapter.denoiser).requires_grad_(False).eval()
        if self.opts.gradient_checkpointing:
            adapter.denoiser.enable_gradient_checkpointing()
        if self.opts.attention == "xformers":
            check_attention(self.opts.attention, next(adapter.denoiser.parameters()).device)
            adapter.denoiser.enable_xformers_memory_efficient_attention()
        self.model: nn.Module = adapter.denoiser
        self.forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        """the context the trained model's forwards run in: the trainer sets accelerate's autocast, which wraps the
        prepared model's forward; the frozen reference of a full fine-tune runs in it too, so that its KL is 0 at the
        initial weights under mixed precision (fp32 against bf16 forwards made a KL of bf16's rounding)"""
        self.objective.attach(self)
        self.logp_old_from_update = False
        """set by the trainer around a rollout that feeds one optimizer step: objectives whose logp_old is a forward
        of its own after sampling (flow_matching) skip it (``Rollout.logp_old_from_update``)"""

    def _check_adapter(self) -> None:
        kind, a, unet = self.opts.sde.kind, self.adapter, sde.SDEOptions.UNET_KIND
        if a.parameterization == "ddim" and kind != unet:
            raise UserError(f"policy.options.sde.kind={kind!r}: the {a.family} family is a UNet sampled with DDIM; "
                            f"set policy.options.sde.kind={unet}")  # fmt: skip
        if a.parameterization == "flow" and kind == unet:
            raise UserError(f"policy.options.sde.kind: {sde.SDE_KINDS.unknown_message(kind)} ({a.family} is a "
                            "flow-matching family; ddim is for UNet families)")  # fmt: skip
        self.objective.check_adapter(a)

    def parameters_replaced(self) -> None:
        """The trainer's accelerate ``prepare`` replaced the trainable parameters (FSDP2 shards them into new DTensor
        parameters): the objective's copies of them (e.g. nft's old-policy EMA) are made again from the new ones."""
        self.objective.attach(self)

    def training_state(self) -> dict[str, Any] | None:
        """What a checkpoint keeps besides the trained weights (the objective's, e.g. nft's old-policy EMA)."""
        return self.objective.training_state()

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.objective.load_training_state(state)

    def sampling_grid(self) -> dict[str, Any]:
        """The model times and noise levels (flow: sigmas; DDIM: alpha-bars) that a rollout of ``num_steps`` steps goes
        through: a checkpoint keeps them, so that resuming it on a version of mmgrpo that steps on another grid is
        refused (:func:`mmgrpo.train.trainer_state.check_sampling_grid`) rather than continued on other steps
        unnoticed."""
        s = self.adapter.schedule(self.opts.num_steps)
        levels = s.sigmas if s.sigmas is not None else s.alpha_bars
        return {
            "timesteps": s.timesteps.float().tolist(),
            "levels": None if levels is None else levels.float().tolist(),
        }

    # ------------------------------------------------------------------ helpers
    def unwrapped(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unwrapped().parameters() if p.requires_grad]

    def micro_batch_rows(self, units: int, budget: int) -> int:
        """Rows per micro-batch under ``trainer.micro_batch_size: auto``: every trained unit of a row (an SDE step, a
        flow-matching draw) is one forward of the denoiser, so a micro-batch takes the whole number of rows nearest to
        ``budget / units`` (``budget`` = ``trainer.micro_batch_units`` (row, unit) forwards), at least one. Its
        activation memory is then about the budget's (at most 1.5 budgets, or one row's units when they exceed it),
        whatever B x G x T. Nearest, not floor: at 9 trained steps a budget of 16 made forwards of 9 (row, step)
        pairs, 1.06-1.26x the Flow-GRPO loop's time; 2 rows (18 pairs) took 0.79-0.83x (bench/peers.py)."""
        return max(1, round(budget / max(units * self._forwards_per_unit(), 1)))

    def micro_batch_pieces(self, units: int, budget: int) -> int:
        """The parts a single row's ``units`` trained units are split into when they exceed the budget (the update
        does so where the loss is exact over a subset of a row's units, :meth:`mmgrpo.train.update.UpdatePhase.
        micro_blocks`): the whole number nearest to units / budget, at least one. So a micro-batch forwards at most
        about 1.5 budgets of (row, unit) pairs whatever T, not one row's T - 1 steps."""
        return max(1, round(units * self._forwards_per_unit() / max(budget, 1)))

    def _forwards_per_unit(self) -> int:
        """Denoiser forwards with gradient per trained unit: 2 with CFG through both branches, else 1."""
        return 2 if self.opts.guidance_uncond_grad and self.opts.guidance_trained() else 1

    def plan(self, generator: torch.Generator | None) -> exploration.ExplorationPlan:
        """The exploration schedule's plan for this rollout (the MixGRPO window slides with training_step)."""
        return self.exploration.plan(self.opts.num_steps, self.training_step, generator)

    def guided(self, module: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond | None):
        """Model output with CFG, uncond + s (cond - uncond). Under grad the unconditional branch carries gradient
        too (Flow-GRPO's and DDPO's train.cfg) unless ``guidance_uncond_grad`` is false. Where both branches run
        alike (sampling, or training through both), they are one forward of the doubled batch [uncond; cond], as
        diffusers' pipelines and Flow-GRPO's training run them (one forward of 2n rows instead of two of n; the
        same numbers within float rounding); the detached variant keeps two forwards, so its unconditional one
        keeps no activations."""
        scale = self.objective.guidance_scale(self.opts)
        if uncond is None or scale == 1.0:
            return self.adapter.predict(module, x, t, cond)
        neg = {**cond, **uncond}  # keys the negative condition lacks (e.g. I2V first-frame latents) stay the row's own
        alike = self.opts.guidance_uncond_grad or not torch.is_grad_enabled()  # the detached variant: two forwards
        both = stack_conds(neg, cond, len(x)) if alike else None
        if both is not None:
            base, out = self.adapter.predict(module, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
            return base + scale * (out - base)
        out = self.adapter.predict(module, x, t, cond)
        detach = torch.no_grad() if not self.opts.guidance_uncond_grad else contextlib.nullcontext()
        with detach:
            base = self.adapter.predict(module, x, t, neg)
        return base + scale * (out - base)

    def step(self, out, x, i: int, sched: Schedule, noise_level: float, prev=None, noise=None) -> sde.StepOutput:
        """Step i of the schedule from state x (sampling when prev is None, else scoring prev)."""
        if self.adapter.parameterization == "ddim":
            a, a_prev = sched.alpha_bars[i], sched.alpha_bars[i + 1]
            return sde.ddim_step(out, x, a, a_prev, noise_level, self.adapter.prediction_type, prev, noise=noise)
        sig, sig_next = sched.sigmas[i], sched.sigmas[i + 1]
        return sde.step(self.opts.sde.kind, out, x, sig, sig_next, noise_level, prev_sample=prev, noise=noise)

    def cond_rows(self, cond: Cond, rows: torch.Tensor) -> Cond:
        return {k: v[rows] for k, v in cond.items()}

    def uncond(self, n: int) -> Cond | None:
        """The negative condition of n rows, or None when the objective's rollouts sample without CFG."""
        return self.adapter.encode_negative(n) if self.objective.guidance_scale(self.opts) != 1.0 else None

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def rollout(self, batch: PromptBatch, group_size: int, generator: torch.Generator | None = None) -> Rollout:
        """G images (videos) per prompt; ``batch.group_sizes`` asks prompt b for G_b of them (ragged groups: one
        sampling loop per distinct size, :func:`~mmgrpo.core.types.rollout_by_size`; noise depends only on the
        prompt's seed either way)."""
        if batch.ragged(group_size):
            out = rollout_by_size(self.rollout, batch, group_size, generator)
            if out.ragged and (out.extras.get("state_shared_in_group") or out.variants):
                raise UserError(
                    "ragged groups (a prompt sampler asking different numbers of rollouts per prompt) do not work "
                    "with exploration singular (G2RPO shares each group's state and scores variants per group); "
                    "use a sampler with a fixed group size, or another exploration"
                )
            return out
        G, B, o = (batch.sizes(group_size)[0] if len(batch) else group_size), len(batch), self.opts
        self.training_step = batch.step  # the MixGRPO window slides with training progress
        sched = self.adapter.schedule(o.num_steps)
        plan = self.plan(generator)
        seeds = batch.seeds or [int(torch.randint(0, 2**62, (1,), generator=generator)) for _ in range(B)]
        gens = [generator_for(s) for s in seeds]
        cond_b = self.adapter.encode(batch.prompts, batch.meta)  # [B, ...]
        rows = torch.arange(B).repeat_interleave(G)
        cond = self.cond_rows(cond_b, rows)  # [N, ...]
        if plan.branch_step is not None:
            return self._rollout_branch(batch, G, sched, plan, gens, cond)
        x = self._noise(gens, G, shared_per_group=o.shared_init_noise)
        # every state is written once into one [N, T+1, ...] buffer (a list then torch.stack held two copies)
        latents = x.new_empty((B * G, sched.num_steps + 1, *x.shape[1:]))
        latents[:, 0] = x
        # on the latents' device, read back once at the end: the loop makes no host-device synchronisation, so on a
        # GPU the host draws the next step's noise while the device still runs this step's forward
        logp = torch.zeros(B * G, sched.num_steps, device=x.device)
        uncond = self.uncond(B * G)
        with self.objective.sampling_weights(self, batch.step):
            for i in range(sched.num_steps):
                out = self.guided(self.model, x, self._t(sched, i, x), cond, uncond)
                level = self.noise_level if plan.sde_mask[i] else 0.0
                noise = self._noise(gens, G, shared_per_group=False) if plan.sde_mask[i] else None
                res = self.step(out, x, i, sched, level, noise=noise)
                x = res.prev_sample
                latents[:, i + 1] = x
                logp[:, i] = res.log_prob
        return self.objective.finish_rollout(self, batch, G, latents, logp.cpu(), plan, cond, gens)

    def _rollout_branch(self, batch, G, sched, plan, gens, cond) -> Rollout:
        """G2RPO: shared ODE anchor to step k, one SDE branch step, ODE continuations (several granularities)."""
        B = len(batch)
        k = int(plan.branch_step)
        x = self._noise(gens, G, shared_per_group=True)
        uncond = self.uncond(B * G)
        latents, logp = [x], torch.zeros(B * G, sched.num_steps)
        # the anchor x_0..x_k is computed once per group and repeated, so the G rows share it exactly (a batched
        # forward of G equal rows may differ in the last bits between rows, and log_prob scores every row of a
        # group from its first row's x_k)
        heads = torch.arange(B) * G  # [B]
        xg, cond_g, uncond_g = x[heads], self.cond_rows(cond, heads), self.uncond(B)
        for i in range(k):
            out = self.guided(self.model, xg, self._t(sched, i, xg), cond_g, uncond_g)
            xg = self.step(out, xg, i, sched, 0.0).prev_sample
            latents.append(xg.repeat_interleave(G, 0))
        x = latents[-1]
        for i in range(k, sched.num_steps):
            out = self.guided(self.model, x, self._t(sched, i, x), cond, uncond)
            noise = self._noise(gens, G, shared_per_group=False) if i == k else None
            res = self.step(out, x, i, sched, self.noise_level if i == k else 0.0, noise=noise)
            if i == k:
                logp[:, i] = res.log_prob
                x_branch = res.prev_sample
            x = res.prev_sample
            latents.append(x)
        variants = []
        for lam in plan.granularities:
            if lam == 1:
                continue
            variants.append(self.adapter.decode(self._coarse(x_branch, k, lam, sched, cond, uncond)).float())
        train = plan.train_mask[None, :].expand(B * G, -1).clone()
        extras = {"state_shared_in_group": True}
        rollout = self.finish(batch, G, torch.stack(latents, 1), logp, train, cond, extras)
        if 1 not in plan.granularities:
            rollout.samples, variants = variants[0], variants[1:]
        rollout.variants = variants
        return rollout

    def _coarse(self, x, k, lam, sched, cond, uncond) -> torch.Tensor:
        """ODE from x_{k+1} on the lambda-coarser sigmas after k (G2RPO multi-granularity)."""
        if self.adapter.parameterization != "flow":
            raise UserError("G2RPO granularities > 1 need a flow-matching family (sigma schedule)")
        sig = exploration.coarse_schedule(sched.sigmas, k, lam)
        for j in range(len(sig) - 1):
            t = self.adapter.timestep_from_sigma(sig[j]).expand(x.shape[0])
            out = self.guided(self.model, x, t, cond, uncond)
            x = sde.step(self.opts.sde.kind, out, x, sig[j], sig[j + 1], 0.0).prev_sample
        return x

    def finish(self, batch, G, latents, logp, train, cond, extras) -> Rollout:
        """The Rollout of ``latents [N, S, ...]`` (last = the samples), ``logp [N, K]``, ``train [N, K]``."""
        images = self.adapter.decode(latents[:, -1]).float()
        return Rollout(
            samples=images,
            logp_old=logp,
            train_mask=train.bool(),
            group_size=G,
            prompts=[p for p in batch.prompts for _ in range(G)],
            meta=[m for m in batch.meta for _ in range(G)],
            extras={"latents": latents, "cond": cond, **extras},
        )

    def _noise(self, gens: list[torch.Generator], G: int, shared_per_group: bool) -> torch.Tensor:
        """[N, *latent] Gaussian noise, drawn group by group from each prompt's generator (layout independent)."""
        shape = self.adapter.latent_shape()
        dev = torch.device(self.adapter.device)
        # drawn on the host into one buffer (pinned for an accelerator, so the copy does not wait for the device), in
        # fp32 whatever the model dtype: logp_old is computed against the fp32 next state, so storing it rounded to
        # bf16 would make the recomputed log-prob differ (ratio != 1)
        z = torch.empty((len(gens) * G, *shape), dtype=torch.float32, pin_memory=dev.type == "cuda")
        for b, g in enumerate(gens):
            rows = z[b * G : (b + 1) * G]
            if shared_per_group:
                rows.copy_(torch.randn((1, *shape), generator=g).expand(G, *shape))
            else:
                torch.randn((G, *shape), generator=g, out=rows)
        return z.to(dev, non_blocking=True)

    @staticmethod
    def _t(sched: Schedule, i: int, x: torch.Tensor) -> torch.Tensor:
        return sched.timesteps[i].expand(x.shape[0]).to(x.device, non_blocking=True)  # no stream sync (a blocking
        # host-to-device copy waits for the device's queue)

    # ------------------------------------------------------------------ recomputation
    @property
    def scores_pairs(self) -> bool:
        """Whether :meth:`log_prob` forwards only the (row, unit) pairs it is given (the objective's
        ``scores_pairs``: sde)."""
        return self.objective.scores_pairs

    def log_prob(
        self,
        rollout: Rollout,
        rows: torch.Tensor,
        units: torch.Tensor | None = None,
        pairs: torch.Tensor | None = None,
    ) -> LogProbs:
        """Log-probs (with grad) of units ``units`` (default: all) for ``rows``, as the objective defines them.
        ``pairs`` [n, k] (bool), where the objective ``scores_pairs``: forward only those (row, unit) pairs (the
        others are 0); where it is all true, or the objective scores every pair, all rows x units.

        No unit at all (a micro-batch whose units the loss masks out, e.g. ``loss.mask_zero_adv``): the first unit is
        forwarded and [n, 0] views of it returned, so the forward and backward still run (every process makes the
        same collectives under FSDP; DDP's hooks fire) and the gradient is 0."""
        empty = units is not None and len(units) == 0
        if empty:
            units, pairs = torch.zeros(1, dtype=torch.long), None
        if pairs is not None and self.scores_pairs and not bool(pairs.all()):
            lp = self.objective.log_prob(self, rollout, rows, units, pairs=pairs)
        else:
            lp = self.objective.log_prob(self, rollout, rows, units)
        to = rollout.logp_old.device  # the loss meets logp_old, the advantages and the mask there (the host); autograd
        # crosses devices (a model on a GPU computes them there)
        moved = {k: None if v is None else (v[:, :0] if empty else v).to(to) for k, v in vars(lp).items()}
        return LogProbs(**moved)

    def score_steps(self, out, x, units, sched: Schedule, prev) -> sde.StepOutput:
        """Score ``prev`` under the step-``units`` Gaussian for a batch mixing different steps (the schedule's
        values stay on the host: the step checks them there and moves them, so it makes no device synchronisation)."""
        if self.adapter.parameterization == "ddim":
            a, a_prev = sched.alpha_bars[units], sched.alpha_bars[units + 1]
            return sde.ddim_step(out, x, a, a_prev, self.noise_level, self.adapter.prediction_type, prev)
        sig, sig_next = sched.sigmas[units], sched.sigmas[units + 1]
        return sde.step(self.opts.sde.kind, out, x, sig, sig_next, self.noise_level, prev_sample=prev)

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The reference policy's denoiser: the LoRA adapter disabled, or (full fine-tuning) the frozen copy."""
        if self._frozen_reference is not None:
            with self.forward_context():
                yield self._frozen_reference
            return
        m = self.unwrapped()
        m.disable_adapters()
        try:
            yield m
        finally:
            m.enable_adapters()

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(self, prompts: list[Any], seeds: list[int], meta: list[dict] | None = None, noise_level: float = 0.0):
        """One deterministic (ODE, noise 0) or stochastic sample per prompt: [n, 3, H, W] in [0, 1].

        Samples as the sde objective with full exploration does, whatever the training objective: every step at
        ``noise_level``, the trained weights, guidance_scale."""
        batch = PromptBatch(prompts=list(prompts), meta=meta or [{} for _ in prompts], seeds=list(seeds))
        saved = (self.noise_level, self.exploration, self.objective)
        self.noise_level = noise_level
        full = self.opts.exploration  # its selection decides whether the plan draws from the global generator
        self.exploration = exploration.FullExploration(full if isinstance(full, exploration.FullOptions) else
                                                       exploration.FullOptions())  # fmt: skip
        self.objective = SDEObjective(SDEObjective.Options())
        try:
            return self.rollout(batch, 1).samples
        finally:
            self.noise_level, self.exploration, self.objective = saved


DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
"""LoRA targets of a family that names none (diffusers' attention projections)"""


def add_lora(denoiser: nn.Module, opts: DiffusionPolicyOptions, default_targets: list[str] | None) -> None:
    """Freeze the denoiser and add a trainable LoRA adapter (peft, through diffusers' adapter API), its weights in
    fp32 whatever the denoiser's dtype (peft makes them in the base layer's dtype; in bf16 AdamW's small steps round
    away, in fp16 its second moment underflows): as peft's ``get_peft_model`` (the VLM policy, Flow-GRPO) and
    diffusers' ``cast_training_params`` do. peft casts a layer's input to fp32 for the adapter and its output back."""
    with needs("diffusion", "LoRA on a diffusion model"):
        from peft import LoraConfig

    targets = opts.lora_targets or default_targets or DEFAULT_LORA_TARGETS
    denoiser.requires_grad_(False)
    config = LoraConfig(
        r=opts.lora_rank,
        lora_alpha=opts.lora_alpha or opts.lora_rank,
        init_lora_weights="gaussian",
        target_modules=targets,
    )
    denoiser.add_adapter(config)
    if not any(p.requires_grad for p in denoiser.parameters()):
        raise UserError(f"policy.options.lora_targets {targets} matched no module of the denoiser")
    for p in denoiser.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
