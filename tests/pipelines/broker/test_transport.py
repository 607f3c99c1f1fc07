"""The broker's delivery client against real sockets: a scripted raw server for framings,
keep-alive and failures."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
from collections.abc import Awaitable, Callable

import pytest

from infer_logger.testing import free_port
from pipelines.broker import transport
from pipelines.broker.transport import USER_AGENT, HttpClient
from tests.servers import Scripted
from tests.waiting import until


def answer(status: bytes = b"202 Accepted", body: bytes = b"", *extra: bytes) -> Callable[[bytes], bytes]:
    head = b"".join(h + b"\r\n" for h in extra)
    return lambda _: b"HTTP/1.1 %s\r\ncontent-length: %d\r\n%s\r\n%s" % (status, len(body), head, body)


async def test_keeps_the_connection_and_writes_the_head() -> None:
    peer = Scripted(answer(b"200 OK", b'{"ok":1}', b"Content-Type: application/json"))
    client = HttpClient()
    async with peer as url:
        for _ in range(3):
            response = await client.post(url + "/sub?x=1", {"ce-id": "1"}, b"body")
            assert (response.status, response.body) == (200, b'{"ok":1}')
            assert response.headers["content-type"] == "application/json"  # names lower-cased
        await client.aclose()
    assert peer.connections == 1
    head = peer.heads[0]
    assert head.startswith(b"POST /sub?x=1 HTTP/1.1\r\nhost: 127.0.0.1:")
    assert f"user-agent: {USER_AGENT}\r\n".encode() in head
    assert b"content-length: 4\r\n" in head and b"ce-id: 1\r\n" in head and head.endswith(b"\r\n\r\nbody")


async def test_a_kept_connection_the_peer_closed_is_retried_once_on_a_new_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen = itertools.count(1)
    # The second request arrives on the kept connection, and the peer hangs up without an
    # answer (as a server closing an idle connection just then): sent again, on a new one.
    monkeypatch.setattr(transport, "STALE_AFTER", 0.0)  # the connection counts as idle long enough
    peer = Scripted(lambda _: None if next(seen) == 2 else answer()(b""))
    client = HttpClient()
    async with peer as url:
        assert (await client.post(url, {}, b"1")).status == 202
        assert (await client.post(url, {}, b"2")).status == 202
        await client.aclose()
    assert peer.connections == 2 and [h[-1:] for h in peer.heads] == [b"1", b"2", b"2"]


async def test_a_connection_lost_unanswered_right_after_use_is_not_resent() -> None:
    """It was idle too briefly for a keep-alive timeout: the subscriber may have read the POST
    (and crashed), and a resend would be an attempt beyond the trigger's retry policy."""
    seen = itertools.count(1)
    peer = Scripted(lambda _: None if next(seen) == 2 else answer()(b""))
    client = HttpClient()
    async with peer as url:
        assert (await client.post(url, {}, b"1")).status == 202
        with pytest.raises(ConnectionError):
            await client.post(url, {}, b"2")
        await client.aclose()
    assert [h[-1:] for h in peer.heads] == [b"1", b"2"]


async def _burst(client: HttpClient, url: str, workers: int, each: int) -> list[int]:
    """`workers` senders posting `each` bodies in turn (each answer frees a connection another takes)."""
    async def worker(w: int) -> list[int]:
        return [(await client.post(url, {}, b"%d-%d" % (w, i), timeout=30)).status for i in range(each)]
    per_worker = await asyncio.gather(*(worker(w) for w in range(workers)))
    return [status for statuses in per_worker for status in statuses]


async def test_a_subscriber_closing_each_connection_unannounced_loses_no_post() -> None:
    """A subscriber that hangs up right after each answer without `Connection: close` (uvicorn
    with timeout_keep_alive=0): in a burst its connection went back to the pool and was taken
    again before the loop read its end; the POST went into a closed socket, unanswered, and was
    not resent (the event lost with retry 0). Its end, already in, is looked at before reuse."""
    peer = Scripted(answer(), close_after=1)
    client = HttpClient()
    async with peer as url:
        statuses = await _burst(client, url, workers=10, each=20)
        await client.aclose()
    assert statuses == [202] * 200
    bodies = [h.rpartition(b"\r\n\r\n")[2] for h in peer.heads]
    assert sorted(bodies) == sorted(b"%d-%d" % (w, i) for w in range(10) for i in range(20))  # each once


