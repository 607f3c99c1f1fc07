"""The http sink against a real receiver: content modes, retry classification, refusals."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from infer_logger.cloudevents import http as ce_http
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.dispatch import Backoff, Dispatcher
from infer_logger.errors import RejectedError, SinkError
from infer_logger.events import REQUEST, RESPONSE
from infer_logger.metrics import Metrics
from infer_logger.sinks.halving import Halving
from infer_logger.sinks.http import HttpSinkConfig
from infer_logger.spool import DiskSpool
from infer_logger.testing import EventCollector, free_port
from tests.servers import Scripted


def events(n: int) -> list[CloudEvent]:
    return [
        CloudEvent({"specversion": "1.0", "id": f"e{i}", "source": "/s", "type": "t",
                    "datacontenttype": "application/json", "statuscode": 200}, b'{"x": %d}' % i)
        for i in range(n)
    ]


def padded(n: int, pad: int, big: dict[int, int]) -> list[CloudEvent]:
    """`n` events with about `pad` bytes of data each (those in `big`: as many as it says)."""
    return [
        CloudEvent({"specversion": "1.0", "id": f"e{i}", "source": "/s", "type": "t",
                    "datacontenttype": "application/json"}, b'{"pad": "%s"}' % (b"p" * big.get(i, pad)))
        for i in range(n)
    ]


@pytest.mark.parametrize("mode", ["binary", "structured", "batch"])
async def test_modes_round_trip(mode: str) -> None:
    with EventCollector() as receiver:
        sink = HttpSinkConfig(url=receiver.url, mode=mode).build()
        await sink.send_batch(events(5))
        await sink.aclose()
        got = receiver.wait_for(5)
    assert sorted(e.id for e in got) == [f"e{i}" for i in range(5)]
    assert {e.json()["x"] for e in got} == set(range(5))
    assert all(e.datacontenttype == "application/json" for e in got)


@pytest.mark.parametrize(("status", "error"), [(500, SinkError), (503, SinkError), (429, SinkError),
                                               (404, SinkError), (408, SinkError), (400, RejectedError),
                                               (413, RejectedError)])
@pytest.mark.parametrize("mode", ["binary", "batch"])
async def test_status_classification(status: int, error: type[Exception], mode: str) -> None:
    with EventCollector() as receiver:
        receiver.fail_with = status
        sink = HttpSinkConfig(url=receiver.url, mode=mode).build()
        with pytest.raises(error) as info:
            await sink.send_batch(events(3))
        await sink.aclose()
    assert type(info.value) is error
    if error is RejectedError:
        assert len(info.value.events) == 3
        assert info.value.too_large is (status == 413)


async def through_a_worker(tmp_path: Path, receiver: EventCollector, config: HttpSinkConfig,
                           batch: list[CloudEvent]) -> list[dict]:
    """Spool `batch`, let a sink worker deliver it (batches of 50) until each event is taken or
    dead-lettered; the dead-letter records. The checkpoint must be past all of it."""
    spool = DiskSpool(tmp_path / "spool")
    d = Dispatcher(spool, {"http": config.build()}, Metrics(spool), batch_size=50,
                   backoff=Backoff(0.001, 0.01), deadletter_dir=tmp_path / "dead")
    for e in batch:
        spool.append(e)
    d.start()
    for _ in range(1000):
        if spool.stats.dropped["rejected"] + len(receiver.events) >= len(batch):
            break
        await asyncio.sleep(0.01)
    await d.stop()
    assert d.workers[0].reader.read(100)[0] == [] and spool.stats.dropped["rejected"] == len(
        (tmp_path / "dead" / "http.jsonl").read_bytes().splitlines())
    spool.close()
    return [orjson.loads(line) for line in (tmp_path / "dead" / "http.jsonl").read_bytes().splitlines()]


async def test_a_retry_sends_only_what_the_receiver_did_not_take(tmp_path: Path) -> None:
    """One 503 among a batch's POSTs had the worker send the whole batch again, the events already
    taken included: a receiver failing now and then got duplicates on every retry."""
    from tests.pipelines.broker.helpers import Subscriber

    answered: dict[str, int] = {}

    def flaky(event: CloudEvent | None, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        assert event is not None
        answered[event.id] = answered.get(event.id, 0) + 1
        return (503 if int(event.id[1:]) % 3 == 0 and answered[event.id] <= 2 else 202), {}, b""

    with Subscriber() as receiver:
        receiver.answer = flaky
        spool = DiskSpool(tmp_path / "spool")
        config = HttpSinkConfig(url=receiver.url, mode="binary")
        d = Dispatcher(spool, {"http": config.build()}, Metrics(spool), batch_size=50, backoff=Backoff(0.001, 0.01))
        for e in events(12):
            spool.append(e)
        d.start()
        for _ in range(1000):
            if d.workers[0].reader.read(100)[0] == []:
                break
            await asyncio.sleep(0.01)
        await d.stop()
        spool.close()
    assert sorted(e.id for e in receiver.events) == sorted(f"e{i}" for i in range(12))  # each taken once


async def test_a_failed_batch_post_names_what_was_not_taken() -> None:
    """Batch mode: the POSTs before a failure were taken; only that one and the rest are pending."""
    posts = []

    def second_fails(request: bytes) -> bytes:
        posts.append(request)
        status = b"503 Service Unavailable" if len(posts) == 2 else b"202 Accepted"
        return b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\n\r\n"

    batch = padded(9, 300, {})
    async with Scripted(second_fails) as url:
        sink = HttpSinkConfig(url=url + "/", mode="batch", max_batch_bytes=1000).build()
        with pytest.raises(SinkError) as info:
            await sink.send_batch(batch)
        await sink.aclose()
    first = orjson.loads(posts[0].partition(b"\r\n\r\n")[2])
    assert 0 < len(first) < 9 and info.value.pending == batch[len(first):]


async def test_a_batch_answered_413_goes_again_in_smaller_batches(tmp_path: Path) -> None:
    """A receiver's request limit (our broker's: 16 MiB a batch, 1 MiB an event) refused the
    batch POST with 413 and the worker dead-lettered every event of it, though each fitted."""
    with EventCollector() as receiver:
        receiver.max_body = 40_000
        dead = await through_a_worker(tmp_path, receiver, HttpSinkConfig(url=receiver.url, mode="batch"),
                                      padded(60, 2000, {25: 50_000}))
    assert [e.id for e in receiver.events] == [f"e{i}" for i in range(60) if i != 25]  # in order, once each
    assert [d["attributes"]["id"] for d in dead] == ["e25"] and "413" in dead[0]["reason"]



async def test_a_413_lowers_the_post_size_for_later_batches() -> None:
    """Each batch paid the 413s again (an 8 MiB POST refused, then its halves...) behind a
    receiver with a lower limit: the sink keeps to half a refused POST's size from then on."""
    with EventCollector() as receiver:
        receiver.max_body = 40_000
        http = HttpSinkConfig(url=receiver.url, mode="batch").build()
        sink = Halving(http)
        await sink.send_batch(padded(60, 2000, {}))
        learned, before = http._batch_bytes(), receiver.attempts
        second = padded(60, 2000, {})
        await sink.send_batch(second)
        await sink.aclose()
        assert learned <= 40_000 and len(receiver.events) == 120
        assert receiver.attempts - before == len(list(ce_http.to_batches(second, learned)))  # no 413 among them

