"""VLM data in TRL's conversational format and LLaVA ``conversations`` (docs/data.md) load as the project's QA
records, mistakes are clear errors naming the line, and the vlm_reasoning recipe trains 2 steps on such a file."""

import json
from pathlib import Path

import pytest
from PIL import Image

from mmgrpo.core.errors import UserError
from mmgrpo.pipelines.vlm_grounding import load_grounding_jsonl
from mmgrpo.pipelines.vlm_reasoning import load_jsonl
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

ROOT = Path(__file__).resolve().parents[2]
FAST = ["trainer.max_steps=2", "trainer.eval_every=0", "trainer.progress=false", "trainer.checkpoint_every=0"]


def trl(text: str, image: str, solution: str) -> dict:
    content = [{"type": "image"}, {"type": "text", "text": text}]
    return {"prompt": [{"role": "user", "content": content}], "images": [image], "solution": solution, "id": 7}


def llava(text: str, image: str, answer: str) -> dict:
    turns = [{"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": answer}]
    return {"image": image, "conversations": turns, "id": 8}


def write_mixed(tmp_path: Path, n: int = 2) -> Path:
    Image.new("RGB", (32, 32), (200, 0, 0)).save(tmp_path / "red.png")
    rows = [trl("What colour is it?", "red.png", "red"), llava("How many shapes?", "red.png", "1")] * n
    rows.append({"question": "Own format?", "answer": "yes", "image": "red.png"})
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_trl_and_llava_records_become_qa_examples(tmp_path):
    ex = load_jsonl(write_mixed(tmp_path, n=1))
    image = str(tmp_path / "red.png")
    assert ex[0] == (
        {"question": "What colour is it?", "options": None},
        {"answer": "red", "id": 7, "images": [image]},
    )
    assert ex[1] == ({"question": "How many shapes?", "options": None}, {"answer": "1", "id": 8, "images": [image]})
    assert ex[2] == ({"question": "Own format?", "options": None}, {"answer": "yes", "images": [image]})


@pytest.mark.parametrize(
    "row, match",
    [
        ({"prompt": [{"role": "user", "content": "q"}], "images": []}, "needs a 'solution'"),
        ({"prompt": ["q"], "solution": "a"}, "list of {role, content} messages"),
        ({"prompt": [{"role": "user", "content": 3}], "solution": "a"}, "'content' must be a string"),
        ({"image": "x.png", "conversations": [{"from": "gpt", "value": "a"}]}, "needs a 'human' turn"),
        ({"conversations": "q"}, "list of {from, value} turns"),
        ({"text": "q"}, "'question' and 'answer'"),
    ],
)
def test_bad_records_name_the_line(tmp_path, row, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=match) as e:
        load_jsonl(path)
    assert f"{path} line 2" in str(e.value)


def test_vlm_reasoning_trains_two_steps_on_trl_and_llava_data(tmp_path):
    base = {
        "pipeline": "vlm_reasoning",
        "policy": {"options": {"path": str(ROOT / "assets" / "tiny_qwen2_vl"), "max_new_tokens": 8, "lora_rank": 2}},
        "data": {"options": {"path": str(write_mixed(tmp_path, n=3)), "heldout_fraction": 0.3}},
        "rewards": [{"name": "format"}],
        "trainer": {"prompts_per_step": 1, "group_size": 2},
    }
    trainer = train(load_config(None, [f"run.output_dir={tmp_path / 'run'}", *FAST], base=base))
    assert len((trainer.run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def write_grounding(tmp_path: Path, n: int = 1) -> Path:
    """The same box question in the project's, TRL's, LLaVA's and VLM-R1's formats."""
    Image.new("RGB", (40, 30), (0, 0, 200)).save(tmp_path / "blue.png")
    q = "Locate the blue square."
    rows = [
        {"image": "blue.png", "question": q, "box": [1, 2, 30, 20]},
        trl(q, "blue.png", "<answer>[1, 2, 30, 20]</answer>"),
        llava(q, "blue.png", "[1,2,30,20]"),
        {"image": "blue.png", "problem": q, "solution": [1, 2, 30, 20], "normal_caption": "a blue square"},
    ] * n
    path = tmp_path / "grounding.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_grounding_records_in_every_format_are_the_same_example(tmp_path):
    ex = load_grounding_jsonl(write_grounding(tmp_path))
    image = str(tmp_path / "blue.png")
    assert all(p == {"question": "Locate the blue square."} for p, _ in ex)
    for _, meta in ex:
        assert meta["box"] == [1.0, 2.0, 30.0, 20.0] and meta["images"] == [image] and meta["image_size"] == (40, 30)
    assert ex[1][1]["id"] == 7 and ex[2][1]["id"] == 8 and ex[3][1]["normal_caption"] == "a blue square"


@pytest.mark.parametrize(
    "answer, match",
    [("somewhere left", "box must be"), ("[1, 2, 3]", "box must be"), ("[1,2,3,4] or [5,6,7,8]", "box must be")],
)
def test_a_grounding_answer_that_is_not_one_box_names_the_line(tmp_path, answer, match):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"image": "a.png", "question": "q", "box": [0, 0, 4, 4]}) + "\n"
                    + json.dumps(llava("q", "a.png", answer)) + "\n")  # fmt: skip
    with pytest.raises(UserError, match=match) as e:
        load_grounding_jsonl(path)
    assert f"{path} line 2" in str(e.value)
    two_images = {**trl("q", "a.png", "[0, 0, 4, 4]"), "images": ["a.png", "a.png"]}
    two_images["prompt"][0]["content"] *= 2  # two image placeholders, two images: one too many for grounding
    path.write_text(json.dumps(two_images) + "\n")
    with pytest.raises(UserError, match="exactly one image"):
        load_grounding_jsonl(path)


def test_vlm_grounding_trains_two_steps_on_trl_llava_and_vlm_r1_data(tmp_path):
    base = {
        "pipeline": "vlm_grounding",
        "policy": {"options": {"path": str(ROOT / "assets" / "shapes_vlm"), "max_new_tokens": 8, "lora_rank": 2}},
        "data": {"options": {"path": str(write_grounding(tmp_path, n=2)), "heldout_fraction": 0.25}},
        "rewards": [{"name": "format"}],
        "trainer": {"prompts_per_step": 1, "group_size": 2},
    }
    trainer = train(load_config(None, [f"run.output_dir={tmp_path / 'run'}", *FAST], base=base))
    assert len((trainer.run_dir / "metrics.jsonl").read_text().splitlines()) == 2
