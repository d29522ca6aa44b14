"""DiffusionPolicy over tiny real Wan checkpoints (T2V, I2V, Wan 2.2 two experts): ratio = 1, pipeline equality,
first frames from real mp4 files, LoRA-only training through the text_to_video / image_to_video recipes."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mmgrpo.core.errors import UserError
from mmgrpo.core.files import open_video
from mmgrpo.core.types import PromptBatch
from mmgrpo.policies.diffusion import DiffusionPolicy, DiffusionPolicyOptions
from mmgrpo.policies.models.wan import WanAdapter, first_frame, first_frame_mask, flow_scheduler
from mmgrpo.testing.checks import assert_only_lora_changed, record_weight_loads
from mmgrpo.testing.hub import add_snapshot, offline_hub
from mmgrpo.testing.tiny_wan import (
    SIZE,
    euler_on_unipc_grid,
    save_tiny_wan,
    tiny_wan_adapter,
    tiny_wan_components,
)
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

PROMPTS = ["a red circle", "two blue squares"]
VIDEO = (5, 3, 32, 32)  # F, 3, H, W of the tiny checkpoints


def frame(seed: int, size=(40, 48)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(*size, 3) * 255).astype(np.uint8))


def batch(i2v=False, seeds=(11, 12), prompts=PROMPTS, frames=(1, 2)):
    meta = [{"image": frame(s)} for s in frames[: len(prompts)]] if i2v else []
    return PromptBatch(prompts=list(prompts), meta=meta, seeds=list(seeds)[: len(prompts)])


def write_mp4(path, first_color, seed=0):
    """A real 5-frame 32x32 mp4: a flat first frame of ``first_color``, then random frames."""
    import imageio.v2 as imageio

    rng = np.random.RandomState(seed)
    frames = [np.full((32, 32, 3), first_color, np.uint8)] + [rng.randint(0, 255, (32, 32, 3), np.uint8)] * 4
    imageio.mimwrite(path, frames, fps=8, macro_block_size=1)
    return str(path)


def run_pipeline(components, prompt, x0, steps, guidance, **kw):
    """The diffusers Wan pipeline with a flow-matching Euler scheduler of the checkpoint's shift (3.0) on the
    checkpoint's UniPC grid."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    c = {**components, "scheduler": euler_on_unipc_grid(3.0)}
    pipe = (WanImageToVideoPipeline if "image_encoder" in c else WanPipeline)(**c)
    args = dict(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=16, **SIZE)
    latents = pipe(latents=x0.clone(), output_type="latent", **args, **kw).frames
    videos = pipe(latents=x0.clone(), output_type="pt", **args, **kw).frames  # [n, F, 3, H, W] in [0, 1]
    return latents, videos


def test_image_to_video_from_first_frame_of_a_real_mp4(tmp_path):
    red = write_mp4(tmp_path / "red.mp4", (220, 30, 30))
    blue = write_mp4(tmp_path / "blue.mp4", (30, 30, 220))  # same later frames, different first frame
    opts = DiffusionPolicyOptions(num_steps=3, sde={"noise_level": 0.0})
    policy = DiffusionPolicy(tiny_wan_adapter(image_to_video=True), opts)

    def sample(path):
        b = PromptBatch(prompts=["a red circle"], meta=[{"video": path}], seeds=[7])
        return policy.rollout(b, group_size=1)

    out = sample(red)
    first = Image.fromarray(open_video(red, "test").frames([0])[0])
    assert np.abs(np.asarray(first, np.float32) - [220, 30, 30]).mean() < 10  # decoded first frame ~ its colour
    assert np.array_equal(np.asarray(first_frame(red)), np.asarray(first))
    latents, videos = run_pipeline(
        tiny_wan_components(image_to_video=True), "a red circle", out.extras["latents"][:, 0], 3, 1.0, image=first
    )
    assert torch.allclose(out.extras["latents"][:, -1], latents, atol=1e-4)
    assert not torch.allclose(sample(blue).samples, out.samples, atol=1e-3)  # the first frame conditions the sample


