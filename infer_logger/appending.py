"""Appending lines to a file all or nothing: the file sink's JSONL and the dead-letter files.

A write cut short (a full disk, a size limit) is cut off again, so that the retry does not append
after a torn line (as the spool does); but only if the file still ends with those bytes: it has
one writer, and another's lines are never cut.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def append(path: Path, lines: bytes, *, fsync: bool = False) -> None:
    """Append `lines` to `path` (created), whole or not at all; OSError when they were not."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = written = 0
        try:
            view = memoryview(lines)
            while view:
                n = os.write(fd, view)
                if not written:  # O_APPEND put it at the end of the file, wherever that was then
                    start = os.lseek(fd, 0, os.SEEK_CUR) - n
                written += n
                view = view[n:]
            if fsync:
                os.fsync(fd)
        except OSError:
            if written:
                _cut(path, fd, start, written)
            raise
    finally:
        os.close(fd)


def _cut(path: Path, fd: int, start: int, written: int) -> None:
    try:
        if os.fstat(fd).st_size == start + written:
            os.ftruncate(fd, start)
            return
        reason = "another writer appended to it meanwhile, so it is left as it is"
    except OSError as exc:
        reason = f"it could not be cut off ({exc})"
    log.error("%s: a write stopped after %d bytes and %s: the file has a torn line "
              "(only one writer, in one process, may append to it)", path, written, reason)
