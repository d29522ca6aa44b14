"""``mmgrpo serve-reward``: any registered reward behind a small HTTP server (stdlib only).

    mmgrpo serve-reward NAME [--option key=value ...] [--host 127.0.0.1] [--port 8090] [--token T]
                             [--max-request-mb 64] [--max-batch-rows 256] [--batch-wait-s 0.01]

``POST /score`` takes one wire-format request (:mod:`mmgrpo.rewards.wire`; NPZ + JSON, never pickle) and answers
``{"rewards": [...]}``; ``GET /health`` answers ``{"status": "ok", "reward": NAME, ...}`` (no token needed). Any other
method on these paths is a JSON 405 with ``Allow``, any other path a JSON 404.

``--option key=value`` gets the checks ``mmgrpo train`` gives a reward's options when its config loads (the factory's
signature and types, finite numbers, the factory's own ``.check``): a bad one is one paragraph naming
``--option key=value`` and exit status 2, before anything is served. Ctrl-C and SIGTERM (what a supervisor sends)
both stop it cleanly: no new connections, queued requests answered 503, a "stopped" line, exit status 0.

Why a batching worker, and how it batches: :mod:`mmgrpo.rewards.batching`.

Defences: binds 127.0.0.1 unless told otherwise, and refuses a non-loopback address without a token unless
``--allow-unauthenticated``; checks ``Authorization: Bearer <token>`` in constant time (401); refuses a missing
Content-Length (411) and a too-large one (413) before reading the body; the headers must arrive within
``HEADER_DEADLINE_S`` and the body within ``BODY_BASE_S + length / MIN_BODY_RATE`` (a slow-drip client is cut
off); validates shapes/lengths, the NPZ members (only ``header`` and ``samples``, arrays whose headers match
their bytes) (400); a reward exception, or any other failure of a handler, is a 500 with its message and the
server keeps serving; a reward's values are checked by the trainer's own function
(:func:`mmgrpo.rewards.columns.to_column`, :class:`CheckedReward`): a [G, B] table, a bool, a str, ±inf, a value
beyond fp32 or an undeclared NaN is a 500 with the trainer's message, naming the rows; NaN from a reward with
``nan_means_not_applicable`` goes out as null. A reward
raising SystemExit / KeyboardInterrupt stops the worker: that request gets a 500, later ones a 503 at once,
``/health`` a 503 "failed", and ``serve-reward`` exits 2. A client that disconnects mid-body is logged and
dropped; one that resets its connection while its request waits for the worker (the remote client, when it times
out) has the request dropped unscored, while one that only closes its sending side after a complete request is
answered (``_Handler._client_gone``). A listen backlog of ``BACKLOG`` and at most ``--max-connections``
connections served at once (a thread each): the next one is answered 503 with ``Retry-After`` at once, which the
client waits out, so a burst of clients queues instead of failing.
Nothing a client sends is unpickled (the wire format is NPZ with ``allow_pickle=False`` and JSON).
"""

from __future__ import annotations

import argparse
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import select
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from mmgrpo.core.config_yaml import option_value
from mmgrpo.core.errors import UserError
from mmgrpo.rewards.batching import Batcher
from mmgrpo.rewards.registry import check_reward_options, get, resolve
from mmgrpo.rewards.wire import (
    TOKEN_ENV,
    WIRE_VERSION,
    decode_request,
    rewards_to_list,
)

log = logging.getLogger("mmgrpo.rewards.server")
DEFAULT_PORT = 8090
BACKLOG = 128  # listen queue: the stdlib default of 5 reset 4-6% of 1000 requests under 50 concurrent clients
_BUSY_BODY = b'{"error": "the reward server is busy; retry after 1 s"}'
BUSY = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n" + (
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)  # answered from the accepting thread when every connection slot is taken
LINGER_S = 2.0  # after refusing a body unread, read and discard it this long so the client sees our answer
HEADER_DEADLINE_S = 10.0  # the request line and headers must arrive within this of the connection
BODY_BASE_S, MIN_BODY_RATE = 10.0, 1 << 20  # the body within BODY_BASE_S + Content-Length / MIN_BODY_RATE (B/s)
CLIENT_CHECK_S = 0.5  # while a request waits for the worker, look this often whether its client has gone


