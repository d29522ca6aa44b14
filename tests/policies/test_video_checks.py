"""The video families' refusals of what they cannot run, over tiny real checkpoints: sizes beyond the checkpoint's
rotary embedding or any sane bound, frame rates no player plays, another family's folder, and the warning for a
first frame that is stretched or enlarged to the video's size."""

import shutil
import warnings

import numpy as np
import pytest
import yaml
from PIL import Image

from mmgrpo.core.errors import UserError
from mmgrpo.policies.loading import GeneratorPolicyOptions, load_adapter
from mmgrpo.policies.models.hunyuan_video import HunyuanVideoAdapter
from mmgrpo.policies.models.wan import WanAdapter, check_size
from mmgrpo.testing.checks import record_weight_loads
from mmgrpo.testing.tiny_hunyuan_video import TINY_SIZE, save_tiny_hunyuan_video, tiny_hunyuan_video_adapter
from mmgrpo.testing.tiny_wan import SIZE, save_tiny_wan, tiny_wan_adapter

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


# --------------------------------------------------------------------------- sizes
def test_a_wan_size_beyond_the_checkpoints_rotary_embedding_is_refused_from_the_config_files(wan_ckpt, monkeypatch):
    """The tiny transformer's rope_max_seq_len=32 holds 32 positions per axis: 32 latent frames (125 frames), 32
    patches of 2 x 8 px (512 px). Beyond it diffusers' forward failed ("shape '[25001, 1, 1, -1]' is invalid");
    now the config files refuse it, naming the option and the largest value, with __init__'s message."""
    for bad, largest in [({"num_frames": 129}, 125), ({"num_frames": 100001}, 125), ({"height": 528}, 512),
                         ({"width": 100000}, 512)]:  # fmt: skip
        ((key, value),) = bad.items()
        match = rf"Wan {key}={value} is more than this checkpoint takes: .*rope_max_seq_len=32.*at most {largest}$"
        msg = refused_before_the_weights(
            monkeypatch, lambda bad=bad: WanAdapter.from_pretrained(wan_ckpt, **{**SIZE, **bad}), match
        )
        assert f"set policy.options.{key} to at most {largest}" in msg
        with pytest.raises(UserError) as from_components:
            tiny_wan_adapter(**bad)
        assert str(from_components.value) == msg
    check_size(512, 512, 125, 8, 4, (1, 2, 2), 32)  # the largest sizes pass
    # the released checkpoints (rope_max_seq_len=1024: 16384 px, 4093 frames) are bounded by mmgrpo's sane limits
    for args, match in [((100000, 832, 81), "height=100000 is more than mmgrpo takes .*at most 4096"),
                        ((480, 832, 100001), "num_frames=100001 is more than mmgrpo .*at most 1025")]:  # fmt: skip
        with pytest.raises(UserError, match=match):
            check_size(*args, 8, 4, (1, 2, 2), 1024)
    check_size(4096, 4096, 1025, 8, 4, (1, 2, 2), 1024)


