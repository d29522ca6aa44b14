"""The VLM recipes read Hugging Face datasets (``data.options.path: hf:PATH[:SPLIT]``, docs/data.md): a tiny dataset
is built with ``datasets`` and written with ``save_to_disk``, its images as ``Image`` features or paths; its rows get
the checks a JSONL file's lines get, each error naming the dataset, the row and the field (the recipes used to refuse
such a folder and suggest ``Dataset.to_json``)."""

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmgrpo.data.hf_datasets import StoredImage, _row_value, dataset_rows, open_dataset
from mmgrpo.pipelines.vlm_grounding import GroundingExamples, VLMGroundingDataOptions, load_grounding_jsonl
from mmgrpo.pipelines.vlm_reasoning import QAExamples, VLMReasoningDataOptions, load_jsonl
from mmgrpo.testing.data_files import raises

pytestmark = pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets is not installed")
ROOT = Path(__file__).resolve().parents[2]


def png(size=(32, 24), colour=(200, 0, 0)) -> Image.Image:
    return Image.new("RGB", size, colour)


def saved(folder: Path, name: str, rows: list[dict], features: dict | None = None) -> str:
    """``rows`` saved with save_to_disk as ``folder/name``; ``features``: the columns' types where inference is not
    meant (an Image feature); -> the ``hf:`` spec."""
    import datasets

    columns = {k: [r.get(k) for r in rows] for k in rows[0]}
    feats = None
    if features:
        probe = datasets.Dataset.from_dict({k: v for k, v in columns.items() if k not in features})
        feats = datasets.Features({**probe.features, **features})
    datasets.Dataset.from_dict(columns, features=feats).save_to_disk(str(folder / name))
    return f"hf:{folder / name}"


def test_a_saved_dataset_with_image_features_and_paths_loads_and_its_images_reach_the_examples(folder):
    import datasets

    rows = [{"question": "What colour?", "answer": ["red"], "image": png(), "images": None},
            {"question": "Which is larger?", "answer": ["B", "b"], "image": None, "images": [png(), png((8, 8))]},
            {"question": "How many?", "answer": ["3"], "image": None, "images": []}]  # fmt: skip
    spec = saved(folder, "qa", rows, {"image": datasets.Image(), "images": datasets.List(datasets.Image())})
    ex = load_jsonl(spec)
    assert [p["question"] for p, _ in ex] == ["What colour?", "Which is larger?", "How many?"]
    assert ex[1][1]["answer"] == ["B", "b"] and ex[2][1]["images"] == []
    assert all(isinstance(im, StoredImage) for im in ex[0][1]["images"] + ex[1][1]["images"])  # kept encoded
    assert ex[1][1]["images"][1].size == (8, 8)
    qa = QAExamples(VLMReasoningDataOptions(path=spec, heldout_fraction=0.34))
    _, meta = qa.example(0)  # decoded when an example is asked for: what the policy's load_image takes
    assert isinstance(meta["images"][0], Image.Image) and meta["images"][0].getpixel((0, 0)) == (200, 0, 0)
    assert isinstance(qa.records[0][1]["images"][0], StoredImage)  # the pool keeps the bytes, not the pixels
    # paths in a dataset are relative to the folder holding the saved folder, as a file's are to the file's folder
    spec = saved(folder, "paths", [{"question": "q", "answer": "a", "image": "a.png"},
                                   {"question": "q", "answer": "a", "image": str(folder / "a.png")}])  # fmt: skip
    assert load_jsonl(spec)[0][1]["images"] == [str(folder / "a.png")]
    spec = saved(folder, "gone", [{"question": "q", "answer": "a", "image": "gone.png"}])
    raises(load_jsonl, spec, r"hf:.*gone row 0: image '.*gone.png' not found")


