"""Model weights are read from safetensors only: a folder whose weights exist only as pickles is refused.

A pickle (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``, ``*.pkl``) can run code when it is loaded; diffusers and
transformers would load one (diffusers only warns). Every model loader passes ``use_safetensors=True`` and calls
:func:`refuse_pickle_weights` first, so the user gets one paragraph naming the folder and the one-time conversion
instead of a library's "file not found".
"""

from __future__ import annotations

from pathlib import Path

from mmgrpo.core.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

NO_HUB_KERNELS = {"use_kernels": False}
"""``from_pretrained`` keyword of every transformers model mmgrpo loads (the VLM, its listener / teachers, CLIP
reward models, the diffusion pipelines' text encoders). Newer transformers (5.2x) turn the ``kernels`` package's hub
layers on by default: at the model's first ``train()`` / ``eval()`` switch on a GPU they replace RMSNorm, rotary and
activation layers by code downloaded from the Hugging Face hub (remote code the user did not ask for; a network fetch
that fails on an offline machine, mid-run), and the set for training differs from the set for inference (a policy's
rollout and update could run different layers: ratio != 1). Each switch also re-kernelizes the model (0.6 ms a switch
on CPU, four a VLM step). A VLM opts in with ``policy.options.hub_kernels``."""


def pickle_only_folders(path: str | Path) -> list[Path]:
    """``path`` and its direct subfolders (a diffusers layout) that hold pickled weights but no safetensors file."""
    root = Path(path)
    if not root.is_dir():
        return []  # a hub id: use_safetensors=True makes the library refuse a pickle-only repository
    found = []
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        files = [f for f in folder.iterdir() if f.is_file()]
        has_pickle = any(f.suffix in PICKLE_SUFFIXES and f.name != "training_args.bin" for f in files)
        if has_pickle and not any(f.name.endswith(".safetensors") for f in files):
            found.append(folder)
    return found


def refuse_pickle_weights(path: str | Path, key: str, loader: str) -> None:
    """Raise a UserError when ``path`` (config key ``key``) has pickle-only weights; ``loader`` is the
    ``module.Class`` whose ``from_pretrained`` / ``save_pretrained`` converts the folder."""
    bad = pickle_only_folders(path)
    if not bad:
        return
    module, _, cls = loader.rpartition(".")
    src = str(path).rstrip("/")
    convert = (
        f"python -c \"from {module} import {cls}; {cls}.from_pretrained('{src}')"
        f".save_pretrained('{src}-safetensors', safe_serialization=True)\""
    )
    raise UserError(
        f"{key}='{src}': {', '.join(str(b) for b in bad[:4])} hold(s) only pickled weights (.bin/.pt), which can run "
        f"code when loaded; mmgrpo reads safetensors only. If you trust the files, convert them once: "
        f"{convert} "
        f"(also copy any tokenizer/processor files it does not save), then point {key} at '{src}-safetensors'"
    )
