"""Sections 5, 6 and 7 of bench/gpu_check.py (not in ``--tiny``): realistic-size denoiser and VLM built from config
with random weights (time, throughput, peak memory; CUDA only), FSDP2 sharded training launched by accelerate with
configs/accelerate/fsdp.yaml, and DeepSpeed ZeRO-2 / ZeRO-3 with configs/accelerate/deepspeed_zero{2,3}.yaml (every
GPU, or 2 CPU processes), saved, resumed and compared."""

from __future__ import annotations

import inspect
import json
import math
import os
import socket
import statistics
import sys
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
    IMAGE_REWARD,
    ROOT,
    Report,
    diffusion_policy_options,
    error_text,
    free_memory,
    guarded_row,
    out_of_time,
    peak_gib,
    register_check_rewards,
    reset_peak,
    run_group,
    sync,
    trainer_options,
    with_root,
)

GPU_CHECK = Path(__file__).with_name("gpu_check.py").resolve()  # the FSDP child runs its --fsdp-child mode


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
        "forward+backward with log-softmax over the completion. No peer runs in this section: section 9 trains "
        "both shapes a whole step against the peers (TRL's GRPOTrainer, the Flow-GRPO loop)."
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


# ---------------------------------------------------------------------------- 6. FSDP2 sharded training
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"
ENGINES = {"fsdp": FSDP_CONFIG, **{f"zero{z}": FSDP_CONFIG.with_name(f"deepspeed_zero{z}.yaml") for z in (2, 3)}}
"""the accelerate config of each sharding engine the check launches"""
FSDP_STEPS = 4
FSDP_TOL = {"resumed": 1e-6, "unsharded": 1e-4}  # max |diff| of any weight or AdamW moment, fp32


def compare_states(states: dict, unsharded: str, numbers: dict, bad: list[str]) -> None:
    """The uninterrupted run's ``states["full"]`` against the resumed (``"part"``) and the unsharded run's: each
    max |diff| into ``numbers``, each failure (other tensors, a diff over :data:`FSDP_TOL`) into ``bad``."""
    for other, key in (("part", "resumed"), (unsharded, "unsharded")):
        a, b = states["full"], states[other]
        if a.keys() != b.keys():
            bad.append(f"{key}: other tensors ({sorted(a.keys() ^ b.keys())[:3]})")
            continue
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        numbers[f"max_abs_diff_{key}"] = diff
        if not diff <= FSDP_TOL[key]:
            bad.append(f"{key} differs by {diff:.2g} > {FSDP_TOL[key]:g}")


def section_fsdp(report: Report, sec: dict, device: str, work: Path) -> None:
    """Tiny SD3 (full fine-tuning) through ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` -- the
    launch users make -- of every GPU (on CPU: 2 gloo processes, ``ACCELERATE_USE_CPU=true``)."""
    n = max(1, torch.cuda.device_count()) if device == "cuda" else 2
    sec["note"] = (
        f"Tiny SD3, full fine-tuning, fp32, through `accelerate launch --config_file configs/accelerate/fsdp.yaml "
        f"--num_processes {n}` (FSDP2): {FSDP_STEPS} steps uninterrupted; {FSDP_STEPS // 2} steps, stop, resume to "
        f"{FSDP_STEPS} from the sharded checkpoint; the same {FSDP_STEPS} steps unsharded in one process. The final "
        "checkpoints (shards joined) are compared: max |diff| over the weights and AdamW moments."
    )
    from mmgrpo.testing.tiny_sd3 import save_tiny_sd3
    from mmgrpo.train import checkpoint as ckpt

    model = save_tiny_sd3(work / "ckpt_fsdp")
    # "part" stops after 2 steps (fsdp_child knows it by its name), then resumes; "unsharded" is one plain process
    for name, procs, resume in [("full", n, False), ("part", n, False), ("part", n, True), ("unsharded", 0, False)]:
        what = f"{name} resumed" if resume else name
        if out_of_time(report, sec, f"fsdp tiny sd3: {what}"):
            return
        extra = ["--fsdp-resume"] if resume else []
        result, wall, error = fsdp_launch(work, name, model, device, procs, extra, timeout=report.left())
        if error is not None:
            report.row(sec, f"fsdp tiny sd3: {what}", "ERROR", error=error)
            sec["had_error"] = True
            return
        report.row(sec, f"fsdp tiny sd3: {what}", "ok", wall_s=round(wall, 1), **result)
    final = {n: ckpt.latest_checkpoint(work / "fsdp" / n / "checkpoints") for n in ("full", "part", "unsharded")}
    numbers: dict[str, Any] = {"sharded": ckpt.is_sharded(final["full"]) and ckpt.is_sharded(final["part"])}
    numbers["shard_files"] = len(list((final["full"] / ckpt.SHARDS).glob("*.safetensors")))
    states = {}
    for name, path in final.items():
        flat: dict[str, torch.Tensor] = {}
        ckpt.flatten_state(ckpt.load_checkpoint(path), "", flat)
        states[name] = flat
    bad = []
    compare_states(states, "unsharded", numbers, bad)
    if not numbers["sharded"]:
        bad.append("the FSDP checkpoints are not sharded")
    report.row(sec, "fsdp tiny sd3: sharded save -> resume vs uninterrupted and unsharded",
               "ok" if not bad else "WARN: " + "; ".join(bad), **numbers)  # fmt: skip


