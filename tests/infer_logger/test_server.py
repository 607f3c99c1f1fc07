"""Running the sidecar in a thread of another process (the quickstart's way), on its own server."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from infer_logger import events as ev
from infer_logger.config import load_settings
from infer_logger.errors import InferLoggerError
from infer_logger.server import SidecarThread
from infer_logger.testing import CannedPredictor, free_port
from tests.servers import Process, sidecar_process


def test_serves_then_drains_on_exit(echo_predictor: Process, tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "events.jsonl"
    settings = load_settings(None, port=port, predictor_url=echo_predictor.url,
                             spool={"dir": str(tmp_path / "spool")}, sinks=[{"type": "file", "path": str(out)}])
    with SidecarThread(settings):
        r = httpx.post(f"http://127.0.0.1:{port}/v1/models/echo:predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]},
                       headers={"x-request-id": "t-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "t-1"
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").json()["ready"] is True
    # Leaving the block stopped the server, then drained the spool into the sink.
    events = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [e["id"] for e in events] == ["t-1", "t-1"]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz")


@pytest.mark.parametrize("server", ["httptools", "uvicorn"])
def test_a_failed_start_is_raised_to_the_caller(tmp_path: Path, server: str) -> None:
    """Under uvicorn a taken port was its SystemExit(3), out of the caller's process."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = load_settings(None, port=port, server=server, spool={"dir": str(tmp_path / "spool")},
                                 sinks=[{"type": "file", "path": str(tmp_path / "e.jsonl")}])
        with pytest.raises(InferLoggerError, match=f"cannot listen on 127.0.0.1:{port}"), SidecarThread(settings):
            pass


def test_uvicorn_refuses_an_oversized_head_with_431() -> None:
    """The broker and the explainer run on uvicorn's httptools protocol, which buffers a head of
    any size: `uvicorn_config` gives it the sidecar's 64 KiB limit (a big body is not a big head)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from infer_logger.demo.quickstart import ServerThread
    from infer_logger.server import uvicorn_config

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"body": len(await request.body())})

    async def slow(request: Request) -> JSONResponse:
        await asyncio.sleep(0.3)
        return JSONResponse({"slow": True})

    port = free_port()
    app = Starlette(routes=[Route("/p", echo, methods=["POST"]), Route("/slow", slow)])
    with ServerThread(uvicorn_config(app, "127.0.0.1", port)):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /p HTTP/1.1\r\nhost: x\r\nx-big: ")
            for _ in range(20):  # 80 KiB of one header, in pieces, never finished
                sock.sendall(b"a" * 4096)
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431")
        assert orjson.loads(body)["error"] == "the request line and headers are larger than 65536 bytes"
        # Pipelined behind a request being answered: that answer goes out whole, then the
        # connection closes (the 431 would have been taken for its answer).
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
            time.sleep(0.1)
            sock.sendall(b"GET /slow HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * (70 << 10))
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head and body == b'{"slow":true}'
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(2):  # within the limit, on one connection, with a body of 1 MiB
                r = client.post("/p", content=b"x" * (1 << 20), headers={"x-big": "a" * 60000})
                assert r.status_code == 200 and r.json() == {"body": 1 << 20}


def test_uvicorn_refuses_an_upgrade_with_a_body_it_would_lose() -> None:
    """h2c offered on a POST (`curl --http2 -d`): llhttp stops at the head, and the app got an
    empty body (the broker stored an event without its data): a 501 instead; without a body, or
    without an upgrade, the request is served."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from infer_logger.demo.quickstart import ServerThread
    from infer_logger.server import uvicorn_config

    async def echo(request: Request) -> JSONResponse:
        if request.query_params.get("slow"):
            await asyncio.sleep(0.3)
        return JSONResponse({"body": (await request.body()).decode()})

    port = free_port()
    app = Starlette(routes=[Route("/p", echo, methods=["GET", "POST"])])
    upgrade = b"connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
    with ServerThread(uvicorn_config(app, "127.0.0.1", port)):
        for head, expected in ((b"POST /p HTTP/1.1\r\nhost: x\r\n" + upgrade + b"content-length: 5\r\n\r\nhello",
                                b"HTTP/1.1 501"),
                               (b"GET /p HTTP/1.1\r\nhost: x\r\n" + upgrade + b"\r\n", b"HTTP/1.1 200")):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(head)
                raw = b""
                with contextlib.suppress(socket.timeout):
                    while chunk := sock.recv(65536):
                        raw += chunk
                        if b"}" in raw:
                            break
            assert raw.startswith(expected), raw
        assert httpx.post(f"http://127.0.0.1:{port}/p", content=b"hello").json() == {"body": "hello"}
        # Pipelined behind a request being answered, it would have posed as that request's answer.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /p?slow=1 HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\na"
                         b"POST /p HTTP/1.1\r\nhost: x\r\n" + upgrade + b"content-length: 5\r\n\r\nhello")
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b'{"body":"a"}') and b"501" not in raw


