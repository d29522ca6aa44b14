"""What a run's checkpoint holds, and how the trainer writes and reads it: the trained weights, the optimizer, the
EMA, fp16's gradient scaler, and every stateful part (rewards, reward weighters, methods, the prompt sampler, the
policy's own training state), so a resumed run continues exactly (docs/architecture.md "Run directory").

The file format (atomic, verified, sharded or whole) is :mod:`mmgrpo.train.checkpoint`; this module decides what
goes in and where it comes back: gathered from DeepSpeed ZeRO's partitions (:mod:`mmgrpo.train.zero`), written as
slices under FSDP2, split like a sharded run's parameters when an unsharded checkpoint resumes one.

Every function takes the :class:`~mmgrpo.train.trainer.Trainer` ``tr`` (its accelerator, policy, optimizer and
components); the trainer's ``state_dict``, ``save`` and ``load`` call them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from mmgrpo.core.errors import UserError
from mmgrpo.train import checkpoint as ckpt
from mmgrpo.train import zero
from mmgrpo.train.export import beside_checkpoint, export_policy, export_run
from mmgrpo.train.scoring import stateful_rewards


def state_dict(tr: Any, keep: bool = True, nonfinite: list[str] | None = None) -> dict[str, Any]:
    """The run's whole state; under DeepSpeed gathered into full tensors (every rank calls this alike; ``keep``
    False: gathered without host copies, on the ranks that write nothing; ``nonfinite`` collects the names of the
    gathered weights that are not finite)."""
    model = tr.acc.unwrap_model(tr.policy.model)
    if tr.deepspeed:
        named = named_params(tr, model)
        trainable, optimizer, bad = zero.full_state(tr.acc, named, keep)
        if nonfinite is not None:
            nonfinite.extend(bad)
    else:
        trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        optimizer = tr.optimizer.state_dict()
    rewards = {k: fn.state_dict() for k, fn in stateful_rewards(tr.rewards).items()}
    return {
        "step": tr.step,
        "model": trainable,
        "optimizer": optimizer,
        "ema": tr.ema.state_dict() if tr.ema is not None else None,
        "rewards": rewards,
        "policy": tr.policy.training_state() if hasattr(tr.policy, "training_state") else None,
        "reward_weighters": {str(i): w.state_dict() for i, w in enumerate(tr.comp.reward_weighters)},
        "methods": {k: st.state_dict() for k, st in tr.comp.method_state.items()},
        "sampler": tr.sampler.state_dict(),
        "prompts": prompt_pool(tr),
        "sampling_grid": sampling_grid(tr),
        "grad_scaler": tr.acc.scaler.state_dict() if tr.acc.scaler is not None else None,  # fp16 on a GPU: its scale
    }


def prompt_pool(tr: Any) -> dict[str, Any]:
    """What identifies the training prompts: their number and, where the source offers one, a fingerprint (with the
    number of its scheme, :attr:`mmgrpo.data.prompts.PromptList.fingerprint_scheme`)."""
    source = tr.comp.prompts
    fingerprint = source.fingerprint() if hasattr(source, "fingerprint") else None
    return {"size": tr.comp.prompt_count, "fingerprint": fingerprint,
            "scheme": getattr(source, "fingerprint_scheme", 1)}  # fmt: skip


def check_prompt_pool(tr: Any, saved: dict[str, Any] | None, path: Any) -> None:
    """Refuse a resume over other training prompts than the checkpoint's (unless ``resume_force``): the sampler's
    stream positions would name other prompts, so part of the pass is trained twice and part never."""
    if not saved or tr.cfg.resume_force:
        return
    now = prompt_pool(tr)
    keys = ["size", "fingerprint"]
    if saved.get("fingerprint") is not None and saved.get("scheme", 1) != now["scheme"]:
        keys.remove("fingerprint")  # of another scheme (an older checkpoint): not comparable, the count still is
        warnings.warn(f"resume: checkpoint {path} fingerprinted the training prompts in an older way, so edits of "
                      "them since cannot be checked (their number is the same)", stacklevel=2)  # fmt: skip
    changed = [k for k in keys if saved.get(k) is not None and now[k] != saved[k]]
    if changed:
        what = (
            f"{saved['size']} prompts then, {now['size']} now"
            if "size" in changed
            else "the same number, edited: a text or a field, or an image or video file's contents"
        )
        raise UserError(
            f"resume: the training prompts changed since checkpoint {path} ({what}); the rest of the pass would "
            "repeat some prompts and skip others. Restore the prompt data, or pass resume_force=true to continue "
            "over the new prompts"
        )


def sampling_grid(tr: Any) -> dict[str, Any] | None:
    """The grid a diffusion policy samples on (:meth:`mmgrpo.policies.diffusion.DiffusionPolicy.sampling_grid`);
    None for a policy without one (a VLM)."""
    grid = getattr(tr.policy, "sampling_grid", None)
    return grid() if callable(grid) else None


GRID_TOLERANCE = 1e-6
"""the largest relative difference of a model time or noise level between a checkpoint's grid and the resumed run's
that still counts as the same grid (the schedulers compute them in float32: timesteps near 1000 are 6e-5 apart)"""


def check_sampling_grid(tr: Any, saved: dict[str, Any] | None, path: Any) -> None:
    """Refuse a resume whose sampling grid differs from the one the checkpoint was trained on (unless
    ``resume_force``): ``policy.options.num_steps`` is the same (the config check holds it), so the grid changed
    with mmgrpo itself (e.g. Wan's, which moved to the UniPC flow sigmas its checkpoints ship on 2026-12-07), and the
    run would go on sampling and training other steps than it started with. A checkpoint from before grids were
    kept is not comparable: a Wan one is resumed with a warning, since Wan's is the grid that changed."""
    now = sampling_grid(tr)
    if now is None or tr.cfg.resume_force:
        return
    family = getattr(getattr(tr.policy, "adapter", None), "family", "")
    if saved is None:
        if family == "wan":
            warnings.warn(f"resume: checkpoint {path} keeps no sampling grid (written before 2026-12-07); a Wan run "
                          "started before then stepped on flow Euler's default grid, and continues on UniPC's flow "
                          "sigmas, the grid Wan checkpoints ship", stacklevel=2)  # fmt: skip
        return
    differ = [
        (key, i)
        for key in ("timesteps", "levels")
        if now.get(key) is not None and saved.get(key) is not None and len(now[key]) == len(saved[key])
        for i, (a, b) in enumerate(zip(now[key], saved[key]))
        if abs(a - b) > GRID_TOLERANCE * max(1.0, abs(b))
    ]
    same_shape = all(len(now.get(k) or []) == len(saved.get(k) or []) for k in ("timesteps", "levels"))
    if same_shape and not differ:
        return
    steps = tr.policy.opts.num_steps
    first = differ[0][1] if differ else 0  # the grids are shown from their first difference

    def shown(levels: list[float] | None) -> str:
        if not levels:
            return "none"
        part = ", ".join(f"{v:.4g}" for v in levels[first : first + 4])
        return f"[{'..., ' if first else ''}{part}{', ...' if len(levels) > first + 4 else ''}]"

    raise UserError(
        f"resume: the {family} sampler steps policy.options.num_steps={steps} on another grid than checkpoint {path} "
        f"was trained on (noise levels then {shown(saved.get('levels'))}, now {shown(now.get('levels'))}): this "
        "version of mmgrpo or of diffusers computes other steps than the run started with. Continue it with the "
        "versions that wrote the checkpoint, or pass resume_force=true to go on on the new grid"
    )


def named_params(tr: Any, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the trainable parameters in the optimizer's order (its state's indices)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(p)], p) for p in tr.params]


