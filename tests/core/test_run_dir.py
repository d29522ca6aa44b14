"""What survives: SIGTERM mid-run, a damaged checkpoint, a torn metrics line, hostile run names, changed resumes."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mmgrpo.core.config_yaml import load_yaml
from mmgrpo.core.errors import UserError
from mmgrpo.rewards.registry import register
from mmgrpo.train import checkpoint as ckpt
from mmgrpo.train.cli import main
from mmgrpo.train.config import load_config
from mmgrpo.train.run_dir import RUN_MARKER
from mmgrpo.train.trainer import train

ROOT = Path(__file__).resolve().parents[2]

BASE = {
    "pipeline": "bandit",
    "data": {"options": {"num_prompts": 6, "num_arms": 4}},
    "rewards": [{"name": "bandit_arm_value"}],
    "trainer": {"prompts_per_step": 2, "group_size": 4, "lr": 0.1, "progress": False, "checkpoint_every": 2},
}


def cfg(tmp_path, *overrides):
    return load_config(None, [f"run.output_dir={tmp_path}", *overrides], base=BASE)


def weights(run_dir):
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(Path(run_dir) / "checkpoints"))
    return state["model"], state["step"]


@pytest.mark.parametrize("name", ["../other", "a/b", "..", ".", "/abs", "", "x y"])
def test_run_name_must_be_one_plain_component(tmp_path, name):
    with pytest.raises(UserError, match="must be one plain folder name"):
        train(cfg(tmp_path, f"run.name={name!r}", "trainer.max_steps=1"))
    assert not (tmp_path.parent / "other").exists()


def test_overwrite_only_replaces_an_mmgrpo_run(tmp_path):
    victim = tmp_path / "notes"
    (victim / "checkpoints").mkdir(parents=True)
    (victim / "checkpoints" / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="only replaces an mmgrpo run directory"):
        train(cfg(tmp_path, "run.name=notes", "run.overwrite=true", "trainer.max_steps=1"))
    assert (victim / "checkpoints" / "precious.txt").read_text() == "keep me"
    t = train(cfg(tmp_path, "run.name=r", "trainer.max_steps=1"))
    assert (t.run_dir / RUN_MARKER).is_file()
    t = train(cfg(tmp_path, "run.name=r", "run.overwrite=true", "trainer.max_steps=2"))  # ours: replaced
    assert [m["step"] for m in map(json.loads, (t.run_dir / "metrics.jsonl").read_text().splitlines())] == [1, 2]


def test_resume_falls_back_past_a_damaged_checkpoint_and_equals_the_uninterrupted_run(tmp_path):
    full = train(cfg(tmp_path, "run.name=full", "trainer.max_steps=6", "trainer.keep_checkpoints=5"))
    part = train(cfg(tmp_path, "run.name=part", "trainer.max_steps=6", "trainer.keep_checkpoints=5",
                     "trainer.stop_after_steps=4"))  # fmt: skip
    newest = ckpt.latest_checkpoint(part.run_dir / "checkpoints")
    assert newest.name == "step_000004"
    data = bytearray((newest / "tensors.safetensors").read_bytes())
    data[-1] ^= 0xFF  # a flipped bit: only the checksum sees it
    (newest / "tensors.safetensors").write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="skipping a damaged checkpoint.*step_000004"):
        train(cfg(tmp_path, "trainer.max_steps=6", "trainer.keep_checkpoints=5", f"resume={part.run_dir}"))
    (a, sa), (b, sb) = weights(full.run_dir), weights(part.run_dir)
    assert sa == sb == 6 and all(torch.equal(a[k], b[k]) for k in a)


def test_a_torn_metrics_line_is_dropped_with_a_warning(tmp_path):
    part = train(cfg(tmp_path, "run.name=p", "trainer.max_steps=4", "trainer.stop_after_steps=2"))
    with open(part.run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward/me')  # power loss mid-line
    with pytest.warns(UserWarning, match="dropped 1 unreadable line"):
        train(cfg(tmp_path, "trainer.max_steps=4", f"resume={part.run_dir}"))
    steps = [json.loads(x)["step"] for x in (part.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_run_stopped_before_its_first_checkpoint_can_be_resumed(tmp_path):
    part = train(cfg(tmp_path, "run.name=p", "trainer.max_steps=3"))
    for d in ckpt.list_checkpoints(part.run_dir / "checkpoints"):
        ckpt.remove_checkpoint(d)  # as if killed before any checkpoint was written
    with pytest.raises(UserError, match="already exists; continue it with resume="):
        train(cfg(tmp_path, "run.name=p", "trainer.max_steps=3"))
    with pytest.warns(UserWarning, match="restarts from step 0"):
        again = train(cfg(tmp_path, "trainer.max_steps=3", f"resume={part.run_dir}"))
    assert again.step == 3


def test_a_run_whose_build_fails_leaves_no_directory_and_the_same_command_then_runs(tmp_path, monkeypatch):
    # the build fails (as when the model path does not load): the directory the run made is removed, so the same
    # command works once the cause is fixed, without resume= or run.overwrite=true
    from mmgrpo.train import trainer as tr

    real = tr.build_components

    def failing(cfg, acc):
        if cfg.data.options.get("num_arms") == 5:
            raise UserError("policy.options.path='nowhere' does not load")
        return real(cfg, acc)

    monkeypatch.setattr(tr, "build_components", failing)
    with pytest.raises(UserError, match="does not load"):
        train(cfg(tmp_path, "run.name=b", "data.options.num_arms=5"))
    assert not (tmp_path / "b").exists()
    assert train(cfg(tmp_path, "run.name=b", "trainer.max_steps=1")).step == 1
    # a directory with anything besides the marker is kept (and a run that had started is never removed)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / RUN_MARKER).write_text("")
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="does not load"):
        train(cfg(tmp_path, "run.name=c", "run.overwrite=true", "data.options.num_arms=5"))
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="does not load"):
        train(cfg(tmp_path, "run.name=b", "run.overwrite=true", "data.options.num_arms=5"))
    assert (tmp_path / "b" / "config.yaml").is_file()
    # run.output_dir folders that the failed run created go with it (a fresh machine has no runs/ yet); one that
    # holds anything else stays
    out = tmp_path / "new" / "runs"
    with pytest.raises(UserError, match="does not load"):
        train(cfg(tmp_path, f"run.output_dir={out}", "run.name=b", "data.options.num_arms=5"))
    assert not (tmp_path / "new").exists()
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="does not load"):
        train(cfg(tmp_path, f"run.output_dir={out}", "run.name=b", "data.options.num_arms=5"))
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["keep.txt"]


@register("test_inf_at_step_0")
def _inf_at_step_0():
    """Test-only: the bandit's arm value, +inf for row 1 in step 0 (data the run meets only once it trains)."""

    def fn(samples, prompts, meta, ctx):
        out = [float(m["arm_values"][int(a)]) for a, m in zip(samples, meta)]
        if ctx.step == 0:
            out[1] = math.inf
        return out

    return fn


