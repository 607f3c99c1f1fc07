"""Where a trigger's events go: one delivery attempt to a URL or to an in-process component.

An attempt never raises: it ends in a `Response` (status -1 when nothing answered). The reply
rules are Knative's filter handler's: a 2xx response that is a CloudEvent (binary or
structured) is a reply, 202 included, as knative/eventing does (the data plane spec would
ignore a 202's); an empty body that is no valid event is no reply; any other 2xx body is an
error, reported as 502.

Headers: only `X-Request-Id`, `Knative-*` and `X-B3-*` pass from the ingress request to the
subscriber, and only `Retry-After` from the subscriber's response back to a caller.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import httptools

from infer_logger.cloudevents import http as ce_http
from infer_logger.cloudevents.event import AttributeValue, CloudEvent, attribute_text
from infer_logger.cloudevents.json_format import is_event_format
from infer_logger.errors import InvalidEventError, RejectedError, SinkError
from infer_logger.retry import RETRY_AFTER_MAX
from pipelines.broker.components import Component, Replier
from pipelines.broker.delivery import NO_RESPONSE, should_retry
from pipelines.broker.transport import HttpClient

_PASS_PREFIXES = ("knative-", "x-b3-")


def passthrough(headers: Mapping[str, str]) -> dict[str, str]:
    """The request headers a broker forwards (lower-cased): X-Request-Id, Knative-*, X-B3-*."""
    out = {}
    for name, value in headers.items():
        low = name.lower()
        if low == "x-request-id" or low.startswith(_PASS_PREFIXES):
            out[low] = value
    return out


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Lower-case names."""
    reason: str = ""
    """What went wrong when nothing (or a component) answered."""
    retry_after: str | None = None
    reply: CloudEvent | None = None
    """A component's reply (a URL's is parsed from the body by `parse_reply`)."""
    truncated: bool = False
    """The body was longer than the broker holds (`body` is its start)."""
    destination: str | None = None
    """Where the failed delivery went, when not to the subscriber (a reply into the broker)."""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        return should_retry(self.status)

    def retry_after_header(self) -> str | None:
        return self.retry_after if self.retry_after is not None else self.headers.get("retry-after")


class BadReplyError(ValueError):
    """A 2xx response whose body is not a CloudEvent."""


def looks_like_event(response: Response) -> bool:
    """Whether an answer says it carries a CloudEvent (binary or structured mode), read or not."""
    content_type = response.headers.get("content-type", "").lower()
    return "ce-specversion" in response.headers or content_type.startswith("application/cloudevents")


def parse_reply(response: Response) -> CloudEvent | None:
    if response.reply is not None:
        return response.reply
    body = response.body
    if not body and "ce-specversion" not in response.headers:  # the usual 202: nothing to parse
        return None
    try:
        return ce_http.from_http(response.headers, body)
    except InvalidEventError as exc:
        if not body:  # e.g. a malformed binary event without data: Knative takes it as no reply
            return None
        raise BadReplyError(f"the response is not a CloudEvent: {exc}") from None


class Endpoint(Protocol):
    address: str
    """Names the destination in logs and in `knativeerrordest`."""

    async def send(self, event: CloudEvent, headers: Mapping[str, str], *, reply: bool,
                   timeout: float | None) -> Response: ...


class BinaryHeaders:
    """`to_binary(event)` headers, with those of repeated attribute values cached (most repeat)."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._cache: dict[tuple[str, AttributeValue], tuple[str, str]] = {}

    def __call__(self, event: CloudEvent) -> dict[str, str]:
        cache = self._cache
        headers: dict[str, str] = {}
        for item in event.attributes.items():
            header = cache.get(item)
            if header is None:
                name, value = item
                if name == "datacontenttype":
                    header = ("content-type", str(value))
                else:
                    header = ("ce-" + name, ce_http.encode_header_value(attribute_text(value)))
                if type(value) is str:  # True == 1 as dict keys: only strings are cached
                    if len(cache) >= self.size:
                        cache.clear()
                    cache[item] = header
            headers[header[0]] = header[1]
        return headers


class HttpEndpoint:
    def __init__(self, url: str, client: Callable[[], HttpClient], *, structured: bool = False,
                 binary: BinaryHeaders | None = None) -> None:
        self.address = url
        self.url = url
        self._client = client
        self._structured = structured
        self._binary = binary or BinaryHeaders()

    def encode(self, event: CloudEvent) -> tuple[dict[str, str], bytes]:
        # A payload that is itself a CloudEvent would read as structured mode in binary mode.
        if self._structured or is_event_format(event.datacontenttype):
            return ce_http.to_structured(event)
        return self._binary(event), event.data or b""

    async def send(self, event: CloudEvent, headers: Mapping[str, str], *, reply: bool,
                   timeout: float | None) -> Response:
        out, body = self.encode(event)
        out.update(headers)
        if reply:
            out["prefer"] = "reply"
        try:
            answer = await self._client().post(self.url, out, body, timeout=timeout)
        except TimeoutError:
            return Response(NO_RESPONSE, reason=f"no answer within {timeout:g}s" if timeout else "timed out")
        except (OSError, ValueError, httptools.HttpParserError) as exc:
            return Response(NO_RESPONSE, reason=f"{type(exc).__name__}: {exc}")
        return Response(answer.status, answer.body, answer.headers, truncated=answer.truncated)


class ComponentEndpoint:
    """An in-process component: a Sink's `send_batch([event])` or a Replier's `handle(event)`."""

    def __init__(self, name: str, component: Component) -> None:
        self.address = f"component:{name}"
        self.component = component

    async def send(self, event: CloudEvent, headers: Mapping[str, str], *, reply: bool,
                   timeout: float | None) -> Response:
        try:
            async with asyncio.timeout(timeout):
                if isinstance(self.component, Replier):
                    answer = await self.component.handle(event)
                    return Response(200 if answer is not None else 202, reply=answer)
                await self.component.send_batch([event])
                return Response(202)
        except RejectedError as exc:
            return Response(400, reason=str(exc))
        except SinkError as exc:
            after = exc.retry_after
            if after is None or math.isnan(after):
                return Response(NO_RESPONSE, reason=str(exc))
            # A component that says when to retry (a receiver's 503 or 429 with Retry-After, say):
            # as a 503 with Retry-After, which the retry policy honours up to retryAfterMax. Cut
            # first: round(inf) raised, and the attempt counted as the component's crash.
            seconds = round(min(max(after, 0.0), RETRY_AFTER_MAX))
            return Response(503, reason=str(exc), retry_after=str(seconds))
        except TimeoutError:
            return Response(NO_RESPONSE, reason=f"no answer within {timeout:g}s")
        except asyncio.CancelledError as exc:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]  # ours: a stop
                raise
            # The component's own (a client library cancelling a future it closed): this attempt
            # failed, as a bug's would; out of here it ended the delivery, the event unsettled.
            return Response(NO_RESPONSE, reason=f"the component's call was cancelled ({exc!r})")
        except Exception as exc:  # noqa: BLE001 - a component's bug fails this attempt, not the broker
            return Response(500, reason=f"{type(exc).__name__}: {exc}")
