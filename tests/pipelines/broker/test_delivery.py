"""Delivery: Knative's retry-decision, backoff, spec-parse, Retry-After, dispatcher/dead-letter and
truncation cases (knative-filters/delivery-retry-deadletter-cases.yaml, read in place).

The dispatcher cases run through a real broker to real subscribers. Knative's dispatcher posts a
reply to a reply URL as a raw message; in a broker a reply re-enters the broker as an event, so
those cases are checked on what a second trigger receives (see the notes on each).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from infer_logger.cloudevents.event import CloudEvent
from infer_logger.cloudevents.http import decode_header_value
from infer_logger.errors import SinkError
from infer_logger.retry import RETRY_AFTER_MAX, retry_after
from pipelines.broker.channel import ChannelError, event_size
from pipelines.broker.delivery import (
    ERROR_DATA_MAX,
    NO_RESPONSE,
    DeliverySpec,
    RetryPolicy,
    error_extensions,
    parse_duration,
    should_retry,
    truncate_error_data,
)
from pipelines.broker.endpoints import ComponentEndpoint
from tests.conformance import ROOT, reason
from tests.servers import Scripted

from .conftest import MakeBroker
from .helpers import Answer, Subscriber, binary_request, client, reply_with, settle, until

DATA = ROOT / "knative-filters" / "delivery-retry-deadletter-cases.yaml"
CASES: dict[str, Any] = yaml.safe_load(DATA.read_text(encoding="utf-8")) if DATA.is_file() else {}
needs_data = pytest.mark.skipif(not CASES, reason=reason("knative-filters"))


def _params(*keys: str) -> list[Any]:
    node: Any = CASES
    for key in keys:
        node = node.get(key, {}) if isinstance(node, dict) else []
    if not node:
        return [pytest.param(None, id="missing", marks=pytest.mark.skip(reason=reason("knative-filters")))]
    return [pytest.param(c, id=str(c.get("name") or c.get("case") or c.get("status") or c.get("data_length")))
            for c in node]


@pytest.mark.parametrize("case", _params("selective_retry"))
def test_retry_decision(case: dict[str, Any]) -> None:
    # A transport error is "no response" whatever status a broken client reported.
    status = None if "status" not in case or case.get("error") else case["status"]
    assert should_retry(status) is case["retry"]


@needs_data
def test_retry_decision_covers_the_spec_table() -> None:
    assert len(CASES["selective_retry"]) == 19
    assert [s for s in range(100, 600) if should_retry(s)] == [404, 408, 409, 429, *range(500, 600)]
    assert should_retry(NO_RESPONSE)


@pytest.mark.parametrize("case", _params("backoff"))
def test_backoff(case: dict[str, Any]) -> None:
    fields = {k: case[k] for k in ("backoffPolicy", "backoffDelay", "timeout", "retryAfterMax") if k in case}
    if case.get("expect_error"):
        with pytest.raises(ValidationError):
            DeliverySpec(retry=5, **fields)
        return
    policy = RetryPolicy.from_spec(DeliverySpec(retry=5, **fields))
    assert [policy.backoff(n) for n in range(1, 6)] == pytest.approx(case["expected_seconds_by_attempt"])
    if "expected_request_timeout_seconds" in case:
        assert policy.timeout == case["expected_request_timeout_seconds"]
    if "expected_retry_after_max_seconds" in case:
        assert policy.retry_after_max == case["expected_retry_after_max_seconds"]


def test_an_exponential_wait_never_overflows() -> None:
    """`retry` has no upper bound; 2.0 ** 1024 would raise in the trigger's delivery."""
    policy = RetryPolicy.from_spec(DeliverySpec(retry=5000, backoffPolicy="exponential", backoffDelay="PT0.001S"))
    assert policy.backoff(1024) == policy.backoff(5000) > 0


@pytest.mark.parametrize("case", _params("delivery_spec_parse"))
def test_delivery_spec_parse(case: dict[str, Any]) -> None:
    if case["expect_error"]:
        with pytest.raises(ValidationError):
            DeliverySpec(**case["spec"])
        return
    assert RetryPolicy.from_spec(DeliverySpec(**case["spec"])).retry == case["expect_retry_max"]


@needs_data
def test_no_delivery_spec_retries_nothing() -> None:
    default = CASES["no_retries_default"]
    policy = RetryPolicy.from_spec(None)
    assert policy.retry == default["retry_max"] and policy.backoff(1) == default["backoff_seconds"]


