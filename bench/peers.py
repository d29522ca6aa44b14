"""Side by side with the peers: mmgrpo against TRL's ``GRPOTrainer`` (VLM) and a faithful Flow-GRPO loop (diffusion).

    python bench/peers.py                      # everything, ~25 min on 2 idle cores; writes bench/results/peers.md
    python bench/peers.py --only diffusion     # or: vlm, rollout (several allowed)
    python bench/peers.py --quick --out ''     # the smoke test's tiny sizes in one process (tests/bench, seconds)
    python bench/peers.py --device cuda --match 'B 8 x G 8, T 8 (' 'hidden 256 / 4 layers, 448'   # on one GPU

What runs (the sides are built and timed by ``bench/peer_sides.py``), each side in its own fresh process
(``OMP_NUM_THREADS`` = ``--threads``, 2 by default), one warm-up step then ``--steps`` timed steps, the two sides
alternating (the order flips every repeat), ``--repeats`` times; the table gives the median over repeats of each
process's median step (min-max over repeats) and each process's peak resident memory (``ru_maxrss``: weights,
optimizer, activations, the rollout's stored states, and the libraries):

- **VLM GRPO** on a tiny Qwen2-VL (``assets/tiny_qwen2_vl``: hidden 64, 2 layers; and one built from its config with
  hidden 256, 4 layers, random weights), B 2 prompts x G 8, 32 new tokens at temperature 1, beta 0 (no reference),
  full fine-tuning of the language model with the vision tower frozen, the ``format`` and ``accuracy`` rewards plus a
  continuous one (``peer_sides.text_compressibility``: the random-weight model scores 0 on the verifier, and mmgrpo
  forwards only one row of a step whose groups all have zero spread while TRL trains every row; with it both sides
  train all B x G rows, which the table's trained rows show; one more row at hidden 256, 448 px runs the verifier
  alone), the synthetic shapes questions rendered at 56 x 56 (4 vision tokens) and 448 x 448 pixels (256 vision
  tokens; the processor's pixel budget is raised to 448 x 448 on both sides). mmgrpo: the ``vlm_reasoning``
  recipe's trainer, default options. TRL: ``GRPOTrainer`` with the same model object, processor, prompts (system
  turn, image, question), rewards (the same functions), B x G rows per step and per generation, one optimizer step
  per generation, activation checkpointing off (``GRPOConfig`` turns it on by default, recomputing each layer's
  forward in backward; mmgrpo's default does not: equal work), no eval, no logging, no saving; a step is timed from
  one ``on_step_end`` to the next (data loading and generation included).
- **Diffusion Flow-GRPO step** on the shipped shapes SD3 (``assets/shapes_t2i``): the Flow-GRPO SDE (noise level 0.7)
  on T steps, training the first int(0.99 T) (T 8: 7), clip range 1e-4, advantages clamped to 5, lr 3e-4, weight
  decay 1e-4, full fine-tuning, no CFG, beta 0, DDPO's ``jpeg_compressibility`` reward (continuous, so no group
  has zero spread and both sides train every row: equal work); at B 8 x G 8, T 8 (once more with the shapes world's
  ``shapes`` verifier, whose groups often all score alike), then B 2 on the
  G x T grid G in {4, 8, 16}, T in {5, 10, 20} (B 2 x G 16 x T 20 is its corner) and B 2 x G 4, T 40 (39 trained
  steps a row: more than the default budget of 16 (row, step) pairs, so mmgrpo splits each row's steps into 2 parts),
  each point again with mmgrpo at a budget of 8 pairs (the peer's forwards of 8 rows). mmgrpo: the ``text_to_image``
  trainer, default options (``trainer.micro_batch_size: auto``), as many optimizer steps per rollout as the peer
  (``trainer.minibatches``); three more rows run mmgrpo alone at B 8 x G 8, T 8 with the whole minibatch in one
  forward (``micro_batch_size 0``, the default before ``auto``) and with budgets of 8 and 32 (row, step) forwards per
  micro-batch instead of the default 16 (``micro_batch_units``), against the same peer measurement. Peer:
  ``bench/flow_grpo_peer.py``, a re-implementation of Flow-GRPO's published training step (its SDE step and
  log-prob, per-timestep clipped loss, sampling and training batches of 8 rows, timesteps looped inside each batch,
  gradient accumulation over batches x timesteps, its zero-advantage row filter); its header names the commit it
  follows and every simplification. Both sides train on the same prompts at every step (the loop is given them in
  mmgrpo's stream order), so they differ only in their noise. With the verifier reward, which rows have zero
  advantage (untrained on both sides) depends on each side's samples, so the two sides' work differs by chance
  (measured 2026-12-05 at B 2 x G 4, T 20: mmgrpo trained 8 rows a step, the loop 4, in every process, since
  every process draws the same noise); the continuous reward removes that. The B 2 grid points time 6 steps instead
  of ``--steps`` (short steps: a steadier median); the table gives the rows each side trained.
- **Guided diffusion step** at B 2 x G 8, T 10 with classifier-free guidance 4.5 (Flow-GRPO's SD3 scale) on both
  sides: the loop's ``train.cfg`` path and mmgrpo's default, both one transformer forward of the doubled batch
  [uncond; cond] per step with the gradient through both halves; once more with mmgrpo running the two branches as
  two forwards, as it did before 2026-12-06 (``Point.cfg_forwards``), against the same peer measurement.
- **Rollout**: ``bench/rollout.py``'s comparison (mmgrpo's SDE rollout with log-probs vs diffusers'
  ``StableDiffusion3Pipeline`` on the same modules, equal steps), without guidance and with classifier-free guidance
  4.5 (Flow-GRPO's SD3 scale), median of max(9, 3 x ``--repeats``) alternating calls in one process.

``--device cuda`` runs every side on one GPU, fp32 on both sides as on CPU: mmgrpo's trainers through an accelerate
``Accelerator`` on the GPU, the Flow-GRPO loop's pipeline and advantages moved there (as their
``accelerator.device``), TRL without ``use_cpu``, the rollout comparison's modules on the GPU. A step's time then
ends with ``torch.cuda.synchronize()``, the compute meter synchronises at the start and end of each metered span,
and the memory columns give ``torch.cuda.max_memory_allocated`` (the tensors' peak) instead of the resident set.
Two rows exist only there, at realistic model sizes with random weights built from config: the VLM at
Qwen2-VL-2B's shape (2.2B parameters) against TRL, and the diffusion step on an SD3 pipeline with SD3-medium's
transformer (2.0B parameters), VAE and CLIP widths (``DIFFUSION_SHAPES``) against the Flow-GRPO loop, at 256 x 256
px with 128 zero T5 tokens (Flow-GRPO's max_sequence_length), B 1 x G 4, T 5: mmgrpo's default micro-batch of 16
(row, step) pairs and AdamW's fp32 state fit an 80 GB GPU there.
``bench/gpu_check.py`` runs a few rows so (its section 9) whenever it has a GPU.

Timings mean something only on an otherwise idle machine: the results file records the load average before and
after. Even idle, this 2-vCPU VM drifts: the same process run twice in a row differed by up to 40% (the Flow-GRPO loop
at B 2 x G 4, T 20: 2.2-2.5 s a step, then 1.6-1.7 s, 2026-12-05), so a ratio within ~0.1 of 1 at the small points
needs more ``--repeats`` to settle. (Timing both sides in one process, steps interleaved, is no cure: there mmgrpo's
steps after the loop's ran 6% slower than alone, the loop's unchanged.) ``--quick`` (tiny sizes, every job in one
process, one repeat, one timed step) only checks that everything runs; its numbers are not measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _p in (ROOT, BENCH):  # mmgrpo, and the peer loop next to this file
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
from learning_stats import paired_ratio  # noqa: E402
from peer_sides import RESULT, SHAPES_T2I  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "peers.md"
TINY_VLM = ROOT / "assets" / "tiny_qwen2_vl"
PEER_OF = {"diffusion": "flow_grpo", "vlm": "trl", "rollout": "diffusers"}
DIFFUSION_REWARD = "jpeg_compressibility"  # continuous: no group has zero spread, so both sides train every row


@dataclass
class Point:
    """One row of a table: a family, its sizes, and mmgrpo config overrides (``peer`` False: the row reuses the peer
    measurement of the row with the same family and sizes)."""

    label: str
    family: str
    sizes: dict[str, Any]
    overrides: list[str] = field(default_factory=list)
    peer: bool = True
    steps: int | None = None
    """timed steps per process (None: ``--steps``)"""
    cfg_forwards: int = 1
    """2: mmgrpo runs the two guidance branches as two forwards of the rows, as before 2026-12-06"""

    def key(self) -> str:
        return json.dumps([self.family, self.sizes], sort_keys=True)


def points(quick: bool, only: list[str], device: str = "cpu") -> list[Point]:
    out: list[Point] = []
    if quick:
        out += [Point("VLM tiny (quick)", "vlm", {"hidden": 64, "image": 56, "B": 1, "G": 2, "tokens": 4}),
                Point("diffusion B 1 x G 2, T 3 (quick)", "diffusion", {"B": 1, "G": 2, "T": 3}),
                Point("diffusion B 1 x G 2, T 3, guidance 3 (quick)", "diffusion", {"B": 1, "G": 2, "T": 3,
                                                                                   "guidance": 3.0}),
                Point("diffusion B 1 x G 2, T 3, guidance 3, two forwards (quick)", "diffusion",
                      {"B": 1, "G": 2, "T": 3, "guidance": 3.0}, peer=False, cfg_forwards=2),
                Point("rollout (quick)", "rollout", {"tiny": True})]  # fmt: skip
    else:
        for hidden, layers in ((64, 2), (256, 4)):
            for image in (56, 448):
                label = f"VLM hidden {hidden} / {layers} layers, {image}x{image}, B 2 x G 8, 32 tokens"
                out.append(Point(label, "vlm", {"hidden": hidden, "image": image, "B": 2, "G": 8, "tokens": 32}))
        # the R1 verifier alone: a random-weight model scores 0 on every row, so mmgrpo forwards one row a step
        verifier = {"hidden": 256, "image": 448, "B": 2, "G": 8, "tokens": 32, "reward": "verifier"}
        label = "VLM hidden 256 / 4 layers at 448x448, format + accuracy rewards only, B 2 x G 8, 32 tokens"
        out.append(Point(label, "vlm", verifier))
        if device == "cuda":  # 2.2B parameters: a GPU's work
            label = "VLM Qwen2-VL-2B shape (random weights), 448x448, B 2 x G 8, 32 tokens"
            out.append(Point(label, "vlm", {"hidden": 1536, "image": 448, "B": 2, "G": 8, "tokens": 32}))
            # 2.0B parameters: SD3-medium's transformer; 256 px (16 x 16 patches) keeps mmgrpo's default micro-batch
            # (16 (row, step) pairs) and AdamW's fp32 state in one 80 GB GPU
            sd3 = {"B": 1, "G": 4, "T": 5, "reward": DIFFUSION_REWARD, "model": "sd3-medium", "t5_tokens": 128}
            label = "diffusion SD3-medium shape (random weights), 256x256, 128 T5 tokens, B 1 x G 4, T 5 (4 trained)"
            out.append(Point(label, "diffusion", sd3))
        main = {"B": 8, "G": 8, "T": 8, "reward": DIFFUSION_REWARD}
        out.append(Point("diffusion B 8 x G 8, T 8 (7 trained), default options", "diffusion", main))
        verifier = {**main, "reward": "shapes"}
        out.append(Point("diffusion B 8 x G 8, T 8, the shapes verifier reward", "diffusion", verifier))
        for what, override in [("micro_batch_size 0 (the whole minibatch)", "trainer.micro_batch_size=0"),
                               ("micro_batch_units 8", "trainer.micro_batch_units=8"),
                               ("micro_batch_units 32", "trainer.micro_batch_units=32")]:  # fmt: skip
            out.append(Point(f"diffusion B 8 x G 8, T 8, mmgrpo {what}", "diffusion", main, [override], peer=False))
        grid = [(G, T) for G in (4, 8, 16) for T in (5, 10, 20)] + [(4, 40)]
        for G, T in grid:
            # small steps: twice the timed steps, for a steadier median
            sizes = {"B": 2, "G": G, "T": T, "reward": DIFFUSION_REWARD}
            out.append(Point(f"diffusion B 2 x G {G}, T {T}", "diffusion", sizes, steps=6))
        for G, T in grid:  # the budget of the peer's 8-row forwards: its memory, at what cost in time
            sizes = {"B": 2, "G": G, "T": T, "reward": DIFFUSION_REWARD}
            label = f"diffusion B 2 x G {G}, T {T}, mmgrpo micro_batch_units 8"
            out.append(Point(label, "diffusion", sizes, ["trainer.micro_batch_units=8"], peer=False, steps=6))
        guided = {"B": 2, "G": 8, "T": 10, "reward": DIFFUSION_REWARD, "guidance": 4.5}
        out.append(Point("diffusion B 2 x G 8, T 10, guidance 4.5 (both: one forward of the doubled batch)",
                         "diffusion", guided, steps=6))  # fmt: skip
        out.append(Point("diffusion B 2 x G 8, T 10, guidance 4.5, mmgrpo as before 2026-12-06 (two forwards)",
                         "diffusion", guided, peer=False, steps=6, cfg_forwards=2))  # fmt: skip
        out.append(Point("rollout vs StableDiffusion3Pipeline, T 10, N 8", "rollout", {"tiny": False}))
        label = "rollout vs StableDiffusion3Pipeline, T 10, N 8, guidance 4.5"  # both: one forward of 2N rows a step
        out.append(Point(label, "rollout", {"tiny": False, "guidance": 4.5}))
        out.append(Point(f"{label}, mmgrpo as before 2026-12-06 (two forwards)", "rollout",
                         {"tiny": False, "guidance": 4.5}, cfg_forwards=2))  # fmt: skip
    return [p for p in out if p.family in only]


# ====================================================================================== orchestration
VLM_SHAPES: dict[int, dict[str, Any]] = {
    256: {"text": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                   "num_key_value_heads": 2},
          "vision": {"hidden_size": 256}, "mrope": [16, 8, 8]},
    # Qwen/Qwen2-VL-2B-Instruct's config.json (text 1536 x 28, 12 heads, 2 KV heads; vision 1280 x 32; its vocabulary)
    1536: {"text": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
                    "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
           "vision": {"hidden_size": 1536, "depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4},
           "mrope": [16, 24, 24], "tie_word_embeddings": True},
}  # fmt: skip
"""text width -> the shape of a VLM built from the tiny asset's config (random weights; the asset's tokenizer and
processor, so its special-token ids): hidden 256 / 4 layers, and Qwen2-VL-2B's shape (``--device cuda`` only: 2.2B
parameters; its vocabulary of 151936 ids, of which the tiny tokenizer decodes the first 401, the rest to '')"""


DIFFUSION_SHAPES: dict[str, dict[str, Any]] = {
    # stabilityai/stable-diffusion-3-medium-diffusers: transformer/config.json (sample_size 32: 256 px) and
    # vae/config.json; its two CLIP text encoders' widths (768 and 1280, pooled 2048) at one layer each (they run
    # once per prompt, without gradient); no T5 encoder: both sides feed t5_tokens zero tokens, as diffusers does
    "sd3-medium": {
        "transformer": {"sample_size": 32, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
                        "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
                        "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192},
        "clip": [{"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "projection_dim": 768},
                 {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                  "projection_dim": 1280}],
        "vae": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 16,
                "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
                "use_quant_conv": False, "use_post_quant_conv": False,
                "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4},
    },
}  # fmt: skip
"""name -> an SD3 pipeline's shape built from the shipped shapes model's folder (random weights; its tokenizers, its
scheduler and its all-zero T5 placeholder, which both sides replace by zero tokens): ``--device cuda`` only"""


def diffusion_model_dirs(root: Path, names: set[str], device: str = "cpu") -> dict[str, str]:
    """name -> an SD3 pipeline folder of :data:`DIFFUSION_SHAPES`: the shapes model's folder with the transformer,
    the VAE and the two CLIP text encoders rebuilt at that shape with random weights (``torch.manual_seed(0)``;
    built on ``device``, saved fp32), loadable by diffusers' ``StableDiffusion3Pipeline`` and mmgrpo alike."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    dirs = {}
    for name in sorted(names):
        shape, d = DIFFUSION_SHAPES[name], root / f"sd3_{name}"
        shutil.copytree(SHAPES_T2I, d)
        torch.manual_seed(0)
        for sub in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            shutil.rmtree(d / sub)
        with torch.device(device):
            vae = AutoencoderKL.from_config({**AutoencoderKL.load_config(SHAPES_T2I / "vae"), **shape["vae"]})
            parts = {"transformer": SD3Transformer2DModel(**shape["transformer"]), "vae": vae}
            for sub, width in zip(("text_encoder", "text_encoder_2"), shape["clip"]):
                cfg = CLIPTextConfig.from_pretrained(SHAPES_T2I / sub)
                cfg.update({**width, "num_hidden_layers": 1})
                parts[sub] = CLIPTextModelWithProjection(cfg)
        for sub, module in parts.items():
            module.save_pretrained(d / sub, safe_serialization=True)
        del parts
        if device == "cuda":  # this process stays up while the workers run: give the GPU memory back
            torch.cuda.empty_cache()
        dirs[name] = str(d)
    return dirs


