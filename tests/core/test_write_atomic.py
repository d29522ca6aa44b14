"""mmgrpo.core.files.write_atomic: a file is written whole or not at all (run directories' config.yaml and
metrics.jsonl, videos a Hugging Face dataset stores); staged_folder: a folder is written whole or not at all, and a
folder that cannot be written is one paragraph naming the option."""

import errno
import os
import signal
import subprocess
import sys

import pytest

from mmgrpo.core import files


def test_a_write_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    files.write_atomic(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        files.write_atomic(path, b"new contents")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


# ---------------------------------------------------------------------------------------------- staged_folder
# The new-user walkthrough of 2026-12-07: `mmgrpo export` / `mmgrpo sample` into a folder that cannot be written
# (/proc, /sys, a read-only or full disk) ended in the traceback of mkdir, copytree or safetensors, rc 1.
@pytest.mark.parametrize("out", ["/proc/x", "/sys/kernel/x", "/proc/new/deeper/x"])
def test_an_unwritable_place_is_one_paragraph_naming_the_option_and_the_fix(out):
    with pytest.raises(files.OutputNotWritten) as info:
        with files.staged_folder(out, "--out"):
            raise AssertionError("the block must not run: its folder could not be made")
    message = str(info.value)
    assert message.startswith(f"--out '{out}' could not be written ([Errno ")
    assert "a folder on a writable disk with free space" in message and "\n" not in message
    assert isinstance(info.value, files.UserError) and info.value.reason.startswith("[Errno ")
    assert not os.path.exists(out)


def test_a_full_disk_while_writing_is_one_paragraph_and_leaves_nothing(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(files.OutputNotWritten, match=r"--out '.*/out' could not be written \(\[Errno 28\] No space"):
        with files.staged_folder(out, "--out") as tmp:
            (tmp / "half.bin").write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []  # the staging folder and the parents made for it are gone


def test_other_errors_in_the_block_are_left_as_they_are(tmp_path):
    # a missing input file or a bug is not the output folder's fault: no advice about free space
    for error in (FileNotFoundError(errno.ENOENT, "No such file or directory", "/base/model.safetensors"),
                  ValueError("a bug"), KeyboardInterrupt()):  # fmt: skip
        with pytest.raises(type(error)):
            with files.staged_folder(tmp_path / "out"):
                raise error
        assert list(tmp_path.iterdir()) == []


FILE_SIZE_LIMIT_SCRIPT = """
import resource, shutil, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from mmgrpo.core.files import OutputNotWritten, staged_folder
root = Path(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))  # python ignores SIGXFSZ
for name, write in [
    ("safetensors", lambda tmp: save_file({"w": torch.zeros(10000)}, str(tmp / "model.safetensors"))),
    ("copytree", lambda tmp: shutil.copytree(root / "base", tmp / "base")),
]:
    try:
        with staged_folder(root / name / "out", "--out") as tmp:
            write(tmp)
    except OutputNotWritten as e:
        print(name, "|", e)
"""


def test_real_write_failures_of_safetensors_and_copytree_are_one_paragraph(tmp_path):
    """The disk's refusals as the libraries raise them (a file-size limit stands in for a full disk: the same
    SafetensorError "... (os error 27)" and shutil.Error of "[Errno 27]" that errno 28 gives)."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "big.bin").write_bytes(bytes(5000))
    proc = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT_SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" | ", 1) for line in proc.stdout.splitlines())
    assert "File too large (os error 27)" in lines["safetensors"]
    assert "[Errno 27] File too large" in lines["copytree"] and "big.bin" in lines["copytree"]
    for name, line in lines.items():
        assert line.startswith(f"--out '{tmp_path / name / 'out'}' could not be written"), line
        assert "writable disk with free space" in line
        assert not (tmp_path / name).exists()


KILLED_SCRIPT = """
import sys, time
from mmgrpo.core.files import staged_folder
with staged_folder(sys.argv[1]) as tmp:
    (tmp / "weights.bin").write_bytes(bytes(2_000_000))
    print("ready", flush=True)
    time.sleep(600)
"""


def killed_write(out) -> tuple[int, str]:
    """(pid, staging folder name) of a write of ``out`` killed with SIGKILL mid-way (its cleanup never ran)."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SCRIPT, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid, f".{out.name}.tmp-{proc.pid}"


def test_the_folder_a_killed_write_left_is_removed_by_the_next_one(tmp_path):
    """The walkthrough's `kill -9` during `mmgrpo export` left a hidden .NAME.tmp-PID folder beside --out for good
    (15 MB there, gigabytes for a real pipeline). The next write of that folder removes it, with a warning."""
    out = tmp_path / "out"
    pid, name = killed_write(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    (tmp_path / f".other.tmp-{pid}").mkdir()  # another folder's staging: not ours to judge
    with pytest.warns(UserWarning, match=rf"removed '.*{name}' \(2 MB\): the unfinished folder of an earlier write"):
        with files.staged_folder(out) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.tmp-{pid}", "out"]
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]  # the writer's mark is not in the folder


def test_a_staging_folder_whose_writer_cannot_be_told_is_named_and_kept(tmp_path):
    out = tmp_path / "out"
    pid, name = killed_write(out)
    (tmp_path / name / files.STAGING_MARK).write_text(f"another-machine {pid}\n")  # a shared disk's other writer
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (tmp_path / f".out.tmp-{running.pid}").mkdir()  # a write in progress here: left alone, no warning
        with pytest.warns(UserWarning) as seen:
            with files.staged_folder(out):
                pass
    finally:
        running.kill()
        running.wait()
    said = [" ".join(str(w.message).split()) for w in seen]
    assert len(said) == 1 and said[0].startswith(f"'{tmp_path / name}' (2 MB) is the unfinished folder"), said
    assert f"by process {pid} on machine another-machine, which is not running here" in said[0]
    assert f"delete it (rm -r '{tmp_path / name}')" in said[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, f".out.tmp-{running.pid}", "out"])


# ---------------------------------------------------------------------------------------------- check_output_folder
@pytest.mark.parametrize("slash", ["", "/"])
def test_an_output_folder_that_is_a_symbolic_link_is_refused_before_anything_is_written(tmp_path, slash):
    """The walkthrough's --out, a link to an empty folder: the whole export ran, then NotADirectoryError (rmdir of
    the link) and nothing written. Now refused by the check that runs before the model loads, and by
    staged_folder itself."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    (tmp_path / "broken").symlink_to(tmp_path / "gone")
    link = f"{tmp_path / 'link'}{slash}"
    expected = (f"--out '{link}' is a symbolic link (to the folder '{tmp_path / 'empty'}'); the output is written "
                f"whole and renamed into place, which cannot go through a link: give --out the folder itself (--out "
                f"'{tmp_path / 'empty'}') or a new folder")  # fmt: skip
    with pytest.raises(files.UserError) as info:
        files.check_output_folder(link, "--out")
    assert str(info.value) == expected
    with pytest.raises(files.UserError, match="is a symbolic link"):
        with files.staged_folder(link, "--out"):
            raise AssertionError("the block must not run")
    with pytest.raises(files.UserError, match=r"is a symbolic link \(to '.*gone', which is no folder\).*a new folder"):
        files.check_output_folder(tmp_path / "broken", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "empty", "link"]
    assert list((tmp_path / "empty").iterdir()) == []
    assert files.check_output_folder(tmp_path / "link" / "new", "--out") == tmp_path / "link" / "new"  # through one


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_output_folder_value_is_refused_as_empty(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").write_text("mine")  # the working folder: it was "folder '' exists and is not empty"
    with pytest.raises(files.UserError) as info:
        files.check_output_folder(value, "--out")
    assert str(info.value) == "--out is empty; give a folder path (a new or empty folder, e.g. --out export/)"


@pytest.mark.parametrize("out", ["/proc/x", "/proc/new/deeper/x"])
def test_an_unwritable_place_is_refused_by_the_output_check_before_any_work(out):
    """check_output_folder (what export and sample call before their models load) tries the place: `mmgrpo export
    --out /proc/x` loaded the whole model, then refused. The message names the folder tried, not the probe's."""
    with pytest.raises(files.OutputNotWritten) as info:
        files.check_output_folder(out, "--out")
    assert str(info.value).startswith(f"--out '{out}' could not be written (no folder can be made in '/proc': ")
    assert "probe" not in str(info.value) and not os.path.exists(out)


def test_the_output_check_leaves_nothing_where_it_tried(tmp_path):
    assert files.check_output_folder(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert list(tmp_path.iterdir()) == []
