"""The elasticsearch sink's throughput against two baselines, on one noida-db started here.

Every method writes the same audit documents (request and response of `--events / 2` exchanges,
one instance each: one upsert per event) into an index of its own, and the index is checked
afterwards (`_count` = exchanges, a response on every document):

    sink          ElasticsearchSink.send_batch, batches of 500 events (the worker's default);
                  it also builds the documents from the events, the baselines get them ready-made
    helpers.bulk  elasticsearch.helpers.bulk of the same `update` + `doc_as_upsert` actions
    per event     one `update ... refresh=true` per event: how Seldon's request logger wrote

Targets: sink / helpers.bulk >= 0.8, sink / per event >= 10: the median over rounds of each
round's ratio (rounds alternate the order of the methods). `sink (httpx node)` is the same sink
with `node_class="httpxasync"`, for the choice of the client's HTTP layer. The per-event baseline is slow by design, so it runs on fewer events.

    python benchmarks/elasticsearch_sink.py                  # 5000 events, 5 rounds
    python benchmarks/elasticsearch_sink.py --events 2000 --rounds 1 --json es.json
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import _harness as h
import orjson

sys.path.insert(0, str(h.REPO))  # run as a script: infer_logger and tests live in the repo root

from elastic_transport import BaseAsyncNode, HttpxAsyncHttpNode
from elasticsearch import AsyncElasticsearch, Elasticsearch, helpers

from infer_logger import audit, events
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.sinks.elasticsearch import (
    ElasticsearchSink,
    ElasticsearchSinkConfig,
    setup_elasticsearch,
)
from tests.services import NoidaServer

BATCH = 500
TARGET_BULK = 0.8
TARGET_PER_EVENT = 10.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--events", type=int, default=5000, help="Events per round, sink and bulk.  [default: 5000]")
    p.add_argument("--per-event", type=int, default=1000,
                   help="Events per round for the one-update-per-event baseline.  [default: 1000]")
    p.add_argument("--rounds", type=int, default=5, help="[default: 5]")
    p.add_argument("--json", metavar="FILE", help="Save every figure here.")
    args = p.parse_args(argv)
    if not (2 <= args.events <= 50_000 and 2 <= args.per_event <= 10_000 and 1 <= args.rounds <= 10):
        p.error("out of range: --events [2, 50000], --per-event [2, 10000], --rounds [1, 10]")
    return args


def make_events(service: str, n: int) -> list[CloudEvent]:
    """n events: n/2 exchanges, each a one-row V1 request then its response (spool order)."""
    out: list[CloudEvent] = []
    base = {"source": "http://sidecar", "specversion": "1.0", "namespace": "bench", "inferenceservicename": service,
            "modelname": service, "component": "predictor", "protocol": "v1",
            "path": f"/v1/models/{service}:predict", "metadata": '{"x-user": ["ann"]}',
            "datacontenttype": "application/json"}
    for i in range(n // 2):
        rid = f"{service}-{i:06d}"
        x = [5.1 + i % 7, 3.5, 1.4, 0.2]
        out.append(CloudEvent({**base, "id": rid, "type": events.REQUEST, "time": "2025-01-01T00:00:00.000000Z"},
                              orjson.dumps({"instances": [x]})))
        out.append(CloudEvent({**base, "id": rid, "type": events.RESPONSE, "time": "2025-01-01T00:00:00.004000Z",
                               "statuscode": 200, "latencyms": 4}, orjson.dumps({"predictions": [[0.1, 0.9]]})))
    return out


def index_of(service: str) -> str:
    return f"inference-log-bench-{service}"


def actions(evs: list[CloudEvent]) -> list[dict[str, Any]]:
    """The sink's documents, as helpers.bulk actions (built before the clock starts)."""
    return [{"_op_type": "update", "_index": index_of(str(e["inferenceservicename"])), "_id": doc_id,
             "doc": doc, "doc_as_upsert": True}
            for e in evs for doc_id, doc in audit.documents(e)]


async def run_sink(url: str, evs: list[CloudEvent], node_class: type[BaseAsyncNode] | None) -> None:
    config = ElasticsearchSinkConfig(url=url, index="inference-log-{namespace}-{inferenceservicename}")
    client = AsyncElasticsearch(url, node_class=node_class) if node_class else None
    sink = ElasticsearchSink(config, client)
    try:
        for start in range(0, len(evs), BATCH):
            await sink.send_batch(evs[start : start + BATCH])
    finally:
        await sink.aclose()


def run_bulk(es: Elasticsearch, acts: list[dict[str, Any]]) -> None:
    ok, errors = helpers.bulk(es, acts, chunk_size=BATCH, raise_on_error=True)
    assert ok == len(acts), errors


