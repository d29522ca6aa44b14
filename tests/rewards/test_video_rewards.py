"""Video rewards: a real tiny mp4 written with imageio and read back with PyAV; per-frame wrapping of a tiny REAL
open_clip reward; hand-computed motion and temporal consistency."""

import imageio
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import RewardContext
from mmgrpo.rewards import video as vid
from mmgrpo.rewards.registry import REWARDS, register
from mmgrpo.testing.tiny_clip import MEAN, STD, save_tiny_clip


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    d, net = save_tiny_clip(tmp_path_factory.mktemp("clip"))
    return {"pretrained": str(d / "open_clip_model.safetensors"), "model_config": str(d / "tiny.json")}, net


@pytest.fixture(scope="module")
def grey_ramp_mp4(tmp_path_factory):
    """8 frames of 32x32 flat grey, frame f at level round(255 * f / 7), H.264 in an mp4."""
    path = tmp_path_factory.mktemp("video") / "ramp.mp4"
    frames = [np.full((32, 32, 3), round(255 * f / 7), dtype=np.uint8) for f in range(8)]
    imageio.mimwrite(path, frames, fps=8, codec="libx264", quality=10, macro_block_size=16)
    return path


def test_read_video_roundtrip(grey_ramp_mp4):
    v = vid.read_video(grey_ramp_mp4)
    assert v.shape == (8, 3, 32, 32) and v.dtype == torch.float32
    levels = v.mean(dim=(1, 2, 3))
    torch.testing.assert_close(levels, torch.arange(8) / 7, atol=0.03, rtol=0)  # lossy codec: a few levels off
    # num_frames=3 over 8 frames: linspace(0, 7, 3) = [0, 3.5, 7] -> rounds to [0, 4, 7] -> levels 0, 4/7, 1
    v3 = vid.read_video(grey_ramp_mp4, num_frames=3, size=(16, 24))
    assert v3.shape == (3, 3, 16, 24)
    torch.testing.assert_close(v3.mean(dim=(1, 2, 3)), torch.tensor([0, 4 / 7, 1]), atol=0.03, rtol=0)
    with pytest.raises(UserError, match="does not exist"):
        vid.read_video(grey_ramp_mp4.parent / "missing.mp4")


def test_motion_hand_computed_and_from_paths(grey_ramp_mp4):
    f0, f5, f1 = torch.zeros(3, 2, 2), torch.full((3, 2, 2), 0.5), torch.ones(3, 2, 2)
    moving = torch.stack([f0, f5, f5, f1])  # |diffs| 0.5, 0, 0.5 -> energy (0.5 + 0 + 0.5) / 3 = 1/3
    frozen = torch.stack([f5, f5, f5, f5])  # energy 0
    x = torch.stack([moving, frozen])  # [N=2, F=4, 3, 2, 2]
    torch.testing.assert_close(vid.motion()(x, None, None, None), torch.tensor([1 / 3, 0.0]))
    # target 0.2: -|1/3 - 0.2| = -0.1333 ; frozen -|0 - 0.2| = -0.2
    torch.testing.assert_close(vid.motion(target=0.2)(x, None, None, None), torch.tensor([-2 / 15, -0.2]))
    # paths are read back from the mp4: the ramp steps 1/7 per frame -> energy ~ 1/7
    e = vid.motion()([str(grey_ramp_mp4)], None, None, None)
    torch.testing.assert_close(e, torch.tensor([1 / 7]), atol=0.01, rtol=0)


def test_temporal_consistency_pixels_hand_computed():
    # 2x2 frames, pixel_size=2 (no resize), embedding 2x - 1:
    #   white -> +1s, black -> -1s, half (top row white) -> +1,+1,-1,-1 per channel
    #   video a: white, white, black -> cos 1, -1 -> mean 0
    #   video b: white, half, half   -> cos 0,  1 -> mean 0.5
    white, black = torch.ones(3, 2, 2), torch.zeros(3, 2, 2)
    half = torch.zeros(3, 2, 2)
    half[:, 0] = 1.0
    x = torch.stack([torch.stack([white, white, black]), torch.stack([white, half, half])])  # [2, 3, 3, 2, 2]
    fn = vid.temporal_consistency(embedder="pixels", pixel_size=2)
    torch.testing.assert_close(fn(x, None, None, None), torch.tensor([0.0, 0.5]), atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="F >= 2"):
        fn(x[:, :1], None, None, None)
    with pytest.raises(UserError, match="embedder 'dino'"):
        vid.temporal_consistency(embedder="dino")


