"""`POST /triggers/<namespace>/<name>/<uid>`: Knative's broker filter handler, synchronously.

The event (with its `knativebrokerttl`, as the broker's log holds it) is checked against the
trigger's filter and, if it passes, sent once to the subscriber; the answer comes back to the
caller: the subscriber's status (502 when nothing or no CloudEvent came back), `Retry-After`,
and a reply event with the TTL put back. No retries and no dead letter here: the caller owns
those. This is how another dispatcher can use a trigger, and how a trigger is tried by hand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from infer_logger.asgi import invalid_event_body
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.cloudevents.http import from_http, to_binary
from infer_logger.errors import InvalidEventError
from pipelines.broker.channel import TTL, parse_ttl
from pipelines.broker.delivery import NO_RESPONSE
from pipelines.broker.dispatcher import without_ttl
from pipelines.broker.endpoints import BadReplyError, parse_reply, passthrough
from pipelines.broker.filters import FAIL, Delivered

if TYPE_CHECKING:
    from pipelines.broker.broker import Broker

Headers = list[tuple[bytes, bytes]]
Answer = tuple[int, Headers, bytes]
_JSON = (b"content-type", b"application/json")


def _error(status: int, reason: str) -> Answer:
    headers = [_JSON, (b"allow", b"POST")] if status == 405 else [_JSON]
    return status, headers, orjson.dumps({"error": reason, "status": status})


class TriggerHandler:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def handle(self, method: str, parts: list[str], raw_headers: Headers, body: bytes) -> Answer:
        if method != "POST":
            return _error(405, "events are POSTed")
        if len(parts) != 4:
            return _error(400, "the path is /triggers/<namespace>/<name>/<uid>")
        _, namespace, name, uid = parts
        trigger = self.broker.triggers.get((namespace, name))
        dispatcher = self.broker.dispatchers.get((namespace, name))
        if trigger is None or dispatcher is None or trigger.uid != uid:
            return _error(404, f"no trigger {namespace}/{name} with uid {uid}")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw_headers}
        try:
            event = from_http(headers, body)
        except InvalidEventError as exc:
            return 400, [_JSON], invalid_event_body(exc)
        if TTL not in event.attributes:
            return _error(400, f"the event has no {TTL}: only events that came through a broker are taken")
        try:  # as Knative's (and our ingress): a TTL that cannot be read is refused, not sent on
            ttl = parse_ttl(event.attributes[TTL])
        except InvalidEventError as exc:
            return 400, [_JSON], invalid_event_body(exc)
        if trigger.filter(Delivered(event.attributes, TTL)) is FAIL:
            return 200, [], b""
        out = without_ttl(event)[0]
        response = await dispatcher.subscriber.send(out, passthrough(headers), reply=True,
                                                    timeout=dispatcher.policy.timeout)
        retry_after = response.retry_after_header()
        allowed: Headers = [(b"retry-after", retry_after.encode("latin-1"))] if retry_after else []
        if not response.ok:
            return (502 if response.status == NO_RESPONSE else response.status), allowed, b""
        if response.truncated:  # cut at twice max_event_bytes: answered whole, it would pass as the reply
            return 502, [*allowed, _JSON], orjson.dumps({"error": "the subscriber's reply is larger than the broker "
                                                                  "takes", "status": 502})
        try:
            reply = parse_reply(response)
        except BadReplyError as exc:
            return 502, [*allowed, _JSON], orjson.dumps({"error": str(exc), "status": 502})
        if reply is None:
            return response.status, allowed, b""
        reply = CloudEvent({**reply.attributes, TTL: ttl}, reply.data)
        out_headers, out_body = to_binary(reply)  # structured for a reply that carries a CloudEvent
        encoded = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in out_headers.items()]
        return response.status, [*allowed, *encoded], out_body
