"""The wire format of remote rewards, which the client (:mod:`mmgrpo.rewards.remote`), the server
(:mod:`mmgrpo.rewards.server`) and its batcher (:mod:`mmgrpo.rewards.batching`) share.

Wire format (version 1) -- never pickle. ``POST /score`` carries one uncompressed NPZ (``np.savez``; the server
loads it with ``allow_pickle=False``) holding two arrays:

- ``header``: uint8 [bytes] -- UTF-8 JSON ``{"version": 1, "kind", "group_size", "step", "prompts", "meta",
  "dtype", "texts"?}``. ``prompts`` is a JSON list of N prompts (str, or any JSON value), ``meta`` a JSON list of
  N dicts, ``group_size`` G and ``step`` the ``ctx`` fields (N must be a multiple of G).
- ``samples``: by ``kind``:

  - ``image``: uint8 [N, 3, H, W];  ``video``: uint8 [N, F, 3, H, W]. Float samples must lie in [0, 1] and are
    quantised to 8 bits (``round(x * 255)``) -- the reward on the server sees exactly what a saved PNG would
    hold, as float32 ``u8 / 255`` (``dtype: "float"``) or as uint8 when the client sent uint8 (``dtype: "uint8"``).
  - ``array``: any other numeric tensor (e.g. the bandit's chosen arms, LongTensor [N]), sent bit-exact.
  - ``text``: no ``samples`` array; ``header["texts"]`` is a JSON list of N str.

Response: JSON ``{"rewards": [float | null, ...], "columns"?: {...}}`` (N finite fp32 values; null where a row does
not apply: None, or NaN from a reward declaring ``nan_means_not_applicable``); the client refuses any other value
(a string "1.0", a boolean, a list, an object, NaN / Infinity tokens, a number beyond fp32), naming the row. Errors
are JSON ``{"error": message}`` with 400 (bad input), 401 (token), 404 (no such path), 405 (another method than
``POST /score`` / ``GET /health``, with ``Allow``), 411 (no Content-Length), 413 (too large), 500 (the reward
raised, or returned what the trainer refuses locally, by the same function, :func:`mmgrpo.rewards.columns.to_column`,
and with its message: a [G, B] table, a bool, a str, ±inf, a value beyond fp32, an undeclared NaN) or 503 (busy,
shutting down, or its worker stopped). ``GET /health`` returns ``{"status": "ok", "reward": NAME, ...}``, or 503 with
``"status": "failed"`` and the ``error`` once the worker has stopped.
"""

from __future__ import annotations

import io
import json
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmgrpo.core.errors import UserError, listed
from mmgrpo.rewards.columns import to_column
from mmgrpo.rewards.image_utils import nonfinite_rows

WIRE_VERSION = 1
TOKEN_ENV = "MMGRPO_REWARD_TOKEN"
CONTENT_TYPE = "application/x-mmgrpo-npz"
KINDS = ("image", "video", "text", "array")


@dataclass
class WireRequest:
    """One decoded ``/score`` request: N rows of one kind.

    ``samples`` is uint8 [N, 3, H, W] (image), uint8 [N, F, 3, H, W] (video), a numeric array [N, ...] (array),
    or a list of N str (text).
    """

    kind: str
    samples: Any
    prompts: list[Any]
    meta: list[dict]
    group_size: int  # G
    step: int = 0
    dtype: str = "float"  # what the client held for image/video: "float" (in [0, 1]) or "uint8"
    extra: dict = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return len(self.samples)

    def batch_key(self) -> tuple:
        """Requests with the same key can be concatenated into one reward call (same kind, shapes, G, step)."""
        if self.kind == "text":
            return (self.kind, self.group_size, self.step)
        return (self.kind, self.group_size, self.step, self.dtype, str(self.samples.dtype), self.samples.shape[1:])


# ---------------------------------------------------------------------------------------------- client side


