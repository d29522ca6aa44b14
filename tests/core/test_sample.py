"""`mmgrpo sample` (Best-of-N) on a tiny real SD3 checkpoint: argmax choice, seeds, outputs, LoRA runs, errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mmgrpo import rewards
from mmgrpo.core.errors import UserError
from mmgrpo.core.files import open_video
from mmgrpo.policies.diffusion import DiffusionPolicy, DiffusionPolicyOptions
from mmgrpo.testing.tiny_sd3 import save_tiny_sd3, tiny_sd3_adapter
from mmgrpo.train.checkpoint import latest_checkpoint, load_checkpoint
from mmgrpo.train.cli import main as cli_main
from mmgrpo.train.config import load_config
from mmgrpo.train.sample import (
    best_index,
    best_of_n,
    build_policy,
    framed,
    load_trained_weights,
    parse_args,
    parse_reward_options,
    sample_seeds,
    save_best,
)
from mmgrpo.train.trainer import train

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle", "two blue squares"]


@rewards.register("test_mean_brightness")
def mean_brightness(channel: int | None = None):
    """Mean pixel value (of one channel): a reward whose value the test can recompute from the saved image."""

    def fn(samples, prompts, meta, ctx):
        x = samples if channel is None else samples[:, channel : channel + 1]
        return x.float().mean(dim=(1, 2, 3))

    return fn


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "ckpt")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_ckpt):
    """A 1-step LoRA (rank 2) run with EMA on the tiny checkpoint; its LoRA B weights are non-zero."""
    root = tmp_path_factory.mktemp("runs")
    cfg = {
        "pipeline": "text_to_image",
        "run": {"name": "lora", "output_dir": str(root)},
        "policy": {"options": {"family": "sd3", "path": tiny_ckpt, "num_steps": 2, "lora_rank": 2}},
        "data": {"options": {"heldout_prompts": "", "prompts": "shapes"}},
        "rewards": [{"name": "jpeg_incompressibility"}],
        "trainer": {"max_steps": 1, "prompts_per_step": 1, "group_size": 2, "lr": 5e-2, "ema_decay": 0.5,
                    "progress": False},
    }  # fmt: skip
    path = root / "lora.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return train(load_config(path)).run_dir


def run_cli(capsys, *argv):
    code = cli_main(["sample", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def base_policy(tiny_ckpt, steps):
    from mmgrpo.policies.models.sd3 import SD3Adapter

    return DiffusionPolicy(SD3Adapter.from_pretrained(tiny_ckpt), DiffusionPolicyOptions(num_steps=steps))


def load_png(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255  # [3, H, W]


# ------------------------------------------------------------------------------------------- pure pieces
def test_best_index_seeds_options_and_frame():
    # NaN (reward not applicable) is skipped; the tie 0.7 / 0.7 goes to the first, index 2
    assert best_index(torch.tensor([0.2, float("nan"), 0.7, 0.7])) == 2
    assert best_index(torch.tensor([-3.0, -1.0, -2.0])) == 1
    with pytest.raises(UserError, match="no value"):
        best_index(torch.tensor([float("nan")] * 2))
    assert sample_seeds(5, 3) == [5, 6, 7]
    got = parse_reward_options(["quality=90", "mode=hard", "w=[1, 2]"])
    assert got == {"quality": 90, "mode": "hard", "w": [1, 2]}
    with pytest.raises(UserError, match="'quality' is not of the form key=value"):
        parse_reward_options(["quality"])
    # read as the config's overrides: a list left open was taken for the text "[1, 2"
    with pytest.raises(UserError, match=r"(?s)the value of --reward-option 'w=\[1, 2'.*quote it"):
        parse_reward_options(["w=[1, 2"])
    imgs = torch.full((2, 3, 2, 2), 0.5)
    out = framed(imgs, best=1, width=1)  # 2x2 image + 1 px frame each side -> 4x4
    assert out.shape == (2, 3, 4, 4)
    assert out[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0]  # others: white frame
    assert torch.allclose(out[1, :, 3, 3], torch.tensor([0.1, 0.8, 0.2]))  # best: green frame
    assert (out[:, :, 1:3, 1:3] == 0.5).all()  # images untouched inside


def test_save_best_writes_png_at_full_size_and_mp4_for_video(tmp_path):
    torch.manual_seed(0)
    png = save_best(torch.rand(3, 5, 7), tmp_path / "best_0")  # [3, H, W] -> a 7 x 5 PNG, no padding
    assert png.name == "best_0.png" and Image.open(png).size == (7, 5)
    mp4 = save_best(torch.rand(4, 3, 8, 8), tmp_path / "best_1", fps=16)  # [F, 3, H, W] -> a 4-frame mp4
    video = open_video(mp4, "test")
    assert mp4.name == "best_1.mp4" and len(video) == 4 and video.fps == 16  # at the model's rate


# ------------------------------------------------------------------------------------------- best of N
def test_best_of_4_picks_argmax_of_the_reward(tmp_path, capsys, tiny_ckpt):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "--model", tiny_ckpt, "--family", "sd3", "--prompts", *PROMPTS,
                                "--best-of", 4, "--reward", "test_mean_brightness", "--reward-option", "channel=0",
                                "--seed", 7, "--steps", 3, "--out", out)  # fmt: skip
    assert code == 0, err
    assert "best-of-4 for 2 prompts" in stdout
    summary = json.loads((out / "scores.json").read_text())
    assert summary["reward_options"] == {"channel": 0} and summary["sde"] == "ode" and summary["steps"] == 3
    policy = base_policy(tiny_ckpt, steps=3)
    for i, rec in enumerate(summary["prompts"]):
        assert rec["prompt"] == PROMPTS[i] and rec["seeds"] == [7, 8, 9, 10]  # seeds SEED + j
        scores = torch.tensor(rec["scores"])
        assert len(set(rec["scores"])) == 4  # four different samples
        assert rec["best_index"] == int(scores.argmax()) and rec["best_score"] == pytest.approx(scores.max().item())
        # independently: the ODE samples of these seeds, scored as red-channel means
        imgs = policy.generate([PROMPTS[i]] * 4, [7, 8, 9, 10])
        assert torch.allclose(imgs[:, 0].mean(dim=(1, 2)), scores, atol=1e-6)
        # re-scoring the saved best PNG gives the best score (up to uint8 rounding, 0.5 / 255)
        saved = load_png(out / f"best_{i}.png")
        assert saved.shape == (3, 16, 16)
        assert abs(saved[0].mean().item() - rec["best_score"]) < 0.5 / 255 + 1e-6
    # grid: 16 px images, 1 px frame -> 18 px cells; image_grid pads 2 px: 4 * 20 + 2 = 82 wide, 22 high per
    # prompt row; enlarged x8 (128 // 16) -> 656 x 176 per row, 2 rows -> 656 x 352
    assert Image.open(out / "grid.png").size == (656, 352)


def test_jpeg_rescore_is_exact_and_batching_changes_nothing(tmp_path, capsys, tiny_ckpt):
    common = ["--model", tiny_ckpt, "--prompts", PROMPTS[0], "--best-of", 3, "--reward", "jpeg_incompressibility",
              "--steps", 2, "--seed", 3]  # fmt: skip
    assert run_cli(capsys, *common, "--out", tmp_path / "a")[0] == 0
    assert run_cli(capsys, *common, "--batch-size", 1, "--out", tmp_path / "b")[0] == 0
    a = json.loads((tmp_path / "a" / "scores.json").read_text())["prompts"][0]
    b = json.loads((tmp_path / "b" / "scores.json").read_text())["prompts"][0]
    assert a["scores"] == b["scores"] and a["best_index"] == b["best_index"]
    # the PNG holds (x * 255).round(), exactly what the JPEG reward encodes: the re-score is identical
    saved = load_png(tmp_path / "a" / "best_0.png")[None]
    rescore = rewards.get("jpeg_incompressibility")(saved, [PROMPTS[0]], [{}], None)
    assert float(rescore[0]) == pytest.approx(a["best_score"], abs=1e-6)


def test_a_large_best_of_is_drawn_in_batches_of_the_default_and_gives_the_one_batch_result(
    tmp_path, capsys, tiny_ckpt, monkeypatch
):
    # all N in one forward was the default: --best-of 64 of a real model ran out of memory unless --batch-size was
    # given; the default batch changes nothing but the forwards (each sample's noise comes from its own seed)
    from mmgrpo.train.sample import DEFAULT_BATCH, build_parser

    help_text = " ".join(build_parser().format_help().split())
    assert DEFAULT_BATCH == 8 and "(default: 8, or N when smaller; 0 = all N at once)" in help_text
    real, sizes = DiffusionPolicy.generate, []

    def generate(self, prompts, seeds, **kw):  # the real sampler, its batch sizes recorded
        sizes.append(len(prompts))
        return real(self, prompts, seeds, **kw)

    monkeypatch.setattr(DiffusionPolicy, "generate", generate)
    common = ["--model", tiny_ckpt, "--prompts", PROMPTS[0], "--best-of", 10, "--reward", "test_mean_brightness",
              "--steps", 2, "--seed", 5, "--noise-level", 0.7, "--device", "cpu"]  # fmt: skip
    assert run_cli(capsys, *common, "--out", tmp_path / "default")[0] == 0
    assert sizes == [8, 2]
    sizes.clear()
    assert run_cli(capsys, *common, "--batch-size", 0, "--out", tmp_path / "one")[0] == 0
    assert sizes == [10]
    a, b = (json.loads((tmp_path / d / "scores.json").read_text())["prompts"][0] for d in ("default", "one"))
    assert a["seeds"] == b["seeds"] == list(range(5, 15)) and a["best_index"] == b["best_index"]
    # the same noise per sample: equal up to the float rounding of a batched forward (3e-8 seen on this CPU)
    assert a["scores"] == pytest.approx(b["scores"], abs=1e-6) and len(set(a["scores"])) == 10  # SDE: 10 samples
    assert (tmp_path / "default" / "best_0.png").read_bytes() == (tmp_path / "one" / "best_0.png").read_bytes()
    sizes.clear()
    assert run_cli(capsys, *common[:5], 3, *common[6:], "--out", tmp_path / "small")[0] == 0
    assert sizes == [3]  # N below the default: one forward, as before


# ------------------------------------------------------------------------------------------- trained runs
def test_run_dir_loads_lora_weights_and_changes_samples(tmp_path, capsys, tiny_ckpt, trained_run, monkeypatch):
    import mmgrpo.train.checkpoint as checkpoint

    argv = [
        "--run",
        trained_run,
        "--prompts",
        "x",
        "--best-of",
        1,
        "--reward",
        "test_mean_brightness",
        "--out",
        tmp_path,
    ]
    args = parse_args([str(a) for a in argv])
    hashed, digest = [], checkpoint._digest
    monkeypatch.setattr(checkpoint, "_digest", lambda f: hashed.append(f.name) or digest(f))
    policy, ckpt, opts = build_policy(args)
    monkeypatch.undo()
    assert sorted(hashed) == ["state.json", "tensors.safetensors"]  # the checkpoint's files are hashed once
    assert ckpt == latest_checkpoint(trained_run / "checkpoints") and opts.lora_rank == 2
    assert opts.path == tiny_ckpt and opts.num_steps == 2  # model and steps from the run's config.yaml
    saved = load_checkpoint(ckpt)["model"]
    own = policy.unwrapped().state_dict()
    assert saved and all(torch.equal(own[k], v) for k, v in saved.items())
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())
    # the same seeds through the base model and the trained run give different samples
    common = ["--prompts", PROMPTS[0], "--best-of", 2, "--reward", "test_mean_brightness", "--seed", 1]
    assert run_cli(capsys, "--model", tiny_ckpt, *common, "--out", tmp_path / "base")[0] == 0
    assert run_cli(capsys, "--run", trained_run, *common, "--out", tmp_path / "lora")[0] == 0
    base = json.loads((tmp_path / "base" / "scores.json").read_text())
    lora = json.loads((tmp_path / "lora" / "scores.json").read_text())
    assert lora["checkpoint"] == str(ckpt) and base["checkpoint"] is None
    assert all(abs(x - y) > 1e-6 for x, y in zip(base["prompts"][0]["scores"], lora["prompts"][0]["scores"]))
    # --checkpoint inside the run directory finds the run's config.yaml (LoRA rank 2) by itself
    policy2, _, opts2 = build_policy(
        parse_args([*map(str, common), "--checkpoint", str(ckpt), "--out", str(tmp_path)])
    )
    assert opts2.lora_rank == 2
    assert all(torch.equal(policy2.unwrapped().state_dict()[k], v) for k, v in saved.items())


def test_ema_weights_load_in_checkpoint_order(tmp_path, trained_run):
    ckpt = latest_checkpoint(trained_run / "checkpoints")
    state = load_checkpoint(ckpt)
    policy = DiffusionPolicy(tiny_sd3_adapter(), DiffusionPolicyOptions(num_steps=2, lora_rank=2))
    names = load_trained_weights(policy.unwrapped(), ckpt, ema=True)
    own = policy.unwrapped().state_dict()
    assert names == list(state["model"])
    for k, shadow in zip(state["model"], state["ema"]["shadow"]):
        assert torch.equal(own[k], shadow)
    # ema_decay 0.5 after one update: shadow = 0.5 * init + 0.5 * trained, so B = 0.5 * trained B (init B = 0)
    k = next(k for k in state["model"] if "lora_B" in k)
    assert torch.allclose(own[k], 0.5 * state["model"][k], atol=1e-7) and state["model"][k].abs().sum() > 0


# ------------------------------------------------------------------------------------------- errors
def test_checkpoint_must_match_the_model(trained_run):
    ckpt = latest_checkpoint(trained_run / "checkpoints")
    full = DiffusionPolicy(tiny_sd3_adapter(), DiffusionPolicyOptions(lora_rank=0))  # every weight trainable
    with pytest.raises(UserError, match="lacks .* trainable parameters"):
        load_trained_weights(full.unwrapped(), ckpt)
    rank4 = DiffusionPolicy(tiny_sd3_adapter(), DiffusionPolicyOptions(lora_rank=4))
    with pytest.raises(UserError, match=r"has shape \(2, .*the model \(4, "):
        load_trained_weights(rank4.unwrapped(), ckpt)
    q_only = DiffusionPolicy(tiny_sd3_adapter(), DiffusionPolicyOptions(lora_rank=2, lora_targets=["to_q"]))
    with pytest.raises(UserError, match="tensors the model does not have"):
        load_trained_weights(q_only.unwrapped(), ckpt)
    with pytest.raises(UserError, match="no EMA weights"):
        no_ema = tiny_sd3_adapter()
        load_trained_weights(no_ema.denoiser, _without_ema(ckpt, trained_run.parent / "no_ema"), ema=True)


def _without_ema(ckpt, dest):
    from mmgrpo.train.checkpoint import save_checkpoint

    state = load_checkpoint(ckpt)
    state["ema"] = None
    return save_checkpoint(dest, 1, state)


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--model", "{tmp}/nope"], "model path '{tmp}/nope' is not a directory"),
        (["--model", "{ckpt}", "--run", "{tmp}/missing_run"], "run directory '{tmp}/missing_run' not found"),
        (["--model", "{ckpt}", "--run", "{tmp}"], "has no complete checkpoint under checkpoints/"),
        (["--model", "{ckpt}", "--checkpoint", "{tmp}/step_000001"], "is not a checkpoint folder"),
        (["--model", "{ckpt}", "--checkpoint", "{alone}"], "its LoRA options are unknown"),
        (["--model", "{ckpt}", "--reward", "jpeg_incompresibility"], "did you mean 'jpeg_incompressibility'"),
        (["--model", "{ckpt}", "--prompts", " "], "no prompts"),
        (["--prompts", "x"], "no model to sample"),
        (["--model", "{ckpt}", "--ema"], "--ema loads a checkpoint's EMA weights"),
        (["--model", "{ckpt}", "--guidance", "0.5"], "--guidance must be a finite scale from 1 to 100"),
        (["--model", "{ckpt}", "--guidance", "nan"], "--guidance must be a finite scale from 1 to 100"),
        (["--model", "{ckpt}", "--guidance", "1e38"], "--guidance must be a finite scale from 1 to 100"),
        (["--model", "{ckpt}", "--steps", "0"], "--steps must be >= 1 sampling steps, got 0"),
        (["--model", "{ckpt}", "--noise-level", "inf"], "--noise-level must be a finite number >= 0"),
        (["--model", "{ckpt}", "--best-of", "0"], "--best-of must be >= 1, got 0"),
        # the reward walkthrough of 2026-12-07: an out-of-memory kill, and options no check read
        (["--model", "{ckpt}", "--best-of", str(10**12)], "--best-of 1000000000000: at most 1024 samples a prompt"),
        (["--model", "{ckpt}", "--reward-option", "channel=1.5"], "--reward-option channel: expected int | null"),
        (["--model", "{ckpt}", "--reward-option", "chanel=1"], "unknown option '--reward-option chanel'"),
        # the CLI fuzz of 2026-12-06: each of these ended in a traceback (exit 1) or was accepted
        (["--model", "{ckpt}", "--device", "tpu"], "--device 'tpu' is not a device; give cpu, cuda"),
        (["--model", "{ckpt}", "--device", "cuda:x"], "--device 'cuda:x' is not a device"),
        (["--model", "{ckpt}", "--seed", "-1"], "--seed -1: sample j of a prompt uses seed + j"),
        (["--model", "{ckpt}", "--seed", str(2**64 - 1)], "must be an integer in [0, 9223372036854775806]"),
        (["--model", "{ckpt}", "--run", "{alone}/state.json"], "run directory '{alone}/state.json' is a file"),
        (["--model", "{ckpt}", "--checkpoint", "{damaged}/checkpoints/step_000001"], "is damaged: "),
        (["--model", "{ckpt}", "--run", "{damaged}"], "no complete checkpoint under checkpoints/ that verifies"),
    ],
)
def test_user_errors_are_one_paragraph(tmp_path, capsys, tiny_ckpt, trained_run, argv, expected):
    alone = tmp_path / "alone"  # a checkpoint folder outside any run directory: no config.yaml next to it
    shutil.copytree(latest_checkpoint(trained_run / "checkpoints"), alone)
    damaged = tmp_path / "damaged"  # the run with its only checkpoint's tensors truncated
    shutil.copytree(trained_run, damaged)
    with open(latest_checkpoint(damaged / "checkpoints") / "tensors.safetensors", "r+b") as f:
        f.truncate(1000)
    fmt = dict(tmp=tmp_path, ckpt=tiny_ckpt, alone=alone, damaged=damaged)
    argv = [a.format(**fmt) for a in argv]
    defaults = {"--prompts": ["a red circle"], "--best-of": ["2"], "--reward": ["test_mean_brightness"]}
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, *value]
    code, _, err = run_cli(capsys, *argv, "--out", tmp_path / "out")
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert expected.format(**fmt) in " ".join(err.split())
    assert err.strip().count("\n\n") == 0
    assert not (tmp_path / "out" / "scores.json").exists()


def test_a_video_reward_with_an_image_model_is_refused_before_any_drawing(tmp_path, capsys, tiny_ckpt, monkeypatch):
    """`--reward motion` on an image model failed on the first prompt's samples, once they were drawn."""
    drawn = []
    monkeypatch.setattr(DiffusionPolicy, "generate", lambda self, *a, **k: drawn.append(1))
    code, _, err = run_cli(capsys, "--model", tiny_ckpt, "--prompts", "a", "--best-of", "2", "--reward", "motion",
                           "--out", tmp_path / "out")  # fmt: skip
    assert code == 2 and not drawn and not (tmp_path / "out").exists()
    paragraph = " ".join(err[err.index("error: ") :].split())
    assert paragraph.startswith(f"error: --reward motion scores videos, but the model (sd3, {tiny_ckpt}) draws images")


