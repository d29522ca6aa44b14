"""DiffusionPolicy over tiny real SD 1.5 / SDXL checkpoints (DDIM): the DDIM schedule, SDXL conditions, PNDM
loading, user errors, the configs (the family-agnostic contract: test_family_conformance.py, test_family_matrix.py)."""

import json

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch
from mmgrpo.policies.diffusion import DiffusionPolicy, DiffusionPolicyOptions
from mmgrpo.policies.models.sd import SDAdapter
from mmgrpo.testing.tiny_sd import tiny_sd_adapter, tiny_sd_pipeline
from mmgrpo.train.config import load_config

PROMPTS = ["a red circle", "two blue squares"]


def batch(seeds=(11, 12), step=0):
    return PromptBatch(prompts=list(PROMPTS), seeds=list(seeds), step=step)


def opts(**kw):
    return DiffusionPolicyOptions(**({"sde": {"kind": "ddim", "noise_level": 1.0}} | kw))


def test_ddim_schedule_follows_the_scheduler_prev_rule():
    sched = tiny_sd_adapter().schedule(5)
    # leading spacing, ratio 1000 // 5 = 200, steps_offset 1: [0, 200, 400, 600, 800][::-1] + 1
    assert sched.timesteps.tolist() == [801, 601, 401, 201, 1]
    # scaled_linear betas b_i = (sqrt(0.00085) + i (sqrt(0.012) - sqrt(0.00085)) / 999)^2:
    # b_0 = 0.00085, b_1 = (0.0291548 + 0.0000805)^2 = 0.00085470, alpha_bar(1) = 0.99915 * 0.9991453 = 0.9982960
    assert sched.alpha_bars[4].item() == pytest.approx(0.9982960, abs=1e-6)
    # prev of the last step is 1 - 200 < 0 -> final_alpha_cumprod = alpha_bar(0) = 1 - 0.00085 (set_alpha_to_one off)
    assert sched.alpha_bars[5].item() == pytest.approx(0.99915, abs=1e-7)
    assert tiny_sd_adapter(set_alpha_to_one=True).schedule(5).alpha_bars[5].item() == 1.0
    # trailing, T = 4 divides 1000: round(arange(1000, 0, -250)) - 1; 249 - 250 < 0 -> the final alpha-bar
    trailing = tiny_sd_adapter(timestep_spacing="trailing").schedule(4)
    assert trailing.timesteps.tolist() == [999, 749, 499, 249]
    # trailing with T = 3: DDIM steps 999 -> 999 - 333 = 666, the next sampled timestep is 666, then 666 -> 333
    # while the sampler continues at 332: the policy cannot express that and says so
    with pytest.raises(UserError, match="trailing"):
        tiny_sd_adapter(timestep_spacing="trailing").schedule(3)


def test_sdxl_condition_has_pooled_embeds_and_time_ids():
    adapter = tiny_sd_adapter(xl=True)
    cond = adapter.encode(PROMPTS, [{}, {}])
    assert cond["prompt_embeds"].shape == (2, 12, 32)  # two CLIP penultimate states, 16 + 16 wide
    assert cond["text_embeds"].shape == (2, 16)  # pooled projection of text_encoder_2
    assert cond["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2  # original size, crop (0, 0), target size
    neg = adapter.encode_negative(3)  # force_zeros_for_empty_prompt: zero embeddings, same time ids
    assert not neg["prompt_embeds"].any() and not neg["text_embeds"].any()
    assert neg["time_ids"].shape == (3, 6) and neg["time_ids"][0, 0] == 16


def test_user_errors():
    with pytest.raises(UserError, match="sde.kind=ddim"):
        DiffusionPolicy(tiny_sd_adapter(), DiffusionPolicyOptions(sde={"kind": "flow_grpo"}))
    g2rpo = {"name": "singular", "granularities": [1, 2]}
    policy = DiffusionPolicy(tiny_sd_adapter(), opts(num_steps=3, exploration=g2rpo))
    with pytest.raises(UserError, match="flow"):  # G2RPO's coarse continuations need a sigma schedule
        policy.rollout(batch(), group_size=2)
    with pytest.raises(UserError, match="height=17"):
        tiny_sd_adapter(height=17)
    with pytest.raises(UserError, match="clip_sample"):
        from mmgrpo.testing.tiny_sd import tiny_sd_components

        c = tiny_sd_components(clip_sample=True)
        SDAdapter(c["unet"], c["scheduler"], c["text_encoder"], c["tokenizer"], c["vae"])


def test_sd15_layout_with_pndm_scheduler_loads_as_ddim(tmp_path):
    from diffusers import PNDMScheduler

    # SD 1.5 ships a PNDM scheduler config; the adapter reads it into a DDIMScheduler with the same betas
    pipe = tiny_sd_pipeline()
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    pipe.save_pretrained(str(tmp_path / "ckpt"), safe_serialization=True)
    loaded = SDAdapter.from_pretrained(str(tmp_path / "ckpt"))
    assert not loaded.xl and loaded.prediction_type == "epsilon"
    ref = tiny_sd_adapter().schedule(5)
    got = loaded.schedule(5)
    assert torch.equal(got.timesteps, ref.timesteps) and torch.equal(got.alpha_bars, ref.alpha_bars)
    with pytest.raises(UserError, match="no vae/"):
        index = json.loads((tmp_path / "ckpt" / "model_index.json").read_text())
        index["vae"] = [None, None]
        (tmp_path / "ckpt" / "model_index.json").write_text(json.dumps(index))
        SDAdapter.from_pretrained(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("name", ["sd15_ddpo", "sdxl_ddpo"])
def test_configs_load(name):
    cfg = load_config(f"configs/{name}.yaml")
    o = cfg.policy.options
    assert o["family"] == "sd" and o["sde"] == {"kind": "ddim", "noise_level": 1.0} and o["guidance_scale"] == 7.5
    assert cfg.pipeline == "text_to_image"
