"""DiffusionPolicy over a tiny real SD3 checkpoint: prompt chunks, G2RPO anchors and advantages (the
family-agnostic contract, reference KL and LoRA-only training: test_family_conformance.py, test_family_matrix.py)."""

from pathlib import Path

import pytest
import torch

from mmgrpo.core.types import PromptBatch
from mmgrpo.policies.diffusion import DiffusionPolicy, DiffusionPolicyOptions
from mmgrpo.testing.checks import assert_ratio_one
from mmgrpo.testing.tiny_sd3 import tiny_sd3_adapter
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import Trainer

PROMPTS = ["a red circle", "two blue squares"]


def batch(seeds=(11, 12), step=0):
    return PromptBatch(prompts=list(PROMPTS), seeds=list(seeds), step=step)


def test_g2rpo_rows_share_anchor_then_branch():
    g2rpo = {"name": "singular", "branch_steps": [2], "granularities": [1, 2, 3]}
    opts = DiffusionPolicyOptions(num_steps=5, exploration=g2rpo)
    policy = DiffusionPolicy(tiny_sd3_adapter(), opts)
    r = policy.rollout(batch(), group_size=3)
    lat = r.extras["latents"]  # [N, T+1, ...]
    for g in range(2):
        rows = lat[g * 3 : g * 3 + 3]
        for i in range(3):  # states x_0..x_2 are the shared ODE anchor
            assert torch.equal(rows[0, i], rows[1, i]) and torch.equal(rows[0, i], rows[2, i])
        for i in range(3, 6):  # after the SDE step at k = 2 the branches differ
            assert not torch.allclose(rows[0, i], rows[1, i])
    assert r.train_mask.sum(1).tolist() == [1] * 6 and r.train_mask[:, 2].all()
    assert len(r.variants) == 2 and r.variants[0].shape == r.samples.shape
    assert not torch.allclose(r.variants[0], r.samples)


def test_multi_granularity_advantages_are_summed(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}"], base={
        "pipeline": "bandit", "rewards": [{"name": "bandit_arm_value"}], "trainer": {"group_size": 3,
        "prompts_per_step": 1, "progress": False}})  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "r")
    rollout = trainer.policy.rollout(PromptBatch(prompts=[0], seeds=[1]), 3)
    # V = 2 versions (granularities 1 and 2), R = 1 reward, N = 3 rows
    cols = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 0.0, 3.0]]])
    adv, _, _ = trainer.advantage(cols, rollout, step=0)
    # granularity 1: mean 1/3, unbiased std sqrt(1/3) = 0.57735 -> [1.1547, -0.57735, -0.57735]
    # granularity 2: mean 1, std sqrt(3) = 1.73205 -> [-0.57735, -0.57735, 1.1547]; summed:
    assert torch.allclose(adv, torch.tensor([0.57735, -1.1547, 0.57735]), atol=1e-4)


def test_rollouts_of_prompt_chunks_concatenate_to_the_whole():
    from mmgrpo.core.types import concat_rollouts, select_groups

    policy = DiffusionPolicy(tiny_sd3_adapter(), DiffusionPolicyOptions(num_steps=3))
    whole = policy.rollout(batch(), group_size=2)
    b = batch()
    parts = concat_rollouts([policy.rollout(b.select([0]), 2), policy.rollout(b.select([1]), 2)])
    assert torch.allclose(parts.samples, whole.samples, atol=1e-6)
    assert torch.allclose(parts.extras["cond"]["prompt_embeds"], whole.extras["cond"]["prompt_embeds"])
    assert_ratio_one(policy, parts)
    second = select_groups(whole, [1])
    assert torch.equal(second.extras["cond"]["pooled"], whole.extras["cond"]["pooled"][2:])


