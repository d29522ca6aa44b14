"""The vlm_grounding recipe: box targets via mmgrpo/rewards/boxes.py, IoU evaluation on hand-made answers, JSONL
data, the
shapes split, the family check, and a 2-step smoke run on the shipped shapes VLM."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmgrpo.core.errors import UserError
from mmgrpo.data import shapes_qa
from mmgrpo.pipelines.vlm_grounding import (
    GroundingExamples,
    VLMGroundingDataOptions,
    box_answer,
    check_box_rewards,
    grounding_scores,
    load_grounding_jsonl,
)
from mmgrpo.policies.vlm import VLMPolicy, VLMPolicyOptions
from mmgrpo.rewards.boxes import parse_box, to_absolute
from mmgrpo.testing.tiny_vlm import tiny_qwen2_5_vl, tiny_qwen2_vl
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "shapes_grounding_medloc.yaml"
ASSET = REPO / "assets" / "shapes_vlm"


def test_box_answer_writes_each_familys_convention_by_hand():
    # Qwen2-VL 0..1000 grid of a 64x64 image: 16 / 64 * 1000 = 250, 8 -> 125, 48 -> 750, 40 -> 625
    assert box_answer([16, 8, 48, 40], "qwen2_vl", (64, 64)) == "(250,125),(750,625)"
    # Qwen2.5-VL: pixels of the resized image, 64 -> 128 doubles every coordinate
    assert box_answer([16, 8, 48, 40], "qwen2_5_vl", (64, 64), (128, 128)) == "[32, 16, 96, 80]"
    assert box_answer([1.4, 2.6, 30, 31], "absolute", (64, 64)) == "[1, 3, 30, 31]"
    # the written target reads back (parse + to_absolute, the reward's path) to the box within rounding
    text = box_answer([10.3, 20.7, 40.1, 50.9], "qwen2_vl", (64, 80))
    back = to_absolute(parse_box(text), "qwen2_vl", (64, 80))
    assert back == pytest.approx([10.3, 20.7, 40.1, 50.9], abs=0.5 * 80 / 1000 + 1e-9)  # half a grid step
    assert box_answer([-3, 0, 70, 64], "qwen2_vl", (64, 64)) == "(0,0),(1000,1000)"  # clamped to the grid


def _examples(box, size=(64, 64)):
    return {"question": "Locate the red circle."}, {"box": box, "image_size": size}


def test_iou_evaluation_numbers_on_hand_made_answers():
    torch.manual_seed(0)
    policy = VLMPolicy(*tiny_qwen2_vl(), VLMPolicyOptions(max_new_tokens=4))
    ex = _examples([16, 16, 48, 48])  # a 32 x 32 px box of a 64 x 64 image: 250..750 on the Qwen2-VL grid
    texts = [
        "<think>x</think><answer>(250,250),(750,750)</answer>",  # exact: IoU 1
        "<think>x</think><answer>(250,250),(500,750)</answer>",  # [16, 16, 32, 48]: 16*32 / (32*32) = 0.5
        "<think>x</think><answer>(500,500),(1000,1000)</answer>",  # [32, 32, 64, 64]: 16*16 / (2*1024 - 256) = 1/7
        "<think>x</think><answer>somewhere</answer>",  # unparseable: 0
    ]
    ious = grounding_scores(policy, [ex] * 4, texts)
    assert ious == pytest.approx([1.0, 0.5, 1 / 7, 0.0])
    # Qwen2.5-VL reads pixels of the resized image: the tiny processor resizes 64x64 to 56x56 (28-px multiples)
    policy25 = VLMPolicy(*tiny_qwen2_5_vl(), VLMPolicyOptions(max_new_tokens=4))
    img = torch.zeros(64, 64, 3, dtype=torch.uint8).numpy()
    ex25 = ({"question": "Locate it."}, {"box": [16, 16, 48, 48], "image_size": (64, 64), "images": [img]})
    # [14, 14, 42, 42] in 56-px coordinates = [16, 16, 48, 48] in the original 64-px image: IoU 1
    assert grounding_scores(policy25, [ex25], ["<answer>[14, 14, 42, 42]</answer>"]) == pytest.approx([1.0])


def test_grounding_jsonl_and_its_errors(tmp_path):
    Image.new("RGB", (40, 30), (200, 0, 0)).save(tmp_path / "red.png")
    rows = [
        {"image": "red.png", "question": "Locate the red.", "box": [1, 2, 30, 20], "image_size": [40, 30]},
        {"image": "red.png", "question": "Where?", "box": [0, 0, 10, 10], "source": "x"},  # size read from file
    ]
    path = tmp_path / "g.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (p0, m0), (p1, m1) = load_grounding_jsonl(path)
    assert p0 == {"question": "Locate the red."} and m0["box"] == [1.0, 2.0, 30.0, 20.0]
    assert m0["image_size"] == (40, 30) and m1["image_size"] == (40, 30) and m1["source"] == "x"
    assert m0["images"] == [str(tmp_path / "red.png")]
    ex = GroundingExamples(VLMGroundingDataOptions(path=str(path), heldout_fraction=0.5, question_suffix=" Box?"))
    assert len(ex.train) == len(ex.heldout) == 1 and ex.example(ex.train[0])[0]["question"].endswith(" Box?")
    for bad, match in [('{"image": "red.png", "question": "q"}', "'box'"), ('{"image": "a", "question": "q", '
                       '"box": [1, 2]}', "box must be")]:  # fmt: skip
        path.write_text(bad)
        with pytest.raises(UserError, match=match):
            load_grounding_jsonl(path)


def test_shapes_examples_use_the_scene_seed_split():
    ex = GroundingExamples(VLMGroundingDataOptions(num_train=50, eval_examples=10))
    assert ex.heldout == shapes_qa.heldout_seeds(10) and ex.train == shapes_qa.train_seeds(50)
    assert set(ex.train).isdisjoint(ex.heldout)
    prompt, meta = ex.example(ex.heldout[0])
    ref = shapes_qa.make_example(ex.heldout[0], "grounding")
    assert prompt == {"question": ref.question, "options": None} and meta["box"] == list(ref.box)


def test_the_grounding_streams_fingerprint_covers_boxes_the_question_suffix_and_shapes_options(tmp_path):
    """A checkpoint keeps the train examples' fingerprint (a resume over other examples is refused): a grounding
    file's box edited in place, another question_suffix, or other shapes options are other examples."""
    from mmgrpo.pipelines.vlm_reasoning import QAPrompts

    Image.new("RGB", (40, 30), (200, 0, 0)).save(tmp_path / "red.png")
    path = tmp_path / "g.jsonl"

    def fingerprint(box, **options):
        rows = [{"image": "red.png", "question": f"Locate shape {i}.", "box": box} for i in range(4)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return QAPrompts(GroundingExamples(VLMGroundingDataOptions(path=str(path), **options)), 0).fingerprint()

    first = fingerprint([1, 2, 30, 20])
    assert fingerprint([1, 2, 30, 20]) == first
    assert len({first, fingerprint([1, 2, 30, 21]), fingerprint([1, 2, 30, 20], question_suffix=" Box?")}) == 3
    shapes = [QAPrompts(GroundingExamples(VLMGroundingDataOptions(num_train=8, **o)), 0).fingerprint()
              for o in ({}, {}, {"image_size": 48})]  # fmt: skip
    assert shapes[0] == shapes[1] != shapes[2]


def test_a_box_reward_in_another_family_is_refused():
    cfg = load_config(CONFIG)
    check_box_rewards(cfg, "qwen2_vl")  # the shipped config matches the Qwen2-VL asset
    with pytest.raises(UserError, match=r"^rewards.0.options.family=.*set rewards.0.options.family=qwen2_5_vl"):
        check_box_rewards(cfg, "qwen2_5_vl")


@pytest.mark.parametrize(
    "override, match",
    [
        ("data.options.split_seed=-1", "data.options.split_seed=-1: a seed is an integer >= 0"),
        ("data.options.eval_examples=0", "data.options.eval_examples=0: an evaluation needs at least 1 held-out"),
        ("data.options.eval_examples=-1", "data.options.eval_examples=-1: an evaluation needs at least 1 held-out"),
        ("data.options.image_size=0", r"data.options.image_size=0: the shapes grounding scenes .* in 32\.\.512"),
        ("data.options.image_size=-1", "data.options.image_size=-1: the shapes grounding scenes"),
        # a billion scenes used to hang drawing the split's seeds at the start of the run
        (
            "data.options.num_train=1000000000",
            "data.options.num_train=1000000000: the shapes grounding source draws at most 1,000,000 scenes",
        ),
        (
            "data.options.eval_examples=1000000000",
            "data.options.eval_examples=1000000000: the shapes grounding source draws at most 1,000,000",
        ),
    ],
)
def test_bad_data_numbers_fail_when_the_config_loads(override, match):
    """Each used to end in a numpy traceback (split_seed), a message naming no key (image_size) or NaN / no
    evaluation (eval_examples 0); now the data options' dataclass refuses them before any model loads."""
    with pytest.raises(UserError, match=f"^{match}"):
        load_config(CONFIG, [override])


def test_config_opens_with_its_command():
    assert CONFIG.read_text().splitlines()[0] == "# mmgrpo train configs/shapes_grounding_medloc.yaml"


def test_two_step_smoke_run_on_the_shapes_vlm(tmp_path):
    cfg = load_config(
        CONFIG,
        [
            f"run.output_dir={tmp_path}",
            "data.options.num_train=8",
            "data.options.eval_examples=3",
            "trainer.max_steps=2",
            "trainer.prompts_per_step=2",
            "trainer.group_size=3",
            "trainer.micro_batch_size=3",
            "trainer.eval_every=2",
            "trainer.progress=false",
        ],
    )
    assert cfg.rewards[-1].name == "iou"
    cfg.rewards[-1].weight = 0.5  # the dense IoU (logged at weight 0 in the config): groups vary, the update must move
    before = VLMPolicy.from_pretrained(str(ASSET), VLMPolicyOptions(finetune="full"))
    trainer = train(cfg)
    run = tmp_path / cfg.run.name
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if "eval/mean_iou" in m]
    assert [m["step"] for m in evals] == [0, 2]
    assert all(0.0 <= m["eval/mean_iou"] <= 1.0 and 0.0 <= m["eval/acc_at_0.5"] <= 1.0 for m in evals)
    for ev in evals:  # each evaluation's completions, with the ground-truth box and the IoU the metric averages
        records = [json.loads(x) for x in (run / "samples" / f"completions_step_{ev['step']:06d}.jsonl").open()]
        assert len(records) == 3 and all(r["prompt"].startswith("Locate") and len(r["box"]) == 4 for r in records)
        assert sum(r["iou"] for r in records) / 3 == pytest.approx(ev["eval/mean_iou"])
    steps = [m for m in lines if "reward/iou_curriculum" in m]
    assert len(steps) == 2 and all("curriculum/tau" in m and "loss/policy" in m for m in steps)
    # the trained parameters moved (some group had a non-zero advantage), and only trainable ones exist to move
    after = dict(trainer.policy.model.hf.named_parameters())
    moved = [n for n, p in before.model.hf.named_parameters() if not torch.equal(p, after[n].detach())]
    assert steps[0]["adv/zero_variance_groups"] + steps[1]["adv/zero_variance_groups"] < 4 and moved
    assert all(after[n].requires_grad for n in moved)
    assert (run / "report.html").is_file()


