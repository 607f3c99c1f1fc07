"""Forward source throughput against a raw msgpack decode of the same frames, in one run.

Frames are PackedForward (`[tag, bin entries, {"chunk": ...}]`) built up front. Three figures:

    baseline   msgpack only: unpack each frame and its entries (the floor any receiver pays)
    in-process the source's parse_frame + record -> CloudEvent conversion, no socket
    socket     the source on 127.0.0.1 with a no-op subscriber; a client writes the frames with
               up to --window chunks in flight and counts acks (client and server share one loop)

Records are either the fluentd sink's (`--shape cloudevent`: an inference request/response in the
CloudEvents JSON format, turned back into CloudEvents) or a plain log record (`--shape plain`).

    python benchmarks/forward_source.py                       # 200 frames x 500 records, 3 runs
    python benchmarks/forward_source.py --shape plain --frames 100 --records 1000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infer_logger import events as ev
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.cloudevents.json_format import to_dict
from infer_logger.sinks.fluentd import event_time
from pipelines.sources.forward import ForwardSourceConfig, parse_frame

LIMIT = 32 << 20


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--frames", type=int, default=200, help="Frames per run.  [default: 200]")
    p.add_argument("--records", type=int, default=500, help="Records per frame.  [default: 500]")
    p.add_argument("--shape", choices=["cloudevent", "plain"], default="cloudevent", help="[default: cloudevent]")
    p.add_argument("--window", type=int, default=8, help="Chunks in flight on the socket.  [default: 8]")
    p.add_argument("--repeat", type=int, default=3, help="Runs; the best of each figure counts.  [default: 3]")
    args = p.parse_args(argv)
    if not (1 <= args.frames <= 10_000 and 1 <= args.records <= 10_000 and 1 <= args.window <= 256
            and 1 <= args.repeat <= 20 and args.frames * args.records <= 5_000_000):
        p.error("out of range: --frames/--records [1, 10000] (product <= 5M), --window [1, 256], --repeat [1, 20]")
    return args


def record(i: int, shape: str) -> dict[str, object]:
    if shape == "plain":
        return {"level": "info", "msg": f"request {i} served", "path": "/v1/models/iris:predict",
                "status": 200, "latency_ms": 12.5, "user": f"u{i % 97}"}
    kind = (ev.REQUEST, ev.RESPONSE)[i % 2]
    data = b'{"instances":[[5.1,3.5,1.4,0.2]]}' if kind == ev.REQUEST else b'{"predictions":[0]}'
    event = CloudEvent({"specversion": "1.0", "id": f"id-{i // 2}", "source": "http://logger:8080", "type": kind,
                        "time": "2026-01-02T03:04:05.123456Z", "datacontenttype": "application/json",
                        "inferenceservicename": "iris", "namespace": "ns1", "component": "predictor",
                        "endpoint": "default", "modelname": "iris", "protocol": "v1"}, data)
    return to_dict(event)


def build_frames(count: int, per_frame: int, shape: str) -> list[bytes]:
    packer = msgpack.Packer(use_bin_type=True)
    now = time.time_ns()
    entries = b"".join(packer.pack([event_time(now + i), record(i, shape)]) for i in range(per_frame))
    # Same entries in every frame (building them is not what is measured); distinct chunk ids.
    return [packer.pack(["inference.iris.request", entries,
                         {"chunk": base64.b64encode(os.urandom(16)).decode(), "size": per_frame}])
            for _ in range(count)]


def baseline(frames: Sequence[bytes]) -> int:
    records = 0
    for frame in frames:
        _tag, entries, _option = msgpack.unpackb(frame, raw=False)
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(entries)
        records += sum(1 for _ in unpacker)
    return records


class NoOp:
    def __init__(self) -> None:
        self.records = 0

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        self.records += len(events)


def in_process(frames: Sequence[bytes]) -> int:
    source = ForwardSourceConfig(port=0).build(NoOp())
    records = 0
    for frame in frames:
        records += len(source.to_events(parse_frame(frame, LIMIT)))
    return records


async def over_socket(frames: Sequence[bytes], window: int) -> int:
    subscriber = NoOp()
    async with ForwardSourceConfig(port=0).build(subscriber) as source:
        reader, writer = await asyncio.open_connection("127.0.0.1", source.port)
        unpacker = msgpack.Unpacker(raw=False)
        sent = acked = 0
        async with asyncio.timeout(600):
            while acked < len(frames):
                while sent < len(frames) and sent - acked < window:
                    writer.write(frames[sent])
                    sent += 1
                await writer.drain()
                data = await reader.read(65536)
                if not data:
                    raise RuntimeError(f"the source closed the connection after {acked} acks")
                unpacker.feed(data)
                acked += sum(1 for reply in unpacker if "ack" in reply)
        writer.close()
    return subscriber.records


def timed(label: str, run: int, fn: Callable[[], int]) -> float:
    start = time.perf_counter()
    records = fn()
    seconds = time.perf_counter() - start
    rate = records / seconds
    log(f"  run {run}: {label:<10} {records} records in {seconds:.3f} s = {rate:,.0f} records/s")
    return rate


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log(f"building {args.frames} PackedForward frames x {args.records} {args.shape} records ...")
    frames = build_frames(args.frames, args.records, args.shape)
    log(f"  {sum(map(len, frames)) / len(frames) / 1024:.0f} KiB per frame")
    best: dict[str, float] = {"baseline": 0.0, "in-process": 0.0, "socket": 0.0}
    for run in range(1, args.repeat + 1):
        best["baseline"] = max(best["baseline"], timed("baseline", run, lambda: baseline(frames)))
        best["in-process"] = max(best["in-process"], timed("in-process", run, lambda: in_process(frames)))
        best["socket"] = max(best["socket"], timed(
            "socket", run, lambda: asyncio.run(over_socket(frames, args.window))))
    log(f"best of {args.repeat} ({args.shape} records):")
    for name, rate in best.items():
        log(f"  {name:<10} {rate:>12,.0f} records/s   ratio to baseline {rate / best['baseline']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