def test_first_frame_mask_and_flow_shift():
    m = first_frame_mask(num_frames=9, temporal=4, h=1, w=1)  # 9 frames -> F' = (9 - 1) / 4 + 1 = 3
    # pixel frame 0 is repeated 4 times: [1 1 1 1 | 0 0 0 0 | 0 0 0 0] folded as [F'=3, temporal=4] -> [4, 3]
    assert m.shape == (1, 4, 3, 1, 1)
    assert m[0, :, :, 0, 0].tolist() == [[1, 0, 0]] * 4
    sched = flow_scheduler({"_class_name": "UniPCMultistepScheduler", "flow_shift": 3.0, "num_train_timesteps": 1000})
    sched.set_timesteps(2)
    # sigma_min = shift(0.001) = 3 * 0.001 / (1 + 2 * 0.001) = 0.0029940; the 2-step grid [1, 0.0029940] is
    # shifted: 3 * 0.0029940 / (1 + 2 * 0.0029940) = 0.0089286; then the final 0
    assert torch.allclose(sched.sigmas, torch.tensor([1.0, 0.0089286, 0.0]), atol=1e-6)
    with pytest.raises(UserError, match="neither 'flow_shift' nor 'shift'"):
        flow_scheduler({"_class_name": "UniPCMultistepScheduler"})


def test_schedule_steps_on_the_shipped_unipc_grid():
    """The adapter's Euler steps use the sigmas of the UniPC scheduler the checkpoint ships (WanPipeline's grid),
    not Euler's default grid, whose last step went from ~0.009 to 0 (N steps, N - 1 of them denoising)."""
    from diffusers import UniPCMultistepScheduler

    def unipc(shift, n):
        ref = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
        ref.set_timesteps(n)
        return ref

    adapter = tiny_wan_adapter()  # ships UniPC, flow_shift 3
    # N = 2 by hand: linspace(1, 0.001, 3)[:-1] = [1, 0.5005], shifted 3 * 0.5005 / (1 + 2 * 0.5005) = 0.750375
    assert torch.allclose(adapter.schedule(2).sigmas, torch.tensor([1.0, 0.750375, 0.0]), atol=1e-6)
    for n in (2, 4, 10, 40):
        ref = unipc(3.0, n)
        got = adapter.schedule(n)
        assert torch.allclose(got.sigmas, ref.sigmas.float(), atol=2e-6)  # UniPC moves sigma 1 down by 1e-6
        assert torch.allclose(got.timesteps, ref.timesteps.float(), atol=1.0)  # UniPC's are whole numbers
    # Wan 2.2 A14B: shift 12, boundary 0.875 x 1000; the high-noise expert takes as many of 40 steps as in diffusers
    c = tiny_wan_components(two_experts=True)
    shipped = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=12.0)
    a22 = WanAdapter(c["transformer"], shipped, c["vae"], c["text_encoder"], c["tokenizer"], None, None,
                     c["transformer_2"], 0.875, **SIZE, max_sequence_length=16)  # fmt: skip
    high = int((a22.schedule(40).timesteps >= a22.denoiser.boundary).sum())
    assert high == int((unipc(12.0, 40).timesteps >= 875).sum()) == 26  # Euler's own grid gave 25
    # a checkpoint that ships flow Euler keeps Euler's grid (the pipeline's, with that scheduler)
    from diffusers import FlowMatchEulerDiscreteScheduler

    euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    a_euler = WanAdapter(c["transformer"], euler.config, c["vae"], c["text_encoder"], c["tokenizer"],
                         **SIZE, max_sequence_length=16)  # fmt: skip
    euler.set_timesteps(3)
    assert torch.equal(a_euler.schedule(3).sigmas, euler.sigmas.float())


def test_user_errors_name_the_fix():
    with pytest.raises(UserError, match="num_frames=6: num_frames - 1 must be a multiple of .* 4"):
        tiny_wan_adapter(num_frames=6)
    with pytest.raises(UserError, match="height x width 40x32 must be multiples of 16"):
        tiny_wan_adapter(height=40)
    policy = DiffusionPolicy(tiny_wan_adapter(image_to_video=True), DiffusionPolicyOptions(num_steps=2))
    with pytest.raises(UserError, match=r"no first frame; give meta\['image'\]"):
        policy.rollout(PromptBatch(prompts=["a red circle"], seeds=[1]), group_size=1)


