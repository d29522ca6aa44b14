"""Overlap benchmark: how much of a remote reward's latency hides behind sampling (``trainer.rollout_chunks``).

    python bench/overlap.py                  # CPU; writes bench/results/overlap.md
    python bench/overlap.py --latency 0.4 --repeats 3 --out ''

A reward server (``mmgrpo.rewards.server.serve`` on 127.0.0.1, the real HTTP path of ``mmgrpo.rewards.remote``) scores
``jpeg_incompressibility`` after sleeping ``latency`` seconds per scored row (a stand-in for a heavy reward model on
another GPU, whose cost grows with the rows it scores). The trainer runs text-to-image GRPO steps on a tiny SD3
checkpoint with ``rollout_chunks`` 1 (sample everything, then score) and 4 (score chunk c in a background thread
while chunk c+1 is sampled), alternately.
Reported: median seconds per step, sampling and scoring time, the time the step still waited for scores after
sampling, and the hidden fraction = 1 - wait / scoring time.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_OUT = Path(__file__).parent / "results" / "overlap.md"


def slow_reward(latency: float):
    from mmgrpo import rewards

    inner = rewards.get("jpeg_incompressibility")

    def fn(samples, prompts, meta, ctx):
        time.sleep(latency * len(samples))
        return inner(samples, prompts, meta, ctx)

    return fn


def run(ckpt: str, url: str, chunks: int, out_dir: Path, steps: int) -> list[dict]:
    from mmgrpo.train.config import load_config
    from mmgrpo.train.trainer import train

    base = {
        "pipeline": "text_to_image",
        "run": {"name": f"chunks{chunks}", "output_dir": str(out_dir), "overwrite": True},
        "policy": {"options": {"family": "sd3", "path": ckpt, "num_steps": 4, "lora_rank": 2}},
        "data": {"options": {"heldout_prompts": ""}},
        "rewards": [{"name": "remote", "options": {"url": url}}],
        "loss": {"options": {"clip_low": 1e-3, "clip_high": 1e-3}},
        "trainer": {"max_steps": steps, "prompts_per_step": 8, "group_size": 4, "rollout_chunks": chunks,
                    "progress": False, "checkpoint_every": 0},
    }  # fmt: skip
    t = train(load_config(None, [], base=base))
    lines = [json.loads(x) for x in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "time/step_s" in m][1:]  # drop the first (warm-up) step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency", type=float, default=0.03, help="seconds the reward server sleeps per scored row")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per setting")
    p.add_argument("--steps", type=int, default=4, help="training steps per run (the first is dropped)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results file ('' = print only)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from mmgrpo.rewards.server import serve
    from mmgrpo.testing.tiny_sd3 import save_tiny_sd3

    rows: dict[int, list[dict]] = {1: [], 4: []}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_tiny_sd3(Path(tmp) / "sd3")
        server = serve(slow_reward(args.latency), port=0, batch_wait_s=0.0)
        try:
            for r in range(args.repeats):
                for chunks in (1, 4) if r % 2 == 0 else (4, 1):
                    rows[chunks] += run(ckpt, server.url, chunks, Path(tmp) / "runs", args.steps)
        finally:
            server.shutdown()

    def med(ms: list[dict], key: str) -> float:
        return statistics.median(m.get(key, 0.0) for m in ms)

    table = ["| rollout_chunks | s / step | sampling s | scoring s | waited for scores s | hidden |",
             "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for chunks, ms in rows.items():
        score_s = med(ms, "time/score_s")
        wait = med(ms, "time/score_wait_s") if chunks > 1 else score_s
        hidden = 1.0 - wait / score_s if score_s > 0 else 0.0
        table.append(f"| {chunks} | {med(ms, 'time/step_s'):.2f} | {med(ms, 'time/sample_s'):.2f} | {score_s:.2f} | "
                     f"{wait:.2f} | {hidden:.0%} |")  # fmt: skip
    text = "\n".join(table)
    print(text)
    if args.out:
        cmd = "python bench/overlap.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        body = (
            f"# Reward/sampling overlap\n\nCommand: `{cmd.strip()}`; remote reward latency {args.latency} s per "
            f"scored row (32 rows per step); {args.repeats} runs x {args.steps - 1} timed steps per setting.\n\n"
            f"{text}\n"
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
