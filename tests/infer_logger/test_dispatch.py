"""Sink workers: retry with backoff, dead letters, independent sinks, draining, checkpoints."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson
import pytest

from infer_logger import dispatch
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.dispatch import Backoff, Dispatcher
from infer_logger.errors import RejectedError, SinkError
from infer_logger.metrics import Metrics
from infer_logger.sinks.memory import MemorySink, failing
from infer_logger.spool import DiskSpool, Position, iter_records
from tests.waiting import until

FAST = Backoff(initial=0.001, maximum=0.01)


def event(i: int) -> CloudEvent:
    return CloudEvent({"specversion": "1.0", "id": str(i), "source": "/s", "type": "t"}, b"{}")


def dispatcher(tmp_path: Path, **sinks: MemorySink) -> tuple[DiskSpool, Dispatcher]:
    spool = DiskSpool(tmp_path / "spool")
    return spool, Dispatcher(spool, dict(sinks), Metrics(spool), batch_size=10, backoff=FAST,
                             deadletter_dir=tmp_path / "dead")


async def until_taken(tmp_path: Path, sink: MemorySink, count: int) -> Dispatcher:
    """`count` events through a worker until the sink holds as many."""
    spool, d = dispatcher(tmp_path, s=sink)
    d.start()
    for i in range(count):
        spool.append(event(i))
    await until(lambda: len(sink.events) == count)
    await d.stop()
    spool.close()
    return d


async def until_dead_lettered(tmp_path: Path, sink: MemorySink, count: int) -> tuple[Dispatcher, list[str]]:
    """`count` events through a worker until its dead-letter file appears: the ids in it."""
    spool, d = dispatcher(tmp_path, s=sink)
    for i in range(count):
        spool.append(event(i))
    d.start()
    await until(lambda: (tmp_path / "dead" / "s.jsonl").exists())
    await d.stop()
    lines = (tmp_path / "dead" / "s.jsonl").read_bytes().splitlines()
    return d, [orjson.loads(line)["attributes"]["id"] for line in lines]


class TestBackoff:
    """Full jitter under an exponential ceiling; Retry-After is a floor."""

    def test_ceiling_grows_and_caps(self) -> None:
        b = Backoff(initial=1, maximum=8)
        assert all(0 <= b.delay(1) <= 1 for _ in range(50))
        assert all(0 <= b.delay(10) <= 8 for _ in range(50))

    def test_an_outage_of_any_length_keeps_the_maximum(self) -> None:
        """2.0 ** 1024 overflows a float: the attempt after ~40 min of outage at 2x once killed the worker."""
        b = Backoff(initial=0.1, maximum=5)
        assert all(0 <= b.delay(n) <= 5 for n in (1024, 1025, 10**6))

    def test_retry_after_floor(self) -> None:
        assert Backoff(initial=1, maximum=30).delay(1, retry_after=5) >= 5

    def test_retry_after_past_the_backoff_cap_is_honoured_up_to_its_own(self) -> None:
        """It was held to the backoff's cap (5 s): a receiver asking for 60 s got 12 attempts a minute."""
        assert Backoff(initial=0.1, maximum=5).delay(1, retry_after=60) == 60
        assert Backoff(initial=0.1, maximum=5, retry_after_max=30).delay(1, retry_after=86400) == 30


async def test_retries_until_taken(tmp_path: Path) -> None:
    sink = MemorySink()
    sink.fail = failing(3)
    d = await until_taken(tmp_path, sink, 25)
    assert [e.id for e in sink.events] == [str(i) for i in range(25)]
    assert d.metrics.retried.labels("s")._value.get() == 3