def test_cuda_without_a_gpu_is_a_user_error(tmp_path, capsys, tiny_ckpt):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    code, _, err = run_cli(capsys, "--model", tiny_ckpt, "--prompts", "a", "--best-of", "2", "--reward",
                           "test_mean_brightness", "--device", "cuda", "--out", tmp_path / "out")  # fmt: skip
    assert code == 2 and "--device cuda: torch sees no CUDA GPU" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "out,expected",
    [
        ("{tmp}/file", "--out '{tmp}/file' is a file, not a folder"),
        ("{tmp}/file/sub", "'{tmp}/file' is a file, so no folder can be made there"),
        ("{tmp}/full", "--out folder '{tmp}/full' exists and is not empty (nothing in it is overwritten)"),
        ("{run}", "--out folder '{run}' exists and is not empty"),
        ("{run}/best", "--out '{run}/best' is inside the run directory '{run}'"),
        ("{run}/checkpoints/step_000001/best", "is inside the run directory '{run}'"),
    ],
)
def test_an_out_folder_that_would_overwrite_or_be_deleted_is_refused_before_the_model_loads(
    tmp_path, capsys, tiny_ckpt, trained_run, out, expected, monkeypatch
):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "grid.png").write_text("mine")
    before = sorted(p.relative_to(trained_run) for p in trained_run.rglob("*"))
    monkeypatch.setattr("mmgrpo.train.sample.build_policy", lambda args: pytest.fail("the model loaded"))
    fmt = dict(tmp=tmp_path, run=trained_run)
    code, _, err = run_cli(capsys, "--run", trained_run, "--prompts", "a", "--best-of", "2", "--reward",
                           "test_mean_brightness", "--out", out.format(**fmt))  # fmt: skip
    assert code == 2 and "Traceback" not in err
    assert expected.format(**fmt) in " ".join(err.split())
    assert (tmp_path / "file").read_text() == "mine" and (tmp_path / "full" / "grid.png").read_text() == "mine"
    assert sorted(p.relative_to(trained_run) for p in trained_run.rglob("*")) == before


