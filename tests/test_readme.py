"""The README holds exactly two fresh-machine commands, and .ci/run runs the test one; the demo scores it quotes
are in the line a run prints."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def block(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {name} -->\n```bash\n(.+?)\n```\n<!-- /{name} -->", text, re.S)
    assert m, name
    return m.group(1)


def test_two_commands_one_line_each():
    main, test = block("main-command"), block("test-command")
    assert "\n" not in main and "\n" not in test
    # the demo is a diffusion model: the main command installs the diffusion extra (the core has no diffusers)
    assert 'pip install -e ".[diffusion' in main and "mmgrpo train configs/" in main
    assert 'pip install -e ".[dev]"' in test and "pytest" in test
    cfg = main.split("mmgrpo train ")[1].split()[0]
    assert (ROOT / cfg).is_file()


def test_ci_reads_the_readme_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci and "README.md" in ci
    assert "bash .ci/lowest" in ci  # then the lowest-versions job


def test_the_demo_scores_are_quoted_as_the_run_prints_them():
    """The README says the demo prints its held-out scores: the line it quotes is what the end of a run prints
    (mmgrpo.train.report.eval_summary) for those evaluations."""
    from mmgrpo.train.report import eval_summary

    text = " ".join((ROOT / "README.md").read_text().split())
    quoted = re.search(r"`(eval/shapes: [^`]+)`", text).group(1)
    points = re.findall(r"(\d\.\d+) \(step (\d+)\)", quoted)
    assert len(points) == 4
    assert eval_summary([{"step": int(s), "eval/shapes": float(v)} for v, s in points]) == [quoted]
