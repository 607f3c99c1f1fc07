from datetime import UTC, datetime

from infer_logger.retry import RETRY_AFTER_MAX, retry_after


def test_delta_seconds_and_http_dates() -> None:
    """The broker's cases (tests/pipelines/broker/test_delivery.py) hold too: it is one parser."""
    assert retry_after("120") == 120
    assert retry_after(None) is None
    assert retry_after("soon") is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0
    # A stale copy: "²" raised, 400 digits gave inf, and dates without a zone were ignored.
    assert retry_after("²") is None and retry_after("1, 2") is None
    assert retry_after("9" * 400) == RETRY_AFTER_MAX
    now = datetime(1994, 11, 6, 8, 49, 7, tzinfo=UTC)
    assert retry_after("Sun Nov  6 08:49:37 1994", now) == 30
    assert retry_after("Sun, 06 Nov 1994 08:49:37 -0000", now) == 30