@pytest.mark.parametrize(
    "row, match",
    [
        ({"answer": None}, r"row 1: 'answer' must be text, a number or a list of acceptable answers, got null"),
        ({"question": " "}, r"row 1: 'question' must be a non-empty string"),
        ({"options": ["red", "blue"], "answer": "C"}, r"row 1: 'answer' 'C' names option C but the example has 2"),
        ({"score": float("nan")}, r"row 1: column 'score' holds nan, which is not a finite number"),
        ({"image": {"bytes": b"not an image", "path": None}}, r"row 1: the image stored in column 'image' cannot be"),
    ],
)
def test_bad_rows_of_a_dataset_name_the_dataset_the_row_and_the_field(folder, row, match):
    import datasets

    good = {"question": "What colour?", "answer": "red", "image": png(), "options": None, "score": 1.0}
    spec = saved(folder, "bad", [good, {**good, **row}], {"image": datasets.Image()})
    msg = raises(load_jsonl, spec, rf"^hf:.*bad {match}")
    assert "\n" not in msg


def test_reading_a_datasets_images_writes_nothing_into_its_folder(folder):
    # the rows were read through ds.cast(...), which wrote a cache file as large as the data into the user's dataset
    # folder (and failed in a read-only one)
    import datasets

    rows = [{"question": "What colour?", "answer": "red", "image": png(), "images": [png(), png((8, 8))]}] * 2
    spec = saved(folder, "ds", rows, {"image": datasets.Image(), "images": datasets.List(datasets.Image())})
    before = {p.name: p.stat().st_size for p in (folder / "ds").iterdir()}
    (_, meta), _ = dataset_rows(open_dataset(spec, "test"), spec)
    assert {p.name: p.stat().st_size for p in (folder / "ds").iterdir()} == before
    assert isinstance(meta["image"], StoredImage) and [im.size for im in meta["images"]] == [(32, 24), (8, 8)]


def test_trl_rows_whose_parts_arrow_filled_with_none_read_as_the_file_would(folder):
    # Arrow gives every part of a column the keys of all: {"type": "image"} comes back as {"type": "image", "text":
    # None}, and the question read 'None\nWhat colour?'
    import datasets

    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    rows = [{"prompt": prompt, "images": [png()], "solution": "red"}] * 2
    spec = saved(folder, "trl", rows, {"images": datasets.List(datasets.Image())})
    (prompt_0, meta), _ = load_jsonl(spec)
    assert prompt_0["question"] == "What colour?" and meta["answer"] == "red" and len(meta["images"]) == 1
    bad = [{**rows[0], "images": [png(), png()]}]
    spec = saved(folder, "trl2", bad, {"images": datasets.List(datasets.Image())})
    raises(load_jsonl, spec, r"row 0: the question holds 1 image placeholder\(s\) but the example names 2 image")


def test_grounding_reads_a_dataset_and_checks_its_boxes_in_the_stored_image(folder):
    import datasets

    exif = Image.Exif()
    exif[0x0112] = 6  # a phone photo stored 32 x 24, shown 24 x 32
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(buffer, "JPEG", exif=exif)
    phone = {"bytes": buffer.getvalue(), "path": None}
    rows = [{"image": png(), "question": "Locate it.", "box": [1.0, 2.0, 10.0, 12.0]},
            {"image": phone, "question": "Locate it.", "box": [0.0, 0.0, 24.0, 32.0]}]  # fmt: skip
    spec = saved(folder, "g", rows, {"image": datasets.Image()})
    (_, m0), (_, m1) = load_grounding_jsonl(spec)
    assert m0["image_size"] == (32, 24) and m1["image_size"] == (24, 32)  # the size as shown
    g = GroundingExamples(VLMGroundingDataOptions(path=spec, heldout_fraction=0.5))
    assert g.example(1)[1]["images"][0].size == (24, 32)  # decoded upright, as a path's image is
    spec = saved(folder, "g2", [rows[0], {**rows[1], "box": [0.0, 0.0, 32.0, 24.0]}], {"image": datasets.Image()})
    raises(load_grounding_jsonl, spec, r"hf:.*g2 row 1: box \[0.0, 0.0, 32.0, 24.0\] reaches outside the 24x32 image")
    spec = saved(folder, "g3", [{"image": "a.png", "problem": "Locate it.", "solution": "[1, 2, 3]"}])
    raises(load_grounding_jsonl, spec, r"g3 row 0: box must be \[x1, y1, x2, y2\]")