async def test_a_failure_naming_its_pending_events_retries_only_those(tmp_path: Path) -> None:
    """A sink that took part of a batch (an http POST per event, a Kafka batch with one topic
    missing) had all of it sent again on every retry: duplicates for as long as the rest failed."""
    sink = MemorySink()
    failures = [3]

    def take_even(batch: Sequence[CloudEvent]) -> Exception | None:
        if failures[0] == 0:
            return None
        failures[0] -= 1
        taken = [e for e in batch if int(e.id) % 2 == 0]
        sink.events.extend(taken)
        return SinkError("odd ones failed", pending=[e for e in batch if e not in taken])

    sink.fail = take_even
    d = await until_taken(tmp_path, sink, 10)
    assert sorted(int(e.id) for e in sink.events) == list(range(10))  # each once
    assert d.metrics.delivered.labels("s")._value.get() == 10


async def test_pending_events_not_of_the_batch_retry_the_whole_batch(tmp_path: Path) -> None:
    """Taken at their word, the batch was taken for delivered (committed) but for those foreign
    events: it was lost."""
    sink = MemorySink()
    foreign = [event(100)]
    failed = 0

    def fail_once(batch: Sequence[CloudEvent]) -> Exception | None:
        nonlocal failed
        failed += 1
        return SinkError("odd", pending=foreign) if failed == 1 else None

    sink.fail = fail_once
    await until_taken(tmp_path, sink, 5)
    assert [e.id for e in sink.events] == ["0", "1", "2", "3", "4"] and failed >= 2


async def test_a_sink_raising_cancelled_is_retried_not_the_end_of_its_worker(tmp_path: Path) -> None:
    """A client library cancelling a future the sink awaited: the worker ended, the sink still
    said healthy, and nothing was delivered again."""
    sink = MemorySink()
    sink.fail = failing(1, asyncio.CancelledError())  # type: ignore[arg-type]
    d = await until_taken(tmp_path, sink, 3)
    assert [e.id for e in sink.events] == ["0", "1", "2"] and d.metrics.retried.labels("s")._value.get() >= 1


async def test_a_sink_that_fails_to_close_leaves_the_others_closed(tmp_path: Path) -> None:
    class BadClose(MemorySink):
        async def aclose(self) -> None:
            raise OSError("gone")

    other = MemorySink()
    spool, d = dispatcher(tmp_path, a=BadClose(), b=other)
    d.start()
    await d.stop()
    spool.close()
    assert other.closed


async def test_a_dead_sink_does_not_hold_back_the_others(tmp_path: Path) -> None:
    good, dead = MemorySink(), MemorySink()
    dead.fail = lambda batch: SinkError("down")
    spool, d = dispatcher(tmp_path, good=good, dead=dead)
    d.start()
    for i in range(30):
        spool.append(event(i))
    await until(lambda: len(good.events) == 30)
    await d.stop(drain_timeout=0.1)
    assert dead.events == [] and dead.closed
    # The dead sink's events are still in the spool for the next start.
    spool.close()
    again = DiskSpool(tmp_path / "spool")
    events, _ = again.reader("dead").read(100)
    assert len(events) == 30
    assert again.reader("good").read(100)[0] == []


async def test_rejected_events_are_dead_lettered(tmp_path: Path) -> None:
    sink = MemorySink()
    sink.fail = lambda batch: RejectedError("400 bad", [e for e in batch if e.id == "3"]) if any(
        e.id == "3" for e in batch) and not sink.events else None
    spool, d = dispatcher(tmp_path, s=sink)
    d.start()
    for i in range(5):
        spool.append(event(i))
    await until(lambda: (tmp_path / "dead" / "s.jsonl").exists())
    await d.stop()
    (line,) = (tmp_path / "dead" / "s.jsonl").read_bytes().splitlines()
    assert orjson.loads(line)["attributes"]["id"] == "3"
    assert orjson.loads(line)["reason"] == "400 bad"
    assert spool.stats.dropped["rejected"] == 1