@pytest.mark.parametrize("case", _params("retry_after", "cases"))
def test_retry_after(case: dict[str, Any]) -> None:
    standard = CASES["retry_after"]["standard_backoff_seconds"]
    header_seconds = CASES["retry_after"]["retry_after_header_seconds"]
    now = datetime.now(UTC)
    header = {
        "none": None,
        "seconds": str(header_seconds),
        "date": format_datetime(now + timedelta(seconds=header_seconds), usegmt=True),
        "invalid": "FOO",
    }[case["retry_after"]]
    # Linear with delay = the standard backoff: attempt 1 waits exactly that.
    policy = RetryPolicy(retry=3, policy="linear", delay=standard, retry_after_max=case["retryAfterMax"])
    wait = policy.wait(1, case["status"], retry_after(header, now))
    if "expected_backoff_seconds" in case:
        assert wait == pytest.approx(case["expected_backoff_seconds"], abs=1)
    else:
        assert standard < wait <= case["expected_backoff_seconds_max"]


class TestRetryAfterHeader:
    """Delta-seconds and the three HTTP date forms; anything else is ignored."""

    NOW = datetime(1994, 11, 6, 8, 49, 7, tzinfo=UTC)

    @pytest.mark.parametrize("value", ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT",
                                       "Sun Nov  6 08:49:37 1994"])
    def test_dates(self, value: str) -> None:
        assert retry_after(value, self.NOW) == 30

    def test_past_date_is_zero_and_junk_is_none(self) -> None:
        assert retry_after("Sun, 06 Nov 1994 08:00:00 GMT", self.NOW) == 0
        assert retry_after("-5") is None and retry_after("") is None
        # Digits to str.isdigit(), not to float(): a latin-1 header byte 0xb2 reads as "²" (it
        # raised, and the trigger's log position froze).
        assert retry_after("²") is None and retry_after("１０") is None

    @pytest.mark.parametrize("value", ["Sun, 06 Nov 1994 08:49:37 -0000", "Sun, 06 Nov 1994 09:49:37 +0100"])
    def test_dates_with_a_numeric_zone(self, value: str) -> None:
        assert retry_after(value, self.NOW) == 30

    def test_a_huge_value_is_capped(self) -> None:
        """A 400-digit Retry-After gave inf (an overflow further on); the cap is RETRY_AFTER_MAX."""
        assert retry_after("9" * 400) == RETRY_AFTER_MAX == retry_after("Fri, 31 Dec 9999 23:59:59 GMT")


class TestDurations:
    @pytest.mark.parametrize(("text", "seconds"), [("PT0.5S", 0.5), ("PT2.5S", 2.5), ("PT1M", 60), ("PT1H1M1S", 3661),
                                                   ("P1D", 86400), ("P1W", 604800), ("P1DT0,5S", 86400.5)])
    def test_valid(self, text: str, seconds: float) -> None:
        assert parse_duration(text) == seconds

    @pytest.mark.parametrize("text", ["FOO", "PP1", "P", "PT", "P1DT", "1S", "PT-1S", "P1Y", "P2M"])
    def test_invalid(self, text: str) -> None:
        with pytest.raises(ValueError):
            parse_duration(text)

    def test_trigger_spec_lies_over_broker_spec(self) -> None:
        broker = DeliverySpec.model_validate(
            {"retry": 10, "backoffDelay": "PT1S", "deadLetterSink": "http://127.0.0.1:1/dls"})
        merged = DeliverySpec(retry=2).over(broker)
        assert (merged.retry, merged.backoff_delay, merged.dead_letter_sink) == (2, "PT1S", broker.dead_letter_sink)


@pytest.mark.parametrize("case", _params("dead_letter", "error_data_truncation"))
def test_error_data_truncation(case: dict[str, Any]) -> None:
    assert len(truncate_error_data("a" * case["data_length"])) == case["stored_length"]


@pytest.mark.parametrize("size", [0, 1, 767, 768, 769, 5000])
def test_error_data_is_the_base64_of_the_body_cut_to_1024(size: int) -> None:
    body = bytes(range(256)) * 20
    body = body[:size]
    data = error_extensions("http://x/", 500, body).get("knativeerrordata", "")
    assert data == truncate_error_data(base64.b64encode(body).decode())
    assert len(data) <= ERROR_DATA_MAX


# -- the dispatcher cases (TestSendEvent), through a broker ----------------------------------------

REQUEST_HEADERS = {"do-not-forward": "header", "x-request-id": "id123", "knative-1": "knative-1-value",
                   "knative-2": "knative-2-value"}


def _dispatcher_event() -> CloudEvent:
    # The Go test's event: data "destination" sent as the JSON string "\"destination\"".
    return CloudEvent({"specversion": "1.0", "id": "dispatch-1", "source": "testsource", "type": "testtype",
                       "abc": '"ce-abc-value"', "datacontenttype": "application/json"}, b'"destination"')


def _triggers(dest: Subscriber, dls: Subscriber | None = None, catch: Subscriber | None = None,
              retry: int = 0) -> str:
    delivery = f"delivery: {{retry: {retry}, backoffDelay: PT0.01S" + (f", deadLetterSink: {dls.url}}}" if dls else "}")
    text = f"""
triggers:
  - name: destination
    filters: [{{exact: {{type: testtype}}}}]
    subscriber: {dest.url}
    {delivery}
"""
    if catch is not None:
        text += f"""
  - name: replies
    filters: [{{exact: {{type: reply}}}}]
    subscriber: {catch.url}
"""
    return text


