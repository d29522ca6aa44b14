"""Hugging Face datasets as data sources: ``hf:NAME_OR_PATH[@CONFIG][:SPLIT[:COLUMN]]`` (docs/data.md).

A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` is read with ``datasets.load_from_disk``
(``load_dataset`` refuses it); one local .parquet or .arrow file with ``load_dataset("parquet" | "arrow",
data_files=PATH)`` (``load_dataset(PATH)`` finds no data file in a file); anything else (a hub id, a local folder of
data files) with ``datasets.load_dataset``, given the CONFIG (a dataset of several configurations,
``load_dataset(NAME, CONFIG)``) when one is named. SPLIT may slice (``train[:100]``, ``train[10%:]``): the brackets
are kept whole, and a saved DatasetDict is sliced as ``load_dataset`` slices. A saved ``Dataset`` has no splits: a
split written for it is an error, not all of its rows (``hf:DIR:test`` evaluated on the training rows).
The rows get the checks a JSON file's get (:func:`dataset_rows`): a NaN or infinite number is a UserError naming the
dataset, the row and the column (:func:`mmgrpo.data.records.check_finite_row`), and an image stored in the dataset
(an ``Image`` feature, alone or in a list) is decoded once at load, so that a corrupt one is named now and not
mid-training, and kept encoded (:class:`StoredImage`): a dataset of many images is not held decoded in memory. The
stored media are read as Arrow values, not cast to undecoded features: ``Dataset.cast`` writes a copy of the whole
dataset into its folder (a cache file as large as the data, or a PermissionError in a read-only folder). A
stored video (a ``Video`` feature) becomes a file path: its own path where the dataset holds no bytes, else its bytes
written once to ``$XDG_CACHE_HOME/mmgrpo/videos`` (default ``~/.cache``), named by their hash (:func:`video_file`):
the video readers read files, and ``datasets`` decodes videos only with torchcodec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import io
import os
from pathlib import Path
from typing import Any, NamedTuple

from mmgrpo.core.errors import UserError, quoted
from mmgrpo.core.files import check_image, write_atomic
from mmgrpo.data.records import check_finite_row

HF_SYNTAX = "hf:NAME_OR_PATH[@CONFIG][:SPLIT[:COLUMN]]"


class HFSpec(NamedTuple):
    """The parts of ``hf:NAME_OR_PATH[@CONFIG][:SPLIT[:COLUMN]]``."""

    name: str
    split: str
    """'train' when not written; may slice (``train[:100]``)"""
    column: str
    """'' when not written"""
    config: str
    """'' when not written (the dataset's default configuration)"""
    split_written: bool
    """whether the spec names the split (a saved Dataset, which has none, refuses one)"""


def hf_spec(spec: str) -> HFSpec:
    """The parts of ``hf:NAME_OR_PATH[@CONFIG][:SPLIT[:COLUMN]]``: split 'train' and column and config '' when not
    given. A ':' inside a split's brackets (``train[:100]``) does not end it; more than three fields is a UserError
    (a fourth was dropped unread: a config written there was not used). The config follows the last '@' of the
    name, unless the name with it is an existing path."""
    fields, depth, start = [], 0, 3
    for i, c in enumerate(spec[3:], 3):
        depth += (c == "[") - (c == "]")
        if c == ":" and depth <= 0:
            fields.append(spec[start:i])
            start = i + 1
    fields.append(spec[start:])
    if len(fields) > 3:
        raise UserError(f"{quoted(spec)} has {len(fields)} ':'-separated fields, more than the three of "
                        f"{HF_SYNTAX}; a configuration is named after '@' (hf:NAME@CONFIG:SPLIT)")  # fmt: skip
    name, split, column = fields + [""] * (3 - len(fields))
    config = ""
    if "@" in name and not Path(name).exists():
        name, config = name.rsplit("@", 1)
    return HFSpec(name, split or "train", column, config, bool(split))


def saved_dataset(path: Path) -> bool:
    """Is ``path`` a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (which
    ``datasets.load_dataset`` refuses: it must be read with ``load_from_disk``)?"""
    return path.is_dir() and any((path / x).is_file() for x in ("state.json", "dataset_dict.json"))


def open_dataset(spec: str, label: str) -> Any:
    """The split of the dataset ``spec`` names (``hf:NAME_OR_PATH[@CONFIG][:SPLIT...]``), or a UserError beginning
    with ``label`` (``prompts='hf:...'``, ``data.options.path='hf:...'``): no name, ``datasets`` not installed, a
    damaged save_to_disk folder, an unknown split, a name (or configuration) load_dataset cannot read."""
    name, split, _, config, split_written = hf_spec(spec)
    if not name:
        raise UserError(f"{label} names no dataset; write {HF_SYNTAX}")
    if importlib.util.find_spec("datasets") is None:
        raise UserError(
            f"{label} reads a Hugging Face dataset, but the 'datasets' package is not installed; "
            "run `pip install datasets`, or export the dataset to a .jsonl file (Dataset.to_json)"
        )
    datasets = importlib.import_module("datasets")
    if Path(name).is_file():
        return _load_file(datasets, label, name, split, config)
    if saved_dataset(Path(name)):
        if config:
            raise UserError(f"{label}: the folder {name!r} was written by save_to_disk, which keeps one "
                            f"configuration; drop '@{config}'")  # fmt: skip
        return _load_saved(datasets, label, name, split if split_written else "")
    args = f"{name!r}" + (f", {config!r}" if config else "")
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, config or split: say which and how to fix it
        raise UserError(
            f"{label}: datasets.load_dataset({args}, split={split!r}) failed ({quoted(str(e), 300)}); "
            f"check the name, the configuration (a dataset of several is read as hf:NAME@CONFIG[:SPLIT]), the "
            "split, and that the dataset is downloaded when offline"
        ) from e


FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
"""suffix -> the ``datasets`` builder that reads one such file as a dataset (``hf:PATH/x.parquet``):
``load_dataset(PATH)`` of a file finds no data file in it"""


def _load_file(datasets: Any, label: str, name: str, split: str, config: str) -> Any:
    """The rows of one .parquet or .arrow file (what ``Dataset.to_parquet`` or a save_to_disk shard holds, its
    ``Image`` features kept), read by ``load_dataset("parquet" | "arrow", data_files=...)``: a file is one split,
    ``train``, which may be sliced (``train[:100]``). Another file is a UserError saying what hf: reads."""
    builder = FILE_BUILDERS.get(Path(name).suffix.lower())
    if builder is None:
        raise UserError(f"{label}: {name!r} is a file, and hf: reads a dataset folder, a hub name or one "
                        f"{' or '.join(FILE_BUILDERS)} file; give a .jsonl / .json file without 'hf:', or convert "
                        "this one (docs/data.md)")  # fmt: skip
    if config:
        raise UserError(f"{label}: the file {name!r} has no configurations; drop '@{config}'")
    try:
        return datasets.load_dataset(builder, data_files={"train": name}, split=split)
    except Exception as e:  # noqa: BLE001 - a damaged file, or a split the one file does not have
        raise UserError(
            f"{label}: datasets.load_dataset({builder!r}, data_files={name!r}, split={split!r}) failed "
            f"({quoted(str(e), 300)}); check that the file is a complete {builder} file, and that the split "
            "is 'train': one file is one split, named train (a part of it as train[:100])"
        ) from e


def _load_saved(datasets: Any, label: str, name: str, split: str) -> Any:
    """The ``split`` of a dataset saved with save_to_disk ('': none written, 'train' for a DatasetDict), sliced as
    load_dataset slices (``train[:100]``). A Dataset has no splits: a split written for it is an error (its name
    is not saved, so ``:test`` would read the training rows)."""
    try:
        ds = datasets.load_from_disk(name)
    except Exception as e:  # noqa: BLE001 - a folder with missing or damaged files: name it
        raise UserError(
            f"{label}: datasets.load_from_disk({name!r}) failed ({quoted(str(e), 300)}); the folder "
            "is not a complete save_to_disk output: save the dataset again"
        ) from e
    if not isinstance(ds, datasets.DatasetDict):
        if split:
            raise UserError(f"{label}: the folder holds one Dataset (Dataset.save_to_disk), which has no splits, "
                            f"so the split {split!r} cannot be chosen (all its rows would be read); drop "
                            f"':{split}' to read them all, or save a DatasetDict of named splits "
                            "(DatasetDict({'train': ..., 'test': ...}).save_to_disk)")  # fmt: skip
        return ds
    split = split or "train"
    if split in ds:
        return ds[split]
    try:
        parts = datasets.ReadInstruction.from_spec(split).to_absolute({k: len(v) for k, v in ds.items()})
    except (ValueError, KeyError, AssertionError):
        raise UserError(f"{label}: the saved dataset has no split {split!r} (splits: {quoted(sorted(ds))}); name "
                        "one as hf:PATH:SPLIT (a slice as train[:100] or train[10%:])") from None  # fmt: skip
    pieces = [ds[p.splitname].select(range(p.from_, p.to)) for p in parts]
    return pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)


