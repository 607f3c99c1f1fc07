"""Explain on events: a broker subscriber that answers inference events with explanation events.

A response event does not carry the request's payload, so the subscriber takes both types (a
trigger filter on `type` prefix `org.kubeflow.serving.inference.`, plus any model or sampling
filter) and joins them by id in a bounded cache (`cache_size` entries, `cache_bytes` of their data
and attributes, `cache_ttl` seconds; the oldest go first). Whichever of the two arrives second is
answered with an `org.kubeflow.serving.inference.explanation` event of the same id, so the store and
Elasticsearch join it to the prediction; the first is answered with no reply (HTTP 202). An
explanation over `max_explanation_bytes` (a broker refuses a reply over its `max_event_bytes`, for
good) keeps each output's k largest attributions, the largest k that fits (`params.top_k`); one
that does not fit with k = 1 is refused (`RejectedError`, below). Failed predictions
(status >= 400), exchanges outside `sample` (chosen by id) and events of another model (their
`modelname` set, and neither `model_name` nor `predictor_model`) are not explained.

Deliveries are at least once, so an exchange is explained once: a copy of an event that comes
while its exchange is being explained waits for that explanation and replies nothing new (over
HTTP it gets the same reply, as the broker may have given up on the first answer; a batch holding
it twice answers it once), and an id explained and delivered, or whose prediction failed, is
remembered with its explanation for `cache_ttl` (at most `cache_size` ids, `cache_bytes` of
explanations): its completing half delivered again gets that explanation again (the broker's
attempt may have timed out, or its reply not been stored), the other half nothing.

Failures: a predictor that cannot be reached raises `SinkError` (HTTP 502), so the broker
retries later; the cached half is held out of the cache while its explanation runs (left in, the
oldest entry, it went first for room) and put back unless the explanation is delivered, and
nothing is replied before every instance is explained. A request whose payload cannot be read raises
`RejectedError` (HTTP 400): retrying cannot help. One that outlasts `explain_timeout` is retried
(502), as a predictor's 500 is: a time out may have been spent waiting for busy workers or a
stalled predictor, which pass, and telling those from rows too many to explain in time took more
than it was worth; a sender's retry policy bounds it (the broker dead-letters it), and
`max_instances` refuses the too many up front. Events explained together fail alone: when their
merged call fails, each is explained again on its own, so one event's bad rows fail that one only.
A caller cancelled while its exchange is explained (the broker's attempt timed out, in process)
leaves the explanation running: the retried completing half joins it, or gets it once done.

The join cache is in memory: the halves waiting in it for their other half (answered 202, so not
delivered again) are lost when the subscriber stops; `aclose` counts them (`cache.stopped`) and
logs how many.

The subscriber is a broker `Replier` (`handle(event) -> reply | None`), a `Sink` whose
explanations go to `reply_to`, and the `POST /events` endpoint's core (`handle_http`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import Field, ValidationInfo, field_validator

from explainers import codecs
from explainers.base import Explanation
from explainers.config import ExplainerSettings, SubscriberSettings, load_explainer_settings
from explainers.errors import (
    ExplainerError,
    InvalidInputError,
    InvalidParametersError,
    NotReadyError,
    PredictorUnavailableError,
)
from explainers.service import ExplainerService
from infer_logger import binary_tensors, events
from infer_logger.cloudevents import http as ce_http
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.config import read_yaml
from infer_logger.errors import InvalidEventError, RejectedError, SinkError
from infer_logger.fields import NamedFile
from infer_logger.sinks.base import Sink, SinkConfig
from infer_logger.sinks.halving import Halving

log = logging.getLogger(__name__)
# Every attribute the audit record shares between an exchange's events: a sink's index or topic
# made of one missing (an Elasticsearch `index` with `{component}`) put the explanation elsewhere.
# And the Kafka binding's partition key: the explanation goes where its exchange's records went.
_COPIED = (*events.SHARED_FIELDS.values(), "partitionkey")


def _weight(event: CloudEvent) -> int:
    """What an event holds in memory, about: its data and attributes (as the broker weighs one)."""
    return len(event.data or b"") + sum(len(k) + len(str(v)) for k, v in event.attributes.items())


class EventCache:
    """Events by (id, type), at most `size` of them and `max_bytes` of their data and attributes,
    each for `ttl` seconds. One dropped before its other half came (for room, or expired) leaves
    its exchange unexplained: counted, and logged at most once a minute with the counts since."""

    def __init__(self, size: int, ttl: float, max_bytes: int = 256 << 20) -> None:
        self.size, self.ttl, self.max_bytes = size, ttl, max_bytes
        self.evicted = 0
        self.expired = 0
        self.stopped = 0  # dropped as the subscriber stopped (`close`)
        self.bytes = 0
        """The cached events' weight (`_weight`)."""
        self._items: OrderedDict[tuple[str, str], tuple[float, CloudEvent, int]] = OrderedDict()
        self._reported = (0, 0)  # (evicted, expired) as last logged
        self._next_report = 0.0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple[str, str]) -> CloudEvent | None:
        item = self._items.get(key)
        if item is None or item[0] < time.monotonic():
            return None
        return item[1]

    def take(self, key: tuple[str, str]) -> CloudEvent | None:
        """`get`, and out of the cache: an exchange being explained is no candidate for eviction.
        An expired one is counted so, as `sweep` would have (its other half came too late)."""
        item = self._items.pop(key, None)
        if item is None:
            return None
        self.bytes -= item[2]
        if item[0] < time.monotonic():
            self.expired += 1
            return None
        return item[1]

    def put(self, key: tuple[str, str], event: CloudEvent) -> None:
        now = self.sweep()
        self.pop(key)
        weight = _weight(event)
        self._items[key] = (now + self.ttl, event, weight)
        self.bytes += weight
        while self._items and (len(self._items) > self.size or self.bytes > self.max_bytes):
            self.bytes -= self._items.popitem(last=False)[1][2]
            self.evicted += 1
        if (self.evicted, self.expired) != self._reported and now >= self._next_report:
            self._report(now)

    def sweep(self) -> float:
        """Drop (and count) the expired events; also when no event comes (`/metrics` asks). Returns now."""
        now = time.monotonic()
        while self._items and next(iter(self._items.values()))[0] < now:
            self.bytes -= self._items.popitem(last=False)[1][2]  # insertion order is expiry order
            self.expired += 1
        if self.expired != self._reported[1] and now >= self._next_report:
            self._report(now)
        return now

    def _report(self, now: float) -> None:
        evicted, expired = self.evicted - self._reported[0], self.expired - self._reported[1]
        log.warning("explain-on-event: %d event(s) dropped for room (cache_size %d, cache_bytes %d) and %d "
                    "expired (cache_ttl %gs) before their other half came; those exchanges are not explained",
                    evicted, self.size, self.max_bytes, expired, self.ttl)
        self._reported, self._next_report = (self.evicted, self.expired), now + 60.0

    def pop(self, key: tuple[str, str]) -> None:
        if (item := self._items.pop(key, None)) is not None:
            self.bytes -= item[2]

    def close(self) -> int:
        """Drop the events still waiting (the subscriber stops), counted in `stopped`: how many."""
        self.sweep()  # the expired ones count as such
        dropped = len(self._items)
        self._items.clear()
        self.bytes = 0
        self.stopped += dropped
        return dropped


