"""Prompt rewriting before a re-roll, the trainer's collect hook (:mod:`mmgrpo.core.rewriting`; docs/architecture.md
"Hooks"): groups without learning signal are sampled and scored again from prompts a method's rewriter writes (hints,
reformulations), with seeds from the prompts' global positions, in step across processes. Scaf-GRPO, HiLL and
Cog-DRIFT contribute rewriters; :func:`reroll` is the one place that runs them."""

from __future__ import annotations

import time
from typing import Any

import torch

from mmgrpo.core import rewriting as rw_lib
from mmgrpo.core.errors import UserError
from mmgrpo.core.seeding import prompt_seed
from mmgrpo.core.types import PromptBatch, Rollout, concat_rollouts, select_rows
from mmgrpo.train.scoring import estimator_total, take_groups


def reroll(
    tr: Any, batch: PromptBatch, base: int, rollout: Rollout, cols: torch.Tensor, step: int, timers: dict[str, float]
) -> tuple[Rollout, torch.Tensor]:
    """Prompt rewriting before a re-roll (:mod:`mmgrpo.core.rewriting`): groups of ``batch`` that trigger (no
    learning signal) are sampled and scored again from prompts the enabled method's rewriter writes, for up to
    ``max_rounds`` attempts; the re-rolled group replaces the original, is added after the batch's groups, or
    lends its successful rows (``mode``). Seeds come from the prompts' global positions on separate streams;
    with several processes each attempt samples as many groups on every process (padding groups, dropped), so
    the forwards stay in step and the run is the 1-process run.
    Metrics: ``rewrite/groups`` (groups that triggered), ``rewrite/rerolled`` (groups sampled again, all
    attempts), ``rewrite/rescued`` (triggered groups whose trained group has learning signal).

    ``tr`` is the :class:`~mmgrpo.train.trainer.Trainer` (its processes, components, rewards and
    ``sample_and_score``)."""
    run = _Reroll(tr, batch, base, rollout, cols, step)
    t0 = time.perf_counter()
    for attempt in range(run.o.max_rounds):
        if not run.attempt(attempt, timers):
            break
    timers["time/rewrite_s"] = timers.get("time/rewrite_s", 0.0) + time.perf_counter() - t0
    return run.finish(timers)


