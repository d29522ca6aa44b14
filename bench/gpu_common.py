"""What every section of bench/gpu_check.py shares: the policy option names (the only place that knows them), the
incremental report, and the measuring helpers (device sync, peak memory, trainers built from config dicts)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import signal
import statistics
import subprocess
import sys
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
def with_root(pythonpath: str | None) -> str:
    """A child process's PYTHONPATH: this checkout first, then what the parent had (on a lent GPU machine the
    carried packages' folder, bench/device_wheels.py; replacing it left the child without diffusers)."""
    return os.pathsep.join(x for x in (str(ROOT), pythonpath) if x)


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
            if sec.get("text"):  # a section's own markdown (e.g. section 9's tables)
                lines += [sec["text"].rstrip(), ""]
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


def run_group(
    cmd: list[str], timeout: float, merge_stderr: bool = False, **popen: Any
) -> subprocess.CompletedProcess | None:
    """Run ``cmd`` in a process group of its own, text output captured; at ``timeout`` seconds kill the whole group
    (a launcher's workers too, which would otherwise keep holding the GPU) and return None."""
    err = subprocess.STDOUT if merge_stderr else subprocess.PIPE
    child = subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE, stderr=err, start_new_session=True, **popen)
    try:
        out, errs = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return None
    return subprocess.CompletedProcess(child.args, child.returncode, out, errs or "")


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
    """(name, weights dtype, mixed precision, attention) of the tiny-model rows. The bf16 rows run on CPU too (the
    tiny models take seconds there), so CI exercises the bf16 weights and bf16 autocast paths that a GPU run
    relies on; xformers only where it is installed (CUDA)."""
    out = [
        ("fp32", "float32", "no", "sdpa"),
        ("bf16", "bfloat16", "no", "sdpa"),
        ("amp_bf16", "float32", "bf16", "sdpa"),
    ]
    if device != "cpu" and xformers_status().startswith("installed"):
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
    """Trainer options of the checks; logp_old recorded by the rollout, which the ratio = 1 checks read."""
    return {
        "max_steps": steps, "prompts_per_step": prompts, "group_size": group, "lr": 1e-2, "progress": False,
        "mixed_precision": mixed_precision, "eval_every": 0, "sample_every": 0, "checkpoint_every": 0,
        "log_every": 1, "logp_old": "rollout", **kw,
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
