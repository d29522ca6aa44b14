"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate: configuration checks, the optimizer step, full-state checkpoints.

The trainer keeps its own loop under DeepSpeed: a minibatch is backpropagated in the trainer's micro-batches, only
the last of them at DeepSpeed's gradient-accumulation boundary (``engine.set_gradient_accumulation_boundary``; the
config's ``gradient_accumulation_steps`` must be 1 or auto), and :func:`step` then runs the engine's optimizer step,
which reduces, clips (the config's ``gradient_clipping`` is ``trainer.max_grad_norm``) and steps. A non-finite
minibatch is skipped by the engine itself: a non-finite gradient is its overflow (switched on for every precision by
:func:`check_engine`), and a non-finite loss on any rank turns the boundary micro-batch's loss into NaN
(:func:`poison`), so its gradients, and with them the step, are dropped the same way on every rank.

Checkpoints never use DeepSpeed's own (pickled) files: :func:`full_state` gathers every trainable parameter's fp32
master weight and AdamW moments into full tensors (``deepspeed.utils.safe_get_full_fp32_param`` /
``safe_get_full_optimizer_state``, collectives over all ranks, one parameter at a time) in the layout of an unsharded
run's ``model`` and ``optimizer.state_dict()``, so the main process writes an ordinary verified safetensors
checkpoint that a 1-process run, an FSDP run or a DeepSpeed run of any size resumes; :func:`load_full_state` puts it
back (each rank keeps its partitions). The price is that the full fp32 state of one parameter at a time, and the
whole state on the main process, pass through CPU memory at each save.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any

import torch

from mmgrpo.core.errors import UserError


def engine(acc: Any) -> Any:
    """The DeepSpeedEngine accelerate prepared."""
    return acc.deepspeed_engine_wrapped.engine


def configure(acc: Any, cfg: Any) -> None:
    """Check and complete accelerate's DeepSpeed config before ``accelerate.prepare`` builds the engine."""
    ds = acc.state.deepspeed_plugin.deepspeed_config
    t = cfg.trainer
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (2, 3):
        raise UserError(
            f"DeepSpeed zero_optimization.stage={stage}: mmgrpo's trainer runs DeepSpeed with ZeRO stage 2 or 3 (the "
            "tested ones; its checkpoints read the partitioned optimizer state); set zero_stage in the accelerate "
            "config (configs/accelerate/deepspeed_zero2.yaml, deepspeed_zero3.yaml)"
        )
    gas = ds.get("gradient_accumulation_steps", "auto")
    if gas not in ("auto", 1):
        raise UserError(
            f"DeepSpeed gradient_accumulation_steps={gas}: mmgrpo accumulates gradients itself (trainer.minibatches "
            "optimizer steps per rollout, each in micro-batches of trainer.micro_batch_size rows) and tells the "
            "engine where each optimizer step ends; set gradient_accumulation_steps: 1 in the accelerate config"
        )
    ds["gradient_accumulation_steps"] = 1
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":  # only DeepSpeed's throughput log reads it
        ds["train_micro_batch_size_per_gpu"] = 1
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * acc.num_processes
    want = float(t.max_grad_norm or 0.0)
    clip = ds.get("gradient_clipping", "auto")
    if clip == "auto":
        ds["gradient_clipping"] = want
    elif float(clip) != want:
        raise UserError(
            f"trainer.max_grad_norm={t.max_grad_norm} in the config, but the DeepSpeed config clips at "
            f"gradient_clipping={clip} (DeepSpeed clips inside its optimizer step). Say it once: set "
            f"gradient_clipping: auto in the accelerate config to use trainer.max_grad_norm, or make them equal "
            "(DeepSpeed's 0 is trainer.max_grad_norm: null)"
        )
    if stage == 3 and t.ema_decay:
        raise UserError(
            f"trainer.ema_decay={t.ema_decay} with DeepSpeed ZeRO-3: ZeRO-3 partitions the parameters, so an average "
            "of them kept outside the engine sees only empty placeholders; use ZeRO-2 or FSDP "
            "(configs/accelerate/fsdp.yaml) with an EMA, or trainer.ema_decay: null"
        )


@contextmanager
def whole_models(acc: Any):
    """Models built inside load whole on every rank. accelerate registers its DeepSpeed config with transformers, which
    then builds every model under ZeRO-3 partitioned at construction (``deepspeed.zero.Init``); a frozen model that
    never becomes an engine (text encoders, reward and reference models) would then run on empty placeholders. The
    trained model is partitioned by the engine when ``accelerate.prepare`` builds it."""
    try:
        from transformers.integrations import unset_hf_deepspeed_config
    except ImportError:  # without transformers nothing reads the registration
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        acc.state.deepspeed_plugin.set_deepspeed_weakref()


def check_engine(acc: Any, policy: Any) -> None:
    """After ``accelerate.prepare``: refuse what the engine cannot run right, and make it skip non-finite gradients."""
    eng = engine(acc)
    if eng.fp16_enabled():
        raise UserError(
            "DeepSpeed fp16: its loss scaler skips overflowed steps while searching for a scale, which mmgrpo would "
            "count against trainer.max_nonfinite_steps; train in bf16 (--mixed_precision bf16) or float32"
        )
    if eng.zero_optimization_stage() == 3 and hasattr(policy, "training_state"):
        held = policy.training_state()
        if _has_tensor(held):
            raise UserError(
                "DeepSpeed ZeRO-3 partitions the parameters, but this policy keeps tensors of its own that follow "
                "them (e.g. the nft objective's sampling EMA, policy.options.objective.old_policy_ema, which the "
                "shapes text-to-image demo uses; policy.options.objective.old_policy_ema=0 turns it off); use ZeRO-2 "
                "or FSDP (configs/accelerate/fsdp.yaml)"
            )
    zopt = eng.optimizer
    if eng.zero_optimization_stage() < 3:
        # ZeRO-2 checks gradients for inf/NaN only in fp16 by default (ZeRO-3 skips on a non-finite norm in any dtype)
        if not hasattr(zopt, "check_grad_overflow"):
            raise UserError(f"this DeepSpeed version's ZeRO optimizer ({type(zopt).__name__}) cannot skip non-finite "
                            "gradients (no check_grad_overflow); install deepspeed>=0.19")  # fmt: skip
        zopt.check_grad_overflow = True


def _has_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, dict):
        return any(_has_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_tensor(v) for v in obj)
    return False


