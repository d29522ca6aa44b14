"""Hostile VLM datasets (vlm_reasoning, vlm_grounding; docs/data.md), fed to the real loaders: a field of the wrong
type, a conversation the converters cannot read whole, a box no answer can match, is a UserError naming the file, the
line and the field at load (each used to load silently, or fail mid-training with a TypeError or an image_size error
naming no file); legitimate variants load; images reach the model as they look."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmgrpo.core.errors import UserError
from mmgrpo.data.vlm_formats import parse_box_value
from mmgrpo.methods.registry import check_example_keys
from mmgrpo.pipelines.vlm_grounding import GroundingExamples, VLMGroundingDataOptions, load_grounding_jsonl
from mmgrpo.pipelines.vlm_reasoning import QAExamples, VLMReasoningDataOptions, load_jsonl, load_jsonl_lines
from mmgrpo.policies.vlm_inputs import load_image
from mmgrpo.testing.data_files import jsonl, raises
from mmgrpo.train.cli import main
from mmgrpo.train.config import load_config

QA = {"question": "What colour?", "answer": "red", "image": "a.png"}
BOX = {"image": "a.png", "question": "Locate it.", "box": [1, 2, 10, 12]}


def test_a_json_list_a_torn_line_and_a_repeated_key_in_a_vlm_file(folder):
    (folder / "d.json").write_text(json.dumps([QA, {**QA, "answer": None}], indent=2))
    raises(load_jsonl, folder / "d.json", r"d.json line 7: 'answer' must be text")
    (folder / "d.json").write_text(json.dumps([QA, QA], indent=2) + "\n")
    assert len(load_jsonl(folder / "d.json")) == 2
    (folder / "d.jsonl").write_text(jsonl(QA) + '{"question": "How many')
    raises(load_jsonl, folder / "d.jsonl", r"d.jsonl line 2 is not valid JSON .*looks cut off")
    (folder / "d.jsonl").write_text(jsonl(QA, '{"question": "q", "answer": "a", "answer": "b"}'))
    raises(load_jsonl, folder / "d.jsonl", r"d.jsonl line 2: the key 'answer' appears twice")
    raises(load_jsonl, folder, r"data.options.path='.*' is a folder; give a JSONL file")


# ---------------------------------------------------------------------------------------------- VLM reasoning


@pytest.mark.parametrize(
    "row, match",
    [
        ([1, 2], r"each example needs 'question' and 'answer'; got a JSON array"),
        ({**QA, "question": 5}, r"'question' must be a non-empty string, got 5"),
        ({**QA, "question": " "}, r"'question' must be a non-empty string"),
        ({**QA, "answer": None}, r"'answer' must be text, a number or a list of acceptable answers, got null"),
        ({**QA, "answer": {"text": "red"}}, r"'answer' must be text"),
        ({**QA, "answer": []}, r"'answer' must be text"),
        ({**QA, "answer": True}, r"'answer' must be text"),
        ({**QA, "options": "red, blue"}, r"'options' must be a list of choices"),
        ({**QA, "image": 5}, r"'image' must hold image paths \(non-empty strings\), got 5"),
        ({**QA, "image": ""}, r"'image' must hold image paths"),
        ({**QA, "image": ["a.png"]}, r"'image' must hold image paths"),
        ({**QA, "images": ["a.png"]}, r"give 'image' \(one path\) or 'images' \(a list of paths\), not both"),
        ({**QA, "image": None, "images": "a.png"}, r"'images' must be a list of paths"),
        ({**QA, "video": 3}, r"'video' must be a path"),
        ({**QA, "image": "."}, r"image '.*' is a folder, not a file"),
        ({**QA, "image": "gone.png"}, r"image '.*gone.png' not found"),
        ({"prompt": [{"role": "system", "content": "Think."}], "solution": "red"}, r"no user turn with text"),
        ({"prompt": [{"role": "bot", "content": "q"}], "solution": "red"}, r"unknown role 'bot'"),
        (
            {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "red"}], "solution": "red"},
            r"'prompt' holds an 'assistant' turn",
        ),  # fmt: skip
        (
            {
                "prompt": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}]}
                ],
                "images": ["a.png"],
                "solution": "red",
            },
            r"2 image placeholder\(s\) but .* 1 image",
        ),  # fmt: skip
        ({"prompt": [{"role": "user", "content": "q"}], "solution": None}, r"'answer' must be text"),
        (
            {"image": "a.png", "conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]},
            r"unknown turn 'from': 'robot'",
        ),  # fmt: skip
        (
            {"image": "a.png", "conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "a"}]},
            r"a 'human' turn's 'value' must be text, got null",
        ),  # fmt: skip
        (
            {"conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
            r"1 <image> placeholder\(s\) but the example names 0 image",
        ),  # fmt: skip
        (
            {
                "image": "a.png",
                "conversations": [{"from": "human", "value": "<image><image>q"}, {"from": "gpt", "value": "a"}],
            },
            r"2 <image> placeholder",
        ),  # fmt: skip
        (
            {"image": "a.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
            r"'answer' must be text",
        ),  # fmt: skip
    ],
)
def test_bad_vlm_records_name_the_line_and_the_field(folder, row, match):
    (folder / "d.jsonl").write_text(jsonl(QA, row))
    raises(load_jsonl, folder / "d.jsonl", rf"d.jsonl line 2: .*{match}")


def test_legitimate_vlm_records_load(folder):
    (folder / "sub").mkdir()
    rows = [
        {**QA, "answer": 3, "options": ["1", 2, "3"], "image": "../a.png"},  # relative to the file, up a folder
        {**QA, "answer": ["red", "crimson"], "image": None},  # a text-only question
        {**QA, "image": str(folder / "a.png")},
        {**QA, "images": ["../a.png", "../a.png"], "image": None},
    ]
    (folder / "sub" / "d.jsonl").write_text(jsonl(*rows))
    ex = load_jsonl(folder / "sub" / "d.jsonl")
    assert ex[0][0]["options"] == ["1", 2, "3"] and ex[1][1]["images"] == [] and ex[1][1]["answer"][1] == "crimson"
    assert ex[2][1]["images"] == [str(folder / "a.png")] and len(ex[3][1]["images"]) == 2
    assert Image.open(ex[0][1]["images"][0]).size == (32, 24)


def test_unused_system_and_later_turns_are_named_in_one_warning(folder):
    trl = {"prompt": [{"role": "system", "content": "Think first."}, {"role": "user", "content": "q"}],
           "solution": "red"}  # fmt: skip
    turns = [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"},
             {"from": "gpt", "value": "a2"}]  # fmt: skip
    (folder / "d.jsonl").write_text(jsonl(trl, trl, {"conversations": turns}))
    with pytest.warns(UserWarning) as w:
        ex = load_jsonl(folder / "d.jsonl")
    messages = sorted((str(x.message) for x in w), key=lambda m: "system" not in m)
    assert len(messages) == 2 and "2 example(s) hold a system turn" in messages[0]
    assert "lines 1, 2" in messages[0] and "policy.options.system_prompt" in messages[0]
    assert "1 example(s) hold the turns after the first answer" in messages[1] and "(lines 3)" in messages[1]
    assert ex[2][0]["question"] == "q1" and ex[2][1]["answer"] == "a1"


def test_16_bit_float_and_transparent_images_reach_the_model_as_they_look(tmp_path):
    grey = np.full((4, 4), 32768, dtype=np.uint16)  # mid-grey in 16 bits: convert("RGB") made it white
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert load_image(tmp_path / "g16.png").getpixel((0, 0)) == (128, 128, 128)
    assert load_image(Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))).getpixel((0, 0)) == (128,) * 3
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # a transparent background that hides red
    assert load_image(clear).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(Image.new("RGBA", (4, 4), (255, 0, 0, 255))).getpixel((0, 0)) == (255, 0, 0)
    assert load_image(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(Image.new("L", (1, 1), 7)).size == (1, 1)


# ---------------------------------------------------------------------------------------------- VLM grounding


@pytest.mark.parametrize(
    "row, match",
    [
        ({**BOX, "box": [10, 12, 1, 2]}, r"box \[10.0, 12.0, 1.0, 2.0\] has x2 <= x1 or y2 <= y1"),
        ({**BOX, "box": [5, 5, 5, 9]}, r"has x2 <= x1"),
        ({**BOX, "box": [-1, 2, 10, 12]}, r"reaches outside the 32x24 image"),
        ({**BOX, "box": [0, 0, 33, 10]}, r"reaches outside the 32x24 image"),
        ({**BOX, "box": "[1e999, 2, 10, 12]"}, r"box must be \[x1, y1, x2, y2\]"),
        ({**BOX, "box": [True, 2, 10, 12]}, r"box must be"),
        ({**BOX, "image_size": "32x24"}, r"'image_size' must be \[width, height\] in pixels.*got '32x24'"),
        ({**BOX, "image_size": [32]}, r"'image_size' must be \[width, height\]"),
        ({**BOX, "image_size": [0, 0]}, r"'image_size' must be \[width, height\]"),
        ({**BOX, "question": 5}, r"'question' must be a non-empty string"),
        ({**BOX, "image": 5}, r"'image' must be a path, got 5"),
        ({**BOX, "images": ["a.png"]}, r"give 'image' \(one path\), not 'images' as well"),
        ({"image": "a.png", "problem": None, "solution": [1, 2, 3, 4]}, r"'question' must be a non-empty string"),
        # parsed, then float() raised OverflowError: a traceback naming no line
        ({"image": "a.png", "problem": "q", "solution": [0, 0, 10**400, 5]}, r"the integer 10+.* too large for a"),
    ],
)
def test_bad_grounding_records_name_the_line_and_the_field(folder, row, match):
    (folder / "g.jsonl").write_text(jsonl(BOX, row))
    raises(load_grounding_jsonl, folder / "g.jsonl", rf"g.jsonl line 2: .*{match}")


def test_a_box_of_an_integer_past_a_floats_range_is_named_not_an_overflow():
    # a dataset row's values arrive as Python values, not JSON: the box check itself refuses them
    raises(parse_box_value, [0, 0, 10**400, 5], r"^row 3: box must be \[x1, y1, x2, y2\]", "row 3")


def test_boxes_in_the_original_size_and_in_scientific_notation_load(folder):
    rows = [{**BOX, "box": [0, 0, 64, 48], "image_size": [64, 48]}, {**BOX, "box": "<answer>[1e1, 2, 3E1, 2.4e1]"}]
    (folder / "g.jsonl").write_text(jsonl(*rows))
    (_, m0), (_, m1) = load_grounding_jsonl(folder / "g.jsonl")
    assert m0["image_size"] == (64, 48) and m1["box"] == [10.0, 2.0, 30.0, 24.0] and m1["image_size"] == (32, 24)


def test_one_example_cannot_be_split_into_train_and_held_out(folder):
    (folder / "d.jsonl").write_text(jsonl(QA))
    with pytest.raises(UserError, match=r"data.options.path='.*d.jsonl' holds 1 example\(s\); the seeded train"):
        QAExamples(VLMReasoningDataOptions(path=str(folder / "d.jsonl")))
    (folder / "g.jsonl").write_text(jsonl(BOX))
    with pytest.raises(UserError, match=r"g.jsonl' holds 1 example\(s\).*needs at least 2: add examples"):
        GroundingExamples(VLMGroundingDataOptions(path=str(folder / "g.jsonl")))


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "config, key, extra, needed",
    [
        ("vlm_pearl", "checklist", {"checklist": [["Is it red?", "yes"]]}, "each"),
        ("vlm_scaf_grpo", "hints", {"hints": ["Look at the colour."]}, "some"),
        ("vlm_egrpo", "entities", {"entities": ["red square"]}, "none"),  # falls back on the answer's words
        ("vlm_listener", "options", {"options": ["red", "blue"]}, "each"),  # its candidates are the letters
        ("vlm_listener", "candidates", {"candidates": ["red", "blue"]}, "each"),  # or the row's own candidates
    ],
)
def test_a_key_an_enabled_method_reads_is_checked_at_load(folder, config, key, extra, needed):
    # PEARL without checklists stopped the run in its first step; Scaf-GRPO without any hints trained without effect
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", [f"data.options.path={folder / 'd.jsonl'}"])

    def check(*rows):
        (folder / "d.jsonl").write_text(jsonl(*rows))
        check_example_keys(cfg, [(w, {**p, **m}) for w, (p, m) in load_jsonl_lines(folder / "d.jsonl")])

    if needed == "each":
        with pytest.raises(UserError, match=r"line 2 \(and 1 other example\(s\)\): methods.\w+ reads each example's"):
            check({**QA, **extra}, QA, QA)
    else:
        check({**QA, **extra}, QA, QA)  # the method skips the examples without one
    if needed == "none":
        check(QA, QA)
    elif needed == "some":
        with pytest.raises(UserError, match=rf"d.jsonl: methods.\w+ reads an example's '{key}', and none of the 2"):
            check(QA, QA)
    check({**QA, **extra}, {**QA, **extra})


def test_the_listener_names_the_row_without_candidates_and_a_renamed_key_is_looked_up(folder):
    # the row loaded and stopped the run in its first step with the reward's own message, naming no file or line
    cfg = load_config(ROOT / "configs" / "vlm_listener.yaml", [f"data.options.path={folder / 'd.jsonl'}"])
    (folder / "d.jsonl").write_text(jsonl({**QA, "options": ["red", "blue"]}, {**QA, "candidates": ["red"]}, QA))
    examples = [(w, {**p, **m}) for w, (p, m) in load_jsonl_lines(folder / "d.jsonl")]
    msg = raises(check_example_keys, cfg, r"d.jsonl line 3: methods.listener reads each example's 'options' \(or "
                 r"'candidates'\), which is missing or empty here; add 'options' or 'candidates' to every example",
                 examples)  # fmt: skip
    assert "(and" not in msg and "\n" not in msg
    renamed = load_config(ROOT / "configs" / "vlm_listener.yaml", ["rewards.0.name=listener",
                          "rewards.0.options={model: x, candidates_key: choices}"])  # fmt: skip
    raises(check_example_keys, renamed, r"line 2 \(and 1 other example\(s\)\): .*'options' \(or 'choices'\)",
           examples)  # fmt: skip
    examples[1][1]["choices"], examples[2][1]["choices"] = ["red"], ["red"]
    check_example_keys(renamed, examples)


def test_a_method_run_by_its_reward_alone_is_checked_at_load_too(folder):
    # listing the vlm_listener reward without methods: runs the listener; a row without options or candidates stopped
    # the run in its first step with the reward's message, naming no file or line
    path = ROOT / "configs" / "vlm_listener.yaml"
    cfg = load_config(path, ["methods.listener=null"])
    assert not cfg.methods.get("listener") and [r.name for r in cfg.rewards] == ["vlm_listener"]
    (folder / "d.jsonl").write_text(jsonl({**QA, "options": ["red", "blue"]}, QA))
    examples = [(w, {**p, **m}) for w, (p, m) in load_jsonl_lines(folder / "d.jsonl")]
    msg = raises(check_example_keys, cfg, r"d.jsonl line 2: the vlm_listener reward reads each example's 'options' "
                 r"\(or 'candidates'\), which is missing or empty here; add 'options' or 'candidates' to every "
                 r"example \(Listener-rewarded thinking .*\) or remove vlm_listener from rewards:",
                 examples)  # fmt: skip
    assert "methods." not in msg
    examples[1][1]["candidates"] = ["red", "blue"]
    check_example_keys(cfg, examples)
    # a reward of no method (accuracy) asks nothing more of the rows
    check_example_keys(load_config(path, ["methods.listener=null", "rewards=[{name: accuracy}]"]), [("x line 1", QA)])


def test_the_reward_alone_check_loads_no_plug_in(monkeypatch):
    # the built-in methods are looked through, not the entry points: an installed plug-in that fails to import and
    # that the config does not name must not stop the run there
    from mmgrpo.methods.registry import METHODS, reward_switched_methods

    def broken() -> None:
        raise AssertionError("entry points scanned")

    monkeypatch.setattr(METHODS, "_scan_entry_points", broken)
    cfg = load_config(ROOT / "configs" / "vlm_listener.yaml", ["methods.listener=null"])
    assert [m.name for m, _ in reward_switched_methods(cfg)] == ["listener"]


def test_a_key_a_method_supplies_itself_is_not_looked_for(folder):
    # AMPO's online teachers answer a failed question without a guidance pool: a file without one is fine then
    (folder / "d.jsonl").write_text(jsonl(QA, QA))
    examples = [(w, {**p, **m}) for w, (p, m) in load_jsonl_lines(folder / "d.jsonl")]
    path = ROOT / "configs" / "vlm_ampo.yaml"
    raises(check_example_keys, load_config(path), r"d.jsonl: methods.ampo reads an example's 'guidance'", examples)
    check_example_keys(load_config(path, ["methods.ampo.teachers=[assets/tiny_qwen2_vl]"]), examples)


def test_pearl_on_a_file_without_checklists_stops_before_training(folder, capsys):
    (folder / "d.jsonl").write_text(jsonl(QA, QA))
    args = ["train", str(ROOT / "configs" / "vlm_pearl.yaml"), f"data.options.path={folder / 'd.jsonl'}",
            f"policy.options.path={ROOT / 'assets' / 'tiny_qwen2_vl'}", f"run.output_dir={folder / 'runs'}",
            "trainer.max_steps=1", "trainer.progress=false"]  # fmt: skip
    assert main(args) == 2
    assert "d.jsonl line 1 (and 1 other example(s)): methods.pearl reads" in " ".join(capsys.readouterr().err.split())
    assert not (folder / "runs" / "vlm_pearl").exists()


def test_a_phone_photo_is_read_upright_and_its_boxes_in_the_upright_image(folder):
    # EXIF orientation 6: stored 32 wide x 24 high, shown turned a quarter, 24 x 32 (transformers' load_image turns
    # it too); boxes are drawn on what a viewer shows
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = np.zeros((24, 32, 3), np.uint8)
    stored[:, :4] = 255  # a white band on the stored image's left edge: at the top once turned
    Image.fromarray(stored).save(folder / "phone.jpg", exif=exif, quality=95)
    upright = np.asarray(load_image(folder / "phone.jpg"))
    assert upright.shape == (32, 24, 3) and upright[:4].mean() > 200 and upright[8:].mean() < 30
    (folder / "g.jsonl").write_text(jsonl({**BOX, "image": "phone.jpg", "box": [0, 0, 24, 4]}))
    assert load_grounding_jsonl(folder / "g.jsonl")[0][1]["image_size"] == (24, 32)
    (folder / "g.jsonl").write_text(jsonl({**BOX, "image": "phone.jpg", "box": [0, 0, 32, 4]}))
    raises(load_grounding_jsonl, folder / "g.jsonl", r"reaches outside the 24x32 image")


def test_an_image_size_of_another_shape_is_refused_and_a_swap_is_named(folder):
    (folder / "g.jsonl").write_text(jsonl({**BOX, "image_size": [24, 32]}))
    raises(load_grounding_jsonl, folder / "g.jsonl", r"image_size \[24, 32\] does not have the shape of the 32x24 "
           r"image \(it looks like \[height, width\]\)")  # fmt: skip
    (folder / "g.jsonl").write_text(jsonl({**BOX, "image_size": [100, 100]}))
    assert "looks like" not in raises(load_grounding_jsonl, folder / "g.jsonl", r"does not have the shape")
    (folder / "g.jsonl").write_text(jsonl({**BOX, "image_size": [641, 480]}))  # a resize's rounding is fine
    assert load_grounding_jsonl(folder / "g.jsonl")[0][1]["image_size"] == (641, 480)


def test_a_letter_answer_past_the_options_is_refused(folder):
    (folder / "d.jsonl").write_text(jsonl({**QA, "options": ["red", "blue"], "answer": "C"}))
    raises(load_jsonl, folder / "d.jsonl", r"line 1: 'answer' 'C' names option C but the example has 2 option\(s\)")
    (folder / "d.jsonl").write_text(jsonl({**QA, "options": ["red", "blue"], "answer": ["(b)", "blue"]}))
    assert load_jsonl(folder / "d.jsonl")[0][1]["answer"] == ["(b)", "blue"]


def test_image_placeholders_in_the_projects_own_question_are_counted_and_removed(folder):
    (folder / "d.jsonl").write_text(jsonl({**QA, "question": "<image>\nWhat colour?"}))
    assert load_jsonl(folder / "d.jsonl")[0][0]["question"] == "What colour?"
    (folder / "d.jsonl").write_text(jsonl({**QA, "question": "<image><image> What colour?"}))
    raises(load_jsonl, folder / "d.jsonl", r"line 1: the question holds 2 <image> placeholder\(s\) but .* 1 image")
    (folder / "g.jsonl").write_text(jsonl({**BOX, "question": "<image> Locate it."}))
    assert load_grounding_jsonl(folder / "g.jsonl")[0][0]["question"] == "Locate it."


@pytest.mark.parametrize("content", ["<image>\nWhat colour?", [{"type": "text", "text": "<image>\nWhat colour?"}]])
def test_image_tags_in_a_trl_prompts_text_are_counted_and_removed(folder, content):
    # TRL string content (or a text part) kept its '<image>' tags in the question, and a wrong count passed
    trl = {"prompt": [{"role": "user", "content": content}], "images": ["a.png"], "solution": "red"}
    (folder / "d.jsonl").write_text(jsonl(trl))
    assert load_jsonl(folder / "d.jsonl")[0][0]["question"] == "What colour?"
    two = {**trl, "prompt": [{"role": "user", "content": "<image><image> What colour?"}]}
    (folder / "d.jsonl").write_text(jsonl(two))
    raises(load_jsonl, folder / "d.jsonl", r"line 1: the question holds 2 <image> placeholder\(s\) but .* 1 image")
    (folder / "g.jsonl").write_text(jsonl({**trl, "solution": "[1, 2, 10, 12]"}))
    assert load_grounding_jsonl(folder / "g.jsonl")[0][0]["question"] == "What colour?"


def test_a_llava_image_list_and_a_trl_images_path_are_read_as_their_images(folder):
    # LLaVA-OneVision's "image": [a, b] counted as 1 image, TRL's "images": "a.png" as 0: a placeholder-count error
    # telling the user to do what they had done
    Image.new("RGB", (8, 8)).save(folder / "b.png")
    turns = [{"from": "human", "value": "<image>\n<image>\nWhich is brighter?"}, {"from": "gpt", "value": "A"}]
    trl = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour?"}]}],
           "images": "a.png", "solution": "red"}  # fmt: skip
    (folder / "d.jsonl").write_text(jsonl({"image": ["a.png", "b.png"], "conversations": turns}, trl))
    (p0, m0), (p1, m1) = load_jsonl(folder / "d.jsonl")
    assert m0["images"] == [str(folder / "a.png"), str(folder / "b.png")] and p0["question"] == "Which is brighter?"
    assert m1["images"] == [str(folder / "a.png")] and p1["question"] == "Which colour?"
    (folder / "d.jsonl").write_text(jsonl({"image": ["a.png"], "conversations": turns}))
    raises(load_jsonl, folder / "d.jsonl", r"line 1: the question holds 2 <image> placeholder\(s\) but .* 1 image")


def test_a_small_file_warns_that_evaluation_answers_fewer_than_asked(folder):
    from mmgrpo.pipelines.vlm_reasoning import warn_short_evaluation

    (folder / "d.jsonl").write_text(jsonl(*[QA] * 10))
    examples = QAExamples(VLMReasoningDataOptions(path=str(folder / "d.jsonl")))
    assert len(examples.heldout) == 1  # 10 examples x heldout_fraction 0.1
    with pytest.warns(
        UserWarning, match=r"the split holds 1 held-out example\(s\), fewer than data.options.eval_"
    ) as w:
        warn_short_evaluation(str(folder / "d.jsonl"), len(examples.heldout), 32)
    assert len(w) == 1 and "each evaluation answers only 1" in str(w[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough held-out examples: silent
        warn_short_evaluation(str(folder / "d.jsonl"), len(examples.heldout), 1)


def test_examples_repeated_across_the_split_are_named_in_one_warning(folder):
    from mmgrpo.pipelines.vlm_reasoning import warn_repeated_heldout

    rows = [{**QA, "question": f"What colour is {i}?"} for i in range(20)]
    (folder / "d.jsonl").write_text(jsonl(*rows))
    ex = QAExamples(VLMReasoningDataOptions(path=str(folder / "d.jsonl"), heldout_fraction=0.25))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # distinct examples: no warning
        warn_repeated_heldout(str(folder / "d.jsonl"), ex.records, ex.lines, ex.train, ex.heldout)
    (folder / "d.jsonl").write_text(jsonl(*rows, *rows[:10]))  # lines 21-30 repeat lines 1-10
    ex = QAExamples(VLMReasoningDataOptions(path=str(folder / "d.jsonl"), heldout_fraction=0.25))
    repeats = sum(1 for i in ex.heldout if any(ex.records[i] == ex.records[j] for j in ex.train))
    assert repeats > 0  # this seed's split puts a copy of some repeated example on each side
    with pytest.warns(UserWarning, match=rf"{repeats} of the 8 held-out example\(s\) also appear in the training"):
        warn_repeated_heldout(str(folder / "d.jsonl"), ex.records, ex.lines, ex.train, ex.heldout)
    boxes = [{**BOX, "box": [1, 1, 2 + i, 2 + i]} for i in range(10)]
    (folder / "g.jsonl").write_text(jsonl(*boxes, *boxes))  # line i + 11 repeats line i + 1
    g = GroundingExamples(VLMGroundingDataOptions(path=str(folder / "g.jsonl"), heldout_fraction=0.5))
    assert any(g.records[i] == g.records[j] for i in g.heldout for j in g.train)  # this seed's split crosses
    with pytest.warns(UserWarning, match=r"\(the file repeats them; the first: .*g.jsonl line \d+ = .*g.jsonl line"):
        warn_repeated_heldout(str(folder / "g.jsonl"), g.records, g.lines, g.train, g.heldout)


def test_a_question_longer_than_the_models_context_is_named_before_training(folder, capsys):
    # it used to train: a 12000-token prompt rolled out group_size times in a model made for 2048 positions
    (folder / "d.jsonl").write_text(jsonl(QA, {**QA, "question": "word " * 3000}, QA))
    args = ["train", str(ROOT / "configs" / "vlm_reasoning_tiny.yaml"), f"data.options.path={folder / 'd.jsonl'}",
            f"policy.options.path={ROOT / 'assets' / 'tiny_qwen2_vl'}", f"run.output_dir={folder / 'runs'}",
            "trainer.max_steps=1", "trainer.progress=false"]  # fmt: skip
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "d.jsonl line 2: the question is" in err and "the model's context of 2048" in err
    assert not (folder / "runs" / "vlm_reasoning_tiny").exists()