def test_a_failure_mid_way_leaves_no_out_folder(tmp_path, capsys, tiny_ckpt):
    """The second prompt's reward fails after the first prompt's best image was written: no --out, no parents."""
    calls = []

    @rewards.register("test_fails_on_second_prompt")
    def fails():
        def fn(samples, prompts, meta, ctx):
            calls.append(prompts[0])
            if len(calls) > 1:
                raise UserError("the test reward fails on the second prompt")
            return torch.full((len(prompts),), 0.5)

        return fn

    out = tmp_path / "new" / "out"
    code, _, err = run_cli(capsys, "--model", tiny_ckpt, "--prompts", "a", "b", "--best-of", "2", "--steps", "2",
                           "--reward", "test_fails_on_second_prompt", "--device", "cpu", "--out", out)  # fmt: skip
    assert code == 2 and "fails on the second prompt" in err and calls == ["a", "b"]
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []


def test_out_of_memory_names_the_batch_size_and_writes_nothing(tmp_path, capsys, tiny_ckpt, monkeypatch):
    """A device that holds 2 samples a forward (the allocator's failure injected: CPU cannot run out on cue):
    all N at once is one paragraph naming --batch-size, and that batch size then works."""
    real = DiffusionPolicy.generate

    def generate(self, prompts, seeds, **kw):
        if len(prompts) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB. GPU 0 has 79 GiB\nmore")
        return real(self, prompts, seeds, **kw)

    monkeypatch.setattr(DiffusionPolicy, "generate", generate)
    argv = ["--model", tiny_ckpt, "--prompts", "a", "--best-of", "4", "--steps", "2", "--reward",
            "test_mean_brightness", "--device", "cpu", "--out", tmp_path / "out"]  # fmt: skip
    code, _, err = run_cli(capsys, *argv)
    err = " ".join(err.split())
    assert code == 2 and "Traceback" not in err and not (tmp_path / "out").exists()
    assert "out of memory drawing 4 samples in one batch (CUDA out of memory. Tried to allocate 9.00 GiB." in err
    assert "e.g. --batch-size 1" in err and "more" not in err
    code, _, _ = run_cli(capsys, *argv, "--batch-size", "2")
    assert code == 0 and (tmp_path / "out" / "grid.png").is_file()