# ---------------------------------------------------------------------------------------------- HTTP


class _DeadlineSocketIO(io.RawIOBase):
    """The connection's input with a deadline for the whole read, not for each recv.

    A socket timeout alone is per recv: a client dripping one header byte every 59 s would hold a connection
    slot (a thread) forever, and 64 of them lock everyone out without a token. Each recv here waits at most the
    time left to ``deadline`` and raises TimeoutError past it, which http.server answers by closing the
    connection (headers) and ``do_POST`` logs as a client gone mid-body.
    """

    def __init__(self, sock: socket.socket, deadline: float, idle_timeout: float | None):
        self._sock, self.deadline, self._idle_timeout = sock, deadline, idle_timeout

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive within its deadline")
        self._sock.settimeout(min(left, self._idle_timeout or left))
        try:
            return self._sock.recv_into(b)
        finally:
            self._sock.settimeout(self._idle_timeout)  # writes keep the handler's own timeout


class _Handler(BaseHTTPRequestHandler):
    server_version = "mmgrpo-reward/1"
    timeout = 60  # socket timeout of a single recv/send; whole reads have the deadlines above (_DeadlineSocketIO)

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the stdlib's reader: replaced by one with a deadline for the whole request
        self._input = _DeadlineSocketIO(self.connection, time.monotonic() + HEADER_DEADLINE_S, self.timeout)
        self.rfile = io.BufferedReader(self._input)

    def _client_gone(self) -> bool:
        """Whether the client's connection was reset (or broke) while we wait to answer its complete request.

        An end of stream is not a client gone: a client may close its sending side once its request is sent
        (``shutdown(SHUT_WR)``, legal HTTP/1.1; curl and some proxies do it) and still read the answer, and a
        peek cannot tell that from a client that closed the whole connection (both send a FIN). Only a reset says
        that nobody will read the answer: :func:`~mmgrpo.rewards.remote.post_score` resets its connection when it
        gives up on an answer, so a timed-out trainer's queued request is still dropped unscored; a client that
        closes without a reset has its request scored and the answer goes nowhere."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if readable:  # b"" (end of stream) or bytes (a next request): not gone; a reset raises
                self.connection.recv(1, socket.MSG_PEEK)
            return False
        except (OSError, ValueError):
            return True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (http.server's signature)
        log.debug("%s %s", self.address_string(), format % args)

    def _reply(self, code: int, payload: dict, unread: int = 0, headers: dict[str, str] | None = None) -> None:
        """Send a JSON answer (``headers`` added; no body to a HEAD); if the body was left unread, close and briefly
        drain it (lingering close)."""
        try:  # strict JSON: rewards_to_list already turned every non-finite value into None or an error
            data = json.dumps(payload, allow_nan=False).encode("utf-8")
        except ValueError as e:
            code, data = 500, json.dumps({"error": f"cannot answer in JSON ({e})"}).encode("utf-8")
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if unread:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError as e:
            log.warning("client %s went away before the answer (%s)", self.address_string(), e)
            self.close_connection = True
            return
        if unread:
            self.close_connection = True
            self._drain(unread)

    def _drain(self, unread: int) -> None:
        # closing a socket with unread input sends a TCP reset that can destroy our answer in flight
        deadline = time.monotonic() + LINGER_S
        try:
            self.connection.shutdown(socket.SHUT_WR)
            while unread > 0 and (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                chunk = self.connection.recv(min(unread, 1 << 16))
                if not chunk:
                    break
                unread -= len(chunk)
        except OSError:
            pass

    def _content_length(self) -> tuple[int | None, str | None]:
        raw = self.headers.get("Content-Length")
        if raw is None:
            return None, "missing Content-Length (chunked uploads are not supported)"
        try:
            n = int(raw)
        except ValueError:
            n = -1
        return (n, None) if n >= 0 else (None, f"bad Content-Length {raw!r}")

    ALLOWED = {"/health": "GET", "/score": "POST"}
    """each path and the one method it answers; another method is a JSON 405 naming it in ``Allow``"""

    def _path(self) -> str:
        return urlsplit(self.path).path.rstrip("/")

    def _wrong_method(self, unread: int = 0) -> bool:
        """Answer 405 (JSON, with ``Allow``) when the path exists but takes another method, 404 when there is no
        such path; False when the method is the path's own."""
        allowed = self.ALLOWED.get(self._path())
        if allowed == self.command:
            return False
        if allowed is None:
            self._reply(404, {"error": f"no such path {self.path!r}; use GET /health or POST /score"}, unread)
        else:
            msg = f"{self.command} {self._path()} is not allowed; use {allowed} {self._path()}"
            self._reply(405, {"error": msg}, unread, {"Allow": allowed})
        return True

    def do_GET(self) -> None:
        if self._wrong_method():
            return
        health = self.server.app.health()
        self._reply(200 if health["status"] == "ok" else 503, health)

    def _other_method(self) -> None:
        """Any method but GET and POST (PUT, DELETE, HEAD, ...): a JSON 405 (404 for no such path), where
        http.server answered its HTML 501 page."""
        length, _ = self._content_length()
        self._wrong_method(length or 0)

    def __getattr__(self, name: str) -> Any:
        # http.server looks up do_<METHOD> for the request's method and answers HTML 501 when there is none
        if name.startswith("do_") and name[3:].isupper():
            return self._other_method
        raise AttributeError(name)

    def do_POST(self) -> None:
        app: RewardServer = self.server.app
        length, problem = self._content_length()
        unread = length or 0
        if self._wrong_method(unread):
            return
        if not app.authorised(self.headers.get("Authorization")):
            return self._reply(401, {"error": "missing or wrong token (send 'Authorization: Bearer <token>')"}, unread)
        if length is None:
            code = 411 if self.headers.get("Content-Length") is None else 400
            return self._reply(code, {"error": problem}, 1 << 30)
        if length > app.max_request_bytes:
            msg = (
                f"request of {length} bytes is over this server's limit of {app.max_request_bytes} bytes; "
                "send fewer rows per call or restart the server with a larger --max-request-mb"
            )
            return self._reply(413, {"error": msg}, length)
        self._input.deadline = time.monotonic() + BODY_BASE_S + length / MIN_BODY_RATE
        try:
            body = self.rfile.read(length)
        except OSError as e:
            log.warning("client %s disconnected mid-request (%s)", self.address_string(), e)
            self.close_connection = True
            return
        if len(body) < length:
            log.warning("client %s disconnected after %d of %d bytes", self.address_string(), len(body), length)
            self.close_connection = True
            return
        self._score(app, body)

    def _score(self, app: RewardServer, body: bytes) -> None:
        try:
            request = decode_request(body, app.max_request_bytes)
        except ValueError as e:
            return self._reply(400, {"error": str(e)})
        except Exception as e:  # noqa: BLE001  an unforeseen body must not drop the connection unanswered
            log.exception("decoding a request failed")
            return self._reply(500, {"error": f"cannot decode the request ({type(e).__name__}: {e})"})
        job = app.batcher.submit(request)
        while not job.done.wait(CLIENT_CHECK_S):
            if app.batcher.stopping:
                return self._reply(503, {"error": "the reward server is shutting down"})
            if not app.batcher.alive and not job.done.is_set():  # the worker is gone: nothing will answer
                msg = app.batcher.failed or "the reward server's worker stopped; restart the server"
                return self._reply(503, {"error": msg})
            if self._client_gone():  # e.g. the client timed out: don't score rows nobody will read
                job.cancelled = True
                self.close_connection = True
                log.warning("client %s disconnected before its answer; request cancelled", self.address_string())
                return
        if job.error is not None:
            return self._reply(job.code, {"error": job.error})
        if job.result is None:  # never a 200 without rewards
            return self._reply(500, {"error": "the reward server finished the request without a result"})
        self._reply(200, {"rewards": job.result})


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = BACKLOG
    app: RewardServer
    slots: threading.BoundedSemaphore
    refusing: threading.BoundedSemaphore  # connections being answered 503 at once

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread per connection while a slot is free; otherwise a short-lived thread answers 503 + Retry-After."""
        if self.slots.acquire(blocking=False):
            super().process_request(request, client_address)
        elif self.refusing.acquire(blocking=False):
            threading.Thread(target=self._refuse, args=(request,), daemon=True).start()
        else:  # a flood beyond even the refusals we answer: close at once (the client retries)
            self.shutdown_request(request)

    def _refuse(self, request: Any) -> None:
        # answer, then drain what the client is still sending: closing with unread input would reset the
        # connection and destroy the answer in flight (the client would see a broken pipe, not the 503)
        try:
            request.settimeout(LINGER_S)
            request.sendall(BUSY)
            request.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_S
            while time.monotonic() < deadline and request.recv(1 << 16):
                pass
        except OSError:
            pass
        finally:
            self.shutdown_request(request)
            self.refusing.release()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


def is_loopback(host: str) -> bool:
    """True for localhost / 127.x / ::1; a hostname other than localhost counts as non-loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CheckedReward:
    """The served reward, its output checked as the trainer checks a local reward's column, under its own name
    (:func:`~mmgrpo.rewards.wire.rewards_to_list`): a value the trainer would refuse is a 500 with the trainer's
    message (``reward 'NAME' returned a tensor of shape [8, 4] for 32 rows ...``), never a number the client
    trains on. Returns N floats or None."""

    def __init__(self, fn: Any, name: str):
        self.fn, self.name = fn, name
        self.nan_ok = bool(getattr(fn, "nan_means_not_applicable", False))

    def __call__(self, samples: Any, prompts: list, meta: list[dict], ctx: Any) -> list[float | None]:
        return rewards_to_list(self.fn(samples, prompts, meta, ctx), len(prompts), self.nan_ok, name=self.name)


