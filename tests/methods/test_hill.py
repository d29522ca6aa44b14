"""HiLL (mmgrpo/methods/hill.py): the hinter's prompt, hint extraction, keep-only-with-signal, on the tiny REAL
Qwen2-VL asset (a stub hinter for exact hints; the policy and a frozen VLM as hinters in the smoke)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.rewriting import RewriteRequest, question_of
from mmgrpo.methods.hill import HillHinter, HillOptions, hint_of, is_answer
from mmgrpo.rewards.registry import REWARDS, register
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
ASSET = REPO / "assets" / "tiny_qwen2_vl"

if "test_hill_hinted" not in REWARDS:

    @register("test_hill_hinted")
    def _hinted(word: str = "colours"):
        """1 for the rows of hinted prompts whose hint holds ``word``, alternately by row (test reward)."""
        return lambda samples, prompts, meta, ctx: [
            float(word in question_of(p) and i % 2 == 0) for i, p in enumerate(prompts)
        ]


class StubHinter:
    """A hinter that answers call c with the fixed texts ``calls[c]``, recording what it was asked."""

    def __init__(self, *calls):
        self.calls, self.asked = calls, []

    def generate(self, batch, greedy=True):
        self.asked.append(batch)
        return list(self.calls[len(self.asked) - 1])


def test_hint_extraction_by_hand():
    assert hint_of("<think>hmm</think><answer>Count the red shapes.</answer>", 100) == "Count the red shapes."
    assert hint_of("<think>only thoughts</think> Look left.", 100) == "Look left."
    assert hint_of("a  very\nlong hint", 6) == "a very"
    assert hint_of("<think>x</think><answer> </answer>", 100) == ""


def test_hints_that_are_answers_are_recognised():
    prompt, meta = {"question": "What colour?", "options": ["red", "blue"]}, {"answer": "B"}
    assert is_answer("B", prompt, meta) and is_answer("(a)", prompt, meta)  # the answer, a bare letter
    assert is_answer("blue", prompt, meta) and is_answer("Red.", prompt, meta)  # an option's text
    assert is_answer("42", "What is 6 x 7?", {"answer": 42.0})  # graded correct
    assert not is_answer("Compare the fill colours.", prompt, meta) and not is_answer("41", "Q", {"answer": 42})


def test_the_hinter_reads_question_failure_and_answer_and_sees_the_images():
    image = np.zeros((4, 4, 3), np.uint8)
    prompt = {"question": "What colour is the square?", "options": ["red", "blue"]}
    meta = {"answer": "B", "images": [image], "hints": ["x"], "checklist": []}
    hinter = HillHinter(HillOptions())
    failed = ["<think>it is red</think><answer>A</answer>", "<answer>A</answer>"]
    req = RewriteRequest([prompt, prompt], [meta, meta], [failed, []], torch.zeros(2, 2), 0, 3, [11, 12])
    batch = hinter.hinter_batch(req)
    assert batch.prompts[0] == (
        "A student answered this question wrongly.\nQuestion: What colour is the square? A) red B) blue\n"
        "The student's answer: A\nThe correct answer: B\nWrite one short hint that helps the student reach the "
        "correct answer by themselves, without stating it."
    )
    assert "The student's answer: (none)" in batch.prompts[1]
    assert batch.meta[0] == {"images": [image]} and batch.seeds == [11, 12] and batch.step == 3  # no answer in meta
    req.policy = StubHinter(["<answer>Compare the colours.</answer>", "<think>nothing</think>"])
    (p, m), none = hinter(req)
    assert p == {"question": "What colour is the square?\nHint: Compare the colours.", "options": ["red", "blue"]}
    assert m["answer"] == "B" and m["images"][0] is image and m["hint"] == "Compare the colours." and none is None
    req.policy = StubHinter(["<answer>B</answer>", "<answer>blue</answer>"])  # hints that are answers: dropped
    assert hinter(req) == [None, None]
    req.policy, hinter.opts.reject_answers = StubHinter(["<answer>B</answer>", ""]), False
    assert hinter(req)[0][1]["hint"] == "B"


def trainer_for(tmp_path, *overrides):
    cfg = load_config(
        REPO / "configs" / "vlm_hill.yaml",
        [
            f"run.output_dir={tmp_path}", f"policy.options.path={ASSET}", "data.options.num_examples=12",
            "trainer.prompts_per_step=2", "trainer.group_size=4", "trainer.progress=false",
            "rewards=[{name: test_hill_hinted}]", "methods.hill.reward=test_hill_hinted", *overrides,
        ],
    )  # fmt: skip
    return Trainer(cfg, tmp_path / "run")


def test_hinted_groups_are_kept_only_with_learning_signal(tmp_path, monkeypatch):
    stub = StubHinter(["<answer>Compare the colours.</answer>", "<answer>Think again.</answer>"], ["Still no."])
    monkeypatch.setattr(HillHinter, "hinter", lambda self, policy: stub)
    tr = trainer_for(tmp_path)
    rollout, cols, m = tr.collect(0)
    # both groups fail (no hint, reward 0); group 0's hint holds "colours": rows 0, 2 of its group succeed -> kept;
    # group 1's hint does not: all 0, no signal -> not kept, a second hint is asked for it (attempt 1), again no
    assert (m["rewrite/groups"], m["rewrite/rerolled"], m["rewrite/rescued"]) == (2.0, 3.0, 1.0)
    assert [len(b) for b in stub.asked] == [2, 1]
    assert rollout.prompts[0]["question"].endswith("\nHint: Compare the colours.")
    assert "Hint:" not in rollout.prompts[4]["question"]  # the failed original group stays
    assert cols[0, 0].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    seeds = [b.seeds for b in stub.asked]  # the hinter's seeds: attempt 0 for both positions, attempt 1 for position 1
    assert len(set(seeds[0])) == 2 and seeds[1][0] not in seeds[0]


def test_hill_options_are_checked_at_load():
    base = REPO / "configs" / "vlm_hill.yaml"
    with pytest.raises(UserError, match=r"hinter_prompt must contain \{attempt\}"):
        load_config(base, ["methods.hill.hinter_prompt=Question: {question} answer {answer}"])
    with pytest.raises(UserError, match="mode=mix is Scaf-GRPO's row swap"):
        load_config(base, ["methods.hill.mode=mix"])
    with pytest.raises(UserError, match=r"hinter_temperature=0.0 in 0.01..100 \(the sampling temperatures"):
        load_config(base, ["methods.hill.hinter_temperature=0.0"])
    # within (0, 0.01) it loaded, and failed at the hinter's first load mid-run under policy.options.temperature
    with pytest.raises(UserError, match="hinter_temperature=0.005 in 0.01..100"):
        load_config(base, ["methods.hill.hinter_temperature=0.005"])
