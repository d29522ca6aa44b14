"""What ``mmgrpo train`` prints around a run, in the CLI's own process (tiny bandit runs): an error or an interrupt
after training started says where the run stopped, the checkpoint kept and the command that continues it (and that
command continues it); an error starts on its own line below the progress bar; mmgrpo's warnings print as
``warning: <message>``; the end of a run prints its held-out scores."""

import json
import re
import textwrap
import warnings
from pathlib import Path

import pytest

import mmgrpo
from mmgrpo.train.cli import main, short_warnings

CONFIG = {
    "pipeline": "bandit",
    "data": {"options": {"num_prompts": 6, "num_arms": 4}},
    "trainer": {"max_steps": 5, "prompts_per_step": 2, "group_size": 4, "lr": 0.1, "eval_every": 2},
}
REWARDS = textwrap.dedent("""
    import math
    import os
    import signal
    from pathlib import Path

    def value(samples, meta):
        return [float(m["arm_values"][int(a)]) for a, m in zip(samples, meta)]

    def nan_in_step_3(samples, prompts, meta, ctx):
        broken = ctx.step == 2 and not Path("fixed").exists()
        return [math.nan] * len(samples) if broken else value(samples, meta)

    def sigint_in_step_2(samples, prompts, meta, ctx):
        if ctx.step == 1 and not Path("fixed").exists():
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the step finishes, a checkpoint is written
        return value(samples, meta)

    def applies_to_none(samples, prompts, meta, ctx):
        return [None] * len(samples)
""")


