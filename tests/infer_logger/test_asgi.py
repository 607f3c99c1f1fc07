"""Plain-ASGI pieces: the body reader's limit and read deadline (driven by a `receive` that paces
its chunks, as uvicorn's does; the servers' own tests drive them over sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from infer_logger.asgi import READ_RATE_ALLOWANCE, BodyTimeoutError, read_body


def paced(chunks: int, size: int, every: float) -> Any:
    sent = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        await asyncio.sleep(every)
        sent += 1
        return {"type": "http.request", "body": b"x" * size, "more_body": sent < chunks}

    return receive


async def test_a_body_arriving_steadily_gets_a_second_per_mib() -> None:
    """16 chunks of 1/8 MiB at 0.05 s each: 0.8 s in all, past a 0.3 s deadline but within the
    allowance the 2 MiB bought (a plain total deadline cut big uploads on slow links)."""
    body = await read_body(paced(16, int(READ_RATE_ALLOWANCE) // 8, 0.05), timeout=0.3)
    assert len(body) == 2 * int(READ_RATE_ALLOWANCE)


async def test_a_dribbled_body_is_cut_at_the_deadline() -> None:
    with pytest.raises(BodyTimeoutError):
        await read_body(paced(1000, 1, 0.05), timeout=0.3)


@pytest.mark.parametrize(("method", "status", "length"), [
    ("GET", 200, b"2"), ("GET", 204, None), ("GET", 304, None), ("HEAD", 200, None),
])
def test_an_answer_gets_a_content_length_only_where_one_may_be(method: str, status: int,
                                                                length: bytes | None) -> None:
    """`--server uvicorn`: a 204, a 304 and a HEAD answer (the predictor's chunked) were sent
    `content-length: 0` (RFC 9110 8.6: none in a 204; in a 304 and a HEAD answer, the GET's)."""
    import socket

    from infer_logger.asgi import respond
    from infer_logger.demo.quickstart import ServerThread
    from infer_logger.server import uvicorn_config
    from infer_logger.testing import free_port

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await respond(send, status, [], b"{}" if status == 200 and method == "GET" else b"",
                          head=scope["method"] == "HEAD")

    port = free_port()
    with ServerThread(uvicorn_config(app, "127.0.0.1", port)):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(f"{method} / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n".encode())
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
    head = raw.split(b"\r\n\r\n")[0].lower().split(b"\r\n")
    assert head[0].startswith(b"http/1.1 %d" % status)
    lengths = [line.split(b":", 1)[1].strip() for line in head if line.startswith(b"content-length:")]
    assert lengths == ([] if length is None else [length])


def test_a_declared_length_over_the_limit_is_413_before_any_go_ahead() -> None:
    """A client waiting with `Expect: 100-continue` was told to send (uvicorn's 100 at the first
    receive), and uploaded up to the limit before its 413."""
    import socket

    from infer_logger.asgi import BodyLimit, BodyTooLargeError, read_body, respond
    from infer_logger.demo.quickstart import ServerThread
    from infer_logger.server import uvicorn_config
    from infer_logger.testing import free_port

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            try:
                await read_body(receive)
            except BodyTooLargeError as exc:
                await respond(send, 413, [(b"connection", b"close")] if exc.unsent else [], b"{}")
                return
            await respond(send, 200, [], b"{}")

    port = free_port()
    with ServerThread(uvicorn_config(BodyLimit(app, 1000), "127.0.0.1", port)):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\ncontent-length: 999999999999\r\n\r\n")
            raw = b""
            while chunk := sock.recv(65536):  # closed after it: the body may come or not
                raw += chunk
            assert raw.startswith(b"HTTP/1.1 413"), raw[:100]
            # Without the Expect the client is sending: read up to the limit, its answer as before.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 2000\r\n\r\n" + b"x" * 2000)
            raw = b""
            while b"\r\n\r\n" not in raw and (chunk := sock.recv(65536)):
                raw += chunk
            assert raw.startswith(b"HTTP/1.1 413") and b"connection: close" not in raw.lower(), raw[:200]
