"""The sidecar's HTTP/1.1 server: httptools' parser under asyncio protocols, no ASGI layer.

On a trivial predictor uvicorn's ASGI cycle (scope dicts, receive/send messages, a task and
several awaits per request) cost the sidecar about as much CPU as the predictor itself; this
server parses with the same parser (llhttp via httptools), hands the handler whole requests and
writes each answer with one `write`. It serves what a reverse proxy in a pod needs: keep-alive,
pipelining (answers in order), chunked request bodies, `Expect: 100-continue`, HTTP/1.0, an idle
timeout, a read deadline (a request not whole within `request_read_timeout` of its first byte 408),
a send deadline (a client taking none of its answer for as long is let go: nginx's send_timeout),
size limits (a body over `max_request_bytes` 413, a head over 64 KiB 431: requests are held whole)
and a graceful stop. Upgrades (websockets, h2c) are not served: the request is
answered as plain HTTP and the connection closed. `infer-logger proxy --server uvicorn` runs the
ASGI app instead.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Literal
from urllib.parse import unquote

import httptools
import orjson

from infer_logger.asgi import READ_RATE_ALLOWANCE

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]
Reply = tuple[int, Headers, bytes]


@dataclass(slots=True)
class Request:
    method: str
    path: str
    """Percent-decoded, for routing."""
    target: bytes
    """Path and query exactly as the client sent them, for forwarding."""
    headers: Headers
    """Names lower-cased, in the client's order."""
    body: bytes


Handler = Callable[[Request], Awaitable[Reply]]

_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_NO_BODY = frozenset({204, 304})
_MAX_PIPELINED = 16  # requests queued behind the one being answered before we stop reading
_MAX_REPLAYS = 16  # upgrade requests with a body read again, per connection
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NOT_READING = float("inf")  # `_Connection.began` between requests
_BEHIND = float("-inf")  # `_Connection.began` of a request read behind answers still due
MAX_HEAD = 64 << 10  # bytes of request line and headers: the parser would buffer any amount
_HEAD_TOO_LARGE = f"the request line and headers are larger than {MAX_HEAD} bytes"
CUT_WAIT = 5.0  # for the answers cancelled at a stop to end (each logs its response event)
LINGER = 5.0
"""Seconds a connection that refused a request goes on reading (and dropping) what the client still
sends, before it closes: closing with bytes unread sends a reset, which can overtake the answer
(a client uploading a body over the limit saw a reset instead of its 413). nginx's lingering close."""


def _status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status


def encode_reply(status: int, headers: Headers, body: bytes, *, close: bool, head: bool) -> bytes:
    out = [_status_line(status)]
    for name, value in headers:
        out += (name, b": ", value, b"\r\n")
    # A HEAD answer says the length only when the predictor's did (a chunked one says none: 0 was wrong).
    if status not in _NO_BODY and status >= 200 and not head:
        out.append(b"content-length: %d\r\n" % len(body))
    if close:
        out.append(b"connection: close\r\n")
    out.append(b"\r\n")
    if not head and status not in _NO_BODY:
        out.append(body)
    return b"".join(out)


class _TooLarge(Exception):
    """Raised in a parser callback: the body is over the limit, stop reading it."""


class _BadHost(Exception):
    """Raised in a parser callback: an HTTP/1.1 request without exactly one host (RFC 9112 3.2: 400)."""


class _Unservable(Exception):
    """Raised in a parser callback: a request this server cannot serve (501 or `status`, the message
    says why)."""

    def __init__(self, reason: str, status: int = 501) -> None:
        super().__init__(reason)
        self.status = status


class _UnknownCoding(Exception):
    """Raised in a parser callback: a transfer coding other than chunked, which the parser would
    take off while leaving the body encoded (RFC 9112 6.1: 501)."""


def other_codings(headers: Headers) -> list[str]:
    """The transfer codings beyond `chunked` that a message's transfer-encoding fields name."""
    return [coding for name, value in headers if name == b"transfer-encoding"
            for part in value.split(b",") if (coding := part.strip().lower().decode("latin-1")) not in ("chunked", "")]


def declares_body(headers: Headers) -> bool:
    """Whether a request's headers (names lower-cased) announce a body: chunked, or a length > 0."""
    return any(name == b"transfer-encoding" or (name == b"content-length" and value.strip(b" \t0"))
               for name, value in headers)


def _kernel_unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes the kernel holds for the socket, unsent or unacknowledged (Linux's SIOCOUTQ; 0 where
    it cannot be asked). Its writability comes back only once a third of its buffer is free (up to
    ~1.4 MiB), so the transport's own buffer alone stands still while a slow client reads."""
    sock = transport.get_extra_info("socket")
    try:
        import fcntl
        import termios

        return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4)), sys.byteorder, signed=True)
    except (ImportError, AttributeError, OSError, ValueError):
        return 0