def vlm_config(hidden: int):
    """The tiny asset's Qwen2VLConfig reshaped to ``VLM_SHAPES[hidden]``."""
    from transformers import Qwen2VLConfig

    shape = VLM_SHAPES[hidden]
    cfg = Qwen2VLConfig.from_pretrained(TINY_VLM)
    layers = shape["text"]["num_hidden_layers"]
    cfg.text_config.update({**shape["text"], "layer_types": ["full_attention"] * layers})
    cfg.text_config.rope_parameters["mrope_section"] = list(shape["mrope"])  # covers half the head dimension
    cfg.vision_config.update(shape["vision"])  # hidden_size: the merger projects to the text width
    if "tie_word_embeddings" in shape:  # the head shares the embedding matrix (Qwen2-VL-2B's 2.2B parameters)
        cfg.tie_word_embeddings = shape["tie_word_embeddings"]
    return cfg


def vlm_model_dirs(root: Path, quick: bool, hiddens: set[int] | None = None, device: str = "cpu") -> dict[int, str]:
    """hidden size -> model folder: the tiny asset (hidden 64) and the :data:`VLM_SHAPES` of ``hiddens`` (default:
    64 and 256) built from its config with random weights (on ``device``; the 2B shape saved in bf16, both sides load
    fp32), all with the processor's pixel budget raised to 448 x 448 (256 vision tokens)."""
    if quick:
        return {64: str(TINY_VLM)}
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    dirs = {}
    for hidden in sorted(hiddens or {64, 256}):
        d = root / f"qwen2_vl_{hidden}"
        shutil.copytree(TINY_VLM, d)
        if hidden != 64:
            torch.manual_seed(0)
            for f in d.glob("*.safetensors"):
                f.unlink()
            with torch.device(device):
                model = Qwen2VLForConditionalGeneration(vlm_config(hidden))
            if hidden >= 1536:  # 2.2B parameters: half the disk in bf16 (the smaller ones stay fp32, as before)
                model.to(torch.bfloat16)
            model.save_pretrained(d, safe_serialization=True)
            del model
            if device == "cuda":  # this process stays up while the workers run: give the GPU memory back
                torch.cuda.empty_cache()
        proc = json.loads((d / "processor_config.json").read_text())
        for part in ("image_processor", "video_processor"):
            proc[part]["size"]["longest_edge"] = 448 * 448
        (d / "processor_config.json").write_text(json.dumps(proc, indent=2))
        dirs[hidden] = str(d)
    return dirs