def save(tr: Any) -> Path | None:
    """Write the checkpoint of ``tr.step`` (every rank calls this together; the main process's path, else None),
    refused while a trainable tensor is not finite, so the last good checkpoint stays the newest."""
    model = tr.acc.unwrap_model(tr.policy.model)  # the same on every rank: all of them refuse together
    bad: list[str] = []
    # DeepSpeed: the ZeRO partitions joined on every rank (collectives), kept on the host by the main process only
    state = state_dict(tr, keep=tr.acc.is_main_process, nonfinite=bad) if tr.deepspeed else None
    if state is None:
        bad = [n for n, p in model.named_parameters() if p.requires_grad and not bool(_local(p).isfinite().all())]
    if tr.mesh is not None:  # each rank checked its own slices: all of them refuse together
        seen: list[Any] = [None] * tr.acc.num_processes
        dist.all_gather_object(seen, bad)
        bad = sorted(set().union(*seen))
    if bad:
        raise UserError(
            f"step {tr.step}: {len(bad)} trainable tensor(s) are not finite (e.g. {bad[0]!r}); no checkpoint "
            f"was written, so the last good one under {tr.run_dir / 'checkpoints'} is intact. Lower "
            f"trainer.lr or check the rewards, then continue with resume={tr.run_dir}"
        )
    tr.acc.wait_for_everyone()
    path = None
    root, keep = tr.run_dir / "checkpoints", tr.cfg.trainer.keep_checkpoints
    if tr.mesh is not None:  # every rank writes its slices (mmgrpo.train.checkpoint: sharded checkpoints)
        saved = ckpt.save_sharded_checkpoint(root, tr.step, tr.state_dict(), keep=keep)
        if tr.acc.is_main_process:
            path = saved
            if tr.cfg.trainer.export_checkpoints:  # full weights: the run's policy rebuilt, the shards joined
                with beside_checkpoint(tr.run_dir, tr.step, path):  # a full disk: a warning, the run goes on
                    export_run(tr.run_dir, path / "export", step=tr.step)
    elif tr.acc.is_main_process:
        path = ckpt.save_checkpoint(root, tr.step, state or tr.state_dict(), keep=keep)
        with beside_checkpoint(tr.run_dir, tr.step, path):  # a full disk: a warning, the run goes on
            if tr.cfg.trainer.export_checkpoints and tr.deepspeed:  # the engine's weights are partitions:
                with zero.whole_models(tr.acc):  # the run's policy rebuilt whole (no collective), weights loaded
                    export_run(tr.run_dir, path / "export", step=tr.step)
            elif tr.cfg.trainer.export_checkpoints:
                export_policy(tr.policy, path / "export", info={"run": str(tr.run_dir), "checkpoint": path.name})
    tr.acc.wait_for_everyone()
    return path


