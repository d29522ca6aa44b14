"""The VLM reasoner on tiny REAL Qwen2-VL / Qwen2.5-VL models: ratio invariant, vision reuse, token suppression,
chunked log-softmax, LoRA / full fine-tuning through the trainer, video prompts, from_pretrained."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch
from mmgrpo.policies.vlm import (
    BOX_TOKENS,
    VISION_TOKENS,
    VLMPolicy,
    VLMPolicyOptions,
    chunked_token_logprobs,
    read_video,
    sample_tokens,
)
from mmgrpo.rewards.registry import REWARDS, register
from mmgrpo.testing.tiny_vlm import save_tiny, tiny_qwen2_5_vl, tiny_qwen2_vl
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

BUILDERS = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}


def images(seed=0):
    rng = np.random.default_rng(seed)  # two prompts with different image sizes -> different prompt lengths
    return [(rng.random((64, 64, 3)) * 255).astype(np.uint8), (rng.random((60, 100, 3)) * 255).astype(np.uint8)]


def image_batch(seeds=(11, 12)):
    a, b = images()
    return PromptBatch(
        prompts=["How many red circles are there?", {"question": "Which shape is blue?", "options": ["a", "b"]}],
        meta=[{"images": [a], "answer": "A"}, {"images": [b], "answer": "B"}],
        seeds=list(seeds),
    )


def make_policy(family="qwen2_vl", reference=False, **options):
    torch.manual_seed(0)
    model, processor = BUILDERS[family]()
    return VLMPolicy(model, processor, VLMPolicyOptions(**{"max_new_tokens": 10, **options}), reference=reference)


def ratio_error(policy, rollout, micro):
    worst = 0.0
    for lo in range(0, rollout.num_rows, micro):
        rows = torch.arange(lo, min(lo + micro, rollout.num_rows))
        units = rollout.train_mask[rows].any(0).nonzero().reshape(-1)
        lp = policy.log_prob(rollout, rows, units).logp
        ratio = torch.exp(lp - rollout.logp_old[rows][:, units])
        worst = max(worst, (ratio - 1).abs().masked_select(rollout.train_mask[rows][:, units]).max().item())
    return worst


# --------------------------------------------------------------------------------------------- ratio invariant


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_ratio_is_one_right_after_rollout_for_micro_batch_1_and_G(family):
    policy = make_policy(family)
    G = 4
    rollout = policy.rollout(image_batch(), G)
    assert rollout.logp_old.shape == rollout.train_mask.shape == (8, 10)  # [N, K], K = max_new_tokens
    assert rollout.logp_old.dtype == torch.float32 and torch.isfinite(rollout.logp_old).all()
    assert len(rollout.samples) == 8 and all(isinstance(s, str) for s in rollout.samples)
    lengths = rollout.extras["completion_len"]
    assert torch.equal(rollout.train_mask.sum(1), lengths.cpu())  # completion tokens incl. EOS, no padding
    # rows of one prompt share one prompt object (processor output, pixel values) by reference
    assert rollout.extras["prompt"][0] is rollout.extras["prompt"][G - 1]
    assert rollout.extras["prompt"][0] is not rollout.extras["prompt"][G]
    for micro in (1, G):
        assert ratio_error(policy, rollout, micro) < 1e-5, micro
    # rows of different prompts mixed in one micro-batch, in a shuffled order
    rows = torch.tensor([5, 0, 7, 2])
    lp = policy.log_prob(rollout, rows).logp  # all K units
    m = rollout.train_mask[rows]
    assert (lp - rollout.logp_old[rows]).abs().masked_select(m).max() < 1e-5


def hf_reference_logprobs(policy, rollout, row):
    """Token log-probs of one row by the transformers model's OWN forward (its get_rope_index, its vision scatter)."""
    prompt = rollout.extras["prompt"][row]
    n = int(rollout.extras["completion_len"][row])
    comp = rollout.extras["completion_ids"][row, :n]
    ids = torch.cat([prompt.input_ids, comp])[None]  # [1, Lp + n]
    types = torch.cat([prompt.mm_token_type_ids, torch.zeros_like(comp)])[None]
    with torch.no_grad():
        logits = policy.model.hf(input_ids=ids, mm_token_type_ids=types, **prompt.vision).logits[0].float()
    Lp = prompt.input_ids.shape[0]
    logits = logits[Lp - 1 : Lp - 1 + n].masked_fill(policy.model.suppress, -math.inf)  # [n, V]
    return torch.log_softmax(logits, -1).gather(-1, comp[:, None]).squeeze(-1)  # [n]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_scorer_matches_the_models_own_forward(family):
    """Our per-prompt forward (features scattered once, explicit M-RoPE positions) equals transformers' forward."""
    policy = make_policy(family)
    rollout = policy.rollout(image_batch(), 2)
    for row in range(rollout.num_rows):
        n = int(rollout.extras["completion_len"][row])
        assert torch.allclose(rollout.logp_old[row, :n], hf_reference_logprobs(policy, rollout, row), atol=1e-5)


