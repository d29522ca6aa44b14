"""One-command GPU check: every adapter family's tiny model in bf16 on CUDA, realistic-size timings, FSDP2.

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
6. FSDP2 sharded training (not in ``--tiny``): tiny SD3 through ``accelerate launch --config_file
   configs/accelerate/fsdp.yaml`` on every GPU (on ``--device cpu``: 2 gloo processes), saved sharded, resumed, and
   compared with the uninterrupted and the unsharded run;
7. DeepSpeed ZeRO-2 and ZeRO-3 (not in ``--tiny``; needs ``pip install 'mmgrpo[deepspeed]'``): section 6's runs
   through ``configs/accelerate/deepspeed_zero{2,3}.yaml`` (on ``--device cpu``: 2 gloo processes on DeepSpeed's CPU
   accelerator), stopped and resumed, compared with the uninterrupted and the unsharded run;
8. ``pytest -m gpu tests/gpu`` (CUDA only; run right after section 4, before the long sections 5-7);
9. the peers on this GPU (not in ``--tiny``; CUDA only): ``bench/peers.py --device cuda`` on a few rows (TRL on a
   Qwen2-VL-2B-shaped VLM and at realistic prompts, the Flow-GRPO loop at B 8 x G 8 and at the grid's corner, the
   diffusers pipeline), one repeat;
   its tables into this report and ``peers_gpu.md`` next to it.

On CPU the same rows run (fp32, bf16 weights, fp32 + bf16 autocast; no xformers), with smaller groups and fewer
steps: the tiny models take seconds in bf16 there, so CI keeps the bf16 paths a GPU run relies on working.

The policy option vocabulary is in one place, ``diffusion_policy_options`` / ``vlm_policy_options`` in
bench/gpu_common.py (with the report and the measuring helpers): the only code here that knows option names.
Sections 5, 6 and 7 (realistic sizes, FSDP, DeepSpeed) are in bench/gpu_large.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from gpu_common import (  # noqa: E402
    DDIM_FAMILY,
    IMAGE_REWARD,
    RATIO_TOL,
    ROOT,
    TEXT_REWARD,
    Report,
    build_trainer,
    diffusion_policy_options,
    error_text,
    free_memory,
    guarded_row,
    make_accelerator,
    max_ratio_error,
    out_of_time,
    peak_gib,
    reset_peak,
    run_group,
    run_section,
    sync,
    train_and_measure,
    trainer_options,
    variants_for,
    verdict,
    vlm_policy_options,
    with_root,
    xformers_status,
)
from gpu_large import fsdp_child, section_deepspeed, section_fsdp, section_realistic  # noqa: E402


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
        from mmgrpo.testing.tiny_wan import euler_on_unipc_grid

        pipe = diffusers.WanPipeline.from_pretrained(ckpt, torch_dtype=dtype)
        shift = json.loads((Path(ckpt) / "scheduler" / "scheduler_config.json").read_text()).get("flow_shift", 3.0)
        pipe.scheduler = euler_on_unipc_grid(shift)  # the policy's Euler flow sampler on the shipped UniPC grid
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


def train_or_error(trainer, device: str, sec: dict) -> tuple[dict, str | None]:
    """(:func:`train_and_measure`'s numbers, None), or ({}, the error) when training raises: the row still reports
    what it measured of the sampling."""
    try:
        return train_and_measure(trainer, device), None
    except Exception as e:  # noqa: BLE001 - a finding, reported in the row
        sec["had_error"] = True
        return {}, error_text(e)


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
        + (" CPU: no xformers." if cpu else "")
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
                train, train_error = train_or_error(trainer, device, sec)
                tol = RATIO_TOL[variant]
                pipe_tol = 1e-4 if variant == "fp32" else 5e-2
                status = verdict(max(err1, errG), tol, train or None, pipe_diff, pipe_tol)
                report.row(
                    sec, what, status if train_error is None else f"ERROR in training (sampling: {status})",
                    ratio_err_micro1=err1, ratio_err_microG=errG, pipeline_max_abs_diff=pipe_diff,
                    build_s=round(build_s, 2), rollout_s=round(rollout_s, 3),
                    samples_per_s=round(rollout.num_rows / rollout_s, 2), train_error=train_error,
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
        "rollout (generation + log-prob recording)."
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
    variants = [("fp32", "no"), ("bf16", "bf16")]
    smaller = ["trainer.prompts_per_step=2", "trainer.group_size=2"] if cpu else []
    sec["note"] = (
        f"configs/shapes_t2i_grpo.yaml (assets/shapes_t2i) for {steps} step(s), no evaluation, through "
        "load_config + train; s/step is the median after the first step; reward/mean per step."
        + (f" CPU: {' '.join(smaller)}." if cpu else " Full demo batch (8 prompts x 8).")
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


# ---------------------------------------------------------------------------- 7. pytest -m gpu
def section_pytest_gpu(report: Report, sec: dict, device: str) -> None:
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider"]
    sec["note"] = "`" + " ".join(["python", *cmd[1:]]) + "` (run after section 4: short contract tests)"
    timeout = max(30.0, report.left())
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": with_root(os.environ.get("PYTHONPATH"))})  # fmt: skip
    except subprocess.TimeoutExpired as e:  # the tests it finished (-v: a line each) are still findings
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")  # bytes so far
        done = [x for x in out.splitlines() if "PASSED" in x or "FAILED" in x or "ERROR" in x]
        report.row(sec, "pytest -m gpu tests/gpu", f"ERROR: timed out after {timeout:.0f} s", finished="\n".join(done))
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


# ---------------------------------------------------------------------------- 9. the peers on this GPU
PEER_ROWS = (
    "VLM Qwen2-VL-2B shape",  # a realistic-size VLM (2.2B random parameters) against TRL
    "diffusion SD3-medium shape",  # a realistic-size denoiser (2.0B random parameters) against the Flow-GRPO loop
    "VLM hidden 256 / 4 layers, 448x448",  # realistic prompts (256 vision tokens) against TRL
    "diffusion B 8 x G 8, T 8 (7 trained), default options",  # against the Flow-GRPO loop
    "=diffusion B 2 x G 16, T 20",  # the G x T grid's corner (exactly: not its micro_batch_units 8 row)
    "=rollout vs StableDiffusion3Pipeline, T 10, N 8",  # without guidance (one process, both sides)
)
"""bench/peers.py rows the check runs on the GPU (--match; "=" an exact label), one process per side: 11 processes;
the file is rewritten after each, so a run cut by the time limit keeps what it measured"""


PEERS_MIN_S = 60.0
"""section 9's least time, whatever the report's time limit leaves"""


def section_peers(report: Report, sec: dict, device: str, quick: bool = False) -> None:
    """``bench/peers.py --device <device>`` on :data:`PEER_ROWS` (one repeat, 3 timed steps), in a subprocess
    with the time left; its tables go into this section and next to gpu.md as peers_gpu.md. ``quick``: its
    ``--quick`` rows instead (the CPU test of this code)."""
    out = (report.out or Path(tempfile.mkdtemp(prefix="peers_"))) / "peers_gpu.md"
    rows = [] if quick else ["--match", *PEER_ROWS]
    cmd = ["bench/peers.py", "--device", device, "--repeats", "1", *(["--quick"] if quick else rows),
           "--out", str(out)]  # fmt: skip
    sec["note"] = (
        "`python " + " ".join(shlex.quote(c) for c in cmd[:-1]) + " peers_gpu.md`: mmgrpo against TRL's "
        "GRPOTrainer, the Flow-GRPO loop and the diffusers pipeline, both sides on this device, fp32 "
        "(bench/peers.py's docstring); memory on a GPU: torch.cuda.max_memory_allocated. One process per side "
        "and row, so a ratio within ~0.1 of 1 is not resolved."
    )
    timeout = max(PEERS_MIN_S, report.left())
    # its own process group: at the time limit the worker it started goes too (it holds the GPU)
    proc = run_group([sys.executable, *cmd, "--timeout", str(int(timeout))], timeout, merge_stderr=True, cwd=ROOT)
    text = out.read_text() if out.exists() else ""  # what it measured, whole or partial
    sec["text"] = "\n".join(x for x in text.splitlines() if not x.startswith("# "))  # its tables, not its title
    if proc is None:
        report.row(sec, "bench/peers.py", f"ERROR: stopped at the time limit ({timeout:.0f} s); the tables below "
                   "hold the jobs it finished", wrote=str(out) if text else None)  # fmt: skip
        sec["had_error"] = True
        return
    ok = proc.returncode == 0 and bool(text)
    numbers = (
        {"wrote": str(out)} if ok else {"output": "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])}
    )
    report.row(sec, "bench/peers.py", "ok" if ok else f"FAILED (rc {proc.returncode})", **numbers)
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
    p.add_argument("--fsdp-resume", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fsdp-engine", default="fsdp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fsdp_child:
        return fsdp_child(
            args.fsdp_child, args.fsdp_ckpt, args.fsdp_result, args.device, args.fsdp_resume, args.fsdp_engine
        )

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
        # before the long sections 5-7: its contract tests take seconds each, and the time limit cuts what comes last
        run_section(report, "8. pytest -m gpu tests/gpu", section_pytest_gpu, device,
                    skip=None if cuda else "needs CUDA")  # fmt: skip
        run_section(report, "5. Realistic sizes (random init)", section_realistic, device,
                    skip=tiny_skip or (None if cuda else "needs CUDA"))  # fmt: skip
        run_section(report, "6. FSDP2 sharded training", section_fsdp, device, work,
                    skip=tiny_skip or (None if (cuda or device == "cpu") else not_cuda))  # fmt: skip
        run_section(report, "7. DeepSpeed ZeRO-2 / ZeRO-3", section_deepspeed, device, work,
                    skip=tiny_skip or (None if (cuda or device == "cpu") else not_cuda))  # fmt: skip
        run_section(report, "9. The peers on this GPU (bench/peers.py)", section_peers, device,
                    skip=tiny_skip or (None if cuda else "needs CUDA (on CPU: bench/results/peers.md)"))  # fmt: skip
    report.data["finished"] = True
    report.write()
    print(report.markdown())
    bad = [s["name"] for s in report.data["sections"] if s["status"].startswith("error")]
    if bad:
        print(f"gpu_check: sections with errors: {', '.join(bad)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