def section_deepspeed(report: Report, sec: dict, device: str, work: Path) -> None:
    """Section 6's runs under DeepSpeed ZeRO-2 and ZeRO-3 (``accelerate launch --config_file
    configs/accelerate/deepspeed_zero{2,3}.yaml``): uninterrupted, stopped and resumed, compared with the unsharded
    run. DeepSpeed's checkpoints are mmgrpo's full ones (the partitions gathered), so they are not sharded."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        report.row(sec, "deepspeed", f"skipped: not installed ({e}); pip install 'mmgrpo[deepspeed]'")
        return
    n = max(1, torch.cuda.device_count()) if device == "cuda" else 2
    sec["note"] = (
        f"Tiny SD3, full fine-tuning, fp32, through `accelerate launch --config_file configs/accelerate/"
        f"deepspeed_zero{{2,3}}.yaml --num_processes {n}`: as section 6, {FSDP_STEPS} steps uninterrupted, "
        f"{FSDP_STEPS // 2} + resume, and unsharded; max |diff| over the weights and AdamW moments."
    )
    from mmgrpo.testing.tiny_sd3 import save_tiny_sd3
    from mmgrpo.train import checkpoint as ckpt

    model = save_tiny_sd3(work / "ckpt_deepspeed")
    result, wall, error = fsdp_launch(work, "unsharded", model, device, 0, [], report.left(), engine="zero2")
    if error is not None:
        report.row(sec, "deepspeed tiny sd3: unsharded", "ERROR", error=error)
        sec["had_error"] = True
        return
    unsharded = work / "zero2" / "unsharded"
    for engine in ("zero2", "zero3"):
        for name, resume in [("full", False), ("part", False), ("part", True)]:
            what = f"{engine} {name} resumed" if resume else f"{engine} {name}"
            if out_of_time(report, sec, f"deepspeed tiny sd3: {what}"):
                return
            extra = ["--fsdp-resume"] if resume else []
            result, wall, error = fsdp_launch(work, name, model, device, n, extra, report.left(), engine=engine)
            if error is not None:
                report.row(sec, f"deepspeed tiny sd3: {what}", "ERROR", error=error)
                sec["had_error"] = True
                return
            report.row(sec, f"deepspeed tiny sd3: {what}", "ok", wall_s=round(wall, 1), **result)
        states = {}
        for name, run in (("full", work / engine / "full"), ("part", work / engine / "part"), ("one", unsharded)):
            flat: dict[str, torch.Tensor] = {}
            ckpt.flatten_state(ckpt.load_checkpoint(ckpt.latest_checkpoint(run / "checkpoints")), "", flat)
            states[name] = flat
        numbers: dict[str, Any] = {}
        bad = []
        compare_states(states, "one", numbers, bad)
        report.row(sec, f"deepspeed tiny sd3 {engine}: save -> resume vs uninterrupted and unsharded",
                   "ok" if not bad else "WARN: " + "; ".join(bad), **numbers)  # fmt: skip


def fsdp_launch(
    work: Path, name: str, model: str, device: str, procs: int, extra: list[str], timeout: float, engine: str = "fsdp"
):
    """(result numbers, wall seconds, error text or None) of one run of :func:`fsdp_child`: launched by accelerate
    with the ``engine``'s config (:data:`ENGINES`) on ``procs`` processes, or (``procs`` 0) a plain process."""
    out = work / f"{engine}_{name}_{len(extra)}.json"
    child = [str(GPU_CHECK), "--fsdp-child", str(work / engine / name), "--fsdp-ckpt", model, "--fsdp-result",
             str(out), "--device", device, "--fsdp-engine", engine, *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["PYTHONPATH"] = with_root(os.environ.get("PYTHONPATH"))
    if procs:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if device == "cpu":
            env["ACCELERATE_USE_CPU"] = "true"  # gloo processes (FSDP2 on a CPU mesh, DeepSpeed's CPU accelerator)
        # accelerate's launcher module run by this interpreter: its script may not sit next to it (a --target
        # install), and this way it is the accelerate this process imports
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ENGINES[engine]),
               "--num_processes", str(procs), "--mixed_precision", "no", "--main_process_port", str(port),
               *child]  # fmt: skip
    else:
        cmd = [sys.executable, *child]
    t0 = time.perf_counter()
    limit = max(60.0, min(300.0, timeout))
    proc = run_group(cmd, limit, env=env)
    wall = time.perf_counter() - t0
    if proc is None:
        return {}, wall, f"timed out after {limit:.0f} s"
    result = json.loads(out.read_text()) if out.is_file() else {}
    if proc.returncode == 0 and result.get("ok"):
        return result.get("numbers", {}), wall, None
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    return {}, wall, result.get("error") or f"returncode {proc.returncode}\n{tail}"


