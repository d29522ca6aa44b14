"""Hostile data files, fed to the real loaders as a user would (tests/data/test_bad_files.py has the undecodable ones,
tests/data/test_hostile_vlm.py the VLM datasets' fields).

Each case either loads as meant (a BOM, CRLF line ends, a .json list, a save_to_disk folder) or ends in one UserError
that names the file and the line (and the field) and says the fix, at load: never a traceback, a silently dropped or
changed value (a repeated JSON key, NaN, a misnamed column, a ragged CSV row), or an error that waits for training."""

import importlib.util
import json
import os
import struct
import time
import zlib

import pytest

from mmgrpo.core.errors import UserError
from mmgrpo.data.prompts import read_prompts
from mmgrpo.data.records import json_list_rows
from mmgrpo.pipelines.image_to_video import read_pairs
from mmgrpo.testing.data_files import jsonl, raises

# ------------------------------------------------------------------------------------------------ every format


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"prompt": "a", "prompt": "b"}', r"line 2: the key 'prompt' appears twice in one object"),
        ('{"prompt": "a", "weight": NaN}', r"line 2: NaN is not a JSON number"),
        ('{"prompt": "a", "weight": -Infinity}', r"line 2: -Infinity is not a JSON number"),
        ('{"prompt": "a", "weight": 1e999}', r"line 2: the number '1e999' is not finite"),
        ('{"prompt": "a"} {"prompt": "b"}', r"line 2 holds more than one JSON value"),
        # past 4300 digits int() raised a bare ValueError; 400 digits loaded, then float() raised OverflowError at a
        # box; 100k nested '[' raised RecursionError: tracebacks naming no file
        pytest.param(
            f'{{"seed": {"9" * 5000}}}',
            r"line 2: the integer 9+\.\.\. \(5000 digits\) is too large for a float",
            id="5000-digit-integer",
        ),
        pytest.param(
            f'{{"seed": 1{"0" * 400}}}',
            r"line 2: the integer 10+\.\.\. \(401 digits\) is too large for a float",
            id="10**400",
        ),
        pytest.param(
            f'{{"x": {"[" * 100_000 + "]" * 100_000}}}',
            r"line 2: the JSON nests lists or objects too deeply",
            id="100k-nested-lists",
        ),
    ],
)
def test_json_that_python_would_read_loosely_is_refused_with_its_line(tmp_path, text, match):
    path = tmp_path / "p.jsonl"
    path.write_text(jsonl({"prompt": "ok"}, text))
    raises(read_prompts, str(path), match, "train", 0)


def test_an_integer_that_fits_a_float_loads_as_an_integer(tmp_path):
    (tmp_path / "p.jsonl").write_text(jsonl({"prompt": "a", "seed": 10**308, "n": -(2**63)}))
    assert read_prompts(str(tmp_path / "p.jsonl"), "train", 0)[0].meta == {"seed": 10**308, "n": -(2**63)}


def test_a_long_json_list_is_read_in_linear_time(tmp_path):
    # each item's line was counted from the start of the text: 40k items took 39 s (quadratic), now ~0.1 s
    items = [{"prompt": f"a photo of object number {i} " + "x" * 60} for i in range(40_000)]
    text = json.dumps(items, indent=2)  # each item 3 lines, the first on line 2 (LLaVA's layout)
    start = time.perf_counter()
    rows = json_list_rows(text, "f.json")
    assert time.perf_counter() - start < 3.0
    assert [w for w, _ in rows[:2]] == ["f.json line 2", "f.json line 5"] and rows[-1][0] == "f.json line 119999"


