"""Plain-ASGI pieces shared by the sidecar, the broker and the test servers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from infer_logger.errors import InferLoggerError, InvalidEventError

log = logging.getLogger(__name__)

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyTooLargeError(InferLoggerError):
    """A request body over the reader's limit: answered 413, the rest left unread. `unsent`: the
    client was waiting for a go-ahead (`Expect: 100-continue`) it did not get, so it may send the
    body or not: the answer must close the connection (the server would take a next request for body
    bytes, or the body for a next request)."""

    def __init__(self, limit: int, *, unsent: bool = False) -> None:
        super().__init__(f"the request body is larger than {limit} bytes")
        self.limit = limit
        self.unsent = unsent


class BodyTimeoutError(InferLoggerError):
    """A request body not whole within the reader's deadline: answered 408 and the connection closed."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"the request body did not arrive whole within {timeout:g} seconds")
        self.timeout = timeout


_JSON = (b"content-type", b"application/json")
CLOSE = (b"connection", b"close")
"""The header of a 408: the server (uvicorn) then closes the connection, the rest of the body unread."""
READ_RATE_ALLOWANCE = float(1 << 20)
"""Bytes a second a request's read deadline allows on top of `request_read_timeout`: each MiB that
arrived buys a second more, so a big upload on a slow link (256 MiB at 4 MB/s takes a minute) is
not cut, while a client dribbling bytes gets no more than the timeout."""


class ClientGoneError(InferLoggerError):
    """The client disconnected before its request body ended: there is no request to act on."""

    def __init__(self) -> None:
        super().__init__("the client disconnected before the request body ended")


async def read_body(receive: Receive, limit: int | None = None, timeout: float | None = None) -> bytes:
    """The whole request body: BodyTooLargeError past `limit`, ClientGoneError if it was cut short
    (a partial body must never pass for the request: RFC 9112 6.3), BodyTimeoutError if it has not
    ended `timeout` s after the app was called, plus a second per MiB that arrived
    (READ_RATE_ALLOWANCE; a client dribbling it would hold the connection and what it sent for
    ever). The deadline cannot cover the head: the server reads that before an ASGI
    app is called, and uvicorn bounds only the wait between requests (timeout_keep_alive)."""
    if timeout is None:
        return await _read_body(receive, limit)
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        # One timer per request (uvicorn has no sweeper to lend), pushed back as bytes arrive.
        async with asyncio.timeout(timeout) as deadline:

            def arrived(size: int) -> None:
                deadline.reschedule(start + timeout + size / READ_RATE_ALLOWANCE)

            return await _read_body(receive, limit, arrived)
    except TimeoutError:
        raise BodyTimeoutError(timeout) from None


async def read_or_refuse(receive: Receive, send: Send, limit: int | None, timeout: float | None) -> bytes | None:
    """`read_body`, a refusal answered here: 413 past `limit` (max_request_bytes), 408 past `timeout`
    (request_read_timeout, the connection closed); None then, and when the client went away."""
    try:
        return await read_body(receive, limit, timeout)
    except BodyTooLargeError as exc:
        await respond(send, 413, [_JSON], error_body(413, f"{exc} (max_request_bytes)"))
    except BodyTimeoutError as exc:
        await respond(send, 408, [_JSON, CLOSE], error_body(408, f"{exc} (request_read_timeout)"))
    except ClientGoneError:
        pass  # nothing to answer
    return None


async def _read_body(receive: Receive, limit: int | None,
                     arrived: Callable[[int], None] | None = None) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGoneError
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            raise BodyTooLargeError(limit)
        if arrived is not None and chunk:
            arrived(size)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes raises `BodyTooLargeError` in the app's
    `receive` (its handler answers 413), so no more of it is read or held; one not ended `timeout`
    s after the app was called raises `BodyTimeoutError` (its handler answers 408, see `read_body`)."""

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int, timeout: float | None = None) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        size = 0
        timeout = self.timeout
        start = asyncio.get_running_loop().time()
        deadline = None if timeout is None else start + timeout
        # An `Expect: 100-continue` client is refused before the first receive, where uvicorn sends
        # its go-ahead: told to send, it uploaded up to the limit to be answered 413 (RFC 9110
        # 10.1.1). Others send anyway: read up to the limit, the rest left to the server to drop.
        headers = dict(scope.get("headers", ()))
        declared = headers.get(b"content-length", b"").strip()
        too_large = (headers.get(b"expect", b"").lower() == b"100-continue" and declared.isdigit()
                     and int(declared) > self.limit)

        async def limited() -> Message:
            nonlocal size, deadline
            if too_large:
                raise BodyTooLargeError(self.limit, unsent=True)
            if deadline is None:  # no deadline, or the body has ended (later receives wait for a disconnect)
                message = await receive()
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    raise BodyTimeoutError(timeout) from None  # type: ignore[arg-type]
                if not message.get("more_body", False):
                    deadline = None
            size += len(message.get("body", b""))
            if deadline is not None:
                deadline = start + timeout + size / READ_RATE_ALLOWANCE  # type: ignore[operator]
            if size > self.limit:
                raise BodyTooLargeError(self.limit)
            return message

        await self.app(scope, limited, send)


def route_path(scope: MutableMapping[str, Any]) -> str:
    """The path an app routes on: without the `root_path` ASGI servers put before it (uvicorn
    --root-path, a Starlette Mount), as Starlette takes it off."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
        return path[len(root):]
    return path


def error_body(status: int, reason: str, **extra: object) -> bytes:
    """The JSON of an error answer: `{"error": reason, "status": status, ...extra}`."""
    return orjson.dumps({"error": reason, "status": status, **extra})


def invalid_event_body(exc: InvalidEventError, item: int | None = None) -> bytes:
    """The 400 of a malformed CloudEvent: the attribute it names (none for a whole event), and
    in a batch the event's position (`item`)."""
    named: dict[str, object] = {"attribute": exc.attribute} if exc.attribute else {}
    if item is not None:
        named["item"] = item
    where = "" if item is None else f" (batch item {item})"
    return error_body(400, f"invalid CloudEvent: {exc}{where}", **named)


async def respond(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *,
                  head: bool = False) -> None:
    """The answer, with a content-length where one may be (RFC 9110 8.6): never in a 204 or 1xx,
    in a 304 or a HEAD answer only the one it brings (the predictor's; not 0 for a chunked one)."""
    if not (head or status in (204, 304) or status < 200) and not any(name == b"content-length"
                                                                      for name, _ in headers):
        headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def run_lifespan(
    receive: Receive,
    send: Send,
    startup: Callable[[], Awaitable[None]],
    shutdown: Callable[[], Awaitable[None]],
) -> None:
    """Answer the ASGI lifespan protocol; a failed startup is reported to the server, not raised."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await startup()
            except Exception as exc:
                log.error("startup failed: %s", exc)
                await shutdown()
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
