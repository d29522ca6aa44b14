"""bench/learning_vlm.py: the paired-SE maths by hand, the all-fail fraction, unavailable methods, and --quick runs
end to end (2 steps per run: it checks the harness and its table, measures nothing)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
spec = importlib.util.spec_from_file_location("bench_learning_vlm", ROOT / "bench" / "learning_vlm.py")
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench  # its dataclasses look their module up
spec.loader.exec_module(bench)
import learning_methods  # noqa: E402  (bench/, on the path once learning_vlm is loaded)


def test_paired_standard_error_by_hand():
    method, grpo = [0.62, 0.70, 0.66], [0.60, 0.64, 0.65]
    # d = [0.02, 0.06, 0.01]: mean 0.03; deviations -0.01, 0.03, -0.02 -> sum of squares 14e-4, / (3 - 1) = 7e-4,
    # std 0.026458, SE = 0.026458 / sqrt(3) = 0.015275
    d, se = bench.paired_diff(method, grpo)
    assert d == pytest.approx(0.03) and se == pytest.approx(math.sqrt(7e-4 / 3))
    assert se == pytest.approx(0.015275, abs=1e-6)
    # each side alone: method 0.66 +- sqrt(16e-4 / 2 / 3) = 0.023094, GRPO 0.63 +- sqrt(14e-4 / 2 / 3) = 0.015275;
    # unpaired, the difference's SE would be sqrt(0.023094^2 + 0.015275^2) = 0.027689: pairing removes the seed effect
    assert bench.mean_se(method) == pytest.approx((0.66, 0.023094), abs=1e-6)
    assert bench.mean_se(grpo) == pytest.approx((0.63, 0.015275), abs=1e-6)
    assert se < math.hypot(bench.mean_se(method)[1], bench.mean_se(grpo)[1])
    assert math.isnan(bench.mean_se([0.5])[1])  # one seed: no SE
    with pytest.raises(ValueError, match="same seeds"):
        bench.paired_diff([0.1, 0.2], [0.1])


def test_all_fail_fraction_by_hand():
    nan = math.nan
    # [0, 0] all fail; [0, 1] not; [nan, nan] (a checklist group) left out; [0, nan] all of its graded rows fail
    assert bench.all_fail_fraction([[0.0, 0.0], [0.0, 1.0], [nan, nan], [0.0, nan]]) == pytest.approx(2 / 3)
    assert math.isnan(bench.all_fail_fraction([[nan, nan]]))


def test_dumped_accuracy_splits_rows_by_the_dumped_group_sizes(tmp_path):
    import torch
    from safetensors.torch import save_file

    acc = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # groups [0, 0] [1, 0, 0] [0, 0] -> 2 of 3 all fail
    rewards = torch.stack([acc, torch.ones(7)])[None]  # [V 1, R 2 (accuracy, format), N 7]
    save_file({"rewards": rewards, "advantages": torch.zeros(3, 3), "group_sizes": torch.tensor([2, 3, 2])},
              str(tmp_path / "adv_step_000000.safetensors"))  # fmt: skip
    groups = bench.dumped_accuracy(tmp_path, 0, 8)
    assert groups == [[0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0]]
    assert bench.all_fail_fraction(groups) == pytest.approx(2 / 3)
    old = {"rewards": rewards[..., :6].contiguous(), "advantages": torch.zeros(6)}
    save_file(old, str(tmp_path / "adv_step_000000.safetensors"))
    assert bench.dumped_accuracy(tmp_path, 0, 2) == [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]  # an old dump: G each


def test_table_rows_from_results():
    rows = [(m, s, v) for m, vals in {"grpo": [0.60, 0.64, 0.65], "ngrpo": [0.62, 0.70, 0.66]}.items()
            for s, v in enumerate(vals)]  # fmt: skip
    results = [{"method": m, "split": "hard", "G": 8, "seed": s, "score": v, "steps": 10 + s, "all_fail": 0.5}
               for m, s, v in rows]  # fmt: skip
    results.append({"method": "mapo", "split": "hard", "G": 8, "seed": 1, "error": "UserError: rewards in [0, 1]"})
    text = bench.render(results, ["grpo", "ngrpo", "mapo", "spo"], ["hard"], [8], {"spo": "unknown method 'spo'"},
                        {"hard": 0.3})  # fmt: skip
    assert f"| {bench.METHODS['mapo'].label} | failed (seed 1): UserError: rewards in [0, 1] |" in text
    assert f"| {bench.METHODS['ngrpo'].label} | 0.660 ± 0.023 | +0.030 ± 0.015 | 0.50 | 11 (10-12) |" in text
    assert f"| {bench.METHODS['grpo'].label} | 0.630 ± 0.015 | (baseline) | 0.50 | 11 (10-12) |" in text
    assert f"| {bench.METHODS['spo'].label} | not available |" in text and "`spo`: unknown method 'spo'" in text
    assert "Shipped model (greedy): 0.300." in text
    # methods without a run are named under the table, not given empty rows; a row short of seeds says which it has
    text = bench.render(results[:5], ["grpo", "ngrpo", "gspo", "bnpo"], ["hard"], [8], {}, {}, n_seeds=3)
    assert f"\nNot run yet: {bench.METHODS['gspo'].label}; {bench.METHODS['bnpo'].label}.\n" in text
    assert f"| {bench.METHODS['ngrpo'].label} | 0.660 ± 0.040 (seeds 0, 1 only) | +0.040 ± 0.020 |" in text
    assert f"| {bench.METHODS['grpo'].label} | 0.630 ± 0.015 | (baseline) |" in text


def test_a_method_whose_switch_is_missing_is_reported_not_run(monkeypatch):
    fake = learning_methods.Method("a paper not merged yet", ("advantage.estimator=no_such_estimator",))
    monkeypatch.setitem(bench.METHODS, "fake", fake)
    got = bench.availability(["grpo", "fake"], ["normal"], [2], [])
    assert got["grpo"] is None and "no_such_estimator" in got["fake"]
    # {G} / {G+1} follow the cell's group size (MC-GRPO's and TempSamp's extra row)
    assert "trainer.group_size=9" in bench.cell_overrides("mc_grpo", "normal", 8, [])


def test_quick_mode_writes_the_table(tmp_path, capsys):
    out = tmp_path / "q.md"
    assert bench.main(["--quick", "--out", str(out), "--log", ""]) == 0
    text = out.read_text()
    assert "Command: `python bench/learning_vlm.py --quick --out " in text and "QUICK MODE" in text
    for split in ("normal", "hard"):
        section = text.split(f"### {bench.SPLITS[split].label}, G = 2")[1].split("###")[0]
        grpo = next(line for line in section.splitlines() if line.startswith(f"| {bench.METHODS['grpo'].label} |"))
        ngrpo = next(line for line in section.splitlines() if line.startswith(f"| {bench.METHODS['ngrpo'].label} |"))
        assert "(baseline)" in grpo and "| 2 (2-2) |" in grpo  # 2 steps per run, 2 seeds
        cells = [c.strip() for c in ngrpo.strip("|").split("|")]
        assert "±" in cells[1] and "±" in cells[2]  # mean +- SE over 2 seeds, paired difference +- SE
        assert 0.0 <= float(cells[3]) <= 1.0


def test_the_run_log_keeps_finished_runs_and_the_table_grows_from_it(tmp_path, monkeypatch, capsys):
    """--log: each finished run is one JSON line; a later invocation runs only what is missing (here nothing) and
    writes the same table from the log; a torn last line (a process killed mid-write) is skipped, not fatal."""
    log, out = tmp_path / "runs.jsonl", tmp_path / "t.md"
    argv = ["--quick", "--methods", "grpo", "--splits", "hard", "--log", str(log), "--out", str(out)]
    assert bench.main(argv) == 0
    lines = log.read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert sorted(r.get("seed", -1) for r in recs) == [-1, 0, 1]  # the shipped score, then seeds 0 and 1
    assert all(r["steps"] == 2 and r["cpu_s"] > 0 and r["commit"] for r in recs if "seed" in r)
    first = out.read_text()
    assert "2 of 2 runs in the table" in first
    with open(log, "a") as f:
        f.write('{"key": "torn')
    monkeypatch.setattr(bench, "run_one", lambda *a: pytest.fail("a logged run ran again"))
    monkeypatch.setattr(bench, "shipped_score", lambda *a: pytest.fail("the logged shipped score was measured again"))
    assert bench.main(argv) == 0
    assert "2 of 2 runs already in the log; 0 to run" in capsys.readouterr().out
    table = first.split("### ")[1]
    assert out.read_text().split("### ")[1] == table  # same numbers, read back from the log
    # keys name the repository as {repo}: a log made in another checkout (another path) matches here
    assert str(bench.ROOT) not in bench.run_key("grpo", "hard", 2, 0, 30.0, "process", [])
    assert "{repo}/assets/shapes_vlm" in bench.run_key("grpo", "hard", 2, 0, 30.0, "process", [])
    # another budget is another measurement: nothing in the log matches it
    assert bench.run_key("grpo", "hard", 2, 0, 30.0, "process", []) != bench.run_key(
        "grpo", "hard", 2, 0, 60.0, "process", []
    )


def test_idle_gate_decisions_by_hand():
    gate = bench.IdleGate(lambda: [], busy=0.25, quiet=0.15, calm=3)
    # running: 0.2 cores of others is under 0.25 -> keep running; 0.9 -> stop
    assert [gate.decide(x) for x in (0.0, 0.2, 0.9)] == [None, None, "stop"] and gate.stopped
    # stopped: three quiet readings in a row (< 0.15) continue; a busy one in between starts the count again
    assert [gate.decide(x) for x in (0.1, 0.1, 0.5, 0.1, 0.1, 0.1)] == [None, None, None, None, None, "cont"]
    assert not gate.stopped


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="the idle gate reads Linux's /proc")
def test_idle_gate_stops_a_worker_while_another_process_is_busy_and_continues_it_at_exit():
    import subprocess
    import time

    spin = [sys.executable, "-c", "while True: pass"]
    worker, other = subprocess.Popen(spin), subprocess.Popen(spin)  # the benchmark's run, and someone else's work
    try:
        gate = bench.IdleGate(lambda: [worker.pid], period=0.5)
        with gate:
            deadline = time.monotonic() + 15
            while not gate.stopped and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.2)
            state = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            assert gate.stopped and state == "T", (gate.log, state)  # stopped by SIGSTOP
            assert gate.log[0][1] == "stop" and gate.log[0][2] > 0.25
        state = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state in ("R", "S"), state  # leaving the gate continues what it stopped
    finally:
        for p in (worker, other):
            p.kill()
            p.wait()


def test_idle_only_refuses_a_wall_clock_budget(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--idle-only", "--clock", "wall", "--jobs", "2", "--log", "", "--out", ""])
    assert "--idle-only needs --clock process" in capsys.readouterr().err


def test_kdrl_runs_after_the_benchmark_made_its_teacher(tmp_path, monkeypatch, capsys):
    """KDRL's teacher is made once per split (GRPO, exported merged), logged, named in the table, and read by the
    KDRL runs through the method's {teacher} override (they load it: a teacher that did not export fails them);
    --quick makes a 2-step teacher in a temporary folder."""
    log, out = tmp_path / "runs.jsonl", tmp_path / "k.md"
    # --jobs 2: the teacher is the pool's first job, GRPO's runs go meanwhile, KDRL's are queued once it is made;
    # the pool's (spawned) workers import this module by its name from sys.path, which they inherit
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / f"{spec.name}.py").symlink_to(ROOT / "bench" / "learning_vlm.py")
    monkeypatch.syspath_prepend(str(tmp_path / "mod"))
    argv = ["--quick", "--methods", "kdrl", "--splits", "hard", "--jobs", "2", "--log", str(log), "--out", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "KDRL teacher, hard: " in printed and "after 2 steps" in printed and "FAILED" not in printed
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    teacher = next(r for r in recs if r["key"].startswith('["teacher"'))
    assert teacher["steps"] == 2 and 0.0 <= teacher["score"] <= 1.0
    kdrl = next(r for r in recs if r.get("method") == "kdrl")
    assert kdrl["steps"] == 2 and "methods.kdrl={teacher: '" in kdrl["key"] and "steps_seed1000'" in kdrl["key"]
    assert "KDRL's teacher (the demo's GRPO for 2 steps at G = 8, seed 1000): " in out.read_text()


def test_a_failed_teacher_fails_its_kdrl_runs_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    def broken(split, teachers, extra, threads=0):
        return {"split": split, "error": "teacher: RuntimeError: out of memory"}

    monkeypatch.setattr(bench, "make_teacher", broken)
    monkeypatch.setattr(bench, "shipped_score", lambda *a: 0.1)
    ran = []
    monkeypatch.setattr(bench, "_timed_run", lambda m, sp, G, s, *a: ran.append(m) or {
        "method": m, "split": sp, "G": G, "seed": s, "score": 0.5, "steps": 2, "all_fail": 0.0})  # fmt: skip
    out = tmp_path / "f.md"
    argv = ["--quick", "--methods", "kdrl", "--splits", "hard", "--log", "", "--out", str(out)]
    assert bench.main(argv) == 0
    assert ran == ["grpo", "grpo"]  # GRPO's 2 seeds ran; KDRL's did not, without their teacher
    assert "KDRL teacher, hard: FAILED teacher: RuntimeError: out of memory" in capsys.readouterr().out
    row = f"| {bench.METHODS['kdrl'].label} | failed (seed 0, 1): teacher: RuntimeError: out of memory |"
    assert row in out.read_text()


def test_kdrl_runs_keep_their_place_in_the_order_once_their_teacher_is_made(tmp_path, monkeypatch):
    """The cells run in the benchmark's order; a KDRL cell waits only for its teacher, not behind every other run."""
    events = []
    monkeypatch.setattr(bench, "make_teacher", lambda sp, t, extra, threads=0: events.append(("teacher", sp))
                        or {"split": sp, "teacher": "t", "score": 0.3, "steps": 2})  # fmt: skip
    monkeypatch.setattr(bench, "_timed_run", lambda m, sp, G, s, *a: events.append((m, s)) or {
        "method": m, "split": sp, "G": G, "seed": s, "score": 0.5, "steps": 2, "all_fail": 0.0})  # fmt: skip
    todo = [("grpo", "hard", 8, 0), ("kdrl", "hard", 8, 0), ("grpo", "hard", 8, 1), ("kdrl", "hard", 8, 1)]
    args = bench.parse_args(["--log", "", "--out", ""])
    results = []
    bench.execute(todo, args, bench.Teachers(tmp_path / "none"), tmp_path, results.append, lambda rec: True)
    assert events == [("teacher", "hard"), ("grpo", 0), ("kdrl", 0), ("grpo", 1), ("kdrl", 1)]
    assert [(r["method"], r["seed"]) for r in results] == [("grpo", 0), ("kdrl", 0), ("grpo", 1), ("kdrl", 1)]
    # a teacher that failed: its runs are reported failed, the others run in their order
    events.clear(), results.clear()
    monkeypatch.setattr(bench, "make_teacher", lambda sp, t, extra, threads=0: events.append(("teacher", sp))
                        or {"split": sp, "error": "teacher: boom"})  # fmt: skip
    bench.execute(todo, args, bench.Teachers(tmp_path / "none"), tmp_path, results.append, lambda r: "error" not in r)
    assert events == [("teacher", "hard"), ("grpo", 0), ("grpo", 1)]
    assert [("error" in r, r["method"]) for r in results] == [(True, "kdrl"), (True, "kdrl"), (False, "grpo"),
                                                              (False, "grpo")]  # fmt: skip


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_a_killed_benchmark_leaves_no_worker_behind_even_a_stopped_one(tmp_path):
    """`kill PID` of a benchmark whose workers are stopped (as the idle gate stops them) ends them with it, exits
    non-zero, and leaves its run log readable."""
    import os
    import signal
    import subprocess
    import time

    log = tmp_path / "runs.jsonl"
    argv = [sys.executable, str(ROOT / "bench" / "learning_vlm.py"), "--quick", "--jobs", "2", "--methods", "grpo",
            "--splits", "hard", "--log", str(log), "--out", ""]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        deadline, workers = time.monotonic() + 180, []
        while time.monotonic() < deadline and proc.poll() is None:
            workers = [p for p in _children(proc.pid)
                       if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]  # fmt: skip
            if len(workers) == 2:
                break
            time.sleep(0.2)
        assert len(workers) == 2, "the pool's two workers did not start"
        for p in workers:
            os.kill(p, signal.SIGSTOP)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers), "a worker outlived the benchmark"
    finally:
        if proc.poll() is None:
            proc.kill()
    for line in log.read_text().splitlines():
        json.loads(line)  # whole lines only (the shipped score; no run finished)


