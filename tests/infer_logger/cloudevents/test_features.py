"""Replays the conformance Gherkin features (HTTP and Kafka bindings) with a tiny step runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from infer_logger.cloudevents import CloudEvent, KafkaMessage, from_http, from_kafka

from .conformance import CE, assert_attributes, params, parse_raw_http
from .gherkin import Scenario, Step, parse_feature

FEATURES = ("http-protocol-binding.feature", "kafka-protocol-binding.feature")


def _scenarios() -> list[Any]:
    paths = [CE / "features" / name for name in FEATURES]
    if not all(path.is_file() for path in paths):
        return params(None)
    return params(
        (f"{path.name.split('-')[0]}-{scenario.name}", scenario)
        for path in paths
        for scenario in parse_feature(path.read_text(encoding="utf-8"))
    )


@dataclass
class World:
    """What the steps of one scenario share."""

    http: tuple[dict[str, str], bytes] | None = None
    kafka_value: bytes | None = None
    kafka_headers: dict[str, bytes] = field(default_factory=dict)
    event: CloudEvent | None = None


def _run(step: Step, world: World) -> None:
    text = step.text.rstrip(":")
    if text.endswith("is supported"):  # Background: both bindings are
        return
    if text == "an HTTP request":
        world.http = parse_raw_http(step.doc or "")
    elif text == "parsed as HTTP request":
        assert world.http is not None
        world.event = from_http(*world.http)
    elif text == "a Kafka message with payload":
        world.kafka_value = (step.doc or "").encode()
    elif text == "Kafka headers":
        world.kafka_headers = {row["key"]: row["value"].encode() for row in step.rows()}
    elif text == "parsed as Kafka message":
        world.event = from_kafka(KafkaMessage(world.kafka_headers, None, world.kafka_value))
    elif text == "the attributes are":
        assert world.event is not None
        expected = {row["key"]: row["value"] for row in step.rows()}
        assert_attributes(world.event, expected)
        assert set(world.event.attributes) == set(expected)
    elif text == "the data is equal to the following JSON":
        assert world.event is not None and world.event.data is not None
        assert orjson.loads(world.event.data) == orjson.loads(step.doc or "")
    else:
        pytest.fail(f"no runner for step {step.text!r}")


@pytest.mark.parametrize("scenario", _scenarios())
def test_scenario(scenario: Scenario) -> None:
    world = World()
    for step in scenario.steps:
        _run(step, world)
    assert world.event is not None, "the scenario never parsed a message"
