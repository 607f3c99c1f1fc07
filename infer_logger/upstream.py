"""A keep-alive HTTP/1.1 client to one origin over httptools: the sidecar's way to its predictor,
and the http sink's to its URL.

aiohttp's client spent ~60 % of the sidecar's CPU per proxied request on a trivial predictor
(request objects, header multidicts, timers, tracing hooks); neither use needs any of that: one
origin, whole bodies, bytes in and out. This pool writes each request with one `write`, parses
the answer with httptools (llhttp, the parser uvicorn and Node use) and keeps connections open.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

from infer_logger.errors import ConfigError, InferLoggerError
from infer_logger.httpserver import MAX_HEAD, other_codings

Headers = list[tuple[bytes, bytes]]


class UpstreamError(InferLoggerError):
    """The predictor's answer was not HTTP, or the connection broke before it was whole."""


class _HeadTooLarge(Exception):
    """Raised in a parser callback: the answer's header and trailer lines are past MAX_HEAD."""


_HEAD_TOO_LARGE = f"the predictor's answer head is larger than {MAX_HEAD >> 10} KiB (headers and trailers)"
# Bytes allowed each chunk's size line and CRLFs, read beyond the body: its extensions too (legal,
# RFC 9112 7.1.1, and not held by the parser), which 64 bytes took for an endless head.
_CHUNK_FRAMING = 4096


@dataclass(slots=True)
class Answer:
    status: int
    headers: Headers
    body: bytes
    truncated: bool = False
    """Only with `max_body`: `body` is the start of a longer or unfinished one (its connection is closed)."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request in flight on it."""

    def __init__(self, pool: Upstream) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Answer] | None = None
        self.head = False  # the request was HEAD: the answer has no body whatever its headers say
        self.received = False
        self.reused = False  # and idle long enough to have been closed by the predictor meanwhile
        self.kept = False  # taken from the pool: had answered before
        self.open_past_soon = False  # a look CLOSED_SOON after its answer found it open (while careful)
        self.reusable = True
        self.idle_since = 0.0
        self._headers: Headers = []
        self._body: list[bytes] = []
        self._framed = False  # content-length or chunked: EOF before the end means truncation
        self._codings = False  # a transfer-encoding other than plain chunked was named
        self._headers_done = False
        self._done = False
        self._stray = False  # an answer nobody asked for began: retired
        # The answer's head is bounded as a request's is (httptools and we would hold any amount):
        # its header and trailer lines as parsed (interim answers' too) to MAX_HEAD; and, as
        # httptools holds a line unseen until it ends, what is read beyond the body to twice that.
        self._head_size = 0
        self._beyond_body = 0  # room left for it

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def expect(self, waiter: asyncio.Future[Answer], head: bool) -> None:
        """A request goes out whose answer `waiter` awaits (`head`: the request is HEAD)."""
        self.waiter, self.head, self.received = waiter, head, False
        self._head_size, self._beyond_body = 0, 2 * MAX_HEAD

    def data_received(self, data: bytes) -> None:
        self.received = True
        self._beyond_body -= len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._fail(UpstreamError(_HEAD_TOO_LARGE))
            else:
                self._fail(UpstreamError(f"the predictor's answer is not HTTP/1.1: {exc}"))
        except httptools.HttpParserUpgrade:  # not a subclass of the above; nothing asked to switch
            self._fail(UpstreamError("the predictor switched protocols (101), which the sidecar never asks for"))
        else:
            if self._beyond_body < 0 and self.waiter is not None:
                self._fail(UpstreamError(_HEAD_TOO_LARGE))

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        idle = self.pool.forget(self)
        waiter = self.waiter
        if waiter is None or waiter.done():
            if idle:
                self.pool.lost_idle(self)
            return
        if self._headers_done and not self._framed and not self._done:
            self._finish()  # a body delimited by the end of the connection (HTTP/1.0 style)
        elif not self.received and self.reused:  # the predictor closed it as it was reused: not read
            waiter.set_exception(_Stale())
        else:
            if not self.received and self.kept:  # closed right after its last answer, most likely
                self.pool.closed_unannounced()
            waiter.set_exception(exc or ConnectionResetError("the predictor closed the connection"))

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self.waiter is None and not self._stray:
            # An answer nobody asked for begins (the predictor is out of step): idle in the pool,
            # the next request would take its rest as its own answer. Not used again.
            self._stray = True
            self.reusable = False
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.close()
        self._headers = []
        self._body = []
        self._framed = False
        self._codings = False
        self._done = False
        self._headers_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4  # ": " and CRLF
        if self._head_size > MAX_HEAD:
            raise _HeadTooLarge
        if self._headers_done:  # a trailer: not merged into the headers (RFC 9110 6.5.1), dropped
            return
        lname = name.lower()
        if lname == b"content-length":
            self._framed = True
        elif lname == b"transfer-encoding":
            coding = value.strip().lower()
            self._framed = self._framed or b"chunked" in coding
            self._codings = self._codings or coding != b"chunked"
        self._headers.append((lname, value))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # An interim answer (we never send Expect: the body goes with the headers): skip it.
            self._headers_done = False
            return
        # llhttp takes off chunked only: a body in another coding would pass on still encoded.
        if self._codings and (codings := other_codings(self._headers)):
            self._fail(UpstreamError(f"the predictor's answer has transfer coding {', '.join(codings)}; "
                                     "the sidecar takes chunked only"))
            return
        if self.head:
            # No body follows, but llhttp cannot be told so: finish here and drop the socket.
            self.reusable = False
            self._finish()

    def on_chunk_header(self) -> None:
        self._beyond_body += _CHUNK_FRAMING

    def on_body(self, body: bytes) -> None:
        self._beyond_body += len(body)
        self._body.append(body)

    def on_message_complete(self) -> None:
        if not self._done and self._headers_done:
            if not self.parser.should_keep_alive():
                self.reusable = False
            self._finish()

    # --

    def _finish(self, truncated: bool = False) -> None:
        self._done = True
        waiter, self.waiter = self.waiter, None
        answer = Answer(self.parser.get_status_code(), self._headers, b"".join(self._body), truncated)
        self._headers, self._body = [], []  # an idle connection holds none of it (a 188 MiB answer)
        if self.reusable:  # not after an answer nobody asked for (on_message_begin)
            self.pool.release(self)
        elif self.transport is not None:
            self.transport.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)

    def _fail(self, exc: Exception) -> None:
        self.reusable = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def expire(self, waiter: asyncio.Future[Answer]) -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError())