def test_grounding_jsonl_errors_name_the_line_and_the_missing_keys(tmp_path):
    from mmgrpo.pipelines.vlm_grounding import load_grounding_jsonl

    path = tmp_path / "g.jsonl"
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")  # images are opened at load, image_size given or not
    ok = {"image": "a.png", "question": "Locate it.", "box": [1, 2, 3, 4], "image_size": [8, 8]}
    cases = [
        ([ok, {"image": "a.png", "question": "q"}], "line 2: each example needs 'image' and 'question' and 'box'"),
        ([ok, {**ok, "box": [1, 2, 3]}], r"line 2: box must be \[x1, y1, x2, y2\]"),
        ([{**ok, "image": "b.png", "image_size": None}], "line 1: image .* not found"),
    ]
    for rows, match in cases:
        path.write_text("\n".join(json.dumps(r) for r in rows))
        with pytest.raises(UserError, match=match):
            load_grounding_jsonl(path)
    path.write_text(json.dumps(ok))
    assert load_grounding_jsonl(path)[0][1]["box"] == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(UserError, match="or '' for shapes grounding"):
        load_grounding_jsonl(tmp_path / "missing.jsonl")


def _eval_lines(run: Path) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: {k: v for k, v in m.items() if k.startswith("eval/")} for m in lines if "eval/mean_iou" in m}


