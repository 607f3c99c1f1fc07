"""Throughput and latency of the sidecar against a baseline measured in the same run.

For each predictor (the trivial `echo` one and the scikit-learn `iris` one) and each wrk
concurrency, wrk POSTs a one-row V1 body to `/v1/models/<name>:predict` through:

    direct      the predictor itself (the baseline)
    nginx       nginx as a plain reverse proxy (upstream keepalive, HTTP/1.1, access_log off)
    off         the sidecar, every request sent with `x-skip-logging: true` (whole proxy path,
                no event appended)
    store       the sidecar logging to the embedded store (its default sink; spool on disk)
    store-inline  the same with `delivery: {mode: inline}`: the store written by a thread of the
                sidecar's own process instead of its delivery process (not in the default set)
    http        the sidecar logging to the http sink (binary mode, what `--log-url` gives: one POST
                per event) to a receiver in its own process that counts and answers 202
    http-batch  the same with `mode: batch` (one POST per batch of up to 500 events)

and prints requests/s, p50/p99 latency, then the ratios against `direct` and the cost of logging
against `off`, with the targets. All variants' servers run side by side; each of `--rounds` rounds
measures every variant once per concurrency (in a rotated order), and every ratio is the median
of its per-round values, so the VM's slow speed drifts hit numerator and denominator alike. Every server is a separate process, started on a free port and
stopped by its PID. See benchmarks/README.md.

    python benchmarks/proxy_throughput.py                       # 5 s per point, c = 4, 16, 64
    python benchmarks/proxy_throughput.py --duration 3 --concurrency 16,64 --json out.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _harness as h

ALL_VARIANTS = ("direct", "nginx", "off", "store", "http", "http-batch", "store-inline")
DEFAULT_VARIANTS = ALL_VARIANTS[:-1]
SIDECAR_VARIANTS = ("off", "store", "http", "http-batch", "store-inline")
LOGGING_VARIANTS = ("store", "http", "http-batch", "store-inline")

TARGET_SIDECAR_DIRECT = {"iris": 0.95, "echo": 0.6}
TARGET_LOG_COST = 0.10
TARGET_P50_DELTA_MS = 0.5


def csv(kind: type, text: str) -> list[Any]:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--models", default="echo,iris", help="Predictors: echo, iris.  [default: echo,iris]")
    p.add_argument("--concurrency", default="4,16,64", help="wrk connections per point.  [default: 4,16,64]")
    p.add_argument("--duration", type=float, default=5.0, help="Seconds per point.  [default: 5]")
    p.add_argument("--warmup", type=float, default=1.0, help="wrk warm-up before each point.  [default: 1]")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"Subset of {','.join(ALL_VARIANTS)}.  [default: all but store-inline]")
    p.add_argument("--pin", choices=["none", "split"], default="none",
                   help="none: the kernel schedules everything on every core; split: wrk on CPU 0, "
                        "every server on CPU 1.  [default: none]")
    p.add_argument("--nginx-workers", default="1", help="nginx worker_processes (a number or auto).  [default: 1]")
    p.add_argument("--wrk-threads", type=int, default=1, help="[default: 1]")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="Max seconds to wait after a point for the sink to catch up.  [default: 60]")
    p.add_argument("--rounds", type=int, default=3,
                   help="Rounds: each measures every variant at every concurrency once (variants in a "
                        "rotated order); ratios are medians of per-round ratios.  [default: 3]")
    p.add_argument("--wait-idle", type=float, default=20.0,
                   help="Before each point, wait up to this many seconds for the machine to be idle "
                        "(< 10%% busy while our servers rest); 0 = don't.  [default: 20]")
    p.add_argument("--workdir", type=Path, help="Where spools, logs and configs go.  [default: a temp dir]")
    p.add_argument("--keep", action="store_true", help="Keep the work dir.")
    p.add_argument("--json", metavar="FILE", help="Save every figure here.")
    args = p.parse_args(argv)
    args.models = csv(str, args.models)
    args.concurrency = csv(int, args.concurrency)
    args.variants = csv(str, args.variants)
    for m in args.models:
        if m not in h.MODEL_NAMES:
            p.error(f"unknown model {m!r}")
    for v in args.variants:
        if v not in ALL_VARIANTS:
            p.error(f"unknown variant {v!r}")
    if "direct" not in args.variants:
        args.variants.insert(0, "direct")  # the baseline is always measured
    if args.nginx_workers != "auto" and not args.nginx_workers.isdigit():
        p.error("--nginx-workers: a number or auto")
    if not 1 <= args.rounds <= 20:
        p.error("--rounds must be in [1, 20]")
    if not 1 <= args.duration <= 600 or not 0 <= args.warmup <= 60:
        p.error("--duration must be in [1, 600] s, --warmup in [0, 60] s")
    return args


def wait_idle(limit: float) -> tuple[float, float]:
    """Wait (bounded) until the machine is < 10% busy; returns (seconds waited, last busy fraction)."""
    started = time.monotonic()
    busy = h.cpu_busy(0.5)
    while busy > 0.10 and time.monotonic() - started < limit:
        busy = h.cpu_busy(0.5)
    return round(time.monotonic() - started, 1), round(busy, 3)


def start_variant(variant: str, predictor_url: str, workdir: Path, args: argparse.Namespace,
                  cpus: str | None) -> tuple[list[h.Proc], str, h.Proc | None]:
    """Start what the variant needs; returns (processes, base url, sidecar or None)."""
    if variant == "direct":
        return [], predictor_url, None
    if variant == "nginx":
        proc, url = h.start_nginx(predictor_url, workdir, workers=args.nginx_workers, cpus=cpus)
        return [proc], url, None
    vdir = workdir / f"sidecar-{variant}-{time.monotonic_ns()}"
    vdir.mkdir(parents=True)
    procs: list[h.Proc] = []
    log_urls: list[str] = []
    config = None
    if variant in ("http", "http-batch"):
        receiver, rurl = h.start_receiver(vdir, cpus=cpus)
        procs.append(receiver)
        if variant == "http":
            log_urls = [rurl]
        else:
            config = vdir / "sidecar.yaml"
            config.write_text(f"sinks:\n  - type: http\n    url: {rurl}\n    mode: batch\n")
    if variant == "store-inline":
        config = vdir / "sidecar.yaml"
        config.write_text("delivery:\n  mode: inline\n")
    # `off` and `store` run the default sink (the embedded store, in vdir/infer-logger-data).
    sidecar, url = h.start_sidecar(predictor_url, vdir / "spool", vdir, log_urls=log_urls, config=config,
                                   cpus=cpus, name=f"sidecar-{variant}")
    procs.append(sidecar)
    return procs, url, sidecar


def measure(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """Every variant's servers run side by side; each round measures every (concurrency, variant)
    once, the variants in a rotated order, so slow drifts of the machine hit them all alike."""
    wrk_cpus, server_cpus = ("0", "1") if args.pin == "split" else (None, None)
    scripts = {
        False: h.write_wrk_script(workdir / "post.lua"),
        True: h.write_wrk_script(workdir / "post-skip-logging.lua", skip_logging=True),
    }
    points: list[dict[str, Any]] = []
    total = len(args.models) * len(args.variants) * len(args.concurrency) * args.rounds
    for model in args.models:
        name = h.MODEL_NAMES[model]
        predictor, predictor_url = h.start_predictor(model, workdir, cpus=server_cpus)
        running: dict[str, tuple[list[h.Proc], str, h.Proc | None]] = {}
        try:
            for variant in args.variants:
                running[variant] = start_variant(variant, predictor_url, workdir, args, server_cpus)
            for rnd in range(args.rounds):
                shift = rnd % len(args.variants)
                order = args.variants[shift:] + args.variants[:shift]
                for conc in args.concurrency:
                    for variant in order:
                        procs, base, sidecar = running[variant]
                        point = measure_point(args, model, name, variant, conc, procs, base, sidecar,
                                              predictor, scripts[variant == "off"], wrk_cpus)
                        point["round"] = rnd
                        points.append(point)
                        h.log(f"[{len(points):>3}/{total}] round {rnd + 1} {_point_line(point)}")
            for variant, (procs, base, sidecar) in running.items():
                if sidecar is not None:
                    summarize_sidecar(variant, base, procs, [p for p in points if p["model"] == model])
        finally:
            for procs, _, _ in running.values():
                for proc in reversed(procs):
                    proc.stop()
            predictor.stop()
    return points


def measure_point(args: argparse.Namespace, model: str, name: str, variant: str, conc: int,
                  procs: list[h.Proc], base: str, sidecar: h.Proc | None, predictor: h.Proc,
                  script: Path, wrk_cpus: str | None) -> dict[str, Any]:
    url = f"{base}/v1/models/{name}:predict"
    logging_on = sidecar is not None and variant in LOGGING_VARIANTS
    idle_wait, idle_busy = wait_idle(args.wait_idle)
    if args.warmup:
        h.run_wrk(url, script, connections=conc, duration=args.warmup, threads=args.wrk_threads, cpus=wrk_cpus)
        if logging_on:
            h.wait_sink_caught_up(base, args.drain_timeout)
    meter = h.CpuMeter({"predictor": predictor.pid, **{p.name.split("-")[0]: p.pid for p in procs}})
    meter.start()
    result = h.run_wrk(url, script, connections=conc, duration=args.duration,
                       threads=args.wrk_threads, cpus=wrk_cpus)
    cpu = meter.stop()
    point: dict[str, Any] = {"model": model, "variant": variant, "connections": conc, **result, "cpu": cpu,
                             "idle_before": idle_busy, "idle_wait_s": idle_wait}
    # CPU per answered request, per process: what each hop costs.
    point["cpu_us_per_request"] = {
        proc: round(secs * 1e6 / max(1, result["requests"]), 1) for proc, secs in cpu["seconds"].items()}
    # The sidecar's share in its delivery child (included in the figure above).
    point["child_cpu_us_per_request"] = {
        proc: round(secs * 1e6 / max(1, result["requests"]), 1)
        for proc, secs in cpu.get("children_seconds", {}).items()}
    if sidecar is not None:
        if logging_on:
            drain, caught_up = h.wait_sink_caught_up(base, args.drain_timeout)
            point["drain_s"] = round(drain, 2)
            point["caught_up"] = caught_up
            # What the delivery process put off until the load stopped: its CPU in the drain, and
            # the req/s had the point lasted until the sink caught up (sustained load cannot defer).
            drained = meter.stop()["seconds"].get("sidecar", 0.0) - cpu["seconds"].get("sidecar", 0.0)
            point["drain_cpu_us_per_request"] = round(drained * 1e6 / max(1, result["requests"]), 1)
            point["sustained_rps"] = round(result["requests"] / (result["seconds"] + drain), 1)
        point["sidecar_rss_mib"] = round((sidecar.rss_bytes() or 0) / (1 << 20), 1)
    return point


def _point_line(point: dict[str, Any]) -> str:
    lag = ""
    if "drain_s" in point:
        lag = f"  sink drain {point['drain_s']:.1f}s" + ("" if point["caught_up"] else " (NOT caught up)")
    errs = ""
    if point["non_2xx"] or point["socket_errors"]:
        errs = f"  non-2xx {point['non_2xx']} socket-errors {point['socket_errors']}"
    cpu = point["cpu"]
    return (f"{point['model']:<4} {point['variant']:<10} c={point['connections']:<3} "
            f"{point['rps']:>8.0f} req/s  p50 {point['p50_ms']:6.2f} ms  p99 {point['p99_ms']:6.2f} ms  "
            f"machine busy {cpu['machine_busy']:.0%} (others {cpu['others']:.0%})  "
            f"CPU us/req: {' '.join(_per_process(point).split(', '))}{lag}{errs}")


def summarize_sidecar(variant: str, base: str, procs: list[h.Proc], points: list[dict[str, Any]]) -> None:
    """Check the sidecar's own counters at the end of a variant: nothing dropped, all delivered."""
    time.sleep(0.5)  # a request wrk left in flight may still log its response
    h.wait_sink_caught_up(base, 10)
    try:
        m = h.scrape(base)
    except (OSError, RuntimeError, ValueError) as exc:
        h.log(f"      ({variant}: could not read /metrics: {exc})")
        return
    accepted = h.metric_sum(m, "infer_logger_events_accepted_total")
    delivered = h.metric_sum(m, "infer_logger_events_delivered_total")
    dropped = h.metric_sum(m, "infer_logger_events_dropped_total")
    retried = h.metric_sum(m, "infer_logger_batches_retried_total")
    logged = sum(v for k, v in m.items() if k.startswith("infer_logger_requests_total{") and 'logged="true"' in k)
    unlogged = sum(v for k, v in m.items() if k.startswith("infer_logger_requests_total{") and 'logged="false"' in k)
    extra = ""
    receiver = next((p for p in procs if p.name == "receiver"), None)
    if receiver is not None:
        import json

        try:
            _, body = h.http_get(receiver.url + "count")
            extra = f", receiver got {json.loads(body)['events']}"
        except (OSError, ValueError, KeyError) as exc:
            extra = f", receiver count unreadable ({type(exc).__name__})"
    h.log(f"      {variant}: requests logged {logged:.0f} / not logged {unlogged:.0f}; events accepted "
          f"{accepted:.0f}, delivered {delivered:.0f}, dropped {dropped:.0f}, batches retried {retried:.0f}{extra}")
    for p in points:
        if p["variant"] == variant and "sidecar_events" not in p:
            p["sidecar_events"] = {"accepted": accepted, "delivered": delivered, "dropped": dropped}