REPLY_HEADERS = {"x-request-id": "altered-id", "knative-1": "new-knative-1-value", "do-not-passthrough": "no"}


def _reply_event(data: bytes = b"destination-response") -> CloudEvent:
    return CloudEvent({"specversion": "1.0", "id": "reply-1", "source": "dest", "type": "reply",
                       "abc": '"new-ce-abc-value"', "time": "2002-10-02T15:00:00Z",
                       "datacontenttype": "text/plain"}, data)


def _value(name: str, headers: dict[str, str], body: bytes) -> str:
    """What a receiver reads: the body, or a header (ce- values percent-decoded, as the binding says)."""
    if name == "body":
        return body.decode()
    return decode_header_value(headers[name]) if name.startswith("ce-") else headers[name]


async def _post(broker: Any) -> None:
    async with client(broker) as c:
        response = await c.post("/", **binary_request(_dispatcher_event(), **REQUEST_HEADERS))
        assert response.status_code == 202


@needs_data
class TestDispatcherCases:
    """TestSendEvent's cases: what the destination, the reply and the dead-letter sink receive."""

    async def test_destination_only(self, make_broker: MakeBroker, subscriber: Subscriber) -> None:
        broker = await make_broker(_triggers(subscriber))
        await _post(broker)
        headers, body = (await asyncio.to_thread(subscriber.wait_for_requests, 1))[0]
        expected = CASES["dead_letter"]["dispatcher_cases"][0]["expect"]["destination_receives"]
        for name, value in expected.items():
            assert _value(name, headers, body) == value, name
        assert "do-not-forward" not in headers
        assert "knativebrokerttl" not in body.decode() and "ce-knativebrokerttl" not in headers

    @pytest.mark.parametrize("status", [404, 500])
    async def test_destination_error_without_dead_letter_sink(self, make_broker: MakeBroker,
                                                             subscriber: Subscriber, status: int) -> None:
        subscriber.fail_with = status
        broker = await make_broker(_triggers(subscriber, retry=1))
        await _post(broker)
        await settle(broker, "destination", 1)
        assert subscriber.attempts == 2  # retried once (404 and 500 are retryable), then given up
        lost = broker.metrics.lost.labels("default/destination")._value.get()
        assert lost == 1

    async def test_empty_202_is_no_reply(self, make_broker: MakeBroker, subscriber: Subscriber,
                                         other_subscriber: Subscriber) -> None:
        broker = await make_broker(_triggers(subscriber, catch=other_subscriber))
        await _post(broker)
        await settle(broker, "destination", 1)
        await settle(broker, "replies", 1)
        assert other_subscriber.attempts == 0

    async def test_destination_and_reply(self, make_broker: MakeBroker, subscriber: Subscriber,
                                         other_subscriber: Subscriber) -> None:
        """The reply (here: a full binary CloudEvent, with the case's headers) goes back into the
        broker with its X-Request-Id / Knative-* headers, and not the others."""
        subscriber.answer = reply_with(_reply_event(), 202, extra={
            "x-request-id": "altered-id", "knative-1": "new-knative-1-value", "do-not-passthrough": "no"})
        broker = await make_broker(_triggers(subscriber, catch=other_subscriber))
        await _post(broker)
        headers, body = (await asyncio.to_thread(other_subscriber.wait_for_requests, 1))[0]
        assert headers["x-request-id"] == "altered-id" and headers["knative-1"] == "new-knative-1-value"
        assert headers["ce-abc"] == "%22new-ce-abc-value%22" and body == b"destination-response"
        assert "do-not-passthrough" not in headers and "knative-2" not in headers

    async def test_dead_letter_on_400(self, make_broker: MakeBroker, subscriber: Subscriber,
                                      other_subscriber: Subscriber) -> None:
        subscriber.answer = lambda event, headers: (400, {}, b"destination-response")
        broker = await make_broker(_triggers(subscriber, dls=other_subscriber, retry=3))
        await _post(broker)
        headers, body = (await asyncio.to_thread(other_subscriber.wait_for_requests, 1))[0]
        assert subscriber.attempts == 1  # 400 is not retried
        expected = dict(CASES["dead_letter"]["dispatcher_cases"][5]["expect"]["dead_letter_receives"])
        expected["ce-knativeerrordest"] = subscriber.url
        for name, value in expected.items():
            assert _value(name, headers, body) == value, name
        assert "prefer" not in headers and "do-not-forward" not in headers

    async def test_dead_letter_keeps_multi_line_body(self, make_broker: MakeBroker, subscriber: Subscriber,
                                                     other_subscriber: Subscriber) -> None:
        subscriber.answer = lambda event, headers: (400, {}, b"destination\n multi-line\n response")
        broker = await make_broker(_triggers(subscriber, dls=other_subscriber))
        await _post(broker)
        headers, _ = (await asyncio.to_thread(other_subscriber.wait_for_requests, 1))[0]
        expected = CASES["dead_letter"]["dispatcher_cases"][7]["expect"]["dead_letter_receives"]
        assert headers["ce-knativeerrordata"] == expected["ce-knativeerrordata"]
        assert headers["ce-knativeerrorcode"] == "400"

    async def test_reply_not_stored_dead_letters_the_original(self, make_broker: MakeBroker, subscriber: Subscriber,
                                                              other_subscriber: Subscriber) -> None:
        """Knative's "invalid reply" case: here the reply's delivery is the broker's own log, which
        refuses it (a one-event memory log, still holding the original): after the retries the
        ORIGINAL event is dead-lettered, with the reply failure's code, and with the headers that
        went with the reply (the Go test's response carries altered-id and new-knative-1-value).
        The code, data and destination are the log's here, not an HTTP reply sink's.
        Only the reply's storing is retried (as Knative retries only the reply's delivery): the
        subscriber, which took the event, is not sent it again."""
        subscriber.answer = reply_with(_reply_event(), 202, extra=REPLY_HEADERS)
        broker = await make_broker(_triggers(subscriber, dls=other_subscriber, retry=1), channel="memory",
                                   spool={"memory_max_events": 1})
        await _post(broker)
        headers, body = (await asyncio.to_thread(other_subscriber.wait_for_requests, 1))[0]
        case = CASES["dead_letter"]["dispatcher_cases"][6]
        assert case["name"] == "invalid reply and delivery option - deadletter reply without event"
        for name, value in case["expect"]["dead_letter_receives"].items():
            if not name.startswith("ce-knativeerror"):
                assert _value(name, headers, body) == value, name
        assert headers["ce-knativeerrorcode"] == "503" and subscriber.attempts == 1
        assert headers["ce-knativeerrordest"] == "broker:default/default"  # the reply's destination failed
        # The Go test compares the whole header set: the request's own are not there.
        assert not {"knative-2", "do-not-forward", "do-not-passthrough", "prefer"} & set(headers)
        dispatcher = broker.dispatchers[("default", "destination")]
        await until(lambda: dispatcher._dead_lettered._value.get() == 1, what="dead-lettered")
        assert (dispatcher._delivered._value.get(), dispatcher._replies._value.get()) == (1, 0)

    async def test_no_limit_on_reply_size(self, make_broker: MakeBroker, subscriber: Subscriber,
                                          other_subscriber: Subscriber) -> None:
        subscriber.answer = reply_with(_reply_event(b"a" * 2000), 202)
        broker = await make_broker(_triggers(subscriber, catch=other_subscriber))
        await _post(broker)
        _, body = (await asyncio.to_thread(other_subscriber.wait_for_requests, 1))[0]
        assert len(body) == 2000


