"""The vlm_reasoning recipe: synthetic shapes QA, JSONL data, the split and stream, the tiny asset, a smoke run."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmgrpo.core.errors import UserError
from mmgrpo.pipelines.vlm_reasoning import QAExamples, QAPrompts, VLMReasoningDataOptions, load_jsonl, shapes_question
from mmgrpo.policies.vlm import VLMPolicy, VLMPolicyOptions
from mmgrpo.rewards.text import has_valid_format
from mmgrpo.testing.vlm_checks import write_mp4
from mmgrpo.train.config import load_config, read_yaml
from mmgrpo.train.trainer import train
from scripts.make_tiny_vlm import main as make_tiny_vlm
from scripts.make_tiny_vlm import warm_up_format

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "vlm_reasoning_tiny.yaml"


def test_shapes_questions_are_deterministic_and_answered_by_the_scene():
    kinds = set()
    for i in range(40):
        prompt, meta = shapes_question(i, seed=0, size=32)
        again, meta2 = shapes_question(i, seed=0, size=32)
        assert prompt == again and meta["answer"] == meta2["answer"]
        assert np.array_equal(meta["images"][0], meta2["images"][0]) and meta["images"][0].shape == (32, 32, 3)
        words = prompt["question"].rstrip("?").split()
        if words[0] == "How":  # "How many red circles are there?"
            color, shape = words[2], words[3][:-1]
            n = sum(obj == (color, shape) for obj in meta["objects"])
            assert prompt["options"] == ["1", "2", "3"] and meta["answer"] == "ABC"[n - 1]
            kinds.add("count")
        else:  # "Is there a blue square?"
            color, shape = words[-2], words[-1]
            present = (color, shape) in meta["objects"]
            assert prompt["options"] == ["yes", "no"] and meta["answer"] == ("A" if present else "B")
            kinds.add("exists" if present else "absent")
    assert kinds == {"count", "exists", "absent"}
    assert shapes_question(0, seed=1)[1]["answer"] is not None  # another seed is another pool


def test_split_is_disjoint_and_the_stream_visits_every_train_example_once_per_epoch():
    ex = QAExamples(VLMReasoningDataOptions(num_examples=20, heldout_fraction=0.25))
    assert len(ex.heldout) == 5 and len(ex.train) == 15  # round(0.25 * 20) = 5
    assert set(ex.heldout).isdisjoint(ex.train) and set(ex.heldout) | set(ex.train) == set(range(20))
    stream = QAPrompts(ex, order_seed=0)
    first = [stream.example_at(i) for i in range(15)]
    assert sorted(first) == ex.train
    assert [stream.example_at(i) for i in range(15, 30)] != first  # a fresh order for epoch 2
    a, b = stream.get([3, 4]), stream.get([3, 4])
    assert a.prompts == b.prompts and len(a) == 2
    with pytest.raises(UserError, match="heldout_fraction"):
        QAExamples(VLMReasoningDataOptions(heldout_fraction=1.0))


def test_jsonl_examples_resolve_media_next_to_the_file(tmp_path):
    Image.new("RGB", (40, 30), (200, 0, 0)).save(tmp_path / "red.png")
    write_mp4(tmp_path / "clip.mp4")  # media are opened when the file loads
    rows = [
        {"question": "What colour?", "options": ["red", "blue"], "answer": "A", "image": "red.png", "source": "x"},
        {"question": "How long?", "answer": 3, "video": "clip.mp4"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ex = load_jsonl(path)
    assert len(ex) == 2
    (p0, m0), (p1, m1) = ex
    assert p0 == {"question": "What colour?", "options": ["red", "blue"]}
    assert m0 == {"answer": "A", "source": "x", "images": [str(tmp_path / "red.png")]}
    assert m1["video"] == str(tmp_path / "clip.mp4") and m1["images"] == []
    for bad, match in [("{not json", "not valid JSON"), ('{"question": "q"}', "'question' and 'answer'")]:
        path.write_text(bad)
        with pytest.raises(UserError, match=match):
            load_jsonl(path)
    with pytest.raises(UserError, match="not found"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_config_opens_with_its_command_and_loads():
    assert CONFIG.read_text().splitlines()[0] == "# mmgrpo train configs/vlm_reasoning_tiny.yaml"
    cfg = load_config(CONFIG)
    assert cfg.pipeline == "vlm_reasoning" and cfg.policy.options["path"] == "assets/tiny_qwen2_vl"
    with pytest.raises(UserError, match="policy.options.max_new_token"):
        load_config(CONFIG, ["policy.options.max_new_token=3"])  # a typo is an error, not a silent default


BAD_DATA = [  # (overrides, the start of the error); each used to end in a numpy / ZeroDivisionError traceback, a
    # message that named no key, or NaN / silently truncated evaluations (found by fuzzing the shipped configs)
    (["data.options.split_seed=-1"], "data.options.split_seed=-1: a seed is an integer >= 0"),
    (["data.options.eval_examples=0"], "data.options.eval_examples=0: an evaluation needs at least 1 held-out"),
    (["data.options.eval_examples=-1"], "data.options.eval_examples=-1: an evaluation needs at least 1 held-out"),
    (["data.options.num_examples=1"], "data.options.num_examples=1: the synthetic shapes QA needs at least 2"),
    (["data.options.num_examples=-1"], "data.options.num_examples=-1: the synthetic shapes QA needs at least 2"),
    (["data.options.image_size=0"], r"data.options.image_size=0: source shapes renders images of a side in 16\.\.512"),
    (["data.options.source=shapes_qa", "data.options.num_examples=0"],
     "data.options.num_examples=0: source shapes_qa needs at least 1 train scene"),
    (["data.options.source=shapes_qa", "data.options.image_size=-1"],
     r"data.options.image_size=-1: source shapes_qa renders images of a side in 32\.\.512"),
    # huge values: a 100000-pixel side was a 30 GB image (MemoryError at the first rollout), a billion examples a
    # numpy ArrayMemoryError in the split's permutation (and a hang drawing shapes_qa's seeds)
    (["data.options.image_size=100000"], r"data.options.image_size=100000: source shapes renders images of a side "
     r"in 16\.\.512 pixels"),
    (["data.options.num_examples=1000000000"], "data.options.num_examples=1000000000: source shapes draws at most "
     "1,000,000 scenes"),
    (["data.options.source=shapes_qa", "data.options.num_examples=1000000000"],
     "data.options.num_examples=1000000000: source shapes_qa draws at most 1,000,000 scenes"),
    (["data.options.source=shapes_qa", "data.options.eval_examples=1000000000"],
     "data.options.eval_examples=1000000000: source shapes_qa draws at most 1,000,000 scenes"),
]  # fmt: skip


@pytest.mark.parametrize("overrides, match", BAD_DATA, ids=[" ".join(o) for o, _ in BAD_DATA])
def test_bad_data_numbers_fail_when_the_config_loads(overrides, match):
    """Checked by the data options' dataclass (the recipe's schema), before any model or example is built."""
    with pytest.raises(UserError, match=f"^{match}"):
        load_config(CONFIG, overrides)


def test_data_numbers_of_the_synthetic_data_do_not_bind_a_jsonl_file():
    data = VLMReasoningDataOptions(path="examples.jsonl", num_examples=0, image_size=0)  # unused with a file
    assert data.num_examples == 0
    assert VLMReasoningDataOptions(path="examples.jsonl", num_examples=10**9, image_size=10**5).image_size == 10**5
    ok = VLMReasoningDataOptions(num_examples=1_000_000, image_size=512)  # the bounds themselves are accepted
    assert ok.num_examples == 1_000_000


def test_make_tiny_vlm_writes_a_small_loadable_dir_and_the_warm_up_teaches_the_format(tmp_path):
    out = make_tiny_vlm(["--out", str(tmp_path / "m"), "--sft-steps", "0"])
    size = sum(f.stat().st_size for f in out.iterdir())
    assert (out / "model.safetensors").is_file() and size < 5e6
    policy = VLMPolicy.from_pretrained(str(out), VLMPolicyOptions(max_new_tokens=4))
    assert policy.family == "qwen2_vl"
    torch.manual_seed(0)
    losses = warm_up_format(policy.model.hf, policy.processor, steps=6, batch=2)
    assert losses[-1] < losses[0]  # NLL of the format target falls


def test_the_shipped_asset_writes_the_r1_format():
    asset = REPO / read_yaml(CONFIG)["policy"]["options"]["path"]
    size = sum(f.stat().st_size for f in asset.iterdir())
    assert size < 5e6, size
    from mmgrpo.pipelines.vlm_reasoning import shapes_question as q

    policy = VLMPolicy.from_pretrained(str(asset), VLMPolicyOptions(max_new_tokens=32, finetune="full"))
    from mmgrpo.core.types import PromptBatch

    examples = [q(10_000 + i) for i in range(3)]
    texts = policy.generate(PromptBatch([p for p, _ in examples], [m for _, m in examples]))
    assert all(has_valid_format(t) for t in texts), texts


def test_recipe_smoke_run_trains_and_evaluates(tmp_path):
    model_dir = make_tiny_vlm(["--out", str(tmp_path / "m"), "--sft-steps", "0"])
    cfg = load_config(
        CONFIG,
        [
            f"run.output_dir={tmp_path}",
            f"policy.options.path={model_dir}",
            "policy.options.max_new_tokens=6",
            "data.options.num_examples=12",
            "data.options.eval_examples=2",
            "trainer.max_steps=1",
            "trainer.prompts_per_step=2",
            "trainer.group_size=2",
            "trainer.micro_batch_size=2",
            "trainer.eval_every=1",
            "trainer.progress=false",
            "loss.beta=0.04",  # exercises the reference (LoRA disabled) and the KL term
        ],
    )
    trainer = train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "vlm_reasoning_tiny" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [0, 1] and all(0.0 <= m["eval/format"] <= 1.0 for m in evals)
    step = next(m for m in lines if "reward/format" in m)
    assert "reward/accuracy" in step and "loss/policy" in step
    assert 1 <= step["completion/length_mean"] <= step["completion/length_max"] <= 6
    assert 0.0 <= step["completion/truncated_frac"] <= 1.0
    for s, ev in zip((0, 1), evals):  # the held-out completions of each evaluation
        path = tmp_path / "vlm_reasoning_tiny" / "samples" / f"completions_step_{s:06d}.jsonl"
        records = [json.loads(x) for x in path.read_text().splitlines()]
        assert len(records) == 1  # 12 examples: round(0.1 * 12) = 1 held out (eval_examples=2 caps, not fills)
        assert {"prompt", "completion", "answer", "correct"} <= set(records[0])
        assert np.mean([r["correct"] for r in records]) == pytest.approx(ev["eval/accuracy"])
    assert trainer.policy.reference and (tmp_path / "vlm_reasoning_tiny" / "checkpoints").is_dir()


def test_tensorboard_gets_the_vlm_curves_and_each_evaluations_completion_table(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from tensorboard.util.tensor_util import make_ndarray

    model_dir = make_tiny_vlm(["--out", str(tmp_path / "m"), "--sft-steps", "0"])
    overrides = [f"run.output_dir={tmp_path}", f"policy.options.path={model_dir}", "policy.options.max_new_tokens=6"]
    overrides += ["data.options.num_examples=20", "data.options.eval_examples=2", "trainer.max_steps=2"]
    overrides += ["trainer.prompts_per_step=2", "trainer.group_size=2", "trainer.eval_every=2"]
    overrides += ["trainer.progress=false", "trainer.log_with=[tensorboard]"]
    trainer = train(load_config(CONFIG, overrides))
    events = event_accumulator.EventAccumulator(str(trainer.run_dir / "vlm_reasoning_tiny"), {"tensors": 0})
    events.Reload()
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "completion/entropy" in m]
    for tag in ("completion/entropy", "completion/length_mean", "loss/clip_frac_low", "loss/clip_frac_high"):
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [(m["step"], pytest.approx(m[tag])) for m in steps]
    tables = [
        (e.step, make_ndarray(e.tensor_proto).item().decode()) for e in events.Tensors("eval/completions/text_summary")
    ]
    assert [s for s, _ in tables] == [0, 2]
    for step, text in tables:  # the markdown table holds the same completions as the evaluation's JSONL
        records = [json.loads(x) for x in (trainer.run_dir / "samples" / f"completions_step_{step:06d}.jsonl").open()]
        rows = text.splitlines()[2:]
        assert text.splitlines()[0] == "| prompt | completion | answer | correct |" and len(rows) == len(records) == 2
        assert all(f"| {r['answer']} | {r['correct']} |" in row for r, row in zip(records, rows))


def test_a_resume_over_an_edited_question_file_is_refused_unless_forced(tmp_path):
    """The stream's positions name train examples by their place in the split: a question file edited to the same
    number of lines, or an image replaced under its name, would make the rest of the pass repeat some examples and
    skip others. The checkpoint keeps the examples' fingerprint (questions, answers, each image's name and the hash
    of its bytes); a resume over other examples names the change, and resume_force=true continues."""
    Image.new("RGB", (32, 32), (200, 0, 0)).save(tmp_path / "red.png")
    rows = [{"question": f"What colour is shape {i}?", "options": ["red", "blue"], "answer": "A", "image": "red.png"}
            for i in range(6)]  # fmt: skip
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = [f"run.output_dir={tmp_path}", "run.name=q", f"data.options.path={data}", "data.options.eval_examples=1",
            f"policy.options.path={REPO / 'assets' / 'tiny_qwen2_vl'}", "policy.options.max_new_tokens=4",
            "trainer.max_steps=3", "trainer.prompts_per_step=2", "trainer.group_size=2", "trainer.micro_batch_size=4",
            "trainer.checkpoint_every=1", "trainer.eval_every=0", "trainer.progress=false"]  # fmt: skip
    first = train(load_config(CONFIG, [*over, "trainer.stop_after_steps=1"]))
    resume = [*over, f"resume={first.run_dir}"]
    text = data.read_text()
    data.write_text(text.replace('"answer": "A"', '"answer": "B"', 2))  # the same count, two answers edited
    with pytest.raises(UserError, match=r"^resume: the training prompts changed since checkpoint .*step_000001 "
                       r"\(the same number, edited: .*\).*resume_force=true") as e:  # fmt: skip
        train(load_config(CONFIG, resume))
    assert "\n" not in str(e.value)  # one paragraph
    data.write_text(text)  # restored: the same examples, read again, have the same fingerprint
    assert train(load_config(CONFIG, [*resume, "trainer.stop_after_steps=1"])).step == 2
    rng = np.random.default_rng(0)  # another picture under the same name (another size: not the same file)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "red.png")
    with pytest.raises(UserError, match=r"the training prompts changed since checkpoint .*step_000002"):
        train(load_config(CONFIG, resume))
    assert train(load_config(CONFIG, [*resume, "resume_force=true"])).step == 3


def test_a_checkpoint_fingerprinting_images_by_name_and_size_resumes_with_a_warning(tmp_path):
    """Images are fingerprinted by the hash of their bytes since 2026-12-07 (scheme 2); a checkpoint of scheme 1 (name
    and size) never matches today's fingerprint, and was refused as edited data: it is not compared (a warning), the
    count still is; one of scheme 2 still refuses edited data."""
    from types import SimpleNamespace

    from mmgrpo.train.trainer_state import check_prompt_pool, prompt_pool

    ex = QAExamples(VLMReasoningDataOptions(num_examples=4))
    ex.records = [({"question": "q", "options": None}, {"answer": "A", "images": []})] * 4
    tr = SimpleNamespace(cfg=SimpleNamespace(resume_force=False), comp=SimpleNamespace(prompts=QAPrompts(ex, 0)))
    tr.comp.prompt_count = len(tr.comp.prompts)
    saved = prompt_pool(tr)
    assert saved["scheme"] == 2
    with pytest.warns(UserWarning, match="fingerprinted the training prompts in an older way"):
        check_prompt_pool(tr, {"size": saved["size"], "fingerprint": "of scheme 1"}, "ckpt")
    with pytest.raises(UserError, match="the same number, edited"):
        check_prompt_pool(tr, {**saved, "fingerprint": "another"}, "ckpt")


def test_the_stream_fingerprint_covers_a_stored_images_bytes_and_a_synthetic_sources_options(tmp_path):
    """In-memory (hf: dataset) images are named by the hash of their bytes, taken when they were read; a synthetic
    source by the options that draw its scenes (the same options draw the same scenes)."""
    from mmgrpo.data.hf_datasets import StoredImage

    def stored(color):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), color).save(buf, format="PNG")
        return StoredImage.checked(buf.getvalue(), "image", "row 0")

    def fingerprint(image):
        ex = QAExamples(VLMReasoningDataOptions(num_examples=4))
        ex.records = [({"question": "q", "options": None}, {"answer": "A", "images": [image]})] * 4
        return QAPrompts(ex, order_seed=0).fingerprint()

    assert fingerprint(stored((200, 0, 0))) == fingerprint(stored((200, 0, 0)))
    assert fingerprint(stored((200, 0, 0))) != fingerprint(stored((0, 0, 200)))
    shapes = [QAPrompts(QAExamples(VLMReasoningDataOptions(num_examples=20, **o)), 0).fingerprint()
              for o in ({}, {}, {"image_size": 32}, {"split_seed": 1})]  # fmt: skip
    assert shapes[0] == shapes[1] and len(set(shapes)) == 3


def test_a_short_evaluation_of_the_synthetic_shapes_qa_is_named():
    """source: shapes holds out heldout_fraction of num_examples: 20 examples hold out 2, and an evaluation of
    eval_examples=8 answers only those 2 (the warning named only a data file's split)."""
    from mmgrpo.pipelines.vlm_reasoning import build_vlm_reasoning

    asset = REPO / "assets" / "tiny_qwen2_vl"
    cfg = load_config(CONFIG, [f"policy.options.path={asset}", "data.options.num_examples=20",
                               "data.options.eval_examples=8"])  # fmt: skip
    with pytest.warns(UserWarning, match=r"^the synthetic shapes QA: the split holds 2 held-out example\(s\), fewer "
                      r"than data.options.eval_examples=8; each evaluation answers only 2 \(raise "
                      r"data.options.num_examples or data.options.heldout_fraction for more\)") as caught:  # fmt: skip
        comp = build_vlm_reasoning(cfg)
    assert sum("the synthetic shapes QA: the split holds" in str(w.message) for w in caught) == 1  # said once
    assert comp.prompt_count == 18  # the 20 examples less the 2 held out: what training draws from


def test_a_csv_questions_file_is_named_as_unsupported_with_the_conversion_that_works(tmp_path, monkeypatch):
    """A .csv questions file was read as JSON lines: "line 1 is not valid JSON". It is refused by its suffix, naming
    the formats a VLM recipe reads, and the conversion command the message gives turns it into a .jsonl that loads
    (also in the grounding recipe, which reads its files the same way)."""
    import shlex
    import subprocess
    import sys

    from mmgrpo.pipelines.vlm_grounding import load_grounding_jsonl

    Image.new("RGB", (40, 30), (200, 0, 0)).save(tmp_path / "red.png")
    (tmp_path / "q.csv").write_text("question,answer,image\nWhat colour?,red,red.png\n")
    for loader in (load_jsonl, load_grounding_jsonl):
        with pytest.raises(UserError) as e:
            loader(tmp_path / "q.csv")
        msg = str(e.value)
        assert msg.startswith(f"data.options.path='{tmp_path / 'q.csv'}' is a .csv file, which a VLM recipe does not")
        assert ".jsonl file" in msg and ".json file" in msg and "hf:NAME_OR_PATH" in msg
    command = msg[msg.index("python -c") :]
    argv, out = shlex.split(command.replace(" > q.jsonl", "")), tmp_path / "q.jsonl"
    monkeypatch.chdir(tmp_path)
    out.write_text(subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, check=True).stdout)
    ((prompt, meta),) = load_jsonl(out)
    assert prompt["question"] == "What colour?" and meta["answer"] == "red"
    assert meta["images"] == [str(tmp_path / "red.png")]
    (tmp_path / "q.txt").write_text(out.read_text())  # JSON lines in a .txt file read as before
    assert load_jsonl(tmp_path / "q.txt")[0][0]["question"] == "What colour?"


