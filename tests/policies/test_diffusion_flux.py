"""DiffusionPolicy over a tiny real FLUX.1 checkpoint: packing, dynamic-shift schedule, ratio = 1, equality with
diffusers' FluxPipeline (distilled guidance, true CFG, schnell), LoRA-only updates, the FLUX configs."""

from pathlib import Path

import pytest
import torch
import yaml

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch
from mmgrpo.policies.diffusion import DiffusionPolicy, DiffusionPolicyOptions
from mmgrpo.policies.models.flux import FluxAdapter, calculate_shift, pack_latents, unpack_latents
from mmgrpo.testing.checks import assert_ratio_one
from mmgrpo.testing.tiny_flux import save_tiny_flux, tiny_flux_adapter, tiny_flux_components
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

PROMPTS = ["a red circle", "two blue squares"]
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def batch(seeds=(11, 12), step=0):
    return PromptBatch(prompts=list(PROMPTS), seeds=list(seeds), step=step)


def test_pack_puts_2x2_patches_in_tokens_and_unpack_inverts():
    x = torch.arange(16.0).view(1, 1, 4, 4)  # C = 1, h = w = 4: rows [0..3], [4..7], [8..11], [12..15]
    packed = pack_latents(x)  # [1, 2*2 tokens, 4*1 channels], token (i, j) = pixels (2i + a, 2j + b)
    expected = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert packed.tolist() == [expected]
    y = torch.randn(3, 4, 6, 8)
    assert torch.equal(unpack_latents(pack_latents(y), 6, 8), y)


def test_schedule_is_dynamically_shifted_by_image_sequence_length():
    a = tiny_flux_adapter()
    assert a.latent_shape() == (4, 8, 8)  # 16 px / VAE x2 = 8; 16 transformer channels / 2x2 packing = 4
    # 16 packed tokens: m = (1.15 - 0.5) / (4096 - 256) = 1.6927e-4; mu = 0.5 + (16 - 256) m = 0.459375
    assert calculate_shift(16) == pytest.approx(0.459375)
    s = a.schedule(3)
    # linspace(1, 1/3, 3) = [1, 2/3, 1/3] -> e^mu / (e^mu + 1/s - 1) with e^mu = 1.583084:
    #   2/3 -> 1.583084 / (1.583084 + 0.5) = 0.759971 ; 1/3 -> 1.583084 / (1.583084 + 2) = 0.441822 ; then 0
    assert torch.allclose(s.sigmas, torch.tensor([1.0, 0.759971, 0.441822, 0.0]), atol=1e-6)
    assert torch.allclose(s.timesteps, 1000 * s.sigmas[:3], atol=1e-3)
    assert torch.allclose(a.timestep_from_sigma(s.sigmas[1]), s.timesteps[1])
    schnell = tiny_flux_adapter(variant="schnell").schedule(3)  # no dynamic shifting, shift 1: plain linspace
    assert torch.allclose(schnell.sigmas, torch.tensor([1.0, 2 / 3, 1 / 3, 0.0]), atol=1e-6)


def test_condition_carries_guidance_per_row_only_for_dev():
    cond = tiny_flux_adapter(guidance=2.5).encode(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, 16, 32) and cond["pooled"].shape == (2, 16)
    assert cond["guidance"].tolist() == [2.5, 2.5] and cond["guidance"].dtype == torch.float32
    assert "guidance" not in tiny_flux_adapter(variant="schnell").encode(PROMPTS)
    assert tiny_flux_adapter().encode_negative(3)["guidance"].shape == (3,)


def test_bad_size_and_path_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="multiple of 4"):
        tiny_flux_adapter(height=18)
    with pytest.raises(UserError, match="not a directory"):
        FluxAdapter.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "transformer").mkdir()
    with pytest.raises(UserError, match="vae/"):
        FluxAdapter.from_pretrained(str(tmp_path))


@pytest.mark.parametrize(
    "opts",
    [
        dict(sde="flow_grpo", exploration="full"),
        dict(sde="dance", noise_level=0.3, exploration="full", timestep_fraction=0.6, shared_init_noise=True),
        dict(sde="cps", exploration="window", window_size=2),
        dict(sde="dance", exploration="singular", branch_steps=[1], granularities=[1, 2, 3]),
        dict(sde="flow_grpo", exploration="full", guidance_scale=3.0, lora_rank=2),  # true CFG
    ],
)
def test_ratio_is_one_after_rollout(opts):
    policy = DiffusionPolicy(tiny_flux_adapter(), DiffusionPolicyOptions(num_steps=4, **opts))
    rollout = policy.rollout(batch(), group_size=3)
    assert rollout.samples.shape == (6, 3, 16, 16)
    assert rollout.extras["latents"].shape == (6, 5, 4, 8, 8)
    assert_ratio_one(policy, rollout)


def test_samples_are_layout_independent():
    policy = DiffusionPolicy(tiny_flux_adapter(), DiffusionPolicyOptions(num_steps=3))
    both = policy.rollout(batch(), group_size=2)
    second = policy.rollout(PromptBatch(prompts=PROMPTS[1:], seeds=[12]), group_size=2)
    assert torch.allclose(both.samples[2:], second.samples, atol=1e-6)


