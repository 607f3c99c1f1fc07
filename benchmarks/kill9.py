"""kill -9 of the sidecar under load: every answered request's events are still delivered.

Load (a fixed rate, each request with its own x-request-id, which becomes the event id) goes
through the sidecar, whose http sink points at a receiver (in its own process, up all along) that
decodes every event and records its id. Mid-load the sidecar gets SIGKILL; it is restarted on the
same spool directory and port while the load goes on. At the end, every request that got a 200
must have both its request and its response event at the receiver. Delivery is at-least-once:
duplicates are allowed and reported; events of requests whose answer never reached the client
(in flight at the kill) may or may not arrive and are reported too.

    python benchmarks/kill9.py                     # one kill, 300 req/s
    python benchmarks/kill9.py --kills 3 --json kill9.json
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _harness as h


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--kills", type=int, default=1, help="How many times to kill -9 and restart.  [default: 1]")
    p.add_argument("--before", type=float, default=5.0, help="Seconds of load before each kill.  [default: 5]")
    p.add_argument("--down", type=float, default=1.0,
                   help="Seconds between the kill and the restart (load keeps coming).  [default: 1]")
    p.add_argument("--after", type=float, default=5.0,
                   help="Seconds of load after the last restart.  [default: 5]")
    p.add_argument("--rate", type=float, default=300.0, help="Requests per second.  [default: 300]")
    p.add_argument("--model", choices=sorted(h.MODEL_NAMES), default="echo", help="[default: echo]")
    p.add_argument("--durability", choices=["disk", "memory"], default="disk",
                   help="The sidecar's spool durability (memory is expected to lose events).  [default: disk]")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="Max seconds to wait for every event after the load stops.  [default: 60]")
    p.add_argument("--workdir", type=Path, help="[default: a temp dir]")
    p.add_argument("--keep", action="store_true", help="Keep the work dir (spool, logs, ids file).")
    p.add_argument("--json", metavar="FILE", help="Save every figure here.")
    args = p.parse_args(argv)
    if not (1 <= args.kills <= 20 and 0.5 <= args.before <= 600 and 0 <= args.down <= 60
            and 0 <= args.after <= 600 and 1 <= args.rate <= 5000 and 1 <= args.drain_timeout <= 3600):
        p.error("out of range: --kills [1, 20], --before [0.5, 600], --down [0, 60], --after [0, 600], "
                "--rate [1, 5000], --drain-timeout [1, 3600]")
    return args


async def scenario(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    ids_path = workdir / "received-ids.txt"
    spool = workdir / "spool"
    predictor, purl = h.start_predictor(args.model, workdir)
    receiver, rurl = h.start_receiver(workdir, ids_file=ids_path)
    config = None
    if args.durability == "memory":
        config = workdir / "memory.yaml"
        config.write_text("spool:\n  durability: memory\n")
    sidecar, surl = h.start_sidecar(purl, spool, workdir, log_urls=[rurl], config=config)
    port = int(surl.rsplit(":", 1)[1])
    h.log(f"predictor pid {predictor.pid}, receiver pid {receiver.pid} ({rurl}), sidecar pid {sidecar.pid} "
          f"({surl}, spool {spool}, durability {args.durability}); load {args.rate:g} req/s")
    load = h.RateLoad(f"{surl}/v1/models/{h.MODEL_NAMES[args.model]}:predict", args.rate, "k9",
                      max_inflight=256, timeout=10.0)
    total = args.kills * (args.before + args.down + 30) + args.after + 30
    load_task = asyncio.create_task(load.run(total))
    kills: list[dict[str, Any]] = []
    ids = h.IdsFile(ids_path)
    try:
        for n in range(1, args.kills + 1):
            await asyncio.sleep(args.before)
            m = h.scrape(surl)
            # Kill while requests are in flight (bounded wait): the case where it can go wrong.
            for _ in range(2000):
                if load._inflight > 0:
                    break
                await asyncio.sleep(0.001)
            ok_before = len(load.stats.ok_ids)
            inflight = load._inflight
            sidecar.kill9()
            killed_at = time.monotonic()
            h.log(f"kill -9 #{n}: sidecar pid {sidecar.pid} killed with {inflight} requests in flight; "
                  f"{ok_before} answered 200 so far; its sink had delivered "
                  f"{h.metric_sum(m, 'infer_logger_events_delivered_total'):.0f} events ~just before")
            await asyncio.sleep(args.down)
            # The restart blocks this loop for about a second (readiness polling); the load catches
            # up on its schedule right after (RateLoad sends what is due, bounded by max_inflight).
            sidecar, _ = await asyncio.to_thread(h.start_sidecar, purl, spool, workdir, port=port,
                                                 log_urls=[rurl], config=config, name=f"sidecar{n + 1}")
            back = time.monotonic() - killed_at
            h.log(f"restarted on port {port} (pid {sidecar.pid}), serving {back:.2f} s after the kill")
            kills.append({"n": n, "inflight_at_kill": inflight, "answered_before": ok_before,
                          "restart_s": round(back, 2)})
        await asyncio.sleep(args.after)
        load.stop.set()
        await asyncio.wait_for(load_task, timeout=30)
        answered = load.stats.ok_ids
        h.log(f"load stopped: {load.stats.sent} sent, {len(answered)} answered 200; waiting up to "
              f"{args.drain_timeout:g} s for their events")
        waited_from = time.monotonic()
        deadline = waited_from + args.drain_timeout
        all_in: float | None = None
        while time.monotonic() < deadline:
            ids.poll()
            if not ids.missing(answered):
                all_in = time.monotonic() - waited_from
                break
            await asyncio.sleep(0.25)
        await asyncio.sleep(1.0)  # late duplicates, if any
        ids.poll()
        final = h.scrape(surl)
    finally:
        load.stop.set()
        await asyncio.gather(load_task, return_exceptions=True)
    answered = load.stats.ok_ids
    answered_set = set(answered)
    both = [i for i in answered if ids.has_both(i)]
    req_only = [i for i in answered if (i, "request") in ids.counts and (i, "response") not in ids.counts]
    resp_only = [i for i in answered if (i, "response") in ids.counts and (i, "request") not in ids.counts]
    none = [i for i in answered if (i, "request") not in ids.counts and (i, "response") not in ids.counts]
    unanswered_ids = {rid for (rid, _) in ids.counts if rid not in answered_set}
    return {
        "model": args.model,
        "rate": args.rate,
        "durability": args.durability,
        "kills": kills,
        "requests_sent": load.stats.sent,
        "answered_200": len(answered),
        "non_200": sum(1 for s in load.stats.answered.values() if s != 200),
        "client_failures": load.stats.failures,
        "late": load.stats.late,
        "delivered_both": len(both),
        "delivered_ratio": round(len(both) / max(1, len(answered)), 6),
        "request_event_only": len(req_only),
        "response_event_only": len(resp_only),
        "no_event": len(none),
        "missing_examples": (req_only + resp_only + none)[:5],
        "events_received": ids.received,
        "events_received_unique": ids.unique,
        "duplicates": ids.duplicates,
        "duplicated_events": sum(1 for c in ids.counts.values() if c > 1),
        "ids_not_answered_with_events": len(unanswered_ids),
        "events_of_unanswered_ids": sum(c for (rid, _), c in ids.counts.items() if rid not in answered_set),
        "all_delivered_s_after_load_stop": round(all_in, 2) if all_in is not None else None,
        "last_sidecar_dropped": h.metric_sum(final, "infer_logger_events_dropped_total"),
        "last_sidecar_corrupt_segments": final.get('infer_logger_events_dropped_total{reason="corrupt_segments"}'),
    }


def report(r: dict[str, Any]) -> None:
    h.log("\n== kill -9 ==")
    h.log(f"load: {r['rate']:g} req/s; {r['requests_sent']} sent, {r['answered_200']} answered 200, "
          f"{r['non_200']} other statuses, client failures {r['client_failures'] or 0} (refused/reset while the "
          f"sidecar was down), late {r['late']}; durability {r['durability']}")
    for k in r["kills"]:
        h.log(f"  kill #{k['n']}: {k['inflight_at_kill']} in flight at the kill; back {k['restart_s']} s later")
    ok = r["delivered_ratio"] == 1.0
    h.log(f"answered requests with both events delivered: {r['delivered_both']} / {r['answered_200']} = "
          f"{r['delivered_ratio']:.6f}  -> target 1.0: {'MET' if ok else 'MISSED'}")
    if not ok:
        h.log(f"  missing: request event only {r['request_event_only']}, response event only "
              f"{r['response_event_only']}, neither {r['no_event']}; e.g. {r['missing_examples']}")
    h.log(f"events received {r['events_received']} ({r['events_received_unique']} distinct); duplicates "
          f"{r['duplicates']} (on {r['duplicated_events']} events; at-least-once allows them)")
    h.log(f"ids never answered to the client but logged: {r['ids_not_answered_with_events']} "
          f"({r['events_of_unanswered_ids']} events; requests in flight at the kill)")
    h.log(f"everything arrived {r['all_delivered_s_after_load_stop']} s after the load stopped; last sidecar: "
          f"dropped {r['last_sidecar_dropped']:.0f}, corrupt segments {r['last_sidecar_corrupt_segments']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    h.install_cleanup()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="infer-logger-kill9-"))
    workdir.mkdir(parents=True, exist_ok=True)
    h.log(f"setup: {h.machine_info()}; load generator: aiohttp in this process; work dir {workdir}")
    try:
        result = asyncio.run(scenario(args, workdir))
    finally:
        h.stop_all()
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report(result)
    h.save_json(args.json, result)
    return 0 if result["delivered_ratio"] == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
