"""Dead-letter files: one JSON line per refused event, written whole or not at all."""

from __future__ import annotations

import base64
from pathlib import Path

import orjson

from tests.file_size import cut_short_then_again

_SETUP = """
import sys
from pathlib import Path
from infer_logger import deadletter
from infer_logger.cloudevents.event import CloudEvent

path = Path(sys.argv[1])
refused = [(CloudEvent({"specversion": "1.0", "id": f"e{i}", "source": "/s", "type": "t"}, b'"' + b"x" * 500 + b'"'),
            "refused") for i in range(10)]
"""


def test_records_cut_short_leave_no_torn_line_for_the_retry_to_follow(tmp_path: Path) -> None:
    """The part written stayed: a torn line no JSONL reader parses, then every record again."""
    path = tmp_path / "deadletter" / "s.jsonl"
    out = cut_short_then_again(_SETUP, "deadletter.append(path, refused)", str(path))  # then the worker's retry
    assert out.returncode == 0 and out.stdout.split() == ["failed"], out.stderr
    ids = [orjson.loads(line)["attributes"]["id"] for line in path.read_bytes().splitlines()]
    assert ids == [f"e{i}" for i in range(10)]


def test_a_record_gives_back_the_data_as_sent(tmp_path: Path) -> None:
    """`data` is for reading: text and a JSON object {"base64": ...} read alike, JSON is
    written anew; `data_base64` is the bytes refused, to send again."""
    from infer_logger import deadletter
    from infer_logger.cloudevents.event import CloudEvent

    sent = [b"hi", b'{"base64": "aGk="}', b'{"x": 1e2, "y": 1.50}', None]
    path = tmp_path / "s.jsonl"
    deadletter.append(path, [(CloudEvent({"specversion": "1.0", "id": str(i), "source": "/s", "type": "t"}, data),
                              "refused") for i, data in enumerate(sent)])
    records = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [r["data"] for r in records][:2] == [{"base64": "aGk="}, {"base64": "aGk="}]  # alike to read
    assert [None if r["data_base64"] is None else base64.b64decode(r["data_base64"]) for r in records] == sent