class TestReplyStoring:
    """A reply the subscriber gave, stored in the broker's log: retried alone, counted when stored."""

    async def test_only_the_reply_is_stored_again_until_the_log_takes_it(
            self, make_broker: MakeBroker, subscriber: Subscriber, other_subscriber: Subscriber,
            monkeypatch: pytest.MonkeyPatch) -> None:
        """The log refuses the reply twice (full), then takes it: the subscriber was sent the event
        once, the reply reaches the trigger for replies, and nothing is dead-lettered."""
        subscriber.answer = reply_with(_reply_event(), 202)
        broker = await make_broker(_triggers(subscriber, catch=other_subscriber, retry=2))
        refusals = iter([ChannelError("full"), ChannelError("full")])
        publish = broker.publish

        async def full_at_first(key: Any, events: list[CloudEvent]) -> int:
            if events[0].type == "reply" and (refused := next(refusals, None)) is not None:
                raise refused
            return await publish(key, events)

        monkeypatch.setattr(broker, "publish", full_at_first)
        await _post(broker)
        headers, body = (await asyncio.to_thread(other_subscriber.wait_for_requests, 1))[0]
        assert headers["ce-id"] == "reply-1" and body == b"destination-response"
        await settle(broker, "destination", 1)
        dispatcher = broker.dispatchers[("default", "destination")]
        assert subscriber.attempts == 1 and next(refusals, None) is None
        assert (dispatcher._delivered._value.get(), dispatcher._replies._value.get()) == (1, 1)
        assert dispatcher._dead_lettered._value.get() == 0 and dispatcher._lost._value.get() == 0

    async def test_a_reply_the_broker_drops_is_not_counted_put_back(
            self, make_broker: MakeBroker, subscriber: Subscriber, other_subscriber: Subscriber) -> None:
        """A reply whose TTL ran out (the original's 1, one off) is dropped, not stored: no reply."""
        subscriber.answer = reply_with(_reply_event(), 202)
        broker = await make_broker(_triggers(subscriber, catch=other_subscriber), default_ttl=1)
        await _post(broker)
        await settle(broker, "destination", 1)
        dispatcher = broker.dispatchers[("default", "destination")]
        assert broker.metrics.refused.labels("ttl_expired")._value.get() == 1
        assert (dispatcher._delivered._value.get(), dispatcher._replies._value.get()) == (1, 0)
        assert other_subscriber.attempts == 0


