"""`infer-logger quickstart`: the whole pipeline on the embedded defaults, with no external server.

A scikit-learn model on bundled data is served (V1 and V2) on a free loopback port, the sidecar
goes in front, its http sink feeds a broker whose triggers write every event to the audit store
and to a JSONL event log and (with the `explain` extra) ask the SHAP explainer to explain each
prediction; a few hundred predictions go through, and the audit log is read back.
"""

from __future__ import annotations

import os
import random
import shlex
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

from infer_logger.config import Settings
from infer_logger.demo.pipeline import quickstart_broker
from infer_logger.demo.predictor import create_app, train_iris
from infer_logger.server import SidecarThread, uvicorn_config
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


# What a run leaves in its workdir, removed by the next run; the marker says the directory is ours.
_MARKER = ".infer-logger-quickstart"
_OWN = frozenset({_MARKER, "audit.db", "audit.db-wal", "audit.db-shm", "events.jsonl", "broker", "spool"})


def _fresh_workdir(workdir: Path) -> None:
    """Start clean: in a directory an earlier run marked, remove what that run left, and only
    that. An unmarked directory must be empty: the same names (audit.db, spool) are the proxy's
    own, and `--workdir infer-logger-data` would delete its audit store and undelivered events."""
    try:
        if workdir.exists() and not workdir.is_dir():
            raise click.BadParameter(f"{workdir} is not a directory", param_hint="--workdir")
        found = set(os.listdir(workdir)) if workdir.exists() else set()
        if found and _MARKER not in found:
            raise click.BadParameter(
                f"{workdir} is not empty ({', '.join(sorted(found)[:3])}) and no quickstart made it "
                f"(it has no {_MARKER}): name a new or empty directory", param_hint="--workdir")
        for name in found & _OWN:
            path = workdir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / _MARKER).write_text("made by `infer-logger quickstart`, which empties it on its next run\n")
    except OSError as exc:  # not writable here (run from a read-only directory), a name too long
        raise click.BadParameter(f"{workdir}: {exc.strerror or exc}", param_hint="--workdir") from None


def sidecar_settings(workdir: Path, port: int, predictor_port: int, broker_url: str) -> Settings:
    """The quickstart's sidecar: in front of the predictor, its events to the broker. No env var
    is read: the user's INFER_LOGGER_* are a real sidecar's (a LOG_URL sent the demo's events to
    production too, and one unknown here stopped the quickstart)."""
    return Settings.load(
        None,
        env=False,
        port=port,
        component_port=predictor_port,
        inference_service="iris",
        namespace="quickstart",
        metadata_headers=["user-agent"],
        spool={"dir": str(workdir / "spool")},
        sinks=[{"type": "http", "url": broker_url, "mode": "batch"}],
    )


def run(*, n_requests: int, workdir: Path, explain: bool | None = None) -> None:
    from sklearn.datasets import load_iris

    _fresh_workdir(workdir)
    db = workdir / "audit.db"
    click.echo("1/5 training a random forest on scikit-learn's bundled iris data")
    model = train_iris()
    predictor_port, sidecar_port = free_port(), free_port()
    predictor_url = f"http://127.0.0.1:{predictor_port}"
    rows = load_iris().data.round(2).tolist()
    calls = _requests(n_requests, rows)
    statuses: dict[int, int] = {}
    with ServerThread(uvicorn_config(create_app([model]), "127.0.0.1", predictor_port)):
        with quickstart_broker(workdir, predictor_url, "iris", explain=explain) as pipeline:
            explaining = "SHAP explanations on" if pipeline.explaining else (
                "explanations off: pip install 'infer-logger[explain]' to turn them on")
            click.echo(f"2/5 predictor {predictor_url} (V1 and V2); broker {pipeline.url} "
                       f"(triggers: audit -> store, display -> events.jsonl; {explaining})")
            settings = sidecar_settings(workdir, sidecar_port, predictor_port, pipeline.url)
            click.echo(f"3/5 sidecar http://127.0.0.1:{sidecar_port} -> predictor; events -> broker")
            with SidecarThread(settings):
                with httpx.Client(base_url=f"http://127.0.0.1:{sidecar_port}", timeout=30) as client:
                    for path, body in tqdm(calls, desc="4/5 predictions through the sidecar", unit="req"):
                        status = client.post(path, json=body, headers={"user-agent": "quickstart"}).status_code
                        statuses[status] = statuses.get(status, 0) + 1
            # Leaving the sidecar's block drained its spool into the broker; leaving the broker's
            # waits until the triggers (and the explainer) have handled everything.
            click.echo("5/5 waiting for the broker's triggers to settle (explanations take a moment)")
    click.echo(f"done: {sum(statuses.values())} requests, statuses {statuses}\n")
    _summary(db, pipeline.event_log)


def _summary(db: Path, event_log: Path) -> None:
    store = AuditStore(db, readonly=True)
    try:
        summary = store.summary()
        latest = store.query(limit=5)
        explained = sum(1 for r in store.query(limit=None) if r.explanation is not None)
    finally:
        store.close()
    click.echo("Audit summary")
    click.echo(f"  predictions (rows): {summary.records} from {summary.ids} requests")
    click.echo(f"  by model: {summary.by_model}")
    click.echo(f"  by status: {summary.by_status}")
    click.echo(f"  predictor latency p50/p95: {summary.latency_p50_ms} / {summary.latency_p95_ms} ms")
    click.echo(f"  predictions with an explanation: {explained}")
    events = event_log.read_bytes().count(b"\n") if event_log.exists() else 0
    click.echo(f"  event log (the display trigger): {events} CloudEvents in {event_log}")
    click.echo("\nLatest records")
    click.echo(format_table(latest))
    example = shlex.quote(latest[0].id) if latest else "<id>"
    where = shlex.quote(str(db))  # pasted into a shell: a --workdir with a space split in two
    click.echo(
        "\nTry:\n"
        f"  infer-logger query --db {where} --model iris --limit 10\n"
        f"  infer-logger query --db {where} --status 400\n"
        f"  infer-logger query --db {where} --id {example} --format json\n"
    )