def _evals(run: Path) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: {k: v for k, v in m.items() if k.startswith("eval/")} for m in lines if "eval/accuracy" in m}


def test_a_resumed_run_goes_on_logging_the_gain_against_step_0(tmp_path):
    """The user's report: `mmgrpo train ... trainer.max_steps=3 trainer.eval_every=3 trainer.checkpoint_every=3`,
    then `mmgrpo train runs/g/config.yaml resume=runs/g trainer.max_steps=6` logged no eval/accuracy_gain at step 6
    (PairedScores kept the step-0 scores in memory only). The resumed run reads them back from the run's
    samples/completions_step_000000.jsonl and logs what the uninterrupted run logs."""
    over = [f"run.output_dir={tmp_path}", "policy.options.max_new_tokens=8", "data.options.num_examples=40",
            "data.options.eval_examples=4", "trainer.prompts_per_step=2", "trainer.group_size=2",
            "trainer.micro_batch_size=4", "trainer.eval_every=3", "trainer.checkpoint_every=3",
            "trainer.progress=false"]  # fmt: skip
    whole = train(load_config(CONFIG, [*over, "run.name=whole", "trainer.max_steps=6"])).run_dir
    g = train(load_config(CONFIG, [*over, "run.name=g", "trainer.max_steps=3"])).run_dir
    train(load_config(g / "config.yaml", [f"resume={g}", "trainer.max_steps=6"]))
    a, b = _evals(whole), _evals(g)
    assert sorted(a) == sorted(b) == [0, 3, 6]
    for key in ("eval/accuracy_gain", "eval/accuracy_gain_se"):
        assert key in b[6] and b[6][key] == a[6][key], key
    assert b[6] == a[6]  # the whole evaluation, gains included


