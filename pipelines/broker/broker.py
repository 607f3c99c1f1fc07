"""The broker: logs per broker name, triggers reading them, and the ASGI app in front.

    broker = Broker(settings)                # an ASGI app; the lifespan starts and stops it
    uvicorn.run(broker, port=9082)           # or pipelines.broker.server.serve(settings)

TTL (Knative's `knativebrokerttl`): an event that arrives without one gets `default_ttl`; one
that arrives with one (a reply, or an event some subscriber posted back) loses 1, and is
dropped when that reaches 0. A subscriber's reply carries the TTL of the event it answers, so
a reply loop ends after `default_ttl` deliveries.

Reload (SIGHUP when served by `serve`, or `await broker.reload()`): the trigger files are read
again; if any is invalid the error (file:line) is logged and the previous triggers keep
running. Unchanged triggers keep running untouched, changed ones go on from their checkpoint,
new ones start at the end of the log, removed ones are stopped and their checkpoint deleted;
a broker no longer declared has its log closed (404 from then on).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urljoin

from infer_logger.asgi import run_lifespan
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.documents import DocumentError, Location
from infer_logger.errors import ConfigError, InferLoggerError, InvalidEventError
from infer_logger.spool import DiskSpool, MemorySpool
from pipelines.broker.channel import (
    TTL,
    Channel,
    ChannelError,
    RefusedError,
    SpoolChannel,
    event_size,
    parse_ttl,
)
from pipelines.broker.components import Component, Components, component_config
from pipelines.broker.delivery import DeliverySpec, Destination, RetryPolicy
from pipelines.broker.dispatcher import TriggerDispatcher
from pipelines.broker.endpoints import BinaryHeaders, ComponentEndpoint, Endpoint, HttpEndpoint
from pipelines.broker.ingress import Ingress, Receive, Scope, Send
from pipelines.broker.metrics import BrokerMetrics
from pipelines.broker.settings import BrokerSettings
from pipelines.broker.transport import HttpClient
from pipelines.broker.trigger import Trigger, TriggerSet, load_trigger_files, load_triggers

log = logging.getLogger(__name__)

Key = tuple[str, str]
_SETTINGS = Location("settings", 1, 1)


class UnknownBrokerError(InferLoggerError, LookupError):
    """No broker of that namespace and name (ingress: 404)."""


async def _run_all(steps: Iterable[Coroutine[Any, Any, None]], what: str = "a trigger change") -> None:
    """Run the steps side by side, each to its end; then raise the first failure (the others logged)."""
    failures = [r for r in await asyncio.gather(*steps, return_exceptions=True) if isinstance(r, BaseException)]
    for failure in failures[1:]:
        log.error("%s failed too: %s: %s", what, type(failure).__name__, failure, exc_info=failure)
    if failures:
        raise failures[0]


class Broker:
    def __init__(
        self,
        settings: BrokerSettings | None = None,
        *,
        triggers: TriggerSet | Sequence[Trigger] | str | None = None,
        components: Mapping[str, Component] | None = None,
        reload_on_sighup: bool = False,
    ) -> None:
        """`triggers` (a TriggerSet, triggers, or YAML text) replaces the settings' trigger files;
        `components` adds live in-process subscribers by name (the caller closes them)."""
        self.settings = s = settings or BrokerSettings()
        self.metrics = BrokerMetrics()
        self.components = Components(s.component_configs(), components)
        if isinstance(triggers, str):
            triggers = load_triggers(triggers, namespace=s.namespace, broker=s.name)
        elif triggers is not None and not isinstance(triggers, TriggerSet):
            triggers = TriggerSet(list(triggers))
        self._given = triggers
        self.default_key: Key = (s.namespace, s.name)
        self.channels: dict[Key, Channel] = {}
        self._unsettled: set[Key] = set()  # channels opened whose triggers were not all attached yet
        self.triggers: dict[Key, Trigger] = {}
        self.dispatchers: dict[Key, TriggerDispatcher] = {}
        self._deliveries: dict[Key, DeliverySpec] = {}
        self._client: HttpClient | None = None
        self._binary = BinaryHeaders()
        self._accepted: dict[Key, Any] = {}
        self._lock = asyncio.Lock()
        self._reloading = asyncio.Lock()
        self._sighup = reload_on_sighup
        self._closing = False
        self.started = False
        self.app = Ingress(self)

    # -- lifecycle -------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await run_lifespan(receive, send, self.startup, self.shutdown)
        else:
            await self.app(scope, receive, send)

    async def startup(self) -> None:
        # A reply beyond an event's size is refused anyway, and of an error only its start is kept.
        self._client = HttpClient(max_response_bytes=2 * int(self.settings.max_event_bytes))
        await self._apply(self._load())
        if self._sighup:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        self.started = True

    async def shutdown(self) -> None:
        self.started = False
        self._closing = True  # a reload still reading its files applies nothing now
        if self._sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            # Stopping: a hangup neither reloads nor, as its default action, kills the drain. For the
            # rest of the process: `reload_on_sighup` is for a broker the process serves (`serve`).
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        timeout = self.settings.drain_timeout
        async with self._lock:  # after a reload being applied: its channels are closed too
            await asyncio.gather(*(channel.aclose(timeout) for channel in self.channels.values()))
            self.channels.clear()
        await self.components.aclose()
        if self._client is not None:
            await self._client.aclose()

    @property
    def ready(self) -> bool:
        return self.started and all(channel.ready for channel in self.channels.values())

    # -- events in -------------------------------------------------------------------------------

    async def publish(self, broker: Key | None, events: Sequence[CloudEvent]) -> int:
        """Put events into a broker's log (TTL rules applied); returns how many were taken.

        Raises UnknownBrokerError, InvalidEventError (a bad TTL) or ChannelError (not stored; its
        RefusedError: never storable, e.g. too large for Kafka). Their `pending` and `refused`
        are then the positions in `events` of those not stored (not of those the TTL rules dropped).
        """
        key = broker or self.default_key
        channel = self.channels.get(key)
        if channel is None:
            raise UnknownBrokerError(f"no broker {key[0]}/{key[1]}")
        if not channel.ready:  # its log is not open yet (Kafka not reached since the start): retried
            raise ChannelError(f"broker {key[0]}/{key[1]} is not ready: its log is not open yet",
                               pending=range(len(events)))
        admitted = []
        positions = []  # of each admitted event in `events`
        for i, event in enumerate(events):
            try:
                kept = self.admit(event)  # a bad TTL raises: the ingress counts the whole batch invalid
            except InvalidEventError as exc:
                exc.item = i  # its position in `events`
                raise
            if kept is not None:
                admitted.append(kept)
                positions.append(i)
        if expired := len(events) - len(admitted):  # counted once the batch passed: not twice
            self.metrics.refused.labels("ttl_expired").inc(expired)
        if not admitted:
            return 0
        try:
            await channel.append(admitted)
        except RefusedError as exc:  # its positions from here on are in `events`, and never None
            exc.refused = positions if exc.refused is None else [positions[i] for i in exc.refused]
            self._count_accepted(key, len(admitted) - len(exc.refused))
            raise
        except ChannelError as exc:
            exc.pending = positions if exc.pending is None else [positions[i] for i in exc.pending]
            self._count_accepted(key, len(admitted) - len(exc.pending))
            raise
        self._count_accepted(key, len(admitted))
        return len(admitted)

    def _count_accepted(self, key: Key, n: int) -> None:
        counter = self._accepted.get(key)
        if counter is None:
            counter = self._accepted[key] = self.metrics.accepted.labels(f"{key[0]}/{key[1]}")
        counter.inc(n)

    def admit(self, event: CloudEvent) -> CloudEvent | None:
        raw = event.attributes.get(TTL)
        if raw is None:
            return CloudEvent({**event.attributes, TTL: self.settings.default_ttl}, event.data, event.meta)
        ttl = parse_ttl(raw) - 1
        if ttl <= 0:
            log.debug("event %s dropped: its %s ran out", event.get("id"), TTL)
            return None
        return CloudEvent({**event.attributes, TTL: ttl}, event.data, event.meta)

    # -- triggers --------------------------------------------------------------------------------

    def _load(self) -> TriggerSet:
        if self._given is not None:
            return self._given
        return load_trigger_files(self.settings.trigger_files, self.settings.namespace, self.settings.name)

    async def reload(self) -> bool:
        """Read the trigger files again; on any error keep serving the current triggers.

        The files are read and checked on a thread: events keep flowing meanwhile, however
        large or slow the files. Reloads run one at a time, so the last one read is applied.
        """
        async with self._reloading:
            try:
                await self._apply(await asyncio.to_thread(self._load))
            except (ConfigError, ChannelError) as exc:
                self.metrics.reloads.labels("error").inc()
                log.error("trigger reload failed, the previous triggers keep running: %s", exc)
                return False
            except Exception:  # a bug: still no reason to stop serving (SIGHUP's task would hide it)
                self.metrics.reloads.labels("error").inc()
                log.exception("trigger reload failed unexpectedly, the previous triggers keep running")
                return False
        self.metrics.reloads.labels("ok").inc()
        log.info("triggers reloaded: %d triggers", len(self.triggers))
        return True

    async def _apply(self, new: TriggerSet) -> None:
        async with self._lock:
            try:
                await self._apply_locked(new)
            except BaseException:
                # A broker this change opened that the running triggers do not declare answered 202.
                in_use = {self.default_key, *self._deliveries, *(t.broker_key for t in self.triggers.values())}
                await self._close_channels(in_use)
                raise
            finally:  # also those a failed change built (`_switch` keeps `dispatchers` true)
                await self.components.prune(self._components_in_use())

    def _components_in_use(self) -> list[Component]:
        endpoints = [e for d in self.dispatchers.values() for e in (d.subscriber, d.dead_letter)]
        return [e.component for e in endpoints if isinstance(e, ComponentEndpoint)]

    async def _apply_locked(self, new: TriggerSet) -> None:
        if self._closing:
            raise ConfigError("triggers", "the broker is shutting down")
        s = self.settings
        declared: dict[Key, DeliverySpec | None] = {self.default_key: None}
        for decl in new.brokers:
            declared[(decl.namespace, decl.name)] = decl.delivery
        for trigger in new.triggers:
            declared.setdefault(trigger.broker_key, None)
        base = s.effective_delivery()
        deliveries = {key: base if spec is None else spec.over(base) for key, spec in declared.items()}
        wanted = {t.key: t for t in new.triggers}
        # Build everything first: a bad reference fails the whole change, nothing half-applied.
        dispatchers: dict[Key, TriggerDispatcher] = {}
        for key, trigger in wanted.items():
            old = self.triggers.get(key)
            same_broker = self._deliveries.get(trigger.broker_key) == deliveries[trigger.broker_key]
            if old is not None and old.fingerprint == trigger.fingerprint and same_broker:
                dispatchers[key] = self.dispatchers[key]
            else:
                dispatchers[key] = self._dispatcher(trigger, deliveries[trigger.broker_key])
        self._check_channels(deliveries, wanted)

        async def open_channel(key: Key) -> None:
            channel = self._open(key)
            try:
                await channel.start()
            except BaseException:
                await channel.aclose(0)
                raise
            self.channels[key] = channel
            self._unsettled.add(key)

        # Side by side: one after another, a Kafka not answering held the start (the port closed)
        # for its timeout once per broker.
        await _run_all((open_channel(key) for key in deliveries if key not in self.channels),
                       "opening a broker's log")
        if s.role != "ingress":
            await self._switch(wanted, dispatchers)
            for key in self._unsettled & self.channels.keys():  # also those a failed change opened
                self.channels[key].forget_detached()
            self._unsettled.clear()
        self.triggers, self.dispatchers, self._deliveries = wanted, dispatchers, deliveries
        # A broker no longer declared: its channel stayed, and its ingress answered 202 and kept
        # nothing. Its triggers are detached above (none can name it), so it is closed, 404 from
        # now on as after a restart; what its log holds stays on disk, as a restart leaves it.
        await self._close_channels(deliveries.keys())

    async def _close_channels(self, keep: Iterable[Key]) -> None:
        """Close the channel of every broker but those in `keep`; a failure only logged (the
        change, or its failure, is what the reload reports)."""
        keep = set(keep)
        for key in [key for key in self.channels if key not in keep]:
            channel = self.channels.pop(key)
            self._unsettled.discard(key)
            try:
                await channel.aclose(self.settings.drain_timeout)
            except Exception:
                log.exception("closing the log of broker %s/%s, no longer declared", *key)

    async def _switch(self, wanted: dict[Key, Trigger], dispatchers: dict[Key, TriggerDispatcher]) -> None:
        """Detach, attach and replace runners; `triggers` and `dispatchers` follow each step, so
        they say what the channels run also after a step failed (a prune judging by those of
        before closed a new runner's component; a reload back to them then replaced nothing).

        The steps of one phase run side by side: each waits for its own deliveries to drain (or
        for Kafka), and one after another a reload removing n triggers took n drains."""
        timeout = self.settings.drain_timeout

        async def detach(key: Key, current: Trigger) -> None:
            await self.channels[current.broker_key].detach(current.name, forget=True, timeout=timeout)
            del self.triggers[key]
            self.dispatchers.pop(key, None)
            with contextlib.suppress(KeyError):  # its last lag stayed on every scrape
                self.metrics.lag.remove(current.label)

        async def attach(key: Key, trigger: Trigger) -> None:
            channel = self.channels[trigger.broker_key]
            if key not in self.triggers:
                await channel.attach(trigger.name, dispatchers[key])
            elif dispatchers[key] is not self.dispatchers[key]:
                await channel.replace(trigger.name, dispatchers[key], timeout=timeout)
            self.triggers[key], self.dispatchers[key] = trigger, dispatchers[key]

        # Detached first: a trigger moved to another broker is attached there once gone here.
        await _run_all(detach(key, current) for key, current in list(self.triggers.items())
                    if (replacement := wanted.get(key)) is None or replacement.broker_key != current.broker_key)
        await _run_all(attach(key, trigger) for key, trigger in wanted.items())

    def _check_channels(self, keys: Iterable[Key], triggers: Iterable[Key]) -> None:
        """ConfigError for a broker whose channel could not exist (a Kafka topic name too long), or
        two brokers (two triggers) whose Kafka topics (consumer groups) would be one: names join
        with `-`, which they may hold, so broker a-b/c and a/b-c delivered each other's events."""
        if self.settings.channel != "kafka":
            return
        kafka = self.settings.kafka
        for what, names in (("brokers", {key: kafka.topic(*key) for key in keys}),
                            ("triggers", {key: kafka.group(*key) for key in triggers})):
            seen: dict[str, Key] = {}
            for key, name in names.items():
                other = seen.setdefault(name, key)
                if other != key:
                    kind = "topic" if what == "brokers" else "consumer group"
                    raise ConfigError(what, f"{'/'.join(other)} and {'/'.join(key)} would share the Kafka {kind} "
                                      f"{name!r}: rename one")

    def _open(self, key: Key) -> Channel:
        s = self.settings
        if s.channel == "kafka":
            from pipelines.broker.kafka_channel import KafkaChannel  # needs confluent-kafka

            return KafkaChannel(s.kafka, *key, batch_size=s.batch_size, parallelism=s.parallelism)
        spool: DiskSpool | MemorySpool
        if s.channel == "memory":
            spool = MemorySpool(max_events=s.spool.memory_max_events, max_bytes=int(s.spool.max_bytes),
                                overflow=s.spool.overflow)
        else:
            spool = DiskSpool(s.dir / key[0] / key[1], segment_bytes=int(s.spool.segment_bytes),
                              max_bytes=int(s.spool.max_bytes), overflow=s.spool.overflow,
                              fsync_interval=s.spool.fsync_interval)
        return SpoolChannel(spool, batch_size=s.batch_size, parallelism=s.parallelism)

    def check(self) -> int:
        """Validate the triggers and what they reference, starting nothing; returns their number."""
        new = self._load()
        deliveries = {(d.namespace, d.name): d.delivery for d in new.brokers}
        self._check_channels([self.default_key, *deliveries, *(t.broker_key for t in new.triggers)],
                             [t.key for t in new.triggers])
        base = self.settings.effective_delivery()
        for trigger in new.triggers:
            own = deliveries.get(trigger.broker_key)
            self._spec_endpoints(trigger, base if own is None else own.over(base), build=False)
        return len(new.triggers)

    def _dispatcher(self, trigger: Trigger, broker_delivery: DeliverySpec) -> TriggerDispatcher:
        spec, subscriber, dead_letter = self._spec_endpoints(trigger, broker_delivery, build=True)
        assert subscriber is not None

        async def reenter(event: CloudEvent) -> int:
            maximum = int(self.settings.max_event_bytes)
            # As the ingress weighs a sender's event, attributes too, before the TTL is stamped.
            ttl = event.attributes.get(TTL)
            if event_size(event) - (0 if ttl is None else len(TTL) + len(str(ttl))) > maximum:
                raise RefusedError(f"the reply is larger than {maximum} bytes (max_event_bytes)", too_large=True)
            return await self.publish(trigger.broker_key, [event])

        return TriggerDispatcher(trigger, subscriber, dead_letter, RetryPolicy.from_spec(spec), reenter, self.metrics)

    def _spec_endpoints(self, trigger: Trigger, broker_delivery: DeliverySpec, *,
                        build: bool) -> tuple[DeliverySpec, Endpoint | None, Endpoint | None]:
        spec = trigger.delivery.over(broker_delivery) if trigger.delivery else broker_delivery
        structured = spec.format == "json"
        subscriber = self._endpoint(trigger.subscriber, trigger.subscriber_location, "subscriber", structured,
                                    build=build)
        dead_letter = None
        if spec.dead_letter_sink is not None:
            own = trigger.delivery is not None and trigger.delivery.dead_letter_sink is not None
            where = trigger.dead_letter_location if own else _SETTINGS
            dead_letter = self._endpoint(spec.dead_letter_sink, where, "delivery.deadLetterSink", structured,
                                         build=build)
        return spec, subscriber, dead_letter

    def _endpoint(self, destination: Destination, where: Location, field: str, structured: bool, *,
                  build: bool) -> Endpoint | None:
        """The endpoint a destination names (None when only checking); DocumentError if none."""
        if destination.component is not None:
            try:
                if not build:
                    component_config(destination.component)
                    return None
                component = self.components.by_config(destination.component)
            except (ValueError, InferLoggerError) as exc:
                raise DocumentError(where, f"{field}.component", str(exc)) from None
            return ComponentEndpoint(str(destination.component["type"]), component)
        if destination.ref is not None:
            name = destination.ref.name
            address = self.settings.addresses.get(name)
            if address is not None:
                return self._http(urljoin(address, destination.uri or ""), structured)
            if not self.components.knows(name):
                known = ", ".join(sorted({*self.settings.addresses, *self.components.declared})) or "none"
                raise DocumentError(where, f"{field}.ref.name",
                                    f"no component or address named {name!r} (declared: {known}); give a uri")
            if destination.uri is not None:
                raise DocumentError(where, f"{field}.uri", f"{name!r} is an in-process component: it has no URL")
            if not build:
                return None
            try:
                return ComponentEndpoint(name, self.components.by_name(name))
            except (ValueError, InferLoggerError) as exc:
                raise DocumentError(where, f"{field}.ref", f"component {name!r}: {exc}") from None
        assert destination.uri is not None  # a Destination has one of the three
        return self._http(destination.uri, structured)

    def _http(self, url: str, structured: bool) -> HttpEndpoint:
        def client() -> HttpClient:
            assert self._client is not None, "the broker delivers only between startup and shutdown"
            return self._client

        return HttpEndpoint(url, client, structured=structured, binary=self._binary)
