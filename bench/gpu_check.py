"""One-command GPU check: every adapter family's tiny model in bf16 on CUDA, realistic-size timings, 1-GPU FSDP.

    python bench/gpu_check.py                                # CUDA, < 10 min on one GPU; writes bench/results/gpu.md
    python bench/gpu_check.py --device cpu --tiny --out DIR  # what CI runs (tests/bench/test_gpu_check.py)

Sections, cheap and most informative first, each in its own try/except (a failing family or section is recorded
with its traceback and the others still run); the report (``gpu.md`` + ``gpu.json``) is rewritten after every row,
so a killed run still leaves its results, and sections are skipped (and reported as skipped) once
``--time-limit`` seconds are used up:

1. environment: versions, device, CUDA/cuDNN, bf16, SDPA backends, xformers;
2. tiny diffusion families (SD3, FLUX, SD1.5, SDXL, Wan, HunyuanVideo) through the real trainer: ratio = 1 at
   micro-batch 1 and G, noise 0 against the diffusers pipeline, optimizer steps (finite loss, only trainable
   tensors move), s/step, in fp32 / bf16 weights / fp32 weights + bf16 autocast, and xformers where installed;
3. tiny VLM families (Qwen2-VL, Qwen2.5-VL): the same contract, samples/s;
4. the README demo config (configs/shapes_t2i_grpo.yaml) for a few steps in fp32 and bf16;
5. realistic sizes from config, random weights (not in ``--tiny``): an SD3-medium-shaped transformer at 1024 px and
   a Qwen2-VL-2B-shaped VLM, forward+backward time, samples or tokens/s, peak memory;
6. 1-GPU FSDP (not in ``--tiny``, CUDA only): tiny SD3 through accelerate's FSDP plugin in a world-size-1 process;
7. ``pytest -m gpu tests/gpu`` (CUDA only).

On CPU only fp32 runs (bf16 on CPU is slow and not what the check is about), with smaller groups and fewer steps.

The policy option vocabulary is in one place, :func:`diffusion_policy_options` / :func:`vlm_policy_options` below:
the only code here that knows option names (adapt it when they change).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import inspect
import json
import math
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


# ============================================================================ option names (adapt here only)
def diffusion_policy_options(
    family: str,
    path: str,
    *,
    dtype: str = "float32",
    num_steps: int = 4,
    noise_level: float | None = None,
    sde: str | None = None,
    lora_rank: int = 2,
    attention: str = "sdpa",
    size: dict | None = None,
) -> dict:
    """``policy.options`` of a diffusion recipe (text_to_image / text_to_video) as YAML would give them.

    ``sde``/``noise_level`` None = the policy's defaults (flow_grpo at 0.7 for flow families).
    """
    opts: dict[str, Any] = {"family": family, "path": path, "dtype": dtype, "num_steps": num_steps}
    opts.update(lora_rank=lora_rank, attention=attention, **(size or {}))
    block = {}
    if sde is not None:
        block["kind"] = sde
    if noise_level is not None:
        block["noise_level"] = noise_level
    if block:
        opts["sde"] = block  # nested: sde: {kind, noise_level}
    return opts


def vlm_policy_options(model: str, *, dtype: str = "float32", max_new_tokens: int = 16, lora_rank: int = 8) -> dict:
    """``policy.options`` of the vlm_reasoning recipe (LoRA fine-tuning)."""
    return {
        "path": model,
        "dtype": dtype,
        "max_new_tokens": max_new_tokens,
        "finetune": "lora",
        "lora_rank": lora_rank,
        "lora_alpha": 2 * lora_rank,
    }


# how the UNet family (SD1.5/SDXL) samples: sde/noise_level overrides, see diffusion_policy_options
DDIM_FAMILY = {"sde": "ddim", "noise_level": 1.0}

# rewards that always vary within a group (so every step has non-zero advantages and every trainable tensor moves)
IMAGE_REWARD = "gpu_check_brightness"
TEXT_REWARD = "gpu_check_length"


def register_check_rewards() -> None:
    """Register :data:`IMAGE_REWARD` (mean pixel of each image or video) and :data:`TEXT_REWARD` (a checksum of the
    completion's characters in [0, 1): differs between different completions even when they have the same length)
    in mmgrpo's reward registry, once."""
    from mmgrpo.rewards.registry import REWARDS, register

    if IMAGE_REWARD not in REWARDS:
        register(IMAGE_REWARD, "gpu_check: mean pixel value")(
            lambda: lambda samples, prompts, meta, ctx: [float(s.float().mean()) for s in samples]
        )
    if TEXT_REWARD not in REWARDS:
        register(TEXT_REWARD, "gpu_check: character checksum of the completion")(
            lambda: lambda samples, prompts, meta, ctx: [sum(map(ord, str(s))) % 97 / 97 for s in samples]
        )


# ============================================================================ end of option names

RATIO_TOL = {"fp32": 1e-4, "bf16": 2e-2, "amp_bf16": 2e-2, "xformers": 2e-2}  # OK / WARN threshold of |ratio - 1|


# ---------------------------------------------------------------------------- report
class Report:
    """Sections of rows, rewritten to ``gpu.md`` and ``gpu.json`` after every change."""

    def __init__(self, out: Path | None, command: str, time_limit: float):
        self.out = out
        self.t0 = time.perf_counter()
        self.time_limit = time_limit
        self.data: dict[str, Any] = {
            "command": command,
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "device": "?",
            "wall_s": 0.0,
            "finished": False,
            "sections": [],
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.time_limit - self.elapsed()

    def section(self, name: str, note: str = "") -> dict:
        sec = {"name": name, "status": "running", "note": note, "rows": [], "error": None, "wall_s": 0.0}
        self.data["sections"].append(sec)
        self.write()
        return sec

    def row(self, sec: dict, what: str, result: str, **numbers: Any) -> dict:
        r = {"what": what, "result": result, "numbers": {k: _clean(v) for k, v in numbers.items()}}
        sec["rows"].append(r)
        self.write()
        return r

    def write(self) -> None:
        self.data["wall_s"] = round(self.elapsed(), 1)
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu.json").write_text(json.dumps(self.data, indent=1))
        (self.out / "gpu.md").write_text(self.markdown())

    def markdown(self) -> str:
        d = self.data
        lines = [
            "# GPU check",
            "",
            f"- command: `{d['command']}`",
            f"- date: {d['date']}",
            f"- device: {d['device']}",
            f"- total wall time: {d['wall_s']:.1f} s{'' if d['finished'] else ' (still running or killed)'}",
            "",
        ]
        for sec in d["sections"]:
            lines += [f"## {sec['name']}", "", f"status: **{sec['status']}** ({sec['wall_s']:.1f} s)"]
            if sec["note"]:
                lines += ["", sec["note"]]
            lines.append("")
            if sec["rows"]:
                lines += ["| what | result | numbers |", "|---|---|---|"]
                for r in sec["rows"]:
                    nums = ", ".join(f"{k}={_fmt(v)}" for k, v in r["numbers"].items())
                    lines.append(f"| {_cell(r['what'])} | {_cell(r['result'])} | {_cell(nums)} |")
                lines.append("")
            if sec["error"]:
                lines += ["```", sec["error"], "```", ""]
        return "\n".join(lines) + "\n"


def _clean(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if (abs(v) < 1e-2 or abs(v) >= 1e4) and v != 0 else f"{v:.4g}"
    if isinstance(v, list):
        return "[" + " ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", "<br>")


def error_text(e: BaseException, lines: int = 12) -> str:
    """``Type: message`` and the last traceback lines."""
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    tail = "".join(tb).rstrip().splitlines()[-lines:]
    return f"{type(e).__name__}: {e}\n" + "\n".join(tail)


@contextlib.contextmanager
def guarded_row(report: Report, sec: dict, what: str):
    """Run a row; on an exception record it as an error row (with the traceback) and go on."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every failure is a finding
        report.row(sec, what, "ERROR", error=error_text(e))
        sec["had_error"] = True


def run_section(report: Report, name: str, fn, *args, skip: str | None = None, note: str = "") -> None:
    sec = report.section(name, note)
    t0 = time.perf_counter()
    if skip is None and report.left() <= 0:
        skip = f"time limit ({report.time_limit:.0f} s) used up"
    if skip is not None:
        sec["status"] = f"skipped: {skip}"
        report.write()
        return
    try:
        fn(report, sec, *args)
        sec["status"] = "error in a row" if sec.pop("had_error", False) else "ok"
    except Exception as e:  # noqa: BLE001
        sec.pop("had_error", None)
        sec["status"] = "error"
        sec["error"] = error_text(e, lines=25)
    finally:
        sec["wall_s"] = round(time.perf_counter() - t0, 1)
        free_memory()
        report.write()


def out_of_time(report: Report, sec: dict, what: str) -> bool:
    if report.left() > 0:
        return False
    report.row(sec, what, "skipped: time limit")
    return True


# ---------------------------------------------------------------------------- helpers
def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_accelerator(device: str, mixed_precision: str):
    """A fresh single-process Accelerator on ``device`` (the previous one's settings reset, as the trainer does)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    if PartialState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision)


def xformers_status() -> str:
    try:
        import xformers  # noqa: F401
        import xformers.ops  # noqa: F401

        return f"installed {getattr(xformers, '__version__', '?')}"
    except Exception as e:  # noqa: BLE001
        return "not installed" if isinstance(e, ImportError) else f"import fails: {type(e).__name__}: {e}"


def variants_for(device: str) -> list[tuple[str, str, str, str]]:
    """(name, weights dtype, mixed precision, attention) of the tiny-model rows."""
    if device == "cpu":
        return [("fp32", "float32", "no", "sdpa")]
    out = [
        ("fp32", "float32", "no", "sdpa"),
        ("bf16", "bfloat16", "no", "sdpa"),
        ("amp_bf16", "float32", "bf16", "sdpa"),
    ]
    if xformers_status().startswith("installed"):
        out.append(("xformers", "bfloat16", "no", "xformers"))
    return out


def build_trainer(cfg_dict: dict, run_dir: Path, device: str, mixed_precision: str):
    from mmgrpo.train.config import load_config
    from mmgrpo.train.trainer import Trainer

    register_check_rewards()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, [f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}"], base=cfg_dict)
    return Trainer(cfg, run_dir, make_accelerator(device, mixed_precision))


def trainer_options(steps: int, prompts: int, group: int, mixed_precision: str, **kw) -> dict:
    return {
        "max_steps": steps, "prompts_per_step": prompts, "group_size": group, "lr": 1e-2, "progress": False,
        "mixed_precision": mixed_precision, "eval_every": 0, "sample_every": 0, "checkpoint_every": 0,
        "log_every": 1, **kw,
    }  # fmt: skip


def max_ratio_error(policy, rollout, micro: int) -> float:
    """max |exp(logp - logp_old) - 1| over trained units, recomputing ``micro`` rows at a time (no grad)."""
    worst = 0.0
    with torch.no_grad():
        for lo in range(0, rollout.num_rows, micro):
            rows = torch.arange(lo, min(lo + micro, rollout.num_rows))
            mask = rollout.train_mask[rows]
            units = mask.any(0).nonzero().reshape(-1)
            if len(units) == 0:
                continue
            lp = policy.log_prob(rollout, rows, units).logp.float().cpu()
            ratio = torch.exp(lp - rollout.logp_old[rows][:, units].float().cpu())
            err = (ratio - 1).abs().masked_select(mask[:, units].cpu())
            if err.numel():
                worst = max(worst, float(err.max()))
    return worst


def snapshot(model: torch.nn.Module) -> dict[str, tuple[bool, torch.Tensor]]:
    return {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}


def moved(before: dict, model: torch.nn.Module) -> tuple[int, int, int, list[str]]:
    """(trainable tensors changed, trainable tensors, frozen tensors changed, first frozen names changed)."""
    n_tr = n_tr_moved = n_fr_moved = 0
    frozen = []
    for n, p in model.named_parameters():
        trainable, old = before[n]
        changed = not torch.equal(old, p.detach())
        if trainable:
            n_tr += 1
            n_tr_moved += changed
        elif changed:
            n_fr_moved += 1
            frozen.append(n)
    return n_tr_moved, n_tr, n_fr_moved, frozen[:3]


def train_and_measure(trainer, device: str) -> dict:
    """trainer.train() from step 0; the steps' losses, s/step and what moved."""
    model = trainer.policy.unwrapped() if hasattr(trainer.policy, "unwrapped") else trainer.acc.unwrap_model(
        trainer.policy.model)  # fmt: skip
    before = snapshot(model)
    reset_peak(device)
    t0 = time.perf_counter()
    trainer.train()
    sync(device)
    wall = time.perf_counter() - t0
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [x for x in lines if "loss/total" in x or "loss/policy" in x]
    losses = [x.get("loss/total", x.get("loss/policy")) for x in steps]
    times = [x["time/step_s"] for x in steps if "time/step_s" in x]
    tr_moved, tr, fr_moved, frozen = moved(before, model)
    return {
        "steps": len(steps),
        "loss": losses,
        "loss_finite": all(isinstance(v, (int, float)) and math.isfinite(v) for v in losses) and bool(losses),
        "grad_norm": [x.get("grad_norm") for x in steps],
        "reward_mean": [x.get("reward/mean") for x in steps],
        "s_per_step_first": times[0] if times else None,
        "s_per_step": statistics.median(times[1:]) if len(times) > 1 else (times[0] if times else None),
        "train_wall_s": wall,
        "trainable_moved": f"{tr_moved}/{tr}",
        "frozen_moved": fr_moved,
        "frozen_moved_names": frozen,
        "peak_gib": peak_gib(device),
        "only_trainable_moved": fr_moved == 0 and tr_moved > 0,
    }


def verdict(ratio_err: float | None, tol: float, train: dict | None, pipe_diff: float | None = None,
            pipe_tol: float | None = None) -> str:  # fmt: skip
    bad = []
    if ratio_err is not None and not ratio_err <= tol:
        bad.append(f"|ratio-1|={ratio_err:.2g}>{tol:g}")
    if pipe_diff is not None and pipe_tol is not None and not pipe_diff <= pipe_tol:
        bad.append(f"pipeline diff {pipe_diff:.2g}>{pipe_tol:g}")
    if train is not None:
        if not train["loss_finite"]:
            bad.append("loss not finite")
        if not train["only_trainable_moved"]:
            bad.append(f"moved: trainable {train['trainable_moved']}, frozen {train['frozen_moved']}")
    return "ok" if not bad else "WARN: " + "; ".join(bad)


# ---------------------------------------------------------------------------- 1. environment
def section_environment(report: Report, sec: dict, device: str) -> None:
    import accelerate
    import diffusers
    import peft
    import transformers

    report.row(sec, "python", platform.python_version(), platform=platform.platform())
    for mod in (torch, diffusers, transformers, peft, accelerate):
        report.row(sec, mod.__name__, mod.__version__)
    try:
        import open_clip

        report.row(sec, "open_clip", getattr(open_clip, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        report.row(sec, "open_clip", f"not importable: {type(e).__name__}: {e}")
    report.row(sec, "xformers", xformers_status())
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch.cuda.is_available() is False (use --device cpu)")
        props = torch.cuda.get_device_properties(0)
        report.data["device"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"
        report.row(sec, "device", props.name, memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", count=torch.cuda.device_count())  # fmt: skip
        report.row(sec, "CUDA / cuDNN", f"{torch.version.cuda} / {torch.backends.cudnn.version()}")
        report.row(sec, "bf16 supported", str(torch.cuda.is_bf16_supported()))
        report.row(sec, "SDPA backends enabled", "see numbers",
                   flash=torch.backends.cuda.flash_sdp_enabled(),
                   mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled(),
                   math=torch.backends.cuda.math_sdp_enabled(),
                   cudnn=getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)())  # fmt: skip
        report.row(sec, "SDPA backends usable (bf16, head 64)", "see numbers", **sdpa_backends_usable())
        report.row(sec, "nccl available", str(torch.distributed.is_nccl_available()))
    else:
        report.data["device"] = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
        report.row(sec, "device", "cpu", threads=torch.get_num_threads(), cuda_available=torch.cuda.is_available())


def sdpa_backends_usable() -> dict:
    """Which SDPA kernels actually run on a [2, 8, 256, 64] bf16 attention here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
    out = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            out[name.lower()] = "absent"
            continue
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            torch.cuda.synchronize()
            out[name.lower()] = True
        except Exception as e:  # noqa: BLE001
            out[name.lower()] = f"no ({type(e).__name__})"
    return out


# ---------------------------------------------------------------------------- 2. tiny diffusion families
def diffusion_families() -> dict[str, dict]:
    """family row name -> how to save its tiny checkpoint and run it (recipe, reward, policy options)."""
    from mmgrpo.testing.tiny_flux import TINY_SIZE as FLUX_SIZE
    from mmgrpo.testing.tiny_flux import save_tiny_flux
    from mmgrpo.testing.tiny_hunyuan_video import TINY_SIZE as HUNYUAN_SIZE
    from mmgrpo.testing.tiny_hunyuan_video import save_tiny_hunyuan_video
    from mmgrpo.testing.tiny_sd import save_tiny_sd
    from mmgrpo.testing.tiny_sd3 import save_tiny_sd3
    from mmgrpo.testing.tiny_wan import SIZE as WAN_SIZE
    from mmgrpo.testing.tiny_wan import save_tiny_wan

    image = {"pipeline": "text_to_image", "reward": IMAGE_REWARD}
    video = {"pipeline": "text_to_video", "reward": IMAGE_REWARD}
    flux = {"height": FLUX_SIZE, "width": FLUX_SIZE}
    return {
        "sd3": {**image, "family": "sd3", "save": save_tiny_sd3, "size": {}, "sde": {}},
        "flux": {**image, "family": "flux", "save": save_tiny_flux, "size": flux, "sde": {}},
        "sd15": {**image, "family": "sd", "save": save_tiny_sd, "size": {}, "sde": DDIM_FAMILY},
        "sdxl": {**image, "family": "sd", "save": lambda p: save_tiny_sd(p, xl=True), "size": {}, "sde": DDIM_FAMILY},
        "wan": {**video, "family": "wan", "save": save_tiny_wan, "size": dict(WAN_SIZE), "sde": {}},
        "hunyuan_video": {**video, "family": "hunyuan_video", "save": save_tiny_hunyuan_video,
                          "size": dict(HUNYUAN_SIZE), "sde": {}},
    }  # fmt: skip


def pipeline_output(
    name: str, ckpt: str, x0: torch.Tensor, steps: int, device: str, dtype: torch.dtype, size: dict, max_seq: int
) -> torch.Tensor:
    """The diffusers pipeline's decoded output ([0, 1], fp32 on CPU) from initial latents ``x0`` [1, ...], no CFG,
    as tests/policies/test_diffusion_<family>.py call it; ``max_seq``: the policy adapter's text length."""
    import diffusers

    kw: dict[str, Any] = {"prompt": "a red circle", "num_inference_steps": steps, "output_type": "pt"}
    if name == "sd3":  # the tiny VAE has no shift_factor, which the pipeline's decoding needs: decode as the test
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(ckpt, torch_dtype=dtype)
        kw.update(guidance_scale=1.0, height=16, width=16, max_sequence_length=max_seq, output_type="latent")
    elif name == "flux":
        from mmgrpo.policies.models.flux import pack_latents

        pipe = diffusers.FluxPipeline.from_pretrained(ckpt, torch_dtype=dtype)
        kw.update(guidance_scale=3.5, true_cfg_scale=1.0, max_sequence_length=max_seq, **size)
        x0 = pack_latents(x0)
    elif name in ("sd15", "sdxl"):
        if name == "sdxl":
            pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(ckpt, torch_dtype=dtype, add_watermarker=False)
        else:
            pipe = diffusers.StableDiffusionPipeline.from_pretrained(ckpt, torch_dtype=dtype)
        kw.update(guidance_scale=1.0, eta=0.0, height=16, width=16)
    elif name == "wan":
        pipe = diffusers.WanPipeline.from_pretrained(ckpt, torch_dtype=dtype)
        shift = json.loads((Path(ckpt) / "scheduler" / "scheduler_config.json").read_text()).get("flow_shift", 3.0)
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)  # the policy's Euler flow sampler
        kw.update(guidance_scale=1.0, max_sequence_length=max_seq, **size)
    elif name == "hunyuan_video":
        pipe = diffusers.HunyuanVideoPipeline.from_pretrained(ckpt, torch_dtype=dtype)
        kw.update(guidance_scale=6.0, true_cfg_scale=1.0, max_sequence_length=max_seq, **size)
    else:
        raise KeyError(name)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(latents=x0.to(device, dtype), **kw)
        result = out.frames if hasattr(out, "frames") else out.images
        if name == "sd3":
            img = pipe.vae.decode(result / pipe.vae.config.scaling_factor, return_dict=False)[0]
            result = (img / 2 + 0.5).clamp(0, 1)
    if not isinstance(result, torch.Tensor):
        result = torch.as_tensor(result)
    del pipe
    return result.float().cpu()


def policy_noise_zero(policy, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the policy's ODE sample of "a red circle" at ``seed``, its initial latents): generate() with noise level 0;
    the initial latents are the policy's per-prompt seeded noise (mmgrpo.core.seeding.generator_for)."""
    from mmgrpo.core.seeding import generator_for

    x0 = torch.randn((1, *policy.adapter.latent_shape()), generator=generator_for(seed)).float()
    with torch.no_grad():
        sample = policy.generate(["a red circle"], [seed])
    return sample.float().cpu(), x0


def section_tiny_diffusion(report: Report, sec: dict, device: str, work: Path) -> None:
    cpu = device == "cpu"
    T = 2 if cpu else 4
    prompts, G = (1, 2) if cpu else (2, 4)
    steps = 1 if cpu else 3
    pipe_T = 2 if cpu else 4
    sec["note"] = (
        f"T = {T} sampling steps, {prompts} prompt(s) x G = {G}, LoRA rank 2, {steps} optimizer step(s) through "
        "Trainer.train(); ratio = max |exp(logp - logp_old) - 1| over trained steps right after the rollout "
        "(micro-batch 1 and G); pipeline = max |policy ODE sample (noise 0) - diffusers pipeline output| "
        f"(decoded, {pipe_T} steps, same initial latents). Variants: fp32; bf16 = bf16 weights; amp_bf16 = fp32 "
        "weights + trainer.mixed_precision=bf16; xformers = bf16 weights + attention xformers."
        + (" CPU: fp32 only." if cpu else "")
    )
    fams = diffusion_families()
    if not cpu and not xformers_status().startswith("installed"):
        report.row(sec, "xformers attention (all families)", f"skipped: xformers {xformers_status()}")
    for name, fam in fams.items():
        if out_of_time(report, sec, name):
            continue
        ckpt = None
        with guarded_row(report, sec, f"{name}: save tiny checkpoint"):
            ckpt = fam["save"](work / f"ckpt_{name}")
        if ckpt is None:
            continue
        for variant, dtype, mp, attention in variants_for(device):
            what = f"{name} {variant}"
            if out_of_time(report, sec, what):
                continue
            with guarded_row(report, sec, what):
                popts = diffusion_policy_options(
                    fam["family"], ckpt, dtype=dtype, num_steps=T, lora_rank=2, attention=attention,
                    size=fam["size"], **fam["sde"],
                )  # fmt: skip
                cfg = {
                    "pipeline": fam["pipeline"],
                    "policy": {"options": popts},
                    "data": {"options": {"heldout_prompts": "", "prompts": "shapes"}},
                    "rewards": [{"name": fam["reward"]}],
                    "trainer": trainer_options(steps, prompts, G, mp),
                }
                reset_peak(device)
                t0 = time.perf_counter()
                trainer = build_trainer(cfg, work / "runs" / f"{name}_{variant}", device, mp)
                build_s = time.perf_counter() - t0
                policy = trainer.policy
                batch = trainer.prompts_for(0, 0)
                t0 = time.perf_counter()
                rollout = trainer.sample(batch, 0)
                sync(device)
                rollout_s = time.perf_counter() - t0
                policy.model.train()  # the update phase's mode
                err1, errG = max_ratio_error(policy, rollout, 1), max_ratio_error(policy, rollout, G)
                pipe_diff = None
                if variant in ("fp32", "bf16"):
                    policy.model.eval()
                    sample, x0 = policy_noise_zero(policy, seed=5)
                    td = torch.float32 if dtype == "float32" else torch.bfloat16
                    max_seq = getattr(policy.adapter, "max_sequence_length", 16)
                    ref = pipeline_output(name, ckpt, x0, T, device, td, fam["size"], max_seq)
                    if ref.shape != sample.shape:
                        raise AssertionError(f"pipeline output {tuple(ref.shape)} != policy's {tuple(sample.shape)}")
                    pipe_diff = float((ref - sample).abs().max())
                train = train_and_measure(trainer, device)
                tol = RATIO_TOL[variant]
                pipe_tol = 1e-4 if variant == "fp32" else 5e-2
                report.row(
                    sec, what, verdict(max(err1, errG), tol, train, pipe_diff, pipe_tol),
                    ratio_err_micro1=err1, ratio_err_microG=errG, pipeline_max_abs_diff=pipe_diff,
                    build_s=round(build_s, 2), rollout_s=round(rollout_s, 3),
                    samples_per_s=round(rollout.num_rows / rollout_s, 2),
                    **{k: v for k, v in train.items() if k not in ("only_trainable_moved",)},
                )  # fmt: skip
                del trainer, policy, rollout
            free_memory()


# ---------------------------------------------------------------------------- 3. tiny VLM families
def section_tiny_vlm(report: Report, sec: dict, device: str, work: Path) -> None:
    from mmgrpo.testing.tiny_vlm import save_tiny, tiny_qwen2_5_vl, tiny_qwen2_vl

    cpu = device == "cpu"
    prompts, G = (1, 2) if cpu else (2, 4)
    steps = 1 if cpu else 3
    K = 8 if cpu else 16
    sec["note"] = (
        f"vlm_reasoning recipe (synthetic shapes QA), {prompts} prompt(s) x G = {G}, max_new_tokens {K}, LoRA "
        f"rank 8, {steps} optimizer step(s); ratio at micro-batch 1 and G over completion tokens; samples/s of the "
        "rollout (generation + log-prob recording)." + (" CPU: fp32 only." if cpu else "")
    )
    for name, builder in (("qwen2_vl", tiny_qwen2_vl), ("qwen2_5_vl", tiny_qwen2_5_vl)):
        if out_of_time(report, sec, name):
            continue
        path = None
        with guarded_row(report, sec, f"{name}: save tiny model"):
            model, processor = builder()
            path = str(save_tiny(model, processor, work / f"vlm_{name}"))
        if path is None:
            continue
        for variant, dtype, mp, attention in variants_for(device):
            if attention != "sdpa":
                continue
            what = f"{name} {variant}"
            if out_of_time(report, sec, what):
                continue
            with guarded_row(report, sec, what):
                cfg = {
                    "pipeline": "vlm_reasoning",
                    "policy": {"options": vlm_policy_options(path, dtype=dtype, max_new_tokens=K, lora_rank=8)},
                    "data": {"options": {"num_examples": 32, "eval_examples": 4}},
                    "rewards": [{"name": TEXT_REWARD}],
                    "trainer": trainer_options(steps, prompts, G, mp, micro_batch_size=G),
                }
                reset_peak(device)
                trainer = build_trainer(cfg, work / "runs" / f"{name}_{variant}", device, mp)
                policy = trainer.policy
                batch = trainer.prompts_for(0, 0)
                t0 = time.perf_counter()
                rollout = trainer.sample(batch, 0)
                sync(device)
                rollout_s = time.perf_counter() - t0
                policy.model.train()
                err1, errG = max_ratio_error(policy, rollout, 1), max_ratio_error(policy, rollout, G)
                train = train_and_measure(trainer, device)
                report.row(
                    sec, what, verdict(max(err1, errG), RATIO_TOL[variant], train),
                    ratio_err_micro1=err1, ratio_err_microG=errG, rollout_s=round(rollout_s, 3),
                    samples_per_s=round(rollout.num_rows / rollout_s, 2),
                    completion_tokens=int(rollout.train_mask.sum()),
                    **{k: v for k, v in train.items() if k not in ("only_trainable_moved",)},
                )  # fmt: skip
                del trainer, policy, rollout
            free_memory()


# ---------------------------------------------------------------------------- 4. the README demo
def section_demo(report: Report, sec: dict, device: str, work: Path) -> None:
    from mmgrpo.train.config import load_config
    from mmgrpo.train.trainer import train

    cpu = device == "cpu"
    steps = 1 if cpu else 10
    variants = [("fp32", "no")] if cpu else [("fp32", "no"), ("bf16", "bf16")]
    smaller = ["trainer.prompts_per_step=2", "trainer.group_size=2"] if cpu else []
    sec["note"] = (
        f"configs/shapes_t2i_grpo.yaml (assets/shapes_t2i) for {steps} step(s), no evaluation, through "
        "load_config + train; s/step is the median after the first step; reward/mean per step."
        + (f" CPU: fp32 only, {' '.join(smaller)}." if cpu else " Full demo batch (8 prompts x 8).")
    )
    for variant, mp in variants:
        if out_of_time(report, sec, variant):
            continue
        with guarded_row(report, sec, f"demo {variant}"):
            overrides = [
                f"run.output_dir={work / 'demo'}", f"run.name={variant}", "run.overwrite=true",
                f"trainer.max_steps={steps}", "trainer.eval_every=0", "trainer.progress=false",
                "trainer.checkpoint_every=0", *smaller,
            ] + ([f"trainer.mixed_precision={mp}"] if mp != "no" else [])  # fmt: skip
            cfg = load_config(ROOT / "configs" / "shapes_t2i_grpo.yaml", overrides)
            reset_peak(device)
            t0 = time.perf_counter()
            trainer = train(cfg, make_accelerator(device, mp))
            wall = time.perf_counter() - t0
            lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
            steps_m = [x for x in lines if "reward/mean" in x]
            times = [x["time/step_s"] for x in steps_m]
            losses = [x.get("loss/total", x.get("loss/policy")) for x in steps_m]
            finite = bool(losses) and all(v is not None and math.isfinite(v) for v in losses)
            report.row(
                sec, f"demo {variant}", "ok" if finite and len(steps_m) == steps else "WARN: loss not finite",
                steps=len(steps_m), s_per_step_first=times[0] if times else None,
                s_per_step=statistics.median(times[1:]) if len(times) > 1 else (times[0] if times else None),
                reward_mean=[round(x["reward/mean"], 4) for x in steps_m], grad_norm=[x.get("grad_norm")
                for x in steps_m], wall_s=round(wall, 1), peak_gib=peak_gib(device),
            )  # fmt: skip
            del trainer
        free_memory()


# ---------------------------------------------------------------------------- 5. realistic sizes
def timed(fn, device: str, repeats: int = 3) -> tuple[float, list[float]]:
    """Median seconds of ``fn()`` after one warm-up call, and all timings."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def section_realistic(report: Report, sec: dict, device: str) -> None:
    sec["note"] = (
        "Random weights built from config (no download), bf16 weights, full fine-tuning gradients (every "
        "parameter requires grad). SD3-medium shape: SD3Transformer2DModel 24 layers x 24 heads x 64, joint "
        "attention 4096, patch 2, 16x128x128 latents (1024 px), 333 text tokens; forward+backward of one "
        "denoiser call per row (what one trained SDE step costs), and a no-grad forward (one sampling step). "
        "Qwen2-VL-2B shape: Qwen2VLForConditionalGeneration (text 1536 x 28 layers, 12 heads, 2 KV heads; vision "
        "1280 x 32 layers), B*G = 16 rows of 256 vision + 64 text + 128 completion tokens, teacher-forced "
        "forward+backward with log-softmax over the completion. No peer library runs here: compare the numbers "
        "with the peers' published s/step by hand."
    )
    if out_of_time(report, sec, "sd3-medium"):
        return
    with guarded_row(report, sec, "sd3-medium shape"):
        realistic_sd3(report, sec, device)
    free_memory()
    if out_of_time(report, sec, "qwen2-vl-2b"):
        return
    with guarded_row(report, sec, "qwen2-vl-2b shape"):
        realistic_qwen2_vl(report, sec, device)
    free_memory()


# stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192,
)  # fmt: skip


def realistic_sd3(
    report: Report, sec: dict, device: str, shape: dict = SD3_MEDIUM, text_len: int = 333,
    batches: tuple[int, ...] = (1, 2, 4), sample_batches: tuple[int, ...] = (4, 16),
) -> None:  # fmt: skip
    """``text_len``: SD3's 77 CLIP + 256 T5 tokens; latents [16, sample_size, sample_size]."""
    from diffusers import SD3Transformer2DModel

    dt = torch.bfloat16
    t0 = time.perf_counter()
    with torch.device(device):
        model = SD3Transformer2DModel(**shape).to(dt)
    C, S = shape["in_channels"], shape["sample_size"]
    sync(device)
    n_params = sum(p.numel() for p in model.parameters())
    report.row(sec, "sd3-medium shape: build", "ok", params_B=round(n_params / 1e9, 3),
               build_s=round(time.perf_counter() - t0, 1))  # fmt: skip
    model.train()

    def inputs(b: int):
        g = torch.Generator(device).manual_seed(0)
        return dict(
            hidden_states=torch.randn(b, C, S, S, device=device, dtype=dt, generator=g),
            encoder_hidden_states=torch.randn(
                b, text_len, shape["joint_attention_dim"], device=device, dtype=dt, generator=g
            ),
            pooled_projections=torch.randn(b, shape["pooled_projection_dim"], device=device, dtype=dt, generator=g),
            timestep=torch.full((b,), 500.0, device=device),
        )

    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
        for b in batches:
            if out_of_time(report, sec, f"sd3-medium fwd+bwd B={b} grad_ckpt={checkpointing}"):
                return
            x = inputs(b)

            def fwd_bwd(x=x):
                out = model(**x, return_dict=False)[0]
                out.float().square().mean().backward()
                model.zero_grad(set_to_none=True)

            reset_peak(device)
            try:
                med, times = timed(fwd_bwd, device, repeats=2)
            except torch.cuda.OutOfMemoryError as e:
                report.row(sec, f"sd3-medium fwd+bwd B={b} grad_ckpt={checkpointing}", f"OOM: {str(e)[:120]}")
                free_memory()
                break
            report.row(sec, f"sd3-medium fwd+bwd B={b} grad_ckpt={checkpointing}", "ok", s_per_call=round(med, 4),
                       samples_per_s=round(b / med, 2), peak_gib=peak_gib(device))  # fmt: skip
    model.disable_gradient_checkpointing()
    model.eval()
    for b in sample_batches:
        if out_of_time(report, sec, f"sd3-medium no-grad forward (sampling step) B={b}"):
            return
        x = inputs(b)

        def fwd(x=x):
            with torch.no_grad():
                model(**x, return_dict=False)

        reset_peak(device)
        med, _ = timed(fwd, device, repeats=3)
        report.row(sec, f"sd3-medium no-grad forward (sampling step) B={b}", "ok", s_per_call=round(med, 4),
                   samples_per_s=round(b / med, 2), peak_gib=peak_gib(device))  # fmt: skip


def qwen2_vl_2b_config():
    """Qwen/Qwen2-VL-2B-Instruct's config.json values (text 1536 x 28, vision 1280 x 32), built locally."""
    from transformers import Qwen2VLConfig

    text = dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151645,
    )  # fmt: skip
    vision = dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)  # fmt: skip
    ids = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
    rope = {"rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
    try:  # transformers >= 5: nested text_config with rope_parameters
        cfg = Qwen2VLConfig(text_config={**text, "rope_parameters": {"rope_type": "default", **rope}},
                            vision_config=vision, tie_word_embeddings=True, **ids)  # fmt: skip
        if getattr(cfg, "text_config", None) is not None and cfg.text_config.hidden_size == 1536:
            return cfg
    except Exception:  # noqa: BLE001 - older transformers: flat text options below
        pass
    return Qwen2VLConfig(**text, rope_theta=rope["rope_theta"],
                         rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]},
                         vision_config=vision, **ids)  # fmt: skip


def realistic_qwen2_vl(
    report: Report, sec: dict, device: str, cfg=None, rows: int = 16, grid: int = 32, text: int = 64, comp: int = 128
) -> None:
    """``rows`` sequences of one image (``grid`` x ``grid`` patches, merged 2 x 2), ``text`` prompt tokens and ``comp``
    completion tokens: teacher-forced forward+backward, the loss on the completion's log-probs."""
    from transformers import Qwen2VLForConditionalGeneration

    cfg = cfg if cfg is not None else qwen2_vl_2b_config()
    t0 = time.perf_counter()
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(cfg).to(torch.bfloat16)
    sync(device)
    n_params = sum(p.numel() for p in model.parameters())
    report.row(sec, "qwen2-vl-2b shape: build", "ok", params_B=round(n_params / 1e9, 3),
               build_s=round(time.perf_counter() - t0, 1))  # fmt: skip
    model.train()
    vis = grid * grid // 4  # default 32 x 32 patches of 14 px (448 px), merged 2 x 2 -> 256 vision tokens
    patch_dim = 3 * 2 * 14 * 14
    g = torch.Generator(device).manual_seed(0)
    pixel_values = torch.randn(rows * grid * grid, patch_dim, device=device, dtype=torch.bfloat16, generator=g)
    image_grid_thw = torch.tensor([[1, grid, grid]] * rows, device=device)
    vocab = getattr(getattr(cfg, "text_config", cfg), "vocab_size", None) or cfg.vocab_size
    ids = torch.randint(0, vocab, (rows, 1 + vis + 1 + text + comp), device=device, generator=g)
    special = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]
    plain = next(i for i in range(vocab) if i not in special)
    ids[torch.isin(ids, torch.tensor(special, device=device))] = plain  # text tokens only outside the image span
    ids[:, 0] = cfg.vision_start_token_id
    ids[:, 1 : 1 + vis] = cfg.image_token_id
    ids[:, 1 + vis] = cfg.vision_end_token_id
    mask = torch.ones_like(ids)
    L = ids.shape[1]
    extra = {}
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:  # transformers >= 5: 1 marks image tokens
        extra["mm_token_type_ids"] = (ids == cfg.image_token_id).long()

    def fwd_bwd():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                    logits_to_keep=comp + 1, **extra)  # fmt: skip
        logits = out.logits[:, :-1].float()  # the completion's next-token logits
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, -comp:, None]).squeeze(-1)
        (-lp.mean()).backward()
        model.zero_grad(set_to_none=True)

    for checkpointing in (False, True):
        if out_of_time(report, sec, f"qwen2-vl-2b fwd+bwd grad_ckpt={checkpointing}"):
            return
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        reset_peak(device)
        try:
            med, _ = timed(fwd_bwd, device, repeats=2)
        except torch.cuda.OutOfMemoryError as e:
            report.row(sec, f"qwen2-vl-2b fwd+bwd grad_ckpt={checkpointing}", f"OOM: {str(e)[:120]}")
            free_memory()
            continue
        report.row(sec, f"qwen2-vl-2b fwd+bwd {rows} x {L} tokens grad_ckpt={checkpointing}", "ok",
                   s_per_step=round(med, 4), tokens_per_s=round(rows * L / med), samples_per_s=round(rows / med, 2),
                   peak_gib=peak_gib(device))  # fmt: skip


