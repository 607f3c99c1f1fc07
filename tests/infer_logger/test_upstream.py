"""The sidecar's client to its predictor, against real sockets: a scripted raw server for
framings and failures, and the demo predictor."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable

import orjson
import pytest

from infer_logger import upstream as upstream_module
from infer_logger.errors import ConfigError
from infer_logger.testing import free_port
from infer_logger.upstream import Upstream, UpstreamError
from tests.servers import Process, Scripted
from tests.waiting import until


def ok(body: bytes = b"{}") -> Callable[[bytes], bytes]:
    return lambda _: b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body), body)


async def test_answers_and_keeps_the_connection() -> None:
    peer = Scripted(ok(b'{"a":1}'))
    async with peer as url:
        up = Upstream(url + "/prefix")
        for _ in range(3):
            answer = await up.request("POST", b"/v1/models/m:predict?x=1", [(b"x-a", b"1")], b"body")
            assert (answer.status, answer.body) == (200, b'{"a":1}')
            assert (b"content-type", b"application/json") in answer.headers
        await up.close()
    assert peer.connections == 1
    head = peer.heads[0]
    assert head.startswith(b"POST /prefix/v1/models/m:predict?x=1 HTTP/1.1\r\nhost: 127.0.0.1:")
    assert b"x-a: 1\r\n" in head and head.endswith(b"content-length: 4\r\n\r\nbody")


async def test_chunked_answer_is_joined() -> None:
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    async with Scripted(lambda _: chunked) as url:
        up = Upstream(url)
        assert (await up.request("GET", b"/", [], b"")).body == b"abcde"
        assert (await up.request("GET", b"/", [], b"")).body == b"abcde"  # same connection, still framed
        await up.close()


async def test_trailers_are_not_merged_into_the_headers() -> None:
    """RFC 9110 6.5.1: a predictor's trailers reached the client as headers (set-cookie too)."""
    chunked = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n"
               b"3\r\nabc\r\n0\r\nx-checksum: abc\r\nset-cookie: evil=1\r\n\r\n")
    async with Scripted(lambda _: chunked) as url:
        upstream = Upstream(url)
        try:
            answer = await upstream.request("GET", b"/", [], b"")
        finally:
            await upstream.close()
    assert answer.body == b"abc" and not {b"x-checksum", b"set-cookie"} & {k for k, _ in answer.headers}


async def test_an_answer_in_another_transfer_coding_is_refused() -> None:
    coded = b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    async with Scripted(lambda _: coded) as url:
        upstream = Upstream(url)
        try:
            with pytest.raises(UpstreamError, match="transfer coding gzip"):
                await upstream.request("GET", b"/", [], b"")
        finally:
            await upstream.close()


async def test_answer_ended_by_close() -> None:
    async with Scripted(lambda _: b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end",
                        close_after=1) as url:
        up = Upstream(url)
        assert (await up.request("GET", b"/", [], b"")).body == b"until the end"
        assert (await up.request("GET", b"/", [], b"")).body == b"until the end"  # a new connection
        await up.close()


async def test_truncated_answer_is_an_error() -> None:
    async with Scripted(lambda _: b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf", close_after=1) as url:
        up = Upstream(url)
        with pytest.raises(OSError):
            await up.request("GET", b"/", [], b"")
        await up.close()


async def test_a_kept_connection_the_peer_closed_is_retried_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_module, "STALE_AFTER", 0.0)  # kept connections count as idle long enough
    peer = Scripted(ok(), close_after=1)  # hangs up after every answer, without saying so
    async with peer as url:
        up = Upstream(url)
        for _ in range(3):
            assert (await up.request("GET", b"/", [], b"")).status == 200
        await up.close()
    assert peer.connections == 3 and len(peer.heads) == 3  # each request reached the peer once