def test_the_sidecar_answers_a_dribbled_request_408(tmp_path: Path) -> None:
    """`request_read_timeout` reaches the sidecar's server: a head sent a byte at a time is cut off."""
    port = free_port()
    settings = load_settings(None, port=port, request_read_timeout=0.5, spool={"dir": str(tmp_path / "spool")},
                             sinks=[{"type": "file", "path": str(tmp_path / "e.jsonl")}])
    with SidecarThread(settings), socket.create_connection(("127.0.0.1", port), timeout=0.05) as sock:
        raw = b""
        for byte in b"GET /v1/models/m HTTP/1.1\r\nhost: x\r\nx-slow: " + b"a" * 200:  # 10 s at most
            sock.sendall(bytes([byte]))
            with contextlib.suppress(socket.timeout):
                if raw := sock.recv(65536):
                    break
        sock.settimeout(5)
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head
    assert orjson.loads(body)["error"].endswith("(request_read_timeout)")


@contextlib.contextmanager
def inherited(sig: int, disposition: Any) -> Iterator[None]:
    """Processes started meanwhile get `disposition` for `sig`, whatever the tests' own (an
    ignored one is inherited across exec: a CI run under nohup ignores SIGHUP)."""
    previous = signal.signal(sig, disposition)
    try:
        yield
    finally:
        signal.signal(sig, previous)


def stop_in_flight(tmp_path: Path, delay: float, sig: int,
                   *extra: str) -> tuple[int | None, int | None, dict[str, object]]:
    """A sidecar process signalled `sig` while a request waits `delay` s on the predictor: the
    client's status (None: no answer), the sidecar's exit code and the events by type."""
    out = tmp_path / "events.jsonl"
    got: dict[str, int | None] = {}

    def ask(url: str) -> None:
        try:
            got["status"] = httpx.post(url + "/v1/models/m:predict", json={"instances": [[1]]},
                                       headers={"ce-id": "f-1"}, timeout=90).status_code
        except httpx.TransportError:
            got["status"] = None

    with CannedPredictor(body=b'{"predictions": [1]}') as predictor, inherited(signal.SIGHUP, signal.SIG_DFL):
        predictor.delay = delay
        proc = sidecar_process(predictor.url, tmp_path, "--log-url", f"file://{out}", *extra).start()
        assert proc.proc is not None
        client = threading.Thread(target=ask, args=(proc.url,))
        try:
            client.start()
            deadline = time.monotonic() + 30  # hang guards, not timings
            while predictor.attempts < 1:
                assert time.monotonic() < deadline, "the request never reached the predictor"
                time.sleep(0.02)
            proc.proc.send_signal(sig)
            client.join(90)
            code = proc.proc.wait(90)
        finally:
            proc.stop()
    events = {e["type"]: e for e in (orjson.loads(line) for line in out.read_bytes().splitlines())} \
        if out.exists() else {}
    return got.get("status"), code, events


def test_a_stop_answers_a_request_the_predictor_takes_longer_than_10s_over(tmp_path: Path) -> None:
    """The stop's grace was a fixed 10 s: a request the predictor answered later, within --timeout
    (60 s), was cut off, unanswered and without a response event."""
    status, code, events = stop_in_flight(tmp_path, 12.0, signal.SIGTERM)
    assert (status, code) == (200, 0)
    assert events[ev.RESPONSE]["statuscode"] == 200
    assert events[ev.REQUEST]["id"] == "f-1"


@pytest.mark.parametrize("server", ["httptools", "uvicorn"])
def test_sighup_stops_the_sidecar_gracefully(tmp_path: Path, server: str) -> None:
    """SIGHUP (a closed terminal, `kill -HUP`) killed the sidecar at once: now it is a SIGTERM.
    Under uvicorn, which raises the signal again once stopped, it exited -15 after the stop."""
    status, code, events = stop_in_flight(tmp_path, 1.0, signal.SIGHUP, "--server", server)
    assert (status, code) == (200, 0)
    assert set(events) == {ev.REQUEST, ev.RESPONSE}