async def test_a_subscriber_whose_close_comes_late_is_learnt() -> None:
    """A subscriber in another thread closes after each answer, maybe after the loop reused the
    connection (the look finds no end yet): the client learns it closes them unannounced, then
    gives each POST a new connection. Never sent twice."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    seen: list[bytes] = []

    def one_answer_each() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                with conn:
                    data = b""
                    while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                        data += chunk
                    if data:
                        seen.append(data)
                        conn.sendall(answer()(b""))

    threading.Thread(target=one_answer_each, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
    client = HttpClient()
    try:
        for _ in range(3):  # learnt here, maybe losing one
            with contextlib.suppress(ConnectionError):
                await client.post(url, {}, b"x", timeout=30)
        await until(lambda: client.careful(url), what="the close seen")
        learnt = len(seen)
        assert await _burst(client, url, workers=10, each=10) == [202] * 100
        assert client.careful(url)
    finally:
        await client.aclose()
        listener.close()
    assert len(seen) == learnt + 100  # each reached the subscriber once


async def _restarted_once(keep_alive: float | None) -> tuple[HttpClient, str, list[asyncio.StreamWriter],
                                                             asyncio.Server]:
    """A client careful of a subscriber that keeps connections (up to `keep_alive` idle) but closed
    its first right after its answer, as a restart does; the subscriber's connections as accepted."""
    connections: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            while True:
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\nx"), keep_alive)
                writer.write(answer()(b""))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    client = HttpClient()
    assert (await client.post(url, {}, b"x", timeout=30)).status == 202
    connections[0].close()  # the restart, right after the answer
    for _ in range(2):  # its end sent (the close's callback), not yet read by our loop
        await asyncio.sleep(0)
    assert (await client.post(url, {}, b"x", timeout=30)).status == 202  # its end looked at: a new connection
    assert client.careful(url) and len(connections) == 2
    return client, url, connections, server


async def test_a_care_come_back_is_ended_by_a_look_again_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    """Restarted twice, a subscriber whose keep-alive timeout (0.5 s) is under STALE_AFTER never
    left a connection idle that long: the care a look had ended once, come back, was for good, a
    new connection per POST."""
    monkeypatch.setattr(transport, "RELAPSE_HOLD", 0.5, raising=False)
    client, url, connections, server = await _restarted_once(keep_alive=0.5)
    try:
        await _cared_for_no_more(client, url, connections)
        connections[-1].close()  # the second restart, right after an answer
        for _ in range(2):
            await asyncio.sleep(0)
        assert (await client.post(url, {}, b"x", timeout=30)).status == 202
        assert client.careful(url)
        await _cared_for_no_more(client, url, connections)
        # Each time it comes back, its hold doubles: a subscriber that fools the looks (closing
        # each connection a while after its answer, unread) lost a POST at every hold's end.
        connections[-1].close()
        for _ in range(2):
            await asyncio.sleep(0)
        assert (await client.post(url, {}, b"x", timeout=30)).status == 202
        assert client.careful(url) and client._holds[transport._target(url).origin] == 1.0
    finally:
        await client.aclose()
        server.close()


@pytest.mark.parametrize("stale_after", [0.2, 60.0])
async def test_a_subscriber_restarted_once_costs_no_connection_per_post_for_good(
        monkeypatch: pytest.MonkeyPatch, stale_after: float) -> None:
    """A restart closes the idle connections soon after their answers, as a subscriber of one answer
    per connection does: a connection found open CLOSED_SOON (or idle STALE_AFTER) after its answer
    ends the care. Only the second ended it: meanwhile every POST had a new connection, and the
    pool filled with 256 it then kept open for good (a restarted subscriber under load)."""
    monkeypatch.setattr(transport, "STALE_AFTER", stale_after)
    client, url, connections, server = await _restarted_once(keep_alive=None)
    try:
        await _cared_for_no_more(client, url, connections)
    finally:
        await client.aclose()
        server.close()


async def _cared_for_no_more(client: HttpClient, url: str, connections: list[asyncio.StreamWriter]) -> None:
    """POSTs until the client is careful no more; then 30 more open no connection."""
    async def posting() -> None:
        while client.careful(url):
            assert (await client.post(url, {}, b"x", timeout=30)).status == 202
            await asyncio.sleep(0.02)
    await asyncio.wait_for(posting(), 30)
    before = len(connections)
    for _ in range(30):
        assert (await client.post(url, {}, b"x", timeout=30)).status == 202
    assert len(connections) == before


