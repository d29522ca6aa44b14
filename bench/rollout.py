"""Rollout benchmark: the policy's SDE rollout with log-probs vs the diffusers pipeline on the same SD3 model.

    python bench/rollout.py                       # CPU, fp32, 7 repeats; writes bench/results/rollout.md
    python bench/rollout.py --device cuda --dtype bfloat16 --repeats 10
    python bench/rollout.py --tiny --repeats 1    # the smoke test's configuration (seconds)
    python bench/rollout.py --guidance 4.5        # with classifier-free guidance on both sides

What is compared, at equal steps (T = 10) and batch (N = B*G = 2 prompts x 4 = 8), on one model built from config
(random weights: timing only) whose modules are *shared* by both sides:

- ``DiffusionPolicy.rollout``: Flow-GRPO SDE at noise level 0.7 on every step, fp32 log-prob of each step,
  every latent state kept ([N, T+1, C, h, w]), per-prompt seeded noise, VAE decoding to images in [0, 1].
- ``StableDiffusion3Pipeline(...)(output_type="pt")``: the ODE Euler sampler, VAE decoding, images in [0, 1].

Both encode the prompts, run T transformer forwards (no CFG: guidance 1) and decode, so the ratio is the cost of
the RL bookkeeping (SDE step maths, log-probs, stored states, noise drawn per group). ``--guidance s`` (> 1) samples
with classifier-free guidance on both sides (the empty negative prompt; the pipeline runs one forward of the doubled
batch [uncond; cond] per step, as mmgrpo does); ``--cfg-forwards 2`` makes mmgrpo run the two branches as two
forwards of N rows instead, as it did before 2026-12-06 (the before/after of that change). The two are timed
alternately (the order flips every repeat) after one warm-up call each; medians are reported, and the paired ratio:
the median over repeats of each rollout's time over the pipeline call next to it, with a 95% bootstrap interval
(a ratio of neighbours cancels the slow drift of a shared machine).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

PROMPTS = ["a red circle", "two blue squares"]  # B = 2
GROUP = 4  # G = 4 -> N = 8
STEPS = 10  # T
NOISE_LEVEL = 0.7  # Flow-GRPO's a
DEFAULT_OUT = Path(__file__).parent / "results" / "rollout.md"


def small_sd3_components(seed: int = 0) -> dict[str, Any]:
    """A small but not trivial SD3: 4 MMDiT layers of width 128 on 16 x 32 x 32 latents (256 patch tokens), a
    2-level 16-channel VAE (64 x 64 images), two CLIP text encoders and a T5 encoder of width 64."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from mmgrpo.testing.tokenizers import word_tokenizer

    torch.manual_seed(seed)
    tok = word_tokenizer(max_length=16)
    clip = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=32, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    t5 = T5Config(vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8)  # fmt: skip
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=64,
        pos_embed_max_size=32,
    )  # fmt: skip
    vae = AutoencoderKL(  # scaling and shift factors of SD3's VAE
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=16,
        norm_num_groups=8, layers_per_block=1, sample_size=64, scaling_factor=1.5305, shift_factor=0.0609,
    )  # fmt: skip
    out = {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**clip)),
        "tokenizer": tok,
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**clip)),
        "tokenizer_2": word_tokenizer(max_length=16),
        "text_encoder_3": T5EncoderModel(t5),
        "tokenizer_3": word_tokenizer(max_length=32),
        "vae": vae,
    }
    for m in out.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    return out


def build(tiny: bool, device: str, dtype: str, guidance: float = 1.0) -> tuple[Any, Any, int]:
    """(DiffusionPolicy, StableDiffusion3Pipeline sharing its modules, max_sequence_length)."""
    from diffusers import StableDiffusion3Pipeline

    from mmgrpo.policies.diffusion import DiffusionPolicy, DiffusionPolicyOptions
    from mmgrpo.policies.models.sd3 import SD3Adapter
    from mmgrpo.testing.tiny_sd3 import tiny_sd3_components

    c = tiny_sd3_components() if tiny else small_sd3_components()
    max_len = 16 if tiny else 32
    encoders = [c["text_encoder"], c["text_encoder_2"], c["text_encoder_3"]]
    tokenizers = [c["tokenizer"], c["tokenizer_2"], c["tokenizer_3"]]
    if c["vae"].config.shift_factor is None:  # the pipeline adds it unconditionally (the adapter reads None as 0)
        c["vae"].register_to_config(shift_factor=0.0)
    # the adapter moves the shared modules to device and dtype
    adapter = SD3Adapter(c["transformer"], c["scheduler"], encoders, tokenizers, c["vae"],
                         max_sequence_length=max_len, device=device, dtype=dtype)  # fmt: skip
    sde = {"kind": "flow_grpo", "noise_level": NOISE_LEVEL}
    opts = DiffusionPolicyOptions(num_steps=STEPS, sde=sde, exploration="full", guidance_scale=guidance)
    policy = DiffusionPolicy(adapter, opts)
    policy.model.eval().requires_grad_(False)
    pipe = StableDiffusion3Pipeline(**c)
    pipe.set_progress_bar_config(disable=True)
    return policy, pipe, max_len


