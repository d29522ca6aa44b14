"""``mmgrpo export``: a run's trained weights as folders that diffusers, peft and transformers load without mmgrpo.

    mmgrpo export runs/shapes_t2i_grpo --out export/            # latest checkpoint
    mmgrpo export runs/shapes_t2i_grpo --step 100 --out export/ --merge
    mmgrpo export runs/vlm_reasoning_tiny --out adapter/ [--ema]

The policy is rebuilt from the run's ``config.yaml`` exactly as training built it (the same loader, LoRA options and
dtype), the checkpoint's trainable weights (or with ``--ema`` its EMA weights) are copied in, and then:

=====================  ===========================================================================================
diffusion, LoRA        the diffusers LoRA format: ``pytorch_lora_weights.safetensors`` (keys ``transformer.*`` or
                       ``unet.*``, adapter config with alpha and rank in the file's metadata), written by the base
                       pipeline class's ``save_lora_weights``; ``pipe.load_lora_weights(OUT)`` reproduces the policy
diffusion, full or     a complete pipeline folder (``model_index.json``, the base's components and the trained
``--merge``            denoiser, LoRA merged in): ``DiffusionPipeline.from_pretrained(OUT)``
VLM, LoRA              a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) and the
                       processor: ``PeftModel.from_pretrained(base_model, OUT)``
VLM, full or           a transformers folder (``config.json``, ``model.safetensors``, processor, tokenizer and chat
``--merge``            template): ``AutoModelForImageTextToText.from_pretrained(OUT)``
=====================  ===========================================================================================

``--merge`` on a full fine-tune (nothing to merge) writes the full folder and records ``merged: false``, so one
command exports every run as a complete model. A LoRA run that started from another LoRA
(``policy.options.init_lora``, merged into the base as it loaded) exports as with ``--merge``: its adapter applies on
top of that merge. Every export also holds ``mmgrpo_export.json`` (run, step, base model,
format, merged; for a VLM the system prompt and the sampling settings it was trained with, which a transformers
folder's ``generation_config.json`` holds too). With ``trainer.export_checkpoints``
the trainer calls :func:`export_policy` after each checkpoint (``checkpoints/step_XXXXXX/export/``, live weights); one
that the disk refuses is a warning and the run goes on (:func:`beside_checkpoint`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from mmgrpo.core.errors import UserError
from mmgrpo.core.extras import needs
from mmgrpo.core.files import OutputNotWritten, check_output_folder, staged_folder
from mmgrpo.core.schema import options_from
from mmgrpo.policies.diffusion import DiffusionPolicy
from mmgrpo.policies.init_lora import diffusers_pipeline_class, pipeline_class_name
from mmgrpo.policies.loading import GeneratorPolicyOptions, load_adapter, runnable_attention
from mmgrpo.policies.sources import is_hub_id
from mmgrpo.policies.vlm import VLMPolicy, VLMPolicyOptions
from mmgrpo.train.checkpoint import CorruptCheckpoint, latest_valid_checkpoint, list_checkpoints, verify_checkpoint
from mmgrpo.train.components import PIPELINES
from mmgrpo.train.config import load_config
from mmgrpo.train.sample import load_trained_weights

INFO = "mmgrpo_export.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmgrpo export",
        description="Write a run's trained weights as a diffusers LoRA / pipeline folder or a peft / transformers "
        "folder, loadable without mmgrpo.",
    )
    p.add_argument("run", metavar="RUN", help="run directory (runs/<name>) with config.yaml and checkpoints/")
    p.add_argument("--step", type=int, help="checkpoint step to export (default: the latest valid checkpoint)")
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--merge", action="store_true", help="LoRA runs: merge the adapter into a full model folder")
    p.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights (trainer.ema_decay runs)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.step is not None and args.step < 0:
        raise UserError(f"--step {args.step}: a checkpoint step is >= 0; give one of the run's checkpoint steps or "
                        "drop --step for the latest")  # fmt: skip
    if (Path(args.run) / "config.yaml").is_file():  # else export_run says it is not a run directory
        check_output_folder(args.out, "--out", run_dir=args.run)
    out = export_run(args.run, args.out, step=args.step, merge=args.merge, ema=args.ema)
    info = json.loads((out / INFO).read_text())
    print(f"exported {info['format']} of {info['checkpoint']} to {out}")
    if args.merge and not info["merged"]:
        print("--merge: this run fine-tuned the whole model (no LoRA adapter), so the export is a full model folder "
              "already; nothing was merged (mmgrpo_export.json: merged false)")  # fmt: skip
    return 0


# ---------------------------------------------------------------------------------------------- from a run
def find_run_checkpoint(run: str | Path, step: int | None) -> Path:
    """The checkpoint folder of ``run`` at ``step`` (verified), or its latest valid one (a note on stderr for each
    newer one that is damaged)."""
    run_dir = Path(run)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"'{run}' is not a run directory (no config.yaml); give runs/<name>, written by mmgrpo train")
    root = run_dir / "checkpoints"
    if step is None:
        ckpt, notes = latest_valid_checkpoint(root)
        if ckpt is None:
            why = f" ({'; '.join(notes)})" if notes else ""
            raise UserError(f"run '{run}' has no complete checkpoint under checkpoints/{why}; train longer "
                            "(trainer.checkpoint_every) or resume the run to write one")  # fmt: skip
        for note in notes:  # as mmgrpo sample and resume do: the newest that verifies, and why newer ones were skipped
            print(f"note: skipped a damaged checkpoint: {note}; exporting {ckpt}", file=sys.stderr)
        return ckpt
    if isinstance(step, str) and step.strip().isdigit():  # e.g. from a script's own argument parsing
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, int):
        raise UserError(
            f"step={step!r}: a checkpoint's step is a whole number, e.g. step=100 (or None for the latest)"
        )
    steps = {int(p.name.split("_")[1]): p for p in list_checkpoints(root)}
    if step not in steps:
        have = ", ".join(str(s) for s in sorted(steps)) or "none"
        raise UserError(f"run '{run}' has no checkpoint of step {step} (checkpoints kept: {have}); give one of "
                        "those to --step, or drop --step for the latest")  # fmt: skip
    try:
        verify_checkpoint(steps[step])
    except CorruptCheckpoint as e:
        others = ", ".join(str(s) for s in sorted(steps) if s != step) or "none"
        raise UserError(
            f"checkpoint of step {step} cannot be exported, it is damaged: {e}; export another "
            f"checkpoint (--step, kept: {others}) or drop --step for the newest that verifies"
        ) from e
    return steps[step]


def build_policy(cfg: Any, device: str = "cpu") -> Any:
    """The run's policy as its recipe loads it (without the training-only reference copies)."""
    PIPELINES.load()
    cls = PIPELINES.get(cfg.pipeline).policy_options
    if cls is not None and issubclass(cls, GeneratorPolicyOptions):
        opts = options_from(cls, cfg.policy.options, "the run's config.yaml", "policy.options")
        opts = dataclasses.replace(opts, reference_kl=False, gradient_checkpointing=False)
        opts = runnable_attention(opts, device, "mmgrpo export")
        return DiffusionPolicy(load_adapter(opts, device), opts)
    if cls is not None and issubclass(cls, VLMPolicyOptions):
        opts = options_from(cls, cfg.policy.options, "the run's config.yaml", "policy.options")
        opts = dataclasses.replace(opts, gradient_checkpointing=False)
        return VLMPolicy.from_pretrained(opts.path, opts, reference=False, device=device)
    raise UserError(f"runs of the {cfg.pipeline!r} recipe cannot be exported: export writes diffusion/flow generators "
                    "(diffusers) and VLMs (peft / transformers); its checkpoint's tensors.safetensors holds the "
                    "trained weights by parameter name")  # fmt: skip