async def test_a_post_lost_unanswered_on_a_kept_connection_is_not_sent_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A predictor that read the POST and died of it (no answer) on a connection idle past the
    keep-alive threshold got it a second time on a new connection: a killer request, two workers."""
    monkeypatch.setattr(upstream_module, "STALE_AFTER", 0.0)
    seen = itertools.count(1)
    peer = Scripted(lambda _: None if next(seen) == 2 else ok()(b""))
    async with peer as url:
        up = Upstream(url)
        assert (await up.request("POST", b"/", [], b"1")).status == 200
        with pytest.raises(ConnectionResetError, match="not sent again"):
            await up.request("POST", b"/", [], b"2")
        await up.close()
    assert [h[-1:] for h in peer.heads] == [b"1", b"2"]


async def test_a_sender_that_resends_anyway_has_a_stale_post_sent_again_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The http sink: its worker sends the batch again anyway; failing it cost a backoff and a warning."""
    monkeypatch.setattr(upstream_module, "STALE_AFTER", 0.0)
    seen = itertools.count(1)
    peer = Scripted(lambda _: None if next(seen) == 2 else ok()(b""))
    async with peer as url:
        up = Upstream(url, resend_unanswered=True)
        assert (await up.request("POST", b"/", [], b"1")).status == 200
        assert (await up.request("POST", b"/", [], b"2")).status == 200
        await up.close()
    assert [h[-1:] for h in peer.heads] == [b"1", b"2", b"2"]


async def test_a_kept_connection_whose_end_came_unread_is_not_used() -> None:
    """The predictor's FIN in, the event loop not yet round to reading it: looked at first."""
    import socket
    import time

    from infer_logger.upstream import _peer_closed

    with socket.create_server(("127.0.0.1", 0)) as server:
        transport, _ = await asyncio.get_running_loop().create_connection(
            asyncio.Protocol, "127.0.0.1", server.getsockname()[1])
        accepted, _ = server.accept()
        assert not _peer_closed(transport)
        accepted.close()
        time.sleep(0.05)  # blocking: the loop reads nothing meanwhile
        assert not transport.is_closing() and _peer_closed(transport)
        transport.close()


async def test_a_connection_lost_unanswered_right_after_use_is_not_resent() -> None:
    """A POST must not be sent twice (RFC 9110 9.2.2): reused within a second of its last answer,
    the connection was not closed by a keep-alive timeout, so the predictor may have read it."""
    seen = itertools.count(1)
    peer = Scripted(lambda _: None if next(seen) == 2 else ok()(b""))
    async with peer as url:
        up = Upstream(url)
        assert (await up.request("POST", b"/", [], b"1")).status == 200
        with pytest.raises(ConnectionResetError):
            await up.request("POST", b"/", [], b"2")
        await up.close()
    assert [h[-1:] for h in peer.heads] == [b"1", b"2"]


@pytest.mark.parametrize("answers", [1, 2])
async def test_a_predictor_that_closes_connections_silently_loses_no_post(answers: int) -> None:
    """A predictor that hangs up after each answer (or each second one) without `Connection:
    close` (uvicorn with timeout_keep_alive=0): its end, in but unread as the next POST took the
    connection, cost that POST a 502 (rightly not sent again). Once the pool has seen it, only a
    connection idle for a moment is used, looked at first; POSTs are still never sent twice."""
    peer = Scripted(ok(), close_after=answers)
    async with peer as url:
        up = Upstream(url)
        try:
            for _ in range(3):  # the pool learns of it here, maybe losing one
                with contextlib.suppress(ConnectionResetError):
                    await up.request("POST", b"/", [], b"x")
            assert up.careful
            learnt = len(peer.heads)
            for _ in range(40):
                assert (await up.request("POST", b"/", [], b"x")).status == 200
            for _ in range(5):
                answers = await asyncio.gather(*(up.request("POST", b"/", [], b"x") for _ in range(10)))
                assert [a.status for a in answers] == [200] * 10
        finally:
            await up.close()
    assert len(peer.heads) == learnt + 90  # each reached the peer once


