"""The broker's HTTP face (plain ASGI: the ingress is the hot path).

    POST /                          the default broker
    POST /<namespace>/<broker>      any broker
    POST /triggers/<ns>/<name>/<uid>  one filtered, synchronous delivery (see `handler`)
    GET  /healthz  /readyz  /metrics

Events come in binary, structured or batch mode. 202: every event is in the broker's log; 400
names what is wrong with an event; 413: the body or an event is over the limit; 415: a
Content-Encoding (none is decoded); 404: no such broker; 503: the log refused (full, Kafka down)
or the broker is not ready: try again.

A batch is stored whole, or the answer says which of its events were not: a 400 or 413 has
`"refused": [positions]` (those over `max_event_bytes` or Kafka refused for good) and a 503
`"pending": [positions]` (to send again), with an `Infer-Logger-Positions` header; it stored all
the others (but for those whose TTL ran out), which a sender must not send again: our http sink
reads it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, TypeAlias

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from infer_logger.asgi import (
    CLOSE,
    BodyTimeoutError,
    BodyTooLargeError,
    ClientGoneError,
    error_body,
    invalid_event_body,
    read_body,
    respond,
)
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.cloudevents.http import content_mode, from_http_many
from infer_logger.errors import InvalidEventError
from infer_logger.sinks.http import POSITIONS_HEADER
from pipelines.broker.channel import ChannelError, RefusedError, event_size
from pipelines.broker.endpoints import passthrough
from pipelines.broker.handler import TriggerHandler

if TYPE_CHECKING:
    from pipelines.broker.broker import Broker

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]

_JSON = (b"content-type", b"application/json")
_ALLOW = (b"allow", b"POST, OPTIONS")
_POSITIONS = (POSITIONS_HEADER, b"1")  # the JSON names events by position (the http sink reads it)
_IDENTITY = (b"accept-encoding", b"identity")  # RFC 9110 15.5.16: the codings a 415 takes


def _coding(raw: list[tuple[bytes, bytes]]) -> str | None:
    """The first content coding of a request other than identity (in any Content-Encoding header)."""
    for name, value in raw:
        if name.lower() == b"content-encoding":
            for coding in value.decode("latin-1").split(","):
                if coding.strip().lower() not in ("", "identity"):
                    return coding.strip()
    return None


async def _no_broker(send: Send, refused: Any, target: tuple[str, str], events: int = 1) -> None:
    refused.labels("unknown_broker").inc(events)
    await respond(send, 404, [_JSON], error_body(404, f"no broker {'/'.join(target)}"))


async def _coded(scope: Scope, send: Send) -> bool:
    """Whether the request has a content coding, answered 415 (none is decoded)."""
    coding = _coding(scope["headers"])
    if coding is None:
        return False
    await respond(send, 415, [_JSON, _IDENTITY], error_body(
        415, f"Content-Encoding {coding!r} is not taken: send the body without a content coding"))
    return True


class Ingress:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.handler = TriggerHandler(broker)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        own = _OWN.get(path)
        if own is not None and scope["method"] in ("GET", "HEAD"):
            await own(self.broker, send)
            return
        parts = [p for p in path.split("/") if p]
        if parts and parts[0] == "triggers" and len(parts) >= 3 and self.broker.settings.trigger_endpoint:
            await self._trigger(scope, parts, receive, send)
        elif len(parts) in (0, 2):
            await self._ingress(scope, (parts[0], parts[1]) if parts else None, receive, send)
        else:
            await respond(send, 404, [_JSON], error_body(404, f"nothing at {path}"))

    async def _ingress(self, scope: Scope, key: tuple[str, str] | None, receive: Receive, send: Send) -> None:
        broker = self.broker
        method = scope["method"]
        if method == "OPTIONS":
            await respond(send, 200, [_ALLOW], b"")
            return
        if method != "POST":
            await respond(send, 405, [_ALLOW, _JSON], error_body(405, "events are POSTed"))
            return
        refused = broker.metrics.refused
        # Gated per broker when published: one whose log is not open yet holds back no other.
        if not broker.started or broker.settings.role == "dispatcher":
            refused.labels("unavailable").inc()
            await respond(send, 503, [_JSON], error_body(503, "the broker is not taking events here now"))
            return
        if await _coded(scope, send):  # a coded body stored as is reached subscribers as the event's data
            refused.labels("invalid").inc()
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        settings = broker.settings
        try:
            mode = content_mode(headers)
        except InvalidEventError as exc:
            refused.labels("invalid").inc()
            await respond(send, 400, [_JSON], invalid_event_body(exc))
            return
        # No broker is told before any size or bad event: a sender retries a 404 (the broker may
        # come with a reload) and dead-letters a 413 or a 400. A batch is read first, its events
        # counted (one, if it cannot be read).
        target = key or broker.default_key
        if target not in broker.channels and mode != "batch":
            await _no_broker(send, refused, target)
            return
        # A binary body is the event's data; a structured or batch one is JSON, where data may be
        # base64 (4 bytes for 3) or an escaped string. Every event is weighed decoded, attributes
        # (a binary one's headers) included, by `event_size` (a structured event the sidecar cut
        # to fit was a 413), as a reply re-entering the broker is.
        binary = mode == "binary"
        limit = int(settings.max_event_bytes if binary else settings.max_request_bytes)
        try:
            declared = int(headers.get("content-length", "0"))
            if declared > limit:
                raise BodyTooLargeError(limit)
            body = await read_body(receive, limit, settings.request_read_timeout)
        except (BodyTooLargeError, ValueError):
            if target not in broker.channels:  # looked up again: a reload may remove it as the body comes
                await _no_broker(send, refused, target)
                return
            refused.labels("oversize").inc()
            await respond(send, 413, [_JSON], error_body(413, f"the body is larger than {limit} bytes"))
            return
        except BodyTimeoutError as exc:  # nothing stored: the sender, answered 408, may send it again
            refused.labels("timeout").inc()
            await respond(send, 408, [_JSON, CLOSE], error_body(408, f"{exc} (request_read_timeout)"))
            return
        except ClientGoneError:  # a partial body is no event: the sender, unanswered, sends it again
            refused.labels("disconnected").inc()
            return
        try:
            events = from_http_many(headers, body)
        except InvalidEventError as exc:
            if target not in broker.channels:
                await _no_broker(send, refused, target)
                return
            refused.labels("invalid").inc()
            # Nothing of a batch is stored: which event to mend is said, not `refused` (stored the others)
            await respond(send, 400, [_JSON], invalid_event_body(exc, exc.item))
            return
        if target not in broker.channels:  # also for a batch with none to publish
            await _no_broker(send, refused, target, len(events))
            return
        maximum = int(settings.max_event_bytes)
        # A batch's events over the limit are named refused and the others stored: refused whole,
        # the http sink halved it down to each such event alone.
        oversize = [i for i, e in enumerate(events) if event_size(e) > maximum]
        what = f"larger than {maximum} bytes"
        if oversize and mode != "batch":
            refused.labels("oversize").inc()
            await respond(send, 413, [_JSON], error_body(413, f"the event is {what}"))
            return
        forward = passthrough(headers)  # the only headers kept with the events
        skip = set(oversize)
        fits = [i for i in range(len(events)) if i not in skip]  # the position in `events` of each kept
        kept = [CloudEvent(events[i].attributes, events[i].data, forward) for i in fits]
        too_large = f"{len(oversize)} of the batch's events are {what}"
        try:
            if kept:
                await broker.publish(key, kept)
        except InvalidEventError as exc:  # nothing stored (a bad TTL)
            refused.labels("invalid").inc(len(events))
            item = fits[exc.item] if mode == "batch" and exc.item is not None else None
            await respond(send, 400, [_JSON], invalid_event_body(exc, item))
            return
        except RefusedError as exc:
            # The others of a batch were stored (or dropped, their TTL run out).
            status, label = (413, "oversize") if exc.too_large else (400, "invalid")
            positions = [fits[i] for i in exc.refused or []]
            refused.labels(label).inc(len(positions))
            refused.labels("oversize").inc(len(oversize))
            message = f"{exc}; {too_large}" if oversize else str(exc)
            await respond(send, status, [_JSON, _POSITIONS],
                          error_body(status, message, refused=sorted([*oversize, *positions])))
            return
        except ChannelError as exc:
            # The oversized are named pending too: named neither way, a sender takes them as stored
            # (sent again, they are refused for good).
            positions = [fits[i] for i in exc.pending or []]
            refused.labels("unavailable").inc(len(positions) + len(oversize))  # oversize counted when refused
            await respond(send, 503, [_JSON, _POSITIONS],
                          error_body(503, str(exc), pending=sorted([*oversize, *positions])))
            return
        except LookupError as exc:
            refused.labels("unknown_broker").inc(len(events))
            await respond(send, 404, [_JSON], error_body(404, str(exc)))
            return
        if oversize:
            refused.labels("oversize").inc(len(oversize))
            await respond(send, 413, [_JSON, _POSITIONS], error_body(413, too_large, refused=oversize))
            return
        await respond(send, 202, [], b"")

    async def _trigger(self, scope: Scope, parts: list[str], receive: Receive, send: Send) -> None:
        if await _coded(scope, send):  # sent on as is, the subscriber got it as the event's data
            return
        settings = self.broker.settings
        limit = int(settings.max_request_bytes)
        try:
            body = await read_body(receive, limit, settings.request_read_timeout)
        except BodyTooLargeError:
            await respond(send, 413, [_JSON], error_body(413, f"the body is larger than {limit} bytes"))
            return
        except BodyTimeoutError as exc:
            await respond(send, 408, [_JSON, CLOSE], error_body(408, f"{exc} (request_read_timeout)"))
            return
        except ClientGoneError:
            return
        status, headers, out = await self.handler.handle(scope["method"], parts, scope["headers"], body)
        await respond(send, status, headers, out)


async def _healthz(broker: Broker, send: Send) -> None:
    await respond(send, 200, [_JSON], b'{"status":"ok"}')


async def _readyz(broker: Broker, send: Send) -> None:
    triggers = {
        t.label: {"broker": f"{t.broker_key[0]}/{t.broker_key[1]}", "settled": broker.dispatchers[k].settled}
        for k, t in broker.triggers.items()
    }
    brokers = {f"{ns}/{name}": channel.ready for (ns, name), channel in broker.channels.items()}
    body = orjson.dumps({"ready": broker.ready, "channel": broker.settings.channel, "brokers": brokers,
                         "triggers": triggers})
    await respond(send, 200 if broker.ready else 503, [_JSON], body)


async def _metrics(broker: Broker, send: Send) -> None:
    for trigger in broker.triggers.values():
        channel = broker.channels.get(trigger.broker_key)
        lag = None if channel is None else channel.lag(trigger.name)
        if lag is not None:
            broker.metrics.lag.labels(trigger.label).set(lag)
    body = generate_latest(broker.metrics.registry)
    await respond(send, 200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], body)


_OWN = {"/healthz": _healthz, "/readyz": _readyz, "/metrics": _metrics}