def quantise_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 ``round(x * 255)``, as a saved PNG would hold them. Shape unchanged."""
    return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def _sample_kind(x: torch.Tensor) -> str:
    """image [N, 3, H, W] or video [N, F, 3, H, W] when float/uint8 with 3 channels; otherwise array."""
    if x.dtype == torch.uint8 or x.is_floating_point():
        if x.ndim == 4 and x.shape[1] == 3:
            return "image"
        if x.ndim == 5 and x.shape[2] == 3:
            return "video"
    return "array"


def _as_tensor(samples: Any) -> torch.Tensor | list[str]:
    """Samples as one tensor [N, ...] or a list of N str; stacks a list of equal-shape tensors/arrays."""
    if isinstance(samples, torch.Tensor):
        return samples
    if isinstance(samples, np.ndarray):
        return torch.from_numpy(samples)
    if isinstance(samples, (list, tuple)):
        if all(isinstance(s, str) for s in samples):
            return list(samples)
        if all(isinstance(s, (torch.Tensor, np.ndarray)) for s in samples):
            parts = [torch.as_tensor(s) for s in samples]
            if len({tuple(p.shape) for p in parts}) == 1:
                return torch.stack(parts)
    kinds = sorted({type(s).__name__ for s in samples}) if isinstance(samples, (list, tuple)) else []
    raise UserError(
        f"remote reward: cannot send samples of type {type(samples).__name__}{kinds or ''}; send a tensor "
        "[N, 3, H, W] / [N, F, 3, H, W] (images/videos in [0, 1] or uint8), a numeric tensor [N, ...], "
        "or a list of N str"
    )


def _json_default(obj: Any) -> Any:
    """0-d tensors and numpy scalars become Python numbers; everything else is not JSON."""
    if isinstance(obj, (torch.Tensor, np.ndarray, np.generic)) and getattr(obj, "ndim", 0) == 0:
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _check_json(values: list[Any], what: str) -> None:
    """Raise a UserError naming the row (and meta key) whose value cannot be sent as JSON."""
    for i, v in enumerate(values):
        if what == "meta" and not isinstance(v, dict):
            raise UserError(f"remote reward: meta[{i}] is a {type(v).__name__}; meta must be a list of dicts")
        items = v.items() if what == "meta" else [(None, v)]
        for key, value in items:
            try:
                json.dumps(value, default=_json_default, allow_nan=True)
            except (TypeError, ValueError) as e:
                where = f"meta[{i}][{key!r}]" if key is not None else f"prompts[{i}]"
                raise UserError(
                    f"remote reward: {where} is a {type(value).__name__} that cannot be sent as JSON ({e}); "
                    "convert it to numbers/str/lists or drop it from meta before scoring remotely"
                ) from e


def encode_request(samples: Any, prompts: list[Any], meta: list[dict], group_size: int, step: int = 0) -> bytes:
    """Encode N rows as one wire-format NPZ body (see the module docstring). Raises UserError on bad input."""
    data = _as_tensor(samples)
    n = len(data)
    meta = list(meta) if meta is not None else [{} for _ in range(n)]
    if len(prompts) != n or len(meta) != n:
        raise UserError(f"remote reward: {n} samples but {len(prompts)} prompts and {len(meta)} meta entries")
    if group_size < 1 or n % group_size:
        raise UserError(f"remote reward: {n} rows is not a multiple of group_size={group_size}")
    _check_json(list(prompts), "prompts")
    _check_json(meta, "meta")
    header: dict[str, Any] = {"version": WIRE_VERSION, "group_size": int(group_size), "step": int(step)}
    header.update(prompts=list(prompts), meta=meta)
    arrays: dict[str, np.ndarray] = {}
    if isinstance(data, list):
        header.update(kind="text", dtype="str", texts=data)
    else:
        kind = _sample_kind(data)
        header.update(kind=kind, dtype="uint8" if data.dtype == torch.uint8 else "float")
        if kind in ("image", "video") and data.is_floating_point():
            # checked before the range: NaN compares False with 0 and 1, so a NaN pixel would pass the range check
            # and be quantised to 0 -- a diverged sample scored as a black image, where locally its reward is NaN
            # (array samples go bit-exact, so the reward on the server sees their NaN as it would locally)
            bad_rows = nonfinite_rows(data)
            if bad_rows:
                raise UserError(
                    f"remote reward: float {kind} samples hold non-finite values (NaN/inf) at rows {listed(bad_rows)} "
                    f"({len(bad_rows)} of {n} rows); a diverged sample cannot be sent as an 8-bit image -- find why "
                    "the sampler produced it"
                )
            lo, hi = (float(data.min()), float(data.max())) if n else (0.0, 1.0)
            if lo < 0 or hi > 1:
                raise UserError(
                    f"remote reward: float {kind} samples must lie in [0, 1] (they are sent as 8-bit images); "
                    f"got values in [{lo:.3g}, {hi:.3g}] -- rescale e.g. (x + 1) / 2 first"
                )
            data = quantise_uint8(data)
        data = data.detach().cpu()
        if data.dtype == torch.bfloat16:
            data = data.float()
        arrays["samples"] = data.numpy()
    text = json.dumps(header, default=_json_default, allow_nan=True).encode("utf-8")
    arrays["header"] = np.frombuffer(text, dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- server side


def _bad(msg: str) -> ValueError:
    return ValueError(f"bad request: {msg}")


NPZ_MEMBERS = ("header.npy", "samples.npy")
"""the only members a wire request holds: any other is refused before parsing (100k tiny members cost seconds)"""


def _check_npy_size(zf: Any, info: Any) -> None:
    """Refuse a member whose ``.npy`` header claims more (or fewer) bytes than it holds, before numpy allocates
    the claimed shape (a 100-byte member may claim terabytes)."""
    from numpy.lib import format as npy

    try:
        with zf.open(info) as f:
            if f.read(len(npy.MAGIC_PREFIX)) != npy.MAGIC_PREFIX:
                return  # not an .npy member: numpy hands it back as bytes and the caller refuses it by name
            f.seek(0)
            version = npy.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = npy.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = npy.read_array_header_2_0(f)
            else:
                raise ValueError(f".npy format version {version} (expected 1.0 or 2.0, as np.savez writes)")
            header_bytes = f.tell()
    except Exception as e:  # noqa: BLE001  a malformed header is the client's
        raise _bad(f"NPZ member {info.filename!r} has a bad .npy header ({type(e).__name__}: {e})") from e
    claimed = math.prod(shape) * dtype.itemsize
    if dtype.hasobject or claimed != info.file_size - header_bytes:
        raise _bad(
            f"NPZ member {info.filename!r} claims shape {list(shape)} of {dtype} ({claimed} bytes) but holds "
            f"{info.file_size - header_bytes} bytes"
        )


NPY_HEADERS = threading.Lock()
"""held while a request's NPZ is read: numpy parses each ``.npy`` header with ``ast.literal_eval``, and CPython
3.11 builds AST objects with one interpreter-wide recursion counter, so two server threads parsing at once now and
then failed with ``SystemError: AST constructor recursion depth mismatch`` (cpython gh-106905; seen once in 1000
concurrent requests of tests/rewards/test_remote.py, a refused request that stops the client's run)"""


def _load_npz(body: bytes, max_bytes: int) -> dict[str, np.ndarray]:
    """The NPZ members of ``body`` (no pickle); refuses members whose uncompressed size exceeds ``max_bytes``,
    members other than ``NPZ_MEMBERS`` (before numpy parses any: parsing is the cost of a many-member archive)
    and members whose header claims more bytes than they hold. One request at a time (:data:`NPY_HEADERS`)."""
    with NPY_HEADERS:
        return _read_npz(body, max_bytes)


def _read_npz(body: bytes, max_bytes: int) -> dict[str, np.ndarray]:
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(body)) as zf:
            infos = zf.infolist()
            names = [info.filename for info in infos]
            extra = [name for name in names if name not in NPZ_MEMBERS]
            if extra:
                raise _bad(
                    f"NPZ member {extra[0][:64]!r} is not expected; a request holds only {', '.join(NPZ_MEMBERS)} "
                    f"({len(names)} members sent)"
                )
            if len(set(names)) != len(names):
                raise _bad(f"NPZ holds a member twice ({names})")
            total = sum(info.file_size for info in infos)
            if total > max_bytes:
                raise _bad(f"NPZ expands to {total} bytes, over the limit of {max_bytes}")
            for info in infos:
                _check_npy_size(zf, info)
    except zipfile.BadZipFile as e:
        raise _bad(f"body is not an NPZ archive ({e})") from e
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files if k + ".npy" in NPZ_MEMBERS}
    except Exception as e:  # noqa: BLE001  any decoding failure is the client's
        raise _bad(f"cannot read NPZ ({type(e).__name__}: {e})") from e
    for k, v in arrays.items():  # numpy hands back a member that is not an .npy array as raw bytes
        if not isinstance(v, np.ndarray):
            raise _bad(f"NPZ member {k[:64]!r} is not a numpy array")
    return arrays