def error_reply(status: int, reason: str) -> bytes:
    body = orjson.dumps({"error": reason, "status": status})
    return encode_reply(status, [(b"content-type", b"application/json")], body, close=True, head=False)


def refuse(transport: asyncio.Transport, reply: bytes) -> None:
    """Answer `reply` and end the connection once the client stops sending (`LINGER`); the caller
    drops whatever it still receives."""
    transport.write(reply)
    if transport.can_write_eof():
        transport.write_eof()  # the client reads the answer to its end
    transport.resume_reading()
    asyncio.get_running_loop().call_later(LINGER, transport.close)


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.active = False  # a request is being answered
        self.queue: deque[tuple[Request, bool | Literal["announce"]]] = deque()
        self.closing = False  # answer what was read, then close
        self.last = 0.0
        self.began = _NOT_READING  # when the request being read had its first byte (the sweeper's deadline)
        self._url = b""
        self._headers: Headers = []
        self._body: list[bytes] = []
        self._size = 0
        self._in_head = True  # reading a request line and headers (their size is bounded)
        self._midway = False  # a request begun (its first byte read) and not yet whole
        self._head_size = 0  # the request line and headers so far, as the parser hands them over
        self._target = b""  # of the request being read, from its head (on_headers_complete)
        self._path = ""
        self._refused = False  # answered a refusal: what comes now is dropped
        self._refusal = b""  # a refusal to send once the answers due before it are
        self._replays = 0  # requests read again without their upgrade
        self._continue_due = False  # a 100 Continue to send once the answers due are
        self._chunks = 0
        self._message_size = 0  # bytes received since the last request ended: bounds chunk framing and trailers
        self._codings = False
        self._plain_head: bytes | None = None
        self._writing_paused = False  # the transport's buffer is full: the client is behind
        self._held: tuple[Request, bool | Literal["announce"]] | None = None  # next to answer, once it reads
        self._unsent = 0  # the transport's write buffer at the sweep that saw it change (`check_send`)
        self._unsent_since = 0.0

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self.last = self.server.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        self.queue.clear()
        self._headers, self._body = [], []  # a request cut off midway (see on_message_complete)
        self._held = None

    def eof_received(self) -> bool | None:
        # The client is done sending (a half-close): answer what it sent, then close; with
        # nothing to answer, close now (a request begun can never end).
        if self.active or self.queue:
            self._stop_reading()
            return True
        return None

    def pause_writing(self) -> None:
        # The client is not reading its answers: answer no more of its pipelined requests, and
        # read none, until it has (the answers went into the transport's buffer without bound).
        self._writing_paused = True
        # At a request's end, not midway: a client writing a big upload pipelined behind the
        # answer it is not reading yet would wait for us as we wait for it (and get a 408).
        if self.transport is not None and not self._midway:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._held is not None:
            held, self._held = self._held, None
            self._start(*held)
        if self.transport is not None and not self.closing and len(self.queue) < _MAX_PIPELINED - 1:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.last = self.server.loop.time()
        if self._refused:
            return
        while True:
            self._message_size += len(data)
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                if self._plain_head is None:
                    # The request itself was read (and queued); what follows is another protocol.
                    self._stop_reading()
                    return
                # Upgrades are not served, but this request's body follows (`curl --http2 -d`,
                # Java's HttpClient): a new parser reads the request again without the upgrade.
                head, self._plain_head = self._plain_head, None
                self.parser = httptools.HttpRequestParser(self)
                self._in_head, self._message_size = True, 0  # counted again, once
                data = head + data[exc.args[0]:] if exc.args else head
                continue
            except httptools.HttpParserError as exc:
                self._parse_error(exc)
                return
            break
        if self._in_head:
            # A head not yet whole: the header being read is not counted yet (on_header comes once
            # it is), its bytes are. After a request ended within this read they count from the next.
            if self._message_size > MAX_HEAD:
                self._refuse(431, _HEAD_TOO_LARGE)
        elif self._message_size - self._size > 2 * MAX_HEAD + 64 * self._chunks:
            # Beyond its body (counted by on_body) a request holds its head, chunk framing and
            # trailers, which the parser would buffer in any amount.
            self._refuse(431, "the request's chunk framing and trailers are too large")

    def _parse_error(self, exc: httptools.HttpParserError) -> None:
        cause = exc.__context__
        if isinstance(cause, _TooLarge):
            self._refuse(413, f"the request body is larger than {self.server.max_body_bytes} bytes "
                              "(max_request_bytes)")
        elif isinstance(cause, _BadHost):
            self._refuse(400, "an HTTP/1.1 request has exactly one host header")
        elif isinstance(cause, _UnknownCoding):
            self._refuse(501, f"transfer coding {', '.join(other_codings(self._headers))} is not supported "
                              "(chunked is)")
        elif isinstance(cause, _Unservable):
            self._refuse(cause.status, str(cause))
        else:
            log.info("bad HTTP request from a client: %s", exc)
            self._refuse(400, f"invalid HTTP request: {exc}")

    def _refuse(self, status: int, reason: str) -> None:
        """Answer now, or after the answers still due (pipelined before it), and stop."""
        self._stop_reading()
        if self.transport is None:
            return
        if self.active:
            self._refusal = error_reply(status, reason)
            return
        self._refused = True
        refuse(self.transport, error_reply(status, reason))

    def _stop_reading(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        self.began = self.last  # the time of the read that brought its first byte: no clock call
        self._midway = True
        self._url = b""
        self._headers = []
        self._body = []
        self._size = 0
        self._chunks = 0
        self._codings = False  # a transfer-encoding other than plain chunked was named
        self._length = b""  # the content-length header's value
        self._hosts = 0
        self._expect = False  # Expect: 100-continue (case-insensitive)
        self._plain_head = None  # an upgrade request's head without it, to read its body
        # Counted as the parser hands it over, however it arrived (one read, pieces, behind another
        # request): the least its request line and blank line take, then target and header lines.
        self._head_size = len(b"GET  HTTP/1.1\r\n\r\n")

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > MAX_HEAD:
            raise _Unservable(_HEAD_TOO_LARGE, 431)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # else a trailer: not merged into the headers (RFC 9110 6.5.1), dropped
            self._head_size += len(name) + len(value) + len(b":\r\n")
            if self._head_size > MAX_HEAD:
                raise _Unservable(_HEAD_TOO_LARGE, 431)
            name = name.lower()
            if name == b"host":
                self._hosts += 1
            elif name == b"content-length":
                self._length = value
            elif name == b"transfer-encoding" and value.strip().lower() != b"chunked":
                self._codings = True
            elif name == b"expect" and value.strip().lower() == b"100-continue":
                self._expect = True
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        version = self.parser.get_http_version()
        if not version.startswith("1."):  # RFC 9110 15.6.6 (a higher 1.x minor is read as 1.1)
            raise _Unservable(f"HTTP/{version} is not served (HTTP/1.1 is)", 505)
        old = version == "1.0"
        if self._hosts != 1 and not (old and self._hosts == 0):
            raise _BadHost
        if old and any(name == b"transfer-encoding" for name, _ in self._headers):
            # RFC 9112 6.1: its framing is faulty, even with a content-length; the parser decoded it.
            raise _Unservable("an HTTP/1.0 request has no transfer-encoding (its framing is faulty: "
                              "RFC 9112 6.1)", 400)
        if self.parser.get_method() == b"CONNECT":  # an upgrade whatever its headers, its target no path
            raise _Unservable("CONNECT is not served")
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:  # llhttp takes targets its URL parser cannot read
            raise _Unservable(f"the request target {self._url[:200].decode('latin-1')} cannot be read",
                              400) from None
        raw_path = url.path or b"/"
        self._target = raw_path + b"?" + url.query if url.query else raw_path
        self._path = raw_path.decode("latin-1")
        if "%" in self._path:
            # Bytes that are no UTF-8 kept as such (`replace` made %FF and %FE one model, U+FFFD).
            self._path = unquote(raw_path.decode("utf-8", "surrogateescape"), errors="surrogateescape")
        if self._codings and other_codings(self._headers):
            raise _UnknownCoding
        limit = self.server.max_body_bytes
        if limit is not None and self._length.isdigit() and int(self._length) > limit:
            raise _TooLarge  # before any of it is read (or a 100 Continue asks for it)
        if self.parser.should_upgrade() and declares_body(self._headers):
            # llhttp ends the message here and leaves the body unread: read it again without the
            # upgrade. Not without end.
            self._replays += 1
            if self._replays > _MAX_REPLAYS:
                raise _Unservable(f"more than {_MAX_REPLAYS} requests on one connection offered an upgrade "
                                  "with a body (upgrades are not served)")
            self._plain_head = self._without_upgrade(old)
            return
        # HTTP/1.0 has no 100 (RFC 9110 10.1.1); behind an answer still due it would come first,
        # so it is sent once that answer is.
        if self._expect and not old and self.transport is not None:
            if self.active:
                self._continue_due = True
            else:
                self.transport.write(_CONTINUE)

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        limit = self.server.max_body_bytes
        if limit is not None and self._size > limit:  # chunked: no length said up front
            raise _TooLarge
        self._body.append(body)

    def _without_upgrade(self, old: bool) -> bytes:
        drop = (b"upgrade", b"http2-settings")  # without Upgrade, llhttp sees no upgrade; Connection stays as sent
        lines = [b"%s %s HTTP/%s\r\n" % (self.parser.get_method(), self._url, b"1.0" if old else b"1.1")]
        lines += [name + b": " + value + b"\r\n" for name, value in self._headers if name not in drop]
        return b"".join(lines) + b"\r\n"

    def on_message_complete(self) -> None:
        if self._plain_head is not None:
            return  # the upgrade's end of message, the body unread: it is read again (data_received)
        # The next request, counted afresh; its deadline starts at its first byte.
        self._in_head, self._message_size, self.began = True, 0, _NOT_READING
        self._midway = False
        self._continue_due = False  # its body is in: a go-ahead sent after its answer would be a stray 100
        request = Request(self.parser.get_method().decode(), self._path, self._target, self._headers,
                          b"".join(self._body))
        # Not kept here: the connection and its parser refer to each other, so a closed one waits
        # for the GC's rare full collection, and held its last body (each upload grew RSS by it).
        self._headers, self._body = [], []
        # An HTTP/1.0 client kept alive is told so in the answer, or it waits for the close.
        keep: bool | Literal["announce"] = self.parser.should_keep_alive()
        if keep and self.parser.get_http_version() == "1.0":
            keep = "announce"
        if self._writing_paused and self.transport is not None:
            self.transport.pause_reading()  # here at the latest (pause_writing came midway)
        if self.active:
            self.queue.append((request, keep))
            if len(self.queue) >= _MAX_PIPELINED and self.transport is not None:
                self.transport.pause_reading()
        elif self._writing_paused:  # answered once the client reads what it was sent
            self.active = True
            self._held = (request, keep)
        else:
            self._start(request, keep)

    # --

    def _start(self, request: Request, keep: bool | Literal["announce"]) -> None:
        self.active = True
        task = self.server.loop.create_task(self._answer(request, keep))
        self.server.answering.add(task)
        task.add_done_callback(self.server.answering.discard)

    async def _answer(self, request: Request, keep: bool | Literal["announce"]) -> None:
        try:
            status, headers, body = await self.server.handler(request)
        except Exception:
            log.exception("unhandled error answering %s %s", request.method, request.path)
            status, headers = 500, [(b"content-type", b"application/json")]
            body = orjson.dumps({"error": "internal error in the sidecar; see its log", "status": 500})
        # Stopping, the requests already read are answered (graceful), then the connection closes.
        close = not keep or ((self.server.stopping or self.closing) and not self.queue)
        if keep == "announce" and not close:
            headers = [*headers, (b"connection", b"keep-alive")]
        transport = self.transport
        if transport is None:  # the client left; what was logged stays logged
            self.active = False
            return
        transport.write(encode_reply(status, headers, body, close=close, head=request.method == "HEAD"))
        self.last = self.server.loop.time()
        if close:
            self.queue.clear()
            self.active = False
            if self.closing:  # reading was stopped with bytes maybe unread: a plain close would reset
                self._refused = True  # what comes now is dropped
                # After an answer that said close, nothing more is answered (RFC 9112 9.6).
                refuse(transport, self._refusal if keep else b"")
            else:
                transport.close()
        elif self.queue:
            if len(self.queue) == _MAX_PIPELINED - 1 and not self.closing and not self._writing_paused:
                transport.resume_reading()
            if self._writing_paused:  # still `active`: resume_writing answers it
                self._held = self.queue.popleft()
            else:
                self._start(*self.queue.popleft())
        else:
            self.active = False
            if self._continue_due:  # a head read behind this answer waits for its go-ahead
                self._continue_due = False
                transport.write(_CONTINUE)

    def close_if_idle(self, idle_before: float, *, reading: bool = True) -> None:
        # Between requests only: one paused mid-request has request_read_timeout (a 408), not the
        # keep-alive timeout (closed unanswered). Blank lines before a request begun are idle.
        # Not `reading` (stopping): a request partly read can never finish, so it is idle too.
        if (not self.active and not (reading and self._midway)
                and self.last < idle_before and self.transport is not None):
            self.transport.close()

    def check_send(self, now: float) -> None:
        """Abort a connection whose client took none of what it was sent for `request_read_timeout`
        s (nginx's send_timeout). close() (idle, or a refusal's after its linger) waits for the
        write buffer to drain, which a client keeping a zero window never lets happen: it held the
        connection and its whole answer for ever. The answer's event was logged before it was sent."""
        if self.transport is None:
            return
        unsent = self.transport.get_write_buffer_size()
        if unsent:  # and what the kernel holds: its buffer frees only in big steps (a steady reader
            unsent += _kernel_unsent(self.transport)  # under ~23 KB/s looked like one taking none)
        # The client took some (or more was written), or it is sending while its read deadline
        # runs (an upload pipelined behind the answer it will read after): its time starts again.
        # Not once refused or closing, nor behind an answer held (the read deadline waits then):
        # a client trickling bytes it never finishes, reading nothing, was held for ever.
        sending = not self.closing and not self.active and (self._midway or self.last > self._unsent_since)
        if unsent != self._unsent or sending:
            self._unsent, self._unsent_since = unsent, now
        elif unsent and now - self._unsent_since > self.server.request_read_timeout:
            log.info("a client took none of its answer that TCP showed for %g seconds: connection aborted, "
                     "%d bytes unsent", self.server.request_read_timeout, unsent)
            self.transport.abort()

    def check_read_deadline(self, now: float) -> None:
        """408 a request still arriving `request_read_timeout` s after its first byte, plus a second
        per MiB that came (READ_RATE_ALLOWANCE: a big upload on a slow link is not cut; a client
        dribbling it would hold the connection, and what it sent, for ever). Time spent answering
        the requests before it does not count: reading may be paused then (`_MAX_PIPELINED`)."""
        if self.closing:
            return
        if self.began == _NOT_READING:
            if self._message_size and not self.active:
                # Only blank lines so far, which llhttp skips before a request without beginning
                # one: they count (else a CRLF every few seconds keeps the connection for ever).
                self.began = now
            return
        if self.active:
            self.began = _BEHIND
        elif self.began == _BEHIND:
            self.began = now  # the answers before it are out: its time starts
        elif now - self.began > self.server.request_read_timeout + self._message_size / READ_RATE_ALLOWANCE:
            self.began = _NOT_READING
            self._refuse(408, f"the request did not arrive whole within {self.server.request_read_timeout:g} "
                              "seconds (request_read_timeout)")


class HttpServer:
    """Serve `handler` on host:port until `stop`."""

    def __init__(self, handler: Handler, *, keep_alive_timeout: float = 5.0,
                 max_body_bytes: int | None = None, request_read_timeout: float = 60.0) -> None:
        self.handler = handler
        self.keep_alive_timeout = keep_alive_timeout
        self.request_read_timeout = request_read_timeout
        """A request whose head and body have not arrived this many seconds after its first byte is
        answered 408 and the connection closed; a client that takes none of its answer for as long
        is let go (both checked by the sweeper, about once a second)."""
        self.max_body_bytes = max_body_bytes
        """Larger request bodies are answered 413 and the connection closed (None: no limit)."""
        self.connections: set[_Connection] = set()
        self.answering: set[asyncio.Task[None]] = set()  # a client that left does not end its answer
        self.stopping = False
        self.loop = asyncio.get_running_loop()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await self.loop.create_server(lambda: _Connection(self), host, port, backlog=2048)
        self._sweeper = self.loop.create_task(self._sweep())

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.keep_alive_timeout, self.request_read_timeout))
            now = self.loop.time()
            idle_before = now - self.keep_alive_timeout
            for conn in list(self.connections):
                conn.check_read_deadline(now)
                conn.close_if_idle(idle_before)
                conn.check_send(now)

    async def stop(self, grace: float = 10.0, hurry: asyncio.Event | None = None) -> None:
        """Stop listening, answer the requests already read (for up to `grace` s, or until `hurry`
        is set), close. Those still unanswered then are cancelled (the sidecar answers 503 and logs
        their response event) and waited for: the logger is closed next."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn._stop_reading()  # only the requests already read are answered
        deadline = self.loop.time() + grace
        while True:
            for conn in list(self.connections):
                conn.close_if_idle(float("inf"), reading=False)
            # A request whose client left is still answered (its response event logged).
            if (not self.connections and not self.answering) or self.loop.time() > deadline \
                    or (hurry is not None and hurry.is_set()):
                break
            await asyncio.sleep(0.02)
        if self.answering:
            for conn in list(self.connections):
                conn.queue.clear()  # pipelined, not begun: nothing logged, none to begin now
                conn._held = None
            for task in self.answering:
                task.cancel()
            await asyncio.wait(set(self.answering), timeout=CUT_WAIT)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
