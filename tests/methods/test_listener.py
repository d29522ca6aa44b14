"""Listener reward (mmgrpo/methods/listener.py): answer stripping, confidence, the reward's composition, the real
VLM scorer.

The composition tests pass a hand-made ``scorer`` returning fixed log-probs. That is not a mock of the thing under
test: what is tested there is the reward composition (format + accuracy + softmax confidence, row selection, what
the listener is shown); the real transformers scorer has its own test on a tiny Qwen2-VL below.
"""

import math

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.methods.listener import candidate_answers, correct_index, listener_confidence, prompt_text, strip_answer
from mmgrpo.rewards import registry

LN = math.log


def test_strip_answer():
    assert strip_answer("<think>left is sharper</think>\n<answer>Image 1</answer>") == "left is sharper"
    assert strip_answer("no tags, so the answer is B") == "no tags, so the answer is B"  # untagged text stays
    assert strip_answer("reasoning <answer>B</answer> more <answer>C</answer>") == "reasoning  more"
    assert strip_answer("<r>x</r><a>B</a>", think_tag="r", answer_tag="a") == "x"


def test_candidates_and_correct_index():
    assert candidate_answers({"candidates": ["Image 1", "Image 2"]}) == ["Image 1", "Image 2"]
    assert candidate_answers({"options": ["red", "green", "blue"]}) == ["A", "B", "C"]
    # an empty candidates list with options: the options' letters, as the load-time check accepts the row
    assert candidate_answers({"candidates": [], "options": ["red", "green"]}) == ["A", "B"]
    for meta in ({"answer": "B"}, {"candidates": [], "options": []}):
        with pytest.raises(UserError, match="candidates"):
            candidate_answers(meta)
    assert correct_index(["A", "B", "C"], "(b)") == 1
    assert correct_index(["Image 1", "Image 2"], "image 2") == 1
    with pytest.raises(UserError, match="matches"):
        correct_index(["A", "B"], "D")


def test_listener_confidence_is_the_softmax_at_the_correct_candidate():
    # log-probs of probabilities 0.2, 0.5, 0.3 (already normalised): softmax gives them back
    logp = torch.tensor([[LN(0.2), LN(0.5), LN(0.3)], [0.0, 0.0, 100.0]])
    # row 1 has 2 candidates: its third column is padding and ignored -> softmax([0, 0]) = [0.5, 0.5]
    conf = listener_confidence(logp, counts=[3, 2], correct=[1, 0])
    assert conf.tolist() == pytest.approx([0.5, 0.5])
    # unnormalised log-probs: softmax([-1, -3]) at 0 = 1 / (1 + e^-2) = 0.880797
    assert listener_confidence(torch.tensor([[-1.0, -3.0]]), [2], [0]).item() == pytest.approx(0.880797, abs=1e-6)


class FixedScorer:
    """Returns fixed log-probs per row and records what the listener was shown."""

    def __init__(self, logp):
        self.logp, self.calls = torch.tensor(logp), []

    def __call__(self, prompts, meta, reasoning_texts, candidate_answers):
        self.calls.append((prompts, reasoning_texts, candidate_answers))
        return self.logp


def test_reward_composition_with_hand_made_log_probs():
    samples = [
        "<think>the left image is sharper</think><answer>Image 1</answer>",  # format 1, correct
        "Image 2",  # bad format, wrong
        "<think>x</think><answer>A</answer>",  # no ground truth -> None, never shown to the listener
        "<think>I count two</think><answer>B</answer>",  # format 1, correct (choice)
    ]
    meta = [
        {"answer": "Image 1", "candidates": ["Image 1", "Image 2"]},
        {"answer": "Image 1", "candidates": ["Image 1", "Image 2"]},
        {"options": ["1", "2"]},
        {"answer": "B", "options": ["1", "2", "3"]},
    ]
    scorer = FixedScorer(
        [
            [LN(0.8), LN(0.2), -math.inf],  # -> confidence 0.8
            [0.0, 0.0, 0.0],  # 2 candidates, padding ignored -> 0.5
            [LN(0.1), LN(0.6), LN(0.3)],  # correct B -> 0.6
        ]
    )
    fn = registry.get("listener", scorer=scorer)
    out = fn(samples, ["q0", "q1", "q2", "q3"], meta, None)
    # 1 * format + 0.5 * accuracy + 0.5 * confidence
    # row 0: 1 + 0.5 + 0.5 * 0.8 = 1.9; row 1: 0 + 0 + 0.5 * 0.5 = 0.25; row 3: 1 + 0.5 + 0.5 * 0.6 = 1.8
    assert out[2] is None
    assert [out[0], out[1], out[3]] == pytest.approx([1.9, 0.25, 1.8])
    prompts, reasoning, cands = scorer.calls[0]
    assert prompts == ["q0", "q1", "q3"]  # only rows with a ground truth
    assert reasoning == ["the left image is sharper", "Image 2", "I count two"]  # the answers are removed
    assert cands == [["Image 1", "Image 2"], ["Image 1", "Image 2"], ["A", "B", "C"]]
    # other weights: 0 * format + 1 * accuracy + 2 * confidence: row 0 -> 1 + 1.6 = 2.6, row 1 -> 1.0, row 3 -> 2.2
    fn = registry.get("listener", scorer=scorer, w_fmt=0.0, w_acc=1.0, w_lis=2.0)
    out = fn(samples, ["q0", "q1", "q2", "q3"], meta, None)
    assert [out[0], out[1], out[3]] == pytest.approx([2.6, 1.0, 2.2])


