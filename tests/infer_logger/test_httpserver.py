"""The sidecar's HTTP/1.1 server, spoken to over real sockets (raw bytes where framing matters)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import orjson
import pytest

from infer_logger import httpserver
from infer_logger.httpserver import HttpServer, Reply, Request
from tests.waiting import until

Handler = Callable[[Request], Awaitable[Reply]]


async def echo(request: Request) -> Reply:
    """Answers with what it was asked: method, path, target, headers, body length."""
    if request.path == "/sleep":
        await asyncio.sleep(float(request.body or b"0.05"))
    if request.path == "/boom":
        raise RuntimeError("handler bug")
    seen = {
        "method": request.method,
        "path": request.path,
        "target": request.target.decode(),
        "headers": [[k.decode(), v.decode()] for k, v in request.headers],
        "body": request.body.decode("latin-1"),
    }
    return 200, [(b"content-type", b"application/json")], orjson.dumps(seen)


@contextlib.asynccontextmanager
async def _slow_client(handler: Handler, *, keep_alive_timeout: float,
                       request_read_timeout: float) -> AsyncIterator[tuple[HttpServer, socket.socket]]:
    """A server of `handler`, and a client connected to it whose kernel takes little of an
    answer it does not read (a 4 KiB receive buffer): the rest waits in the server's transport."""
    srv = HttpServer(handler, keep_alive_timeout=keep_alive_timeout, request_read_timeout=request_read_timeout)
    await srv.start("127.0.0.1", 0)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", srv.port))
        yield srv, sock
    finally:
        sock.close()
        await srv.stop(grace=1)


async def _read_until(sock: socket.socket, done: Callable[[bytearray], bool], size: int = 1 << 16, *,
                      pace: Callable[[], float] = lambda: 0.0) -> bytearray:
    """What the client reads until `done` says it has all; a close before it is a cut."""
    loop, raw = asyncio.get_running_loop(), bytearray()
    while not done(raw):
        data = await asyncio.wait_for(loop.sock_recv(sock, size), 10)
        assert data, f"cut after {len(raw)} bytes"
        raw += data
        if wait := pace():
            await asyncio.sleep(wait)
    return raw


def _buffered(srv: HttpServer) -> bool:
    return any(c.transport is not None and c.transport.get_write_buffer_size() for c in srv.connections)


@pytest.fixture
async def server() -> AsyncIterator[HttpServer]:
    srv = HttpServer(echo, keep_alive_timeout=0.5)
    await srv.start("127.0.0.1", 0)
    yield srv
    await srv.stop(grace=1)


