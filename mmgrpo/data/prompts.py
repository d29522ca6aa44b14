"""Text prompt sources: prompt files (.txt, .jsonl, .csv), Hugging Face datasets, or the built-in shapes world, and a
seeded, layout-independent stream. The schemas are documented in docs/data.md."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from mmgrpo.core.errors import UserError, quoted
from mmgrpo.core.files import read_utf8
from mmgrpo.core.types import PromptBatch
from mmgrpo.data.hf_datasets import StoredImage, dataset_rows, hf_spec, open_dataset, opened, saved_dataset
from mmgrpo.data.records import csv_rows, json_list_rows, jsonl_rows, text_lines
from mmgrpo.data.shapes import split_prompts

PROMPT_SUFFIXES = (".txt", ".jsonl", ".json", ".csv")


class Prompt(str):
    """A prompt text that carries the other fields of its row (``meta``) into the batch, for rewards to read."""

    meta: dict[str, Any]

    def __new__(cls, text: str, meta: dict[str, Any] | None = None) -> Prompt:
        obj = super().__new__(cls, text)
        obj.meta = dict(meta or {})
        return obj


def read_prompts(spec: str | list[str], split: str, seed: int) -> list[str]:
    """The prompts of ``spec``: '' (none), 'shapes', ``hf:NAME[@CONFIG][:SPLIT[:COLUMN]]``, a .txt / .jsonl / .json
    / .csv file, or the prompts themselves, a list of texts (``prompts: [a red circle, two blue squares]``, or from
    Python ``data.options.prompts=[...]``)."""
    if isinstance(spec, list):
        bad = [i for i, p in enumerate(spec) if not isinstance(p, str) or not p.strip()]
        if bad:
            raise UserError(f"the prompt list's item {bad[0]} is {spec[bad[0]]!r}; every item of a list of prompts "
                            "is a non-empty text")  # fmt: skip
        return [p.strip() for p in spec]
    if spec == "":
        return []
    if spec == "shapes":
        train, heldout = split_prompts(seed=seed)
        return train if split == "train" else heldout
    if spec.startswith("hf:"):
        return hf_prompts(spec)
    p = Path(spec)
    if p.is_dir():
        files = sorted(x.name for x in p.iterdir() if x.suffix.lower() in PROMPT_SUFFIXES)[:10]
        if saved_dataset(p):
            raise UserError(f"prompt file '{spec}' is a folder holding a Hugging Face dataset (save_to_disk); "
                            f"write hf:{spec} to read it")  # fmt: skip
        raise UserError(
            f"prompt file '{spec}' is a directory; name one file in it"
            + (f" ({', '.join(files)})" if files else f" (a {' / '.join(PROMPT_SUFFIXES)} file)")
        )
    if not p.is_file():
        raise UserError(
            f"prompt file '{spec}' not found (use 'shapes' for the built-in world, or hf:NAME for a dataset)"
        )
    suffix = p.suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        raise UserError(
            f"prompt file '{spec}' must end in .txt (one prompt a line), .jsonl, .json or .csv (a 'prompt' field); "
            f"got {suffix or 'no extension'}. Rename it, or convert it to one of these (docs/data.md)"
        )
    text = read_utf8(p, "prompt file")
    readers = {".txt": _txt_prompts, ".jsonl": _jsonl_prompts, ".json": _json_prompts, ".csv": _csv_prompts}
    prompts = readers[suffix](text, spec)
    if not prompts:
        raise UserError(f"prompt file '{spec}' holds no prompts; put one prompt per line (docs/data.md)")
    return prompts


def _txt_prompts(text: str, spec: str) -> list[str]:
    """Every non-empty line, stripped; lines starting with '#' are comments (dropped, with one warning)."""
    lines = [x for x in text_lines(text) if x.strip()]
    prompts = [x.strip() for x in lines if not x.startswith("#")]
    if lines and not prompts:
        raise UserError(f"prompt file '{spec}': all {len(lines)} non-empty line(s) start with '#', so they are "
                        "comments and there is no prompt; remove the '#', or use a .jsonl / .csv file for prompts "
                        "that start with '#'")  # fmt: skip
    if len(prompts) < len(lines):
        warnings.warn(
            f"prompt file '{spec}': {len(lines) - len(prompts)} line(s) starting with '#' are comments and were "
            "skipped; use a .jsonl or .csv file for prompts that start with '#'",
            stacklevel=3,
        )
    return prompts


def _row_prompt(row: Any, where: str) -> Prompt:
    if isinstance(row, str):  # a .json list of strings, or a JSONL line that is one string: a prompt without meta
        row = {"prompt": row}
    if not isinstance(row, dict) or "prompt" not in row:
        got = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise UserError(f"{where}: each row needs a 'prompt' field; got {quoted(got)}. Name the column 'prompt'")
    text = row["prompt"]
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: 'prompt' must be a non-empty string, got {quoted(text)}")
    return Prompt(text.strip(), {k: v for k, v in row.items() if k != "prompt"})


def _jsonl_prompts(text: str, spec: str) -> list[str]:
    return [_row_prompt(row, where) for where, row in jsonl_rows(text, f"prompt file '{spec}'")]


def _json_prompts(text: str, spec: str) -> list[str]:
    """A .json file: one list of {prompt, ...} objects."""
    return [_row_prompt(row, where) for where, row in json_list_rows(text, f"prompt file '{spec}'")]


def _csv_prompts(text: str, spec: str) -> list[str]:
    header, rows = csv_rows(text, f"prompt file '{spec}'")
    if header and "prompt" not in header:
        raise UserError(
            f"prompt file '{spec}': the header {quoted(header)} has no 'prompt' column; "
            "name the prompt column 'prompt' (other columns become each prompt's meta)"
        )
    return [_row_prompt(row, where) for where, row in rows]


def hf_prompts(spec: str) -> list[str]:
    """Prompts of a Hugging Face dataset: ``hf:NAME_OR_PATH[@CONFIG][:SPLIT[:COLUMN]]`` (split 'train', column
    'prompt'). The rows are read as the VLM loader reads them (:func:`~mmgrpo.data.hf_datasets.dataset_rows`): a
    NaN is refused as a JSON file's is (it would reach a reward), and a stored image is checked at load (a corrupt
    one named by its row) and kept encoded in the prompt's meta (:class:`StoredImage`; iterating the dataset held
    every image decoded, 786 kB a 512-pixel image), decoded again in each batch (:meth:`PromptList.get`)."""
    ds = open_dataset(spec, f"prompts={quoted(spec)}")
    _, split, column, _, _ = hf_spec(spec)
    column = column or "prompt"
    if column not in ds.column_names:
        raise UserError(
            f"prompts={quoted(spec)}: split {split!r} has no column {column!r} (columns: {quoted(ds.column_names)}); "
            "name it as hf:NAME:SPLIT:COLUMN"
        )
    out = []
    for where, row in dataset_rows(ds, spec):
        row["prompt"] = row.pop(column)
        out.append(_row_prompt(row, where))
    return out


class PromptList:
    """Stream position i -> a prompt; a fresh seeded permutation of the list for each pass.

    A prompt's ``meta`` (the other fields of its row, see :class:`Prompt`) goes into the batch's ``meta``, an image
    stored in a dataset (:class:`StoredImage`, alone or in a list) decoded to a PIL image, as rewards read it. An
    epoch's permutation is computed once (the last two are kept): drawn for every index, a step of 64 prompts cost
    0.8 s at a million prompts.
    """

    def __init__(self, prompts: list[str], seed: int):
        if not prompts:
            raise UserError("no training prompts")
        self.prompts, self.seed = prompts, seed
        self._orders: dict[int, np.ndarray] = {}
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        """P: the prompts of one pass (stream positions 0 .. P - 1 are each of them once)."""
        return len(self.prompts)

    def fingerprint(self) -> str:
        """SHA-256 of the prompts' identities in order (:meth:`identity`): a checkpoint keeps it, so that a resume
        notices an edited prompt file (the stream positions already trained would then name other prompts)."""
        if self._fingerprint is None:  # the list does not change during a run; every checkpoint asks
            h = hashlib.sha256()
            for p in self.prompts:
                h.update(self.identity(p).encode("utf-8", "surrogatepass") + b"\0")
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    fingerprint_scheme = 1
    """what :meth:`fingerprint` hashes, numbered: a checkpoint keeps it beside the fingerprint, and a resume compares
    fingerprints of the same scheme only (a subclass that changes :meth:`identity` gives a new number)"""

    def identity(self, prompt: str) -> str:
        """What defines a prompt for :meth:`fingerprint`: its text (a subclass whose prompts carry a condition, such
        as image-to-video's first frame, adds it)."""
        return str(prompt)

    def order(self, epoch: int) -> np.ndarray:
        """The seeded permutation of the prompts for pass ``epoch`` (computed once; the last two are kept)."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                del self._orders[min(self._orders)]
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))
        return self._orders[epoch]

    def get(self, indices: list[int]) -> PromptBatch:
        P = len(self.prompts)
        out = []
        for i in indices:
            epoch, pos = divmod(i, P)
            out.append(self.prompts[int(self.order(epoch)[pos])])
        return PromptBatch(prompts=out, meta=[decoded_meta(p) for p in out])


def decoded_meta(prompt: Any) -> dict[str, Any]:
    """A copy of a prompt's meta (the other fields of its row; {} for a plain str) with its stored images (alone or
    in a list) decoded to PIL images, as training, evaluation and ``mmgrpo sample`` hand it to samplers and rewards."""
    out = dict(getattr(prompt, "meta", None) or {})
    for k, v in out.items():
        if isinstance(v, StoredImage):
            out[k] = v.open()
        elif isinstance(v, list) and any(isinstance(x, StoredImage) for x in v):
            out[k] = opened(v)
    return out