async def test_a_dead_letter_that_cannot_be_written_is_retried_not_lost(tmp_path: Path) -> None:
    """The dead-letter file is where a refused event goes instead of the sink: until it is
    written, the batch is not committed and the worker keeps going (backing off)."""
    sink = MemorySink()
    sink.fail = lambda batch: RejectedError("400 bad", [e for e in batch if e.id == "3"]) if any(
        e.id == "3" for e in batch) else None
    (tmp_path / "dead").write_text("a file where the directory should be")
    spool, d = dispatcher(tmp_path, s=sink)
    d.start()
    for i in range(5):
        spool.append(event(i))
    await until(lambda: d.metrics.retried.labels("s")._value.get() >= 2)
    assert not d.health()["s"] and spool.stats.dropped["rejected"] == 0
    (tmp_path / "dead").unlink()
    await until(lambda: (tmp_path / "dead" / "s.jsonl").exists())
    spool.append(event(5))
    await until(lambda: any(e.id == "5" for e in sink.events))  # the worker went on
    await d.stop()
    (line,) = (tmp_path / "dead" / "s.jsonl").read_bytes().splitlines()
    assert orjson.loads(line)["attributes"]["id"] == "3"
    assert spool.stats.dropped["rejected"] == 1 and d.health()["s"]


@pytest.mark.parametrize("depth", [300, 1100])
async def test_an_event_no_encoder_takes_is_dead_lettered_as_base64(tmp_path: Path, depth: int) -> None:
    """JSON nested 300 deep is past orjson's 254-level writer, 1100 deep past Python's recursion
    limit: the dead-letter record once raised, which ended the worker for good (health still ok)."""
    sink = MemorySink()
    sink.fail = lambda batch: RejectedError("400 bad", [e for e in batch if e.id == "0"]) if any(
        e.id == "0" for e in batch) else None
    spool, d = dispatcher(tmp_path, s=sink)
    d.start()
    deep = b'{"instances":' + b"[" * depth + b"]" * depth + b"}"
    spool.append(CloudEvent({"specversion": "1.0", "id": "0", "source": "/s", "type": "t", "statuscode": 1},
                            deep))
    await until(lambda: spool.stats.dropped["rejected"] == 1)
    for i in range(1, 4):
        spool.append(event(i))
    await until(lambda: len(sink.events) == 3)
    await d.stop()
    (line,) = (tmp_path / "dead" / "s.jsonl").read_bytes().splitlines()
    record = orjson.loads(line)
    assert record["reason"] == "400 bad" and record["attributes"]["id"] == "0"
    assert base64.b64decode(record["data"]["base64"]) == deep
    assert spool.stats.dropped["rejected"] == 1 and d.health()["s"]


async def test_a_failure_of_the_worker_itself_is_logged_and_retried(tmp_path: Path) -> None:
    """Not the sink's failure (those are retried in `_deliver`) but the worker's own: it used to
    end the worker's task, silently, with the sink still reported healthy."""
    sink = MemorySink()
    spool, d = dispatcher(tmp_path, s=sink)
    reader = d.workers[0].reader
    read, broken = reader.read, [True]

    def flaky_read(*args, **kwargs):  # type: ignore[no-untyped-def]
        if broken[0]:
            raise RuntimeError("a bug in the worker")
        return read(*args, **kwargs)

    reader.read = flaky_read  # type: ignore[method-assign]
    spool.append(event(0))
    d.start()
    await until(lambda: not d.health()["s"])
    assert not d._tasks[0].done()
    broken[0] = False
    await until(lambda: len(sink.events) == 1)
    assert d.health()["s"]
    await d.stop()