def test_samples_depend_only_on_the_prompt_seed():
    policy = make_policy()
    full = policy.rollout(image_batch(seeds=(11, 12)), 3)
    alone = policy.rollout(image_batch(seeds=(11, 12)).select([1]), 3)  # prompt 1 alone, still with seed 12
    assert alone.samples == full.samples[3:]
    again = policy.rollout(image_batch(seeds=(11, 99)), 3)
    assert again.samples[:3] == full.samples[:3] and again.samples[3:] != full.samples[3:]


def test_reference_kl_is_zero_with_untrained_adapters_and_positive_after_a_change():
    policy = make_policy(reference=True)
    rollout = policy.rollout(image_batch(), 2)
    rows = torch.arange(4)
    lp = policy.log_prob(rollout, rows)
    assert torch.equal(lp.kl, torch.zeros_like(lp.kl))  # LoRA B = 0: the adapted model is the reference
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    lp = policy.log_prob(rollout, rows)
    mask = rollout.train_mask[rows]
    assert (lp.kl >= 0).all() and lp.kl.masked_select(mask).max() > 1e-4
    # the KL term trains the adapters (through the policy log-probs; the reference side is constant)
    lp.kl.sum().backward()
    grads = [p.grad for n, p in policy.model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_full_finetuning_with_beta_needs_a_reference_copy():
    model, processor = tiny_qwen2_vl()
    with pytest.raises(UserError, match="reference_copy"):
        VLMPolicy(model, processor, VLMPolicyOptions(finetune="full"), reference=True)
    options = VLMPolicyOptions(finetune="full", reference_copy=True, max_new_tokens=6)
    policy = VLMPolicy(model, processor, options, reference=True)
    rollout = policy.rollout(image_batch(), 2)
    lp = policy.log_prob(rollout, torch.arange(4))
    assert torch.allclose(lp.kl, torch.zeros_like(lp.kl), atol=1e-6)  # the copy equals the policy before training


def test_prompt_preparation_from_a_path_with_options_and_the_size_the_model_saw(tmp_path):
    from PIL import Image

    Image.fromarray(images()[1]).save(tmp_path / "img.png")  # 100 x 60 (W x H)
    policy = make_policy()
    prompt = {"question": "Which shape is blue?", "options": ["circle", "square"]}
    text = policy.processor.apply_chat_template(policy.messages(prompt, 1, False), tokenize=False)
    assert "Which shape is blue? A) circle B) square" in text and "<think> </think>" in text  # R1 system prompt
    inputs = policy.prepare(prompt, {"image": str(tmp_path / "img.png")})
    # Qwen resize to multiples of 28 within [56^2, 112^2] pixels: H 60 -> 56, W 100 -> 112 (100 / 28 = 3.6 -> 4)
    assert inputs.resized_size == (112, 56)
    assert inputs.vision["image_grid_thw"].tolist() == [[1, 4, 8]]  # 56 / 14, 112 / 14 patches
    assert int((inputs.input_ids == policy.model.hf.config.image_token_id).sum()) == 4 * 8 // 4  # 2x2 merge
    rollout = policy.rollout(PromptBatch([prompt], [{"image": str(tmp_path / "img.png")}], seeds=[0]), 2)
    assert rollout.meta[0]["resized_size"] == (112, 56)  # for the iou reward (converted in mmgrpo/rewards/boxes.py)
    with pytest.raises(UserError, match="not found"):
        policy.prepare("q", {"image": str(tmp_path / "missing.png")})


def test_gradient_checkpointing_gives_the_same_log_probs_and_gradients():
    plain, ckpt = make_policy(), make_policy(gradient_checkpointing=True)
    rollout = plain.rollout(image_batch(), 2)
    grads, calls = [], []
    for policy in (plain, ckpt):
        policy.model.train()
        mlp = policy.model.hf.model.language_model.layers[0].mlp  # runs inside the checkpointed layer forward
        calls.append(0)
        mlp_forward = mlp.forward  # count calls by wrapping forward: module hooks do not fire on the recompute

        def counted(*args, _forward=mlp_forward, **kwargs):
            calls[-1] += 1
            return _forward(*args, **kwargs)

        mlp.forward = counted
        lp = policy.log_prob(rollout, torch.arange(4)).logp
        assert (lp - rollout.logp_old[:4]).abs().masked_select(rollout.train_mask[:4]).max() < 1e-5
        lp.sum().backward()
        grads.append([p.grad.clone() for p in policy.trainable_parameters()])
    assert calls == [2, 4]  # 2 prompts; checkpointing reruns each decoder layer in backward
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


# ----------------------------------------------------------------------------------------- vision reuse


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_vision_tower_runs_once_per_prompt_in_rollout(family):
    policy = make_policy(family)
    calls = []
    policy.model.hf.model.visual.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    a, b = images()
    meta = [{"images": [a]}, {"images": [b]}, {"images": [a]}]
    batch = PromptBatch(prompts=["q1", "q2", "q3"], meta=meta, seeds=[1, 2, 3])
    rollout = policy.rollout(batch, group_size=4)
    assert len(calls) == 3  # B prompts, not B * G = 12
    patches = [p.vision["pixel_values"].shape[0] for p in rollout.extras["prompt"][::4]]
    assert calls == patches  # each call saw one prompt's patches, not G copies
    # LoRA leaves the vision tower frozen: log_prob reuses the rollout's features, no further vision pass
    policy.log_prob(rollout, torch.arange(12))
    assert len(calls) == 3


def test_trainable_vision_tower_reruns_once_per_prompt_in_log_prob():
    policy = make_policy(finetune="full", freeze_vision=False)
    calls = []
    policy.model.hf.model.visual.register_forward_hook(lambda *a: calls.append(1))
    rollout = policy.rollout(image_batch(), 4)
    assert len(calls) == 2
    lp = policy.log_prob(rollout, torch.tensor([0, 1, 4, 5, 6]))  # rows of 2 prompts: 2 vision passes, with grad
    assert len(calls) == 4
    lp.logp.sum().backward()
    assert policy.model.hf.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------- suppression


def biased_head(policy, ids, value=30.0):
    """Swap the LM head for one whose bias makes ``ids`` the most likely tokens by far."""
    hf = policy.model.hf
    old = hf.get_output_embeddings()
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[ids] = value
    hf.lm_head = head
    return head


def test_suppressed_tokens_are_exactly_the_vision_box_and_out_of_vocabulary_ids():
    policy = make_policy()
    tok = policy.tokenizer
    V = policy.model.hf.get_output_embeddings().out_features
    assert V > len(tok)  # the tiny model pads its vocabulary like the real checkpoints
    expected = {tok.convert_tokens_to_ids(t) for t in VISION_TOKENS + BOX_TOKENS} | set(range(len(tok), V))
    assert set(policy.model.suppress.nonzero().reshape(-1).tolist()) == expected
    keep_boxes = make_policy(suppress_box_tokens=False, suppress_tokens=["<answer>"])
    assert not keep_boxes.model.suppress[tok.convert_tokens_to_ids("<|box_start|>")]
    assert keep_boxes.model.suppress[tok.convert_tokens_to_ids("<answer>")]
    with pytest.raises(UserError, match="not a token"):
        make_policy(suppress_tokens=["<nope>"])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_suppressed_tokens_are_never_sampled_even_when_the_model_favours_them(family):
    policy = make_policy(family)
    banned = policy.model.suppress.nonzero().reshape(-1)
    head = biased_head(policy, banned)
    # control: without suppression the biased model samples banned tokens almost surely
    h = torch.randn(64, head.in_features, generator=torch.Generator().manual_seed(0))
    free = sample_tokens(head(h).detach(), torch.Generator().manual_seed(0))
    assert policy.model.suppress[free].float().mean() > 0.99
    rollout = policy.rollout(image_batch(), 4)
    comp = rollout.extras["completion_ids"]
    sampled = comp[rollout.train_mask.to(comp.device)]
    assert sampled.numel() > 0 and not policy.model.suppress[sampled].any()
    assert torch.isfinite(rollout.logp_old).all()
    assert ratio_error(policy, rollout, 4) < 1e-5  # the next forward works and scores the same


def test_mask_truncated_and_eos_handling():
    policy = make_policy(max_new_tokens=3)
    eos = policy.eos_ids
    biased_head(policy, torch.tensor(eos), value=-1e4)  # EOS never sampled: every row is truncated
    r = policy.rollout(image_batch(), 2)
    assert r.train_mask.all() and not r.extras["finished"].any()  # 3 tokens each, all trained
    policy_m = make_policy(max_new_tokens=3, mask_truncated=True)
    biased_head(policy_m, torch.tensor(eos), value=-1e4)
    assert not policy_m.rollout(image_batch(), 2).train_mask.any()  # truncated rows masked out entirely
    biased_head(policy_m, torch.tensor(eos[:1]), value=1e4)  # EOS first: length 1, the EOS itself is trained
    r = policy_m.rollout(image_batch(), 2)
    assert r.train_mask.tolist() == [[True, False, False]] * 4 and r.samples == [""] * 4


# ----------------------------------------------------------------------------------------- maths


def test_chunked_log_softmax_equals_hand_computed_and_naive():
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    h = torch.tensor([[[0.0, math.log(3.0)]]])  # logits [0, ln 3]
    t = torch.tensor([[1]])
    # p(1) = 3 / (1 + 3) = 0.75 -> log 0.75 = -0.287682
    assert chunked_token_logprobs(h, head, t).item() == pytest.approx(math.log(0.75), abs=1e-6)
    # temperature 2: logits [0, ln 3 / 2] -> p(1) = sqrt3 / (1 + sqrt3) = 0.633975 -> log = -0.455746
    assert chunked_token_logprobs(h, head, t, temperature=2.0).item() == pytest.approx(-0.455746, abs=1e-6)
    # token 0 suppressed: all mass on token 1 -> log 1 = 0
    assert chunked_token_logprobs(h, head, t, suppress=torch.tensor([True, False])).item() == pytest.approx(0.0)

    torch.manual_seed(0)
    head = nn.Linear(16, 50)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    targets = torch.randint(0, 40, (3, 7))
    suppress = torch.zeros(50, dtype=torch.bool)
    suppress[45:] = True
    naive = torch.log_softmax((head(hidden) / 0.7).masked_fill(suppress, -math.inf), -1)
    naive = naive.gather(-1, targets[..., None]).squeeze(-1)  # [3, 7]
    g_naive = torch.autograd.grad(naive.sum(), [hidden, head.weight])
    for chunk in (1, 5, 21, 1000):
        out = chunked_token_logprobs(hidden, head, targets, chunk=chunk, temperature=0.7, suppress=suppress)
        assert out.shape == (3, 7) and out.dtype == torch.float32
        assert torch.allclose(out, naive, atol=1e-6), chunk
        g = torch.autograd.grad(out.sum(), [hidden, head.weight])
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g, g_naive)), chunk