async def test_a_batch_past_max_batch_bytes_goes_in_several_posts() -> None:
    """Each POST within the cap, in order; an event larger than the cap goes alone."""
    with EventCollector() as receiver:
        receiver.max_body = 10_000
        sink = HttpSinkConfig(url=receiver.url, mode="batch", max_batch_bytes=10_000).build()
        await sink.send_batch(padded(30, 2000, {}))  # a POST past the cap would be a 413
        await sink.aclose()
        assert [e.id for e in receiver.events] == [f"e{i}" for i in range(30)] and receiver.attempts > 1
        receiver.events.clear()
        receiver.max_body, before = None, receiver.attempts
        sink = HttpSinkConfig(url=receiver.url, mode="batch", max_batch_bytes=10_000).build()
        await sink.send_batch(padded(6, 2000, {3: 30_000}))
        await sink.aclose()
        assert [e.id for e in receiver.events] == [f"e{i}" for i in range(6)]
        assert receiver.attempts - before == 3  # e0-e2, e3 alone, e4-e5


async def test_posts_refused_for_size_and_for_content_leave_only_those_events_dead(tmp_path: Path) -> None:
    """One POST answered 400 (an event the receiver finds invalid), a later one 413: the good
    events of both are delivered once, in spool order (the first's went after the POSTs between,
    where `in_flight: 1` promises order), the two bad ones dead-lettered each with its own reason."""
    batch = padded(20, 2000, {12: 30_000})
    batch[3] = CloudEvent({**batch[3].attributes, "time": "yesterday"}, batch[3].data)
    with EventCollector() as receiver:
        receiver.max_body = 20_000
        config = HttpSinkConfig(url=receiver.url, mode="batch", max_batch_bytes=10_000)
        dead = await through_a_worker(tmp_path, receiver, config, batch)
    assert [e.id for e in receiver.events] == [f"e{i}" for i in range(20) if i not in (3, 12)]
    # "with": a bare "400" was also in the receiver's port (127.0.0.1:40059) now and then.
    assert [(d["attributes"]["id"], "with 400" in d["reason"], "with 413" in d["reason"]) for d in dead] == [
        ("e3", True, False), ("e12", False, True)]