def jobs_for(point: Point, sides: list[str], args: argparse.Namespace, models: dict[Any, str]) -> list[dict]:
    steps = args.steps if args.quick or point.steps is None else max(args.steps, point.steps)
    base = {"family": point.family, "sizes": point.sizes, "overrides": point.overrides, "warmup": args.warmup,
            "steps": steps, "repeats": args.repeats, "label": point.label, "device": args.device,
            "cfg_forwards": point.cfg_forwards}  # fmt: skip
    if point.family == "vlm":
        base["model"] = models[point.sizes["hidden"]]
    if point.family == "diffusion" and "model" in point.sizes:  # a shape built from config (else the shapes model)
        base["model"] = models[point.sizes["model"]]
    if point.family == "rollout":  # ~1 s a call: more alternating calls in its one process, for a steadier median
        return [{**base, "side": "both", "repeats": args.repeats if args.quick else max(9, 3 * args.repeats)}]
    return [{**base, "side": side} for side in sides]


def missing_library(job: dict) -> str | None:
    """Why a job cannot run here (its peer's library is not installed), or None."""
    import importlib.util

    if job["side"] == "trl" and importlib.util.find_spec("trl") is None:
        return "trl is not installed (pip install trl, or mmgrpo's bench extra)"
    return None


def run_jobs(jobs: list[dict], args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Run ``jobs`` in one fresh worker process; -> their results (a crashed worker: an error result per job; a job
    whose peer library is missing: an error result without running)."""
    skipped = [{"family": j["family"], "side": j["side"], "sizes": j["sizes"], "error": missing_library(j),
                "label": j["label"], "overrides": j["overrides"]} for j in jobs if missing_library(j)]  # fmt: skip
    jobs = [j for j in jobs if not missing_library(j)]
    if not jobs:
        return skipped
    path = tmp / f"jobs_{time.monotonic_ns()}.json"
    path.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    try:
        done = subprocess.run([sys.executable, str(BENCH / "peer_sides.py"), str(path)], env=env, capture_output=True,
                              text=True, timeout=args.timeout)  # fmt: skip
        out, err = done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        out, err = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timed out"
    results = [json.loads(line[len(RESULT) :]) for line in out.splitlines() if line.startswith(RESULT)]
    last = err.strip().splitlines()[-1] if err.strip() else "?"
    for job in jobs[len(results) :]:
        results.append({"family": job["family"], "side": job["side"], "sizes": job["sizes"],
                        "error": f"worker died: {last}"[:300]})  # fmt: skip
    for job, res in zip(jobs, results):
        res["label"] = job["label"]
        res["overrides"] = job["overrides"]
    return results + skipped


def measure(
    pts: list[Point], args: argparse.Namespace, models: dict[Any, str], tmp: Path, on_result=None
) -> list[dict]:
    """Every job of ``pts``; ``on_result(results so far)`` after each (the partial table is written as it grows)."""
    results: list[dict] = []
    if args.quick:  # every job in one process: a smoke test, no per-side memory
        jobs = [j for p in pts for j in jobs_for(p, ["mmgrpo", PEER_OF[p.family]] if p.peer else ["mmgrpo"], args,
                                                  models)]  # fmt: skip
        return run_jobs(jobs, args, tmp)
    for r in range(args.repeats):
        for p in pts:
            sides = ["mmgrpo", PEER_OF[p.family]] if p.peer else ["mmgrpo"]
            if p.family == "rollout" and r > 0:
                continue  # bench/rollout.py alternates and repeats inside its one process
            for job in jobs_for(p, sides if r % 2 == 0 else sides[::-1], args, models):
                res = run_jobs([job], args, tmp)[0]
                results.append(res)
                if on_result is not None:
                    on_result(results)
                step = statistics.median(res["s_per_step"]) if res.get("s_per_step") else None  # fmt: skip
                print(f"[{r + 1}/{args.repeats}] {p.label} | {job['side']}: "
                      + (f"error {res['error']}" if "error" in res else
                         f"{step:.3f} s/step, peak {res['peak_mib']:.0f} MiB" if step is not None else "done"),
                      flush=True)  # fmt: skip
    return results


def _fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return (
        f"{med:.{digits}f}"
        if len(values) == 1
        else f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"
    )


def _side(results: list[dict], p: Point, side: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Per-repeat step medians, peaks and errors of one side of a point."""
    mine = [r for r in results if r.get("label") == p.label and r["side"] == side]
    if side != "mmgrpo" and not p.peer:  # the peer row of the same sizes
        mine = [r for r in results if r["side"] == side and r["family"] == p.family and r["sizes"] == p.sizes]
    steps = [statistics.median(r["s_per_step"]) for r in mine if r.get("s_per_step")]
    return {
        "steps": steps,
        "peaks": [r["peak_mib"] for r in mine if "peak_mib" in r and r.get("s_per_step")],
        "errors": sorted({r["error"] for r in mine if "error" in r}),
        "rows": next((r["rows"] for r in mine if "rows" in r), None),
        "tokens": [r["tokens_mean"] for r in mine if r.get("tokens_mean") is not None],
        "trained": [r["trained_rows"] for r in mine if r.get("trained_rows") is not None],
        "fractions": [r["compute_fraction"] for r in mine if r.get("compute_fraction") is not None],
    }


def tables(results: list[dict], pts: list[Point], quick: bool, device: str = "cpu") -> str:
    out = []
    mem = ("peak CUDA MiB" if device == "cuda" else "peak RSS MiB") + (" (one process: not per side)" if quick else "")
    vlm = [p for p in pts if p.family == "vlm"]
    if vlm:
        out += ["## VLM GRPO step: mmgrpo vs TRL `GRPOTrainer`", "",
                f"| work | mmgrpo s/step | TRL s/step | mmgrpo samples/s | TRL samples/s | **mmgrpo / TRL samples/s** "
                f"| mmgrpo {mem} | TRL {mem} | tokens per row (mmgrpo, TRL) | rows trained per step (mmgrpo, TRL) "
                "| compute fraction (mmgrpo, TRL) |",
                "|---|" + "---|" * 10]  # fmt: skip
        for p in vlm:
            a, b = _side(results, p, "mmgrpo"), _side(results, p, "trl")
            out.append(_row(p.label, a, b, rate=True))
    dif = [p for p in pts if p.family == "diffusion"]
    if dif:
        out += ["", "## Diffusion Flow-GRPO step: mmgrpo vs a faithful Flow-GRPO loop (`bench/flow_grpo_peer.py`)", "",
                f"| work | N x T | mmgrpo s/step | Flow-GRPO loop s/step | **mmgrpo / peer time** | paired by repeat: "
                f"median (95% interval) | mmgrpo {mem} | peer {mem} | rows trained per step (mmgrpo, peer) | "
                "compute fraction (mmgrpo, peer) |",
                "|---|" + "---|" * 9]  # fmt: skip
        for p in dif:
            a, b = _side(results, p, "mmgrpo"), _side(results, p, "flow_grpo")
            nt = p.sizes["B"] * p.sizes["G"] * p.sizes["T"]
            out.append(_row(p.label, a, b, rate=False, extra=str(nt)))
    ro = [r for r in results if r["family"] == "rollout"]
    if ro:
        out += ["", "## Rollout: mmgrpo's SDE rollout with log-probs vs diffusers `StableDiffusion3Pipeline` "
                "(`bench/rollout.py`)", "",
                "| work | mmgrpo rollout s | diffusers pipeline s | paired by call: median (95% interval) | "
                "**rollout / pipeline** |",
                "|---|---|---|---|---|"]  # fmt: skip
        for r in ro:
            if "error" in r:
                out.append(f"| {r['label']} | error: {r['error']} | | | |")
                continue
            ratio = statistics.median(r["mmgrpo"]) / statistics.median(r["peer"])
            out.append(f"| {r['label']} | {_fmt(r['mmgrpo'])} | {_fmt(r['peer'])} | "
                       f"{_paired(r['mmgrpo'], r['peer'])} | **{ratio:.2f}** |")  # fmt: skip
    return "\n".join(out)


def _paired(ours: list[float], theirs: list[float]) -> str:
    """The paired ratio cell: median of ours[i] / theirs[i] over the repeats, with its 95% bootstrap interval; '-'
    when the two sides do not have one time per repeat each (a failed repeat)."""
    if len(ours) != len(theirs) or not ours:
        return "-"
    med, lo, hi = paired_ratio(ours, theirs)
    return f"{med:.2f} ({lo:.2f}-{hi:.2f})"


def _row(label: str, a: dict, b: dict, rate: bool, extra: str | None = None) -> str:
    cells = [label] + ([extra] if extra is not None else [])
    if a["errors"] or b["errors"] or not a["steps"] or not b["steps"]:
        why = "; ".join(a["errors"] + b["errors"]) or "no measurement"
        return "| " + " | ".join(cells + [f"error: {why}"] + [""] * ((11 if rate else 10) - len(cells) - 1)) + " |"
    ma, mb = statistics.median(a["steps"]), statistics.median(b["steps"])
    cells += [_fmt(a["steps"]), _fmt(b["steps"])]
    if rate:
        ra, rb = [a["rows"] / x for x in a["steps"]], [b["rows"] / x for x in b["steps"]]
        cells += [_fmt(ra, 1), _fmt(rb, 1), f"**{mb / ma:.2f}**"]
    else:  # time: the ratio of the medians, then the ratio paired by repeat (the two sides' r-th steps)
        cells += [f"**{ma / mb:.2f}**", _paired(a["steps"], b["steps"])]
    cells += [_fmt(a["peaks"], 0), _fmt(b["peaks"], 0)]
    # VLM: mean completion tokens, then rows through the update; diffusion: rows through the update
    for what in ("tokens", "trained") if rate else ("trained",):
        cells.append(", ".join(f"{statistics.mean(x[what]):.1f}" if x[what] else "-" for x in (a, b)))
    cells.append(", ".join(f"{statistics.median(x['fractions']):.2f}" if x["fractions"] else "-" for x in (a, b)))
    return "| " + " | ".join(cells) + " |"


def environment(threads: int, device: str = "cpu") -> str:
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    libs = ", ".join(f"{n} {version(n)}" for n in ("torch", "transformers", "diffusers", "trl", "peft", "accelerate"))
    load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if hasattr(os, "getloadavg") else ""
    where = f"{platform.processor() or platform.machine()}, OMP_NUM_THREADS={threads}, {load}"
    if device == "cuda":
        import torch

        where = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}); host {where}"
    return f"{libs}; {where}"