def test_a_new_run_that_fails_in_its_first_step_leaves_no_directory(tmp_path, capsys):
    # the failure comes from what the run meets only when it trains (here a non-finite reward; a key the data
    # lacks is alike): the config, the step-0 evaluation and metrics it wrote go, so the same command runs again
    (tmp_path / "c.yaml").write_text("pipeline: bandit\n")
    args = ["train", str(tmp_path / "c.yaml"), f"run.output_dir={tmp_path}", "run.name=f", "trainer.max_steps=1",
            "data.options={num_prompts: 4, num_arms: 3}", "trainer.prompts_per_step=2", "trainer.group_size=3",
            "trainer.progress=false", "trainer.eval_every=1"]  # fmt: skip
    bad, good = "rewards=[{name: test_inf_at_step_0}]", "rewards=[{name: bandit_arm_value}]"
    assert main([*args, bad]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "returned non-finite values (row 1: inf" in err
    assert f"nothing was trained, so the new run directory {tmp_path / 'f'} was removed" in err
    assert not (tmp_path / "f").exists()
    nested = [a.replace(f"run.output_dir={tmp_path}", f"run.output_dir={tmp_path / 'o' / 'runs'}") for a in args]
    assert main([*nested, bad]) == 2 and not (tmp_path / "o").exists()  # the folders it made went too
    capsys.readouterr()
    assert main([*args, good]) == 0 and (tmp_path / "f" / "checkpoints" / "step_000001").is_dir()
    # a directory run.overwrite=true reuses may hold the user's own files: kept, and so is a run past step 0
    (tmp_path / "f" / "notes.txt").write_text("mine")
    assert main([*args, bad, "run.overwrite=true"]) == 2
    assert "was removed" not in capsys.readouterr().err and (tmp_path / "f" / "notes.txt").read_text() == "mine"


def test_out_of_memory_names_the_settings_and_how_to_go_on(tmp_path, capsys, monkeypatch):
    # the allocator's failure is injected in the update of one step (CPU cannot run out on cue); the run's own
    # handling is real: the paragraph, the checkpoints kept, the resume with a smaller micro-batch
    from mmgrpo.train.trainer import Trainer

    real, fail_at = Trainer.update, {"step": 2}

    def update(self, rollout, adv, row_w, step):
        if step == fail_at["step"] and self.cfg.trainer.micro_batch_size == "auto":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nGPU 0 has a total ...")
        return real(self, rollout, adv, row_w, step)

    monkeypatch.setattr(Trainer, "update", update)
    (tmp_path / "c.yaml").write_text("pipeline: bandit\n")
    args = ["train", str(tmp_path / "c.yaml"), f"run.output_dir={tmp_path}", "run.name=m", "trainer.max_steps=4",
            "data.options={num_prompts: 4, num_arms: 3}", "trainer.prompts_per_step=2", "trainer.group_size=3",
            "trainer.progress=false", "trainer.checkpoint_every=1", "rewards=[{name: bandit_arm_value}]"]  # fmt: skip
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "out of memory in step 3 (CUDA out of memory. Tried to allocate 2.00 GiB.)" in err, err
    assert "set trainer.micro_batch_size to fewer rows a forward (now all the minibatch's rows)" in err
    assert f"The checkpoints are kept (the last: step_000002): continue with resume={tmp_path / 'm'}" in err
    assert main([*args, f"resume={tmp_path / 'm'}", "trainer.micro_batch_size=2"]) == 0  # no resume_force needed
    assert ckpt.latest_checkpoint(tmp_path / "m" / "checkpoints").name == "step_000004"
    fail_at["step"] = 0  # in a new run's first step: nothing trained, no directory left
    assert main([*args[:3], "run.name=m0", *args[4:]]) == 2
    assert "Nothing was trained, so the new run directory" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "m0").exists()
    # while the models load (the policy does not fit): the loading options, and no directory left
    from mmgrpo.train import trainer as tr

    def build(cfg, acc):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 GiB.")

    monkeypatch.setattr(tr, "build_components", build)
    assert main([*args[:3], "run.name=m1", *args[4:]]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "out of memory while loading the run's models (CUDA out of memory. Tried to allocate 30.00 GiB.)" in err
    assert "policy.options.dtype=bfloat16" in err and "configs/accelerate/fsdp.yaml" in err
    assert not (tmp_path / "m1").exists()


@pytest.mark.parametrize(
    "change, named",
    [("run.seed=1", "run.seed: 0 -> 1"), ("trainer.group_size=2", "trainer.group_size: 4 -> 2"),
     ("trainer.lr=0.5", "trainer.lr: 0.1 -> 0.5"), ("rewards=[{name: bandit_arm_value, weight: 2.0}]", "rewards")],
)  # fmt: skip
def test_resume_refuses_a_changed_config_unless_forced(tmp_path, change, named):
    part = train(cfg(tmp_path, "run.name=p", "trainer.max_steps=4", "trainer.stop_after_steps=2"))
    with pytest.raises(UserError, match="differs from the run's config.yaml in") as e:
        train(cfg(tmp_path, "trainer.max_steps=4", change, f"resume={part.run_dir}"))
    assert named in str(e.value) and "resume_force=true" in str(e.value)
    train(cfg(tmp_path, "trainer.max_steps=6", "trainer.eval_every=1", f"resume={part.run_dir}"))  # allowed keys
    if not change.startswith("rewards"):
        train(cfg(tmp_path, "trainer.max_steps=8", change, "resume_force=true", f"resume={part.run_dir}"))


def test_a_saved_value_this_version_refuses_at_a_resumable_key_is_replaced_not_a_reason_to_force(tmp_path):
    """A run written before a bound existed (fps 300 before fps was bounded; here log_every 0) could not resume
    without resume_force=true, which turns off every resume check: the saved config "no longer loads"."""
    part = train(cfg(tmp_path, "run.name=old", "trainer.max_steps=4", "trainer.stop_after_steps=2"))
    saved = part.run_dir / "config.yaml"
    saved.write_text(saved.read_text().replace("log_every: 1", "log_every: 0"))
    assert "log_every: 0" in saved.read_text()
    done = train(cfg(tmp_path, "trainer.max_steps=4", f"resume={part.run_dir}"))
    assert done.step == 4 and "log_every: 1" in saved.read_text()
    # a refused value at a key that changes what the run computes still needs resume_force, named
    part = train(cfg(tmp_path, "run.name=old2", "trainer.max_steps=4", "trainer.stop_after_steps=2"))
    saved = part.run_dir / "config.yaml"
    saved.write_text(saved.read_text().replace("group_size: 4", "group_size: 0"))
    with pytest.raises(UserError, match="its config.yaml no longer loads .*group_size.*resume_force=true"):
        train(cfg(tmp_path, "trainer.max_steps=4", f"resume={part.run_dir}"))


def test_a_resumed_runs_config_yaml_records_the_run_so_a_copy_of_it_starts_a_new_one(tmp_path):
    """config.yaml kept the invocation's resume=: `mmgrpo train runs/sig/config.yaml run.name=ref` resumed sig
    (rewriting its config.yaml with run.name: ref) instead of starting ref."""
    sig = tmp_path / "sig"
    train(cfg(tmp_path, "run.name=sig", "run.overwrite=true", "trainer.max_steps=2", "trainer.stop_after_steps=1"))
    resumed = train(cfg(tmp_path, "run.name=other", "trainer.max_steps=2", f"resume={sig}", "resume_force=true"))
    assert resumed.cfg.run.name == "sig"  # a resume keeps its directory's name (progress bar, trackers' run)
    saved = load_yaml((sig / "config.yaml").read_text())
    assert (saved["resume"], saved["resume_force"]) == (None, False)
    assert saved["run"] == {"name": "sig", "output_dir": str(tmp_path), "seed": 0, "overwrite": False}
    ref = train(load_config(sig / "config.yaml", ["run.name=ref"]))
    assert ref.run_dir == tmp_path / "ref" and ref.step == 2 and not (tmp_path / "other").exists()
    assert load_yaml((sig / "config.yaml").read_text())["run"]["name"] == "sig"
    with pytest.raises(UserError, match="run directory '.*sig' already exists; continue it with resume="):
        train(load_config(sig / "config.yaml"))  # no run.overwrite: true recorded, so the run is not wiped


SLOW_REWARD = textwrap.dedent("""
    import time
    def slow_arm_value(samples, prompts, meta, ctx):
        time.sleep(0.05)
        return [float(m["arm_values"][int(a)]) for a, m in zip(samples, meta)]
""")


def _cli(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = "import sys; from mmgrpo.train.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stderr=subprocess.PIPE, text=True)


def test_sigterm_checkpoints_names_the_resume_and_the_resumed_run_equals_the_uninterrupted(tmp_path):
    (tmp_path / "slow_reward.py").write_text(SLOW_REWARD)
    config = tmp_path / "c.yaml"
    base = {**BASE, "rewards": [{"name": "slow_reward.slow_arm_value"}]}
    base["trainer"] = {**base["trainer"], "max_steps": 40, "checkpoint_every": 100}
    config.write_text(json.dumps(base))  # JSON is YAML
    out = f"run.output_dir={tmp_path}"
    proc = _cli(tmp_path, "train", str(config), out, "run.name=killed")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM after step" in err and f"resume={tmp_path / 'killed'}" in " ".join(err.split())
    stopped_at = weights(tmp_path / "killed")[1]
    assert 3 <= stopped_at < 40
    resumed = _cli(tmp_path, "train", str(config), f"resume={tmp_path / 'killed'}")
    assert resumed.wait(timeout=120) == 0
    full = _cli(tmp_path, "train", str(config), out, "run.name=full")
    assert full.wait(timeout=120) == 0
    (a, sa), (b, sb) = weights(tmp_path / "full"), weights(tmp_path / "killed")
    assert sa == sb == 40 and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_run_written_before_an_option_existed_names_it_and_its_value(tmp_path):
    """A run's config.yaml written by an older mmgrpo lacks the options added since (emulated: two keys deleted from
    it). The resume fills them with today's defaults, which may train differently: it says so, naming each key and
    the value used, then records them in config.yaml, so the next resume is silent. A key a resume may change anyway
    (trainer.micro_batch_units) is not named."""
    import warnings

    import yaml

    part = train(cfg(tmp_path, "run.name=old", "trainer.max_steps=4", "trainer.stop_after_steps=2"))
    path = part.run_dir / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    del saved["trainer"]["skip_zero_advantage"], saved["trainer"]["micro_batch_units"]
    del saved["loss"]["aggregation"]  # a block is named once, at its own key
    path.write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.warns(UserWarning, match="options this version of mmgrpo added after the run was started") as rec:
        train(cfg(tmp_path, "trainer.max_steps=3", "trainer.stop_after_steps=3", f"resume={part.run_dir}"))
    text = " ".join(str(w.message) for w in rec if "mmgrpo added" in str(w.message))
    assert "trainer.skip_zero_advantage: true" in text and "loss.aggregation: " in text, text
    assert "micro_batch_units" not in text and "loss.aggregation." not in text, text
    again = yaml.safe_load(path.read_text())
    assert again["trainer"]["skip_zero_advantage"] is True and again["loss"]["aggregation"]["name"] == "token_mean"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train(cfg(tmp_path, "trainer.max_steps=4", f"resume={part.run_dir}"))


def test_metrics_jsonl_is_strict_json_with_null_for_a_reward_that_applies_to_no_row(tmp_path):
    """NaN (a reward that applies to no row of a step) is written as null: strict readers (jq, JavaScript) reject
    NaN tokens. A plug-in's numpy / tensor metric is a float."""
    from mmgrpo.train.report import metrics_line

    line = metrics_line(3, {"reward/x": math.nan, "a": float("inf"), "b": np.float32(0.5), "c": torch.tensor(2.0)})
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard token {c}")) == {
        "step": 3, "reward/x": None, "a": None, "b": 0.5, "c": 2.0,
    }  # fmt: skip
    with pytest.warns(UserWarning, match="metric 'd' is a list, not a number"):
        assert json.loads(metrics_line(1, {"d": [1, 2]}))["d"] == "[1, 2]"


def test_a_run_resumed_at_step_0_logs_its_step_0_evaluation_once(tmp_path):
    first = train(cfg(tmp_path, "trainer.max_steps=3", "trainer.eval_every=2", "trainer.checkpoint_every=0",
                      "trainer.stop_after_steps=1"))  # fmt: skip
    ckpt_dir = first.run_dir / "checkpoints"
    for c in ckpt.list_checkpoints(ckpt_dir):  # stopped before its first checkpoint: it resumes from step 0
        import shutil

        shutil.rmtree(c)
    again = train(cfg(tmp_path, "trainer.max_steps=3", "trainer.eval_every=2", f"resume={first.run_dir}"))
    lines = [json.loads(x) for x in (again.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], "eval" if any(k.startswith("eval/") for k in m) else "train") for m in lines] == [
        (0, "eval"), (1, "train"), (2, "train"), (2, "eval"), (3, "train"), (3, "eval"),
    ]  # fmt: skip