def test_sample_tokens_top_k_top_p_greedy():
    # probs [0.5, 0.3, 0.2]: top_p 0.6 keeps {0, 1} (mass before token 1 is 0.5 < 0.6, before token 2 is 0.8)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(2000, 3)
    g = torch.Generator().manual_seed(0)
    s = sample_tokens(logits, g, top_p=0.6)
    assert set(s.tolist()) == {0, 1}
    assert (s == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.04)  # renormalised: 0.625
    assert set(sample_tokens(logits, g, top_k=1).tolist()) == {0}
    assert set(sample_tokens(logits, g, greedy=True, suppress=torch.tensor([True, False, False])).tolist()) == {1}


# ----------------------------------------------------------------------------------------- training


@register("test_vlm_length")
def _length_reward():
    """Test reward: completion length / 10 (always varies within a group of a random model)."""
    return lambda samples, prompts, meta, ctx: [len(s) / 10.0 for s in samples]


def vlm_config(tmp_path, model_dir, *overrides):
    base = {
        "pipeline": "vlm_reasoning",
        "run": {"name": "vlm", "seed": 0, "output_dir": str(tmp_path / "runs")},
        "data": {"options": {"num_examples": 16, "image_size": 32}},
        "policy": {"options": {"path": str(model_dir), "max_new_tokens": 6, "lora_rank": 4}},
        "rewards": [{"name": "test_vlm_length"}],
        "loss": {"beta": 0.0},
        "trainer": {
            "max_steps": 2, "prompts_per_step": 2, "group_size": 3, "micro_batch_size": 2, "lr": 0.05,
            "progress": False, "checkpoint_every": 0,
        },
    }  # fmt: skip
    return load_config(None, list(overrides), base=base)