async def test_the_care_ends_at_a_keep_alive_timeout_under_stale_after() -> None:
    """A subscriber whose keep-alive timeout is under STALE_AFTER never leaves a connection idle that
    long: its timeout's close, of a connection a look found open CLOSED_SOON after its answer, ends
    the care (seen as the pool is next used)."""
    client, url, _, server = await _restarted_once(keep_alive=0.5)
    try:
        for _ in range(500):
            if not client.careful(url):
                break
            await asyncio.sleep(0.02)
            assert (await client.post(url, {}, b"x", timeout=30)).status == 202
        assert not client.careful(url)
    finally:
        await client.aclose()
        server.close()


def _closing_unread_after(received: list[bytes]) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                              Awaitable[None]]:
    """A subscriber that answers one POST a connection (kept in `received`) and closes it 0.3 s
    later, reading nothing more."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            received.append(await reader.readuntil(b"\r\n\r\nx"))
            writer.write(answer()(b""))
            await asyncio.sleep(0.3)
        writer.close()
    return serve


async def test_a_subscriber_closing_each_connection_a_while_after_its_answer_stays_cared_for() -> None:
    """It answers one POST a connection and closes it 0.3 s later, reading nothing more: each look
    found the connection open CLOSED_SOON after its answer and ended the care, and the next POST
    went into a connection the subscriber would never read (17 of 100 lost)."""
    received: list[bytes] = []
    server = await asyncio.start_server(_closing_unread_after(received), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    client = HttpClient()
    lost = 0
    try:
        for _ in range(60):
            try:
                assert (await client.post(url, {}, b"x", timeout=30)).status == 202
            except ConnectionError:
                lost += 1
            await asyncio.sleep(0.02)
        assert client.careful(url)
    finally:
        await client.aclose()
        server.close()
    assert lost <= 3, f"{lost} of 60 lost: the care did not hold"  # learnt by the first losses
    assert len(received) == 60 - lost  # none sent twice


async def test_a_restart_closing_many_pooled_connections_comes_back_once() -> None:
    """Each connection the restart closed doubled the hold: 7 of them set it to the hour's cap."""
    client, url, connections, server = await _restarted_once(keep_alive=None)
    try:
        await _cared_for_no_more(client, url, connections)
        burst = await asyncio.gather(*(client.post(url, {}, b"x", timeout=30) for _ in range(8)))
        assert [r.status for r in burst] == [202] * 8  # 8 connections in the pool
        for connection in connections:  # the second restart, right after their answers
            connection.close()
        for _ in range(2):
            await asyncio.sleep(0)
        for _ in range(8):  # each finds one of the closed ones
            assert (await client.post(url, {}, b"x", timeout=30)).status == 202
        assert client.careful(url) and client._holds[transport._target(url).origin] == transport.RELAPSE_HOLD
    finally:
        await client.aclose()
        server.close()


async def test_idle_connections_of_an_origin_no_longer_posted_to_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst's connections stayed in the pool for good (the least recently used never used
    again); then expired only as their own origin's next POST ended: a subscriber no trigger posts
    to any more (a reload) kept its connections open for good; then only as any POST ended."""
    monkeypatch.setattr(transport, "IDLE_EXPIRY", 0.2)
    closed = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal closed
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readuntil(b"\r\n\r\nx")
                writer.write(answer()(b""))
        closed += 1
        writer.close()

    old, new = await asyncio.start_server(serve, "127.0.0.1", 0), await asyncio.start_server(serve, "127.0.0.1", 0)
    client = HttpClient()
    try:
        first = f"http://127.0.0.1:{old.sockets[0].getsockname()[1]}/"
        burst = await asyncio.gather(*(client.post(first, {}, b"x", timeout=30) for _ in range(5)))
        assert [r.status for r in burst] == [202] * 5
        await until(lambda: closed == 5, what="the old subscriber's 5 connections closed, no POST since")
        assert (await client.post(f"http://127.0.0.1:{new.sockets[0].getsockname()[1]}/", {}, b"x")).status == 202
        assert (await client.post(first, {}, b"x")).status == 202  # its pool goes on
    finally:
        await client.aclose()
        old.close()
        new.close()


async def test_what_was_learnt_of_a_subscriber_outlasts_a_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another origin's POST swept while this one's was in flight, on its only connection: it was
    forgotten, its next loss taken for a first one, and the looks ended the care again and again
    (a POST to the slow closer lost at every cycle)."""
    monkeypatch.setattr(transport, "_SWEEP_EVERY", 0.0)
    received: list[bytes] = []

    async def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readuntil(b"\r\n\r\nx")
                writer.write(answer()(b""))

    servers = [await asyncio.start_server(_closing_unread_after(received), "127.0.0.1", 0), await asyncio.start_server(keep, "127.0.0.1", 0)]
    closer, other = (f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}/" for s in servers)
    client = HttpClient()
    lost = 0
    try:
        for _ in range(20):
            posting = asyncio.ensure_future(client.post(closer, {}, b"x", timeout=30))
            await asyncio.sleep(0.05)
            assert (await client.post(other, {}, b"x", timeout=30)).status == 202  # its end sweeps
            try:
                assert (await posting).status == 202
            except ConnectionError:
                lost += 1
            await asyncio.sleep(0.1)
    finally:
        await client.aclose()
        for server in servers:
            server.close()
    assert lost <= 3, f"{lost} of 20 lost: what was learnt did not hold"
    assert len(received) == 20 - lost  # none sent twice


