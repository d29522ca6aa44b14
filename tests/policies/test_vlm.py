"""The VLM reasoner's own features on the tiny REAL Qwen2-VL: reference copies, prompt preparation, gradient
checkpointing, a trainable vision tower, the suppressed set, truncation, chunked log-softmax, sampling, answer spans.

The family contract (ratio = 1, layout-independent samples, suppression, LoRA reference, only trainable tensors
move, video, loading) runs over every VLM family in test_vlm_conformance.py."""

import math
from pathlib import Path

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
    load_vlm,
    sample_rows,
    sample_tokens,
    token_entropy,
)
from mmgrpo.policies.vlm_cache import join_caches
from mmgrpo.testing.tiny_vlm import tiny_qwen2_vl
from mmgrpo.testing.vlm_checks import biased_head, hf_reference_logits, image_batch, images, make_policy

REPO = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------------------------- reference, prompts


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
    """Checkpointed layers drop the KV cache, so the checkpointed update forwards every row's prompt (as
    shared_prefix=false does): one forward per prompt, each decoder layer rerun in backward."""
    plain, ckpt = make_policy(shared_prefix=False), make_policy(gradient_checkpointing=True)
    shared = make_policy()  # the default: the prompt forwarded once, then its rows' completions (2 forwards)
    rollout = plain.rollout(image_batch(), 2)
    grads, calls = [], []
    for policy in (plain, ckpt, shared):
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
    assert calls == [2, 4, 4]  # 2 prompts; checkpointing reruns each decoder layer in backward
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0], grads[1]))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0], grads[2]))


# ----------------------------------------------------------------------------------------- vision reuse


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


