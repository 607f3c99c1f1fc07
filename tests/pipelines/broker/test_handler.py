"""Knative's broker filter-handler cases (broker-filter-handler-cases.yaml, read in place), replayed
twice: against `POST /triggers/<ns>/<name>/<uid>` (the synchronous filter handler, status and
reply checked as the Go test does), and, for the filtering cases, through the broker's ingress
and log (dispatched or not).

One documented difference: the broker serves its ingress and the filter handler on one port,
so a path outside `/triggers/` is an ingress path: `/test-namespace/test-trigger` names a
broker (404 when there is none) rather than being a malformed handler path (Knative: 400).
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
import yaml

from infer_logger.cloudevents.event import CloudEvent, attribute_text
from infer_logger.cloudevents.http import from_http, to_binary
from tests.conformance import ROOT, reason

from .conftest import MakeBroker
from .helpers import Answer, Subscriber, client, settle

DATA = ROOT / "knative-filters" / "broker-filter-handler-cases.yaml"
SPEC: dict[str, Any] = yaml.safe_load(DATA.read_text(encoding="utf-8")) if DATA.is_file() else {}
MISSING = [pytest.param(None, id="missing", marks=pytest.mark.skip(reason=reason("knative-filters")))]
OUTSIDE_HANDLER = {"Path too short", "Path without prefix"}


def _params(key: str) -> list[Any]:
    return [pytest.param(c, id=c["name"]) for c in SPEC[key]] if SPEC else MISSING


def _filtering_cases() -> list[Any]:
    """The cases that are about which events a trigger takes, nothing about HTTP."""
    if not SPEC:
        return MISSING
    picked = []
    for case in [*SPEC["cases"], *SPEC["subscriptions_api_cases"]]:
        triggers = case.get("triggers") or []
        plain = triggers and not ({"uid", "subscriber_uri"} & set(triggers[0]))
        if plain and not {"request", "subscriber", "request_headers", "event"} & set(case):
            picked.append(pytest.param(case, id=case["name"]))
    return picked


def _triggers(case: dict[str, Any], subscriber: Subscriber) -> str:
    constants = SPEC["constants"]
    documents = []
    for trigger in case.get("triggers", []):
        if "subscriber_uri" in trigger:
            continue  # a trigger without a subscriber does not load (see test_trigger_without_subscriber)
        spec: dict[str, Any] = {"broker": "default", "subscriber": {"uri": subscriber.url}}
        for key in ("filter", "filters"):
            if trigger.get(key):
                spec[key] = trigger[key]
        documents.append({
            "apiVersion": "eventing.knative.dev/v1", "kind": "Trigger",
            "metadata": {"name": constants["trigger_name"], "namespace": constants["namespace"],
                         "uid": trigger.get("uid", constants["trigger_uid"])},
            "spec": spec,
        })
    return yaml.safe_dump_all(documents) if documents else "triggers: []"


def _script(behaviour: dict[str, Any] | None) -> Any:
    behaviour = behaviour or {}
    status = behaviour.get("status", 202)
    headers = {k.lower(): v for k, v in (behaviour.get("headers") or {}).items()}
    if "reply_event" in behaviour:
        reply = SPEC[behaviour["reply_event"]]
        out, body = to_binary(CloudEvent({k: str(v) if k == "knativebrokerttl" else v for k, v in reply.items()}))
        headers, raw = {**out, **headers}, body
    else:
        raw = str(behaviour.get("body", "")).encode()

    def answer(event: CloudEvent | None, request: dict[str, str]) -> Answer:
        return status, headers, raw

    return answer


def _request(case: dict[str, Any]) -> tuple[str, str, dict[str, str], bytes]:
    constants = SPEC["constants"]
    request = case.get("request", {})
    path = request.get("path", "valid")
    path = constants["valid_path"] if path == "valid" else path
    event = case.get("event") or {**SPEC["default_event"], **case.get("event_extra", {})}
    headers = {"Content-Type": "application/cloudevents+json", **case.get("request_headers", {})}
    return request.get("method", "POST"), path, headers, orjson.dumps(event)


@pytest.mark.parametrize("case", _params("cases") + _params("subscriptions_api_cases"))
async def test_filter_handler(case: dict[str, Any], make_broker: MakeBroker, subscriber: Subscriber) -> None:
    subscriber.answer = _script(case.get("subscriber"))
    broker = await make_broker(_triggers(case, subscriber))
    method, path, headers, body = _request(case)
    async with client(broker) as c:
        response = await c.request(method, path, headers=headers, content=body)
    expect = case["expect"]
    assert (subscriber.attempts > 0) is expect["dispatched"]
    status = expect.get("status", expect.get("status_from_code"))
    if case["name"] in OUTSIDE_HANDLER:
        status = 404  # an ingress path here: no broker of that name (see the module docstring)
    if status is not None:
        assert response.status_code == status
    _check_response(response, expect)
    if expect.get("subscriber_sees_headers"):
        seen = subscriber.requests[0][0]
        for name, value in expect["subscriber_sees_headers"].items():
            assert seen[name.lower()] == value, name
        for name in expect.get("subscriber_does_not_see", []):
            assert name.lower() not in seen
    if subscriber.requests:  # the broker's TTL never reaches a subscriber
        assert "ce-knativebrokerttl" not in subscriber.requests[0][0]
        assert b"knativebrokerttl" not in subscriber.requests[0][1]


def _check_response(response: httpx.Response, expect: dict[str, Any]) -> None:
    wanted = expect.get("response_event", "absent")
    if wanted is None:
        assert not response.content or response.status_code == 502
    elif wanted != "absent":
        got = from_http(response.headers, response.content)
        assert got.attributes == {k: attribute_text(v) if k == "knativebrokerttl" else v
                                  for k, v in SPEC[wanted].items()}
    for name, value in (expect.get("response_headers") or {}).items():
        assert response.headers.get(name) == value
    for name in expect.get("response_headers_absent", []):
        assert name not in response.headers


async def test_trigger_without_subscriber(make_broker: MakeBroker) -> None:
    """Knative's "Trigger doesn't have SubscriberURI" (404): here such a trigger cannot even load."""
    from pipelines.broker import DocumentError, load_triggers

    with pytest.raises(DocumentError, match="subscriber: Field required"):
        load_triggers("triggers: [{name: test-trigger}]")


