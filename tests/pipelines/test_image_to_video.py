"""The image_to_video recipe's training conditions: what a checkpoint's fingerprint of them covers."""

import warnings

import numpy as np
import pytest
from PIL import Image

from mmgrpo.pipelines.image_to_video import FramePromptList, read_pairs
from mmgrpo.testing.vlm_checks import write_mp4


def noise(seed: int, size: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_the_conditions_fingerprint_covers_each_first_frame_not_only_the_prompts(tmp_path):
    """A checkpoint keeps the training conditions' fingerprint so that a resume over other conditions is refused
    (mmgrpo/train/trainer_state.py): a first frame replaced under its name is another condition, named by the
    file's name and the hash of its bytes (the fingerprint covered only the prompt texts, then the file's name and
    size, which missed a replacement of the same size); the same files read again give the same
    fingerprint, and so do the same files moved to another folder with new modification times."""
    noise(1, 40).save(tmp_path / "a.png")
    write_mp4(tmp_path / "b.mp4", frames=4, size=32)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat", "image": "a.png"}\n{"prompt": "a dog", "video": "b.mp4"}\n')

    def fingerprint() -> str:
        return FramePromptList(read_pairs(str(tmp_path / "p.jsonl")), seed=0).fingerprint()

    before = fingerprint()
    assert fingerprint() == before
    moved = tmp_path / "copy"  # the same data in another folder, copied without its times (cp without -p)
    moved.mkdir()
    for name in ("a.png", "b.mp4", "p.jsonl"):
        (moved / name).write_bytes((tmp_path / name).read_bytes())
    assert FramePromptList(read_pairs(str(moved / "p.jsonl")), seed=0).fingerprint() == before
    Image.open(tmp_path / "a.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "a.png")
    mirrored = fingerprint()  # the same size (a PNG of the same pixels mirrored): name and size alone missed it
    assert (tmp_path / "a.png").stat().st_size == (moved / "a.png").stat().st_size and mirrored != before
    noise(2, 32).save(tmp_path / "a.png")  # the same prompts, another first frame
    after = fingerprint()
    assert after not in (before, mirrored)
    write_mp4(tmp_path / "b.mp4", frames=6, size=32)  # another video under the same name
    assert fingerprint() not in (before, after)


def test_a_checkpoint_whose_fingerprint_is_of_the_texts_alone_resumes_with_a_warning(tmp_path):
    """Checkpoints before 2026-12-07 fingerprinted the image-to-video prompts by their texts alone; compared with
    today's fingerprint of texts and frames, every such resume read as edited data and was refused. A fingerprint
    of another scheme is not compared (the count still is); one of the same scheme still refuses edited data."""
    from types import SimpleNamespace

    import pytest

    from mmgrpo.core.errors import UserError
    from mmgrpo.data.prompts import PromptList
    from mmgrpo.train.trainer_state import check_prompt_pool, prompt_pool

    noise(1, 40).save(tmp_path / "a.png")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat", "image": "a.png"}\n')
    source = FramePromptList(read_pairs(str(tmp_path / "p.jsonl")), seed=0)
    tr = SimpleNamespace(cfg=SimpleNamespace(resume_force=False), comp=SimpleNamespace(prompts=source, prompt_count=1))
    old = {"size": 1, "fingerprint": PromptList(list(source.prompts), seed=0).fingerprint()}  # texts alone, no scheme
    with pytest.warns(UserWarning, match="fingerprinted the training prompts in an older way"):
        check_prompt_pool(tr, old, "ckpt")
    saved = prompt_pool(tr)
    assert saved["scheme"] == 3
    check_prompt_pool(tr, saved, "ckpt")  # the same data
    noise(2, 32).save(tmp_path / "a.png")  # another frame under the same name
    edited = FramePromptList(read_pairs(str(tmp_path / "p.jsonl")), seed=0)
    tr.comp.prompts = edited
    with pytest.raises(UserError, match="the same number, edited"):
        check_prompt_pool(tr, saved, "ckpt")


def test_held_out_conditions_that_are_training_conditions_warn(tmp_path):
    """Text-to-image warned of held-out prompts that are training prompts; image-to-video said nothing."""
    from mmgrpo.pipelines.image_to_video import warn_shared_pairs

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / name)
    (tmp_path / "train.jsonl").write_text('{"prompt": "a red circle", "image": "a.png"}\n')
    (tmp_path / "same.jsonl").write_text('{"prompt": "a red circle", "image": "a.png"}\n')
    (tmp_path / "other.jsonl").write_text('{"prompt": "a red circle", "image": "b.png"}\n')
    train = read_pairs(str(tmp_path / "train.jsonl"))
    with pytest.warns(UserWarning, match="1 of the 1 held-out conditions are training conditions too") as seen:
        warn_shared_pairs(train, read_pairs(str(tmp_path / "same.jsonl")))
    assert len(seen) == 1 and str(tmp_path / "a.png") in str(seen[0].message)  # names the shared frame
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        warn_shared_pairs(train, read_pairs(str(tmp_path / "other.jsonl")))  # same text, another first frame
    assert quiet == []
