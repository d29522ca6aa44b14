"""Phase 4 of the loop, the update (docs/architecture.md "The loop"): ``trainer.epochs`` x ``trainer.minibatches``
optimizer steps, each minibatch holding a slice of every group (so 1 and 2 processes make the same steps) and
recomputing ``log_prob`` in micro-batches with one global normaliser; non-finite steps skipped; SPO's policy drift.

:class:`UpdatePhase` is a mixin of :class:`~mmgrpo.train.trainer.Trainer`: its methods read the trainer's state
(declared below) and stay methods of the trainer, so a test or a method may still replace one on the class.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from mmgrpo.core import losses as loss_lib
from mmgrpo.core.ema import EMA
from mmgrpo.core.errors import UserError
from mmgrpo.core.extra import TermInputs, term_metric
from mmgrpo.core.seeding import generator_for, prompt_seed
from mmgrpo.core.types import Rollout
from mmgrpo.train import checkpoint as ckpt
from mmgrpo.train import zero
from mmgrpo.train.components import Components
from mmgrpo.train.config import Config

SUMMED_METRICS = ("loss/policy", "loss/kl", "loss/total")
"""loss metrics that micro-batches add up (each is aggregated with the minibatch's global normaliser)"""


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate of training step ``step``: linear warmup, then constant / linear / cosine decay to 0."""
    t = cfg.trainer
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    span = max(1, t.max_steps - t.warmup_steps)
    frac = min(1.0, (step - t.warmup_steps) / span)
    if t.lr_schedule == "linear":
        return t.lr * (1.0 - frac)
    return t.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


class UpdatePhase:
    """The update's methods of :class:`~mmgrpo.train.trainer.Trainer`, which holds what they read."""

    cfg: Config
    acc: Accelerator
    run_dir: Path
    policy: Any
    comp: Components
    sampler: Any
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    aggregation: loss_lib.Aggregation
    ema: EMA | None
    deepspeed: bool
    collective: bool
    surrogate: bool
    term_metrics: set[str]
    step: int
    nonfinite_in_a_row: int
    _reshard: Callable[[], None]

    def update(self, rollout: Rollout, adv: torch.Tensor, row_w: torch.Tensor, step: int) -> dict[str, float]:
        """epochs x minibatches optimizer steps; each minibatch in micro-batches with one global normaliser."""
        t, lc = self.cfg.trainer, self.cfg.loss
        if rollout.logp_old_from_update and t.epochs * t.minibatches != 1:
            raise ValueError(
                f"the rollout left logp_old to the update, but trainer.epochs={t.epochs} x trainer.minibatches="
                f"{t.minibatches} optimizer steps use it: only the first runs at the sampling parameters"
            )
        mask = rollout.train_mask.clone()
        if lc.mask_zero_adv:  # before any normaliser is counted, so the count and the loss see the same units
            mask = loss_lib.mask_zero_advantages(mask, adv)
        if rollout.loss_weight is not None:
            row_w = row_w * rollout.loss_weight
        lr = lr_at(step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.policy.model.train()
        sums: dict[str, float] = {}
        count = skipped = 0
        for epoch in range(t.epochs):
            for rows in self.minibatch_rows(rollout, step, epoch):
                stats = self._minibatch(rollout, rows, adv, row_w, mask)
                if stats is None:  # skipped: a non-finite loss or gradient norm (its stats are not averaged in)
                    skipped += 1
                    continue
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        out = {k: v / max(count, 1) for k, v in sums.items()}
        out["lr"] = lr
        out["skipped/nonfinite"] = float(skipped)
        if getattr(self.sampler, "needs_policy_drift", False):  # SPO's KL-adaptive forgetting
            out["policy/kl_step"] = kl = self.policy_drift(rollout)
            self.sampler.observe_drift(step, kl)
        return out

    def policy_drift(self, rollout: Rollout) -> float:
        """The step's policy drift after the update: the mean over this step's trained units (all ranks) of the k3
        estimate exp(l) - 1 - l, l = logp_new - logp_old, of KL(π_sampling || π_updated) on the step's own samples.
        One no-grad forward of the rows (micro-batched as the update)."""
        if rollout.logp_old_from_update:
            raise ValueError("policy_drift needs the rollout's logp_old (Trainer.leaves_logp_old_to_update)")
        mask = rollout.train_mask
        total = count = 0.0
        self.policy.model.eval()
        self._reshard()
        with torch.no_grad():
            for rows, units in self.micro_blocks(torch.arange(rollout.num_rows), mask):
                if not len(units) and self.acc.num_processes == 1:  # with several, every process forwards: under
                    continue  # DDP the first forward after a backward broadcasts the buffers, a collective
                m = mask[rows][:, units]
                new = self.policy.log_prob(rollout, rows, units, **self._pairs(m)).logp.float().cpu()
                lr = new - rollout.logp_old[rows][:, units].float()
                total += float((torch.expm1(lr) - lr)[m].sum())
                count += float(m.sum())
        self._reshard()
        self.policy.model.train()
        both = torch.tensor([total, count], dtype=torch.float64, device=self.acc.device)
        if self.acc.num_processes > 1:
            both = self.acc.reduce(both, reduction="sum")
        return float(both[0] / both[1].clamp_min(1.0))

    def _skip_nonfinite(self, loss_ok: bool, grad_norm: float | None) -> bool:
        """True (and the gradients dropped, nothing stepped) when the minibatch's loss or gradient norm is not
        finite; ``trainer.max_nonfinite_steps`` such skips in a row stop the run before anything is saved."""
        bad = not loss_ok or (grad_norm is not None and not math.isfinite(grad_norm))
        if self.acc.num_processes > 1:  # ranks agree, so all of them skip the same optimizer steps
            flag = torch.tensor([float(bad)], device=self.acc.device)
            bad = bool(self.acc.reduce(flag, reduction="max").item())
        if not bad:
            self.nonfinite_in_a_row = 0
            return False
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        k, limit = self.nonfinite_in_a_row, self.cfg.trainer.max_nonfinite_steps
        what = "the loss" if not loss_ok else f"the gradient norm ({grad_norm})"
        if k >= limit:
            last = ckpt.latest_checkpoint(self.run_dir / "checkpoints")
            kept = f"the last checkpoint, {last}, is intact" if last else "no checkpoint had been written yet"
            then = f"continue with resume={self.run_dir}"
            if not last:
                then = "run again" if self.step == 0 else f"restart it from step 0 with resume={self.run_dir}"
            raise UserError(
                f"training stopped at step {self.step + 1}: {k} optimizer steps in a row were skipped because "
                f"{what} was not finite (trainer.max_nonfinite_steps={limit}); {kept} and nothing non-finite was "
                f"saved. Usual causes: a reward with huge values, trainer.lr={self.cfg.trainer.lr} too high, or a "
                f"policy/loss producing NaN; fix it and {then}"
            )
        warnings.warn(
            f"step {self.step + 1}: skipped an optimizer step because {what} is not finite (no update, gradients "
            f"dropped; {k} in a row, the run stops at trainer.max_nonfinite_steps={limit})",
            stacklevel=2,
        )
        return True

    def minibatch_rows(self, rollout: Rollout, step: int, epoch: int) -> list[torch.Tensor]:
        """Split rows into ``trainer.minibatches`` minibatches, each holding a slice of *every* group.

        Group b's G rows are permuted (seeded by its global index, step and epoch) and cut into M slices;
        minibatch j is slice j of every group. The split is thus the same whatever the number of ranks,
        so a 2-process run makes exactly the optimizer steps of the 1-process run.
        """
        t, sizes, offsets = self.cfg.trainer, rollout.sizes, rollout.group_offsets
        if min(sizes, default=t.minibatches) < t.minibatches:
            raise ValueError(f"minibatch_rows: a group of {min(sizes)} rows cannot be split into "
                             f"trainer.minibatches={t.minibatches} slices")  # fmt: skip
        first = self.acc.process_index * rollout.num_groups
        slices: list[list[torch.Tensor]] = [[] for _ in range(t.minibatches)]
        for b in range(rollout.num_groups):
            if t.shuffle:
                g = generator_for(prompt_seed(self.cfg.run.seed, step, first + b, stream=2 + epoch))
                perm = torch.randperm(sizes[b], generator=g)
            else:
                perm = torch.arange(sizes[b])
            for j, part in enumerate(torch.tensor_split(perm, t.minibatches)):
                slices[j].append(offsets[b] + part)
        return [torch.cat(s) for s in slices if sum(len(x) for x in s)]

    def _denominator(self, rows: torch.Tensor, mask: torch.Tensor) -> float:
        """The minibatch's loss normaliser over all ranks, divided by the world size (DDP averages grads); what it
        counts (units, rows) is the aggregation's."""
        local = self.aggregation.local_count(mask[rows])
        total = self.acc.reduce(local.float().to(self.acc.device), reduction="sum").item()
        return max(total, 1.0) / self.acc.num_processes

    def micro_rows(self, rows: torch.Tensor, mask: torch.Tensor) -> int:
        """Rows per micro-batch of the minibatch ``rows``: ``trainer.micro_batch_size`` (0 = all of them), or with
        ``auto`` the policy's ``micro_batch_rows(units, trainer.micro_batch_units)`` for the most ``units`` a row of
        this minibatch trains (a policy without that method: all rows)."""
        t = self.cfg.trainer
        micro = t.micro_batch_size
        if micro == "auto":
            choose = getattr(self.policy, "micro_batch_rows", None)
            units = int(mask[rows].sum(1).max()) if len(rows) else 0  # the most units a row trains
            micro = choose(units, t.micro_batch_units) if choose is not None else 0
        return min(int(micro), len(rows)) or len(rows)

    def _pairs(self, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``log_prob``'s ``pairs`` argument for a micro-batch's mask [n, k], where the policy forwards only the
        masked (row, unit) pairs (a diffusion policy's sde objective; rows then cost their own trained units)."""
        return {"pairs": mask} if getattr(self.policy, "scores_pairs", False) else {}

    def micro_batches(self, rows: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """``rows`` in micro-batches of :meth:`micro_rows` rows. With collective forwards (FSDP) every process makes
        as many as the process that needs the most (its rows split evenly), so all run the same forwards."""
        micro = self.micro_rows(rows, mask)
        mine = -(-len(rows) // micro)
        n = mine
        if self.collective:
            n = int(self.acc.reduce(torch.tensor([mine], device=self.acc.device), reduction="max").item())
        if n == mine:
            return [rows[i : i + micro] for i in range(0, len(rows), micro)]
        if len(rows) < n:
            raise ValueError(f"{len(rows)} rows cannot fill the {n} micro-batches another process makes")
        return list(torch.tensor_split(rows, n))

    def micro_blocks(self, rows: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The forwards of ``rows``: (micro-batch rows, the units they train) for each micro-batch of
        :meth:`micro_batches`. Under ``micro_batch_size: auto``, a micro-batch of one row whose trained units exceed
        the budget ``trainer.micro_batch_units`` is split into parts of its units (the policy's
        ``micro_batch_pieces``), where that is exact (:meth:`splits_units`): so the forwards stay within about the
        budget whatever T. With collective forwards every process then makes as many as the one that makes the most
        (its largest blocks halved)."""
        pieces = self.splits_units()
        blocks = []
        for r in self.micro_batches(rows, mask):
            units = mask[r].any(0).nonzero().reshape(-1)
            k = pieces(len(units), self.cfg.trainer.micro_batch_units) if pieces and len(r) == 1 else 1
            blocks += [(r, u) for u in torch.tensor_split(units, k)] if k > 1 else [(r, units)]
        if self.collective and pieces is not None:
            mine = torch.tensor([len(blocks)], device=self.acc.device)
            n = int(self.acc.reduce(mine, reduction="max").item())
            while len(blocks) < n:
                i = max(range(len(blocks)), key=lambda j: len(blocks[j][0]) * len(blocks[j][1]))
                r, u = blocks[i]
                if len(r) > 1:
                    halves = [(h, u) for h in torch.tensor_split(r, 2)]
                elif len(u) > 1:
                    halves = [(r, h) for h in torch.tensor_split(u, 2)]
                else:
                    raise ValueError(f"{len(rows)} rows cannot fill the {n} micro-batches another process makes")
                blocks[i : i + 1] = halves
        return blocks

    def splits_units(self) -> Callable[[int, int], int] | None:
        """The policy's ``micro_batch_pieces`` when a row's units may be split across micro-batches with the same
        loss and gradients: ``micro_batch_size: auto``, a policy that has it (diffusion), a loss whose unit values
        are the unit's own (:func:`mmgrpo.core.losses.unit_local`: grpo, pg, nft; not GSPO's sequence ratio), an
        aggregation that sums over units under the global normaliser (token_mean, constant; not seq_mean's per-row
        mean) and no method loss term that does not declare ``unit_local``. None otherwise."""
        lc = self.cfg.loss
        pieces = getattr(self.policy, "micro_batch_pieces", None)
        exact = (
            loss_lib.unit_local(lc.name)
            and loss_lib.unit_additive(self.aggregation)
            and all(getattr(term, "unit_local", False) for term in self.comp.loss_terms)
        )
        return pieces if self.cfg.trainer.micro_batch_size == "auto" and exact else None

    def _minibatch(self, rollout, rows, adv, row_w, mask) -> dict[str, float] | None:
        """One optimizer step over ``rows`` (micro-batched); None when it was skipped (non-finite loss or grads)."""
        t = self.cfg.trainer
        sums, loss_ok = self.accumulate_gradients(rollout, rows, adv, row_w, mask)
        if self.deepspeed:  # the engine clips and steps, or skips a non-finite step itself (mmgrpo.train.zero)
            skipped, grad_norm = zero.step(self.acc)
            if not loss_ok and not skipped:
                raise RuntimeError("DeepSpeed stepped on a non-finite loss: its gradients stayed finite (mmgrpo bug)")
            if t.max_grad_norm is not None and not skipped and grad_norm is not None:
                sums["grad_norm"] = grad_norm
            if self._skip_nonfinite(loss_ok, grad_norm if skipped else None):
                return None
            if self.ema is not None:
                self.ema.update()
            return sums
        grad_norm = None
        if t.max_grad_norm is not None:
            grad_norm = sums["grad_norm"] = float(self.acc.clip_grad_norm_(self.params, t.max_grad_norm))
        elif self.acc.scaler is None:  # one reduction and one device sync, not one per parameter
            grads = [p.grad.isfinite().all() for p in self.params if p.grad is not None]
            grad_norm = 0.0 if not grads or bool(torch.stack(grads).all()) else math.nan
        if self.acc.scaler is not None:  # fp16: the grad scaler skips an overflowed step and lowers its scale itself
            grad_norm = None
        if self._skip_nonfinite(loss_ok, grad_norm):
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return sums

    def accumulate_gradients(self, rollout, rows, adv, row_w, mask) -> tuple[dict[str, float], bool]:
        """The minibatch ``rows``' loss, backpropagated in micro-batches of :meth:`micro_rows` rows into the
        parameters' ``.grad`` (each micro-batch's loss uses the minibatch's global normaliser, so the accumulated
        gradient is the whole minibatch's); returns its metrics and whether every micro-batch's loss was finite."""
        lc = self.cfg.loss
        denom = self._denominator(rows, mask)
        all_rows = len(rows)
        rows = self.rows_with_gradient(rows, adv, mask)
        chunks = self.micro_blocks(rows, mask)  # as many on every process with collective backwards
        sums: dict[str, float] = {}
        loss_ok = True
        masked = float(mask[rows].sum())
        for i, (mrows, units) in enumerate(chunks):  # units [k]: those any row here trains (or a part of them)
            sync = contextlib.nullcontext() if i == len(chunks) - 1 else self.acc.no_sync(self.policy.model)
            with sync:
                m_block = mask[mrows][:, units]  # [n, k]: the (row, unit) pairs this micro-batch trains
                lp = self.policy.log_prob(rollout, mrows, units, **self._pairs(m_block))
                # one optimizer step: this forward runs at the sampling parameters, so it gives logp_old itself
                old = lp.logp.detach() if rollout.logp_old_from_update else rollout.logp_old[mrows][:, units]
                loss, m = loss_lib.policy_loss(
                    lp.logp, old, adv[mrows], m_block,
                    loss=lc.name, options=lc.options, aggregation=self.aggregation, beta=lc.beta, kl=lp.kl,
                    adv_clip=lc.adv_clip, row_weight=row_w[mrows], denom=denom, neg_logp=lp.neg_logp,
                    surrogate=self.surrogate,
                )  # fmt: skip
                x = TermInputs(lp, old, rollout, mrows, units, adv[mrows], m_block, self.step)
                loss = self._add_loss_terms(loss, m, x, row_w, denom)  # the methods' loss terms (KDRL, NFT)
                loss_ok = loss_ok and bool(torch.isfinite(loss.detach()).all())
                if self.deepspeed:  # the last micro-batch ends the engine's optimizer step
                    last = i == len(chunks) - 1
                    zero.backward(self.acc, zero.poison(self.acc, loss, loss_ok) if last else loss, boundary=last)
                else:  # from the accelerator's device (the loss meets logp_old on the host): fp16's gradient
                    # scaler keeps its scale where the first loss it scaled is
                    self.acc.backward(loss.to(self.acc.device))
            # the loss terms are each micro-batch's share of the minibatch's (global normaliser): they add up; the
            # per-unit means (ratio, clip fractions, advantage) are weighted by the micro-batch's masked units
            share = float(m_block.sum()) / masked if masked else len(mrows) / len(rows)
            for k, v in m.items():
                if k in SUMMED_METRICS or k in self.term_metrics:
                    sums[k] = sums.get(k, 0.0) + v
                elif masked and not share:
                    continue  # no masked unit in this micro-batch: its unit means are placeholders
                elif k == "loss/ratio_max":
                    sums[k] = max(sums.get(k, v), v)
                else:
                    sums[k] = sums.get(k, 0.0) + v * share
        sums["update/skipped_rows_frac"] = (all_rows - len(rows)) / all_rows  # zero-advantage rows left out
        if self.acc.num_processes > 1:
            sums = self._over_processes(sums, masked, all_rows, len(rows))
        return sums, loss_ok

    def _over_processes(self, sums: dict[str, float], masked: float, all_rows: int, kept: int) -> dict[str, float]:
        """A minibatch's metrics over every process's rows (:func:`combined_metrics`; they were the main process's
        own: loss/policy -2e-8 on 2 processes where 1 logged -0.0028). Every process calls this together (once a
        minibatch); ``all_gather_object`` carries only what the run's own processes send."""
        every: list[Any] = [None] * self.acc.num_processes
        torch.distributed.all_gather_object(every, (sums, masked, all_rows, kept))
        return combined_metrics(every, set(SUMMED_METRICS) | set(self.term_metrics))

    def _add_loss_terms(self, loss, m: dict[str, float], x: TermInputs, row_w, denom: float):
        """The methods' loss terms (``Components.loss_terms``) aggregated like the policy loss and added to it;
        each one's value is logged as ``loss/<name>`` and counted in ``loss/total``."""
        for term in self.comp.loss_terms:
            per_unit, tm = term(x)
            value = self.aggregation(per_unit, x.mask, row_w[x.rows], denom)
            loss = loss + value
            m[term_metric(term.name)] = value.item()
            m["loss/total"] += value.item()
            m.update(tm)
        return loss

    def rows_with_gradient(self, rows: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``rows`` without those whose gradient is exactly 0 (``trainer.skip_zero_advantage``): advantage 0 on every
        masked unit, under a loss that gives such a row zero gradient (``zero_adv_no_grad``), with loss.beta = 0 (no
        KL term), no method loss term (KDRL's, NFT's, SRPO's train zero-advantage rows too), in one process. At least
        one row stays, so every trained parameter gets its (zero) gradient and the optimizer step is the one it would
        have been."""
        lc = self.cfg.loss
        if not (
            self.cfg.trainer.skip_zero_advantage
            and lc.beta == 0
            and not self.comp.loss_terms
            and self.acc.num_processes == 1
            and loss_lib.zero_adv_no_grad(lc.name)
        ):
            return rows
        a = adv[rows]
        live = (a != 0) & mask[rows] if a.dim() == 2 else (a != 0)[:, None] & mask[rows]  # [n, K]
        keep = rows[live.any(-1)]
        return keep if len(keep) else rows[:1]


def combined_metrics(every: list[tuple[dict[str, float], float, int, int]], summed: set[str]) -> dict[str, float]:
    """The metrics one process holding every process's rows logs, from each process's (metrics, masked units, rows,
    rows trained) of a minibatch: a loss term (``summed``: each process's share of the loss under the global
    normaliser divided by the world size) is the processes' mean, a per-unit mean is weighted by each process's masked
    units, ``loss/ratio_max`` is the largest of the processes with masked units (one without holds a placeholder,
    1.0), and the skipped rows are counted over all rows."""
    out: dict[str, float] = {}
    for k in sorted({k for s, *_ in every for k in s} - {"update/skipped_rows_frac"}):
        have = [(s[k], m) for s, m, _, _ in every if k in s]
        if k in summed:  # a process without rows added 0
            out[k] = sum(v for v, _ in have) / len(every)
        elif k == "loss/ratio_max":
            out[k] = max([v for v, m in have if m] or [v for v, _ in have])
        else:
            weight = sum(m for _, m in have)
            out[k] = sum(v * m for v, m in have) / weight if weight else sum(v for v, _ in have) / len(have)
    rows, trained = sum(e[2] for e in every), sum(e[3] for e in every)
    out["update/skipped_rows_frac"] = (rows - trained) / rows if rows else 0.0
    return out