async def test_hang_up_on_a_new_connection_is_not_retried() -> None:
    peer = Scripted(lambda _: None)
    client = HttpClient()
    async with peer as url:
        with pytest.raises(ConnectionError):
            await client.post(url, {}, b"x")
        await client.aclose()
    assert len(peer.heads) == 1  # the peer may have acted on it: the caller's retry policy decides


async def test_truncated_answer_is_an_error() -> None:
    # content-length says 10: a close after 4 bytes is a truncation, not the end of the body.
    async with Scripted(lambda _: b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf", close_after=1) as url:
        client = HttpClient()
        with pytest.raises(ConnectionError):
            await client.post(url, {}, b"x")
        await client.aclose()


async def test_answer_ended_by_close_and_connection_close() -> None:
    framed_by_close = Scripted(lambda _: b"HTTP/1.0 200 OK\r\n\r\nuntil the end", close_after=1)
    client = HttpClient()
    async with framed_by_close as url:
        for _ in range(2):
            assert (await client.post(url, {}, b"")).body == b"until the end"
    said_close = Scripted(answer(b"200 OK", b"", b"connection: close"))
    async with said_close as url:
        for _ in range(2):
            assert (await client.post(url, {}, b"")).status == 200
    await client.aclose()
    assert framed_by_close.connections == 2 and said_close.connections == 2


async def test_chunked_and_interim_answers() -> None:
    chunked = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    peer = Scripted(lambda _: chunked)
    client = HttpClient()
    async with peer as url:
        for _ in range(2):
            response = await client.post(url, {}, b"")
            assert (response.status, response.body) == (200, b"abc")
        await client.aclose()
    assert peer.connections == 1


async def test_timeout_drops_the_connection_and_the_next_post_works() -> None:
    held: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)  # reads, never answers
    url = f"http://127.0.0.1:{silent.sockets[0].getsockname()[1]}/"
    client = HttpClient()
    with pytest.raises(TimeoutError):
        await client.post(url, {}, b"x", timeout=0.2)
    silent.close()
    async with Scripted(answer()) as url:
        assert (await client.post(url, {}, b"fine", timeout=2)).status == 202
    await client.aclose()
    for writer in held:
        writer.close()


async def test_refused_and_malformed() -> None:
    client = HttpClient()
    with pytest.raises(OSError):
        await client.post(f"http://127.0.0.1:{free_port()}/", {}, b"x", timeout=2)
    async with Scripted(lambda _: b"SMTP ready\r\n\r\n") as url:
        with pytest.raises(ConnectionError, match="malformed HTTP response"):
            await client.post(url, {}, b"x", timeout=2)
    await client.aclose()


async def test_switching_protocols_is_an_answer_and_ends_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    """httptools raises HttpParserUpgrade (no HttpParserError) after a 101's head: it escaped
    data_received (asyncio's "Fatal error" traceback) and the attempt had no answer."""
    upgraded = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n\x81\x00"
    bare = b"HTTP/1.1 101 Switching Protocols\r\n\r\n"  # llhttp pauses on a 101 even without an upgrade header
    client = HttpClient()
    for reply in (upgraded, bare):
        peer = Scripted(lambda _: reply)
        async with peer as url:
            for _ in range(2):
                response = await client.post(url, {}, b"x", timeout=5)
                assert (response.status, response.body) == (101, b"")
        assert peer.connections == 2  # the connection is the peer's other protocol's now: not reused
    await client.aclose()
    assert not [r for r in caplog.records if r.name == "asyncio"]


