"""The file sink writes one JSON-format CloudEvent per line, readable back."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from infer_logger import appending
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.cloudevents.json_format import from_json, to_json
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


def test_a_path_it_cannot_look_at_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="too long"):  # an OSError escaped pydantic: a traceback
        FileSinkConfig(path=tmp_path / ("a" * 300 + ".jsonl"))


async def test_unwritable_path_is_a_retryable_error(tmp_path: Path) -> None:
    target = tmp_path / "dir"
    sink = FileSinkConfig(path=target / "e.jsonl").build()
    (target / "e.jsonl").mkdir()  # a directory where the file should be
    with pytest.raises(SinkError):
        await sink.send_batch([CloudEvent({"specversion": "1.0", "id": "1", "source": "/s", "type": "t"})])


# Files the script's process writes may grow to 10000 bytes: the kernel refuses the rest (EFBIG)
# midway through the batch, as a full disk would (ENOSPC). Python ignores SIGXFSZ.
_SEND_LIMITED = """
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (10000, hard))
try:
    asyncio.run(sink.send_batch(batch))
except SinkError:
    print("refused")
"""


def _run(script: str, path: Path) -> subprocess.CompletedProcess[str]:
    """`script` given `path`, in a process of its own: its file size limit must not touch pytest."""
    return subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parents[3], check=False)


_SIZE_LIMIT = """
import asyncio, resource, sys
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import SinkError
from infer_logger.sinks.file import FileSinkConfig

sink = FileSinkConfig(path=sys.argv[1]).build()
batch = [CloudEvent({"specversion": "1.0", "id": str(i), "source": "/s", "type": "t"}, b"x" * 200)
         for i in range(100)]
asyncio.run(sink.send_batch(batch[:5]))
""" + _SEND_LIMITED + """
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
asyncio.run(sink.send_batch(batch))  # the worker's retry
"""


def test_a_batch_cut_short_leaves_no_torn_line_for_the_retry_to_follow(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    out = _run(_SIZE_LIMIT, path)
    assert out.returncode == 0 and out.stdout.split() == ["refused"], out.stderr
    ids = [from_json(line).id for line in path.read_bytes().splitlines()]
    assert ids == [str(i) for i in range(5)] + [str(i) for i in range(100)]


_TWO_IN_FLIGHT = """
import asyncio, os, resource, sys, threading
import infer_logger.appending as appending
import infer_logger.sinks.file as file_sink
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import SinkError

sink = file_sink.FileSinkConfig(path=sys.argv[1]).build()
big = [CloudEvent({"specversion": "1.0", "id": f"big{i}", "source": "/s", "type": "t"}, b"x" * 200)
       for i in range(100)]
small = [CloudEvent({"specversion": "1.0", "id": f"small{i}", "source": "/s", "type": "t"}) for i in range(3)]
at_write, small_done = threading.Event(), threading.Event()

class HeldOs:
    # The big batch's thread stops just before its first write, as if descheduled there, until
    # the small batch is done (a bounded wait: with one writer at a time the small one waits).
    def __getattr__(self, name):
        return getattr(os, name)
    def write(self, fd, data):
        if not at_write.is_set():
            at_write.set()
            small_done.wait(1)
        return os.write(fd, data)

appending.os = HeldOs()
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (10000, hard))  # the big batch does not fit

async def main():
    async def send_big():
        try:
            await sink.send_batch(big)
        except SinkError:
            print("big-refused")
    async def send_small():
        await asyncio.to_thread(at_write.wait)
        await sink.send_batch(small)
        small_done.set()
        print("small-acknowledged")
    await asyncio.gather(send_big(), send_small())