async def test_a_batch_post_answered_400_for_one_bad_event_leaves_only_it_dead(tmp_path: Path) -> None:
    """A receiver refusing a batch POST for one event it finds invalid: every event of the POST
    was dead-lettered; the halves find the bad one."""
    batch = padded(20, 200, {})
    batch[13] = CloudEvent({**batch[13].attributes, "time": "yesterday"}, batch[13].data)
    with EventCollector() as receiver:
        dead = await through_a_worker(tmp_path, receiver, HttpSinkConfig(url=receiver.url, mode="batch"), batch)
    assert [e.id for e in receiver.events] == [f"e{i}" for i in range(20) if i != 13]
    assert [d["attributes"]["id"] for d in dead] == ["e13"] and "with 400" in dead[0]["reason"]


@pytest.mark.parametrize("mode", ["binary", "batch"])
@pytest.mark.parametrize("status", [b"301 Moved Permanently", b"302 Found", b"307 Temporary Redirect",
                                    b"308 Permanent Redirect"])
async def test_a_redirect_keeps_the_events_to_send_again(mode: str, status: bytes) -> None:
    """Any 3xx dead-lettered the events, as if refused for good (an ingress moving http to https
    during a rollout dead-lettered the spool): not followed, it is retried, saying where to."""
    redirect = (b"HTTP/1.1 " + status + b"\r\nlocation: https://elsewhere.example/events\r\n"
                b"content-length: 0\r\n\r\n")
    async with Scripted(lambda _: redirect) as url:
        sink = HttpSinkConfig(url=url + "/", mode=mode).build()  # type: ignore[arg-type]
        batch = padded(3, 10, {})
        with pytest.raises(SinkError) as info:
            await sink.send_batch(batch)
        await sink.aclose()
    assert type(info.value) is SinkError and "https://elsewhere.example/events" in str(info.value)
    assert info.value.pending in (None, batch) or [e.id for e in info.value.pending] == [e.id for e in batch]


