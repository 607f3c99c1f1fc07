"""Appending lines to a file all or nothing: the file sink's JSONL and the dead-letter files.

A write cut short (a full disk, a size limit) is cut off again, so that the retry does not append
after a torn line (as the spool does); but only if the file still ends with those bytes: it has
one writer, and another's lines are never cut. A torn line a crash left (kill -9 in a write, a
machine crash before the page cache reached the disk) is cut off at the first append of the
process: its batch was not acknowledged, so it comes again whole. Only what looks torn is cut:
the start of a JSON object left open, or zeros; a last line that closes, or is no JSON object, or that
the process may not cut (an append-only file) gets its newline instead (one it may not read,
a write-only file, is left as it is).

A pipe or a terminal (`/dev/stderr` in a container) has no end to find or cut: lines go to it
as they are, and a write that fails part way fails the batch (sent again: at least once). A
pipe no one reads fails the batch rather than blocking it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import stat
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_CHUNK = 1 << 16
_TORN_MAX = 16 << 20  # a torn line is part of one event's line (~1 MiB); more is no crash's doing
_mended: set[Path] = set()  # files whose tail this process has checked
_mending = threading.Lock()


def append(path: Path, lines: bytes, *, fsync: bool = False) -> None:
    """Append `lines` to `path` (created), whole or not at all; OSError when they were not."""
    # Non-blocking to open: a pipe no one reads blocked here for ever (ENXIO now: retried).
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        if regular:
            _mend_once(path, fd)
        start = written = 0
        try:
            view = memoryview(lines)
            while view:
                n = os.write(fd, view)
                if regular and not written:  # O_APPEND put it at the end of the file, wherever that was then
                    start = os.lseek(fd, 0, os.SEEK_CUR) - n
                written += n
                view = view[n:]
            if fsync and regular:
                os.fsync(fd)
        except OSError:
            if written and regular:
                _cut(path, fd, start, written)
            raise
    finally:
        os.close(fd)


def _mend_once(path: Path, fd: int) -> None:
    """End a last line that lacks its newline, the first time this process appends to `path`;
    later ones are this process's own, and `_cut` mends those. A newline that cannot be written
    fails the append (the batch goes again, and the check with it): the batch's first line would
    join the last one."""
    with _mending:
        if path in _mended:
            return
        _mend(path, fd)
        _mended.add(path)


def _mend(path: Path, fd: int) -> None:
    size = os.fstat(fd).st_size
    if not size:
        return
    try:
        tail = _last_line(path, fd, size)
    except OSError as exc:  # a file this process may append to but not read (mode 0220)
        log.warning("%s: could not read its last line (%s): appending after it as it is", path, exc)
        return
    if tail is None or tail.endswith(b"\n"):
        return
    # Zeros at the end: blocks a machine's crash left unwritten past the data (a whole line too).
    data = tail.rstrip(b"\0")
    torn = (tail and not data) or (data.startswith(b"{") and not _closes(data))
    if torn or data != tail:
        keep = size - len(tail) + (0 if torn else len(data))
        try:
            os.ftruncate(fd, keep)
            log.warning("%s: cut off %d bytes of a torn last line (a write a crash interrupted)", path, size - keep)
            if torn:
                return
        except OSError as exc:  # an append-only file (chattr +a): the torn line is ended instead
            log.warning("%s: could not cut off a torn last line of %d bytes (%s)", path, size - keep, exc)
    os.write(fd, b"\n")
    log.warning("%s: its last line had no newline: one added", path)


def _last_line(path: Path, fd: int, size: int) -> bytes | None:
    """The file's bytes after its last newline (just the newline when it ends with one; none
    when they are more than `_TORN_MAX`, no torn line), or None when the name is another file
    now (a rotation meanwhile)."""
    with open(path, "rb") as reader:
        if not os.path.samestat(os.fstat(reader.fileno()), os.fstat(fd)):
            return None  # the name is another file now
        reader.seek(size - 1)
        if reader.read(1) == b"\n":
            return b"\n"
        end = size  # the start of the last line
        while end > 0:
            if size - end > _TORN_MAX:
                return b""
            begin = max(0, end - _CHUNK)
            reader.seek(begin)
            at = reader.read(end - begin).rfind(b"\n")
            if at >= 0:
                end = begin + at + 1
                break
            end = begin
        reader.seek(end)
        return reader.read(size - end)


# Strings (their escapes included; one cut short runs to the end) and brackets.
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?P<closed>"|\\?\Z)|[][{}]', re.DOTALL)


def _closes(line: bytes) -> bool:
    """Whether a line that opens a JSON object closes it: no string and no bracket left open.
    Not a parser's verdict: one refuses valid JSON (NaN, lone surrogates, deep nesting) that
    other writers' whole lines hold, and a torn line never closes."""
    depth = 0
    for token in _TOKENS.finditer(line):
        text = token[0]
        if text[:1] == b'"':
            if token["closed"] != b'"':
                return False
        elif text in (b"{", b"["):
            depth += 1
        else:
            depth -= 1
    return depth == 0


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
    with _mending:  # the next append mends it (ends it, if it cannot be cut), as at a first one
        _mended.discard(path)
