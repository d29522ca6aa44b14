"""Remote rewards: a real HTTP server on 127.0.0.1 (port 0) in a thread, the real client, real sockets."""

from __future__ import annotations

import io
import json
import logging
import select
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

import mmgrpo.rewards.registry as reward_registry
from mmgrpo.core.errors import UserError
from mmgrpo.core.types import RewardContext
from mmgrpo.rewards import server as server_mod
from mmgrpo.rewards.batching import Batcher
from mmgrpo.rewards.remote import remote
from mmgrpo.rewards.server import is_loopback, main, parse_options, serve
from mmgrpo.rewards.wire import decode_request, encode_request, quantise_uint8


def mean_pixel(samples, prompts, meta, ctx) -> torch.Tensor:  # samples [N, 3, H, W] or [N, F, 3, H, W] -> [N]
    return samples.float().flatten(1).mean(1)


class CountingReward:
    """mean pixel, recording the row count of every call (to see the server's batching)."""

    def __init__(self, delay_s: float = 0.0):
        self.calls: list[int] = []
        self.delay_s = delay_s

    def __call__(self, samples, prompts, meta, ctx):
        self.calls.append(len(prompts))
        time.sleep(self.delay_s)
        return mean_pixel(samples, prompts, meta, ctx)


def text_len(samples, prompts, meta, ctx) -> list:  # list of N str -> len, None where meta says skip
    return [None if m.get("skip") else float(len(s)) + ctx.step for s, m in zip(samples, meta)]


def failing(samples, prompts, meta, ctx):
    raise RuntimeError("judge model exploded")


