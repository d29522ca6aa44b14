"""Trackers through accelerate (``trainer.log_with``): name checks, missing packages, what a run logs (scalars every
step; the sample grid / video and the completion table at each evaluation), and a real TensorBoard run read back."""

import importlib.util
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from accelerate.tracking import GeneralTracker, register_tracker_class
from PIL import Image

from mmgrpo.core.errors import UserError
from mmgrpo.train.accelerator import make_accelerator
from mmgrpo.train.components import EvalResult
from mmgrpo.train.config import load_config
from mmgrpo.train.media import image_grid
from mmgrpo.train.report import read_metrics
from mmgrpo.train.tracking import completion_table, flat_config, log_evaluation, start_trackers
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
        self.images, self.tables = [], []
        MemoryTracker.runs.append(self)

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, dict(values)))

    def log_images(self, values, step=None, **kwargs):
        self.images.append((step, dict(values)))

    def log_table(self, table_name, columns=None, data=None, dataframe=None, step=None, **kwargs):
        self.tables.append((step, table_name, columns, data))

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


def read_events(directory):
    """Everything a TensorBoard run directory holds (no reservoir sampling: every event is kept)."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(
        str(directory), size_guidance={"scalars": 0, "images": 0, "tensors": 0}
    )
    events.Reload()
    return events


def tb_text(events, tag):
    """[(step, text)] of a text summary (SummaryWriter.add_text stores it under <tag>/text_summary)."""
    from tensorboard.util.tensor_util import make_ndarray

    return [(e.step, make_ndarray(e.tensor_proto).item().decode()) for e in events.Tensors(f"{tag}/text_summary")]


def test_tensorboard_run_of_3_steps_reads_back_equal_to_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    trainer = train(cfg_for(tmp_path, "trainer.log_with=[tensorboard]", "trainer.eval_every=2"))
    events = read_events(trainer.run_dir / "b")  # <run_dir>/<run.name>/events.out.tfevents.*
    lines = read_metrics(trainer.run_dir / "metrics.jsonl")
    want: dict[str, list] = {}
    for line in lines:
        for k, v in line.items():
            if k != "step":
                want.setdefault(k, []).append((line["step"], v))
    assert set(events.Tags()["scalars"]) == set(want) and len(want) > 20
    for tag, points in want.items():  # every value of every curve, at its step (TensorBoard stores float32)
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-30), tag
    assert [s for s, _ in want["reward/mean"]] == [1, 2, 3] and [s for s, _ in want["eval/expected_reward"]] == [
        0,
        2,
        3,
    ]


def solid_images(colours, size=4):
    """[n, 3, size, size] images of the given RGB colours (0..255) in [0, 1]."""
    return torch.tensor(colours, dtype=torch.float32).div(255)[:, :, None, None].expand(-1, -1, size, size).clone()


RECORDS = [
    {"prompt": "How many? A) 1 B) 2", "completion": "<think>a | b</think>\n<answer>B</answer>", "correct": 1.0},
    {"prompt": "Locate it.", "completion": "<answer>(1,2),(3,4)</answer>", "iou": 0.25},
]


def test_tensorboard_holds_the_sample_grid_the_video_and_the_completion_table(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = cfg_for(tmp_path, "trainer.log_with=[tensorboard]")
    acc = make_accelerator("no")
    start_trackers(acc, cfg, tmp_path)
    images = solid_images([(255, 0, 0), (0, 255, 0), (0, 0, 255)])  # 3 images of 4 x 4 px
    video = torch.stack([solid_images([(255, 0, 0), (0, 0, 0)]), solid_images([(0, 0, 255), (255, 255, 255)])], 1)
    assert log_evaluation(acc, 4, images, RECORDS) == ["tensorboard:images", "tensorboard:table"]
    assert log_evaluation(acc, 6, video, fps=25) == ["tensorboard:video"]  # [2 clips, 2 frames, 3, 4, 4]
    assert log_evaluation(acc, 7) == []  # nothing to show
    acc.end_training()
    events = read_events(tmp_path / "b")
    shown = events.Images("eval/samples")
    assert [e.step for e in shown] == [4, 6]
    png = np.asarray(Image.open(io.BytesIO(shown[0].encoded_image_string)).convert("RGB"))
    assert np.array_equal(png, np.asarray(image_grid(images, scale=32)))  # 4 px images shown at 128 px, as samples/
    gif = Image.open(io.BytesIO(shown[1].encoded_image_string))
    assert gif.n_frames == 2 and (shown[1].width, shown[1].height) == gif.size
    assert gif.info["duration"] == 40  # ms a frame: the model's 25 fps, not a fixed rate
    for f in range(2):  # frame f of the GIF is the grid of every clip's frame f (solid colours survive the palette)
        gif.seek(f)
        assert np.array_equal(np.asarray(gif.convert("RGB")), np.asarray(image_grid(video[:, f], scale=32)))
    ((step, text),) = tb_text(events, "eval/completions")
    assert step == 4 and text.splitlines() == [
        "| prompt | completion | correct | iou |",
        "|---|---|---|---|",
        "| How many? A) 1 B) 2 | <think>a \\| b</think> <answer>B</answer> | 1.0 |  |",  # one line, pipe escaped
        "| Locate it. | <answer>(1,2),(3,4)</answer> |  | 0.25 |",
    ]


def test_log_evaluation_refuses_uint8_and_non_finite_images_before_any_tracker_gets_them(tmp_path):
    """uint8 0..255 images were made floats, then clamped to an all-white grid that every tracker showed."""
    pytest.importorskip("tensorboard")
    cfg = cfg_for(tmp_path, "trainer.log_with=[tensorboard]")
    acc = make_accelerator("no")
    start_trackers(acc, cfg, tmp_path)
    images = solid_images([(255, 0, 0), (0, 255, 0)])
    with pytest.raises(ValueError, match=r"dtype torch.uint8.*divide uint8 0..255 images by 255"):
        log_evaluation(acc, 1, images.mul(255).to(torch.uint8))
    broken = images.clone()
    broken[0, 0, 0, 0] = float("nan")
    with pytest.raises(UserError, match="1 of the 96 values of the images"):
        log_evaluation(acc, 2, broken)
    assert log_evaluation(acc, 3, images.to(torch.bfloat16)) == ["tensorboard:images"]  # a bf16 model's samples
    acc.end_training()
    assert [e.step for e in read_events(tmp_path / "b").Images("eval/samples")] == [3]


def test_a_tracker_with_log_images_and_log_table_gets_each_evaluation(tmp_path):
    """Through the trainer: the recipe's evaluation result (here the bandit's metrics plus a grid and records)
    reaches a tracker's log_images (a list of one HWC grid, accelerate's format for wandb and custom trackers) and
    its log_table."""
    MemoryTracker.runs.clear()
    cfg = cfg_for(tmp_path, "trainer.log_with=[mmgrpo_memory]", "trainer.eval_every=2")
    trainer = Trainer(cfg, prepare_run_dir(cfg))
    bandit_eval = trainer.comp.evaluate
    images = solid_images([(255, 0, 0), (0, 0, 255)])

    def with_media(policy, step):
        result = bandit_eval(policy, step)
        return EvalResult(metrics=result.metrics, images=images, records=[{**r, "step": step} for r in RECORDS])

    trainer.comp.evaluate = with_media
    trainer.train()
    (run,) = MemoryTracker.runs
    assert [step for step, _ in run.images] == [0, 2, 3]  # every evaluation
    step, values = run.images[0]
    ((grid,),) = values.values()
    assert list(values) == ["eval/samples"] and grid.dtype == np.uint8
    assert np.array_equal(grid, np.asarray(image_grid(images, scale=32)))
    assert [(s, name) for s, name, _, _ in run.tables] == [(0, "eval/completions"), (2, "eval/completions"),
                                                           (3, "eval/completions")]  # fmt: skip
    _, _, columns, data = run.tables[1]
    assert columns == ["prompt", "completion", "correct", "step", "iou"]
    assert data[1] == ["Locate it.", "<answer>(1,2),(3,4)</answer>", None, 2, 0.25]
    lines = (trainer.run_dir / "samples" / "completions_step_000002.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{**r, "step": 2} for r in RECORDS]  # the same records on disk


def test_completion_table_columns_in_order_of_first_appearance():
    columns, rows = completion_table([{"a": 1, "b": 2}, {"c": 3, "a": 4}])
    assert columns == ["a", "b", "c"] and rows == [[1, 2, None], [4, None, 3]]


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
    # written at the crash: every step logged (the step-2 evaluation, seconds after step 0's, skipped it)
    html = (trainer.run_dir / "report.html").read_text()
    assert 'src="reward_curve.png"' in html and 'src="training_curves.png"' in html
    assert "3 training steps logged" in html and "<td>2</td>" in html


def test_report_html_is_rewritten_at_most_every_report_every_s_and_always_at_the_end(tmp_path, monkeypatch):
    """Drawing the report's figures costs 0.3-0.8 s at each evaluation; a short run evaluating every step spent
    it again and again (and once more at the end, over an unchanged metrics.jsonl)."""
    from mmgrpo.train import trainer as trainer_module

    written = []
    real = trainer_module.write_report

    def counted(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        written.append(len(lines))
        return real(run_dir)

    monkeypatch.setattr(trainer_module, "write_report", counted)
    monkeypatch.setattr(trainer_module, "REPORT_EVERY_S", 1e9)  # a loaded machine's seconds cannot matter
    cfg = cfg_for(tmp_path, "trainer.max_steps=4", "trainer.eval_every=1", "run.name=often")
    Trainer(cfg, prepare_run_dir(cfg)).train()
    assert written == [1, 4 + 5]  # step 0's evaluation, then the end (4 steps and 5 evaluations); not 6 writes
    monkeypatch.setattr(trainer_module, "REPORT_EVERY_S", 0.0)
    written.clear()
    cfg = cfg_for(tmp_path, "trainer.max_steps=2", "trainer.eval_every=1", "run.name=each")
    Trainer(cfg, prepare_run_dir(cfg)).train()
    assert written == [1, 3, 5]  # each evaluation; the end adds nothing new, so no second write of the same


class FailingTracker(MemoryTracker):
    """A tracker whose log fails from its second call on (a network / quota / disk error mid-run)."""

    name = "mmgrpo_failing"

    def log(self, values, step=None, **kwargs):
        if len(self.logged) >= 1:
            raise OSError(28, "No space left on device")
        super().log(values, step, **kwargs)


register_tracker_class(FailingTracker)


def test_a_tracker_failing_mid_run_is_dropped_and_the_run_finishes(tmp_path):
    MemoryTracker.runs.clear()
    with pytest.warns(UserWarning, match=r"the mmgrpo_failing tracker failed while logging step 2 \(OSError.*dropped"):
        trainer = train(cfg_for(tmp_path, "trainer.log_with=[mmgrpo_failing,mmgrpo_memory]"))
    failing, memory = sorted(MemoryTracker.runs, key=lambda r: type(r).__name__)
    assert [s for s, _ in failing.logged] == [1] and not failing.ended  # dropped: not called again
    assert [s for s, v in memory.logged if "reward/mean" in v] == [1, 2, 3] and memory.ended
    assert [m["step"] for m in read_metrics(trainer.run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert (trainer.run_dir / "checkpoints").is_dir() and (trainer.run_dir / "report.html").is_file()


class BrokenStartTracker(MemoryTracker):
    name = "mmgrpo_broken_start"

    def __init__(self, run_name: str):
        raise RuntimeError("api key not configured (no-tty)")


register_tracker_class(BrokenStartTracker)


def test_a_tracker_that_cannot_start_is_one_paragraph(tmp_path):
    with pytest.raises(UserError, match=r"trainer.log_with=\['mmgrpo_broken_start'\]: a tracker could not start "
                                        r"\(RuntimeError: api key not configured"):  # fmt: skip
        train(cfg_for(tmp_path, "trainer.log_with=[mmgrpo_broken_start]"))


class FailingStartTracker(MemoryTracker):
    """Made, then its start fails, as accelerate's WandBTracker does without an API key: ``start`` raises before it
    sets ``self.run``, so its ``finish`` (``self.run.finish()``) raises AttributeError."""

    name = "mmgrpo_failing_start"

    def start(self):
        raise RuntimeError("api key not configured (no-tty)")

    def finish(self):
        self.run.finish()


register_tracker_class(FailingStartTracker)


def test_a_tracker_whose_start_fails_is_only_the_paragraph(tmp_path, recwarn):
    """The walkthrough's wandb without an API key printed "warning: the wandb tracker failed while closing
    (AttributeError: 'WandBTracker' object has no attribute 'run')" before the real error: the tracker that never
    started was closed like a started one. The trackers started before it are still closed."""
    MemoryTracker.runs.clear()
    with pytest.raises(UserError, match=r"trainer.log_with=\['mmgrpo_memory', 'mmgrpo_failing_start'\]: a tracker "
                                        r"could not start \(RuntimeError: api key not configured"):  # fmt: skip
        train(cfg_for(tmp_path, "trainer.log_with=[mmgrpo_memory,mmgrpo_failing_start]"))
    assert [str(w.message) for w in recwarn if "tracker" in str(w.message)] == []
    memory = next(r for r in MemoryTracker.runs if type(r) is MemoryTracker)
    assert memory.ended


def test_a_resumed_run_continues_the_wandb_run_and_purges_tensorboards_replayed_steps(tmp_path):
    from mmgrpo.train.tracking import TRACKERS_FILE, resume_kwargs

    first = resume_kwargs(["wandb", "tensorboard"], tmp_path, 0)
    run_id = json.loads((tmp_path / TRACKERS_FILE).read_text())["wandb_id"]
    assert first == {"wandb": {"id": run_id, "resume": "allow", "dir": str(tmp_path)}}  # a new run: nothing to purge
    assert resume_kwargs(["wandb", "tensorboard"], tmp_path, 3) == {**first, "tensorboard": {"purge_step": 4}}
    assert resume_kwargs(["tensorboard"], tmp_path, 0) == {}


def test_tensorboard_after_a_crash_past_the_last_checkpoint_holds_each_step_once(tmp_path):
    """A crash after step 3 with the last checkpoint at step 2 (emulated: checkpoint 3 removed): the resumed run logs
    step 3 again; TensorBoard then holds steps 1-4 once each, as metrics.jsonl does."""
    import shutil

    pytest.importorskip("tensorboard")
    over = ["trainer.log_with=[tensorboard]", "trainer.checkpoint_every=1", "trainer.max_steps=4"]
    trainer = train(cfg_for(tmp_path, *over, "trainer.stop_after_steps=3"))
    shutil.rmtree(trainer.run_dir / "checkpoints" / "step_000003")
    train(cfg_for(tmp_path, *over, f"resume={trainer.run_dir}"))
    steps = [e.step for e in read_events(trainer.run_dir / "b").Scalars("reward/mean")]
    assert steps == [1, 2, 3, 4]
    assert [m["step"] for m in read_metrics(trainer.run_dir / "metrics.jsonl")] == [1, 2, 3, 4]


def test_overwriting_a_tensorboard_run_starts_its_events_afresh(tmp_path):
    pytest.importorskip("tensorboard")
    train(cfg_for(tmp_path, "trainer.log_with=[tensorboard]"))
    trainer = train(cfg_for(tmp_path, "trainer.log_with=[tensorboard]", "trainer.max_steps=2", "run.overwrite=true"))
    assert [e.step for e in read_events(trainer.run_dir / "b").Scalars("reward/mean")] == [1, 2]


def test_a_resume_may_add_a_tracker(tmp_path):
    MemoryTracker.runs.clear()
    first = train(cfg_for(tmp_path, "trainer.stop_after_steps=2", "trainer.checkpoint_every=1"))
    train(cfg_for(tmp_path, "trainer.log_with=[mmgrpo_memory]", f"resume={first.run_dir}"))
    (run,) = MemoryTracker.runs
    assert [s for s, v in run.logged if "reward/mean" in v] == [3]
