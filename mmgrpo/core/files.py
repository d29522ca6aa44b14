"""Reading user files so that a bad one is a one-paragraph :class:`UserError` naming the file and the line or the
cause, never a ``UnicodeDecodeError`` / ``UnidentifiedImageError`` / ``InvalidDataError`` traceback at first use.

Text files (configs, prompt files, JSONL) are decoded as UTF-8 when read; images and videos that a dataset names
are opened once when the dataset loads (:func:`check_image`, :func:`open_video`), not in the middle of training;
:func:`open_video` reads videos with PyAV (or decord where PyAV is not installed).

The folder a command writes (``mmgrpo export --out``, ``mmgrpo sample --out``) is checked before anything loads
(:func:`check_output_folder`: new or empty, not a file, not under a file, not inside a run directory) and written
whole or not at all (:func:`staged_folder`), so a failure never leaves a half-written folder or overwrites a file;
a folder the disk refuses (full, read-only, ``/proc``) is a UserError naming the option, not a traceback.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmgrpo.core.errors import UserError, first_line
from mmgrpo.core.extras import installed, missing_extra

BINARY_FORMATS = [
    (b"\x1f\x8b", "a gzip-compressed file"),
    (b"PK\x03\x04", "a zip archive"),
    (b"PAR1", "a Parquet file"),
    (b"ARROW1", "an Arrow file"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
]
"""(leading bytes, what the file is): data files that are not text, named instead of 'not UTF-8'"""
BINARY_FIX = {
    "a gzip-compressed file": "decompress it first (gunzip -k FILE) and give the text file",
    "a zip archive": "unpack it and give the text file in it",
    "a Parquet file": "write it as JSONL (pandas.read_parquet(IN).to_json(OUT, orient='records', lines=True))",
    "an Arrow file": "write it as JSONL (datasets.Dataset.from_file(IN).to_json(OUT))",
}


def read_utf8(path: str | os.PathLike, what: str) -> str:
    """The text of ``path``, without the byte-order mark that Windows editors write first (it would otherwise start
    the first prompt, or hide a CSV's first column name); a file that is not UTF-8, or holds a NUL byte (UTF-16 text
    of ASCII characters decodes as UTF-8 with a NUL after every letter), is a UserError naming ``what``, the file and
    the line."""
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(8)
    kind = next((k for magic, k in BINARY_FORMATS if head.startswith(magic)), None)
    if kind is not None:
        raise UserError(f"{what} '{os.fspath(path)}' is {kind}, not text; {BINARY_FIX.get(kind, 'convert it')}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raw = p.read_bytes()
        line = raw[: e.start].count(b"\n") + 1
        source = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "latin1"
        raise UserError(
            f"{what} '{os.fspath(path)}' is not UTF-8 text: line {line} (byte {e.start}: {e.reason}"
            f"{', it starts as UTF-16 does' if source == 'utf-16' else ''}); save it as UTF-8 "
            f"(e.g. iconv -f {source} -t utf-8 IN > OUT)"
        ) from e
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise UserError(
            f"{what} '{os.fspath(path)}' holds a NUL byte on line {line}: it is binary, or UTF-16 text; save it as "
            f"UTF-8 text (e.g. iconv -f utf-16 -t utf-8 IN > OUT)"
        )
    return text


def check_output_folder(path: str | os.PathLike, flag: str, run_dir: str | os.PathLike | None = None) -> Path:
    """``path`` as the new output folder of a command option ``flag`` (``--out``): a UserError naming the option and
    the value unless it is absent or an empty folder (not a symbolic link) whose nearest existing ancestor is a
    folder, and (``run_dir``) outside that run directory, which training rewrites (``run.overwrite=true`` deletes it,
    pruning deletes old checkpoints with whatever they hold). An empty value is refused as such (it is no path: as
    the working folder it was "exists and is not empty")."""
    if not os.fspath(path).strip():
        raise UserError(f"{flag} is empty; give a folder path (a new or empty folder, e.g. {flag} export/)")
    refuse_link(path, flag)
    out = Path(os.path.abspath(path))
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} '{os.fspath(path)}' is a file, not a folder; give a new or empty folder to {flag}")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{flag} folder '{os.fspath(path)}' exists and is not empty (nothing in it is overwritten); "
                        f"give a new or empty folder to {flag}")  # fmt: skip
    above = next(a for a in out.parents if a.exists())
    if not above.is_dir():
        raise UserError(f"{flag} '{os.fspath(path)}': '{above}' is a file, so no folder can be made there; give a "
                        f"folder path to {flag}")  # fmt: skip
    try:  # a folder made and removed where the output's first missing folder goes: before any model loads, not
        # after (/proc, /sys, a read-only disk, another user's folder)
        os.rmdir(tempfile.mkdtemp(prefix=".mmgrpo-probe-", dir=above))
    except OSError as e:
        raise not_written(path, flag, f"no folder can be made in '{above}': {e.strerror or first_line(e)}") from e
    if run_dir is not None:
        run = Path(run_dir).resolve()
        known = next(a for a in (out, *out.parents) if a.exists())
        real = known.resolve() / out.relative_to(known)  # symbolic links resolved where they exist
        if real == run or run in real.parents:
            raise UserError(f"{flag} '{os.fspath(path)}' is inside the run directory '{run_dir}', which training "
                            "rewrites (run.overwrite=true deletes it, pruning deletes old checkpoints with what they "
                            f"hold); give {flag} a folder outside it")  # fmt: skip
    return out


def refuse_link(path: str | os.PathLike, flag: str) -> None:
    """A UserError when ``path`` is a symbolic link (written ``link`` or ``link/``): :func:`staged_folder` renames
    its finished folder into place, which cannot replace a link (the whole export ran, then ``NotADirectoryError``
    and nothing written); the fix names the folder it leads to."""
    link = os.path.abspath(path)  # without a trailing '/', which would follow the link
    if not os.path.islink(link):
        return
    target = os.path.realpath(link)
    if os.path.isdir(target):
        where, fix = f"to the folder '{target}'", f"give {flag} the folder itself ({flag} '{target}') or a new folder"
    else:
        where, fix = f"to '{os.readlink(link)}', which is no folder", f"give {flag} a new folder"
    raise UserError(f"{flag} '{os.fspath(path)}' is a symbolic link ({where}); the output is written whole and "
                    f"renamed into place, which cannot go through a link: {fix}")  # fmt: skip


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write the file ``path`` whole or not at all: ``data`` goes to a temporary sibling (flushed to disk), renamed
    over ``path``; on an exception (a full disk, an interrupt) the temporary file is removed and ``path`` is left as
    it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def missing_parents(path: str | os.PathLike) -> list[Path]:
    """The folders above ``path`` that do not exist yet, deepest first: what creating it also creates (a command's
    output folder on a fresh machine), for :func:`remove_empty` to take back after a failure."""
    return [a for a in Path(os.path.abspath(path)).parents if not a.exists()]


def remove_empty(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty; the first one holding anything stops it."""
    for a in folders:
        try:
            a.rmdir()
        except OSError:
            return


