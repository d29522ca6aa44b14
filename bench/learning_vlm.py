"""Learning benchmark on the shapes VLM world: each optimizer-family method against plain GRPO at equal compute.

    python bench/learning_vlm.py --jobs 2                # the whole plan; writes bench/results/learning_vlm.md
    python bench/learning_vlm.py --jobs 2 --splits hard --groups 8 --methods ngrpo spo   # a part of it
    python bench/learning_vlm.py --jobs 2 --idle-only    # beside other work: runs only while the CPU is otherwise idle
    python bench/learning_vlm.py --report-only           # the table from the run log, running nothing
    python bench/learning_vlm.py --quick --out /tmp/q.md --log ''   # the smoke test (tests/bench/test_learning_vlm.py)

Every run starts from the shipped shapes VLM (``configs/shapes_vlm_grpo.yaml``, ``assets/shapes_vlm``), trains for
``--budget`` seconds (``trainer.time_budget_s``: sampling, scoring and updates; model loading and evaluation excluded;
the step that crosses the budget finishes) and is then evaluated greedily on the same ``--eval-examples`` held-out
scenes. The budget counts the run's own CPU seconds by default (``--clock process``, ``trainer.time_budget_clock``; one
torch thread per run, so on an idle core it is the run's wall-clock): every method gets the same compute even when the
machine is shared or the benchmark is paused (``kill -STOP`` / ``-CONT`` its process group) to time something else;
``--clock wall`` counts wall-clock instead. A method is a named list of config overrides on top of the demo config
(``METHODS`` in ``bench/learning_methods.py``, the benchmark's catalogue; ``{G}`` and ``{G+1}`` stand for the group
size of the cell, ``{teacher}`` for the split's KDRL teacher, which the benchmark makes first: ``Teachers`` there), so
a new paper is one entry. An entry whose switch this checkout does not have (an estimator, loss, shaping or
``methods:`` block not registered, an unknown config key: any ``UserError`` at config load) is reported as "not
available" with the reason, and not run.

Run log: every finished run is appended (fsync'd) as one JSON line to ``--log``
(``bench/results/learning_vlm_runs.jsonl``, committed), keyed by its cell, seed, budget, clock and full override list;
an invocation runs only the runs its command asks for that the log lacks, and writes its table from the log. A
benchmark of many hours can so be stopped at any time and continued later (another session, another day), and runs
are never repeated; a changed method definition, budget or held-out set is a new key, so stale runs never mix in.
Runs go method-major (GRPO, then each listed method's seeds), so a stopped benchmark leaves whole rows.

Cells: every split of ``SPLITS`` x every G of ``--groups`` (2 and 8) x every seed. Every method runs at G = 8;
at G = 2 only GRPO and the methods whose papers claim their gain at small G (MC-GRPO, SPO: ``small_groups`` in
``METHODS``), unless ``--methods`` names others (``planned``). Within a cell every method runs at every seed;
seed s of a method is *paired* with seed s of GRPO (same prompt order ``run.seed``, same held-out scenes), and the
difference is reported as mean_s(d_s) +- std_s(d_s) / sqrt(S), d_s = score(method, s) - score(GRPO, s): the paired
standard error, smaller than either mean's own SE when seeds move both runs alike. With S = 3 seeds the SE has 2
degrees of freedom (a 95% interval is +-4.30 SE, not +-1.96). Scores: ``eval/accuracy`` (multiple-choice accuracy,
count / colour / position), mean +- std_s / sqrt(S).

All-fail fraction: the share of the groups that reached the update whose ``accuracy`` reward is 0 on every row,
over all steps (read from the trainer's ``trainer.dump_advantages`` files). It is the policy's own rate for methods
that train on what they sample; DAPO's dynamic sampling reports it after its refills, TempSamp's ground-truth row
counts as a row (so it has none), and PEARL's checklist groups (no accuracy) are left out; ragged groups (GDRO) count
with their own sizes; n/a where there is no ``accuracy`` reward (PRS, E-GRPO replace it).

Splits (``SPLITS``): ``normal`` is the demo's data; ``hard`` (``data.options.difficulty: shuffled``, training AND
evaluation, ``mmgrpo/data/shapes_qa.py``) asks the same questions about the same scenes with the options in a per-scene
order that never leaves the right option at its usual letter ("How many red circles? A) 2 B) 0 C) 3 D) 1"): the shipped
model learned the fixed order, so it answers confidently and wrongly until it learns to read the options, and most of
plain GRPO's groups all fail (``HARD_SPLIT_NOTE``; the table's all-fail column measures it per run). The other knob
of the world, near-miss scenes (``difficulty: near_miss``), was measured and rejected: it makes the model unsure
(samples spread over the options) rather than wrong, so few groups all fail. ``--jobs 2`` runs two at a time with one
torch thread each.

Cost (measured 2026-12-04 on this project's 2-core machine, one torch thread, under load, so in CPU seconds, which is
what an idle core turns into wall-clock): a step of B = 16 prompts takes ~1.1-1.3 s at G = 8 and ~0.8 s at G = 2; an
evaluation of 600 scenes ~11 s; loading ~5 s. The default budget of 300 s is ~230-280 steps at G = 8 (the demo config's
300 steps gave GRPO +0.038 +- 0.013 on the normal split) and ~370 at G = 2. One run of plain GRPO on the hard split at
G = 8, seed 0: 300 s gave 281 steps and held-out accuracy 0.100 -> 0.233 on 600 scenes (326 s wall in all, two
evaluations and loading included; all-fail fraction 0.65 over the run); 150 s under heavier load gave 56 steps and
0.100 -> 0.135. A full run is (methods x 2 splits x 3 seeds) runs at G = 8 and (3 x 2 splits x 3 seeds) at G = 2, each
of budget + ~20 s (~3 min of an idle 2-core machine per run at ``--jobs 2``, measured): the 31 entries make
186 + 18 = 204 runs, ~10 h, done in parts (the run log keeps them); every further entry adds 6 runs, ~20 min.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import shlex
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _p in (ROOT, BENCH):  # run as a script: the repository's mmgrpo without an install, and runlog.py beside this
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from learning_methods import (  # noqa: E402
    BASELINE,
    FULL_G,
    HARD_SPLIT_NOTE,
    METHODS,
    SPLITS,
    TEACHER_SEED,
    Teachers,
    base_overrides,
    cell_overrides,
    needs_teacher,
    planned,
)
from learning_stats import all_fail_fraction, dumped_accuracy, mean_se, paired_diff  # noqa: E402
from runlog import IdleGate, append_log, end_workers, git_commit, read_log  # noqa: E402

CONFIG = ROOT / "configs" / "shapes_vlm_grpo.yaml"
DEFAULT_OUT = Path(__file__).parent / "results" / "learning_vlm.md"
DEFAULT_LOG = Path(__file__).parent / "results" / "learning_vlm_runs.jsonl"
# every run: no evaluation or checkpoint inside the budget, per-step reward dumps for the all-fail fraction
COMMON = ("trainer.max_steps=100000", "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.progress=false",
          "trainer.dump_advantages=true")  # fmt: skip
# --quick: seconds per run (a smoke test of the harness, not a measurement)
QUICK = ("trainer.prompts_per_step=4", "trainer.micro_batch_size=8", "data.options.num_examples=64")


def availability(methods: list[str], splits: list[str], groups: list[int], extra: list[str],
                 teachers: Teachers = Teachers()) -> dict[str, str | None]:  # fmt: skip
    """method -> None when its config loads in every cell, else the first ``UserError`` (its switch is missing)."""
    from mmgrpo.core.errors import UserError
    from mmgrpo.train.config import load_config

    out: dict[str, str | None] = {}
    for m in methods:
        out[m] = None
        try:
            for split in splits:
                for G in groups:
                    load_config(CONFIG, cell_overrides(m, split, G, extra, teachers))
        except UserError as e:
            out[m] = " ".join(str(e).split())
    return out


# -------------------------------------------------------------------------------------------------------- runs
def run_one(method: str, split: str, G: int, seed: int, budget: float, out_dir: Path, extra: list[str],
            threads: int = 0, teachers: Teachers = Teachers()) -> dict:  # fmt: skip
    """Train one cell for ``budget`` seconds, then evaluate: {method, split, G, seed, score, steps, ...}."""
    import torch

    from mmgrpo.train.config import load_config
    from mmgrpo.train.trainer import train

    if threads:
        torch.set_num_threads(threads)
    name = f"{method}_{split}_g{G}_s{seed}"
    overrides = [f"run.name={name}", f"run.output_dir={out_dir}", "run.overwrite=true", f"run.seed={seed}",
                 f"trainer.time_budget_s={budget}", *COMMON,
                 *cell_overrides(method, split, G, extra, teachers)]  # fmt: skip
    cfg = load_config(CONFIG, overrides)
    t0 = time.perf_counter()
    try:
        trainer = train(cfg)
    except Exception as e:  # one broken method must not end a run of hours: its cell reports the error
        why = " ".join(f"{type(e).__name__}: {e}".split()).replace("|", "/")  # one markdown cell
        return {"method": method, "split": split, "G": G, "seed": seed, "error": why}
    wall = time.perf_counter() - t0
    after = trainer.evaluate(trainer.step)
    names = [r.name for r in cfg.rewards]
    acc = []  # a method that replaces the accuracy reward (PRS, E-GRPO) has no all-fail fraction
    if "accuracy" in names:
        acc = dumped_accuracy(trainer.run_dir / "debug", names.index("accuracy"), cfg.trainer.group_size)
    return {"method": method, "split": split, "G": G, "seed": seed, "score": after["eval/accuracy"],
            "steps": trainer.step, "wall_s": wall, "all_fail": all_fail_fraction(acc)}  # fmt: skip


def make_teacher(split: str, teachers: Teachers, extra: list[str], threads: int = 0) -> dict:
    """Train and export the split's KDRL teacher (``learning_methods.TEACHER_STEPS``) -> {split, teacher, score,
    steps}, or {split, error}. Exported beside its folder and renamed into place once complete: a killed benchmark
    leaves no half-written teacher (the next invocation makes it again)."""
    import shutil

    import torch

    from mmgrpo.train.config import load_config
    from mmgrpo.train.export import export_policy
    from mmgrpo.train.trainer import train

    if threads:
        torch.set_num_threads(threads)
    out, steps = teachers.dir(split), teachers.steps
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(CONFIG, [f"run.name=teacher_{split}", f"run.output_dir={tmp}", "run.overwrite=true",
                                       f"run.seed={TEACHER_SEED}", *COMMON, f"trainer.max_steps={steps}",
                                       "trainer.dump_advantages=false", *base_overrides(split), "trainer.group_size=8",
                                       *extra])  # fmt: skip
            trainer = train(cfg)
            score = trainer.evaluate(trainer.step)["eval/accuracy"]
            export_policy(trainer.policy, partial, merge=True, inplace=True, info={"benchmark": "KDRL teacher"})
        os.replace(partial, out)
    except Exception as e:  # noqa: BLE001  (its KDRL runs report it; the other runs go on)
        return {"split": split, "error": " ".join(f"teacher: {type(e).__name__}: {e}".split()).replace("|", "/")}
    return {"split": split, "teacher": _shown(str(out)), "score": score, "steps": trainer.step}


def teacher_key(split: str, teachers: Teachers, extra: list[str]) -> str:
    return _portable(json.dumps(["teacher", split, teachers.steps, TEACHER_SEED, base_overrides(split), extra]))


def shipped_score(split: str, out_dir: Path, extra: list[str]) -> float:
    """Held-out accuracy of the shipped model on ``split`` (greedy, the runs' held-out scenes)."""
    from mmgrpo.train.config import load_config
    from mmgrpo.train.trainer import Trainer

    cfg = load_config(CONFIG, [f"run.output_dir={out_dir}", f"run.name=shipped_{split}", *base_overrides(split),
                               *extra])  # fmt: skip
    run_dir = out_dir / f"shipped_{split}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, run_dir).evaluate(0)["eval/accuracy"]


# ------------------------------------------------------------------------------------------------------ report
def _pm(mean: float, se: float, signed: bool = False) -> str:
    m = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return m if math.isnan(se) else f"{m} ± {se:.3f}"


def render(results: list[dict], methods: list[str], splits: list[str], groups: list[int],
           unavailable: dict[str, str | None], shipped: dict[str, float],
           teachers: dict[str, dict] | None = None, n_seeds: int = 0, asked: bool = True) -> str:  # fmt: skip
    """Markdown: one table per (split, G): score +- SE, difference vs GRPO +- paired SE, all-fail, steps; the
    methods with no run in the cell are named under it (those the plan leaves out, :func:`planned` with ``asked``,
    counted apart), and a row with fewer than ``n_seeds`` seeds says so."""
    out = []
    for split in splits:
        for G in groups:
            out.append(f"### {SPLITS[split].label}, G = {G}\n")
            if split in shipped:
                out.append(f"Shipped model (greedy): {shipped[split]:.3f}.\n")
            if split in (teachers or {}) and "kdrl" in methods:
                t = teachers[split]  # its run log record
                out.append(f"KDRL's teacher (the demo's GRPO for {t['steps']} steps at G = 8, seed {TEACHER_SEED}): "
                           f"{t['score']:.3f}.\n")  # fmt: skip
            out.append("| method | held-out accuracy | vs GRPO (paired) | all-fail groups | steps done |")
            out.append("|---|---:|---:|---:|---:|")
            cell = [r for r in results if (r["split"], r["G"]) == (split, G)]
            base = {r["seed"]: r["score"] for r in cell if r["method"] == BASELINE}
            pending, by_design = [], []
            for m in methods:
                if unavailable.get(m):
                    out.append(f"| {METHODS[m].label} | not available | | | |")
                    continue
                rs = sorted((r for r in cell if r["method"] == m), key=lambda r: r["seed"])
                failed = [r for r in rs if "error" in r]
                if failed:
                    seeds = ", ".join(str(r["seed"]) for r in failed)
                    out.append(f"| {METHODS[m].label} | failed (seed {seeds}): {failed[0]['error'][:200]} | | | |")
                    continue
                if not rs:
                    (pending if planned(m, G, asked) else by_design).append(METHODS[m].label)
                    continue
                score = _pm(*mean_se([r["score"] for r in rs]))
                if len(rs) < n_seeds:
                    score += f" (seed{'s' if len(rs) > 1 else ''} {', '.join(str(r['seed']) for r in rs)} only)"
                seeds = [r["seed"] for r in rs if r["seed"] in base]
                if m == BASELINE or not seeds:
                    diff = "(baseline)" if m == BASELINE else "no GRPO run"
                else:
                    a = [r["score"] for r in rs if r["seed"] in base]
                    diff = _pm(*paired_diff(a, [base[s] for s in seeds]), signed=True)
                fails = [r["all_fail"] for r in rs if not math.isnan(r["all_fail"])]
                fail = f"{statistics.fmean(fails):.2f}" if fails else "n/a"
                steps = [r["steps"] for r in rs]
                step_txt = f"{statistics.fmean(steps):.0f} ({min(steps)}-{max(steps)})"
                out.append(f"| {METHODS[m].label} | {score} | {diff} | {fail} | {step_txt} |")
            if pending:
                out.append(f"\nNot run yet: {'; '.join(pending)}.")
            if by_design:
                small = " and ".join(METHODS[m].label.split(" (")[0] for m in METHODS if METHODS[m].small_groups)
                out.append(f"\nNot run at G = {G} by design: the other {len(by_design)} methods (below G = {FULL_G} "
                           f"the benchmark runs GRPO and the methods whose papers claim a gain at small G, {small}; "
                           f"`--methods NAME --groups {G}` runs another).")  # fmt: skip
            out.append("")
    missing = [m for m in methods if unavailable.get(m)]
    if missing:
        out.append("Not available on this checkout (the config switch does not load):\n")
        out += [f"- `{m}`: {unavailable[m]}" for m in missing]
        out.append("")
    return "\n".join(out)


def run_key(method: str, split: str, G: int, seed: int, budget: float, clock: str, extra: list[str],
            teachers: Teachers = Teachers()) -> str:  # fmt: skip
    """What makes two runs the same measurement: the cell, the seed, the budget and its clock, and every config
    override the run gets (a method whose definition changed, or other held-out scenes, is a new measurement). The
    repository's own path reads ``{repo}``, so a log made in one checkout matches in another."""
    over = cell_overrides(method, split, G, extra, teachers)
    return _portable(json.dumps([method, split, G, seed, budget, clock, over]))


def shipped_key(split: str, extra: list[str]) -> str:
    return _portable(json.dumps(["shipped", split, base_overrides(split), extra]))


def _shown(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (results files name no machine's folders)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else path


def _portable(key: str) -> str:
    return key.replace(json.dumps(str(ROOT))[1:-1], "{repo}")


def _timed_run(*args) -> dict:
    """run_one with the CPU seconds of the whole run (loading and evaluation included) and its start / end times."""
    stamp = "%Y-%m-%dT%H:%M:%S"
    started, cpu0 = time.strftime(stamp), time.process_time()
    rec = run_one(*args)
    return {**rec, "cpu_s": time.process_time() - cpu0, "started": started, "ended": time.strftime(stamp)}


def write_results(args: argparse.Namespace, argv: list[str] | None, tables: str, results: list[dict], n_cells: int,
                  budget: float, seeds: list[int], load_before: tuple[float, ...]) -> None:  # fmt: skip
    """The results file ``--out``: the command, what the table holds and how it was measured, then the tables."""
    cmd = "python bench/learning_vlm.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    load_after = os.getloadavg()
    ok = [r for r in results if "error" not in r]
    when = (f"{min(r['started'] for r in ok)} to {max(r['ended'] for r in ok)}, commits "
            f"{', '.join(sorted({r['commit'] for r in ok}))}" if ok and "started" in ok[0] else "")  # fmt: skip
    clock = " (CPU seconds of the run, one torch thread: an idle core turns them into wall-clock)"
    clock = clock if args.clock == "process" else ""
    per_seed = "" if len(seeds) < 2 else f" (with {len(seeds)} seeds, {len(seeds) - 1} degrees of freedom)"
    body = (
        f"# Learning on the shapes VLM world: methods against GRPO at equal compute\n\n"
        f"Command: `{cmd.strip()}`\n\n"
        f"{'QUICK MODE (a smoke test, not a measurement). ' if args.quick else ''}"
        f"{len(ok)} of {n_cells} runs in the table ({when}); runs are read from the run log "
        f"`{_shown(args.log)}` and only missing ones are run, so the table grows across invocations. "
        f"Budget: {budget:.0f} s of training per run counted by the {args.clock} clock"
        f"{clock}; "
        f"seeds {seeds}; {args.jobs} run(s) at a time{' (one thread each)' if args.jobs > 1 else ''}; held-out "
        f"accuracy (greedy) mean ± SE over seeds; vs GRPO: mean over seeds of (method - GRPO at the same seed) ± "
        f"its paired SE{per_seed}; all-fail groups: share of the trained groups with accuracy 0 on every row; "
        f"steps done: mean (min-max). Load average {load_before[0]:.2f} before, {load_after[0]:.2f} after this "
        f"invocation.\n\n"
        f"Hard split: {HARD_SPLIT_NOTE}\n\n{tables}"
    )  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(body)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=300.0, help="training seconds per run (evaluation excluded)")
    p.add_argument("--clock", choices=["process", "wall"], default="process",
                   help="what the budget counts (trainer.time_budget_clock): process = the run's CPU seconds (fair "
                        "on a shared or paused machine; one torch thread per run), wall = wall-clock")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--groups", type=int, nargs="+", default=[2, 8], help="group sizes G")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: all (--quick: grpo ngrpo)")
    p.add_argument("--eval-examples", type=int, default=600, help="held-out scenes per evaluation")
    p.add_argument("--override", nargs="*", default=[], help="extra key=value overrides for every run")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results file ('' = print only)")
    p.add_argument("--log", default=str(DEFAULT_LOG),
                   help="run log (JSON lines): finished runs are appended as they end and never run again; the table "
                        "is built from every logged run that matches this command ('' = none)")  # fmt: skip
    p.add_argument("--report-only", action="store_true", help="run nothing: write the table from the log")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one torch thread each (2 on a 2-core box)")
    idle = (
        "run only while nothing else uses the CPU: stop the runs (SIGSTOP) while other processes are busy, "
        "continue them when it is quiet (needs --clock process and --jobs >= 2; Linux)"
    )
    p.add_argument("--idle-only", action="store_true", help=idle)
    quick = ("smoke mode: seeds 0 1, G 2, 2 steps of 4 prompts, 16 held-out scenes (grpo, ngrpo unless --methods); "
             "a KDRL teacher of 2 steps in a temporary folder")  # fmt: skip
    p.add_argument("--quick", action="store_true", help=quick)
    args = p.parse_args(argv)
    numbers = (("--groups", args.groups), ("--jobs", [args.jobs]), ("--eval-examples", [args.eval_examples]),
               ("--budget", [args.budget]))  # fmt: skip
    low = [f"{flag} {v}" for flag, vals in numbers for v in vals if not v >= 1]  # not >=: nan too
    if low:
        p.error(f"{', '.join(low)}: group sizes, jobs, held-out scenes and the budget (seconds) must be at least 1")
    if args.idle_only and (args.clock != "process" or args.jobs < 2 or not os.path.exists("/proc/stat")):
        p.error("--idle-only needs --clock process (a stopped run must not lose budget), --jobs >= 2 (the runs in "
                "worker processes) and Linux's /proc")  # fmt: skip
    args.extra = [f"data.options.eval_examples={args.eval_examples}", f"trainer.time_budget_clock={args.clock}",
                  *args.override]  # fmt: skip
    asked, args.methods = args.methods, args.methods or list(METHODS)
    args.asked = asked is not None or args.quick  # --methods named: every cell of theirs (planned())
    if args.quick:
        args.budget, args.seeds, args.groups, args.methods = 30.0, [0, 1], [2], asked or ["grpo", "ngrpo"]
        args.extra = ["data.options.eval_examples=16", *QUICK, *args.override, "trainer.stop_after_steps=2"]
    if BASELINE not in args.methods:
        args.methods = [BASELINE, *args.methods]
    return args


def execute(todo: list[tuple], args: argparse.Namespace, teachers: Teachers, runs: Path,
            done: Callable[[dict], None], teacher_done: Callable[[dict], bool]) -> None:  # fmt: skip
    """Run the cells of ``todo`` in their order (``done`` gets each result), after making the KDRL teachers they need
    (``teacher_done`` gets each; False: it failed and its runs are reported as failed). With ``--jobs`` > 1 the
    teachers are the pool's first jobs; a free worker takes the first cell in ``todo``'s order that can run, so the
    runs that do not need a teacher go meanwhile, and those that do take their place in the order once it is made."""
    missing = set(teachers.missing(todo))
    pending = list(todo)

    def failed(sp: str, why: str) -> None:
        for c in [c for c in pending if c[1] == sp and needs_teacher(c[0])]:
            pending.remove(c)
            done({"method": c[0], "split": sp, "G": c[2], "seed": c[3], "error": why})

    def made(rec: dict, sp: str) -> None:
        missing.discard(sp)
        if not teacher_done(rec):
            failed(sp, rec["error"])

    def next_cell() -> tuple | None:
        c = next((c for c in pending if not (needs_teacher(c[0]) and c[1] in missing)), None)
        return c if c is None else pending.pop(pending.index(c))

    common = (args.budget, runs, args.extra)
    if args.jobs <= 1:
        for sp in sorted(missing):
            made(make_teacher(sp, teachers, args.extra), sp)
        while (c := next_cell()) is not None:
            done(_timed_run(*c, *common, 0, teachers))
        return
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        making = {pool.submit(make_teacher, sp, teachers, args.extra, 1): sp for sp in sorted(missing)}
        running: dict = {}

        def fill() -> None:  # the pool's queue holds no more than it has workers: the order is decided here
            while len(making) + len(running) < args.jobs and (c := next_cell()) is not None:
                running[pool.submit(_timed_run, *c, *common, 1, teachers)] = c

        workers = lambda: list(getattr(pool, "_processes", None) or {})  # noqa: E731  (pid -> process)
        try:
            with IdleGate(workers) if args.idle_only else contextlib.nullcontext():
                fill()
                while making or running:
                    for fut in wait([*making, *running], return_when=FIRST_COMPLETED).done:
                        if fut in making:
                            sp = making.pop(fut)
                            made(fut.result(), sp)
                        else:
                            running.pop(fut)
                            done(fut.result())
                    fill()
        except BaseException:  # Ctrl-C, a SIGTERM (see main) or a bug: the runs in flight end with the benchmark
            end_workers(pool)
            raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget, seeds, groups, methods, extra = args.budget, args.seeds, args.groups, args.methods, args.extra
    log_path = Path(args.log) if args.log else None
    log = read_log(log_path)
    load_before = os.getloadavg()
    commit = git_commit(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        teachers = Teachers(Path(tmp) / "teachers", 2) if args.quick else Teachers()
        unavailable = availability(methods, args.splits, groups, extra, teachers)
        for m, why in unavailable.items():
            if why:
                print(f"{m}: not available ({why})", flush=True)
        # method-major (GRPO first, then each method's seeds together): a benchmark stopped part-way leaves whole rows
        cells = [(m, sp, G, s) for sp in args.splits for G in groups for m in methods for s in seeds
                 if not unavailable[m]]  # fmt: skip
        keys = {c: run_key(*c, budget, args.clock, extra, teachers) for c in cells}
        # the plan's cells, and any other cell the log has a run of (made by an earlier --methods invocation)
        cells = [c for c in cells if planned(c[0], c[2], args.asked) or keys[c] in log]
        todo = [] if args.report_only else [c for c in cells if keys[c] not in log]
        print(f"{sum(keys[c] in log for c in cells)} of {len(cells)} runs already in the log; {len(todo)} to run",
              flush=True)  # fmt: skip

        def done(rec: dict) -> None:
            key = keys[(rec["method"], rec["split"], rec["G"], rec["seed"])]
            head = f"{rec['method']:10s} {rec['split']:6s} G {rec['G']} seed {rec['seed']}"
            if "error" in rec:  # not logged: a later invocation (after the fix) runs it again
                log[key] = rec
                print(f"{head}: FAILED {rec['error']}", flush=True)
                return
            rec = {**rec, "key": key, "budget": budget, "clock": args.clock, "commit": commit, "jobs": args.jobs}
            log[key] = rec
            append_log(log_path, rec)
            print(f"{head}: {rec['score']:.4f} after {rec['steps']} steps, all-fail {rec['all_fail']:.2f}",
                  flush=True)  # fmt: skip

        def teacher_done(rec: dict) -> bool:
            if "error" in rec:
                print(f"KDRL teacher, {rec['split']}: FAILED {rec['error']}", flush=True)
                return False
            rec = {**rec, "key": teacher_key(rec["split"], teachers, extra), "commit": commit}
            log[rec["key"]] = rec
            append_log(log_path, rec)
            print(f"KDRL teacher, {rec['split']}: {rec['score']:.4f} after {rec['steps']} steps", flush=True)
            return True

        shipped = shipped_scores(args, log, log_path, Path(tmp), commit)
        execute(todo, args, teachers, Path(tmp) / "runs", done, teacher_done)
    results = [log[keys[c]] for c in cells if keys[c] in log]
    made = {sp: log[k] for sp in args.splits if (k := teacher_key(sp, teachers, extra)) in log}
    tables = render(results, methods, args.splits, groups, unavailable, shipped, made, len(seeds), args.asked)
    print(tables)
    if args.out:
        write_results(args, argv, tables, results, len(cells), budget, seeds, load_before)
    return 0


def shipped_scores(args: argparse.Namespace, log: dict, log_path: Path | None, tmp: Path, commit: str) -> dict:
    """split -> the shipped model's held-out accuracy, measured once per split and kept in the log."""
    shipped: dict[str, float] = {}
    for sp in args.splits:
        k = shipped_key(sp, args.extra)
        if k not in log and not args.report_only:
            rec = {"key": k, "split": sp, "shipped": shipped_score(sp, tmp, args.extra), "commit": commit}
            log[k] = rec
            append_log(log_path, rec)
        if k in log:
            shipped[sp] = log[k]["shipped"]
            print(f"shipped model, {sp}: {shipped[sp]:.4f}", flush=True)
    return shipped


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # `kill PID`: as Ctrl-C (execute)
    sys.exit(main())