def ratios(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, concurrency): the median over rounds of each round's ratios."""
    rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rnd in sorted({p["round"] for p in points}):
        for row in _round_ratios([p for p in points if p["round"] == rnd]):
            rows.setdefault((row["model"], row["connections"]), []).append(row)
    out = []
    for (model, conc), per_round in sorted(rows.items()):
        keys = [k for k in per_round[0] if k not in ("model", "connections")]
        row = {"model": model, "connections": conc, "rounds": len(per_round)}
        for k in keys:
            values = [r[k] for r in per_round if k in r]
            row[k] = round(statistics.median(values), 3)
            if len(values) > 1 and k != "direct_rps":
                row[f"{k}_range"] = [min(values), max(values)]
        out.append(row)
    return out


def _round_ratios(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(p["model"], p["variant"], p["connections"]): p for p in points}
    out = []
    for (model, variant, conc), direct in sorted(by.items()):
        if variant != "direct":
            continue
        row: dict[str, Any] = {"model": model, "connections": conc, "direct_rps": direct["rps"]}
        for v in ("nginx", *SIDECAR_VARIANTS):
            if (p := by.get((model, v, conc))) is not None and direct["rps"]:
                row[f"{v}/direct"] = round(p["rps"] / direct["rps"], 3)
        off = by.get((model, "off", conc))
        for v in LOGGING_VARIANTS:
            if off is not None and (p := by.get((model, v, conc))) is not None and off["rps"]:
                row[f"{v}_cost"] = round(1 - p["rps"] / off["rps"], 3)
                if "sustained_rps" in p:
                    row[f"{v}_sustained_cost"] = round(1 - p["sustained_rps"] / off["rps"], 3)
                row[f"{v}_p50_delta_ms"] = round(p["p50_ms"] - off["p50_ms"], 3)
                # Noise-robust view of the same cost: the sidecar's CPU per request, on minus off,
                # the delivery process's work in the drain included.
                on_cpu = p["cpu_us_per_request"].get("sidecar")
                off_cpu = off["cpu_us_per_request"].get("sidecar")
                if on_cpu is not None and off_cpu is not None:
                    row[f"{v}_sidecar_cpu_us"] = round(on_cpu + p.get("drain_cpu_us_per_request", 0.0) - off_cpu, 1)
        out.append(row)
    return out


def verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target at each concurrency; the sidecar is judged with its default sink (store)."""
    checks = []
    for row in rows:
        model, conc = row["model"], row["connections"]
        want = TARGET_SIDECAR_DIRECT.get(model)
        for v in ("store", "off"):
            if want is not None and f"{v}/direct" in row:
                checks.append({"target": f"sidecar({v})/direct >= {want}", "model": model, "connections": conc,
                               "value": row[f"{v}/direct"], "ok": row[f"{v}/direct"] >= want,
                               "range": row.get(f"{v}/direct_range")})
        for v in LOGGING_VARIANTS:
            if f"{v}_cost" in row:
                checks.append({"target": f"{v} logging cost <= {TARGET_LOG_COST:.0%}", "model": model,
                               "connections": conc, "value": row[f"{v}_cost"],
                               "ok": row[f"{v}_cost"] <= TARGET_LOG_COST, "range": row.get(f"{v}_cost_range")})
                checks.append({"target": f"{v} p50 delta <= {TARGET_P50_DELTA_MS} ms", "model": model,
                               "connections": conc, "value": row[f"{v}_p50_delta_ms"],
                               "ok": row[f"{v}_p50_delta_ms"] <= TARGET_P50_DELTA_MS,
                               "range": row.get(f"{v}_p50_delta_ms_range")})
    return checks


def report(points: list[dict[str, Any]], rows: list[dict[str, Any]], checks: list[dict[str, Any]]) -> None:
    h.log("\n== results (per point, the round with the median req/s) ==")
    h.log(f"{'model':<5} {'c':>3}  {'variant':<10} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'errors':>6} {'drain s':>7} {'busy':>5} {'others':>6}  CPU us per request (by process)")
    for p in median_points(points):
        drain = f"{p['drain_s']:.1f}" if "drain_s" in p else "-"
        per_req = _per_process(p)
        h.log(f"{p['model']:<5} {p['connections']:>3}  {p['variant']:<10} {p['rps']:>8.0f} {p['p50_ms']:>7.2f} "
              f"{p['p99_ms']:>7.2f} {p['non_2xx'] + p['socket_errors']:>6} {drain:>7} "
              f"{p['cpu']['machine_busy']:>5.0%} {p['cpu']['others']:>6.0%}  {per_req}")
    h.log("  (busy: the whole machine's CPU use during the point; others: the part not ours, i.e. noise)")

    h.log("\n== ratios (throughput vs direct; logging cost and p50 delta vs the sidecar with logging off) ==")
    cols = [c for c in ("nginx/direct", "off/direct", "store/direct", "http/direct", "http-batch/direct",
                        "store_cost", "store_sustained_cost", "store_p50_delta_ms", "http_cost",
                        "http_sustained_cost", "http_p50_delta_ms", "http-batch_cost", "http-batch_sustained_cost",
                        "http-batch_p50_delta_ms", "store_sidecar_cpu_us", "http_sidecar_cpu_us",
                        "http-batch_sidecar_cpu_us") if any(c in r for r in rows)]
    short = {c: c.replace("/direct", "").replace("_p50_delta_ms", " dp50").replace("_sustained_cost", " sust")
             .replace("_cost", " cost").replace("_sidecar_cpu_us", " +cpu") for c in cols}
    h.log(f"{'model':<5} {'c':>3} {'direct':>7}  " + " ".join(f"{short[c]:>{max(8, len(short[c]))}}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            w = max(8, len(short[c]))
            if v is None:
                cells.append(f"{'-':>{w}}")
            elif c.endswith("_cost"):
                cells.append(f"{v:>{w}.1%}")
            elif c.endswith("_cpu_us"):
                cells.append(f"{v:>+{w}.0f}")
            elif c.endswith("_ms"):
                cells.append(f"{v:>+{w}.2f}")
            else:
                cells.append(f"{v:>{w}.2f}")
        h.log(f"{r['model']:<5} {r['connections']:>3} {r['direct_rps']:>7.0f}  " + " ".join(cells))
    h.log("  (nginx/off/store/http: that variant's req/s over direct's; `X cost` = 1 - X req/s over off req/s;"
          " `X sust` = the same with the\n   sink's drain after the point counted as part of it (an upper bound of what sustained"
          " load costs, which cannot put work off:\n   in the drain the delivery process runs alone); `X dp50` = X p50 - off p50, in ms;"
          " `X +cpu` = the sidecar's CPU us per request with X minus with off, the delivery process's work in\n"
          "   the drain included: what logging costs, steadier than req/s when the machine is shared)")

    h.log("\n== targets (median of per-round values [lowest..highest round]) ==")
    seen: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for check in checks:
        seen.setdefault((check["target"], check["model"]), []).append(check)
    for (target, model), cs in seen.items():
        status = "MET" if all(x["ok"] for x in cs) else ("MISSED" if not any(x["ok"] for x in cs) else "PARTLY")
        h.log(f"  {status:<6} {model:<4} {target:<34} {_detail(cs)}")
    # Not judged (the target reads as a point's throughput), shown so a sink that keeps up only by
    # deferring its work to the pauses between points is seen for what it would cost without them.
    for model in sorted({r["model"] for r in rows if "store_sustained_cost" in r}):
        drained = [{"connections": r["connections"], "value": r["store_sustained_cost"], "ok": True,
                    "range": r.get("store_sustained_cost_range")}
                   for r in rows if r["model"] == model and "store_sustained_cost" in r]
        h.log(f"  {'INFO':<6} {model:<4} {'store cost, drain counted':<34} {_detail(drained)}")


def _detail(checks: list[dict[str, Any]]) -> str:
    """`c=4: 0.2 [0.1..0.3] (miss), c=16: ...`"""
    return ", ".join(
        f"c={x['connections']}: {x['value']:g}"
        + (f" [{x['range'][0]:g}..{x['range'][1]:g}]" if x.get("range") else "")
        + ("" if x["ok"] else " (miss)") for x in checks)


def median_points(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each (model, variant, concurrency), the round whose req/s is the median (the lower one
    of an even count), so its latencies and CPU figures belong together."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["model"], p["variant"], p["connections"]), []).append(p)
    order = {v: i for i, v in enumerate(ALL_VARIANTS)}
    out = []
    for key in sorted(groups, key=lambda k: (k[0], order[k[1]], k[2])):
        ranked = sorted(groups[key], key=lambda p: p["rps"])
        out.append(ranked[(len(ranked) - 1) // 2])
    return out


def _per_process(point: dict[str, Any]) -> str:
    """`predictor 140, sidecar 414 (child 130)`: CPU us per request; in brackets the part its children
    used (the sidecar's delivery process, nginx's workers)."""
    children = point.get("child_cpu_us_per_request", {})
    return ", ".join(f"{k} {v:.0f}" + (f" (child {children[k]:.0f})" if children.get(k) else "")
                     for k, v in point["cpu_us_per_request"].items())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = h.missing_tools(h.WRK, *([h.NGINX] if "nginx" in args.variants else []))
    if missing:
        print(f"proxy_throughput: {missing}", file=sys.stderr)
        return 2
    h.install_cleanup()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="infer-logger-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    info = h.machine_info()
    idle_check = h.cpu_busy(1.0)
    busy_others = h.top_other_processes(set())
    setup = {
        **info,
        "pin": args.pin,
        "pinning": ("wrk on CPU 0; predictor, sidecar, nginx and receiver on CPU 1" if args.pin == "split"
                    else "none: wrk, predictor, proxy (and receiver) share every core"),
        "wrk": f"/usr/bin/wrk -t{args.wrk_threads} --latency, POST {h.BODY.decode()}",
        "nginx_worker_processes": args.nginx_workers,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "machine_busy_before": round(idle_check, 3),
        "busiest_before": busy_others,
        "workdir": str(workdir),
    }
    h.log(f"setup: {info['cpus']} CPUs, Python {info['python']}, uvloop={info['uvloop']} "
          f"httptools={info['httptools']}; pinning: {setup['pinning']}; wrk -t{args.wrk_threads}; "
          f"nginx worker_processes {args.nginx_workers}; {args.duration:g} s per point after a "
          f"{args.warmup:g} s warm-up; spool and store in {workdir}")
    h.log(f"machine busy before start: {idle_check:.0%} (busiest: {', '.join(busy_others) or 'none'})"
          + ("  <-- NOT IDLE: figures will be noisy" if idle_check > 0.1 else ""))
    started = time.monotonic()
    try:
        points = measure(args, workdir)
    finally:
        h.stop_all()
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = ratios(points)
    checks = verdicts(rows)
    report(points, rows, checks)
    others = [p["cpu"]["others"] for p in points]
    setup["others_cpu_during_points"] = {"median": statistics.median(others), "max": max(others)}
    setup["loadavg_after"] = h.os.getloadavg()
    setup["wall_s"] = round(time.monotonic() - started, 1)
    h.log(f"\nnoise: CPU used by other processes during the points: median {statistics.median(others):.0%}, "
          f"max {max(others):.0%} of the machine; wall time {setup['wall_s']:.0f} s")
    h.save_json(args.json, {"setup": setup, "points": points, "ratios": rows, "targets": checks})
    return 0


if __name__ == "__main__":
    sys.exit(main())
