"""A sink outage under steady load: memory stays bounded, nothing is lost, the backlog drains.

Steady load (a fixed rate, each request with its own x-request-id) goes through the sidecar,
whose http sink points at a receiver in its own process. Phases:

    before   receiver up                 (RSS baseline: the sidecar's RSS at the end of it)
    outage   receiver stopped            (events pile up in the spool; the sink retries)
    after    receiver back, same port    (load goes on)
    drain    load stopped; wait until every answered request's two events arrived

The sidecar's RSS (VmRSS from /proc/<pid>/status, its delivery process's added) and its /metrics
(`infer_logger_spool_bytes`, sink lag) are sampled every second. The receiver decodes every event with infer-logger's codec
and records its id, so "received" is counted by id, not trusted from the sidecar's counters.

    python benchmarks/outage.py                       # 60 s outage at 400 req/s
    python benchmarks/outage.py --outage 10 --json outage.json
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _harness as h

TARGET_MAX_RSS = 200 * (1 << 20)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--outage", type=float, default=60.0, help="Seconds the receiver is down.  [default: 60]")
    p.add_argument("--before", type=float, default=10.0, help="Seconds of load before the outage.  [default: 10]")
    p.add_argument("--after", type=float, default=10.0,
                   help="Seconds of load after the receiver is back.  [default: 10]")
    p.add_argument("--rate", type=float, default=400.0, help="Requests per second.  [default: 400]")
    p.add_argument("--model", choices=sorted(h.MODEL_NAMES), default="echo", help="[default: echo]")
    p.add_argument("--drain-timeout", type=float, default=180.0,
                   help="Max seconds to wait for every event after the load stops.  [default: 180]")
    p.add_argument("--workdir", type=Path, help="[default: a temp dir]")
    p.add_argument("--keep", action="store_true", help="Keep the work dir (spool, logs, ids file).")
    p.add_argument("--json", metavar="FILE", help="Save every figure and sample here.")
    args = p.parse_args(argv)
    if not (1 <= args.outage <= 3600 and 1 <= args.before <= 600 and 0 <= args.after <= 600
            and 1 <= args.rate <= 5000 and 1 <= args.drain_timeout <= 3600):
        p.error("out of range: --outage [1, 3600], --before [1, 600], --after [0, 600], --rate [1, 5000], "
                "--drain-timeout [1, 3600]")
    return args


class Sampler:
    """Once a second: RSS, spool bytes, sink lag, load progress, events received."""

    def __init__(self, sidecar: h.Proc, sidecar_url: str, load: h.RateLoad, ids: h.IdsFile) -> None:
        self.sidecar = sidecar
        self.url = sidecar_url
        self.load = load
        self.ids = ids
        self.phase = "before"
        self.samples: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    async def run(self, stop: asyncio.Event) -> None:
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
            for tick in range(24 * 3600):  # bounded; ends when `stop` is set
                sample: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 1), "phase": self.phase,
                                          "rss": self.sidecar.rss_bytes()}
                try:
                    async with session.get(self.url + "/metrics") as resp:
                        m = h.parse_metrics(await resp.text())
                    sample["spool_bytes"] = h.metric_sum(m, "infer_logger_spool_bytes")
                    sample["lag_bytes"] = h.metric_sum(m, "infer_logger_sink_lag_bytes")
                    sample["accepted"] = h.metric_sum(m, "infer_logger_events_accepted_total")
                    sample["delivered"] = h.metric_sum(m, "infer_logger_events_delivered_total")
                    sample["retried"] = h.metric_sum(m, "infer_logger_batches_retried_total")
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    sample["metrics_error"] = type(exc).__name__
                self.ids.poll()
                sample["answered_200"] = sum(1 for s in self.load.stats.answered.values() if s == 200)
                sample["received"] = self.ids.received
                self.samples.append(sample)
                if tick % 5 == 0:
                    h.log(f"  t={sample['t']:6.1f}s {self.phase:<7} rss {h.mib(sample['rss']):>10}  spool "
                          f"{h.mib(sample.get('spool_bytes')):>10}  answered {sample['answered_200']:>7}  "
                          f"received events {sample['received']:>7}  batches retried {sample.get('retried', 0):.0f}")
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                    return
                except TimeoutError:
                    pass


async def scenario(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    ids_path = workdir / "received-ids.txt"
    predictor, purl = h.start_predictor(args.model, workdir)
    receiver, rurl = h.start_receiver(workdir, ids_file=ids_path)
    receiver_port = int(rurl.rsplit(":", 1)[1].strip("/"))
    sidecar, surl = h.start_sidecar(purl, workdir / "spool", workdir, log_urls=[rurl])
    h.log(f"predictor pid {predictor.pid} ({purl}), receiver pid {receiver.pid} ({rurl}), "
          f"sidecar pid {sidecar.pid} ({surl}); load {args.rate:g} req/s")
    name = h.MODEL_NAMES[args.model]
    load = h.RateLoad(f"{surl}/v1/models/{name}:predict", args.rate, "outage")
    ids = h.IdsFile(ids_path)
    sampler = Sampler(sidecar, surl, load, ids)
    stop_sampling = asyncio.Event()
    total_load = args.before + args.outage + args.after + 30
    load_task = asyncio.create_task(load.run(total_load))
    sample_task = asyncio.create_task(sampler.run(stop_sampling))
    times: dict[str, float] = {}
    try:
        await asyncio.sleep(args.before)
        baseline_rss = sidecar.rss_bytes()
        h.log(f"stopping the receiver (pid {receiver.pid}) for {args.outage:g} s; baseline RSS {h.mib(baseline_rss)}")
        sampler.phase = "outage"
        receiver.stop()
        times["outage_start"] = time.monotonic()
        await asyncio.sleep(args.outage)
        answered_before_back = list(load.stats.ok_ids)
        receiver, _ = h.start_receiver(workdir, port=receiver_port, ids_file=ids_path)
        times["receiver_back"] = time.monotonic()
        sampler.phase = "after"
        h.log(f"receiver back on port {receiver_port} (pid {receiver.pid}); "
              f"{len(answered_before_back)} requests answered so far")
        backlog_done: float | None = None
        deadline = time.monotonic() + args.after
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            if backlog_done is None:
                ids.poll()
                if not ids.missing(answered_before_back):
                    backlog_done = time.monotonic()
        load.stop.set()
        await asyncio.wait_for(load_task, timeout=30)
        times["load_stop"] = time.monotonic()
        sampler.phase = "drain"
        answered = load.stats.ok_ids
        h.log(f"load stopped: {len(answered)} answered 200; waiting up to {args.drain_timeout:g} s for their events")
        all_done: float | None = None
        deadline = time.monotonic() + args.drain_timeout
        while time.monotonic() < deadline:
            ids.poll()
            if backlog_done is None and not ids.missing(answered_before_back):
                backlog_done = time.monotonic()
            if not ids.missing(answered):
                all_done = time.monotonic()
                break
            await asyncio.sleep(0.25)
        await asyncio.sleep(1.5)  # one more sample after the end
    finally:
        stop_sampling.set()
        load.stop.set()
        await asyncio.gather(sample_task, load_task, return_exceptions=True)
    ids.poll()
    try:
        final = h.scrape(surl)
    except (OSError, RuntimeError, ValueError):
        final = {}
    answered = load.stats.ok_ids
    missing = ids.missing(answered)
    samples = sampler.samples
    rss = [s["rss"] for s in samples if s.get("rss")]
    spool = [s["spool_bytes"] for s in samples if "spool_bytes" in s]
    outage_rss = [s["rss"] for s in samples if s.get("rss") and s["phase"] == "outage"]
    lat = sorted(load.stats.latencies)
    answered_set = set(answered)
    return {
        "model": args.model,
        "rate": args.rate,
        "outage_s": args.outage,
        "requests_sent": load.stats.sent,
        "answered_200": len(answered),
        "non_200": sum(1 for s in load.stats.answered.values() if s != 200),
        "client_failures": load.stats.failures,
        "late": load.stats.late,
        "achieved_rps": round(len(answered) / max(1e-9, times["load_stop"] - sampler.t0), 1),
        "latency_p50_ms": round(lat[len(lat) // 2] * 1000, 2) if lat else None,
        "latency_p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2) if lat else None,
        "events_expected": 2 * len(answered),
        "events_accepted_by_sidecar": h.metric_sum(final, "infer_logger_events_accepted_total"),
        "events_delivered_by_sidecar": h.metric_sum(final, "infer_logger_events_delivered_total"),
        "events_dropped_by_sidecar": h.metric_sum(final, "infer_logger_events_dropped_total"),
        "events_received": ids.received,
        "events_received_unique": ids.unique,
        "duplicates": ids.duplicates,
        "answered_missing_events": len(missing),
        "missing_examples": missing[:5],
        "events_for_unanswered_ids": sum(1 for (rid, _) in ids.counts if rid not in answered_set),
        "baseline_rss": baseline_rss,
        "max_rss": max(rss) if rss else None,
        "max_rss_during_outage": max(outage_rss) if outage_rss else None,
        "median_rss": statistics.median(rss) if rss else None,
        "spool_bytes_peak": max(spool) if spool else None,
        "backlog_drain_s": round(backlog_done - times["receiver_back"], 2) if backlog_done else None,
        "all_delivered_s_after_receiver_back": round(all_done - times["receiver_back"], 2) if all_done else None,
        "all_delivered_s_after_load_stop": round(all_done - times["load_stop"], 2) if all_done else None,
        "batches_retried": h.metric_sum(final, "infer_logger_batches_retried_total"),
        "samples": samples,
    }


def report(r: dict[str, Any]) -> None:
    h.log("\n== outage ==")
    h.log(f"load: {r['rate']:g} req/s target, {r['achieved_rps']:g} answered/s; {r['answered_200']} answered 200, "
          f"{r['non_200']} other statuses, client failures {r['client_failures'] or 0}, late {r['late']}; "
          f"client p50 {r['latency_p50_ms']} ms, p99 {r['latency_p99_ms']} ms")
    base, peak = r["baseline_rss"], r["max_rss"]
    ratio = f"{peak / base:.2f}x baseline" if base and peak else "?"
    ok_rss = peak is not None and peak < TARGET_MAX_RSS
    h.log(f"RSS: baseline {h.mib(base)} (end of the first phase), max {h.mib(peak)} ({ratio}), max during the "
          f"outage {h.mib(r['max_rss_during_outage'])}  -> target < 200 MiB: {'MET' if ok_rss else 'MISSED'}")
    h.log(f"spool bytes peak: {h.mib(r['spool_bytes_peak'])}; batches retried: {r['batches_retried']:.0f}")
    complete = r["answered_missing_events"] == 0
    h.log(f"events: expected {r['events_expected']} (2 per answered request), sidecar accepted "
          f"{r['events_accepted_by_sidecar']:.0f}, delivered {r['events_delivered_by_sidecar']:.0f}, dropped "
          f"{r['events_dropped_by_sidecar']:.0f}; receiver got {r['events_received']} "
          f"({r['events_received_unique']} distinct, {r['duplicates']} duplicates)")
    h.log(f"answered requests missing an event: {r['answered_missing_events']}"
          + (f" e.g. {r['missing_examples']}" if r["missing_examples"] else "")
          + f"  -> target all delivered: {'MET' if complete else 'MISSED'}"
          + f"; received/expected {r['events_received_unique'] / max(1, r['events_expected']):.4f}")
    h.log(f"time to drain: the outage's backlog arrived {r['backlog_drain_s']} s after the receiver came back; "
          f"everything arrived {r['all_delivered_s_after_receiver_back']} s after it came back "
          f"({r['all_delivered_s_after_load_stop']} s after the load stopped)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    h.install_cleanup()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="infer-logger-outage-"))
    workdir.mkdir(parents=True, exist_ok=True)
    busy = h.cpu_busy(1.0)
    h.log(f"setup: {h.machine_info()}; no CPU pinning; load generator: aiohttp in this process; "
          f"machine busy before start {busy:.0%}; work dir {workdir}")
    try:
        result = asyncio.run(scenario(args, workdir))
    finally:
        h.stop_all()
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report(result)
    h.save_json(args.json, result)
    ok = (result["answered_missing_events"] == 0 and result["max_rss"] is not None
          and result["max_rss"] < TARGET_MAX_RSS)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
