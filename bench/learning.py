"""Learning benchmark on the shapes world: held-out verifier score after an equal wall-clock budget per method.

    python bench/learning.py                             # all methods, 3 seeds; writes bench/results/learning.md
    python bench/learning.py --budget 60 --seeds 0 --methods flow_grpo grpo_g2   # a quick look

Every run starts from the shipped model (``configs/shapes_t2i_grpo.yaml``), trains for ``--budget`` seconds of
wall-clock (``trainer.time_budget_s``; evaluation excluded) and is then evaluated on the same held-out prompts and
seeds; the table gives the held-out ``shapes`` score, mean +- std over seeds, and the gain over the shipped
model. Runs are interleaved seed-major (every method at seed 0, then seed 1, ...), so load on a shared machine
spreads over methods rather than penalising whichever runs last.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "shapes_t2i_grpo.yaml"
DEFAULT_OUT = Path(__file__).parent / "results" / "learning.md"

# SDE methods train the sampler's stochastic steps: two PPO updates per rollout with Flow-GRPO's tiny clip range and
# the learning rate that did best for them on the pixel-space model of session 2 (1e-4; 3e-4 degraded, 3e-5 flat)
SDE = ["policy.options.objective=sde", "loss.name=grpo", "loss.adv_clip=null",
       "trainer.minibatches=2", "trainer.lr=1e-4", "loss.options={clip_low: 0.001, clip_high: 0.001}"]  # fmt: skip
# advantage-weighted flow matching (AWM) on the demo's ODE rollouts: the demo's objective until session 5 (the demo's
# 4 draws per sample, on-policy sampling)
AWM = ["policy.options.objective={name: flow_matching, timesteps: 4}", "loss.name=grpo",
       "loss.adv_clip=null"]  # fmt: skip

# method -> overrides on top of the demo config (paper defaults, scaled to the tiny model's 8-step sampler)
METHODS: dict[str, tuple[str, list[str]]] = {
    "dance": ("DanceGRPO (dance SDE, eta 0.3, shared init noise, 60% of steps, each row its own)", [*SDE,
        "policy.options.sde={kind: dance, noise_level: 0.3}", "policy.options.shared_init_noise=true",
        "policy.options.exploration={name: full, timestep_fraction: 0.6, selection: random_per_row}"]),
    "dance_shared": ("DanceGRPO (dance SDE, one 60% of steps per rollout, mmgrpo before 2026-12-06)", [
        *SDE, "policy.options.sde={kind: dance, noise_level: 0.3}", "policy.options.shared_init_noise=true",
        "policy.options.exploration={name: full, timestep_fraction: 0.6, selection: random}"]),
    "flow_grpo": ("Flow-GRPO (flow SDE, a 0.7, all steps)", [*SDE,
        "policy.options.sde={kind: flow_grpo, noise_level: 0.7}",
        "policy.options.exploration={name: full, timestep_fraction: 1.0}"]),
    "mix_grpo": ("MixGRPO (SDE window of 4, ODE elsewhere)", [*SDE,
        "policy.options.sde={kind: flow_grpo, noise_level: 0.7}",
        "policy.options.exploration={name: window, size: 4, shift_every: 25}"]),
    "g2rpo_multi": ("G2RPO (singular branch, granularities 1,2,3)", [*SDE,
        "policy.options.sde={kind: flow_grpo, noise_level: 0.7}",
        "policy.options.exploration={name: singular, branch_steps: [0,1,2,3,4], granularities: [1,2,3]}"]),
    "g2rpo_single": ("G2RPO (singular branch, granularity 1 only)", [*SDE,
        "policy.options.sde={kind: flow_grpo, noise_level: 0.7}",
        "policy.options.exploration={name: singular, branch_steps: [0,1,2,3,4], granularities: [1]}"]),
    "grpo_g2": ("AWM + GRPO advantages, G = 2", [*AWM, "advantage.estimator=grpo", "trainer.group_size=2"]),
    "mc_grpo_g2": ("AWM + MC-GRPO, G = 2 (+1 pivot rollout)", [*AWM, "advantage.estimator=mc_grpo",
        "trainer.group_size=3"]),
    "grpo_g8": ("AWM + GRPO advantages, G = 8", [*AWM, "advantage.estimator=grpo", "trainer.group_size=8"]),
    "mc_grpo_g8": ("AWM + MC-GRPO, G = 8 (+1 pivot rollout)", [*AWM, "advantage.estimator=mc_grpo",
        "trainer.group_size=9"]),
    "nft": ("DiffusionNFT, EMA sampling policy (the demo config)", []),
}  # fmt: skip


def run_one(method: str, seed: int, budget: float, out_dir: Path, extra: list[str], threads: int = 0) -> dict:
    import torch

    from mmgrpo.train.config import load_config
    from mmgrpo.train.trainer import train

    overrides = [
        f"run.name={method}_s{seed}", f"run.output_dir={out_dir}", "run.overwrite=true", f"run.seed={seed}",
        f"trainer.time_budget_s={budget}", "trainer.max_steps=100000", "trainer.eval_every=0",
        "trainer.checkpoint_every=0", "trainer.progress=false", *METHODS[method][1], *extra,
    ]  # fmt: skip
    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(CONFIG, overrides)
    t0 = time.perf_counter()
    trainer = train(cfg)
    wall = time.perf_counter() - t0
    after = trainer.evaluate(trainer.step)  # evaluation after the budget (same prompts and seeds)
    key = next(k for k in after if k.startswith("eval/"))
    return {"method": method, "seed": seed, "after": after[key], "steps": trainer.step, "wall_s": wall, "key": key}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=90.0, help="training seconds per run (evaluation excluded)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--override", nargs="*", default=[], help="extra key=value overrides for every run")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results file ('' = print only)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one torch thread each (2 on a 2-core box)")
    args = p.parse_args(argv)
    from mmgrpo.train.config import load_config
    from mmgrpo.train.trainer import Trainer

    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        base_cfg = load_config(CONFIG, [f"run.output_dir={tmp}", "run.name=base", *args.override])
        (Path(tmp) / "base").mkdir()
        base = Trainer(base_cfg, Path(tmp) / "base")
        base_metrics = base.evaluate(0)
        key = next(k for k in base_metrics if k.startswith("eval/"))
        shipped = base_metrics[key]
        print(f"shipped model: {key} = {shipped:.4f}", flush=True)
        todo = [(m, seed) for seed in args.seeds for m in args.methods]
        threads = 1 if args.jobs > 1 else 0
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_one, m, s, args.budget, Path(tmp) / "runs", args.override, threads)
                       for m, s in todo]  # fmt: skip
            for fut in as_completed(futures):
                r = fut.result()
                results.append(r)
                print(f"{r['method']:14s} seed {r['seed']}: {r['after']:.4f} after {r['steps']} steps", flush=True)
    rows = ["| method | held-out shapes score | gain over shipped | steps in budget |", "|---|---:|---:|---:|"]
    for method in args.methods:
        rs = [r for r in results if r["method"] == method]
        vals = [r["after"] for r in rs]
        mean = statistics.mean(vals)
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        steps = statistics.mean(r["steps"] for r in rs)
        rows.append(f"| {METHODS[method][0]} | {mean:.3f} ± {std:.3f} | {mean - shipped:+.3f} | {steps:.0f} |")
    table = "\n".join(rows)
    print(table)
    if args.out:
        cmd = "python bench/learning.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        body = (
            f"# Learning on the shapes world\n\nCommand: `{cmd.strip()}`\n\nShipped model: {key} = {shipped:.4f} "
            f"(same held-out prompts and seeds). Budget: {args.budget:.0f} s of training per run, seeds "
            f"{args.seeds}, mean ± std over seeds, {args.jobs} run(s) at a time"
            f"{' (one thread each)' if args.jobs > 1 else ''}.\n\n{table}\n"
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