@pytest.mark.parametrize(
    "variant,guidance,true_cfg",
    [("dev", 3.5, 1.0), ("dev", 2.0, 4.0), ("schnell", 0.0, 1.0)],  # distilled guidance, + true CFG, schnell
)
def test_noise_zero_equals_diffusers_pipeline(variant, guidance, true_cfg):
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**tiny_flux_components(variant=variant))
    adapter = tiny_flux_adapter(variant=variant, guidance=guidance)  # same seed -> same weights
    opts = DiffusionPolicyOptions(num_steps=5, noise_level=0.0, guidance_scale=true_cfg)
    out = DiffusionPolicy(adapter, opts).rollout(PromptBatch(prompts=["a red circle"], seeds=[5]), group_size=1)
    x0 = out.extras["latents"][:, 0]  # [1, 4, 8, 8]
    negative = "" if true_cfg > 1 else None  # FluxPipeline's true CFG needs a negative prompt
    kw = dict(prompt="a red circle", num_inference_steps=5, guidance_scale=guidance, height=16, width=16,
              max_sequence_length=16, true_cfg_scale=true_cfg, negative_prompt=negative)  # fmt: skip
    ref = pipe(latents=pack_latents(x0), output_type="latent", **kw).images  # packed [1, 16, 16]
    got = out.extras["latents"][:, -1]
    assert torch.allclose(pack_latents(got), ref, atol=1e-4), (pack_latents(got) - ref).abs().max()
    # the policy's seeded [C, h, w] noise is the noise FluxPipeline draws from the same generator
    images = pipe(generator=torch.Generator().manual_seed(5), output_type="pt", **kw).images
    assert torch.allclose(out.samples, images, atol=1e-4), (out.samples - images).abs().max()


def test_distilled_guidance_value_changes_the_prediction():
    a = tiny_flux_adapter()
    x, t = torch.randn(1, *a.latent_shape()), torch.tensor([500.0])
    cond = a.encode(PROMPTS[:1])
    v1 = a.predict(a.denoiser, x, t, cond)
    v2 = a.predict(a.denoiser, x, t, {**cond, "guidance": cond["guidance"] * 2})
    assert v1.shape == x.shape and not torch.allclose(v1, v2)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "ckpt")


def test_from_pretrained_round_trip(tiny_ckpt):
    loaded = FluxAdapter.from_pretrained(tiny_ckpt, height=16, width=16, guidance=3.0)
    fresh = tiny_flux_adapter(guidance=3.0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([900.0, 300.0])
    with torch.no_grad():
        a = loaded.predict(loaded.denoiser, x, t, loaded.encode(PROMPTS))
        b = fresh.predict(fresh.denoiser, x, t, fresh.encode(PROMPTS))
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(loaded.decode(x), fresh.decode(x), atol=1e-6)


@pytest.mark.parametrize(
    "policy_opts",
    [
        {"sde": "dance", "noise_level": 0.3, "timestep_fraction": 0.6, "shared_init_noise": True},  # full
        {"exploration": "singular", "sde": "dance", "branch_steps": [0, 1], "granularities": [1, 2]},
    ],
)
def test_two_step_training_changes_only_lora(tmp_path, tiny_ckpt, policy_opts):
    cfg = {
        "pipeline": "text_to_image",
        "policy": {
            "options": {
                "family": "flux",
                "path": tiny_ckpt,
                "height": 16,
                "width": 16,
                "num_steps": 3,
                "lora_rank": 2,
                **policy_opts,
            }
        },
        "data": {"options": {"heldout_prompts": "", "prompts": "shapes"}},
        "rewards": [{"name": "jpeg_incompressibility"}],
        "loss": {"options": {"clip_low": 1e-3, "clip_high": 1e-3}},
        "trainer": {"max_steps": 2, "prompts_per_step": 2, "group_size": 3, "lr": 1e-2, "progress": False},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = FluxAdapter.from_pretrained(tiny_ckpt, height=16, width=16).denoiser.state_dict()
    trainer = train(load_config(path, [f"run.output_dir={tmp_path}"]))
    assert trainer.policy.adapter.family == "flux"
    after = trainer.policy.unwrapped().state_dict()
    lora = [k for k in after if "lora" in k]
    assert lora and any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in lora if "lora_B" in k)
    for k, v in before.items():  # every base weight unchanged (peft renames wrapped ones to *.base_layer.*)
        stem, _, leaf = k.rpartition(".")
        key = k if k in after else f"{stem}.base_layer.{leaf}"
        assert torch.equal(after[key], v), k


def test_flux_configs_load():
    dance = load_config(CONFIGS / "flux_dance.yaml")
    po = dance.policy.options
    assert dance.pipeline == "text_to_image" and po["family"] == "flux"
    assert (po["sde"], po["noise_level"], po["timestep_fraction"]) == ("dance", 0.3, 0.6) and po["shared_init_noise"]
    assert {r.name for r in dance.rewards} == {"hpsv2", "clip_score"}
    g2 = load_config(CONFIGS / "flux_g2rpo.yaml")
    assert g2.policy.options["family"] == "flux" and g2.policy.options["exploration"] == "singular"
    assert g2.policy.options["granularities"] == [1, 2, 3]
    for path in (CONFIGS / "flux_dance.yaml", CONFIGS / "flux_g2rpo.yaml"):
        assert path.read_text().startswith(f"# mmgrpo train configs/{path.name}\n")