def test_factory_errors(tmp_path):
    with pytest.raises(UserError, match="exactly one"):
        registry.get("listener")
    with pytest.raises(UserError, match="exactly one"):
        registry.get("listener", model=str(tmp_path), scorer=FixedScorer([[0.0]]))
    with pytest.raises(UserError, match="not a directory"):
        registry.get("listener", model=str(tmp_path / "missing"))


def test_prompt_text():
    assert prompt_text("q") == "q"
    assert prompt_text({"text": "q"}) == "q"
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    assert prompt_text(chat) == "How many?"


def test_real_scorer_on_a_tiny_qwen2_vl(tmp_path):
    tiny_vlm = pytest.importorskip("mmgrpo.testing.tiny_vlm", reason="needs mmgrpo/testing/tiny_vlm.py")
    from PIL import Image

    model, processor = tiny_vlm.tiny_qwen2_vl(seed=0)
    tiny_vlm.save_tiny(model, processor, tmp_path)
    fn = registry.get("listener", model=str(tmp_path))
    assert fn.scorer is None  # lazy: nothing loaded before the first call
    image = Image.new("RGB", (64, 64), (255, 0, 0))
    meta = [{"image": image, "answer": "B", "options": ["one", "two", "three"]}]
    sample = "<think>I count two red circles</think><answer>B</answer>"
    out = fn([sample], ["How many red circles?"], meta, None)

    # independent computation: the whole text "<chat prefix><candidate>" through the processor in one go
    tok = processor.tokenizer
    text = "How many red circles?\n\nReasoning:\nI count two red circles\n\nBased on this reasoning, the answer is:"
    chat = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    logps = []
    with torch.no_grad():
        for cand in "ABC":
            enc = processor(text=[chat + cand], images=[image], return_tensors="pt")
            n = len(tok(cand, add_special_tokens=False)["input_ids"])
            lp = torch.log_softmax(model(**enc).logits[0, -n - 1 : -1].float(), dim=-1)
            logps.append(lp.gather(-1, enc["input_ids"][0, -n:, None]).sum())
    conf = torch.softmax(torch.stack(logps), 0)[1].item()
    assert 0.0 < conf < 1.0
    assert out[0] == pytest.approx(1.0 + 0.5 * 1.0 + 0.5 * conf, abs=1e-5)  # format 1, accuracy 1
    assert fn.scorer is not None and not any(p.requires_grad for p in fn.scorer.model.parameters())


def test_a_listener_with_a_short_context_loads(tmp_path):
    """The listener writes nothing, so the policy's 128 new tokens are no check of its context (it was refused,
    naming policy.options.max_new_tokens, which the listener does not read)."""
    tiny_vlm = pytest.importorskip("mmgrpo.testing.tiny_vlm", reason="needs mmgrpo/testing/tiny_vlm.py")
    from mmgrpo.methods.listener import VLMListenerScorer

    model, processor = tiny_vlm.tiny_qwen2_vl(seed=0)
    model.config.text_config.max_position_embeddings = 100
    tiny_vlm.save_tiny(model, processor, tmp_path)
    scorer = VLMListenerScorer.from_pretrained(tmp_path)
    assert scorer.model.config.text_config.max_position_embeddings == 100