class _Settled:
    """Ids whose exchange is done (explained and delivered, or failed), each for `ttl` seconds, at
    most `size` of them and `max_bytes` of their explanations: the halves delivered again are not
    explained again nor cached as first halves that never complete. The explanation is kept with
    its id: the broker's timed-out attempt, or a reply it could not store, sends the completing half
    again, and only an answer with the explanation delivers it (re-sending is safe: sinks overwrite
    by id)."""

    def __init__(self, size: int, ttl: float, max_bytes: int = 256 << 20) -> None:
        self.size, self.ttl, self.max_bytes = size, ttl, max_bytes
        self.bytes = 0
        # id -> (expiry, the explanation event or why it was refused, the type of the half it answered, weight)
        self._ids: OrderedDict[str, tuple[float, CloudEvent | str | None, str | None, int]] = OrderedDict()

    def add(self, event_id: str, reply: CloudEvent | str | None = None, answered: str | None = None) -> None:
        """`reply`: the explanation, or the reason the completing half was refused (its copy is
        refused again: answered 202, the broker took the copy of a refusal it never got as done)."""
        now = time.monotonic()
        while self._ids and next(iter(self._ids.values()))[0] < now:
            self.bytes -= self._ids.popitem(last=False)[1][3]
        if (old := self._ids.pop(event_id, None)) is not None:
            self.bytes -= old[3]
        weight = len(event_id) + (_weight(reply) if isinstance(reply, CloudEvent) else len(reply or ""))
        self._ids[event_id] = (now + self.ttl, reply, answered, weight)
        self.bytes += weight
        while self._ids and (len(self._ids) > self.size or self.bytes > self.max_bytes):
            self.bytes -= self._ids.popitem(last=False)[1][3]

    def __contains__(self, event_id: object) -> bool:
        item = self._ids.get(event_id)  # type: ignore[call-overload]
        return item is not None and item[0] >= time.monotonic()

    def reply(self, event: CloudEvent) -> CloudEvent | str | None:
        """The explanation `event` was answered with (or why it was refused), if it is the half that
        completed its exchange."""
        item = self._ids.get(event.id)
        if item is None or item[0] < time.monotonic() or item[2] != event.type:
            return None
        return item[1]


