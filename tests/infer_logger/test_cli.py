"""The command line: help, query, setup; errors as messages with exit codes, never tracebacks."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from infer_logger.cli import main
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.events import REQUEST, RESPONSE
from infer_logger.store import AuditStore
from infer_logger.testing import free_port


def test_help_lists_the_commands() -> None:
    out = CliRunner().invoke(main, ["--help"]).output
    for command in ("proxy", "query", "quickstart", "setup"):
        assert command in out
    assert "--component-port" in CliRunner().invoke(main, ["proxy", "--help"]).output


def seeded_store(path: Path) -> None:
    base = {"specversion": "1.0", "source": "/s", "modelname": "iris", "protocol": "v1",
            "datacontenttype": "application/json"}
    with AuditStore(path) as store:
        for i, status in enumerate([200, 200, 500]):
            store.write([
                CloudEvent({**base, "id": f"q{i}", "type": REQUEST, "time": f"2026-11-25T10:0{i}:00Z"},
                           b'{"instances": [[1, 2]]}'),
                CloudEvent({**base, "id": f"q{i}", "type": RESPONSE, "time": f"2026-11-25T10:0{i}:01Z",
                            "statuscode": status, "latencyms": 3}, b'{"predictions": [1]}'),
            ])


def test_query_filters_and_formats(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    seeded_store(db)
    runner = CliRunner()
    table = runner.invoke(main, ["query", "--db", str(db), "--model", "iris"])
    assert table.exit_code == 0 and "q2" in table.output and "STATUS" in table.output
    records = json.loads(runner.invoke(main, ["query", "--db", str(db), "--status", "500", "--format", "json"]).output)
    assert [r["id"] for r in records] == ["q2"]
    records = json.loads(runner.invoke(main, ["query", "--db", str(db), "--since", "2026-11-25T10:01:00Z",
                                              "--until", "2026-11-25T10:02:00Z", "--format", "json"]).output)
    assert [r["id"] for r in records] == ["q1"]


def test_query_names_a_db_it_cannot_look_at(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["query", "--db", str(tmp_path / ("a" * 300 + ".db"))])
    assert result.exit_code == 2 and "--db" in result.output and "too long" in result.output


def test_query_finds_the_store_the_proxy_is_configured_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --db, query read infer-logger-data/audit.db whatever the proxy's YAML or
    INFER_LOGGER_* settings named as its store."""
    monkeypatch.chdir(tmp_path)
    seeded_store(tmp_path / "configured.db")
    (tmp_path / "proxy.yaml").write_text(f"sinks:\n  - type: store\n    path: {tmp_path / 'configured.db'}\n")
    runner = CliRunner()
    by_file = runner.invoke(main, ["query", "-c", "proxy.yaml", "--format", "json"])
    assert by_file.exit_code == 0 and len(json.loads(by_file.output)) == 3
    monkeypatch.setenv("INFER_LOGGER_LOG_URL", f"sqlite://{tmp_path / 'configured.db'}")
    assert len(json.loads(runner.invoke(main, ["query", "--format", "json"]).output)) == 3
    monkeypatch.setenv("INFER_LOGGER_LOG_URL", "http://broker.example/")
    no_store = runner.invoke(main, ["query"])
    assert no_store.exit_code == 2 and "no store" in no_store.output and "--db" in no_store.output
    monkeypatch.delenv("INFER_LOGGER_LOG_URL")
    default = runner.invoke(main, ["query"])  # no sinks configured: the embedded default's file
    assert default.exit_code == 2 and "infer-logger-data/audit.db does not exist" in default.output


