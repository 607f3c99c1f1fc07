"""A lean HTTP/1.1 client for deliveries: keep-alive connections per origin, httptools parsing.

aiohttp's client costs about 80 µs of CPU per POST on this machine, this one about 20 µs, and a
broker makes one POST per delivery: that is most of its cost per event. It does what deliveries
need and no more: POST with a Content-Length body over http or https, any response framing
back (llhttp via httptools, chunked included), no redirects, proxies or cookies. The pool has no
limit, so one hanging subscriber's connections never starve another's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import select
import socket
import ssl
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial
from urllib.parse import urlsplit

import httptools

from infer_logger.upstream import CLOSED_SOON, IDLE_EXPIRY, STALE_AFTER

USER_AGENT = "infer-logger-broker"
_IDLE_MAX = 256  # idle connections kept per origin
RELAPSE_HOLD = 60.0  # seconds a care a look ended and that came back is ended by no look (doubled each time)
_RELAPSE_HOLD_MAX = 3600.0
_SWEEP_EVERY = 1.0  # seconds between two looks for expired idle connections of every origin
_LOOKUP_TTL = 5.0  # seconds a host's addresses are reused: a moved subscriber is found again soon
_LOOKUP_THREADS = 32  # hosts looked up at once (one lookup per host at a time)
_HEAD_MAX = 64 * 1024  # a response's status line and headers, as uvicorn bounds a request's


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes
    truncated: bool = False
    """The body went past the client's `max_response_bytes`: `body` is its start; the rest was not
    read (the connection was closed), so an endless or huge body costs neither memory nor time."""


def _left(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        raise TimeoutError("no time left")
    return left


@dataclass(frozen=True, slots=True)
class _Target:
    origin: tuple[str, int, bool]
    host_header: str
    path: str


@lru_cache(maxsize=1024)
def _target(url: str) -> _Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target((parts.hostname, port, tls), parts.netloc.rpartition("@")[2], path)


class _Connection(asyncio.Protocol):
    def __init__(self, max_body: int | None = None) -> None:
        self.max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[HttpResponse] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._received = False
        self._headers_done = False
        self._framed = False  # content-length or chunked: a close before the end is a truncation
        self._size = 0
        self._head = 0  # bytes of the head read so far
        self._head_ended = False  # a head ended in the chunk being fed
        self._moved = False  # body or an end came of the chunk being fed
        self._idle = 0  # bytes fed since the last that did (a chunked answer's trailers)
        self._truncated = False
        self.keep_alive = False
        self.idle_since = 0.0
        self.lost_at: float | None = None  # when the loop read the connection's end
        self.kept = False  # taken from the pool: had answered before
        self.stale = False  # and idle STALE_AFTER: a loss before any answer is the peer's keep-alive timeout

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._received = True
        while data and not self.closed:  # aborted (a body cut, a head too large): the rest is not wanted
            # The parser holds a header until it ends: an endless one grew it until the timeout.
            # So the head is fed at most up to its bound, and what follows once it ended.
            counting = not self._headers_done
            room = _HEAD_MAX - self._head
            chunk = data if not counting or len(data) <= room else data[:room]
            data = data[len(chunk):]
            self._head_ended = self._moved = False
            try:
                self._parser.feed_data(chunk)
            except httptools.HttpParserUpgrade:  # no HttpParserError: it escaped into asyncio's handler
                # A no-op: the 101 was the answer (on_message_complete); the rest is the other protocol's.
                self._fail(ConnectionError("the response switched protocols before it ended"))
                self.close()
                return
            except httptools.HttpParserError as exc:
                self._fail(ConnectionError(f"malformed HTTP response: {exc}"))  # a no-op after a bare 101
                self.close()
                return
            # A head that ended in this chunk (an interim one's, or the answer's, the answer maybe
            # whole and its parser reset) is within the bound: the chunk counts for no other.
            if counting and not self._head_ended:
                self._head += len(chunk)
                if self._head >= _HEAD_MAX:  # and still not ended
                    self._fail(ConnectionError(f"the response's head is larger than {_HEAD_MAX} bytes"))
                    self._abort()
                    return
            elif not counting:
                # Trailers are header lines after the body, held by the parser as a head's are;
                # bytes that bring no body nor an end are them (or chunk framing): bounded alike.
                self._idle = 0 if self._moved else self._idle + len(chunk)
                if self._idle >= _HEAD_MAX:
                    self._fail(ConnectionError(f"the response's trailers are larger than {_HEAD_MAX} bytes"))
                    self._abort()
                    return

    def _abort(self) -> None:
        self.closed, self.keep_alive = True, False
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost_at = asyncio.get_running_loop().time()
        if self._headers_done and exc is None and not self._framed:  # a body ended by the close
            self.keep_alive = False
            self._finish()
        self._fail(ConnectionError("the connection closed before a response"))

    # -- httptools callbacks ----------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        self._headers[key] = value.decode("latin-1")
        if key == "content-length" or (key == "transfer-encoding" and b"chunked" in value.lower()):
            self._framed = True

    def on_headers_complete(self) -> None:
        self._headers_done = self._head_ended = True
        self._head = 0  # an interim response's head (a 100) counts not against the real one's

    def on_body(self, body: bytes) -> None:
        self._moved = True
        if self._truncated:  # cut: what the same read still held is not wanted
            return
        if self.max_body is not None:
            room = self.max_body - self._size
            if room < len(body):
                # Settled on what came; reading the rest would take as long as the receiver
                # likes (an endless 2xx timed out, and its event was delivered again).
                self._body.append(body[:max(room, 0)])
                self._truncated = True
                self._finish()
                self._abort()
                return
            self._size += len(body)
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._moved = True
        if self._truncated:
            return
        status = self._parser.get_status_code()
        if status < 200 and status != 101:  # an interim response (103, an unasked 100): the real one follows
            self._headers, self._body, self._headers_done, self._framed = {}, [], False, False
            return
        # A 101 is the last HTTP on the connection (llhttp stops there): the answer, never kept.
        self.keep_alive = status != 101 and self._parser.should_keep_alive()
        self._finish()

    # -- use ------------------------------------------------------------------------------------------

    async def request(self, message: bytes, timeout: float | None) -> HttpResponse:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[HttpResponse] = loop.create_future()
        self._waiter = waiter
        self._headers, self._body, self._received, self._headers_done = {}, [], False, False
        self._framed, self._size, self._head, self._truncated, self._idle = False, 0, 0, False, 0
        self.transport.write(message)
        # A timer, not asyncio.timeout: a third of the cost, and this runs once per delivery.
        timer = None if timeout is None else loop.call_later(timeout, self._expire, timeout)
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self, timeout: float) -> None:
        self._fail(TimeoutError(f"no answer within {timeout:g}s"))
        self.close()

    @property
    def answered(self) -> bool:
        """Whether any byte of a response came back (a reused connection that dies before can be retried)."""
        return self._received

    def _finish(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(HttpResponse(self._parser.get_status_code(), self._headers, b"".join(self._body),
                                           self._truncated))
        self._headers_done = False

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def peer_closed(self) -> bool:
        """Whether the idle connection has anything to read, unread by the loop so far: the peer's
        end, a reset (or bytes no request asked for): not to be used. One poll(0), a fifth of the
        cost of a peek through a dup of the socket, and this runs on every reuse. Not told over
        TLS, whose close_notify is data."""
        transport = self.transport
        if transport is None or transport.get_extra_info("sslcontext") is not None:
            return False
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        poll = select.poll()
        poll.register(sock.fileno(), select.POLLIN)
        return bool(poll.poll(0))


@lru_cache(maxsize=1024)
def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _Resolver:
    """Host names to addresses on threads of its own, one lookup per host at a time, each answer
    reused for a few seconds. asyncio resolves each new connection's host on the loop's default
    executor (6 threads here): a host whose name server hangs queued a lookup per delivery there,
    and every other trigger's new connections (and the trigger files' reloads) waited behind
    them until they timed out."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._known: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._pending: dict[tuple[str, int], asyncio.Future[list[str]]] = {}

    async def addresses(self, host: str, port: int) -> list[str]:
        if _is_address(host):
            return [host]
        loop = asyncio.get_running_loop()
        key = (host, port)
        known = self._known.get(key)
        if known is not None and known[0] > loop.time():
            return known[1]
        future = self._pending.get(key)
        if future is None:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(_LOOKUP_THREADS, thread_name_prefix="broker-lookup")
            future = self._pending[key] = loop.run_in_executor(self._executor, _lookup, host, port)
            future.add_done_callback(partial(self._settle, key))
        return await asyncio.shield(future)  # a waiter that times out leaves the lookup to the others

    def forget(self, host: str, port: int) -> None:
        """Look again next time (no address answered)."""
        self._known.pop((host, port), None)

    def _settle(self, key: tuple[str, int], future: asyncio.Future[list[str]]) -> None:
        if self._pending.get(key) is future:
            del self._pending[key]
        if not future.cancelled() and future.exception() is None:  # a failure is looked up again
            if len(self._known) >= 1024:
                self._known.clear()
            self._known[key] = (asyncio.get_running_loop().time() + _LOOKUP_TTL, future.result())

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def _lookup(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))  # in the resolver's order, once each