class TestReplySize:
    """A reply is an event like any other: over `max_event_bytes` the broker refuses it (it was
    stored at any size), and of a response body the broker holds twice that at most (a 150 MB
    error body grew it by 230 MB to keep 768 bytes of it)."""

    async def test_a_reply_over_the_event_limit_dead_letters_the_original(
            self, make_broker: MakeBroker, subscriber: Subscriber, other_subscriber: Subscriber) -> None:
        subscriber.answer = reply_with(_reply_event(b"a" * 1500), 202, extra=REPLY_HEADERS)
        broker = await make_broker(_triggers(subscriber, dls=other_subscriber, retry=2), max_event_bytes=1000)
        await _post(broker)
        headers, body = (await asyncio.to_thread(other_subscriber.wait_for_requests, 1))[0]
        assert headers["ce-knativeerrorcode"] == "413" and body == b'"destination"'
        assert subscriber.attempts == 1  # refused for good: not retried
        assert headers["x-request-id"] == "altered-id" and headers["knative-1"] == "new-knative-1-value"
        assert "knative-2" not in headers and "do-not-passthrough" not in headers

    async def test_a_response_over_twice_the_limit_is_read_not_held(
            self, make_broker: MakeBroker, subscriber: Subscriber, other_subscriber: Subscriber) -> None:
        subscriber.answer = reply_with(_reply_event(b"a" * 5000), 202, extra=REPLY_HEADERS)
        broker = await make_broker(_triggers(subscriber, dls=other_subscriber), max_event_bytes=1000)
        await _post(broker)
        headers, _ = (await asyncio.to_thread(other_subscriber.wait_for_requests, 1))[0]
        assert headers["ce-knativeerrorcode"] == "413" and headers["ce-knativeerrordest"] == "broker:default/default"
        assert headers["x-request-id"] == "altered-id" and "knative-2" not in headers  # the cut reply's
        assert len(base64.b64decode(headers["ce-knativeerrordata"])) == 768  # the start of what was held
        assert subscriber.attempts == 1  # as a reply refused for its size: not retried

    async def test_a_reply_is_measured_as_the_ingress_measures_an_event(
            self, make_broker: MakeBroker, subscriber: Subscriber, other_subscriber: Subscriber) -> None:
        """Data and attributes, as the ingress weighs them in every mode (a reply was weighed by its
        data alone, a binary event too): an event of exactly 1000 bytes is taken from a sender and
        as a reply (the TTL the broker stamps on it after weighing not counted), one byte more is a
        413 from a sender."""
        fits = _reply_event(b"")
        fits = _reply_event(b"a" * (1000 - event_size(fits)))
        assert event_size(fits) == 1000
        subscriber.answer = reply_with(fits, 202)
        broker = await make_broker(_triggers(subscriber, catch=other_subscriber), max_event_bytes=1000)
        async with client(broker) as c:
            assert (await c.post("/", **binary_request(fits))).status_code == 202
            over = _reply_event(fits.data + b"a")  # type: ignore[operator]
            assert (await c.post("/", **binary_request(over))).status_code == 413
        await _post(broker)
        requests = await asyncio.to_thread(other_subscriber.wait_for_requests, 2)
        assert [len(body) for _, body in requests] == [len(fits.data or b"")] * 2

    async def test_a_large_body_that_is_no_event_is_retried_as_any_non_event(
            self, make_broker: MakeBroker, subscriber: Subscriber, other_subscriber: Subscriber) -> None:
        """A 2xx HTML page past twice the limit was taken for a reply too large (413, the broker as
        destination, not retried); one below it for what it is (502, retried): Knative's 502 for both."""
        subscriber.answer = lambda event, headers: (200, {"content-type": "text/html"}, b"<p>" + b"x" * 3000)
        broker = await make_broker(_triggers(subscriber, dls=other_subscriber, retry=2), max_event_bytes=1000)
        await _post(broker)
        headers, _ = (await asyncio.to_thread(other_subscriber.wait_for_requests, 1))[0]
        assert headers["ce-knativeerrorcode"] == "502" and headers["ce-knativeerrordest"] == subscriber.url
        assert subscriber.attempts == 3

    async def test_a_truncated_reply_is_no_reply_on_the_trigger_endpoint(
            self, make_broker: MakeBroker, subscriber: Subscriber) -> None:
        """POST /triggers/...: a reply cut at twice the limit was answered 200 as if whole."""
        subscriber.answer = reply_with(_reply_event(b"a" * 5000), 200)
        broker = await make_broker(_triggers(subscriber), max_event_bytes=1000)
        uid = broker.triggers[("default", "destination")].uid
        event = CloudEvent({**_dispatcher_event().attributes, "knativebrokerttl": 5}, b"x")
        async with client(broker) as c:
            r = await c.post(f"/triggers/default/destination/{uid}", **binary_request(event))
        assert r.status_code == 502 and "larger than the broker takes" in r.json()["error"]


