"""Method rewards of the VLM recipe on tiny REAL models: pearl_checklist, acre (re-asks the policy), vlm_listener."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mmgrpo import rewards as reward_registry
from mmgrpo.core.errors import UserError
from mmgrpo.core.types import RewardContext
from mmgrpo.methods.acre import choice_letter, map_back, reask_generator, shuffle_options
from mmgrpo.methods.listener import VLMListenerScorer
from mmgrpo.policies.vlm import VLMPolicy, VLMPolicyOptions

ASSET = Path(__file__).resolve().parents[2] / "assets" / "tiny_qwen2_vl"
QUESTION = "How many red circles are there?"


def image(seed=0, size=64):
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- pearl_checklist


def test_pearl_checklist_scores_checklist_rows_only():
    fn = reward_registry.get("pearl_checklist")
    items = [["How many red objects are there?", "2"], ["Is there a triangle?", "yes"]]
    check = {"checklist": items, "stream": "checklist"}
    samples = [
        "<think>two red</think><answer>2; no</answer>",  # 1 of 2 right -> 0.5
        "<answer>2;yes</answer>",  # both right -> 1.0
        "<answer>2</answer>",  # the second answer is missing ("" is wrong) -> 0.5
        "<answer>two; yes; extra</answer>",  # "two" is not 2 (numeric), "yes" right, extra dropped -> 0.5
        "<answer>2; yes</answer>",  # a reasoning row: None
        "<answer>2; yes</answer>",  # no PEARL stream: None
    ]
    meta = [check, check, check, check, {"checklist": items, "stream": "reasoning"}, {"checklist": items}]
    assert fn(samples, [None] * 6, meta, RewardContext(1)) == [0.5, 1.0, 0.5, 0.5, None, None]
    with pytest.raises(UserError, match="unknown mode"):
        reward_registry.get("pearl_checklist", mode="fuzzy")


# ----------------------------------------------------------------------------------------------- acre


class RecordingPolicy:
    """The real policy, with the generate calls it receives recorded (the reward under test is not touched)."""

    def __init__(self, policy):
        self.policy, self.calls, self.answers = policy, [], []

    def generate(self, batch, greedy=True):
        self.calls.append((batch, greedy))
        self.answers = self.policy.generate(batch, greedy=greedy)
        return self.answers


@pytest.fixture(scope="module")
def asset_policy():
    torch.manual_seed(0)
    return VLMPolicy.from_pretrained(str(ASSET), VLMPolicyOptions(max_new_tokens=24, finetune="full"))


def test_acre_reasks_with_shuffled_options_and_the_rewritten_letter(asset_policy):
    img = image()
    prompt = {"question": QUESTION, "options": ["1", "2", "3"]}
    samples = [
        "<think>I count two, so option B is right.</think><answer>B</answer>",  # correct first answer
        "<think>Option A.</think><answer>A</answer>",  # wrong first answer: 0 whatever the second says
        "<think>no options here</think><answer>2</answer>",  # a non-MC prompt: None
    ]
    prompts = [prompt, prompt, {"question": "Count the circles."}]
    meta = [{"answer": "B", "images": [img], "index": 7}, {"answer": "B", "images": [img]}, {"answer": "2"}]
    recorder = RecordingPolicy(asset_policy)
    fn = reward_registry.get("acre")
    out = fn(samples, prompts, meta, RewardContext(group_size=2, step=0, policy=recorder))
    # row 0 (step 0, slot 0 of its group): perm [1, 2, 0] -> shown A) 2  B) 3  C) 1; old B ("2") is new A
    # row 1 (slot 1): perm [2, 0, 1] -> shown A) 3  B) 1  C) 2; old A ("1") is new B
    perms = [[1, 2, 0], [2, 0, 1]]
    ((batch, greedy),) = recorder.calls
    assert greedy and len(batch) == 2
    ask0, ask1 = (p["question"] for p in batch.prompts)
    assert "Options:\nA. 2\nB. 3\nC. 1" in ask0 and "<think>I count two, so option A is right.</think>" in ask0
    assert "Options:\nA. 3\nB. 1\nC. 2" in ask1 and "<think>Option B.</think>" in ask1
    assert "<answer>" not in ask0.split("<think>")[1].split("</think>")[0]  # the first answer is not shown
    assert batch.meta[0]["images"][0] is img and "index" not in batch.meta[0]  # the same image, media only
    assert fn.last_reasks == [ask0, ask1]
    # the second answers (the policy's greedy letters), mapped back, decide consistency: table 1.0 / 0.5 / 0 / 0
    second = [choice_letter(a, 3) for a in recorder.answers]
    consistent0 = second[0] is not None and map_back(second[0], perms[0]) == "B"
    assert out[0] == (1.0 if consistent0 else 0.5)
    assert out[1] == 0.0 and out[2] is None
    assert fn.last_metrics()["acre/consistent"] == pytest.approx(
        (consistent0 + (second[1] is not None and map_back(second[1], perms[1]) == "A")) / 2
    )
    # the shuffle is seeded by (seed, step, question, slot): step 1, slot 0 gives [2, 0, 1] (old B -> new C)
    assert shuffle_options(["1", "2", "3"], reask_generator(0, 1, QUESTION, 0))[1] == [2, 0, 1]
    recorder.calls.clear()
    fn(samples[:1], prompts[:1], meta[:1], RewardContext(group_size=2, step=1, policy=recorder))
    assert "option C is right" in recorder.calls[0][0].prompts[0]["question"]


def test_acre_table_overrides_and_needs_the_policy(asset_policy):
    prompt = {"question": QUESTION, "options": ["1", "2"]}
    fn = reward_registry.get("acre", table={"correct_inconsistent": 0.3, "correct_consistent": 2.0})
    recorder = RecordingPolicy(asset_policy)
    out = fn(
        ["<answer>A</answer>"], [prompt], [{"answer": "A", "images": [image()]}], RewardContext(1, 0, None, recorder)
    )
    second = recorder.answers[0]
    # 2 options: the only non-identity perm is [1, 0]; consistent iff the re-asked letter is B (old A)
    assert out == [2.0 if choice_letter(second, 2) == "B" else 0.3]
    with pytest.raises(UserError, match="ctx.policy"):
        fn(["<answer>A</answer>"], [prompt], [{"answer": "A"}], RewardContext(1))
    with pytest.raises(UserError, match="unknown table key"):
        reward_registry.get("acre", table={"right": 1.0})


# ----------------------------------------------------------------------------------------------- vlm_listener


def hf_candidate_logprob(scorer, prompt, meta, reasoning, candidate):
    """sum_t log p(candidate_t | prefix) by the transformers model's own forward, written out here."""
    prefix = scorer._prefix(prompt, meta, reasoning)
    ids = prefix["input_ids"]
    cand = torch.tensor([scorer.processor.tokenizer(candidate, add_special_tokens=False)["input_ids"]])
    full = torch.cat([ids, cand], 1)
    extra = {k: v for k, v in prefix.items() if k in ("pixel_values", "image_grid_thw")}
    types = torch.cat([prefix["mm_token_type_ids"], torch.zeros_like(cand)], 1)
    with torch.no_grad():
        logits = scorer.model(input_ids=full, mm_token_type_ids=types, **extra).logits[0].float()
    logp = torch.log_softmax(logits[ids.shape[1] - 1 : -1], -1)  # [l, V]: slot t predicts candidate token t
    return logp.gather(-1, cand[0, :, None]).sum().item()


