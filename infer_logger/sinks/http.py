"""`http` sink: CloudEvents POSTed to a URL (a Knative broker, an event display, our broker)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from datetime import UTC, datetime
from typing import Literal

import aiohttp
from pydantic import Field, HttpUrl

from infer_logger.cloudevents import http as ce_http
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import RejectedError, SinkError
from infer_logger.sinks.base import SinkConfig

# Knative's retry set: everything else in 4xx is the event's fault and never gets better.
RETRYABLE = frozenset({404, 408, 409, 429})


class HttpSinkConfig(SinkConfig):
    type: Literal["http"] = "http"
    url: HttpUrl
    """Where events go."""
    mode: Literal["binary", "structured", "batch"] = "binary"
    """CloudEvents HTTP content mode; `batch` sends one `application/cloudevents-batch+json` per batch."""
    timeout: float = Field(10.0, gt=0)
    """Seconds to wait for each POST."""
    concurrency: int = Field(16, ge=1)
    """POSTs in flight at once in binary and structured mode."""
    headers: dict[str, str] = {}
    """Extra headers on every POST (e.g. Authorization)."""

    def build(self) -> HttpSink:
        return HttpSink(self)


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


class HttpSink:
    def __init__(self, config: HttpSinkConfig) -> None:
        self.config = config
        self.url = str(config.url)
        self._session: aiohttp.ClientSession | None = None
        self._semaphore = asyncio.Semaphore(config.concurrency)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.timeout),
                connector=aiohttp.TCPConnector(limit=self.config.concurrency),
                # An event without datacontenttype must arrive without Content-Type, not with
                # aiohttp's application/octet-stream default.
                skip_auto_headers=("Content-Type",),
            )
        return self._session

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        if self.config.mode == "batch":
            headers, body = ce_http.to_batch(events)
            failure = await self._post(headers, body)
            if failure is not None:
                self._raise(*failure, events)
            return
        results = await asyncio.gather(*(self._send_one(e) for e in events))
        failed = [(e, r) for e, r in zip(events, results) if r is not None]
        if not failed:
            return
        retryable = [r for _, r in failed if r[0] in RETRYABLE or r[0] >= 500]
        if retryable:
            status, after = retryable[0]
            raise SinkError(f"{self.url} answered {status} to {len(retryable)} events", retry_after=after)
        raise RejectedError(
            f"{self.url} refused {len(failed)} events with {failed[0][1][0]}", [e for e, _ in failed]
        )

    async def _send_one(self, event: CloudEvent) -> tuple[int, float | None] | None:
        # A payload that is itself a CloudEvent would read as structured mode in binary mode.
        nested = (event.datacontenttype or "").startswith("application/cloudevents")
        if self.config.mode == "structured" or nested:
            headers, body = ce_http.to_structured(event)
        else:
            headers, body = ce_http.to_binary(event)
        async with self._semaphore:
            return await self._post(headers, body)

    async def _post(self, headers: dict[str, str], body: bytes) -> tuple[int, float | None] | None:
        """None on success, else (status, retry-after); raises SinkError when nothing answered."""
        try:
            async with self._client().post(
                self.url, data=body, headers={**self.config.headers, **headers}
            ) as resp:
                await resp.read()
                if resp.status < 300:
                    return None
                return resp.status, retry_after(resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise SinkError(f"{self.url}: {type(exc).__name__}: {exc}") from exc

    def _raise(self, status: int, after: float | None, events: Sequence[CloudEvent]) -> None:
        if status in RETRYABLE or status >= 500:
            raise SinkError(f"{self.url} answered {status}", retry_after=after)
        raise RejectedError(f"{self.url} refused the batch with {status}", events)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