def test_a_resumed_run_compares_against_its_first_evaluation(tmp_path):
    """before_after.png's "before" is the run's first evaluation (step 0), kept under samples/, also after a resume."""
    from mmgrpo.train.report import load_first_eval

    over = ["run.name=sd", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.checkpoint_every=2"]
    first = train(load_config(ROOT / "configs" / "shapes_t2i_grpo.yaml", [f"run.output_dir={tmp_path}", *over,
                                                                          "trainer.stop_after_steps=2",
                                                                          "policy.options.num_steps=2"]))  # fmt: skip
    kept = load_first_eval(first.run_dir / "samples")
    assert kept is not None and kept[0] == 0
    again = train(load_config(ROOT / "configs" / "shapes_t2i_grpo.yaml",
                              [*over, "policy.options.num_steps=2", f"resume={first.run_dir}"]))  # fmt: skip
    assert again.first_eval[0] == 0 and torch.equal(again.first_eval[1], kept[1])


def test_a_signal_during_the_last_step_ends_the_run_as_finished(tmp_path):
    """SIGTERM arriving in the last step: the step ends, the final checkpoint is written, and the run returns as a
    finished one (a scheduler that requeues on a non-zero exit would restart a finished job)."""

    @register("test_sigterm_at_last_step")
    def _factory():
        def fn(samples, prompts, meta, ctx):
            if ctx.step == 3:  # the 4th (last) step
                os.kill(os.getpid(), signal.SIGTERM)
            return [float(s) for s in samples]

        return fn

    trainer = train(cfg(tmp_path, "trainer.max_steps=4", "rewards=[{name: test_sigterm_at_last_step}]"))
    assert trainer.step == 4 and weights(trainer.run_dir)[1] == 4


def test_a_resume_over_edited_training_prompts_is_refused_unless_forced(tmp_path):
    """The sampler's stream positions name prompts by their place in the list: after the file changed, the rest of
    the pass would repeat some prompts and skip others, silently. The checkpoint keeps the prompts' number and
    fingerprint; a resume over other prompts names the change, and resume_force=true continues over them."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a red circle number {i}\n" for i in range(8)))
    over = [f"run.output_dir={tmp_path}", "run.name=p", f"data.options.prompts={prompts}", "trainer.max_steps=3",
            "trainer.checkpoint_every=1", "trainer.eval_every=0", "policy.options.num_steps=2",
            "rewards=[{name: jpeg_compressibility}]", "data.options.heldout_prompts=''"]  # fmt: skip
    config = ROOT / "configs" / "shapes_t2i_grpo.yaml"
    first = train(load_config(config, [*over, "trainer.stop_after_steps=1"]))
    prompts.write_text(prompts.read_text().replace("number 3", "number three"))  # same count, one edited
    with pytest.raises(UserError, match=r"the training prompts changed since checkpoint .*the same number, edited"):
        train(load_config(config, [*over, f"resume={first.run_dir}"]))
    prompts.write_text(prompts.read_text() + "a blue square\n")
    with pytest.raises(UserError, match=r"\(8 prompts then, 9 now\).*resume_force=true"):
        train(load_config(config, [*over, f"resume={first.run_dir}"]))
    assert train(load_config(config, [*over, f"resume={first.run_dir}", "resume_force=true"])).step == 3


def test_a_resume_may_change_the_frame_rate_of_the_written_samples():
    """policy.options.fps sets only how fast the written videos play (no sample changes), so a resume may change it
    (it was refused unless resume_force, and named as an option added since on every older run's resume)."""
    from mmgrpo.train.config import config_diff
    from mmgrpo.train.run_dir import RESUMABLE

    base = load_config("configs/shapes_t2i_grpo.yaml")
    other = load_config("configs/shapes_t2i_grpo.yaml", ["policy.options.fps=12"])
    assert [k for k, _, _ in config_diff(base, other)] == ["policy.options.fps"]
    assert config_diff(base, other, ignore=RESUMABLE) == []