# ---------------------------------------------------------------------------- 6. 1-GPU FSDP
def section_fsdp(report: Report, sec: dict, device: str, work: Path) -> None:
    sec["note"] = (
        "Tiny SD3, full fine-tuning, 2 steps through Trainer with accelerate's FSDP plugin (FULL_SHARD, "
        "use_orig_params) in a child process that initialises torch.distributed (nccl, world size 1)."
    )
    from mmgrpo.testing.tiny_sd3 import save_tiny_sd3

    ckpt = save_tiny_sd3(work / "ckpt_fsdp")
    out = work / "fsdp_result.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(ROOT)}  # fmt: skip
    cmd = [sys.executable, str(Path(__file__).resolve()), "--fsdp-child", str(work / "fsdp"), "--fsdp-ckpt", ckpt,
           "--fsdp-result", str(out), "--device", device]  # fmt: skip
    timeout = max(30.0, min(180.0, report.left()))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        report.row(sec, "fsdp tiny sd3", f"ERROR: timed out after {timeout:.0f} s")
        sec["had_error"] = True
        return
    wall = time.perf_counter() - t0
    result = json.loads(out.read_text()) if out.is_file() else {}
    if proc.returncode == 0 and result.get("ok"):
        report.row(sec, "fsdp tiny sd3", "ok", wall_s=round(wall, 1), **result.get("numbers", {}))
    else:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        report.row(sec, "fsdp tiny sd3", "ERROR", returncode=proc.returncode, error=result.get("error") or tail)
        sec["had_error"] = True