def load(tr: Any, path: str | Path) -> None:
    """Restore the checkpoint ``path`` into ``tr`` (every rank calls this together), ``tr.step`` included."""
    if tr.mesh is not None and not ckpt.is_sharded(path):  # e.g. a 1-GPU run continued on 8 GPUs with FSDP
        state = shard_full_state(tr, ckpt.load_checkpoint(path))
    else:
        state = ckpt.load_checkpoint(path, mesh=tr.mesh)  # sharded: this rank's slices; else full tensors
    model = tr.acc.unwrap_model(tr.policy.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if tr.deepspeed:  # full tensors into the engine's partitions (mmgrpo.train.zero)
        lacking = sorted(trainable - set(state["model"]))
        if lacking:
            raise UserError(f"checkpoint {path} lacks trainable parameters {lacking[:5]}")
        named = named_params(tr, model)
        weights = [state["model"][n] for n, _ in named]
        zero.load_full_state(tr.acc, [p for _, p in named], weights, state["optimizer"])
    else:
        missing, _ = model.load_state_dict(state["model"], strict=False)
        if trainable & set(missing):
            raise UserError(f"checkpoint {path} lacks trainable parameters {sorted(trainable & set(missing))[:5]}")
        tr.optimizer.load_state_dict(state["optimizer"])
    if tr.ema is not None and state.get("ema"):
        tr.ema.load_state_dict(state["ema"])
    if state.get("policy") is not None and hasattr(tr.policy, "load_training_state"):
        tr.policy.load_training_state(state["policy"])
    check_prompt_pool(tr, state.get("prompts"), path)
    check_sampling_grid(tr, state.get("sampling_grid"), path)
    if state.get("sampler"):
        tr.sampler.load_state_dict(state["sampler"])
    if tr.acc.scaler is not None and state.get("grad_scaler"):  # else it starts again from its initial scale
        tr.acc.scaler.load_state_dict(state["grad_scaler"])
    for k, fn in stateful_rewards(tr.rewards).items():
        if k in state.get("rewards", {}):
            fn.load_state_dict(state["rewards"][k])
    for i, weighter in enumerate(tr.comp.reward_weighters):
        if str(i) in (state.get("reward_weighters") or {}):
            weighter.load_state_dict(state["reward_weighters"][str(i)])
    for k, st in tr.comp.method_state.items():
        if k not in state.get("methods", {}):
            raise UserError(f"checkpoint {path} has no state of methods.{k}; it was written by a run without it")
        st.load_state_dict(state["methods"][k])
    tr.step = int(state["step"])


def shard_full_state(tr: Any, state: dict[str, Any]) -> dict[str, Any]:
    """An unsharded checkpoint's state for this sharded run: every tensor that stands for a trainable parameter
    (the weights, their AdamW moments, EMA shadows, which follow the parameters' order) is split like it."""
    model = tr.acc.unwrap_model(tr.policy.model)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ordered = [p for g in tr.optimizer.param_groups for p in g["params"]]

    def like(t: Any, p: torch.Tensor) -> Any:
        if not (isinstance(t, torch.Tensor) and isinstance(p, DTensor) and t.shape == p.shape):
            return t  # e.g. AdamW's scalar step count
        return distribute_tensor(t.to(p.device), p.device_mesh, p.placements)

    def shadows(obj: Any) -> Any:  # EMA state: {"decay", "shadow": [one per trainable parameter, in order]}
        if isinstance(obj, dict):
            out = {k: shadows(v) for k, v in obj.items()}
            if isinstance(obj.get("shadow"), list) and len(obj["shadow"]) == len(tr.params):
                out["shadow"] = [like(t, p) for t, p in zip(obj["shadow"], tr.params)]
            return out
        return obj

    state["model"] = {n: like(t, named[n]) if n in named else t for n, t in state["model"].items()}
    opt = state["optimizer"]
    opt["state"] = {i: {k: like(v, ordered[int(i)]) for k, v in st.items()} for i, st in opt["state"].items()}
    state["ema"], state["policy"] = shadows(state.get("ema")), shadows(state.get("policy"))
    return state


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a DTensor (detached), or the tensor itself."""
    t = t.detach()
    return t.to_local() if isinstance(t, DTensor) else t
