"""Test helpers for the broker: a scripted subscriber (a real HTTP server), a broker fixture
factory's pieces, and bounded waits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from infer_logger.asgi import read_body, respond
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.cloudevents.http import from_http, to_binary, to_structured
from infer_logger.errors import InvalidEventError, RejectedError
from infer_logger.testing import EventCollector
from pipelines.broker import Broker, BrokerSettings
from tests.waiting import until

Answer = tuple[int, dict[str, str], bytes]
Script = Callable[[CloudEvent | None, dict[str, str]], Answer]


class Subscriber(EventCollector):
    """An EventCollector that records every request and can answer anything (`answer`)."""

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.answer: Script | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        body = await read_body(receive)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        with self._cond:
            self.attempts += 1
            self.requests.append((headers, body))
            self._cond.notify_all()
        if self.delay:
            await asyncio.sleep(self.delay)
        try:
            event: CloudEvent | None = from_http(headers, body)
        except InvalidEventError:
            event = None
        if self.answer is not None:
            status, out, out_body = self.answer(event, headers)
        elif self.fail_with:
            status, out, out_body = self.fail_with, {"retry-after": self.retry_after} if self.retry_after else {}, b""
        else:
            status, out, out_body = (202 if event is not None else 400), {}, b""
        if event is not None and status < 300:
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        await respond(send, status, [(k.encode(), v.encode()) for k, v in out.items()], out_body)

    def __enter__(self) -> Subscriber:
        self.start()
        return self

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.requests) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self.requests)} of {count} requests arrived in {timeout}s")
                self._cond.wait(left)
            return list(self.requests)


class Handler:
    """A channel's handler without a dispatcher: takes every event, records each delivered, and
    hangs (until cancelled) on those `hangs` says."""

    def __init__(self, hangs: Callable[[CloudEvent], bool] = lambda e: False) -> None:
        self.settled, self.hangs, self.got = 0, hangs, []

    def take(self, events: Sequence[CloudEvent]) -> list[CloudEvent]:
        return list(events)

    async def deliver(self, event: CloudEvent) -> None:
        if self.hangs(event):
            await asyncio.sleep(3600)
        self.got.append(event.id)


def reply_with(event: CloudEvent, status: int = 200, *, structured: bool = False,
               extra: dict[str, str] | None = None) -> Script:
    """A script answering every request with `event` as the reply."""
    headers, body = to_structured(event) if structured else to_binary(event)

    def answer(received: CloudEvent | None, request: dict[str, str]) -> Answer:
        return status, {**headers, **(extra or {})}, body

    return answer


def event(id_: str = "1", type_: str = "com.example.someevent", data: bytes | None = b'{"a":1}',
          **extensions: Any) -> CloudEvent:
    attributes: dict[str, Any] = {"specversion": "1.0", "id": id_, "source": "/mycontext", "type": type_}
    if data is not None:
        attributes["datacontenttype"] = "application/json"
    attributes.update(extensions)
    return CloudEvent(attributes, data)


def binary_request(e: CloudEvent, **headers: str) -> dict[str, Any]:
    """httpx keyword arguments POSTing `e` in binary mode."""
    out, body = to_binary(e)
    return {"headers": {**out, **headers}, "content": body}


async def settle(broker: Broker, trigger: str, count: int, namespace: str = "default", timeout: float = 10.0) -> None:
    """Wait until a trigger has settled `count` events (filtered out, delivered or given up on)."""
    await until(lambda: broker.dispatchers[(namespace, trigger)].settled >= count, timeout,
                f"trigger {trigger} settling {count} events")


def settings(tmp: Path, **overrides: Any) -> BrokerSettings:
    """Quick retries: tests never wait out Knative's default backoff."""
    base: dict[str, Any] = {
        "dir": tmp / "broker",
        "delivery": {"retry": 2, "backoffPolicy": "linear", "backoffDelay": "PT0.01S", "timeout": "PT5S"},
        "drain_timeout": 1.0,
    }
    return BrokerSettings(**{**base, **overrides})


def client(broker: Broker) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=broker), base_url="http://broker")


def refused_by(url: str, batch: list[CloudEvent]) -> RejectedError:
    """What an http sink in batch mode (halving, as a sidecar's worker does) in front of the
    broker at `url` finds refused for good of `batch`: it must refuse some."""
    from infer_logger.sinks.halving import Halving
    from infer_logger.sinks.http import HttpSinkConfig

    async def send() -> RejectedError:
        sink = Halving(HttpSinkConfig(url=url, mode="batch").build())
        try:
            await sink.send_batch(batch)
        except RejectedError as exc:
            return exc
        finally:
            await sink.aclose()
        raise AssertionError("nothing was refused")

    return asyncio.run(send())