def export_run(run: str | Path, out: str | Path, step: int | None = None, merge: bool = False, ema: bool = False):
    """Rebuild the run's policy, load the checkpoint's weights (``ema``: its EMA weights) and export it to ``out``."""
    ckpt = find_run_checkpoint(run, step)
    check_output_folder(out, "--out")  # before the model loads
    policy = build_policy(load_config(Path(run) / "config.yaml"))
    load_trained_weights(trained_module(policy), ckpt, ema=ema, verified=True)  # find_run_checkpoint verified it
    info = {"run": str(Path(run).resolve()), "checkpoint": ckpt.name, "ema": ema}
    return export_policy(policy, out, merge=merge, inplace=True, info=info)


# ---------------------------------------------------------------------------------------------- a policy
def unwrap_policy(policy: Any) -> Any:
    """The recipe's policy inside the paper methods' wrappers (``PolicyWrapper.inner``)."""
    while not isinstance(policy, (DiffusionPolicy, VLMPolicy)) and "inner" in getattr(policy, "__dict__", {}):
        policy = policy.__dict__["inner"]
    return policy


def trained_module(policy: Any) -> nn.Module:
    """The module whose parameter names a checkpoint's ``model`` entries use (the trainer's unwrapped model)."""
    model = unwrap_policy(policy).model
    return getattr(model, "module", model)