def test_below_g8_the_plan_runs_grpo_and_the_methods_that_claim_small_groups(tmp_path, capsys):
    assert bench.planned("ngrpo", 8, asked=False) and bench.planned("grpo", 2, asked=False)
    assert bench.planned("mc_grpo", 2, asked=False) and bench.planned("spo", 2, asked=False)
    assert not bench.planned("ngrpo", 2, asked=False) and bench.planned("ngrpo", 2, asked=True)
    res = [{"method": "grpo", "split": "hard", "G": 2, "seed": 0, "score": 0.5, "steps": 9, "all_fail": 0.7}]
    text = bench.render(res, ["grpo", "mc_grpo", "ngrpo", "gspo"], ["hard"], [2], {}, {}, asked=False)
    assert f"\nNot run yet: {bench.METHODS['mc_grpo'].label}.\n" in text
    why = (
        "the other 2 methods (below G = 8 the benchmark runs GRPO and the methods whose papers claim a gain at "
        "small G, MC-GRPO and SPO; `--methods NAME --groups 2` runs another)."
    )
    assert f"\nNot run at G = 2 by design: {why}" in text
    assert bench.METHODS["gspo"].label not in text and bench.METHODS["ngrpo"].label not in text
    # the same cell when --methods names the method: it is pending, not left out
    text = bench.render(res, ["grpo", "ngrpo"], ["hard"], [2], {}, {}, asked=True)
    assert f"\nNot run yet: {bench.METHODS['ngrpo'].label}.\n" in text and "by design" not in text
    # a report of the whole plan counts 31 methods x 2 splits x 3 seeds at G 8 and GRPO, MC-GRPO, SPO at G 2; a run
    # the log has outside the plan (an earlier --methods ngrpo --groups 2) is counted and shown
    log = tmp_path / "runs.jsonl"
    key = bench.run_key("ngrpo", "hard", 2, 0, 300.0, "process", bench.parse_args([]).extra)
    log.write_text(json.dumps({"key": key, **res[0], "method": "ngrpo", "budget": 300.0, "clock": "process"}) + "\n")
    assert bench.main(["--report-only", "--log", str(log), "--out", str(tmp_path / "t.md")]) == 0
    n = len(bench.METHODS)
    assert f"1 of {n * 2 * 3 + 3 * 2 * 3 + 1} runs already in the log; 0 to run" in capsys.readouterr().out
    assert f"| {bench.METHODS['ngrpo'].label} | 0.500 (seed 0 only) | no GRPO run |" in (tmp_path / "t.md").read_text()


BAD_NUMBERS = [["--groups", "8", "0"], ["--jobs", "0"], ["--budget", "nan"], ["--eval-examples", "-1"]]


@pytest.mark.parametrize("bad", BAD_NUMBERS)
def test_a_bad_number_ends_in_one_message_and_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--report-only", *bad])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{bad[0]} {bad[-1]}" in err and "must be at least 1" in err