def media_folder(spec: str) -> Path:
    """The folder that relative media paths in the rows of ``spec`` are read from: the folder holding a
    save_to_disk folder or a .parquet / .arrow file (as a data file's paths are relative to the folder holding the
    file), a local folder that load_dataset reads (its data files are in it), else the working directory (a hub
    dataset)."""
    name = Path(hf_spec(spec)[0])
    if saved_dataset(name) or name.is_file():
        return name.parent
    return name if name.is_dir() else Path(".")


@dataclasses.dataclass(frozen=True, eq=False)
class StoredImage:
    """An image stored in a dataset (an ``Image`` feature): its encoded bytes, checked and sized at load,
    decoded upright (by its EXIF orientation, as a path's image is) by :meth:`open` each time it is used."""

    data: bytes = dataclasses.field(repr=False)
    size: tuple[int, int]
    """(width, height) as shown, after the EXIF orientation"""
    digest: str
    """sha1 of the bytes (its first 16 hex digits): equal images have equal ``repr`` (the repeated-example check)"""

    @classmethod
    def checked(cls, data: bytes, name: str, where: str) -> StoredImage:
        """The image of ``data`` once it decodes (a UserError naming ``where`` and ``name`` otherwise)."""
        size = check_image(name, where, data=data)
        return cls(data, size, hashlib.sha1(data).hexdigest()[:16])

    def open(self) -> Any:
        """A PIL image, turned upright by its EXIF orientation."""
        from PIL import Image, ImageOps

        return ImageOps.exif_transpose(Image.open(io.BytesIO(self.data)))

    def __repr__(self) -> str:
        return f"StoredImage({self.size[0]}x{self.size[1]}, sha1 {self.digest})"