def fsdp_child(
    run_dir: str, ckpt: str, result_path: str, device: str, resume: bool = False, engine: str = "fsdp"
) -> int:
    """One process of a :func:`fsdp_launch` run: tiny SD3, full fine-tuning, through ``mmgrpo.train.trainer.train``
    (the accelerator, FSDP2, DeepSpeed or plain, comes from the launcher, as for ``mmgrpo train``); rank 0 writes the
    result."""
    result: dict[str, Any] = {"ok": False}
    rank = int(os.environ.get("RANK", "0"))
    try:
        from mmgrpo.train.config import load_config
        from mmgrpo.train.trainer import train

        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons
        torch.backends.cudnn.allow_tf32 = False
        register_check_rewards()
        trainer_kw = {"checkpoint_every": 2, "keep_checkpoints": 1, "max_grad_norm": 1.0}
        base = {
            "pipeline": "text_to_image",
            "policy": {"options": diffusion_policy_options("sd3", ckpt, num_steps=2, lora_rank=0)},
            "data": {"options": {"heldout_prompts": "", "prompts": "shapes"}},
            "rewards": [{"name": IMAGE_REWARD}],
            "trainer": trainer_options(FSDP_STEPS, 2, 2, "no", **trainer_kw),
        }
        run = Path(run_dir)
        overrides = [f"resume={run}"] if resume else [f"run.output_dir={run.parent}", f"run.name={run.name}"]
        if not resume and "part" in run.name:
            overrides.append("trainer.stop_after_steps=2")
        t0 = time.perf_counter()
        trainer = train(load_config(None, overrides, base=base))
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [x["loss/total"] for x in lines if "loss/total" in x]
        sharded = trainer.mesh is not None if engine == "fsdp" else trainer.zero_stage == int(engine[4:])
        result["numbers"] = {
            "distributed_type": str(trainer.acc.distributed_type).split(".")[-1],
            "processes": trainer.acc.num_processes,
            "sharded_params": trainer.mesh is not None,
            "zero_stage": trainer.zero_stage,
            "step": trainer.step,
            "losses": [round(v, 5) for v in losses],
            "train_s": round(time.perf_counter() - t0, 2),
        }
        want_sharded = "unsharded" not in run.name
        result["ok"] = sharded == want_sharded and all(math.isfinite(v) for v in losses)
        if not result["ok"]:
            result["error"] = f"sharded by {engine} {sharded} (wanted {want_sharded}), losses {losses}"
    except Exception as e:  # noqa: BLE001
        result["error"] = error_text(e, lines=20)
    if rank == 0:
        Path(result_path).write_text(json.dumps(result))
    return 0 if result["ok"] or rank != 0 else 1