async def test_a_checkpoint_that_cannot_be_saved_does_not_stop_delivery(tmp_path: Path) -> None:
    sink = MemorySink()
    spool, d = dispatcher(tmp_path, s=sink)
    blocker = spool.checkpoint_path("s").with_suffix(".tmp")
    blocker.mkdir(parents=True)  # the checkpoint's temporary file cannot be written
    d.start()
    for i in range(25):
        spool.append(event(i))
    await until(lambda: len(sink.events) == 25)
    spool.append(event(25))  # later batches still go out
    await until(lambda: len(sink.events) == 26)
    # Only the start, saved as the reader was made: none of the progress since.
    assert orjson.loads(spool.checkpoint_path("s").read_bytes()) == {"segment": 1, "offset": 0}
    blocker.rmdir()
    await d.stop()  # saved at the stop
    spool.close()
    assert DiskSpool(tmp_path / "spool").reader("s").read(100)[0] == []


async def test_a_segment_that_cannot_be_read_is_skipped_not_retried_for_ever(tmp_path: Path) -> None:
    """A directory where a segment should be (as EIO from a bad sector would have it): the worker
    failed on it, restarted from its checkpoint and failed again, delivering nothing more, even
    the events before it, and counting nothing."""
    spool = DiskSpool(tmp_path / "spool", segment_bytes=500)
    for i in range(30):
        spool.append(event(i))
    spool.close()
    bad = sorted((tmp_path / "spool").glob("*.seg"))[1]
    lost = {e.id for e, _ in iter_records(bad.read_bytes())}
    bad.unlink()
    bad.mkdir()
    sink = MemorySink()
    spool, d = dispatcher(tmp_path, s=sink)
    d.start()
    await until(lambda: len(sink.events) == 30 - len(lost))
    assert [e.id for e in sink.events] == [str(i) for i in range(30) if str(i) not in lost]
    assert d.health()["s"] and spool.stats.corrupt >= 1
    await d.stop()
    spool.close()