class HttpClient:
    """POSTs over kept-alive connections, pooled per origin.

    A subscriber may close a connection right after its answer without saying so (uvicorn with
    timeout_keep_alive=0, HTTP/1.0-style servers): its end may come after the next POST took the
    connection, which is then lost unanswered, and not sent again (it may have been read). So an
    idle connection is looked at before reuse (an end already in: not used), and an origin seen to
    close connections so is `careful`: each POST gets a new connection, but for one idle
    STALE_AFTER and still open. That, or one found still open CLOSED_SOON after its answer (but for
    RELAPSE_HOLD, doubled each time, after such a look's end of the care came back: one closing
    connections a while after its answers, unread, looks so too), shows the subscriber keeps them
    (a restarted one closed its connections so too) and ends the care. An idle connection past
    IDLE_EXPIRY is closed by the next POST's end, whatever its origin (at most once a second), or
    without one by a timer, at most a second late.
    What is learnt of an origin is kept (a few bytes each)."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None, max_response_bytes: int | None = None) -> None:
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}  # in release order
        self._busy: set[_Connection] = set()
        self._careful: set[tuple[str, int, bool]] = set()
        # Origins whose care a look ended; careful again, for RELAPSE_HOLD only a connection idle
        # STALE_AFTER ends it (one closing each connection a while after its answer, unread, fooled
        # the looks; for good, one whose keep-alive timeout is under STALE_AFTER stayed careful).
        self._looked: set[tuple[str, int, bool]] = set()
        self._relapsed: dict[tuple[str, int, bool], float] = {}  # origin -> when
        self._holds: dict[tuple[str, int, bool], float] = {}  # origin -> its hold, doubled at each relapse
        self._swept = 0.0  # when idle connections were last expired (`_sweep`)
        self._sweeper: asyncio.TimerHandle | None = None  # a `_sweep` to come while connections are idle
        self._resolver = _Resolver()
        self._ssl = ssl_context
        self._max_body = max_response_bytes
        """A response body is held up to this many bytes (the rest is read and dropped)."""

    def careful(self, url: str) -> bool:
        """Whether the subscriber at `url` was seen to close connections unannounced after its answers."""
        return _target(url).origin in self._careful

    async def post(self, url: str, headers: Mapping[str, str], body: bytes, *,
                   timeout: float | None = None) -> HttpResponse:
        """POST and read the whole response; raises OSError (incl. ConnectionError), TimeoutError."""
        target = _target(url)
        lines = [f"POST {target.path} HTTP/1.1\r\nhost: {target.host_header}\r\nuser-agent: {USER_AGENT}\r\n"
                 f"content-length: {len(body)}\r\n"]
        for name, value in headers.items():
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                raise ValueError(f"header {name!r} holds a line break")
            lines.append(f"{name}: {value}\r\n")
        lines.append("\r\n")
        message = "".join(lines).encode("latin-1") + body
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        origin = target.origin
        connection = await self._connection(origin, deadline)
        try:
            try:
                response = await connection.request(message, _left(deadline))
            except ConnectionError:
                if not connection.kept or connection.answered:
                    raise
                if not connection.stale:
                    # Lost unanswered soon after its last answer: closed right after it, most likely.
                    # Not sent again: the subscriber may have read it (and crashed), and a resend
                    # would be an attempt the retry policy did not allow.
                    self._be_careful(origin)
                    raise
                # The server closed an idle connection as we used it (its keep-alive timeout):
                # once more, on a new one.
                self._drop(connection)
                connection = await self._connection(origin, deadline, fresh=True)
                response = await connection.request(message, _left(deadline))
        except BaseException:  # failed, timed out or cancelled mid-response: the connection is unusable
            self._drop(connection)
            raise
        self._busy.discard(connection)
        idle = self._idle.setdefault(origin, [])
        if connection.keep_alive and not connection.closed and len(idle) < _IDLE_MAX:
            loop = asyncio.get_running_loop()
            connection.idle_since = now = loop.time()
            idle.append(connection)
            if now - self._swept > _SWEEP_EVERY:
                self._sweep(now)
            if self._sweeper is None:
                self._sweeper = loop.call_at(now + IDLE_EXPIRY + _SWEEP_EVERY, self._sweep_later)
            if origin in self._careful:  # does the subscriber keep it past an answer? the kernel says
                loop.call_later(CLOSED_SOON, self._look, origin, connection, now)
        else:
            connection.close()
        return response

    def _look(self, origin: tuple[str, int, bool], connection: _Connection, released: float) -> None:
        # Open CLOSED_SOON after its answer: the subscriber keeps connections (one closing each
        # would have by now). Its closes seen were a restart's, or its keep-alive timeout's.
        relapsed = self._relapsed.get(origin)
        if (connection.idle_since == released and not connection.closed and not connection.peer_closed()
                and (relapsed is None or released - relapsed > self._holds[origin])):
            self._careful.discard(origin)
            self._looked.add(origin)
            self._relapsed.pop(origin, None)

    def _be_careful(self, origin: tuple[str, int, bool]) -> None:
        if origin in self._looked and origin not in self._careful:  # come back: once per return
            # Each time longer: a subscriber that fooled the looks once a hold fools them again
            # (a POST lost each time), one whose keep-alive is short costs connections only.
            self._relapsed[origin] = asyncio.get_running_loop().time()
            hold = self._holds.get(origin)
            self._holds[origin] = RELAPSE_HOLD if hold is None else min(2 * hold, _RELAPSE_HOLD_MAX)
        self._careful.add(origin)

    def _sweep(self, now: float) -> None:
        """Close the idle connections past IDLE_EXPIRY, of every origin (one no trigger posts to
        any more, after a reload, kept them for good). What was learnt of an origin stays: an
        origin without idle connections may have a POST in flight (forgotten then, a subscriber
        fooling the looks lost a POST at every sweep)."""
        self._swept = now
        for origin, idle in list(self._idle.items()):
            while idle and now - idle[0].idle_since > IDLE_EXPIRY:  # the least recently used first
                idle.pop(0).close()
            if not idle:
                del self._idle[origin]

    def _sweep_later(self) -> None:
        # No POST may come to sweep: a trigger's last burst kept its connections open for good.
        loop = asyncio.get_running_loop()
        self._sweeper = None
        self._sweep(loop.time())
        if self._idle:
            oldest = min(idle[0].idle_since for idle in self._idle.values())
            self._sweeper = loop.call_at(oldest + IDLE_EXPIRY + _SWEEP_EVERY, self._sweep_later)

    def _drop(self, connection: _Connection) -> None:
        connection.close()
        self._busy.discard(connection)

    def _lost_idle(self, origin: tuple[str, int, bool], connection: _Connection, now: float) -> None:
        """`connection`, idle in the pool, was found closed by the peer (read by the loop, or seen by a look)."""
        connection.close()
        lost = now if connection.lost_at is None else connection.lost_at
        if lost - connection.idle_since < CLOSED_SOON:  # closed right after its answer
            self._be_careful(origin)

    async def _connection(self, origin: tuple[str, int, bool], deadline: float | None, *,
                          fresh: bool = False) -> _Connection:
        idle = self._idle.get(origin)
        if idle and not fresh:
            now = asyncio.get_running_loop().time()
            while idle:
                careful = origin in self._careful
                if careful:  # the oldest, if idle that long (or closed: forgotten)
                    if not idle[0].closed and now - idle[0].idle_since < STALE_AFTER:
                        break
                    connection = idle.pop(0)
                else:
                    connection = idle.pop()
                if connection.closed or connection.peer_closed():
                    self._lost_idle(origin, connection, now)
                    continue
                connection.kept = True
                connection.stale = now - connection.idle_since >= STALE_AFTER
                if careful:  # one idle STALE_AFTER and open shows the subscriber keeps them
                    self._careful.discard(origin)
                    self._looked.discard(origin)
                    self._relapsed.pop(origin, None)
                    self._holds.pop(origin, None)
                self._busy.add(connection)
                return connection
        host, port, tls = origin
        if tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        context = self._ssl if tls else None
        addresses = await asyncio.wait_for(self._resolver.addresses(host, port), _left(deadline))
        error: OSError = OSError(f"{host} has no address")
        for address in addresses:  # as asyncio tries them: in turn
            connect = asyncio.get_running_loop().create_connection(
                lambda: _Connection(self._max_body), address, port, ssl=context,
                server_hostname=host if tls else None)
            try:
                _, connection = await asyncio.wait_for(connect, _left(deadline))
            except OSError as exc:
                error = exc
                continue
            self._busy.add(connection)
            return connection
        self._resolver.forget(host, port)
        raise error

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        for connection in list(self._busy):
            connection.close()
        self._idle.clear()
        self._busy.clear()
        self._resolver.close()