@rewards.register("test_meta_target")
def _meta_target():
    """|mean brightness - meta['target']|, negated: reads each prompt row's own field; NaN ("does not apply") for
    the second sample of every prompt."""

    def fn(samples, prompts, meta, ctx):
        return [float("nan") if i == 1 else -abs(float(s.mean()) - m["target"]) for i, (s, m) in
                enumerate(zip(samples, meta))]  # fmt: skip

    fn.nan_means_not_applicable = True
    return fn


@rewards.register("test_raises")
def _raises():
    def fn(samples, prompts, meta, ctx):
        raise ValueError("model server unreachable")

    return fn


def test_best_of_n_hands_a_prompt_files_fields_to_the_reward_as_training_does(tmp_path, capsys, tiny_ckpt):
    """A .jsonl prompt's other fields are its meta (the reward's per-prompt target here; they were dropped: a
    KeyError), NaN of a reward declaring nan_means_not_applicable is null, and a reward's exception is one
    paragraph naming it (was a traceback after every sample had been drawn)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle", "target": 0.2}\n{"prompt": "two blue squares", "target": 0.9}\n')
    common = ["--model", tiny_ckpt, "--family", "sd3", "--prompts-file", prompts, "--best-of", 2, "--steps", 2]
    code, _, err = run_cli(capsys, *common, "--reward", "test_meta_target", "--out", tmp_path / "o")
    assert code == 0, err
    records = json.loads((tmp_path / "o" / "scores.json").read_text())["prompts"]
    assert [isinstance(s, float) for r in records for s in r["scores"]] == [True, False] * 2
    assert [r["best_index"] for r in records] == [0, 0] and records[0]["scores"][1] is None
    code, _, err = run_cli(capsys, *common, "--reward", "test_raises", "--out", tmp_path / "e")
    assert (
        code == 2 and "reward 'test_raises' raised ValueError scoring the samples: 'model server unreachable'" in err
    )
    assert not (tmp_path / "e").exists()


def test_best_of_n_takes_one_str_as_one_prompt_and_refuses_no_prompts_or_n_below_1(tmp_path, tiny_ckpt):
    """A str was iterated character by character (12 prompts 'a', ' ', 'r', ...); n=0 failed in range() and no
    prompts in max() after the model had been called."""
    policy, reward = base_policy(tiny_ckpt, steps=1), rewards.get("test_mean_brightness")
    records = best_of_n(policy, reward, "test_mean_brightness", "a red circle", 2, str(tmp_path / "one"))
    assert [r["prompt"] for r in records] == ["a red circle"] and records[0]["seeds"] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["best_0.png", "grid.png"]
    bad = [
        ([], 2, "best_of_n: no prompts; give a list of prompts"),
        (PROMPTS, 0, r"best_of_n: n=0 samples per prompt; give an integer in \[1, 1024\]"),
        (PROMPTS, 10**12, r"n=1000000000000 samples per prompt; give an integer in \[1, 1024\]"),
        (PROMPTS, -1, r"n=-1 samples per prompt"),
        (PROMPTS, 2.0, r"n=2.0 samples per prompt"),
    ]
    for prompts, n, message in bad:
        with pytest.raises(ValueError, match=message):
            best_of_n(policy, reward, "test_mean_brightness", prompts, n, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_a_run_trained_with_xformers_samples_with_sdpa_on_a_machine_without_it(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["policy"]["options"]["attention"] = "xformers"  # as trained on a GPU
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    args = parse_args(
        [
            "--run",
            str(run),
            "--prompts",
            "x",
            "--best-of",
            "1",
            "--reward",
            "jpeg_incompressibility",
            "--out",
            str(tmp_path),
        ]
    )
    with pytest.warns(UserWarning, match="attention=xformers cannot run on cpu here; mmgrpo sample uses sdpa"):
        policy, _, opts = build_policy(args)
    assert opts.attention == "sdpa" and policy.opts.attention == "sdpa"


def test_image_to_video_first_frames_come_from_image_or_the_prompt_file_relative_to_it(tmp_path, monkeypatch):
    """`mmgrpo sample` on an image-to-video run had no way to give a first frame but an undocumented pairs file,
    whose relative paths were read from the working directory (not the file, as the recipe reads them), and its
    errors came after the model had loaded."""
    from mmgrpo.train.sample import collect_prompts, needs_frames

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(data / "frame0.png")
    (data / "pairs.jsonl").write_text('{"prompt": "a red circle", "image": "frame0.png"}\n')
    monkeypatch.chdir(tmp_path)  # not the file's folder
    (got,) = collect_prompts(None, "data/pairs.jsonl")
    assert got == "a red circle" and got.meta["image"] == str(data.resolve() / "frame0.png")
    (tmp_path / "cwd_frame.png").write_bytes((data / "frame0.png").read_bytes())
    (data / "cwd.jsonl").write_text('{"prompt": "x", "image": "cwd_frame.png"}\n')  # found from the working directory
    assert collect_prompts(None, "data/cwd.jsonl")[0].meta["image"] == "cwd_frame.png"  # as before: kept
    with_image = collect_prompts(["a", "b"], None, str(data / "frame0.png"))
    assert [p.meta for p in with_image] == [{"image": str(data / "frame0.png")}] * 2
    with pytest.raises(UserError, match=r"--image: image '.*missing.png' not found"):
        collect_prompts(["a"], None, "missing.png")
    (data / "broken.jsonl").write_text('{"prompt": "x", "image": "nowhere.png"}\n')
    with pytest.raises(UserError, match="prompt file 'data/broken.jsonl'"):
        collect_prompts(None, "data/broken.jsonl")
    with pytest.raises(UserError, match="--image gives the first frame of every --prompts prompt"):
        collect_prompts(None, "data/pairs.jsonl", str(data / "frame0.png"))
    i2v = str(ROOT / "configs" / "wan_i2v_dance.yaml")
    with pytest.raises(UserError, match=r"trains image-to-video: every prompt needs its first frame; give --image"):
        needs_frames(None, None, [i2v], ["a red circle"])
    needs_frames(None, None, [i2v], with_image)  # every prompt has its frame
    needs_frames(None, None, [str(ROOT / "configs" / "shapes_t2i_grpo.yaml")], ["a red circle"])  # text-to-image
