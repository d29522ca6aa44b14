"""The video families' refusals of what they cannot run, over tiny real checkpoints: sizes beyond the checkpoint's
rotary embedding or any sane bound, frame rates no player plays, another family's folder, and the warning for a
first frame that is stretched or enlarged to the video's size."""

import pytest

from mmgrpo.core.errors import UserError
from mmgrpo.policies.loading import GeneratorPolicyOptions
from mmgrpo.policies.models.hunyuan_video import HunyuanVideoAdapter
from mmgrpo.testing.checks import record_weight_loads
from mmgrpo.testing.tiny_hunyuan_video import TINY_SIZE, save_tiny_hunyuan_video
from mmgrpo.testing.tiny_wan import save_tiny_wan, tiny_wan_adapter

SD3_FOLDER = "assets/shapes_t2i"  # the shipped StableDiffusion3Pipeline (its model_index.json is all that is read)


@pytest.fixture(scope="module")
def wan_ckpt(tmp_path_factory):
    return save_tiny_wan(tmp_path_factory.mktemp("wan") / "t2v")


@pytest.fixture(scope="module")
def hunyuan_ckpt(tmp_path_factory):
    return save_tiny_hunyuan_video(tmp_path_factory.mktemp("hunyuan") / "ckpt")


def refused_before_the_weights(monkeypatch, load, match):
    """``load()`` raises a UserError matching ``match`` before any weights load; the message."""
    loads = record_weight_loads(monkeypatch)
    with pytest.raises(UserError, match=match) as e:
        load()
    assert loads == []
    return str(e.value)


# --------------------------------------------------------------------------- frame rate
def test_frame_rates_no_player_plays_are_refused_when_the_config_loads(hunyuan_ckpt, monkeypatch):
    """fps=1e9 was written at 1,001,000 fps (over libx264's level limit), fps=0.001 made 5 frames last 5000 s."""
    for fps in (1e9, 0.001, 0.5, 241):
        with pytest.raises(UserError, match=rf"policy.options.fps={fps}: frames per second must be from 1 to 240"):
            GeneratorPolicyOptions(family="wan", fps=fps)
        with pytest.raises(UserError, match=rf"Wan fps={fps}: .* must be from 1 to 240 frames per second"):
            tiny_wan_adapter(fps=fps)
    refused_before_the_weights(
        monkeypatch, lambda: HunyuanVideoAdapter.from_pretrained(hunyuan_ckpt, **TINY_SIZE, fps=1e300),
        r"HunyuanVideo fps=1e\+300: .* must be from 1 to 240",
    )  # fmt: skip
    assert GeneratorPolicyOptions(family="wan", fps=240).fps == 240 and tiny_wan_adapter(fps=1).fps == 1.0
    assert GeneratorPolicyOptions(family="wan", fps=0).fps == 0  # the model's own rate