def params_after_training(tmp_path, family, *overrides):
    from mmgrpo.train.components import PIPELINES

    model_dir = save_tiny(*BUILDERS[family](), tmp_path / family)
    cfg = vlm_config(tmp_path, model_dir, *overrides)
    PIPELINES.load()
    before = []
    for _ in range(2):  # the trainer seeds torch with run.seed before building, as here: same initial adapters
        torch.manual_seed(cfg.run.seed)
        policy = PIPELINES.get("vlm_reasoning").build(cfg).policy
        before.append({n: p.detach().clone() for n, p in policy.model.named_parameters()})
    assert all(torch.equal(before[0][n], before[1][n]) for n in before[0])
    trainer = train(cfg)
    after = {n: p.detach() for n, p in trainer.policy.model.named_parameters()}
    assert after.keys() == before[0].keys()
    changed = {n for n in after if not torch.equal(after[n], before[0][n])}
    return changed, after


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_lora_training_changes_only_lora_parameters(tmp_path, family):
    assert "test_vlm_length" in REWARDS
    changed, after = params_after_training(tmp_path, family)
    lora = {n for n in after if "lora_" in n}
    assert lora and all("language_model" in n for n in lora)  # adapters only on the LM's attention projections
    assert changed and changed <= lora
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


def test_full_finetuning_with_frozen_vision_changes_no_vision_parameter(tmp_path):
    changed, after = params_after_training(tmp_path, "qwen2_vl", "policy.options.finetune=full")
    assert not any("lora_" in n for n in after)
    assert not any(".visual." in n for n in changed)
    assert any("language_model" in n for n in changed) and any("lm_head" in n for n in changed)