async def test_batches_are_held_to_a_byte_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Capped by count only: a batch of 500 events of 800 KiB (after an outage) took the delivery
    process to 455-781 MiB. A batch cut by bytes is no partial one: the next does not linger."""
    monkeypatch.setattr(dispatch, "BATCH_BYTES", 3000)
    sink, sizes = MemorySink(), []

    def measure(batch: Sequence[CloudEvent]) -> None:
        sizes.append(sum(len(e.data or b"") for e in batch))

    sink.fail = measure
    spool = DiskSpool(tmp_path / "spool")
    d = Dispatcher(spool, {"s": sink}, Metrics(spool), batch_size=10, backoff=FAST, linger=60)
    for i in range(25):
        spool.append(CloudEvent({"specversion": "1.0", "id": str(i), "source": "/s", "type": "t"}, b"x" * 1000))
    d.start()
    await until(lambda: len(sink.events) == 25)  # no linger of 60 s between them
    assert [e.id for e in sink.events] == [str(i) for i in range(25)] and max(sizes) <= 3000
    await d.stop()
    spool.close()


async def test_an_idle_worker_saves_the_checkpoint_the_interval_held_back(tmp_path: Path) -> None:
    """Commits closer together than the save interval are saved by the next one; with nothing
    more to deliver there was none, and a kill -9 at any later time re-delivered those batches."""
    sink = MemorySink()
    spool, d = dispatcher(tmp_path, s=sink)
    d.start()
    for i in range(25):  # three batches, committed within the interval
        spool.append(event(i))
    await until(lambda: len(sink.events) == 25)
    saved = spool.checkpoint_path("s")
    # No more events, no stop: what a kill -9 now would restart from.
    await until(lambda: saved.exists() and orjson.loads(saved.read_bytes()) == {
        "segment": spool.tail().segment, "offset": spool.tail().offset})
    await d.stop()
    spool.close()


async def test_stop_drains_what_it_can(tmp_path: Path) -> None:
    sink = MemorySink()
    spool, d = dispatcher(tmp_path, s=sink)
    for i in range(100):
        spool.append(event(i))
    d.start()
    await d.stop(drain_timeout=5)
    assert len(sink.events) == 100 and sink.closed


@pytest.mark.parametrize("durability", ["memory", "disk"])
async def test_stop_ends_a_linger_and_drains_what_came_meanwhile(tmp_path: Path, durability: str) -> None:
    """The wait after a partial batch was a sleep that stop's wake could not end: with `linger`
    past the drain timeout, the worker was cancelled without reading what had come meanwhile
    (with durability memory, lost at every graceful stop)."""
    from infer_logger.spool import MemorySpool

    spool = MemorySpool() if durability == "memory" else DiskSpool(tmp_path / "spool")
    sink = MemorySink()
    d = Dispatcher(spool, {"s": sink}, Metrics(spool), batch_size=100, linger=60, backoff=FAST)
    d.start()
    spool.append(event(0))  # a partial batch: out at once, then the worker lingers
    await until(lambda: len(sink.events) == 1)
    for i in range(1, 11):
        spool.append(event(i))
    await d.stop(drain_timeout=5)
    spool.close()
    assert [e.id for e in sink.events] == [str(i) for i in range(11)]


@pytest.mark.parametrize("durability", ["memory", "disk"])
async def test_a_failure_while_draining_is_retried_within_the_drain_timeout(tmp_path: Path, durability: str) -> None:
    """The first failure after the stop ended the drain, with most of `drain_timeout` left: one
    503 as the sidecar stopped cost a memory spool every event in it."""
    from infer_logger.spool import MemorySpool

    spool = MemorySpool() if durability == "memory" else DiskSpool(tmp_path / "spool")
    sink = MemorySink()
    d = Dispatcher(spool, {"s": sink}, Metrics(spool), batch_size=100, backoff=FAST)
    for i in range(11):
        spool.append(event(i))
    sink.fail = failing(2)
    d.start()
    await d.stop(drain_timeout=30)
    spool.close()
    assert [e.id for e in sink.events] == [str(i) for i in range(11)]


async def test_events_coming_while_a_worker_lingers_do_not_keep_it_busy(tmp_path: Path) -> None:
    """Only stop ends a linger early: each event appended meanwhile must not set the worker
    going round its loop until the linger is over (it is read once it is)."""
    sink = MemorySink()
    spool = DiskSpool(tmp_path / "spool")
    d = Dispatcher(spool, {"s": sink}, Metrics(spool), batch_size=100, linger=60, backoff=FAST)
    reader = d.workers[0].reader
    commit, rounds = reader.commit, [0]

    def counted(position: Position, **kwargs: bool) -> None:
        rounds[0] += 1  # an idle worker commits once a round
        commit(position, **kwargs)

    reader.commit = counted  # type: ignore[method-assign]
    d.start()
    spool.append(event(0))
    await until(lambda: len(sink.events) == 1)
    before = rounds[0]
    for i in range(1, 4):
        spool.append(event(i))
    await asyncio.sleep(0.3)  # a busy loop goes round thousands of times in this
    assert rounds[0] - before < 20 and len(sink.events) == 1  # still lingering
    await d.stop()
    spool.close()
    assert len(sink.events) == 4


async def test_unexpected_exceptions_are_retried_not_fatal(tmp_path: Path) -> None:
    sink = MemorySink()
    sink.fail = failing(2, RuntimeError("bug in a sink"))
    spool, d = dispatcher(tmp_path, s=sink)
    d.start()
    spool.append(event(1))
    await until(lambda: len(sink.events) == 1)
    await d.stop()


@pytest.mark.parametrize("durability", ["memory"])
async def test_memory_spool_dispatch(tmp_path: Path, durability: str) -> None:
    from infer_logger.spool import MemorySpool

    spool = MemorySpool()
    sink = MemorySink()
    d = Dispatcher(spool, {"s": sink}, Metrics(spool), batch_size=7, backoff=FAST)
    d.start()
    for i in range(50):
        spool.append(event(i))
    await until(lambda: len(sink.events) == 50)
    await d.stop()
    assert spool.size_bytes() == 0


async def test_in_flight_batches_commit_in_spool_order(tmp_path: Path) -> None:
    """Later batches may finish first; the checkpoint only moves past a batch once it is taken."""
    sink = MemorySink()
    spool = DiskSpool(tmp_path / "spool")
    gate = asyncio.Event()
    seen: list[str] = []

    class SlowFirst(MemorySink):
        async def send_batch(self, events):  # type: ignore[no-untyped-def]
            seen.append(events[0].id)
            if events[0].id == "0":
                await gate.wait()  # the first batch hangs until released
            await super().send_batch(events)

    slow = SlowFirst()
    d = Dispatcher(spool, {"s": slow}, Metrics(spool), batch_size=10, in_flight=3, backoff=FAST)
    for i in range(50):
        spool.append(event(i))
    d.start()
    await until(lambda: len(seen) == 3)  # three batches handed over at once
    reader = d.workers[0].reader
    assert reader.position.offset == 0  # nothing committed while the first is pending
    await until(lambda: len(slow.events) == 20)
    gate.set()
    await until(lambda: len(slow.events) == 50)
    await d.stop()
    assert sorted(int(e.id) for e in slow.events) == list(range(50))
    assert d.workers[0].reader.read(100)[0] == []
    del sink


async def test_a_batch_taken_while_an_earlier_one_fails_leaves_the_sink_unhealthy(tmp_path: Path) -> None:
    """With batches in flight, a later one taken said the sink was healthy while the first still
    backed off: /readyz flickered ready through an outage."""
    down = True
    states: list[bool] = []

    class FirstDown(MemorySink):
        async def send_batch(self, events: Sequence[CloudEvent]) -> None:
            if events[0].id == "0" and down:
                raise SinkError("down")
            await super().send_batch(events)

    sink = FirstDown()
    spool = DiskSpool(tmp_path / "spool")
    for i in range(20):
        spool.append(event(i))
    d = Dispatcher(spool, {"s": sink}, Metrics(spool), batch_size=10, in_flight=2,
                   backoff=Backoff(initial=0.05, maximum=0.05))
    d.start()
    await until(lambda: len(sink.events) == 10)  # the second batch, taken
    for _ in range(20):
        states.append(d.health()["s"])
        await asyncio.sleep(0.01)
    down = False
    await until(lambda: len(sink.events) == 20 and d.health()["s"])
    await d.stop()
    spool.close()
    assert not any(states)


async def test_a_sink_still_failing_at_the_end_of_a_drain_is_unhealthy(tmp_path: Path) -> None:
    """The later batch gave up in the drain, then the earlier one was taken and said the sink was
    healthy: the delivery child's last status."""
    fail, take = asyncio.Event(), asyncio.Event()
    called: list[str] = []

    class Ordered(MemorySink):
        async def send_batch(self, events: Sequence[CloudEvent]) -> None:
            called.append(events[0].id)
            if events[0].id == "10":
                await fail.wait()
                raise SinkError("down", retry_after=30)  # past the drain: given up at once
            await take.wait()
            await super().send_batch(events)

    sink = Ordered()
    spool = DiskSpool(tmp_path / "spool")
    for i in range(20):
        spool.append(event(i))
    d = Dispatcher(spool, {"s": sink}, Metrics(spool), batch_size=10, in_flight=2, backoff=FAST)
    d.start()
    await until(lambda: called == ["0", "10"])
    stopping = asyncio.ensure_future(d.stop(drain_timeout=5.0))
    await asyncio.sleep(0.05)
    fail.set()
    await until(lambda: d.metrics.retried.labels("s")._value.get() >= 1)
    take.set()
    await stopping
    spool.close()
    assert len(sink.events) == 10 and not d.health()["s"]