def test_a_torn_last_line_says_that_the_file_looks_cut_off(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(jsonl({"prompt": "a"}) + '{"prompt": "a red')
    msg = raises(read_prompts, str(path), r"p.jsonl' line 2 is not valid JSON", "train", 0)
    assert "looks cut off" in msg
    path.write_text(jsonl({"prompt": "a"}) + '{"prompt": \n' + jsonl({"prompt": "b"}))  # mid-file: not 'cut off'
    assert "cut off" not in raises(read_prompts, str(path), r"line 2 is not valid JSON", "train", 0)


def test_bom_crlf_and_a_line_separator_inside_a_string_load_as_written(folder):
    rows = [{"prompt": "a red\u2028circle"}, {"prompt": "a cat"}]  # U+2028: legal inside a JSON string, one line
    (folder / "p.jsonl").write_bytes(
        b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode() + b"\r\n"
    )
    assert read_prompts(str(folder / "p.jsonl"), "train", 0) == ["a red\u2028circle", "a cat"]
    (folder / "p.txt").write_bytes(b"\xef\xbb\xbfa red circle\r\n# a comment\r\na blue square\r\n")
    with pytest.warns(UserWarning, match="1 line"):
        assert read_prompts(str(folder / "p.txt"), "train", 0) == ["a red circle", "a blue square"]
    (folder / "p.csv").write_bytes(b"\xef\xbb\xbfprompt,colour\r\na red circle,red\r\n")
    assert read_prompts(str(folder / "p.csv"), "train", 0)[0].meta == {"colour": "red"}


def test_nul_bytes_and_utf16_are_named_not_read_as_text(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"a red circle\nbad\x00line\n")
    raises(read_prompts, str(tmp_path / "p.txt"), r"p.txt' holds a NUL byte on line 2", "train", 0)
    (tmp_path / "p.txt").write_bytes("a red circle\n".encode("utf-16"))
    raises(read_prompts, str(tmp_path / "p.txt"), r"not UTF-8 text.*starts as UTF-16.*iconv -f utf-16", "train", 0)


@pytest.mark.parametrize(
    "text, match",
    [
        ("prompt,prompt\na,b\n", r"line 1: the header names the column\(s\) \['prompt'\] twice"),
        ("prompt,colour\na,red,extra\n", r"line 2 has 3 field\(s\) but the header"),
        ("prompt,colour\na\n", r"line 2 has 1 field\(s\) but the header"),
        ('prompt\n"a red circle\n', r"line 2 is not valid CSV"),
    ],
)
def test_csv_rows_that_do_not_match_the_header_are_refused(tmp_path, text, match):
    (tmp_path / "p.csv").write_text(text)
    raises(read_prompts, str(tmp_path / "p.csv"), match, "train", 0)


def test_json_files_hold_one_list_and_errors_name_the_items_line(folder):
    (folder / "p.json").write_text(json.dumps([{"prompt": "a"}, {"prompt": "b", "n": 2}], indent=2))
    got = read_prompts(str(folder / "p.json"), "train", 0)
    assert got == ["a", "b"] and got[1].meta == {"n": 2}
    (folder / "p.json").write_text(json.dumps([{"prompt": "a"}, {"prompt": ""}], indent=2))
    raises(read_prompts, str(folder / "p.json"), r"p.json' line 5: 'prompt' must be a non-empty string", "train", 0)
    (folder / "p.json").write_text(json.dumps({"data": [{"prompt": "a"}]}))
    raises(read_prompts, str(folder / "p.json"), r"holds a JSON dict with the keys \['data'\], not a list", "train", 0)
    (folder / "p.json").write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}])[:-1])
    raises(read_prompts, str(folder / "p.json"), r"ends before its list is closed", "train", 0)
    (folder / "p.json").write_text('[{"prompt": "a"} {"prompt": "b"}]')
    raises(read_prompts, str(folder / "p.json"), r"a ',' or '\]' expected", "train", 0)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets is not installed")
