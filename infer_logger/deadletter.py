"""Dead-letter files: events refused for good, one JSON line each with the reason.

The sink workers write one per sink (`<spool>/deadletter/<sink>.jsonl`); sources that have no
one to hand a refused event back to (the `forward` source) write their own.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path

import orjson

from infer_logger import appending
from infer_logger.cloudevents.event import CloudEvent, attribute_text
from infer_logger.events import RawPayload, decode_data


def line(event: CloudEvent, reason: str) -> bytes:
    """One dead-letter record: the reason, the attributes, the data to read (`data`: JSON, or
    `{"base64": ...}` for what is not) and the data as sent (`data_base64`: what `data` cannot
    tell, e.g. text from a JSON object of that shape, or `1.50` from `1.5`), to send it again.
    A refused event is often one no encoder takes (JSON nested past orjson's 254 levels or
    Python's recursion limit): then its data to read is base64 too and its attributes text, so
    that the record is always written."""
    sent = None if event.data is None else base64.b64encode(event.data).decode()
    try:
        record = {"reason": reason, "attributes": event.attributes, "data": decode_data(event), "data_base64": sent}
        return orjson.dumps(record) + b"\n"
    except (TypeError, ValueError, RecursionError):
        data = None if sent is None else RawPayload(base64=sent)
        attributes = {name: attribute_text(value) for name, value in event.attributes.items()}
        return orjson.dumps({"reason": reason, "attributes": attributes, "data": data, "data_base64": sent}) + b"\n"


def append(path: Path, refused: Sequence[tuple[CloudEvent, str]], *, fsync: bool = False) -> None:
    """Append a record of each (event, reason) to `path` (OSError when it cannot be written);
    `fsync` before returning when what comes next forgets them elsewhere (an ack to a sender)."""
    lines = b"".join(line(event, reason) for event, reason in refused)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Whole or not at all: a write cut short (a full disk) left a torn line, and the retry wrote
    # the records again after it.
    appending.append(path, lines, fsync=fsync)