def test_query_table_shows_control_characters_escaped(tmp_path: Path) -> None:
    """A client's newline, tab or escape sequence broke the table and could forge lines on the
    operator's terminal; JSON output was already safe."""
    db = tmp_path / "audit.db"
    attrs = {"specversion": "1.0", "source": "/s", "protocol": "v1", "datacontenttype": "application/json",
             "id": "a\n2026-01-01T00:00:00Z  forged", "modelname": "iris\x1b[2J\u202e", "type": RESPONSE,
             "statuscode": 200}
    with AuditStore(db) as store:
        store.write([CloudEvent(attrs, b'"x\\ty\\u0085"')])  # a JSON string: shown bare
    out = CliRunner().invoke(main, ["query", "--db", str(db)]).output
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert "a\\n2026-01-01T00:00:00Z  forged" in lines[1] and "iris\\x1b[2J\\u202e" in lines[1]
    assert "x\\ty\\x85" in lines[1] and "\x1b" not in out and "\t" not in out


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="reads the store as another user: needs root and setpriv")
def test_query_reads_a_store_in_a_directory_it_may_not_write() -> None:
    """A stopped sidecar's store, readable, in its directory: a reader makes the WAL index (-shm)
    there, which another user cannot, and the store was "not a usable audit store"."""
    where = Path(tempfile.mkdtemp(prefix="infer-logger-ro-"))  # pytest's tmp_path is root's alone
    try:
        where.chmod(0o755)
        seeded_store(where / "audit.db")
        (where / "audit.db").chmod(0o644)
        assert not (where / "audit.db-wal").exists() and not (where / "audit.db-shm").exists()
        command = [str(Path(sys.executable).parent / "infer-logger"), "query", "--db", str(where / "audit.db"),
                   "--format", "json"]
        result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command],
                                capture_output=True, text=True, timeout=60, cwd="/")
        assert result.returncode == 0, result.stderr
        assert sorted(r["id"] for r in json.loads(result.stdout)) == ["q0", "q1", "q2"]
    finally:
        shutil.rmtree(where)