def run_per_event(es: Elasticsearch, acts: list[dict[str, Any]]) -> None:
    for a in acts:
        es.update(index=a["_index"], id=a["_id"], doc=a["doc"], doc_as_upsert=True, refresh=True)


def check(es: Elasticsearch, service: str, exchanges: int) -> None:
    index = index_of(service)
    es.indices.refresh(index=index)
    count = es.count(index=index)["count"]
    joined = es.count(index=index, query={"bool": {"filter": [{"exists": {"field": "request"}},
                                                               {"term": {"status": 200}}]}})["count"]
    if count != exchanges or joined != exchanges:
        raise RuntimeError(f"{index}: {count} documents, {joined} joined; expected {exchanges}")


def timed(label: str, n: int, fn: Callable[[], None]) -> tuple[float, float]:
    """(events/s, client CPU us/event): the server shares the 2 cores, so both matter."""
    started, cpu = time.perf_counter(), time.process_time()
    fn()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    rate = n / seconds
    h.log(f"  {label:<20} {n:>6} events in {seconds:6.2f} s = {rate:7.0f} events/s, "
          f"client CPU {cpu / n * 1e6:5.0f} us/event")
    return rate, cpu / n * 1e6


def methods(url: str, es: Elasticsearch, evs: dict[str, list[CloudEvent]],
            acts: dict[str, list[dict[str, Any]]]) -> dict[str, Callable[[], None]]:
    return {
        "sink": lambda: asyncio.run(run_sink(url, evs["sink"], None)),
        "sink_httpx": lambda: asyncio.run(run_sink(url, evs["sink_httpx"], HttpxAsyncHttpNode)),
        "bulk": lambda: run_bulk(es, acts["bulk"]),
        "per_event": lambda: run_per_event(es, acts["per_event"]),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    h.install_cleanup()
    h.log(f"machine: {h.machine_info()}")
    server = NoidaServer("elasticsearch").start()
    try:
        url = server.address
        h.log(f"noida-db elasticsearch at {url}; {setup_elasticsearch(url)[1]}")
        es = Elasticsearch(url, request_timeout=60)
        rates: dict[str, list[float]] = {"sink": [], "sink_httpx": [], "bulk": [], "per_event": []}
        cpu: dict[str, list[float]] = {m: [] for m in rates}
        for r in range(args.rounds):
            h.log(f"round {r + 1}/{args.rounds}")
            names = {m: f"{m.replace('_', '')}{r}" for m in rates}
            evs = {m: make_events(names[m], args.per_event if m == "per_event" else args.events) for m in rates}
            acts = {m: actions(evs[m]) for m in ("bulk", "per_event")}
            runs = methods(url, es, evs, acts)
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for m in order:
                label = {"sink": "sink (aiohttp)", "sink_httpx": "sink (httpx node)", "bulk": "helpers.bulk",
                         "per_event": "update refresh=true"}[m]
                rate, us = timed(label, len(evs[m]), runs[m])
                rates[m].append(rate)
                cpu[m].append(us)
                check(es, names[m], len(evs[m]) // 2)
        es.close()
    finally:
        server.stop()
    median = {m: statistics.median(v) for m, v in rates.items()}
    # Paired by round: noida's pauses and other load on the machine hit a round's methods alike.
    vs_bulk = statistics.median(a / b for a, b in zip(rates["sink"], rates["bulk"]))
    vs_per_event = statistics.median(a / b for a, b in zip(rates["sink"], rates["per_event"]))
    vs_httpx = statistics.median(a / b for a, b in zip(rates["sink_httpx"], rates["sink"]))
    h.log("\nmedian events/s: " + ", ".join(f"{m} {v:.0f}" for m, v in median.items()))
    h.log("median client CPU us/event: " + ", ".join(f"{m} {statistics.median(v):.0f}" for m, v in cpu.items()))
    h.log(f"sink / helpers.bulk        = {vs_bulk:5.2f}  (target >= {TARGET_BULK})  "
          f"{'OK' if vs_bulk >= TARGET_BULK else 'MISSED'}")
    h.log(f"sink / update refresh=true = {vs_per_event:5.1f}  (target >= {TARGET_PER_EVENT:g})  "
          f"{'OK' if vs_per_event >= TARGET_PER_EVENT else 'MISSED'}")
    h.log(f"httpx node / aiohttp node  = {vs_httpx:5.2f}")
    h.save_json(args.json, {"args": vars(args), "rates": rates, "median": median, "cpu_us_per_event": cpu,
                            "sink_vs_bulk": vs_bulk, "sink_vs_per_event": vs_per_event})
    return 0 if vs_bulk >= TARGET_BULK and vs_per_event >= TARGET_PER_EVENT else 1  # 1: a target missed


if __name__ == "__main__":
    sys.exit(main())
