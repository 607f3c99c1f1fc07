"""Which calls the logger logs, read off the method and path as KServe's routes read them."""

from __future__ import annotations

from pathlib import Path

import pytest

from infer_logger.cloudevents.event import CloudEvent
from infer_logger.config import load_settings
from infer_logger.logger import InferenceLogger, Route, match_route


@pytest.mark.parametrize(("path", "route"), [
    ("/v1/models/iris:predict", Route("v1", "iris", None, "predict")),
    ("/v1/models/iris:explain", Route("v1", "iris", None, "explain")),
    # Starlette's {model_name}:predict takes the last colon: KServe serves model "ns:iris" (it
    # was proxied unlogged).
    ("/v1/models/ns:iris:predict", Route("v1", "ns:iris", None, "predict")),
    ("/v2/models/iris/infer", Route("v2", "iris", None, "infer")),
    ("/v2/models/iris/versions/2/infer", Route("v2", "iris", "2", "infer")),
    ("/v2/models/ns:iris/infer", Route("v2", "ns:iris", None, "infer")),
])
def test_logged_routes(path: str, route: Route) -> None:
    assert match_route("POST", path) == route


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/models/iris:predict"),
    ("POST", "/v1/models/iris"),
    ("POST", "/v1/models/:predict"),
    ("POST", "/v1/models/a/b:predict"),
    ("POST", "/v1/models/iris:predict/x"),
    ("POST", "/v2/models/iris/ready"),
    ("POST", "/healthz"),
    # `$` matched before a last newline: /v1/models/echo:predict%0A, another path, logged as echo's
    ("POST", "/v1/models/echo:predict\n"),
    ("POST", "/v2/models/echo/infer\n"),
])
def test_unlogged(method: str, path: str) -> None:
    assert match_route(method, path) is None


@pytest.mark.parametrize(("durability", "mode"), [("disk", "inline"), ("memory", "inline"), ("disk", "process")])
async def test_drop_counters_carry_over_a_second_lifespan(tmp_path: Path, durability: str, mode: str) -> None:
    """A start after a stop opens a new spool: /metrics read its counts from zero, and
    infer_logger_events_dropped_total went backwards."""
    logger = InferenceLogger(load_settings(
        spool={"dir": str(tmp_path / "spool"), "durability": durability, "max_bytes": "64KiB"},
        max_payload_bytes="16KiB", sinks=[{"type": "file", "path": str(tmp_path / "events.jsonl")}],
        delivery={"mode": mode}))

    def dropped(reason: str) -> float | None:
        return logger.metrics.registry.get_sample_value("infer_logger_events_dropped_total", {"reason": reason})

    big = CloudEvent({"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}, b"x" * 15000)
    await logger.start()
    refused = [logger.spool.append(big) for _ in range(10)].count(False)  # no await: nothing delivered
    logger.metrics.drop("rejected", 2)  # as a sink worker counts what a sink refused
    assert refused and dropped("spool_full") == refused and dropped("rejected") == 2
    await logger.stop()
    await logger.start()
    try:
        assert dropped("spool_full") == refused and dropped("rejected") == 2
        logger.metrics.drop("rejected", 1)
        assert dropped("rejected") == 3
    finally:
        await logger.stop()


def test_annotations_are_a_cloudevents_string(tmp_path: Path) -> None:
    """Written by orjson, DEL or a C1 control in one went into every event as is: each refused
    downstream (the http sink's receiver answered 400 to all of them)."""
    import json

    from infer_logger.cloudevents.validation import validate

    annotations = {"k": "x\x7fy", "c\x85": "z\ufffe", "plain": "1"}
    logger = InferenceLogger(load_settings(
        annotations=annotations, spool={"dir": str(tmp_path / "spool"), "durability": "memory"},
        sinks=[{"type": "file", "path": str(tmp_path / "events.jsonl")}]))
    text = logger.origin.annotations
    assert text is not None and json.loads(text) == annotations
    validate(CloudEvent({**logger.origin.attributes(), "id": "1", "type": "t"}))