def test_query_bad_input(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(main, ["query", "--db", str(tmp_path / "nope.db")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    db = tmp_path / "audit.db"
    seeded_store(db)
    bad_time = runner.invoke(main, ["query", "--db", str(db), "--since", "last tuesday"])
    assert bad_time.exit_code == 2 and "--since" in bad_time.output
    (tmp_path / "notes.txt").write_text("not a database")
    not_db = runner.invoke(main, ["query", "--db", str(tmp_path / "notes.txt")])
    assert not_db.exit_code == 2 and "not a usable audit store" in not_db.output
    assert not_db.exception is None or isinstance(not_db.exception, SystemExit)  # a message, no traceback


@pytest.mark.parametrize(("option", "value"), [
    ("--status", "99999999999999999999"),
    ("--limit", "99999999999999999999"),
    ("--since", "0001-01-01T00:00:00+01:00"),  # no UTC form: before year 1
    ("--until", "9999-12-31T23:00:00-05:00"),  # past year 9999
    ("--id", "caf\udce9"),  # a byte not UTF-8 in argv (Latin-1 é): UnicodeEncodeError, a traceback
    ("--model", "caf\udce9"),
])
def test_query_values_the_store_cannot_take_are_bad_parameters(tmp_path: Path, option: str, value: str) -> None:
    db = tmp_path / "audit.db"
    seeded_store(db)
    result = CliRunner().invoke(main, ["query", "--db", str(db), option, value])
    assert result.exit_code == 2 and option in result.output, result.output


def _instances(path: Path, id_: str, n: int, time: str = "2026-11-25T10:00:00Z", latency: Any = 3) -> None:
    """One exchange of `n` instances (one row each)."""
    base = {"specversion": "1.0", "source": "/s", "modelname": "iris", "id": id_, "time": time,
            "datacontenttype": "application/json"}
    rows = json.dumps({"instances": [[k] for k in range(n)]}).encode()
    with AuditStore(path) as store:
        store.write([CloudEvent({**base, "type": REQUEST}, rows),
                     CloudEvent({**base, "type": RESPONSE, "statuscode": 200, "latencyms": latency},
                                json.dumps({"predictions": list(range(n))}).encode())])


def _no_constant(name: str) -> None:
    raise AssertionError(f"not JSON: {name}")


def test_query_json_is_json_with_an_infinite_latency_beside_a_deep_payload(tmp_path: Path) -> None:
    """A row nested past orjson's 254 levels sent the whole set to stdlib json, which wrote the
    infinite latency SQLite kept as `Infinity`."""
    db = tmp_path / "audit.db"
    _instances(db, "inf", 1, latency="inf")
    deep = b'{"instances": [' + b"[" * 300 + b"1" + b"]" * 300 + b"]}"
    base = {"specversion": "1.0", "source": "/s", "modelname": "iris", "id": "deep",
            "time": "2026-11-25T10:00:01Z"}
    with AuditStore(db) as store:
        store.write([CloudEvent({**base, "type": REQUEST}, deep),
                     CloudEvent({**base, "type": RESPONSE, "statuscode": 200, "latencyms": 5},
                                b'{"predictions":[1]}')])
    result = CliRunner().invoke(main, ["query", "--db", str(db), "--format", "json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout, parse_constant=_no_constant)
    assert {r["id"]: r["latency_ms"] for r in shown} == {"deep": 5, "inf": None}


def test_query_by_id_shows_every_row_of_the_prediction(tmp_path: Path) -> None:
    """The default --limit 20 counts rows (instances): --id showed 20 of 50, and nothing said so."""
    db = tmp_path / "audit.db"
    _instances(db, "big", 50)
    result = CliRunner().invoke(main, ["query", "--db", str(db), "--id", "big", "--format", "json"])
    assert result.exit_code == 0 and result.stderr == ""
    assert [r["instance"] for r in json.loads(result.stdout)] == list(range(50))
    limited = CliRunner().invoke(main, ["query", "--db", str(db), "--id", "big", "--limit", "5",
                                        "--format", "json"])
    assert len(json.loads(limited.stdout)) == 5 and "--page " in limited.stderr


def _pages(db: Path, *args: str, between: Callable[[], object] = lambda: None) -> list[tuple[str, int]]:
    """Every row, a page of 4 at a time, each page from the token the one before gave."""
    runner, seen, token = CliRunner(), [], None
    while True:
        page = runner.invoke(main, ["query", "--db", str(db), "--limit", "4", "--format", "json", *args,
                                    *(["--page", token] if token else [])])
        assert page.exit_code == 0, page.output
        seen += [(r["id"], r["instance"]) for r in json.loads(page.stdout)]
        if not page.stderr:
            return seen
        token = re.search(r"--page (\S+) shows the next ones", page.stderr)[1]  # type: ignore[index]
        between()


def test_query_says_when_the_limit_left_rows_out_and_its_page_token_reaches_them(tmp_path: Path) -> None:
    """Paging by --until (exclusive) never reached the rest of an exchange whose instances
    share its time; the cut was silent."""
    db = tmp_path / "audit.db"
    for i in "abc":
        _instances(db, i, 2)
    assert _pages(db) == [("c", 0), ("c", 1), ("b", 0), ("b", 1), ("a", 0), ("a", 1)]
    runner = CliRunner()
    exact = runner.invoke(main, ["query", "--db", str(db), "--limit", "6"])
    assert exact.exit_code == 0 and exact.stderr == "" and len(exact.stdout.splitlines()) == 7
    table = runner.invoke(main, ["query", "--db", str(db), "--limit", "1", "--offset", "1"])
    assert table.stdout.splitlines()[1].split()[1:3] == ["c", "1"] and "--page " in table.stderr
    help_ = runner.invoke(main, ["query", "--help"]).output
    assert "--offset" in help_ and "--page" in help_ and "all with --id" in help_


def test_pages_shown_while_a_sidecar_writes_repeat_no_row(tmp_path: Path) -> None:
    """With --offset, an exchange written between two pages moved the rows down: the next page
    showed rows of the one before again."""
    db = tmp_path / "audit.db"
    for i in "abcde":
        _instances(db, i, 2)
    added = iter("vwxyz")
    seen = _pages(db, between=lambda: _instances(db, next(added), 3))
    assert len(seen) == len(set(seen)) and seen[:4] == [("e", 0), ("e", 1), ("d", 0), ("d", 1)]
    assert {("a", 1), ("c", 0)} <= set(seen)


def test_a_page_token_that_is_none_names_the_flag(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    _instances(db, "a", 1)
    for token in ("nonsense", "WzEsMiwzXQ"):  # the second: JSON, [1,2,3]
        result = CliRunner().invoke(main, ["query", "--db", str(db), "--page", token])
        assert result.exit_code == 2 and "--page" in result.stderr and "not a page token" in result.stderr


def test_query_output_of_a_large_store_is_what_it_was_whole(tmp_path: Path) -> None:
    """Streamed a record (JSON) or a chunk of lines (table) at a time, the output is the same text
    the whole-array dump made, and valid JSON."""
    from infer_logger.store import format_table, records_to_json

    db = tmp_path / "audit.db"
    _instances(db, "many", 3000)
    _instances(db, "more", 2000, time="2026-11-25T09:00:00Z")
    with AuditStore(db) as store:
        records = store.query(limit=None)
    for fmt, whole in (("json", records_to_json(records)), ("table", format_table(records))):
        result = CliRunner().invoke(main, ["query", "--db", str(db), "--limit", "10000", "--format", fmt])
        assert result.exit_code == 0 and result.stderr == ""
        assert result.stdout == whole + "\n"
    shown = json.loads(CliRunner().invoke(main, ["query", "--db", str(db), "--limit", "10000",
                                                 "--format", "json"]).stdout)
    assert len(shown) == 5000 and shown[0]["id"] == "many" and shown[-1]["instance"] == 1999


def test_query_of_a_store_damaged_past_its_first_rows_is_one_line_of_error(tmp_path: Path) -> None:
    """The read transaction's end failed too, and its traceback replaced the error."""
    import os

    db = tmp_path / "audit.db"
    with AuditStore(db) as store:
        base = {"specversion": "1.0", "source": "/s", "datacontenttype": "application/json", "modelname": "m"}
        store.write([CloudEvent({**base, "id": f"r{i}", "type": REQUEST, "time": f"2026-11-25T10:00:00.{i:06d}Z"},
                                json.dumps({"instances": [["x" * 300]]}).encode()) for i in range(3000)])
    size = os.path.getsize(db)
    with open(db, "r+b") as f:  # pages past the header, past those the first rows come from
        f.seek(int(size * 0.3) // 16384 * 16384)
        f.write(b"\xff" * 16384 * 3)
    command = [str(Path(sys.executable).parent / "infer-logger"), "query", "--db", str(db), "--limit", "3000"]
    for fmt in ("json", "table"):
        done = subprocess.run([*command, "--format", fmt], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith("infer-logger: ") and "cannot read the audit store" in done.stderr


def test_query_of_a_store_locked_by_another_process_says_busy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock held past the wait is a moment's state, not a bad --db: it was "Invalid value for
    --db: not a usable audit store", exit 2."""
    import functools
    import sqlite3

    from infer_logger import store

    db = tmp_path / "audit.db"
    _instances(db, "a", 1)
    monkeypatch.setattr(store, "AuditStore", functools.partial(AuditStore, timeout=0.1))  # query imports it late
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        result = CliRunner().invoke(main, ["query", "--db", str(db)])
    finally:
        holder.close()
    assert result.exit_code == 1 and "the audit store is busy" in result.stderr, result.output
    assert "Invalid value" not in result.stderr and result.stderr.endswith("try again\n")
    assert CliRunner().invoke(main, ["query", "--db", str(db)]).exit_code == 0


def test_query_read_by_a_reader_that_stops_early_says_nothing(tmp_path: Path) -> None:
    """`query | head`: an "Exception ignored" traceback of the cursors left open, on stderr."""
    db = tmp_path / "audit.db"
    for i in range(300):
        _instances(db, f"x{i}", 10)
    reader = subprocess.Popen([str(Path(sys.executable).parent / "infer-logger"), "query", "--db", str(db),
                               "--limit", "3000", "--format", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout is not None and reader.stderr is not None
    reader.stdout.read(100)
    reader.stdout.close()
    assert reader.stderr.read() == b"" and reader.wait(60) in (0, 1)


def test_query_with_no_room_for_its_output_writes_it_as_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Output past 8 MiB goes through a temporary file: with no room there (a full or small
    TMPDIR), it was an OSError traceback and nothing written."""
    import errno
    import tempfile

    from infer_logger import cli

    class Full(tempfile.SpooledTemporaryFile):  # type: ignore[type-arg]
        def write(self, text: str) -> int:
            if self.tell() > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(text)

    class FullAtItsEnd(tempfile.SpooledTemporaryFile):  # type: ignore[type-arg]
        # On disk, its last bytes were buffered: no room shows only as they are flushed (by a seek).
        def flush(self) -> None:
            raise OSError(errno.EFBIG, "File too large")

        def seek(self, *args: Any) -> int:
            raise OSError(errno.EFBIG, "File too large")

        def close(self) -> None:  # ... and again as it is closed
            super().close()
            raise OSError(errno.EFBIG, "File too large")

    db = tmp_path / "audit.db"
    for i in range(20):
        _instances(db, f"x{i}", 3)
    for full in (Full, FullAtItsEnd):
        monkeypatch.setattr(cli.tempfile, "SpooledTemporaryFile", full)
        whole = CliRunner().invoke(main, ["query", "--db", str(db), "--limit", "100", "--format", "json"])
        assert whole.exit_code == 0 and whole.stderr == "", whole.output
        assert len(json.loads(whole.stdout)) == 60


def test_query_with_stdout_closed_says_nothing(tmp_path: Path) -> None:
    """`query >&-`: an AttributeError traceback (no sys.stdout to flush)."""
    import shlex

    db = tmp_path / "audit.db"
    _instances(db, "a", 2)
    command = shlex.join([str(Path(sys.executable).parent / "infer-logger"), "query", "--db", str(db)])
    done = subprocess.run(f"{command} >&-", shell=True, stderr=subprocess.PIPE, timeout=60)
    assert done.returncode == 0 and done.stderr == b"", done.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
@pytest.mark.parametrize("rows", [2, 2000])  # written at the end, and as the buffer fills
def test_query_with_no_room_for_its_output_says_so(tmp_path: Path, rows: int) -> None:
    """`query --format json > out.json` on a full disk: an OSError traceback."""
    import shlex

    db = tmp_path / "audit.db"
    _instances(db, "a", rows)
    command = shlex.join([str(Path(sys.executable).parent / "infer-logger"), "query", "--db", str(db),
                          "--format", "json", "--limit", str(rows)])
    done = subprocess.run(f"{command} > /dev/full", shell=True, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr == "infer-logger: cannot write the output: No space left on device\n", \
        done.stderr


def test_query_times_are_read_as_the_store_reads_them(tmp_path: Path) -> None:
    """RFC 3339 allows lower-case t and z, which the store reads (events.as_utc); --since refused them."""
    db = tmp_path / "audit.db"
    seeded_store(db)
    runner = CliRunner()
    result = runner.invoke(main, ["query", "--db", str(db), "--since", "2026-11-25t10:01:00z",
                                  "--until", "2026-11-25t10:02:00.5", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in json.loads(result.stdout)] == ["q2", "q1"]  # no offset: UTC
    assert "UTC" in runner.invoke(main, ["query", "--help"]).output


def test_query_db_that_is_no_regular_file_is_exit_2(tmp_path: Path) -> None:
    """A FIFO blocked in open() for good; '' was read as '.' and answered "disk I/O error"."""
    fifo = tmp_path / "fifo.db"
    os.mkfifo(fifo)
    command = [str(Path(sys.executable).parent / "infer-logger"), "query", "--db"]
    for db, says in ((str(fifo), "not a regular file"), ("", "empty"), (str(tmp_path), "directory")):
        result = subprocess.run([*command, db], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "--db" in result.stderr and says in result.stderr, result.stderr


def test_setup_elasticsearch(es_url: str) -> None:
    result = CliRunner().invoke(main, ["setup", "elasticsearch", "--url", es_url])
    assert result.exit_code == 0, result.output
    assert "inference-log" in result.output


def test_setup_elasticsearch_for_a_sink_index(es_url: str) -> None:
    from elasticsearch import Elasticsearch

    result = CliRunner().invoke(main, ["setup", "elasticsearch", "--url", es_url, "--index", "clitest-{namespace}"])
    assert result.exit_code == 0, result.output
    assert "index template clitest for clitest-*: created" in result.output
    named = CliRunner().invoke(main, ["setup", "elasticsearch", "--url", es_url, "--index", "clitest2-{namespace}",
                                      "--template-name", "clitest-named"])
    assert "index template clitest-named for clitest2-*: created" in named.output
    nested = CliRunner().invoke(main, ["setup", "elasticsearch", "--url", es_url, "--index", "clitest-x-{a}"])
    assert "index template clitest-x for clitest-x-*: created" in nested.output  # more specific, ranks higher
    # The same patterns under another name: equal priorities, refused by the server.
    overlapping = CliRunner().invoke(main, ["setup", "elasticsearch", "--url", es_url,
                                            "--index", "clitest-{a}", "--template-name", "clitest-again"])
    assert overlapping.exit_code == 1 and "clitest" in overlapping.output  # the server's reason
    with Elasticsearch(es_url) as es:
        found = es.indices.get_index_template(name="clitest")["index_templates"][0]["index_template"]
        assert found["index_patterns"] == ["clitest-*"]
        for name in ("clitest", "clitest-named", "clitest-x"):
            es.indices.delete_index_template(name=name)


def test_setup_elasticsearch_leaves_a_template_not_ours_unless_forced(es_url: str) -> None:
    from elasticsearch import Elasticsearch

    with Elasticsearch(es_url) as es:
        es.indices.put_index_template(name="clitrail", index_patterns=["clitrail*"], priority=50,
                                      meta={"owner": "security-team"}, template={})
        try:
            args = ["setup", "elasticsearch", "--url", es_url, "--index", "clitrail-{namespace}"]
            refused = CliRunner().invoke(main, args)
            assert refused.exit_code == 1, refused.output
            assert refused.exception is None or isinstance(refused.exception, SystemExit)  # no traceback
            assert "clitrail that infer-logger did not make" in refused.output and "--force" in refused.output
            found = es.indices.get_index_template(name="clitrail")["index_templates"][0]["index_template"]
            assert found["_meta"] == {"owner": "security-team"}
            forced = CliRunner().invoke(main, [*args, "--force"])
            assert forced.exit_code == 0, forced.output
            assert "index template clitrail for clitrail-*: updated" in forced.output
        finally:
            es.indices.delete_index_template(name="clitrail")


def test_setup_elasticsearch_names_a_template_that_outranks_ours_with_exit_1(es_url: str) -> None:
    """Only the highest-priority template matching an index applies: `created` (exit 0) while a
    catch-all of higher priority gave the indices its mappings."""
    from elasticsearch import Elasticsearch

    with Elasticsearch(es_url) as es:
        es.indices.put_index_template(name="clishadow-all", index_patterns=["clishadow*"], priority=900,
                                      template={"settings": {"number_of_replicas": 0}})
        try:
            args = ["setup", "elasticsearch", "--url", es_url, "--index", "clishadow-{namespace}"]
            shadowed = CliRunner().invoke(main, args)
            assert shadowed.exit_code == 1, shadowed.output
            assert shadowed.exception is None or isinstance(shadowed.exception, SystemExit)  # no traceback
            assert "clishadow for clishadow-*: created; but index template clishadow-all (priority 900" \
                in shadowed.output
            es.indices.put_index_template(name="clishadow-all", index_patterns=["clishadow*"], priority=9,
                                          template={})
            below = CliRunner().invoke(main, args)
            assert below.exit_code == 0, below.output
            assert "clishadow for clishadow-*: unchanged" in below.output
        finally:
            for name in ("clishadow", "clishadow-all"):
                es.options(ignore_status=404).indices.delete_index_template(name=name)


def test_setup_elasticsearch_takes_the_credentials_a_secured_cluster_needs(
        es_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only --url: a default Elasticsearch 8 (https with its own CA, an API key) was out of reach."""
    from infer_logger.sinks import elasticsearch

    seen = []
    setup = elasticsearch.setup_elasticsearch

    def recorded(config: Any, **kwargs: Any) -> Any:
        seen.append(config)
        return setup(config, **kwargs)

    monkeypatch.setattr(elasticsearch, "setup_elasticsearch", recorded)
    monkeypatch.setenv("INFER_LOGGER_ES_API_KEY", "a2V5OnNlY3JldA==")
    result = CliRunner().invoke(main, ["setup", "elasticsearch", "--url", es_url, "--no-verify-certs"])
    assert result.exit_code == 0, result.output
    assert seen[0].api_key.get_secret_value() == "a2V5OnNlY3JldA==" and seen[0].verify_certs is False
    refused = CliRunner().invoke(main, ["setup", "elasticsearch", "--url", es_url, "--ca-certs", __file__])
    assert refused.exit_code == 2 and "ca_certs is for https:// URLs only" in refused.output


@pytest.mark.parametrize(("args", "field"), [
    (["--url", "localhost:9200"], "url"),
    (["--url", "http://127.0.0.1:99999"], "url"),
    (["--index", "{namespace}"], "index"),
    (["--template-name", "Audit"], "template_name"),
])
def test_setup_elasticsearch_bad_settings_are_exit_2(args: list[str], field: str) -> None:
    result = CliRunner().invoke(main, ["setup", "elasticsearch", *args])
    assert result.exit_code == 2, result.output
    assert "config error: " in result.output and f"{field}: " in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback


def test_setup_elasticsearch_unreachable_names_the_address() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(main, ["setup", "elasticsearch", "--url", url])
    assert result.exit_code == 1
    assert url.removeprefix("http://") in result.output and "Traceback" not in result.output
    # And why: it said "Connection error" alone, for a refusal as for an unknown host.
    assert "ConnectionRefusedError" in result.output, result.output


def test_a_sink_its_client_refuses_stops_the_proxy_with_exit_2(tmp_path: Path) -> None:
    import importlib.util

    import pytest

    if importlib.util.find_spec("confluent_kafka") is None:
        pytest.skip("needs the kafka extra")
    config = tmp_path / "bad.yaml"
    config.write_text("sinks:\n  - type: kafka\n    bootstrap_servers: 127.0.0.1:1\n"
                      "    config: {no.such.property: x}\n")
    done = subprocess.run(
        [sys.executable, "-m", "infer_logger.cli", "proxy", "-c", str(config), "--port", str(free_port()),
         "--spool-dir", str(tmp_path / "spool")],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "config error: config:" in done.stderr and "no.such.property" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_http_sink_header_that_cannot_be_sent_stops_the_proxy_with_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text('sinks:\n  - type: http\n    url: http://127.0.0.1:9/\n    headers: {x-token: "é€"}\n',
                      encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "infer_logger.cli", "proxy", "-c", str(config), "--port", str(free_port()),
         "--spool-dir", str(tmp_path / "spool")],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stderr  # was 1, with a UnicodeEncodeError's traceback
    assert "config error: sinks.0.http.headers:" in done.stderr and "'x-token'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_taken_port_stops_the_proxy_with_a_message(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "infer_logger.cli", "proxy", "--port", str(port),
             "--spool-dir", str(tmp_path / "spool")],
            capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("host", ["my..host", "a" * 64])
def test_a_host_idna_refuses_is_exit_2(tmp_path: Path, host: str) -> None:
    """A UnicodeError traceback at start (exit 1), where a port in use is a message."""
    done = subprocess.run([sys.executable, "-m", "infer_logger.cli", "proxy", "--host", host, "--port", "0",
                           "--source-uri", "/m", "--spool-dir", str(tmp_path / "spool")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"config error: host: Value error, {host!r} is not a host name or address" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("where", "code", "says"), [
    ("--spool-dir={f}/spool", 1, "spool directory {f}/spool: cannot use it: Not a directory"),
    ("--log-url=file://{f}/events.jsonl", 2, "config error: path: {f}: cannot create the directory"),
    ("--log-url=sqlite://{f}/audit.db", 2, "config error: path: {f}/audit.db: cannot open the audit store"),
])
def test_a_path_that_cannot_be_used_is_a_message(tmp_path: Path, where: str, code: int, says: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way of a directory")
    args = [where.format(f=blocker)]
    if "spool" not in where:
        args.append(f"--spool-dir={tmp_path / 'spool'}")
    done = subprocess.run([sys.executable, "-m", "infer_logger.cli", "proxy", "--port", "0", "--source-uri",
                           "/m", "--component-port", "1", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == code, done.stderr
    assert says.format(f=blocker) in done.stderr and "Traceback" not in done.stderr


def test_a_predictor_url_that_is_not_http_is_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["proxy", "--predictor-url", "unix:///tmp/x.sock",
                                       "--spool-dir", str(tmp_path / "spool")])
    assert result.exit_code == 2
    assert "predictor_url" in result.output and "http(s)://host[:port]" in result.output


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/", "http://127.0.0.1:abc/", "http://ü..x/"])
def test_a_predictor_url_the_client_cannot_read_is_exit_2(tmp_path: Path, url: str) -> None:
    """README: a bad setting is exit 2 naming it; this one was a ValueError traceback, exit 1."""
    for args, env in ((["--predictor-url", url], {}), ([], {"INFER_LOGGER_PREDICTOR_URL": url})):
        done = subprocess.run([sys.executable, "-m", "infer_logger.cli", "proxy", "--port", "0", "--source-uri", "/m",
                               "--spool-dir", str(tmp_path / "spool"), *args], capture_output=True, text=True,
                              timeout=60, env={**os.environ, **env})
        assert done.returncode == 2, done.stderr
        assert "predictor_url" in done.stderr and "Traceback" not in done.stderr


def test_a_source_uri_that_is_no_uri_reference_is_exit_2(tmp_path: Path) -> None:
    """It was taken, then every event was refused downstream and dead-lettered."""
    result = CliRunner().invoke(main, ["proxy", "--source-uri", "my source", "--spool-dir", str(tmp_path / "spool")])
    assert result.exit_code == 2
    assert "source_uri" in result.output and "not a URI reference" in result.output


def test_metadata_headers_repeat_and_split_at_commas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As KServe's agent takes the flag (a pflag StringSlice); a repeat kept only the last one."""
    import infer_logger.server

    served = []
    monkeypatch.setattr(infer_logger.server, "serve", lambda settings, **_: served.append(settings))
    result = CliRunner().invoke(main, ["proxy", "--spool-dir", str(tmp_path / "spool"), "--metadata-headers", "Foo",
                                       "--metadata-headers", "Bar, Baz"])
    assert result.exit_code == 0, result.output
    assert served[0].metadata_headers == ["Foo", "Bar", "Baz"]


def test_an_empty_spool_dir_is_refused(tmp_path: Path) -> None:
    """click made Path("") of it, which is ".": the spool spread over the working directory."""
    done = subprocess.run([sys.executable, "-m", "infer_logger.cli", "proxy", "--spool-dir", "", "--port",
                           "0", "--source-uri", "/m"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2 and "spool.dir" in done.stderr and "is empty" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The settings `proxy` would serve with, instead of serving."""
    import infer_logger.server

    settings: list[Any] = []
    monkeypatch.setattr(infer_logger.server, "serve", lambda s, **_: settings.append(s))
    return settings


def test_kserves_agent_arguments_are_taken(tmp_path: Path, served: list[Any]) -> None:
    """As KServe's agent injector writes them (pkg/webhook/admission/pod/agent_injector.go)."""
    args = ["--log-url", "http://message-dumper.default/", "--source-uri", "iris-predictor-abc",
            "--log-mode", "all", "--inference-service", "iris", "--namespace", "default", "--endpoint", "",
            "--component", "predictor",
            "--metadata-headers", "x-user", "--metadata-annotations", "team=ml,cost=a=b",
            "--logger-tls-skip-verify", "false", "--component-port", "8080"]
    result = CliRunner().invoke(main, ["proxy", "--spool-dir", str(tmp_path / "spool"), *args,
                                       "--annotation", "extra=1", "--metadata-annotations", ""])
    assert result.exit_code == 0, result.output
    assert served[0].annotations == {"team": "ml", "cost": "a=b", "extra": "1"}


@pytest.mark.parametrize(("args", "verify"), [
    (["--logger-tls-skip-verify", "true"], False),
    (["--logger-tls-skip-verify"], False),  # pflag's bare form
    (["--logger-tls-skip-verify=false"], True),
    ([], True),
])
def test_tls_flags_reach_the_log_url_sinks(tmp_path: Path, served: list[Any], args: list[str],
                                           verify: bool) -> None:
    """KServe's injector always passes --logger-tls-skip-verify (it was refused, then ignored)."""
    ca = tmp_path / "ca.crt"
    ca.write_text("not read here")
    result = CliRunner().invoke(main, ["proxy", "--spool-dir", str(tmp_path / "spool"), "--log-url",
                                       "https://collector/", "--logger-ca-cert-file", str(ca), *args])
    assert result.exit_code == 0, result.output
    [sink] = served[0].all_sinks()
    assert (sink.tls_verify, sink.ca_certs) == (verify, str(ca))
    # KServe mounts the CA file from an optional ConfigMap: a missing one leaves the system's CAs.
    result = CliRunner().invoke(main, ["proxy", "--spool-dir", str(tmp_path / "spool"), "--log-url",
                                       "https://collector/", "--logger-ca-cert-file", str(tmp_path / "none")])
    assert result.exit_code == 0 and "is not a file" in result.output
    assert served[-1].all_sinks()[0].ca_certs is None


@pytest.mark.parametrize(("args", "says"), [
    (["--logger-tls-skip-verify", "maybe"], "not a valid boolean"),
    (["--metadata-annotations", "team=ml,cost"], "--metadata-annotations: 'cost' is not KEY=VALUE"),
])
def test_bad_kserve_values_are_exit_2(args: list[str], says: str) -> None:
    result = CliRunner().invoke(main, ["proxy", *args])
    assert result.exit_code == 2 and says in result.output


def test_proxy_help_shows_the_defaults() -> None:
    out = " ".join(CliRunner().invoke(main, ["proxy", "--help"], terminal_width=80).output.split())
    assert "cut to this size. [default: 900KiB]" in out
    assert "[default: infer-logger-data/spool]" in out  # whole: a hyphen is where it broke


@pytest.mark.parametrize(("flag", "value", "field", "says"), [
    ("--namespace", b"caf\xe9", "namespace", "'caf\\udce9' holds U+DCE9"),  # a Latin-1 byte: every request a 500
    ("--namespace", b"team\ta", "namespace", "'team\\ta' holds U+0009"),  # every event refused by the broker
    ("--inference-service", b"iris\n", "inference_service", "'iris\\n' holds U+000A"),
])
def test_an_identity_events_cannot_carry_is_exit_2(tmp_path: Path, flag: str, value: bytes, field: str,
                                                    says: str) -> None:
    done = subprocess.run([sys.executable.encode(), b"-m", b"infer_logger.cli", b"proxy", flag.encode(), value,
                           b"--port", b"0", b"--source-uri", b"/m", b"--spool-dir", os.fsencode(tmp_path / "spool")],
                          capture_output=True, text=True, timeout=60)  # it served, and logged nothing
    assert done.returncode == 2, done.stderr
    assert f"config error: {field}: " in done.stderr and says in done.stderr and "Traceback" not in done.stderr