def test_a_bad_size_or_fps_is_refused_from_the_config_files_before_any_weights_load(tmp_path, monkeypatch):
    """``from_pretrained`` checks the sizes against transformer/ and vae/ config.json before loading the weights
    (minutes for a 14B checkpoint), with ``__init__``'s message; ``__init__`` still checks adapters built from
    components."""
    ckpt = save_tiny_wan(tmp_path / "t2v")
    loads = record_weight_loads(monkeypatch)
    for bad, match in [
        ({"num_frames": 6}, "Wan num_frames=6: num_frames - 1 must be a multiple of the VAE's temporal compression 4"),
        ({"height": 40}, "Wan height x width 40x32 must be multiples of 16 and of 16x16"),
        ({"fps": 0}, "Wan fps=0: the frame rate of the written samples must be a positive number"),
    ]:
        with pytest.raises(UserError, match=match) as before_weights:
            WanAdapter.from_pretrained(ckpt, **{**SIZE, **bad})
        assert loads == [], bad  # refused before any weights loaded
        with pytest.raises(UserError) as from_components:
            tiny_wan_adapter(**bad)
        assert str(before_weights.value) == str(from_components.value)
    assert WanAdapter.from_pretrained(ckpt, **SIZE).fps == 16  # the observer does see a load
    assert {"WanTransformer3DModel", "AutoencoderKLWan", "UMT5EncoderModel"} <= set(loads)


def test_a_hub_id_with_a_bad_frame_count_is_refused_before_its_download(tmp_path, monkeypatch):
    """For a hub id the check reads the two config files alone, before DiffusionPipeline.download fetches the
    pipeline (tens of GB for a 14B checkpoint)."""
    from diffusers import DiffusionPipeline

    add_snapshot(tmp_path / "hub", "mmgrpo-test/tiny-wan", save_tiny_wan(tmp_path / "t2v"))
    downloads = []
    download = DiffusionPipeline.__dict__["download"].__func__
    monkeypatch.setattr(DiffusionPipeline, "download",
                        classmethod(lambda cls, *a, **k: downloads.append(a) or download(cls, *a, **k)))  # fmt: skip
    loads = record_weight_loads(monkeypatch)
    with offline_hub(tmp_path / "hub"):
        with pytest.raises(UserError, match="Wan num_frames=6: num_frames - 1 must be a multiple"):
            WanAdapter.from_pretrained("mmgrpo-test/tiny-wan", **{**SIZE, "num_frames": 6})
        assert downloads == [] and loads == []
        assert WanAdapter.from_pretrained("mmgrpo-test/tiny-wan", **SIZE).latent_shape() == (4, 2, 4, 4)
    assert len(downloads) == 1 and loads


