"""The VLM family contract: every registered VLM family passes the same tests on its tiny REAL model.

Families: qwen2_vl, qwen2_5_vl, qwen3_vl (interleaved M-RoPE, deepstack) and generic (a tiny LLaVA through
``AutoModelForImageTextToText``). A new family adds its builder to ``mmgrpo.testing.vlm_checks.VLM_BUILDERS`` and
must pass everything here:

- ratio exp(logp - logp_old) = 1 within 1e-5 right after rollout, at micro-batch 1 and G and with rows mixed;
- the scorer equals the transformers model's own forward (positions, vision scatter, deepstack);
- a row's sample depends on its prompt's seed only, not on the batch layout;
- the vision tower runs once per prompt; vision / box / out-of-vocabulary tokens are never sampled;
- the LoRA reference is the model with its adapters disabled;
- an optimizer step (and 2 trainer steps) move only the trainable tensors;
- video prompts (families with a video path) and loading from a saved local directory.
"""

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.losses import policy_loss
from mmgrpo.core.types import PromptBatch
from mmgrpo.policies.vlm import VLMPolicy, VLMPolicyOptions, read_video, sample_tokens
from mmgrpo.policies.vlm_families import VLM_FAMILIES
from mmgrpo.rewards.registry import REWARDS, register
from mmgrpo.testing.tiny_vlm import save_tiny
from mmgrpo.testing.vlm_checks import (
    VLM_BUILDERS,
    biased_head,
    hf_reference_logprobs,
    image_batch,
    images,
    make_policy,
    ratio_error,
    write_mp4,
)
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

FAMILIES = list(VLM_BUILDERS)
VIDEO_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]  # the tiny LLaVA has no video path
BOX_CONVENTION = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen2_vl", "generic": "absolute"}

family_param = pytest.mark.parametrize("family", FAMILIES)


def test_every_registered_family_has_a_test_model_and_a_description():
    assert set(VLM_FAMILIES.names()) == set(FAMILIES)
    assert all(VLM_FAMILIES.describe(name) for name in FAMILIES)  # `mmgrpo list` shows one line each


def test_the_family_comes_from_model_type_or_a_name_or_a_dotted_path():
    model, processor = VLM_BUILDERS["qwen3_vl"]()
    assert VLMPolicy(model, processor, VLMPolicyOptions()).family == "qwen3_vl"  # config.model_type
    dotted = VLMPolicyOptions(family="mmgrpo.policies.vlm_families.qwen3_vl.Qwen3VLFamily", finetune="full")
    assert VLMPolicy(*VLM_BUILDERS["qwen3_vl"](), dotted).family == "qwen3_vl"  # a plug-in's class by its path
    with pytest.raises(UserError, match="did you mean 'qwen3_vl'"):
        VLMPolicy(*VLM_BUILDERS["qwen3_vl"](), VLMPolicyOptions(family="qwen3vl"))


# --------------------------------------------------------------------------------------------- ratio invariant


@family_param
def test_ratio_is_one_right_after_rollout_for_micro_batch_1_and_G(family):
    policy = make_policy(family)
    assert policy.family == family
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


@family_param
def test_scorer_matches_the_models_own_forward(family):
    """Our per-prompt forward (features scattered once, the family's positions and deepstack) equals transformers'."""
    policy = make_policy(family)
    rollout = policy.rollout(image_batch(), 2)
    for row in range(rollout.num_rows):
        n = int(rollout.extras["completion_len"][row])
        assert torch.allclose(rollout.logp_old[row, :n], hf_reference_logprobs(policy, rollout, row), atol=1e-5)


def test_qwen3_deepstack_features_reach_the_decoder():
    """Without the adapter's deepstack arguments the scorer would differ from Qwen3-VL's own forward."""
    policy = make_policy("qwen3_vl")
    rollout = policy.rollout(image_batch(), 2)
    prompt = rollout.extras["prompt"][0]
    assert prompt.features["image_deepstack"].shape[:2] == (2, prompt.features["image"].shape[0])  # 2 layers
    policy.adapter.decoder_kwargs = lambda *a, **k: {}  # this instance only: drop deepstack
    with torch.no_grad():
        without = policy.model(rollout.extras["prompt"][:2], rollout.extras["completion_ids"][:2])[0]
    n = int(rollout.extras["completion_len"][0])
    assert (without[0, :n] - rollout.logp_old[0, :n]).abs().max() > 1e-4


