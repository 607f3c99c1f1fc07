"""Delivery options (Knative's DeliverySpec and Destination), the retry decision and the backoff.

Following knative/eventing rather than the prose of knative/specs where they differ (the
conformance data flags it): linear backoff waits `delay * n` before retry n, exponential waits
`delay * 2**n` (n from 1). Retry-After (seconds or an HTTP date) is honoured on 429 and 503 only
when `retryAfterMax` is set, as max(backoff, min(Retry-After, retryAfterMax)).

Dead-lettered events keep the original event and gain `knativeerrordest`, `knativeerrorcode` and
`knativeerrordata` (the failed response's body in base64, cut to 1024 characters).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NO_RESPONSE = -1
"""The status recorded when nothing answered (refused, reset, timed out)."""
RETRYABLE_4XX = frozenset({404, 408, 409, 429})
ERROR_DATA_MAX = 1024
_ERROR_BODY_MAX = ERROR_DATA_MAX // 4 * 3  # the bytes whose base64 is exactly ERROR_DATA_MAX long

_NUMBER = r"(\d+(?:[.,]\d+)?)"
_DURATION = re.compile(
    rf"P(?:{_NUMBER}Y)?(?:{_NUMBER}M)?(?:{_NUMBER}W)?(?:{_NUMBER}D)?"
    rf"(?:T(?:{_NUMBER}H)?(?:{_NUMBER}M)?(?:{_NUMBER}S)?)?",
    re.IGNORECASE,
)
_UNIT_SECONDS = (None, None, 604800.0, 86400.0, 3600.0, 60.0, 1.0)
# What no request line carries: whitespace, control characters, non-ASCII. (Others outside RFC
# 3986, `|{}^`, are taken by common servers: URIs with them delivered, and still load.)
_UNSENDABLE = re.compile(r"[^\x21-\x7e]")


def parse_duration(text: str) -> float:
    """Seconds in an ISO-8601 duration such as `PT0.5S`, `PT2M`, `P1DT12H`; raises ValueError.

    Years and months have no fixed length, so they are refused rather than guessed.
    """
    match = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None or not any(match.groups()) or text.strip().upper().endswith("T"):
        raise ValueError(f"{text!r} is not an ISO-8601 duration (e.g. PT0.5S, PT10S, PT1M)")
    if match.group(1) or match.group(2):
        raise ValueError(f"{text!r}: years and months have no fixed length; use weeks, days or hours")
    return sum(
        float(group.replace(",", ".")) * unit
        for group, unit in zip(match.groups(), _UNIT_SECONDS, strict=True)
        if group is not None and unit is not None
    )


class Reference(BaseModel):
    """duckv1.KReference: here `name` names an in-process component or an entry of `addresses`."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: str | None = None
    apiVersion: str | None = None  # Kubernetes field names, kept as written
    namespace: str | None = None
    group: str | None = None
    address: str | None = None


class Destination(BaseModel):
    """Where events go: a `uri`, a `ref` (resolved by name), or an in-process `component` config.

    A plain string is taken as a `uri`. With `ref`, a relative `uri` is joined to the address
    the reference resolves to, as Knative does.
    """

    model_config = ConfigDict(extra="forbid")

    uri: str | None = None
    ref: Reference | None = None
    component: dict[str, Any] | None = None
    """An in-process component by config, e.g. `{type: store, path: audit.db}`."""
    CACerts: str | None = None  # accepted so that manifests load; TLS trust is the host's
    audience: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"uri": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> Destination:
        if self.component is not None:
            if self.uri is not None or self.ref is not None:
                raise ValueError("a component destination takes neither uri nor ref")
            if not isinstance(self.component.get("type"), str):
                raise ValueError("component needs a `type` (a registered sink type, e.g. store)")
        elif self.ref is None:
            if self.uri is None:
                raise ValueError("a destination needs a uri, a ref or a component")
            parts = urlsplit(self.uri)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"uri {self.uri!r} must be an absolute http(s) URL")
        if self.uri is not None and (bad := _UNSENDABLE.search(self.uri)):
            # It loaded, and every delivery failed: a 400 from the peer, or unsendable (non-Latin-1).
            raise ValueError(f"uri {self.uri!r} cannot be sent: {bad.group()!r} must be percent-encoded")
        if self.uri is not None and (parts := urlsplit(self.uri)).netloc:  # a ref's relative uri has none
            _check_authority(self.uri, parts)
        return self


