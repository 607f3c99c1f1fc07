"""The audit store's CPU per exchange in the delivery process, against plain SQLite in the same run.

The spool is filled by the sidecar's own logging code (`InferenceLogger.begin`/`end`, as a proxied
one-row V1 call makes them), outside the timing. Then each side drains its own copy of it, in
batches of `--batch` events as the sink worker takes them:

    spool      read and decode the spool only
    store      read, decode and `AuditStore.write`: what the delivery process does for the store
    store-v4   the same, the ids being random UUIDv4 `x-request-id`s a client sent (the sidecar's
               own ids are UUIDv7, time-ordered)
    insert     the floor: the same rows, built outside the timing, written by a plain `INSERT`
               (no upsert, no status spread) into a fresh store, one transaction per batch

The figure is this process's CPU time per exchange (a request and its response event), which the
machine's load disturbs less than wall time; each side's fastest and median round are reported,
rounds alternating the sides. `store / (spool + insert)` is what the store costs over reading the
spool and writing its rows the cheapest way SQLite can; `store-v4 / store` what random ids cost.
Why it matters: on a small machine the delivery process's CPU is what logging to the store costs
the predictor (README, "Measured").

    python benchmarks/store_write.py                     # 50k exchanges, 5 rounds
    python benchmarks/store_write.py --exchanges 200000 --rounds 3 --json store.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _harness as h

sys.path.insert(0, str(h.REPO))  # infer_logger, also when run as a script

from infer_logger import events
from infer_logger import store as store_module
from infer_logger.config import load_settings
from infer_logger.logger import InferenceLogger, match_route
from infer_logger.spool import DiskSpool
from infer_logger.store import AuditStore

SIDES = ("spool", "store", "store-v4", "insert")
PATH = "/v1/models/echo:predict"
RESPONSE = b'{"predictions": [[5.1, 3.5, 1.4, 0.2]]}'


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--exchanges", type=int, default=50_000, help="Exchanges per side and round.  [default: 50000]")
    p.add_argument("--batch", type=int, default=500, help="Events per store write.  [default: 500]")
    p.add_argument("--rounds", type=int, default=5, help="Rounds of every side.  [default: 5]")
    p.add_argument("--json", metavar="FILE", help="Save every figure here.")
    args = p.parse_args(argv)
    if not (1_000 <= args.exchanges <= 1_000_000 and 2 <= args.batch <= 10_000 and 1 <= args.rounds <= 20):
        p.error("out of range: --exchanges [1000, 1000000], --batch [2, 10000], --rounds [1, 20]")
    return args


def fill_spool(directory: Path, exchanges: int, *, random_ids: bool) -> None:
    """The spool a sidecar writes for `exchanges` one-row V1 calls to the echo model."""
    settings = load_settings(predictor_url="http://127.0.0.1:9", inference_service="echo",
                             spool={"dir": str(directory)}, delivery={"mode": "inline"},
                             log_url=[f"file://{directory.parent / 'unused.jsonl'}"])
    logger = InferenceLogger(settings)  # never started: only its request-path half runs
    route = match_route("POST", PATH)
    assert route is not None
    raw = [(b"host", b"127.0.0.1:9081"), (b"content-type", b"application/json"),
           (b"content-length", str(len(h.BODY)).encode())]
    headers = {k.decode(): v.decode() for k, v in raw}
    try:
        for _ in range(exchanges):
            event_id = str(uuid.uuid4()) if random_ids else events.event_id(headers)
            exchange = logger.begin(route, PATH, headers, raw, h.BODY, event_id)
            logger.end(exchange, 200, "application/json", RESPONSE)
    finally:
        logger.spool.close()


def fresh_copy(pristine: Path, run: Path) -> Path:
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(pristine, run / "spool")
    return run / "spool"


def drain(spool_dir: Path, batch: int, write: Callable[[list[Any]], object]) -> tuple[int, float]:
    """Reads the whole spool batch by batch, handing each to `write`; (events, CPU seconds)."""
    spool = DiskSpool(spool_dir)
    try:
        reader = spool.reader("store")
        cursor, seen = reader.position, 0
        started = time.process_time()
        while True:
            got, cursor = reader.read(batch, cursor)
            if not got:
                break
            write(got)
            seen += len(got)
        return seen, time.process_time() - started
    finally:
        spool.close()


def run_insert(spool_dir: Path, db: Path, batch: int) -> tuple[int, float]:
    """Plain INSERTs of the rows the store would write, built before the timing."""
    rows: list[list[tuple[Any, ...]]] = []

    def build(got: list[Any]) -> None:
        pairs = {}
        for event in got:
            pairs.setdefault(store_module._exchange_key(event), {})[event.type] = event
        rows.append([row for key, pair in pairs.items()
                     for row in store_module._exchange_rows(key, pair[events.REQUEST], pair[events.RESPONSE], "x")])

    drain(spool_dir, batch, build)
    columns = store_module._EXCHANGE_COLUMNS
    sql = f"INSERT INTO records ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    with AuditStore(db) as store:
        conn = store._conn
        started = time.process_time()
        for chunk in rows:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(sql, chunk)
            conn.execute("COMMIT")
        return sum(map(len, rows)) * 2, time.process_time() - started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = h.machine_info()
    h.log(f"{args.exchanges} exchanges (one-row V1, echo), batches of {args.batch} events, {args.rounds} rounds; "
          f"{info['cpus']} CPUs, load {info['loadavg'][0]:.2f}")
    cpu: dict[str, list[float]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="store-write-bench-") as tmp:
        root = Path(tmp)
        for name, random_ids in (("v7", False), ("v4", True)):
            fill_spool(root / name / "spool", args.exchanges, random_ids=random_ids)
        h.log("spools filled: " + ", ".join(
            f"{name} {sum(p.stat().st_size for p in (root / name / 'spool').glob('*.seg')) / 1e6:.1f} MB"
            for name in ("v7", "v4")))
        for round_ in range(1, args.rounds + 1):
            for side in SIDES[round_ % len(SIDES):] + SIDES[:round_ % len(SIDES)]:
                pristine = root / ("v4" if side == "store-v4" else "v7")
                spool_dir = fresh_copy(pristine / "spool", root / "run")
                if side != "spool" and not any(spool_dir.glob("*.seg")):
                    raise RuntimeError(f"{side}: empty spool copy")
                db = root / "run" / "audit.db"
                if side == "spool":
                    seen, seconds = drain(spool_dir, args.batch, lambda got: None)
                elif side == "insert":
                    seen, seconds = run_insert(spool_dir, db, args.batch)
                else:
                    with AuditStore(db) as store:
                        seen, seconds = drain(spool_dir, args.batch, store.write)
                        rows = store.summary().records
                    if rows != args.exchanges:
                        raise RuntimeError(f"{side}: {rows} rows for {args.exchanges} exchanges")
                if seen != 2 * args.exchanges:
                    raise RuntimeError(f"{side}: {seen} events of {2 * args.exchanges}")
                us = seconds / args.exchanges * 1e6
                cpu[side].append(us)
                h.log(f"  round {round_}/{args.rounds} {side:>8}: {us:5.1f} us CPU per exchange")
    least = {side: min(values) for side, values in cpu.items()}
    median = {side: statistics.median(values) for side, values in cpu.items()}
    h.log("")
    for side in SIDES:
        h.log(f"{side:>9}: fastest {least[side]:5.1f} us per exchange, median {median[side]:5.1f}")
    floor = least["spool"] + least["insert"]
    ratios = {"store/(spool+insert)": least["store"] / floor, "store-v4/store": least["store-v4"] / least["store"]}
    h.log(f"store / (spool + insert): {ratios['store/(spool+insert)']:.2f} (fastest rounds): the store's upserts "
          f"and Python rows over reading the spool and a plain INSERT of the same rows")
    h.log(f"store-v4 / store: {ratios['store-v4/store']:.2f}: random client ids against the sidecar's UUIDv7")
    h.save_json(args.json, {"setup": {**info, **vars(args)}, "cpu_us_per_exchange": cpu, "ratios": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