@pytest.fixture
def server_factory():
    servers = []

    def make(fn, **kw):
        kw.setdefault("batch_wait_s", 0.0)
        s = serve(fn, host="127.0.0.1", port=0, **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.shutdown()


def _images(n=4, h=5, w=6):
    torch.manual_seed(0)
    return torch.rand(n, 3, h, w)


def _ctx(g=2, step=0):
    return RewardContext(group_size=g, step=step)


def test_images_scored_remotely_equal_local_on_quantised(server_factory):
    srv = server_factory(mean_pixel, name="mean_pixel")
    x = _images()  # [N=4, 3, 5, 6] float in [0, 1]
    prompts, meta = ["a", "a", "b", "b"], [{"k": i} for i in range(4)]
    got = remote(srv.url, retries=0)(x, prompts, meta, _ctx())
    want = mean_pixel(quantise_uint8(x).float() / 255, prompts, meta, _ctx())
    assert got.dtype == torch.float32 and got.shape == (4,)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # the server saw 8-bit images: remote differs from the float reward by at most half a level (0.5 / 255)
    assert (got - mean_pixel(x, prompts, meta, _ctx())).abs().max() <= 0.5 / 255 + 1e-6
    # hand-checked quantisation: 0.5 -> round(127.5) = 128 -> 128/255 = 0.50196
    half = torch.full((2, 3, 2, 2), 0.5)
    assert remote(srv.url, retries=0)(half, ["p", "p"], [{}, {}], _ctx()).tolist() == pytest.approx([128 / 255] * 2)
    health = json.loads(urllib.request.urlopen(srv.url + "/health", timeout=5).read())
    assert health["reward"] == "mean_pixel" and health["status"] == "ok"


def test_uint8_video_sent_unchanged(server_factory):
    srv = server_factory(mean_pixel)
    v = torch.arange(2 * 3 * 3 * 2 * 2, dtype=torch.uint8).view(2, 3, 3, 2, 2)  # [N=2, F=3, 3, H=2, W=2]
    got = remote(srv.url, retries=0)(v, ["p", "p"], [{}, {}], _ctx())
    # row 0 holds 0..35 -> mean 17.5; row 1 holds 36..71 -> mean 53.5 (uint8 in, uint8 seen by the reward)
    assert got.tolist() == [17.5, 53.5]


def test_text_samples_and_none_rows(server_factory):
    srv = server_factory(text_len)
    out = remote(srv.url, retries=0)(["ab", "abcd", "x", ""], ["q"] * 4, [{}, {"skip": True}, {}, {}], _ctx(2, 3))
    # len + step 3: "ab" -> 5, skipped -> None, "x" -> 4, "" -> 3; a None means a list comes back
    assert out == [5.0, None, 4.0, 3.0]


def test_registered_factory_and_int_array_samples(server_factory):
    srv = server_factory(reward_registry.get("bandit_arm_value"))
    fn = reward_registry.get("remote", url=srv.url, retries=0)
    arms = torch.tensor([2, 0, 1, 1])  # LongTensor [N]: sent bit-exact as kind "array"
    meta = [{"arm_values": [0.1, 0.2, 0.7]}] * 2 + [{"arm_values": [1.0, -1.0, 5.0]}] * 2
    assert fn(arms, [0, 0, 1, 1], meta, _ctx()).tolist() == pytest.approx([0.7, 0.1, -1.0, -1.0])


def test_concurrent_requests_are_batched(server_factory, caplog):
    caplog.set_level(logging.INFO, logger="mmgrpo.rewards.server")
    reward = CountingReward(delay_s=0.05)
    srv = server_factory(reward, batch_wait_s=0.3, max_batch_rows=64)
    barrier, results, errors = threading.Barrier(4), {}, []

    def client(k: int) -> None:
        try:
            x = torch.full((2, 3, 4, 4), k / 255)  # thread k's 2 rows are all pixel value k/255 exactly
            barrier.wait(timeout=5)
            results[k] = remote(srv.url, retries=0, timeout=10)(x, ["p", "p"], [{}, {}], _ctx())
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in (10, 20, 30, 40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors
    for k in (10, 20, 30, 40):
        torch.testing.assert_close(results[k], torch.full((2,), k / 255))
    assert len(reward.calls) < 4 and sum(reward.calls) == 8
    assert srv.reward_calls == len(reward.calls)
    batch_lines = [r for r in caplog.records if r.name == "mmgrpo.rewards.server" and "rows" in r.getMessage()]
    assert len(batch_lines) == len(reward.calls)


def test_different_group_sizes_are_not_merged(server_factory):
    reward = CountingReward()
    srv = server_factory(reward, batch_wait_s=0.2)
    out = {}

    def client(g: int) -> None:
        out[g] = remote(srv.url, retries=0)(torch.zeros(4, 3, 2, 2), ["p"] * 4, [{}] * 4, _ctx(g))

    threads = [threading.Thread(target=client, args=(g,)) for g in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(reward.calls) == [4, 4] and set(out) == {1, 2}


def test_oversized_request_refused_413(server_factory):
    srv = server_factory(mean_pixel, max_request_bytes=1024)
    x = _images(4, 16, 16)  # 4*3*16*16 = 3072 uint8 bytes > 1024
    with pytest.raises(UserError, match=r"413.*--max-request-mb"):
        remote(srv.url, retries=0)(x, ["p"] * 4, [{}] * 4, _ctx())
    # 8 MiB is more than the socket buffers hold: without the server's lingering drain of the unread body the
    # client would see a broken pipe / reset instead of the 413 answer
    req = urllib.request.Request(srv.url + "/score", data=b"\0" * (8 << 20), method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 413 and "1024" in json.loads(e.value.read())["error"]


def test_token_required_401_without_retries(server_factory):
    srv = server_factory(mean_pixel, token="s3cret")
    x = _images(2)
    for token in (None, "wrong"):
        t0 = time.monotonic()
        with pytest.raises(UserError, match="401"):
            remote(srv.url, token=token, retries=2, backoff=5.0)(x, ["p"] * 2, [{}] * 2, _ctx())
        assert time.monotonic() - t0 < 2.0  # a 4xx is not retried (a retry would sleep 5 s)
    assert remote(srv.url, token="s3cret", retries=0)(x, ["p"] * 2, [{}] * 2, _ctx()).shape == (2,)


def _raw(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


def test_client_disconnect_mid_body_and_missing_length(server_factory, caplog):
    caplog.set_level(logging.WARNING, logger="mmgrpo.rewards.server")
    srv = server_factory(mean_pixel)
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"0123456789")
    for _ in range(100):  # bounded wait (<= 2 s) for the handler to notice the short body
        if any("10 of 1000 bytes" in r.getMessage() for r in caplog.records):
            break
        time.sleep(0.02)
    assert any("10 of 1000 bytes" in r.getMessage() for r in caplog.records)
    # no Content-Length -> 411 before any body is read
    assert _raw(srv.url, b"POST /score HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 411")
    x = _images(2)
    assert remote(srv.url, retries=0)(x, ["p"] * 2, [{}] * 2, _ctx()).shape == (2,)


def test_bad_requests_400_and_reward_error_500(server_factory):
    srv = server_factory(mean_pixel)
    body = encode_request(_images(2), ["p", "p"], [{}, {}], group_size=2)
    with np.load(io.BytesIO(body), allow_pickle=False) as npz:
        header, samples = json.loads(npz["header"].tobytes()), npz["samples"]
    header["prompts"] = ["p"]  # 1 prompt for 2 samples
    header["meta"] = [{}]
    header["group_size"] = 1
    buf = io.BytesIO()
    np.savez(buf, header=np.frombuffer(json.dumps(header).encode(), np.uint8), samples=samples)
    for data, needle in ((buf.getvalue(), "1 prompts"), (b"not an npz", "NPZ")):
        req = urllib.request.Request(srv.url + "/score", data=data, method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 400 and needle in json.loads(e.value.read())["error"]

    bad = server_factory(failing)
    with pytest.raises(UserError, match="judge model exploded.*not re-sent"):
        remote(bad.url, retries=2, backoff=0.01)(_images(2), ["p"] * 2, [{}] * 2, _ctx())
    assert remote(srv.url, retries=0)(_images(2), ["p"] * 2, [{}] * 2, _ctx()).shape == (2,)  # still serving
    # the reward raised on these rows: a re-send would score them again (an expensive judge scored each failing
    # batch 3 times), so a 500 is not retried
    assert bad.reward_calls == 1


def test_client_side_errors_name_the_problem():
    fn = remote("http://127.0.0.1:9", retries=0)
    with pytest.raises(UserError, match=r"meta\[1\]\['img'\]"):
        fn(_images(2), ["p", "p"], [{"ok": 1}, {"img": object()}], _ctx())
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        fn(_images(2) * 2 - 1, ["p", "p"], [{}, {}], _ctx())
    with pytest.raises(UserError, match="http://"):
        remote("127.0.0.1:8090")
    req = decode_request(encode_request(["a", "b"], ["p", "q"], [{"n": torch.tensor(3)}, {}], group_size=1))
    assert req.kind == "text" and req.samples == ["a", "b"] and req.meta[0] == {"n": 3}


def test_stopped_server_raises_naming_url_after_retries():
    srv = serve(mean_pixel, port=0)
    url = srv.url
    srv.shutdown()
    fn = remote(url, retries=2, backoff=0.05, timeout=2)
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        fn(_images(2), ["p", "p"], [{}, {}], _ctx())
    elapsed = time.monotonic() - t0
    msg = str(e.value)
    assert url in msg and "mmgrpo serve-reward" in msg and "3 attempts" in msg
    assert 0.075 <= elapsed < 4.0  # backoffs (0.05 + 0.1) x jitter 0.5..1.5 slept between the 3 attempts


def test_parse_options_yaml_scalars():
    opts = parse_options(["n=8", "scale=0.5", "on=true", "model=ViT-B/32", "ids=[1, 2]", "empty="])
    assert opts == {"n": 8, "scale": 0.5, "on": True, "model": "ViT-B/32", "ids": [1, 2], "empty": ""}
    with pytest.raises(UserError, match="key=value"):
        parse_options(["novalue"])
    # values read as the config's overrides read theirs: text YAML does not read is text ("a: b" was refused), a list
    # left open is its YAML error with the quoted form, and a mapping with a key twice is refused
    assert parse_options(["prefix=a photo: of a cat: at dusk"]) == {"prefix": "a photo: of a cat: at dusk"}
    quoted = r"quote it: --option \"ids='\[1, 2'\""
    with pytest.raises(UserError, match=r"(?s)the value of --option 'ids=\[1, 2'.*" + quoted):
        parse_options(["ids=[1, 2"])
    with pytest.raises(UserError, match="the value of --option 'm={a: 1, a: 2}'"):
        parse_options(["m={a: 1, a: 2}"])


def test_is_loopback():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.5", "::", "example.com"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_main_serves_a_registered_reward_until_stopped():
    port, stop, rc = _free_port(), threading.Event(), []
    t = threading.Thread(target=lambda: rc.append(main(["bandit_arm_value", "--port", str(port)], stop=stop)))
    t.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):  # bounded wait for the server to come up (<= 5 s)
            try:
                health = json.loads(urllib.request.urlopen(url + "/health", timeout=1).read())
                break
            except OSError:
                time.sleep(0.05)
        assert health["reward"] == "bandit_arm_value"
        out = remote(url, retries=0)(torch.tensor([1, 0]), [0, 0], [{"arm_values": [0.25, 0.75]}] * 2, _ctx())
        assert out.tolist() == [0.75, 0.25]
    finally:
        stop.set()
        t.join(timeout=10)
    assert rc == [0] and not t.is_alive()
    with pytest.raises(UserError, match="unknown reward"):
        main(["no_such_reward", "--port", "0"])


# ---------------------------------------------------------------------------------------------- hardening


def test_npz_member_that_is_not_an_array_is_a_400_not_a_dropped_connection(server_factory):
    import zipfile

    s = server_factory(mean_pixel)
    body = io.BytesIO()
    with zipfile.ZipFile(body, "w") as z:  # a member named like an array whose bytes are not one
        z.writestr("header.npy", b"this is not an array")
    req = urllib.request.Request(s.url + "/score", data=body.getvalue(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400 and "not a numpy array" in json.loads(e.value.read())["error"]
    fn = remote(s.url)  # and the server keeps serving
    assert fn(_images(2), ["a", "b"], [{}, {}], _ctx()).shape == (2,)


def test_non_loopback_without_token_is_refused_unless_allowed():
    with pytest.raises(UserError, match="--allow-unauthenticated"):
        serve(mean_pixel, host="0.0.0.0", port=0)
    s = serve(mean_pixel, host="0.0.0.0", port=0, allow_unauthenticated=True)
    s.shutdown()
    s = serve(mean_pixel, host="0.0.0.0", port=0, token="t0ken")
    s.shutdown()
    with pytest.raises(UserError, match="not in 0..65535"):
        serve(mean_pixel, port=99999)


def test_connection_cap_answers_503_retry_after_and_the_client_waits(server_factory):
    s = server_factory(CountingReward(delay_s=0.3), max_connections=1)
    held = socket.create_connection(("127.0.0.1", s.port))  # occupies the only slot until closed
    time.sleep(0.2)
    body = encode_request(_images(2), ["a", "b"], [{}, {}], group_size=2)
    req = urllib.request.Request(s.url + "/score", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 503 and e.value.headers["Retry-After"] == "1"
    threading.Timer(0.5, held.close).start()  # the slot frees while the client waits out Retry-After
    fn = remote(s.url, retries=0)  # 503 + Retry-After does not use up the retries
    assert fn(_images(2), ["a", "b"], [{}, {}], _ctx()).shape == (2,)


def test_fifty_concurrent_clients_twenty_requests_each_all_succeed(server_factory):
    s = server_factory(mean_pixel, max_connections=16)  # fewer slots than clients: the overflow waits, never fails
    fn = remote(s.url, timeout=30)
    imgs = _images(2)
    want = mean_pixel(quantise_uint8(imgs).float() / 255.0, None, None, None)
    failures, done = [], []

    def client():
        for _ in range(20):
            try:
                got = fn(imgs, ["a", "b"], [{}, {}], _ctx())
                assert torch.allclose(torch.as_tensor(got), want, atol=1e-6)
                done.append(1)
            except Exception as e:  # noqa: BLE001  counted, reported below
                failures.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert failures == [] and len(done) == 1000


# ---------------------------------------------------------------------------------------------- CLI flags
@pytest.mark.parametrize(
    "flags,expected",
    [  # the CLI fuzz of 2026-12-06: nan / inf MB were a traceback, nan / inf / huge waits served a broken batcher
        (["--port", "-1"], "--port -1: give a port in 0..65535"),
        (["--port", "70000"], "--port 70000: give a port in 0..65535"),
        (["--max-request-mb", "-1"], "--max-request-mb -1.0: give the largest request in MB"),
        (["--max-request-mb", "nan"], "--max-request-mb nan:"),
        (["--max-request-mb", "inf"], "--max-request-mb inf:"),
        (["--max-request-mb", "1e-9"], "--max-request-mb 1e-09:"),
        (["--max-batch-rows", "0"], "--max-batch-rows 0:"),
        (["--batch-wait-s", "nan"], "--batch-wait-s nan: give seconds to wait for more requests to merge, in [0, 60]"),
        (["--batch-wait-s", "inf"], "--batch-wait-s inf:"),
        (["--batch-wait-s", "1e10"], "--batch-wait-s 10000000000.0:"),
        (["--batch-wait-s", "-0.5"], "--batch-wait-s -0.5:"),
        (["--max-connections", "0"], "--max-connections 0:"),
        (["--host", ""], "--host '': an empty host binds every interface"),
        (["--host", " ", "--token", "t"], "--host ' ': an empty host binds every interface"),
    ],
)
def test_cli_flags_out_of_range_are_one_paragraph_naming_the_flag(capsys, flags, expected):
    from mmgrpo.train.cli import main as cli_main

    assert cli_main(["serve-reward", "bandit_arm_value", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and expected in " ".join(err.split())


def test_a_port_in_use_is_one_paragraph(server_factory, capsys):
    from mmgrpo.train.cli import main as cli_main

    s = server_factory(mean_pixel)
    assert cli_main(["serve-reward", "bandit_arm_value", "--port", str(s.port)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"cannot serve on 127.0.0.1:{s.port}" in err and "pick another --port" in err and "Traceback" not in err


def test_serve_refuses_a_non_finite_wait_and_an_empty_host():
    for wait in (float("nan"), float("inf"), 61.0):
        with pytest.raises(UserError, match="batch_wait_s"):
            serve(mean_pixel, port=0, batch_wait_s=wait)
    with pytest.raises(UserError, match="host is empty"):
        serve(mean_pixel, host="", port=0, token="t")


@pytest.mark.parametrize(
    "body,needle",
    [  # each was a 500 (a server failure) for what is the client's malformed request
        ("deep", "nested too deeply"),
        ("empty_image", "have an empty dimension"),
    ],
)
def test_malformed_requests_are_400(server_factory, body, needle):
    s = server_factory(mean_pixel)
    header = {"version": 1, "kind": "image", "group_size": 2, "step": 0, "prompts": ["a", "b"], "meta": [{}, {}]}
    buf = io.BytesIO()
    if body == "deep":
        np.savez(buf, header=np.frombuffer(("[" * 100_000 + "]" * 100_000).encode(), np.uint8))
    else:
        text = json.dumps({**header, "dtype": "uint8"}).encode()
        np.savez(buf, header=np.frombuffer(text, np.uint8), samples=np.zeros((2, 3, 0, 4), np.uint8))
    req = urllib.request.Request(s.url + "/score", data=buf.getvalue(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400 and needle in json.loads(e.value.read())["error"]
    assert s.reward_calls == 0


# ---------------------------------------------------------------------------------------------- review of 2027-01


def _wire(x, meta, g):
    """A decoded wire request of real samples (what a handler hands the batcher)."""
    return decode_request(encode_request(x, ["p"] * len(meta), meta, group_size=g))


def test_a_failing_request_merged_with_a_good_one_fails_alone():
    calls = []

    def picky(samples, prompts, meta, ctx):  # fails on any row whose meta says "bad"
        calls.append(len(prompts))
        if any(m.get("bad") for m in meta):
            raise KeyError("arm_values")
        return mean_pixel(samples, prompts, meta, ctx)

    batcher = Batcher(picky, max_batch_rows=64, batch_wait_s=0.5)  # 0.5 s: the two are merged
    try:
        x = torch.full((2, 3, 2, 2), 51 / 255)
        good = batcher.submit(_wire(x, [{}, {}], 2))
        bad = batcher.submit(_wire(x, [{"bad": 1}, {}], 2))
        assert good.done.wait(5) and bad.done.wait(5)
    finally:
        batcher.stop()
    assert calls == [4, 2, 2]  # the merged call failed, then each request alone
    assert good.error is None and good.result == pytest.approx([0.2, 0.2])
    assert bad.result is None and "KeyError" in bad.error and "arm_values" in bad.error


def test_retry_backoff_is_jittered():
    # clients that failed together must not retry in step (they would be merged, and fail, again)
    fn = remote(f"http://127.0.0.1:{_free_port()}", retries=1, backoff=0.1, timeout=2)
    waits = []
    for _ in range(6):
        t0 = time.monotonic()
        with pytest.raises(UserError, match="not reachable"):
            fn(_images(2), ["p", "p"], [{}, {}], _ctx())
        waits.append(time.monotonic() - t0)
    assert 0.04 < min(waits) and max(waits) < 0.5 and max(waits) - min(waits) > 0.01


class GroupCentred:
    """mean pixel minus its group's mean (by ctx.group), recording each call's rows and ctx.group."""

    def __init__(self):
        self.calls: list[tuple[int, list[int]]] = []

    def __call__(self, samples, prompts, meta, ctx):
        v = samples.float().flatten(1).mean(1)
        groups = ctx.group.long()
        self.calls.append((len(prompts), groups.tolist()))
        means = torch.zeros(int(groups.max()) + 1).index_add_(0, groups, v) / ctx.group_size
        return v - means[groups]


@pytest.mark.parametrize("g,parts", [(2, [4, 4, 4]), (3, [3, 3, 3, 3]), (6, [6, 6])])
def test_a_request_over_max_batch_rows_is_scored_in_parts_of_whole_groups(server_factory, g, parts):
    reward = GroupCentred()
    srv = server_factory(reward, max_batch_rows=4)
    x = torch.arange(12 * 3 * 2 * 2).reshape(12, 3, 2, 2).mul(7).remainder(256).to(torch.uint8)  # [12, 3, 2, 2]
    got = remote(srv.url, retries=0)(x, ["p"] * 12, [{}] * 12, _ctx(g))
    assert [n for n, _ in reward.calls] == parts  # never more than 4 rows (or one group of 6) per reward call
    assert all(groups == [i // g for i in range(n)] for n, groups in reward.calls)  # ctx.group of each part
    ctx = RewardContext(group_size=g, group=torch.arange(12) // g)
    torch.testing.assert_close(got, GroupCentred()(x, ["p"] * 12, [{}] * 12, ctx))  # == one call on all 12


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_client_dripping_its_request_is_cut_off_at_the_deadline(server_factory, monkeypatch, where):
    monkeypatch.setattr(server_mod, "HEADER_DEADLINE_S", 0.5)
    monkeypatch.setattr(server_mod, "BODY_BASE_S", 0.5)
    s = server_factory(mean_pixel, max_connections=1, token="t")  # one slot: the dripper holds it while it drips
    drip = socket.create_connection(("127.0.0.1", s.port), timeout=5)
    head = b"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nContent-Length: 1000\r\n\r\n"
    if where == "body":
        drip.sendall(head)
    t0, cut_after = time.monotonic(), None
    while cut_after is None and time.monotonic() - t0 < 2.0:  # one byte per 50 ms: each recv is quick
        try:
            drip.send(b"a")
            if select.select([drip], [], [], 0.05)[0] and drip.recv(1) == b"":
                cut_after = time.monotonic() - t0
        except OSError:
            cut_after = time.monotonic() - t0
    drip.close()
    assert cut_after is not None and 0.4 <= cut_after < 1.5
    # the slot is free again: a real client is served although the dripper had minutes of bytes left to drip
    assert remote(s.url, token="t", retries=0)(_images(2), ["a", "b"], [{}, {}], _ctx()).shape == (2,)


def test_a_reward_slower_than_the_client_timeout_is_scored_once_and_named(server_factory):
    calls = []

    def slow(samples, prompts, meta, ctx):
        calls.append(time.monotonic())
        time.sleep(0.6)
        return mean_pixel(samples, prompts, meta, ctx)

    srv = server_factory(slow)
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        remote(srv.url, timeout=0.2, retries=2, backoff=0.01)(_images(2), ["a", "b"], [{}, {}], _ctx())
    msg = str(e.value)
    assert "did not answer within timeout=0.2s" in msg and "'timeout'" in msg and "not reachable" not in msg
    time.sleep(max(0.0, t0 + 1.0 - time.monotonic()))  # a retry's copy would have started by now (at 0.6 s)
    assert len(calls) == 1


def test_a_queued_request_whose_client_left_is_never_scored(server_factory, monkeypatch, caplog):
    """The remote client that times out resets its connection (a plain close looks like a half-close, which is
    answered): the server drops its queued request unscored."""
    caplog.set_level(logging.INFO, logger="mmgrpo.rewards.server")
    monkeypatch.setattr(server_mod, "CLIENT_CHECK_S", 0.02)
    gate, calls, out = threading.Event(), [], []

    def gated(samples, prompts, meta, ctx):
        calls.append(len(prompts))
        gate.wait(5)
        return mean_pixel(samples, prompts, meta, ctx)

    srv = server_factory(gated)
    fn = remote(srv.url, retries=0)
    first = threading.Thread(target=lambda: out.append(fn(_images(2), ["a"] * 2, [{}] * 2, _ctx())))
    first.start()
    for _ in range(100):  # bounded wait (<= 2 s) for the first request to be in the reward
        if calls:
            break
        time.sleep(0.02)
    with pytest.raises(UserError, match="did not answer within timeout=0.2s"):  # queued behind the first, gone
        remote(srv.url, timeout=0.2, retries=0)(_images(4), ["b"] * 4, [{}] * 4, _ctx())
    for _ in range(100):  # bounded wait (<= 2 s) for the handler to see its client gone
        if any("request cancelled" in r.getMessage() for r in caplog.records):
            break
        time.sleep(0.02)
    gate.set()
    first.join(timeout=5)
    for _ in range(100):  # bounded wait for the worker to reach (and drop) the cancelled job
        if getattr(srv.batcher, "dropped", 0) or len(calls) > 1:
            break
        time.sleep(0.02)
    assert calls == [2] and out[0].shape == (2,) and srv.batcher.dropped == 1


def test_a_client_that_half_closes_after_its_request_still_gets_its_answer(server_factory, monkeypatch, caplog):
    """shutdown(SHUT_WR) once a complete request is sent is legal HTTP/1.1 (curl and some proxies do it): the end of
    stream it sends while the reward runs is not a client gone. The server took it for one, cancelled the request
    and closed the connection unanswered."""
    caplog.set_level(logging.INFO, logger="mmgrpo.rewards.server")
    monkeypatch.setattr(server_mod, "CLIENT_CHECK_S", 0.02)
    gate, calls = threading.Event(), []

    def gated(samples, prompts, meta, ctx):
        calls.append(len(prompts))
        gate.wait(5)
        return mean_pixel(samples, prompts, meta, ctx)

    srv = server_factory(gated)
    x = _images(2)
    body = encode_request(x, ["a", "b"], [{}, {}], group_size=2)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        s.shutdown(socket.SHUT_WR)
        for _ in range(100):  # bounded wait (<= 2 s) for the request to be in the reward
            if calls:
                break
            time.sleep(0.02)
        time.sleep(0.2)  # ~10 of the handler's checks see the end of stream while the reward runs
        gate.set()
        reply = b"".join(iter(lambda: s.recv(1 << 16), b""))
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 "), reply[:200]
    want = mean_pixel(quantise_uint8(x).float() / 255, ["a", "b"], [{}, {}], _ctx())
    assert json.loads(payload)["rewards"] == pytest.approx(want.tolist(), abs=1e-6)
    assert calls == [2] and srv.batcher.dropped == 0
    assert not any("cancelled" in r.getMessage() for r in caplog.records)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/score", data=body, method="POST"), timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_reward_raising_system_exit_stops_the_worker_loudly(server_factory):
    def quits(samples, prompts, meta, ctx):
        raise SystemExit("loader: error: unrecognized arguments")

    srv = server_factory(quits)
    body = encode_request(_images(2), ["a", "b"], [{}, {}], group_size=2)
    code, reply = _post(srv.url, body)
    assert code >= 500 and "SystemExit" in reply["error"] and "unrecognized arguments" in reply["error"]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(srv.url + "/health", timeout=5)
    health = json.loads(e.value.read())
    assert e.value.code == 503 and health["status"] == "failed" and "SystemExit" in health["error"]
    t0 = time.monotonic()
    code, reply = _post(srv.url, body)  # no hang on a worker that is gone
    assert code == 503 and "worker stopped" in reply["error"] and "restart" in reply["error"]
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(UserError, match="worker stopped.*SystemExit"):  # `mmgrpo serve-reward` exits 2 with it
        server_mod.wait_until_stopped(srv, threading.Event(), poll_s=0.01)


def _flagged(values):
    def fn(samples, prompts, meta, ctx):
        return values

    fn.nan_means_not_applicable = True
    return fn


def _returns(values):
    return lambda samples, prompts, meta, ctx: values


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "fn,needle",
    [  # needle: what both errors name (None: both accept and give the same column)
        (_returns(["111", 2.0, 3.0, 4.0]), "'111' (str)"),
        (_returns([1.0, True, 3.0, 4.0]), "true (bool)"),
        (_returns(torch.tensor([True, False, True, False])), "torch.bool tensor"),
        (_returns(torch.tensor([1.0, NAN, 3.0, 4.0])), "row 1: nan"),
        (_returns([INF, 1.0, 3.0, 4.0]), "row 0: inf"),
        (_flagged([INF, 1.0, 3.0, 4.0]), "row 0: inf"),  # ±inf is never "does not apply"
        # a [G, B] table for N = G x B rows: which order? (the server flattened it and the client trained on it)
        (_returns(torch.ones(2, 2)), "shape [2, 2] for 4 rows"),
        # finite, but not in fp32 (the server sent 1e39 and the client read inf: "non-finite")
        (_returns([1.0, 1e39, 3.0, 4.0]), "too large for fp32 (row 1: 1e+39"),
        (_flagged([1.0, NAN, 3.0, 4.0]), None),
        (_flagged(torch.tensor([NAN, 2.0, 3.0, 4.0])), None),
        (_returns([None, 2.0, 3.0, 4.0]), None),
    ],
)
def test_remote_and_local_agree_on_what_a_reward_may_return(server_factory, fn, needle):
    from mmgrpo.train.scoring import to_column  # the trainer's check of a local reward's column

    srv = server_factory(fn, name="r")
    x, prompts, meta, ctx = _images(4), ["a", "a", "b", "b"], [{}] * 4, _ctx(2)
    nan_ok = getattr(fn, "nan_means_not_applicable", False)
    remote_fn = remote(srv.url, retries=0)
    if needle is None:
        local = to_column("r", fn(x, prompts, meta, ctx), 4, nan_ok)
        got = to_column("remote", remote_fn(x, prompts, meta, ctx), 4, False)  # NaN came back as None
        torch.testing.assert_close(got, local, equal_nan=True)
        return
    with pytest.raises(UserError) as local_error:
        to_column("r", fn(x, prompts, meta, ctx), 4, nan_ok)
    with pytest.raises(UserError) as e:
        remote_fn(x, prompts, meta, ctx)
    # the same rule, the same words: the server's 500 carries the trainer's own message for reward 'r'
    assert needle in str(local_error.value) and "HTTP 500" in str(e.value) and str(local_error.value) in str(e.value)


def test_non_finite_pixels_are_refused_before_quantisation():
    from mmgrpo.rewards.image_utils import as_images

    x = _images(3)
    x[1, 0, 0, 0] = NAN
    x[2, 1, 2, 3] = INF
    with pytest.raises(UserError, match=r"non-finite values \(NaN/inf\) at rows 1, 2"):
        encode_request(x, ["a"] * 3, [{}] * 3, group_size=1)  # NaN was quantised to 0: scored as black
    with pytest.raises(UserError, match="non-finite"):
        as_images(x)  # the local image rewards' [0, 1] check had the same blind spot
    with pytest.raises(UserError, match="non-finite"):
        as_images([x[0], x[1]])


def _npz(**members) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **members)
    return buf.getvalue()


def test_npz_with_unexpected_members_or_lying_shapes_is_refused_before_parsing(server_factory):
    import zipfile

    from numpy.lib import format as npy

    good = encode_request(_images(2), ["a", "b"], [{}, {}], group_size=2)
    with np.load(io.BytesIO(good)) as z:
        header, samples = z["header"], z["samples"]
    with pytest.raises(ValueError, match="'extra.npy' is not expected"):
        decode_request(_npz(header=header, samples=samples, extra=np.zeros(1)))
    lying = io.BytesIO()  # a 16-byte member whose .npy header claims 3 TB
    with zipfile.ZipFile(lying, "w") as zf:
        zf.writestr("header.npy", _npy_bytes(header))
        claim = io.BytesIO()
        npy.write_array_header_1_0(claim, {"descr": "|u1", "fortran_order": False, "shape": (10**6, 3, 1000, 1000)})
        zf.writestr("samples.npy", claim.getvalue() + b"\0" * 16)
    srv = server_factory(mean_pixel)
    code, reply = _post(srv.url, lying.getvalue())
    assert code == 400 and "claims shape [1000000, 3, 1000, 1000]" in reply["error"]
    assert srv.reward_calls == 0


def _npy_bytes(a: np.ndarray) -> bytes:
    from numpy.lib import format as npy

    buf = io.BytesIO()
    npy.write_array(buf, a)
    return buf.getvalue()


def test_a_big_endian_array_sample_is_scored_as_its_native_values(server_factory):
    srv = server_factory(lambda samples, prompts, meta, ctx: samples.double())
    header = {"version": 1, "kind": "array", "group_size": 1, "prompts": ["a", "b"], "meta": [{}, {}]}
    body = _npz(header=np.frombuffer(json.dumps(header).encode(), np.uint8), samples=np.array([1.5, -2.0], ">f4"))
    assert _post(srv.url, body) == (200, {"rewards": [1.5, -2.0]})  # was a 500: torch takes native order only


# ---------------------------------------------------------------------------------------------- servers not ours


class _Canned(BaseHTTPRequestHandler):
    """Answers every request with ``server.answer(handler) -> (code, headers, body)`` and records what it got."""

    def log_message(self, *args):
        pass

    def _any(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append((self.command, self.path, self.headers.get("Authorization")))
        code, headers, body = self.server.answer(self)
        self.send_response(code)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _any


@pytest.fixture
def canned():
    """``canned(answer)`` -> a running stdlib HTTP server (``.url``, ``.seen``: (method, path, Authorization))."""
    servers = []

    def make(answer):
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
        httpd.daemon_threads = True
        httpd.answer, httpd.seen = answer, []
        httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(httpd)
        return httpd

    yield make
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def _json_answer(text: str, code: int = 200, **headers):
    return lambda handler: (code, {"Content-Type": "application/json", **headers}, text.encode())


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_refused_naming_its_location_and_the_token_never_leaves(canned, code):
    sink = canned(_json_answer('{"rewards": [0.0, 0.0]}'))  # another host: would get the token, choose the rewards
    moved = canned(lambda handler: (code, {"Location": sink.url + "/stolen"}, b""))
    fn = remote(moved.url, token="s3cret-token", retries=2, backoff=0.01)
    with pytest.raises(UserError) as e:
        fn(_images(2), ["p"] * 2, [{}] * 2, _ctx())
    assert f"HTTP {code}" in str(e.value) and sink.url + "/stolen" in str(e.value) and "redirect" in str(e.value)
    assert sink.seen == []  # urllib's default handler re-sent the request, token and all, to the Location
    assert moved.seen == [("POST", "/score", "Bearer s3cret-token")]  # once: a redirect is not retried


@pytest.mark.parametrize(
    "body,why",
    [
        ("<html><body>Welcome to nginx!</body></html>", "JSONDecodeError"),
        ('{"scores": [1.0, 2.0]}', "no 'rewards' list"),
        ("[1.0, 2.0]", "no 'rewards' list"),
        ('{"rewards": ' + "[" * 50000 + "]" * 50000 + "}", "RecursionError"),
    ],
)
def test_a_200_that_is_not_reward_json_says_so_without_retrying(canned, body, why):
    other = canned(_json_answer(body))
    with pytest.raises(UserError) as e:
        remote(other.url, retries=2, backoff=0.01)(_images(2), ["p"] * 2, [{}] * 2, _ctx())
    msg = str(e.value)
    assert "not mmgrpo's reward JSON" in msg and why in msg and "not reachable" not in msg
    assert len(other.seen) == 1  # the server answered: a retry would get the same page


@pytest.mark.parametrize(
    "value,needle",
    [
        ('"1.0"', "a string '1.0', not a JSON number"),
        ("true", "a boolean True, not a JSON number"),
        ("[1.0]", "a list [1.0], not a JSON number"),
        ('{"a": 1}', "an object {'a': 1}, not a JSON number"),
        ("1" + "0" * 400, "too large for fp32"),
        ("1e39", "1e+39, too large for fp32"),
        ("NaN", "nan, which is not a JSON number"),
        ("-Infinity", "-inf, which is not a JSON number"),
    ],
)
def test_an_answered_value_that_is_not_a_number_or_null_is_named_with_its_row(canned, value, needle):
    other = canned(_json_answer('{"rewards": [1.0, ' + value + "]}"))
    x, prompts, meta, ctx = _images(2), ["p"] * 2, [{}] * 2, _ctx()
    with pytest.raises(UserError) as e:
        remote(other.url, retries=0)(x, prompts, meta, ctx)
    msg = str(e.value)
    assert f"reward server at {other.url} sent" in msg and needle in msg and "row 1's reward" in msg
    # as the trainer calls it: the server's malformed value, not "reward 'remote' raised ValueError"
    from mmgrpo.train.scoring import call_reward

    with pytest.raises(UserError) as e:
        call_reward("remote", remote(other.url, retries=0), x, prompts, meta, ctx)
    assert "raised" not in str(e.value) and "row 1's reward" in str(e.value)


def test_a_503_is_retried_and_its_message_kept_when_the_server_then_refuses(canned):
    said = '{"error": "the reward server\'s worker stopped: the reward raised SystemExit: bye"}'

    def stop_after_answering(handler):
        threading.Thread(target=lambda: (handler.server.shutdown(), handler.server.server_close())).start()
        return 503, {"Content-Type": "application/json"}, said.encode()

    gone = canned(stop_after_answering)
    with pytest.raises(UserError) as e:
        remote(gone.url, retries=2, backoff=0.2)(_images(2), ["p"] * 2, [{}] * 2, _ctx())
    msg = str(e.value)  # both: the 503 said why, the later attempts that nothing listens any more
    assert "attempt 1: HTTP 503" in msg and "SystemExit: bye" in msg
    assert "attempts 2-3" in msg and "refused" in msg.lower()


def test_only_502_503_504_and_connection_failures_are_retried(canned):
    answers = iter([(502, {}, b'{"error": "bad gateway"}'), (504, {}, b"{}"), (200, {}, b'{"rewards": [1, 2]}')])
    flaky = canned(lambda handler: next(answers))
    assert remote(flaky.url, retries=2, backoff=0.01)(_images(2), ["p"] * 2, [{}] * 2, _ctx()).tolist() == [1, 2]
    assert len(flaky.seen) == 3
    proxied = iter([(522, {}, b"origin timed out"), (200, {}, b'{"rewards": [3, 4]}')])  # Cloudflare's origin errors
    behind = canned(lambda handler: next(proxied))
    assert remote(behind.url, retries=2, backoff=0.01)(_images(2), ["p"] * 2, [{}] * 2, _ctx()).tolist() == [3, 4]
    for code in (500, 501):  # the server (the reward) failed on these rows: sent once
        failing_server = canned(_json_answer('{"error": "reward failed: RuntimeError: judge OOM"}', code))
        with pytest.raises(UserError, match=f"HTTP {code}: reward failed: RuntimeError: judge OOM; not re-sent"):
            remote(failing_server.url, retries=2, backoff=0.01)(_images(2), ["p"] * 2, [{}] * 2, _ctx())
        assert len(failing_server.seen) == 1


def test_a_reward_raising_system_exit_is_reported_once_with_its_message(server_factory):
    def quits(samples, prompts, meta, ctx):
        raise SystemExit("loader: error: unrecognized arguments")

    srv = server_factory(quits)
    with pytest.raises(UserError) as e:
        remote(srv.url, retries=2, backoff=0.01)(_images(2), ["p"] * 2, [{}] * 2, _ctx())
    assert "SystemExit: loader: error: unrecognized arguments" in str(e.value) and srv.reward_calls == 1


# ---------------------------------------------------------------------------------------------- options and the CLI

SERVED_OPTIONS = """
from mmgrpo.core.errors import bad_option


def checked(scale: float = 1.0):
    def fn(samples, prompts, meta, ctx):
        return [scale] * len(prompts)
    return fn


def _check(prefix, scale=1.0):
    if scale <= 0:
        raise bad_option(f"{prefix}.scale", scale, "must be > 0")


checked.check = _check


def loads(path: str = "model.safetensors"):
    raise FileNotFoundError(f"no such model file: {path}")
"""


@pytest.mark.parametrize(
    "option,needle",
    [
        ("scale=-1", "--option scale=-1.0: must be > 0"),  # the factory's own .check
        ("scale=nan", "--option scale=nan: reward 'served_opts_d4.checked' takes a finite number here"),
        ("scale=abc", "--option scale"),  # not a float
        ("sclae=2", "did you mean '--option scale'"),
    ],
)
def test_serve_reward_options_get_the_checks_train_gives_them(tmp_path, monkeypatch, capsys, option, needle):
    (tmp_path / "served_opts_d4.py").write_text(SERVED_OPTIONS)
    monkeypatch.syspath_prepend(str(tmp_path))
    stop = threading.Event()
    stop.set()  # if it served, stop at once (it served, and every request failed)
    with pytest.raises(UserError) as e:  # before anything is served
        main(["served_opts_d4.checked", "--option", option, "--port", "0"], stop=stop)
    assert needle in str(e.value)
    from mmgrpo.train.cli import main as cli_main

    assert cli_main(["serve-reward", "served_opts_d4.checked", "--option", option, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_serve_reward_names_a_factory_that_raises_on_its_options(tmp_path, monkeypatch):
    (tmp_path / "served_opts_d4b.py").write_text(SERVED_OPTIONS)
    monkeypatch.syspath_prepend(str(tmp_path))
    stop = threading.Event()
    stop.set()  # a good option serves (and stops at once)
    with pytest.raises(UserError, match=r"could not be built with .*path.*x.*FileNotFoundError: .*file: x"):
        main(["served_opts_d4b.loads", "--option", "path=x", "--port", "0"], stop=stop)
    assert main(["served_opts_d4b.checked", "--option", "scale=2", "--port", "0"], stop=stop) == 0


BANDIT_BASE = {
    "pipeline": "bandit",
    "data": {"options": {"num_prompts": 4, "num_arms": 3}},
    "trainer": {"max_steps": 1, "prompts_per_step": 2, "group_size": 3, "progress": False},
}


def _documented_yaml(text: str, after: str) -> dict:
    """The YAML block that follows ``after`` in ``text``: a fenced ```yaml block (markdown), else an indented one
    after ``::`` (a docstring)."""
    import textwrap

    from mmgrpo.core.config_yaml import load_yaml

    rest = text.split(after, 1)[1]
    if "```yaml\n" in rest:
        return load_yaml(rest.split("```yaml\n", 1)[1].split("```", 1)[0])
    return load_yaml(textwrap.dedent(rest.split("::\n\n", 1)[1].split("\n\n", 1)[0]))


def test_the_documented_yaml_of_the_remote_reward_loads():
    from pathlib import Path

    from mmgrpo.rewards import remote as remote_mod
    from mmgrpo.train.config import load_config

    extending = (Path(__file__).resolve().parents[2] / "docs" / "extending.md").read_text()
    for data in (
        _documented_yaml(remote_mod.__doc__, "In a training config"),  # the form refused: {name: remote, url: ...}
        _documented_yaml(extending, "### A reward in another process"),
    ):
        cfg = load_config(None, base={**BANDIT_BASE, **data})
        assert cfg.rewards[0].name == "remote" and cfg.rewards[0].options["url"].startswith("http://")


@pytest.mark.parametrize(
    "option,needle",
    [
        (
            "timeout: 1e300",
            "rewards.0.options.timeout=1e+300: give the seconds to wait",
        ),  # was OverflowError at step 0
        ("timeout: 0", "rewards.0.options.timeout=0"),
        ("backoff: 1e300", "rewards.0.options.backoff=1e+300"),
        ("backoff: -1", "rewards.0.options.backoff=-1"),
        ("retries: 1000", "rewards.0.options.retries=1000"),
        ("url: ftp://x", "rewards.0.options.url='ftp://x'"),
    ],
)
def test_remote_options_out_of_range_are_refused_at_config_load(option, needle):
    from mmgrpo.train.config import load_config

    options = "{url: 'http://127.0.0.1:9', " + option + "}" if "url" not in option else "{" + option + "}"
    with pytest.raises(UserError) as e:
        load_config(None, [f"rewards=[{{name: remote, options: {options}}}]"], base=BANDIT_BASE)
    assert needle in str(e.value)
    with pytest.raises(UserError):  # and when built directly
        remote(**{"url": "http://127.0.0.1:9", **load_yaml_options(option)})


def load_yaml_options(option: str) -> dict:
    from mmgrpo.core.config_yaml import load_yaml

    return load_yaml("{" + option + "}")


def test_the_413_hint_is_said_once(server_factory):
    srv = server_factory(mean_pixel, max_request_bytes=1024)
    with pytest.raises(UserError) as e:
        remote(srv.url, retries=0)(_images(4, 16, 16), ["p"] * 4, [{}] * 4, _ctx())
    assert "413" in str(e.value) and str(e.value).count("--max-request-mb") == 1


def _request(url: str, method: str, path: str, data: bytes | None = None):
    req = urllib.request.Request(url + path, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.mark.parametrize(
    "method,path,code,allow",
    [
        ("GET", "/score", 405, "POST"),  # was 404 "no such path '/score'"
        ("PUT", "/score", 405, "POST"),  # was the stdlib's HTML 501 page
        ("DELETE", "/score", 405, "POST"),
        ("POST", "/health", 405, "GET"),
        ("PATCH", "/health", 405, "GET"),
        ("PUT", "/nowhere", 404, None),
        ("GET", "/nowhere", 404, None),
    ],
)
def test_a_wrong_method_is_a_json_405_with_allow(server_factory, method, path, code, allow):
    srv = server_factory(mean_pixel)
    got, headers, body = _request(srv.url, method, path, b"abc" if method in ("PUT", "POST", "PATCH") else None)
    assert got == code and headers.get("Allow") == allow and headers.get("Content-Type") == "application/json"
    assert "error" in json.loads(body)
    got, headers, body = _request(srv.url, "HEAD", "/score")  # HEAD: the status and headers, no body
    assert got == 405 and headers.get("Allow") == "POST" and body == b""
    assert remote(srv.url, retries=0)(_images(2), ["p"] * 2, [{}] * 2, _ctx()).shape == (2,)  # still serving


def test_serve_reward_stops_on_sigterm_as_on_ctrl_c(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "mmgrpo.train.cli", "serve-reward", "bandit_arm_value", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        first = proc.stdout.readline()  # "serving reward ... at http://127.0.0.1:PORT ..."
        url = first.split(" at ")[1].split()[0]
        assert json.loads(urllib.request.urlopen(url + "/health", timeout=5).read())["status"] == "ok"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err  # was 143 at once, with no shutdown
    assert "stopped serving reward 'bandit_arm_value'" in out and "Traceback" not in err


def test_requests_read_their_npz_one_at_a_time(monkeypatch):
    """numpy parses .npy headers with ast.literal_eval, which CPython 3.11 cannot run in two threads at once:
    test_fifty_concurrent_clients_... failed once with 'HTTP 400: cannot read NPZ (SystemError: AST constructor
    recursion depth mismatch (before=60, after=56))' (cpython gh-106905), a refused request that ends a client's
    run. The server's threads now read the bodies one after another."""
    from numpy.lib import format as npy

    inside, most, lock = [0], [0], threading.Lock()
    real = npy.read_array_header_1_0

    def slow_header(*args, **kwargs):  # marks how many threads parse a header at once
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.01)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(npy, "read_array_header_1_0", slow_header)
    body = encode_request(_images(2), ["p", "p"], [{}, {}], group_size=2)
    threads = [threading.Thread(target=decode_request, args=(body,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert most[0] == 1