@pytest.mark.parametrize("case", _filtering_cases())
async def test_filtering_through_the_broker(case: dict[str, Any], make_broker: MakeBroker,
                                            subscriber: Subscriber) -> None:
    broker = await make_broker(_triggers(case, subscriber))
    attributes = {**SPEC["default_event"], **case.get("event_extra", {})}
    del attributes["knativebrokerttl"]  # the ingress stamps it
    headers, body = to_binary(CloudEvent(attributes))
    async with client(broker) as c:
        response = await c.post(f"/{SPEC['constants']['namespace']}/default", headers=headers, content=body)
    assert response.status_code == 202
    await settle(broker, SPEC["constants"]["trigger_name"], 1, namespace=SPEC["constants"]["namespace"])
    assert (subscriber.attempts > 0) is case["expect"]["dispatched"]
    if subscriber.events:
        assert subscriber.events[0].attributes == attributes


async def test_filter_handler_filters_what_the_subscriber_gets(make_broker: MakeBroker,
                                                               subscriber: Subscriber) -> None:
    """Knative drops the TTL before filtering: a trigger cannot filter on it (it could here)."""
    broker = await make_broker(f"""
triggers:
  - {{name: nottl, filters: [{{cesql: "NOT EXISTS knativebrokerttl"}}], subscriber: '{subscriber.url}'}}
""")
    trigger = broker.triggers[("default", "nottl")]
    headers, body = to_binary(CloudEvent({"specversion": "1.0", "id": "1", "source": "/s", "type": "t",
                                          "knativebrokerttl": 255}))
    async with client(broker) as c:
        response = await c.post(f"/triggers/default/nottl/{trigger.uid}", headers=headers, content=body)
    assert response.is_success
    assert [e.id for e in subscriber.events] == ["1"]


async def test_filter_handler_refuses_a_content_coding(make_broker: MakeBroker, subscriber: Subscriber) -> None:
    """As the ingress does (415): a gzip-coded body was sent on to the subscriber as the event's
    data, labelled by its datacontenttype."""
    import gzip

    broker = await make_broker(f"triggers: [{{name: t, subscriber: '{subscriber.url}'}}]\n")
    trigger = broker.triggers[("default", "t")]
    headers, body = to_binary(CloudEvent({"specversion": "1.0", "id": "1", "source": "/s", "type": "t",
                                          "datacontenttype": "application/json", "knativebrokerttl": 255}, b"{}"))
    async with client(broker) as c:
        response = await c.post(f"/triggers/default/t/{trigger.uid}", headers={**headers, "content-encoding": "gzip"},
                                content=gzip.compress(body))
    assert response.status_code == 415 and "Content-Encoding" in response.json()["error"]
    assert subscriber.events == []


@pytest.mark.parametrize("ttl", ["abc", "1.5", "", "+5", "1_0", "0x10", "99999999999999999999", "2147483648",
                                 "1" * 5000])
async def test_filter_handler_refuses_a_ttl_that_is_no_integer(ttl: str, make_broker: MakeBroker,
                                                               subscriber: Subscriber) -> None:
    """Knative's filter handler answers 400 to a TTL it cannot read, as the ingress refuses it: it
    was sent on, and the reply came back with no TTL (a caller re-posting it began a fresh loop)
    or one no broker would take."""
    broker = await make_broker(f"triggers: [{{name: t, subscriber: '{subscriber.url}'}}]\n")
    trigger = broker.triggers[("default", "t")]
    headers, body = to_binary(CloudEvent({"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}))
    async with client(broker) as c:
        response = await c.post(f"/triggers/default/t/{trigger.uid}", content=body,
                                headers={**headers, "ce-knativebrokerttl": ttl})
    assert response.status_code == 400 and "knativebrokerttl" in response.json()["error"], response.text
    assert response.json()["attribute"] == "knativebrokerttl"  # named as the ingress names it
    assert subscriber.attempts == 0


@pytest.mark.parametrize(("ttl", "read"), [("0042", "42"), ("-0", "0"), ("2147483647", "2147483647"),
                                           (7, "7")])
async def test_filter_handler_puts_the_ttl_it_read_on_the_reply(ttl: str | int, read: str,
                                                                make_broker: MakeBroker,
                                                                subscriber: Subscriber) -> None:
    reply = CloudEvent({"specversion": "1.0", "id": "r", "source": "/d", "type": "reply"})
    reply_headers, reply_body = to_binary(reply)
    subscriber.answer = lambda event, request: (200, reply_headers, reply_body)
    broker = await make_broker(f"triggers: [{{name: t, subscriber: '{subscriber.url}'}}]\n")
    trigger = broker.triggers[("default", "t")]
    event = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "knativebrokerttl": ttl}
    async with client(broker) as c:  # structured: a JSON number stays one
        response = await c.post(f"/triggers/default/t/{trigger.uid}", content=orjson.dumps(event),
                                headers={"content-type": "application/cloudevents+json"})
    assert response.status_code == 200 and response.headers["ce-knativebrokerttl"] == read, response.headers
