"""Prompt files in every documented format (docs/data.md): .txt, .jsonl and .csv read right, errors name the file
(and line), meta rides along in the batch, a Hugging Face spec without `datasets` says how to install it, and a
text-to-image run trains 2 steps on each format."""

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest

from mmgrpo.core.errors import UserError
from mmgrpo.data.prompts import PromptList, read_prompts
from mmgrpo.testing.tiny_sd3 import save_tiny_sd3
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

FAST = ["trainer.max_steps=2", "trainer.eval_every=0", "trainer.progress=false", "trainer.checkpoint_every=0"]


def write_formats(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue square  \n")
    rows = [{"prompt": "a red circle", "source": "x", "n": 1}, {"prompt": "a blue square", "source": "y", "n": 2}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "p.csv").write_text('prompt,source\na red circle,x\n"a blue square, small",y\n')
    return {s: tmp_path / f"p.{s}" for s in ("txt", "jsonl", "csv")}


def test_txt_jsonl_and_csv_prompts_read_with_meta(tmp_path):
    files = write_formats(tmp_path)
    assert read_prompts(str(files["txt"]), "train", 0) == ["a red circle", "a blue square"]
    got = read_prompts(str(files["jsonl"]), "train", 0)
    assert got == ["a red circle", "a blue square"] and got[1].meta == {"source": "y", "n": 2}
    got = read_prompts(str(files["csv"]), "train", 0)
    assert got == ["a red circle", "a blue square, small"] and [p.meta for p in got] == [
        {"source": "x"},
        {"source": "y"},
    ]
    batch = PromptList(got, seed=0).get([0, 1])
    assert sorted(m["source"] for m in batch.meta) == ["x", "y"]
    assert [m["source"] for m in batch.meta] == [p.meta["source"] for p in batch.prompts]
    assert PromptList(read_prompts(str(files["txt"]), "train", 0), seed=0).get([0]).meta == [{}]


def test_txt_comment_lines_are_dropped_with_one_warning(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# my prompts\na red circle\n# more\na blue square\n")
    with pytest.warns(UserWarning, match="2 line"):
        assert read_prompts(str(path), "train", 0) == ["a red circle", "a blue square"]
    path.write_text("a red circle\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_prompts(str(path), "train", 0)


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("p.yaml", "- a\n", r"p\.yaml' must end in \.txt"),
        ("p", "a\n", "no extension"),
        ("p.txt", "\n \n", "holds no prompts"),
        ("p.jsonl", "", "holds no prompts"),
        ("p.csv", "", "holds no prompts"),
        ("p.jsonl", '{"prompt": "a"}\n{"text": "b"}\n', r"p\.jsonl' line 2: each row needs a 'prompt' field"),
        ("p.jsonl", '{"prompt": "a"}\n\n{oops\n', r"line 3 is not valid JSON"),
        ("p.jsonl", '{"prompt": ""}\n', "non-empty string"),
        ("p.jsonl", '["a"]\n', "needs a 'prompt' field"),
        ("p.csv", "text,source\na,x\n", "no 'prompt' column"),
    ],
)
def test_bad_prompt_files_are_clear_errors(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=match) as e:
        read_prompts(str(tmp_path / name), "train", 0)
    assert name in str(e.value)


def test_hf_prompts_without_datasets_say_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # not importable, installed or not
    with pytest.raises(UserError, match="pip install datasets"):
        read_prompts("hf:some/prompts:train:text", "train", 0)
    with pytest.raises(UserError, match="names no dataset"):
        read_prompts("hf:", "train", 0)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets is not installed")
def test_hf_prompts_from_a_local_dataset(tmp_path):
    (tmp_path / "ds").mkdir()
    write_formats(tmp_path / "ds")["jsonl"]
    for other in ("txt", "csv"):
        (tmp_path / "ds" / f"p.{other}").unlink()
    got = read_prompts(f"hf:{tmp_path / 'ds'}:train", "train", 0)  # a local folder, as load_dataset reads it
    assert got == ["a red circle", "a blue square"] and got[0].meta["source"] == "x"


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "sd3")


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv"])
def test_text_to_image_trains_two_steps_on_each_format(tiny_sd3, tmp_path, fmt):
    path = write_formats(tmp_path)[fmt]
    base = {
        "pipeline": "text_to_image",
        "policy": {"options": {"family": "sd3", "path": tiny_sd3, "num_steps": 2, "lora_rank": 2}},
        "data": {"options": {"prompts": str(path), "heldout_prompts": ""}},
        "rewards": [{"name": "jpeg_incompressibility"}],
        "trainer": {"prompts_per_step": 1, "group_size": 2},
    }
    trainer = train(load_config(None, [f"run.output_dir={tmp_path / 'run'}", *FAST], base=base))
    assert len((trainer.run_dir / "metrics.jsonl").read_text().splitlines()) == 2