def test_the_spec_splits_folders_and_repeats(folder):
    import datasets

    rows = [{"question": f"What colour is {i}?", "answer": "red", "image": "a.png"} for i in range(4)]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder / "dict"))
    assert len(load_jsonl(f"hf:{folder / 'dict'}:test")) == 4
    raises(load_jsonl, f"hf:{folder / 'dict'}", r"path='hf:.*dict': the saved dataset has no split 'train'")
    raises(load_jsonl, f"hf:{folder / 'dict'}:test:question", r"names a column; an example is a whole row")
    raises(load_jsonl, str(folder / "dict"), r"is a folder holding a Hugging Face dataset \(save_to_disk\); write hf:")
    raises(load_jsonl, "hf:", r"data.options.path='hf:' names no dataset")
    # a stored image's repr is its content: the repeated-example check sees two equal rows as equal
    spec = saved(folder, "rep", [{"question": "q", "answer": "a", "image": png()}] * 2, {"image": datasets.Image()})
    a, b = load_jsonl(spec)
    assert json.dumps(a, default=str) == json.dumps(b, default=str) and "sha1" in repr(a[1]["images"][0])


def test_a_vlm_run_trains_a_step_on_a_saved_dataset(folder):
    # the images stored in the dataset reach the model: one real step of the tiny Qwen2-VL
    import datasets

    from mmgrpo.train.config import load_config
    from mmgrpo.train.trainer import train

    rows = [{"question": f"What colour is shape {i}?", "options": ["red", "blue"], "answer": "A", "image": png()}
            for i in range(4)]  # fmt: skip
    spec = saved(folder, "run", rows, {"image": datasets.Image()})
    overrides = [f"data.options.path={spec}", f"run.output_dir={folder / 'runs'}",
                 f"policy.options.path={ROOT / 'assets' / 'tiny_qwen2_vl'}", "policy.options.max_new_tokens=4",
                 "data.options.eval_examples=1", "trainer.max_steps=1", "trainer.prompts_per_step=1",
                 "trainer.group_size=2", "trainer.eval_every=0", "trainer.progress=false",
                 "trainer.checkpoint_every=0"]  # fmt: skip
    cfg = load_config(ROOT / "configs" / "vlm_reasoning_tiny.yaml", overrides)
    train(cfg)
    lines = (folder / "runs" / "vlm_reasoning_tiny" / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(x) for x in lines]
    assert any("reward/accuracy" in m for m in metrics)


def test_stored_videos_become_files_the_video_readers_open(folder, monkeypatch):
    """A ``Video`` feature: datasets decodes it only with torchcodec (an ImportError traceback while the rows were
    read); its bytes are now written once to the cache (named by their hash) and the example holds that file's path,
    opened at load like a file's video; a video given by its path alone stays that path; bad bytes name the row."""
    import datasets

    from mmgrpo.testing.vlm_checks import write_mp4

    monkeypatch.setenv("XDG_CACHE_HOME", str(folder / "cache"))
    write_mp4(folder / "clip.mp4")
    video = datasets.Video()
    spec = saved(folder, "vid", [{"question": "How many frames?", "answer": "8", "video": str(folder / "clip.mp4")}],
                 {"video": video})  # fmt: skip
    ((_, meta),) = load_jsonl(spec)
    cached = Path(meta["video"])
    assert cached.parent == folder / "cache" / "mmgrpo" / "videos" and cached.suffix == ".mp4"
    assert cached.read_bytes() == (folder / "clip.mp4").read_bytes()  # save_to_disk embedded the bytes
    assert load_jsonl(spec)[0][1]["video"] == str(cached)  # written once: the same file again
    assert not list(cached.parent.glob(".*.tmp"))
    # a video the dataset holds by its path alone (save_to_disk embeds the bytes; other writers may not): the path,
    # which the recipe resolves as a file's paths
    assert _row_value({"path": "clip.mp4", "bytes": None}, video, "column 'video'", "row 0") == "clip.mp4"
    (folder / "bad.mp4").write_bytes(b"not a video")
    bad = saved(folder, "vid_bad", [{"question": "q", "answer": "a", "video": str(folder / "bad.mp4")}],
                {"video": video})  # fmt: skip
    raises(load_jsonl, bad, r"vid_bad row 0: video '.*' cannot be read")
