"""Pretraining of the shapes VLM (scripts/pretrain_shapes_vlm.py) and the shipped asset assets/shapes_vlm."""

import json
import re
from pathlib import Path

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch
from mmgrpo.data import shapes_qa
from mmgrpo.data.shapes import Obj, Scene
from mmgrpo.methods.pearl import checklist_prompt
from mmgrpo.policies.vlm import VLMPolicy, VLMPolicyOptions
from mmgrpo.rewards.boxes import parse_box
from mmgrpo.rewards.text import extract_answer, has_valid_format
from scripts.pretrain_shapes_vlm import (
    CHECKLIST_MAX_NEW_TOKENS,
    ChecklistExample,
    PretrainVLMConfig,
    build_model,
    build_processor,
    build_tokenizer,
    checklist_scores,
    checklist_target,
    corpus,
    describe,
    make_item,
    make_policy,
    pretrain,
    sft_loss,
    target_text,
    training_examples,
)

ASSET = Path(__file__).resolve().parents[2] / "assets" / "shapes_vlm"
TINY = dict(vision_dim=32, vision_depth=1, vision_heads=2, text_hidden=64, text_layers=1, text_ffn=64)


def test_targets_are_r1_format_with_the_letter_or_the_qwen2_vl_box():
    ex = shapes_qa.make_example(0, "count")
    color, shape = ex.target
    tail = f"</think><answer>{ex.answer}</answer>"
    assert target_text(ex, "template") == f"<think>I count the {color} {shape}s.{tail}"
    left_to_right = sorted(ex.scene.objects, key=lambda o: o.cx)
    names = [f"a {o.color} {o.shape}" for o in left_to_right]  # "I see a red circle, a blue square and a ..."
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    assert target_text(ex) == f"<think>I see {listed}.{tail}"
    scene = Scene((Obj("circle", "red", 0.7, 0.5, 0.3), Obj("square", "blue", 0.2, 0.5, 0.3)))
    assert describe(scene) == "I see a blue square and a red circle."  # left to right, whatever the scene order
    g = shapes_qa.make_example(0, "grounding")
    box = parse_box(extract_answer(target_text(g)))
    # 0..1000 grid of the 64-px image: x * 1000 / 64, rounded
    assert box == [round(v * 1000 / 64) for v in g.box]


def test_checklist_target_is_the_description_then_the_answer_sheet():
    scene = Scene((Obj("circle", "red", 0.7, 0.5, 0.3), Obj("square", "blue", 0.2, 0.5, 0.3)))
    items = [
        ["How many objects are there?", "2"],
        ["Is there a red circle?", "yes"],
        ["Is there a blue square?", "yes"],
        ["Is there a red square?", "no"],
        ["What colour is the circle?", "red"],
        ["What colour is the square?", "blue"],
    ]
    assert checklist_target(scene, items) == (
        "<think>I see a blue square and a red circle.</think><answer>2; yes; yes; no; red; blue</answer>"
    )
    # the sheet of the target scores R_p = 1 under the pearl_checklist reward's parsing; a wrong item costs 1/6
    assert checklist_scores([checklist_target(scene, items)], [items]) == [1.0]
    wrong = "<think>I see a red circle.</think><answer>1; yes; yes; no; red; blue</answer>"
    assert checklist_scores([wrong], [items]) == [pytest.approx(5 / 6)]


def test_the_checklist_kind_asks_exactly_what_the_rl_recipes_checklist_group_asks():
    config = PretrainVLMConfig()
    assert "checklist" in config.kind_list() and config.kind_list()[:4] == shapes_qa.QA_KINDS
    item = make_item(5, "checklist", config)
    ex = shapes_qa.make_example(5, None, kinds=shapes_qa.MC_KINDS)  # vlm_reasoning's scene of seed 5
    assert isinstance(item, ChecklistExample) and item.example == ex
    prompt, meta = checklist_prompt(ex.meta())
    assert item.prompt() == prompt and item.prompt()["question"].startswith("Answer each question about the image")
    assert item.meta()["checklist"] == meta["checklist"] == [list(i) for i in ex.checklist]
    assert item.meta()["stream"] == "checklist" and (item.meta()["images"][0] == ex.image).all()
    assert target_text(item) == target_text(item, "template") == checklist_target(ex.scene, ex.checklist)
    # the checklist is mixed into the batches like the other kinds (drawn uniformly per scene)
    kinds = [e.kind for step in range(4) for e in training_examples(step, 16, config)]
    assert set(kinds) == {"count", "color", "position", "grounding", "checklist"}


def test_the_tokenizer_covers_the_checklist_phrasing_and_the_longest_sheet_fits():
    tok = build_tokenizer()
    assert any(line.startswith("Answer each question about the image") for line in corpus())
    q = make_item(5, "checklist", PretrainVLMConfig()).prompt()["question"]
    words = [t.lstrip("Ġ") for t in tok.tokenize(q) if t.lstrip("Ġ").isalpha()]
    assert words == re.findall(r"[A-Za-z]+", q)  # every word of the checklist question is one token
    assert tok.tokenize(" Is there a yellow triangle?") == ["ĠIs", "Ġthere", "Ġa", "Ġyellow", "Ġtriangle", "?"]
    three = Scene(
        tuple(Obj(s, "yellow", x, 0.5, 0.2) for s, x in [("triangle", 0.2), ("circle", 0.5), ("square", 0.8)])
    )
    items = [["q", "3"]] + [["q", "yes"]] * 3 + [["q", "no"]] + [["q", "yellow"]] * 3  # the most items: 8
    assert len(tok(checklist_target(three, items) + "<|im_end|>").input_ids) <= CHECKLIST_MAX_NEW_TOKENS