def _answering(answers: dict[int, tuple[bytes, dict[str, object]]], posts: list[list[str]],
               marked: bool = True):  # noqa: ANN202
    """A receiver answering the n-th batch POST (from 1) as `answers` says (`marked`: with the
    header saying that its JSON names events by position), others 202; the ids of each POST's
    events go to `posts`."""
    marker = b"infer-logger-positions: 1\r\n" if marked else b""

    def reply(request: bytes) -> bytes:
        posts.append([e["id"] for e in orjson.loads(request.partition(b"\r\n\r\n")[2])])
        status, body = answers.get(len(posts), (b"202 Accepted", {}))
        out = orjson.dumps(body) if body else b""
        return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n" + marker
                + b"content-length: %d\r\n\r\n" % len(out) + out)
    return reply


async def _send_to(answers: dict[int, tuple[bytes, object]], batch: list[CloudEvent], error: type[Exception],
                   *, halving: bool = True, marked: bool = True, **config: object) -> tuple[Exception, list[list[str]]]:
    """The error a batch sent (through `Halving`) to an `_answering` receiver raises, and its POSTs."""
    posts: list[list[str]] = []
    async with Scripted(_answering(answers, posts, marked)) as url:  # type: ignore[arg-type]
        http = HttpSinkConfig(url=url + "/", mode="batch", **config).build()  # type: ignore[arg-type]
        sink = Halving(http) if halving else http
        with pytest.raises(error) as info:
            await sink.send_batch(batch)
        await sink.aclose()
    return info.value, posts


async def test_events_after_a_refusal_of_any_batch_then_one_of_a_bad_event_are_still_sent() -> None:
    """A 403 (refusing any batch) then a 400 (one bad event): the 400 stopped there, the rest
    refused with them not together (no halves), so events never POSTed were dead-lettered."""
    batch = padded(8, 100, {})
    answers = {1: (b"403 Forbidden", {}), 2: (b"400 Bad Request", {})}
    rejected, posts = await _send_to(answers, batch, RejectedError, halving=False, marked=False, max_batch_bytes=400)
    assert isinstance(rejected, RejectedError) and not rejected.together
    assert sum(posts, []) == [e.id for e in batch]  # each POSTed once
    assert [e.id for e in rejected.events] == [*posts[0], *posts[1]]


async def test_a_batch_post_the_receiver_took_in_part_is_not_sent_again_whole() -> None:
    """Our broker, its Kafka log refusing one event of a batch POST for good (or failing part
    way), stored the others: answered 413 (or 503) for the whole POST, the sink sent it again
    in halves (or whole) and each stored event arrived twice. It names the refused (pending) ones."""
    batch = padded(9, 300, {})
    refused = {1: (b"413 Payload Too Large", {"error": "too large", "refused": [1]})}
    rejected, posts = await _send_to(refused, batch, RejectedError, max_batch_bytes=1000)
    first = len(posts[0])
    assert isinstance(rejected, RejectedError)
    assert rejected.events == [batch[1]] and rejected.too_large and not rejected.together
    assert sum(posts, []) == [e.id for e in batch]  # each once: no halves, later POSTs still sent

    failing = {2: (b"503 Service Unavailable", {"error": "down", "pending": [1]})}
    failed, posts = await _send_to(failing, batch, SinkError, max_batch_bytes=1000)
    second = posts[1]
    assert len(second) > 1 and len(posts) == 2 and isinstance(failed, SinkError)
    assert [e.id for e in failed.pending] == [second[1], *(e.id for e in batch[first + len(second):])]


@pytest.mark.parametrize("answer", [{"refused": [9]}, {"refused": [0, 0]}, {"refused": []}, {"refused": "0"},
                                    {"refused": [True]}, ["refused"]])
async def test_a_batch_refusal_naming_no_events_rightly_refuses_the_post_together(answer: object) -> None:
    """Positions out of range, twice, none, or no list at all: the POST is refused together, as
    from a receiver that names none (halved by the worker to find the event at fault)."""
    rejected, _ = await _send_to({1: (b"400 Bad Request", answer)}, padded(3, 300, {}), RejectedError, halving=False)
    assert isinstance(rejected, RejectedError) and len(rejected.events) == 3 and rejected.together


@pytest.mark.parametrize(("status", "key", "error"), [(b"400 Bad Request", "refused", RejectedError),
                                                       (b"503 Service Unavailable", "pending", SinkError)])