def test_a_resumed_run_logs_the_same_gain_against_step_0_as_the_uninterrupted_one(tmp_path):
    """eval/*_gain pairs each held-out example's score with its step-0 score. A run resumed past step 0 used to log
    none (the step-0 scores lived only in the first process); it reads them back from the run's
    samples/completions_step_000000.jsonl, so the resumed run's gains at step 4 are the uninterrupted run's."""
    over = ["data.options.num_train=8", "data.options.eval_examples=3", "trainer.prompts_per_step=2",
            "trainer.group_size=3", "trainer.micro_batch_size=3", "trainer.eval_every=2", "trainer.checkpoint_every=2",
            "trainer.max_steps=4", "trainer.progress=false", "rewards.2.weight=0.5", "trainer.lr=1e-3"]  # fmt: skip
    whole = train(load_config(CONFIG, [*over, f"run.output_dir={tmp_path}", "run.name=whole"])).run_dir
    cut = train(load_config(CONFIG, [*over, f"run.output_dir={tmp_path}", "run.name=cut", "trainer.max_steps=2"]))
    train(load_config(cut.run_dir / "config.yaml", [f"resume={cut.run_dir}", "trainer.max_steps=4"]))
    a, b = _eval_lines(whole), _eval_lines(cut.run_dir)
    assert sorted(a) == sorted(b) == [0, 2, 4]
    for key in ("eval/mean_iou_gain", "eval/mean_iou_gain_se", "eval/acc_at_0.5_gain", "eval/acc_at_0.5_gain_se"):
        assert key in b[4] and b[4][key] == pytest.approx(a[4][key], abs=1e-9), key
    assert a[4]["eval/mean_iou_gain"] != 0.0  # the update moved the boxes: the pairing is of real changes