def test_placeholder_second_clip_means_no_t5_block_and_matches_diffusers_encode_prompt():
    """The shipped shapes model carries an all-zero text_encoder_2 and text_encoder_3 (diffusers' SD3 pipeline always
    calls two CLIP encoders and requires a T5 one): the adapter recognises them, defaults to 0 T5 tokens, and encodes
    exactly as ``StableDiffusion3Pipeline.encode_prompt(..., max_sequence_length=0)`` without T5 does, and at an
    explicit length as the pipeline with its placeholder T5 does."""
    from diffusers import StableDiffusion3Pipeline

    from mmgrpo.policies.loading import GeneratorPolicyOptions, load_adapter

    path = str(Path(__file__).resolve().parents[2] / "assets" / "shapes_t2i")
    adapter = load_adapter(GeneratorPolicyOptions(family="sd3", path=path))
    assert adapter.placeholder == [False, True, True] and adapter.max_sequence_length == 0
    cond = adapter.encode(["two blue squares", "a red circle"])
    pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    embeds, _, pooled, _ = pipe.encode_prompt(
        ["two blue squares", "a red circle"], None, None, do_classifier_free_guidance=False, max_sequence_length=0
    )
    assert cond["prompt_embeds"].shape == (2, 16, 64) and cond["pooled"].shape == (2, 72)
    assert torch.equal(cond["prompt_embeds"], embeds) and torch.equal(cond["pooled"], pooled)
    assert cond["pooled"][:, 64:].count_nonzero() == 0 and cond["pooled"][:, :64].count_nonzero() > 0
    # an explicit length appends that many zero T5 tokens, as diffusers does
    adapter256 = load_adapter(
        GeneratorPolicyOptions(family="sd3", path=path, adapter_options={"max_sequence_length": 5})
    )
    assert adapter256.encode(["two blue squares"])["prompt_embeds"].shape == (1, 21, 64)
    bare = StableDiffusion3Pipeline.from_pretrained(path)  # the placeholder T5 runs here: its tokens are zeros
    embeds5, _, pooled5, _ = bare.encode_prompt(
        ["two blue squares"], None, None, do_classifier_free_guidance=False, max_sequence_length=5
    )
    assert torch.equal(adapter256.encode(["two blue squares"])["prompt_embeds"], embeds5)


def test_real_second_clip_keeps_the_diffusers_default_and_bad_encoders_are_refused():
    from mmgrpo.core.errors import UserError
    from mmgrpo.policies.models.sd3 import SD3Adapter
    from mmgrpo.testing.tiny_sd3 import tiny_sd3_components

    c = tiny_sd3_components(with_t5=False, with_vae=False)
    encoders = [c["text_encoder"], c["text_encoder_2"], None]
    tokenizers = [c["tokenizer"], c["tokenizer_2"], None]
    adapter = SD3Adapter(c["transformer"], c["scheduler"], encoders, tokenizers)
    assert adapter.placeholder == [False, False, False] and adapter.max_sequence_length == 256
    assert adapter.encode(["a red circle"])["prompt_embeds"].shape == (1, 12 + 256, 32)
    with pytest.raises(UserError, match="max_sequence_length=600: SD3 takes 0..512"):
        SD3Adapter(c["transformer"], c["scheduler"], encoders, tokenizers, max_sequence_length=600)
    with torch.no_grad():
        for p in c["text_encoder"].parameters():
            p.zero_()
    with pytest.raises(UserError, match="text_encoder has all-zero weights"):
        SD3Adapter(c["transformer"], c["scheduler"], encoders, tokenizers)


def test_lora_on_bfloat16_weights_trains_in_fp32_and_keeps_the_ratio_at_one():
    """peft makes an adapter in its base layer's dtype; in bf16 AdamW's small steps round away (in fp16 its second
    moment underflows). The adapter is fp32 (as get_peft_model makes the VLM's), the frozen weights stay bf16, the
    denoiser still returns the weights' dtype, and the recomputed log-prob still equals logp_old."""
    opts = DiffusionPolicyOptions(num_steps=3, lora_rank=2)
    policy = DiffusionPolicy(tiny_sd3_adapter(dtype="bfloat16"), opts)
    trainable = policy.trainable_parameters()
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert {p.dtype for p in policy.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    r = policy.rollout(batch(), group_size=2)
    assert_ratio_one(policy, r, atol=1e-5)
    rows = torch.arange(r.num_rows)
    policy.log_prob(r, rows, r.train_mask.any(0).nonzero().reshape(-1)).logp.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)


def test_moving_an_adapter_to_its_device_keeps_what_its_loader_holds_in_fp32():
    """``from_pretrained(torch_dtype=float16)`` keeps T5's ``wo`` in fp32 (fp16 overflows there); the adapter moves
    such a module to its device without casting it again (the meta device stands in for the GPU)."""
    from transformers import T5EncoderModel

    from mmgrpo.policies.models.sd3 import SD3Adapter
    from mmgrpo.testing.tiny_sd3 import tiny_sd3_components

    c = tiny_sd3_components(0, with_t5=True)
    t5 = c["text_encoder_3"].to(torch.float16)
    t5.encoder.block[0].layer[-1].DenseReluDense.wo.to(torch.float32)  # as transformers loads it in fp16
    enc = [c["text_encoder"].half(), c["text_encoder_2"].half(), t5]
    tok = [c["tokenizer"], c["tokenizer_2"], c["tokenizer_3"]]
    SD3Adapter(c["transformer"], c["scheduler"], enc, tok, c["vae"], device="meta", dtype="float16")
    assert isinstance(t5, T5EncoderModel) and t5.device.type == "meta"
    assert t5.encoder.block[0].layer[-1].DenseReluDense.wo.weight.dtype == torch.float32
    assert c["transformer"].dtype == torch.float16  # built in fp32: cast


