"""The inference logger core shared by the proxy and the ASGI middleware.

It turns one request/response exchange into CloudEvents and appends them to the spool; the
dispatcher takes them from there. Nothing here waits on a sink.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

from infer_logger import events as ev
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.cloudevents.validation import percent_escaped
from infer_logger.config import Settings
from infer_logger.delivery import DeliveryProcess
from infer_logger.dispatch import Dispatcher
from infer_logger.metrics import Metrics
from infer_logger.spool import DiskSpool, MemorySpool, Position, Spool

log = logging.getLogger(__name__)

_V1 = re.compile(r"/v1/models/([^/]+):(predict|explain)")
_V2 = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
# The same after whole path segments (an app mounted under a prefix); the groups are the same.
_PREFIX = r"(?:/[^/]+)*?"
_V1_UNDER = re.compile(_PREFIX + _V1.pattern)
_V2_UNDER = re.compile(_PREFIX + _V2.pattern)


@dataclass(frozen=True, slots=True)
class Route:
    """A logged inference endpoint, read off the path."""

    protocol: str
    model: str
    version: str | None
    verb: str


def match_route(method: str, path: str, *, prefixed: bool = False) -> Route | None:
    """KServe V1 `:predict`/`:explain` and V2 `infer` POSTs are logged; anything else is not.

    `prefixed`: also under a prefix of whole segments (`/api/v1/models/m:predict`), as an app
    wrapped around one that mounts the predictor sees them."""
    if method != "POST":
        return None
    v1, v2 = (_V1_UNDER, _V2_UNDER) if prefixed else (_V1, _V2)
    if m := v1.fullmatch(path):
        return Route("v1", m.group(1), None, m.group(2))
    if m := v2.fullmatch(path):
        return Route("v2", m.group(1), m.group(2), "infer")
    return None


@dataclass(slots=True)
class Exchange:
    """What the logger keeps between a request and its response."""

    id: str
    route: Route
    path: str
    started: float
    content_type: str
    attributes: dict[str, str | int | bool]


def build_spool(settings: Settings) -> Spool:
    s = settings.spool
    if s.durability == "memory":
        return MemorySpool(max_events=s.memory_max_events, max_bytes=int(s.max_bytes), overflow=s.overflow)
    return DiskSpool(
        s.dir,
        segment_bytes=int(s.segment_bytes),
        max_bytes=int(s.max_bytes),
        overflow=s.overflow,
        fsync_interval=s.fsync_interval,
    )


class InferenceLogger:
    """Records exchanges into the spool and runs the sink workers over it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.spool = build_spool(settings)
        # Sink work goes to a child process unless the events live in this one's memory.
        self.delivery: DeliveryProcess | None = None
        self.dispatcher: Dispatcher | None = None
        if settings.delivery.mode == "process" and settings.spool.durability == "disk":
            self.delivery = DeliveryProcess(settings, backlog=self._backlog)
            self.metrics = Metrics(self.spool, remote=self.delivery.report)
        else:
            self.metrics = Metrics(self.spool)
            self.dispatcher = Dispatcher.from_settings(settings, self.spool, self.metrics)
        source = settings.source
        # As `metadata`: DEL or a C1 control in one, written as is, made every event invalid.
        annotations = ev.json_attribute(settings.annotations) if settings.annotations else None
        self.origin = ev.Origin(
            source,
            settings.inference_service,
            settings.namespace,
            settings.component,
            settings.endpoint,
            annotations,
        )
        self._base = self.origin.attributes()
        self._metadata_headers = settings.metadata_headers
        # With no header to copy, `metadata` is the same for every event.
        self._base[ev.METADATA] = ev.metadata_json((), ())
        self._log_request = settings.log_mode in ("all", "request")
        self._log_response = settings.log_mode in ("all", "response")
        self._limit = int(settings.max_payload_bytes)
        self._accepted_request = self.metrics.accepted.labels("request")
        self._accepted_response = self.metrics.accepted.labels("response")
        self.started = False
        self._closed = False  # stop() closed the spool: start() opens it again

    async def start(self) -> None:
        """Start delivery; after a stop, first open the spool again, as a new process would (an
        app's lifespan can run twice in one process: two TestClient blocks, an in-process reload)."""
        if self._closed:
            self._reopen()
        self.spool.start_fsync()
        if self.delivery is not None:
            await self.delivery.start()
        else:
            assert self.dispatcher is not None
            self.dispatcher.start()
        self.started = True

    def begin_stop(self) -> None:
        """The server begins its stop: it answers the requests in flight, then calls `stop`. A
        delivery child that dies meanwhile is not replaced (it would be, mid-stop)."""
        if self.delivery is not None:
            self.delivery.begin_stop()

    async def stop(self) -> None:
        if self._closed:  # a start that failed in _reopen, stopped again
            return
        drain = self.settings.delivery.drain_timeout
        if self.delivery is not None:
            # The child reads what is on disk: the spool closes (flushed) only after it drained.
            await self.delivery.stop(drain)
        elif self.dispatcher is not None:
            await self.dispatcher.stop(drain)
        self.spool.close()
        self._closed = True
        self.started = False

    def _reopen(self) -> None:
        """A new spool (locked again, its checkpoints read) and, inline, new sink workers over it
        (stop closed their sinks); the metrics carry on over the new spool."""
        spool = build_spool(self.settings)
        if self.dispatcher is not None:
            try:
                dispatcher = Dispatcher.from_settings(self.settings, spool, self.metrics)
            except BaseException:
                spool.close()
                raise
            self.dispatcher = dispatcher
        self.spool = spool
        self.metrics.use(spool)
        self._closed = False

    def _backlog(self, delivered: Position) -> int:
        """Spool bytes not yet delivered: those appended after the position the delivery child
        reports every sink has got to (the segment being written stays, delivered or not)."""
        assert isinstance(self.spool, DiskSpool)  # a delivery child reads a disk spool
        return self.spool.bytes_after(delivered)

    def sink_states(self) -> dict[str, str]:
        """Each sink's state for /readyz: ok, retrying (failing, backing off) or down (no delivery process)."""
        if self.delivery is not None:
            return self.delivery.sink_states()
        assert self.dispatcher is not None
        return {name: "ok" if healthy else "retrying" for name, healthy in self.dispatcher.health().items()}

    def update_lag(self) -> None:
        """Refresh the sink lag gauges before a scrape (a delivery child keeps its own)."""
        if self.dispatcher is not None:
            self.dispatcher.update_lag()

    # -- recording ---------------------------------------------------------------------------

    def begin(
        self,
        route: Route,
        path: str,
        headers: dict[str, str],
        raw_headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        event_id: str,
    ) -> Exchange:
        """Log the request (per log mode) and return what the response needs.

        `headers`: lower-case names to values; `raw_headers`: as received, for `metadata`.
        """
        started = time.perf_counter()
        attrs: dict[str, str | int | bool] = dict(self._base)
        attrs["id"] = event_id
        if self._metadata_headers:
            pairs = ((k.decode("latin-1"), v.decode("latin-1")) for k, v in raw_headers)
            attrs[ev.METADATA] = ev.metadata_json(pairs, self._metadata_headers)
        # Read off the decoded path, where `%09` or `%C2%85` are legal: kept as such in the event.
        if path.isascii() and path.isprintable():  # the usual path: its parts are fine too
            attrs[ev.MODELNAME] = route.model
            if route.version:
                attrs[ev.MODELVERSION] = route.version
            attrs[ev.PATH] = path
        else:
            attrs[ev.MODELNAME] = percent_escaped(route.model)
            if route.version:
                attrs[ev.MODELVERSION] = percent_escaped(route.version)
            attrs[ev.PATH] = percent_escaped(path)
        attrs[ev.PROTOCOL] = route.protocol
        if (sent := headers.get("traceparent")) and (traceparent := ev.traceparent(sent)):
            attrs[ev.TRACEPARENT] = traceparent
        # One no event may carry (`json`, a C1 control) is taken as none: guessed JSON too.
        content_type = ev.media_type(headers.get("content-type")) or "application/json"
        exchange = Exchange(event_id, route, path, started, content_type, attrs)
        if self._log_request:
            logged_type, marks = content_type, None
            if (coding := headers.get("content-encoding")) and coding.strip().lower() != "identity":
                # Compressed bytes labelled JSON were unreadable in the audit (tritonclient can
                # compress its requests): decoded, or said to be bytes.
                found = ev.decoded(body, coding, self._limit)
                if found is None:
                    logged_type = "application/octet-stream"
                else:
                    body, marks = found
            self._append(ev.REQUEST, attrs, logged_type, body, self._accepted_request, marks=marks)
        return exchange

    @property
    def logs_responses(self) -> bool:
        """Whether `end` logs anything (log mode `all` or `response`)."""
        return self._log_response

    @property
    def payload_limit(self) -> int:
        """Bytes of a payload the events keep; the rest is cut and marked."""
        return self._limit

    def end(self, exchange: Exchange, status: int, content_type: str | None, body: bytes,
            size: int | None = None, *, cut_off: bool = False, encoding: str | None = None) -> None:
        """Log the response, whatever its status; called before the client gets it.

        A `content_type` no event may carry is taken as none: the request's stands in.
        `size`: the whole body's length when `body` is only its first `payload_limit` bytes.
        `cut_off`: the body ended early (a stream the client left): marked truncated.
        `encoding`: its Content-Encoding, decoded as a request's is (`begin`)."""
        if not self._log_response:
            return
        latency = (time.perf_counter() - exchange.started) * 1000
        attrs = dict(exchange.attributes)
        attrs[ev.STATUSCODE] = status
        # An integer keeps the attribute a valid CloudEvents type (no floats there).
        attrs[ev.LATENCYMS] = max(0, round(latency))
        content_type = ev.media_type(content_type) or exchange.content_type
        marks: dict[str, str | int | bool] | None = None
        if encoding and encoding.strip().lower() != "identity":
            # Asked for identity, a predictor may compress anyway (pre-compressed answers): gzip
            # bytes labelled JSON were unreadable in the audit. Decoded, or said to be bytes.
            found = ev.decoded(body, encoding, self._limit)
            if found is None:
                content_type = "application/octet-stream"
            else:
                cut_off = cut_off or (size is not None and size > len(body))  # decoded from its first bytes only
                body, marks = found
        if cut_off:
            body, marks = body[:self._limit], {**(marks or {}), ev.TRUNCATED: True}
        self._append(ev.RESPONSE, attrs, content_type, body, self._accepted_response, size, marks=marks)

    def _append(
        self,
        type_: str,
        attrs: dict[str, str | int | bool],
        content_type: str,
        body: bytes,
        counter: object,
        size: int | None = None,
        *,
        marks: dict[str, str | int | bool] | None = None,
    ) -> None:
        """`marks`: the payload is cut already (`ev.decoded`), and these say how."""
        data, marks = ev.capped(body, self._limit, size) if marks is None else (body, marks)
        now = ev.now_rfc3339()
        attributes = {**attrs, **marks, "type": type_, "time": now, ev.RECORDEDTIME: now}
        if data:
            attributes["datacontenttype"] = content_type
        # An empty body (a 204) is no data: `data_base64: ""` labelled with the request's JSON
        # type made a prediction of nothing in the audit store.
        event = CloudEvent(attributes, data or None)
        if self.spool.append(event):
            counter.inc()  # type: ignore[attr-defined]