def test_the_step_0_baseline_is_read_from_the_directory_the_trainer_writes(tmp_path):
    """Trainer(cfg, run_dir) may write elsewhere than run.output_dir / run.name (the library's way, and the tests'):
    the baseline was looked for under the config's directory, where another run's step-0 file of the same synthetic
    examples would pair."""
    from mmgrpo.pipelines.vlm_reasoning import FIRST_COMPLETIONS, first_completions
    from mmgrpo.train.trainer import Trainer

    cfg = load_config(CONFIG, [f"run.output_dir={tmp_path}", "run.name=named", "data.options.num_examples=8"])
    trainer = Trainer(cfg, tmp_path / "elsewhere")
    assert first_completions(trainer.comp) == tmp_path / "elsewhere" / FIRST_COMPLETIONS


def test_a_resumed_runs_baseline_of_other_examples_is_not_paired(tmp_path):
    """The step-0 records are paired only with an evaluation of the same examples, in the same order (a resume
    forced over other data options must not subtract another question's score): said once, and no gain."""
    from mmgrpo.pipelines.vlm_reasoning import PairedScores, accuracy_scores

    first = tmp_path / "completions_step_000000.jsonl"
    first.write_text("".join(json.dumps({"prompt": q, "completion": "", "correct": c}) + "\n"
                             for q, c in [("a?", 0.0), ("b?", 1.0)]))  # fmt: skip
    same = PairedScores(lambda: first, accuracy_scores)(5, {"accuracy": [1.0, 1.0]}, ["a?", "b?"])
    assert same["accuracy_gain"] == 0.5 and same["accuracy_gain_se"] == pytest.approx(0.5)
    with pytest.warns(UserWarning, match=r"holds other held-out examples than this evaluation .* no eval/\*_gain"):
        other = PairedScores(lambda: first, accuracy_scores)(5, {"accuracy": [1.0, 1.0]}, ["b?", "a?"])
    assert "accuracy_gain" not in other and "accuracy_se" in other
    first.write_text("{torn")
    with pytest.warns(UserWarning, match="is unreadable"):
        assert "accuracy_gain" not in PairedScores(lambda: first, accuracy_scores)(5, {"accuracy": [1.0]}, ["a?"])