def run(capsys, *argv):
    code = main(["train", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding the config and the rewards module (imported by its dotted path)."""
    module = f"cli_msg_rewards_{tmp_path.name}"  # one module per test: its own file
    (tmp_path / f"{module}.py").write_text(REWARDS)
    (tmp_path / "c.yaml").write_text(json.dumps(CONFIG))  # JSON is YAML
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path, module


def continue_command(err: str) -> list[str]:
    """The argv of the ``mmgrpo train ...`` command a message says to continue with."""
    text = " ".join(err.split())
    m = re.search(r"[Cc]ontinue with: mmgrpo train (\S+) (resume=\S+)", text)
    assert m, err
    return [m.group(1), m.group(2)]


def test_an_error_after_training_started_names_the_step_the_checkpoint_and_the_continuing_command(workdir, capsys):
    """A reward returning NaN in step 3 ended with the reward's paragraph alone, glued to the progress bar (which
    was drawn again below it): the paragraph now starts on its own line, no bar follows it, and it says where the run
    stopped, the checkpoint kept and the command that continues the run; that command does."""
    tmp, module = workdir
    run_dir = tmp / "runs" / "nan"
    reward = f"rewards=[{{name: {module}.nan_in_step_3}}]"
    code, _, err = run(capsys, "c.yaml", "run.output_dir=runs", "run.name=nan", "trainer.checkpoint_every=1", reward,
                       "trainer.progress=true", "trainer.eval_every=0")  # fmt: skip
    assert code == 2
    bar, _, paragraph = err.partition("error: ")
    assert "nan" in bar and bar.endswith("\n")  # the bar was drawn, and closed before the error
    assert "step/s" not in paragraph and "%|" not in paragraph  # no bar drawn after the error
    text = " ".join(paragraph.split())
    assert text.startswith(f"reward '{module}.nan_in_step_3' returned non-finite values")
    assert (
        f"The run stopped in step 3 (of 5 steps); the last checkpoint kept is step_000002 "
        f"({run_dir / 'checkpoints' / 'step_000002'}). Once the cause is fixed, continue with: mmgrpo train "
        f"{run_dir / 'config.yaml'} resume={run_dir}"
    ) in text
    (tmp / "fixed").touch()
    code, out, err = run(capsys, *continue_command(err))
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 5


def test_an_error_after_the_last_step_says_what_the_run_was_doing_then(workdir, capsys, monkeypatch):
    """The message of an error after the loop (writing report.html, closing the trackers) named the loop's last
    doing, "in the evaluation of step 5" or "while writing the checkpoint of step 5": it names what failed."""
    from mmgrpo.core.errors import UserError
    from mmgrpo.train import trainer as trainer_module

    tmp, module = workdir

    def no_report(run_dir):
        raise UserError(f"cannot write {run_dir / 'report.html'}: no space left on device")

    monkeypatch.setattr(trainer_module, "write_report", no_report)
    (tmp / "fixed").touch()  # the reward sends no signal
    code, _, err = run(capsys, "c.yaml", "run.output_dir=runs", "run.name=rep", "trainer.progress=false",
                       f"rewards=[{{name: {module}.sigint_in_step_2}}]", "trainer.eval_every=0")  # fmt: skip
    text = " ".join(err.split())
    assert code == 2 and "The run stopped while writing report.html after step 5 (of 5 steps)" in text, err


def test_an_interrupt_names_the_runs_own_config_and_its_command_continues(workdir, capsys):
    """The SIGINT message said `mmgrpo train CONFIG resume=...` with a literal CONFIG, and the shipped config
    without the first command's overrides is refused: it names the run's config.yaml, and the command works."""
    tmp, module = workdir
    run_dir = tmp / "runs" / "sig"
    code, _, err = run(capsys, "c.yaml", "run.output_dir=runs", "run.name=sig", "trainer.progress=false",
                       f"rewards=[{{name: {module}.sigint_in_step_2}}]", "trainer.eval_every=0")  # fmt: skip
    assert code == 130
    assert " ".join(err.split()) == (
        f"stopped: stopped by SIGINT after step 2; its checkpoint was written ({run_dir / 'checkpoints'}/"
        f"step_000002). Continue with: mmgrpo train {run_dir / 'config.yaml'} resume={run_dir}"
    )
    (tmp / "fixed").touch()
    code, out, err = run(capsys, *continue_command(err))
    assert code == 0, err
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 5


def test_the_end_of_a_run_prints_its_held_out_scores(workdir, capsys):
    """The README says the demo prints its held-out scores; `mmgrpo train` printed only the bar and the run
    directory. It prints each evaluation metric at every evaluation (as metrics.jsonl has them), then the
    directory."""
    tmp, module = workdir
    code, out, err = run(capsys, "c.yaml", "run.output_dir=runs", "rewards=[{name: bandit_arm_value}]",
                         "trainer.progress=false", "trainer.max_steps=3")  # fmt: skip
    assert code == 0, err
    records = [json.loads(x) for x in (tmp / "runs" / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/expected_reward" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]
    expected = " -> ".join(f"{r['eval/expected_reward']:.3f} (step {r['step']})" for r in evals)
    lines = out.splitlines()
    assert lines[0] == f"eval/expected_reward: {expected}"
    assert lines[1].startswith("eval/best_arm_rate: ") and lines[2].startswith("run directory: ")


def test_mmgrpos_warnings_print_as_one_line_each_once_in_the_cli_only(workdir, capsys, recwarn):
    """mmgrpo's warnings printed in Python's format (`.../scoring.py:133: UserWarning: ...` and then the source
    line): the CLI prints `warning: <message>`, each message once; other packages' warnings, and every warning of a
    library caller, keep Python's display."""
    tmp, module = workdir
    rewards = f"rewards=[{{name: {module}.applies_to_none}}, {{name: bandit_arm_value}}]"
    code, _, err = run(capsys, "c.yaml", "run.output_dir=runs", "trainer.progress=false", "trainer.max_steps=2",
                       "trainer.eval_every=0", rewards)  # fmt: skip
    assert code == 0, err
    assert " ".join(err.split()).startswith(
        f"warning: reward '{module}.applies_to_none' applies to none of the 8 rows of step 1: it trains nothing"
    )
    assert "UserWarning" not in err and "warnings.warn" not in err and ".py:" not in err
    ours = str(Path(mmgrpo.__file__).parent / "train" / "scoring.py")
    with short_warnings():
        for _ in range(2):
            warnings.warn_explicit("a message of mmgrpo's", UserWarning, ours, 1)
        warnings.warn_explicit("another package's message", UserWarning, "/elsewhere/pkg.py", 1)
    warnings.warn_explicit("mmgrpo's, in a library caller", UserWarning, ours, 2)
    assert capsys.readouterr().err == "warning: a message of mmgrpo's\n"
    assert [str(w.message) for w in recwarn] == ["another package's message", "mmgrpo's, in a library caller"]


def test_a_yaml_syntax_errors_lines_print_below_its_paragraph_with_their_carets(tmp_path, capsys):
    """The CLI wraps an error's paragraph, not the lines of the YAML file it shows (wrapping ran them into the
    paragraph and moved the carets)."""
    path = tmp_path / "broken.yaml"
    path.write_text("pipeline: bandit\ntrainer:\n  lr: [3e-4\n  max_steps: 2\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "broken.yaml' is not valid YAML: line 4" in " ".join(err.split())  # the paragraph wraps where the path ends
    assert "\n  3 |   lr: [3e-4\n    |       ^\n" in err
