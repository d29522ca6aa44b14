"""Smoke test of bench/rollout.py (``--repeats 1 --tiny``): it runs and prints/writes its table (no timings)."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench" / "rollout.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_rollout", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rollout_bench_runs_tiny(tmp_path, capsys):
    out = tmp_path / "rollout.md"
    assert load_bench().main(["--repeats", "1", "--tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("|")]
    assert len(lines) == 3 and "ratio rollout / pipeline" in lines[0]  # header, separator, one row
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:8] == ["cpu", "float32", "8 (2 x 4)", "10", "1 (1)", "4x8x8", "16x16", "1"]
    assert float(cells[-1].strip("*")) > 0  # the ratio
    text = out.read_text()
    assert "python bench/rollout.py --repeats 1 --tiny --out " in text and lines[2] in text


def test_rollout_bench_runs_tiny_with_guidance_both_ways(capsys):
    """``--guidance 3``: both sides sample with CFG; ``--cfg-forwards 2`` runs mmgrpo's branches as two forwards
    (the path before the doubled batch) only while it measures, and says so in the row."""
    import mmgrpo.policies.diffusion as diffusion

    stack = diffusion.stack_conds
    for forwards in ("1", "2"):
        args = ["--repeats", "1", "--tiny", "--out", "", "--guidance", "3", "--cfg-forwards", forwards]
        assert load_bench().main(args) == 0
        row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")][2]
        assert f"| 3 ({forwards}) |" in row
    assert diffusion.stack_conds is stack
