"""DiffusionPolicy over a tiny real HunyuanVideo checkpoint: template cropping, ratio = 1, pipeline equality,
layout independence, LoRA-only training through the text_to_video recipe, the shipped config."""

import numpy as np
import pytest
import torch
import yaml

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch
from mmgrpo.policies.diffusion import DiffusionPolicy, DiffusionPolicyOptions
from mmgrpo.policies.models.hunyuan_video import HunyuanVideoAdapter
from mmgrpo.testing.checks import assert_ratio_one
from mmgrpo.testing.tiny_hunyuan_video import (
    TINY_SIZE,
    save_tiny_hunyuan_video,
    tiny_hunyuan_video_adapter,
    tiny_hunyuan_video_components,
)
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

PROMPTS = ["a red circle", "two blue squares"]


def batch(seeds=(11, 12), step=0):
    return PromptBatch(prompts=list(PROMPTS), seeds=list(seeds), step=step)


@pytest.fixture(scope="module")
def adapter():
    return tiny_hunyuan_video_adapter()


def test_condition_crops_the_chat_template(adapter):
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    # the Llama-3-style tiny tokenizer puts the pipeline's 95 tokens before the prompt (BOS + system turn + header)
    assert adapter.crop_start == DEFAULT_PROMPT_TEMPLATE["crop_start"] == 95
    cond = adapter.encode(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, 16, 16) and cond["pooled"].shape == (2, 8)
    # after the crop: "a", " red", " circle", "<|eot_id|>" -> 4 tokens; "two", " blue", " squares", eot -> 4
    assert cond["prompt_attention_mask"].sum(1).tolist() == [4.0, 4.0]
    assert cond["prompt_attention_mask"][:, :4].all()
    # guidance-distilled: embedded scale 6.0 -> model input 6.0 * 1000 per row
    assert cond["guidance"].tolist() == [6000.0, 6000.0]
    neg = adapter.encode_negative(3)
    assert neg["prompt_attention_mask"].sum(1).tolist() == [1.0] * 3  # "" -> just <|eot_id|>


def test_schedule_is_the_shifted_linspace(adapter):
    s = adapter.schedule(4)
    # linspace(1, 0, 5)[:-1] = [1, .75, .5, .25]; shift 7: 7s / (1 + 6s) -> 1, 5.25/5.5, 3.5/4, 1.75/2.5; then 0
    expected = torch.tensor([1.0, 5.25 / 5.5, 0.875, 0.7, 0.0])
    assert torch.allclose(s.sigmas, expected, atol=1e-6)
    assert torch.allclose(s.timesteps, expected[:-1] * 1000, atol=1e-3)
    assert torch.allclose(adapter.timestep_from_sigma(s.sigmas[2]), torch.tensor(875.0))
    assert adapter.latent_shape() == (4, 2, 4, 4)  # 5 frames -> (5-1)//4+1 = 2; 32 px / 8 = 4


@pytest.mark.parametrize(
    "opts",
    [
        dict(sde="flow_grpo", exploration="full"),
        dict(sde="dance", exploration="full", timestep_fraction=0.5, shared_init_noise=True),
        dict(sde="cps", exploration="window", window_size=2),
        dict(sde="flow_grpo", exploration="singular", branch_steps=[1], granularities=[1, 2]),
        dict(sde="flow_grpo", exploration="full", guidance_scale=3.0, lora_rank=2),
    ],
)
def test_ratio_is_one_after_rollout(opts):
    policy = DiffusionPolicy(tiny_hunyuan_video_adapter(), DiffusionPolicyOptions(num_steps=3, **opts))
    rollout = policy.rollout(batch(), group_size=3)
    assert rollout.samples.shape == (6, 5, 3, 32, 32)  # [N, F, 3, H, W]
    assert 0 <= rollout.samples.min() and rollout.samples.max() <= 1
    assert_ratio_one(policy, rollout)


def test_samples_are_layout_independent(adapter):
    policy = DiffusionPolicy(adapter, DiffusionPolicyOptions(num_steps=3))
    both = policy.rollout(batch(), group_size=2)
    second = policy.rollout(PromptBatch(prompts=PROMPTS[1:], seeds=[12]), group_size=2)
    assert torch.allclose(both.samples[2:], second.samples, atol=1e-6)