def test_mmgrpo_train_with_an_oversize_wan_video_is_one_error_and_exit_2(wan_ckpt, tmp_path, monkeypatch, capsys):
    from mmgrpo.train.cli import main

    cfg = {
        "pipeline": "text_to_video",
        "policy": {"options": {"path": wan_ckpt, "num_steps": 2, **SIZE, "num_frames": 100001}},
        "data": {"options": {"prompts": "shapes", "heldout_prompts": ""}},
        "rewards": [{"name": "motion"}],
        "trainer": {"max_steps": 1, "prompts_per_step": 1, "group_size": 2, "progress": False},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    loads = record_weight_loads(monkeypatch)
    capsys.readouterr()
    code = main(["train", str(tmp_path / "c.yaml"), f"run.output_dir={tmp_path / 'runs'}"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "Traceback" not in err and loads == [], err
    assert err.startswith("error: Wan num_frames=100001 is more than this checkpoint takes")
    assert "set policy.options.num_frames to at most 125" in err


def test_a_hunyuan_video_size_beyond_the_sane_bound_is_refused_from_the_config_files(hunyuan_ckpt, monkeypatch):
    """HunyuanVideo's rotary embedding has no limit: height=100000 computed for minutes into an out-of-memory
    error. Now 4096 px and 1025 frames are the most, refused before the weights load."""
    for bad, largest in [({"height": 100000}, 4096), ({"width": 4112}, 4096), ({"num_frames": 1029}, 1025)]:
        ((key, value),) = bad.items()
        match = rf"HunyuanVideo {key}={value} is more than mmgrpo takes .*: set policy.options.{key} to at most "
        msg = refused_before_the_weights(
            monkeypatch, lambda bad=bad: HunyuanVideoAdapter.from_pretrained(hunyuan_ckpt, **{**TINY_SIZE, **bad}),
            match + str(largest),
        )  # fmt: skip
        with pytest.raises(UserError) as from_components:
            tiny_hunyuan_video_adapter(**bad)
        assert str(from_components.value) == msg


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


# --------------------------------------------------------------------------- another family's folder
def test_another_familys_folder_is_named_with_the_family_that_loads_it(wan_ckpt, hunyuan_ckpt, monkeypatch):
    """family: wan on a HunyuanVideo or SD3 folder said "adapter_options {} for family 'wan': 'int' object is not
    iterable" (WanTransformer3DModel reading the other transformer's config)."""
    for path, cls, family in [(hunyuan_ckpt, "HunyuanVideoPipeline", "hunyuan_video"),
                              (SD3_FOLDER, "StableDiffusion3Pipeline", "sd3")]:  # fmt: skip
        msg = refused_before_the_weights(
            monkeypatch, lambda path=path: load_adapter(GeneratorPolicyOptions(family="wan", path=path, **SIZE)),
            rf"model path '{path}' holds a {cls}, not a WanPipeline / WanImageToVideoPipeline",
        )  # fmt: skip
        assert msg.endswith(f"set policy.options.family={family}") and "adapter_options" not in msg
    refused_before_the_weights(
        monkeypatch, lambda: HunyuanVideoAdapter.from_pretrained(wan_ckpt, **TINY_SIZE),
        rf"model path '{wan_ckpt}' holds a WanPipeline, not a HunyuanVideoPipeline .*set policy.options.family=wan$",
    )  # fmt: skip


def test_only_a_bad_keyword_is_reported_as_an_adapter_options_error(wan_ckpt, hunyuan_ckpt, tmp_path):
    from mmgrpo.policies.loading import bad_keyword

    with pytest.raises(UserError, match=r"adapter_options \{'max_sequence_lenght': 16\} for family 'wan': .*"
                       r"unexpected keyword argument 'max_sequence_lenght'"):  # fmt: skip
        opts = GeneratorPolicyOptions(family="wan", path=wan_ckpt, **SIZE, adapter_options={"max_sequence_lenght": 16})
        load_adapter(opts)
    # a TypeError inside the loading (a folder without model_index.json holding HunyuanVideo's transformer config)
    # is no options error: it is not dressed as one
    shutil.copytree(hunyuan_ckpt, tmp_path / "no_index")
    (tmp_path / "no_index" / "model_index.json").unlink()
    with pytest.raises(TypeError, match="not iterable"):
        load_adapter(GeneratorPolicyOptions(family="wan", path=str(tmp_path / "no_index"), **SIZE))

    def call(**kw):
        return kw

    def deeper():
        return call(1)  # the same refusal of a call's arguments, but inside the loading

    class Adapter:
        @classmethod
        def from_pretrained(cls, path, deep=False):
            return deeper() if deep else call(path)

    for deep in (False, True):
        with pytest.raises(TypeError, match="takes 0 positional arguments") as e:
            Adapter.from_pretrained("p", deep=deep)
        assert bad_keyword(e.value, Adapter) is not deep


# --------------------------------------------------------------------------- first frames
def image(width, height, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8))


def test_a_stretched_or_enlarged_first_frame_is_warned_about_once_per_run(tmp_path):
    """The pipeline's preprocessing resizes a first frame to height x width whatever its shape: a 100x48 frame into
    a 32x32 video was stretched, a 1x1 one became a flat colour, with no word. Now the first such frame of a run is
    reported (not refused)."""
    path = tmp_path / "wide.png"
    image(100, 48).save(path)
    adapter = tiny_wan_adapter(image_to_video=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        adapter.encode(["a", "b"], [{"image": image(32, 32)}, {"image": image(33, 32)}])  # square enough: silent
    assert [str(w.message) for w in seen] == []
    with pytest.warns(UserWarning) as seen:
        adapter.encode(["a"], [{"image": str(path)}])
    (msg,) = [" ".join(str(w.message).split()) for w in seen]
    assert msg.startswith(f"Wan image-to-video: the first frame '{path}' of 100x48 pixels (width x height) is "
                          "resized to the video's 32x32 and stretched from its aspect ratio 2.08 to the video's "
                          "1;")  # fmt: skip
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        adapter.encode(["a"], [{"image": image(1, 1)}])  # once per run
    assert seen == []
    with pytest.warns(UserWarning, match=r"first frame \(an in-memory image\) of 1x1 pixels .* and enlarged 32x"):
        tiny_wan_adapter(image_to_video=True).encode(["a"], [{"image": image(1, 1)}])