def fsdp_child(run_dir: str, ckpt: str, result_path: str, device: str) -> int:
    """Runs in the child process: world size 1, FSDP plugin, 2 steps of tiny SD3 (full fine-tuning)."""
    result: dict[str, Any] = {"ok": False}
    try:
        from accelerate import Accelerator, FullyShardedDataParallelPlugin

        from mmgrpo.train.config import load_config
        from mmgrpo.train.trainer import Trainer

        register_check_rewards()
        plugin = FullyShardedDataParallelPlugin(sharding_strategy="FULL_SHARD", use_orig_params=True,
                                                sync_module_states=False)  # fmt: skip
        acc = Accelerator(
            fsdp_plugin=plugin, mixed_precision="bf16" if device == "cuda" else "no", cpu=device == "cpu"
        )
        base = {
            "pipeline": "text_to_image",
            "policy": {"options": diffusion_policy_options("sd3", ckpt, num_steps=2, lora_rank=0)},
            "data": {"options": {"heldout_prompts": "", "prompts": "shapes"}},
            "rewards": [{"name": IMAGE_REWARD}],
            "trainer": trainer_options(2, 1, 2, acc.mixed_precision),
        }
        cfg = load_config(None, [f"run.output_dir={Path(run_dir).parent}", f"run.name={Path(run_dir).name}"],
                          base=base)  # fmt: skip
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        trainer = Trainer(cfg, run_dir, acc)
        t0 = time.perf_counter()
        trainer.train()
        lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        losses = [x.get("loss/total") for x in lines if "loss/total" in x]
        result["numbers"] = {
            "distributed_type": str(acc.distributed_type),
            "world_size": acc.num_processes,
            "wrapped": type(trainer.policy.model).__name__,
            "steps": len(losses),
            "loss": losses,
            "train_s": round(time.perf_counter() - t0, 2),
        }
        fsdp = "FSDP" in str(acc.distributed_type)
        result["ok"] = len(losses) == 2 and all(math.isfinite(v) for v in losses) and fsdp
        if not result["ok"]:
            result["error"] = f"distributed_type {acc.distributed_type}, losses {losses}"
    except Exception as e:  # noqa: BLE001
        result["error"] = error_text(e, lines=20)
    Path(result_path).write_text(json.dumps(result))
    try:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    return 0 if result["ok"] else 1