def test_a_dataset_saved_with_save_to_disk_is_read(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": ["a red circle", "a blue square"], "colour": ["red", "blue"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    got = read_prompts(f"hf:{tmp_path / 'saved'}", "train", 0)
    assert got == ["a red circle", "a blue square"] and got[1].meta == {"colour": "blue"}
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dict"))
    assert read_prompts(f"hf:{tmp_path / 'dict'}:test", "train", 0) == ["a red circle", "a blue square"]
    raises(read_prompts, f"hf:{tmp_path / 'dict'}", r"has no split 'train' \(splits: \['test'\]\)", "train", 0)
    raises(read_prompts, f"hf:{tmp_path / 'saved'}::text", r"has no column 'text'", "train", 0)
    raises(read_prompts, str(tmp_path / "saved"), r"save_to_disk\); write hf:", "train", 0)
    (tmp_path / "saved" / "state.json").write_text("{}")  # a damaged folder
    raises(read_prompts, f"hf:{tmp_path / 'saved'}", r"load_from_disk.*failed", "train", 0)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets is not installed")
def test_a_split_of_a_saved_dataset_is_never_all_its_rows_and_a_sliced_split_is_read(tmp_path):
    # hf:DIR:test on a Dataset.save_to_disk folder (no splits) read every row: evaluation on the training prompts;
    # and train[:2] was cut at its ':' ('train[' and a column '2]')
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    ds = datasets.Dataset.from_dict({"prompt": ["t1", "t2", "t3"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert read_prompts(f"hf:{tmp_path / 'saved'}", "train", 0) == ["t1", "t2", "t3"]
    for split in ("test", "train"):
        match = rf"saved:{split}': the folder holds one Dataset \(Dataset.save_to_disk\), which has no splits, so the "
        msg = raises(
            read_prompts, f"hf:{tmp_path / 'saved'}:{split}", rf"{match}split '{split}' cannot be chosen", "train", 0
        )
        assert f"drop ':{split}'" in msg and "save a DatasetDict" in msg
    assert read_prompts(f"hf:{tmp_path / 'dict'}:train[:2]", "train", 0) == ["t1", "t2"]
    assert read_prompts(f"hf:{tmp_path / 'dict'}:train[-1:]+test:prompt", "train", 0) == ["t3", "t1"]
    raises(read_prompts, f"hf:{tmp_path / 'dict'}:train[:x]", r"has no split 'train\[:x\]'", "train", 0)
    (tmp_path / "pq").mkdir()  # what load_dataset reads: the slice is passed on whole
    pq.write_table(pa.table({"prompt": ["a", "b", "c"]}), tmp_path / "pq" / "train.parquet")
    assert read_prompts(f"hf:{tmp_path / 'pq'}:train[1:]", "train", 0) == ["b", "c"]


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets is not installed")
def test_a_datasets_nan_or_infinity_is_refused_as_a_json_files_is(tmp_path):
    # a JSON file's NaN was refused while a dataset's float column passed NaN into the prompt's meta, to a reward
    import datasets

    def saved(name, **columns):
        datasets.Dataset.from_dict({"prompt": ["a red circle", "a blue square"], **columns}).save_to_disk(
            str(tmp_path / name)
        )
        return f"hf:{tmp_path / name}"

    spec = saved("nan", weight=[1.0, float("nan")])
    msg = raises(read_prompts, spec, r"hf:.*nan row 1: column 'weight' holds nan, which is not a finite", "train", 0)
    assert "write a finite number, or None for a missing value" in msg
    spec = saved("inf", scores=[[0.5, 1.0], [0.5, float("-inf")]])  # a list column: the item is named
    raises(read_prompts, spec, r"row 1: column 'scores' holds -inf at \[1\]", "train", 0)
    spec = saved("struct", box=[{"x": 1.0, "y": float("inf")}, {"x": 2.0, "y": 0.0}])
    raises(read_prompts, spec, r"row 0: column 'box' holds inf at \['y'\]", "train", 0)
    got = read_prompts(saved("ok", weight=[1.0, None], n=[1, 2]), "train", 0)  # None: a missing value, as JSON null
    assert got[1].meta == {"weight": None, "n": 2}
    import pyarrow as pa  # a dependency of datasets
    import pyarrow.parquet as pq

    (tmp_path / "pq").mkdir()  # read by datasets.load_dataset (not save_to_disk): pandas writes a missing value NaN
    pq.write_table(pa.table({"prompt": ["a", "b"], "weight": [1.5, float("nan")]}), tmp_path / "pq" / "train.parquet")
    raises(read_prompts, f"hf:{tmp_path / 'pq'}", r"pq row 1: column 'weight' holds nan", "train", 0)


def test_a_symlink_loop_and_a_decompression_bomb_are_named(folder):
    os.symlink("loop2.png", folder / "loop1.png")
    os.symlink("loop1.png", folder / "loop2.png")
    (folder / "p.jsonl").write_text(jsonl({"prompt": "a cat", "image": "loop1.png"}))
    raises(
        read_pairs, str(folder / "p.jsonl"), r"line 1: image '.*loop1.png' is a symbolic link that leads to no file"
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    for side, match in [(10000, r"is 10000x10000 pixels, more than the \d+"), (20000, r"is too large to decode")]:
        header = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))  # 100 bytes declaring 300 MB+
        (folder / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 99))
                                          + chunk(b"IEND", b""))  # fmt: skip
        (folder / "p.jsonl").write_text(jsonl({"prompt": "a cat", "image": "bomb.png"}))
        assert "downscale it" in raises(read_pairs, str(folder / "p.jsonl"), rf"line 1: image '.*bomb.png' {match}")


# ---------------------------------------------------------------------------------------------- image to video


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("p.jsonl", "[1, 2]\n", r"p.jsonl' line 1: each row is an object \{prompt, image \| video\}"),
        ("p.jsonl", '{"prompt": "a", "image": 5}\n', r"line 1: 'image' must be one path \(a string\), got 5"),
        ("p.jsonl", '{"prompt": "a", "image": ["a.png"]}\n', r"line 1: 'image' must be one path"),
        ("p.jsonl", '{"prompt": 5, "image": "a.png"}\n', r"line 1: 'prompt' must be text, got 5"),
        ("p.jsonl", '{"caption": "a", "image": "a.png"}\n', r"line 1: the row has no 'prompt' .*default_prompt"),
        ("p.csv", "caption,image\na,a.png\n", r"p.csv' line 2: the row has no 'prompt'"),
        ("p.jsonl", '{"prompt": "a", "image": "."}\n', r"line 1: image '.*' is a folder"),
        ("p.jsonl", '{"prompt": "a", "image": "a.png"}\n{"prompt', r"line 2 is not valid JSON .*cut off"),
        ("p.txt", "a\n", r"must end in .jsonl, .json or .csv"),
    ],
)
def test_bad_image_to_video_pairs_name_the_line_and_the_field(folder, name, text, match):
    (folder / name).write_text(text)
    raises(read_pairs, str(folder / name), match)