async def test_a_predictor_restarted_once_costs_no_connection_per_request_for_good(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart closes the idle connections soon after their answers as a predictor of one answer
    per connection does: taken for one, the pool opened a connection per request for good (5x
    slower on a fast predictor). A connection still open STALE_AFTER after its answer ends the care."""
    monkeypatch.setattr(upstream_module, "STALE_AFTER", 0.2)
    async with _restarted_once(keep_alive=None) as (up, connections):
        for _ in range(500):  # until a connection idle STALE_AFTER is found open
            if not up.careful:
                break
            assert (await up.request("POST", b"/", [], b"x")).status == 200
            await asyncio.sleep(0.02)
        assert not up.careful
        before = len(connections)
        for _ in range(30):
            assert (await up.request("POST", b"/", [], b"x")).status == 200
        assert len(connections) == before


async def test_the_care_ends_at_a_keep_alive_timeout_under_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """A predictor whose keep-alive timeout is under STALE_AFTER never leaves a connection idle
    that long to be found open: after one restart the pool took a new connection per request for
    good. Its timeout closes (later than CLOSED_SOON after an answer) end the care too."""
    monkeypatch.setattr(upstream_module, "CLOSED_SOON", 0.05)
    async with _restarted_once(keep_alive=0.3) as (up, _):
        assert (await up.request("POST", b"/", [], b"x")).status == 200
        await until(lambda: not up.careful, what="the keep-alive timeout's close")


@contextlib.asynccontextmanager
async def _restarted_once(keep_alive: float | None) -> AsyncIterator[tuple[Upstream, list[asyncio.StreamWriter]]]:
    """An Upstream to a predictor (its connections, as accepted) that closed its one connection
    right after the first answer, as a restart does: the pool careful."""
    connections: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            while True:  # up to its keep-alive timeout
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\nx"), keep_alive)
                writer.write(ok()(b""))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    up = Upstream(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        assert (await up.request("POST", b"/", [], b"x")).status == 200
        connections[0].close()  # the restart, right after the answer
        await until(lambda: up.careful, what="the close seen")
        yield up, connections
    finally:
        await up.close()
        server.close()


async def test_a_close_our_loop_reads_late_is_not_taken_for_a_keep_alive_timeout() -> None:
    """Judged by when our loop read it, a one-answer predictor's close read late (a GC pause, a
    large body encoded) looked like a keep-alive timeout and ended the care: the next POSTs took
    connections it had closed, and were lost. The kernel's word (a look CLOSED_SOON after the
    answer) decides."""
    listener = socket.create_server(("127.0.0.1", 0))

    def one_answer_each() -> None:  # a predictor in another thread: it closes while our loop sleeps
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                with conn:
                    data = b""
                    while not data.endswith(b"\r\n\r\nx"):
                        data += conn.recv(65536)
                    conn.sendall(ok()(b""))

    threading.Thread(target=one_answer_each, daemon=True).start()
    up = Upstream(f"http://127.0.0.1:{listener.getsockname()[1]}")
    try:
        for _ in range(3):  # the pool learns of it here, maybe losing one
            with contextlib.suppress(ConnectionResetError):
                await up.request("POST", b"/", [], b"x")
        await until(lambda: up.careful, what="the close seen")
        for _ in range(10):
            assert (await up.request("POST", b"/", [], b"x")).status == 200
            time.sleep(0.2)  # noqa: ASYNC251 - our loop stalls on purpose: the close is read late
            await asyncio.sleep(0)
        assert up.careful
    finally:
        await up.close()
        listener.close()


async def test_hang_up_after_the_request_is_not_retried() -> None:
    peer = Scripted(lambda _: None)
    async with peer as url:
        up = Upstream(url)
        with pytest.raises(OSError):
            await up.request("POST", b"/", [], b"x")
        await up.close()
    assert len(peer.heads) == 1  # a fresh connection: the predictor may have acted on it


async def test_timeout_drops_the_connection_and_the_next_request_works() -> None:
    slow_first = iter([True])

    def reply(_: bytes) -> bytes:
        if next(slow_first, False):
            return b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab"  # never finishes
        return ok()(b"")

    async with Scripted(reply) as url:
        up = Upstream(url, timeout=0.2)
        with pytest.raises(TimeoutError):
            await up.request("GET", b"/", [], b"")
        assert (await up.request("GET", b"/", [], b"")).status == 200
        await up.close()


async def test_refused() -> None:
    up = Upstream(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(OSError):
        await up.request("GET", b"/", [], b"")


async def test_an_answer_that_is_not_http() -> None:
    async with Scripted(lambda _: b"SSH-2.0-OpenSSH\r\n\r\n") as url:
        up = Upstream(url)
        with pytest.raises(UpstreamError, match="not HTTP"):
            await up.request("GET", b"/", [], b"")
        await up.close()


async def test_head_answer_has_no_body_whatever_its_length_says() -> None:
    async with Scripted(lambda _: b"HTTP/1.1 200 OK\r\ncontent-length: 42\r\n\r\n") as url:
        up = Upstream(url)
        answer = await asyncio.wait_for(up.request("HEAD", b"/", [], b""), 5)
        assert (answer.status, answer.body) == (200, b"")
        await up.close()


async def test_interim_answers_are_skipped() -> None:
    async with Scripted(lambda _: b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"final")(b"")) as url:
        up = Upstream(url)
        assert (await up.request("POST", b"/", [], b"x")).body == b"final"
        await up.close()


async def test_no_body_statuses_keep_the_connection() -> None:
    peer = Scripted(lambda _: b"HTTP/1.1 204 No Content\r\n\r\n")
    async with peer as url:
        up = Upstream(url)
        for _ in range(2):
            assert (await up.request("DELETE", b"/", [], b"")).status == 204
        await up.close()
    assert peer.connections == 1


@pytest.mark.parametrize("url", ["ftp://host/", "127.0.0.1:8080", "http://"])
def test_bad_url_names_the_field(url: str) -> None:
    with pytest.raises(ConfigError, match="predictor_url"):
        Upstream(url)


@pytest.mark.parametrize(("url", "host"), [
    ("http://user:pw@predictor:8080/base/", b"predictor:8080"),
    ("http://bücher.example:8080", b"xn--bcher-kva.example:8080"),
    ("https://bücher.example", b"xn--bcher-kva.example"),
])
def test_host_header_is_the_netloc_without_userinfo_in_ascii(url: str, host: bytes) -> None:
    assert Upstream(url).host_header == host


@pytest.fixture
async def concurrent_predictor(echo_predictor: Process) -> AsyncIterator[Upstream]:
    up = Upstream(echo_predictor.url)
    yield up
    await up.close()


async def test_concurrent_requests_to_the_demo_predictor(concurrent_predictor: Upstream) -> None:
    body = orjson.dumps({"instances": [[1, 2, 3, 4]]})
    answers = await asyncio.gather(*(
        concurrent_predictor.request("POST", b"/v1/models/echo:predict", [(b"content-type", b"application/json")], body)
        for _ in range(50)))
    assert all(a.status == 200 and orjson.loads(a.body)["predictions"] for a in answers)


async def test_an_answer_nobody_asked_for_retires_the_connection() -> None:
    # Two answers to one request: the second must not be taken for the next request's.
    peer = Scripted(lambda head: ok(b"first")(b"") + ok(b"extra")(b"") if b"/one" in head else ok(b"second")(b""))
    async with peer as url:
        up = Upstream(url)
        assert (await up.request("GET", b"/one", [], b"")).body == b"first"
        await asyncio.sleep(0.1)
        assert (await up.request("GET", b"/two", [], b"")).body == b"second"
        await up.close()
    assert peer.connections == 2


async def test_an_answer_nobody_asked_for_that_comes_slowly_retires_the_connection() -> None:
    """Its head came while the connection was idle in the pool, its body later: the next request
    took the connection with its parser midway, and got that body as its own answer."""
    stray = b'{"stray": "not yours"}'

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                if b"/one" in head:
                    writer.write(ok(b"first")(b"") + b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(stray))
                    await writer.drain()
                    await asyncio.sleep(0.3)
                    writer.write(stray)
                else:
                    writer.write(ok(b"second")(b""))
                await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        up = Upstream(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        assert (await up.request("GET", b"/one", [], b"")).body == b"first"
        await asyncio.sleep(0.1)  # the stray head is in
        assert (await up.request("GET", b"/two", [], b"")).body == b"second"
        await up.close()
    finally:
        server.close()


async def test_idle_connections_are_capped_and_expire_without_traffic(monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of 150 concurrent requests left 150 predictor connections open for good; then,
    idle ones expired only as another request ended, one per request: with no traffic, never."""
    monkeypatch.setattr(upstream_module, "IDLE_MAX", 2)
    monkeypatch.setattr(upstream_module, "IDLE_EXPIRY", 0.2)
    opened: list[asyncio.StreamWriter] = []
    ended: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(ok()(b""))
        ended.append(writer)  # our end: the pool closed it
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    up = Upstream(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        await asyncio.gather(*(up.request("GET", b"/", [], b"") for _ in range(5)))
        assert len(opened) == 5
        await until(lambda: len(ended) == 3, what="the connections past the cap closed")
        await until(lambda: len(ended) == 5, what="the idle connections expired with no request")
        assert not up._idle
        assert (await up.request("GET", b"/", [], b"")).status == 200  # on a new connection
        assert len(opened) == 6
    finally:
        await up.close()
        server.close()
    assert up._expiry is None  # no timer left armed by a closed pool


async def test_a_capped_body_keeps_its_start_and_the_connection_is_closed() -> None:
    """The http sink kept a receiver's whole answer: a 503 with a 100 GB body grew it by GBs."""
    huge = b"HTTP/1.1 503 Busy\r\nretry-after: 7\r\ncontent-length: 100000000000\r\n\r\n" + b"x" * (4 << 20)
    peer = Scripted(lambda head: huge if b"/huge" in head else ok(b"small")(b""))
    async with peer as url:
        up = Upstream(url, max_body=1024)
        answer = await up.request("POST", b"/huge", [], b"e")
        assert (answer.status, answer.body, answer.truncated) == (503, b"x" * 1024, True)
        assert (b"retry-after", b"7") in answer.headers
        for _ in range(2):  # a whole answer under the cap keeps its connection
            answer = await up.request("POST", b"/", [], b"e")
            assert (answer.status, answer.body, answer.truncated) == (200, b"small", False)
        await up.close()
    assert peer.connections == 2  # the cut one was not reused


@pytest.mark.parametrize("rest", [b"5\r\nhello\r\n", b"5\r\nhello\r\nnot a chunk\r\n"])
async def test_a_capped_answer_whose_body_stalls_or_breaks_is_returned(rest: bytes) -> None:
    """A 200 whose head came but whose body stalls (or breaks) was 'no answer' (TimeoutError) to
    the http sink, which then sent the event again though the receiver had taken it."""
    stalled = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + rest
    peer = Scripted(lambda head: stalled if b"/stall" in head else ok()(b""))
    async with peer as url:
        up = Upstream(url, timeout=0.3, max_body=1024)
        answer = await up.request("POST", b"/stall", [], b"e")
        assert (answer.status, answer.body, answer.truncated) == (200, b"hello", True)
        assert (await up.request("POST", b"/", [], b"e")).status == 200
        await up.close()
    assert peer.connections == 2


async def test_a_capped_answer_cut_by_a_close_after_its_head_is_returned() -> None:
    peer = Scripted(lambda _: b"HTTP/1.1 503 Busy\r\ncontent-length: 100\r\n\r\nabc", close_after=1)
    async with peer as url:
        up = Upstream(url, max_body=1024)
        answer = await up.request("POST", b"/", [], b"e")
        await up.close()
    assert (answer.status, answer.body, answer.truncated) == (503, b"abc", True)


async def test_without_a_cap_a_stalled_body_is_still_a_timeout() -> None:
    stalled = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"
    async with Scripted(lambda _: stalled) as url:
        up = Upstream(url, timeout=0.2)
        with pytest.raises(TimeoutError):
            await up.request("GET", b"/", [], b"")
        await up.close()


def _head_of(size: int) -> bytes:
    """Header lines of `size` bytes or so, in 1 KB lines."""
    return b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 1000) for i in range(size // 1000 + 1))


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\n" + _head_of(70_000) + b"content-length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 200_000 + b"\r\ncontent-length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n" + _head_of(70_000) + b"\r\n",
], ids=["headers", "one header", "trailers"])
@pytest.mark.parametrize("max_body", [None, 1024])
async def test_an_answer_head_over_64_kib_is_refused(answer: bytes, max_body: int | None) -> None:
    """A predictor's 100,000 headers of 1 KB were buffered (100 MB) and passed on to the client."""
    peer = Scripted(lambda head: answer if b"/big" in head else ok()(b""))
    async with peer as url:
        up = Upstream(url, max_body=max_body)
        try:
            if max_body is not None and b"chunked" in answer:
                # The http sink's: a body (here its trailers) that breaks after the head is still an answer.
                assert (await up.request("GET", b"/big", [], b"")).truncated
            else:
                with pytest.raises(UpstreamError, match="answer head is larger than 64 KiB"):
                    await up.request("GET", b"/big", [], b"")
            assert (await up.request("GET", b"/", [], b"")).status == 200
        finally:
            await up.close()
    assert peer.connections == 2  # the refused answer's connection was not reused


