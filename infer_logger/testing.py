"""Test doubles that are real servers: an HTTP CloudEvents receiver on a loopback port.

    with EventCollector() as sink:           # starts on a free port
        ... point an http sink at sink.url ...
        sink.wait_for(10)                    # blocks until 10 events arrived
        sink.fail_with = 503                 # now it refuses (and records the attempts)
        sink.max_body = 1 << 20              # a larger body is answered 413, as a broker's limit

It decodes every content mode with infer-logger's own codec and answers 400 to what is not a
CloudEvent, like a broker would.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import uvicorn

from infer_logger.asgi import ClientGoneError, read_body, respond
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.cloudevents.http import from_http_many
from infer_logger.errors import InvalidEventError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EventCollector:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.events: list[CloudEvent] = []
        self.attempts = 0
        self.fail_with: int | None = None
        self.retry_after: str | None = None
        self.max_body: int | None = None
        self.delay = 0.0
        self._cond = threading.Condition()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
            return
        try:
            body = await read_body(receive)
        except ClientGoneError:
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        with self._cond:
            self.attempts += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_with:
            extra = [(b"retry-after", self.retry_after.encode())] if self.retry_after else []
            await respond(send, self.fail_with, extra, b"")
            return
        if self.max_body is not None and len(body) > self.max_body:
            await respond(send, 413, [], b"")
            return
        try:
            received = from_http_many(headers, body)
        except InvalidEventError as exc:
            reason = orjson.dumps({"error": str(exc), "attribute": exc.attribute})
            await respond(send, 400, [(b"content-type", b"application/json")], reason)
            return
        with self._cond:
            self.events.extend(received)
            self._cond.notify_all()
        await respond(send, 202, [], b"")

    def wait_for(self, count: int, timeout: float = 10.0) -> list[CloudEvent]:
        """Block until `count` events arrived; returns them (raises TimeoutError otherwise)."""
        return self.wait_until(lambda events: len(events) >= count, timeout, what=f"{count} events")

    def wait_until(self, done: Callable[[list[CloudEvent]], bool], timeout: float = 10.0, *,
                   what: str = "the awaited events") -> list[CloudEvent]:
        """Block until `done(events)` holds; returns the events (raises TimeoutError otherwise).
        Where counting is not enough: re-deliveries (at-least-once) and extra events add to a count."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done(list(self.events)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what} did not arrive in {timeout}s ({len(self.events)} did)")
                self._cond.wait(left)
            return list(self.events)

    def start(self) -> EventCollector:
        config = uvicorn.Config(self, host="127.0.0.1", port=self.port, log_level="error", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"collector did not start on port {self.port}")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> EventCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class CannedPredictor(EventCollector):
    """A predictor that answers every request with one fixed status and body."""

    def __init__(self, status: int = 200, body: bytes = b"{}", port: int | None = None,
                 content_type: str = "application/json") -> None:
        super().__init__(port)
        self.status, self.body, self.content_type = status, body, content_type

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await super().__call__(scope, receive, send)
        try:
            await read_body(receive)
        except ClientGoneError:
            return
        with self._cond:
            self.attempts += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        await respond(send, self.status, [(b"content-type", self.content_type.encode())], self.body)
