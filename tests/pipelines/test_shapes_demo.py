"""The README demo config on a reduced budget: the run directory is complete (the learning itself is bench/)."""

from pathlib import Path

from PIL import Image

from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

ROOT = Path(__file__).parents[2]


def test_demo_config_writes_a_complete_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config names assets/shapes_t2i relative to the repository
    cfg = load_config(
        ROOT / "configs" / "shapes_t2i_grpo.yaml",
        [f"run.output_dir={tmp_path}", "trainer.max_steps=2", "trainer.prompts_per_step=2", "trainer.group_size=2",
         "trainer.eval_every=1", "trainer.checkpoint_every=2", "trainer.progress=false",
         "data.options.eval_max_prompts=3", "policy.options.num_steps=3"],
    )  # fmt: skip
    t = train(cfg)
    run = t.run_dir
    assert {"config.yaml", "metrics.jsonl", "report.html", "reward_curve.png"} <= {p.name for p in run.iterdir()}
    grids = sorted(p.name for p in (run / "samples").iterdir())
    assert grids == [
        "before_after.png",
        "first_eval.safetensors",
        "step_000000.png",
        "step_000001.png",
        "step_000002.png",
    ]  # first_eval: before_after's "before", kept for a resume
    ba, first = Image.open(run / "samples" / "before_after.png"), Image.open(run / "samples" / "step_000000.png")
    assert ba.width > first.width and ba.height > 128  # 3 captioned pairs of enlarged 32 px images
    assert (run / "checkpoints" / "step_000002" / "tensors.safetensors").is_file()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert sum('"eval/shapes"' in x for x in lines) == 3 and sum('"reward/shapes"' in x for x in lines) == 2
    html = (run / "report.html").read_text()
    assert "samples/step_000002.png" in html and "reward_curve.png" in html
    assert html.index("samples/before_after.png") < html.index("reward_curve.png")  # shown first


def test_an_evaluation_in_batches_shows_its_own_bar(tmp_path, monkeypatch, capsys):
    """trainer.progress: the held-out evaluation (minutes at the recipes' sizes on a CPU) has a bar of its samples,
    cleared when done; trainer.progress=false shows none."""
    monkeypatch.chdir(ROOT)
    args = [f"run.output_dir={tmp_path}", "trainer.max_steps=1", "trainer.prompts_per_step=2", "trainer.group_size=2",
            "trainer.eval_every=1", "trainer.checkpoint_every=0", "data.options.eval_max_prompts=3",
            "data.options.eval_batch_size=1", "policy.options.num_steps=2"]  # fmt: skip
    train(load_config(ROOT / "configs" / "shapes_t2i_grpo.yaml", [*args, "run.name=bars", "trainer.progress=true"]))
    err = capsys.readouterr().err
    assert "bars eval, step 0:" in err and "bars eval, step 1:" in err and "sample" in err
    train(load_config(ROOT / "configs" / "shapes_t2i_grpo.yaml", [*args, "run.name=quiet", "trainer.progress=false"]))
    assert "eval, step" not in capsys.readouterr().err
