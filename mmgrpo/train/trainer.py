"""The group-relative training loop: four named phases, each replaceable alone (docs/architecture.md).

    for step in range(max_steps):
        batch, rollout, rewards = collect(step)       # 1 sample + 2 score   (no grad; DAPO refill lives here)
        adv, weights = advantage(rewards, rollout)    # 3 advantage          (gathered over ranks)
        update(rollout, adv, weights, step)           # 4 update             (grad; epochs x minibatches x micro)

Randomness is derived from (run seed, step, global position), never from a stateful RNG, so a resumed
run replays exactly and a 2-process run samples exactly what the 1-process run samples.

Around the loop: phases 1-2 (sample and score) are :mod:`mmgrpo.train.collect`, the update's machinery is
:mod:`mmgrpo.train.update`, what a checkpoint holds
:mod:`mmgrpo.train.trainer_state`, and :func:`train` (a run directory prepared, resumed, cleaned up after a failure)
:mod:`mmgrpo.train.run`.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from mmgrpo.core import advantages as adv_lib
from mmgrpo.core import losses as loss_lib
from mmgrpo.core import progress
from mmgrpo.core.ema import EMA
from mmgrpo.core.errors import UserError, add_note, first_line
from mmgrpo.core.extra import term_metric
from mmgrpo.core.sampling import SamplerContext, make_sampler
from mmgrpo.core.types import (
    Rollout,
    offsets_of,
    pad_groups,
    unpad_groups,
)
from mmgrpo.methods.registry import enabled_methods
from mmgrpo.train import trainer_state, zero
from mmgrpo.train.accelerator import check_fp16_params, make_accelerator, optimizer_kernel
from mmgrpo.train.collect import CollectPhase
from mmgrpo.train.components import PIPELINES, Components, build_components
from mmgrpo.train.config import Config
from mmgrpo.train.config_checks import row_weights_refusal
from mmgrpo.train.media import save_completions, save_samples, video_fps
from mmgrpo.train.report import (
    REPORT_EVERY_S,
    before_after,
    load_first_eval,
    metrics_line,
    save_first_eval,
    write_report,
)
from mmgrpo.train.run import run_training
from mmgrpo.train.run_dir import prepare_run_dir  # noqa: F401  (also how tests build a run directory)
from mmgrpo.train.scoring import build_rewards, reward_metrics, uninformative_groups
from mmgrpo.train.signals import Interrupted, stop_on_signals
from mmgrpo.train.tracking import (
    check_trackers_installed,
    end_trackers,
    log_evaluation,
    log_scalars,
    start_trackers,
)
from mmgrpo.train.update import SUMMED_METRICS, UpdatePhase, lr_at  # noqa: F401  (their home was this module)


class Trainer(CollectPhase, UpdatePhase):
    """The loop of one run: phase 3 and the outer loop here, phases 1-2 (collect) inherited from
    :class:`~mmgrpo.train.collect.CollectPhase`, phase 4 (the update) from :class:`~mmgrpo.train.update.UpdatePhase`,
    checkpoints in :mod:`mmgrpo.train.trainer_state`."""

    def __init__(self, cfg: Config, run_dir: str | Path, accelerator: Accelerator | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.acc = accelerator or make_accelerator(cfg.trainer.mixed_precision)
        t = cfg.trainer
        self.deepspeed = self.acc.distributed_type == "DEEPSPEED"
        """DeepSpeed ZeRO through accelerate: the engine steps, clips and skips (:mod:`mmgrpo.train.zero`)"""
        if self.deepspeed:
            zero.configure(self.acc, cfg)
        check_trackers_installed(t.log_with)  # before any model is built
        if t.prompts_per_step % self.acc.num_processes:
            raise UserError(
                f"trainer.prompts_per_step={t.prompts_per_step} must divide by the {self.acc.num_processes} "
                "processes; change it or the number of processes"
            )
        self.B_local = t.prompts_per_step // self.acc.num_processes
        PIPELINES.load()
        torch.manual_seed(cfg.run.seed)
        with zero.whole_models(self.acc) if self.deepspeed else contextlib.nullcontext():
            self.comp: Components = build_components(cfg, self.acc)  # the recipe + the methods: block's parts
        self.comp.run_dir = self.run_dir
        self.policy = self.comp.policy
        self.rewards = build_rewards(cfg.rewards)
        pool = self.comp.prompt_count
        ctx = SamplerContext(t.prompts_per_step, t.group_size, cfg.run.seed, pool=pool, minibatches=t.minibatches)
        self.sampler = make_sampler(cfg.sampler, ctx)
        """which prompts each step trains on and how many rollouts each gets (``sampler:``; uniform by default)"""
        self.estimator = adv_lib.get_estimator(cfg.advantage.estimator)
        self.aggregation = loss_lib.make_aggregation(cfg.loss.aggregation.name, cfg.loss.aggregation.options)
        self.params = self.policy.trainable_parameters()
        if not self.params:
            raise UserError(f"pipeline {cfg.pipeline!r}: the policy has no trainable parameters")
        check_fp16_params(self.acc, self.params)
        opt = torch.optim.AdamW(
            self.params,
            lr=t.lr,
            betas=tuple(t.adam_betas),
            eps=t.adam_eps,
            weight_decay=t.weight_decay,
            **optimizer_kernel(self.params, self.acc.distributed_type),
        )
        self.policy.model, self.optimizer = self.acc.prepare(self.policy.model, opt)
        if hasattr(self.policy, "forward_context"):  # the policy's other forwards (a frozen reference) autocast alike
            self.policy.forward_context = self.acc.autocast
        self.zero_stage = zero.engine(self.acc).zero_optimization_stage() if self.deepspeed else 0
        """DeepSpeed's ZeRO stage (0 without DeepSpeed); under ZeRO-3, as under FSDP, every forward is a collective"""
        if self.deepspeed:
            zero.check_engine(self.acc, self.policy)
        # FSDP2 replaces the parameters by sharded ones (DTensors; the optimizer is switched to them by accelerate),
        # and a policy holding copies of them (the nft objective's sampling EMA) makes them again
        before, self.params = self.params, self.policy.trainable_parameters()
        if [id(p) for p in self.params] != [id(p) for p in before] and hasattr(self.policy, "parameters_replaced"):
            self.policy.parameters_replaced()
        self.mesh = next((p.device_mesh for p in self.params if isinstance(p, DTensor)), None)
        """the device mesh the trainable parameters are sharded over (FSDP2), else None: checkpoints are sharded"""
        self.collective = (self.mesh is not None or self.zero_stage >= 2) and self.acc.num_processes > 1
        """every forward of the model is a collective (FSDP2 gathers each shard unit, as DeepSpeed ZeRO-3 does; under
        ZeRO-2 every backward is): all processes must run the same forwards and backwards, so loops whose length
        depends on local data agree over the processes"""
        self.check_local_forwards((self.mesh is not None or self.zero_stage >= 3) and self.acc.num_processes > 1)
        if self.acc.num_processes > 1 and hasattr(self.policy, "all_values"):  # e.g. the VLM's completion metrics
            self.policy.all_values = self.all_values
        if self.collective and hasattr(self.policy, "any_process"):  # e.g. the VLM's decode loop
            self.policy.any_process = self.any_process
            if hasattr(self.policy, "process_max"):  # e.g. the VLM's check that the processes' media agree
                self.policy.process_max = self.process_max
        self.ema = EMA(self.params, t.ema_decay, warmup=t.ema_warmup, every=t.ema_every) if t.ema_decay else None
        self.surrogate = not any(getattr(x, "replaces_surrogate", False) for x in self.comp.loss_terms)
        """False when a method's loss term is the whole policy objective (token-level NFT)"""
        self.term_metrics = {term_metric(x.name) for x in self.comp.loss_terms}
        self.step = 0
        self.nonfinite_in_a_row = 0  # optimizer steps skipped in a row for a non-finite loss or gradient norm
        self.doing = ""
        """what the loop is doing, for a message of an error raised in it (``in step 3``, ``in the evaluation of
        step 40``; :func:`mmgrpo.train.run.how_to_continue`)"""
        self.first_eval: tuple[int, torch.Tensor, list[str], dict[str, float]] | None = None
        """(step, images, captions, metrics) of this process's first evaluation with images (main process only):
        the "before" of ``samples/before_after.png``"""
        self.report_state: tuple[float, tuple[int, int]] | None = None
        """(when, :meth:`_logged` then) report.html was last written by this process (:meth:`report`)"""

    # ---------------------------------------------------------------- processes
    def any_process(self, flag: bool) -> bool:
        """Whether ``flag`` is True on any process (every process calls this together)."""
        if self.acc.num_processes == 1:
            return flag
        return bool(self.acc.reduce(torch.tensor([float(flag)], device=self.acc.device), reduction="max").item())

    def all_values(self, values: list[float]) -> list[list[float]]:
        """Every process's ``values`` (as many on each), in process order (every process calls this together)."""
        got = self.acc.gather(torch.tensor(values, dtype=torch.float64, device=self.acc.device)).cpu()
        return got.view(self.acc.num_processes, len(values)).tolist()

    def process_max(self, values: list[int]) -> list[int]:
        """The element-wise maximum of the integers ``values`` over the processes (every process calls this
        together, with as many values)."""
        if self.acc.num_processes == 1:
            return list(values)
        t = self.acc.reduce(torch.tensor(values, dtype=torch.long, device=self.acc.device), reduction="max")
        return [int(x) for x in t.tolist()]

    def _reshard(self) -> None:
        """FSDP2 keeps the root unit's gathered (full) parameters after a forward that no backward follows (rollouts,
        evaluation), and a later forward uses that copy; weights swapped into or out of the shards meanwhile (the
        nft sampling policy's EMA, the evaluation EMA) would be missed. Free it, so the next forward gathers the
        shards as they are."""
        if self.mesh is not None:
            for m in self.policy.model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()

    def check_local_forwards(self, collective_forwards: bool) -> None:
        """Refuse, where every forward is a collective (FSDP2, DeepSpeed ZeRO-3 on several processes), a method whose
        forwards depend on this process's rows alone (``Method.local_forwards``): the processes would wait on each
        other forever."""
        if not collective_forwards:
            return
        for method, _ in enabled_methods(self.cfg):
            if method.local_forwards:
                raise UserError(
                    f"methods.{method.name} cannot train sharded over {self.acc.num_processes} processes (FSDP, or "
                    f"DeepSpeed ZeRO-3: every forward of the model is a collective, which all processes must run "
                    f"together): {method.local_forwards}, so the processes would wait on each other forever. Train it "
                    "with DDP (accelerate launch without an FSDP / ZeRO-3 config), DeepSpeed ZeRO-2, or one process"
                )

    # ---------------------------------------------------------------- phase 3: advantage
    def advantage(self, cols: torch.Tensor, rollout: Rollout, step: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Advantages [N_local] and loss weights [N_local] from all ranks' rewards (exact batch statistics).

        ``cols [V, R, N_local]``: R reward columns for V versions of the samples (V > 1 only for G2RPO's
        multi-granularity continuations); each version is normalised on its own and the advantages summed.

        Ragged groups (``rollout.group_sizes``): every rank's rows are gathered (ranks may hold different row counts),
        each group is padded to G_max with NaN rewards (which every built-in estimator leaves out of its statistics,
        advantage 0) and the padding is dropped again after the estimator.
        """
        a = self.cfg.advantage
        V, R, _ = cols.shape
        counts = self._gather_counts(rollout.num_rows)  # [P] rows of each rank
        sizes = self._gather_sizes(rollout)  # [B_total] rows of each group, over all ranks
        all_cols = self._gather_rows(cols.permute(2, 0, 1).contiguous(), counts).permute(1, 2, 0)  # [V, R, N_total]
        shaped = adv_lib.get_shaping(a.shaping)(all_cols, **a.shaping_options)
        opts = dict(a.options)
        if rollout.group_keys is not None and "keys" in inspect.signature(self.estimator).parameters:
            keys = torch.tensor(rollout.group_keys, dtype=torch.long)
            opts["keys"] = pad_groups(self._gather_rows(keys, counts), sizes, fill=-1)  # [B, G_max]
        group_pos: list[int] = []
        if self.sampler.stateful:  # the stream position of every group of the step, over all ranks
            rows = self._gather_rows(rollout.extras["stream_position"], counts)  # [N_total]
            group_pos = rows[torch.tensor(offsets_of(sizes)[:-1], dtype=torch.long)].tolist()  # [B_total]
        totals = pad_groups(self.weighted(shaped[0]), sizes)  # [B_total, G_max] weighted rewards, NaN padding
        if self.sampler.provides:  # per-prompt estimator inputs (SPO's baseline), [B_total, 1] each
            declared = inspect.signature(self.estimator).parameters
            opts.update({k: v for k, v in self.sampler.estimator_inputs(group_pos, totals).items() if k in declared})
        weights_t = torch.tensor([wt for _, wt, _ in self.rewards], dtype=torch.float32)
        kinds = [spec.kind for spec in self.cfg.rewards]  # outcome / process stream of each reward column
        weight_metrics: dict[str, float] = {}
        for weighter in self.comp.reward_weighters:  # stateful reward weights (dynamic weighting), global rewards
            weights_t, m = weighter(weights_t, shaped, kinds, step)
            weight_metrics.update(m)
        adv_p = sum(
            adv_lib.combine(
                a.combine, pad_groups(shaped[v], sizes), weights_t, a.estimator, opts, kinds, a.combine_options
            )
            for v in range(V)
        )  # [B_total, G_max]
        if a.min_advantage is not None:
            adv_p = adv_p.clamp(min=a.min_advantage)
        adv = unpad_groups(adv_p, sizes)  # [N_total]
        row_w = unpad_groups(self.row_weights(pad_groups(shaped[0], sizes), weights_t, kinds, opts), sizes)  # [N]
        zero = uninformative_groups(all_cols[0], self.rewards, sizes, a.combine, kinds, a.combine_options, weights_t)
        if self.cfg.trainer.dump_advantages and self.acc.is_main_process:
            (self.run_dir / "debug").mkdir(parents=True, exist_ok=True)
            dump = {"advantages": adv_p.contiguous(), "rewards": all_cols.contiguous(),
                    "group_sizes": torch.tensor(sizes, dtype=torch.long)}  # fmt: skip
            save_file(dump, str(self.run_dir / "debug" / f"adv_step_{step:06d}.safetensors"))
        lo = sum(counts[: self.acc.process_index])
        mine = slice(lo, lo + rollout.num_rows)
        metrics = {
            **reward_metrics(all_cols[0][:, self._sampled_rows(rollout, counts)], self.rewards),
            "adv/mean": adv.mean().item(),
            "adv/abs_mean": adv.abs().mean().item(),
            "adv/zero_variance_groups": float(zero.sum().item()),
        }
        metrics.update(weight_metrics)
        if self.sampler.stateful:  # after the estimator: the baseline it used is the one before this step
            metrics.update(self.sampler.observe(step, group_pos, totals))
        for v in range(1, V):
            metrics[f"reward/variant{v}_mean"] = self.weighted(all_cols[v]).mean().item()
        adv_local = pad_groups(adv[mine], rollout.sizes, fill=0.0)  # [B_local, G_max]
        out = self.after_hooks(adv_local, rollout, cols, kinds, weights_t, metrics)
        return out, row_w[mine].float(), metrics

    def after_hooks(self, adv_local, rollout: Rollout, cols, kinds: list[str], weights, metrics: dict) -> torch.Tensor:
        """This process's advantages [N_local] after the methods' hooks (docs/architecture.md "Hooks"), run on its
        groups ``adv_local [B_local, G_max]``; their metrics, and adv/* of what the loss uses (PEARL's gate zeroed
        every advantage while adv/abs_mean still showed the estimator's 0.19-0.43, over every process's rows), go
        into ``metrics``."""
        names = [name for name, _, _ in self.rewards]
        for hook in self.comp.advantage_hooks:
            if rollout.ragged and not getattr(hook, "ragged_ok", False):
                raise UserError(
                    f"advantage hook {getattr(hook, '__qualname__', type(hook).__name__)} reads groups of equal size, "
                    f"but this step's groups have sizes {rollout.group_sizes[:8]}... (a prompt sampler varies the "
                    "rollouts per prompt); use a sampler with a fixed group size with this method"
                )
            params = inspect.signature(hook).parameters  # inputs a hook may declare: reward streams and weights
            extra = {k: v for k, v in {"kinds": kinds, "weights": weights}.items() if k in params}
            adv_local, m = hook(adv_local, rollout, cols, names, **extra)
            metrics.update(m)
        out = unpad_groups(adv_local, rollout.sizes)
        if not self.comp.advantage_hooks:
            return out
        if self.acc.num_processes == 1:  # as before the hooks (a hook that changes nothing changes no metric)
            metrics["adv/mean"], metrics["adv/abs_mean"] = out.mean().item(), out.abs().mean().item()
        else:
            every = self.all_values([float(out.sum()), float(out.abs().sum()), float(out.numel())])
            total, absolute, n = (sum(x[i] for x in every) for i in range(3))
            metrics["adv/mean"], metrics["adv/abs_mean"] = total / max(n, 1.0), absolute / max(n, 1.0)
        return out

    def row_weights(self, cols: torch.Tensor, weights: torch.Tensor, kinds: list[str], opts: dict) -> torch.Tensor:
        """The estimator's per-row loss weights [B, G] from reward columns ``cols [R, B, G]``, read from the total
        the combiner hands the estimator, with this step's reward weights and gates (MC-GRPO's pivot is the median
        row of that total, whose advantage is 0; it was the median of the configured weights' sum, another row under
        dynamic reward weights or Posterior-GRPO's gate). Rows no reward applies to are NaN there, as for the
        estimator; ``opts`` are the estimator's options and inputs."""
        a = self.cfg.advantage
        if not adv_lib.has_row_weights(a.estimator):  # every row weighs 1: nothing to read
            return torch.ones(cols.shape[1:], dtype=torch.float32)
        total = adv_lib.row_weight_total(a.combine, cols, weights, kinds, a.combine_options)
        if total is None and a.combine == "normalize_then_sum":  # refused at load; weights of 0 set by a method since
            raise UserError(row_weights_refusal(a.estimator, a.combine, int((weights != 0).sum())))
        if total is None:  # a plug-in combiner that declares no ``total``: the applicable weighted sum, as before
            total = adv_lib.summed(cols, weights)
        return adv_lib.get_row_weights(a.estimator)(total, **opts)

    def _sampled_rows(self, rollout: Rollout, counts: list[int]) -> slice | torch.Tensor:
        """The rows of all processes [N_total] the policy sampled: the reward metrics leave out teacher-forced
        off-policy rows (``offpolicy_mask``: TempSamp's ground truth, always right, made reward/accuracy 0.5 where the
        policy's own rows scored 0.33). Every process calls this together when several train."""
        off = rollout.extras.get("offpolicy_mask")
        if off is None and self.acc.num_processes == 1:
            return slice(None)
        local = torch.zeros(rollout.num_rows, dtype=torch.long) if off is None else off.long().cpu()
        every = self._gather_rows(local, counts).bool() if self.acc.num_processes > 1 else local.bool()
        return ~every if bool(every.any()) and not bool(every.all()) else slice(None)

    def _gather_counts(self, n: int) -> list[int]:
        """[P] this step's row count of every rank (ranks differ when groups are ragged)."""
        if self.acc.num_processes == 1:
            return [n]
        return [int(c) for c in self.acc.gather(torch.tensor([n], device=self.acc.device)).cpu()]

    def _gather_rows(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """``x [n_local, ...]`` of every rank, stacked in rank order: ``[N_total, ...]`` on the CPU. Ranks with fewer
        rows pad to the largest count for the collective, and the padding is dropped."""
        if self.acc.num_processes == 1:
            return x.cpu()
        most = max(counts)
        pad = x.new_zeros((most - x.shape[0], *x.shape[1:]))
        got = self.acc.gather(torch.cat([x, pad]).to(self.acc.device)).cpu()  # [P * most, ...]
        return torch.cat([got[r * most : r * most + c] for r, c in enumerate(counts)])

    def _gather_sizes(self, rollout: Rollout) -> list[int]:
        """[B_total] rows of every group over all ranks, in rank order (every rank holds B_local groups)."""
        if self.acc.num_processes == 1:
            return rollout.sizes
        return [int(s) for s in self.acc.gather(torch.tensor(rollout.sizes, device=self.acc.device)).cpu()]

    # ---------------------------------------------------------------- outer loop
    def train(self) -> dict[str, Any]:
        """The loop, stopping cleanly on SIGINT/SIGTERM: the step finishes, a checkpoint is written, and
        :class:`~mmgrpo.train.signals.Interrupted` says which ``resume=`` continues the run."""
        with stop_on_signals() as flag:
            start_trackers(self.acc, self.cfg, self.run_dir, self.step)
            try:
                last = self._train(flag)
                self.doing = f"while closing the trackers after step {self.step}"
            except BaseException as error:  # a crashed run's report shows what it logged (evaluations it skipped too)
                try:
                    self.report(every_s=0.0)
                except Exception as also:  # the run's own error is the one to report
                    add_note(error, f"report.html is behind metrics.jsonl: writing it failed too ({first_line(also)})")
                raise
            finally:
                end_trackers(self.acc)
        self.doing = f"while writing report.html after step {self.step}"
        self.report(every_s=0.0, final=True)
        self.doing = ""
        return last

    def _logged(self) -> tuple[int, int]:
        """(size of metrics.jsonl, files under samples/): what report.html shows, grown or not."""
        path, samples = self.run_dir / "metrics.jsonl", self.run_dir / "samples"
        return (path.stat().st_size if path.exists() else 0, len(os.listdir(samples)) if samples.is_dir() else 0)

    def report_behind(self) -> bool:
        """Whether metrics.jsonl or samples/ hold what report.html does not show (main process; False elsewhere, and
        before anything was logged)."""
        logged = self._logged() if self.acc.is_main_process else (0, 0)
        return logged != (self.report_state[1] if self.report_state is not None else (0, 0))

    def report(self, every_s: float | None = None, final: bool = False) -> None:
        """(Re)write report.html (main process) when the run logged what it does not show and ``every_s``
        seconds (default :data:`~mmgrpo.train.report.REPORT_EVERY_S`) passed since this process last wrote it:
        drawing its figures takes 0.3-0.8 s, which a short run's evaluations, seconds apart, spent again and again.
        The end of a run and a stop on a signal (``final``) write it whatever the time, also when nothing was
        logged; a crash brings it up to date (``every_s=0``)."""
        if not self.acc.is_main_process or not (self.report_behind() or (final and self.report_state is None)):
            return
        every_s = REPORT_EVERY_S if every_s is None else every_s
        if self.report_state is not None and time.monotonic() - self.report_state[0] < every_s:
            return
        write_report(self.run_dir)
        self.report_state = (time.monotonic(), self._logged())

    def _stop_requested(self, flag: Any, over_budget: bool = False) -> tuple[int, bool]:
        """(the signal any rank caught, whether any rank is over the time budget): ranks agree, so all of them
        evaluate, checkpoint and stop at the same step."""
        if self.acc.num_processes == 1:
            return flag.signum, over_budget
        got = torch.tensor([flag.signum, int(over_budget)], device=self.acc.device)
        signum, over = self.acc.reduce(got, reduction="max").tolist()
        return int(signum), bool(over)

    def _train(self, flag: Any) -> dict[str, Any]:
        t = self.cfg.trainer
        clock = time.process_time if t.time_budget_clock == "process" else time.perf_counter
        start_time, done_here, last = clock(), 0, {}
        if self.step == 0 and t.eval_every:
            self.evaluate(0)
        bar = self._progress()
        try:
            while self.step < t.max_steps:
                step, t0 = self.step, time.perf_counter()
                self.doing = f"in step {step + 1}"
                rollout, cols, metrics = self.collect(step)
                if hasattr(self.policy, "rollout_metrics"):  # e.g. the VLM's completion lengths and truncation rate
                    metrics.update(self.policy.rollout_metrics(rollout))
                adv, row_w, m_adv = self.advantage(cols, rollout, step)
                t1 = time.perf_counter()
                m_upd = self.update(rollout, adv, row_w, step)
                self.step = step + 1
                metrics.update(m_adv, **m_upd)
                for extra in self.comp.extra_models:  # teachers, probes: extra/<name>/mib, extra/<name>/time_s
                    metrics.update(extra.metrics())
                metrics["time/update_s"] = time.perf_counter() - t1
                metrics["time/step_s"] = time.perf_counter() - t0
                last = metrics
                if t.log_every and self.step % t.log_every == 0:
                    self.log(self.step, metrics)
                self._maybe_save_samples(rollout)
                if bar is not None:
                    if t.time_budget_s is not None:  # the bar counts the budget's seconds; the step is in the postfix
                        bar.update(min(clock() - start_time, bar.total) - bar.n)
                        bar.set_postfix(step=self.step, reward=f"{metrics['reward/mean']:.3f}",
                                        s_per_step=f"{metrics['time/step_s']:.2f}")  # fmt: skip
                    else:
                        bar.update(1)
                        bar.set_postfix(
                            reward=f"{metrics['reward/mean']:.3f}", s_per_step=f"{metrics['time/step_s']:.2f}"
                        )
                done_here += 1
                signum, over = self._stop_requested(
                    flag, t.time_budget_s is not None and clock() - start_time >= t.time_budget_s
                )
                stop = (t.stop_after_steps is not None and done_here >= t.stop_after_steps) or over
                if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.max_steps or stop):
                    self.evaluate(self.step)
                if (
                    signum
                    or stop
                    or self.step == t.max_steps
                    or (t.checkpoint_every and self.step % t.checkpoint_every == 0)
                ):
                    self.doing = f"while writing the checkpoint of step {self.step}"
                    self.save()
                if signum and self.step < t.max_steps:  # at the last step the run is done: it ends as finished
                    self.report(every_s=0.0, final=True)
                    raise Interrupted(signum, self.run_dir, self.step)
                if stop:
                    break
        finally:  # an error's paragraph then starts on a line of its own, and no bar is drawn after it
            if bar is not None:
                bar.close()
        return last

    def _progress(self):
        if not (self.cfg.trainer.progress and self.acc.is_main_process):
            return None
        from tqdm.auto import tqdm

        t = self.cfg.trainer
        if t.time_budget_s is not None:  # the budget ends the run: its seconds are what the bar can predict
            fmt = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of the time budget "
            fmt += "[{elapsed}<{remaining}{postfix}]"
            return tqdm(total=float(t.time_budget_s), desc=self.cfg.run.name, unit="s", bar_format=fmt)
        return tqdm(total=t.max_steps, initial=self.step, desc=self.cfg.run.name, unit="step")

    def _maybe_save_samples(self, rollout: Rollout) -> None:
        every = self.cfg.trainer.sample_every
        if not (every and self.step % every == 0 and self.acc.is_main_process and self.comp.sample_images):
            return
        images = self.comp.sample_images(rollout.samples)
        if images is not None:
            path = self.run_dir / "samples" / f"train_step_{self.step:06d}.png"
            save_samples(images, path, ncol=self.cfg.trainer.group_size, fps=video_fps(self.policy))

    def evaluate(self, step: int) -> dict[str, float]:
        if self.comp.evaluate is None:
            return {}
        self.policy.model.eval()
        self._reshard()
        self.doing = f"in the evaluation of step {step}"
        label = f"{self.cfg.run.name} eval, step {step}"
        bars = progress.shown(label if self.cfg.trainer.progress and self.acc.is_main_process else None)
        with self.ema.swapped() if self.ema is not None else contextlib.nullcontext(), torch.no_grad(), bars:
            result = self.comp.evaluate(self.policy, step)
            self._reshard()  # before the EMA is swapped out
        self._reshard()
        metrics = {f"eval/{k}": v for k, v in result.metrics.items()}
        self.log(step, metrics)
        if result.records and self.acc.is_main_process:
            save_completions(result.records, self.run_dir / "samples" / f"completions_step_{step:06d}.jsonl")
        if result.images is not None and self.acc.is_main_process:
            save_samples(result.images, self.run_dir / "samples" / f"step_{step:06d}.png", fps=video_fps(self.policy))
            images = result.images[:, 0] if result.images.dim() == 5 else result.images  # videos: first frame
            images = images.detach().float().cpu()
            if self.first_eval is None:  # a resumed run compares against the run's first evaluation, kept on disk
                self.first_eval = load_first_eval(self.run_dir / "samples")
            if self.first_eval is None:
                self.first_eval = (step, images.clone(), list(result.captions), dict(result.metrics))
                save_first_eval(self.run_dir / "samples", *self.first_eval)
            elif self.first_eval[1].shape == images.shape and step != self.first_eval[0]:
                step0, before, captions0, metrics0 = self.first_eval
                before_after(
                    before,
                    images,
                    list(result.captions) or captions0,
                    self.run_dir / "samples" / "before_after.png",
                    before_label=f"before (step {step0})",
                    after_label=f"after (step {step})",
                    before_metrics=metrics0,
                    after_metrics=result.metrics,
                )
        if self.acc.is_main_process:
            # sample grid / video, completion table
            log_evaluation(self.acc, step, result.images, result.records, fps=video_fps(self.policy))
            self.report()  # at most every REPORT_EVERY_S seconds; a crash later brings it up to date
        return metrics

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.acc.is_main_process:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(metrics_line(step, metrics) + "\n")
        log_scalars(self.acc, step, metrics)

    # ---------------------------------------------------------------- checkpoints (mmgrpo.train.trainer_state)
    def state_dict(self) -> dict[str, Any]:
        """The run's whole state; under DeepSpeed gathered into full tensors (every rank calls this alike)."""
        return trainer_state.state_dict(self)

    def save(self) -> Path | None:
        """Write the checkpoint of this step (every rank calls this together); the main process gets its path."""
        return trainer_state.save(self)

    def load(self, path: str | Path) -> None:
        """Continue from the checkpoint ``path`` (every rank calls this together)."""
        trainer_state.load(self, path)


def train(cfg: Config, accelerator: Accelerator | None = None) -> Trainer:
    """Run (or resume) training for ``cfg``; returns the finished trainer (:func:`mmgrpo.train.run.run_training`:
    the run directory, resume, and what a failure leaves).

    The run uses, and its ``config.yaml`` stores, :func:`~mmgrpo.train.config.resolved_config` of ``cfg``: every
    option written out and relative paths made absolute, so the run directory works from any directory."""
    return run_training(cfg, Trainer, accelerator)