def test_temporal_consistency_clip_matches_model(clip_files):
    opts, net = clip_files
    torch.manual_seed(4)
    x = torch.rand(2, 3, 3, 32, 32)  # [N=2, F=3, 3, 32, 32]
    fn = vid.temporal_consistency(**opts)
    with torch.no_grad():
        e = F.normalize(net.encode_image((x.flatten(0, 1) - MEAN) / STD), dim=-1).view(2, 3, -1)
    want = ((e[:, 0] * e[:, 1]).sum(-1) + (e[:, 1] * e[:, 2]).sum(-1)) / 2
    torch.testing.assert_close(fn(x, None, None, None), want, atol=1e-5, rtol=0)


def test_video_frames_wraps_clip_score(clip_files):
    opts, net = clip_files
    torch.manual_seed(5)
    x = torch.rand(2, 4, 3, 32, 32)  # [N=2, F=4, 3, 32, 32]
    prompts = ["a red circle", "a blue square"]
    with torch.no_grad():
        img = F.normalize(net.encode_image((x.flatten(0, 1) - MEAN) / STD), dim=-1).view(2, 4, -1)
        txt = F.normalize(net.encode_text(open_clip.tokenize(prompts)), dim=-1)  # [2, 16]
    per_frame = (img * txt[:, None]).sum(-1)  # [N, F]: frame f of video n against prompt n
    ctx = RewardContext(group_size=1, group=torch.arange(2))
    mean_fn = vid.video_frames(reward="clip_score", reward_options=opts)
    torch.testing.assert_close(mean_fn(x, prompts, [{}, {}], ctx), per_frame.mean(1), atol=1e-5, rtol=0)
    min_fn = vid.video_frames(reward="clip_score", reward_options=opts, aggregate="min", frame_stride=2)
    want = per_frame[:, ::2].min(1).values  # frames 0 and 2
    torch.testing.assert_close(min_fn(x, prompts, None, ctx), want, atol=1e-5, rtol=0)


@register("_test_none_on_dark_frames")
def _none_on_dark():
    """Test-only: a frame's mean brightness, None for frames darker than 0.1."""

    def fn(samples, prompts, meta, ctx):
        return [None if float(s.mean()) < 0.1 else float(s.mean()) for s in samples]

    return fn


def test_video_frames_propagates_none_and_refuses_group_aware():
    dark, grey, light = torch.zeros(3, 2, 2), torch.full((3, 2, 2), 0.4), torch.full((3, 2, 2), 0.8)
    x = torch.stack([torch.stack([grey, light]), torch.stack([dark, light])])  # [2, 2, 3, 2, 2]
    out = vid.video_frames(reward="_test_none_on_dark_frames")(x, ["a", "b"], None, None)
    assert out[0] == pytest.approx(0.6) and out[1] is None  # (0.4 + 0.8) / 2 ; a dark frame skips video 1
    with pytest.raises(UserError, match="group-aware"):
        vid.video_frames(reward="diversity", reward_options={"embedder": "pixels"})
    with pytest.raises(UserError, match="aggregate 'max'"):
        vid.video_frames(reward="motion", aggregate="max")
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        vid.motion()(x * 2 - 1, None, None, None)


def test_a_video_reward_given_images_or_one_frame_or_inside_video_frames_says_so():
    """The video walkthrough of 2026-12-07: `motion` on an image recipe said "video rewards expect samples
    Float[N, F, 3, H, W]" after the model had loaded; on one-frame videos it gave 0 on every row (nothing learned,
    nothing said); inside video_frames it got single frames and said the same shape message."""
    images = torch.rand(4, 3, 8, 8)
    with pytest.raises(UserError, match=r"reward 'motion' scores videos Float\[N, F, 3, H, W\], but got images of "
                       r"shape \(4, 3, 8, 8\): use it with a text_to_video / image_to_video recipe"):  # fmt: skip
        vid.motion()(images, None, None, None)
    with pytest.raises(UserError, match="reward 'motion' compares consecutive frames, but the videos have 1 frame"):
        vid.motion()(images[:, None], None, None, None)
    with pytest.raises(UserError, match="video_frames: 'motion' scores whole videos"):
        vid.video_frames(reward="motion")


def test_a_video_reward_on_an_image_recipe_is_refused_when_the_config_loads(tmp_path):
    from mmgrpo.train.config import load_config

    with pytest.raises(UserError, match=r"rewards.0.name in .*: reward 'motion' scores videos, but pipeline "
                       r"'text_to_image' makes no videos"):  # fmt: skip
        load_config("configs/shapes_t2i_grpo.yaml", [f"run.output_dir={tmp_path}", "rewards=[{name: motion}]"])


def test_registered_with_descriptions():
    for name in ("video_frames", "temporal_consistency", "motion"):
        assert name in REWARDS and REWARDS.describe(name)