@pytest.mark.parametrize(
    "options",
    [{}, {"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.8, "temperature": 1.3}, {"top_k": 7, "top_p": 0.5},
     {"greedy": True}],
)  # fmt: skip
def test_sample_rows_equals_per_prompt_sampling_bit_for_bit(options):
    """The decode loop's one call per step gives exactly the tokens of sample_tokens on each prompt's rows with that
    prompt's generator, and exactly token_entropy of all rows: batching the shared work changes no bit, so a row's
    sample still depends on its prompt's seed only. A prompt that is not decoding any more (not in ``groups``)
    draws nothing from its generator."""
    torch.manual_seed(0)
    B, G, V = 3, 4, 40
    logits = torch.randn(B * G, V) * 3
    suppress = torch.zeros(V, dtype=torch.bool)
    suppress[[3, 11]] = True
    kw = {k: v for k, v in options.items() if k != "greedy"}
    greedy = options.get("greedy", False)
    for step in range(5):
        ours = [torch.Generator().manual_seed(10 + b) for b in range(B)]
        theirs = [torch.Generator().manual_seed(10 + b) for b in range(B)]
        decoding = [0, 2] if step % 2 else [0, 1, 2]  # prompt 1 finished on odd steps
        groups = [(slice(b * G, (b + 1) * G), ours[b]) for b in decoding]
        tokens, entropy = sample_rows(logits, groups, suppress=suppress, greedy=greedy, **kw)
        assert torch.equal(entropy, token_entropy(logits, kw.get("temperature", 1.0), suppress))
        for b in range(B):
            rows = slice(b * G, (b + 1) * G)
            if greedy or b in decoding:
                want = sample_tokens(logits[rows], None if greedy else theirs[b], suppress=suppress, greedy=greedy,
                                     **kw)  # fmt: skip
                assert torch.equal(tokens[rows], want), (step, b)
                assert not bool(suppress[tokens[rows]].any())
            # the same state afterwards: each generator drew exactly what the per-prompt call drew (or nothing)
            assert torch.equal(ours[b].get_state(), theirs[b].get_state()), (step, b)
        logits = logits.roll(1, dims=-1)


@pytest.mark.parametrize("V", [7, 40, 448])
def test_sampling_is_torch_multinomial_bit_for_bit(V):
    """sample_tokens draws what torch.multinomial(probs, 1, generator) draws (its own algorithm for one sample, so
    seeds keep their samples), leaving the generator in the same state, zero-probability ids included."""
    torch.manual_seed(V)
    for trial in range(20):
        logits = torch.randn(5, V) * 3
        if trial % 2:
            logits[:, : V // 2] = -math.inf  # ids the softmax gives probability 0
        ours, theirs = torch.Generator().manual_seed(trial), torch.Generator().manual_seed(trial)
        want = torch.multinomial(torch.softmax(logits, -1), 1, generator=theirs).squeeze(-1)
        assert torch.equal(sample_tokens(logits, ours), want)
        assert torch.equal(ours.get_state(), theirs.get_state())


def test_a_rollout_on_non_finite_logits_is_one_paragraph():
    """NaN weights (a diverged run, an fp16 overflow) made torch.multinomial raise its own error mid-rollout; the
    batched sampler has no per-token check, so the decode loop checks once and names the fix."""
    policy = make_policy()
    with torch.no_grad():
        policy.model.hf.lm_head.weight[0, 0] = math.nan
    with pytest.raises(
        UserError, match=r"next-token distribution was not finite at completion token 0 .*lower trainer"
    ):
        policy.rollout(image_batch(), 2)


BAD_OPTIONS = [  # (options, the start of the one-paragraph error): each used to end in a torch / peft traceback
    # mid-rollout, or to train silently on a meaningless setting (found by fuzzing the shipped VLM configs)
    ({"max_new_tokens": 0}, "policy.options.max_new_tokens=0: a completion needs at least 1 token"),
    ({"max_new_tokens": -1}, "policy.options.max_new_tokens=-1: a completion needs at least 1 token"),
    ({"temperature": 0.0}, r"policy.options.temperature=0.0: the sampling temperature must be in 0\.01\.\.100"),
    ({"temperature": math.nan}, "policy.options.temperature=nan: the sampling temperature must be"),
    ({"temperature": math.inf}, "policy.options.temperature=inf: the sampling temperature must be"),
    # finite but out of float32's reach: logits / 1e308 (inf in float32) or / 1e-45 (a denormal) were NaN / inf, a
    # rollout error blaming fp16 overflow and trainer.lr
    ({"temperature": 1e308}, r"policy.options.temperature=1e\+308: the sampling temperature must be in 0\.01\.\.100"),
    ({"temperature": 1e-45}, r"policy.options.temperature=1e-45: the sampling temperature must be in 0\.01\.\.100"),
    ({"temperature": 0.009}, "policy.options.temperature=0.009: the sampling temperature must be in"),
    ({"temperature": 101.0}, "policy.options.temperature=101.0: the sampling temperature must be in"),
    ({"top_p": 0.0}, r"policy.options.top_p=0.0: the nucleus mass must be in \(0, 1\]"),
    ({"top_p": -1.0}, r"policy.options.top_p=-1.0: the nucleus mass must be in \(0, 1\]"),
    ({"top_p": math.nan}, "policy.options.top_p=nan: the nucleus mass"),
    ({"top_p": math.inf}, "policy.options.top_p=inf: the nucleus mass"),
    ({"top_k": -1}, r"policy.options.top_k=-1: must be >= 0; set it to 0 \(off\)"),
    ({"fps": 0.0}, "policy.options.fps=0.0: video frames per second must be a finite number > 0"),
    ({"fps": math.nan}, "policy.options.fps=nan: video frames per second"),
    ({"max_frames": 0}, "policy.options.max_frames=0: a video needs at least 1 frame"),
    ({"max_pixels": 0}, "policy.options.max_pixels=0: the pixel budget per image must be >= 1"),
    ({"max_pixels": -1}, "policy.options.max_pixels=-1: the pixel budget"),
    ({"logprob_chunk": 0}, "policy.options.logprob_chunk=0: must be >= 1 tokens per chunk"),
    ({"logprob_chunk": -1}, "policy.options.logprob_chunk=-1: must be >= 1"),
    ({"lora_rank": 0}, "policy.options.lora_rank=0: a LoRA rank must be >= 1 with finetune=lora"),
    ({"lora_rank": -1}, "policy.options.lora_rank=-1: a LoRA rank must be >= 1 with finetune=lora"),
    ({"lora_rank": -1, "finetune": "full"}, "policy.options.lora_rank=-1: a LoRA rank must be >= 1"),
    ({"lora_alpha": 0.0}, "policy.options.lora_alpha=0.0: the LoRA scale numerator must be a finite number > 0"),
    ({"lora_alpha": -1.0}, "policy.options.lora_alpha=-1.0: the LoRA scale numerator"),
    ({"lora_alpha": math.nan}, "policy.options.lora_alpha=nan: the LoRA scale numerator"),
    ({"lora_dropout": -1.0}, r"policy.options.lora_dropout=-1.0: a dropout probability must be in \[0, 1\)"),
    ({"lora_dropout": math.nan}, "policy.options.lora_dropout=nan: a dropout probability"),
    ({"lora_dropout": math.inf}, "policy.options.lora_dropout=inf: a dropout probability"),
    ({"finetune": "qlora"}, "policy.options.finetune='qlora': use 'lora' or 'full'"),
]


@pytest.mark.parametrize("options, match", BAD_OPTIONS, ids=[str(o) for o, _ in BAD_OPTIONS])
def test_bad_numbers_are_one_clear_error_when_the_options_are_built(options, match):
    """Checked by the options dataclass, i.e. when the config loads (the recipe's schema), before any model."""
    with pytest.raises(UserError, match=f"^{match}"):
        VLMPolicyOptions(**options)


def test_a_lora_rank_of_0_is_no_error_when_nothing_is_lora():
    assert VLMPolicyOptions(finetune="full", lora_rank=0).lora_rank == 0  # unused by full fine-tuning


def test_the_temperature_bounds_themselves_sample_finite_distributions():
    """0.01 and 100 are accepted, and a rollout at each samples from a finite distribution (the bounds are where
    float32 logits / temperature stay meaningful)."""
    for t in (0.01, 100.0):
        policy = make_policy(max_new_tokens=4, temperature=VLMPolicyOptions(temperature=t).temperature)
        rollout = policy.rollout(image_batch(), 2, torch.Generator().manual_seed(0))
        assert torch.isfinite(rollout.logp_old).all() and torch.isfinite(rollout.extras["token_entropy"]).all()


def _tiny_checkpoint(folder: Path, weights: bool) -> Path:
    """The tiny Qwen2-VL saved as a model folder; without ``weights`` its config and processor files only."""
    model, processor = tiny_qwen2_vl()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if not weights:
        (folder / "model.safetensors").unlink()
    return folder


def test_a_family_that_does_not_fit_the_checkpoint_is_refused_before_the_weights_load(tmp_path):
    """family=qwen2_5_vl over a qwen2_vl checkpoint ended in transformers' table of "MISMATCH ... Reinit due to size
    mismatch" and a RuntimeError about ignore_mismatched_sizes. It is refused from config.json alone (this folder has
    no weights: the refusal comes before they are looked for), naming the family that fits."""
    folder = _tiny_checkpoint(tmp_path / "m", weights=False)
    for family in ("qwen2_5_vl", "qwen3_vl"):
        with pytest.raises(UserError) as e:
            load_vlm(str(folder), VLMPolicyOptions(path=str(folder), family=family))
        msg = str(e.value)
        assert msg.startswith(f"policy.options.family='{family}': family '{family}' does not fit the checkpoint's "
                              "config.json model_type 'qwen2_vl'"), msg  # fmt: skip
        assert "set policy.options.family=qwen2_vl" in msg and "or remove the option" in msg and "\n" not in msg
    with pytest.raises(UserError, match="model.safetensors"):  # auto / the right family: on to the weights
        load_vlm(str(folder), VLMPolicyOptions(path=str(folder), family="qwen2_vl"))
    folder = _tiny_checkpoint(tmp_path / "w", weights=True)
    for family in ("auto", "qwen2_vl", "generic"):  # generic's class reads the model type from the config
        model, _ = load_vlm(str(folder), VLMPolicyOptions(path=str(folder), family=family))
        assert model.config.model_type == "qwen2_vl"


def test_max_new_tokens_beyond_the_models_context_is_refused_before_the_weights_load(tmp_path):
    """max_new_tokens=1e12 ended in an out-of-memory paragraph about micro-batches (the decode cache is sized by
    it); prompt + completion must fit the model's context, max_position_embeddings of its text config."""
    folder = _tiny_checkpoint(tmp_path / "m", weights=False)
    model, _ = tiny_qwen2_vl()
    limit = model.config.text_config.max_position_embeddings
    for k in (10**12, limit):
        with pytest.raises(UserError) as e:
            load_vlm(str(folder), VLMPolicyOptions(path=str(folder), max_new_tokens=k))
        assert str(e.value).startswith(
            f"policy.options.max_new_tokens={k}: policy.options.path='{folder}' has a "
            f"context of {limit} tokens (max_position_embeddings of its text config)"
        )
        assert f"set it below {limit}" in str(e.value)
    with pytest.raises(UserError, match="model.safetensors"):  # a completion that leaves room for a prompt
        load_vlm(str(folder), VLMPolicyOptions(path=str(folder), max_new_tokens=limit - 1))


def test_a_bad_policy_option_fails_at_config_load_through_the_cli(tmp_path, capsys):
    from mmgrpo.train.cli import main

    config = REPO / "configs" / "vlm_reasoning_tiny.yaml"
    code = main(["train", str(config), f"run.output_dir={tmp_path}", "policy.options.top_p=0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "policy.options.top_p=0.0: the nucleus mass" in err, err
    assert not any(tmp_path.iterdir())


def test_token_entropy_equals_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    # p = [1/4, 3/4]: H = 1/4 ln 4 + 3/4 ln(4/3) = 0.346574 + 0.215762 = 0.562335
    assert token_entropy(logits).item() == pytest.approx(0.5623351, abs=1e-6)
    # temperature 2: logits [0, ln 3 / 2] -> p = [1 / (1 + sqrt3), sqrt3 / (1 + sqrt3)] = [0.366025, 0.633975]
    # H = 0.366025 * 1.005053 + 0.633975 * 0.455746 = 0.656806
    assert token_entropy(logits, temperature=2.0).item() == pytest.approx(0.6568064, abs=1e-6)
    # token 0 suppressed: all mass on token 1 -> H = 0 (0 log 0 = 0, not NaN); a -inf logit likewise
    assert token_entropy(logits, suppress=torch.tensor([True, False])).item() == 0.0
    assert token_entropy(torch.tensor([[0.0, -math.inf]])).item() == 0.0
    # uniform over 4 of 6 ids (2 suppressed): ln 4, whatever the temperature; shape [..., V] -> [...]
    flat = torch.zeros(2, 3, 6)
    out = token_entropy(flat, temperature=0.3, suppress=torch.tensor([0, 0, 1, 0, 1, 0], dtype=torch.bool))
    assert out.shape == (2, 3) and torch.allclose(out, torch.full((2, 3), math.log(4.0)))


def test_rollout_records_the_entropy_of_each_sampled_tokens_distribution():
    """On the tiny real Qwen2-VL: the entropy the sampler records at step t is that of the distribution token t was
    drawn from, recomputed here from the transformers model's own teacher-forced logits (no KV cache)."""
    policy = make_policy(max_new_tokens=8, temperature=0.7)
    rollout = policy.rollout(image_batch(), 3)
    ent = rollout.extras["token_entropy"]
    assert ent.shape == (6, 8) and ent.dtype == torch.float32
    by_hand = []
    for row in range(rollout.num_rows):
        logits = hf_reference_logits(policy, rollout, row).double()  # [n, V], / temperature, suppressed -inf
        p = torch.softmax(logits, -1)
        h = -(p * torch.log(p).nan_to_num(neginf=0.0)).sum(-1)  # [n] nats
        n = int(rollout.extras["completion_len"][row])
        assert torch.allclose(ent[row, :n].double(), h, atol=1e-4), row
        by_hand.append(h)
    hand = torch.cat(by_hand)
    assert 0.5 < hand.mean() < math.log(len(policy.tokenizer))  # a real spread, below uniform
    m = policy.rollout_metrics(rollout)
    assert m["completion/entropy"] == pytest.approx(hand.mean().item(), abs=1e-4)  # mean over completion tokens
    assert m["completion/length_mean"] == pytest.approx(len(hand) / 6)
    # with several processes, every process's rows (all_values, set by the trainer): the two prompts' groups as
    # two processes give the whole rollout's metrics (they were each process's own)
    from mmgrpo.core.types import select_groups

    second = {}
    policy.all_values = lambda values: second.setdefault("values", values) and [values]
    policy.rollout_metrics(select_groups(rollout, [1]))
    policy.all_values = lambda values: [values, second["values"]]
    both = policy.rollout_metrics(select_groups(rollout, [0]))
    policy.all_values = None
    assert both == pytest.approx(m, rel=1e-6) and set(both) == set(m)
    assert both["completion/length_max"] == max(rollout.extras["completion_len"].tolist())


def test_a_cache_that_cannot_be_joined_is_decoded_prompt_by_prompt():
    """A sliding-window decoder layer keeps a cache join_caches does not pad: each prompt gets its own loop, with the
    same samples as alone."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

    from mmgrpo.testing import tiny_vlm

    tok = tiny_vlm.tiny_tokenizer()
    text = {**tiny_vlm._text_config(tok), "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}
    vision = {"depth": 1, "embed_dim": 32, "hidden_size": tiny_vlm.TEXT_HIDDEN, "mlp_ratio": 2, "num_heads": 2,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}  # fmt: skip
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **tiny_vlm._special_ids(tok))
    assert config.text_config.layer_types == ["full_attention", "sliding_attention"]
    torch.manual_seed(0)
    model = tiny_vlm._finish(Qwen2VLForConditionalGeneration(config), tok)
    policy = VLMPolicy(model, tiny_vlm._processor("qwen2_vl", tok), VLMPolicyOptions(max_new_tokens=6))
    caches = [DynamicCache(config=config.text_config) for _ in range(2)]
    for c, n in zip(caches, (3, 5)):
        for i in range(2):
            c.update(torch.zeros(1, 2, n, 16), torch.zeros(1, 2, n, 16), i)
    assert isinstance(caches[0].layers[1], DynamicSlidingWindowLayer) and join_caches(caches, [3, 5], 2) is None
    backbone = policy.adapter.backbone(policy.model.hf)
    steps = []
    backbone.register_forward_pre_hook(lambda mod, args, kw: steps.append(kw["inputs_embeds"].shape[0]),
                                       with_kwargs=True)  # fmt: skip
    full = policy.rollout(image_batch(), 3)
    assert 3 in steps and 6 not in steps  # decode steps of one prompt's rows at a time
    for b in (0, 1):
        alone = policy.rollout(image_batch().select([b]), 3)
        assert alone.samples == full.samples[3 * b : 3 * b + 3]
        assert torch.equal(alone.extras["completion_ids"], full.extras["completion_ids"][3 * b : 3 * b + 3])


def test_join_caches_left_pads_each_prompt_and_repeats_it_for_its_rows():
    from transformers.cache_utils import DynamicCache

    caches, lengths = [], [2, 3]
    for b, n in enumerate(lengths):
        c = DynamicCache()
        for i in range(2):  # 2 layers; keys hold (prompt + 1) * (slot + 1) * (layer + 1), values minus that
            k = ((b + 1) * torch.arange(1.0, n + 1) * (i + 1)).view(1, 1, n, 1).expand(1, 2, n, 4)
            c.update(k, -k, i)
        caches.append(c)
    out = join_caches(caches, lengths, 2)
    keys = out.layers[1].keys  # [B*G = 4, H = 2, 3 slots, 4]
    assert keys.shape == (4, 2, 3, 4) and out.get_seq_length() == 3
    assert keys[:, 0, :, 0].tolist() == [[0, 2, 4], [0, 2, 4], [4, 8, 12], [4, 8, 12]]  # prompt 0 after 1 pad slot
    assert torch.equal(out.layers[1].values, -keys) and out.layers[0].keys[2, 1, :, 3].tolist() == [2, 4, 6]
    # with room for decoded tokens: written in place into the buffer (no copy of the cache per token), then past
    # the room concatenated as a DynamicLayer would
    caches = [DynamicCache() for _ in lengths]
    for c, n in zip(caches, lengths):
        c.update(torch.ones(1, 2, n, 4), torch.ones(1, 2, n, 4), 0)
    out = join_caches(caches, lengths, 2, room=2)
    layer = out.layers[0]
    start = layer.keys.data_ptr()
    for t in range(3):
        k, v = layer.update(torch.full((4, 2, 1, 4), t + 2.0), torch.full((4, 2, 1, 4), -t - 2.0))
        assert k.shape == (4, 2, 4 + t, 4) and out.get_seq_length() == 4 + t
        assert (k.data_ptr() == start) == (t < 2)  # the first 2 tokens in the buffer, the third past its room
    assert k[2, 0, :, 0].tolist() == [1, 1, 1, 2, 3, 4] and k[1, 0, :, 0].tolist() == [0, 1, 1, 2, 3, 4]
    assert torch.equal(v[:, :, 3:], -k[:, :, 3:])


# ----------------------------------------------------------------------------------------- answer span


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


def test_with_collective_forwards_the_decode_loop_and_scoring_run_the_same_forwards_on_every_process():
    """``any_process`` (set by the trainer under FSDP): the decode loop goes on while any process has a row left (here
    "another process" always has one: every loop runs all K steps, rows done meanwhile get padding and the samples
    do not change), and one completion token is scored with the two decoder forwards longer ones take (the same
    log-probs)."""
    policy = make_policy(max_new_tokens=10)
    biased_head(policy, torch.tensor(policy.eos_ids[:1]), value=6.0)  # EOS ~1 in 2 a token: rows end early, apart
    alone = policy.rollout(image_batch(), 3)
    lengths = alone.extras["completion_len"]
    assert int(lengths.max()) < 10 and len(set(lengths.tolist())) > 1  # the loop ended early, rows at various tokens
    backbone = policy.adapter.backbone(policy.model.hf)
    calls = []
    backbone.register_forward_pre_hook(lambda *a: calls.append(1))
    asked = []
    policy.any_process = lambda flag: asked.append(flag) or True
    synced = policy.rollout(image_batch(), 3)
    assert len(asked) == 9 and asked[-1] is False  # asked before each of tokens 2..10: 10 decode steps in all
    assert synced.samples == alone.samples and torch.equal(synced.extras["completion_len"], lengths)
    assert torch.equal(synced.extras["completion_ids"], alone.extras["completion_ids"])
    one = torch.tensor([0, 3])  # one row of each prompt; score only token 0 (Lc = 1)
    calls.clear()
    both = policy.log_prob(synced, one, torch.tensor([0])).logp
    assert len(calls) == 4  # per prompt: the prompt's forward, then the completion's (the token repeated)
    policy.any_process = None
    calls.clear()
    plain = policy.log_prob(synced, one, torch.tensor([0])).logp
    assert len(calls) == 2 and torch.allclose(both, plain, atol=1e-6)


def test_with_collective_forwards_prompts_whose_media_differ_between_processes_stop_with_the_fix():
    """``process_max`` (set with ``any_process`` under FSDP): before any vision pass the processes compare how many
    they need; when another process needs a different number (text-only prompts there, images here) every process
    stops with one message naming the counts and the fix, instead of waiting in a vision block's all-gather."""
    policy = make_policy(max_new_tokens=4)
    batch = image_batch()
    text_only = PromptBatch(prompts=["How many shapes?", "Which colour?"], meta=[{}, {}], seeds=[1, 2])
    asked = []

    def other_process(values):  # the other process sees `values` of its own: this fake one holds 2 text-only prompts
        asked.append(list(values))
        return [max(v, 0) for v in values]  # its count is 0 (and so is minus its count, for the minimum)

    policy.any_process, policy.process_max = (lambda flag: flag), other_process
    with pytest.raises(UserError, match=r"2 prompts need 2 vision passes, and the processes need between 0 and 2"):
        policy.rollout(batch, 2)
    assert asked == [[2, -2]]  # one comparison (the vision tower is frozen: the count only) before any forward
    with pytest.raises(UserError, match="train with DDP"):
        policy.generate(batch)  # evaluation's greedy decode checks too
    policy.rollout(text_only, 2)  # both processes text-only: the same forwards, it runs
    policy.process_max = lambda values: list(values)  # every process alike
    policy.rollout(batch, 2)