async def test_positions_from_a_receiver_that_does_not_say_it_names_events_are_not_read(
        status: bytes, key: str, error: type[Exception]) -> None:
    """Another receiver's JSON may hold a "refused" or "pending" list meaning something else:
    read as ours, the events it did not list counted as taken, though it stored none."""
    batch = padded(3, 300, {})
    failure, _ = await _send_to({1: (status, {key: [0]})}, batch, error, halving=False, marked=False)
    assert (failure.events if isinstance(failure, RejectedError) else failure.pending) == batch  # type: ignore[attr-defined]


@pytest.mark.parametrize("status", [401, 403, 415])
async def test_a_batch_post_refused_for_any_batch_is_not_halved(tmp_path: Path, status: int) -> None:
    """A receiver refusing every POST (an expired token): halving sent each event alone to be
    refused again, 2n - 1 POSTs a batch."""
    with EventCollector() as receiver:
        receiver.fail_with = status
        dead = await through_a_worker(tmp_path, receiver, HttpSinkConfig(url=receiver.url, mode="batch"),
                                      padded(20, 200, {}))
        assert receiver.attempts == 1 and len(dead) == 20 and str(status) in dead[0]["reason"]

class _Exchanges:
    """A receiver on loopback that logs, per POSTed event, when it arrived and when it was
    answered (`log`: ("in" | "out", id, type)); `answer(event, nth)` (nth: its POSTs so far, from
    1) gives the status and what to wait for before answering (an asyncio.Event, at most
    `patience` seconds)."""

    def __init__(self, answer: Callable[[CloudEvent, int], tuple[int, asyncio.Event | None]],
                 patience: float = 5.0) -> None:
        self.answer, self.patience = answer, patience
        self.log: list[tuple[str, str, str]] = []
        self._posts: dict[tuple[str, str], int] = {}
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")[1:]
                headers = dict(line.split(": ", 1) for line in head if line)
                event = ce_http.from_http(headers, await reader.readexactly(int(headers["content-length"])))
                key = (event.id, event.type)
                self._posts[key] = self._posts.get(key, 0) + 1
                self.log.append(("in", *key))
                status, wait = self.answer(event, self._posts[key])
                if wait is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wait.wait(), self.patience)
                self.log.append(("out", *key))
                writer.write(b"HTTP/1.1 %d X\r\ncontent-length: 0\r\n\r\n" % status)
                await writer.drain()
        writer.close()


def exchanges(*ids: str) -> list[CloudEvent]:
    """A request and its response for each id, in that order (as the sidecar spools them)."""
    return [CloudEvent({"specversion": "1.0", "id": i, "source": "/s", "type": t}, b"{}")
            for i in ids for t in (REQUEST, RESPONSE)]


def _taken_in_order(log: list[tuple[str, str, str]], *ids: str) -> None:
    """Each id's response arrived only once its request was answered."""
    for i in ids:
        assert log.index(("out", i, REQUEST)) < log.index(("in", i, RESPONSE)), log


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_the_events_of_an_id_go_one_after_another_in_batch_order(mode: str) -> None:
    """All of a batch's events were POSTed at once: a response (an explanation) could reach the
    receiver before its request, or its request's retry came after it (36 in 3000 events)."""
    both = asyncio.Event()  # the requests are answered once both arrived

    def answer(event: CloudEvent, _: int) -> tuple[int, asyncio.Event | None]:
        if event.type != REQUEST:
            return 202, None
        if sum(1 for x in peer.log if x[0] == "in" and x[2] == REQUEST) == 2:
            both.set()
        return 202, both

    peer = _Exchanges(answer)
    async with peer as url:
        sink = HttpSinkConfig(url=url, mode=mode).build()  # type: ignore[arg-type]
        await sink.send_batch(exchanges("id1", "id2"))
        await sink.aclose()
    _taken_in_order(peer.log, "id1", "id2")
    # Different ids still go at once: both requests arrived before either was answered (one
    # after another, the first would have waited the 5 s out).
    assert set(peer.log[:2]) == {("in", "id1", REQUEST), ("in", "id2", REQUEST)}


