"""What a VLM data file's media must be, checked at load on real files (docs/data.md): an image under a key the
recipe does not read, an image given as a video, and an image of a shape the model's processor refuses were each
loaded without a word (trained text-only, read as a one-frame video, or stopped at training step 1); an image
replaced by another of the same size passed a resume; a .parquet file was refused with advice that did not work."""

import importlib.util
import json
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

from mmgrpo.core.files import MAX_ASPECT_RATIO
from mmgrpo.data.hf_datasets import StoredImage, content_identity
from mmgrpo.pipelines.vlm_grounding import load_grounding_jsonl
from mmgrpo.pipelines.vlm_reasoning import QAExamples, QAPrompts, VLMReasoningDataOptions, load_jsonl
from mmgrpo.testing.data_files import jsonl, raises
from mmgrpo.testing.vlm_checks import write_mp4

needs_datasets = pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets not installed")
QUESTION = {"question": "How many red circles?", "options": ["1", "2", "3"], "answer": "B"}


def noise_png(path, size=(32, 24), seed=0):
    """A PNG of random pixels (its mirror image has other bytes but, compressed alike, the same size)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


# ---------------------------------------------------------------------------------------------- misnamed keys


@pytest.mark.parametrize(
    "key, value, use",
    [
        ("image_path", "imgs/s0.png", "image"),
        ("img", "imgs/s0.png", "image"),
        ("image_file", "imgs/s0.JPG", "image"),
        ("image_files", ["imgs/s0.png"], "images"),  # TRL's name
        ("clip", "clips/c.mp4", "video"),
    ],
)
def test_media_under_a_key_the_recipe_does_not_read_is_named_not_trained_as_text(tmp_path, key, value, use):
    # the path went to meta, images=[] for every example, rc 0: a VLM run trained text-only without a word
    (tmp_path / "imgs").mkdir()
    noise_png(tmp_path / "imgs" / "s0.png")
    (tmp_path / "d.jsonl").write_text(jsonl({**QUESTION, key: value}, {**QUESTION, key: value}))
    shown = value if isinstance(value, str) else value[0]
    message = raises(load_jsonl, tmp_path / "d.jsonl", rf"d.jsonl line 1: no example of .*d.jsonl has an image or a "
                     rf"video, but the field '{key}' holds '{shown}'")  # fmt: skip
    assert "'image' (one path), 'images' (a list of paths) and 'video' (a path)" in message
    assert f"name the field '{use}'" in message


def test_a_file_with_media_or_without_paths_loads_as_before(tmp_path):
    noise_png(tmp_path / "a.png")
    rows = [{**QUESTION, "image": "a.png"}, {**QUESTION, "source": "scan.png"}]  # one text-only example among images
    (tmp_path / "d.jsonl").write_text(jsonl(*rows))
    assert [len(m["images"]) for _, m in load_jsonl(tmp_path / "d.jsonl")] == [1, 0]
    (tmp_path / "d.jsonl").write_text(jsonl({**QUESTION, "source": "page 3"}, {**QUESTION, "answer": "photo.png"}))
    assert [m["images"] for _, m in load_jsonl(tmp_path / "d.jsonl")] == [[], []]  # text-only: no path held
    # a provenance field whose name does not say media (COCO's file_name, source_file) may name a picture the
    # question is not about: said once, the text-only file loads (it was refused, and a reward could not read it)
    (tmp_path / "d.jsonl").write_text(jsonl({**QUESTION, "source_file": "mathvista/figure_12.png"}) * 2)
    with pytest.warns(UserWarning, match=r"the field 'source_file' holds 'mathvista/figure_12.png'.*if it is the "
                      "example's picture, name the field 'image'") as seen:  # fmt: skip
        loaded = load_jsonl(tmp_path / "d.jsonl")
    assert len(seen) == 1 and [m["source_file"] for _, m in loaded] == ["mathvista/figure_12.png"] * 2


@needs_datasets
def test_an_image_column_of_another_name_in_a_dataset_is_named(tmp_path):
    import datasets

    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "img": datasets.Image()})  # fmt: skip
    rows = {"question": ["q", "q"], "answer": ["1", "2"], "img": [Image.new("RGB", (8, 8))] * 2}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    raises(load_jsonl, f"hf:{tmp_path / 'ds'}", r"row 0: no example of hf:.* has an image or a video, but the "
           r"field 'img' holds StoredImage\(8x8, .*\), an image, .*name the field 'image'")  # fmt: skip


# ---------------------------------------------------------------------------------- an image given as a video


def test_an_image_given_as_a_video_and_a_video_given_as_an_image_name_the_key_to_use(tmp_path):
    # a PNG under 'video' loaded as a one-frame video (PyAV opens PNGs); the image-to-video recipe refused it
    noise_png(tmp_path / "s1.png")
    write_mp4(tmp_path / "c.mp4", frames=2, size=16)
    (tmp_path / "d.jsonl").write_text(jsonl({"question": "q", "answer": "1", "video": "s1.png"}))
    raises(load_jsonl, tmp_path / "d.jsonl", r"d.jsonl line 1: 'video' names 's1.png', which is named like an image "
           r"file; give it as 'image'")  # fmt: skip
    (tmp_path / "d.jsonl").write_text(jsonl({"question": "q", "answer": "1", "images": ["s1.png", "c.mp4"]}))
    raises(load_jsonl, tmp_path / "d.jsonl", r"line 1: 'images' names 'c.mp4', which is named like a video file; "
           r"give it as 'video'")  # fmt: skip
    (tmp_path / "d.jsonl").write_text(jsonl({"question": "q", "answer": "1", "video": "c.mp4"}, {"question": "q",
                                            "answer": "1", "image": "s1.png"}))  # fmt: skip
    assert [bool(m.get("video")) for _, m in load_jsonl(tmp_path / "d.jsonl")] == [True, False]


# ------------------------------------------------------------------------------------ extreme aspect ratios


@pytest.mark.parametrize("loader", [load_jsonl, load_grounding_jsonl])
def test_an_image_thinner_than_the_vlm_processor_takes_is_named_at_load(tmp_path, loader):
    # a 10000x3 PNG passed every load check, then transformers' smart_resize raised "absolute aspect ratio must be
    # smaller than 200, got 3333.33" at training step 1
    Image.new("RGB", (10000, 3)).save(tmp_path / "wide.png")
    Image.new("RGB", (MAX_ASPECT_RATIO, 1)).save(tmp_path / "edge.png")  # exactly 200:1, which smart_resize takes
    rows = [{"question": "q", "answer": "1", "image": im, "box": [0, 0, 1, 1]} for im in ("edge.png", "wide.png")]
    (tmp_path / "d.jsonl").write_text(jsonl(*rows))
    raises(loader, tmp_path / "d.jsonl", rf"d.jsonl line 2: image '{tmp_path / 'wide.png'}' is 10000x3 pixels, an "
           r"aspect ratio of 3333:1, more than 200:1: no model reads it .*smart_resize.*; crop it, or")  # fmt: skip
    (tmp_path / "d.jsonl").write_text(jsonl(rows[0], rows[0]))
    assert len(loader(tmp_path / "d.jsonl")) == 2


def test_the_aspect_ratio_limit_is_the_one_transformers_qwen2_vl_processor_enforces():
    smart_resize = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl").smart_resize
    assert smart_resize(28, 28 * MAX_ASPECT_RATIO)  # at the limit: resized
    with pytest.raises(ValueError, match="absolute aspect ratio must be smaller than 200"):
        smart_resize(28, 28 * MAX_ASPECT_RATIO + 1)


def test_a_video_of_frames_thinner_than_the_processor_takes_is_named_at_load(tmp_path):
    import imageio

    imageio.mimwrite(str(tmp_path / "thin.mp4"), [np.full((2, 512, 3), 90, dtype=np.uint8)] * 2, fps=4,
                     macro_block_size=1)  # fmt: skip
    (tmp_path / "d.jsonl").write_text(jsonl({"question": "q", "answer": "1", "video": "thin.mp4"}))
    raises(load_jsonl, tmp_path / "d.jsonl", r"d.jsonl line 1: video '.*thin.mp4' is 512x2 pixels a frame, an aspect "
           r"ratio of 256:1, more than 200:1")  # fmt: skip


# ------------------------------------------------------------------------------------------- fingerprints


def fingerprint(path) -> str:
    """The fingerprint a checkpoint keeps of the train examples of the data file ``path``."""
    examples = QAExamples(VLMReasoningDataOptions(path=str(path), heldout_fraction=0.5))
    return QAPrompts(examples, 0, examples.train_example).fingerprint()


def test_an_image_replaced_by_one_of_the_same_size_changes_the_fingerprint_and_a_copy_does_not(tmp_path):
    # the fingerprint kept an image's name and size: its mirror image (same size) resumed as the same data
    data = tmp_path / "set"
    (data / "imgs").mkdir(parents=True)
    for i in range(4):
        noise_png(data / "imgs" / f"s{i}.png", seed=i)
    rows = [{**QUESTION, "question": f"q{i}", "image": f"imgs/s{i}.png"} for i in range(4)]
    (data / "d.jsonl").write_text(jsonl(*rows))
    before = fingerprint(data / "d.jsonl")
    copy = tmp_path / "elsewhere" / "set"
    shutil.copytree(data, copy, copy_function=shutil.copy)  # another folder, new modification times
    assert fingerprint(copy / "d.jsonl") == before
    for i in range(4):  # each image mirrored: other pixels, the same file size
        image = data / "imgs" / f"s{i}.png"
        size = image.stat().st_size
        ImageOps.mirror(Image.open(image)).save(image)
        assert image.stat().st_size == size
    assert fingerprint(data / "d.jsonl") != before
    shutil.rmtree(data / "imgs")
    shutil.copytree(copy / "imgs", data / "imgs")
    assert fingerprint(data / "d.jsonl") == before  # restored


def test_a_video_is_fingerprinted_by_its_size_and_the_hash_of_its_ends(tmp_path):
    write_mp4(tmp_path / "c.mp4", frames=4, size=32)
    same = shutil.copy(tmp_path / "c.mp4", tmp_path / "other.mp4")
    (tmp_path / "b").mkdir()
    moved = shutil.copy(tmp_path / "c.mp4", tmp_path / "b" / "c.mp4")
    assert content_identity(moved, video=True) == content_identity(tmp_path / "c.mp4", video=True)
    assert content_identity(same, video=True).split(" ")[1:] == content_identity(moved, video=True).split(" ")[1:]
    raw = bytearray((tmp_path / "c.mp4").read_bytes())
    raw[-1] ^= 0xFF  # the same size, one byte of its last 64 KiB changed
    (tmp_path / "b" / "c.mp4").write_bytes(bytes(raw))
    assert content_identity(moved, video=True) != content_identity(tmp_path / "c.mp4", video=True)
    big = tmp_path / "big.bin"  # past twice 64 KiB: only the ends are read
    big.write_bytes(bytes(200_000))
    ends = content_identity(big, video=True)
    big.write_bytes(bytes(100_000) + b"x" + bytes(99_999))
    assert content_identity(big, video=True) == ends  # documented: the middle is not read
    big.write_bytes(bytes(199_999) + b"x")
    assert content_identity(big, video=True) != ends
    assert content_identity(tmp_path / "gone.mp4", video=True) == "gone.mp4 missing"


# --------------------------------------------------------------------------------------- parquet, arrow, csv


@needs_datasets
def test_a_parquet_or_arrow_file_is_refused_with_the_hf_spec_that_reads_it(tmp_path):
    # the refusal said hf:NAME_OR_PATH, and hf:/path/x.parquet then failed: "Couldn't find any data file"
    import datasets

    noise_png(tmp_path / "a.png")
    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "image": datasets.Image()})  # fmt: skip
    rows = {"question": ["q0", "q1", "q2"], "answer": ["1", "2", "3"],
            "image": [Image.new("RGB", (8, 6)), str(tmp_path / "a.png"), None]}  # fmt: skip
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.to_parquet(str(tmp_path / "x.parquet"))
    message = raises(load_jsonl, tmp_path / "x.parquet", r"is a .parquet file, which a VLM recipe does not read")
    spec = message.split("data.options.path=")[-1].split(" ")[0]
    assert spec == f"hf:{tmp_path / 'x.parquet'}"
    ex = load_jsonl(spec)
    assert [p["question"] for p, _ in ex] == ["q0", "q1", "q2"]
    assert isinstance(ex[0][1]["images"][0], StoredImage) and ex[0][1]["images"][0].size == (8, 6)
    assert ex[2][1]["images"] == []
    assert len(load_jsonl(f"{spec}:train[:2]")) == 2
    datasets.Dataset.from_dict({"question": ["q"], "answer": ["1"], "image": ["a.png"]}).to_parquet(
        str(tmp_path / "paths.parquet")
    )  # a path in a file's row is relative to the file's folder, as a JSONL file's are
    assert load_jsonl(f"hf:{tmp_path / 'paths.parquet'}")[0][1]["images"] == [str(tmp_path / "a.png")]
    raises(load_jsonl, f"{spec}:test", r"one file is one split, named train")
    ds.save_to_disk(str(tmp_path / "saved"))
    shard = next((tmp_path / "saved").glob("*.arrow"))
    message = raises(load_jsonl, shard, r"is a .arrow file")
    assert [p["question"] for p, _ in load_jsonl(message.split("data.options.path=")[-1].split(" ")[0])] == [
        "q0", "q1", "q2"]  # fmt: skip
    (tmp_path / "x.csv").write_text("question,answer\nq,1\n")
    raises(load_jsonl, f"hf:{tmp_path / 'x.csv'}", r"is a file, and hf: reads a dataset folder, a hub name or one "
           r"\.parquet or \.arrow file")  # fmt: skip


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_the_conversion_a_csv_or_tsv_refusal_gives_works(tmp_path, suffix, sep):
    noise_png(tmp_path / "a.png")
    (tmp_path / f"x{suffix}").write_text(f"question{sep}answer{sep}image\nWhat colour?{sep}red{sep}a.png\n")
    message = raises(load_jsonl, tmp_path / f"x{suffix}", rf"is a \{suffix} file")
    command = message.split(" with: ")[-1]
    assert command.startswith("python -c ")
    args = shlex.split(command.split(" > ")[0])
    out = tmp_path / command.split(" > ")[-1]
    out.write_text(subprocess.run([sys.executable, *args[1:]], cwd=tmp_path, capture_output=True, text=True,
                                  check=True).stdout)  # fmt: skip
    ex = load_jsonl(out)
    assert ex[0][0]["question"] == "What colour?" and ex[0][1]["answer"] == "red"
    assert ex[0][1]["images"] == [str(tmp_path / "a.png")]
    assert json.loads(out.read_text().splitlines()[0])["image"] == "a.png"
