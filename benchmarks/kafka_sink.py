"""Kafka sink throughput against the raw confluent-kafka producer, on one broker, same records.

Both sides send the same inference events (KServe-like attributes, a `--size` payload) to a
noida-db broker started here on a free loopback port (a fresh one per run, so that both meet
the same broker state), with the same producer settings (acks=all, idempotence, linger.ms=5):

    raw    the records pre-encoded (ce_* headers, key = id), produced in one stream, one flush
    sink   `KafkaSink.send_batch` of `--batch` events at a time, each confirmed before the next
           (what a sink worker does: encode, produce, wait for every acknowledgement)

Rounds alternate raw and sink so that other load on the machine hits both alike; the best
and the median round of each are reported, with this process's CPU time per event (least
disturbed by other load), and every topic's end offset is checked.

    python benchmarks/kafka_sink.py                          # 20k events of 1 KB, 5 rounds
    python benchmarks/kafka_sink.py --mode structured --batch 2000 --json kafka.json
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
import uuid
from typing import Any

import _harness as h

sys.path.insert(0, str(h.REPO))  # infer_logger and tests.services, also when run as a script

from confluent_kafka import Consumer, Producer, TopicPartition

from infer_logger.cloudevents.event import AttributeValue, CloudEvent
from infer_logger.cloudevents.kafka import to_kafka_binary, to_kafka_structured
from infer_logger.events import REQUEST, RESPONSE
from infer_logger.sinks.kafka import Headers, KafkaSink, KafkaSinkConfig
from tests.services import NoidaServer

TARGET = 0.8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--messages", type=int, default=20_000, help="Events per round and side.  [default: 20000]")
    p.add_argument("--size", type=int, default=1024, help="Payload bytes per event.  [default: 1024]")
    p.add_argument("--batch", type=int, default=500,
                   help="Events per send_batch (the sink worker's batch size).  [default: 500]")
    p.add_argument("--rounds", type=int, default=5, help="Rounds of raw + sink.  [default: 5]")
    p.add_argument("--mode", choices=["binary", "structured"], default="binary", help="[default: binary]")
    p.add_argument("--json", metavar="FILE", help="Save every figure here.")
    args = p.parse_args(argv)
    if not (1 <= args.messages <= 100_000 and 16 <= args.size <= 100_000 and 1 <= args.batch <= 10_000
            and 1 <= args.rounds <= 10):
        p.error("out of range: --messages [1, 100000], --size [16, 100000], --batch [1, 10000], --rounds [1, 10]")
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


class Clock:
    """Wall time, and this process's CPU time (Python and librdkafka threads: not the broker's)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rates(self, events: int) -> tuple[float, float]:
        """(events/s, client CPU microseconds per event)."""
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return events / wall, cpu / events * 1e6


def run_raw(config: KafkaSinkConfig, events: list[CloudEvent], topic: str) -> tuple[float, float]:
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


async def run_sink(config: KafkaSinkConfig, events: list[CloudEvent], batch: int) -> tuple[float, float]:
    sink: KafkaSink = config.build()
    await sink.send_batch([events[0]])  # connect and learn the topic outside the timing
    clock = Clock()
    for start in range(0, len(events), batch):
        await sink.send_batch(events[start:start + batch])
    rates = clock.rates(len(events))
    await sink.aclose()
    return rates


def end_offset(bootstrap: str, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "benchmark-check"})
    try:
        return consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
    finally:
        consumer.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    h.install_cleanup()
    events = make_events(args.messages, args.size)
    h.log(f"{args.messages} events of {args.size} B, {args.mode} mode, sink batches of {args.batch}, "
          f"{args.rounds} rounds; a fresh noida-db (Kafka protocol) for every run")
    results: dict[str, list[float]] = {"raw": [], "sink": []}
    cpu: dict[str, list[float]] = {"raw": [], "sink": []}
    for round_ in range(1, args.rounds + 1):
        for side in ("raw", "sink"):
            server = NoidaServer("kafka").start()
            try:
                topic = f"bench-{side}-{round_}"
                config = KafkaSinkConfig(bootstrap_servers=server.address, topic=topic, mode=args.mode)
                if side == "raw":
                    rate, us = run_raw(config, events, topic)
                else:
                    rate, us = asyncio.run(run_sink(config, events, args.batch))
                delivered = end_offset(server.address, topic) - 1  # minus the warm-up record
            finally:
                server.stop()
            if delivered < args.messages:
                raise RuntimeError(f"{side}: {delivered} of {args.messages} records in {topic}")
            results[side].append(rate)
            cpu[side].append(us)
            h.log(f"  round {round_}/{args.rounds} {side:>4}: {rate:>9,.0f} events/s, client CPU {us:5.1f} us/event")
    best = {side: max(rates) for side, rates in results.items()}
    median = {side: statistics.median(rates) for side, rates in results.items()}
    least_cpu = {side: min(us) for side, us in cpu.items()}
    ratio_best = best["sink"] / best["raw"]
    ratio_median = median["sink"] / median["raw"]
    for side, label in (("raw", "raw producer"), ("sink", "kafka sink  ")):
        h.log(f"{label}: best {best[side]:,.0f} events/s, median {median[side]:,.0f}; "
              f"client CPU {least_cpu[side]:.1f} us/event")
    verdict = "meets" if ratio_best >= TARGET else "misses"
    h.log(f"sink / raw: {ratio_best:.2f} (best), {ratio_median:.2f} (median); {verdict} the target {TARGET}")
    # CPU time per event is what other load on the machine disturbs least.
    h.log(f"raw / sink client CPU per event: {least_cpu['raw'] / least_cpu['sink']:.2f}")
    h.save_json(args.json, {"args": vars(args), "rounds": results, "cpu_us_per_event": cpu, "best": best,
                            "median": median, "ratio_best": ratio_best, "ratio_median": ratio_median,
                            "machine": h.machine_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
