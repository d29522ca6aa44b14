"""Trackers through accelerate (``trainer.log_with``): name checks, missing packages, and what a run logs."""

import importlib.util
import subprocess
import sys

import pytest
import yaml
from accelerate.tracking import GeneralTracker, register_tracker_class

from mmgrpo.core.errors import UserError
from mmgrpo.train.config import load_config
from mmgrpo.train.tracking import flat_config
from mmgrpo.train.trainer import Trainer, prepare_run_dir, train

BASE = {
    "pipeline": "bandit",
    "run": {"name": "b", "seed": 0},
    "data": {"options": {"num_prompts": 6, "num_arms": 5}},
    "rewards": [{"name": "bandit_arm_value"}],
    "trainer": {"max_steps": 3, "prompts_per_step": 3, "group_size": 4, "lr": 0.1, "progress": False},
}
HAS_TB = importlib.util.find_spec("tensorboard") is not None


class MemoryTracker(GeneralTracker):
    """Records what accelerate hands a tracker."""

    name = "mmgrpo_memory"
    requires_logging_directory = False
    runs: list = []

    def __init__(self, run_name: str):
        super().__init__()
        self.run_name, self.config, self.logged, self.ended = run_name, None, [], False
        MemoryTracker.runs.append(self)

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.ended = True


register_tracker_class(MemoryTracker)


def cfg_for(tmp_path, *overrides):
    return load_config(None, [f"run.output_dir={tmp_path}", *overrides], base=BASE)


def test_unknown_tracker_names_the_nearest():
    with pytest.raises(UserError, match=r"unknown tracker 'tensorbord'; did you mean 'tensorboard'"):
        load_config(None, ["trainer.log_with=[tensorbord]"], base=BASE)


def test_default_logs_to_no_tracker(tmp_path):
    trainer = train(cfg_for(tmp_path))
    assert not trainer.acc.trackers


def test_every_logged_scalar_reaches_the_tracker(tmp_path):
    MemoryTracker.runs.clear()
    train(cfg_for(tmp_path, "trainer.log_with=[mmgrpo_memory]", "trainer.eval_every=2"))
    (run,) = MemoryTracker.runs
    assert run.run_name == "b" and run.ended
    assert run.config["trainer.lr"] == 0.1 and run.config["trainer.log_with"] == "['mmgrpo_memory']"
    rewards = [step for step, values in run.logged if "reward/mean" in values]
    assert rewards == [1, 2, 3]
    assert [step for step, v in run.logged if any(k.startswith("eval/") for k in v)] == [0, 2, 3]
    assert all(isinstance(x, float) for _, v in run.logged for x in v.values())


def test_flat_config_is_scalars():
    flat = flat_config(load_config(None, [], base=BASE))
    assert flat["trainer.max_steps"] == 3 and flat["pipeline"] == "bandit"
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_missing_tensorboard_says_what_to_install(tmp_path):
    # a fresh interpreter where tensorboard cannot be imported, installed or not (accelerate looks once, at import)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**BASE, "trainer": {**BASE["trainer"], "log_with": ["tensorboard"]}}))
    code = (
        "import sys\nsys.modules['tensorboard'] = sys.modules['tensorboardX'] = None\n"
        f"from mmgrpo.train.cli import main\nsys.exit(main(['train', {str(config)!r}, 'run.output_dir={tmp_path}']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "pip install tensorboard" in " ".join(proc.stderr.split()), proc.stderr[-2000:]


@pytest.mark.skipif(not HAS_TB, reason="tensorboard is not installed")
def test_tensorboard_event_files_hold_the_curves(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = train(cfg_for(tmp_path, "trainer.log_with=[tensorboard]"))
    acc = EventAccumulator(str(trainer.run_dir / "b"))
    acc.Reload()
    assert len(acc.Scalars("reward/mean")) == 3


def test_a_crashed_run_has_a_report_with_its_curves(tmp_path):
    cfg = cfg_for(tmp_path, "trainer.max_steps=6", "trainer.eval_every=2")
    trainer = Trainer(cfg, prepare_run_dir(cfg))
    update = trainer.update

    def crash_at_step_3(rollout, adv, row_w, step):
        if step == 3:
            raise RuntimeError("boom")
        return update(rollout, adv, row_w, step)

    trainer.update = crash_at_step_3
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    html = (trainer.run_dir / "report.html").read_text()  # written by the step-2 evaluation
    assert 'src="reward_curve.png"' in html and 'src="training_curves.png"' in html
    assert "2 training steps logged" in html