_Result = tuple[CloudEvent | None, CloudEvent | None]
"""An explanation event (or None), and the cached half it was made with, until it is delivered."""


class _Run:
    """An exchange being explained, shielded from its callers: one cancelled (the broker's attempt
    timed out, in process) leaves it running for the retried delivery, which would else start
    afresh and time out again, for good."""

    def __init__(self, task: asyncio.Task[_Result], completing: CloudEvent) -> None:
        self.task, self.completing = task, completing
        self.takers = 0
        """Callers waiting to deliver its result: none left when it ends, it is kept for a retry."""
        self.again = True
        """The last taker's `again`: whether a retry can be answered with the kept result."""
        self.kept = False


_NOT_THE_ROWS = (PredictorUnavailableError, NotReadyError)
"""Failures of a merged call that are the predictor's or the explainer's state: each event alone fails alike."""


class _Batcher:
    """Instances of concurrent events explained in one call (up to `size` rows, after `linger` s)."""

    def __init__(self, service: ExplainerService, size: int, linger: float) -> None:
        self.service, self.size, self.linger = service, size, linger
        self._pending: list[tuple[np.ndarray, asyncio.Future[Explanation]]] = []
        self._rows = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def explain(self, rows: np.ndarray) -> Explanation:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Explanation] = loop.create_future()
        self._pending.append((rows, future))
        self._rows += len(rows)
        if self._rows >= self.size:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.linger, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        group, self._pending, self._rows = self._pending, [], 0
        if group:
            task = asyncio.get_running_loop().create_task(self._run(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, group: list[tuple[np.ndarray, asyncio.Future[Explanation]]]) -> None:
        try:
            explanation = await self.service.explain(np.concatenate([rows for rows, _ in group]))
        except Exception as exc:  # noqa: BLE001 - a lone event gets the failure, merged ones go alone
            if len(group) == 1 or isinstance(exc, _NOT_THE_ROWS):
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                return
            # Merged, one event's rows may have failed them all: refused (by the predictor, or a
            # local model's encoder: every event merged in was dead-lettered), crashing the
            # predictor's model (a 500, on every redelivery that came with it), or outlasting
            # explain_timeout (a retry merged them again, and timed out again, for good). Each
            # event alone, one after the other, gets its own outcome; once the predictor is found
            # down, the rest get that at once.
            for index, (rows, future) in enumerate(group):
                if future.done():  # its caller gave up
                    continue
                await self._run([(rows, future)])
                failure = None if future.cancelled() else future.exception()
                if isinstance(failure, _NOT_THE_ROWS):
                    for _, rest in group[index + 1:]:
                        if not rest.done():
                            rest.set_exception(failure)
                    return
            return
        start = 0
        for rows, future in group:
            part = explanation.instances[start:start + len(rows)]
            start += len(rows)
            if not future.done():
                future.set_result(Explanation(explanation.method, explanation.params, explanation.feature_names,
                                              part, explanation.output_names, explanation.library))


class ExplainSubscriber:
    def __init__(self, service: ExplainerService, settings: SubscriberSettings | None = None, *,
                 reply_to: Sink | None = None, owns_service: bool = False) -> None:
        self.service = service
        self.settings = s = settings or service.settings.subscriber
        self.reply_to = reply_to
        # Replies refused together (a batch POST answered 413 or 400) go in halves here:
        # a caller halving its own batch would hand the replies back in as its events.
        self._reply = None if reply_to is None else Halving(reply_to)
        self.cache = EventCache(s.cache_size, s.cache_ttl, int(s.cache_bytes))
        self._settled = _Settled(s.cache_size, s.cache_ttl, int(s.cache_bytes))
        self._running: dict[str, _Run] = {}
        """Exchanges being explained, by id: a copy of either half waits for them."""
        self.explained = 0
        """Explanation events made."""
        self.other_models = 0
        """Events of another model (their `modelname`), skipped."""
        named = service.settings
        self._models = {named.model_name, named.predictor_model or named.model_name}
        """This model's names: the explainer's, and the predictor's (which the sidecar logs)."""
        self._batcher = _Batcher(service, s.batch_size, s.linger)
        self._owns = owns_service
        self._starting: asyncio.Lock | None = None

    async def handle(self, event: CloudEvent) -> CloudEvent | None:
        """The explanation event once both halves of an exchange are here, else None."""
        try:
            reply, partner = await self._handle(event)
        except RejectedError as exc:
            self._refused([(event, str(exc))])
            raise
        self._delivered([(reply, partner)])
        return reply

    def _delivered(self, results: Sequence[_Result]) -> None:
        """`_handle`'s replies are delivered: their ids are settled (a copy of the cached half that
        came meanwhile goes)."""
        for reply, partner in results:
            if partner is not None:
                self.cache.pop((partner.id, partner.type))
                answered = events.RESPONSE if partner.type == events.REQUEST else events.REQUEST
                self._settled.add(partner.id, reply, answered)

    def _undelivered(self, results: Sequence[_Result]) -> None:
        """`_handle`'s replies are not delivered: the cached halves they used go back, for a retried
        delivery to find (unless a copy of the exchange delivered its explanation meanwhile)."""
        for _, partner in results:
            if partner is not None and partner.id not in self._settled:
                self.cache.put((partner.id, partner.type), partner)

    def _refused(self, completing: Sequence[tuple[CloudEvent, str]]) -> None:
        """Their exchanges' refusals (the completing halves, and why) reached the caller for good:
        the cached halves go. (Kept until then: a retry for another event's failure must be
        refused again, or the refusal is never dead-lettered and the retry caches the other half
        as a first one.)"""
        for event, why in completing:
            other = events.RESPONSE if event.type == events.REQUEST else events.REQUEST
            self.cache.pop((event.id, other))
            self._settled.add(event.id, why, event.type)

    async def _handle(self, event: CloudEvent, share: bool = False, again: bool = True) -> _Result:
        """`handle`'s reply, and the cached half it used, for the caller to settle (`_delivered`) or
        put back (`_undelivered`). A copy of an event whose exchange is being explained waits for
        it and gets nothing, or with `share`, when it copies the completing half, the same result
        (the other half was answered already: an explanation for its copy was a second one); a copy
        of the completing half no caller waits for any more (its attempt timed out) takes the
        result (`_take`)."""
        kind = event.type
        if kind not in (events.REQUEST, events.RESPONSE) or not self._sampled(event.id):
            return None, None
        model = event.get(events.MODELNAME)
        if model not in (None, "") and model not in self._models:
            # A trigger sending every model's events here: another model's exchange was explained
            # with this one, and the explanation joined to that model's record.
            self.other_models += 1
            log.debug("explain-on-event: event %s is of model %r, not %s: skipped", event.id, model,
                      " or ".join(sorted(self._models)))
            return None, None
        if event.id in self._settled:
            # A caller that answers gets the explanation (or refusal) again (its first answer may
            # be lost); a sink's `reply_to` took it already: a second would be a duplicate.
            reply = self._settled.reply(event) if again else None
            if isinstance(reply, str):
                raise RejectedError(reply, [event])
            return reply, None
        run = self._running.get(event.id)
        if run is not None:
            # A copy of the completing half takes the result when it is shared (HTTP), or when no
            # one else waits for it (a retry after the broker's attempt timed out).
            if kind == run.completing.type and (share or not run.takers):
                return await self._take(run, again)
            await asyncio.wait({run.task})
            return None, None
        other = events.RESPONSE if kind == events.REQUEST else events.REQUEST
        if kind == events.RESPONSE and _failed(event):
            # Also when the request is yet to come: it must not wait in the cache for nothing.
            self.cache.pop((event.id, other))
            self._settled.add(event.id)
            return None, None
        partner = self.cache.take((event.id, other))
        if partner is None:
            self.cache.put((event.id, kind), event)
            return None, None
        run = _Run(asyncio.ensure_future(self._complete(event, partner)), event)
        self._running[event.id] = run
        run.task.add_done_callback(lambda _: self._ended(run))
        return await self._take(run, again)

    async def _take(self, run: _Run, again: bool) -> _Result:
        """`run`'s result, for this caller to deliver. Cancelled, the explanation goes on (each of its
        calls bounded by explain_timeout): its result is kept for the retry if no other caller takes it."""
        run.takers += 1
        run.again = again
        try:
            return await asyncio.shield(run.task)
        except asyncio.CancelledError:
            run.takers -= 1
            if not run.takers and run.task.done():  # it ended as this caller was cancelled
                self._keep(run)
            raise

    def _ended(self, run: _Run) -> None:
        if self._running.get(run.completing.id) is run:
            del self._running[run.completing.id]
        if not run.takers:
            self._keep(run)

    def _keep(self, run: _Run) -> None:
        """An explanation no caller took (theirs timed out): as if delivered, for the retried
        completing half to get it (`_settled`); refused, refused again. A sink's retry does not
        answer with it (`again`): its cached half goes back, to be explained again."""
        if run.kept or run.task.cancelled():
            return
        run.kept = True
        exc = run.task.exception()
        if exc is None:
            (self._delivered if run.again else self._undelivered)([run.task.result()])
        elif isinstance(exc, RejectedError) and run.again:
            self._refused([(run.completing, str(exc))])
        # Any other failure put the cached half back (`_complete`): the retry explains it again.

    async def _complete(self, event: CloudEvent, partner: CloudEvent) -> _Result:
        """The explanation of the exchange `event` completes with the cached `partner`."""
        kind, other = event.type, partner.type
        request, response = (event, partner) if kind == events.REQUEST else (partner, event)
        try:
            explanation = await self._explain(request)
            reply = explanation_event(request, response, explanation, self.settings.source,
                                      int(self.settings.max_explanation_bytes))
        except BaseException:
            # Back for the retry; refused, the caller drops it and settles the id (`_refused`).
            self.cache.put((partner.id, other), partner)
            raise
        self.explained += 1
        return reply, partner

    async def _explain(self, request: CloudEvent) -> Explanation:
        try:
            await self._ensure_started()
        except ExplainerError as exc:  # the predictor, mostly (down, loading): started again on the retry
            raise SinkError(f"starting the explainer: {exc}") from exc
        try:
            if events.is_truncated(request):
                raise InvalidInputError("the request payload was truncated by the logger")
            rows = self.service.decode(_payload(request, self.service.max_values))
        except NotReadyError as exc:
            raise SinkError(str(exc), retry_after=1.0) from exc
        except Exception as exc:  # the same data fails alike on every retry: dead-letter it
            raise RejectedError(f"event {request.id}: {str(exc) or type(exc).__name__}", [request]) from exc
        try:
            return await self._batcher.explain(rows)
        except (InvalidInputError, InvalidParametersError) as exc:
            raise RejectedError(f"event {request.id}: {exc}", [request]) from exc
        except NotReadyError as exc:
            raise SinkError(str(exc), retry_after=1.0) from exc
        except ExplainerError as exc:  # the predictor (a 500 too: it may pass), or a timeout
            raise SinkError(f"event {request.id}: {exc}") from exc

    def _sampled(self, event_id: str) -> bool:
        rate = self.settings.sample
        if rate >= 1.0:
            return True
        digest = hashlib.blake2b(event_id.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64 < rate

    async def _ensure_started(self) -> None:
        if self.service.ready:
            return
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if not self.service.ready and self._owns:
                await self.service.start()

    # -- as a Sink -------------------------------------------------------------------------------

    async def send_batch(self, batch: Sequence[CloudEvent]) -> None:
        """Explain what a batch completes and send the explanations to `reply_to`."""
        if self._reply is None:
            raise RejectedError("an ExplainSubscriber used as a sink needs `reply_to`")
        results = await asyncio.gather(*(self._handle(e, again=False) for e in batch), return_exceptions=True)
        done = [r for r in results if not isinstance(r, BaseException)]
        replies = [reply for reply, _ in done if reply is not None]
        refused: list[tuple[CloudEvent, str]] = []  # the events refused for good, and why
        if replies:
            # When `reply_to` fails, the caller retries the batch (or the events named pending): the
            # cached halves must still be there for it (dropped before, the retry cached the events
            # as first halves: lost).
            try:
                await self._reply.send_batch(replies)
            except RejectedError as exc:
                refused += exc.refusals(replies)  # the caller dead-letters those explanations
            except SinkError as exc:
                # Those it took are delivered (explained and sent again on the retry: duplicates).
                # Its `pending` are explanations: the caller's are the events that made them, and
                # those that failed (a caller retrying only explanations lost the others).
                pending = exc.pending_among(replies)
                if pending is None:  # all of them
                    self._undelivered(done)
                    raise SinkError(str(exc), retry_after=exc.retry_after) from exc
                self._delivered([r for r in done if r[0] is None or id(r[0]) not in pending])
                self._undelivered([r for r in done if r[0] is not None and id(r[0]) in pending])
                mine = [e for e, r in zip(batch, results, strict=True)
                        if isinstance(r, BaseException) or (r[0] is not None and id(r[0]) in pending)]
                raise SinkError(str(exc), retry_after=exc.retry_after, pending=mine) from exc
        failures = [r for r in results if isinstance(r, BaseException)]
        retryable = [f for f in failures if not isinstance(f, RejectedError)]
        # A refused explanation's exchange stays unsettled, its cached half kept: a retry (for
        # others' failures, or a dead letter that could not be written) explains it again, and
        # it is refused again, never settled unwritten. Redelivered later: a second dead letter.
        gone = {e.id for e, _ in refused}
        self._undelivered([r for r in done if r[0] is not None and r[0].id in gone])
        self._delivered([r for r in done if r[0] is None or r[0].id not in gone])
        if retryable:
            raise SinkError(f"{len(retryable)} explanations failed: {retryable[0]}")
        self._refused([(e, str(r)) for e, r in zip(batch, results, strict=True) if isinstance(r, RejectedError)])
        refused += [(e, str(f)) for f in failures if isinstance(f, RejectedError) for e in f.events]
        if refused:
            raise RejectedError("; ".join(dict.fromkeys(why for _, why in refused)), [e for e, _ in refused],
                                reasons=[why for _, why in refused])

    async def aclose(self) -> None:
        runs = [run.task for run in self._running.values()]
        for task in runs:  # no caller waits for them any more
            task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)  # their cached halves back, counted as lost
        if dropped := self.cache.close():
            log.warning("explain-on-event: stopping with %d event(s) waiting in the join cache for their other "
                        "half, which a restart loses: those exchanges are not explained", dropped)
        if self._owns:
            await self.service.aclose()

    # -- as an HTTP endpoint (Knative's reply contract) --------------------------------------------

    async def handle_http(self, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body: 200 with the explanation (binary mode; a batch for a batch),
        202 with no body when nothing is explained yet, 400 for what no retry fixes, 502 to retry."""
        try:
            received = ce_http.from_http_many(headers, body)
        except (InvalidEventError, ValueError) as exc:
            return _error(400, f"not a CloudEvent: {exc}")
        results = await asyncio.gather(*(self._handle(e, share=True) for e in received), return_exceptions=True)
        done = [r for r in results if not isinstance(r, BaseException)]
        if errors := [r for r in results if isinstance(r, BaseException)]:
            # The whole delivery fails, so the explanations made for the other events in it are not
            # delivered: their cached halves go back, for the broker's retry (or a replay of its dead
            # letter) to find. Dropping them lost those explanations for good.
            self._undelivered(done)
            retry = next((e for e in errors if not isinstance(e, RejectedError)), None)
            if retry is not None:
                if not isinstance(retry, SinkError):
                    log.exception("explaining an event failed", exc_info=retry)
                return _error(502 if isinstance(retry, SinkError) else 500, str(retry))
            self._refused([(e, str(r)) for e, r in zip(received, results, strict=True)
                           if isinstance(r, RejectedError)])
            return _error(400, str(errors[0]))
        self._delivered(done)  # answered in this response: delivered as far as this server goes
        # A batch holding an event twice shares one explanation: answered once.
        replies = list({reply.id: reply for reply, _ in done if reply is not None}.values())
        if not replies:
            return 202, {}, b""
        if len(replies) == 1 and len(received) == 1:
            out, data = ce_http.to_binary(replies[0])
            return 200, out, data
        out, data = ce_http.to_batch(replies)
        return 200, out, data


def explanation_event(request: CloudEvent, response: CloudEvent, explanation: Explanation, source: str,
                      max_bytes: int | None = None) -> CloudEvent:
    """The explanation event of an exchange; its data at most `max_bytes` (`_top_k`), else RejectedError."""
    attributes: dict[str, Any] = {
        "specversion": "1.0", "id": request.id, "source": source, "type": events.EXPLANATION,
        "time": events.now_rfc3339(), "datacontenttype": "application/json",
    }
    for name in _COPIED:
        value = response.get(name) or request.get(name)
        if value not in (None, ""):
            attributes[name] = value
    # Namespace and service name the exchange in the store (and its index): both from one event,
    # so that mixed ones (a request naming only the namespace, its response only the service)
    # give no third exchange, joined with neither.
    keyed = (events.NAMESPACE, events.INFERENCESERVICENAME)
    named = next((e for e in (response, request) if any(e.get(n) not in (None, "") for n in keyed)), None)
    for name in keyed:
        value = named.get(name) if named is not None else None
        if value in (None, ""):
            attributes.pop(name, None)
        else:
            attributes[name] = value
    doc = explanation.to_dict()
    data = orjson.dumps(doc)
    if max_bytes is not None and len(data) > max_bytes:
        if (cut := _top_k(doc, max_bytes)) is None:
            # A broker refuses the reply (413), for good: the exchange is dead-lettered with why.
            raise RejectedError(f"event {request.id}: its explanation is {len(data)} bytes, over "
                                f"max_explanation_bytes ({max_bytes}) even with only the largest attribution "
                                f"of each output kept: not explained", [request])
        log.info("explain-on-event: the explanation of event %s is %d bytes, over max_explanation_bytes (%d): "
                 "only the %d largest attributions of each output are kept (params.top_k)",
                 request.id, len(data), max_bytes, cut[1])
        data = cut[0]
    # Not marked `truncated`: that says the bytes were cut, and readers (the store, Elasticsearch)
    # then keep them as base64, not the explanation's JSON; `params.top_k` says what was left out.
    return CloudEvent(attributes, data)


def _top_k(doc: dict[str, Any], max_bytes: int) -> tuple[bytes, int] | None:
    """`doc` (`Explanation.to_dict()`) with each output's attributions cut to its `k` largest in
    absolute value, for the largest `k` (the same for all) whose JSON is at most `max_bytes`, in
    `params` as `top_k`: that JSON and `k`. None if even k = 1 is over. Anchors are kept whole."""
    outputs = [(output, output["attributions"]) for item in doc["explanations"] for output in item.get("outputs", ())]
    # Each output's feature names, largest attribution first (a NaN, written null, last).
    ranked = [[name for name, _ in sorted(attributions.items(), key=lambda item: -_magnitude(item[1]))]
              for _, attributions in outputs]
    params = doc["params"]

    def encoded(k: int) -> bytes:
        doc["params"] = {**params, "top_k": k}
        for item in doc["explanations"]:
            item["params"] = doc["params"]
        for (output, attributions), names in zip(outputs, ranked, strict=True):
            kept = set(names[:k])  # in the features' order, as a whole explanation
            output["attributions"] = {name: value for name, value in attributions.items() if name in kept}
        return orjson.dumps(doc)

    # Bisection: `low` fits (0: none found yet), `high` does not (every attribution: the whole).
    low, high, best = 0, max(map(len, ranked), default=0), b""
    while high - low > 1:
        k = (low + high) // 2
        if len(data := encoded(k)) <= max_bytes:
            low, best = k, data
        else:
            high = k
    return (best, low) if low else None


def _magnitude(value: Any) -> float:
    try:
        magnitude = abs(float(value))
    except (TypeError, ValueError):
        return -1.0
    return magnitude if magnitude == magnitude else -1.0


def _failed(event: CloudEvent) -> bool:
    try:
        return int(event.get(events.STATUSCODE, 200)) >= 400
    except (TypeError, ValueError):
        return False


def _error(status: int, message: str) -> tuple[int, dict[str, str], bytes]:
    return status, {"content-type": "application/json"}, orjson.dumps({"error": message})


class ExplainerComponentConfig(SinkConfig):
    """The subscriber as an in-process broker component: `component: {type: explainer, config: ...}`.

    Register it with `pipelines.broker.register_component(ExplainerComponentConfig)`.
    """

    type: Literal["explainer"] = "explainer"
    config: NamedFile | None = None
    """An explainer YAML file (or `explainer:` section); `settings` override it."""
    settings: dict[str, Any] = Field(default_factory=dict, validate_default=True)

    @field_validator("config")
    @classmethod
    def _config_file(cls, config: str | None) -> str | None:
        if config:
            read_yaml(Path(config))  # ConfigError naming the file, under `config`
        return config

    @field_validator("settings")
    @classmethod
    def _explainer_settings(cls, settings: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # Checked with the component, not first in build(): `broker --check` said ok, and the start
        # failed (exit 1) blaming the trigger's line. The predictor is not asked until the start.
        # Only settings: they are passed as keywords, and `env`, `section`... are the loader's own.
        if unknown := sorted(set(settings) - set(ExplainerSettings.model_fields)):
            raise ValueError(f"unknown explainer setting {unknown[0]!r}")
        if "config" in info.data:  # else its own error is the one to say
            config = info.data["config"]
            load_explainer_settings(Path(config) if config else None, **settings)
        return settings

    def build(self) -> ExplainSubscriber:
        loaded = load_explainer_settings(Path(self.config) if self.config else None, **self.settings)
        # Started on the first event, in the broker's loop: fitting needs the predictor.
        return ExplainSubscriber(ExplainerService(loaded), owns_service=True)


def _payload(request: CloudEvent, max_values: int | None = None) -> Any:
    """The request's JSON; a V2 body with binary tensor data (as tritonclient sends by default)
    reads as the JSON it stands for. InvalidInputError when it is neither.

    Read as the explainer server reads a body: an integer past 64 bits is a float (as every
    feature becomes), and a binary tensor of more than `max_values` values is refused before
    it is unpacked."""
    data = request.data or b""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        not_json = exc
    else:  # a binary part of blanks only (INT8 10) is JSON's trailing whitespace
        return _binary(data, max_values) or doc if binary_tensors.carries_binary(doc) else doc
    doc = _binary(data, max_values)
    if doc is None:
        raise InvalidInputError(f"the request payload is not JSON: {not_json}")
    return doc


def _binary(data: bytes, max_values: int | None) -> dict[str, Any] | None:
    """A body with binary tensor data read by `codecs.decode_body` (as `/infer` reads one); None
    when it is not one."""
    if (found := binary_tensors.json_part(data)) is None:
        return None
    try:
        return codecs.decode_body(data, str(found[0]), max_values)
    except InvalidInputError as exc:  # its JSON part read: the tensors after it did not
        raise InvalidInputError(f"the request payload's binary tensor data does not read: {exc}") from None