def test_mmgrpo_train_with_a_bad_frame_count_says_so_first_and_loads_nothing(tmp_path, monkeypatch, capsys):
    from mmgrpo.train.cli import main

    cfg = {
        "pipeline": "text_to_video",
        "policy": {"options": {"path": save_tiny_wan(tmp_path / "t2v"), "num_steps": 2, **SIZE, "num_frames": 6}},
        "data": {"options": {"prompts": "shapes", "heldout_prompts": ""}},
        "rewards": [{"name": "motion"}],
        "trainer": {"max_steps": 1, "prompts_per_step": 1, "group_size": 2, "progress": False},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    loads = record_weight_loads(monkeypatch)
    capsys.readouterr()  # saving the checkpoint's progress bars
    code = main(["train", str(tmp_path / "c.yaml"), f"run.output_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and loads == [], err
    assert " ".join(err.split()).startswith("error: Wan num_frames=6: num_frames - 1 must be a multiple of the "
                                            "VAE's temporal compression 4 (e.g. 81, 49, 33)")  # fmt: skip
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run directory left


def test_the_frame_rate_is_the_models_unless_the_user_sets_one(tmp_path):
    from mmgrpo import rewards as reward_registry
    from mmgrpo.policies.loading import GeneratorPolicyOptions, load_adapter
    from mmgrpo.train.media import video_fps
    from mmgrpo.train.sample import best_of_n

    assert tiny_wan_adapter().fps == 16 and tiny_wan_adapter(expand_timesteps=True).fps == 24  # Wan 2.2 TI2V-5B
    assert tiny_wan_adapter(fps=30).fps == 30.0
    policy = DiffusionPolicy(tiny_wan_adapter(fps=12), DiffusionPolicyOptions(num_steps=2))
    assert video_fps(policy) == 12
    best_of_n(policy, reward_registry.get("motion"), "motion", ["a red circle"], 2, tmp_path / "best", progress=False)
    assert open_video(tmp_path / "best" / "best_0.mp4", "test").fps == 12  # mmgrpo sample's best_*.mp4 too
    with pytest.raises(UserError, match=r"policy.options.fps=-1: frames per second must be a number >= 0"):
        GeneratorPolicyOptions(family="wan", fps=-1)
    with pytest.raises(UserError, match=r"policy.options.fps=16: family 'sd3' takes no fps .*set it to 0"):
        load_adapter(GeneratorPolicyOptions(family="sd3", path=str(tmp_path), fps=16))


def test_a_plug_in_adapter_taking_the_frame_options_in_from_pretrained_is_not_refused():
    """The options go to the adapter's ``from_pretrained``: a plug-in whose from_pretrained takes num_frames / fps (and
    whose __init__ takes built components) was refused for an image family, its __init__ being read instead."""
    from mmgrpo.policies.loading import GeneratorPolicyOptions, refuse_video_options

    class OwnVideoAdapter:  # a plug-in family's adapter: components in, frame options at loading
        def __init__(self, transformer, vae):
            pass

        @classmethod
        def from_pretrained(cls, path, num_frames=9, fps=12.0, device="cpu", dtype="float32"):
            pass

    class OwnImageAdapter(OwnVideoAdapter):
        @classmethod
        def from_pretrained(cls, path, **kwargs):  # passes its options on to __init__, which takes no frames
            pass

    opts = GeneratorPolicyOptions(family="wan", num_frames=5, fps=8)
    refuse_video_options(OwnVideoAdapter, opts)
    with pytest.raises(UserError, match=r"policy.options.num_frames=5: family 'wan' takes no num_frames"):
        refuse_video_options(OwnImageAdapter, opts)


def test_save_samples_writes_a_readable_mp4(tmp_path):
    from mmgrpo.train.media import save_samples

    videos = torch.zeros(2, 5, 3, 32, 32)  # [n, F, 3, H, W]
    videos[:, :, 0] = torch.linspace(0, 1, 5)[None, :, None, None]  # red ramps up over the frames
    path = save_samples(videos, tmp_path / "step_000001.png", ncol=2, fps=16)
    assert path.suffix == ".mp4" and open_video(path, "test").fps == 16
    frames = open_video(path, "test").frames()
    # 2 videos side by side with 2 px padding: (2 + 32 + 2) x (2 + 2 * (32 + 2)) = 36 x 70, upscaled x4
    # (128 // 32) -> 144 x 280
    assert frames.shape == (5, 144, 280, 3)
    red = [float(frames[f, 72, 72, 0]) for f in range(5)]  # the centre of the first video
    assert red[0] < 20 and red[-1] > 235 and red == sorted(red)


def test_without_imageios_ffmpeg_samples_fall_back_to_a_picture_and_best_of_n_says_what_to_install(
    tmp_path, monkeypatch
):
    """imageio without imageio-ffmpeg falls back to a PyAV writer that refuses macro_block_size (a TypeError at the
    step-0 evaluation): the run saves the first frame instead, and ``mmgrpo sample`` names the extra."""
    import sys

    from mmgrpo.train.media import save_samples
    from mmgrpo.train.sample import save_best

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    assert save_samples(torch.rand(2, 5, 3, 32, 32), tmp_path / "step_000000.png", fps=16).suffix == ".png"
    with pytest.raises(UserError, match=r"writing mp4 videos needs imageio-ffmpeg.*mmgrpo\[video\]"):
        save_best(torch.rand(5, 3, 32, 32), tmp_path / "best", fps=16)


@pytest.mark.parametrize("name", ["wan_t2v_mix", "wan_i2v_dance"])
def test_configs_load(name):
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.policy.options["family"] == "wan"
    assert cfg.pipeline == {"wan_t2v_mix": "text_to_video", "wan_i2v_dance": "image_to_video"}[name]


def test_read_pairs_formats_and_errors(tmp_path):
    from mmgrpo.pipelines.image_to_video import read_pairs

    frame(1).save(tmp_path / "a.png")
    write_mp4(tmp_path / "b.mp4", (0, 200, 0))
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat", "image": "a.png"}\n{"video": "b.mp4"}\n')
    rows = read_pairs(str(tmp_path / "p.jsonl"), default_prompt="a dog")
    assert rows == ["a cat", "a dog"] and rows[0].meta == {"image": str(tmp_path / "a.png")}
    (tmp_path / "p.csv").write_text("prompt,image,video\na cat,,b.mp4\n")
    assert read_pairs(str(tmp_path / "p.csv"))[0].meta == {"video": str(tmp_path / "b.mp4")}
    folder = read_pairs(str(tmp_path), default_prompt="a dog")
    assert folder == ["a dog"] and folder[0].meta == {"video": str(tmp_path / "b.mp4")}
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "image": "missing.png"}))
    with pytest.raises(UserError, match="bad.jsonl' line 1: image '.*missing.png' not found"):
        read_pairs(str(tmp_path / "bad.jsonl"))
    (tmp_path / "both.jsonl").write_text(json.dumps({"image": "a.png", "video": "b.mp4"}))
    with pytest.raises(UserError, match="exactly one of 'image' or 'video'"):
        read_pairs(str(tmp_path / "both.jsonl"))


