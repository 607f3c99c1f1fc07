"""`infer-logger quickstart`: the whole slice on the embedded default, with no external server.

A scikit-learn model on bundled data is served (V1 and V2) on a free loopback port, the sidecar
goes in front with the store sink, a few hundred predictions go through it, and the audit log is
read back.
"""

from __future__ import annotations

import random
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import click
import httpx
import uvicorn
from tqdm import tqdm

from infer_logger.config import load_settings
from infer_logger.demo.predictor import create_app, train_iris
from infer_logger.server import build_app, uvicorn_config
from infer_logger.store import AuditStore, format_table


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerThread:
    """A uvicorn server on its own thread and event loop (signal handlers stay with the main thread)."""

    def __init__(self, config: uvicorn.Config) -> None:
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise click.ClickException("a quickstart server failed to start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _requests(n: int, rows: list[list[float]]) -> list[tuple[str, dict[str, Any]]]:
    """A mix of V1 and V2 calls of 1-3 rows, and a few malformed ones (logged with their 400)."""
    rng = random.Random(7)
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(n):
        batch = rng.sample(rows, rng.randint(1, 3))
        if i % 50 == 49:
            out.append(("/v1/models/iris:predict", {"instances": [[1.0, 2.0]]}))
        elif i % 3 == 2:
            out.append(("/v2/models/iris/infer", {"inputs": [
                {"name": "input-0", "datatype": "FP64", "shape": [len(batch), 4], "data": batch}]}))
        else:
            out.append(("/v1/models/iris:predict", {"instances": batch}))
    return out


def run(*, n_requests: int, workdir: Path) -> None:
    from sklearn.datasets import load_iris

    if workdir.exists():
        shutil.rmtree(workdir)  # the quickstart's own folder: start clean each time
    workdir.mkdir(parents=True)
    db = workdir / "audit.db"
    click.echo("1/4 training a random forest on scikit-learn's bundled iris data")
    model = train_iris()
    predictor_port, sidecar_port = free_port(), free_port()
    settings = load_settings(
        None,
        port=sidecar_port,
        component_port=predictor_port,
        inference_service="iris",
        namespace="quickstart",
        metadata_headers=["user-agent"],
        spool={"dir": str(workdir / "spool")},
        sinks=[{"type": "store", "path": str(db)}],
    )
    sidecar = build_app(settings)
    click.echo(f"2/4 predictor on :{predictor_port} (V1 and V2), sidecar on :{sidecar_port}, store {db}")
    rows = load_iris().data.round(2).tolist()
    calls = _requests(n_requests, rows)
    statuses: dict[int, int] = {}
    with ServerThread(uvicorn_config(create_app([model]), "127.0.0.1", predictor_port)), \
            ServerThread(uvicorn_config(sidecar, "127.0.0.1", sidecar_port)):
        with httpx.Client(base_url=f"http://127.0.0.1:{sidecar_port}", timeout=30) as client:
            for path, body in tqdm(calls, desc="3/4 predictions through the sidecar", unit="req"):
                status = client.post(path, json=body, headers={"user-agent": "quickstart"}).status_code
                statuses[status] = statuses.get(status, 0) + 1
    # Leaving the block stopped the sidecar, which drains the spool into the store first.
    click.echo(f"4/4 done: {sum(statuses.values())} requests, statuses {statuses}\n")
    _summary(db)


def _summary(db: Path) -> None:
    store = AuditStore(db)
    try:
        summary = store.summary()
        latest = store.query(limit=5)
    finally:
        store.close()
    click.echo("Audit summary")
    click.echo(f"  predictions (rows): {summary.records} from {summary.ids} requests")
    click.echo(f"  by model: {summary.by_model}")
    click.echo(f"  by status: {summary.by_status}")
    click.echo(f"  predictor latency p50/p95: {summary.latency_p50_ms} / {summary.latency_p95_ms} ms")
    click.echo("\nLatest records")
    click.echo(format_table(latest))
    example = latest[0].id if latest else "<id>"
    click.echo(
        "\nTry:\n"
        f"  infer-logger query --db {db} --model iris --limit 10\n"
        f"  infer-logger query --db {db} --status 400\n"
        f"  infer-logger query --db {db} --id {example} --format json\n"
    )