VIDEO_ENDS = 64 * 1024
"""bytes hashed at each end of a video file for :func:`content_identity`"""


def content_identity(item: str | StoredImage, video: bool = False) -> str:
    """What a resume of a VLM recipe compares to tell whether an example's image or video changed since a
    checkpoint (:func:`mmgrpo.data.vlm_records.example_identity`): an image file by its name and the SHA-1 of its
    bytes, a stored image by its size and the hash of its bytes (taken when it was read), a video file (``video``)
    by its name, its size and the SHA-1 of its first and last :data:`VIDEO_ENDS` bytes (the whole file when it is
    shorter than twice that).

    A file's name and size (the identity before 2026-12-07) missed an image replaced by one of the same size (its
    mirror image, a PNG re-saved with other pixels); the load decodes every image anyway, so hashing one costs the
    run as much again once (the fingerprint is taken at the first checkpoint and at a resume). A video is not read
    whole: its two ends hold the container's header and index, which re-encoding or cutting changes, but an edit of
    frames in its middle that keeps the size is not seen. The name without its folder and no modification time: a
    dataset moved or copied to another machine is the same data, and its resume continues. A file gone (or
    unreadable) since it was loaded is "missing" (the data changed), not an error mid-run."""
    if isinstance(item, StoredImage):
        return repr(item)
    name = os.path.basename(os.fspath(item))
    h = hashlib.sha1()
    try:
        with open(item, "rb") as f:
            if not video:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
                return f"{name} sha1 {h.hexdigest()[:16]}"
            size = os.fstat(f.fileno()).st_size
            h.update(f.read(VIDEO_ENDS if size > 2 * VIDEO_ENDS else size))
            if size > 2 * VIDEO_ENDS:
                f.seek(-VIDEO_ENDS, os.SEEK_END)
                h.update(f.read())
    except OSError:
        return f"{name} missing"
    return f"{name} {size} ends sha1 {h.hexdigest()[:16]}"