class _CappedConnection(_Connection):
    """A connection whose caller needs the head and at most `max_body` bytes of the body (the
    http sink: the status and Retry-After). Once the head is in, the answer is returned as soon
    as the body passes the cap, or stops (the deadline, a close, a broken chunk), with
    `truncated` set; the rest is not read: the connection is closed. A separate class so that
    the proxy's connections pay nothing for it."""

    def __init__(self, pool: Upstream, max_body: int) -> None:
        super().__init__(pool)
        self.room = self.max_body = max_body

    def data_received(self, data: bytes) -> None:
        if not self.reusable and self._done:  # cut short: what still comes is not read
            return
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._headers_done and self._framed and not self._done:
            self._cut()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.room = self.max_body

    def on_body(self, body: bytes) -> None:
        if self._done:  # the rest of the data that went past the cap
            return
        self._beyond_body += len(body)
        if len(body) > self.room:
            self._body.append(body[:self.room])
            self._cut()
            return
        self.room -= len(body)
        self._body.append(body)

    def _fail(self, exc: Exception) -> None:
        if self._headers_done and not self._done:  # a body that breaks after the head: still an answer
            self._cut()
        else:
            super()._fail(exc)

    def expire(self, waiter: asyncio.Future[Answer]) -> None:
        if self._headers_done and not self._done and waiter is self.waiter:
            self._cut()
        else:
            super().expire(waiter)

    def _cut(self) -> None:
        self.reusable = False  # its body was not read to the end: the next answer would not be ours
        self._finish(truncated=True)
        if self.transport is not None:
            self.transport.abort()


IDLE_MAX = 256  # idle connections kept: a burst's extra connections are closed, not kept open
IDLE_EXPIRY = 30.0  # seconds an idle connection is kept
STALE_AFTER = 1.0
"""Seconds a kept connection must have been idle for a loss before any answer to be taken for the
predictor's keep-alive timeout (and the request sent again on a new connection)."""
CLOSED_SOON = 0.1
"""Seconds after an answer within which a predictor's unannounced close of the idle connection is
its way (one answer per connection), not a keep-alive timeout."""


