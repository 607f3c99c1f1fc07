"""`http` sink: CloudEvents POSTed to a URL (a Knative broker, an event display, our broker)."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import ssl
from collections.abc import Sequence
from typing import Literal
from urllib.parse import unquote, urlsplit

import orjson
from pydantic import ByteSize, Field, HttpUrl, field_validator

from infer_logger.cloudevents import http as ce_http
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import ConfigError, RejectedError, SinkError
from infer_logger.fields import NamedFile, Seconds
from infer_logger.retry import retry_after
from infer_logger.sinks.base import SinkConfig, without_userinfo
from infer_logger.sinks.size_limit import SizeLimit
from infer_logger.upstream import Upstream, UpstreamError

# Knative's retry set: everything else in 4xx is the event's fault and never gets better.
RETRYABLE = frozenset({404, 408, 409, 429})
# Of an answer the status and Retry-After count, and a batch refusal's positions (~7 bytes an
# event): a body is kept up to this and the rest not read (a 2xx whose body never ends is still a
# delivery).
RESPONSE_BODY_MAX = 1 << 20
# The header of an answer whose JSON names a batch's events by position (`_send_batches`): only
# a receiver that says so is trusted to have taken the others.
POSITIONS_HEADER = b"infer-logger-positions"
# Refusals of a batch POST that may be for some of its events only: for its size, or a bad event.
_PARTIAL = frozenset({400, 413, 422})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 5.6.2
_OWN_HEADERS = frozenset({"host", "content-length", "transfer-encoding"})

log = logging.getLogger(__name__)

_Answer = tuple[int, float | None, bytes]  # a refusal: status, retry-after, the body naming positions


class _Held:
    """An event not sent: an earlier one of its id failed, and it must not overtake that one."""


_HELD = _Held()
# What a POST of one event came to: None (taken), a refusal, what it raised, or not sent.
_Result = _Answer | BaseException | _Held | None


def _retryable(answer: _Answer) -> bool:
    return answer[0] in RETRYABLE or answer[0] >= 500


class HttpSinkConfig(SinkConfig):
    type: Literal["http"] = "http"
    url: HttpUrl
    """Where events go."""
    mode: Literal["binary", "structured", "batch"] = "binary"
    """CloudEvents HTTP content mode; `batch` sends one `application/cloudevents-batch+json` per batch
    (or per `max_batch_bytes` of it)."""
    max_batch_bytes: ByteSize = Field(ByteSize(8 << 20), gt=0)
    """In `batch` mode, a batch larger than this goes in several POSTs, in order (an event larger
    alone): below the receivers' limits (our broker's `max_request_bytes`, 16 MiB). A batch a
    receiver still answers 413 is sent again in halves."""
    timeout: Seconds = Field(10.0, gt=0)
    """Seconds to wait for each POST's answer (a 2xx whose body is still coming then counts as delivered)."""
    concurrency: int = Field(16, ge=1)
    """POSTs in flight at once in binary and structured mode."""
    tls_verify: bool = True
    """Verify an https receiver's certificate; false takes any (KServe's --logger-tls-skip-verify)."""
    ca_certs: NamedFile | None = None
    """A PEM file of the CAs to trust for an https receiver, instead of the system's."""
    headers: dict[str, str] = {}
    """Extra headers on every POST (e.g. Authorization): names are RFC 9110 tokens, values latin-1
    text on one line; host, content-length and transfer-encoding are the sink's own."""

    @field_validator("headers")
    @classmethod
    def _header_lines(cls, headers: dict[str, str]) -> dict[str, str]:
        # Written as they are into each request: a line break would start a header of its own,
        # and a character past latin-1 stopped the sidecar at start with a traceback.
        for name, value in headers.items():
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"{name!r} is not a header name (letters, digits and !#$%&'*+-.^_`|~)")
            if name.lower() in _OWN_HEADERS:
                raise ValueError(f"{name!r} is set by the sink")
            if "\r" in value or "\n" in value or "\0" in value:
                raise ValueError(f"the value of {name!r} holds a line break or NUL")
            try:
                value.encode("latin-1")
            except UnicodeEncodeError:
                raise ValueError(f"the value of {name!r} is not latin-1 text") from None
        return headers

    def build(self) -> HttpSink:
        return HttpSink(self)