@contextlib.contextmanager
def two_guided_forwards() -> Iterator[None]:
    """While active, DiffusionPolicy runs the two guidance branches as two forwards of N rows (its path where the
    conditions cannot be stacked), as every guided step did before 2026-12-06."""
    import mmgrpo.policies.diffusion as diffusion

    stack = diffusion.stack_conds
    diffusion.stack_conds = lambda *args: None
    try:
        yield
    finally:
        diffusion.stack_conds = stack


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Any, device: str) -> tuple[float, Any]:
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def calls(policy: Any, pipe: Any, max_len: int, device: str) -> dict[str, Any]:
    """The two timed calls, each producing N = 8 images [8, 3, H, W] in [0, 1]."""
    from mmgrpo.core.types import PromptBatch

    h, w = policy.adapter.height, policy.adapter.width

    def rollout():
        r = policy.rollout(PromptBatch(prompts=list(PROMPTS), seeds=[1, 2]), GROUP)
        return r.samples

    def pipeline():
        gen = torch.Generator(device="cpu").manual_seed(0)
        with torch.no_grad():
            return pipe(prompt=list(PROMPTS), num_images_per_prompt=GROUP, num_inference_steps=STEPS,
                        guidance_scale=policy.opts.guidance_scale, height=h, width=w, output_type="pt",
                        max_sequence_length=max_len,
                        generator=gen).images  # fmt: skip

    return {"rollout": rollout, "pipeline": pipeline}


def measure(fns: dict[str, Any], repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per call for each function, alternating (order flips every repeat) after one warm-up each."""
    shapes = {name: tuple(fn().shape) for name, fn in fns.items()}  # warm-up
    if len(set(shapes.values())) != 1:
        raise RuntimeError(f"the two sides produce different outputs: {shapes}")
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(fns[name], device)[0])
    return times


def table(
    times: dict[str, list[float]],
    device: str,
    dtype: str,
    latent: tuple[int, ...],
    image: tuple[int, int],
    guidance: float = 1.0,
    cfg_forwards: int = 1,
):
    """One markdown table: medians, spread, the ratio of the medians, and the paired ratio (each repeat's rollout over
    the pipeline call next to it) with a 95% bootstrap interval of its median."""
    ro, pi = statistics.median(times["rollout"]), statistics.median(times["pipeline"])
    paired, lo, hi = paired_ratio(times["rollout"], times["pipeline"])
    n = len(PROMPTS) * GROUP
    head = ("| device | dtype | N (B x G) | T | guidance (mmgrpo forwards a step) | latent | image | repeats | "
            "rollout SDE a=0.7 + log-probs, median s (min-max) | diffusers SD3 pipeline, median s (min-max) | "
            "paired ratio: median (95% interval) | ratio rollout / pipeline |")  # fmt: skip
    cfg = f"{guidance:g} ({cfg_forwards})" if guidance != 1.0 else "1 (1)"
    row = (
        f"| {device} | {dtype} | {n} ({len(PROMPTS)} x {GROUP}) | {STEPS} | {cfg} | {'x'.join(map(str, latent))} | "
        f"{image[0]}x{image[1]} | {len(times['rollout'])} | "
        f"{ro:.3f} ({min(times['rollout']):.3f}-{max(times['rollout']):.3f}) | "
        f"{pi:.3f} ({min(times['pipeline']):.3f}-{max(times['pipeline']):.3f}) | "
        f"{paired:.3f} ({lo:.3f}-{hi:.3f}) | **{ro / pi:.2f}** |"
    )
    return "\n".join([head, "|" + "---|" * 12, row])


def paired_ratio(ours: list[float], theirs: list[float]) -> tuple[float, float, float]:
    """``bench/learning_stats.py``'s paired ratio (this file is also loaded by path, without bench/ on sys.path)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from learning_stats import paired_ratio as paired

    return paired(ours, theirs)


def environment(device: str) -> str:
    import diffusers

    where = torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or "cpu")
    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if hasattr(os, "getloadavg") else ""
    return (f"torch {torch.__version__}, diffusers {diffusers.__version__}, {where}, "
            f"{torch.get_num_threads()} torch threads{load}")  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/rollout.py", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--repeats", type=int, default=7, help="timed calls of each side")
    p.add_argument("--tiny", action="store_true", help="the 2-layer test model on 8x8 latents (smoke test)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale of both sides")
    p.add_argument(
        "--cfg-forwards",
        type=int,
        choices=(1, 2),
        default=1,
        help="mmgrpo's guided forwards per step: 1 (the doubled batch) or 2 (before 2026-12-06)",
    )
    p.add_argument("--out", default=None, help=f"markdown file for the table (default: {DEFAULT_OUT}; none with "
                   "--tiny; '' = do not write)")  # fmt: skip
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    policy, pipe, max_len = build(args.tiny, args.device, args.dtype, args.guidance)
    with two_guided_forwards() if args.cfg_forwards == 2 else contextlib.nullcontext():
        times = measure(calls(policy, pipe, max_len, args.device), args.repeats, args.device)
    a = policy.adapter
    shapes = (a.latent_shape(), (a.height, a.width))
    text = table(times, args.device, args.dtype, *shapes, args.guidance, args.cfg_forwards)
    print(text)
    out = args.out if args.out is not None else ("" if args.tiny else str(DEFAULT_OUT))
    if out:
        command = " ".join(["python bench/rollout.py", *map(shlex.quote, argv)])
        threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
        body = (f"# Rollout benchmark\n\nMade by `{threads}{command}` ({environment(args.device)}).\n\n"
                f"{text}\n")  # fmt: skip
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(body)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
