"""Phases 1 and 2 of the loop, collect (docs/architecture.md "The loop"): this rank's prompts for a step (from the
sampler's plan), sampled without gradient and scored by every configured reward; with ``trainer.rollout_chunks`` > 1
a chunk is scored while the next samples; DAPO's dynamic sampling refills zero-variance groups from fresh prompts;
prompt rewriting before a re-roll (:mod:`mmgrpo.train.reroll`).

:class:`CollectPhase` is a mixin of :class:`~mmgrpo.train.trainer.Trainer` (as
:class:`~mmgrpo.train.update.UpdatePhase` is): its methods read the trainer's state (declared below) and stay methods
of the trainer, so a test or a method may still replace one on the class.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from accelerate import Accelerator

from mmgrpo.core.errors import UserError
from mmgrpo.core.sampling import StepPlan
from mmgrpo.core.seeding import generator_for, prompt_seed
from mmgrpo.core.types import PromptBatch, Rollout, concat_rollouts
from mmgrpo.train.components import Components
from mmgrpo.train.config import Config
from mmgrpo.train.reroll import reroll
from mmgrpo.train.scoring import score, take_groups, uninformative_groups, weighted_total

REFILL_OFFSET = 1 << 40  # stream positions of DAPO refill prompts start here (disjoint from the main stream)


def check_samples_finite(rollout: Rollout, step: int, cfg: Config) -> None:
    """The rollout's samples (floating tensors: images, videos) are finite, else a UserError naming the generator: a
    diverged policy (its weights, or sampling settings that overflow) made NaN videos that the first reward refused
    as "reward 'motion' returned non-finite values ... fix the reward", and the resume it advised diverged again."""
    samples = rollout.samples if isinstance(rollout.samples, (list, tuple)) else [rollout.samples]
    floats = [x for x in samples if isinstance(x, torch.Tensor) and x.is_floating_point()]
    # one sum per tensor (NaN or inf in, NaN or inf out; pixels in [0, 1] cannot overflow fp32): isfinite(x).all()
    # made a mask as large as the videos, gigabytes on a GPU right after the VAE decode
    if all(bool(torch.isfinite(x.sum(dtype=torch.float32))) for x in floats):
        return
    if isinstance(rollout.samples, torch.Tensor):
        rows = (~torch.isfinite(rollout.samples.flatten(1)).all(1)).nonzero().reshape(-1).tolist()
    else:
        rows = [i for i, x in enumerate(samples) if isinstance(x, torch.Tensor) and x.is_floating_point()
                and not bool(torch.isfinite(x).all())]  # fmt: skip
    if not rows:  # only the sum overflowed
        return
    opts = cfg.policy.options or {}
    settings = [f"trainer.lr={cfg.trainer.lr:g}"]
    settings += [f"policy.options.{k}={opts[k]}" for k in ("guidance_scale", "sde") if opts.get(k) is not None]
    head = (f"the policy's samples of step {step + 1} are not finite (NaN or inf in {len(rows)} of {rollout.num_rows} "
            "rows): the generator diverged, not a reward")  # fmt: skip
    if step == 0:  # nothing trained yet: the model or its sampling settings
        raise UserError(f"{head}; before any update, so its weights as loaded or its sampling settings overflow "
                        f"({', '.join(settings[1:]) or 'policy.options'}); check the model and lower "
                        "them")  # fmt: skip
    raise UserError(
        f"{head}; its weights (a learning rate too high) or its sampling settings overflow ({', '.join(settings)}). "
        "A checkpoint written since the weights began to diverge holds finite but broken weights: resume from one "
        "before (delete the later checkpoints/step_* folders) with a lower trainer.lr, or start again"
    )


class CollectPhase:
    """The collect phase's methods of :class:`~mmgrpo.train.trainer.Trainer`, which holds what they read."""

    cfg: Config
    acc: Accelerator
    policy: Any
    comp: Components
    rewards: list
    sampler: Any
    B_local: int
    collective: bool
    _reshard: Callable[[], None]
    any_process: Callable[[bool], bool]
    rewards_loaded = False
    """whether the rewards were called once in this process (the first call loads a lazily loaded reward model)"""

    def prompts_for(self, step: int, base: int, plan: StepPlan | None = None) -> PromptBatch:
        """This rank's B_local prompts: the slots base + rank * B_local + b, seeded by slot; each slot's prompt is
        the stream position itself, or with a sampler's ``plan`` the plan's position (and group size) of that slot."""
        B, seed = self.cfg.trainer.prompts_per_step, self.cfg.run.seed
        lo = self.acc.process_index * self.B_local
        slots = [base + lo + b for b in range(self.B_local)]
        positions = slots if plan is None else plan.positions[lo : lo + self.B_local]
        batch = self.comp.prompts.get(positions)
        batch.seeds = [prompt_seed(seed, step, p) for p in slots]
        batch.positions = list(positions)
        if plan is not None and plan.group_sizes:
            batch.group_sizes = plan.group_sizes[lo : lo + self.B_local]
        batch.step = step
        assert len(batch) == self.B_local and B > 0
        return batch

    def sample(self, batch: PromptBatch, step: int) -> Rollout:
        # the step's shared generator (same on every rank: e.g. which denoising steps are trained);
        # per-sample randomness comes from batch.seeds
        g = generator_for(prompt_seed(self.cfg.run.seed, step, 0, stream=1))
        self.policy.model.eval()
        self._reshard()
        defer = self.leaves_logp_old_to_update()
        if defer:
            self.policy.logp_old_from_update = True
        try:
            with torch.no_grad():
                rollout = self.policy.rollout(batch, self.cfg.trainer.group_size, g)
        finally:
            if defer:
                self.policy.logp_old_from_update = False
        self._reshard()
        check_samples_finite(rollout, step, self.cfg)
        if self.sampler.stateful:  # each row's stream position: the sampler's statistics are per prompt
            if rollout.num_groups != len(batch) or rollout.sizes != batch.sizes(self.cfg.trainer.group_size):
                raise UserError(
                    f"sampler {self.cfg.sampler.name!r} keeps per-prompt statistics, but the policy returned "
                    f"{rollout.num_groups} groups of sizes {rollout.sizes[:8]} for {len(batch)} prompts asking "
                    f"{batch.sizes(self.cfg.trainer.group_size)[:8]} (a method's policy wrapper changes the groups); "
                    "use sampler: uniform with it"
                )
            sizes = torch.tensor(rollout.sizes, dtype=torch.long)
            rollout.extras["stream_position"] = torch.tensor(batch.positions, dtype=torch.long).repeat_interleave(
                sizes
            )
        return rollout

    def leaves_logp_old_to_update(self) -> bool:
        """Whether rollouts may leave ``logp_old`` to the update (``Policy.logp_old_from_update``): trainer.logp_old
        is auto, the policy supports it and the rollout feeds exactly one optimizer step, whose forwards all run at
        the sampling parameters, so ``logp.detach()`` there IS ``logp_old`` (ratio exactly 1; TRL does the same)."""
        t = self.cfg.trainer
        if getattr(self.sampler, "needs_policy_drift", False):  # the drift after the update needs logp_old itself
            return False
        return t.logp_old == "auto" and t.epochs * t.minibatches == 1 and hasattr(self.policy, "logp_old_from_update")

    def sample_and_score(self, batch: PromptBatch, step: int, timers: dict[str, float]):
        """Sample then score; with ``trainer.rollout_chunks`` > 1, chunk c is scored in a background thread
        while chunk c+1 is sampled (a remote or threaded reward then costs only what sampling does not hide).
        Chunks are whole prompts, and samples depend only on per-prompt seeds, so chunking changes nothing."""
        n = min(max(1, self.cfg.trainer.rollout_chunks), len(batch))
        parts = [batch.select(list(ix)) for ix in torch.tensor_split(torch.arange(len(batch)), n)]
        t0 = time.perf_counter()
        if n == 1:
            rollout = self.sample(batch, step)
            t1 = time.perf_counter()
            cols = score(rollout, self.rewards, step, self.policy)
            timers["time/sample_s"] += t1 - t0
            timers["time/score_s"] += time.perf_counter() - t1
            return rollout, cols
        rollouts, futures, score_time = [], [], [0.0]

        def timed_score(r: Rollout) -> torch.Tensor:
            if self.acc.device.type == "cuda":  # a thread's current device is its own (cuda:0): this rank's GPU
                torch.cuda.set_device(self.acc.device)
            s0 = time.perf_counter()
            out = score(r, self.rewards, step, self.policy)
            score_time[0] += time.perf_counter() - s0
            return out

        # a reward that runs the policy itself (ACRE re-asks it) scores here, between chunks: beside the sampling
        # it would run the model in two threads at once (under FSDP, collectives out of order)
        inline = any(getattr(fn, "uses_policy", False) for _, _, fn in self.rewards)
        with ThreadPoolExecutor(max_workers=1) as pool:
            for part in parts:
                rollouts.append(self.sample(part, step))
                # so does the run's first chunk: a reward's first call loads its model, and transformers sets the
                # process's default dtype while it loads (bf16 weights: the sampling beside it would make bf16
                # tensors, e.g. logp_old)
                if inline or not self.rewards_loaded:
                    futures.append(Future())
                    futures[-1].set_result(timed_score(rollouts[-1]))
                    self.rewards_loaded = True
                else:
                    futures.append(pool.submit(timed_score, rollouts[-1]))
            t1 = time.perf_counter()
            cols = torch.cat([f.result() for f in futures], dim=-1)
        wait = time.perf_counter() - t1
        timers["time/sample_s"] += t1 - t0
        timers["time/score_s"] += score_time[0]
        timers["time/score_wait_s"] = timers.get("time/score_wait_s", 0.0) + wait
        return concat_rollouts(rollouts), cols

    def collect(self, step: int) -> tuple[Rollout, torch.Tensor, dict[str, float]]:
        """Sample and score B_local groups; with DAPO dynamic sampling, replace zero-variance groups."""
        t, a = self.cfg.trainer, self.cfg.advantage
        timers = {"time/sample_s": 0.0, "time/score_s": 0.0}
        kept: list[tuple[Rollout, torch.Tensor]] = []
        dropped: list[tuple[Rollout, torch.Tensor]] = []
        rounds = 1 + (a.max_refill_rounds if a.dynamic_sampling else 0)
        for r in range(rounds):
            base = step * t.prompts_per_step if r == 0 else REFILL_OFFSET + (step * rounds + r) * t.prompts_per_step
            # refills: the sampler's replacement prompts (VSPO), or fresh stream positions with G rollouts each
            if r == 0:
                plan = main = self.sampler.plan(step)
            else:
                plan = self.sampler.refill(step, r, main)
            batch = self.prompts_for(step, base, plan)
            rollout, cols = self.sample_and_score(batch, step, timers)
            if self.comp.rewrite is not None:  # prompt rewriting before a re-roll (docs/architecture.md "Hooks")
                rollout, cols = reroll(self, batch, base, rollout, cols, step, timers)
            if not a.dynamic_sampling:
                return rollout, cols, timers
            kinds = [spec.kind for spec in self.cfg.rewards]
            zero = uninformative_groups(cols[0], self.rewards, rollout.sizes, a.combine, kinds, a.combine_options,
                                        self.step_weights())  # fmt: skip
            have = sum(p.num_groups for p, _ in kept)
            good = [g for g in range(rollout.num_groups) if not zero[g]][: self.B_local - have]
            bad = [g for g in range(rollout.num_groups) if zero[g]]
            kept.append(take_groups(rollout, cols, good))
            dropped.append(take_groups(rollout, cols, bad))
            full = sum(p.num_groups for p, _ in kept) >= self.B_local
            if self.collective:  # every process samples as many rounds (the full ones' extra groups are unused)
                full = not self.any_process(not full)
            if full:
                break
        timers["dynamic/refill_rounds"] = float(r)
        missing = self.B_local - sum(p.num_groups for p, _ in kept)
        timers["dynamic/unfilled_groups"] = float(missing)
        if missing:  # refills ran out: pad with zero-variance groups so every rank keeps B_local groups
            pad_r = concat_rollouts([p for p, _ in dropped if p.num_rows])
            pad_c = torch.cat([c for p, c in dropped if p.num_rows], dim=-1)
            kept.append(take_groups(pad_r, pad_c, list(range(missing))))
        parts = [(p, c) for p, c in kept if p.num_rows]
        return concat_rollouts([p for p, _ in parts]), torch.cat([c for _, c in parts], dim=-1), timers

    def step_weights(self) -> torch.Tensor:
        """This step's reward weights [R] before its advantage: the configured ones through each stateful weighter's
        ``current`` (dynamic weighting; mmgrpo.methods.registry). DAPO's refill and the re-roll tested a group's
        spread under the configured weights while the advantage used these: a group tied under one and spread
        under the other was dropped with signal, or kept without."""
        weights = torch.tensor([wt for _, wt, _ in self.rewards], dtype=torch.float32)
        for weighter in self.comp.reward_weighters:
            current = getattr(weighter, "current", None)
            if current is None:  # a plug-in weighter that does not say: the weights as given
                continue
            weights = current(weights)
        return weights

    def weighted(self, cols: torch.Tensor) -> torch.Tensor:
        """The configured weighted sum of reward columns [R, n] -> [n]."""
        return weighted_total(cols, self.rewards)
