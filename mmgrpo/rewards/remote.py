"""Remote rewards: the client of ``mmgrpo serve-reward`` and the wire format both ends share.

A heavy reward model (a VLM judge, an aesthetic scorer) can live in another process or on another GPU.
``mmgrpo serve-reward NAME --port P`` (:mod:`mmgrpo.rewards.server`) serves any registered reward over HTTP;
:func:`remote` is an ordinary reward callable that sends the rows there and returns the server's rewards::

    fn = remote("http://127.0.0.1:8090", token=None, timeout=60, retries=2)
    r = fn(samples, prompts, meta, ctx)        # Tensor[N] float32, or list[float | None] when a row has None

In a training config (the server's address and the client's settings are the reward's ``options``)::

    rewards:
      - name: remote
        options: {url: "http://gpu-box:8090", timeout: 120, retries: 2}

The options are checked when the config loads (``remote.check``): ``url`` http:// or https://, ``timeout`` in
(0, 24 h] seconds, ``retries`` in 0..100, ``backoff`` in [0, 1 h] seconds. The token may come from the environment
variable ``MMGRPO_REWARD_TOKEN`` instead of the config, so it is not written into ``runs/<name>/config.yaml``; it
goes to the host of ``url`` only: a redirect (3xx) is an error naming its ``Location``, never followed.

What is re-sent: a failed connection (refused, reset) and a 502 / 503 / 504, ``retries`` times with a jittered
exponential ``backoff``; nothing else. A 500 (the reward failed on these rows), a 4xx, a timeout once the request is
sent, and a 200 that is not this JSON (another service on that port) are errors at once, each saying which.

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

Remote scoring cannot hand the reward ``ctx.policy`` (rewards that re-ask the policy must run locally), and
stateful rewards keep their state on the server.
"""

from __future__ import annotations

import http.client
import io
import json
import math
import os
import random
import reprlib
import socket
import struct
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import numpy as np
import torch

from mmgrpo.core.errors import UserError, bad_option, listed, quoted
from mmgrpo.rewards.columns import FLOAT32_MAX, to_column
from mmgrpo.rewards.image_utils import nonfinite_rows
from mmgrpo.rewards.registry import register

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


def _load_npz(body: bytes, max_bytes: int) -> dict[str, np.ndarray]:
    """The NPZ members of ``body`` (no pickle); refuses members whose uncompressed size exceeds ``max_bytes``,
    members other than ``NPZ_MEMBERS`` (before numpy parses any: parsing is the cost of a many-member archive)
    and members whose header claims more bytes than they hold."""
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


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(err.read().decode("utf-8")).get("error", err.reason))
    except (ValueError, AttributeError, OSError):
        return str(err.reason)


MAX_BUSY_RETRIES = 60
"""how often the client waits out a busy server's 503 + Retry-After before giving up"""


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    """Seconds a 503 asks the client to wait (``Retry-After``, capped at 10 s), or None without the header."""
    raw = err.headers.get("Retry-After") if err.headers is not None else None
    try:
        return min(max(float(raw), 0.0), 10.0) if raw is not None else None
    except ValueError:
        return None


def _refusal_hint(code: int, msg: str) -> str:
    """How to fix a 4xx, unless the server's message already says it (its 413 names --max-request-mb)."""
    if code == 401:
        return "; pass the server's token (remote option 'token' or the MMGRPO_REWARD_TOKEN variable)"
    if code == 413 and "--max-request-mb" not in msg:
        return "; send fewer rows per call or restart the server with a larger --max-request-mb"
    return ""


class _GiveUpConnection(http.client.HTTPConnection):
    """An HTTP connection that resets itself when the answer does not come within its timeout.

    A plain close sends the server an end of stream, which a client that only closed its sending side after the
    request also sends, and which the server answers; a reset (SO_LINGER 0, then close) tells it that nobody will
    read the answer, so it drops the request unscored if it is still queued (:mod:`mmgrpo.rewards.server`)."""

    def getresponse(self) -> http.client.HTTPResponse:
        try:
            return super().getresponse()
        except TimeoutError:
            if self.sock is not None:  # urllib closes the connection next: with a reset, not a FIN
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raise