def run_recipe(tmp_path, pipeline, ckpt, data, policy_opts, **trainer):
    tmp_path.mkdir(exist_ok=True)
    cfg = {
        "pipeline": pipeline,
        "policy": {"options": {"path": ckpt, "num_steps": 3, "lora_rank": 2, **SIZE, **policy_opts}},
        "data": {"options": data},
        "rewards": [{"name": "motion"}],
        "loss": {"options": {"clip_low": 1e-3, "clip_high": 1e-3}},
        "trainer": {"max_steps": 2, "prompts_per_step": 2, "group_size": 2, "lr": 1e-2, "progress": False,
                    "sample_every": 1, **trainer},
    }  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return train(load_config(path, [f"run.output_dir={tmp_path}"]))


def test_out_of_memory_in_a_video_run_names_the_video_size(tmp_path, monkeypatch, capsys):
    """A video's activations grow with its frames and pixels; the paragraph named only the micro-batch, the rollout
    chunks, checkpointing and precision (the video walkthrough of 2026-12-07: HunyuanVideo at height 100000)."""
    from mmgrpo.train.cli import main
    from mmgrpo.train.trainer import Trainer

    def update(self, *args):  # the allocator's failure, injected (CPU cannot run out on cue)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB.")

    monkeypatch.setattr(Trainer, "update", update)
    cfg = {
        "pipeline": "text_to_video",
        "policy": {"options": {"path": save_tiny_wan(tmp_path / "t2v"), "num_steps": 2, **SIZE}},
        "data": {"options": {"prompts": "shapes", "heldout_prompts": ""}},
        "rewards": [{"name": "motion"}],
        "trainer": {"max_steps": 1, "prompts_per_step": 1, "group_size": 2, "progress": False, "eval_every": 0},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "c.yaml"), f"run.output_dir={tmp_path / 'runs'}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    size = f"now {SIZE['num_frames']} frames of {SIZE['width']}x{SIZE['height']}"
    assert f"shorter or smaller videos: policy.options.num_frames / height / width ({size})" in err, err


def test_text_to_video_training_changes_only_lora(tmp_path):
    from mmgrpo.policies.models.wan import WanAdapter

    ckpt = save_tiny_wan(tmp_path / "t2v")
    # the pipeline's default (the sizes: the tiny rotary embedding takes at most 512 px, not the default 832)
    assert WanAdapter.from_pretrained(ckpt, **SIZE).max_sequence_length == 512
    before = WanAdapter.from_pretrained(ckpt, **SIZE).denoiser.state_dict()
    data = {"prompts": "shapes", "heldout_prompts": ""}
    trainer = run_recipe(tmp_path, "text_to_video", ckpt, data, {"exploration": {"name": "window", "size": 2}})
    assert_only_lora_changed(before, trainer.policy.unwrapped())
    mp4 = open_video(trainer.run_dir / "samples" / "train_step_000001.mp4", "test")  # videos are logged as mp4
    assert len(mp4) == 5 and mp4.fps == 16  # at the rate Wan makes them, not a fixed 8 fps (a clip twice as long)
    check_the_checkpoints_sampling_grid(trainer)
    (tmp_path / "clips").mkdir()
    write_mp4(tmp_path / "clips" / "c.mp4", (0, 200, 0))  # valid data: the data is read before the checkpoint
    with pytest.raises(UserError, match="is not an image-to-video checkpoint; use pipeline text_to_video"):
        run_recipe(
            tmp_path / "x", "image_to_video", ckpt, {"pairs": str(tmp_path / "clips"), "default_prompt": "a"}, {}
        )