# ----------------------------------------------------------------------------------------- video


def write_mp4(path, frames=8, size=64, fps=4):
    import imageio

    rng = np.random.default_rng(0)
    clip = [np.full((size, size, 3), 40 * i % 255, dtype=np.uint8) for i in range(frames)]
    clip = [np.clip(f.astype(int) + rng.integers(0, 30, f.shape), 0, 255).astype(np.uint8) for f in clip]
    imageio.mimwrite(str(path), clip, fps=fps)
    return path


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_video_prompt_from_a_real_mp4_runs_rollout_and_log_prob(tmp_path, family):
    path = write_mp4(tmp_path / "clip.mp4")  # 8 frames at 4 fps = 2 s
    frames, fps = read_video(path, fps=2.0, max_frames=16)
    # every 2nd frame (4 fps -> 2 fps): 4 frames; effective fps = 4 frames / 2 s = 2
    assert frames.shape == (4, 64, 64, 3) and fps == pytest.approx(2.0)
    assert read_video(path, fps=4.0, max_frames=3)[0].shape[0] == 2  # at most 3, and an even count
    policy = make_policy(family, fps=2.0)
    calls = []
    policy.model.hf.model.visual.register_forward_hook(lambda *a: calls.append(1))
    batch = PromptBatch(prompts=["What happens in the video?"], meta=[{"video": str(path)}], seeds=[5])
    rollout = policy.rollout(batch, 3)
    prompt = rollout.extras["prompt"][0]
    assert "pixel_values_videos" in prompt.vision and prompt.vision["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert len(calls) == 1
    assert ratio_error(policy, rollout, 1) < 1e-5 and ratio_error(policy, rollout, 3) < 1e-5
    # temporal M-RoPE (Qwen2.5-VL: second_per_grid_ts from the fps) agrees with transformers' own forward
    n = int(rollout.extras["completion_len"][0])
    assert torch.allclose(rollout.logp_old[0, :n], hf_reference_logprobs(policy, rollout, 0), atol=1e-5)


# ----------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_from_pretrained_on_a_saved_local_dir(tmp_path, family):
    model, processor = BUILDERS[family](seed=3)
    save_tiny(model, processor, tmp_path / "m")
    policy = VLMPolicy.from_pretrained(str(tmp_path / "m"), VLMPolicyOptions(max_new_tokens=5, finetune="full"))
    assert policy.family == family and policy.box_family == family
    loaded = policy.model.hf.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    rollout = policy.rollout(image_batch(), 2)
    assert rollout.num_rows == 4 and ratio_error(policy, rollout, 2) < 1e-5
    with pytest.raises(UserError, match="cannot load a VLM"):
        VLMPolicy.from_pretrained(str(tmp_path / "missing"))


def test_train_span_answer_trains_from_after_the_answer_tag():
    policy = make_policy(max_new_tokens=40)
    tok = policy.tokenizer
    texts = ["<think>two red circles</think><answer>B</answer>", "no tags at all", "<answer>"]
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    comp = torch.full((3, 40), policy.pad_id, dtype=torch.long)
    for n, row in enumerate(ids):
        comp[n, : len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(r) for r in ids])
    mask = policy.answer_mask(comp, lengths)
    assert policy._decode(comp[0][mask[0]]) == "B</answer>"  # the trained tokens are the answer and its close
    assert mask[0, : len(ids[0])].sum() < len(ids[0]) and not mask[0, len(ids[0]) :].any()
    assert mask[1].sum() == len(ids[1])  # no tag: every token trains (the format reward still teaches the tag)
    assert not mask[2].any()  # the tag ends the completion: nothing after it to train
    # in a rollout the span mask narrows the usual one, and ratio = 1 still holds on what remains
    r_all = make_policy(max_new_tokens=6).rollout(image_batch(), 2)
    r_ans = make_policy(max_new_tokens=6, train_span="answer").rollout(image_batch(), 2)
    span = make_policy(max_new_tokens=6).answer_mask(r_all.extras["completion_ids"], r_all.extras["completion_len"])
    assert torch.equal(r_ans.train_mask, r_all.train_mask & span)