def _check_samples(kind: str, samples: Any, n: int) -> None:
    if samples is None:
        raise _bad(f"kind {kind!r} needs a 'samples' array")
    if samples.dtype.kind not in "biuf":
        raise _bad(f"samples dtype {samples.dtype} is not numeric")
    if kind == "image" and not (samples.ndim == 4 and samples.shape[1] == 3 and samples.dtype == np.uint8):
        raise _bad(f"image samples must be uint8 [N, 3, H, W]; got {samples.dtype} {list(samples.shape)}")
    if kind == "video" and not (samples.ndim == 5 and samples.shape[2] == 3 and samples.dtype == np.uint8):
        raise _bad(f"video samples must be uint8 [N, F, 3, H, W]; got {samples.dtype} {list(samples.shape)}")
    if samples.ndim == 0 or samples.shape[0] != n:
        raise _bad(f"{n} prompts but samples of shape {list(samples.shape)}")
    if kind in ("image", "video") and 0 in samples.shape[1:]:
        raise _bad(f"{kind} samples of shape {list(samples.shape)} have an empty dimension")


def decode_request(body: bytes, max_bytes: int = 64 << 20) -> WireRequest:
    """Decode and validate one wire-format body. Raises ValueError("bad request: ...") on any inconsistency."""
    arrays = _load_npz(body, max_bytes)
    if "header" not in arrays or arrays["header"].dtype != np.uint8 or arrays["header"].ndim != 1:
        raise _bad("missing 'header' (uint8 JSON bytes)")
    try:
        header = json.loads(arrays["header"].tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(f"header is not UTF-8 JSON ({e})") from e
    except RecursionError as e:  # "[[[[..." nested past Python's recursion limit
        raise _bad("header JSON is nested too deeply") from e
    if not isinstance(header, dict) or header.get("version") != WIRE_VERSION:
        raise _bad(f"header version must be {WIRE_VERSION}; update the client or the server")
    kind, prompts, meta = header.get("kind"), header.get("prompts"), header.get("meta")
    g, step = header.get("group_size"), header.get("step", 0)
    if kind not in KINDS:
        raise _bad(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if not isinstance(prompts, list) or not isinstance(meta, list) or len(prompts) != len(meta):
        raise _bad("'prompts' and 'meta' must be lists of the same length")
    if not all(isinstance(m, dict) for m in meta):
        raise _bad("'meta' must be a list of dicts")
    n = len(prompts)
    if not isinstance(g, int) or g < 1 or n % g:
        raise _bad(f"group_size={g!r} must be a positive int dividing the {n} rows")
    if not isinstance(step, int):
        raise _bad(f"step={step!r} must be an int")
    dtype = header.get("dtype", "float")
    if kind == "text":
        samples = header.get("texts")
        if not isinstance(samples, list) or len(samples) != n or not all(isinstance(s, str) for s in samples):
            raise _bad(f"text samples must be a list of {n} str")
    else:
        samples = arrays.get("samples")
        _check_samples(kind, samples, n)
        if not samples.dtype.isnative:  # a big-endian client's array: torch takes native byte order only
            samples = samples.astype(samples.dtype.newbyteorder("="))
        if kind in ("image", "video") and dtype not in ("float", "uint8"):
            raise _bad(f"dtype {dtype!r} must be 'float' or 'uint8'")
    return WireRequest(kind=kind, samples=samples, prompts=prompts, meta=meta, group_size=g, step=step, dtype=dtype)


def samples_for_reward(kind: str, samples: Any, dtype: str) -> Any:
    """What the reward callable receives: float32 ``u8 / 255`` images/videos (or uint8 when the client sent
    uint8), a tensor for arrays, the list of str for text."""
    if kind == "text":
        return list(samples)
    x = torch.from_numpy(np.ascontiguousarray(samples))
    if kind in ("image", "video") and dtype == "float":
        return x.float() / 255.0
    return x


def rewards_to_list(out: Any, n: int, nan_ok: bool = False, name: str = "reward") -> list[float | None]:
    """A reward's output (Tensor [N] or list of number | None) as N finite floats or None; ValueError otherwise.

    The trainer's own check of a local reward's column (:func:`mmgrpo.rewards.columns.to_column`, the same
    function), so a served reward is refused for what the trainer would refuse, with the same message: a [G, B]
    table, bool / complex / str values, ±inf, a value too large for fp32 (1e39), NaN unless the reward declares
    ``nan_means_not_applicable`` (``nan_ok``), when it goes out as None ("does not apply"). The reply is then plain
    JSON (no NaN tokens), and a value the trainer would stop on is an error here, not a number there. ``name``:
    the reward's, for the message.
    """
    try:
        column = to_column(name, out, n, nan_ok)  # fp32 [N], NaN where a row does not apply
    except UserError as e:
        raise ValueError(str(e)) from None
    return [None if v != v else v for v in column.tolist()]


# ---------------------------------------------------------------------------------------------- the client