async def test_a_failed_event_holds_back_the_later_events_of_its_id() -> None:
    """A 503 to a request: its response was sent (and taken) anyway, and the request's retry
    then came after it. The response stays pending behind it, in batch order."""
    peer = _Exchanges(lambda e, nth: (503 if (e.id, e.type, nth) == ("id1", REQUEST, 1) else 202, None))
    batch = exchanges("id1", "id2")
    async with peer as url:
        sink = HttpSinkConfig(url=url).build()  # type: ignore[arg-type]
        with pytest.raises(SinkError) as info:
            await sink.send_batch(batch)
        assert type(info.value) is SinkError and info.value.pending == batch[:2]
        assert ("in", "id1", RESPONSE) not in peer.log
        assert {("out", "id2", REQUEST), ("out", "id2", RESPONSE)} <= set(peer.log)  # both taken
        await sink.send_batch(info.value.pending)  # the worker's retry
        await sink.aclose()
    assert [x for x in peer.log if x[1] == "id1"] == [("in", "id1", REQUEST), ("out", "id1", REQUEST)] * 2 + [
        ("in", "id1", RESPONSE), ("out", "id1", RESPONSE)]


async def test_an_event_refused_for_good_does_not_hold_back_its_id() -> None:
    """A 400 to a request: dead-lettered, so its response still goes (after it); only the
    request is named refused."""
    response = asyncio.Event()  # the refusal waits for a response sent too soon (briefly: none comes)

    def answer(event: CloudEvent, _: int) -> tuple[int, asyncio.Event | None]:
        if (event.id, event.type) == ("id1", RESPONSE):
            response.set()
        return (400, response) if (event.id, event.type) == ("id1", REQUEST) else (202, None)

    peer = _Exchanges(answer, patience=0.5)
    batch = exchanges("id1", "id2")
    async with peer as url:
        sink = HttpSinkConfig(url=url).build()  # type: ignore[arg-type]
        with pytest.raises(RejectedError) as info:
            await sink.send_batch(batch)
        await sink.aclose()
    assert info.value.events == [batch[0]] and info.value.taken(batch) == 3
    assert {x for x in peer.log if x[0] == "in"} == {("in", e.id, e.type) for e in batch}
    _taken_in_order(peer.log, "id1", "id2")


async def test_a_retryable_failure_beside_a_refusal_keeps_both_pending_in_batch_order() -> None:
    """id1's request refused for good, id2's answered 503: retried (the refusal is made again on
    the retry), with id2's response held back; the pending events keep the batch's order."""
    answers = {("id1", REQUEST): 400, ("id2", REQUEST): 503}
    peer = _Exchanges(lambda e, _: (answers.get((e.id, e.type), 202), None))
    batch = exchanges("id1", "id2", "id3")
    async with peer as url:
        sink = HttpSinkConfig(url=url).build()  # type: ignore[arg-type]
        with pytest.raises(SinkError) as info:
            await sink.send_batch(batch)
        await sink.aclose()
    assert type(info.value) is SinkError and info.value.pending == [batch[0], batch[2], batch[3]]
    assert ("in", "id2", RESPONSE) not in peer.log and ("in", "id1", RESPONSE) in peer.log


def test_max_batch_bytes_is_checked() -> None:
    assert HttpSinkConfig(url="http://127.0.0.1:9/", max_batch_bytes="1MiB").max_batch_bytes == 1 << 20
    with pytest.raises(ValidationError) as info:
        HttpSinkConfig(url="http://127.0.0.1:9/", max_batch_bytes=0)
    assert info.value.errors()[0]["loc"] == ("max_batch_bytes",)


async def test_retry_after_is_passed_on() -> None:
    with EventCollector() as receiver:
        receiver.fail_with, receiver.retry_after = 503, "7"
        sink = HttpSinkConfig(url=receiver.url).build()
        with pytest.raises(SinkError) as info:
            await sink.send_batch(events(1))
        await sink.aclose()
    assert info.value.retry_after == 7


