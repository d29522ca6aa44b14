"""DiffusionPolicy over a tiny real HunyuanVideo checkpoint: template cropping, ratio = 1, pipeline equality,
layout independence, the shipped config; LoRA-only training in test_family_matrix.py."""

import numpy as np
import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch
from mmgrpo.policies.models.hunyuan_video import HunyuanVideoAdapter
from mmgrpo.testing.checks import record_weight_loads
from mmgrpo.testing.tiny_hunyuan_video import (
    TINY_SIZE,
    save_tiny_hunyuan_video,
    tiny_hunyuan_video_adapter,
)
from mmgrpo.train.config import load_config

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


def test_a_bad_size_or_fps_is_refused_from_the_config_files_before_any_weights_load(tiny_ckpt, monkeypatch):
    """``from_pretrained`` checks the sizes against vae/config.json before loading the weights (minutes for the
    13B transformer), with ``__init__``'s message; ``__init__`` still checks adapters built from components."""
    loads = record_weight_loads(monkeypatch)
    for bad, match in [
        ({"num_frames": 6}, r"num_frames=6: HunyuanVideo needs 4k\+1 frames"),
        ({"width": 40}, "height=32, width=40: HunyuanVideo needs both divisible by 16"),
        ({"fps": -24}, "HunyuanVideo fps=-24: the frame rate of the written samples must be a positive number"),
    ]:
        with pytest.raises(UserError, match=match) as before_weights:
            HunyuanVideoAdapter.from_pretrained(tiny_ckpt, **{**TINY_SIZE, **bad})
        assert loads == [], bad  # refused before any weights loaded
        with pytest.raises(UserError) as from_components:
            tiny_hunyuan_video_adapter(**bad)
        assert str(before_weights.value) == str(from_components.value)
    loaded = HunyuanVideoAdapter.from_pretrained(tiny_ckpt, **TINY_SIZE, max_sequence_length=16, fps=15)
    assert {"HunyuanVideoTransformer3DModel", "AutoencoderKLHunyuanVideo", "LlamaModel"} <= set(loads)  # seen here
    assert loaded.fps == 15.0 and tiny_hunyuan_video_adapter().fps == 24.0  # the reference inference's rate


def test_config_loads():
    cfg = load_config("configs/hunyuan_t2v_flow_grpo.yaml")
    assert cfg.pipeline == "text_to_video" and cfg.policy.options["family"] == "hunyuan_video"
    o = cfg.policy.options
    assert (o["num_frames"] - 1) % 4 == 0 and o["height"] % 16 == 0 and o["width"] % 16 == 0
    assert np.isclose(o["sde"]["noise_level"], 0.7)


def test_xformers_attention_is_refused_when_the_config_loads():
    """diffusers' xformers processor replaces HunyuanVideo's own attention processors and drops their rotary
    embedding and q/k norms: refused when the config loads (before any model), naming the family and the fix."""
    with pytest.raises(UserError) as e:
        load_config("configs/hunyuan_t2v_flow_grpo.yaml", ["policy.options.attention=xformers"])
    msg = str(e.value)
    assert msg.startswith("policy.options.attention='xformers'") and "hunyuan_video" in msg and "sdpa" in msg
    load_config("configs/sd3_flow_grpo.yaml", ["policy.options.attention=xformers"])  # SD3 has xformers processors
