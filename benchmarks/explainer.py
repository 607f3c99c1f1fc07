"""Explainer throughput and latency against in-process baselines measured in the same run.

A random forest on breast_cancer (30 features) is served by a predictor process (KServe V2 by
default, its `predict_proba` output explained; `--protocol v1`: `predictions` are the probabilities);
the explainer server (`python -m explainers`, Kernel SHAP, black box) runs in another process in
front of it. Over V2 the perturbed rows travel as binary tensor data unless `--no-binary-data`.
Measured:

    in-process   the same explainer called in this process on the same model (the baseline):
                 p50 of one-row explanations, and explanations/s
    server       one row per request: p50, and explanations/s with --concurrency clients
    batch        Kernel SHAP per row: one batch of --batch rows vs one row at a time (in
                 process, and through the server)
    events       explain-on-event: request/response event pairs posted to `POST /events` at a
                 fixed rate for --event-seconds; explanations/s achieved and p50 latency

and prints the ratios with their targets (server within 1.5x of in-process). All on 127.0.0.1.

    python benchmarks/explainer.py                     # ~1-2 min
    python benchmarks/explainer.py --rows 20 --rates 5,20 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import _harness as h

TARGET_SERVER_VS_INPROCESS = 1.5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=30, help="Rows explained per measurement.")
    p.add_argument("--batch", type=int, default=100, help="Rows in the batched measurement.")
    p.add_argument("--nsamples", type=int, default=100)
    p.add_argument("--background", type=int, default=20, help="k-means background rows.")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="Explainer threads.")
    p.add_argument("--rates", default="5,20,40,80", help="Offered event rates (exchanges/s).")
    p.add_argument("--event-seconds", type=float, default=4.0)
    p.add_argument("--json", help="Save all figures here.")
    p.add_argument("--predictors", default="demo,fast",
                   help="demo: the demo predictor (FastAPI); fast: a raw ASGI predictor (orjson, numpy).")
    p.add_argument("--protocol", choices=["v1", "v2"], default="v2", help="The predictor's protocol.")
    p.add_argument("--binary-data", action=argparse.BooleanOptionalAction, default=True,
                   help="V2: perturbations and outputs as binary tensor data (else JSON).")
    p.add_argument("--serve-predictor", type=int, help=argparse.SUPPRESS)
    p.add_argument("--kind", default="demo", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_and_rows() -> tuple[Any, Any, list[str]]:
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import RandomForestClassifier

    data = load_breast_cancer()
    forest = RandomForestClassifier(n_estimators=30, max_depth=5, random_state=0, n_jobs=1)
    return forest.fit(data.data, data.target), data.data, [str(f) for f in data.feature_names]


def serve_predictor(port: int, kind: str, protocol: str) -> None:
    """The predictor process: V1 `predictions` are the class probabilities; V2 answers `predict`
    (labels) and `predict_proba`, and the explainer asks for `predict_proba` alone.

    `demo`: infer_logger's demo predictor (FastAPI). `fast`: a raw ASGI app parsing with orjson or
    `np.frombuffer`, to show what the explainer costs apart from its predictor.
    """
    import numpy as np
    import orjson
    import uvicorn

    from infer_logger import binary_tensors
    from infer_logger.asgi import read_body, respond
    from infer_logger.demo.predictor import create_app
    from infer_logger.server import uvicorn_config

    forest, _, names = model_and_rows()

    class Proba:
        name, feature_names = "cancer", names

        def predict(self, rows: Any) -> Any:
            return forest.predict_proba(rows)

        def predict_proba(self, rows: Any) -> None:
            return None

    class Classifier:
        name, feature_names = "cancer", names

        def predict(self, rows: Any) -> Any:
            return forest.predict(rows)

        def predict_proba(self, rows: Any) -> Any:
            return forest.predict_proba(rows)

    def v2(body: bytes, header: bytes | None) -> tuple[bytes, dict[str, str]]:
        doc, raw = binary_tensors.decode(body, header.decode() if header else None, "inputs")
        [tensor] = doc["inputs"]
        data = raw.get(tensor["name"])
        rows = (np.frombuffer(data, binary_tensors.NUMPY_DTYPES[tensor["datatype"]]) if data is not None
                else np.asarray(tensor["data"], dtype=float)).reshape(tensor["shape"])
        proba = forest.predict_proba(rows)
        output = {"name": "predict_proba", "datatype": "FP64", "shape": list(proba.shape)}
        if binary_tensors.wants_binary(doc, "predict_proba"):
            return binary_tensors.encode({"outputs": [output]}, "outputs", {"predict_proba": proba})
        return binary_tensors.encode({"outputs": [{**output, "data": proba.reshape(-1)}]}, "outputs", {},
                                     option=orjson.OPT_SERIALIZE_NUMPY)

    async def fast(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "GET":
            await respond(send, 200, [(b"content-type", b"application/json")], b'{"status":"alive"}')
            return
        body = await read_body(receive)
        if scope["path"].startswith("/v2/"):
            content, headers = v2(body, dict(scope["headers"]).get(binary_tensors.HEADER.encode()))
            await respond(send, 200, [(k.encode(), v.encode()) for k, v in headers.items()], content)
            return
        rows = np.asarray(orjson.loads(body)["instances"], dtype=float)
        body = orjson.dumps({"predictions": forest.predict_proba(rows)}, option=orjson.OPT_SERIALIZE_NUMPY)
        await respond(send, 200, [(b"content-type", b"application/json")], body)

    app = create_app([Proba() if protocol == "v1" else Classifier()]) if kind == "demo" else fast
    config = uvicorn_config(app, h.HOST, port)
    if kind == "fast":
        config.lifespan = "off"
    uvicorn.Server(config).run()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def in_process(args: argparse.Namespace, rows: Any) -> dict[str, float]:
    from explainers import registry
    from explainers.data import local_model

    forest, data, names = model_and_rows()
    explainer = registry.create("kernel", {"background_size": args.background}, {"nsamples": args.nsamples})
    explainer.fit(local_model(forest, names), data)
    explainer.explain(rows[:1])  # warm, as the server does at start
    latencies = []
    started = time.perf_counter()
    for i in range(args.rows):
        t0 = time.perf_counter()
        explainer.explain(rows[i:i + 1])
        latencies.append(time.perf_counter() - t0)
    one_by_one = time.perf_counter() - started
    t0 = time.perf_counter()
    explainer.explain(rows[:args.batch])
    batch = time.perf_counter() - t0
    return {"p50_ms": 1000 * statistics.median(latencies), "per_s": args.rows / one_by_one,
            "per_row_one_at_a_time_ms": 1000 * one_by_one / args.rows, "per_row_batched_ms": 1000 * batch / args.batch}


async def through_server(args: argparse.Namespace, url: str, rows: Any) -> dict[str, float]:
    # aiohttp, not httpx: httpx's client is far heavier per request (shared/DEPENDENCIES.md: a
    # proxy forwarding with it caps near 640 req/s), and the client's cost would count as the server's.
    import aiohttp
    import orjson

    endpoint = url + "/v1/models/cancer:explain"
    headers = {"content-type": "application/json"}

    async def explain(session: aiohttp.ClientSession, chunk: Any) -> None:
        async with session.post(endpoint, data=orjson.dumps({"instances": chunk.tolist()}), headers=headers) as r:
            await r.read()
            r.raise_for_status()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        latencies = []
        for i in range(args.rows):
            t0 = time.perf_counter()
            await explain(session, rows[i:i + 1])
            latencies.append(time.perf_counter() - t0)
        queue = list(range(args.rows))

        async def worker() -> None:
            while queue:
                i = queue.pop()
                await explain(session, rows[i:i + 1])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        concurrent = time.perf_counter() - t0
        t0 = time.perf_counter()
        await explain(session, rows[:args.batch])
        batch = time.perf_counter() - t0
    return {"p50_ms": 1000 * statistics.median(latencies), "per_s_sequential": args.rows / sum(latencies),
            "per_s_concurrent": args.rows / concurrent, "per_row_one_at_a_time_ms": 1000 * sum(latencies) / args.rows,
            "per_row_batched_ms": 1000 * batch / args.batch}


async def events_at(url: str, rows: Any, rate: float, seconds: float) -> dict[str, float]:
    """Open loop: an exchange (request event, then response event) every 1/rate s."""
    import httpx
    import orjson

    from infer_logger.cloudevents.event import CloudEvent
    from infer_logger.cloudevents.http import to_binary

    def post(client: httpx.AsyncClient, id_: str, kind: str, body: dict[str, Any]) -> Any:
        event = CloudEvent({"specversion": "1.0", "id": id_, "source": "bench", "type": kind,
                            "datacontenttype": "application/json", "modelname": "cancer"}, orjson.dumps(body))
        headers, data = to_binary(event)
        return client.post("/events", headers=headers, content=data)

    latencies: list[float] = []
    failures = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal failures
        id_, row = str(uuid.uuid4()), rows[i % len(rows):i % len(rows) + 1].tolist()
        await post(client, id_, "org.kubeflow.serving.inference.request", {"instances": row})
        t0 = time.perf_counter()
        r = await post(client, id_, "org.kubeflow.serving.inference.response", {"predictions": [[0.5, 0.5]]})
        if r.status_code == 200:
            latencies.append(time.perf_counter() - t0)
        else:
            failures += 1

    total = max(1, int(rate * seconds))
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=500)) as client:
        started = time.perf_counter()
        tasks = []
        for i in range(total):
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(client, i)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    return {"offered_per_s": rate, "explained_per_s": len(latencies) / elapsed, "failures": failures,
            "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
            "p95_ms": 1000 * pct(latencies, 95) if latencies else float("nan")}


def run_servers(args: argparse.Namespace, work: Path, kind: str, rows: Any) -> dict[str, Any]:
    port = h.free_port()
    predictor = h.Proc(f"predictor-{kind}", [h.PYTHON, __file__, "--serve-predictor", str(port), "--kind", kind,
                                             "--protocol", args.protocol],
                       log_path=work / "predictor.log", cwd=h.REPO).start()
    h.wait_ready(f"http://{h.HOST}:{port}/", predictor, timeout=90)
    eport = h.free_port()
    explainer = h.Proc("explainer", [
        h.PYTHON, "-m", "explainers", "--port", str(eport), "--model-name", "cancer", "--protocol", args.protocol,
        "--binary-data" if args.binary_data else "--no-binary-data",
        "--predictor-url", f"http://{h.HOST}:{port}", "--background", "dataset:breast_cancer",
        "--method", "kernel", "--option", f"background_size={args.background}",
        "--param", f"nsamples={args.nsamples}", "--workers", str(args.workers), "--log-level", "warning",
    ], log_path=work / "explainer.log", cwd=h.REPO).start()
    url = f"http://{h.HOST}:{eport}"
    try:
        h.wait_ready(url + "/v2/health/ready", explainer, timeout=120)
        out: dict[str, Any] = {"server": asyncio.run(through_server(args, url, rows)), "events": []}
        remote = out["server"]
        h.log(f"{kind:5s} predictor: server p50 {remote['p50_ms']:.1f} ms, {remote['per_s_sequential']:.1f} expl/s "
              f"sequential, {remote['per_s_concurrent']:.1f} expl/s with {args.concurrency} clients; per row "
              f"{remote['per_row_one_at_a_time_ms']:.1f} ms one at a time, {remote['per_row_batched_ms']:.1f} ms "
              f"in a batch of {args.batch}")
        for rate in [float(r) for r in args.rates.split(",") if r.strip()]:
            point = asyncio.run(events_at(url, rows, rate, args.event_seconds))
            out["events"].append(point)
            h.log(f"{kind:5s} predictor: events offered {rate:g}/s -> explained {point['explained_per_s']:.1f}/s, "
                  f"p50 {point['p50_ms']:.0f} ms, p95 {point['p95_ms']:.0f} ms, failures {point['failures']}")
    finally:
        explainer.stop()
        predictor.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_predictor:
        serve_predictor(args.serve_predictor, args.kind, args.protocol)
        return 0
    h.install_cleanup()
    _, data, _ = model_and_rows()
    rows = data[::3]
    results: dict[str, Any] = {"machine": h.machine_info(), "args": vars(args)}
    results["in_process"] = local = in_process(args, rows)
    wire = "JSON" if args.protocol == "v1" or not args.binary_data else "binary tensor data"
    h.log(f"{args.rows} rows, nsamples {args.nsamples}, background {args.background}, workers {args.workers}; "
          f"predictor {args.protocol.upper()}, {wire}")
    h.log(f"in-process            p50 {local['p50_ms']:.1f} ms, {local['per_s']:.1f} expl/s; per row "
          f"{local['per_row_one_at_a_time_ms']:.1f} ms one at a time, {local['per_row_batched_ms']:.1f} ms "
          f"in a batch of {args.batch}")
    ratios: dict[str, float] = {
        "in_process_batch_vs_single_per_row": local["per_row_batched_ms"] / local["per_row_one_at_a_time_ms"]}
    for kind in [k.strip() for k in args.predictors.split(",") if k.strip()]:
        with tempfile.TemporaryDirectory(prefix="bench-explainer-") as tmp:
            results[kind] = point = run_servers(args, Path(tmp), kind, rows)
        remote = point["server"]
        ratios[f"{kind}: server_p50_vs_in_process"] = remote["p50_ms"] / local["p50_ms"]
        ratios[f"{kind}: in_process_vs_server_per_s_sequential"] = local["per_s"] / remote["per_s_sequential"]
        ratios[f"{kind}: in_process_vs_server_per_s_concurrent"] = local["per_s"] / remote["per_s_concurrent"]
        ratios[f"{kind}: server_batch_vs_single_per_row"] = (remote["per_row_batched_ms"]
                                                             / remote["per_row_one_at_a_time_ms"])
    results["ratios"] = ratios
    h.log(f"\nratios (lower is better; target: server within {TARGET_SERVER_VS_INPROCESS}x of in-process)")
    for name, value in ratios.items():
        mark = ""
        if "vs_in_process" in name or "in_process_vs_server" in name:
            mark = "  met" if value <= TARGET_SERVER_VS_INPROCESS else "  NOT met"
        h.log(f"  {name:50s} {value:6.2f}{mark}")
    h.save_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