def test_image_to_video_pairs_from_json_bom_csv_and_an_explicit_empty_prompt(folder):
    (folder / "p.json").write_text(json.dumps([{"prompt": "a cat", "image": "a.png"}]))
    assert read_pairs(str(folder / "p.json")) == ["a cat"]
    (folder / "p.csv").write_bytes(b"\xef\xbb\xbfprompt,image\r\na cat,a.png\r\n,a.png\r\n")
    assert read_pairs(str(folder / "p.csv")) == ["a cat", ""]  # an empty cell: an empty prompt on purpose
    assert read_pairs(str(folder / "p.csv"), "a dog") == ["a cat", "a dog"]
    (folder / "clips").mkdir()
    (folder / "clips" / "c.mp4").write_bytes(b"")
    raises(read_pairs, str(folder / "clips"), r"data folder .*default_prompt, which is empty")


def test_a_prompt_file_of_only_comments_says_so(tmp_path):
    (tmp_path / "p.txt").write_text("# a red circle\n\n# a blue square\n")
    raises(read_prompts, str(tmp_path / "p.txt"), r"all 2 non-empty line\(s\) start with '#'", "train", 0)


def test_a_json_list_of_strings_is_a_list_of_prompts(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(["a red circle", "a blue square"]))
    assert read_prompts(str(tmp_path / "p.json"), "train", 0) == ["a red circle", "a blue square"]
    (tmp_path / "p.json").write_text(json.dumps(["a red circle", 3]))
    raises(read_prompts, str(tmp_path / "p.json"), r"p.json' line 1: each row needs a 'prompt' field", "train", 0)


def test_an_image_given_as_video_or_a_video_as_image_is_named(folder):
    (folder / "p.jsonl").write_text(jsonl({"prompt": "a cat", "image": "clip.mp4"}))
    raises(read_pairs, str(folder / "p.jsonl"), r"line 1: 'image' names 'clip.mp4', which is named like a video file; "
           "give it as 'video'")  # fmt: skip
    (folder / "p.jsonl").write_text(jsonl({"prompt": "a cat", "video": "a.png"}))
    raises(read_pairs, str(folder / "p.jsonl"), r"named like an image file; give it as 'image'")