class _Stale(Exception):
    """A kept-alive connection the predictor had closed before our request reached it."""


# Methods a request of which may be sent twice (RFC 9110 9.2.2): POST may not.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def _peer_closed(transport: asyncio.BaseTransport) -> bool:
    """Whether the predictor's end of the connection (or a reset) has arrived, unread by the
    event loop so far. Not told over TLS, whose close_notify is data: such a connection is used."""
    sock = transport.get_extra_info("socket")
    if sock is None or transport.get_extra_info("sslcontext") is not None:
        return False
    try:
        probe = socket.socket(sock.family, sock.type, fileno=os.dup(sock.fileno()))
    except OSError:
        return True
    try:
        return probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        probe.close()


class Upstream:
    """Requests to one origin over kept-alive connections.

    `request` raises TimeoutError past `timeout` (the connection is dropped), OSError when the
    predictor cannot be reached or hangs up, and UpstreamError for an answer that is not HTTP.
    A kept-alive connection the predictor closed is not used: the event loop may not have read
    its end yet, so one idle for a while is looked at first; and while the predictor is seen to
    close connections soon after answering without saying so (`careful`), none is used but one
    idle that long. One lost unanswered as the request
    went out is sent again once on a new one only for methods that may be (GET, HEAD, PUT...):
    a POST may have been read, and a predictor that died of it must not get it twice (502);
    unless `resend_unanswered` (a sender that resends anyway: the http sink).

    With `max_body` (the http sink's, never the proxy's), an answer whose head is in is returned
    with at most that many body bytes, `truncated` when the body was longer or never ended.
    """

    def __init__(self, url: str, *, timeout: float = 60.0, max_body: int | None = None,
                 resend_unanswered: bool = False, tls: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("predictor_url", f"{url!r} is not an http(s)://host[:port] URL")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = (tls or ssl.create_default_context()) if parts.scheme == "https" else None
        self.prefix = parts.path.rstrip("/").encode()
        netloc = parts.netloc.rsplit("@", 1)[-1]
        self.host_header = netloc.encode("idna") if not netloc.isascii() else netloc.encode()
        self.timeout = timeout
        self.max_body = max_body
        # The http sink's: its worker would send the whole batch again anyway (at-least-once),
        # so a POST lost on a stale connection is better sent again at once.
        self.resend_unanswered = resend_unanswered
        self._idle: list[_Connection] = []  # in release order: the oldest first
        self._expiry: asyncio.TimerHandle | None = None  # armed for the oldest's expiry while any is idle
        self._closed = False
        self._careful = False

    async def request(self, method: str, target: bytes, headers: Headers, body: bytes) -> Answer:
        """Send `method target` (path and query, as the client wrote them) with these headers."""
        head = [method.encode(), b" ", self.prefix, target, b" HTTP/1.1\r\nhost: ", self.host_header, b"\r\n"]
        for name, value in headers:
            head += (name, b": ", value, b"\r\n")
        head.append(b"content-length: %d\r\n\r\n" % len(body))
        head.append(body)
        data = b"".join(head)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        for _ in range(2):
            conn = await self._connection(loop, deadline)
            try:
                return await self._exchange(loop, conn, data, method == "HEAD", deadline)
            except _Stale:
                if method not in _IDEMPOTENT and not self.resend_unanswered:
                    raise ConnectionResetError("the predictor closed a kept-alive connection as the request went "
                                               "out (not sent again: it may have been read)") from None
                continue
        raise ConnectionResetError("the predictor closed two connections in a row before answering")

    @property
    def careful(self) -> bool:
        """Whether the predictor was seen to close a connection unannounced right after its answer
        (uvicorn with timeout_keep_alive=0, HTTP/1.0-style servers): its end may come after the
        next request took the connection, that POST lost (502), later the busier it is, so no
        wait after an answer is long enough. Meanwhile each request gets a new connection, but
        for one idle STALE_AFTER and still open: it shows the predictor keeps them (a restarted
        one closed its connections so too), and ends the care, as one it closes later than
        CLOSED_SOON after its answer does (its keep-alive timeout)."""
        return self._careful

    def closed_unannounced(self) -> None:
        self._careful = True

    async def _connection(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        while self._idle:
            if self._careful:  # the oldest, if idle that long (the pool is in release order)
                if loop.time() - self._idle[0].idle_since < STALE_AFTER:
                    break
                conn = self._idle.pop(0)
            else:
                conn = self._idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                # A connection lost unanswered is taken for one the predictor's keep-alive timeout
                # closed as it was reused only if it had been idle that long; else the predictor
                # may have read the request.
                conn.reused = loop.time() - conn.idle_since >= STALE_AFTER
                if conn.reused and _peer_closed(conn.transport):
                    conn.transport.abort()
                    continue
                conn.kept = True
                self._careful = False  # careful, one idle STALE_AFTER and open shows the predictor keeps them
                return conn
        if self._closed:
            raise ConnectionResetError("the client is closed")
        async with asyncio.timeout_at(deadline):
            _, conn = await loop.create_connection(self._new_connection, self.host, self.port, ssl=self.ssl)
        return conn

    def _new_connection(self) -> _Connection:
        return _Connection(self) if self.max_body is None else _CappedConnection(self, self.max_body)

    async def _exchange(self, loop: asyncio.AbstractEventLoop, conn: _Connection, data: bytes,
                        head: bool, deadline: float) -> Answer:
        waiter: asyncio.Future[Answer] = loop.create_future()
        conn.expect(waiter, head)
        assert conn.transport is not None
        conn.transport.write(data)
        timer = loop.call_at(deadline, conn.expire, waiter)
        try:
            return await waiter
        except BaseException:
            conn.reusable = False
            if conn.transport is not None:
                conn.transport.abort()
            raise
        finally:
            timer.cancel()

    def release(self, conn: _Connection) -> None:
        if self._closed:
            assert conn.transport is not None
            conn.transport.close()
        else:
            now = conn.idle_since = asyncio.get_running_loop().time()
            if len(self._idle) >= IDLE_MAX:
                assert conn.transport is not None
                conn.transport.close()
                return
            self._idle.append(conn)
            if self._careful:  # does the predictor keep it past an answer? the kernel says, not our loop's lateness
                conn.open_past_soon = False
                asyncio.get_running_loop().call_later(CLOSED_SOON, self._look, conn, now)
            if self._expiry is None:
                self._arm_expiry()

    def _arm_expiry(self) -> None:
        # A timer, not the next release: with no traffic, idle connections must expire too.
        self._expiry = asyncio.get_running_loop().call_at(self._idle[0].idle_since + IDLE_EXPIRY, self._expire)

    def _expire(self) -> None:
        """Close the idle connections past IDLE_EXPIRY (the oldest first: taken last, as the newest
        is taken first), then wait for the next one's."""
        self._expiry = None
        now = asyncio.get_running_loop().time()
        while self._idle and self._idle[0].idle_since + IDLE_EXPIRY <= now:  # as armed
            conn = self._idle.pop(0)  # out of the pool first: its loss is not the predictor's close
            if conn.transport is not None:
                conn.transport.close()
        if self._idle:
            self._arm_expiry()

    def forget(self, conn: _Connection) -> bool:
        """Whether `conn` was idle in the pool."""
        try:
            self._idle.remove(conn)
        except ValueError:
            return False
        return True

    def _look(self, conn: _Connection, released: float) -> None:
        if conn.idle_since == released and conn in self._idle and conn.transport is not None \
                and not conn.transport.is_closing() and not _peer_closed(conn.transport):
            conn.open_past_soon = True

    def lost_idle(self, conn: _Connection) -> None:
        """`conn`, idle in the pool, was closed: by the predictor (the pool's own closes are of
        connections not in it). Soon after an answer: it closes them silently; found open
        CLOSED_SOON after it (`_look`, the kernel's word: our loop may be late to read a close),
        it keeps them, to its keep-alive timeout (a predictor whose timeout is under STALE_AFTER
        never leaves one idle that long, to end the care)."""
        if conn.open_past_soon:
            self._careful = False
        elif asyncio.get_running_loop().time() - conn.idle_since < CLOSED_SOON:
            self.closed_unannounced()

    async def close(self) -> None:
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for conn in self._idle:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()

