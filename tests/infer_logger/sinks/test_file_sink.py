"""The file sink writes one JSON-format CloudEvent per line, readable back."""

from __future__ import annotations

from pathlib import Path

import pytest

from infer_logger.cloudevents.event import CloudEvent
from infer_logger.cloudevents.json_format import from_json
from infer_logger.errors import SinkError
from infer_logger.sinks.file import FileSinkConfig


async def test_jsonl_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "events.jsonl"
    sink = FileSinkConfig(path=path, fsync=True).build()
    sent = [
        CloudEvent({"specversion": "1.0", "id": "1", "source": "/s", "type": "t",
                    "datacontenttype": "application/json"}, b'{"a": [1, 2]}'),
        CloudEvent({"specversion": "1.0", "id": "2", "source": "/s", "type": "t",
                    "datacontenttype": "application/octet-stream"}, bytes(range(10))),
    ]
    await sink.send_batch(sent)
    await sink.send_batch(sent[:1])
    lines = path.read_bytes().splitlines()
    assert len(lines) == 3
    back = [from_json(line) for line in lines]
    assert back[0].json() == {"a": [1, 2]} and back[1].data == bytes(range(10))


async def test_unwritable_path_is_a_retryable_error(tmp_path: Path) -> None:
    target = tmp_path / "dir"
    sink = FileSinkConfig(path=target / "e.jsonl").build()
    (target / "e.jsonl").mkdir()  # a directory where the file should be
    with pytest.raises(SinkError):
        await sink.send_batch([CloudEvent({"specversion": "1.0", "id": "1", "source": "/s", "type": "t"})])