class FailingOnce(MemorySink):
    """Fails once each batch whose first id `fails` picks (as a timeout would), after a moment;
    then takes it, `slow[first]` seconds later; the ids taken, in order, in `taken`."""

    def __init__(self, fails: Callable[[int], bool], slow: dict[int, float] | None = None) -> None:
        super().__init__()
        self.fails, self.slow = fails, slow or {}
        self.taken: list[int] = []
        self._tried: set[int] = set()

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        first = int(events[0].id)
        if self.fails(first) and first not in self._tried:
            self._tried.add(first)
            await asyncio.sleep(0.02)
            raise SinkError("timed out")
        await asyncio.sleep(self.slow.get(first, 0))
        self.taken.extend(int(e.id) for e in events)


def _ordered(tmp_path: Path, sink: FailingOnce, count: int, backoff: Backoff) -> tuple[DiskSpool, Dispatcher]:
    """A dispatcher started on `count` events, 5 a batch, 4 batches in flight: the order tests'."""
    spool = DiskSpool(tmp_path / "spool")
    for i in range(count):
        spool.append(event(i))
    dispatcher = Dispatcher(spool, {"s": sink}, Metrics(spool), batch_size=5, in_flight=4, backoff=backoff)
    dispatcher.start()
    return spool, dispatcher