class OutputNotWritten(UserError):
    """A command's output folder could not be written: the disk is full, the folder is read-only or protected
    (``/proc``, ``/sys``, another user's folder). ``reason`` is the operating system's words for it (the message
    without the fix), for a caller that goes on without the folder (the trainer's export beside a checkpoint)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
"""the errors of a write that say the disk cannot take the file (full, over quota, over the file size limit,
read-only), wherever in the output folder they happen"""


def write_failure(error: BaseException, inside: Path | None = None) -> str | None:
    """The operating system's reason when ``error`` is a failed write, else None (a bug, a missing input: left as it
    is): an ``OSError`` of :data:`WRITE_ERRNOS`, or a denied permission on a path under ``inside`` (the staging
    folder); a ``shutil.Error`` (``copytree``, which gathers the errors of every file) holding one;
    safetensors' ``SafetensorError``, whose message ends with the OS error ("... No space left on device (os error
    28)"), as ``save_pretrained`` and ``save_lora_weights`` raise it."""
    import re

    if isinstance(error, shutil.Error):
        texts = [str(e[-1]) for e in error.args[0] if isinstance(e, tuple)] if error.args else []
        codes = [re.match(r"\[Errno (\d+)\]", t) for t in texts]  # copytree keeps each file's error as text
        return next((t for t, c in zip(texts, codes) if c is not None and int(c.group(1)) in WRITE_ERRNOS), None)
    if isinstance(error, OSError):
        on = [os.path.abspath(f) for f in (error.filename, error.filename2) if isinstance(f, (str, os.PathLike))]
        mine = inside is not None and any(f == str(inside) or f.startswith(f"{inside}{os.sep}") for f in on)
        mine = mine and error.errno in (errno.EACCES, errno.EPERM)
        return first_line(error) if error.errno in WRITE_ERRNOS or mine else None
    if type(error).__name__ == "SafetensorError":
        code = re.search(r"os error (\d+)", str(error))
        return first_line(error) if code is not None and int(code.group(1)) in WRITE_ERRNOS else None
    return None


