"""One trigger's delivery: filter, deliver with retries and a per-attempt timeout, then either
put the reply back into the broker (that alone retried if the log refuses it; given up, the event
is dead-lettered) or, when every attempt failed, dead-letter the event.

`deliver(event)` settles one event and never raises, so a caller can run many at once; the
channel decides when the log position may move (after every event before it settled).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from infer_logger.cloudevents.event import CloudEvent
from infer_logger.retry import retry_after
from pipelines.broker.channel import TTL, ChannelError, RefusedError
from pipelines.broker.delivery import NO_RESPONSE, RetryPolicy, error_extensions
from pipelines.broker.endpoints import (
    BadReplyError,
    Endpoint,
    Response,
    looks_like_event,
    parse_reply,
    passthrough,
)
from pipelines.broker.filters import FAIL, Delivered
from pipelines.broker.metrics import BrokerMetrics
from pipelines.broker.trigger import Trigger

log = logging.getLogger(__name__)

Reenter = Callable[[CloudEvent], Awaitable[int]]
"""Puts a reply into the broker (TTL rules applied): 1 if stored, 0 if dropped; raises ChannelError
if the log refused it."""
Failure = tuple[Response, dict[str, str]]
"""A failed attempt and the headers its dead letter carries: the request's, or the reply's when the
reply is what could not be delivered (as Knative's dispatcher sends them)."""


def without_ttl(event: CloudEvent) -> tuple[CloudEvent, int | None]:
    """The event as subscribers see it (no broker TTL), and that TTL."""
    attributes = dict(event.attributes)
    raw = attributes.pop(TTL, None)
    try:
        ttl = None if raw is None else int(raw)
    except ValueError:
        ttl = None
    return CloudEvent(attributes, event.data, event.meta), ttl


class TriggerDispatcher:
    def __init__(self, trigger: Trigger, subscriber: Endpoint, dead_letter: Endpoint | None,
                 policy: RetryPolicy, reenter: Reenter, metrics: BrokerMetrics) -> None:
        self.trigger = trigger
        self.subscriber = subscriber
        self.dead_letter = dead_letter
        self.policy = policy
        self.reenter = reenter
        self.settled = 0
        """Events done with: filtered out, delivered, dead-lettered or given up on."""
        self._filter = trigger.filter
        self._reply_to = "broker:{}/{}".format(*trigger.broker_key)
        label = trigger.label
        m = metrics
        self._filtered = m.filtered.labels(label)
        self._delivered = m.delivered.labels(label)
        self._replies = m.replies.labels(label)
        self._dead_lettered = m.dead_lettered.labels(label)
        self._lost = m.lost.labels(label)
        self._latency = m.latency.labels(label)
        self._attempts = m.attempts
        self._codes: dict[int, object] = {}
        self._failures = 0

    def take(self, events: Sequence[CloudEvent]) -> list[CloudEvent]:
        """The events this trigger's filter lets through (the others are settled: filtered out)."""
        taken = [e for e in events if self._passes(e)]
        if skipped := len(events) - len(taken):
            self._filtered.inc(skipped)
            self.settled += skipped
        return taken

    def _passes(self, event: CloudEvent) -> bool:
        try:
            return self._filter(Delivered(event.attributes, TTL)) is not FAIL
        except Exception:  # a bug: raised out of take(), it ended the channel's runner for good
            log.exception("trigger %s: filtering event %s failed; it is filtered out", self.trigger.label, event.id)
            return False

    async def deliver(self, event: CloudEvent) -> None:
        """Deliver (retrying), else dead-letter: the event is settled either way. A bug on the way
        must not leave it unsettled, or its position in the log would never be committed (every
        later event redelivered after a restart, the log never freed)."""
        try:
            await self._deliver(event)
        except Exception as exc:
            log.exception("trigger %s: delivering event %s failed unexpectedly", self.trigger.label, event.id)
            try:
                await self._dead_letter(without_ttl(event)[0], Response(NO_RESPONSE, reason=f"internal error: {exc!r}"))
            except Exception:
                log.exception("trigger %s: dead-lettering event %s failed too: lost", self.trigger.label, event.id)
                self._lost.inc()
            self.settled += 1

    async def _deliver(self, event: CloudEvent) -> None:
        started = time.perf_counter()
        out, ttl = without_ttl(event)
        attempt = 0
        while True:
            response = await self.subscriber.send(out, event.meta, reply=True, timeout=self.policy.timeout)
            self._count(response.status)
            headers: dict[str, str] = event.meta
            if response.ok:
                reply = self._reply(response, ttl, event.meta)
                if not isinstance(reply, tuple):  # the subscriber took it: it is not sent again
                    self._delivered.inc()
                    self._latency.observe(time.perf_counter() - started)
                    failure = None if reply is None else await self._store(reply)
                    if failure is not None:
                        await self._dead_letter(out, *failure)
                    self.settled += 1
                    return
                response, headers = reply
            if not response.retryable or attempt >= self.policy.retry:
                break
            attempt += 1
            after = retry_after(response.retry_after_header())
            await asyncio.sleep(self.policy.wait(attempt, response.status, after))
        await self._dead_letter(out, response, headers)
        self.settled += 1

    def _reply(self, response: Response, ttl: int | None, request: dict[str, str]) -> CloudEvent | Failure | None:
        """The reply of an answer that succeeded (None if it has none), or the failure it is (a
        reply no event, or too large), with the headers of the request or of the reply."""
        if response.truncated:
            if looks_like_event(response):  # larger than any event the broker takes: as reenter's refusal
                return Response(413, response.body, reason="the reply is larger than the broker takes",
                                destination=self._reply_to), passthrough(response.headers)
            # A large body that is no event (an HTML page): Knative's 502, retried like any other.
            return Response(502, response.body,
                            reason="the subscriber answered with a body that is no CloudEvent"), request
        try:
            reply = parse_reply(response)
        except BadReplyError as exc:
            # Knative's filter answers 502 here, which its sender retries like any 5xx.
            return Response(502, response.body, reason=str(exc)), request
        if reply is None:
            return None
        attributes = dict(reply.attributes)
        if ttl is not None:
            attributes[TTL] = ttl  # the broker takes one off: a reply loop ends when it reaches 0
        return CloudEvent(attributes, reply.data, passthrough(reply.meta))

    async def _store(self, reply: CloudEvent) -> Failure | None:
        """Put the reply into the broker, retried as the policy says (Knative retries only the
        reply's delivery once the subscriber succeeded); None when done, else why not."""
        attempt = 0
        while True:
            try:
                if await self.reenter(reply):  # 0: dropped (its TTL ran out), no reply put back
                    self._replies.inc()
                return None
            except RefusedError as exc:  # never storable: not retried
                return Response(413 if exc.too_large else 400, reason=f"the reply could not be stored: {exc}",
                                destination=self._reply_to), reply.meta
            except ChannelError as exc:
                failure = Response(503, reason=f"the reply could not be stored: {exc}", destination=self._reply_to)
            if attempt >= self.policy.retry:
                return failure, reply.meta
            attempt += 1
            await asyncio.sleep(self.policy.wait(attempt, failure.status, None))

    async def _dead_letter(self, event: CloudEvent, failure: Response,
                           headers: dict[str, str] | None = None) -> None:
        """Sends `event` with the failure's extensions, and `headers` (default: the event's own)."""
        why = f"{failure.status} {failure.reason}".strip()
        if self.dead_letter is None:
            self._lost.inc()
            self._warn("trigger %s: gave up on event %s (%s); no dead-letter sink", event.id, why)
            return
        # knativeerrordest: the subscriber, or the broker when the reply is what could not be delivered.
        status, body = failure.status, failure.body or failure.reason.encode()
        if status == NO_RESPONSE:  # as Knative's dispatcher: no answer is a 500, with the error as data
            status, body = 500, f"dispatch error: {failure.reason}".encode()
        extensions = error_extensions(failure.destination or self.subscriber.address, status, body)
        # An event dead-lettered before keeps no data of that earlier failure.
        kept = {k: v for k, v in event.attributes.items() if k != "knativeerrordata"}
        headers = event.meta if headers is None else headers
        letter = CloudEvent({**kept, **extensions}, event.data, headers)
        attempt = 0
        while True:
            response = await self.dead_letter.send(letter, headers, reply=False, timeout=self.policy.timeout)
            if response.ok:
                self._dead_lettered.inc()
                self._warn("trigger %s: event %s dead-lettered (%s)", event.id, why)
                return
            if not response.retryable or attempt >= self.policy.retry:
                break
            attempt += 1
            after = retry_after(response.retry_after_header())
            await asyncio.sleep(self.policy.wait(attempt, response.status, after))
        self._lost.inc()
        self._warn("trigger %s: event %s lost: the dead-letter sink answered %s", event.id,
                   f"{response.status} {response.reason}".strip())

    def _count(self, status: int) -> None:
        counter = self._codes.get(status)
        if counter is None:
            counter = self._codes[status] = self._attempts.labels(self.trigger.label, str(status))
        counter.inc()  # type: ignore[attr-defined]

    def _warn(self, message: str, *args: object) -> None:
        # A dead subscriber fails every event: log the first failures and then every 100th.
        self._failures += 1
        if self._failures <= 10 or self._failures % 100 == 0:
            log.warning(message + " [%d failures so far]", self.trigger.label, *args, self._failures)