async def test_bad_headers_and_urls_are_refused_before_sending() -> None:
    peer = Scripted(answer())
    client = HttpClient()
    async with peer as url:
        with pytest.raises(ValueError, match="line break"):
            await client.post(url, {"x-a": "1\r\nx-injected: 2"}, b"")
        with pytest.raises(ValueError, match="not an http"):
            await client.post("ftp://127.0.0.1/", {}, b"")
        await client.aclose()
    assert peer.heads == []


async def test_a_body_past_the_cap_is_not_waited_for() -> None:
    """Past `max_response_bytes` the answer is settled and the connection closed: a body that
    never ends (here 100 GB announced, 300 bytes sent) was read until the timeout, and its
    delivery counted as unanswered (the event sent again)."""
    peer = Scripted(lambda _: b"HTTP/1.1 200 OK\r\ncontent-length: 100000000000\r\n\r\n" + b"x" * 300)
    client = HttpClient(max_response_bytes=100)
    async with peer as url:
        for _ in range(2):
            response = await client.post(url, {}, b"", timeout=30)
            assert (response.status, response.body, response.truncated) == (200, b"x" * 100, True)
        await client.aclose()
    assert peer.connections == 2  # never reused: the rest of its body would be the next answer


async def _endless_after(start: bytes, client: HttpClient, failing: str) -> None:
    """A subscriber answering `start` then one endless header line: the attempt fails naming `failing`."""
    stop = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(start)
        try:
            while not stop.is_set():  # until the client hangs up
                writer.write(b"a" * 65536)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    try:
        with pytest.raises(ConnectionError, match=failing):
            await client.post(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/", {}, b"x", timeout=30)
    finally:
        stop.set()
        server.close()


async def test_a_head_past_its_bound_fails_the_attempt() -> None:
    """`max_response_bytes` bounded only the body: a subscriber streaming one endless header grew
    the client by 100+ MB until the attempt's timeout. Past 64 KiB of head the attempt fails as a
    broken answer does (the trigger's retry policy decides); a large head within it is read whole."""
    client = HttpClient(max_response_bytes=2 << 20)
    await _endless_after(b"HTTP/1.1 200 OK\r\nx-big: ", client, "head")
    many = [b"x-h%d: %s" % (i, b"v" * 1000) for i in range(60)]  # 60 KiB of head, the body after it
    async with Scripted(answer(b"200 OK", b"body", *many)) as url:
        response = await client.post(url, {}, b"", timeout=10)
        assert (response.status, response.body, len(response.headers)) == (200, b"body", 61)
    async with Scripted(answer(b"200 OK", b"body", *many, *many[:10])) as url:
        with pytest.raises(ConnectionError, match="head"):
            await client.post(url, {}, b"", timeout=10)
    await client.aclose()


async def test_trailers_past_the_heads_bound_fail_the_attempt() -> None:
    """A chunked answer's trailers are header lines after the body: one endless trailer grew the
    client until the attempt's timeout, as an endless header did. Bounded as a head is; small
    chunks and trailers within the bound are read whole."""
    client = HttpClient(max_response_bytes=2 << 20)
    await _endless_after(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-big: ",
                         client, "trailers")
    chunks = b"".join(b"1\r\n%c\r\n" % c for c in b"x" * 20000)  # 120 KB of framing around 20 KB of body
    trailers = b"".join(b"x-t%d: %s\r\n" % (i, b"v" * 1000) for i in range(60))
    whole = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunks + b"0\r\n" + trailers + b"\r\n"
    async with Scripted(lambda _: whole) as url:
        for _ in range(2):  # the kept connection too
            response = await client.post(url, {}, b"", timeout=10)
            assert (response.status, response.body) == (200, b"x" * 20000)
    await client.aclose()


@pytest.mark.parametrize("writes", ["one", "separate"])
async def test_an_interim_head_counts_not_against_the_answers(writes: str) -> None:
    """A 103 of 40 KiB of head then a 200 of 30 KiB (each within the bound) failed: the bytes of
    the read the interim head ended in were counted for the answer's head."""
    hints = b"".join(b"link: </r%d>; x=%s\r\n" % (i, b"x" * 1000) for i in range(40))
    interim = b"HTTP/1.1 103 Early Hints\r\n" + hints + b"\r\n"
    final = answer(b"200 OK", b"ok", *(b"x-h%d: %s" % (i, b"v" * 1000) for i in range(30)))(b"")

    async def early_hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await reader.readuntil(b"\r\n\r\nx")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            if writes == "one":
                writer.write(interim + final)
            else:
                writer.write(interim)
                await writer.drain()
                await asyncio.sleep(0.05)  # apart, most likely two reads (either way, both must pass)
                writer.write(final)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(early_hints, "127.0.0.1", 0)
    client = HttpClient()
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        for _ in range(3):  # the kept connection too
            response = await client.post(url, {}, b"x", timeout=10)
            assert (response.status, response.body) == (200, b"ok")
    finally:
        await client.aclose()
        server.close()


async def test_an_answer_of_the_bounds_size_in_one_read_keeps_its_connection() -> None:
    """A whole answer of 64 KiB in one read (its head within it) was counted as head past the
    bound after it succeeded: the connection was dropped, a new one opened for the next."""
    filler = b"x-f: " + b"v" * (65536 - 200)
    one = answer(b"200 OK", b"ok", filler)(b"")
    peer = Scripted(answer(b"200 OK", b"ok", filler + b"v" * (65536 - len(one))))
    client = HttpClient()
    async with peer as url:
        for _ in range(3):
            assert (await client.post(url, {}, b"", timeout=10)).status == 200
        await client.aclose()
    assert peer.connections == 1


class TestLookups:
    """Subscriber host names are looked up on the client's own threads, once per host at a time."""

    @staticmethod
    def resolving(monkeypatch: pytest.MonkeyPatch, answer: Callable[[str], str]) -> list[str]:
        asked: list[str] = []
        real = socket.getaddrinfo

        def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list[object]:
            if not host.endswith(".test"):
                return real(host, port, *args, **kwargs)  # type: ignore[arg-type]
            asked.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer(host), port))]

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        return asked

    async def test_a_host_is_looked_up_once_for_many_connections(self, monkeypatch: pytest.MonkeyPatch) -> None:
        asked = self.resolving(monkeypatch, lambda _: "127.0.0.1")
        peer = Scripted(answer())
        client = HttpClient()
        async with peer as url:
            url = url.replace("127.0.0.1", "sub.test")
            responses = await asyncio.gather(*(client.post(url, {}, b"x", timeout=30) for _ in range(20)))
            await client.aclose()
        assert [r.status for r in responses] == [202] * 20 and peer.connections == 20
        assert asked == ["sub.test"]
        assert peer.heads[0].startswith(b"POST / HTTP/1.1\r\nhost: sub.test:")  # the name, not the address

    async def test_a_host_whose_lookup_hangs_holds_back_no_other(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Lookups queued on asyncio's default executor (6 threads) per connection: a hanging name
        server held every other subscriber's new connections until their deliveries timed out."""
        release = threading.Event()

        def answer_(host: str) -> str:
            if host == "hung.test":
                release.wait(60)
                raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
            return "127.0.0.1"

        asked = self.resolving(monkeypatch, answer_)
        peer = Scripted(answer())
        client = HttpClient()
        async with peer as url:
            hung = [asyncio.ensure_future(client.post(url.replace("127.0.0.1", "hung.test"), {}, b"x", timeout=60))
                    for _ in range(40)]
            await asyncio.sleep(0.1)
            try:
                response = await asyncio.wait_for(client.post(url.replace("127.0.0.1", "ok.test"), {}, b"x"), 30)
            finally:
                release.set()
            assert response.status == 202
            for failed in await asyncio.gather(*hung, return_exceptions=True):
                assert isinstance(failed, socket.gaierror)
            await client.aclose()
        assert asked.count("hung.test") == 1

    async def test_a_host_no_address_of_answers_is_looked_up_again(self, monkeypatch: pytest.MonkeyPatch) -> None:
        addresses = iter(["127.0.0.3", "127.0.0.1"])  # the peer listens on 127.0.0.1 only
        asked = self.resolving(monkeypatch, lambda _: next(addresses))
        peer = Scripted(answer())
        client = HttpClient()
        async with peer as url:
            url = url.replace("127.0.0.1", "moved.test")
            with pytest.raises(ConnectionRefusedError):
                await client.post(url, {}, b"x", timeout=30)
            assert (await client.post(url, {}, b"x", timeout=30)).status == 202
            await client.aclose()
        assert asked == ["moved.test", "moved.test"]