async def test_failed_batches_are_retried_in_spool_order(tmp_path: Path) -> None:
    """Batches in flight that all fail (a stalled broker) go again in spool order, and no new
    batch overtakes them: each was retried on its own jittered backoff, and a batch of responses
    landed before the batch holding their requests."""
    sink = FailingOnce(lambda first: True)  # every batch fails once, as all in flight do in a stall
    taken = sink.taken
    spool, d = _ordered(tmp_path, sink, 60, Backoff(initial=0.02, maximum=0.05))
    await until(lambda: len(taken) >= 30)
    for i in range(60, 100):  # more arrive while batches are being retried
        spool.append(event(i))
    await until(lambda: len(taken) == 100)
    await d.stop()
    spool.close()
    assert taken == list(range(100))


async def test_a_retry_waits_for_every_earlier_batch_not_only_the_one_before(tmp_path: Path) -> None:
    """Batch 1 fails, batch 2 is taken at once, batch 3 fails: batch 3's retry waited for batch 2
    alone, and went before batch 1's (slow) retry."""
    sink = FailingOnce(lambda first: first in (0, 10), slow={0: 0.3})  # batches 1 and 3; 1's retry is slow
    taken = sink.taken
    spool, d = _ordered(tmp_path, sink, 20, Backoff(initial=0.01, maximum=0.01))
    await until(lambda: len(taken) == 20)
    await d.stop()
    spool.close()
    # Batches 2 and 4 were taken before batch 1 failed (the documented exception); the retries keep order.
    retried = [i for i in taken if i < 5 or 10 <= i < 15]
    assert retried == [*range(5), *range(10, 15)]


async def test_a_worker_restarted_with_nothing_to_deliver_is_healthy_again(tmp_path: Path) -> None:
    """Only a delivery said healthy again: a failure while the spool was idle (EMFILE opening a
    segment) left the sink 'retrying' until the next event, without traffic for good."""
    sink = MemorySink()
    spool, d = dispatcher(tmp_path, s=sink)
    reader = d.workers[0].reader
    read, fail = reader.read, [False]

    def failing_once(*args, **kwargs):  # type: ignore[no-untyped-def]
        if fail[0]:
            fail[0] = False
            raise OSError(24, "Too many open files")
        return read(*args, **kwargs)

    reader.read = failing_once  # type: ignore[method-assign]
    d.start()
    spool.append(event(0))
    await until(lambda: len(sink.events) == 1)
    fail[0] = True
    await until(lambda: not fail[0])  # it failed once, the spool idle
    await until(lambda: d.health()["s"])
    await d.stop()


