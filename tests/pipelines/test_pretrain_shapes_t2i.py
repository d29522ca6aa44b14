"""The shipped shapes text-to-image model and the recipe that made it (scripts/pretrain_shapes_t2i.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

from mmgrpo.core.errors import UserError
from mmgrpo.data.shapes import all_prompts, parse_prompt, split_prompts
from mmgrpo.policies.models.sd3 import decode_latents, is_placeholder
from scripts.pretrain_shapes_t2i import (
    LOSS_WEIGHTS,
    PLACEHOLDER_WIDTH,
    PretrainConfig,
    build_models,
    build_tokenizer,
    encode_prompts,
    evaluate,
    flow_matching_loss,
    load_models,
    lr_at,
    parse_args,
    pretrain,
    sample,
    train,
)
from scripts.shapes_scenes import cosine_lr, kind_balanced, num_params, render_batch, train_batch
from scripts.shapes_vae import to_latents

ASSET = Path(__file__).resolve().parents[2] / "assets" / "shapes_t2i"

# a tiny model: 8x8-pixel patches (16 tokens), 1 joint block of width 16, a 2-layer text encoder of width 16
TINY = dict(
    patch_size=8, num_layers=1, num_heads=2, head_dim=8, text_hidden=16, text_layers=2, text_heads=2, text_ffn=32,
    projection_dim=8, steps=3, batch_size=4, warmup=1, eval_num_steps=2, eval_samples_per_prompt=1, threads=1,
)  # fmt: skip


@pytest.fixture(scope="module")
def shipped():
    if not (ASSET / "model_index.json").is_file():
        pytest.fail(f"the shipped asset {ASSET} is missing; run python -m scripts.pretrain_shapes_t2i --out {ASSET}")
    return load_models(ASSET)


def _tiny_models():
    torch.manual_seed(0)
    return build_models(PretrainConfig(**TINY))


def test_pretrain_tiny_writes_a_folder_that_loads_back_and_samples_the_same(tmp_path):
    torch.manual_seed(0)
    summary, (tr, te, tok, sch, vae) = pretrain(
        PretrainConfig(**TINY), tmp_path / "m", progress=False, log=lambda s: 0
    )
    assert vae is None  # vae_steps 0: pixel space
    out = tmp_path / "m"
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert {k for k, v in index.items() if not k.startswith("_") and v[0] is not None} == {
        "transformer",
        "text_encoder",
        "text_encoder_2",  # the all-zero placeholders that diffusers' SD3 pipeline needs
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
        "scheduler",
    }
    te2 = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder_2")
    assert is_placeholder(te2) and not is_placeholder(te)
    te3 = T5EncoderModel.from_pretrained(out / "text_encoder_3")
    assert is_placeholder(te3) and te3.config.d_model == tr.config.joint_attention_dim
    ids = AutoTokenizer.from_pretrained(out / "tokenizer_3")(["two green triangles"], return_tensors="pt").input_ids
    assert te3(ids)[0].shape == (1, ids.shape[1], te3.config.d_model) and te3(ids)[0].count_nonzero() == 0
    stored = SD3Transformer2DModel.from_pretrained(out / "transformer")
    assert stored.config.pooled_projection_dim == te.config.projection_dim + PLACEHOLDER_WIDTH
    w = stored.time_text_embed.text_embedder.linear_1.weight.detach()
    assert w[:, te.config.projection_dim :].count_nonzero() == 0  # the placeholder's columns are zero
    assert torch.equal(w[:, : te.config.projection_dim], tr.time_text_embed.text_embedder.linear_1.weight)
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # safetensors only
    assert (out / "samples.png").is_file() and "shapes =" in (out / "README.md").read_text()
    assert summary["heldout"]["num_images"] == len(split_prompts()[1])  # 1 sample per held-out prompt
    assert 0.0 <= summary["heldout"]["shapes"] <= 1.0

    tr2, te2, tok2, sch2, _ = load_models(out)  # the placeholder stripped again
    assert tok2.model_max_length == 16 and sch2.config.shift == sch.config.shift
    prompts = ["a red circle left of a blue square", "two green triangles"]
    a = sample(tr, te, tok, prompts, [3, 4], num_steps=3, scheduler=sch)
    b = sample(tr2, te2, tok2, prompts, [3, 4], num_steps=3, scheduler=sch2)
    assert a.shape == (2, 3, 32, 32)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # and the trained weights are not the fresh init: 3 steps moved them
    fresh = _tiny_models()[0]
    assert not torch.equal(fresh.proj_out.weight, tr2.proj_out.weight)


def test_latent_pretraining_writes_a_vae_folder_that_the_policy_samples_identically(tmp_path):
    from mmgrpo.policies.diffusion import DiffusionPolicy
    from mmgrpo.policies.loading import GeneratorPolicyOptions, load_adapter

    latent = dict(vae_steps=3, vae_width=8, vae_batch_size=4, patch_size=2)  # 32 px -> 8x8x4 latents, 16 tokens
    torch.manual_seed(0)
    summary, (tr, te, tok, sch, vae) = pretrain(
        PretrainConfig(**{**TINY, **latent}), tmp_path / "m", progress=False, log=lambda s: 0
    )
    out = tmp_path / "m"
    assert json.loads((out / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file() and "LATENT space" in (
        out / "README.md"
    ).read_text()
    assert tr.config.in_channels == 4 and tr.config.sample_size == 8
    assert summary["params"]["vae"] == num_params(vae) == sum(p.numel() for p in vae.parameters())
    assert 0.0 <= summary["vae"]["heldout_recon_shapes"] <= 1.0 and summary["history"][0]["vae"] == summary["vae"]
    # normalisation: posterior samples of train scenes map to ~mean 0, std 1 (measured on 256 of them)
    x = render_batch(split_prompts()[0][:256], 32, np.random.default_rng(0))
    with torch.no_grad():
        z = to_latents(vae, x, torch.Generator().manual_seed(0))
    assert abs(z.mean().item()) < 0.2 and 0.8 < z.std().item() < 1.25
    # decode_latents = what the SD3 adapter's decode does with the saved scaling / shift factors
    opts = GeneratorPolicyOptions(family="sd3", path=str(out), num_steps=3)
    policy = DiffusionPolicy(load_adapter(opts), opts)
    assert policy.adapter.latent_shape() == (4, 8, 8)
    torch.testing.assert_close(policy.adapter.decode(z[:2]), decode_latents(vae, z[:2]), rtol=0, atol=1e-5)
    # the RL policy's ODE sample of a (prompt, seed) is the recipe's: same noise, schedule, transformer and decoder
    prompts = ["a red circle left of a blue square", "two green triangles"]
    torch.testing.assert_close(
        policy.generate(prompts, [3, 4]), sample(tr, te, tok, prompts, [3, 4], 3, scheduler=sch, vae=vae), rtol=0,
        atol=1e-5,
    )  # fmt: skip
    assert load_models(out)[4].config.scaling_factor == pytest.approx(vae.config.scaling_factor)


def test_training_is_deterministic_given_the_seed():
    # the third run also evaluates at step 2 (--eval-every): evaluation must not disturb the training streams
    cfgs = [dict(seed=5), dict(seed=6), dict(seed=5, eval_every=2)]
    runs = [train(PretrainConfig(**TINY, **c), progress=False, log=lambda s: 0) for c in cfgs]
    w = [r[0].proj_out.weight for r in runs]
    assert not torch.equal(w[0], w[1]) and torch.equal(w[0], w[2])
    assert runs[2][5][0]["step"] == 2 and "shapes" in runs[2][5][0]  # the history row of that evaluation


def test_untrained_model_predicts_zero_velocity_so_the_loss_is_the_target_norm():
    tr, te, tok, _ = _tiny_models()
    x0 = torch.zeros(2, 3, 32, 32)
    noise = torch.ones(2, 3, 32, 32)
    embeds, pooled = encode_prompts(te, tok, ["a red circle", ""])
    # adaLN-Zero init: v = 0, target v = noise - x0 = 1 everywhere -> mean (0 - 1)^2 = 1
    loss = flow_matching_loss(tr, x0, noise, torch.tensor([0.3, 0.9]), embeds, pooled)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    # x0 weighting: per-row losses [1, 1] weighted by sigma^2 = [0.09, 0.81] -> mean 0.45
    sigma = torch.tensor([0.3, 0.9])
    weighted = flow_matching_loss(tr, x0, noise, sigma, embeds, pooled, LOSS_WEIGHTS["x0"](sigma))
    assert weighted.item() == pytest.approx(0.45, abs=1e-6)
    # v = 0 -> the Euler ODE never moves: the sample is the seed's noise mapped by (x + 1) / 2, clamped
    img = sample(tr, te, tok, ["a red circle"], [7], num_steps=4)
    noise7 = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(img[0], ((noise7 + 1) / 2).clamp(0, 1))


def test_conventions_of_encoding_and_pooling():
    _, te, tok, _ = _tiny_models()
    ids = tok(["a red circle"], padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids[0]
    # [BOS] a red circle [EOS] [PAD] ... : ids 2, words, 3, then 0 up to 16
    assert len(ids) == 16 and ids[0] == 2 and ids[4] == 3 and set(ids[5:]) == {0}
    assert te.config.eos_token_id == 3  # not the legacy 2, so CLIP pools at the first [EOS] (position 4)
    embeds, pooled = encode_prompts(te, tok, ["a red circle"])
    assert embeds.shape == (1, 16, 16) and pooled.shape == (1, 8)


def test_sampling_is_batch_independent_and_guidance_zero_is_the_empty_prompt():
    torch.manual_seed(0)
    tr, te, tok, sch = build_models(PretrainConfig(**TINY))
    for p in tr.parameters():  # leave the zero init, so prompts matter
        p.data.add_(0.05 * torch.randn_like(p))
    prompts = ["a red circle", "a blue square on the left"]
    both = sample(tr, te, tok, prompts, [1, 2], num_steps=3)
    one = sample(tr, te, tok, prompts[1:], [2], num_steps=3)
    torch.testing.assert_close(both[1:], one, rtol=0, atol=1e-5)
    assert (both[0] - sample(tr, te, tok, prompts[:1], [9], num_steps=3)[0]).abs().max() > 1e-3  # seeds matter
    uncond = sample(tr, te, tok, ["", ""], [1, 2], num_steps=3)
    torch.testing.assert_close(sample(tr, te, tok, prompts, [1, 2], num_steps=3, guidance=0.0), uncond,
                               rtol=0, atol=1e-5)  # fmt: skip
    assert (both - uncond).abs().max() > 1e-3  # the prompt changes the sample


def test_cosine_lr_matches_hand_computed_values():
    # lr 1, 10 steps, warmup 2: warmup is lr * (step + 1) / warmup, then the cosine runs over steps 2..10,
    # frac = (step - 2) / (10 - 2), lr = lo + (lr - lo) / 2 * (1 + cos(pi * frac)) with lo = lr * final_fraction
    assert cosine_lr(0, 1.0, 10, warmup=2) == pytest.approx(0.5)  # (0 + 1) / 2
    assert cosine_lr(1, 1.0, 10, warmup=2) == pytest.approx(1.0)  # (1 + 1) / 2
    assert cosine_lr(2, 1.0, 10, warmup=2) == pytest.approx(1.0)  # frac 0: (1 + cos 0) / 2 = 1
    assert cosine_lr(6, 1.0, 10, warmup=2) == pytest.approx(0.5)  # frac 4/8: (1 + cos(pi/2)) / 2 = 1/2
    assert cosine_lr(6, 1.0, 10, warmup=2, final_fraction=0.1) == pytest.approx(0.55)  # 0.1 + 0.9 / 2
    assert cosine_lr(10, 1.0, 10, warmup=2) == pytest.approx(0.0, abs=1e-12)  # frac 1: (1 + cos pi) / 2 = 0
    assert cosine_lr(10, 1.0, 10, warmup=2, final_fraction=0.1) == pytest.approx(0.1)  # the end: lo
    # horizon 20: frac = (10 - 2) / (20 - 2) = 4/9, cos(4 pi / 9) = cos(80 deg) = 0.173648;
    # 0.1 + 0.45 * (1 + 0.173648) = 0.1 + 0.528142 = 0.628142
    assert cosine_lr(10, 1.0, 10, warmup=2, final_fraction=0.1, horizon=20) == pytest.approx(0.628142, abs=1e-6)
    assert cosine_lr(0, 2.0, 10) == pytest.approx(2.0)  # no warmup: the cosine starts at lr
    # lr_at is cosine_lr with the config's fields
    c = PretrainConfig(steps=10, lr=1.0, warmup=2, lr_final_fraction=0.1, lr_horizon=20)
    assert [lr_at(s, c) for s in range(12)] == [
        cosine_lr(s, 1.0, 10, warmup=2, final_fraction=0.1, horizon=20) for s in range(12)
    ]


def test_lr_schedule_and_config_errors():
    c = PretrainConfig(steps=101, lr=1e-3, warmup=1, lr_final_fraction=0.1)
    assert lr_at(0, c) == pytest.approx(1e-3)  # warmup 1: (0 + 1) / 1 * lr
    # halfway through the cosine: lo + (lr - lo) / 2 = 1e-4 + 4.5e-4 = 5.5e-4 (frac = (51 - 1) / 100)
    assert lr_at(51, c) == pytest.approx(5.5e-4)
    assert lr_at(101, c) == pytest.approx(1e-4)  # the end: lr * 0.1
    # lr_horizon: a 51-step run on a 101-step cosine stops halfway down it, at 5.5e-4 instead of lr * 0.1
    early = PretrainConfig(steps=51, lr=1e-3, warmup=1, lr_final_fraction=0.1, lr_horizon=101)
    assert lr_at(51, early) == pytest.approx(5.5e-4)
    with pytest.raises(UserError, match="lr_horizon=5 < steps=10"):
        PretrainConfig(steps=10, lr_horizon=5)
    with pytest.raises(UserError, match="patch_size"):
        PretrainConfig(resolution=32, patch_size=5)
    with pytest.raises(UserError, match="penultimate"):
        PretrainConfig(text_layers=1)
    with pytest.raises(UserError, match="logit_normal, uniform"):
        PretrainConfig(sigma_sampling="lognorm")
    with pytest.raises(UserError, match="v, x0"):
        PretrainConfig(loss_weighting="eps")
    with pytest.raises(UserError, match="8 latent cells a side, not a multiple of patch_size=3"):
        PretrainConfig(vae_steps=10, patch_size=3)  # 32 px / vae_downsample 4 = 8 latent cells
    with pytest.raises(UserError, match="power of 2"):
        PretrainConfig(vae_steps=10, vae_downsample=3)
    with pytest.raises(UserError, match="multiple of 8"):
        PretrainConfig(vae_steps=10, vae_width=12)
    assert PretrainConfig(vae_steps=10, patch_size=1).latent_size == 8 and PretrainConfig().latent_size == 32
    cfg, out = parse_args(["--out", "x", "--steps", "7", "--lr", "0.002"])
    assert (cfg.steps, cfg.lr, out) == (7, 0.002, "x")


def test_training_batches_use_only_train_prompts():
    train, heldout = split_prompts()
    captions, x0 = train_batch(train, 64, 32, 0.25, np.random.default_rng(0))
    assert x0.shape == (64, 3, 32, 32) and x0.min() >= -1 and x0.max() <= 1
    assert set(captions) - {""} <= set(train) and not set(captions) & set(heldout)
    assert 4 <= captions.count("") <= 28  # ~25% of 64 = 16 dropped
    # kind-balanced: train has 10 single and 422 relation prompts; each kind gets mass 1/5, so a single prompt
    # has p = 1/(5*10) = 0.02 and a relation prompt 1/(5*422) ~ 0.000474
    probs = kind_balanced(train)
    assert probs[train.index("a red circle")] == pytest.approx(0.02) and probs.sum() == pytest.approx(1.0)
    assert probs[train.index("a red circle left of a red triangle")] == pytest.approx(1 / 2110)
    captions, _ = train_batch(train, 400, 32, 0.0, np.random.default_rng(0), probs)
    assert 40 <= sum(parse_prompt(c).kind == "single" for c in captions) <= 120  # ~20% of 400 = 80, not ~2% = 7


def test_tokenizer_covers_the_grammar():
    tok = build_tokenizer(16)
    enc = tok(all_prompts(), truncation=False).input_ids
    assert max(map(len, enc)) <= 16
    assert all(tok.unk_token_id not in ids for ids in enc)
    assert tok("a purple circle").input_ids[2] == tok.unk_token_id  # words outside the grammar are [UNK]


# ------------------------------------------------------------------------------------ the shipped asset
def test_shipped_asset_matches_the_adapter_conventions(shipped):
    tr, te, tok, sch, vae = shipped
    c = tr.config
    # latent space: the transformer reads the VAE's 8x8x4 latents of a 32-px image
    assert vae is not None and c.in_channels == c.out_channels == vae.config.latent_channels == 4
    assert c.sample_size * 2 ** (len(vae.config.block_out_channels) - 1) == vae.config.sample_size == 32
    assert vae.config.scaling_factor > 0 and (ASSET / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert c.joint_attention_dim == te.config.hidden_size
    assert c.pooled_projection_dim == te.config.projection_dim
    assert c.caption_projection_dim == c.num_attention_heads * c.attention_head_dim
    assert sch.config.num_train_timesteps == 1000
    index = json.loads((ASSET / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert all((ASSET / part).is_dir() for part, v in index.items() if not part.startswith("_") and v[0] is not None)
    size_mb = sum(f.stat().st_size for f in ASSET.rglob("*") if f.is_file()) / 2**20
    assert size_mb < 20
    enc = tok(all_prompts(), truncation=False).input_ids
    assert max(map(len, enc)) <= tok.model_max_length <= te.config.max_position_embeddings
    assert all(tok.unk_token_id not in ids for ids in enc)


def test_shipped_asset_sampling_is_deterministic_and_scores(shipped):
    tr, te, tok, sch, vae = shipped
    _, heldout = split_prompts()
    prompts = [heldout[0], heldout[-1]]
    a = sample(tr, te, tok, prompts, [0, 1], num_steps=10, scheduler=sch, vae=vae)
    b = sample(tr, te, tok, prompts, [0, 1], num_steps=10, scheduler=sch, vae=vae)
    assert a.shape == (2, 3, 32, 32)
    assert torch.equal(a, b) and 0.0 <= a.min() and a.max() <= 1.0
    res = evaluate(tr, te, tok, prompts, num_steps=10, samples_per_prompt=1, scheduler=sch, vae=vae)
    assert res.images.shape == (2, 3, 32, 32) and res.captions == prompts
    assert all(0.0 <= v <= 1.0 for k, v in res.metrics.items() if k.startswith("shapes"))
    assert math.isclose(res.metrics["shapes"], (res.metrics["shapes/" + "single"] + res.metrics["shapes/pair"]) / 2)