asyncio.run(main())
"""


def test_a_batch_cut_short_never_cuts_a_batch_acknowledged_meanwhile(tmp_path: Path) -> None:
    """in_flight >= 2 runs two batches of one sink in threads at once: the one that fails cuts
    off only its own bytes (it cut the file back to its size before the write, losing the other's)."""
    path = tmp_path / "events.jsonl"
    out = _run(_TWO_IN_FLIGHT, path)
    assert out.returncode == 0 and sorted(out.stdout.split()) == ["big-refused", "small-acknowledged"], out.stderr
    assert [from_json(line).id for line in path.read_bytes().splitlines()] == ["small0", "small1", "small2"]


_OTHER_WRITER = """
import asyncio, os, resource, sys
import infer_logger.appending as appending
import infer_logger.sinks.file as file_sink
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import SinkError

path = sys.argv[1]
sink = file_sink.FileSinkConfig(path=path).build()
batch = [CloudEvent({"specversion": "1.0", "id": str(i), "source": "/s", "type": "t"}, b"x" * 200)
         for i in range(100)]
calls = []

class OtherWriterOs:
    # The batch goes out in two writes; another process appends a line between them.
    def __getattr__(self, name):
        return getattr(os, name)
    def write(self, fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return os.write(fd, data[:1000])
        with open(path, "ab") as other:
            other.write(b'{"other": "writer"}\\n')
        return os.write(fd, data)

appending.os = OtherWriterOs()
""" + _SEND_LIMITED


def test_a_batch_cut_short_leaves_what_another_writer_appended(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    out = _run(_OTHER_WRITER, path)
    assert out.returncode == 0 and out.stdout.split() == ["refused"], out.stderr
    assert b'{"other": "writer"}\n' in path.read_bytes()  # not cut off with the torn batch
    assert "another writer appended" in out.stderr


def _event(id_: str) -> CloudEvent:
    return CloudEvent({"specversion": "1.0", "id": id_, "source": "/s", "type": "t"})


async def test_a_pipe_gets_each_batch_once(tmp_path: Path) -> None:
    """`file:///dev/stderr` in a container is a pipe: no end to find there (lseek failed after
    the write, and the batch went again, for ever)."""
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, so that opening to write succeeds
    try:
        sink = FileSinkConfig(path=fifo, fsync=True).build()  # fsync: a pipe has nothing to sync
        await sink.send_batch([_event("1"), _event("2")])
        await sink.aclose()
        assert [from_json(line).id for line in os.read(reader, 1 << 16).splitlines()] == ["1", "2"]
    finally:
        os.close(reader)


async def test_a_torn_line_a_crash_left_is_cut_off_before_the_first_batch(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    whole = to_json(_event("0")) + b"\n"
    path.write_bytes(whole + to_json(_event("1"))[:20])  # kill -9 in the middle of a write
    sink = FileSinkConfig(path=path).build()
    await sink.send_batch([_event("1"), _event("2")])  # the batch not acknowledged, again
    await sink.aclose()
    assert [from_json(line).id for line in path.read_bytes().splitlines()] == ["0", "1", "2"]
    only_torn = tmp_path / "torn.jsonl"
    only_torn.write_bytes(b'{"specversion": "1.0", "id": "x')
    sink = FileSinkConfig(path=only_torn).build()
    await sink.send_batch([_event("x")])
    await sink.aclose()
    assert [from_json(line).id for line in only_torn.read_bytes().splitlines()] == ["x"]


async def test_a_directory_removed_meanwhile_is_made_again(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "events.jsonl"
    sink = FileSinkConfig(path=path).build()
    await sink.send_batch([_event("1")])
    shutil.rmtree(path.parent)
    await sink.send_batch([_event("2")])
    await sink.aclose()
    assert [from_json(line).id for line in path.read_bytes().splitlines()] == ["2"]


def test_a_path_with_a_nul_is_a_config_error() -> None:
    from pipelines.sources.forward import ForwardSourceConfig
    from pipelines.sources.kafka import KafkaSourceConfig

    with pytest.raises(ValidationError, match="NUL"):  # every batch raised ValueError, retried for ever
        FileSinkConfig(path=Path("ev\0ents.jsonl"))
    # Dead-letter files alike: their first dead letter raised the ValueError (the forward source
    # caught OSError only).
    with pytest.raises(ValidationError, match="dead_letter_file"):
        KafkaSourceConfig(bootstrap_servers="k:9092", topics=["t"], dead_letter_file=Path("dl\0.jsonl"))
    with pytest.raises(ValidationError, match="dead_letter_file"):
        ForwardSourceConfig(dead_letter_file=Path("dl\0.jsonl"))


async def test_a_last_line_that_is_no_torn_event_keeps_its_bytes(tmp_path: Path) -> None:
    """Only the start of a JSON object that does not read whole is a crash's torn line: a whole
    last line without its newline, or a file that is no JSONL, got cut (all of it, for the latter)."""
    whole = tmp_path / "joined.jsonl"
    whole.write_bytes(b"\n".join(to_json(_event(str(i))) for i in range(3)))  # "\n".join: no newline at the end
    other = tmp_path / "notes.txt"
    other.write_bytes(b"x" * 200_000)
    for path in (whole, other):
        sink = FileSinkConfig(path=path).build()
        await sink.send_batch([_event("new")])
        await sink.aclose()
    assert [from_json(line).id for line in whole.read_bytes().splitlines()] == ["0", "1", "2", "new"]
    assert other.read_bytes().startswith(b"x" * 200_000 + b"\n{")


async def test_a_file_it_cannot_read_or_that_was_rotated_is_appended_to(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(to_json(_event("0"))[:20])
    real_open = open

    def rotated(name: Path, mode: str) -> Any:  # logrotate's rename and create between our open and read
        path.rename(tmp_path / "events.jsonl.1")
        path.write_bytes(b"")
        return real_open(name, mode)

    monkeypatch.setattr(appending, "open", rotated, raising=False)
    sink = FileSinkConfig(path=path).build()
    await sink.send_batch([_event("1")])
    assert (tmp_path / "events.jsonl.1").read_bytes() == to_json(_event("0"))[:20] + to_json(_event("1")) + b"\n"

    def refused(name: Path, mode: str) -> Any:  # a write-only file (mode 0220), a file root squashed
        raise PermissionError(13, "Permission denied")

    unreadable = tmp_path / "write-only.jsonl"
    unreadable.write_bytes(b'{"torn')
    monkeypatch.setattr(appending, "open", refused, raising=False)
    sink = FileSinkConfig(path=unreadable).build()
    await sink.send_batch([_event("2")])  # every batch failed: the mend's error was the append's
    await sink.aclose()
    assert unreadable.read_bytes() == b'{"torn' + to_json(_event("2")) + b"\n"


async def test_a_pipe_no_one_reads_fails_the_batch(tmp_path: Path) -> None:
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    sink = FileSinkConfig(path=fifo).build()
    try:
        with pytest.raises(SinkError, match="No such device"):  # blocked for ever, the process's exit too
            await asyncio.wait_for(sink.send_batch([_event("1")]), 60)
    finally:
        await sink.aclose()


async def test_a_batch_cut_short_it_cannot_cut_off_is_ended_before_the_retry(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """On an append-only file (chattr +a) a write cut short (a full disk) cannot be cut off: its
    torn line stayed without a newline, and the retry's first event was written onto it."""
    path = tmp_path / "append-only.jsonl"
    sink = FileSinkConfig(path=path).build()
    await sink.send_batch([_event("0")])
    real_write, calls = os.write, []

    def short(fd: int, data: Any) -> int:  # as at a file size limit: part of it, then EFBIG
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(27, "File too large")
        return real_write(fd, bytes(data)[:30])

    def refused(fd: int, length: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    with monkeypatch.context() as patched:
        patched.setattr(os, "write", short)
        patched.setattr(os, "ftruncate", refused)
        with pytest.raises(SinkError):
            await sink.send_batch([_event("1"), _event("2")])
        patched.setattr(os, "write", real_write)
        await sink.send_batch([_event("1"), _event("2")])  # the worker's retry
    await sink.aclose()
    lines = path.read_bytes().splitlines()
    assert [from_json(line).id for line in lines if line.endswith(b"}")] == ["0", "1", "2"], lines


async def test_a_last_line_it_cannot_cut_or_end_is_never_joined_to_the_next(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The check of the last line once failed was never made again, and the next batch's first
    line was written onto the torn one, which no reader could read."""
    append_only = tmp_path / "append-only.jsonl"  # chattr +a: no cutting
    append_only.write_bytes(to_json(_event("0")) + b"\n" + to_json(_event("1"))[:20])

    def refused(fd: int, length: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    with monkeypatch.context() as patched:
        patched.setattr(os, "ftruncate", refused)
        sink = FileSinkConfig(path=append_only).build()
        await sink.send_batch([_event("1")])
        await sink.aclose()
    assert append_only.read_bytes().splitlines()[2] == to_json(_event("1"))  # the torn line kept, ended

    full = tmp_path / "full.jsonl"  # the newline refused once (a full disk): the batch fails, then goes again
    full.write_bytes(to_json(_event("0")))
    real_write, failed = os.write, []

    def write(fd: int, data: Any) -> int:
        if bytes(data) == b"\n" and not failed:
            failed.append(1)
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    sink = FileSinkConfig(path=full).build()
    with pytest.raises(SinkError, match="No space"):
        await sink.send_batch([_event("1")])
    await sink.send_batch([_event("1")])
    await sink.aclose()
    assert [from_json(line).id for line in full.read_bytes().splitlines()] == ["0", "1"]


async def test_another_writers_whole_last_line_is_kept_whatever_a_parser_thinks_of_it(tmp_path: Path) -> None:
    # Python's json writes NaN; nesting past 1024 levels: whole lines a parser refuses were cut.
    path = tmp_path / "theirs.jsonl"
    deep = "[" * 1100 + "]" * 1100
    path.write_text('{"id": "1"}\n{"id": "2", "score": NaN, "deep": ' + deep + "}")
    sink = FileSinkConfig(path=path).build()
    await sink.send_batch([_event("3")])
    await sink.aclose()
    lines = path.read_bytes().splitlines()
    assert lines[1].startswith(b'{"id": "2", "score": NaN') and from_json(lines[2]).id == "3"


async def test_zeros_a_machines_crash_left_are_cut_off(tmp_path: Path) -> None:
    # Blocks the file's size covered but its data never reached: they read back as zeros.
    for whole in (b"\n", b""):  # the zeros after a line's end, or where its newline was
        path = tmp_path / f"events{len(whole)}.jsonl"
        path.write_bytes(to_json(_event("0")) + whole + bytes(4096))
        sink = FileSinkConfig(path=path).build()
        await sink.send_batch([_event("1")])
        await sink.aclose()
        assert [from_json(line).id for line in path.read_bytes().splitlines()] == ["0", "1"]
