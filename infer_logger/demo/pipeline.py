"""The quickstart's event pipeline: a broker between the sidecar and the store, in this process.

    with quickstart_broker(workdir, predictor_url, "iris") as pipeline:
        ... run the sidecar with sinks=[{"type": "http", "url": pipeline.url, "mode": "batch"}] ...
    # on leaving: the broker settles what it holds (explanations included, bounded), then stops

Triggers: `audit` (every inference event -> the store), `display` (every event -> a JSONL file,
the logging subscriber) and, when the `explain` extra is installed, `explain` (the model's requests
and responses -> the SHAP explainer, whose explanation events re-enter the broker and reach the store
through `audit`, joined by id).

A demo composes everything, so this module reaches into `pipelines` and `explainers`; it does so
lazily, and the sidecar (`infer_logger` outside `demo/`) never imports it.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from infer_logger.sinks.base import SinkConfig
from infer_logger.testing import free_port

if TYPE_CHECKING:
    from explainers.config import ExplainerSettings
    from pipelines.broker import BrokerSettings

_TRIGGERS = """
triggers:
  - name: audit
    filters: [{prefix: {type: org.kubeflow.serving.inference.}}]
    subscriber: {ref: {name: audit}}
  - name: display
    subscriber: {ref: {name: display}}
"""
# Only the explained model's exchanges: the explainer skips others' (`modelname`), but need not get them.
_EXPLAIN_TRIGGER = """
  - name: explain
    filters: [{cesql: "type IN ('org.kubeflow.serving.inference.request', 'org.kubeflow.serving.inference.response')"},
              {exact: {modelname: %s}}]
    subscriber: {ref: {name: explainer}}
"""


def explain_available() -> bool:
    return importlib.util.find_spec("shap") is not None and importlib.util.find_spec("pandas") is not None


@dataclass(frozen=True)
class Pipeline:
    url: str
    event_log: Path
    explaining: bool


@contextmanager
def quickstart_broker(
    workdir: Path,
    predictor_url: str,
    model: str,
    *,
    explain: bool | None = None,
    drain_seconds: float = 60.0,
) -> Iterator[Pipeline]:
    """A broker on a free loopback port with the quickstart's triggers; yields where it listens."""
    from pipelines.broker import Broker, BrokerThread, register_component

    explain = explain_available() if explain is None else explain
    event_log = workdir / "events.jsonl"
    components: list[dict[str, Any]] = [
        {"type": "store", "name": "audit", "path": str(workdir / "audit.db")},
        {"type": "file", "name": "display", "path": str(event_log)},
    ]
    triggers = _TRIGGERS
    if explain:
        register_component(QuickstartExplainer)
        components.append({"type": "quickstart-explainer", "name": "explainer", "model": model,
                           "predictor_url": predictor_url})
        triggers += _EXPLAIN_TRIGGER % json.dumps(model)  # JSON is YAML: any name, quoted
    port = free_port()
    broker = Broker(broker_settings(workdir, port, components, drain_seconds), triggers=triggers)
    with BrokerThread(broker, host="127.0.0.1", port=port) as running:
        try:
            yield Pipeline(running.url, event_log, explain)
        finally:
            _settle(broker, drain_seconds)


def broker_settings(workdir: Path, port: int, components: list[dict[str, Any]],
                    drain_seconds: float) -> BrokerSettings:
    """The quickstart's broker: its log on disk in `workdir`, with these components."""
    from pipelines.broker import BrokerSettings

    return BrokerSettings.load(
        None, env=False,
        port=port, channel="disk", dir=str(workdir / "broker"), drain_timeout=drain_seconds,
        delivery={"retry": 5, "backoffDelay": "PT0.5S", "timeout": "PT60S"},
        components=components,
    )


def explainer_settings(model: str, predictor_url: str) -> ExplainerSettings:
    """The quickstart's explainer of `model` (a black box at `predictor_url`)."""
    from explainers.config import ExplainerSettings

    return ExplainerSettings.load(
        None, env=False,
        model_name=model, predictor_url=predictor_url, protocol="v2", background="dataset:iris",
        method="kernel", options={"background_size": 20}, params={"nsamples": 50},
        subscriber={"linger": 0.02},
    )


class QuickstartExplainer(SinkConfig):
    """The explainer as the quickstart's broker component. Not `type: explainer`, whose settings
    read `INFER_LOGGER_EXPLAINER_*`: the user's explainer's are not the demo's."""

    type: Literal["quickstart-explainer"] = "quickstart-explainer"
    model: str
    predictor_url: str

    def build(self) -> Any:
        from explainers.service import ExplainerService
        from explainers.subscriber import ExplainSubscriber

        # Started on the first event, in the broker's loop: fitting needs the predictor.
        return ExplainSubscriber(ExplainerService(explainer_settings(self.model, self.predictor_url)),
                                 owns_service=True)


def _settle(broker: Any, seconds: float) -> None:
    """Wait (bounded) until every trigger has handled every event the broker holds; replies count."""
    deadline = time.monotonic() + seconds
    quiet = 0
    while time.monotonic() < deadline and quiet < 3:
        lag = sum(broker.channels[t.broker_key].lag(t.name) or 0 for t in list(broker.triggers.values()))
        quiet = quiet + 1 if lag == 0 else 0
        time.sleep(0.1)