async def exchange(server: HttpServer, data: bytes, *, until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(data)
    await writer.drain()
    try:
        if until_close:
            return await asyncio.wait_for(reader.read(), 5)
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


def answers(raw: bytes) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    """Split a byte stream of content-length framed answers."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = dict(line.split(b": ", 1) for line in lines[1:])
        n = int(headers.get(b"content-length", b"0"))
        out.append((lines[0], headers, rest[:n]))
        raw = rest[n:]
    return out


async def test_keep_alive_requests_with_httpx(server: HttpServer) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        for i in range(3):
            r = await client.post("/v1/models/m:predict", content=b"x" * i, headers={"X-Thing": "A"})
            assert r.status_code == 200
            seen = r.json()
            assert seen["method"] == "POST" and seen["body"] == "x" * i
            assert ["x-thing", "A"] in seen["headers"]  # names lower-cased, values as sent


async def test_path_is_decoded_target_is_not(server: HttpServer) -> None:
    raw = await exchange(server, b"GET /a%20b/c?q=1%202 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    seen = orjson.loads(answers(raw)[0][2])
    assert seen["path"] == "/a b/c"
    assert seen["target"] == "/a%20b/c?q=1%202"


async def test_chunked_request_body_arrives_whole(server: HttpServer) -> None:
    raw = await exchange(server, b"POST /p HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                                 b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert orjson.loads(answers(raw)[0][2])["body"] == "abcde"


async def test_expect_100_continue(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /p HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 3\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"abc")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 OK")
    writer.close()


async def test_pipelined_requests_are_answered_in_order(server: HttpServer) -> None:
    data = (b"POST /sleep HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\n0.2"
            b"GET /second HTTP/1.1\r\nhost: x\r\n\r\n"
            b"GET /third HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    got = answers(await exchange(server, data))
    assert [orjson.loads(body)["path"] for _, _, body in got] == ["/sleep", "/second", "/third"]
    assert got[-1][1][b"connection"] == b"close"


async def test_http_1_0_closes_after_the_answer(server: HttpServer) -> None:
    raw = await exchange(server, b"GET /old HTTP/1.0\r\n\r\n")  # read() returns only at EOF
    status, headers, _ = answers(raw)[0]
    assert status == b"HTTP/1.1 200 OK" and headers[b"connection"] == b"close"


async def test_malformed_request_is_400_with_a_reason(server: HttpServer) -> None:
    raw = await exchange(server, b"NOT HTTP AT ALL\r\n\r\n")
    status, _, body = answers(raw)[0]
    assert status.startswith(b"HTTP/1.1 400")
    assert orjson.loads(body)["error"].startswith("invalid HTTP request")


class TestBodyLimit:
    """Over `max_body_bytes`: 413 with a JSON reason, the connection closed, the rest not read."""

    @pytest.fixture
    async def small(self) -> AsyncIterator[HttpServer]:
        srv = HttpServer(echo, max_body_bytes=10)
        await srv.start("127.0.0.1", 0)
        yield srv
        await srv.stop(grace=1)

    async def test_declared_length_is_refused_before_the_body(self, small: HttpServer) -> None:
        # Only the head is sent: with a 100-continue, a client waits for the go-ahead to send a body.
        raw = await exchange(small, b"POST /p HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
                                    b"content-length: 10000000000\r\n\r\n")
        [(status, headers, body)] = answers(raw)
        assert status.startswith(b"HTTP/1.1 413") and headers[b"connection"] == b"close"
        assert orjson.loads(body) == {"error": "the request body is larger than 10 bytes (max_request_bytes)",
                                      "status": 413}

    async def test_chunked_body_is_cut_off_at_the_limit(self, small: HttpServer) -> None:
        raw = await exchange(small, b"POST /p HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                                    b"8\r\n12345678\r\n8\r\n12345678\r\n")
        assert answers(raw)[0][0].startswith(b"HTTP/1.1 413")

    async def test_a_large_upload_gets_its_413(self, small: HttpServer) -> None:
        """Refused after its head, the body still coming: closing then (its bytes unread) sent a
        reset that overtook the answer, and the client saw a dropped connection instead."""
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{small.port}") as client:
            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(16):
                    yield b"x" * (1 << 20)

            for body in (b"x" * (16 << 20), chunks()):  # sized, then chunked
                answer = await client.post("/p", content=body)
                assert answer.status_code == 413 and "larger than 10 bytes" in answer.json()["error"]

    async def test_a_refused_client_that_goes_on_sending_is_cut_off(self, small: HttpServer,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
        """After the answer and an end of stream, what the client still sends is dropped, for
        `LINGER` seconds at most: then the connection closes."""
        monkeypatch.setattr(httpserver, "LINGER", 0.3)
        reader, writer = await asyncio.open_connection("127.0.0.1", small.port)
        writer.write(b"POST /p HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)  # to the server's end of stream
        assert answer.startswith(b"HTTP/1.1 413") and len(small.connections) == 1
        with pytest.raises(ConnectionError):  # the server reads (and drops) for a while, then closes
            for _ in range(100):
                writer.write(b"x" * 65536)
                await writer.drain()
                await asyncio.sleep(0.01)
        assert not small.connections
        writer.close()

    async def test_a_transfer_coding_other_than_chunked_is_501(self, small: HttpServer) -> None:
        """The parser takes chunked off and would pass a gzip-coded body on as if plain."""
        raw = await exchange(small, b"POST /p HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n"
                                    b"3\r\nabc\r\n0\r\n\r\n")
        status, _, body = answers(raw)[0]
        assert status.startswith(b"HTTP/1.1 501")
        assert orjson.loads(body)["error"] == "transfer coding gzip is not supported (chunked is)"

    @pytest.mark.parametrize("version", [b"2.0", b"0.9"])  # llhttp refuses others (400)
    async def test_a_major_version_other_than_1_is_505(self, small: HttpServer, version: bytes) -> None:
        """It was served as HTTP/1.1 (RFC 9110 15.6.6: a major version not served is a 505)."""
        raw = await exchange(small, b"GET /p HTTP/%s\r\nhost: x\r\n\r\n" % version)
        status, _, body = answers(raw)[0]
        assert status.startswith(b"HTTP/1.1 505")
        assert orjson.loads(body)["error"] == f"HTTP/{version.decode()} is not served (HTTP/1.1 is)"

    async def test_trailers_are_dropped_and_bounded(self, small: HttpServer) -> None:
        """Trailers were merged into the headers (a trailer x-request-id became the event id), and
        counted against no limit: 100 MiB of them grew the sidecar by 230 MiB."""
        raw = await exchange(small, b"POST /p HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
                                    b"connection: close\r\n\r\n3\r\nabc\r\n0\r\nx-request-id: t\r\n\r\n")
        status, _, body = answers(raw)[0]
        assert status == b"HTTP/1.1 200 OK" and "x-request-id" not in dict(orjson.loads(body)["headers"])
        reader, writer = await asyncio.open_connection("127.0.0.1", small.port)
        writer.write(b"POST /p HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(64):  # 256 KiB of trailers, never ended
                writer.write(b"x-t: " + b"a" * 4089 + b"\r\n")
                await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert raw.startswith(b"HTTP/1.1 431") and b"chunk framing and trailers are too large" in raw

    async def test_a_refusal_behind_an_answer_due_comes_after_it(self, small: HttpServer) -> None:
        """It was never sent, and the close, with the refused body unread, reset the connection:
        the answer still being written was cut short."""
        reader, writer = await asyncio.open_connection("127.0.0.1", small.port)
        writer.write(b"POST /sleep HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\n0.2"
                     b"POST /p HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(10):
                writer.write(b"x" * 10000)
                await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)  # to the end of the stream: no reset
        writer.close()
        assert [status for status, _, _ in answers(raw)] == [b"HTTP/1.1 200 OK", b"HTTP/1.1 413 Request Entity Too Large"]

    async def test_at_the_limit_is_served_and_the_server_goes_on(self, small: HttpServer) -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{small.port}") as client:
            assert (await client.post("/p", content=b"x" * 11)).status_code == 413
            answer = await client.post("/p", content=b"x" * 10)
            assert answer.status_code == 200 and answer.json()["body"] == "x" * 10


async def test_oversized_headers_are_431(server: HttpServer) -> None:
    """The parser would buffer a head of any size: past 64 KiB the client gets a 431 and is cut off."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /p HTTP/1.1\r\nhost: x\r\nx-big: ")
    for _ in range(20):  # 80 KiB of one header, in pieces, never finished
        writer.write(b"a" * 4096)
        await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    status, _, body = answers(raw)[0]
    assert status.startswith(b"HTTP/1.1 431")
    assert orjson.loads(body)["error"] == "the request line and headers are larger than 65536 bytes"
    # Big but within the limit, and many requests on one connection: served.
    raw = await exchange(server, b"GET /a HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 60000 + b"\r\n\r\n"
                                 + b"GET /b HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 60000 + b"\r\n"
                                 b"connection: close\r\n\r\n")
    assert [s for s, _, _ in answers(raw)] == [b"HTTP/1.1 200 OK"] * 2


