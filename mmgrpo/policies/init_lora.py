"""Starting a run from a LoRA adapter (``policy.options.init_lora``): the adapter is merged into the base weights as
the policy loads, before its own trainable LoRA is added (or full fine-tuning begins).

The usual way into RL is from a supervised fine-tune, often a LoRA (TRL's ``SFTTrainer`` with peft, a diffusers
LoRA training script, an earlier mmgrpo run's LoRA export). Merging it first makes the run's starting point, and
its KL reference (the model with the trainable adapter disabled), that fine-tuned model, which is what the recipes
assume; training the loaded adapter itself would make the reference the base model without it.

Formats: for a VLM, a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, as
``save_pretrained`` and ``mmgrpo export`` write it), merged with peft's ``merge_and_unload``; for a diffusion model,
a diffusers LoRA (``pytorch_lora_weights.safetensors``, as the pipelines' ``save_lora_weights`` and ``mmgrpo
export`` write it; or one ``.safetensors`` LoRA file, kohya / ComfyUI layouts included where diffusers converts
them), read by the base pipeline class's ``lora_state_dict`` and fused as ``pipe.load_lora_weights``
then ``pipe.fuse_lora()`` would (so the merged denoiser equals what diffusers makes of the same files). A local
folder, or a hub id read through the Hugging Face cache (``HF_HUB_OFFLINE=1`` reads a cached snapshot). Weights
are read from safetensors only.

A run's exports then hold the merged weights: its trainable adapter applies on top of the base with the start
adapter merged in, which a LoRA file alone cannot carry, so ``mmgrpo export`` writes a full model folder
(:func:`mmgrpo.train.export.export_policy`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from mmgrpo.core.errors import UserError
from mmgrpo.core.extras import needs
from mmgrpo.policies.sources import ModelSource, is_hub_id

PIPELINE_CLASSES = {  # family -> diffusers pipeline class, when the base folder has no model_index.json
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "wan": "WanPipeline",
    "hunyuan_video": "HunyuanVideoPipeline",
    "sd": "StableDiffusionPipeline",
}
KEY = "policy.options.init_lora"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


def adapter_folder(text: str, files: tuple[str, ...]) -> Path:
    """``init_lora`` as a local folder: a folder as it is; a hub id's snapshot of ``files`` (names or patterns; the
    hub cache first)."""
    folder = Path(text).expanduser()
    if folder.is_dir():
        return folder
    if not is_hub_id(text):
        raise UserError(f"{KEY}={text!r} is not a folder, and not a hub repository id (org/name); give the folder of "
                        "a LoRA adapter (a peft adapter for a VLM, a diffusers LoRA for a diffusion model) or its "
                        "hub id")  # fmt: skip
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=[*files, "mmgrpo_export.json"]))
    except (OSError, ValueError) as e:  # offline and not cached, no such repository: what a model's hub id says
        raise UserError(ModelSource(text, KEY, local=False).failure(e)) from e
    except Exception as e:  # huggingface_hub's errors for an unreachable hub are not all OSErrors
        raise UserError(f"{KEY}={text!r}: the hub repository could not be read ({type(e).__name__}: {e})") from e


def weights_file(text: str, peft: bool) -> Path:
    """The weights file of the adapter ``text``: a peft folder's ``adapter_model.safetensors``; for diffusion a
    folder's (or hub repository's) ``pytorch_lora_weights.safetensors``, else its only ``.safetensors`` file, or the
    ``.safetensors`` file given."""
    file = Path(text).expanduser()
    if not peft and file.is_file():
        if file.suffix != ".safetensors":
            raise UserError(f"{KEY}={text!r} is not a .safetensors file; a pickled LoRA (.bin, .pt, .ckpt) is not "
                            "read: it can run code on load; convert it to safetensors where it was made")  # fmt: skip
        return file
    if peft:
        folder = adapter_folder(text, PEFT_FILES)
        if not all((folder / name).is_file() for name in PEFT_FILES):
            raise _missing(text, folder, "peft LoRA adapter", PEFT_FILES, "what peft's save_pretrained writes")
        return folder / PEFT_FILES[-1]
    folder = adapter_folder(text, ("*.safetensors", "adapter_config.json"))
    if (folder / DIFFUSERS_FILE).is_file():
        return folder / DIFFUSERS_FILE
    found = [] if (folder / "adapter_config.json").is_file() else sorted(folder.glob("*.safetensors"))  # peft's
    if len(found) == 1:  # a LoRA repository's one file, whatever its name (diffusers' load_lora_weights takes it)
        return found[0]
    if found:
        names = ", ".join(p.name for p in found[:6])
        raise UserError(f"{KEY}={text!r} holds {len(found)} .safetensors files ({names}) and no {DIFFUSERS_FILE}: "
                        f"give the LoRA file itself as {KEY} (a local path)")  # fmt: skip
    raise _missing(text, folder, "diffusers LoRA", (DIFFUSERS_FILE,), "what the pipelines' save_lora_weights writes; "
                   "or a folder or repository holding one .safetensors LoRA file, or that file itself")  # fmt: skip


def digest(text: str, peft: bool) -> str:
    """The sha256 of the adapter's weights file (:func:`weights_file`): what a run records as
    ``policy.options.init_lora_sha256``, so that its resume, ``mmgrpo sample --run`` and ``mmgrpo export`` refuse an
    adapter file changed since (the checkpoints trained on top of the one it was)."""
    return _sha256(weights_file(text, peft))


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_digest(text: str, file: Path, expected: str) -> None:
    """A UserError when ``file`` (the adapter's weights) is not the one the run recorded (``expected`` sha256)."""
    if not expected:
        return
    now = _sha256(file)
    if now != expected:
        raise UserError(f"{KEY}={text!r}: its weights file {file} changed since the run began (sha256 "
                        f"{now[:16]}..., the run's config.yaml records policy.options.init_lora_sha256 "
                        f"{expected[:16]}...): the run's checkpoints trained on top of the adapter as it was; put "
                        "that file back, or start a new run from this one")  # fmt: skip


def check_base(text: str, folder: Path, base: str) -> None:
    """Warn when the adapter records a base model (an mmgrpo export's ``base``, peft's ``base_model_name_or_path``)
    whose name differs from the run's model ``base``: the names' last parts are compared (a hub id and the folder
    it was downloaded into share theirs), since a LoRA of the same shapes merges into another model silently."""
    recorded = None
    for name, key in (("mmgrpo_export.json", "base"), ("adapter_config.json", "base_model_name_or_path")):
        try:
            value = json.loads((folder / name).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str) and value.strip():
            recorded = value.strip()
            break

    def tail(name: str) -> str:
        return name.split("@")[0].rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()

    if recorded is not None and tail(recorded) != tail(str(base)):
        warnings.warn(f"{KEY}={text!r} records its base model as {recorded!r}, but the run's model is {base!r} "
                      "(policy.options.path): a LoRA merged into another model than the one it was trained on does "
                      "not do what it did there; check that the two are the same model", stacklevel=3)  # fmt: skip


def _first_lines(e: BaseException) -> str:
    """The start of a loader's error as one line: its first three lines, whitespace joined, no final full stop."""
    return " ".join(" ".join(str(e).split("\n")[:3]).split()).rstrip(".") or type(e).__name__


def _missing(text: str, folder: Path, kind: str, files: tuple[str, ...], how: str) -> UserError:
    present = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else []
    return UserError(f"{KEY}={text!r} is not a {kind}: it needs {' and '.join(files)} ({how}); the folder holds "
                     f"{present or 'nothing'}. A pickled adapter (adapter_model.bin, *.pt) is not read: it can run "
                     "code on load; convert it to safetensors where it was made")  # fmt: skip


def merge_peft_lora(model: nn.Module, text: str, base: str, sha256: str = "") -> nn.Module:
    """The VLM ``model`` with the peft LoRA adapter ``text`` merged into its weights (peft's ``merge_and_unload``);
    ``base``: the model path, for the messages; ``sha256``: the weights file the run recorded (:func:`digest`)."""
    file = weights_file(text, peft=True)
    folder = file.parent
    check_digest(text, file, sha256)
    check_base(text, folder, base)
    with needs("vlm", "starting from a LoRA adapter (policy.options.init_lora)"):
        from peft import PeftModel

    try:
        merged = PeftModel.from_pretrained(model, str(folder), is_trainable=False).merge_and_unload()
    except (ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as e:  # other targets, shapes; a torn file
        first = _first_lines(e)
        raise UserError(f"{KEY}={text!r} does not load onto the model {base}: {first}. The adapter must be made for "
                        "this base model (its adapter_config.json names base_model_name_or_path)") from e  # fmt: skip
    return merged


def merge_diffusers_lora(denoiser: nn.Module, text: str, pipeline_cls: Any, base: str, sha256: str = "") -> None:
    """Fuse the diffusers LoRA ``text`` into ``denoiser`` in place, as ``pipe.load_lora_weights(text)`` then
    ``pipe.fuse_lora()`` would on a pipeline of ``pipeline_cls`` (its ``lora_state_dict`` converts the file's key
    layout: one file in the kohya / ComfyUI layouts too); ``base``: the model path, for the messages; ``sha256``:
    the weights file the run recorded (:func:`digest`)."""
    file = weights_file(text, peft=False)
    folder, weight = file.parent, file.name
    check_digest(text, file, sha256)
    if not Path(text).expanduser().is_file():  # a folder may record its base
        check_base(text, folder, base)
    loader = _denoiser_loader(pipeline_cls)
    if loader is None or not hasattr(denoiser, "fuse_lora"):
        raise UserError(f"{KEY}: {getattr(pipeline_cls, '__name__', pipeline_cls)} cannot load a LoRA into this "
                        "denoiser here; merge the adapter into the base outside mmgrpo (pipe.load_lora_weights, "
                        "pipe.fuse_lora(), pipe.unload_lora_weights(), pipe.save_pretrained(DIR)) and give DIR as "
                        "policy.options.path")  # fmt: skip
    name, part = loader
    try:
        state, alphas, metadata = _read_state(pipeline_cls, folder, weight)
        foreign = sorted({k.split(".")[0] for k in state if not k.startswith(f"{part}.")})
        if foreign and len(foreign) == len({k.split(".")[0] for k in state}):
            raise UserError(f"{KEY}={text!r}: none of its keys are the {part}'s (they start with "
                            f"{', '.join(foreign[:4])}): it is no LoRA of this model's {part}")  # fmt: skip
        if foreign:
            raise UserError(f"{KEY}={text!r} also adapts {', '.join(foreign)} (keys {foreign[0]}.*), which the policy "
                            f"does not hold: only the {part} is trained and merged here; merge the whole adapter "
                            "into the base outside mmgrpo (pipe.load_lora_weights, pipe.fuse_lora(), "
                            "pipe.save_pretrained(DIR)) and give DIR as policy.options.path")  # fmt: skip
        load = getattr(pipeline_cls, name)
        kwargs: dict[str, Any] = {"adapter_name": "mmgrpo_init", "metadata": metadata, part: denoiser}
        if "network_alphas" in inspect.signature(load).parameters:  # the UNet and Flux loaders take them
            kwargs["network_alphas"] = alphas
        load(state, **kwargs)
    except UserError:
        raise
    except (ValueError, RuntimeError, KeyError, TypeError, OSError, SafetensorError) as e:
        first = _first_lines(e)
        raise UserError(f"{KEY}={text!r} does not load onto the {part} of {base}: {first}. The adapter must be made "
                        "for this base model") from e  # fmt: skip
    if "mmgrpo_init" not in (getattr(denoiser, "peft_config", None) or {}):
        raise UserError(f"{KEY}={text!r}: no weight of the adapter matched a module of the {part} of {base}; the "
                        "adapter must be made for this base model")  # fmt: skip
    with torch.no_grad():
        denoiser.fuse_lora(lora_scale=1.0, adapter_names=["mmgrpo_init"])
    denoiser.unload_lora()


def pipeline_class_name(base: Path, family: str) -> str | None:
    """The diffusers pipeline class name of the base model: its model_index.json's ``_class_name``, else the
    family's."""
    index = base / "model_index.json"
    return json.loads(index.read_text()).get("_class_name") if index.is_file() else PIPELINE_CLASSES.get(family)


def diffusers_pipeline_class(base: Path, family: str) -> Any:
    """The diffusers pipeline class of the base model (:func:`pipeline_class_name`); None when diffusers has none."""
    with needs("diffusion", "LoRA files of a diffusion model"):
        import diffusers

    return getattr(diffusers, str(pipeline_class_name(base, family)), None)


def _denoiser_loader(pipeline_cls: Any) -> tuple[str, str] | None:
    """(the pipeline class's classmethod that loads a LoRA state dict into its denoiser, the denoiser's part name)."""
    for name, part in (("load_lora_into_transformer", "transformer"), ("load_lora_into_unet", "unet")):
        if hasattr(pipeline_cls, name) and hasattr(pipeline_cls, "lora_state_dict"):
            return name, part
    return None


def _read_state(pipeline_cls: Any, folder: Path, weight: str) -> tuple[dict, Any, Any]:
    """(state dict, network alphas or None, adapter metadata or None) of the file ``weight`` in ``folder`` from
    ``pipeline_cls.lora_state_dict``, whose return value differs between the pipelines (a dict; (dict, alphas);
    with the metadata last)."""
    kw: dict[str, Any] = {"weight_name": weight, "use_safetensors": True}
    params = inspect.signature(pipeline_cls.lora_state_dict).parameters
    kw["return_lora_metadata"] = True
    if "return_alphas" in params:
        kw["return_alphas"] = True
    out = pipeline_cls.lora_state_dict(str(folder), **kw)
    parts = list(out) if isinstance(out, tuple) else [out]
    state = parts.pop(0)
    metadata = parts.pop() if parts else None
    alphas = parts.pop(0) if parts else None
    return state, alphas, metadata
