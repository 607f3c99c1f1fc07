"""When to try again: the Retry-After header (RFC 9110 10.2.3), read one way by the http sink, the
Elasticsearch sink and the broker's delivery."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

RETRY_AFTER_MAX = 86400.0
"""Seconds a Retry-After is cut to: it stays finite (a 400-digit one was inf), and every user caps it lower."""


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header, None when absent or invalid: ASCII delta-seconds or an
    HTTP date in any of RFC 9110's three forms (one without a zone is GMT; a past one is 0)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit() also takes "²", which float() refuses
        return min(float(value), RETRY_AFTER_MAX)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # asctime and "-0000" dates carry no zone; HTTP dates are always GMT
        when = when.replace(tzinfo=UTC)
    return min(max(0.0, (when - (now or datetime.now(UTC))).total_seconds()), RETRY_AFTER_MAX)