def test_a_sidecar_started_with_sighup_ignored_keeps_running_at_one(tmp_path: Path) -> None:
    """`nohup infer-logger proxy &`: nohup ignores SIGHUP so that closing the terminal stops
    nothing; the stop handler replaced that, and the terminal's hangup stopped the sidecar."""
    with inherited(signal.SIGHUP, signal.SIG_IGN):  # as nohup does
        proc = sidecar_process("http://127.0.0.1:9", tmp_path).start()
    assert proc.proc is not None
    try:
        proc.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)  # a stop would have begun: the listener closed, or the process gone
        assert proc.proc.poll() is None and httpx.get(proc.url + "/healthz", timeout=10).status_code == 200
    finally:
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(timeout=60) == 0


@pytest.mark.parametrize("server", ["httptools", "uvicorn"])
def test_a_second_signal_as_the_sidecar_exits_does_not_kill_it(tmp_path: Path, server: str) -> None:
    """Once stopped, the loop's handlers gone, a signal in the ~0.2 s the interpreter takes to
    exit killed it: exit -15 after a clean stop (a race: a few gaps catch it)."""
    for gap in (0.05, 0.1, 0.15, 0.25):
        (tmp_path / str(gap)).mkdir()
        proc = sidecar_process("http://127.0.0.1:9", tmp_path / str(gap), "--server", server).start()
        assert proc.proc is not None
        try:
            proc.proc.send_signal(signal.SIGTERM)
            time.sleep(gap)
            if proc.proc.poll() is None:
                proc.proc.send_signal(signal.SIGTERM)
            assert proc.proc.wait(30) == 0, gap
        finally:
            proc.stop()


def test_under_uvicorn_a_request_still_arriving_at_the_cut_is_503(tmp_path: Path) -> None:
    """Cancelled while its body was read, it was uvicorn's 500 and a CancelledError traceback."""
    proc = sidecar_process("http://127.0.0.1:9", tmp_path, "--server", "uvicorn").start()
    assert proc.proc is not None
    try:
        with socket.create_connection(("127.0.0.1", proc.port), timeout=30) as client:
            client.sendall(b"POST /v1/models/m:predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                           b"content-length: 100\r\n\r\n{\"instances\":")
            time.sleep(0.2)  # the body is being read
            proc.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)  # the stop has begun
            proc.proc.send_signal(signal.SIGINT)
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
        assert proc.proc.wait(30) == 0
    finally:
        proc.stop()
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b"Traceback" not in (tmp_path / "sidecar.log").read_bytes()


@pytest.mark.parametrize("server", ["httptools", "uvicorn"])
def test_a_second_signal_cuts_the_grace_short(tmp_path: Path, server: str) -> None:
    """The grace lasts the predictor timeout (60 s): a second SIGTERM or SIGINT (an impatient
    Ctrl-C) ends it, cutting off the requests still in flight: each is answered 503 (it was reset,
    under uvicorn a 500) and gets a response event saying so (it had none: a request event without
    an answer in the audit)."""
    got: dict[str, int | None] = {}

    def ask(url: str) -> None:
        try:
            got["status"] = httpx.post(url + "/v1/models/m:predict", json={"instances": [[1]]}, timeout=90).status_code
        except httpx.TransportError:
            got["status"] = None

    with socket.socket() as predictor:  # takes connections, answers none
        predictor.bind(("127.0.0.1", 0))
        predictor.listen()
        predictor.settimeout(30)
        proc = sidecar_process(f"http://127.0.0.1:{predictor.getsockname()[1]}", tmp_path,
                               "--log-url", f"file://{tmp_path}/events.jsonl", "--server", server).start()
        assert proc.proc is not None
        client = threading.Thread(target=ask, args=(proc.url,))
        try:
            client.start()
            conn, _ = predictor.accept()  # the request is on its way to the predictor
            proc.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30  # hang guards, not timings
            while True:  # stopping: it no longer listens
                try:
                    socket.create_connection(("127.0.0.1", proc.port), timeout=1).close()
                except OSError:
                    break
                assert time.monotonic() < deadline, "still listening after SIGTERM"
                time.sleep(0.05)
            proc.proc.send_signal(signal.SIGINT)
            assert proc.proc.wait(30) == 0
            client.join(30)
            conn.close()
        finally:
            proc.stop()
    assert got == {"status": 503}
    events = {e["type"]: e for e in map(orjson.loads, (tmp_path / "events.jsonl").read_bytes().splitlines())}
    assert set(events) == {ev.REQUEST, ev.RESPONSE}
    assert events[ev.RESPONSE]["statuscode"] == 503 and "stopped" in events[ev.RESPONSE]["data"]["error"]
