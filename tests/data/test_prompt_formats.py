"""Prompt files in every documented format (docs/data.md): .txt, .jsonl and .csv read right, errors name the file
(and line), meta rides along in the batch, a Hugging Face spec without `datasets` says how to install it, and a
text-to-image run trains 2 steps on each format."""

import importlib.util
import io
import json
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

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


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets is not installed")
def test_hf_prompts_keep_stored_images_encoded_and_name_a_corrupt_one(tmp_path):
    # iterating the dataset held every image decoded in each prompt's meta (786 kB a 512-pixel image), and a corrupt
    # one was an OSError traceback: the rows are now read as the VLM loader reads them
    import datasets

    from mmgrpo.data.hf_datasets import StoredImage
    from mmgrpo.policies.vlm_inputs import load_image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 0, 0)).save(buffer, "PNG")
    good = {"bytes": buffer.getvalue(), "path": None}
    bad = {"bytes": b"\x89PNG\r\n\x1a\n garbage", "path": None}
    features = datasets.Features({"prompt": datasets.Value("string"), "image": datasets.Image()})
    for name, images in (("ok", [good, good]), ("bad", [good, bad])):
        rows = {"prompt": ["edit this", "and this"], "image": images}
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / name))
    got = read_prompts(f"hf:{tmp_path / 'ok'}", "train", 0)
    assert got == ["edit this", "and this"] and isinstance(got[0].meta["image"], StoredImage)
    assert got[0].meta["image"].size == (16, 8) and load_image(got[0].meta["image"]).size == (16, 8)
    batch = PromptList(got, seed=0).get([0])  # a reward reads the image decoded, as before
    assert isinstance(batch.meta[0]["image"], Image.Image) and batch.meta[0]["image"].getpixel((0, 0)) == (200, 0, 0)
    with pytest.raises(UserError, match=r"hf:.*bad row 1: the image stored in column 'image' cannot be read"):
        read_prompts(f"hf:{tmp_path / 'bad'}", "train", 0)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets is not installed")
def test_hf_prompts_of_a_dataset_with_configs_name_one_after_an_at(tmp_path):
    # load_dataset never got a config name, and a 4th field (where one might be written) was dropped unread
    for config, prompt in (("en", "a cat"), ("de", "eine Katze")):
        (tmp_path / "ds" / config).mkdir(parents=True)
        (tmp_path / "ds" / config / "train.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
    (tmp_path / "ds" / "README.md").write_text(
        "---\nconfigs:\n- config_name: en\n  data_files: en/train.jsonl\n"
        "- config_name: de\n  data_files: de/train.jsonl\n---\n"
    )
    spec = f"hf:{tmp_path / 'ds'}"
    assert read_prompts(f"{spec}@en", "train", 0) == ["a cat"]
    assert read_prompts(f"{spec}@de:train:prompt", "train", 0) == ["eine Katze"]
    with pytest.raises(UserError, match=r"available configs: \['en', 'de'\].*hf:NAME@CONFIG"):
        read_prompts(spec, "train", 0)
    with pytest.raises(UserError, match=r"has 4 ':'-separated fields.*NAME_OR_PATH\[@CONFIG\]\[:SPLIT\[:COLUMN\]\]"):
        read_prompts(f"{spec}:train:prompt:en", "train", 0)


def test_prompt_list_draws_each_epochs_permutation_once(monkeypatch):
    # a fresh permutation of all the prompts was drawn for every index: 0.8 s a step of 64 at a million prompts
    import numpy as np

    prompts = [f"p{i}" for i in range(1000)]
    indices = list(range(990, 1010))  # the end of epoch 0 and the start of epoch 1
    expected = [prompts[np.random.default_rng([7, i // 1000]).permutation(1000)[i % 1000]] for i in indices]
    calls = []
    default_rng = np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", lambda seed: calls.append(seed) or default_rng(seed))
    prompt_list = PromptList(prompts, seed=7)
    assert prompt_list.get(indices).prompts == expected
    assert prompt_list.get(indices[:5]).prompts == expected[:5]
    assert calls == [[7, 0], [7, 1]]


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "sd3")


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "list"])
def test_text_to_image_trains_two_steps_on_each_format(tiny_sd3, tmp_path, fmt, monkeypatch):
    """Each prompt file format, and the prompts given in the config itself as a list of texts (a library user had to
    write a file for two prompts); the list is the run's config.yaml, so a resume reads the same prompts."""
    inline = ["a red circle", " two blue squares ", "dog"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dog").mkdir()
    spec = inline if fmt == "list" else str(write_formats(tmp_path)[fmt])
    base = {
        "pipeline": "text_to_image",
        "policy": {"options": {"family": "sd3", "path": tiny_sd3, "num_steps": 2, "lora_rank": 2}},
        "data": {"options": {"prompts": spec, "heldout_prompts": ""}},
        "rewards": [{"name": "jpeg_incompressibility"}],
        "trainer": {"prompts_per_step": 1, "group_size": 2},
    }
    trainer = train(load_config(None, [f"run.output_dir={tmp_path / 'run'}", *FAST], base=base))
    assert len((trainer.run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    if fmt == "list":  # "dog" names a folder in the working directory: a prompt all the same, not made a path
        assert trainer.comp.prompts.prompts == ["a red circle", "two blue squares", "dog"]
        assert load_config(trainer.run_dir / "config.yaml").data.options["prompts"] == inline
        with pytest.raises(UserError, match=r"data.options.prompts=\['a', ' '\]: its item 1 is empty"):
            load_config(None, [f"run.output_dir={tmp_path}", "data.options.prompts=[a, ' ']"], base=base)


def test_empty_training_prompts_are_refused_when_the_config_loads(tmp_path):
    """data.options.prompts '' was "no training prompts" once the run built (after the model loaded)."""
    for empty in ("''", "' '"):
        with pytest.raises(UserError, match=r"data.options.prompts=.* give the training prompts: 'shapes', a prompt"):
            load_config(
                "configs/shapes_t2i_grpo.yaml", [f"run.output_dir={tmp_path}", f"data.options.prompts={empty}"]
            )


def test_own_prompts_evaluated_on_the_shapes_worlds_held_out_prompts_are_said_with_a_long_list_cut():
    from mmgrpo.pipelines.text_to_image import PromptDataOptions, read_prompt_splits

    many = [f"prompt number {i}" for i in range(200)]
    with pytest.warns(UserWarning, match=r"data.options.prompts=\['prompt number 0', .*\.\.\. \(\d+ characters\) but "
                      "heldout_prompts is the default 'shapes'") as seen:  # fmt: skip
        train, heldout = read_prompt_splits(PromptDataOptions(prompts=many))
    assert train == many and heldout and len(str(seen[0].message)) < 400
