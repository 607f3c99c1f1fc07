"""`file` sink: one CloudEvent per line in the JSON format (JSONL)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import field_validator

from infer_logger import appending, fields
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.cloudevents.json_format import to_json
from infer_logger.errors import ConfigError, SinkError
from infer_logger.sinks.base import SinkConfig
from infer_logger.sinks.own_thread import OwnThread


class FileSinkConfig(SinkConfig):
    type: Literal["file"] = "file"
    path: fields.AppendedPath = Path("infer-logger-data/events.jsonl")
    """The JSONL file to append to (its directory is created). This sink must be its only writer:
    a batch cut short (full disk) is cut off again only when no one else appended meanwhile."""
    fsync: bool = False
    """Fsync after every batch, for a file that must survive a machine crash."""

    @field_validator("path")
    @classmethod
    def _not_a_directory(cls, path: Path) -> Path:
        try:
            is_dir = path.is_dir()
        except OSError as exc:  # a name too long, a directory not ours to look in
            raise ValueError(f"{path}: {exc.strerror or exc}") from None
        if is_dir:  # every batch would fail, and be retried for ever
            raise ValueError(f"{path} is a directory: name the JSONL file")
        return path

    def build(self) -> FileSink:
        return FileSink(self)


class FileSink:
    def __init__(self, config: FileSinkConfig) -> None:
        self.config = config
        try:
            config.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file in the way, no permission: say so at start, not per batch
            reason = exc.strerror or exc
            raise ConfigError("path", f"{config.path.parent}: cannot create the directory: {reason}") from None
        # Writes and fsyncs block. One thread: with in_flight > 1 too, one batch is written at a
        # time, so a batch cut short cuts off only its own bytes, never one already acknowledged.
        self._thread = OwnThread("file-sink", str(config.path))

    def _write(self, lines: bytes) -> None:
        try:
            appending.append(self.config.path, lines, fsync=self.config.fsync)
        except FileNotFoundError:  # its directory was removed (a clean-up): made again, as at start
            self.config.path.parent.mkdir(parents=True, exist_ok=True)
            appending.append(self.config.path, lines, fsync=self.config.fsync)

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        lines = b"".join(to_json(e) + b"\n" for e in events)
        try:
            await self._thread.call(self._write, lines)
        except OSError as exc:
            raise SinkError(f"{self.config.path}: {exc}") from exc

    async def aclose(self) -> None:
        self._thread.shutdown()
