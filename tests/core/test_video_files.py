"""Reading videos (mmgrpo.core.files.open_video): real mp4 files written with imageio are read back with PyAV, frame
count, fps and colours as written; decord (where installed) gives bit-identical frames; bad input is a UserError."""

import numpy as np
import pytest

from mmgrpo.core.errors import UserError
from mmgrpo.core.files import open_video, video_backend

imageio = pytest.importorskip("imageio.v2")
pytest.importorskip("av")

COLOURS = [(220, 30, 30), (30, 200, 40), (30, 30, 220), (240, 240, 20), (128, 128, 128), (10, 10, 10)]


def write_flat(path, fps=8):
    """6 flat-colour frames 48 x 64: each decodes back to its colour within codec error."""
    frames = [np.full((48, 64, 3), c, np.uint8) for c in COLOURS]
    imageio.mimwrite(path, frames, fps=fps, macro_block_size=16)
    return path


def write_noise(path, **kw):
    rng = np.random.RandomState(0)
    imageio.mimwrite(path, [rng.randint(0, 256, (48, 64, 3), np.uint8) for _ in range(7)], fps=8, **kw)
    return path


def test_pyav_reads_count_fps_and_colours_as_written(tmp_path):
    video = open_video(write_flat(tmp_path / "flat.mp4", fps=6), "a test")
    assert video_backend() == "av" and video.backend == "av"
    assert len(video) == 6 and video.fps == 6.0
    frames = video.frames()
    assert frames.shape == (6, 48, 64, 3) and frames.dtype == np.uint8
    means = frames.reshape(6, -1, 3).mean(1)  # [6, 3]
    assert np.abs(means - np.array(COLOURS)).max() < 6  # lossy yuv420 coding of flat colours: a few levels off
    # indices in any order, repeated: the same frames as reading them all
    assert np.array_equal(video.frames([4, 0, 4, 5]), frames[[4, 0, 4, 5]])


def test_out_of_range_frames_and_missing_files_are_user_errors(tmp_path):
    video = open_video(write_flat(tmp_path / "flat.mp4"), "a test")
    with pytest.raises(UserError, match=r"frame indices 0\.\.6 outside its 6 frames"):
        video.frames([0, 6])
    with pytest.raises(UserError, match=r"a test: video '.*nope.mp4' does not exist"):
        open_video(tmp_path / "nope.mp4", "a test")
    (tmp_path / "text.mp4").write_text("not a video")
    with pytest.raises(UserError, match=r"a test: video '.*text.mp4' cannot be read \("):
        open_video(tmp_path / "text.mp4", "a test")


@pytest.mark.parametrize("kind", ["flat", "noise", "noise_x264_q10"])
def test_decord_and_pyav_give_identical_frames(tmp_path, kind):
    pytest.importorskip("decord")
    path = tmp_path / f"{kind}.mp4"
    if kind == "flat":
        write_flat(path)
    elif kind == "noise":
        write_noise(path, macro_block_size=1)
    else:
        write_noise(path, codec="libx264", quality=10, macro_block_size=16)
    a, d = open_video(path, "a test", backend="av"), open_video(path, "a test", backend="decord")
    assert (len(a), a.fps) == (len(d), d.fps)
    assert np.array_equal(a.frames(), d.frames())
    assert np.array_equal(a.frames([3, 0, 3]), d.frames([3, 0, 3]))


def test_a_video_with_a_display_rotation_is_read_upright_as_ffmpeg_shows_it(tmp_path):
    """A phone's portrait video: coded landscape (64 x 32) with a 90-degree display rotation. Its frames come back
    turned (32 x 64), equal to what ffmpeg decodes with its autorotation (what players show)."""
    import subprocess

    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    frame = np.zeros((32, 64, 3), np.uint8)
    frame[:, :32], frame[:, 32:] = (220, 30, 30), (30, 30, 220)  # left red, right blue
    imageio.mimwrite(tmp_path / "land.mp4", [frame] * 3, fps=8, macro_block_size=16)
    portrait = tmp_path / "portrait.mp4"
    rotate = [ffmpeg, "-y", "-loglevel", "error", "-display_rotation", "90", "-i", str(tmp_path / "land.mp4"), "-c",
              "copy", str(portrait)]  # fmt: skip
    made = subprocess.run(rotate, capture_output=True, text=True)
    if made.returncode and "Option not found" in made.stderr:  # imageio-ffmpeg's older bundled ffmpeg (4.x)
        pytest.skip("this imageio-ffmpeg's ffmpeg cannot write a display rotation (-display_rotation: ffmpeg >= 6)")
    assert made.returncode == 0, made.stderr
    shown = subprocess.run([ffmpeg, "-loglevel", "error", "-i", str(portrait), "-frames:v", "1", "-f", "rawvideo",
                            "-pix_fmt", "rgb24", "-"], check=True, capture_output=True).stdout  # fmt: skip
    got = open_video(portrait, "a test").frames([0])[0]
    assert got.shape == (64, 32, 3)
    assert np.abs(got.astype(int) - np.frombuffer(shown, np.uint8).reshape(64, 32, 3).astype(int)).max() <= 2