@pytest.mark.parametrize("before", [
    pytest.param(b"", id="one-write"),
    pytest.param(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n", id="pipelined"),
])
async def test_a_head_over_the_limit_is_431_however_it_arrives(server: HttpServer, before: bytes) -> None:
    """A head over 64 KiB whole within one read was served: its size was checked only while it was
    unfinished, and a request ending in the same read set the count back to 0."""
    big = b"POST /big HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 70000 + b"\r\ncontent-length: 2\r\n\r\n{}"
    got = answers(await exchange(server, before + big))
    assert [status for status, _, _ in got] == [b"HTTP/1.1 200 OK"] * bool(before) + [
        b"HTTP/1.1 431 Request Header Fields Too Large"]
    assert orjson.loads(got[-1][2])["error"] == "the request line and headers are larger than 65536 bytes"
    # A long target counts too.
    raw = await exchange(server, before + b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nhost: x\r\n\r\n")
    assert answers(raw)[-1][0].startswith(b"HTTP/1.1 431")


async def test_handler_error_is_a_500_and_the_server_goes_on(server: HttpServer) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        r = await client.get("/boom")
        assert r.status_code == 500 and "Traceback" not in r.text and r.json()["status"] == 500
        assert (await client.get("/fine")).status_code == 200


async def test_head_has_no_body(server: HttpServer) -> None:
    raw = await exchange(server, b"HEAD /h HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK") and raw.endswith(b"\r\n\r\n")


async def test_upgrade_is_answered_as_plain_http_then_closed(server: HttpServer) -> None:
    raw = await exchange(server, b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
                                 b"\x81\x05hello")
    status, headers, body = answers(raw)[0]
    assert status == b"HTTP/1.1 200 OK" and headers[b"connection"] == b"close"
    assert orjson.loads(body)["path"] == "/ws"


async def test_idle_connections_are_closed_after_the_keep_alive_timeout(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), 5)  # the body, then EOF once idle 0.5 s
    assert reader.at_eof()
    writer.close()


async def test_a_client_that_leaves_does_not_stop_its_handler() -> None:
    done = asyncio.Event()

    async def slow(request: Request) -> Reply:
        await asyncio.sleep(0.2)
        done.set()  # e.g. the response event is still logged
        return 200, [], b"late"

    srv = HttpServer(slow)
    await srv.start("127.0.0.1", 0)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        await writer.drain()
        writer.close()
        await asyncio.wait_for(done.wait(), 5)
        await asyncio.sleep(0.05)
        async with httpx.AsyncClient() as client:  # still serving
            assert (await client.get(f"http://127.0.0.1:{srv.port}/")).text == "late"
    finally:
        await srv.stop(grace=1)


async def test_stop_answers_requests_in_flight_and_refuses_new_ones() -> None:
    srv = HttpServer(echo)
    await srv.start("127.0.0.1", 0)
    port = srv.port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        in_flight = asyncio.create_task(client.post("/sleep", content=b"0.3"))
        # Read and with its handler: stop() follows in the same loop pass, before the answer.
        await until(lambda: any(conn.active for conn in srv.connections), timeout=30, what="the request in flight")
        await srv.stop(grace=30)
        r = await in_flight
        assert r.status_code == 200 and r.headers["connection"] == "close"
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_host_expect_and_http10_keep_alive_as_rfc_9110_and_9112_say(server: HttpServer) -> None:
    # RFC 9112 3.2: an HTTP/1.1 request with no host, or two, is a 400; HTTP/1.0 may go without.
    for head in (b"GET /p HTTP/1.1\r\n\r\n", b"GET /p HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n"):
        status, _, body = answers(await exchange(server, head))[0]
        assert status.startswith(b"HTTP/1.1 400") and b"exactly one host" in body
    assert answers(await exchange(server, b"GET /p HTTP/1.0\r\n\r\n"))[0][0] == b"HTTP/1.1 200 OK"
    # Expect is matched whatever its case; HTTP/1.0 gets no 100 (RFC 9110 10.1.1).
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /p HTTP/1.1\r\nhost: x\r\nexpect: 100-Continue\r\ncontent-length: 2\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.close()
    raw = await exchange(server, b"POST /p HTTP/1.0\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\nhi")
    assert raw.startswith(b"HTTP/1.1 200 OK")
    # An HTTP/1.0 client kept alive is told so: else it waits for the connection to end.
    raw = await exchange(server, b"GET /p HTTP/1.0\r\nconnection: keep-alive\r\n\r\n", until_close=False)
    assert b"connection: keep-alive\r\n" in raw.split(b"\r\n\r\n")[0]


@pytest.mark.parametrize("framing", ["content-length: 11", "transfer-encoding: chunked"])
async def test_an_upgrade_request_s_body_is_read(server: HttpServer, framing: str) -> None:
    """`curl --http2 -d` and Java's HttpClient offer h2c on a POST with a body: upgrades are not
    served, and the parser stopped at the head, so the body was dropped (MagicStack/httptools#124)."""
    body = b"hello-body!" if framing.startswith("content") else b"b\r\nhello-body!\r\n0\r\n\r\n"
    raw = await exchange(server, b"POST /p HTTP/1.1\r\nhost: x\r\nconnection: Upgrade, HTTP2-Settings\r\n"
                                 b"upgrade: h2c\r\nhttp2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
                                 + framing.encode() + b"\r\n\r\n" + body, until_close=False)
    status, _, answer = answers(raw)[0]
    seen = orjson.loads(answer)
    assert status == b"HTTP/1.1 200 OK" and seen["body"] == "hello-body!"
    assert not {"upgrade", "http2-settings"} & {name for name, _ in seen["headers"]}  # connection: as sent


async def test_a_graceful_stop_answers_the_pipelined_requests_already_read() -> None:
    srv = HttpServer(echo)
    await srv.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(b"POST /sleep HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\n0.2"
                 b"GET /a HTTP/1.1\r\nhost: x\r\n\r\nGET /b HTTP/1.1\r\nhost: x\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)  # all three read, the first being answered
    await srv.stop(grace=2)
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert [orjson.loads(body)["path"] for _, _, body in answers(raw)] == ["/sleep", "/a", "/b"]


H2C = b"connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"


async def test_upgrade_replays_are_bounded_and_connect_is_not_served(server: HttpServer) -> None:
    # CONNECT is an upgrade whatever its headers: read again, it recursed without end.
    raw = await exchange(server, b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n"
                                 b"content-length: 5\r\n\r\nhello")
    assert answers(raw)[0][0].startswith(b"HTTP/1.1 501")
    # Each replay nested in the one before: 1500 pipelined in one write hit the recursion limit.
    one = b"POST /p HTTP/1.1\r\nhost: x\r\n" + H2C + b"content-length: 2\r\n\r\nhi"
    raw = await exchange(server, one * 40)
    statuses = [status for status, _, _ in answers(raw)]
    assert statuses[:16] == [b"HTTP/1.1 200 OK"] * 16 and statuses[-1].startswith(b"HTTP/1.1 501")
    # The replay keeps Connection as sent: its close is honoured, its hop-by-hop names known.
    raw = await exchange(server, b"POST /p HTTP/1.1\r\nhost: x\r\nconnection: Upgrade, close\r\nupgrade: h2c\r\n"
                                 b"content-length: 2\r\n\r\nhi")  # read to the end: closed after it
    assert [status for status, _, _ in answers(raw)] == [b"HTTP/1.1 200 OK"]


@pytest.mark.parametrize(("head", "status", "reason"), [
    pytest.param(b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n", 501,
                 "CONNECT is not served", id="connect"),
    pytest.param(b"GET http://h:p/ HTTP/1.1\r\nhost: h\r\n\r\n", 400,
                 "the request target http://h:p/ cannot be read", id="bad-target"),
])
async def test_a_target_not_served_is_refused_with_its_reason(server: HttpServer, head: bytes, status: int,
                                                              reason: str) -> None:
    """CONNECT without a body (its authority-form target), or a target llhttp takes and httptools'
    URL parser cannot read, was a 400 naming a callback error, not the target."""
    [(line, headers, body)] = answers(await exchange(server, head))
    assert line.startswith(b"HTTP/1.1 %d" % status) and headers[b"connection"] == b"close"
    assert orjson.loads(body) == {"error": reason, "status": status}


async def test_http_1_0_with_a_transfer_encoding_is_400_and_closed(server: HttpServer) -> None:
    """RFC 9112 6.1: the framing of an HTTP/1.0 message with a transfer coding is faulty; it was
    decoded as chunked and the connection kept alive, the request behind it read as sent."""
    chunked = (b"POST /p HTTP/1.0\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n"
               b"2\r\n{}\r\n0\r\n\r\n")
    then = b"GET /next HTTP/1.0\r\nconnection: keep-alive\r\n\r\n"
    [(status, headers, body)] = answers(await exchange(server, chunked + then))
    assert status.startswith(b"HTTP/1.1 400") and headers[b"connection"] == b"close"
    assert orjson.loads(body) == {"error": "an HTTP/1.0 request has no transfer-encoding "
                                           "(its framing is faulty: RFC 9112 6.1)", "status": 400}
    # With a content-length too (llhttp refuses that itself, whatever the version).
    with_length = chunked.replace(b"\r\n\r\n", b"\r\ncontent-length: 11\r\n\r\n", 1)
    [(status, headers, _)] = answers(await exchange(server, with_length + then))
    assert status.startswith(b"HTTP/1.1 400") and headers[b"connection"] == b"close"


async def test_small_chunks_are_not_taken_for_framing_abuse() -> None:
    srv = HttpServer(echo, max_body_bytes=1 << 20)
    await srv.start("127.0.0.1", 0)
    try:
        body = b"".join(b"10\r\n" + b"x" * 16 + b"\r\n" for _ in range(60000)) + b"0\r\n\r\n"  # 960 KB in 16 B chunks
        raw = await exchange(srv, b"POST /p HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
                                  b"connection: close\r\n\r\n" + body)
        assert answers(raw)[0][0] == b"HTTP/1.1 200 OK"
    finally:
        await srv.stop(grace=1)


async def test_nothing_is_answered_after_an_answer_that_said_close(server: HttpServer) -> None:
    raw = await exchange(server, b"GET /a HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\nGET /b HTTP/1.1\r\nhost: x\r\n\r\n")
    assert [status for status, _, _ in answers(raw)] == [b"HTTP/1.1 200 OK"]  # RFC 9112 9.6


async def test_a_continue_due_behind_an_answer_is_sent_after_it(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /sleep HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\n0.2"
                 b"POST /p HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n")
    first = await asyncio.wait_for(reader.readuntil(b"}"), 3)
    assert first.startswith(b"HTTP/1.1 200 OK")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.close()


async def test_a_continue_due_for_a_body_that_came_anyway_is_not_sent(server: HttpServer) -> None:
    """Its head and body read behind an answer still due: the 100 went out after its own 200,
    into the next exchange on the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /sleep HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\n0.2"
                 b"POST /p HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\nhi")
    raw = await asyncio.wait_for(reader.read(), 5)  # until the keep-alive timeout closes it
    writer.close()
    assert [status for status, _, _ in answers(raw)] == [b"HTTP/1.1 200 OK"] * 2


async def test_a_request_paused_mid_body_is_not_closed_as_idle(server: HttpServer) -> None:
    """The keep-alive sweep (0.5 s here) closed a connection whose request paused mid-body,
    unanswered: request_read_timeout (a 408) is its limit."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /p HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 4\r\n\r\nab")
    await asyncio.sleep(1.2)
    writer.write(b"cd")
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    [(status, _, body)] = answers(raw)
    assert status == b"HTTP/1.1 200 OK" and orjson.loads(body)["body"] == "abcd"


async def _stopped_before_the_grace(srv: HttpServer) -> None:
    # A grace no test waits out: a stop done within the hang guard did not wait for it.
    try:
        await asyncio.wait_for(srv.stop(grace=600), 60)
    except TimeoutError:
        pytest.fail("the stop still waits after 60 s: it waited for the connection's grace period")


async def test_a_stop_does_not_wait_for_a_request_that_can_no_longer_come_whole() -> None:
    """Reading stops at a stop: a request paused mid-body, kept from the idle close, held the
    stop for its whole grace period."""
    srv = HttpServer(echo)
    await srv.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(b"POST /p HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nab")
    await asyncio.sleep(0.1)
    await _stopped_before_the_grace(srv)
    writer.close()


async def test_hurry_ends_the_grace_for_requests_in_flight() -> None:
    """The sidecar's second SIGTERM/SIGINT: the requests still being answered are cut off."""
    srv = HttpServer(echo)
    await srv.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(b"POST /sleep HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\n600")
    await until(lambda: any(conn.active for conn in srv.connections), timeout=30, what="the request in flight")
    hurry = asyncio.Event()
    stopping = asyncio.create_task(srv.stop(grace=600, hurry=hurry))
    await asyncio.sleep(0.1)
    assert not stopping.done()  # answering it, within the grace
    hurry.set()
    try:
        await asyncio.wait_for(stopping, 60)
    except TimeoutError:
        pytest.fail("the stop still waits 60 s after `hurry`")
    try:
        rest = await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:  # aborted: a reset
        rest = b""
    assert rest == b""  # cut off, unanswered
    writer.close()


async def test_blank_lines_before_a_request_are_idle(server: HttpServer) -> None:
    """A stray CRLF on a kept connection is no request begun: closed at the keep-alive timeout
    (0.5 s here), not answered 408 at the read deadline."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"\r\n")
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()


async def test_head_of_an_answer_without_a_length_says_none() -> None:
    """A predictor's chunked answer to HEAD has no length to say: `content-length: 0` was wrong."""
    async def chunked(request: Request) -> Reply:
        return 200, [(b"content-type", b"text/plain")], b""

    srv = HttpServer(chunked)
    await srv.start("127.0.0.1", 0)
    try:
        raw = await exchange(srv, b"HEAD /h HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    finally:
        await srv.stop(grace=1)
    assert raw.startswith(b"HTTP/1.1 200 OK") and b"content-length" not in raw.lower()


async def test_a_stopping_server_reads_no_new_requests() -> None:
    """A client pipelining a new request after each answer kept a stopping connection for the
    whole grace period, then had an answer aborted."""
    srv = HttpServer(echo)
    await srv.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    request = b"POST /sleep HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\n0.05"

    async def keep_asking() -> int:
        answered = 0
        writer.write(request)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                await reader.readexactly(length)
                answered += 1
                writer.write(request)
        return answered

    asking = asyncio.create_task(keep_asking())
    await asyncio.sleep(0.02)
    await _stopped_before_the_grace(srv)
    assert await asyncio.wait_for(asking, 60) <= 2
    writer.close()


class TestReadDeadline:
    """A request not whole `request_read_timeout` s after its first byte: 408 with a JSON reason and
    the connection closed (a slowloris client held it, and what it had sent, for ever)."""

    @pytest.fixture
    async def strict(self) -> AsyncIterator[HttpServer]:
        srv = HttpServer(echo, request_read_timeout=0.5)
        await srv.start("127.0.0.1", 0)
        yield srv
        await srv.stop(grace=1)

    @staticmethod
    async def dribble(server: HttpServer, head: bytes, data: bytes) -> bytes:
        """Send `head`, then `data` a byte every 0.05 s until the server answers; what it answered,
        to its end of stream."""
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(head)
        try:
            for i in range(200):  # 10 s: a generous bound
                writer.write(data[i % len(data):i % len(data) + 1])
                with contextlib.suppress(asyncio.TimeoutError):
                    first = await asyncio.wait_for(reader.read(1), 0.05)
                    return first + await asyncio.wait_for(reader.read(), 5)
            raise AssertionError("never answered")
        finally:
            writer.close()

    @pytest.mark.parametrize(("head", "data"), [
        pytest.param(b"", b"GET /x HTTP/1.1\r\nhost: x\r\nx-slow: " + b"a" * 1000, id="head"),
        pytest.param(b"POST /p HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n", b"x", id="body"),
        pytest.param(b"POST /p HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n", b"1\r\nx\r\n", id="chunks"),
        pytest.param(b"", b"\r\n", id="blank-lines"),  # llhttp skips them without beginning a request
    ])
    async def test_a_dribbled_request_is_408_and_closed(self, strict: HttpServer, head: bytes, data: bytes) -> None:
        raw = await self.dribble(strict, head, data)
        [(status, headers, body)] = answers(raw)
        assert status.startswith(b"HTTP/1.1 408") and headers[b"connection"] == b"close"
        assert orjson.loads(body) == {"error": "the request did not arrive whole within 0.5 seconds "
                                               "(request_read_timeout)", "status": 408}

    async def test_a_big_body_arriving_steadily_is_not_cut(self, strict: HttpServer) -> None:
        """Each MiB that arrives buys a second more: 3 MiB at ~2 MiB/s take three times the deadline
        (a plain 0.5 s total cut it: a 256 MiB upload needed 4.4 MB/s against the 60 s default)."""
        size, piece = 3 << 20, 64 << 10
        reader, writer = await asyncio.open_connection("127.0.0.1", strict.port)
        writer.write(b"POST /p HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % size)
        for _ in range(size // piece):
            writer.write(b"x" * piece)
            await writer.drain()
            await asyncio.sleep(piece / (2 << 20))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200"), head
        writer.close()

    async def test_keep_alive_requests_each_have_their_own_deadline(self, strict: HttpServer) -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{strict.port}") as client:
            for i in range(4):  # longer than the deadline in all, on one connection
                assert (await client.post("/p", content=b"x" * i)).json()["body"] == "x" * i
                await asyncio.sleep(0.3)
            assert len(strict.connections) == 1

    async def test_a_slow_answer_and_the_request_read_behind_it_are_not_cut(self, strict: HttpServer) -> None:
        """The deadline is the client's: time answering (here 1.5 s), even with the next request's
        head begun behind it, does not count."""
        reader, writer = await asyncio.open_connection("127.0.0.1", strict.port)
        writer.write(b"POST /sleep HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\n1.5GET /next HTTP/1.1\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        writer.write(b"host: x\r\n\r\n")
        raw = await asyncio.wait_for(reader.readuntil(b"}"), 5)
        raw += await asyncio.wait_for(reader.readuntil(b"}"), 5)
        [first, second] = answers(head + raw)
        assert first[2] and second[0] == b"HTTP/1.1 200 OK" and orjson.loads(second[2])["path"] == "/next"
        writer.close()


async def test_a_closed_connection_holds_no_body_without_the_gc() -> None:
    """A connection and its parser refer to each other, so only the GC's rare full collection
    freed a closed one, and with it its last request's body: RSS grew by each upload."""
    import gc
    import tracemalloc

    async def small(request: Request) -> Reply:
        return 200, [], b"{}"

    srv = HttpServer(small)
    await srv.start("127.0.0.1", 0)
    body = b"x" * (8 << 20)
    gc.disable()
    tracemalloc.start()
    try:
        for _ in range(4):
            raw = await exchange(srv, b"POST / HTTP/1.1\r\nhost: a\r\nconnection: close\r\ncontent-length: %d\r\n\r\n"
                                 % len(body) + body)
            assert raw.startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.05)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gc.enable()
        await srv.stop(grace=1)
    assert held < 12 << 20, f"{held >> 20} MiB still held"


async def test_a_client_that_does_not_read_its_answers_is_not_answered_ahead() -> None:
    """No flow control: answers to pipelined requests were written into the transport's buffer
    however far the client was behind (a client that never read ran the sidecar out of memory)."""
    answer = b"y" * (1 << 20)

    async def big(request: Request) -> Reply:
        return 200, [], answer

    srv = HttpServer(big)
    await srv.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port, limit=1 << 16)
    try:
        writer.transport.pause_reading()  # read nothing for now
        writer.write(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n" * 40)
        await writer.drain()
        await asyncio.sleep(0.5)
        buffered = max(c.transport.get_write_buffer_size() for c in srv.connections if c.transport)
        assert buffered < 8 << 20, f"{buffered >> 20} MiB of answers buffered for a client that reads none"
        writer.transport.resume_reading()
        got = 0
        while got < 40 * len(answer):  # every answer comes once it reads (heads add a little)
            data = await asyncio.wait_for(reader.read(1 << 20), 10)
            assert data
            got += len(data)
    finally:
        writer.close()
        await srv.stop(grace=1)


async def test_a_client_that_half_closes_after_its_request_gets_the_answer(server: HttpServer) -> None:
    """`shutdown(SHUT_WR)` after sending (netcat, some HTTP/1.0 clients): the connection was
    closed at the EOF, the answer unsent, though the request was handled (and logged)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /sleep HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\n0.2")
    writer.write_eof()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 200")


async def test_an_upload_pipelined_behind_an_unread_answer_is_still_read() -> None:
    """A client writing all its requests before reading: with reading paused for its unread
    answer, it could not finish writing its upload, and the upload was answered 408."""
    big = b"y" * (16 << 20)

    async def handler(request: Request) -> Reply:
        return 200, [], big if request.path == "/big" else b"got %d" % len(request.body)

    srv = HttpServer(handler, request_read_timeout=3.0)
    await srv.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        body = b"x" * (16 << 20)
        writer.write(b"GET /big HTTP/1.1\r\nhost: a\r\n\r\n"
                     b"POST /up HTTP/1.1\r\nhost: a\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        await asyncio.wait_for(writer.drain(), 10)  # all of it taken before any answer is read
        raw = b""
        while not raw.endswith(b"got %d" % len(body)):
            data = await asyncio.wait_for(reader.read(1 << 20), 10)
            assert data, raw[-200:]
            raw += data
    finally:
        writer.close()
        await srv.stop(grace=1)


async def test_a_request_finished_after_the_pause_is_held_and_reading_stops() -> None:
    """The pause came with a request midway: once it was whole it was answered at once, and every
    request after it too, into the buffer of a client that read none (the pause never came again)."""
    big = b"y" * (4 << 20)

    async def handler(request: Request) -> Reply:
        return 200, [], big if request.path == "/big" else b"small"

    loop = asyncio.get_running_loop()
    async with _slow_client(handler, request_read_timeout=30.0, keep_alive_timeout=60.0) as (srv, sock):
        get = b"GET /big HTTP/1.1\r\nhost: a\r\n\r\n"
        await loop.sock_sendall(sock, get + b"POST /up HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\n")
        await asyncio.sleep(0.3)  # /big answered with the POST midway: the pause
        await loop.sock_sendall(sock, b"0123456789")
        await asyncio.sleep(0.1)
        for _ in range(10):
            with contextlib.suppress(TimeoutError):  # reading stopped: the kernel's buffer fills
                await asyncio.wait_for(loop.sock_sendall(sock, get), 0.5)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        [conn] = list(srv.connections)
        assert conn.transport is not None
        assert conn.transport.get_write_buffer_size() < 12 << 20, "answered into the buffer of a client reading none"


@pytest.mark.parametrize("way", ["keep-alive", "half-closed", "pipelined", "unfinished", "trickled", "held"])
async def test_a_client_that_never_reads_its_answer_is_let_go(way: str) -> None:
    """A client keeping a zero window: the idle connection's close() (and a refusal's, after its
    linger) waits for the write buffer to drain, which never happens: the connection and its whole
    answer were held for ever. Aborted once the client took nothing for request_read_timeout."""
    big = b"y" * (16 << 20)

    async def handler(request: Request) -> Reply:
        return 200, [], big

    loop = asyncio.get_running_loop()
    async with _slow_client(handler, keep_alive_timeout=0.2, request_read_timeout=0.5) as (srv, sock):
        get = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"
        # A request begun behind the answer and never finished (408), or trickled, or behind
        # another answer held: the send deadline waited on it for ever.
        unfinished = b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1000\r\n\r\nab"
        sent = {"pipelined": get * 2, "unfinished": get + unfinished, "trickled": get + unfinished,
                "held": get * 2 + unfinished}.get(way, get)
        await loop.sock_sendall(sock, sent)
        if way == "half-closed":
            sock.shutdown(socket.SHUT_WR)
        await until(lambda: _buffered(srv), 30, "the answer buffered")

        async def trickle() -> None:
            with contextlib.suppress(OSError):
                while True:
                    await asyncio.sleep(0.2)
                    await loop.sock_sendall(sock, b"x")

        trickling = asyncio.ensure_future(trickle()) if way in ("trickled", "held") else None
        try:
            await until(lambda: not srv.connections, 60, "the connection let go")
        finally:
            if trickling is not None:
                trickling.cancel()


async def test_an_upload_pipelined_behind_an_unread_answer_is_not_cut() -> None:
    """The send deadline let go of a client still sending (within its read deadline) a request
    pipelined behind the answer it reads after: the request was lost."""
    big = b"y" * (16 << 20)

    async def handler(request: Request) -> Reply:
        return 200, [], big if request.method == "GET" else str(len(request.body)).encode()

    loop = asyncio.get_running_loop()
    part = b"u" * (1 << 20)
    async with _slow_client(handler, keep_alive_timeout=0.2, request_read_timeout=0.5) as (srv, sock):
        # The upload's head with the GET: it is under way as the answer fills the buffer.
        await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"
                                      b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: %d\r\n\r\n" % (3 * len(part)))
        await until(lambda: _buffered(srv), 30, "the answer buffered")
        for n in range(3):  # a MiB a second: past the send deadline, within the read deadline's allowance
            await asyncio.sleep(1.0 if n else 0)
            await loop.sock_sendall(sock, part)
        raw = await _read_until(sock, lambda raw: len(raw) >= len(big) and raw.endswith(b"%d" % (3 * len(part))))
        assert raw.count(b"HTTP/1.1 200") == 2


async def test_a_client_reading_slowly_but_steadily_is_not_cut() -> None:
    """The send deadline looked at the transport's buffer only, which the kernel frees in steps of
    a third of its own (~1.4 MiB): a steady reader slower than that per deadline was cut."""
    big = b"y" * (8 << 20)

    async def handler(request: Request) -> Reply:
        return 200, [], big

    loop = asyncio.get_running_loop()
    async with _slow_client(handler, keep_alive_timeout=5.0, request_read_timeout=1.0) as (srv, sock):
        await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        await until(lambda: _buffered(srv), 30, "the answer buffered")
        started = loop.time()
        # ~200 KB/s for a while: past the deadline four times over
        await _read_until(sock, lambda raw: len(raw) >= len(big), 4096,
                          pace=lambda: 0.02 if loop.time() - started < 4 else 0.0)


async def test_a_client_reading_its_answer_late_gets_it_whole() -> None:
    """What lets go of a client that reads nothing (above) does not cut one that reads late: idle
    past the keep-alive timeout with its answer still buffered, it still gets all of it."""
    big = b"y" * (16 << 20)  # more than the kernel's buffers take: most waits in the transport's

    async def handler(request: Request) -> Reply:
        return 200, [], big

    loop = asyncio.get_running_loop()
    async with _slow_client(handler, keep_alive_timeout=0.1, request_read_timeout=5.0) as (srv, sock):
        await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        await until(lambda: _buffered(srv), 30, "the answer buffered")
        await asyncio.sleep(0.5)  # idle past the keep-alive timeout, its answer still buffered
        raw = await _read_until(sock, lambda raw: 0 <= raw.find(b"\r\n\r\n") <= len(raw) - 4 - len(big))
        head = raw.find(b"\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200") and raw[head + 4:] == big
