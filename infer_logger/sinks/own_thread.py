"""A thread of a sink's own for its blocking calls (SQLite, file writes and fsyncs).

Not asyncio's default pool: a sink blocked for seconds (a store another writer holds locked, a
stalled disk) took its threads, one per batch in flight (a broker component has 64 per trigger),
and everything else that uses that pool waited behind it: the broker resolves its subscribers'
hosts there, and a healthy trigger's deliveries timed out. One thread: these sinks take one
write at a time anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from infer_logger.errors import SinkError

T = TypeVar("T")


class OwnThread:
    def __init__(self, name: str, what: str) -> None:
        self.what = what
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the thread; SinkError (retried) once `shutdown` was called."""
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except RuntimeError:  # shut down
            raise SinkError(f"{self.what}: the sink is closed") from None
        return await future

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False)