class _GiveUpHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_GiveUpConnection, req)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Follows no redirect: a 3xx reaches :func:`post_score` as an HTTPError, which refuses it naming the Location.

    urllib's own handler re-sends the request (as a GET) with every header but the body's, the
    ``Authorization: Bearer`` token included, to whatever host the ``Location`` names, and the trainer then trained
    on that host's answer: anyone on the path of a plain-http request, or a misconfigured reward host, got the
    token and chose the rewards."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201  (urllib's signature)
        return None


RETRIED_CODES = (502, 503, 504, 520, 521, 522, 523, 524)
"""the HTTP errors re-sent: a proxy without its server (502, 504; Cloudflare's 520-524 for an origin that is down,
refusing, unreachable or slow) or a server busy / restarting (503). A 500 is the
reward failing on these rows (it raised, or returned what the trainer refuses): re-sending it would score the same
failing rows again (an expensive judge scored each failing batch 3 times), so it is an error at once."""


def _said(errors: list[str]) -> str:
    """Each failed attempt's reason, consecutive repeats folded: ``attempt 1: HTTP 503: ...; attempts 2-3: ...``."""
    parts, i = [], 0
    while i < len(errors):
        j = i
        while j + 1 < len(errors) and errors[j + 1] == errors[i]:
            j += 1
        parts.append(f"attempt {i + 1}: {errors[i]}" if i == j else f"attempts {i + 1}-{j + 1}: {errors[i]}")
        i = j + 1
    return "; ".join(parts)


def _reward_json(url: str, raw: bytes) -> dict:
    """A 200 answer's body as mmgrpo's reward JSON (an object holding a ``rewards`` list); a UserError saying the
    server answered something else (another service on that port, a proxy's page), which is not retried."""
    try:
        reply = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        reply, why = None, f"{type(e).__name__}: {str(e)[:100]}"
    else:
        why = "no 'rewards' list in it"
    if isinstance(reply, dict) and isinstance(reply.get("rewards"), list):
        return reply
    raise UserError(
        f"reward server at {url} answered HTTP 200 with something that is not mmgrpo's reward JSON ({why}; it "
        f"begins {quoted(raw[:80], 120)}); is another service listening there? `mmgrpo serve-reward` answers "
        "{\"rewards\": [...]}: check the remote reward's 'url' option (not retried)"
    )


def _refuse_unless_retried(url: str, e: urllib.error.HTTPError, msg: str) -> None:
    """The UserError of an HTTP error that is not re-sent: a redirect (never followed), a 4xx (refused), a 5xx
    outside ``RETRIED_CODES`` (the reward failed on these rows); returns for one that is re-sent."""
    if 300 <= e.code < 400:
        location = e.headers.get("Location") if e.headers is not None else None
        raise UserError(
            f"reward server at {url} answered HTTP {e.code}, a redirect to {quoted(location, 200)}; the remote "
            "reward follows no redirect (its token would go to that host, and the rewards would come from it). "
            "Set the remote reward's 'url' option to the server that scores"
        ) from e
    if e.code < 500:
        raise UserError(
            f"reward server at {url} refused the request: HTTP {e.code}: {msg}{_refusal_hint(e.code, msg)}"
        ) from e
    if e.code not in RETRIED_CODES:
        raise UserError(
            f"reward server at {url} failed: HTTP {e.code}: {msg}; not re-sent (the reward would score the same "
            "rows again); see the server's log"
        ) from e