class _Reroll:
    """The state of one :func:`reroll`: each group's current (rollout, columns), what still triggers, the added
    groups, and the counts its metrics report."""

    def __init__(self, tr: Any, batch: PromptBatch, base: int, rollout: Rollout, cols: torch.Tensor, step: int):
        self.tr, self.batch, self.step = tr, batch, step
        self.rw, self.G, self.seed = tr.comp.rewrite, rollout.group_size, tr.cfg.run.seed
        self.o, self.several = self.rw.options, tr.acc.num_processes > 1
        self._check(rollout)
        self.col = None if self.o.reward is None else [name for name, _, _ in tr.rewards].index(self.o.reward)
        self.first = base + tr.acc.process_index * tr.B_local  # the global position of this process's first prompt
        self.current = [take_groups(rollout, cols, [b]) for b in range(rollout.num_groups)]
        self.added: list[tuple[Rollout, torch.Tensor]] = []
        self.todo = rw_lib.trigger_mask(*self.judged(cols), self.o.trigger, self.o.threshold).tolist()
        self.triggered, self.rescued_by = list(self.todo), dict.fromkeys(range(len(self.todo)))
        self.rerolled = 0

    def _check(self, rollout: Rollout) -> None:
        tr, rw, o = self.tr, self.rw, self.o
        if rollout.ragged:
            raise UserError(
                f"methods.{rw.method} re-rolls groups of equal size, but the prompt sampler {tr.cfg.sampler.name!r} "
                f"gave groups of sizes {rollout.group_sizes[:8]}...: use a sampler with a fixed group size (uniform, "
                "spo, pairing, vspo) with prompt rewriting"
            )
        sharded = tr.mesh is not None or tr.zero_stage == 3  # every forward is a collective
        if self.several and (o.mode == "add" or tr.cfg.advantage.dynamic_sampling or sharded):
            raise UserError(
                f"methods.{rw.method} with {tr.acc.num_processes} processes: mode=add (a different number of groups "
                "per process), advantage.dynamic_sampling (a different number of refill rounds per process) and "
                "FSDP or DeepSpeed ZeRO-3 sharding cannot keep the re-rolls of the processes in step yet; use mode "
                "replace or mix, without dynamic sampling, FSDP or ZeRO-3, or train on one process"
            )

    def everywhere(self, x: int, how: str) -> int:
        """The count over all processes (they all call this alike)."""
        if not self.several:
            return x
        acc = self.tr.acc
        return int(acc.reduce(torch.tensor([x], device=acc.device), reduction=how).item())

    def judged(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns ``c [V, R, n]`` -> (the score the trigger reads, the total the estimator reads), each [n / G, G].
        The total (what ``zero_variance`` and ``keep: signal`` test; Posterior-GRPO's gated sum under its combiner)
        is NaN on the rows no reward applies to, which the tie test leaves out as the estimators do (counted as 0, a
        group whose scored rows tie had "signal")."""
        score = self.tr.weighted(c[0]).view(-1, self.G) if self.col is None else c[0, self.col].view(-1, self.G)
        a, n = self.tr.cfg.advantage, c.shape[-1]
        kinds = [spec.kind for spec in self.tr.cfg.rewards]
        sizes = [self.G] * (n // self.G)
        weights = self.tr.step_weights()  # this step's (dynamic weighting), as the advantage will use
        return score, estimator_total(c[0], self.tr.rewards, sizes, a.combine, kinds, a.combine_options, weights)

    def attempt(self, attempt: int, timers: dict[str, float]) -> bool:
        """One round: rewrite the prompts of the groups that still trigger, sample and score them, keep what the
        mode keeps. False when no process has a group left to try."""
        tr, seed, step = self.tr, self.seed, self.step
        idx = [b for b, t in enumerate(self.todo) if t]
        if not self.everywhere(len(idx), "sum"):
            return False
        request = rw_lib.RewriteRequest(
            prompts=[self.batch.prompts[b] for b in idx],
            meta=[self.batch.meta[b] for b in idx],
            completions=[list(self.current[b][0].samples) for b in idx],
            scores=torch.cat([self.judged(self.current[b][1])[0] for b in idx]),
            attempt=attempt,
            step=step,
            seeds=[prompt_seed(seed, step, self.first + b, rw_lib.REWRITE_STREAM + 2 * attempt + 1) for b in idx],
            policy=tr.policy,
            source=tr.comp.prompts,
        )
        tr.policy.model.eval()
        with torch.no_grad():
            rewritten = self.rw.rewriter(request) if idx else []
        if len(rewritten) != len(idx):
            raise ValueError(f"rewriter of {self.rw.method} returned {len(rewritten)} prompts for {len(idx)} groups")
        picked = [(b, pm) for b, pm in zip(idx, rewritten) if pm is not None]
        for b, pm in zip(idx, rewritten):
            self.todo[b] = pm is not None  # nothing to rewrite with: the group stays as it is
        most = self.everywhere(len(picked), "max")
        if not most:
            return True
        seeds = [prompt_seed(seed, step, self.first + b, rw_lib.REWRITE_STREAM + 2 * attempt) for b, _ in picked]
        # every process samples `most` groups, so their forwards stay in step; the padding groups are dropped
        pad, batch = most - len(picked), self.batch
        prompts = [pm[0] for _, pm in picked] + [batch.prompts[0]] * pad
        again = PromptBatch(prompts, [pm[1] for _, pm in picked] + [batch.meta[0]] * pad, seeds + [seed] * pad, step)
        new_r, new_c = tr.sample_and_score(again, step, timers)
        self.rerolled += len(picked)
        for j, (b, _) in enumerate(picked):
            self.keep(b, take_groups(new_r, new_c, [j]))
        return True

    def keep(self, b: int, group: tuple[Rollout, torch.Tensor]) -> None:
        """Group ``b``'s re-roll ``group``: mix its successful rows in, add it, or let it replace the group."""
        o = self.o
        new_score, new_total = self.judged(group[1])
        if o.mode == "mix":
            plan = rw_lib.mix_plan(self.judged(self.current[b][1])[0][0], new_score[0], o.threshold, o.mix_rows)
            if plan:
                self.current[b], self.todo[b] = mix_rows(self.current[b], group, plan), False
        elif o.keep == "always" or bool(rw_lib.has_signal(new_total)[0]):
            if o.mode == "add":
                self.added.append(group)
                self.rescued_by[b], self.todo[b] = group, False
            else:
                self.current[b] = group
                self.todo[b] = bool(rw_lib.trigger_mask(new_score, new_total, o.trigger, o.threshold)[0])

    def finish(self, timers: dict[str, float]) -> tuple[Rollout, torch.Tensor]:
        """The metrics, then the batch's groups (re-rolled where kept) followed by the added ones."""
        current = self.current
        rescued = sum(
            bool(rw_lib.has_signal(self.judged((self.rescued_by[b] or current[b])[1])[1])[0])
            for b, t in enumerate(self.triggered)
            if t
        )
        for k, v in (("groups", sum(self.triggered)), ("rerolled", self.rerolled), ("rescued", rescued)):
            timers[f"rewrite/{k}"] = timers.get(f"rewrite/{k}", 0.0) + float(self.everywhere(v, "sum"))
        parts = current + self.added
        return concat_rollouts([p for p, _ in parts]), torch.cat([c for _, c in parts], dim=-1)


def mix_rows(old, new, plan: list[tuple[int, int]]) -> tuple[Rollout, torch.Tensor]:
    """One group: rows of ``old`` with row i replaced by row j of ``new`` for each (i, j) of ``plan``."""
    G = old[0].group_size
    rows = list(range(G))
    for i, j in plan:
        rows[i] = G + j
    both = concat_rollouts([old[0], new[0]])
    return select_rows(both, rows), torch.cat([old[1], new[1]], dim=-1)[..., rows]