def opened(images: list[Any]) -> list[Any]:
    """``images`` with every :class:`StoredImage` decoded (a PIL image), paths as they are."""
    return [im.open() if isinstance(im, StoredImage) else im for im in images]


def _is_video(feature: Any) -> bool:
    video = getattr(importlib.import_module("datasets"), "Video", None)  # datasets >= 3.3
    return video is not None and isinstance(feature, video)


def _has_media(feature: Any) -> bool:
    """Whether ``feature`` holds an ``Image`` or ``Video`` feature (alone, in a dict or in a list)."""
    if isinstance(feature, importlib.import_module("datasets").Image) or _is_video(feature):
        return True
    if isinstance(feature, dict):
        return any(_has_media(v) for v in feature.values())
    if dataclasses.is_dataclass(feature) and hasattr(feature, "feature"):  # List, Sequence, LargeList
        return _has_media(feature.feature)
    return False


def video_file(data: bytes, name: str) -> str:
    """The path of a file holding ``data`` (a video stored in a dataset): ``$XDG_CACHE_HOME/mmgrpo/videos/<sha1 of
    the bytes><the stored name's suffix>``, written once (to a temporary name, then renamed: never half a file)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmgrpo" / "videos"
    path = root / (hashlib.sha1(data).hexdigest() + (Path(name).suffix or ".mp4"))
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
    return str(path)


def _row_value(value: Any, feature: Any, name: str, where: str) -> Any:
    """A value of a row with its stored images as :class:`StoredImage` (an image given by a path only: the path),
    its stored videos as file paths (:func:`video_file`),
    and, inside a struct, the keys that other items of its column have but this one lacks (None, as Arrow fills
    them) left out, as a JSON file would not hold them (a TRL ``{"type": "image"}`` part read as ``{"type": "image",
    "text": None}`` gave a question ending in 'None')."""
    datasets = importlib.import_module("datasets")
    if isinstance(feature, datasets.Image):
        if value is None:
            return None
        if value.get("bytes") is None:
            return value.get("path")
        return StoredImage.checked(value["bytes"], f"stored in {name}", where)
    if _is_video(feature):
        if value is None:
            return None
        if value.get("bytes") is None:
            return value.get("path")
        return video_file(value["bytes"], value.get("path") or "")
    if isinstance(value, dict):
        sub = feature if isinstance(feature, dict) else {}
        return {k: _row_value(v, sub.get(k), f"{name}[{k!r}]", where) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        item = getattr(feature, "feature", None)
        return [_row_value(v, item, f"{name}[{i}]", where) for i, v in enumerate(value)]
    return value


def _arrow_rows(ds: Any, batch: int = 256) -> Any:
    """The rows of ``ds`` as Python values read from its Arrow table (in the dataset's order, selections and
    shuffles included): an ``Image`` or ``Video`` value is its stored ``{bytes, path}``, undecoded. Casting the
    features to ``decode=False`` gave the same values but wrote a copy of the dataset into the dataset's folder."""
    table = ds.with_format("arrow")
    for lo in range(0, len(ds), batch):
        yield from table[lo : lo + batch].to_pylist()


def dataset_rows(ds: Any, spec: str) -> list[tuple[str, dict]]:
    """(``"hf:... row N"``, row) of every row of ``ds`` (N counted from 0, as ``ds[N]``): checked for non-finite
    numbers, its stored images as :class:`StoredImage` (a corrupt one a UserError naming the row and the column)."""
    features = dict(ds.features)
    rows: Any = ds
    if any(_has_media(f) for f in features.values()):  # {bytes, path} as stored; no decoding, no copy (a cast's)
        rows = _arrow_rows(ds)
    out = []
    for i, row in enumerate(rows):
        where = f"{spec} row {i}"
        check_finite_row(row, where)
        out.append((where, {k: _row_value(v, features.get(k), f"column {k!r}", where) for k, v in row.items()}))
    return out