class RewardServer:
    """A running reward server (``.url``, ``.shutdown()``); serves in a daemon thread. Use :func:`serve`."""

    def __init__(
        self,
        reward_fn: Any,
        host: str,
        port: int,
        token: str | None,
        max_request_bytes: int,
        max_batch_rows: int,
        batch_wait_s: float,
        name: str,
        max_connections: int = 64,
    ):
        self.name, self.token, self.max_request_bytes = name, token, max_request_bytes
        self.max_batch_rows = max_batch_rows
        cls = _HTTPServer6 if ":" in host else _HTTPServer
        try:
            self._httpd = cls((host, port), _Handler)
        except OSError as e:
            raise UserError(f"cannot serve on {host}:{port} ({e}); pick another --port or --host") from e
        self._httpd.app = self
        self._httpd.slots = threading.BoundedSemaphore(max_connections)
        self._httpd.refusing = threading.BoundedSemaphore(256)
        self.port = int(self._httpd.server_address[1])
        self.url = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        self.batcher = Batcher(CheckedReward(reward_fn, name), max_batch_rows, batch_wait_s)
        serve = lambda: self._httpd.serve_forever(poll_interval=0.05)  # short poll: shutdown() returns quickly
        self._thread = threading.Thread(target=serve, name="reward-http", daemon=True)
        self._thread.start()
        self._closed = False

    def authorised(self, header: str | None) -> bool:
        if not self.token:
            return True
        return hmac.compare_digest((header or "").encode("utf-8"), f"Bearer {self.token}".encode())

    def health(self) -> dict:
        """``status`` "ok", or "failed" with the worker's ``error`` (answered 503, so a health check sees it)."""
        failed = self.batcher.failed
        return {
            "status": "ok" if failed is None else "failed",
            **({"error": failed} if failed is not None else {}),
            "reward": self.name,
            "wire_version": WIRE_VERSION,
            "max_request_bytes": self.max_request_bytes,
            "max_batch_rows": self.max_batch_rows,
        }

    @property
    def reward_calls(self) -> int:
        """How many times the reward callable has been called (one per merged batch)."""
        return self.batcher.calls

    def shutdown(self) -> None:
        """Stop accepting, fail queued requests with 503/500, close the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self.batcher.stop()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> RewardServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def serve(
    reward_fn: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    max_request_bytes: int = 64 << 20,
    max_batch_rows: int = 256,
    batch_wait_s: float = 0.01,
    name: str | None = None,
    max_connections: int = 64,
    allow_unauthenticated: bool = False,
) -> RewardServer:
    """Serve ``reward_fn(samples, prompts, meta, ctx)`` over HTTP in background threads; returns the running
    server (``.url``, ``.shutdown()``). ``port=0`` picks a free port. Binds loopback unless ``host`` says otherwise;
    a non-loopback ``host`` needs a ``token`` unless ``allow_unauthenticated``.
    """
    ok_wait = math.isfinite(batch_wait_s) and 0 <= batch_wait_s <= MAX_BATCH_WAIT_S
    if max_request_bytes <= 0 or max_batch_rows < 1 or not ok_wait or max_connections < 1:
        raise UserError(
            f"serve: need max_request_bytes > 0, max_batch_rows >= 1, 0 <= batch_wait_s <= {MAX_BATCH_WAIT_S}, "
            f"max_connections >= 1; got {max_request_bytes}, {max_batch_rows}, {batch_wait_s}, {max_connections}"
        )
    if not 0 <= port <= 65535:
        raise UserError(f"serve: port {port} is not in 0..65535 (0 picks a free one)")
    if not host.strip():
        raise UserError("serve: the host is empty, which would bind every interface; give 127.0.0.1 (this machine "
                        "only, the default) or 0.0.0.0 (every interface, with a token)")  # fmt: skip
    if not is_loopback(host) and not token:
        if not allow_unauthenticated:
            raise UserError(
                f"refusing to serve on the non-loopback address {host} without a token: anyone who can reach it "
                f"could use the reward. Pass --token T (or set {TOKEN_ENV}), bind 127.0.0.1, or pass "
                "--allow-unauthenticated if the network is trusted"
            )
        log.warning("serving on non-loopback address %s WITHOUT a token (--allow-unauthenticated)", host)
    name = name or getattr(reward_fn, "__qualname__", type(reward_fn).__name__)
    return RewardServer(
        reward_fn, host, port, token, max_request_bytes, max_batch_rows, batch_wait_s, name, max_connections
    )


# ---------------------------------------------------------------------------------------------- CLI


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``["k=1", "m=a b", "f=0.5", "on=true"]`` -> ``{"k": 1, "m": "a b", "f": 0.5, "on": True}`` (read as the
    config's overrides read their values, :func:`mmgrpo.core.config_yaml.option_value`)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--option {pair!r} must look like key=value, e.g. --option batch_size=8")
        out[key.strip()] = option_value(value, f"--option {pair!r}", f"--option \"{key.strip()}='{value}'\"")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmgrpo serve-reward", description="Serve a registered reward over HTTP.")
    p.add_argument("name", help="reward name (as in `mmgrpo list`) or a dotted path my_pkg.my_reward")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="reward option (repeat)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0 picks a free one)")
    p.add_argument("--token", default=None, help=f"require 'Authorization: Bearer TOKEN' (default ${TOKEN_ENV})")
    p.add_argument("--max-request-mb", type=float, default=64.0, help="refuse larger requests with 413")
    p.add_argument("--max-batch-rows", type=int, default=256, help="most rows merged into one reward call")
    p.add_argument("--batch-wait-s", type=float, default=0.01, help="how long to wait for more requests to merge")
    p.add_argument("--max-connections", type=int, default=64, help="connections served at once; more get 503")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="allow a non-loopback --host without --token (only on a trusted network)")  # fmt: skip
    return p


MAX_BATCH_WAIT_S = 60.0
"""the longest --batch-wait-s: a client's default timeout (and the handler's socket timeout) is 60 s"""


def check_args(args: argparse.Namespace) -> None:
    """The numeric flags, named as the user typed them, before the reward loads."""
    if not (math.isfinite(args.max_request_mb) and args.max_request_mb > 0) or args.max_request_mb * 2**20 < 1:
        raise UserError(f"--max-request-mb {args.max_request_mb}: give the largest request in MB, a finite number "
                        "> 0 (default 64)")  # fmt: skip
    if args.max_batch_rows < 1:
        raise UserError(f"--max-batch-rows {args.max_batch_rows}: give the most rows merged into one reward call, "
                        ">= 1 (default 256)")  # fmt: skip
    if not (math.isfinite(args.batch_wait_s) and 0 <= args.batch_wait_s <= MAX_BATCH_WAIT_S):
        raise UserError(f"--batch-wait-s {args.batch_wait_s}: give seconds to wait for more requests to merge, in "
                        f"[0, {MAX_BATCH_WAIT_S:g}] (default 0.01; clients time out after 60 s)")  # fmt: skip
    if args.max_connections < 1:
        raise UserError(f"--max-connections {args.max_connections}: give the connections served at once, >= 1 "
                        "(default 64)")  # fmt: skip
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: give a port in 0..65535 (0 picks a free one; default {DEFAULT_PORT})")
    if not args.host.strip():
        raise UserError(f"--host {args.host!r}: an empty host binds every interface; give 127.0.0.1 (this machine "
                        "only, the default) or 0.0.0.0 (every interface, with --token)")  # fmt: skip


def wait_until_stopped(server: RewardServer, stop: threading.Event, poll_s: float = 0.5) -> None:
    """Serve until ``stop`` is set (SIGTERM sets it in ``main``) or Ctrl-C, then shut down; raises UserError when
    the worker has failed.

    A server whose worker is gone answers every request 503: the process exits non-zero with the reason rather
    than keep a port open that only fails, so a supervisor sees it and restarts it.
    """
    try:
        while not stop.wait(poll_s):
            if server.batcher.failed is not None:
                raise UserError(server.batcher.failed)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()


def reward_from_options(name: str, pairs: list[str]) -> Any:
    """The reward ``name`` built with ``--option key=value`` pairs, after the checks ``train`` applies to a reward's
    options when its config loads (:func:`~mmgrpo.rewards.registry.check_reward_options`: the factory's signature,
    its types, finite numbers, its own ``.check``); each problem one UserError naming ``--option key=value`` (a
    factory that raises on its options is one too: :func:`~mmgrpo.rewards.registry.get`)."""
    options = parse_options(pairs)
    resolve(name)  # an unknown reward: its own message, with the nearest names
    try:
        options = check_reward_options(name, options, "--option", "the serve-reward command line")
    except UserError as e:  # "--option.scale=-1: ..." -> as typed: "--option scale=-1: ..."
        raise UserError(str(e).replace("--option.", "--option ")) from None
    return get(name, **options)


def _stop_on_sigterm(stop: threading.Event) -> Any:
    """Make SIGTERM (what supervisors, systemd, docker and kubernetes send) set ``stop``, so the server shuts down as
    on Ctrl-C; returns the function restoring the previous handler. Only the main thread may set a handler (a test
    serving from another thread stops through ``stop`` itself)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    return lambda: signal.signal(signal.SIGTERM, previous)


def main(argv: list[str], stop: threading.Event | None = None) -> int:
    """``mmgrpo serve-reward ...``: serve until Ctrl-C or SIGTERM (or until ``stop`` is set, for tests), then shut
    down, print a "stopped" line and return 0 (a stop asked for is a clean exit, as supervisors expect); raises
    UserError (exit status 2) for a bad flag or option, and when the reward stopped the worker."""
    args = build_parser().parse_args(argv)
    check_args(args)

    reward_fn = reward_from_options(args.name, args.option)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    server = serve(
        reward_fn,
        args.host,
        args.port,
        token,
        int(args.max_request_mb * 2**20),
        args.max_batch_rows,
        args.batch_wait_s,
        name=args.name,
        max_connections=args.max_connections,
        allow_unauthenticated=args.allow_unauthenticated,
    )
    stop = stop or threading.Event()
    restore = _stop_on_sigterm(stop)
    print(f"serving reward {args.name!r} at {server.url} (POST /score, GET /health); Ctrl-C or SIGTERM stops",
          flush=True)  # fmt: skip
    try:
        wait_until_stopped(server, stop)
    finally:
        restore()
    print(f"stopped serving reward {args.name!r} ({server.reward_calls} reward calls)", flush=True)
    return 0