def test_vlm_listener_reads_chat_template_image_and_options_and_scores_candidates():
    fn = reward_registry.get("vlm_listener", model=str(ASSET))
    assert fn.scorer.scorer is None  # lazy: nothing loaded by the factory
    prompt = {"question": QUESTION, "options": ["1", "2", "3"]}
    meta = {"answer": "B", "images": [image(0)], "options": ["1", "2", "3"]}
    samples = [
        "<think>I count two circles.</think><answer>B</answer>",  # format 1, accuracy 1
        "<think>I count two circles.</think><answer>A</answer>",  # format 1, accuracy 0
        "B",  # format 0, accuracy 1
        "<think>x</think><answer>B</answer>",  # no ground truth: None
    ]
    metas = [meta, meta, meta, {"images": [image(0)]}]
    out = fn(samples, [prompt] * 4, metas, RewardContext(4))
    scorer = fn.scorer.scorer
    assert isinstance(scorer, VLMListenerScorer) and type(scorer.model).__name__ == "Qwen2VLForConditionalGeneration"
    assert not any(p.requires_grad for p in scorer.model.parameters()) and not scorer.model.training
    # the prefix: the chat template, the image's tokens, the question WITH its lettered options, the reasoning
    prefix = scorer._prefix(prompt, meta, "I count two circles.")
    text = scorer.processor.tokenizer.decode(prefix["input_ids"][0])
    n_image_tokens = int(prefix["image_grid_thw"].prod()) // 4  # 2x2 spatial merge
    assert text.count("<|image_pad|>") == n_image_tokens > 0 and "<|vision_start|>" in text
    assert f"{QUESTION} A) 1 B) 2 C) 3\n\nReasoning:\nI count two circles." in text
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    # candidate log-probs = the model's own forward; the image changes them (the listener sees it)
    logp = scorer([prompt], [meta], ["I count two circles."], [["A", "B", "C"]])[0]  # [C]
    by_hand = [hf_candidate_logprob(scorer, prompt, meta, "I count two circles.", c) for c in "ABC"]
    assert logp.tolist() == pytest.approx(by_hand, abs=1e-4)
    other = scorer([prompt], [{**meta, "images": [image(5)]}], ["I count two circles."], [["A", "B", "C"]])[0]
    assert not torch.allclose(logp, other)
    # reward = 1 * format + 0.5 * accuracy + 0.5 * softmax(logp)[B]; reasoning of rows 0-1 is the same text
    conf = torch.softmax(logp, 0)[1].item()
    assert out[0] == pytest.approx(1.0 + 0.5 + 0.5 * conf, abs=1e-5)
    assert out[1] == pytest.approx(1.0 + 0.0 + 0.5 * conf, abs=1e-5)
    conf_b = torch.softmax(scorer([prompt], [meta], ["B"], [["A", "B", "C"]])[0], 0)[1].item()  # reasoning = "B"
    assert out[2] == pytest.approx(0.0 + 0.5 + 0.5 * conf_b, abs=1e-5) and out[3] is None
    with pytest.raises(UserError, match="not a directory"):
        reward_registry.get("vlm_listener", model=str(ASSET / "missing"))
