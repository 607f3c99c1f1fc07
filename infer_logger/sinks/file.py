"""`file` sink: one CloudEvent per line in the JSON format (JSONL)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import field_validator

from infer_logger.cloudevents.event import CloudEvent
from infer_logger.cloudevents.json_format import to_json
from infer_logger.errors import ConfigError, SinkError
from infer_logger.sinks.base import SinkConfig


class FileSinkConfig(SinkConfig):
    type: Literal["file"] = "file"
    path: Path = Path("infer-logger-data/events.jsonl")
    """The JSONL file to append to (its directory is created)."""
    fsync: bool = False
    """Fsync after every batch, for a file that must survive a machine crash."""

    @field_validator("path")
    @classmethod
    def _not_a_directory(cls, path: Path) -> Path:
        if path.is_dir():  # every batch would fail, and be retried for ever
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

    def _write(self, lines: bytes) -> None:
        fd = os.open(self.config.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(lines)
                while view:
                    view = view[os.write(fd, view):]
                if self.config.fsync:
                    os.fsync(fd)
            except OSError:
                # A full disk or a size limit may stop the batch midway: cut off what was written,
                # so the retry does not append it after a torn line (as the spool does).
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        lines = b"".join(to_json(e) + b"\n" for e in events)
        try:
            await asyncio.to_thread(self._write, lines)
        except OSError as exc:
            raise SinkError(f"{self.config.path}: {exc}") from exc

    async def aclose(self) -> None:
        pass