async def test_a_dead_letter_never_keeps_the_error_data_of_an_earlier_failure(
        make_broker: MakeBroker, subscriber: Subscriber, other_subscriber: Subscriber) -> None:
    """An event dead-lettered before (sent back for another try) failing with an empty body kept
    its old knativeerrordata beside the new code; as Knative, an empty body sets none."""
    subscriber.answer = lambda event, headers: (500, {}, b"")
    broker = await make_broker(_triggers(subscriber, dls=other_subscriber))
    old = {"knativeerrorcode": "404", "knativeerrordest": "http://old/", "knativeerrordata": "b2xk"}
    async with client(broker) as c:
        event = CloudEvent({**_dispatcher_event().attributes, **old}, b"x")
        assert (await c.post("/", **binary_request(event))).status_code == 202
    headers, _ = (await asyncio.to_thread(other_subscriber.wait_for_requests, 1))[0]
    assert headers["ce-knativeerrorcode"] == "500" and "ce-knativeerrordata" not in headers
    assert "knativeerrordata" not in error_extensions("http://s/", 500, b"")


@pytest.mark.parametrize("timeout", ["PT0S", "PT0.000S", "P0D"])
def test_a_zero_timeout_is_refused(timeout: str) -> None:
    """As Knative's webhook refuses it: every attempt failed before it was sent, the dead
    letter's too, and every event was lost."""
    with pytest.raises(ValidationError, match="longer than zero"):
        DeliverySpec(timeout=timeout)


@pytest.mark.parametrize("field", ["subscriber", "delivery.deadLetterSink", "subscriber.ref"])
@pytest.mark.parametrize("path", ["hook one", "hook\u20ac", "hook\u00e9", "hook\r\nx-injected: 1", "hook\tx"])
def test_a_uri_no_request_line_carries_is_refused_at_load(field: str, path: str) -> None:
    """It loaded, and every delivery failed (a 400 from the peer, or a UnicodeEncodeError retried)."""
    from infer_logger.documents import DocumentError
    from pipelines.broker import load_triggers

    uri = f"http://127.0.0.1:9/{path}"
    trigger: dict[str, Any] = {"name": "t", "subscriber": uri}
    if field == "delivery.deadLetterSink":
        trigger = {"name": "t", "subscriber": "http://127.0.0.1:9/", "delivery": {"deadLetterSink": uri}}
    elif field == "subscriber.ref":  # a uri relative to what the reference resolves to
        trigger = {"name": "t", "subscriber": {"ref": {"name": "s"}, "uri": path}}
    with pytest.raises(DocumentError) as caught:
        load_triggers(yaml.safe_dump({"triggers": [trigger]}))
    where = field.removesuffix(".ref")
    assert f"triggers[0].{where}:" in str(caught.value) and "percent-encoded" in str(caught.value), caught.value


@pytest.mark.parametrize("uri", ["http://127.0.0.1:9/hook%20one", "http://127.0.0.1:9/hook%E2%82%AC?q=a+b&r=%7E#x",
                                 "http://[::1]:9/p;v=1/it's(ok)*,!$@:~",
                                 # outside RFC 3986, yet taken by common servers: they delivered
                                 "http://127.0.0.1:9/hook/{name}?fields=a|b&x=a^b", "http://127.0.0.1:9/50%off"])
def test_a_uri_that_can_be_sent_loads(uri: str) -> None:
    from pipelines.broker import load_triggers

    [trigger] = load_triggers(yaml.safe_dump({"triggers": [{"name": "t", "subscriber": uri}]})).triggers
    assert trigger.subscriber.uri == uri


BAD_AUTHORITIES = [("http://127.0.0.1:99999/", "port"), ("http://127.0.0.1:8o80/", "port"),
                   ("http://127.0.0.1:0/", "port"), ("http://:8080/", "host"), ("https://u@:443/x", "host")]


@pytest.mark.parametrize("field", ["subscriber", "delivery.deadLetterSink"])
@pytest.mark.parametrize(("uri", "what"), BAD_AUTHORITIES)
def test_a_uri_no_connection_can_use_is_refused_at_load(field: str, uri: str, what: str) -> None:
    """It loaded, and every delivery failed before a connection (a ValueError, counted as no
    answer): retried, then dead-lettered, and as the dead-letter sink every event was lost."""
    from infer_logger.documents import DocumentError
    from pipelines.broker import load_triggers

    trigger: dict[str, Any] = {"name": "t", "subscriber": uri}
    if field == "delivery.deadLetterSink":
        trigger = {"name": "t", "subscriber": "http://127.0.0.1:9/", "delivery": {"deadLetterSink": uri}}
    with pytest.raises(DocumentError) as caught:
        load_triggers(yaml.safe_dump({"triggers": [trigger]}))
    assert f"triggers[0].{field}:" in str(caught.value) and what in str(caught.value), caught.value