@pytest.mark.parametrize("true_cfg", [1.0, 4.0])
def test_noise_zero_equals_diffusers_pipeline(true_cfg):
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline(**tiny_hunyuan_video_components())
    adapter = tiny_hunyuan_video_adapter()  # same seed -> same weights
    opts = DiffusionPolicyOptions(num_steps=4, noise_level=0.0, guidance_scale=true_cfg)
    out = DiffusionPolicy(adapter, opts).rollout(PromptBatch(prompts=["a red circle"], seeds=[5]), group_size=1)
    x0 = out.extras["latents"][:, 0]
    ref = pipe(
        prompt="a red circle", negative_prompt="" if true_cfg > 1 else None, true_cfg_scale=true_cfg,
        guidance_scale=6.0, num_inference_steps=4, latents=x0.clone(), output_type="latent",
        max_sequence_length=16, **TINY_SIZE,
    ).frames  # fmt: skip
    err = (out.extras["latents"][:, -1] - ref).abs().max()
    assert err < 1e-4, err
    video = pipe.vae.decode(ref / pipe.vae.config.scaling_factor, return_dict=False)[0]
    video = pipe.video_processor.postprocess_video(video, output_type="pt")  # the pipeline's "pt" output
    assert video.shape == out.samples.shape == (1, 5, 3, 32, 32)
    assert torch.allclose(out.samples, video, atol=1e-4)


def test_bad_sizes_and_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="num_frames=6"):
        tiny_hunyuan_video_adapter(num_frames=6)
    with pytest.raises(UserError, match="height=40"):
        tiny_hunyuan_video_adapter(height=40)
    with pytest.raises(UserError, match="not a directory"):
        HunyuanVideoAdapter.from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="no transformer/ folder"):
        HunyuanVideoAdapter.from_pretrained(str(tmp_path / "half"))


# --------------------------------------------------------------------------- checkpoint, trainer, config
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny_hunyuan_video(tmp_path_factory.mktemp("hunyuan") / "ckpt")


def test_from_pretrained_round_trip(tiny_ckpt, adapter):
    loaded = HunyuanVideoAdapter.from_pretrained(tiny_ckpt, **TINY_SIZE, max_sequence_length=16)
    assert loaded.crop_start == 95
    a, b = adapter.encode(PROMPTS), loaded.encode(PROMPTS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    sd = loaded.denoiser.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in adapter.denoiser.state_dict().items())


@pytest.mark.parametrize(
    "policy_opts, loss",
    [
        ({"reference_kl": True}, {"beta": 0.04}),  # Flow-GRPO with the KL to the LoRA-disabled reference
        ({"exploration": "singular", "branch_steps": [0, 1], "granularities": [1, 2]}, {}),  # G2RPO
    ],
)
def test_two_step_training_changes_only_lora(tmp_path, tiny_ckpt, policy_opts, loss):
    opts = {"family": "hunyuan_video", "path": tiny_ckpt, "num_steps": 3, "lora_rank": 2, **TINY_SIZE}
    cfg = {
        "pipeline": "text_to_video",
        "policy": {"options": {**opts, **policy_opts}},
        "data": {"options": {"heldout_prompts": "", "prompts": "shapes"}},
        "rewards": [{"name": "motion"}],
        "loss": {"options": {"clip_low": 1e-3, "clip_high": 1e-3}, **loss},
        "trainer": {"max_steps": 2, "prompts_per_step": 2, "group_size": 2, "lr": 1e-2, "progress": False},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = HunyuanVideoAdapter.from_pretrained(tiny_ckpt, **TINY_SIZE).denoiser.state_dict()
    trainer = train(load_config(path, [f"run.output_dir={tmp_path}"]))
    after = trainer.policy.unwrapped().state_dict()
    lora = [k for k in after if "lora" in k]
    assert lora and any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in lora if "lora_B" in k)
    for k, v in before.items():  # every base weight unchanged (peft renames wrapped ones to *.base_layer.*)
        stem, _, leaf = k.rpartition(".")
        key = k if k in after else f"{stem}.base_layer.{leaf}"
        assert torch.equal(after[key], v), k


def test_config_loads():
    cfg = load_config("configs/hunyuan_t2v_flow_grpo.yaml")
    assert cfg.pipeline == "text_to_video" and cfg.policy.options["family"] == "hunyuan_video"
    o = cfg.policy.options
    assert (o["num_frames"] - 1) % 4 == 0 and o["height"] % 16 == 0 and o["width"] % 16 == 0
    assert np.isclose(o["noise_level"], 0.7)