def not_written(path: str | os.PathLike, flag: str, reason: str) -> OutputNotWritten:
    """The one-paragraph error of an output folder that could not be written, naming ``flag``, the OS's reason and
    the fix."""
    message = (f"{flag} '{os.fspath(path)}' could not be written ({reason}); nothing was left there. Give {flag} a "
               "folder on a writable disk with free space (df -h shows each disk's free space)")  # fmt: skip
    return OutputNotWritten(message, reason)


STAGING_MARK = ".mmgrpo-staging"
"""the file in a staging folder of :func:`staged_folder` that names its writer (``host pid``), removed before the
folder is renamed into place: what tells a folder left by a killed write on this machine from one that another
machine (on a shared disk) is writing now"""


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def _size(folder: Path) -> str:
    """The size of the files under ``folder``, for a message (``15 MB``)."""
    total = 0
    for top, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(top, name)).st_size
            except OSError:
                pass
    return f"{total / 1e6:.0f} MB" if total >= 1e6 else f"{total / 1e3:.0f} kB"


def clear_stale_staging(out: Path) -> None:
    """Remove the staging folders of ``out`` (``.NAME.tmp-PID`` beside it, as :func:`staged_folder` names them) that
    a write killed on this machine left behind (``kill -9``, a lost session: its ``except`` never ran), each with a
    warning naming it: its process is gone and its :data:`STAGING_MARK` names this machine. One whose writer cannot be
    told (no mark: killed before writing it, or left by a version without it; another machine's on a shared disk
    whose process is not running here) is named in a warning and kept: it may be a write in progress elsewhere."""
    import warnings

    prefix, host = f".{out.name}.tmp-", socket.gethostname()
    try:
        entries = sorted(out.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        pid = entry.name[len(prefix) :]
        if not entry.name.startswith(prefix) or not pid.isdigit() or int(pid) == os.getpid():
            continue
        if entry.is_symlink() or not entry.is_dir() or _running(int(pid)):
            continue
        try:
            mark = (entry / STAGING_MARK).read_text().split()
        except OSError:
            mark = []
        size = _size(entry)
        if mark == [host, pid]:
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                warnings.warn(f"removed '{entry}' ({size}): the unfinished folder of an earlier write of '{out}' "
                              f"whose process ({pid}) was killed before it could clean up", stacklevel=2)  # fmt: skip
                continue
        writer = f" on machine {mark[0]}" if len(mark) == 2 else ""
        warnings.warn(f"'{entry}' ({size}) is the unfinished folder of an earlier write of '{out}' by process {pid}"
                      f"{writer}, which is not running here; unless another machine is writing '{out}' now, delete "
                      f"it (rm -r '{entry}')", stacklevel=2)  # fmt: skip


@contextmanager
def staged_folder(path: str | os.PathLike, flag: str = "--out") -> Iterator[Path]:
    """Write the folder ``path`` whole or not at all: yields a temporary sibling folder, renamed to ``path`` when the
    block ends (an existing ``path`` must be empty: it is replaced); on an exception the temporary folder and the
    parent folders made for it are removed and ``path`` is left as it was. The staging folders of ``path`` that a
    killed write left behind are removed first (:func:`clear_stale_staging`).

    A failure to write (the folder cannot be made: ``/proc``, ``/sys``, a read-only disk; the disk fills up while
    the block writes: :func:`write_failure`) is an :class:`OutputNotWritten` naming ``flag`` (the command's option),
    the OS's reason and the fix, not the traceback of ``mkdir``, ``copytree`` or safetensors."""
    refuse_link(path, flag)
    out = Path(os.path.abspath(path))
    made = missing_parents(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clear_stale_staging(out)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / STAGING_MARK).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    except OSError as e:  # nothing of ours is there yet but the parent folders
        remove_empty(made)
        raise not_written(path, flag, first_line(e)) from e
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(made)
        reason = write_failure(e, tmp)
        if reason is not None:
            raise not_written(path, flag, reason) from e
        raise
    try:
        (tmp / STAGING_MARK).unlink(missing_ok=True)
        if out.is_dir():
            out.rmdir()  # empty (else rmdir refuses and nothing is replaced)
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(made)
        if isinstance(e, OSError):
            raise not_written(path, flag, first_line(e)) from e
        raise


MAX_ASPECT_RATIO = 200
"""the longest side of an image (or a video frame) over its shortest that transformers' Qwen2-VL image and video
processors accept: ``smart_resize`` in transformers/models/qwen2_vl/image_processing_qwen2_vl.py raises "absolute
aspect ratio must be smaller than 200" past it (transformers 5.x writes the 200 in the function; Qwen2.5-VL, Qwen3-VL
and GLM-4V's processors do the same). A 10000 x 3 image passed every other check and stopped training at step 1."""


def _check_aspect_ratio(width: int, height: int, name: str, where: str, each: str = "") -> None:
    """A UserError naming ``where`` and ``name`` when ``width`` : ``height`` is more extreme than
    :data:`MAX_ASPECT_RATIO` (a size not known, 0, is left to the decoder)."""
    if min(width, height) < 1:
        return
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise UserError(f"{where}: {name} is {width}x{height} pixels{each}, an aspect ratio of {ratio:.4g}:1, more "
                        f"than {MAX_ASPECT_RATIO}:1: no model reads it as it is (the VLM image processors refuse it, "
                        "transformers' Qwen2-VL smart_resize at the first training step; a video model's first frame "
                        "would be stretched to the video's size beyond recognition); crop it, or pad its short side, "
                        f"to a shape within {MAX_ASPECT_RATIO}:1")  # fmt: skip


def check_image(path: str | os.PathLike, where: str, data: bytes | None = None) -> tuple[int, int]:
    """Open and decode the image at ``path`` once: (width, height) as a viewer shows it (after its EXIF orientation,
    which the VLM loader applies), or a UserError naming ``where`` and the file. With ``data``, the image is those
    encoded bytes (one stored in a dataset) and ``path`` names it in the messages ("stored in column 'image'").

    An image of more pixels than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89 million) is
    refused from its header, before it is decoded: a small file can declare 20000 x 20000 pixels (1.2 GB decoded),
    and no VLM or video model reads an image at that size. So is one whose long side is more than
    :data:`MAX_ASPECT_RATIO` times its short side: the VLM processors refuse it, and a processor that scales the
    short side up to its size (CLIP's 224) would make a 10000 x 3 image 746667 x 224.
    """
    import warnings

    from PIL import Image

    path = os.fspath(path)
    name = f"image '{path}'" if data is None else f"the image {path}"
    if data is None and not os.path.isfile(path):
        raise UserError(f"{where}: image '{path}' {_not_a_file(path)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with the fix
            with Image.open(path if data is None else io.BytesIO(data)) as im:
                limit = Image.MAX_IMAGE_PIXELS
                if limit is not None and im.width * im.height > limit:
                    raise UserError(f"{where}: {name} is {im.width}x{im.height} pixels, more than the "
                                    f"{limit} that PIL decodes safely (a decompression bomb, or a scan at full "
                                    "resolution); downscale it (e.g. to 2048 pixels a side)")  # fmt: skip
                _check_aspect_ratio(im.width, im.height, name, where)
                im.load()  # decodes every byte: a truncated or garbage file fails here, not mid-training
                turned = im.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientation: shown turned by 90 degrees
                return (im.height, im.width) if turned else im.size
    except UserError:
        raise
    except Image.DecompressionBombError as e:  # over twice the limit: PIL refuses it in open()
        raise UserError(
            f"{where}: {name} is too large to decode safely ({str(e)[:120]}); a decompression "
            "bomb, or a scan at full resolution: downscale it (e.g. to 2048 pixels a side)"
        ) from e
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        raise UserError(
            f"{where}: {name} cannot be read ({type(e).__name__}: {str(e)[:160]}); replace or remove it"
        ) from e


def _not_a_file(path: str) -> str:
    """Why ``path`` (not a regular file) cannot be read, for an error message: a folder, a broken link, absent."""
    if os.path.isdir(path):
        return "is a folder, not a file; name the file in it"
    if os.path.islink(path):
        return "is a symbolic link that leads to no file (its target is missing, or the links form a loop)"
    if os.path.exists(path):
        return "is not a regular file"
    if "\\" in path:
        return "not found (the path holds '\\', a Windows separator: write '/' instead)"
    parent, name = os.path.split(path)
    if os.path.isdir(parent or "."):
        other = next((x for x in os.listdir(parent or ".") if x.lower() == name.lower() and x != name), None)
        if other is not None:
            return f"not found, but '{other}' is there: file names are case-sensitive here; write it as '{other}'"
    return "not found"


@dataclass(frozen=True)
class VideoFile:
    """A video that :func:`open_video` has opened and decoded a frame of: its path, frame count and average fps.

    ``backend`` is the library that reads it: ``"av"`` (PyAV, the ``video`` extra: wheels for Linux x86_64 and
    aarch64, macOS and Windows) or ``"decord"`` (used only where PyAV is not installed). Both decode with FFmpeg; on
    the mp4 files imageio writes they give bit-identical RGB frames (tests/core/test_video_files.py).
    """

    path: str
    num_frames: int
    fps: float
    backend: str

    def __len__(self) -> int:
        return self.num_frames

    def frames(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """uint8 RGB frames [len(indices), H, W, 3] at ``indices`` (any order, repeats allowed); None: every frame.

        PyAV decodes from the start up to the last index asked for and keeps only those frames, so a long video
        is never held in memory whole.
        """
        idx = list(range(self.num_frames)) if indices is None else [int(i) for i in indices]
        if not idx:
            raise ValueError("frames() needs at least one index")
        if min(idx) < 0 or max(idx) >= self.num_frames:
            raise UserError(
                f"video '{self.path}': frame indices {min(idx)}..{max(idx)} outside its {self.num_frames} frames"
            )
        if self.backend == "decord":
            import decord

            return decord.VideoReader(self.path, ctx=decord.cpu(0)).get_batch(idx).asnumpy()
        return _av_frames(self.path, idx)


def _av_frames(path: str, idx: list[int]) -> np.ndarray:
    import av

    wanted, last, got = set(idx), max(idx), {}
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                got[i] = _upright(frame.to_ndarray(format="rgb24"), getattr(frame, "rotation", 0))
            if i >= last:
                break
    if len(got) < len(wanted):
        raise UserError(f"video '{path}': only {len(got)} of the {len(wanted)} frames asked for (up to frame {last}) "
                        "could be decoded; re-encode it (e.g. ffmpeg -i IN -c:v libx264 OUT.mp4)")  # fmt: skip
    return np.stack([got[i] for i in idx])


def _upright(frame: np.ndarray, rotation: float | None) -> np.ndarray:
    """A decoded frame [H, W, 3] turned as its display rotation says (a phone's portrait video is stored landscape
    with a 90-degree flag, which players and decord apply and PyAV's ``to_ndarray`` does not), as a still image's
    EXIF orientation is applied."""
    k = round(float(rotation or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(frame, k=k)) if k else frame


def video_backend() -> str:
    """The library that reads videos: PyAV if installed, else decord, else a UserError naming the ``video`` extra."""
    for name in ("av", "decord"):
        if installed(name):
            return name
    raise missing_extra("video", "reading videos", "av")


def open_video(path: str | os.PathLike, where: str, backend: str | None = None) -> VideoFile:
    """Open ``path`` and decode its first frame: a :class:`VideoFile` with at least one frame, or a UserError
    naming ``where`` and the file. ``backend``: ``"av"`` or ``"decord"`` (default: :func:`video_backend`).

    A frame of more pixels than an image may hold (``PIL.Image.MAX_IMAGE_PIXELS``, as :func:`check_image`) is
    refused from the stream's header (PyAV; decord after its first frame): the readers decode up to ``max_frames``
    frames at full size before shrinking them to the model's budget, so an 8K video took gigabytes. So is a frame
    of a more extreme shape than :data:`MAX_ASPECT_RATIO`, as an image's is.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{where}: video '{path}' {_not_a_file(path).replace('not found', 'does not exist')}")
    backend = backend or video_backend()
    if backend not in ("av", "decord"):
        raise ValueError(f"unknown video backend {backend!r}; use 'av' or 'decord'")
    try:
        n, fps = _av_probe(path, where) if backend == "av" else _decord_probe(path, where)
    except UserError:
        raise
    except Exception as e:  # av.error.InvalidDataError, decord.DECORDError, ... on a corrupt or non-video file
        raise UserError(
            f"{where}: video '{path}' cannot be read ({type(e).__name__}: {str(e)[:160]}); replace or remove it"
        ) from e
    if n == 0:
        raise UserError(f"{where}: video '{path}' has no frames")
    return VideoFile(path, n, fps, backend)


def _check_frame_pixels(width: int, height: int, path: str, where: str) -> None:
    """A UserError naming ``where`` when a video's frames have more pixels than PIL decodes safely as an image, or
    a more extreme shape than :data:`MAX_ASPECT_RATIO` (the VLM video processors resize frames as images)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise UserError(f"{where}: video '{path}' is {width}x{height} pixels a frame, more than the {limit} that PIL "
                        "decodes safely as an image (each frame is decoded at full size); downscale it (e.g. "
                        "ffmpeg -i IN -vf scale=1280:-2 OUT.mp4)")  # fmt: skip
    _check_aspect_ratio(width, height, f"video '{path}'", where, " a frame")


def _av_probe(path: str, where: str) -> tuple[int, float]:
    """(frame count, average fps) of the first video stream, its frame size checked (:func:`_check_frame_pixels`)
    before its first frame is decoded (0 frames if none)."""
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        _check_frame_pixels(stream.codec_context.width, stream.codec_context.height, path, where)
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        if next(container.decode(stream), None) is None:
            return 0, fps
        n = stream.frames
    if n <= 0:  # the container does not store a frame count: count the stream's packets (no decoding)
        with av.open(path) as container:
            n = sum(1 for packet in container.demux(video=0) if packet.size)
    return n, fps


def _decord_probe(path: str, where: str) -> tuple[int, float]:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0))
    n = len(reader)
    if n:
        height, width = reader[0].shape[:2]
        _check_frame_pixels(width, height, path, where)
    return n, float(reader.get_avg_fps() or 0.0)