@pytest.mark.parametrize(("uri", "what"), BAD_AUTHORITIES)
def test_an_address_no_connection_can_use_is_refused(uri: str, what: str, tmp_path: Any) -> None:
    from pipelines.broker.settings import BrokerSettings

    with pytest.raises(ValidationError, match=what):
        BrokerSettings(dir=tmp_path, addresses={"event-display": uri})


class TestRetries:
    """Attempts, Retry-After and timeouts as a subscriber sees them."""

    async def test_retry_count_and_success(self, make_broker: MakeBroker, subscriber: Subscriber) -> None:
        answers: Iterator[Answer] = iter([(503, {}, b""), (429, {}, b""), (202, {}, b"")])
        subscriber.answer = lambda event, headers: next(answers)
        broker = await make_broker(_triggers(subscriber, retry=5))
        await _post(broker)
        await settle(broker, "destination", 1)
        assert subscriber.attempts == 3 and len(subscriber.events) == 1

    async def test_a_failing_dead_letter_sink_is_retried_then_counted_lost(
            self, make_broker: MakeBroker, subscriber: Subscriber, other_subscriber: Subscriber) -> None:
        """The dead-letter sink gets the trigger's retries too; past them the event is lost, and counted."""
        subscriber.fail_with = 500
        answers: Iterator[Answer] = iter([(503, {}, b""), (202, {}, b"")])
        other_subscriber.answer = lambda event, headers: next(answers, (503, {}, b""))
        broker = await make_broker(_triggers(subscriber, dls=other_subscriber, retry=2))
        await _post(broker)
        await asyncio.to_thread(other_subscriber.wait_for_requests, 2)
        dispatcher = broker.dispatchers[("default", "destination")]
        await until(lambda: dispatcher._dead_lettered._value.get() == 1, what="dead-lettered on the 2nd try")
        assert subscriber.attempts == 3 and dispatcher._lost._value.get() == 0
        # A dead-letter sink that never takes it: given up after the retries, counted lost.
        async with client(broker) as c:
            second = CloudEvent({**_dispatcher_event().attributes, "id": "dispatch-2"}, b'"destination"')
            assert (await c.post("/", **binary_request(second))).status_code == 202
        await until(lambda: dispatcher._lost._value.get() == 1, what="lost after the dead-letter retries")
        assert other_subscriber.attempts == 2 + 3

    async def test_a_bug_on_the_way_dead_letters_instead_of_freezing_the_trigger(
            self, make_broker: MakeBroker, subscriber: Subscriber, other_subscriber: Subscriber,
            monkeypatch: pytest.MonkeyPatch) -> None:
        import pipelines.broker.dispatcher as dispatcher_module

        def broken(value: str | None) -> float | None:
            raise ValueError("a bug")

        monkeypatch.setattr(dispatcher_module, "retry_after", broken)
        subscriber.fail_with = 503
        broker = await make_broker(_triggers(subscriber, dls=other_subscriber, retry=2))
        await _post(broker)
        headers, body = (await asyncio.to_thread(other_subscriber.wait_for_requests, 1))[0]
        assert headers["ce-knativeerrorcode"] == "500" and body == b'"destination"'
        await settle(broker, "destination", 1)  # settled: the log position moves on

    async def test_timeout_is_dead_lettered_as_knative_does_no_answer(self, make_broker: MakeBroker, subscriber: Subscriber,
                                                 other_subscriber: Subscriber) -> None:
        subscriber.delay = 1.0
        text = _triggers(subscriber, dls=other_subscriber, retry=1)
        text = text.replace("backoffDelay", "timeout: PT0.1S, backoffDelay")
        broker = await make_broker(text)
        await _post(broker)
        headers, _ = (await asyncio.to_thread(other_subscriber.wait_for_requests, 1))[0]
        # Knative's dispatcher: no answer is a 500, "dispatch error: ..." its data (it was -1).
        assert headers["ce-knativeerrorcode"] == "500"
        assert base64.b64decode(headers["ce-knativeerrordata"]).startswith(b"dispatch error: no answer within")

    async def test_a_switching_protocols_answer_is_not_retried(self, make_broker: MakeBroker,
                                                               other_subscriber: Subscriber) -> None:
        """A 101 (a subscriber upgrading the connection unasked) is an answer, and a 1xx is not
        retried: it was taken for no answer (-1) and sent again."""
        switching = Scripted(lambda _: b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                                       b"connection: upgrade\r\n\r\n")
        async with switching as url:
            text = f"""
triggers:
  - name: destination
    subscriber: {url}
    delivery: {{retry: 2, backoffDelay: PT0.01S, deadLetterSink: {other_subscriber.url}}}
"""
            broker = await make_broker(text)
            await _post(broker)
            headers, _ = (await asyncio.to_thread(other_subscriber.wait_for_requests, 1))[0]
        assert headers["ce-knativeerrorcode"] == "101" and len(switching.heads) == 1


