"""DiffusionPolicy over a tiny real FLUX.1 checkpoint: packing, dynamic-shift schedule, ratio = 1, equality with
diffusers' FluxPipeline (distilled guidance, true CFG, schnell), the FLUX configs; LoRA-only training in
test_family_matrix.py."""

from pathlib import Path

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch
from mmgrpo.policies.models.flux import FluxAdapter, calculate_shift, pack_latents, unpack_latents
from mmgrpo.testing.tiny_flux import save_tiny_flux, tiny_flux_adapter
from mmgrpo.train.config import load_config

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


def test_flux_configs_load():
    dance = load_config(CONFIGS / "flux_dance.yaml")
    po = dance.policy.options
    assert dance.pipeline == "text_to_image" and po["family"] == "flux"
    assert po["sde"] == {"kind": "dance", "noise_level": 0.3} and po["shared_init_noise"]
    assert po["exploration"] == {"name": "full", "timestep_fraction": 0.6, "selection": "random_per_row"}
    assert {r.name for r in dance.rewards} == {"hpsv2", "clip_score"}
    g2 = load_config(CONFIGS / "flux_g2rpo.yaml")
    assert g2.policy.options["family"] == "flux" and g2.policy.options["exploration"]["name"] == "singular"
    assert g2.policy.options["exploration"]["granularities"] == [1, 2, 3]
    for path in (CONFIGS / "flux_dance.yaml", CONFIGS / "flux_g2rpo.yaml"):
        assert path.read_text().startswith(f"# mmgrpo train configs/{path.name}\n")