def _tls(config: HttpSinkConfig) -> ssl.SSLContext | None:
    if config.ca_certs is None and config.tls_verify:
        return None  # the system's CAs
    try:
        context = ssl.create_default_context(cafile=config.ca_certs)
    except (OSError, ssl.SSLError) as exc:  # unreadable, or no certificate in it
        raise ConfigError("ca_certs", f"{config.ca_certs}: {exc}") from None
    if not config.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class HttpSink:
    """POSTs over the sidecar's own keep-alive client (`infer_logger.upstream`): in binary mode,
    one POST per event, aiohttp's per-request cost was most of this sink's CPU.

    Order: in binary and structured mode the events of an id (a request, its response, its
    explanation) are POSTed one after another in batch order, each once the one before it was
    answered; different ids go at once, up to `concurrency`. An event failing in a way worth
    retrying holds back the later ones of its id: all are `pending`, in batch order, so a retry
    does not deliver them out of order. One refused for good (dead-lettered) holds nothing back.
    In batch mode the POSTs go in order, one at a time.
    """

    def __init__(self, config: HttpSinkConfig) -> None:
        self.config = config
        self.url = without_userinfo(str(config.url))  # named in messages, logs and dead letters
        parts = urlsplit(str(config.url))
        self._client = Upstream(f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}", timeout=config.timeout,
                                max_body=RESPONSE_BODY_MAX, resend_unanswered=True, tls=_tls(config))
        target = parts.path or "/"
        self._target = (target + ("?" + parts.query if parts.query else "")).encode()
        self._extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in config.headers.items()]
        if parts.username is not None and b"authorization" not in {k for k, _ in self._extra}:
            # user:password@ in the URL means HTTP Basic, as curl and aiohttp read it.
            token = base64.b64encode(f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode())
            self._extra.append((b"authorization", b"Basic " + token))
        self._semaphore = asyncio.Semaphore(config.concurrency)
        self._batch_bytes = SizeLimit(int(config.max_batch_bytes))  # lowered by a 413 in batch mode

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        if self.config.mode == "batch":
            await self._send_batches(events)
            return
        # The events of an id (a request, its response, its explanation) go one after another,
        # in batch order; different ids at once (up to `concurrency`).
        chains: dict[str, list[int]] = {}
        for i, event in enumerate(events):
            chains.setdefault(event.id, []).append(i)
        results: list[_Result] = [None] * len(events)
        outcomes = await asyncio.gather(*(self._send_one(events[c[0]]) if len(c) == 1
                                          else self._send_chain(events, c, results) for c in chains.values()),
                                        return_exceptions=True)
        for chain, outcome in zip(chains.values(), outcomes):
            if len(chain) == 1:
                results[chain[0]] = outcome
            elif isinstance(outcome, BaseException):  # not one of its POSTs' (those are in results)
                raise outcome
        failed = [(e, r) for e, r in zip(events, results) if r is not None]
        if not failed:
            return
        # Only the events that failed or were held back go again (`pending`, in batch order):
        # the others were taken.
        pending = [e for e, _ in failed]
        answers = [r for _, r in failed if isinstance(r, tuple)]
        retryable = [r for r in answers if _retryable(r)]
        held = sum(1 for _, r in failed if r is _HELD)
        # The longest wait any answer asked for: one 429's Retry-After beside a 503 without one.
        afters = [r[1] for r in retryable] + [getattr(r, "retry_after", None) for _, r in failed
                                              if isinstance(r, BaseException)]
        after = max((a for a in afters if a is not None), default=None)
        behind = f"; {held} later events of their ids held back" if held else ""
        for _, result in failed:
            if isinstance(result, BaseException):  # no answer or a redirect (SinkError), or a bug: retried too
                if not isinstance(result, Exception):
                    raise result
                raise SinkError(f"{result} ({len(failed)} of {len(events)} events not taken{behind})",
                                retry_after=after, pending=pending) from result
        if retryable:
            raise SinkError(f"{self.url} answered {retryable[0][0]} to {len(retryable)} events{behind}",
                            retry_after=after, pending=pending)
        # Each one refused for good (nothing held back then): `answers` are all of them.
        raise RejectedError(f"{self.url} refused {len(failed)} events with {answers[0][0]}", pending,
                            too_large=all(r[0] == 413 for r in answers))

    async def _send_chain(self, events: Sequence[CloudEvent], chain: list[int], results: list[_Result]) -> None:
        """The events at `chain` (one id's), each once the one before it was answered; after a
        failure worth retrying the rest are held back (`_HELD`), their turn not come. A refusal
        for good holds nothing: that event is dead-lettered, never sent again before them."""
        for n, i in enumerate(chain):
            try:
                result = results[i] = await self._send_one(events[i])
            except Exception as exc:  # no answer or a redirect (SinkError), or a bug: retried
                results[i] = exc
            else:
                if result is None or not _retryable(result):
                    continue
            for later in chain[n + 1:]:
                results[later] = _HELD
            return

    async def _send_one(self, event: CloudEvent) -> _Answer | None:
        if self.config.mode == "structured":
            headers, body = ce_http.to_structured(event)
        else:  # structured after all for a payload that is itself a CloudEvent
            headers, body = ce_http.to_binary(event)
        async with self._semaphore:
            return await self._post(headers, body)

    async def _post(self, headers: dict[str, str], body: bytes) -> tuple[int, float | None, bytes] | None:
        """None on success, else (status, retry-after, the body when it names events by position);
        raises SinkError when nothing answered or the answer is a redirect (3xx, not followed)."""
        # The event's own headers win over configured ones of the same name.
        own = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        names = {k for k, _ in own}
        sent = [(k, v) for k, v in self._extra if k not in names] + own
        try:
            answer = await self._client.request("POST", self._target, sent, body)
        except TimeoutError:
            raise SinkError(f"{self.url}: no answer within {self.config.timeout:g}s") from None
        except (OSError, UpstreamError) as exc:
            raise SinkError(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        if answer.status < 300:
            return None
        if answer.status < 400:
            # Not followed (a POST's body to wherever an answer says), and no refusal: an ingress
            # moving to https mid-rollout dead-lettered the spool. Kept, and said where to.
            where = next((v.decode("latin-1") for k, v in answer.headers if k == b"location"), "nowhere")
            raise SinkError(f"{self.url} answered {answer.status}, a redirect to {where[:200]}: not followed; "
                            "the events are sent here again (set the sink's url to where they should go)")
        after = next((v.decode("latin-1") for k, v in answer.headers if k == b"retry-after"), None)
        named = not answer.truncated and any(k == POSITIONS_HEADER for k, _ in answer.headers)
        return answer.status, retry_after(after), answer.body if named else b""

    async def _send_batches(self, events: Sequence[CloudEvent]) -> None:
        """One POST per `max_batch_bytes`, in order. A 413 stops there: its events and the rest
        are refused together for their size, and the worker sends them again in halves, in order;
        the sink's POSTs stay at most half the refused one's size for a while (below an event
        refused alone, `SizeLimit`), so a receiver's limit costs a few refusals, not some for
        every batch. A 400 or 422 (one bad event) stops there too, its events and the rest refused
        together, so that the halves find the bad one in order. Another refusal (401, 403, 415...)
        does not stop the next POST, and after one none does (nothing is halved then: the rest
        is sent, not refused unsent). A failure raises with the events not taken as `pending`
        (those refused before it and the rest), which the worker sends again.

        A receiver that stored part of a POST may name the others in its JSON answer (our
        broker does), saying so with an `Infer-Logger-Positions` header: `"refused": [positions]`
        with a 400, 413 or 422 (those refused for good), `"pending": [positions]` with a 5xx (to
        send again): the rest of that POST is taken, not sent again (a duplicate each)."""
        refused: list[CloudEvent] = []
        statuses: list[int] = []  # of the refusals that named no events
        named: set[int] = set()  # of those that did
        sent = 0
        for chunk, headers, body in ce_http.to_batches(events, self._batch_bytes()):
            try:
                failure = await self._post(headers, body)
            except SinkError as exc:  # no answer or a redirect: this POST and the rest go again, not those taken
                exc.pending = [*refused, *events[sent:]]
                raise
            if failure is not None:
                status, after, answer = failure
                if status in RETRYABLE or status >= 500:
                    left = _named(answer, "pending", chunk) if status >= 500 else None
                    raise SinkError(f"{self.url} answered {status}" + (
                        "" if left is None else f" ({len(left)} of the {len(chunk)} events of its POST not taken)"),
                        retry_after=after, pending=[*refused, *(chunk if left is None else left),
                                                    *events[sent + len(chunk):]])
                if status in _PARTIAL and (own := _named(answer, "refused", chunk)) is not None:
                    refused += own  # each refused for good; the others of the POST taken
                    named.add(status)
                    sent += len(chunk)
                    continue
                # The halves find a bad event among those refused together; after a refusal of any
                # batch (401, 403, 415...) none are halved: the rest must be sent, not refused unsent.
                together = not statuses  # no refusal of any batch before this one (a partial one stops)
                statuses.append(status)
                if status == 413 and (lower := self._batch_bytes.refused(len(body), len(chunk))) is not None:
                    log.warning("%s answered 413 to a batch POST of %d bytes: POSTs of at most %d bytes "
                                "for a while", self.url, len(body), lower)
                if status in _PARTIAL and together:
                    refused += events[sent:]  # halved with the rest, in order (sent on, they went first)
                    break
                refused += chunk
            sent += len(chunk)
        if refused:
            said = " and ".join(str(s) for s in sorted({*statuses, *named}))
            what = "the batch" if len(refused) == len(events) and len(statuses) == 1 else f"{len(refused)} events"
            # Smaller batches can pass a size limit or leave out a bad event; a 401, 403, 415...
            # refuses any batch, so halving would only send each event alone to be refused again.
            # (Events the receiver named as refused, if halved with others, are refused again alone.)
            raise RejectedError(f"{self.url} refused {what} with {said}", refused,
                                too_large=413 in statuses or 413 in named,
                                together=bool(statuses) and set(statuses) <= _PARTIAL)

    async def aclose(self) -> None:
        await self._client.close()


def _named(answer: bytes, key: str, chunk: Sequence[CloudEvent]) -> list[CloudEvent] | None:
    """The events of `chunk` at the positions an answer's JSON lists under `key`, or None when it
    names none that way (no JSON, no such list, a position out of range or twice)."""
    try:
        positions = orjson.loads(answer).get(key) if answer else None
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if (not isinstance(positions, list) or not positions
            or not all(type(p) is int and 0 <= p < len(chunk) for p in positions)
            or len(set(positions)) != len(positions)):
        return None
    return [chunk[p] for p in sorted(positions)]