def export_policy(
    policy: Any, out: str | Path, merge: bool = False, inplace: bool = False, info: dict | None = None
) -> Path:
    """Write ``policy``'s current weights to ``out`` (see the module docstring for the formats).

    ``inplace``: ``merge`` may merge the LoRA into the policy's own modules (the policy is not used afterwards);
    otherwise a copy is merged and the policy is left as it was."""
    policy, out = unwrap_policy(policy), Path(out)
    check_output_folder(out, "--out")
    if not isinstance(policy, (DiffusionPolicy, VLMPolicy)):
        raise UserError(f"a {type(policy).__name__} cannot be exported (only diffusion/flow generators and VLMs)")
    init = str(getattr(policy.opts if isinstance(policy, DiffusionPolicy) else policy.options, "init_lora", ""))
    if init and has_lora(policy) and not merge:  # its adapter applies on top of base + init_lora, not on the base
        warnings.warn(f"the run started from the LoRA {init} (policy.options.init_lora), merged into the base: its "
                      "trained adapter applies on top of that merge, which a LoRA file alone cannot carry, so the "
                      "export is a full model folder with both merged in (as --merge writes)",
                      stacklevel=2)  # fmt: skip
        merge = True
    merge = merge and has_lora(policy)  # a full fine-tune is a full model folder already: nothing to merge
    with staged_folder(out) as tmp:  # a failure leaves no half-written folder
        if isinstance(policy, DiffusionPolicy):
            fmt = export_diffusion(policy, tmp, merge, inplace)
        else:
            fmt = export_vlm(policy, tmp, merge, inplace)
        record = {**(info or {}), "format": fmt, "base": base_name(policy), "merged": merge}
        if init:  # the start adapter merged in (policy.options.init_lora)
            record["init_lora"] = init if is_hub_id(init) else str(Path(init).expanduser().resolve())
        if isinstance(policy, VLMPolicy):  # the prompt and sampling the model was trained with
            record.update(vlm_settings(policy))
            record_generation_config(tmp, policy)
        (tmp / INFO).write_text(json.dumps(record, indent=2) + "\n")
    return out


@contextmanager
def beside_checkpoint(run_dir: str | Path, step: int, ckpt: Path) -> Iterator[None]:
    """Around the trainer's export beside a checkpoint (``trainer.export_checkpoints``): an export the disk refuses
    (full, read-only: :class:`~mmgrpo.core.files.OutputNotWritten`, nothing of it left) is a warning naming it and
    why, and training goes on, as a failing tracker is dropped: the checkpoint was written whole before it, and
    ``mmgrpo export`` writes the same folder from it later. Any other failure stops the run as before."""
    try:
        yield
    except OutputNotWritten as e:
        warnings.warn(f"step {step}: the export beside checkpoint {ckpt} (trainer.export_checkpoints) failed "
                      f"({e.reason}); the checkpoint itself is complete and training goes on. Free disk space, then "
                      f"write the export with `mmgrpo export {run_dir} --step {step} --out DIR`",
                      stacklevel=3)  # fmt: skip


def has_lora(policy: Any) -> bool:
    """Whether ``policy`` trains a LoRA adapter (what ``--merge`` merges) rather than the whole model."""
    if isinstance(policy, DiffusionPolicy):
        return getattr(policy.adapter.denoiser, "peft_config", None) is not None and policy.opts.lora_rank > 0
    vlm = policy._scorer().vlm
    return hasattr(vlm, "peft_config") and hasattr(vlm, "merge_and_unload")


def base_name(policy: Any) -> str:
    """The base model for the record: its absolute folder, or ``org/name@revision`` for a hub id."""
    diffusion = isinstance(policy, DiffusionPolicy)
    source = getattr(policy.adapter, "source", None) if diffusion else None
    opts = policy.opts if diffusion else policy.options
    path, revision = str(getattr(opts, "path", "")), getattr(opts, "revision", None)
    if source is not None and source.hub_id is not None:
        path, revision = source.hub_id, source.revision
    elif not is_hub_id(path):
        return str(Path(path).expanduser().resolve())
    return f"{path}@{revision}" if revision else path


# ---------------------------------------------------------------------------------------------- diffusion
def export_diffusion(policy: DiffusionPolicy, out: Path, merge: bool, inplace: bool) -> str:
    opts, denoiser = policy.opts, policy.adapter.denoiser
    source = getattr(policy.adapter, "source", None)  # a hub id's snapshot folder in the HF cache
    base = Path(source.path if source is not None else getattr(opts, "path", ""))
    lora = getattr(denoiser, "peft_config", None) is not None and opts.lora_rank > 0
    if lora and not merge:
        save_diffusers_lora(denoiser, base, getattr(opts, "family", ""), out)
        return "diffusers_lora"
    if lora:
        denoiser = merged_denoiser(denoiser, inplace)
    save_pipeline_folder(denoiser, base, out, getattr(source, "variant", None))
    return "diffusers_pipeline"


def pipeline_class(base: Path, family: str) -> Any:
    """The diffusers pipeline class of the base model (its model_index.json, else the family's)."""
    cls = diffusers_pipeline_class(base, family)
    name = pipeline_class_name(base, family)
    if cls is None or not hasattr(cls, "save_lora_weights"):
        raise UserError(f"the base model {base} names pipeline class {name!r}, which diffusers cannot load LoRA "
                        "weights into; export with --merge for a full pipeline folder")  # fmt: skip
    return cls


