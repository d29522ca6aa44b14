"""The helpers that write what a person looks at (``write_mp4``, ``image_grid``, ``save_samples``, ``before_after``,
``mmgrpo sample``'s ``save_best``) refuse what they cannot show truthfully, before writing anything: a frame rate
that is not a finite number > 0 (None and 0 were written at ffmpeg's 16 fps), no frames (the path of a file never
written came back), images that are not floats in [0, 1] (uint8 0..255 saved as an all-white grid), not finite,
empty or of the wrong rank; they accept a single image, a NumPy array and str paths. Real files, read back."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mmgrpo.core.errors import UserError
from mmgrpo.core.files import open_video
from mmgrpo.train.media import can_write_mp4, image_grid, save_samples, write_mp4
from mmgrpo.train.report import before_after
from mmgrpo.train.sample import save_best

needs_mp4 = pytest.mark.skipif(not can_write_mp4(), reason="the 'video' extra (imageio, imageio-ffmpeg) is missing")

BAD_FPS = [None, 0, 0.0, -3, math.nan, math.inf, "16", True]


def frames(n=3, size=8):
    return [np.full((size, size, 3), 40 * i, np.uint8) for i in range(n)]


@needs_mp4
@pytest.mark.parametrize("fps", BAD_FPS, ids=repr)
def test_a_frame_rate_that_is_not_a_finite_number_above_zero_is_refused_and_nothing_is_written(tmp_path, fps):
    match = "videos need their frame rate" if fps is None else rf"fps={fps!r} is not a frame rate"
    with pytest.raises(ValueError, match=rf"^write_mp4: {match}"):
        write_mp4(tmp_path / "w.mp4", frames(), fps)
    with pytest.raises(ValueError, match=rf"^save_samples: {match}"):
        save_samples(torch.rand(2, 3, 3, 8, 8), tmp_path / "s.png", fps=fps)
    with pytest.raises(ValueError, match=rf"^save_best: {match}"):
        save_best(torch.rand(3, 3, 8, 8), tmp_path / "b", fps=fps)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@needs_mp4
def test_a_valid_frame_rate_is_written_as_given(tmp_path):
    for fps in (4, 12.5, np.float32(24)):
        path = write_mp4(str(tmp_path / f"w{fps}.mp4"), frames(), fps)
        video = open_video(path, "test")
        assert len(video) == 3 and video.fps == pytest.approx(float(fps))
    path = save_samples(torch.rand(2, 3, 3, 8, 8), str(tmp_path / "s.png"), fps=5)
    assert path.name == "s.mp4" and open_video(path, "test").fps == 5


@needs_mp4
def test_no_frames_or_frames_that_are_not_uint8_are_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(ValueError, match="write_mp4: no frames to write to"):
        write_mp4(tmp_path / "we.mp4", [], 8)
    floats = [f.astype(np.float32) / 255 for f in frames()]
    with pytest.raises(ValueError, match=r"frame 0 is float32 \(8, 8, 3\); frames are HWC uint8"):
        write_mp4(tmp_path / "wf.mp4", floats, 8)
    with pytest.raises(ValueError, match=r"frame 2 is uint8 \(4, 4, 3\).*like frame 0's \(8, 8, 3\)"):
        write_mp4(tmp_path / "ws.mp4", [*frames(2), frames(1, size=4)[0]], 8)
    assert list(tmp_path.iterdir()) == []


def write_grid(images, path):
    return image_grid(images).save(path)


def write_pair(images, path):
    return before_after(images, images, None, path)


def write_best(images, path):
    return save_best(images[0], path)  # one image of the batch: [3, H, W]


IMAGE_WRITERS = {"image_grid": write_grid, "save_samples": save_samples, "before_after": write_pair,
                 "save_best": write_best}  # fmt: skip


def with_inf(images):
    images[0, 0, 0, 0] = math.inf
    return images


BAD_IMAGES = [  # a batch [2, 3, 8, 8] (save_best: its first image) and the error's words
    ((torch.rand(2, 3, 8, 8) * 255).to(torch.uint8), r"dtype torch.uint8 \(shape .*floats in \[0, 1\]: divide uint8"),
    (torch.full((2, 3, 8, 8), math.nan), r"of the \d+ values of the images \(.*8, 8\) are not finite"),
    (with_inf(torch.rand(2, 3, 8, 8)), r"1 of the \d+ values of the images \(.*8, 8\) are not finite"),
    (torch.rand(2, 3, 0, 8), r"images of shape \(.*3, 0, 8\) are empty"),
    (torch.rand(2, 8, 8, 3), r"images of shape \(.*8, 8, 3\) have 8 channels .*channels come before H and W"),
]


@pytest.mark.parametrize("writer", IMAGE_WRITERS)
@pytest.mark.parametrize("images, message", BAD_IMAGES, ids=["uint8", "nan", "inf", "no-pixels", "hwc"])
def test_images_that_are_not_finite_floats_in_0_1_of_one_shape_are_refused_and_nothing_is_written(
    tmp_path, writer, images, message
):
    with pytest.raises(
        UserError if "not finite" in message else ValueError, match=rf"^{writer}(: before)?: .*{message}"
    ):
        IMAGE_WRITERS[writer](images, tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_batch_is_refused(tmp_path):
    empty, out = torch.rand(0, 3, 8, 8), tmp_path / "n.png"
    calls = [
        lambda: image_grid(empty),
        lambda: save_samples(empty, out),
        lambda: save_samples(torch.rand(0, 2, 3, 8, 8), out, fps=8),
        lambda: before_after(empty, empty, None, out),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"images of shape \(0, .*\) are empty; there is nothing to save"):
            call()
    assert list(tmp_path.iterdir()) == []


def test_wrong_ranks_are_refused_naming_the_shape(tmp_path):
    with pytest.raises(ValueError, match=r"image_grid: images of shape \(8, 8\) have 2 dimensions; give \[3, H, W"):
        image_grid(torch.rand(8, 8))
    with pytest.raises(ValueError, match=r"save_samples: images of shape \(1, 2, 2, 3, 8, 8\) have 6 dimensions"):
        save_samples(torch.rand(1, 2, 2, 3, 8, 8), tmp_path / "never.png")
    with pytest.raises(ValueError, match=r"before_after: before: images of shape \(3, 8, 8\) .*as image\[None\]"):
        before_after(torch.rand(3, 8, 8), torch.rand(3, 8, 8), None, tmp_path / "never.png")
    with pytest.raises(ValueError, match=r"save_best: images of shape \(1, 1, 3, 8, 8\) have 5 dimensions; give an"):
        save_best(torch.rand(1, 1, 3, 8, 8), tmp_path / "never")
    with pytest.raises(ValueError, match="image_grid: images are a list, not a tensor"):
        image_grid([[0.5]])


def test_a_single_image_a_numpy_array_and_str_paths_are_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 8)
    batch = np.asarray(image_grid(images))
    assert np.array_equal(np.asarray(image_grid(images.numpy())), batch)  # a NumPy array: the same grid
    assert np.array_equal(np.asarray(image_grid(images[0])), np.asarray(image_grid(images[:1])))  # a batch of one
    one = save_samples(images[0], "one.png")
    assert one.name == "one.png" and Image.open(one).size == image_grid(images[:1], scale=16).size
    best = save_best(images[0], "best")  # a str path (was AttributeError: 'with_suffix')
    assert best == tmp_path.joinpath("best.png").relative_to(tmp_path)
    expected = (images[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(best)), expected)
    grey = save_best(torch.full((1, 4, 4), 0.5), "grey")  # one channel: saved as grey RGB
    assert np.asarray(Image.open(grey).convert("RGB")).tolist() == [[[128] * 3] * 4] * 4