def check_the_checkpoints_sampling_grid(trainer):
    """A checkpoint keeps the grid its run sampled on, and a resume on another grid (this mmgrpo stepping otherwise
    than the one that wrote it, as Wan's moved to the UniPC flow sigmas on 2026-12-07) is refused, naming both grids,
    unless resume_force; a checkpoint keeping none (written before) resumes a Wan run with a warning."""
    from mmgrpo.train import checkpoint as ckpt
    from mmgrpo.train.trainer_state import check_sampling_grid

    path = ckpt.latest_checkpoint(trainer.run_dir / "checkpoints")
    saved = ckpt.load_checkpoint(path)["sampling_grid"]
    sigmas = [1.0, 0.9, 0.75, 0.0]  # by hand: num_steps 3 on UniPC's flow sigmas, shift 3: 3s / (1 + 2s)
    expected = [1.0] + [3 * s / (1 + 2 * s) for s in np.linspace(1, 0.001, 4)[1:-1]] + [0.0]
    assert np.allclose(saved["levels"], expected, atol=1e-6) and len(saved["timesteps"]) == 3
    check_sampling_grid(trainer, saved, path)  # the same grid: nothing to say
    old = {**saved, "levels": sigmas}
    with pytest.raises(
        UserError, match=r"num_steps=3 on another grid .*then \[\.\.\., 0\.9, 0\.75, 0\], now \[\.\.\., 0\.8"
    ):
        check_sampling_grid(trainer, old, path)
    with pytest.warns(UserWarning, match="keeps no sampling grid .* continues on UniPC's flow sigmas"):
        check_sampling_grid(trainer, None, path)
    trainer.cfg.resume_force = True
    check_sampling_grid(trainer, old, path)
    trainer.cfg.resume_force = False


def test_image_to_video_training_from_mp4_folder_changes_only_lora(tmp_path):
    from mmgrpo.policies.models.wan import WanAdapter

    ckpt = save_tiny_wan(tmp_path / "i2v", image_to_video=True)
    videos = tmp_path / "videos"
    videos.mkdir()
    for i, color in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        write_mp4(videos / f"clip{i}.mp4", color, seed=i)
    before = WanAdapter.from_pretrained(ckpt, **SIZE).denoiser.state_dict()
    data = {"pairs": str(videos), "heldout_pairs": str(videos), "default_prompt": "a red circle",
            "eval_max_prompts": 1, "eval_samples_per_prompt": 1}  # fmt: skip
    opts = {
        "sde": {"kind": "dance"},
        "exploration": {"name": "full", "timestep_fraction": 0.6},
        "shared_init_noise": True,
        "guidance_scale": 2.0,
        "fps": 12,  # the user's frame rate for the written samples
    }
    trainer = run_recipe(tmp_path, "image_to_video", ckpt, data, opts, eval_every=2)
    assert_only_lora_changed(before, trainer.policy.unwrapped())
    epoch = trainer.comp.prompts.get([0, 1, 2])  # one pass over the folder, shuffled; each frame in meta
    assert sorted(m["video"] for m in epoch.meta) == sorted(str(p) for p in videos.iterdir())
    # the held-out evaluation, conditioned by frames, and the training samples play at policy.options.fps
    for name in ("step_000002.mp4", "train_step_000001.mp4"):
        assert open_video(trainer.run_dir / "samples" / name, "test").fps == 12


def test_the_image_to_video_evaluation_hands_each_rows_first_frame_to_the_reward(tmp_path):
    """A reward comparing a video with its first frame (meta['video'] / meta['image']) gets it at evaluation as it
    does in training (the evaluation passed empty meta: such a reward failed at the step-0 evaluation)."""
    from mmgrpo.pipelines.image_to_video import FrameDataOptions, read_pairs
    from mmgrpo.pipelines.text_to_image import make_evaluator

    clips = tmp_path / "clips"
    clips.mkdir()
    paths = [write_mp4(clips / f"c{i}.mp4", color, seed=i) for i, color in enumerate([(200, 0, 0), (0, 0, 200)])]
    seen = []

    def reward(samples, prompts, meta, ctx):
        seen.extend(m.get("video") for m in meta)
        return [float(s.mean()) for s in samples]

    data = FrameDataOptions(pairs=str(clips), heldout_pairs=str(clips), default_prompt="a", eval_samples_per_prompt=1)
    evaluate = make_evaluator(read_pairs(str(clips), "a"), data, reward, "frames", 0)
    policy = DiffusionPolicy(tiny_wan_adapter(image_to_video=True), DiffusionPolicyOptions(num_steps=2))
    result = evaluate(policy, 0)
    assert sorted(seen) == sorted(str(p) for p in paths) and math.isfinite(result.metrics["frames"])