@family_param
def test_samples_depend_only_on_the_prompt_seed(family):
    policy = make_policy(family)
    full = policy.rollout(image_batch(seeds=(11, 12)), 3)  # both prompts' rows in one decode loop
    prompts = full.extras["prompt"][::3]
    assert prompts[0].input_ids.shape != prompts[1].input_ids.shape  # so the joined cache is left-padded
    for b in (0, 1):  # each prompt alone (no padding), still with its own seed
        alone = policy.rollout(image_batch(seeds=(11, 12)).select([b]), 3)
        rows = slice(3 * b, 3 * b + 3)
        assert alone.samples == full.samples[rows]
        assert torch.equal(alone.logp_old, full.logp_old[rows])  # the scorer: one forward per prompt either way
        # the sampled distributions too, up to float rounding of the padded batched attention
        assert torch.allclose(alone.extras["token_entropy"], full.extras["token_entropy"][rows], atol=1e-5)
    again = policy.rollout(image_batch(seeds=(11, 99)), 3)
    assert again.samples[:3] == full.samples[:3] and again.samples[3:] != full.samples[3:]


@family_param
def test_rollout_decodes_every_prompts_rows_in_one_loop_and_stops_when_all_have_ended(family):
    """B prefills (one per prompt, unpadded), then one forward of all B*G rows per further token; greedy
    evaluation batches its prompts the same way; a batch whose rows all end at once stops there."""
    policy = make_policy(family, max_new_tokens=6)
    backbone = policy.adapter.backbone(policy.model.hf)
    rows = []
    backbone.register_forward_pre_hook(lambda mod, args, kw: rows.append(kw["inputs_embeds"].shape[:2]),
                                       with_kwargs=True)  # fmt: skip
    rollout = policy.rollout(image_batch(), 4)
    lengths = [p.input_ids.shape[0] for p in rollout.extras["prompt"][::4]]
    T = int(rollout.extras["completion_len"].max())
    steps = [r for r in rows if r[1] == 1]  # decode steps (the scorer's forwards follow, over whole sequences)
    assert T > 1 and rows[:2] == [(1, lengths[0]), (1, lengths[1])]  # the prompts' own prefills
    assert rows[2 : 2 + T - 1] == steps == [(8, 1)] * (T - 1)  # then 8 rows a step, until the last row's last token
    rows.clear()
    texts = policy.generate(image_batch())
    assert len(texts) == 2 and rows[2:] and all(r == (2, 1) for r in rows[2:])
    # every row ends with its first token: no decode step at all
    biased_head(policy, torch.tensor(policy.eos_ids[:1]), value=1e4)
    rows.clear()
    ended = policy.rollout(image_batch(), 4)
    assert ended.extras["completion_len"].tolist() == [1] * 8
    assert rows[:2] == [(1, lengths[0]), (1, lengths[1])] and not [r for r in rows if r[1] == 1]