def test_xformers_attention_where_it_cannot_run_is_one_paragraph_before_the_weights_load(monkeypatch):
    """policy.options.attention=xformers was diffusers' ModuleNotFoundError traceback, raised after the weights had
    loaded: on a device other than CUDA it names sdpa; on CUDA without xformers, the gpu extra. The recipes check it
    before from_pretrained (load_adapter, with the device they load on); DiffusionPolicy checks its adapter's."""
    from mmgrpo.core.errors import UserError
    from mmgrpo.policies import diffusion_options as diffusion_mod
    from mmgrpo.policies.loading import GeneratorPolicyOptions, load_adapter
    from mmgrpo.testing.checks import record_weight_loads

    shapes = Path(__file__).parents[2] / "assets" / "shapes_t2i"
    opts = GeneratorPolicyOptions(family="sd3", path=str(shapes), attention="xformers")
    loads = record_weight_loads(monkeypatch)
    with pytest.raises(UserError) as e:
        load_adapter(opts, "cpu")
    msg = str(e.value)
    assert msg.startswith("policy.options.attention='xformers'") and "CUDA" in msg
    assert "policy.options.attention=sdpa" in msg and not loads  # refused before any weights
    with pytest.raises(UserError, match="attention=sdpa"):  # a policy built by hand over an adapter on the CPU
        DiffusionPolicy(tiny_sd3_adapter(), DiffusionPolicyOptions(attention="xformers"))
    monkeypatch.setattr(diffusion_mod, "installed", lambda module: module != "xformers")  # CUDA, no xformers
    with pytest.raises(UserError) as e:
        diffusion_mod.check_attention("xformers", "cuda")
    assert str(e.value) == (
        'policy.options.attention=xformers needs xformers, which is not installed: pip install "mmgrpo[gpu]"'
    )
    diffusion_mod.check_attention("sdpa", "cpu")


def test_a_size_the_transformer_cannot_take_is_refused_from_the_config_files_before_any_weights_load(
    tmp_path, monkeypatch
):
    """policy.options.height=100000 on the shipped shapes model was diffusers' ValueError "Height (25000) cannot be
    greater than pos_embed_max_size: 8" from the first forward, after the weights loaded, with exit 1 and a traceback:
    the sizes are checked against transformer/ and vae/ config.json first, and ``__init__`` says the same for an
    adapter built from components (tiny: VAE 2x, patches of 1, pos_embed_max_size 16: at most 32 px, default 16)."""
    from mmgrpo.core.errors import UserError
    from mmgrpo.policies.models.sd3 import SD3Adapter
    from mmgrpo.testing.checks import record_weight_loads
    from mmgrpo.testing.tiny_sd3 import save_tiny_sd3

    ckpt = save_tiny_sd3(tmp_path / "sd3")
    loads = record_weight_loads(monkeypatch)
    for bad, match in [
        ({"height": 40}, r"SD3 height x width 40x16: this checkpoint's transformer places at most 16 patches of 2 px "
                         r"a side \(pos_embed_max_size\), 32 px; .* e.g. 16x16"),
        ({"width": 15}, r"SD3 height x width 16x15 must be positive multiples of 2 \(the VAE's 2x downsampling x the "
                        r"transformer's 1x1 patches\)"),
    ]:  # fmt: skip
        with pytest.raises(UserError, match=match) as before_weights:
            SD3Adapter.from_pretrained(ckpt, max_sequence_length=16, **bad)
        assert loads == [], bad  # refused before any weights loaded
        with pytest.raises(UserError) as from_components:
            tiny_sd3_adapter(**bad)
        assert str(before_weights.value) == str(from_components.value)
    assert SD3Adapter.from_pretrained(ckpt, max_sequence_length=16, height=32, width=24).latent_shape()[1:] == (16, 12)
    assert "SD3Transformer2DModel" in loads