def save_diffusers_lora(denoiser: nn.Module, base: Path, family: str, out: Path) -> None:
    """``pytorch_lora_weights.safetensors`` through the pipeline class's ``save_lora_weights``, with the adapter's
    config (rank, alpha, targets) as metadata so that ``load_lora_weights`` applies the trained scale."""
    with needs("diffusion", "exporting a diffusion LoRA"):
        from peft.utils import get_peft_model_state_dict

    cls = pipeline_class(base, family)
    params = inspect.signature(cls.save_lora_weights).parameters
    part = "unet" if "unet_lora_layers" in params else "transformer"
    if f"{part}_lora_adapter_metadata" not in params:
        raise UserError(f"{cls.__name__}.save_lora_weights of this diffusers cannot store the adapter's alpha; "
                        "upgrade diffusers or export with --merge")  # fmt: skip
    layers = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(denoiser).items()}
    meta = denoiser.peft_config["default"].to_dict()
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {f"{part}_lora_layers": layers, f"{part}_lora_adapter_metadata": meta}
    cls.save_lora_weights(str(out), safe_serialization=True, **kwargs)


def merged_denoiser(denoiser: nn.Module, inplace: bool) -> nn.Module:
    """The denoiser with its LoRA merged into the base weights and the adapter layers removed."""
    model = denoiser if inplace else copy.deepcopy(denoiser)
    model.fuse_lora()
    model.unload_lora()
    return model


def save_pipeline_folder(denoiser: nn.Module, base: Path, out: Path, variant: str | None = None) -> None:
    """The base pipeline's model_index.json and components, with ``denoiser`` saved in place of its own (as the
    weights ``variant`` the base was read with, so the folder loads with that one variant)."""
    index = base / "model_index.json"
    if not index.is_file():
        raise UserError(f"the base model {base} has no model_index.json, so no pipeline folder can be written; "
                        "export a LoRA run without --merge, or train from a diffusers folder")  # fmt: skip
    parts = {k: v for k, v in json.loads(index.read_text()).items() if isinstance(v, list) and v[0] is not None}
    own = [k for k, (_, cls) in parts.items() if cls == type(denoiser).__name__]
    if len(own) != 1:
        raise UserError(f"cannot tell which component of {index} the trained {type(denoiser).__name__} replaces "
                        f"({own or 'none'} match); export a LoRA run without --merge")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(index, out / "model_index.json")
    for name in parts:
        if name != own[0] and (base / name).is_dir():
            shutil.copytree(base / name, out / name)
    denoiser.save_pretrained(str(out / own[0]), safe_serialization=True, variant=variant)


# ---------------------------------------------------------------------------------------------- VLM
GENERATION_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens")
"""the policy's sampling options that are transformers ``GenerationConfig`` fields of the same name and meaning
(``top_p`` 1 and ``top_k`` 0 are off in both)"""


def vlm_settings(policy: VLMPolicy) -> dict[str, Any]:
    """What ``mmgrpo_export.json`` of a VLM records beside the weights: the system prompt the model was trained
    with (``policy.options.system_prompt``: the R1 ``<think>/<answer>`` prompt of most configs; "" is the chat
    template's own system turn), which the chat template does not hold, and the sampling settings (temperature,
    top_p, top_k, max_new_tokens). Without them a user of the export prompts and samples it otherwise than it
    learned."""
    opts = policy.options
    return {"system_prompt": opts.system_prompt, **{k: getattr(opts, k) for k in GENERATION_KEYS}}


def record_generation_config(out: Path, policy: VLMPolicy) -> None:
    """The policy's sampling settings in the export's ``generation_config.json`` (a transformers folder writes
    one; a peft adapter does not): ``do_sample`` with its temperature, top_p, top_k and max_new_tokens, so
    ``model.generate(**inputs)`` samples as training did."""
    path = out / "generation_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    config.update({"do_sample": True, **{k: getattr(policy.options, k) for k in GENERATION_KEYS}})
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_vlm(policy: VLMPolicy, out: Path, merge: bool, inplace: bool) -> str:
    vlm = policy._scorer().vlm  # the transformers model, or a peft model around it
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(vlm, "peft_config") and hasattr(vlm, "merge_and_unload"):
        if not merge:
            vlm.save_pretrained(str(out), safe_serialization=True)
            policy.processor.save_pretrained(str(out))
            return "peft_adapter"
        if not inplace:
            vlm = copy.deepcopy(vlm)
        vlm = vlm.merge_and_unload()
    vlm.save_pretrained(str(out), safe_serialization=True)
    policy.processor.save_pretrained(str(out))
    return "transformers_model"
