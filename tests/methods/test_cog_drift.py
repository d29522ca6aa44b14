"""Cog-DRIFT (mmgrpo/methods/cog_drift.py): cloze and multiple-choice variants that keep the answer, distractors from
the data set, the variant ladder, and the re-roll on the tiny REAL Qwen2-VL asset."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.rewriting import RewriteRequest
from mmgrpo.core.types import PromptBatch
from mmgrpo.methods.cog_drift import CogDriftVariants, cloze, correct_option, distractors, fewer_options
from mmgrpo.rewards.registry import REWARDS, register
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
ASSET = REPO / "assets" / "tiny_qwen2_vl"

if "test_cog_two_options" not in REWARDS:

    @register("test_cog_two_options")
    def _two():
        """1 for rows whose prompt has exactly two options (test reward)."""
        return lambda samples, prompts, meta, ctx: [float(len(p.get("options") or []) == 2) for p in prompts]


class Answers:
    """A prompt source whose example at position i has answer ANSWERS[i % 6] (for distractor draws)."""

    ANSWERS = ["42", "17", "forty", "9", "B", "3.5"]

    def get(self, positions):
        return PromptBatch(["q"] * len(positions), [{"answer": self.ANSWERS[p % 6]} for p in positions])


def test_cloze_blanks_a_fraction_of_the_letters_and_digits():
    out = cloze("1234", 0.5, np.random.default_rng(0))  # ceil(0.5 * 4) = 2 of the 4 digits blanked
    assert len(out) == 4 and out.count("_") == 2 and all(c in ("_", d) for c, d in zip(out, "1234"))
    out = cloze("3/4", 0.9, np.random.default_rng(1))  # 2 digits: ceil(1.8) = 2 capped at 1 (one digit stays)
    assert out.count("_") == 1 and out[1] == "/"
    assert cloze("7", 0.5, np.random.default_rng(0)) is None  # nothing to leave
    assert cloze("1234", 0.5, np.random.default_rng(5)) == cloze("1234", 0.5, np.random.default_rng(5))


def test_distractors_options_and_the_correct_letter_by_hand():
    # "42" itself and the repeated "17" are out; "forty" (text) and "B" (a letter) are of another kind than a number
    assert distractors("42", ["42", "17", "forty", "17", "B", "3.5", "9"], 2) == ["17", "3.5"]
    assert distractors("3", ["3.0", "4"], 1) == ["4"]  # 3.0 grades as 3: not a distractor
    assert distractors("red", ["Red", "blue", "7"], 3) == ["blue"]
    assert correct_option("B", ["0", "1", "2", "3"]) == 1 and correct_option("red", ["green", "red"]) == 1
    assert correct_option("E", ["0", "1"]) is None
    opts, at = fewer_options(["0", "1", "2", "3"], 1, 2, np.random.default_rng(0))
    assert len(opts) == 2 and opts[at] == "1" and opts == sorted(opts)  # the correct one kept, the order kept


def request(prompts, meta, attempt, seeds=(7, 8)):
    return RewriteRequest(prompts, meta, [[] for _ in prompts], torch.zeros(len(prompts), 2), attempt, 0,
                          list(seeds)[: len(prompts)], source=Answers())  # fmt: skip


def test_the_variant_ladder_keeps_images_and_the_answer():
    image = np.zeros((4, 4, 3), np.uint8)
    rw = CogDriftVariants(choices=3)
    open_item = ({"question": "What is 6 x 7?"}, {"answer": "42", "images": [image]})
    mc_item = ({"question": "How many?", "options": ["0", "1", "2", "3"]}, {"answer": "C", "images": [image]})
    prompts, meta = [open_item[0], mc_item[0]], [open_item[1], mc_item[1]]
    first = rw(request(prompts, meta, 0))
    # open-ended: attempt 0 is the cloze (2 digits: one blanked); the answer is unchanged
    (p, m), (q, n) = first
    assert p["question"].startswith("What is 6 x 7?\nThe answer has the form: ") and p["question"][-2:] in ("4_", "_2")
    assert m["answer"] == "42" and m["images"][0] is image and m["rewrite"] == "cloze"
    # multiple choice with 4 > 3 options: cloze does not apply, so attempt 0 is already the fewer-options variant
    assert len(q["options"]) == 3 and "2" in q["options"] and q["options"][ord(n["answer"]) - 65] == "2"
    assert n["open_answer"] == "C" and n["options"] == q["options"] and n["images"][0] is image
    second = rw(request(prompts, meta, 1))
    (p, m), none = second
    assert none is None  # the multiple-choice item has no second variant
    # open-ended -> multiple choice: 42 and 2 distractors of the data set (numbers, not 42), the letter points at 42
    assert len(p["options"]) == 3 and p["question"] == "What is 6 x 7?"
    assert m["answer"] in "ABC" and p["options"][ord(m["answer"]) - 65] == "42"
    assert set(p["options"]) - {"42"} <= {"17", "9", "3.5"} and m["open_answer"] == "42"
    assert rw(request(prompts, meta, 1)) == second  # seeded: the same variant again
    assert rw(request(prompts[:1], meta[:1], 2)) == [None]


def trainer_for(tmp_path, *overrides):
    cfg = load_config(
        REPO / "configs" / "vlm_cog_drift.yaml",
        [
            f"run.output_dir={tmp_path}", f"policy.options.path={ASSET}", "data.options.num_examples=12",
            "trainer.prompts_per_step=2", "trainer.group_size=3", "trainer.progress=false",
            "rewards=[{name: test_cog_two_options}]", "methods.cog_drift.reward=test_cog_two_options", *overrides,
        ],
    )  # fmt: skip
    return Trainer(cfg, tmp_path / "run")


def test_cog_drift_reposes_failed_shapes_questions_with_two_options(tmp_path):
    tr = trainer_for(tmp_path, "methods.cog_drift.keep=always")
    plain = tr.comp.prompts.get([0, 1])
    rollout, cols, m = tr.collect(0)
    assert (m["rewrite/groups"], m["rewrite/rerolled"]) == (2.0, 2.0) and cols[0, 0].tolist() == [1.0] * 6
    for g in range(2):
        before, meta0 = plain.prompts[g], plain.meta[g]
        after, meta = rollout.prompts[3 * g], rollout.meta[3 * g]
        right = before["options"]["ABCD".index(meta0["answer"])]
        assert after["question"] == before["question"] and len(after["options"]) == 2
        assert after["options"]["AB".index(meta["answer"])] == right and meta["options"] == after["options"]
        assert (meta["images"][0] == meta0["images"][0]).all()
    # keep: signal (the default): a variant group where every row succeeds has no signal, so the original stays
    tr = trainer_for(tmp_path / "b")
    rollout, cols, m = tr.collect(0)
    assert (m["rewrite/groups"], m["rewrite/rerolled"], m["rewrite/rescued"]) == (2.0, 2.0, 0.0)
    assert [len(p["options"]) for p in rollout.prompts] == [4] * 6


def test_cog_drift_options_are_checked_at_load():
    base = REPO / "configs" / "vlm_cog_drift.yaml"
    with pytest.raises(UserError, match=r"variants=\['essay'\] must be a non-empty list of cloze, multiple_choice"):
        load_config(base, ["methods.cog_drift.variants=[essay]"])
    with pytest.raises(UserError, match="choices=1 must be in 2..26"):
        load_config(base, ["methods.cog_drift.choices=1"])
    with pytest.raises(UserError, match="cloze_fraction=1.0 must be in"):
        load_config(base, ["methods.cog_drift.cloze_fraction=1.0"])
    with pytest.raises(UserError, match="mode=mix is Scaf-GRPO's row swap"):
        load_config(base, ["methods.cog_drift.mode=mix"])
    with pytest.raises(UserError, match="cog_drift and methods.scaf_grpo .* both rewrite prompts"):
        load_config(base, ["methods.scaf_grpo={}"])  # one rewriting method at a time