class TestRefusedForSize:
    """A batch refused as a whole for its size (an http batch POST answered 413) goes again in
    halves; only an event refused alone is dead-lettered. Each had been dead-lettered with the batch."""

    async def test_halves_until_each_piece_is_taken(self, tmp_path: Path) -> None:
        sink = MemorySink()
        flaky = [True]

        def fail(batch: Sequence[CloudEvent]) -> Exception | None:
            if len(batch) > 3 or any(e.id == "13" for e in batch):  # 13 is too large even alone
                return RejectedError("413", batch, too_large=True, together=True)
            if batch[0].id == "2" and flaky:
                flaky.clear()
                return SinkError("down")  # retried alone: the piece before it is not sent again
            return None

        sink.fail = fail
        spool, d = dispatcher(tmp_path, s=sink)
        for i in range(25):
            spool.append(event(i))
        d.start()
        await until(lambda: len(sink.events) == 24 and (tmp_path / "dead" / "s.jsonl").exists())
        await d.stop()
        assert [e.id for e in sink.events] == [str(i) for i in range(25) if i != 13]
        (line,) = (tmp_path / "dead" / "s.jsonl").read_bytes().splitlines()
        assert orjson.loads(line)["attributes"]["id"] == "13"
        assert spool.stats.dropped["rejected"] == 1
        assert d.metrics.delivered.labels("s")._value.get() == 24
        assert d.metrics.retried.labels("s")._value.get() == 1
        assert d.workers[0].reader.read(100)[0] == []  # all committed

    async def test_dead_letters_that_cannot_be_written_are_written_later(self, tmp_path: Path) -> None:
        """The halves taken were sent to the sink again on every retry while the dead-letter file
        could not be written; only writing the refused event is tried again (the sink is not asked
        again: an explainer, asked again, no longer refused an exchange it had settled)."""
        sink = MemorySink()
        sink.fail = lambda batch: (RejectedError("413", batch, too_large=True, together=True)
                                   if len(batch) > 2 or any(e.id == "5" for e in batch) else None)
        (tmp_path / "dead").write_text("")  # a file where the dead-letter directory goes
        spool, d = dispatcher(tmp_path, s=sink)
        for i in range(10):
            spool.append(event(i))
        d.start()
        await until(lambda: d.metrics.retried.labels("s")._value.get() > 5)
        calls = sink.calls
        assert sorted(e.id for e in sink.events) == [str(i) for i in range(10) if i != 5]  # once each
        (tmp_path / "dead").unlink()
        await until(lambda: (tmp_path / "dead" / "s.jsonl").exists())
        await d.stop()
        assert sink.calls == calls and d.workers[0].reader.read(100)[0] == []  # all committed
        assert d.metrics.delivered.labels("s")._value.get() == 9

    async def test_a_refused_event_of_the_sinks_own_is_dead_lettered_and_the_batch_counted(
            self, tmp_path: Path) -> None:
        """An event the sink made of the batch (the explainer's explanation) refused: it counted
        against the batch's delivered events."""
        made = event(99)
        sink = MemorySink()
        sink.fail = lambda batch: RejectedError("413", [made], too_large=True)
        d, dead = await until_dead_lettered(tmp_path, sink, 3)
        assert dead == ["99"] and d.metrics.delivered.labels("s")._value.get() == 3

    async def test_events_refused_each_alone_are_not_sent_again(self, tmp_path: Path) -> None:
        """Kafka refuses records one by one (MSG_SIZE_TOO_LARGE) and takes the rest: too_large
        without `together`, so they are dead-lettered at once, the others never sent twice."""

        class TakesTheSmall(MemorySink):
            async def send_batch(self, events: Sequence[CloudEvent]) -> None:
                self.calls += 1
                self.events.extend(e for e in events if e.id not in ("3", "4"))
                raise RejectedError("too large", [e for e in events if e.id in ("3", "4")], too_large=True)

        sink = TakesTheSmall()
        _, dead = await until_dead_lettered(tmp_path, sink, 8)
        assert sink.calls == 1 and [e.id for e in sink.events] == ["0", "1", "2", "5", "6", "7"]
        assert dead == ["3", "4"]