def poison(acc: Any, loss: torch.Tensor, loss_ok: bool) -> torch.Tensor:
    """The boundary micro-batch's loss, NaN when any rank's minibatch had a non-finite loss (all ranks agree): its
    gradients are then NaN, which the engine's overflow check drops (no step, gradients cleared) on every rank."""
    bad = torch.tensor([0.0 if loss_ok else 1.0], device=acc.device)
    if acc.num_processes > 1:
        bad = acc.reduce(bad, reduction="max")
    return loss * float("nan") if bool(bad.item()) else loss


def backward(acc: Any, loss: torch.Tensor, boundary: bool) -> None:
    """One micro-batch's backward; ``boundary``: the last of an optimizer step (the engine reduces its gradients)."""
    eng = engine(acc)
    eng.set_gradient_accumulation_boundary(boundary)
    eng.backward(loss.to(acc.device))  # on the accelerator's device, where the engine's loss scale is


def step(acc: Any) -> tuple[bool, float | None]:
    """The engine's optimizer step after a boundary backward: (whether it was skipped for a non-finite gradient, the
    global gradient norm before clipping, when the engine computed one)."""
    eng = engine(acc)
    eng.step()
    skipped = bool(getattr(eng.optimizer, "overflow", False))
    norm = eng.get_global_grad_norm()
    norm = None if norm is None else float(norm)
    if skipped:
        norm = math.inf if norm is None or math.isfinite(norm) else norm
    return skipped, norm


def full_state(
    acc: Any, named: list[tuple[str, torch.nn.Parameter]], keep: bool = True
) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """(``{name: full fp32 weight}``, AdamW ``state_dict()`` of full tensors, the names of the weights that are not
    finite) of the trainable parameters ``named`` (in the optimizer's order), gathered on every rank (collectives:
    every rank calls this alike). ``keep`` False (a rank that writes nothing): the collectives run and the weights
    are checked, but no tensor is copied to the host (the dicts come back empty), so the ranks of a node do not each
    hold the whole model and its moments in host memory."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    base = engine(acc).optimizer.optimizer  # the torch AdamW the engine steps on its flat partitions
    first = next(iter(base.state.values()), None)
    keys = [k for k in (first or {}) if k != "step"]
    model, state, nonfinite = {}, {}, []
    for i, (name, p) in enumerate(named):
        weight = safe_get_full_fp32_param(p).detach()
        if not bool(weight.isfinite().all()):
            nonfinite.append(name)
        moments = {k: safe_get_full_optimizer_state(p, k).detach() for k in keys} if first is not None else None
        if keep:
            model[name] = weight.cpu()
            if moments is not None:
                state[i] = {"step": first["step"].detach().clone().cpu(), **{k: v.cpu() for k, v in moments.items()}}
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    if any(h != hyper[0] for h in hyper):
        raise UserError("DeepSpeed holds parameter groups with different optimizer settings; mmgrpo makes one")
    return model, {"state": state, "param_groups": [{**hyper[0], "params": list(range(len(named)))}]}, nonfinite


def load_full_state(acc: Any, params: list[torch.nn.Parameter], weights: list[torch.Tensor], optimizer: dict) -> None:
    """Put full weights [one per trainable parameter, optimizer order] and an AdamW ``state_dict()`` of full tensors
    (as :func:`full_state` or an unsharded run writes them) into the engine; every rank calls this with the same
    tensors and keeps its partitions (the fp32 master weights and moments, and the module's working weights)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    eng = engine(acc)
    zopt, stage = eng.optimizer, eng.zero_optimization_stage()
    for p, w in zip(params, weights):
        if stage == 3:  # the working weight is partitioned: gather, overwrite, re-partition
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                if acc.process_index == 0:
                    p.data.copy_(w.to(p.device, p.dtype))
        else:
            with torch.no_grad():
                p.data.copy_(w.to(p.device, p.dtype))
        safe_set_full_fp32_param(p, w.to(torch.float32))
    states = optimizer.get("state") or {}
    if not states:
        return
    base = zopt.optimizer
    first = states[min(states)]
    keys = [k for k in first if k != "step"]
    # AdamW's state of each flat fp32 partition (empty in a fresh engine), filled below; ZeRO-3 hands its flat
    # partitions to the optimizer's parameter groups only during the step
    flats = zopt.fp32_partitioned_groups_flat if stage == 3 else [f for g in base.param_groups for f in g["params"]]
    for flat in flats:
        base.state[flat] = {"step": first["step"].clone(), **{k: torch.zeros_like(flat) for k in keys}}
    if hasattr(zopt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: link each parameter to its fragments
        zopt._hp_optimizer_states_linked = False
        zopt._lazy_init_hp_params_optimizer_state()
    for i, p in enumerate(params):
        for k in keys:
            safe_set_full_optimizer_state(p, states[i][k].to(torch.float32), k)