def _check_authority(uri: str, parts: SplitResult) -> None:
    """Refuses a host and port no connection can use: it loaded, and every delivery failed
    before a connection (the transport's ValueError, as no answer), the dead letter's too."""
    try:
        port = parts.port
    except ValueError as exc:  # out of range, or not digits
        raise ValueError(f"uri {uri!r} has no usable port: {exc}") from None
    if port == 0:  # the transport reads it as "none given" and would connect to 80 or 443
        raise ValueError(f"uri {uri!r} has no usable port: 0")
    if not parts.hostname:
        raise ValueError(f"uri {uri!r} names no host")


class DeliverySpec(BaseModel):
    """Knative's `spec.delivery`; every field optional, so a trigger's spec can lay over a broker's."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    dead_letter_sink: Destination | None = Field(None, alias="deadLetterSink")
    retry: int | None = Field(None, ge=0)
    """Retries after the first attempt before the event goes to the dead-letter sink."""
    backoff_policy: Literal["linear", "exponential"] | None = Field(None, alias="backoffPolicy")
    backoff_delay: str | None = Field(None, alias="backoffDelay")
    timeout: str | None = None
    """Per-attempt timeout (ISO-8601)."""
    retry_after_max: str | None = Field(None, alias="retryAfterMax")
    format: Literal["binary", "json"] | None = None
    """Content mode of deliveries: `binary` (default) or `json` (structured)."""

    @field_validator("backoff_delay", "timeout", "retry_after_max")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @field_validator("timeout")
    @classmethod
    def _some_time(cls, value: str | None) -> str | None:
        # As Knative's webhook refuses it: a zero timeout failed every attempt before it was sent,
        # the dead letter's too (the same timeout), and every event was lost.
        if value is not None and parse_duration(value) <= 0:
            raise ValueError(f"{value!r}: a timeout must be longer than zero")
        return value

    def over(self, base: DeliverySpec | None) -> DeliverySpec:
        """This spec with the fields it leaves unset taken from `base` (trigger over broker)."""
        if base is None:
            return self
        return base.model_copy(update={name: getattr(self, name) for name in self.model_fields_set})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A DeliverySpec resolved into numbers; the default retries nothing, as Knative's does."""

    retry: int = 0
    policy: Literal["linear", "exponential"] = "exponential"
    delay: float = 0.0
    timeout: float | None = None
    retry_after_max: float | None = None

    @classmethod
    def from_spec(cls, spec: DeliverySpec | None) -> RetryPolicy:
        if spec is None:
            return cls()
        return cls(
            retry=spec.retry or 0,
            policy=spec.backoff_policy or "exponential",
            delay=parse_duration(spec.backoff_delay) if spec.backoff_delay else 0.0,
            timeout=parse_duration(spec.timeout) if spec.timeout else None,
            retry_after_max=parse_duration(spec.retry_after_max) if spec.retry_after_max else None,
        )

    def backoff(self, attempt: int) -> float:
        """The wait before retry number `attempt` (1 = the first retry)."""
        if self.policy == "linear":
            return self.delay * attempt
        # `retry` is unbounded: past 2**1023 a float overflows (the wait is forever long before).
        return self.delay * 2.0 ** min(attempt, 1000)

    def wait(self, attempt: int, status: int, retry_after: float | None) -> float:
        backoff = self.backoff(attempt)
        if self.retry_after_max is None or retry_after is None or status not in (429, 503):
            return backoff
        return max(backoff, min(retry_after, self.retry_after_max))


def should_retry(status: int | None) -> bool:
    """Knative's selective retry: no response, 404, 408, 409, 429 and 5xx are worth another try."""
    if status is None or status == NO_RESPONSE:
        return True
    return status in RETRYABLE_4XX or status >= 500


def error_extensions(destination: str, status: int, body: bytes) -> dict[str, str]:
    """What a dead-lettered event gains: where and how its delivery failed."""
    extensions = {"knativeerrordest": destination, "knativeerrorcode": str(status)}
    if body:  # as Knative: no data, no attribute (the letter drops an earlier failure's)
        # base64 of the first 768 bytes is exactly the first 1024 characters of the whole body's.
        extensions["knativeerrordata"] = base64.b64encode(body[:_ERROR_BODY_MAX]).decode("ascii")
    return extensions


def truncate_error_data(text: str) -> str:
    return text[:ERROR_DATA_MAX]