async def test_an_answer_head_under_64_kib_is_taken() -> None:
    head = _head_of(60_000)
    async with Scripted(lambda _: b"HTTP/1.1 200 OK\r\n" + head + b"content-length: 2\r\n\r\n{}") as url:
        up = Upstream(url)
        try:
            answer = await up.request("GET", b"/", [], b"")
        finally:
            await up.close()
    assert answer.body == b"{}" and len(answer.headers) == head.count(b"\r\n") + 1


async def test_chunk_extensions_are_no_head() -> None:
    """Chunks with a 104-byte extension each (legal, and not held by the parser) used up the
    head's allowance: a 502 "head larger than 64 KiB", as the reads happened to fall."""
    chunks = b"".join(b"1;e=" + b"z" * 100 + b"\r\nx\r\n" for _ in range(20_000))
    answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    async with Scripted(lambda _: answer) as url:
        up = Upstream(url)
        try:
            assert (await up.request("GET", b"/", [], b"")).body == b"x" * 20_000
        finally:
            await up.close()


@pytest.mark.parametrize(("start", "line"), [
    (b"HTTP/1.1 200 OK\r\n", b"x-h: " + b"v" * 1000 + b"\r\n"),
    (b"HTTP/1.1 200 OK\r\nx-long: ", b"a" * 1000),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n", b"x-t: " + b"v" * 1000 + b"\r\n"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nx-t: ", b"a" * 1000),
], ids=["headers", "one header", "trailers", "one trailer"])
async def test_an_endless_answer_head_is_cut_off(start: bytes, line: bytes) -> None:
    """Read to its end (or the timeout), an endless head grew the sidecar by all that came."""
    sent = 0
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            writer.write(start)
            while sent < 64 << 20:  # without a bound, all of it is read
                writer.write(line * 64)
                sent += len(line) * 64
                await writer.drain()
        done.set()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    up = Upstream(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", timeout=30)
    try:
        with pytest.raises(UpstreamError, match="answer head is larger than 64 KiB"):
            await up.request("GET", b"/", [], b"")
        await asyncio.wait_for(done.wait(), 10)  # the predictor was cut off
    finally:
        await up.close()
        server.close()
    assert sent < 64 << 20