@family_param
def test_shared_prefix_update_forwards_each_prompt_once_with_the_expanded_loss_and_gradients(family):
    """The update's log-probs forward a prompt once for its rows (its keys/values shared by their completions); the
    loss and the gradients of every parameter, the vision tower's included (trained here), equal those of forwarding
    every row's prompt (shared_prefix=false)."""
    opts = {"finetune": "full", "freeze_vision": False}
    shared, expanded = make_policy(family, **opts), make_policy(family, shared_prefix=False, **opts)
    rollout = shared.rollout(image_batch(), 4)
    rows = torch.tensor([0, 1, 2, 5, 6])  # 3 rows of prompt 0, 2 of prompt 1, in one micro-batch
    adv = torch.tensor([1.0, -0.5, 0.3, -1.0, 0.8])
    shapes = []
    backbone = shared.adapter.backbone(shared.model.hf)
    backbone.register_forward_pre_hook(lambda mod, args, kw: shapes.append(tuple(kw["inputs_embeds"].shape[:2])),
                                       with_kwargs=True)  # fmt: skip
    out = []
    for policy in (shared, expanded):
        lp = policy.log_prob(rollout, rows).logp
        loss, _ = policy_loss(lp, rollout.logp_old[rows], adv, rollout.train_mask[rows], loss="grpo")
        loss.backward()
        grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
        out.append((lp.detach(), loss.detach(), grads))
    (lp_s, loss_s, g_s), (lp_e, loss_e, g_e) = out
    lengths = [p.input_ids.shape[0] for p in rollout.extras["prompt"][::4]]
    T = rollout.extras["completion_ids"].shape[1]
    assert shapes == [(1, lengths[0]), (3, T - 1), (1, lengths[1]), (2, T - 1)]  # prompt once, then its completions
    m = rollout.train_mask[rows]
    assert (lp_s - lp_e).abs().masked_select(m).max() < 1e-5 and abs(loss_s - loss_e) < 1e-5
    tower = vision_tower_names(shared)
    assert g_s.keys() == g_e.keys() and any(g_s[n].abs().sum() > 0 for n in tower & g_s.keys())  # reached
    # max |difference| over every gradient tensor, relative to its largest entry when that is above 1
    worst = max((g_s[n] - g_e[n]).abs().max().item() / max(g_e[n].abs().max().item(), 1.0) for n in g_s)
    assert worst < 1e-5, worst


# ----------------------------------------------------------------------------------------- vision and sampling


@family_param
def test_vision_tower_runs_once_per_prompt_in_rollout(family):
    policy = make_policy(family)
    calls = []
    tower = policy.adapter.vision_tower(policy.model.hf)
    tower.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
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


@family_param
def test_suppressed_tokens_are_never_sampled_even_when_the_model_favours_them(family):
    policy = make_policy(family)
    tok = policy.tokenizer
    assert policy.model.suppress[tok.convert_tokens_to_ids("<|image_pad|>")]  # the family's image placeholder
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


# ----------------------------------------------------------------------------------------- reference and training


