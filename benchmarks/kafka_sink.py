"""Kafka sink throughput against the raw confluent-kafka producer, on one broker, same records.

Both sides send the same inference events (KServe-like attributes, a `--size` payload) to a
noida-db broker started here on a free loopback port (a fresh one for every run, so that each
meets the same broker state), with the same producer settings (acks=all, idempotence,
linger.ms=5):

    raw      the records pre-encoded (ce_* headers, key = id), produced in one stream, one flush
    sink-N   the sink as it runs in production: a `Dispatcher` and its `SinkWorker` over a
             `DiskSpool` pre-filled with the events (filled outside the timing), batches of
             `--batch` events, N of them with the sink at once (`in_flight`; the sink's default
             is 4): spool read, decode, encode, produce, and each batch committed after its acks
    spool    reading the same pre-filled spool alone (no broker): the part of sink-N's cost that
             the raw side does not have
    alone-N  the sink without worker and spool: `send_batch` of in-memory events, N batches at
             once: the sink's own cost, encoding included

Rounds alternate the sides so that other load on the machine hits all alike; the best and the
median round of each are reported, with this process's CPU time per event (Python and
librdkafka threads, not the broker's: least disturbed by other load) and the share of the
machine others used meanwhile. Every topic's end offset is checked. The target (>= 0.8) is judged
on the median over rounds of each round's ratio to the raw producer, as `elasticsearch_sink.py`
judges its own; `alone-4` is the sink with its default 4 batches in flight, `sink-4` the same
behind the dispatcher over a spool (what the delivery process runs), shown for its extra cost.

    python benchmarks/kafka_sink.py                                # 20k events of 1 KB, 5 rounds
    python benchmarks/kafka_sink.py --in-flight 1 4 8 --mode structured --json kafka.json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import _harness as h

sys.path.insert(0, str(h.REPO))  # infer_logger and tests.services, also when run as a script

from confluent_kafka import Consumer, Producer, TopicPartition

from infer_logger.cloudevents.event import AttributeValue, CloudEvent
from infer_logger.cloudevents.kafka import to_kafka_binary, to_kafka_structured
from infer_logger.dispatch import Dispatcher
from infer_logger.events import REQUEST, RESPONSE
from infer_logger.metrics import Metrics
from infer_logger.sinks.kafka import Headers, KafkaSink, KafkaSinkConfig
from infer_logger.spool import DiskSpool
from tests.services import NoidaServer

TARGET = 0.8
Rates = tuple[float, float]
"""(events/s, client CPU microseconds per event)"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--messages", type=int, default=20_000, help="Events per round and side.  [default: 20000]")
    p.add_argument("--size", type=int, default=1024, help="Payload bytes per event.  [default: 1024]")
    p.add_argument("--batch", type=int, default=500,
                   help="Events per batch (the sink worker's batch size).  [default: 500]")
    p.add_argument("--in-flight", type=int, nargs="+", default=[1, 4], metavar="N",
                   help="Batches with the sink at once, one sink side each.  [default: 1 4]")
    p.add_argument("--alone", action=argparse.BooleanOptionalAction, default=True,
                   help="Also time the sink alone (alone-N).  [default: --alone]")
    p.add_argument("--rounds", type=int, default=5, help="Rounds of every side.  [default: 5]")
    p.add_argument("--mode", choices=["binary", "structured"], default="binary", help="[default: binary]")
    p.add_argument("--json", metavar="FILE", help="Save every figure here.")
    args = p.parse_args(argv)
    if not (1 <= args.messages <= 100_000 and 16 <= args.size <= 100_000 and 1 <= args.batch <= 10_000
            and 1 <= args.rounds <= 10 and all(1 <= n <= 64 for n in args.in_flight)):
        p.error("out of range: --messages [1, 100000], --size [16, 100000], --batch [1, 10000], --rounds [1, 10], "
                "--in-flight [1, 64]")
    args.in_flight = sorted(set(args.in_flight))
    return args