def test_fewer_prompts_than_a_step_asks_for_is_said_once(tmp_path):
    from mmgrpo.train.components import build_components
    from mmgrpo.train.config import load_config

    base = {"pipeline": "bandit", "data": {"options": {"num_prompts": 2, "num_arms": 3}},
            "rewards": [{"name": "bandit_arm_value"}], "trainer": {"prompts_per_step": 4}}  # fmt: skip
    with pytest.warns(
        UserWarning, match=r"holds 2 prompt\(s\), fewer than trainer.prompts_per_step=4: every step"
    ) as w:
        comp = build_components(load_config(None, base=base))
    said = [x for x in w if "fewer than trainer.prompts_per_step" in str(x.message)]
    assert len(said) == 1  # once, when the run is built, not at every step
    assert comp.policy is not None  # a warning, not a refusal: the run still builds


@pytest.mark.parametrize(
    "data, match",
    [
        (zlib.compress(b"x"), None),  # zlib is not gzip: left to the UTF-8 check
        (b"\x1f\x8b\x08\x00" + b"\x00" * 16, r"is a gzip-compressed file, not text; decompress it first"),
        (b"PAR1" + b"\x00" * 16, r"is a Parquet file, not text; write it as JSONL \(pandas.read_parquet"),
        (b"PK\x03\x04" + b"\x00" * 16, r"is a zip archive, not text; unpack it"),
    ],
)
def test_a_compressed_or_columnar_file_is_named_for_what_it_is(tmp_path, data, match):
    (tmp_path / "p.jsonl").write_bytes(data)
    raises(read_prompts, str(tmp_path / "p.jsonl"), match or r"is not UTF-8 text|NUL byte|not valid JSON", "train", 0)


@pytest.mark.parametrize(
    "text, match",
    [
        (json.dumps([{"prompt": "a"}], indent=2), r"line 1 is not valid JSON .*looks like pretty-printed JSON"),
        ('{\n  "prompt": "a"\n}\n', r"line 1 is not valid JSON .*looks like pretty-printed JSON"),
        (json.dumps([{"prompt": "a"}, {"prompt": "b"}]), r"line 1 holds a JSON list of 2 object\(s\).*rename it to"),
        ('{"prompt": "a"},\n{"prompt": "b"}\n', r"line 1 ends with ',' after its object"),
    ],
)
def test_json_written_where_jsonl_is_expected_says_how_to_fix_it(tmp_path, text, match):
    (tmp_path / "p.jsonl").write_text(text)
    raises(read_prompts, str(tmp_path / "p.jsonl"), match, "train", 0)


def test_a_windows_path_or_a_wrong_case_file_name_says_so(folder):
    (folder / "p.jsonl").write_text(jsonl({"prompt": "a cat", "image": "frames\\a.png"}))
    raises(read_pairs, str(folder / "p.jsonl"), r"not found \(the path holds '\\', a Windows separator: write '/'")
    (folder / "p.jsonl").write_text(jsonl({"prompt": "a cat", "image": "A.PNG"}))
    raises(
        read_pairs, str(folder / "p.jsonl"), r"image '.*A.PNG' not found, but 'a.png' is there: file names are case"
    )


@pytest.mark.parametrize(
    "pipeline, data",
    [
        ("text_to_image", {"prompts": "{f}", "heldout_prompts": ""}),
        ("text_to_video", {"prompts": "{f}", "heldout_prompts": ""}),
        ("image_to_video", {"pairs": "{f}", "default_prompt": "a cat"}),
    ],
)
def test_a_bad_data_file_is_named_before_the_weights_load(tmp_path, pipeline, data):
    # the model path does not exist: the data error coming first shows the data is read before minutes of loading
    from mmgrpo.train.components import build_components
    from mmgrpo.train.config import load_config

    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "prompt": "b"}\n')
    options = {k: v.replace("{f}", str(tmp_path / "bad.jsonl")) for k, v in data.items()}
    family = {"text_to_image": "sd3"}.get(pipeline, "wan")
    base = {"pipeline": pipeline, "policy": {"options": {"family": family, "path": str(tmp_path / "no_model")}},
            "data": {"options": options}, "rewards": [{"name": "jpeg_incompressibility"}]}  # fmt: skip
    with pytest.raises(UserError, match=r"bad.jsonl' line 1: (the key 'prompt' appears twice|give exactly one)"):
        build_components(load_config(None, base=base))