@family_param
def test_reference_kl_is_zero_with_untrained_adapters_and_positive_after_a_change(family):
    policy = make_policy(family, reference=True)
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
    # the reference is the model with the adapters disabled: its log-probs are the untouched base model's
    with torch.no_grad():
        ref = policy.model(rollout.extras["prompt"][:4], rollout.extras["completion_ids"][:4], reference=True)[1]
    base = make_policy(family, finetune="full")
    with torch.no_grad():
        expected = base.model(rollout.extras["prompt"][:4], rollout.extras["completion_ids"][:4])[0]
    assert torch.allclose(ref.masked_fill(~mask, 0), expected.masked_fill(~mask, 0), atol=1e-5)
    # the KL term trains the adapters (through the policy log-probs; the reference side is constant)
    lp.kl.sum().backward()
    grads = [p.grad for n, p in policy.model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def vision_tower_names(policy) -> set[str]:
    """Names (as ``policy.model.named_parameters`` gives them) of the vision tower's parameters."""
    tower = policy.adapter.vision_tower(policy.model.hf)
    prefix = next(n for n, m in policy.model.named_modules() if m is tower)
    return {f"{prefix}.{n}" for n, _ in tower.named_parameters()}


@family_param
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_an_optimizer_step_moves_only_trainable_tensors(family, finetune):
    policy = make_policy(family, finetune=finetune)
    rollout = policy.rollout(image_batch(), 2)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    tower = vision_tower_names(policy)
    if finetune == "lora":
        assert trainable and all("lora_" in n for n in trainable)
    else:  # freeze_vision (default): everything but the vision tower
        assert tower <= set(before) and trainable and not trainable & tower
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=0.1)
    adv = torch.linspace(-1, 1, rollout.num_rows)[:, None]  # [N, 1]
    lp = policy.log_prob(rollout, torch.arange(rollout.num_rows)).logp
    (-(adv * lp).masked_select(rollout.train_mask).sum()).backward()
    optimizer.step()
    moved = {n for n, p in policy.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and moved <= trainable


@register("test_vlm_conformance_length")
def _length_reward():
    """Test reward: completion length / 10 (always varies within a group of a random model)."""
    return lambda samples, prompts, meta, ctx: [len(s) / 10.0 for s in samples]


def vlm_config(tmp_path, model_dir, *overrides):
    base = {
        "pipeline": "vlm_reasoning",
        "run": {"name": "vlm", "seed": 0, "output_dir": str(tmp_path / "runs")},
        "data": {"options": {"num_examples": 16, "image_size": 32}},
        "policy": {"options": {"path": str(model_dir), "max_new_tokens": 6, "lora_rank": 4}},
        "rewards": [{"name": "test_vlm_conformance_length"}],
        "loss": {"beta": 0.0},
        "trainer": {
            "max_steps": 2, "prompts_per_step": 2, "group_size": 3, "micro_batch_size": 2, "lr": 0.05,
            "progress": False, "checkpoint_every": 0,
        },
    }  # fmt: skip
    return load_config(None, list(overrides), base=base)


def params_after_training(tmp_path, family, *overrides):
    from mmgrpo.train.components import PIPELINES

    model_dir = save_tiny(*VLM_BUILDERS[family](), tmp_path / family)
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


@family_param
def test_lora_training_changes_only_lora_parameters(tmp_path, family):
    assert "test_vlm_conformance_length" in REWARDS
    changed, after = params_after_training(tmp_path, family)
    lora = {n for n in after if "lora_" in n}
    assert lora and all("language_model" in n for n in lora)  # adapters only on the LM's attention projections
    assert changed and changed <= lora
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


@family_param
def test_full_finetuning_with_frozen_vision_changes_no_vision_parameter(tmp_path, family):
    changed, after = params_after_training(tmp_path, family, "policy.options.finetune=full")
    tower = vision_tower_names(make_policy(family, finetune="full"))
    assert not any("lora_" in n for n in after)
    assert tower <= set(after) and not changed & tower  # the vision tower (Qwen: ".visual.") is frozen
    assert any("language_model" in n for n in changed) and any("lm_head" in n for n in changed)


# ----------------------------------------------------------------------------------------- video and loading


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_prompt_from_a_real_mp4_runs_rollout_and_log_prob(tmp_path, family):
    path = write_mp4(tmp_path / "clip.mp4")  # 8 frames at 4 fps = 2 s
    frames, fps = read_video(path, fps=2.0, max_frames=16)
    # every 2nd frame (4 fps -> 2 fps): 4 frames; effective fps = 4 frames / 2 s = 2
    assert frames.shape == (4, 64, 64, 3) and fps == pytest.approx(2.0)
    assert read_video(path, fps=4.0, max_frames=3)[0].shape[0] == 2  # at most 3, and an even count
    policy = make_policy(family, fps=2.0)
    calls = []
    policy.adapter.vision_tower(policy.model.hf).register_forward_hook(lambda *a: calls.append(1))
    batch = PromptBatch(prompts=["What happens in the video?"], meta=[{"video": str(path)}], seeds=[5])
    rollout = policy.rollout(batch, 3)
    prompt = rollout.extras["prompt"][0]
    assert "pixel_values_videos" in prompt.vision and prompt.vision["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert len(calls) == 1
    assert ratio_error(policy, rollout, 1) < 1e-5 and ratio_error(policy, rollout, 3) < 1e-5
    # temporal M-RoPE (Qwen2.5-VL: second_per_grid_ts from the fps) agrees with transformers' own forward
    n = int(rollout.extras["completion_len"][0])
    assert torch.allclose(rollout.logp_old[0, :n], hf_reference_logprobs(policy, rollout, 0), atol=1e-5)


@family_param
def test_from_pretrained_on_a_saved_local_dir(tmp_path, family):
    model, processor = VLM_BUILDERS[family](seed=3)
    save_tiny(model, processor, tmp_path / "m")
    policy = VLMPolicy.from_pretrained(str(tmp_path / "m"), VLMPolicyOptions(max_new_tokens=5, finetune="full"))
    assert policy.family == family and policy.box_family == BOX_CONVENTION[family]
    assert type(policy.model.hf) is type(model)  # the family's own class (generic: through the Auto class)
    loaded = policy.model.hf.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    rollout = policy.rollout(image_batch(), 2)
    assert rollout.num_rows == 4 and ratio_error(policy, rollout, 2) < 1e-5
    with pytest.raises(UserError, match="is not a directory, and not a hub repository id"):
        VLMPolicy.from_pretrained(str(tmp_path / "missing"))