async def test_the_longest_retry_after_of_a_batch_is_passed_on() -> None:
    """Binary mode: one event answered 503 without Retry-After, another 429 with one. Only the
    first failure's answer was read, and the receiver's 30 s was lost."""
    from tests.servers import Scripted

    def answer(request: bytes) -> bytes:
        if b"ce-id: e0" in request:
            return b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\n\r\n"
        return b"HTTP/1.1 429 Slow down\r\nretry-after: 30\r\ncontent-length: 0\r\n\r\n"

    async with Scripted(answer) as url:
        sink = HttpSinkConfig(url=url, mode="binary", concurrency=1).build()
        with pytest.raises(SinkError) as info:
            await sink.send_batch(events(2))
        await sink.aclose()
    assert info.value.retry_after == 30


async def test_refused_connection_is_retryable() -> None:
    sink = HttpSinkConfig(url=f"http://127.0.0.1:{free_port()}/", timeout=2).build()
    with pytest.raises(SinkError) as info:
        await sink.send_batch(events(2))
    await sink.aclose()
    assert type(info.value) is SinkError and "127.0.0.1" in str(info.value)


async def test_slow_receiver_times_out_as_retryable() -> None:
    with EventCollector() as receiver:
        receiver.delay = 2
        sink = HttpSinkConfig(url=receiver.url, timeout=0.3).build()
        with pytest.raises(SinkError):
            await sink.send_batch(events(1))
        await sink.aclose()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n400000\r\n" + b"x" * (4 << 20),  # endless
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",  # stalls
    b"HTTP/1.1 200 OK\r\n\r\nuntil the close, which never comes",
], ids=["endless", "stalled", "until-close"])
async def test_a_2xx_whose_body_never_ends_is_a_delivery(answer: bytes) -> None:
    """The sink kept the whole body (GBs of RSS for an endless one), then said 'no answer within'
    and the event, which the receiver had taken, was sent again on every retry."""
    from tests.servers import Scripted

    peer = Scripted(lambda _: answer)
    async with peer as url:
        sink = HttpSinkConfig(url=url, timeout=0.5).build()
        await sink.send_batch(events(1))
        await sink.aclose()
    assert len(peer.heads) == 1


async def test_a_refusal_with_a_huge_body_is_classified_on_its_head() -> None:
    from tests.servers import Scripted

    answer = b"HTTP/1.1 503 Busy\r\nretry-after: 7\r\ncontent-length: 100000000000\r\n\r\n" + b"x" * (4 << 20)
    async with Scripted(lambda _: answer) as url:
        sink = HttpSinkConfig(url=url, timeout=5).build()
        with pytest.raises(SinkError) as info:
            await sink.send_batch(events(1))
        await sink.aclose()
    assert type(info.value) is SinkError and info.value.retry_after == 7 and "503" in str(info.value)


async def test_a_refusal_with_a_bad_retry_after_is_still_a_refusal() -> None:
    """A 400 with Retry-After "²" raised ValueError out of the sink: retried forever, never dead-lettered."""
    from tests.servers import Scripted

    answer = "HTTP/1.1 400 Bad\r\nretry-after: \u00b2\r\ncontent-length: 0\r\n\r\n".encode("latin-1")
    async with Scripted(lambda _: answer) as url:
        sink = HttpSinkConfig(url=url).build()
        with pytest.raises(RejectedError) as info:
            await sink.send_batch(events(2))
        await sink.aclose()
    assert len(info.value.events) == 2


async def test_no_datacontenttype_means_no_content_type() -> None:
    with EventCollector() as receiver:
        sink = HttpSinkConfig(url=receiver.url).build()
        await sink.send_batch([CloudEvent({"specversion": "1.0", "id": "n1", "source": "/s", "type": "t"}, b"raw")])
        await sink.aclose()
        (got,) = receiver.wait_for(1)
    assert got.datacontenttype is None and got.data == b"raw"