def post_score(url: str, body: bytes, token: str | None, timeout: float, retries: int, backoff: float) -> dict:
    """POST ``body`` to ``url/score`` and return the answer's JSON; retries connection-level failures and the
    HTTP errors of ``RETRIED_CODES`` (502, 503, 504, a proxy's 520-524) with exponential backoff, nothing else.

    A busy server (503 with ``Retry-After``: its connection cap is reached) is waited for as it asks, up to
    ``MAX_BUSY_RETRIES`` times, without using up ``retries``. After ``retries + 1`` failed attempts raises a
    UserError naming the URL, every attempt's reason (a 503 is not hidden by a later "connection refused") and how
    to start the server. At once, without a retry: a 4xx (refused: the token, the size), a 500 or other 5xx (the
    reward failed on these rows: re-sending scores them again), a 3xx (never followed: :class:`_NoRedirects`; the
    token goes to the host of ``url`` only) and a 200 that is not mmgrpo's reward JSON.

    The backoff is jittered (x0.5 to x1.5): clients whose requests failed together (one merged batch) would
    otherwise retry in step and be merged again. A read timeout after the request was sent is not retried: the
    server has the request and is still scoring it, so a retry would score it again behind the first copy and
    time out the same way; the UserError says to raise ``timeout`` instead. The connection given up on is reset
    (:class:`_GiveUpConnection`), so the server drops the request unscored if it has not started it.
    """
    # urllib's own handlers (proxies too), http:// by ours, redirects refused
    opener = urllib.request.build_opener(_GiveUpHandler, _NoRedirects)
    endpoint = url.rstrip("/") + "/score"
    headers = {"Content-Type": CONTENT_TYPE}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    errors: list[str] = []  # why each attempt failed
    server_failed, busy, attempt = False, 0, 0
    attempts = max(0, int(retries)) + 1
    while attempt < attempts:
        req = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
        try:
            with opener.open(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            msg = _error_message(e)
            wait = _retry_after(e)
            if e.code == 503 and wait is not None and busy < MAX_BUSY_RETRIES:  # busy: wait as told, then again
                busy += 1
                time.sleep(wait)
                continue
            _refuse_unless_retried(url, e, msg)
            errors.append(f"HTTP {e.code}: {msg}")
            server_failed = True
        except TimeoutError as e:  # raw from getresponse/read: sent, unanswered (connect timeouts are URLError)
            raise UserError(
                f"reward server at {url} did not answer within timeout={timeout}s (the request of "
                f"{len(body) / 2**20:.2f} MB was sent; the reward is slower than that). Raise the remote reward's "
                "'timeout' option, send fewer rows per call, or make the reward faster; not retried, as the server "
                "may still be scoring it"
            ) from e
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, cut short
            errors.append(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
        except ValueError as e:  # http.client's InvalidURL (a port that is not a number, ...)
            raise UserError(f"remote reward: url={url!r} cannot be used ({e})") from e
        else:
            return _reward_json(url, raw)
        attempt += 1
        if attempt < attempts:
            time.sleep(min(backoff * 2 ** min(attempt - 1, 64), MAX_BACKOFF_S) * random.uniform(0.5, 1.5))
    size = f"{len(body) / 2**20:.2f} MB"
    if server_failed:
        raise UserError(
            f"reward server at {url} failed after {attempts} attempts ({_said(errors)}); see the server's log"
        )
    raise UserError(
        f"reward server at {url} is not reachable after {attempts} attempts within timeout={timeout}s "
        f"({_said(errors)}; request of {size}). Start it with `mmgrpo serve-reward NAME --port P` "
        "(NAME: the reward to serve) or fix the reward's 'url' option"
    )


def _json_kind(v: Any) -> str:
    return {str: "a string", bool: "a boolean", list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def answered_values(url: str, values: list[Any]) -> list[float | None]:
    """The ``rewards`` a server answered, as floats (None for null); a UserError naming the first row whose value
    is not a JSON number or null (a string "1.0", a boolean, a list, an object, NaN / Infinity tokens) or is too
    large for fp32, and saying the server sent it. ``mmgrpo serve-reward`` never sends such values: another
    service, or a different version, did."""
    out: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        what = None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            what = f"{_json_kind(v)} {reprlib.repr(v)}, not a JSON number or null"
        else:
            try:
                f = float(v)
            except OverflowError:  # an int of hundreds of digits
                f = math.inf
            if isinstance(v, float) and not math.isfinite(v):
                what = f"{v}, which is not a JSON number (a row that does not apply is null)"
            elif not abs(f) <= FLOAT32_MAX:
                what = f"{reprlib.repr(v)}, too large for fp32 (rewards are fp32, at most {FLOAT32_MAX:.3g})"
        if what is not None:
            raise UserError(
                f"reward server at {url} sent {what} as row {i}'s reward; mmgrpo's reward JSON holds a number or "
                "null per row: is the server `mmgrpo serve-reward` of this version?"
            )
        out.append(f)
    return out


MAX_TIMEOUT_S = 24 * 3600.0
"""the longest remote ``timeout``: a reward call of more than a day is a hung server (1e300 overflowed the clock)"""
MAX_BACKOFF_S = 3600.0
"""the longest remote ``backoff`` (and the longest single wait between retries)"""
MAX_RETRIES = 100
"""the most remote ``retries``"""


def check_remote_options(
    prefix: str, url: Any = None, timeout: Any = 60, retries: Any = 2, backoff: Any = 0.5, **_: Any
) -> None:
    """The remote reward's options, at config load (``remote.check``) and when it is built: a UserError naming
    ``{prefix}.<option>`` for a url that is not http(s) or a timeout / retries / backoff out of its range."""
    if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        raise bad_option(f"{prefix}.url", url, "give the server's address, starting with http:// or https://, e.g. "
                         "http://127.0.0.1:8090")  # fmt: skip
    if not (isinstance(timeout, Real) and 0 < timeout <= MAX_TIMEOUT_S):
        raise bad_option(f"{prefix}.timeout", timeout, f"give the seconds to wait for an answer, > 0 and at most "
                         f"{MAX_TIMEOUT_S:g} (24 hours; default 60)")  # fmt: skip
    if not (isinstance(retries, int) and 0 <= retries <= MAX_RETRIES):
        raise bad_option(f"{prefix}.retries", retries, f"give how often to re-send after a connection failure or "
                         f"a 502/503/504 (or a proxy's 520-524), in 0..{MAX_RETRIES} (default 2)")  # fmt: skip
    if not (isinstance(backoff, Real) and 0 <= backoff <= MAX_BACKOFF_S):
        raise bad_option(f"{prefix}.backoff", backoff, f"give the seconds before the first retry (doubled at each "
                         f"next one), in [0, {MAX_BACKOFF_S:g}] (1 hour; default 0.5)")  # fmt: skip


def remote(url: str, token: str | None = None, timeout: float = 60, retries: int = 2, backoff: float = 0.5):
    """Remote reward: scores rows on a `mmgrpo serve-reward` server over HTTP (url, token, timeout, retries)."""
    check_remote_options("remote", url=url, timeout=timeout, retries=retries, backoff=backoff)
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None

    def fn(samples, prompts, meta, ctx) -> torch.Tensor | list[float | None]:  # -> [N]
        group_size, step = int(getattr(ctx, "group_size", 1) or 1), int(getattr(ctx, "step", 0) or 0)
        device = getattr(ctx, "device", "cpu")
        if len(prompts) == 0:
            return torch.zeros(0, dtype=torch.float32, device=device)
        body = encode_request(samples, list(prompts), meta, group_size, step)
        reply = post_score(url, body, token, timeout, retries, backoff)
        values = reply["rewards"]
        if len(values) != len(prompts):
            raise UserError(f"reward server at {url} answered {len(values)} rewards for {len(prompts)} rows")
        floats = answered_values(url, values)
        fn.last_columns = reply.get("columns") or {}
        if any(v is None for v in floats):
            return floats
        return torch.tensor(floats, dtype=torch.float32, device=device)

    # rows go to the server as whole groups (N a multiple of G), so group-aware rewards can be served too
    fn.group_aware = True
    fn.last_columns = {}
    fn.url = url
    return fn


remote.check = check_remote_options  # type: ignore[attr-defined]  (at config load, before a run directory exists)
register("remote")(remote)
