"""The two shapes-VLM RL configs, and vlm_reasoning's ``source: shapes_qa`` (multiple choice split by scene seed)."""

from pathlib import Path

import numpy as np
import pytest

from mmgrpo.core import progress
from mmgrpo.core.errors import UserError
from mmgrpo.data import shapes_qa
from mmgrpo.pipelines.vlm_reasoning import (
    PairedScores,
    QAExamples,
    QAPrompts,
    VLMReasoningDataOptions,
    evaluate_accuracy,
)
from mmgrpo.policies.vlm import VLMPolicy, VLMPolicyOptions
from mmgrpo.train.config import load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "name, pipeline", [("shapes_vlm_grpo", "vlm_reasoning"), ("shapes_grounding_medloc", "vlm_grounding")]
)
def test_configs_open_with_their_command_and_start_from_the_shapes_vlm(name, pipeline):
    path = REPO / "configs" / f"{name}.yaml"
    assert path.read_text().splitlines()[0] == f"# mmgrpo train configs/{name}.yaml"
    cfg = load_config(path)
    assert cfg.pipeline == pipeline and cfg.policy.options["path"] == "assets/shapes_vlm"
    assert cfg.policy.options["system_prompt"] == ""  # the asset's pretraining prompt
    names = [r.name for r in cfg.rewards]
    assert "format" in names and ("accuracy" in names if pipeline == "vlm_reasoning" else "iou_curriculum" in names)


def test_reasoning_source_shapes_qa_is_multiple_choice_split_by_scene_seed():
    ex = QAExamples(VLMReasoningDataOptions(source="shapes_qa", num_examples=40, eval_examples=12))
    assert ex.train == shapes_qa.train_seeds(40) and ex.heldout == shapes_qa.heldout_seeds(12)
    kinds = set()
    for i in ex.heldout:
        prompt, meta = ex.example(i)
        ref = shapes_qa.make_example(i, None, kinds=shapes_qa.MC_KINDS)
        assert prompt == {"question": ref.question, "options": list(ref.options)} and meta["answer"] == ref.answer
        assert meta["checklist"] and meta["image_size"] == (64, 64)
        kinds.add(meta["kind"])
    assert kinds == set(shapes_qa.MC_KINDS)
    with pytest.raises(UserError, match="source='shapes_q'"):
        QAExamples(VLMReasoningDataOptions(source="shapes_q"))


def test_paired_scores_give_the_standard_error_of_a_change_on_the_same_examples():
    paired = PairedScores()
    before = [1, 1, 0, 0, 1, 0, 1, 0]
    first = paired(0, {"accuracy": before})
    assert first == {"accuracy_se": pytest.approx(np.sqrt(0.25 * 8 / 7 / 8))}  # p = 0.5, ddof 1: no gain at step 0
    after = [1, 1, 1, 0, 1, 0, 1, 1]  # two answers flipped to correct, none lost
    out = paired(50, {"accuracy": after})
    # d = after - before = two 1s and six 0s: mean 0.25, sample variance (2 * 0.75^2 + 6 * 0.25^2) / 7 = 1.5 / 7
    assert out["accuracy_gain"] == pytest.approx(0.25)
    assert out["accuracy_gain_se"] == pytest.approx(np.sqrt(1.5 / 7 / 8))
    assert out["accuracy_gain_se"] < first["accuracy_se"]  # the paired SE is what makes a small gain measurable
    assert "accuracy_gain" not in PairedScores()(50, {"accuracy": after})  # resumed past step 0: no baseline


def test_reasoning_evaluation_reports_kinds_and_a_zero_gain_for_an_unchanged_policy(capsys):
    opts = VLMPolicyOptions(path=str(REPO / "assets/shapes_vlm"), system_prompt="", max_new_tokens=28, finetune="full")
    policy = VLMPolicy.from_pretrained(opts.path, opts)
    examples = QAExamples(VLMReasoningDataOptions(source="shapes_qa", num_examples=8, eval_examples=6))
    paired = PairedScores()
    first = evaluate_accuracy(policy, examples, 6, 3, paired, step=0).metrics
    kinds = [examples.example(i)[1]["kind"] for i in examples.heldout]
    for kind in set(kinds):
        assert 0.0 <= first[f"accuracy_{kind}"] <= 1.0
    with progress.shown("run eval, step 10"):  # the trainer's bar of its batches (trainer.progress)
        again = evaluate_accuracy(policy, examples, 6, 3, paired, step=10).metrics
    assert "run eval, step 10:" in capsys.readouterr().err
    assert (
        again["accuracy"] == first["accuracy"] and again["accuracy_gain"] == 0.0 and again["accuracy_gain_se"] == 0.0
    )


def test_train_kinds_restrict_the_training_stream_but_not_the_heldout_evaluation():
    data = VLMReasoningDataOptions(source="shapes_qa", num_examples=60, eval_examples=30, train_kinds=["position"])
    ex = QAExamples(data)
    stream = QAPrompts(ex, order_seed=0, example=ex.train_example).get(list(range(20)))
    assert {m["kind"] for m in stream.meta} == {"position"}
    assert {ex.example(i)[1]["kind"] for i in ex.heldout} == set(shapes_qa.MC_KINDS)  # evaluation: all three kinds
    everything = QAExamples(VLMReasoningDataOptions(source="shapes_qa", num_examples=60, eval_examples=30))
    assert everything.train_example(ex.train[0])[0] == everything.example(ex.train[0])[0]  # default: all kinds
    with pytest.raises(UserError, match="train_kinds"):
        QAExamples(VLMReasoningDataOptions(source="shapes_qa", train_kinds=["grounding"]))
    with pytest.raises(UserError, match="train_kinds"):
        QAExamples(VLMReasoningDataOptions(source="shapes", train_kinds=["count"]))


def test_difficulty_applies_to_training_and_evaluation():
    data = VLMReasoningDataOptions(source="shapes_qa", num_examples=30, eval_examples=12, difficulty="shuffled")
    ex = QAExamples(data)
    prompts = QAPrompts(ex, order_seed=0, example=ex.train_example)
    stream = prompts.get(list(range(6)))
    for j, prompt, meta in zip(range(6), stream.prompts, stream.meta):
        i = prompts.example_at(j)
        ref = shapes_qa.make_example(i, None, kinds=shapes_qa.MC_KINDS, difficulty="shuffled")
        assert prompt["question"] == ref.question and meta["answer"] == ref.answer
    for i in ex.heldout:
        ref = shapes_qa.make_example(i, None, kinds=shapes_qa.MC_KINDS, difficulty="shuffled")
        normal = shapes_qa.make_example(i, None, kinds=shapes_qa.MC_KINDS)
        assert ex.example(i)[0]["options"] == list(ref.options) and ref.scene == normal.scene
        assert ref.answer != normal.answer and ex.example(i)[1]["answer"] == ref.answer
    with pytest.raises(UserError, match="difficulty='harder'"):
        QAExamples(VLMReasoningDataOptions(source="shapes_qa", difficulty="harder"))
    with pytest.raises(UserError, match="difficulty needs source: shapes_qa"):
        QAExamples(VLMReasoningDataOptions(source="shapes", difficulty="shuffled"))
