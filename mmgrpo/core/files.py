"""Reading user files so that a bad one is a one-paragraph :class:`UserError` naming the file and the line or the
cause, never a ``UnicodeDecodeError`` / ``UnidentifiedImageError`` / ``DECORDError`` traceback at first use.

Text files (configs, prompt files, JSONL) are decoded as UTF-8 when read; images and videos that a dataset names
are opened once when the dataset loads (:func:`check_image`, :func:`check_video`), not in the middle of training.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmgrpo.core.errors import UserError


def read_utf8(path: str | os.PathLike, what: str) -> str:
    """The text of ``path``; a file that is not UTF-8 is a UserError naming ``what``, the file and the line."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(
            f"{what} '{os.fspath(path)}' is not UTF-8 text: line {line} (byte {e.start}: {e.reason}); save it as "
            f"UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)"
        ) from e


def check_image(path: str | os.PathLike, where: str) -> tuple[int, int]:
    """Open and decode the image at ``path`` once: (width, height), or a UserError naming ``where`` and the file."""
    from PIL import Image

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{where}: image '{path}' not found")
    try:
        with Image.open(path) as im:
            im.load()  # decodes every byte: a truncated or garbage file fails here, not mid-training
            return im.size
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), SyntaxError, DecompressionBombError, ...
        raise UserError(
            f"{where}: image '{path}' cannot be read ({type(e).__name__}: {str(e)[:160]}); replace or remove it"
        ) from e


def open_video(path: str | os.PathLike, where: str, **kwargs):
    """A ``decord.VideoReader`` over ``path`` with at least one frame, or a UserError naming ``where`` and the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{where}: video '{path}' does not exist")
    try:
        import decord
    except ImportError as e:
        raise UserError("reading videos needs decord: pip install 'mmgrpo[video]' (or pip install decord)") from e
    try:
        reader = decord.VideoReader(path, **kwargs)
        n = len(reader)
    except Exception as e:  # decord.DECORDError (a RuntimeError) on a corrupt or non-video file
        raise UserError(
            f"{where}: video '{path}' cannot be read ({type(e).__name__}: {str(e)[:160]}); replace or remove it"
        ) from e
    if n == 0:
        raise UserError(f"{where}: video '{path}' has no frames")
    return reader