def matches(pattern: str, label: str) -> bool:
    """``--match``'s test: ``label`` contains ``pattern``, or equals it when the pattern starts with "="."""
    return label == pattern[1:] if pattern.startswith("=") else pattern in label


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/peers.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, every job in one process, 1 repeat (smoke test)")
    p.add_argument(
        "--only", nargs="+", default=["vlm", "diffusion", "rollout"], choices=["vlm", "diffusion", "rollout"]
    )
    p.add_argument(
        "--match",
        nargs="+",
        default=[""],
        help="only the rows whose label contains one of these texts (e.g. 'T 20' 'B 8 x G 8'), or is one exactly "
        "(a text starting with '=': '=diffusion B 2 x G 16, T 20')",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where both sides run (cuda: one GPU; peak memory is then the CUDA allocator's peak)",
    )
    p.add_argument("--repeats", type=int, default=None, help="processes per side and point (default 3; --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per process (default 3; --quick 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every process")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker process")
    p.add_argument("--out", default=None, help=f"markdown file (default {DEFAULT_OUT}; none with --quick; '' = none)")
    args = p.parse_args(argv)
    if args.repeats is None:  # not `or`: 0 must reach the check below, not become the default
        args.repeats = 1 if args.quick else 3
    if args.steps is None:
        args.steps = 1 if args.quick else 3
    for name in ("repeats", "steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    pts = [p for p in points(args.quick, args.only, args.device) if any(matches(m, p.label) for m in args.match)]
    if not pts:
        print(f"no row matches --only {' '.join(args.only)} --match {' '.join(map(repr, args.match))}",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("bench/peers.py: --device cuda, but torch.cuda.is_available() is False here", file=sys.stderr)
            return 2
    before = environment(args.threads, args.device)
    t0 = time.perf_counter()
    out = args.out if args.out is not None else ("" if args.quick else str(DEFAULT_OUT))
    command = " ".join(["python bench/peers.py", *map(shlex.quote, argv)])

    def write(results: list[dict], finished: bool) -> None:
        """The results file, replaced whole (a temporary file renamed over it): after every job while running, so a
        run that is stopped keeps what it measured, and at the end."""
        if not out:
            return
        wall = time.perf_counter() - t0
        after = f"load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
        state = "" if finished else f" PARTIAL: {len(results)} jobs done so far, the run was still going."
        body = (f"# mmgrpo vs its peers\n\nMade by `{command}` in {wall / 60:.1f} min.{state} Before: {before}. "
                f"After: {after}. Medians over {args.repeats} processes per side (min-max), each the median of its "
                f"{args.steps} timed steps after {args.warmup} warm-up step(s); sides alternate. What each row "
                f"runs: the docstring of bench/peers.py; the Flow-GRPO loop: bench/flow_grpo_peer.py.\n\n"
                f"{tables(results, pts, args.quick, args.device)}\n")  # fmt: skip
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = path.with_name(path.name + ".tmp")
        tmp_path.write_text(body)
        tmp_path.replace(path)

    with tempfile.TemporaryDirectory() as tmp:
        hiddens = {p.sizes["hidden"] for p in pts if p.family == "vlm"}
        models: dict[Any, str] = vlm_model_dirs(Path(tmp), args.quick, hiddens, args.device) if hiddens else {}
        shapes = {p.sizes["model"] for p in pts if p.family == "diffusion" and "model" in p.sizes}
        if shapes:
            models.update(diffusion_model_dirs(Path(tmp), shapes, args.device))
        results = measure(pts, args, models, Path(tmp), on_result=lambda r: write(r, finished=False))
    print(tables(results, pts, args.quick, args.device))
    if out:
        write(results, finished=True)
        print(f"wrote {out}")
    errors = [r for r in results if "error" in r]
    for r in errors:
        print(f"error in {r.get('label')} ({r['side']}): {r['error']}", file=sys.stderr)
        if r.get("trace"):
            print(r["trace"], file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