# ---------------------------------------------------------------------------- 7. pytest -m gpu
def section_pytest_gpu(report: Report, sec: dict, device: str) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider"]
    sec["note"] = "`" + " ".join(["python", *cmd[1:]]) + "`"
    timeout = max(30.0, report.left())
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    except subprocess.TimeoutExpired:
        report.row(sec, "pytest -m gpu tests/gpu", f"ERROR: timed out after {timeout:.0f} s")
        sec["had_error"] = True
        return
    lines = [x for x in proc.stdout.strip().splitlines() if x.strip()]
    summary = lines[-1] if lines else "(no output)"
    ok = proc.returncode == 0
    numbers = {} if ok else {"output": "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])}
    report.row(sec, "pytest -m gpu tests/gpu", ("ok: " if ok else f"FAILED (rc {proc.returncode}): ") + summary,
               **numbers)  # fmt: skip
    if not ok:
        sec["had_error"] = True


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="only the tiny-model sections (what CI runs with --device cpu)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder of gpu.md and gpu.json")
    p.add_argument("--time-limit", type=float, default=540.0, help="seconds; later sections are skipped after it")
    p.add_argument("--fsdp-child", help=argparse.SUPPRESS)
    p.add_argument("--fsdp-ckpt", help=argparse.SUPPRESS)
    p.add_argument("--fsdp-result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fsdp_child:
        return fsdp_child(args.fsdp_child, args.fsdp_ckpt, args.fsdp_result, args.device)

    command = "python bench/gpu_check.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else
                                                                                  sys.argv[1:]))  # fmt: skip
    report = Report(Path(args.out) if args.out else None, command.strip(), args.time_limit)
    device = args.device
    cuda = device == "cuda" and torch.cuda.is_available()
    if device == "cuda" and not cuda:
        print("gpu_check: --device cuda but CUDA is not available; use --device cpu", file=sys.stderr)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows compare against 1e-4: no TF32 in them
    torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        run_section(report, "1. Environment", section_environment, device)
        not_cuda = None if cuda else "needs CUDA"
        run_section(report, "2. Tiny diffusion families", section_tiny_diffusion, device, work,
                    skip=None if (cuda or device == "cpu") else not_cuda)  # fmt: skip
        run_section(report, "3. Tiny VLM families", section_tiny_vlm, device, work,
                    skip=None if (cuda or device == "cpu") else not_cuda)  # fmt: skip
        run_section(report, "4. README demo config", section_demo, device, work,
                    skip=None if (cuda or device == "cpu") else not_cuda)  # fmt: skip
        tiny_skip = "--tiny" if args.tiny else None
        run_section(report, "5. Realistic sizes (random init)", section_realistic, device,
                    skip=tiny_skip or (None if cuda else "needs CUDA"))  # fmt: skip
        run_section(report, "6. 1-GPU FSDP", section_fsdp, device, work,
                    skip=tiny_skip or (None if cuda else "needs CUDA"))  # fmt: skip
        run_section(report, "7. pytest -m gpu tests/gpu", section_pytest_gpu, device,
                    skip=None if cuda else "needs CUDA")  # fmt: skip
    report.data["finished"] = True
    report.write()
    print(report.markdown())
    bad = [s["name"] for s in report.data["sections"] if s["status"].startswith("error")]
    if bad:
        print(f"gpu_check: sections with errors: {', '.join(bad)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