async def test_url_path_query_headers_and_userinfo_reach_the_receiver() -> None:
    from tests.servers import Scripted

    peer = Scripted(lambda _: b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")
    async with peer as url:
        host = url.removeprefix("http://")
        config = HttpSinkConfig(url=f"http://us%40er:pa%3Ass@{host}/default/broker?x=1",
                                headers={"X-Tenant": "t1", "ce-source": "overridden"})
        sink = config.build()
        await sink.send_batch(events(1))
        await sink.aclose()
    head = peer.heads[0].decode()
    assert head.startswith("POST /default/broker?x=1 HTTP/1.1\r\n")
    assert f"host: {host}\r\n" in head and "x-tenant: t1\r\n" in head
    assert "authorization: Basic dXNAZXI6cGE6c3M=\r\n" in head  # base64 of us@er:pa:ss
    assert "ce-source: /s\r\n" in head and "overridden" not in head  # the event's own headers win
    assert head.endswith('{"x": 0}')


async def test_the_urls_password_is_in_no_message(tmp_path: Path) -> None:
    """It went out as Basic auth, and also into every log line and dead-letter reason."""
    from tests.servers import Scripted

    peer = Scripted(lambda _: b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
    async with peer as url:
        config = HttpSinkConfig(url=url.replace("http://", "http://alice:S3cret@") + "/in")
        sink = config.build()
        with pytest.raises(RejectedError) as info:
            await sink.send_batch(events(1))
        await sink.aclose()
    assert "S3cret" not in str(info.value) and "alice" not in str(info.value)
    assert f"{url}/in refused" in str(info.value)
    assert "authorization: Basic " in peer.heads[0].decode()


@pytest.mark.parametrize(("headers", "says"), [
    ({"x-token": "é€"}, "the value of 'x-token' is not latin-1"),  # stopped the sidecar with a traceback
    ({"x-a": "1\r\nx-injected: yes"}, "the value of 'x-a' holds a line break"),  # a header of its own
    ({"x-a": "1\0"}, "holds a line break or NUL"),
    ({"bad name": "v"}, "'bad name' is not a header name"),
    ({"x:y": "v"}, "'x:y' is not a header name"),
    ({"Content-Length": "0"}, "'Content-Length' is set by the sink"),
])
def test_configured_headers_are_checked(headers: dict[str, str], says: str) -> None:
    with pytest.raises(ValidationError) as info:
        HttpSinkConfig(url="http://127.0.0.1:9/", headers=headers)
    (error,) = info.value.errors()
    assert error["loc"] == ("headers",) and says in error["msg"]


def test_latin_1_header_values_are_sent_as_they_are() -> None:
    sink = HttpSinkConfig(url="http://127.0.0.1:9/", headers={"X-Name": "Zoë \t!", "x_y~1": ""}).build()
    assert sink._extra == [(b"x-name", "Zoë \t!".encode("latin-1")), (b"x_y~1", b"")]


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that no system trusts, and its key (openssl, as on the machine)."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


async def test_an_https_receiver_is_verified_as_configured(self_signed: tuple[Path, Path]) -> None:
    """KServe's --logger-tls-skip-verify and --logger-ca-cert-file: a receiver with a private CA."""
    import ssl

    cert, key = self_signed
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    posts: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                posts.append(await reader.readexactly(length))
                writer.write(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    try:
        for config, delivered in ((HttpSinkConfig(url=url), False),  # the system's CAs: not this one
                                  (HttpSinkConfig(url=url, tls_verify=False), True),
                                  (HttpSinkConfig(url=url, ca_certs=str(cert)), True)):
            sink = config.build()
            try:
                if delivered:
                    await sink.send_batch(events(1))
                else:
                    with pytest.raises(SinkError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
                        await sink.send_batch(events(1))
            finally:
                await sink.aclose()
        assert len(posts) == 2
    finally:
        server.close()
        await server.wait_closed()