def make_events(n: int, size: int) -> list[CloudEvent]:
    base: dict[str, AttributeValue] = {"specversion": "1.0", "source": "http://iris-predictor.default:8080/", "inferenceservicename": "iris",
            "namespace": "default", "component": "predictor", "endpoint": "default", "modelname": "iris",
            "modelversion": "1", "protocol": "v1", "path": "/v1/models/iris:predict",
            "datacontenttype": "application/json", "statuscode": 200}
    payload = b'{"instances": [' + b"1.5, " * ((size - 20) // 5) + b"0]}"
    payload = payload[: size - 3] + b"0]}" if len(payload) > size else payload.ljust(size)
    now = "2024-05-01T12:00:00.000000Z"
    return [CloudEvent({**base, "id": f"{uuid.uuid4()}", "type": REQUEST if i % 2 == 0 else RESPONSE,
                        "time": now, "recordedtime": now, "latencyms": i % 50}, payload) for i in range(n)]


def run_async(main: Callable[[], Coroutine[Any, Any, Rates]]) -> Rates:
    """On uvloop when installed, as the sidecar runs (`infer_logger.server`)."""
    if importlib.util.find_spec("uvloop") is not None:
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


class Clock:
    """Wall time, and this process's CPU time (Python and librdkafka threads: not the broker's)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rates(self, events: int) -> Rates:
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return events / wall, cpu / events * 1e6


def run_raw(config: KafkaSinkConfig, events: list[CloudEvent], topic: str) -> Rates:
    """The bare producer: pre-encoded records, one stream, one flush at the end."""
    encode = to_kafka_structured if config.mode == "structured" else to_kafka_binary
    records: list[tuple[bytes | None, bytes | None, Headers]] = [
        (m.value, m.key, list(m.headers.items())) for m in map(encode, events)]
    conf: dict[str, Any] = {**config.producer_config(), "logger": logging.getLogger("benchmark.librdkafka")}
    producer = Producer(conf)
    producer.produce(topic, b"warm-up")  # connect and learn the topic outside the timing
    producer.flush(10)
    clock = Clock()
    for value, key, headers in records:
        while True:
            try:
                producer.produce(topic, value, key, headers=headers)
                break
            except BufferError:
                producer.poll(0.01)
    left = producer.flush(60)
    rates = clock.rates(len(events))
    producer.close()
    if left:
        raise RuntimeError(f"raw producer: {left} records not delivered")
    return rates


def fill_spool(directory: Path, events: Sequence[CloudEvent]) -> None:
    spool = DiskSpool(directory)
    try:
        for event in events:
            spool.append(event)
    finally:
        spool.close()


def fresh_copy(pristine: Path, run: Path) -> Path:
    """A copy of the pre-filled spool for one run: a reader's checkpoint, and the segments a
    finished reader lets the spool delete, must not reach the next run."""
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(pristine, run)
    return run


def run_spool(directory: Path, events: int, batch: int) -> Rates:
    """Only what the sink worker does before the sink: read and decode the spool, batch by batch."""
    spool = DiskSpool(directory)
    try:
        reader = spool.reader("kafka")
        clock = Clock()
        seen, cursor = 0, reader.position
        while seen < events:
            got, cursor = reader.read(batch, cursor)
            if not got:
                raise RuntimeError(f"spool: {seen} of {events} events")
            seen += len(got)
        return clock.rates(events)
    finally:
        spool.close()


class Counted:
    """The sink, telling when `total` events were taken (one await more per batch: negligible)."""

    def __init__(self, sink: KafkaSink, total: int) -> None:
        self.sink, self.total, self.taken = sink, total, 0
        self.all_taken = asyncio.Event()

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        await self.sink.send_batch(events)
        self.taken += len(events)
        if self.taken >= self.total:
            self.all_taken.set()

    async def aclose(self) -> None:
        await self.sink.aclose()


async def run_sink(config: KafkaSinkConfig, warm_up: CloudEvent, directory: Path, events: int,
                   batch: int) -> Rates:
    """The sink behind a dispatcher over the pre-filled spool, as `InferenceLogger` wires it."""
    sink = config.build()
    await sink.send_batch([warm_up])  # connect and learn the topic outside the timing
    spool = DiskSpool(directory)
    counted = Counted(sink, events)
    dispatcher = Dispatcher(spool, {"kafka": counted}, Metrics(spool), batch_size=batch,
                            overrides={"kafka": (config.batch_size, config.in_flight)})
    try:
        clock = Clock()
        dispatcher.start()
        await asyncio.wait_for(counted.all_taken.wait(), 120)
        rates = clock.rates(events)
    finally:
        await dispatcher.stop()  # also closes the sink
        spool.close()
    if counted.taken != events:
        raise RuntimeError(f"sink: {counted.taken} of {events} events taken")
    return rates


async def run_alone(config: KafkaSinkConfig, warm_up: CloudEvent, events: list[CloudEvent], batch: int,
                    in_flight: int) -> Rates:
    """Only the sink: `in_flight` concurrent `send_batch` calls over the events, in order."""
    sink = config.build()
    await sink.send_batch([warm_up])
    slots = asyncio.Semaphore(in_flight)

    async def send(chunk: list[CloudEvent]) -> None:
        try:
            await sink.send_batch(chunk)
        finally:
            slots.release()

    try:
        clock = Clock()
        sends = []
        for start in range(0, len(events), batch):
            await slots.acquire()
            sends.append(asyncio.create_task(send(events[start:start + batch])))
        await asyncio.gather(*sends)
        return clock.rates(len(events))
    finally:
        await sink.aclose()


def end_offset(bootstrap: str, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "benchmark-check"})
    try:
        return consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
    finally:
        consumer.close()


def label(side: str) -> str:
    kind, _, n = side.partition("-")
    return {"raw": "raw producer", "spool": "spool read", "sink": f"sink, {n} in flight",
            "alone": f"sink alone, {n} in flight"}[kind]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    h.install_cleanup()
    events = make_events(args.messages, args.size)
    warm_up = make_events(1, args.size)[0]
    sinks = [f"sink-{n}" for n in args.in_flight] + ([f"alone-{n}" for n in args.in_flight] if args.alone else [])
    sides = ["raw", *sinks]
    info = h.machine_info()
    h.log(f"{args.messages} events of {args.size} B, {args.mode} mode, batches of {args.batch}, in flight "
          f"{' and '.join(map(str, args.in_flight))}, {args.rounds} rounds; a fresh noida-db (Kafka protocol) "
          f"for every run; {info['cpus']} CPUs, uvloop={info['uvloop']}, load {info['loadavg'][0]:.2f}")
    rates: dict[str, list[float]] = {side: [] for side in ["spool", *sides]}
    cpu: dict[str, list[float]] = {side: [] for side in rates}
    others: dict[str, list[float]] = {side: [] for side in rates}
    broker: dict[str, list[float]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="kafka-sink-bench-") as tmp:
        spool_dir = Path(tmp) / "spool"
        fill_spool(spool_dir, events)
        h.log(f"spool pre-filled: {sum(p.stat().st_size for p in spool_dir.glob('*.seg')) / 1e6:.1f} MB")
        for round_ in range(1, args.rounds + 1):
            meter = h.CpuMeter({})
            meter.start()
            rate, us = run_spool(fresh_copy(spool_dir, Path(tmp) / "run"), args.messages, args.batch)
            load = meter.stop()["others"]
            rates["spool"].append(rate)
            cpu["spool"].append(us)
            others["spool"].append(load)
            h.log(f"  round {round_}/{args.rounds} {'spool':>7}: {rate:>9,.0f} events/s, client CPU {us:5.1f} "
                  f"us/event (read and decode only; others used {load:.0%} of the machine)")
            for side in sides:
                kind, _, n = side.partition("-")
                server = NoidaServer("kafka").start()
                try:
                    assert server.proc is not None
                    meter = h.CpuMeter({"broker": server.proc.pid})
                    topic = f"bench-{side}-{round_}"
                    config = KafkaSinkConfig(bootstrap_servers=server.address, topic=topic, mode=args.mode,
                                             in_flight=int(n) if n else None)
                    run_dir = fresh_copy(spool_dir, Path(tmp) / "run")
                    meter.start()
                    if kind == "raw":
                        rate, us = run_raw(config, events, topic)
                    elif kind == "sink":
                        rate, us = run_async(partial(run_sink, config, warm_up, run_dir, args.messages, args.batch))
                    else:
                        rate, us = run_async(partial(run_alone, config, warm_up, events, args.batch, int(n)))
                    used = meter.stop()
                    load, broker_us = used["others"], used["seconds"]["broker"] / args.messages * 1e6
                    delivered = end_offset(server.address, topic) - 1  # minus the warm-up record
                finally:
                    server.stop()
                if delivered < args.messages:
                    raise RuntimeError(f"{side}: {delivered} of {args.messages} records in {topic}")
                rates[side].append(rate)
                cpu[side].append(us)
                others[side].append(load)
                broker[side].append(broker_us)
                h.log(f"  round {round_}/{args.rounds} {side:>7}: {rate:>9,.0f} events/s, client CPU {us:5.1f} "
                      f"us/event, broker {broker_us:4.1f} (others used {load:.0%} of the machine)")
    best = {side: max(values) for side, values in rates.items()}
    median = {side: statistics.median(values) for side, values in rates.items()}
    least_cpu = {side: min(values) for side, values in cpu.items()}
    h.log("")
    for side in ["raw", "spool", *sinks]:
        h.log(f"{label(side):>25}: best {best[side]:>9,.0f} events/s, median {median[side]:>9,.0f}; client CPU "
              f"{least_cpu[side]:5.1f} us/event (least); others' load median {statistics.median(others[side]):.0%}")
    ratios: dict[str, dict[str, float]] = {}
    for side in sinks:
        per_round = statistics.median(a / b for a, b in zip(rates[side], rates["raw"], strict=True))
        ratio = {"best": best[side] / best["raw"], "median": median[side] / median["raw"],
                 "per_round_median": per_round, "cpu": least_cpu["raw"] / least_cpu[side]}
        ratios[side] = ratio
        verdict = "meets" if per_round >= TARGET else "misses"
        h.log(f"{side:>8} / raw: {per_round:.2f} (median of the rounds' ratios: {verdict} the target {TARGET}); "
              f"best/best {ratio['best']:.2f}, median/median {ratio['median']:.2f}; raw / {side} client CPU "
              f"per event {ratio['cpu']:.2f}")
    production = f"sink-{args.in_flight[-1]}"
    h.log(f"spool read and decode: {least_cpu['spool']:.1f} us/event, {least_cpu['spool'] / least_cpu[production]:.0%} "
          f"of {production}'s client CPU")
    h.save_json(args.json, {"args": vars(args), "rounds": rates, "cpu_us_per_event": cpu, "broker_us_per_event": broker,
                            "others_load": others, "best": best, "median": median, "ratios": ratios,
                            "target": TARGET, "machine": h.machine_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
