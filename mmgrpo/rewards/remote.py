"""Remote rewards: the client of ``mmgrpo serve-reward``.

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

The wire format (NPZ + JSON, never pickle) and its answers are :mod:`mmgrpo.rewards.wire`.

Remote scoring cannot hand the reward ``ctx.policy`` (rewards that re-ask the policy must run locally), and
stateful rewards keep their state on the server.
"""

from __future__ import annotations

import http.client
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
from numbers import Real
from typing import Any

import torch

from mmgrpo.core.errors import UserError, bad_option, quoted
from mmgrpo.rewards.columns import FLOAT32_MAX
from mmgrpo.rewards.registry import register
from mmgrpo.rewards.wire import CONTENT_TYPE, TOKEN_ENV, encode_request


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