async def test_retry_after_is_honoured_up_to_its_cap(make_broker: MakeBroker, subscriber: Subscriber,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The waits the dispatcher asks for (recorded, not timed): Retry-After 2 s beats a 0.01 s backoff;
    Retry-After 3600 s is capped by retryAfterMax (PT3S)."""
    import types

    import pipelines.broker.dispatcher as dispatcher_module

    waits: list[float] = []

    async def record(delay: float) -> None:
        waits.append(delay)
        await asyncio.sleep(0)

    # The dispatcher's own `asyncio`, with a sleep that records instead of waiting.
    monkeypatch.setattr(dispatcher_module, "asyncio", types.SimpleNamespace(**{**vars(asyncio), "sleep": record}))
    answers: Iterator[Answer] = iter([(429, {"retry-after": "2"}, b""), (503, {"retry-after": "3600"}, b""),
                                      (202, {}, b"")])
    subscriber.answer = lambda event, headers: next(answers)
    text = _triggers(subscriber, retry=5)
    text = text.replace("backoffDelay", "backoffPolicy: linear, retryAfterMax: PT3S, backoffDelay")
    broker = await make_broker(text)
    await _post(broker)
    await settle(broker, "destination", 1)
    assert waits == [2.0, 3.0] and subscriber.attempts == 3


@pytest.mark.parametrize(("retry_after", "wait"), [("2", 2.0), ("9" * 400, 3.0)], ids=["honoured", "capped"])
async def test_a_component_s_retry_after(make_broker: MakeBroker, subscriber: Subscriber,
                                         monkeypatch: pytest.MonkeyPatch, retry_after: str, wait: float) -> None:
    """An in-process `http` component whose receiver answers 503 + Retry-After: its SinkError
    carried the delay, but the attempt counted as no answer, which Retry-After does not apply to.
    A 400-digit one gave inf, and round(inf) raised in the component's endpoint: the attempt
    counted as the component's crash (500). Honoured up to retryAfterMax (3 s here)."""
    import types

    import pipelines.broker.dispatcher as dispatcher_module

    waits: list[float] = []

    async def record(delay: float) -> None:
        waits.append(delay)
        await asyncio.sleep(0)

    monkeypatch.setattr(dispatcher_module, "asyncio", types.SimpleNamespace(**{**vars(asyncio), "sleep": record}))
    answers: Iterator[Answer] = iter([(503, {"retry-after": retry_after}, b""), (202, {}, b"")])
    subscriber.answer = lambda event, headers: next(answers)
    text = _triggers(subscriber, retry=3).replace(f"subscriber: {subscriber.url}",
                                                  f"subscriber: {{component: {{type: http, url: '{subscriber.url}'}}}}")
    text = text.replace("backoffDelay", "retryAfterMax: PT3S, backoffDelay")
    broker = await make_broker(text)
    await _post(broker)
    await settle(broker, "destination", 1)
    assert waits == [wait] and subscriber.attempts == 2


class _Busy:
    """A component that is busy for `after` seconds (pure logic: no transport involved)."""

    def __init__(self, after: float) -> None:
        self.after = after

    async def send_batch(self, events: list[CloudEvent]) -> None:
        raise SinkError("busy", retry_after=self.after)

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize(("after", "status", "header"), [
    (float("inf"), 503, str(round(RETRY_AFTER_MAX))), (1e300, 503, str(round(RETRY_AFTER_MAX))),
    (-5.0, 503, "0"), (float("nan"), NO_RESPONSE, None),
])
async def test_a_component_s_retry_after_of_any_size_is_an_answer(after: float, status: int,
                                                                  header: str | None) -> None:
    """round(inf) raised OverflowError (round(nan) ValueError): the attempt became a 500."""
    event = CloudEvent({"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}, b"{}")
    response = await ComponentEndpoint("busy", _Busy(after)).send(event, {}, reply=False, timeout=5)
    assert (response.status, response.retry_after) == (status, header)


class _Cancelling(_Busy):
    async def send_batch(self, events: list[CloudEvent]) -> None:
        raise asyncio.CancelledError()  # a client library's own, not the broker's


async def test_a_component_s_own_cancel_fails_the_attempt_and_a_stop_still_cancels() -> None:
    """Out of `send`, it ended the delivery with the event unsettled, as no failure does."""
    event = CloudEvent({"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}, b"{}")
    response = await ComponentEndpoint("c", _Cancelling(0)).send(event, {}, reply=False, timeout=5)
    assert response.status == NO_RESPONSE and "cancelled" in (response.reason or "")

    class Hanging(_Busy):
        async def send_batch(self, events: list[CloudEvent]) -> None:
            await asyncio.Event().wait()

    sending = asyncio.ensure_future(ComponentEndpoint("h", Hanging(0)).send(event, {}, reply=False, timeout=5))
    await asyncio.sleep(0.05)
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
