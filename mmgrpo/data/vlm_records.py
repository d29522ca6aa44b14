"""The VLM recipes' data files: JSON lines (or a .json list, or an ``hf:`` dataset) of examples in the project's,
TRL's or LLaVA's format, checked and turned into ``(prompt, meta)`` examples with their media resolved; and what
defines an example for a checkpoint's fingerprint. Read by :mod:`mmgrpo.pipelines.vlm_reasoning` and
:mod:`mmgrpo.pipelines.vlm_grounding` (docs/data.md).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

from mmgrpo.core.errors import UserError, quoted
from mmgrpo.core.files import check_image, open_video, read_utf8
from mmgrpo.data.hf_datasets import (
    StoredImage,
    content_identity,
    dataset_rows,
    hf_spec,
    media_folder,
    open_dataset,
    saved_dataset,
)
from mmgrpo.data.records import json_list_rows, json_type, jsonl_rows
from mmgrpo.data.vlm_formats import IGNORED, to_qa_record

Example = tuple[dict, dict]  # (prompt {question, options}, meta {answer, images | video, ...})


NOT_JSON = (".csv", ".tsv", ".parquet", ".arrow")
"""data-file suffixes that are not JSON: refused by name, where they were read as JSONL ("line 1 is not valid JSON");
not ``.txt``, which may well hold JSON lines (read as before)"""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".avi", ".mkv", ".m4v")
"""what an image / a video file is named like: a path under the other key is refused (:func:`check_media`), and a
field of another name holding such paths in a file without media is named (:func:`check_media_keys`)"""

MEDIA_KEYS = "'image' (one path), 'images' (a list of paths) and 'video' (a path)"
"""the keys an example's media are read from, after a TRL or LLaVA record's conversion (:func:`check_media`)"""


def not_json(path: str, p: Path) -> UserError:
    """The refusal of a data file whose suffix is in :data:`NOT_JSON`, with the fix that works for it: a one-line
    conversion of a CSV / TSV of flat columns to JSONL, ``hf:PATH`` for a Parquet or Arrow file (read as a Hugging
    Face dataset file: :func:`~mmgrpo.data.hf_datasets.open_dataset`, its ``Image`` columns as images)."""
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        delimiter = ", delimiter='\\t'" if suffix == ".tsv" else ""
        fix = (
            f" Convert a {suffix[1:].upper()} of flat columns (images, options and several answers are lists, which "
            'a cell does not hold) with: python -c "import csv, json, sys; [print(json.dumps(r)) for r in '
            f'csv.DictReader(open(sys.argv[1]){delimiter})]" {p.name} > {p.with_suffix(".jsonl").name}'
        )
    else:
        fix = (
            f" Read it as a Hugging Face dataset file instead: data.options.path=hf:{path} (its Image columns are "
            "read as images, its list columns as lists)"
        )
    return UserError(
        f"data.options.path={path!r} is a {suffix} file, which a VLM recipe does not read as a file: its examples "
        'are JSON, a .jsonl file (one object a line, e.g. {"question": ..., "answer": ..., "image": "a.png"}) or a '
        ".json file holding one list of them (docs/data.md), or hf:NAME_OR_PATH for a Hugging Face dataset." + fix
    )


def jsonl_records(path: str | Path, required: tuple[str, ...], otherwise: str, convert=None) -> list[tuple[str, dict]]:
    """(``"PATH line N"``, record) of a JSONL file (or a .json file holding one list) of objects that hold every
    ``required`` key (UserError otherwise).

    ``otherwise`` completes the missing-file message ("... or '' for <otherwise>"); ``convert(record, where)``, when
    given, first turns each record of another format into the project's. The parts of the records that a conversion
    did not use (:data:`~mmgrpo.data.vlm_formats.IGNORED`: system turns, later turns) are named in one warning.
    """
    p = Path(path)
    if str(path).startswith("hf:"):
        rows = hf_records(str(path))
    elif p.is_dir():
        if saved_dataset(p):
            raise UserError(f"data.options.path={str(path)!r} is a folder holding a Hugging Face dataset "
                            f"(save_to_disk); write hf:{path} to read it")  # fmt: skip
        raise UserError(f"data.options.path={str(path)!r} is a folder; give a JSONL file of examples, hf:PATH for "
                        f"a Hugging Face dataset, or '' for {otherwise}")  # fmt: skip
    elif not p.is_file():
        raise UserError(f"data.options.path={str(path)!r} not found; give a JSONL file, or '' for {otherwise}")
    elif p.suffix.lower() in NOT_JSON:
        raise not_json(str(path), p)
    else:
        text = read_utf8(p, "data file")
        rows = json_list_rows(text, str(path)) if p.suffix.lower() == ".json" else jsonl_rows(text, str(path))
    out, ignored = [], {}
    for where, rec in rows:
        if convert is not None:
            rec = convert(rec, where)
        if not isinstance(rec, dict) or not all(k in rec for k in required):
            keys = " and ".join(repr(k) for k in required)
            got = (
                f"the keys {quoted(sorted(rec), 80)}"
                if isinstance(rec, dict)
                else f"a JSON {json_type(rec)} ({quoted(rec, 40)})"
            )
            raise UserError(f"{where}: each example needs {keys}; got {got}")
        for part in rec.pop(IGNORED, []):
            ignored.setdefault(part, []).append(where.rsplit(" ", 1)[-1])
        out.append((where, rec))
    unit = "rows" if str(path).startswith("hf:") else "lines"
    for part, lines in ignored.items():
        warnings.warn(f"{path}: {len(lines)} example(s) hold {part}, which the recipe does not use ({unit} "
                      f"{', '.join(lines[:5])}{', ...' if len(lines) > 5 else ''})"
                      + ("; set policy.options.system_prompt for a system prompt" if "system" in part else ""),
                      stacklevel=3)  # fmt: skip
    return out


def hf_records(spec: str) -> list[tuple[str, Any]]:
    """(``"hf:... row N"``, row) of the Hugging Face dataset of ``data.options.path=hf:NAME_OR_PATH[:SPLIT]``: a
    save_to_disk folder or what ``datasets.load_dataset`` reads (mmgrpo/data/hf_datasets.py); its images stored as
    ``Image`` features (:class:`~mmgrpo.data.hf_datasets.StoredImage`) or as paths."""
    label = f"data.options.path={quoted(spec)}"
    if hf_spec(spec)[2]:
        raise UserError(f"{label} names a column; an example is a whole row (question, answer, image, ...): write "
                        "hf:NAME_OR_PATH[:SPLIT]")  # fmt: skip
    return dataset_rows(open_dataset(spec, label), spec)


def media_base(path: str | Path) -> Path:
    """The folder relative media paths of a data file are read from: the file's folder, or for ``hf:`` the
    folder :func:`~mmgrpo.data.hf_datasets.media_folder` says."""
    return media_folder(str(path)) if str(path).startswith("hf:") else Path(path).parent


def check_text(rec: dict, key: str, where: str) -> str:
    """``rec[key]`` when it is a non-empty string (a UserError naming ``where`` and the key otherwise)."""
    value = rec.get(key)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: '{key}' must be a non-empty string, got {quoted(value, 80)}")
    return value


def _scalar(value: Any) -> bool:
    return (isinstance(value, str) and bool(value.strip())) or (
        isinstance(value, int | float) and not isinstance(value, bool)
    )


def _named_like(rel: str, key: str, where: str) -> None:
    """A UserError naming ``where`` when the path ``rel`` given as ``key`` (image(s) or video) is named like a file
    of the other kind: a PNG given as a video was read as a one-frame video (PyAV opens a PNG), an mp4 given as an
    image failed as 'cannot be read'. As the image-to-video recipe refuses it (its ``_row``). A GIF may be either."""
    looks = {
        "image": VIDEO_SUFFIXES,
        "images": VIDEO_SUFFIXES,
        "video": tuple(x for x in IMAGE_SUFFIXES if x != ".gif"),
    }
    if Path(rel).suffix.lower() in looks[key]:
        other = "image" if key == "video" else "video"
        raise UserError(f"{where}: '{key}' names {quoted(rel, 80)}, which is named like a{'n' * (other == 'image')} "
                        f"{other} file; give it as '{other}'")  # fmt: skip


def check_media(rec: dict, base: Path, where: str) -> tuple[list[str | StoredImage], str | None]:
    """(images, video path) of a record, resolved against ``base`` (the data file's folder) and opened once, so
    that a bad file is named now and not mid-training: ``image`` (a path) or ``images`` (a list of paths), not both;
    ``video`` (a path). A missing key or null is no media; a path named like a file of the other kind (an image's
    suffix under ``video``) is an error naming the key to use. An image stored in a ``hf:`` dataset (a
    :class:`~mmgrpo.data.hf_datasets.StoredImage`, checked as it was read) stands where a path would."""
    if rec.get("image") is not None and rec.get("images") is not None:
        raise UserError(f"{where}: give 'image' (one path) or 'images' (a list of paths), not both")
    images = rec.get("images")
    if rec.get("image") is not None:
        images = [rec["image"]]
    elif images is not None and not isinstance(images, list):
        raise UserError(f"{where}: 'images' must be a list of paths, got {quoted(images, 80)}; write "
                        f"'image' for one path")  # fmt: skip
    key = "image" if rec.get("image") is not None else "images"
    for im in images or []:
        if not isinstance(im, str | StoredImage) or isinstance(im, str) and not im.strip():
            raise UserError(f"{where}: '{key}' must hold image paths (non-empty strings), got {quoted(im, 80)}")
    for im in images or []:
        if isinstance(im, str):
            _named_like(im, key, where)
    paths = [im if isinstance(im, StoredImage) else str(base / im) for im in images or []]
    for im in paths:
        if not isinstance(im, StoredImage):
            check_image(im, where)
    video = rec.get("video")
    if video is not None:
        if not isinstance(video, str) or not video.strip():
            raise UserError(f"{where}: 'video' must be a path (a non-empty string), got {quoted(video, 80)}")
        _named_like(video, "video", where)
        video = str(base / video)
        open_video(video, where)
    return paths, video


def load_jsonl(path: str | Path) -> list[Example]:
    """Examples of a JSONL file (the project's records, TRL conversational or LLaVA conversations, see
    docs/data.md); media paths are resolved against the file's directory."""
    return [ex for _, ex in load_jsonl_lines(path)]


def load_jsonl_lines(path: str | Path) -> list[tuple[str, Example]]:
    """(``"PATH line N"``, example) of each example of :func:`load_jsonl`, for errors found later (a method's key)."""
    base = media_base(path)
    out = []
    for where, rec in jsonl_records(path, ("question", "answer"), "synthetic shapes QA", to_qa_record):
        question = check_text(rec, "question", where)
        answer = rec["answer"]
        if not (_scalar(answer) or (isinstance(answer, list) and answer and all(_scalar(a) for a in answer))):
            raise UserError(f"{where}: 'answer' must be text, a number or a list of acceptable answers, got "
                            f"{quoted(answer, 80)}")  # fmt: skip
        options = rec.get("options")
        if options is not None and not (isinstance(options, list) and all(_scalar(o) for o in options)):
            raise UserError(f"{where}: 'options' must be a list of choices ([\"red\", \"blue\"], shown as A) B) ...), "
                            f"got {quoted(options, 80)}")  # fmt: skip
        if options:
            for a in answer if isinstance(answer, list) else [answer]:
                letter = str(a).strip().strip("(). ").upper()
                if len(letter) == 1 and letter.isalpha() and ord(letter) - 65 >= len(options):
                    raise UserError(f"{where}: 'answer' {quoted(a, 20)} names option {letter} but the example has "
                                    f"{len(options)} option(s) (A-{chr(64 + len(options))}); no answer could be "
                                    "graded right: fix the answer or the options")  # fmt: skip
        meta = {k: v for k, v in rec.items() if k not in ("question", "options", "image", "images", "video")}
        meta["images"], video = check_media(rec, base, where)
        if video is not None:
            meta["video"] = video
        out.append((where, ({"question": question, "options": options}, meta)))
    if not out:
        raise UserError(f"{path} holds no examples")
    check_media_keys(path, out)
    return out


def _media_like(value: Any) -> tuple[Any, str] | None:
    """(the first item, 'image' or 'video') of ``value`` (one value, or a list) that is a stored image or a path
    named like an image or video file; None when there is none."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, StoredImage):
            return item, "image"
        suffix = Path(item.strip()).suffix.lower() if isinstance(item, str) else ""
        if suffix in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
            return item, "video" if suffix in VIDEO_SUFFIXES else "image"
    return None


MEDIA_NAME = re.compile(r"im(a)?g|vid|clip|movie|media|frame|picture|photo|pic", re.IGNORECASE)
"""a field name that says it holds the example's media (``image_path``, ``img``, ``image_files``, ``video_file``):
refused when the recipe reads no media; another field naming a picture (``source_file``) is only warned about"""


def check_media_keys(path: str | Path, examples: list[tuple[str, Example]]) -> None:
    """A UserError when no example of the file ``path`` has an image or a video but a field of another name holds
    one (an image stored in a ``hf:`` dataset, or a path named like an image or video file): ``image_path``,
    ``img``, ``image_file`` or TRL's ``image_files`` went to ``meta`` unread, and every example trained on its text
    alone, silently. As the image-to-video recipe refuses a row whose prompt is under another name (its ``_row``);
    the first such field is named, with the keys that are read (:data:`MEDIA_KEYS`). A field whose name does not say
    media (:data:`MEDIA_NAME`: ``source_file``, COCO's ``file_name``) is only warned about: it may name a picture the
    example is not about. A file with media in some examples is not checked: a text-only example among them is on
    purpose."""
    if any(meta["images"] or meta.get("video") for _, (_, meta) in examples):
        return
    for where, (_, meta) in examples:
        for key, value in meta.items():
            found = None if key in ("answer", "images", "video") else _media_like(value)
            if found is None:
                continue
            item, kind = found
            use = "video" if kind == "video" else "images" if isinstance(value, list) else "image"
            held = f"{quoted(item, 80)}, named like a{'n' * (kind == 'image')} {kind} file,"
            what = held if isinstance(item, str) else f"{item!r}, an image,"
            if isinstance(item, str) and not MEDIA_NAME.search(str(key)):
                # a provenance field (source_file, COCO's file_name) may name a picture the example is not about
                warnings.warn(f"{where}: no example of {path} has an image or a video, and the field {key!r} holds "
                              f"{what} which the recipe does not read; if it is the example's picture, name the "
                              f"field {use!r} (media are read from {MEDIA_KEYS}), else the examples train on their "
                              "text alone, as now", stacklevel=2)  # fmt: skip
                return
            raise UserError(
                f"{where}: no example of {path} has an image or a video, but the field {key!r} holds "
                f"{what} which the recipe does not read: every "
                f"example would train on its text alone. Media are read from {MEDIA_KEYS}; name the field {use!r}, "
                "or remove it to train on the text alone"
            )


def example_identity(example: Example, question_suffix: str = "") -> str:
    """What defines an example of a data file, for the stream's fingerprint (:meth:`QAPrompts.fingerprint`): its
    question (with the ``question_suffix`` a recipe appends), options, answer and other fields, and each image or
    video by :func:`~mmgrpo.data.hf_datasets.content_identity` (an image's name and the hash of its bytes, a
    stored image's hash; a video's name, size and the hash of its two ends), so an image replaced by another of the
    same size is seen, and a copy of the dataset in another folder is the same data."""
    prompt, meta = example
    meta = {**meta, "images": [content_identity(im) for im in meta.get("images") or []]}
    if meta.get("video") is not None:
        meta["video"] = content_identity(meta["video"], video=True)
    return json.dumps([prompt, question_suffix, meta], sort_keys=True, default=str)
