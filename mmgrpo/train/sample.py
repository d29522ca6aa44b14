"""``mmgrpo sample``: Best-of-N inference with a (trained) diffusion/flow policy.

    mmgrpo sample --run runs/sd3_flow_grpo --prompts "a red circle" --best-of 8 --reward shapes --out best/
    mmgrpo sample --model ckpt/sd3 --family sd3 --prompts-file prompts.txt --best-of 4 \
        --reward jpeg_incompressibility --out best/
    mmgrpo sample --model ckpt/sd3 --family sd3 --lora style.safetensors --prompts "a red circle" --best-of 4 ...

Best-of-N (rejection sampling against a reward; e.g. "Scaling Laws for Reward Model Overoptimization", Gao et
al. 2022, sec. 2.1) draws N samples per prompt with N seeds, scores each with the reward and keeps the argmax.
The base model is loaded exactly as the training recipe loads it (``mmgrpo.pipelines.text_to_image.load_adapter``);
with ``--run``/``--checkpoint`` the denoiser gets the run's LoRA options and the trained weights (strictly: a
checkpoint that lacks a trainable parameter, or holds one the model does not have, is a UserError). ``--lora``
merges a LoRA into the base model as ``policy.options.init_lora`` does (:mod:`mmgrpo.policies.init_lora`).

Sampling is the policy's deterministic ODE (noise level 0) by default; ``--noise-level a`` samples the SDE
(``policy.options.sde.kind``) at that level. Sample j of every prompt uses seed ``--seed + j``, so one sample is
reproduced by asking for that seed alone, and the result does not depend on ``--batch-size``: each sample draws its
noise from its own generator, so another batch changes a sample only by the float rounding of a batched forward
(1e-7 of a pixel on a CPU), not its noise. The N samples of a prompt are drawn :data:`DEFAULT_BATCH` (8) a
forward unless ``--batch-size`` says otherwise (``0``: all N in one batch, which ran out of memory with a large N
when it was the default).

Writes into ``--out``: ``best_<i>.png`` (``.mp4`` for video) per prompt, ``grid.png`` (one row of N samples per
prompt, the best framed in green; video: first frames) and ``scores.json`` (prompt, seeds, scores, best index).
Shapes: P prompts, N = ``--best-of`` samples per prompt, images [N, 3, H, W] or videos [N, F, 3, H, W].
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from mmgrpo import rewards as reward_registry
from mmgrpo.core.config_yaml import option_value
from mmgrpo.core.dtypes import missing_device
from mmgrpo.core.errors import UserError, first_line, out_of_memory
from mmgrpo.core.files import check_image, check_output_folder, open_video, staged_folder
from mmgrpo.core.schema import options_from
from mmgrpo.core.types import RewardContext
from mmgrpo.data.prompts import Prompt, decoded_meta, read_prompts
from mmgrpo.policies.diffusion import DiffusionPolicy
from mmgrpo.policies.diffusion_options import MAX_GUIDANCE
from mmgrpo.policies.exploration import FullOptions
from mmgrpo.policies.loading import GeneratorPolicyOptions, load_adapter, runnable_attention
from mmgrpo.train.checkpoint import CorruptCheckpoint, latest_valid_checkpoint, load_checkpoint, verify_checkpoint
from mmgrpo.train.components import PIPELINES
from mmgrpo.train.config import load_config
from mmgrpo.train.media import checked_fps, checked_images, image_grid, video_fps, write_mp4
from mmgrpo.train.scoring import call_reward

BEST_COLOUR = (0.1, 0.8, 0.2)  # frame of the best sample in grid.png
DEFAULT_BATCH = 8
"""samples a forward when ``--batch-size`` is not given (fewer when N is smaller)"""
CELL_MIN, CELL_MAX = 128, 256  # grid cells are enlarged (nearest) below / shrunk above these sides (pixels)


# ---------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmgrpo sample",
        description="Best-of-N sampling: N samples per prompt, scored by a reward; the best is kept.",
    )
    p.add_argument("--config", nargs="+", metavar=("CONFIG", "KEY=VALUE"),
                   help="YAML config (and dotted overrides) whose policy.options give the model")  # fmt: skip
    p.add_argument("--model", help="base model: a folder (diffusers layout) or a hub id (org/name); overrides "
                   "the config's policy.options.path")  # fmt: skip
    p.add_argument("--family", help="model family of --model (sd3, flux, wan, hunyuan_video, sd)")
    ck = p.add_mutually_exclusive_group()
    ck.add_argument("--run", help="run directory: its config.yaml's LoRA options and its latest checkpoint")
    ck.add_argument("--checkpoint", help="checkpoint folder (runs/<name>/checkpoints/step_XXXXXX)")
    p.add_argument("--ema", action="store_true", help="load the checkpoint's EMA weights (trainer.ema_decay runs)")
    p.add_argument("--lora", help="a LoRA merged into the model before sampling, as policy.options.init_lora: a "
                   "diffusers LoRA folder or one .safetensors file (kohya / ComfyUI layouts too), or its hub id; not "
                   "with --run / --checkpoint, whose config.yaml names the run's own")  # fmt: skip
    pr = p.add_mutually_exclusive_group(required=True)
    pr.add_argument("--prompts", nargs="+", metavar="PROMPT", help="prompts, each one quoted")
    pr.add_argument("--prompts-file", help="text file, one prompt per line ('shapes': the held-out shapes prompts); "
                    "or a .jsonl / .json / .csv file with a 'prompt' field and, for image-to-video, an 'image' or "
                    "'video' field (the first frame; a relative path is relative to the file)")  # fmt: skip
    p.add_argument("--image", help="image-to-video: the first frame of every --prompts prompt (an image, or an .mp4 "
                   "whose first frame is used)")  # fmt: skip
    p.add_argument("--best-of", type=int, required=True, metavar="N", help="samples per prompt")
    p.add_argument("--reward", required=True, help="reward name (see `mmgrpo list`) or dotted path")
    p.add_argument("--reward-option", action="append", default=[], metavar="KEY=VALUE",
                   help="reward factory option (YAML value); repeatable")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="sample j of every prompt uses seed SEED + j")
    p.add_argument("--steps", type=int, help="sampling steps T (default: the config's num_steps)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the config's)")
    p.add_argument("--noise-level", type=float, default=0.0, help="0 = ODE sampling; > 0 = SDE at this level")
    p.add_argument("--batch-size", type=int, default=None, help=f"samples per forward batch (default: "
                   f"{DEFAULT_BATCH}, or N when smaller; 0 = all N at once); the samples do not depend on it (but for "
                   "float rounding), so lower it when a batch runs out of memory")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="weights dtype: float32, bfloat16, float16 (default: the config's)")
    p.add_argument("--out", required=True, help="output folder")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.best_of < 1:
        raise UserError(f"--best-of must be >= 1, got {args.best_of}")
    if args.best_of > MAX_BEST_OF:  # 10**12 ran until the out-of-memory killer ended it (exit 137, no message)
        raise UserError(f"--best-of {args.best_of}: at most {MAX_BEST_OF} samples a prompt (a prompt's samples are "
                        "all kept in memory to pick the best, and shown in one row of grid.png); run several "
                        "commands with different --seed values for more")  # fmt: skip
    if args.batch_size is not None and args.batch_size < 0:
        raise UserError(f"--batch-size must be >= 0, got {args.batch_size}")
    if not (math.isfinite(args.noise_level) and args.noise_level >= 0):
        raise UserError(f"--noise-level must be a finite number >= 0 (0 = ODE), got {args.noise_level}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1 sampling steps, got {args.steps}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and 1 <= args.guidance <= MAX_GUIDANCE):
        raise UserError(f"--guidance must be a finite scale from 1 to {MAX_GUIDANCE:g} (1 = no guidance), got "
                        f"{args.guidance}")  # fmt: skip
    if args.ema and not (args.run or args.checkpoint):
        raise UserError("--ema loads a checkpoint's EMA weights; give --run RUN_DIR or --checkpoint CKPT_DIR too")
    top = SEED_MAX - (args.best_of - 1)
    if not 0 <= args.seed <= top:  # sample j uses seed + j, and a torch.Generator takes a 64-bit signed seed
        raise UserError(f"--seed {args.seed}: sample j of a prompt uses seed + j, so --seed must be an integer in "
                        f"[0, {top}] with --best-of {args.best_of}, e.g. --seed 0")  # fmt: skip
    if args.device is not None:
        check_device(args.device)
    return args


SEED_MAX = 2**63 - 1
"""the largest seed a torch.Generator takes"""
MAX_BEST_OF = 1024
"""the most samples a prompt (``--best-of``, ``best_of_n``'s ``n``): they are held in memory together"""


def check_device(text: str) -> torch.device:
    """``--device`` as a torch device this machine has (cpu, cuda, cuda:N, mps), else a UserError naming it."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--device {text!r} is not a device; give cpu, cuda or cuda:N (or leave --device out: cuda "
                        "when available)") from e  # fmt: skip
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {text!r}: sampling runs on cpu, cuda (cuda:N) or mps")
    why = missing_device(device)
    if why:
        raise UserError(f"--device {text}: {why}; use --device cpu (or leave --device out)")
    return device


def parse_reward_options(items: list[str]) -> dict[str, Any]:
    """``["quality=90", "mode=hard"]`` -> ``{"quality": 90, "mode": "hard"}`` (values read as the config's overrides
    read theirs, :func:`mmgrpo.core.config_yaml.option_value`)."""
    out: dict[str, Any] = {}
    for text in items:
        key, eq, raw = text.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--reward-option {text!r} is not of the form key=value (e.g. quality=90)")
        out[key.strip()] = option_value(raw, f"--reward-option {text!r}", f"--reward-option \"{key.strip()}='{raw}'\"")
    return out


VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".avi", ".mkv")
"""an ``--image`` named so is a video whose first frame is used"""
FRAME_KEYS = ("image", "video")
"""the fields of a prompt that name an image-to-video model's first frame (as the image_to_video recipe's pairs)"""


def collect_prompts(prompts: list[str] | None, prompts_file: str | None, image: str | None = None) -> list[str]:
    """The prompts to sample, their first frames (``--image``, or a prompt file's ``image`` / ``video`` fields,
    relative to the file as the recipe's pairs are) resolved and opened here, before the model loads."""
    if image is not None and prompts is None:
        raise UserError("--image gives the first frame of every --prompts prompt; a --prompts-file names each "
                        "prompt's own (an 'image' or 'video' field of its rows)")  # fmt: skip
    got = [p.strip() for p in prompts] if prompts is not None else read_prompts(prompts_file, "heldout", 0)
    got = [p for p in got if p]
    if not got:
        raise UserError('no prompts: give --prompts "a red circle" ... or --prompts-file FILE (one per line)')
    if image is not None:
        key = "video" if Path(image).suffix.lower() in VIDEO_SUFFIXES else "image"
        return [with_frame(Prompt(p, {key: image}), Path.cwd(), "--image") for p in got]
    base = Path(prompts_file).resolve().parent if prompts_file and Path(prompts_file).is_file() else Path.cwd()
    return [with_frame(p, base, f"prompt file '{prompts_file}'") for p in got]


def with_frame(prompt: str, base: Path, where: str) -> str:
    """``prompt`` with its first frame (``meta['image']`` / ``meta['video']``, a path relative to ``base``) made
    absolute and opened (a missing or corrupt file is named now, not after the model has loaded); a prompt without
    one as it is."""
    meta = getattr(prompt, "meta", None) or {}
    keys = [k for k in FRAME_KEYS if isinstance(meta.get(k), str)]
    if not keys:
        return prompt
    # relative to the file (an absolute path stays as it is); one found only from the working directory, as such
    # paths were read before, stays so
    frames = {k: str(base / meta[k]) if (base / meta[k]).exists() or not Path(meta[k]).exists() else meta[k]
              for k in keys}  # fmt: skip
    for k, path in frames.items():
        check_image(path, where) if k == "image" else open_video(path, where)
    return Prompt(str(prompt), {**meta, **frames})


def needs_frames(run: str | None, checkpoint: str | None, config: list[str] | None, prompts: list[str]) -> None:
    """An image-to-video run (its config's pipeline) sampled with prompts that carry no first frame: refused before
    the model loads, naming --image (the adapter said "give meta['image']" after loading it)."""
    if all(any(k in (getattr(p, "meta", None) or {}) for k in FRAME_KEYS) for p in prompts):
        return
    where = Path(run) / "config.yaml" if run else (Path(checkpoint).parent.parent / "config.yaml" if checkpoint
                                                    else Path(config[0]) if config else None)  # fmt: skip
    try:
        overrides = config[1:] if config and not run and not checkpoint else []
        pipeline = load_config(where, overrides).pipeline if where is not None and where.is_file() else None
    except UserError:  # the config's own errors are reported where the model is built
        return
    if pipeline == "image_to_video":
        raise UserError(f"{where} trains image-to-video: every prompt needs its first frame; give --image PATH (one "
                        "frame for every --prompts prompt), or --prompts-file pairs.jsonl with an 'image' (or "
                        "'video') field per row, relative to the file")  # fmt: skip


# ---------------------------------------------------------------------------------------------- model
def find_checkpoint(run: str | None, checkpoint: str | None) -> tuple[Path | None, Path | None]:
    """(checkpoint folder, the run's config.yaml or None) for ``--run`` / ``--checkpoint``; (None, None) if neither."""

    if run:
        run_dir = Path(run)
        if not run_dir.is_dir():
            what = "is a file, not a folder" if run_dir.exists() else "not found"
            raise UserError(f"run directory '{run}' {what} (give --run runs/<name>)")
        ckpt, notes = latest_valid_checkpoint(run_dir / "checkpoints")
        if ckpt is None:
            why = f" ({'; '.join(notes)})" if notes else ""
            raise UserError(
                f"run directory '{run}' has no complete checkpoint under checkpoints/ that verifies{why}; "
                "train longer (trainer.checkpoint_every) or sample the base model without --run"
            )
        for note in notes:  # as resume does: the newest checkpoint that verifies, and why newer ones were skipped
            print(f"note: skipped a damaged checkpoint: {note}; sampling {ckpt}", file=sys.stderr)
        cfg = run_dir / "config.yaml"
        return ckpt, cfg if cfg.is_file() else None
    if checkpoint:
        ckpt = Path(checkpoint)
        if not (ckpt / "state.json").is_file() or not (ckpt / "tensors.safetensors").is_file():
            raise UserError(f"checkpoint '{checkpoint}' is not a checkpoint folder (state.json + tensors.safetensors);"
                            " give runs/<name>/checkpoints/step_XXXXXX or --run runs/<name>")  # fmt: skip
        try:
            verify_checkpoint(ckpt)
        except CorruptCheckpoint as e:
            raise UserError(
                f"--checkpoint '{checkpoint}' is damaged: {e}; give another checkpoint of the run, or "
                "--run RUN_DIR for its newest checkpoint that verifies"
            ) from e
        cfg = ckpt.parent.parent / "config.yaml"  # runs/<name>/checkpoints/step_XXXXXX -> runs/<name>/config.yaml
        return ckpt, cfg if cfg.is_file() else None
    return None, None


def output_guard(run: str | None, checkpoint: str | None) -> Path | None:
    """The run directory that ``--out`` must stay out of: ``--run``, or the run holding ``--checkpoint`` (a folder
    that is no run directory is refused later, by :func:`find_checkpoint`)."""
    folder = Path(run) if run else Path(checkpoint).parent.parent if checkpoint else None
    return folder if folder is not None and (folder / "config.yaml").is_file() else None


def generator_options(cfg: Any, where: str) -> Any:
    """The ``GeneratorPolicyOptions`` (or subclass) of a config whose pipeline samples a diffusion model."""

    PIPELINES.load()
    cls = PIPELINES.get(cfg.pipeline).policy_options
    if cls is None or not issubclass(cls, GeneratorPolicyOptions):
        raise UserError(
            f"pipeline {cfg.pipeline!r} of {where} is not a diffusion/flow generator recipe; "
            "mmgrpo sample works with text_to_image-style configs (or give --model PATH --family F)"
        )
    return options_from(cls, cfg.policy.options, where, "policy.options")


LORA_KEYS = ("lora_rank", "lora_alpha", "lora_targets", "init_lora", "init_lora_sha256")
"""what the checkpoint's trained weights mean, so taken from the run that wrote it: its adapter's shape, and the
LoRA merged into the base before training (policy.options.init_lora)"""


def resolve_policy_options(
    config: Any | None, run_config: Any | None, model: str | None, family: str | None, with_lora: bool
) -> Any:
    """Policy options for sampling: from --config, else the run's config, else defaults; --model/--family win.

    The LoRA options (:data:`LORA_KEYS`) always come from the run that wrote the checkpoint when its config is known
    (they must match the saved weights, which train on top of the run's ``init_lora``); without a checkpoint the
    trainable LoRA is dropped (it would start as the identity).
    """

    opts = generator_options(config, "--config") if config is not None else None
    run_opts = generator_options(run_config, "the run's config.yaml") if run_config is not None else None
    opts = opts or run_opts or GeneratorPolicyOptions()
    if run_opts is not None:
        opts = dataclasses.replace(opts, **{k: getattr(run_opts, k) for k in LORA_KEYS})
    if not with_lora:
        opts = dataclasses.replace(opts, lora_rank=0)
    if model:
        opts = dataclasses.replace(opts, path=model)
    if family:
        opts = dataclasses.replace(opts, family=family)
    if not opts.path:
        raise UserError("no model to sample: give --model PATH --family FAMILY, --config CONFIG, or --run RUN_DIR")
    return opts


def full_exploration(current: Any) -> FullOptions:
    """Every step sampled and scored the same way; a full schedule keeps its selection (it decides whether
    planning draws from the global generator)."""
    if isinstance(current, FullOptions):
        return dataclasses.replace(current, timestep_fraction=1.0)
    return FullOptions()


def sampling_options(opts: Any, steps: int | None, guidance: float | None) -> Any:
    """The options for inference: every step sampled the same way, no reference, no training helpers."""
    return dataclasses.replace(
        opts,
        num_steps=opts.num_steps if steps is None else steps,
        guidance_scale=opts.guidance_scale if guidance is None else guidance,
        exploration=full_exploration(opts.exploration),
        reference_kl=False,
        gradient_checkpointing=False,
    )


def load_trained_weights(
    model: nn.Module, ckpt_dir: str | Path, ema: bool = False, verified: bool = False
) -> list[str]:
    """Copy a checkpoint's trainable weights (``load_checkpoint(path)["model"]``) into ``model``; their names.

    Strict both ways: every trainable parameter of ``model`` must be in the checkpoint, every checkpoint
    tensor must exist in ``model`` with the same shape (else the LoRA options differ from the run's).
    ``ema=True`` loads the EMA shadow instead (a list in the order of the checkpoint's ``model`` entries).
    ``verified``: the caller has just checked the files against their marker (:func:`find_checkpoint` does); their
    SHA-256s are not computed again (minutes for a checkpoint of many GB).
    """

    try:
        state = load_checkpoint(ckpt_dir, verify=not verified)
    except CorruptCheckpoint as e:
        raise UserError(f"checkpoint {ckpt_dir} is damaged: {e}; use another checkpoint of the run") from e
    weights: dict[str, torch.Tensor] = dict(state["model"])
    if ema:
        shadow = (state.get("ema") or {}).get("shadow")
        if shadow is None:
            raise UserError(
                f"checkpoint {ckpt_dir} has no EMA weights (the run had trainer.ema_decay null); drop --ema"
            )
        if len(shadow) != len(weights):
            raise UserError(f"checkpoint {ckpt_dir}: {len(shadow)} EMA tensors for {len(weights)} trainable ones")
        weights = dict(zip(weights, shadow))
    own = model.state_dict()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    hint = ("the model was built with other LoRA options (policy.options.lora_rank / lora_targets) than the run "
            "that wrote it; sample with --run RUN_DIR or the run's --config")  # fmt: skip
    missing = [n for n in trainable if n not in weights]
    if missing:
        raise UserError(f"checkpoint {ckpt_dir} lacks {len(missing)} trainable parameters, e.g. {missing[:3]}: {hint}")
    unexpected = [n for n in weights if n not in own]
    if unexpected:
        raise UserError(f"checkpoint {ckpt_dir} holds {len(unexpected)} tensors the model does not have, "
                        f"e.g. {unexpected[:3]}: {hint}")  # fmt: skip
    for n, w in weights.items():
        if tuple(w.shape) != tuple(own[n].shape):
            raise UserError(f"checkpoint {ckpt_dir}: {n} has shape {tuple(w.shape)}, the model "
                            f"{tuple(own[n].shape)}: {hint}")  # fmt: skip
    model.load_state_dict(weights, strict=False)
    return list(weights)


def build_policy(args: argparse.Namespace) -> tuple[Any, Path | None, Any]:
    """(DiffusionPolicy in eval mode with the trained weights, checkpoint folder or None, its options)."""

    ckpt, run_cfg_path = find_checkpoint(args.run, args.checkpoint)
    config = load_config(args.config[0], args.config[1:]) if args.config else None
    run_config = load_config(run_cfg_path) if run_cfg_path is not None else None
    if ckpt is not None and run_config is None and config is None:
        raise UserError(f"checkpoint {ckpt} is not inside a run directory with a config.yaml, so its LoRA options "
                        "are unknown; give the run's --config CONFIG too")  # fmt: skip
    opts = resolve_policy_options(config, run_config, args.model, args.family, with_lora=ckpt is not None)
    if getattr(args, "lora", None):
        if ckpt is not None:
            raise UserError(f"--lora {args.lora} with a checkpoint ({ckpt}): the checkpoint's weights trained on "
                            "top of its run's own start LoRA (policy.options.init_lora in its config.yaml, used as "
                            "it is); drop --lora, or sample the base model with it")  # fmt: skip
        opts = dataclasses.replace(opts, init_lora=args.lora, init_lora_sha256="")
    if args.dtype:
        opts = dataclasses.replace(opts, dtype=args.dtype)
    opts = sampling_options(opts, args.steps, args.guidance)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    opts = runnable_attention(opts, device, "mmgrpo sample")
    policy = DiffusionPolicy(load_adapter(opts, device), opts)
    if ckpt is not None:
        load_trained_weights(policy.unwrapped(), ckpt, ema=args.ema, verified=True)  # find_checkpoint verified it
    policy.model.eval().requires_grad_(False)
    return policy, ckpt, opts


def scores_videos(name: str, reward_fn: Any, policy: DiffusionPolicy, opts: Any) -> None:
    """A video reward (``scores = "videos"``, e.g. motion) with a model that draws images: refused once the model
    is known, before any drawing (the reward failed on the first prompt's samples after they were drawn)."""
    video = "videos" in (getattr(reward_fn, "scores", None), getattr(reward_registry.resolve(name), "scores", None))
    if video and len(policy.adapter.latent_shape()) != 4:  # (C, F, h, w): a video family's; (C, h, w): an image's
        raise UserError(f"--reward {name} scores videos, but the model ({opts.family}, {opts.path}) draws images; "
                        "pick an image reward (e.g. clip_score, aesthetic, jpeg_compressibility)")  # fmt: skip


# ---------------------------------------------------------------------------------------------- best of N
def sample_seeds(seed: int, n: int) -> list[int]:
    """Seeds of the N samples of every prompt: seed, seed + 1, ..., seed + N - 1."""
    return [seed + j for j in range(n)]


def best_index(scores: torch.Tensor) -> int:
    """argmax of ``scores [N]`` ignoring NaN (rows the reward does not apply to); ties go to the first."""
    if torch.isnan(scores).all():
        raise UserError("the reward returned no value (None/NaN) for any sample of a prompt; pick a reward "
                        "that applies to these prompts")  # fmt: skip
    return int(torch.where(torch.isnan(scores), -math.inf, scores).argmax())


def batch_step(batch_size: int | None, n: int) -> int:
    """Samples a forward: ``batch_size`` (0: all ``n``; None: :data:`DEFAULT_BATCH`), at most ``n``."""
    return min(n, batch_size or (n if batch_size == 0 else DEFAULT_BATCH))


def draw(policy: Any, prompt: str, seeds: list[int], noise_level: float, batch_size: int | None) -> torch.Tensor:
    """N samples of one prompt, ``batch_step(batch_size, N)`` per forward: [N, 3, H, W] (or [N, F, 3, H, W]) in
    [0, 1]; the same whatever the batch (each sample's noise comes from the generator of its seed)."""
    step = batch_step(batch_size, len(seeds))
    meta = decoded_meta(prompt)  # a prompt file's other fields, as training hands them on
    try:
        parts = [
            policy.generate([prompt] * len(chunk), chunk, meta=[dict(meta) for _ in chunk], noise_level=noise_level)
            .float()
            .cpu()
            for chunk in (seeds[i : i + step] for i in range(0, len(seeds), step))
        ]
    except (RuntimeError, MemoryError) as e:
        if not (isinstance(e, MemoryError) or out_of_memory(e)):
            raise
        smaller = max(1, step // 4)
        raise UserError(
            f"out of memory drawing {step} samples in one batch ({first_line(e)}): pass a smaller --batch-size, "
            f"e.g. --batch-size {smaller} (the samples do not depend on it; nothing was written to --out)"
        ) from e
    return torch.cat(parts)


def score_group(reward_fn: Any, reward_name: str, samples: torch.Tensor, prompt: str) -> torch.Tensor:
    """Scores [N] of one prompt's N samples (scored as one group: group-aware rewards see them together), through
    the trainer's checks: an exception is a UserError naming the reward, NaN is "does not apply" only for a reward
    that declares it."""
    n = samples.shape[0]
    ctx = RewardContext(group_size=n, step=0, group=torch.zeros(n, dtype=torch.long))
    metas = [decoded_meta(prompt) for _ in range(n)]
    return call_reward(reward_name, reward_fn, samples, [prompt] * n, metas, ctx, where="scoring the samples")


# ---------------------------------------------------------------------------------------------- outputs
def framed(images: torch.Tensor, best: int, width: int, colour: tuple[float, float, float] = BEST_COLOUR):
    """Images [n, 3, H, W] -> [n, 3, H + 2w, W + 2w]: a white frame, ``colour`` around image ``best``."""
    n, c, H, W = images.shape
    out = torch.ones(n, c, H + 2 * width, W + 2 * width)
    out[best] = torch.tensor(colour)[:, None, None]
    out[:, :, width : width + H, width : width + W] = images.float().clamp(0, 1)
    return out


def grid_row(images: torch.Tensor, best: int) -> Image.Image:
    """One prompt's row of the grid: images [N, 3, H, W] side by side, the best framed, cells of 128..256 px."""

    H = images.shape[-2]
    row = image_grid(framed(images, best, width=max(1, H // 16)), ncol=images.shape[0], scale=max(1, CELL_MIN // H))
    if H > CELL_MAX:  # keep grid.png small for large images
        row = row.resize((round(row.width * CELL_MAX / H), round(row.height * CELL_MAX / H)), Image.BILINEAR)
    return row


def stack_rows(rows: list[Image.Image]) -> Image.Image:
    canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        canvas.paste(r, (0, y))
        y += r.height
    return canvas


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> [H, W, 3] uint8, rounded as the rewards round (x * 255).round()."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def save_best(sample: torch.Tensor, path_stem: str | Path, fps: float | None = None) -> Path:
    """One sample at full resolution: [3, H, W] -> .png, [F, 3, H, W] -> .mp4 playing at ``fps`` (the model's
    rate, :func:`~mmgrpo.train.media.video_fps`; a video without it, or with one that is not a finite number > 0,
    is a ValueError, not a guess). A sample that is not floats in [0, 1] (uint8 0..255 was saved all white), not
    finite, or empty is a ValueError (:func:`~mmgrpo.train.media.checked_images`)."""
    sample = checked_images(sample, "save_best", {3: "an image [3, H, W]", 4: "a video [F, 3, H, W]"})
    path_stem = Path(path_stem)
    if sample.shape[-3] == 1:  # grey: PIL and ffmpeg take RGB
        sample = sample.expand(*sample.shape[:-3], 3, *sample.shape[-2:])
    if sample.dim() == 3:
        path = path_stem.with_suffix(".png")
        Image.fromarray(to_uint8(sample)).save(path)
        return path
    fps = checked_fps(fps, "save_best")
    return write_mp4(path_stem.with_suffix(".mp4"), [to_uint8(f) for f in sample], fps)


def _json_score(x: float) -> float | None:
    return None if math.isnan(x) else x


def best_of_n(
    policy: Any,
    reward_fn: Any,
    reward_name: str,
    prompts: list[str] | str,
    n: int,
    out_dir: str | Path,
    seed: int = 0,
    noise_level: float = 0.0,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Draw N samples per prompt, score them, write best_<i>, grid.png; return one record per prompt.

    ``prompts``: a list of prompts, or one prompt as a str (a str was iterated character by character, a prompt
    a letter); ``n`` >= 1 samples each. No prompts, or ``n`` below 1, is a ValueError before anything is drawn
    (they failed in ``max()`` / ``range()``)."""
    from tqdm.auto import tqdm

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("best_of_n: no prompts; give a list of prompts (or one prompt as a str)")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= MAX_BEST_OF:
        raise ValueError(f"best_of_n: n={n!r} samples per prompt; give an integer in [1, {MAX_BEST_OF}] (the N of "
                         "best-of-N; a prompt's N samples are held in memory together)")  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = sample_seeds(seed, n)
    rows, records = [], []
    for i, prompt in enumerate(tqdm(prompts, desc="best-of-n", unit="prompt", disable=progress is False)):
        samples = draw(policy, prompt, seeds, noise_level, batch_size)  # [N, 3, H, W] or [N, F, 3, H, W]
        scores = score_group(reward_fn, reward_name, samples, prompt)  # [N]
        j = best_index(scores)
        path = save_best(samples[j], out / f"best_{i}", fps=video_fps(policy))
        rows.append(grid_row(samples if samples.dim() == 4 else samples[:, 0], j))
        records.append({
            "prompt": prompt, "seeds": seeds, "scores": [_json_score(float(s)) for s in scores],
            "best_index": j, "best_seed": seeds[j], "best_score": float(scores[j]), "file": path.name,
            **{k: v for k, v in (getattr(prompt, "meta", None) or {}).items() if k in FRAME_KEYS},  # its first frame
        })  # fmt: skip
    stack_rows(rows).save(out / "grid.png")
    return records


def main(argv: list[str] | None = None) -> int:
    """``mmgrpo sample ...`` (user errors propagate as UserError; the ``mmgrpo`` CLI prints them)."""

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    check_output_folder(args.out, "--out", run_dir=output_guard(args.run, args.checkpoint))
    prompts = collect_prompts(args.prompts, args.prompts_file, args.image)
    needs_frames(args.run, args.checkpoint, args.config, prompts)
    # checked as a config's rewards.N.options are (types, finite numbers, the factory's own range check), before
    # the model loads: fail fast on a typo
    reward_options = reward_registry.check_command_line_options(
        args.reward, parse_reward_options(args.reward_option), "--reward-option"
    )
    reward_fn = reward_registry.get(args.reward, **reward_options)
    policy, ckpt, opts = build_policy(args)
    scores_videos(args.reward, reward_fn, policy, opts)
    torch.manual_seed(args.seed)
    with staged_folder(args.out) as tmp:  # whole or not at all: a failure mid-way leaves no half-written --out
        records = best_of_n(policy, reward_fn, args.reward, prompts, args.best_of, tmp, seed=args.seed,
                            noise_level=args.noise_level, batch_size=args.batch_size)  # fmt: skip
        summary = {
            "model": opts.path, "family": opts.family, "checkpoint": str(ckpt) if ckpt else None, "ema": args.ema,
            "lora": opts.init_lora or None,
            "reward": args.reward, "reward_options": reward_options, "best_of": args.best_of, "seed": args.seed,
            "steps": opts.num_steps, "guidance": opts.guidance_scale, "noise_level": args.noise_level,
            "sde": opts.sde.kind if args.noise_level > 0 else "ode", "prompts": records,
        }  # fmt: skip
        (tmp / "scores.json").write_text(json.dumps(summary, indent=2))
    mean_best = float(np.mean([r["best_score"] for r in records]))
    print(f"best-of-{args.best_of} for {len(records)} prompts: mean best {args.reward} = {mean_best:.4f}; "
          f"wrote {Path(args.out) / 'best_*.png|mp4'}, grid.png, scores.json")  # fmt: skip
    return 0
