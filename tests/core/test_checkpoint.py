"""Verified checkpoints: damaged files are named, loading falls back to the newest intact one, pruning is safe."""

import json
import shutil

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.train import checkpoint as ckpt


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"step": step, "model": {"w": torch.randn(64, 64, generator=g)}, "optimizer": {"lr": 0.1 * step}}


@pytest.fixture
def two(tmp_path):
    root = tmp_path / "checkpoints"
    first = ckpt.save_checkpoint(root, 1, _state(1), keep=5)
    second = ckpt.save_checkpoint(root, 2, _state(2), keep=5)
    return root, first, second


def test_marker_records_each_file_hash_and_a_clean_checkpoint_verifies(two):
    root, _, second = two
    marker = json.loads((second / "COMPLETE").read_text())
    assert marker["step"] == 2 and set(marker["files"]) == {"tensors.safetensors", "state.json"}
    assert len(marker["files"]["tensors.safetensors"]["sha256"]) == 64
    ckpt.verify_checkpoint(second)
    back = ckpt.load_checkpoint(second)
    assert torch.equal(back["model"]["w"], _state(2)["model"]["w"]) and back["optimizer"]["lr"] == pytest.approx(0.2)
    assert ckpt.latest_valid_checkpoint(root) == (second, [])


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _empty(p):
    p.write_bytes(b"")


def _flip_last_byte(p):  # inside the tensor data, past the safetensors header: only a checksum sees it
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, name, match",
    [
        (_truncate, "tensors.safetensors", "tensors.safetensors has"),
        (_empty, "state.json", "state.json has 0 bytes"),
        (lambda p: p.unlink(), "tensors.safetensors", "tensors.safetensors is missing"),
        (lambda p: p.unlink(), "state.json", "state.json is missing"),
        (_flip_last_byte, "tensors.safetensors", "does not match its SHA-256"),
        (lambda p: p.write_text("{not json"), "COMPLETE", "unreadable completion marker"),
    ],
)
def test_each_kind_of_damage_is_named_and_resume_falls_back_to_the_previous(two, damage, name, match):
    root, first, second = two
    damage(second / name)
    with pytest.raises(ckpt.CorruptCheckpoint, match=match):
        ckpt.load_checkpoint(second)
    path, notes = ckpt.latest_valid_checkpoint(root)
    assert path == first
    assert len(notes) == 1 and str(second) in notes[0]


def test_a_folder_that_is_no_checkpoint_is_named_as_such(tmp_path):
    """A run directory or any other folder given as a checkpoint was "unreadable completion marker COMPLETE"."""
    (tmp_path / "notes.txt").write_text("x")
    for path in (tmp_path, tmp_path / "missing"):
        with pytest.raises(UserError, match=rf"'{path}' is not a checkpoint folder \(it holds none of COMPLETE"):
            ckpt.load_checkpoint(path)


def test_no_valid_checkpoint_gives_none_and_every_note(two):
    root, first, second = two
    _flip_last_byte(first / "tensors.safetensors")
    _empty(second / "state.json")
    path, notes = ckpt.latest_valid_checkpoint(root)
    assert path is None and len(notes) == 2


def test_finding_the_newest_valid_checkpoint_reads_no_tensor_when_the_marker_has_hashes(two, monkeypatch):
    """The hashes prove the files whole: resume does not load the checkpoint just to check it (every rank of a
    sharded run would join every shard into full tensors in host memory); a legacy marker is still parsed."""
    root, _, second = two
    reads = []
    real = ckpt.load_file
    monkeypatch.setattr(ckpt, "load_file", lambda *a, **kw: reads.append(a[0]) or real(*a, **kw))
    assert ckpt.latest_valid_checkpoint(root) == (second, []) and reads == []
    (second / "COMPLETE").write_text("2")
    assert ckpt.latest_valid_checkpoint(root) == (second, []) and reads == [str(second / "tensors.safetensors")]


def test_a_legacy_marker_without_hashes_still_loads(two):
    root, _, second = two
    (second / "COMPLETE").write_text("2")  # the marker format before hashes
    assert ckpt.latest_valid_checkpoint(root) == (second, [])
    assert ckpt.load_checkpoint(second)["step"] == 2
    _empty(second / "tensors.safetensors")  # without hashes a damaged file is still caught when it cannot be read
    path, notes = ckpt.latest_valid_checkpoint(root)
    assert path != second and "cannot be read" in notes[0]


def test_a_kill_while_pruning_never_leaves_a_complete_looking_shell(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    old = ckpt.save_checkpoint(root, 1, _state(1), keep=1)

    def killed(path, ignore_errors=False):  # the process dies right after the marker went, before any file
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 2, _state(2), keep=1)
    monkeypatch.undo()
    assert (old / "tensors.safetensors").exists() and not (old / "COMPLETE").exists()
    assert ckpt.list_checkpoints(root) == [root / "step_000002"]
    assert ckpt.latest_valid_checkpoint(root)[0] == root / "step_000002"