def test_tokenizer_splits_digits_and_keeps_the_tags_whole():
    tok = build_tokenizer()
    assert tok.tokenize("(250,125)") == ["(", "2", "5", "0", ",", "1", "2", "5", ")"]
    assert tok.tokenize("<think>x</think><answer>B</answer>")[:1] == ["<think>"]
    assert len(tok.tokenize("How many red circles are there?")) <= 8  # the shapes phrasing is compressed


def test_batched_sft_loss_is_exactly_the_policys_token_log_prob():
    torch.manual_seed(0)
    config = PretrainVLMConfig(**TINY)
    tok = build_tokenizer()
    policy = make_policy(build_model(config, tok), build_processor(tok, config))
    exs = [shapes_qa.make_example(s, k) for s, k in [(1, "count"), (2, "grounding"), (3, "color")]]
    prompts = [policy.prepare(e.prompt(), e.meta()) for e in exs]
    targets = [tok(target_text(e) + "<|im_end|>").input_ids for e in exs]  # different lengths: padding is exercised
    L = max(len(t) for t in targets)
    comp, mask = torch.full((3, L), policy.pad_id), torch.zeros(3, L)
    for i, t in enumerate(targets):
        comp[i, : len(t)], mask[i, : len(t)] = torch.tensor(t), 1.0
    policy.model.eval()
    with torch.no_grad():
        logp, _ = policy.model(prompts, comp)  # the RL scorer: one forward per prompt, no padding  [3, L]
        ours = sft_loss(policy.model.hf, prompts, targets, policy.pad_id, policy.model.suppress)  # one padded batch
    assert ours.item() == pytest.approx((-(logp * mask).sum() / mask.sum()).item(), abs=1e-5)


def test_pretrain_a_few_steps_writes_a_loadable_asset_with_a_readme(tmp_path):
    config = PretrainVLMConfig(**TINY, steps=4, batch_size=4, warmup=1, eval_per_kind=2)
    summary = pretrain(config, tmp_path / "m", command="python -m scripts.pretrain_shapes_vlm --steps 4")
    assert summary["steps_done"] == 4 and summary["params"]["vision"] > 0
    h = summary["heldout"]
    assert set(h) == {
        "count",
        "color",
        "position",
        "mc_accuracy",
        "grounding_mean_iou",
        "grounding_acc_at_0.5",
        "format",
        "checklist_reward",
        "checklist_format",
    }
    assert 0.0 <= h["checklist_reward"] <= 1.0
    assert h["mc_accuracy"] == pytest.approx((h["count"] + h["color"] + h["position"]) / 3)
    readme = (tmp_path / "m" / "README.md").read_text()
    assert "--steps 4" in readme and "mean IoU" in readme and "mean R_p" in readme
    assert json.loads((tmp_path / "m" / "summary.json").read_text())["steps_done"] == 4
    assert VLMPolicy.from_pretrained(str(tmp_path / "m"), VLMPolicyOptions(finetune="full")).family == "qwen2_vl"
    with pytest.raises(UserError, match="kinds='count,size'"):
        PretrainVLMConfig(kinds="count,size")
    with pytest.raises(UserError, match="think='story'"):
        PretrainVLMConfig(think="story")


def test_a_tiny_run_with_the_checklist_kind_logs_r_p_in_the_history(tmp_path):
    config = PretrainVLMConfig(
        **TINY, kinds="checklist,count", steps=4, batch_size=4, warmup=1, eval_per_kind=4, eval_every=2
    )
    summary = pretrain(config, None)
    assert summary["steps_done"] == 4 and summary["config"]["kinds"] == "checklist,count"
    assert [e["step"] for e in summary["history"] if "checklist_reward" in e] == [2]
    assert 0.0 <= summary["heldout"]["checklist_reward"] <= 1.0


def test_the_shipped_asset_is_small_loads_and_answers_in_format():
    size = sum(f.stat().st_size for f in ASSET.iterdir() if f.is_file())
    assert (ASSET / "model.safetensors").is_file() and (ASSET / "README.md").is_file() and size < 15e6, size
    options = VLMPolicyOptions(finetune="full", system_prompt="", max_new_tokens=32)
    policy = VLMPolicy.from_pretrained(str(ASSET), options)
    assert policy.family == "qwen2_vl" and policy.box_family == "qwen2_vl"
    exs = [shapes_qa.make_example(s, k) for s, k in zip(shapes_qa.heldout_seeds(4), shapes_qa.QA_KINDS)]
    texts = policy.generate(PromptBatch([e.prompt() for e in exs], [e.meta() for e in exs]))
    assert all(has_valid_format(t) for t in texts), texts
    for e, t in zip(exs, texts):
        answer = extract_answer(t)
        if e.kind == "grounding":  # "(x1,y1),(x2,y2)" on the 0..1000 grid
            box = parse_box(answer)
            assert box is not None and all(0 <= v <= 1000 for v in box), t
        else:
            assert answer in ("A", "B", "C", "D"), t
