"""The embedded store sink: the default, zero-dependency place for audit records."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from typing import Literal

from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import ConfigError, InferLoggerError, RejectedError, SinkError
from infer_logger.fields import NamedFile
from infer_logger.sinks.base import SinkConfig
from infer_logger.sinks.own_thread import OwnThread
from infer_logger.store import AuditStore


class StoreSinkConfig(SinkConfig):
    """Writes one record per prediction to a local SQLite file (see `infer_logger.store`)."""

    type: Literal["store"] = "store"
    path: NamedFile = "infer-logger-data/audit.db"
    """The SQLite file; its directory is created when missing."""

    def build(self) -> StoreSink:
        try:
            return StoreSink(AuditStore(self.path))
        except InferLoggerError as exc:  # cannot open it, not SQLite, a newer schema: a wrong path
            raise ConfigError("path", str(exc)) from None


class StoreSink:
    def __init__(self, store: AuditStore) -> None:
        self.store = store
        # SQLite blocks (fsync, busy waits up to the store's timeout): off the event loop.
        self._thread = OwnThread("store-sink", f"audit store {store.path}")

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        try:
            await self._thread.call(self.store.write, events)
        except sqlite3.Error as exc:
            # "database is locked", disk full, I/O errors: none is the events' fault, so retry.
            raise SinkError(f"audit store {self.store.path}: {exc}") from exc
        except SinkError:
            raise
        except Exception:
            # Not SQLite's: rows some event cannot make (a statuscode past 64 bits, a time with no
            # UTC form, JSON nested past what orjson writes, a bug). Those are found one by one and
            # dead-lettered, never retried forever; the rest are written.
            await self._write_each(events)

    async def _write_each(self, events: Sequence[CloudEvent]) -> None:
        refused: list[CloudEvent] = []
        reason = ""
        for event in events:
            try:
                await self._thread.call(self.store.write, [event])
            except sqlite3.Error as exc:
                raise SinkError(f"audit store {self.store.path}: {exc}") from exc
            except SinkError:
                raise
            except Exception as exc:
                refused.append(event)
                reason = reason or f"event {event.id}: {type(exc).__name__}: {exc}"
        if refused:
            raise RejectedError(f"audit store cannot hold {len(refused)} event(s), e.g. {reason}", refused)

    async def aclose(self) -> None:
        with contextlib.suppress(SinkError):  # closed already
            await self._thread.call(self.store.close)
        self._thread.shutdown()
