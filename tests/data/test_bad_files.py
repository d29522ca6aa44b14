"""Hostile data files: text that is not UTF-8 and corrupt images / videos are UserErrors naming the file (and the line
of a dataset), raised when the data loads, never a decoder's traceback in the middle of training."""

import json

import pytest
from PIL import Image

from mmgrpo.core.errors import UserError
from mmgrpo.data.prompts import read_prompts
from mmgrpo.pipelines.image_to_video import read_pairs
from mmgrpo.pipelines.vlm_grounding import load_grounding_jsonl
from mmgrpo.pipelines.vlm_reasoning import load_jsonl
from mmgrpo.rewards import similarity, video
from mmgrpo.testing.vlm_checks import write_mp4

LATIN1 = "un caf\xe9 rouge\n".encode("latin-1")  # byte 0xe9 is not UTF-8


def garbage(path):
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4 if path.suffix == ".png" else b"\x00\x00\x00 ftyp" + b"x" * 500
    )
    return path


def test_a_prompt_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_bytes(b"a red circle\n# comment\n" + LATIN1)
    with pytest.raises(UserError, match=rf"prompt file '{p}' is not UTF-8 text: line 3"):
        read_prompts(str(p), "train", 0)


@pytest.mark.parametrize("loader", [load_jsonl, load_grounding_jsonl])
def test_vlm_jsonl_that_is_not_utf8_names_the_file_and_line(tmp_path, loader):
    p = tmp_path / "d.jsonl"
    p.write_bytes(
        json.dumps({"question": "q", "answer": "a", "image": "x.png", "box": [0, 0, 1, 1]}).encode() + b"\n" + LATIN1
    )
    with pytest.raises(UserError, match=rf"data file '{p}' is not UTF-8 text: line 2"):
        loader(p)


@pytest.mark.parametrize("loader", [load_jsonl, load_grounding_jsonl])
def test_a_corrupt_image_in_a_vlm_dataset_is_named_with_its_line_at_load(tmp_path, loader):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    garbage(tmp_path / "bad.png")
    rows = [{"question": "q", "answer": "a", "image": im, "box": [0, 0, 1, 1]} for im in ("good.png", "bad.png")]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(UserError, match=rf"d.jsonl line 2: image '{tmp_path / 'bad.png'}' cannot be read"):
        loader(tmp_path / "d.jsonl")
    truncated = (tmp_path / "good.png").read_bytes()[:-30]  # a cut-off download
    (tmp_path / "bad.png").write_bytes(truncated)
    with pytest.raises(UserError, match="line 2: image .*bad.png' cannot be read"):
        loader(tmp_path / "d.jsonl")


def test_a_corrupt_video_in_a_vlm_dataset_is_named_at_load(tmp_path):
    garbage(tmp_path / "bad.mp4")
    (tmp_path / "d.jsonl").write_text(json.dumps({"question": "q", "answer": "a", "video": "bad.mp4"}))
    with pytest.raises(UserError, match=rf"d.jsonl line 1: video '{tmp_path / 'bad.mp4'}' cannot be read"):
        load_jsonl(tmp_path / "d.jsonl")


def test_a_video_of_more_pixels_a_frame_than_an_image_may_hold_is_named_at_load(tmp_path, monkeypatch):
    # images over PIL.Image.MAX_IMAGE_PIXELS were refused while a video's frames had no limit: the reader decoded
    # max_frames full-size frames before shrinking them (gigabytes for 8K). The limit is lowered to keep this small.
    from mmgrpo.policies.vlm_inputs import read_video

    write_mp4(tmp_path / "clip.mp4", frames=2, size=64)
    (tmp_path / "d.jsonl").write_text(json.dumps({"question": "q", "answer": "a", "video": "clip.mp4"}))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    assert len(load_jsonl(tmp_path / "d.jsonl")) == 1  # at the limit: read
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    with pytest.raises(UserError, match=r"d.jsonl line 1: video '.*clip.mp4' is 64x64 pixels a frame, more than the "
                                        r"4095 that PIL decodes safely.*downscale it"):  # fmt: skip
        load_jsonl(tmp_path / "d.jsonl")
    with pytest.raises(UserError, match=r"a video prompt: video '.*clip.mp4' is 64x64 pixels a frame"):
        read_video(tmp_path / "clip.mp4")


def test_image_to_video_pairs_not_utf8_or_corrupt_media_are_named(tmp_path):
    (tmp_path / "p.csv").write_bytes(b"prompt,image\n" + LATIN1.strip() + b",a.png\n")
    with pytest.raises(UserError, match=rf"data file '{tmp_path / 'p.csv'}' is not UTF-8 text: line 2"):
        read_pairs(str(tmp_path / "p.csv"))
    garbage(tmp_path / "a.png")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "x", "image": "a.png"}))
    with pytest.raises(UserError, match=r"p.jsonl' line 1: image '.*a.png' cannot be read"):
        read_pairs(str(tmp_path / "p.jsonl"))
    folder = tmp_path / "clips"
    folder.mkdir()
    garbage(folder / "c.mp4")
    with pytest.raises(UserError, match=r"data folder .*: video '.*c.mp4' cannot be read"):
        read_pairs(str(folder), "a circle")


def test_corrupt_media_given_to_the_video_and_similarity_rewards_is_named(tmp_path):
    write_mp4(tmp_path / "ok.mp4")
    assert video.read_video(tmp_path / "ok.mp4").shape[0] == 8
    with pytest.raises(UserError, match=rf"video '{garbage(tmp_path / 'bad.mp4')}' cannot be read"):
        video.read_video(tmp_path / "bad.mp4")
    with pytest.raises(UserError, match=rf"reference image: image '{garbage(tmp_path / 'ref.png')}' cannot be read"):
        similarity.load_reference(tmp_path / "ref.png")


def test_a_prompt_file_that_is_a_directory_names_the_files_in_it(tmp_path):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "b.txt").write_text("a red circle\n")
    (tmp_path / "prompts" / "a.jsonl").write_text('{"prompt": "a red circle"}\n')
    with pytest.raises(
        UserError, match=r"prompt file '.*prompts' is a directory; name one file in it \(a.jsonl, b.txt\)"
    ):
        read_prompts(str(tmp_path / "prompts"), "train", 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"name one file in it \(a .txt / .jsonl / .json / .csv file\)"):
        read_prompts(str(tmp_path / "empty"), "train", 0)
