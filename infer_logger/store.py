"""The embedded audit store: one SQLite row per (exchange, instance index).

Request, response and explanation events of one exchange share an id and arrive in any order, so
each kind upserts only its own columns. Attributes shared by all three (time, model, service...)
are filled by whichever comes first, the request's values winning. Status and latency belong to
the exchange: the response sets them on every row of its id, and rows created later (a late
request with more instances) copy them from a row the response wrote. The time is the exchange's
too: every row the request or the response made is dated by the request's `time` (rows beyond its
instances too); until the request comes, by the response's `time - latencyms`, as the audit
documents' @timestamp is (`audit.request_time`). Re-delivery overwrites; a later request or
response of an id (a retry that kept x-request-id) replaces the earlier one whole: rows beyond its
instances (items) lose the earlier one's payload and attributes, a row left with neither a
request nor a response is undated (as an explanation's row beyond its exchange is), and one left
with nothing is deleted; a later explanation replaces the earlier one so too, and only it. So the
same events in the same order leave the same rows however the sink worker batched them.

An exchange is its events' id within their namespace and service (`inferenceservicename`): two
services' exchanges given one id (a mesh propagating x-request-id to both) are apart, where a
store both fed kept one and mixed the other into it. (Components of one service are not: an
explanation may name its explainer's.)

SQLite runs in WAL mode so that `infer-logger query` in another process reads while the sidecar
writes. Times are stored as UTC RFC 3339 text with microseconds, so text order is time order.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import operator
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from math import ceil, isfinite, isnan
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

import orjson

from infer_logger import audit, binary_tensors, events, payloads
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import InferLoggerError, StoreBusyError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# `exchange` keys the rows: the id, and the namespace and service when the events name them
# (`_exchange_key`). CloudEvents ids are unique per source only: two services given one
# x-request-id (a mesh propagates it) overwrote each other's rows in a store both feed.
_TABLE = """
CREATE TABLE {name} (
    exchange TEXT NOT NULL,
    id TEXT NOT NULL,
    instance INTEGER NOT NULL,
    time TEXT,
    model TEXT,
    model_version TEXT,
    service TEXT,
    namespace TEXT,
    component TEXT,
    endpoint TEXT,
    protocol TEXT,
    path TEXT,
    metadata TEXT,
    status INTEGER,
    latency_ms REAL,
    request TEXT,
    response TEXT,
    explanation TEXT,
    request_attributes TEXT,
    response_attributes TEXT,
    explanation_attributes TEXT,
    updated TEXT NOT NULL,
    PRIMARY KEY (exchange, instance)
)"""
_INDEXES = """
CREATE INDEX records_time ON records (time);
CREATE INDEX records_model_time ON records (model, time);
CREATE INDEX records_status_time ON records (status, time);
"""
_SCHEMA = _TABLE.format(name="records") + ";" + _INDEXES
# Schema 1 keyed rows by (id, instance): its rows get the key their events would have now.
_EXCHANGE_OF_ROW = (
    "CASE WHEN namespace IS NULL AND service IS NULL THEN id "
    "ELSE id || char(31) || COALESCE(namespace, '') || char(31) || COALESCE(service, '') END"
)

# Column <- event attribute, for the attributes every event of an exchange carries.
_SHARED = {"time": "time", **events.SHARED_FIELDS, "metadata": events.METADATA}
# Upsert order within a batch: requests, explanations, then responses.
_KINDS = {t: events.KINDS[t] for t in (events.REQUEST, events.EXPLANATION, events.RESPONSE)}
# A response writes instance 0 of its id whatever its item count: one primary-key lookup finds
# whether it came. (Any row with response attributes meant scanning every row of the id, per row
# written: a 20k-instance request before its response took 56 s.)
_FROM_RESPONSE = (
    "(SELECT {col} FROM records WHERE exchange = :exchange AND instance = 0 AND response_attributes IS NOT NULL)"
)
# The time of a request written before: its instance 0 is there.
_FROM_REQUEST = (
    "(SELECT time FROM records WHERE exchange = :exchange AND instance = 0 AND request_attributes IS NOT NULL)"
)


def _upsert_sql(kind: str) -> str:
    is_response = kind == "response"
    columns = ["exchange", "id", "instance", *_SHARED, "status", "latency_ms", kind, f"{kind}_attributes", "updated"]
    values = [f":{c}" for c in columns]
    if not is_response:
        values[columns.index("status")] = _FROM_RESPONSE.format(col="status")
        values[columns.index("latency_ms")] = _FROM_RESPONSE.format(col="latency_ms")
    else:  # its rows beyond the request's instances are dated by the request too
        values[columns.index("time")] = f"COALESCE({_FROM_REQUEST}, :time)"
    # The request's view of shared attributes wins; the others only fill gaps.
    shared = [
        f"{c} = COALESCE(excluded.{c}, {c})" if kind == "request" else f"{c} = COALESCE({c}, excluded.{c})"
        for c in _SHARED
    ]
    own = [f"{c} = excluded.{c}" for c in (kind, f"{kind}_attributes", "updated")]
    if is_response:
        own += ["status = excluded.status", "latency_ms = excluded.latency_ms"]
    return (
        f"INSERT INTO records ({', '.join(columns)}) VALUES ({', '.join(values)}) "
        f"ON CONFLICT (exchange, instance) DO UPDATE SET {', '.join(shared + own)}"
    )


class _Statement:
    """A statement written with :named parameters, run with `?` ones: sqlite3 binds a tuple
    several µs per row faster than it looks up ~20 names in a dict (a fifth of a row's cost)."""

    def __init__(self, sql: str) -> None:
        names = re.findall(r":(\w+)", sql)
        self.sql = re.sub(r":\w+", "?", sql)
        self.values = operator.itemgetter(*names)

    def run(self, conn: sqlite3.Connection, rows: Iterable[dict[str, Any]]) -> None:
        conn.executemany(self.sql, map(self.values, rows))


_UPSERT = {kind: _Statement(_upsert_sql(kind)) for kind in _KINDS.values()}


def _exchange_sql() -> str:
    """One upsert for a request and its response together: what the two upserts would leave, in
    one row write per instance (the request's shared values win); `_SETTLE` does the rest."""
    sets = [f"{c} = COALESCE(excluded.{c}, {c})" for c in _SHARED]
    # A payload is set with its attributes, even to NULL (an instance nested too deep to write
    # as JSON): as the kind's own upsert does, or a retry's row kept the first try's instance.
    for kind in ("request", "response"):
        sets += [f"{kind} = CASE WHEN excluded.{kind}_attributes IS NULL THEN {kind} ELSE excluded.{kind} END",
                 f"{kind}_attributes = COALESCE(excluded.{kind}_attributes, {kind}_attributes)"]
    sets += ["status = excluded.status", "latency_ms = excluded.latency_ms", "updated = excluded.updated"]
    return (
        f"INSERT INTO records ({', '.join(_EXCHANGE_COLUMNS)}) VALUES ({', '.join('?' * len(_EXCHANGE_COLUMNS))}) "
        f"ON CONFLICT (exchange, instance) DO UPDATE SET {', '.join(sets)}"
    )


# The exchange upsert takes tuples in this order (built directly: the hot path of the store).
_EXCHANGE_OWN = ("request", "request_attributes", "response", "response_attributes")
_EXCHANGE_COLUMNS = ("exchange", "id", "instance", *_SHARED, "status", "latency_ms", *_EXCHANGE_OWN, "updated")
_UPSERT_EXCHANGE = _exchange_sql()
# What the events of an exchange written (the kinds named) leave on its other rows, after the
# upserts: (exchange key, status, latency_ms, the request's instance count, the response's item
# count, the explanation's item count, the request's time, the first row to look at). A later event
# of a kind replaces the earlier one of the exchange whole (a retry that kept x-request-id, with fewer instances):
# the rows beyond its count lose that one's payload and attributes, else they stayed mixed into the
# retry (or not, by how the events were batched). The response's status and latency go on every
# row; the rows its request did not make are dated by the request, and a row left with neither is
# undated. The guards skip the rows the upserts already set: a lookup instead of a rewrite. A
# request or explanation alone starts at its count: a range of the primary key, no row of its own
# looked at. One statement per combination of kinds, each setting only its kinds' columns (a
# response's status goes on every row of the exchange: no CASE of the other kinds evaluated there).
_COUNT = {"request": 4, "response": 5, "explanation": 6}


def _settle_sql(kinds: tuple[str, ...]) -> str:
    sets, guards = [], []
    if "response" in kinds:
        sets += ["status = ?2", "latency_ms = ?3"]
        guards += ["status IS NOT ?2 OR latency_ms IS NOT ?3"]
    if "explanation" not in kinds:
        # ?4 or ?5 of a kind not written is None: `instance >= NULL` is never true.
        sets.append(
            "time = CASE WHEN (request_attributes IS NULL OR instance >= ?4) "
            "AND (response_attributes IS NULL OR instance >= ?5) THEN NULL "
            "WHEN instance >= ?4 THEN COALESCE(?7, time) ELSE time END"
        )
    for kind in kinds:
        count = _COUNT[kind]
        sets += [
            f"{c} = CASE WHEN instance >= ?{count} THEN NULL ELSE {c} END" for c in (kind, f"{kind}_attributes")
        ]
        guards.append(f"instance >= ?{count} AND {kind}_attributes IS NOT NULL")
    if "request" in kinds:
        guards.append("instance >= ?4 AND response_attributes IS NOT NULL AND time IS NOT COALESCE(?7, time)")
    where = " OR ".join(f"({g})" for g in guards)
    return f"UPDATE records SET {', '.join(sets)} WHERE exchange = ?1 AND instance >= ?8 AND ({where})"


_SETTLE: dict[tuple[str, ...], str] = {
    kinds: _settle_sql(kinds) for kinds in (("request", "response"), ("request",), ("response",), ("explanation",))
}
# (exchange key, the first row `_SETTLE` may have emptied): rows left with no payload of any kind.
_DROP_EMPTY = (
    "DELETE FROM records WHERE exchange = ?1 AND instance >= ?2 AND request_attributes IS NULL "
    "AND response_attributes IS NULL AND explanation_attributes IS NULL"
)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One prediction: its exchange's attributes and its slice of each payload (decoded JSON)."""

    id: str
    instance: int
    time: str | None
    model: str | None
    model_version: str | None
    service: str | None
    namespace: str | None
    component: str | None
    endpoint: str | None
    protocol: str | None
    path: str | None
    metadata: Any
    status: int | None
    latency_ms: float | None
    request: Any
    response: Any
    explanation: Any
    request_attributes: dict[str, Any] | None
    response_attributes: dict[str, Any] | None
    explanation_attributes: dict[str, Any] | None
    updated: str


_JSON_FIELDS = frozenset(
    {"metadata", "request", "response", "explanation"} | {f"{k}_attributes" for k in _KINDS.values()}
)
_COLUMNS = tuple(AuditRecord.__dataclass_fields__)
_BATCH = 256  # rows a fetch takes from the cursor
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Summary:
    """Counts for the quickstart; `by_status[None]` counts predictions still awaiting a response."""

    records: int
    ids: int
    by_model: dict[str | None, int]
    by_status: dict[int | None, int]
    latency_p50_ms: float | None
    latency_p95_ms: float | None


_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)  # another connection's lock, held past the wait


class AuditStore:
    """SQLite audit store; safe to share between threads (one connection behind a lock)."""

    def __init__(self, path: str | Path, *, readonly: bool = False, timeout: float = 5.0) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._timeout = timeout
        self._file: tuple[int, int] | None = None  # (device, inode) of the file a writer opened
        if readonly and not self.path.exists():
            raise InferLoggerError(f"{self.path}: no audit store there")
        try:
            self._open(readonly, timeout)
        except InferLoggerError as exc:
            # A reader of a WAL store makes its -shm file (the WAL index) when no writer has one:
            # a user who may read the store but not write its directory (the sidecar's, stopped)
            # could not read it. No -wal file means no writer since a clean close: the main file
            # is whole, and read as immutable it needs no index.
            cause = exc.__cause__
            if not (readonly and isinstance(cause, sqlite3.OperationalError)
                    and cause.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN)
                    and not any(Path(f"{self.path}-{part}").exists() for part in ("wal", "journal"))):
                raise  # not the index (e.g. locked by a writer): a stale read would be no answer
            self._open(readonly, timeout, immutable=True)

    def _open(self, readonly: bool, timeout: float, immutable: bool = False) -> None:
        if readonly:
            target, uri = f"{self.path.resolve().as_uri()}?mode=ro{'&immutable=1' if immutable else ''}", True
        else:
            target, uri = str(self.path), False
        try:
            if not readonly:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE in write).
            self._conn = sqlite3.connect(
                target, uri=uri, timeout=timeout, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:  # a file in the way, no permission
            raise InferLoggerError(f"{self.path}: cannot open the audit store: {exc}") from None
        try:
            if not readonly:
                self._refuse_foreign()
                # A row is ~1-2 KB: 16 KiB pages (set before the file has any; an older store
                # keeps its own) mean a quarter of the WAL frames, each one write, per commit.
                self._conn.execute("PRAGMA page_size=16384")
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
                # Random ids (clients' own) put every upsert on a different index page: a larger
                # page cache and rarer checkpoints (each one writes those pages back) halve the
                # cost of a write.
                self._conn.execute("PRAGMA cache_size=-32768")  # KiB
                self._conn.execute("PRAGMA wal_autocheckpoint=2048")  # pages: 32 MiB at 16 KiB
                self._conn.execute("PRAGMA journal_size_limit=67108864")  # bytes kept after a checkpoint
                self._migrate()
                stat = os.stat(self.path)
                self._file = (stat.st_dev, stat.st_ino)
            self._check_version()
        except sqlite3.DatabaseError as exc:  # e.g. "file is not a database"
            self._conn.close()
            if isinstance(exc, sqlite3.OperationalError) and exc.sqlite_errorcode & 0xFF in _BUSY:
                raise StoreBusyError(f"{self.path}: the audit store is busy (locked by another process "
                                     f"past {self._timeout:g} s): {exc}") from exc
            # The cause kept: `__init__` reads a read-only store again when it was the WAL index.
            raise InferLoggerError(f"{self.path}: not a usable audit store: {exc}") from exc
        except BaseException:
            self._conn.close()
            raise

    def _follow_path(self) -> None:
        """Open the store at `path` again when the file there is no longer the one opened (removed,
        or renamed by a rotation): SQLite kept writing to the unlinked one, every batch acknowledged
        and lost at exit."""
        if self._file is None:  # read-only
            return
        try:
            stat = os.stat(self.path)
            same = (stat.st_dev, stat.st_ino) == self._file
        except (FileNotFoundError, NotADirectoryError):
            same = False
        except OSError as exc:  # cannot tell (a directory not searchable now, NFS): the batch is retried
            raise sqlite3.OperationalError(f"{self.path}: {exc}") from exc
        if not same:
            log.warning("audit store %s: the file was removed or replaced; a new store is made there", self.path)
            # Its WAL, still at the path, written back into the file it belongs to (through the
            # open descriptor): left, a new store there would take it in, or a renamed one lose it.
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()
            try:
                self._open(False, self._timeout)
            except InferLoggerError as exc:  # as SQLite's own "unable to open": the batch is retried
                raise sqlite3.OperationalError(str(exc)) from exc

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so a busy database waits `timeout` here
        # instead of failing midway on a read-to-write upgrade.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            if self._conn.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    @contextmanager
    def _snapshot(self) -> Iterator[None]:
        self._conn.execute("BEGIN")
        try:
            yield
        finally:
            self._conn.execute("COMMIT")

    def _refuse_foreign(self) -> None:
        """Another application's database (tables, no schema version of ours) is left as it is:
        it was switched to WAL and given our table and version."""
        tables = {row[0] for row in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if tables and ("records" not in tables or version == 0):  # ours sets both in one transaction
            raise InferLoggerError(f"{self.path}: not an audit store (it has tables of another application)")

    def _migrate(self) -> None:
        # Looked at first without the write lock: a store in use by another writer (an old
        # delivery process finishing a big batch) would hold this open past `timeout`, and the
        # sink's start failed as a config error.
        if self._conn.execute("PRAGMA user_version").fetchone()[0] != 0:
            return
        with self._transaction() as conn:
            if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                _run(conn, _SCHEMA)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _convert(self) -> None:
        """A schema 1 store (rows keyed by id) given its exchange keys: at the first write, not at
        the open (a sink's build), which the sidecar waits for 60 s at most: a large store took
        longer, was killed, rolled back and converted again at every start."""
        with self._transaction() as conn:
            if conn.execute("PRAGMA user_version").fetchone()[0] == 1:
                log.warning("audit store %s: keying its rows by namespace and service too (schema 2); a "
                            "large store takes a while, and as much disk again meanwhile", self.path)
                columns = ", ".join(_COLUMNS)
                _run(conn, ";".join((
                    _TABLE.format(name="records_2"),
                    f"INSERT INTO records_2 (exchange, {columns}) SELECT {_EXCHANGE_OF_ROW}, {columns} FROM records",
                    "DROP TABLE records",
                    "ALTER TABLE records_2 RENAME TO records",
                    _INDEXES,
                )))
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._key = "exchange"

    def _check_version(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            raise InferLoggerError(f"{self.path}: not an audit store (no schema version of one)")
        # Schema 1 (rows keyed by id alone): read as it is (an older sidecar may still write it),
        # converted by a writer's first write.
        if version not in (1, SCHEMA_VERSION):
            raise InferLoggerError(
                f"{self.path}: audit store schema version {version}, expected {SCHEMA_VERSION}"
            )
        self._key = "exchange" if version == SCHEMA_VERSION else "id"
        # Another application's database may have a user_version of 1 too: every batch failed.
        if self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'records'").fetchone() is None:
            raise InferLoggerError(f"{self.path}: not an audit store (it has no records table)")

    def write(self, batch: Sequence[CloudEvent]) -> int:
        """Upsert a batch in one transaction; returns the rows written. Unknown types are skipped.

        A request whose response is in the same batch (the usual case: the sink worker lingers)
        is written with it, one row write per instance; the rest kind by kind. A value no row can
        hold (a statuscode past 64 bits, a time with no UTC form) raises OverflowError, TypeError
        or ValueError and writes nothing: the store sink then finds and dead-letters that event
        (any exception but sqlite3.Error, in fact). JSON nested past the 254 levels orjson writes
        is written as `_instances_json` says, never refused.
        """
        updated = events.now_rfc3339()
        # A re-delivered event overwrites, so within a batch the last one of a kind and exchange counts.
        latest: dict[str, dict[str, CloudEvent]] = {kind: {} for kind in _KINDS.values()}
        for event in batch:
            kind = _KINDS.get(event.type)
            if kind is not None:
                latest[kind][_exchange_key(event)] = event
        responses = latest["response"]
        exchanges: list[tuple[Any, ...]] = []
        rows: dict[str, list[dict[str, Any]]] = {kind: [] for kind in _KINDS.values()}
        settle: dict[tuple[str, ...], list[tuple[Any, ...]]] = {kinds: [] for kinds in _SETTLE}
        emptied: list[tuple[str, int]] = []
        for kind, kept in latest.items():
            for key, event in kept.items():
                if kind == "request" and (answer := responses.pop(key, None)) is not None:
                    pair = _exchange_rows(key, event, answer, updated)
                    exchanges += pair
                    # Rows an earlier event made (more instances) get the status too. (Looking up
                    # which ids have rows already, to spread to those only, measured no cheaper.)
                    asked = sum(row[_ASKED] is not None for row in pair)
                    answered = sum(row[_ANSWERED] is not None for row in pair)
                    first = pair[0]
                    settle["request", "response"].append(
                        (key, first[_STATUS], first[_LATENCY], asked, answered, None, first[_TIME], 0)
                    )
                    emptied.append((key, len(pair)))
                    continue
                base = _row_base(key, event, kind, updated)
                texts = _instances_json(event)
                for index, text in enumerate(texts):
                    rows[kind].append({**base, "instance": index, kind: text})
                count = len(texts)
                if kind == "response":
                    status, latency = base["status"], base["latency_ms"]
                    settle[kind,].append((key, status, latency, None, count, None, None, 0))
                elif kind == "request":
                    settle[kind,].append((key, None, None, count, None, None, base["time"], count))
                else:
                    settle[kind,].append((key, None, None, None, None, count, None, count))
                emptied.append((key, count))
        with self._lock:
            self._follow_path()
            if self._key != "exchange":
                self._convert()
        with self._lock, self._transaction() as conn:
            if exchanges:
                conn.executemany(_UPSERT_EXCHANGE, exchanges)
            for kind, params in rows.items():
                if params:
                    _UPSERT[kind].run(conn, params)
            # After every upsert, so rows this batch created get the status (and time) too.
            changed = 0
            for kinds, settled in settle.items():
                if settled:
                    changed += conn.executemany(_SETTLE[kinds], settled).rowcount
            if changed > 0:  # only a row `_SETTLE` changed can have been emptied (upserts null nothing)
                conn.executemany(_DROP_EMPTY, emptied)
        return len(exchanges) + sum(len(params) for params in rows.values())

    def query(
        self,
        *,
        id: str | None = None,
        model: str | None = None,
        since: str | datetime | None = None,
        until: str | datetime | None = None,
        status: int | None = None,
        limit: int | None = 100,
        offset: int = 0,
        order: Literal["asc", "desc"] = "desc",
        start: str | None = None,
    ) -> list[AuditRecord]:
        """Records matching every given filter, by time; `since` is inclusive, `until` exclusive.
        `start` (a `page_token`) begins at a row's place, `offset` skips that many more (the order
        is total: time, id, exchange, instance)."""
        return list(self.records(id=id, model=model, since=since, until=until, status=status, limit=limit,
                                 offset=offset, order=order, start=start))

    def records(
        self,
        *,
        id: str | None = None,
        model: str | None = None,
        since: str | datetime | None = None,
        until: str | datetime | None = None,
        status: int | None = None,
        limit: int | None = 100,
        offset: int = 0,
        order: Literal["asc", "desc"] = "desc",
        payloads: bool = True,
        start: str | None = None,
    ) -> Generator[AuditRecord]:
        """As `query`, read from the cursor as they are taken (a large export was held whole, every
        JSON column parsed, before the first was shown). Without `payloads`, the JSON columns
        (request, response, explanation, metadata, attributes) are not read: None. Take them all,
        or close the iterator, before the store's next use."""
        columns = ", ".join(_COLUMNS if payloads else [c if c not in _JSON_FIELDS else "NULL" for c in _COLUMNS])
        parts = self._select(columns, id=id, model=model, since=since, until=until, status=status, order=order,
                             start=start)
        return self._fetched(parts, limit, offset, _record)

    def page_token(
        self,
        *,
        id: str | None = None,
        model: str | None = None,
        since: str | datetime | None = None,
        until: str | datetime | None = None,
        status: int | None = None,
        offset: int = 0,
        order: Literal["asc", "desc"] = "desc",
        start: str | None = None,
    ) -> str | None:
        """Where the page after `offset` rows begins, as `start` takes it; None when no row is
        there. Unlike an offset it names a row's place: rows written meanwhile (a sidecar writing
        as one pages) shift no page onto rows shown already."""
        parts = self._select(f"time, id, {self._key}, instance", id=id, model=model, since=since, until=until,
                             status=status, order=order, start=start)
        with contextlib.closing(self._fetched(parts, 1, offset, list)) as rows:
            row = next(rows, None)
        if row is None:
            return None
        return base64.urlsafe_b64encode(orjson.dumps([*row, self._key])).decode().rstrip("=")

    def check_page_token(self, token: str) -> None:
        """ValueError, naming it, if `token` is no `page_token` of this store."""
        _place(token, self._key)

    def _select(self, columns: str, *, id: str | None, model: str | None, since: str | datetime | None,
                until: str | datetime | None, status: int | None, order: str,
                start: str | None) -> list[tuple[str, list[Any]]]:
        """The statement's parts, to be read one after the other: two where a `start` among dated
        rows and the undated ones beyond it are one stretch of the order (one statement with an OR
        of them read every row past the place and sorted them: 1.3 s for a page of 300k rows)."""
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', not {order!r}")
        where: list[str] = []
        params: list[Any] = []
        if id is not None and self._key == "exchange":
            # The rows of every exchange with this id: a range of the primary key (its keys are the
            # id, or the id and U+001F...), the id compared for the ids that merely begin with it.
            where.append("exchange >= ? AND exchange < ?")
            params += [id, id + "\x20"]
        for clause, value in (
            ("id = ?", id),
            ("model = ?", model),
            ("time >= ?", _utc(since)),
            ("time < ?", _utc(until)),
            ("status = ?", status),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        places = [("", [])] if start is None else _from_place(_place(start, self._key), self._key, order)
        parts = []
        for clause, values in places:
            conditions = [*where, clause] if clause else where
            sql = f"SELECT {columns} FROM records"
            if conditions:
                sql += " WHERE " + " AND ".join(conditions)
            sql += f" ORDER BY time {order}, id {order}, {self._key} {order}, instance"
            parts.append((sql, [*params, *values]))
        return parts

    def _fetched(self, parts: Sequence[tuple[str, list[Any]]], limit: int | None, offset: int,
                 convert: Callable[[Any], _T]) -> Generator[_T]:
        """`limit` rows of the parts read one after the other, past `offset` of them. A generator:
        each statement runs when its first row is taken, a batch of rows at a time."""
        for n, (sql, params) in enumerate(parts):
            taken = 0
            for row in self._rows(f"{sql} LIMIT ? OFFSET ?", [*params, -1 if limit is None else limit, offset]):
                taken += 1
                yield convert(row)
            if n == len(parts) - 1 or (limit is not None and (limit := limit - taken) <= 0):
                return
            if taken:
                offset = 0
            elif offset:  # all skipped, and maybe more: the next part skips the rest
                with self._lock:
                    skipped = self._read(lambda: self._conn.execute(f"SELECT COUNT(*) FROM ({sql})", params)
                                         .fetchone()[0])
                offset = max(0, offset - skipped)

    def _rows(self, sql: str, params: Sequence[Any]) -> Generator[Any]:
        with self._lock:
            cursor = self._read(lambda: self._conn.execute(sql, params))
        try:
            while True:
                with self._lock:
                    rows = self._read(lambda: cursor.fetchmany(_BATCH))
                if not rows:
                    return
                yield from rows
        finally:
            with contextlib.suppress(sqlite3.ProgrammingError):  # the store closed before it was left
                cursor.close()

    def _read(self, step: Callable[[], _T]) -> _T:
        try:
            return step()
        except sqlite3.DatabaseError as exc:  # "database disk image is malformed": pages past the header
            raise InferLoggerError(f"{self.path}: cannot read the audit store: {exc}") from None

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """One read transaction: the `records` iterators taken (whole) within it read the same rows
        while another process writes."""
        with self._lock:
            self._conn.execute("BEGIN")
        try:
            yield
        finally:
            # Only read: rolled back, and a store found damaged meanwhile (its error on its way)
            # fails that too.
            with self._lock, contextlib.suppress(sqlite3.Error):
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")

    def summary(self) -> Summary:
        # One read transaction: the counts agree with each other even while another process writes.
        with self._lock, self._snapshot():
            records, ids = self._conn.execute(f"SELECT COUNT(*), COUNT(DISTINCT {self._key}) FROM records").fetchone()
            by_model = dict(self._conn.execute("SELECT model, COUNT(*) FROM records GROUP BY model"))
            by_status = dict(self._conn.execute("SELECT status, COUNT(*) FROM records GROUP BY status"))
            # Every id has an instance 0 and latency is per exchange: one sample per response.
            latencies = [
                r[0]
                for r in self._conn.execute(
                    "SELECT latency_ms FROM records WHERE instance = 0 AND latency_ms IS NOT NULL "
                    "ORDER BY latency_ms"
                )
            ]
        return Summary(
            records=records,
            ids=ids,
            by_model=by_model,
            by_status=by_status,
            latency_p50_ms=_percentile(latencies, 50),
            latency_p95_ms=_percentile(latencies, 95),
        )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _run(conn: sqlite3.Connection, statements: str) -> None:
    for statement in statements.split(";"):
        if statement.strip():
            conn.execute(statement)


def _exchange_key(event: CloudEvent) -> str:
    """The key of an event's rows: its id, and its namespace and service when it names either (an
    explanation carries the exchange's). U+001F parts them: no CloudEvents string holds it."""
    attrs = event.attributes
    namespace, service = (_text_or_none(attrs.get(name)) for name in (events.NAMESPACE, events.INFERENCESERVICENAME))
    if namespace is None and service is None:
        return event.id
    return f"{event.id}\x1f{namespace or ''}\x1f{service or ''}"


def _text_or_none(value: object) -> str | None:
    # As the columns have it: "" (KServe-style origins send it for unset attributes) is NULL.
    return None if value is None or value == "" else value if type(value) is str else str(value)


def _exchange_rows(key: str, request: CloudEvent, response: CloudEvent, updated: str) -> list[tuple[Any, ...]]:
    """`_UPSERT_EXCHANGE` rows, one per instance, for a request and its response."""
    asked, answered = request.attributes, response.attributes
    asked_time, asked_text = _shared_values(asked)
    answered_text = _shared_values(answered)[1]
    time = _asked_time(answered) if asked_time is None else asked_time
    # Where both have an instance the request's shared values win; each one's own rows keep its
    # but the time (the exchange's), as written apart (rows beyond the response's items had its
    # model: `query --model` found them only when paired). A sidecar's two events share one cached
    # tuple of text values: no merge needed.
    theirs, mine = (time, *answered_text), (time, *asked_text)
    both = mine
    if asked_text is not answered_text:
        both = (time, *(own if own is not None else other for own, other in zip(asked_text, answered_text)))
    event_id = request.id
    status = events.as_int(answered.get(events.STATUSCODE))
    latency = events.as_latency(answered.get(events.LATENCYMS))
    asked_json, answered_json = _attributes_json(asked), _attributes_json(answered)
    inputs, outputs = _instances_json(request), _instances_json(response)
    rows = []
    for index in range(max(len(inputs), len(outputs))):
        has_input, has_output = index < len(inputs), index < len(outputs)
        rows.append((
            key,
            event_id,
            index,
            *((both if has_output else mine) if has_input else theirs),
            status,
            latency,
            inputs[index] if has_input else None,
            asked_json if has_input else None,
            outputs[index] if has_output else None,
            answered_json if has_output else None,
            updated,
        ))
    return rows


_STATUS, _LATENCY = _EXCHANGE_COLUMNS.index("status"), _EXCHANGE_COLUMNS.index("latency_ms")
_ASKED = _EXCHANGE_COLUMNS.index("request_attributes")  # set on the request's own rows
_ANSWERED = _EXCHANGE_COLUMNS.index("response_attributes")  # set on the response's own rows
_TIME = _EXCHANGE_COLUMNS.index("time")
_TEXT_ATTRS = tuple(attr for column, attr in _SHARED.items() if column != "time")
_TEXT_CACHE: dict[tuple[Any, ...], tuple[str | None, ...]] = {}
_TEXT_CACHE_SIZE = 4096


def _shared_values(attrs: dict[str, Any]) -> tuple[str | None, tuple[str | None, ...]]:
    """The `_SHARED` columns' values: time, and the others in its order.

    The text values repeat from event to event (service, model, path...): their conversion is
    cached, keyed by the values as they came (only all-text keys are kept, so `True` never
    stands in for `1`), and equal values give the same tuple.
    """
    raw = tuple(map(attrs.get, _TEXT_ATTRS))
    text = _TEXT_CACHE.get(raw)
    if text is None:
        # KServe-style origins send "" for unset attributes: stored as NULL, so COALESCE fills them.
        text = tuple(map(_text_or_none, raw))
        if all(v is None or type(v) is str for v in raw):
            if len(_TEXT_CACHE) >= _TEXT_CACHE_SIZE:  # e.g. per-request metadata: start over
                _TEXT_CACHE.clear()
            _TEXT_CACHE[raw] = text
    return _utc(attrs.get("time")), text


def _row_base(key: str, event: CloudEvent, kind: str, updated: str) -> dict[str, Any]:
    attrs = event.attributes
    time, text = _shared_values(attrs)
    if kind == "explanation":
        # Its time is when it was explained: an exchange's rows take the request's or response's
        # (a row beyond the request's instances held the explanation's time or the response's,
        # by how the sink worker happened to batch them).
        time = None
    elif kind == "response":
        time = _asked_time(attrs)
    base: dict[str, Any] = dict(zip(_SHARED, (time, *text)))
    base["exchange"] = key
    base["id"] = event.id
    # Attributes may arrive as strings (HTTP/Kafka binary mode headers), hence the conversions.
    base["status"] = events.as_int(attrs.get(events.STATUSCODE))
    # As the audit documents have it: SQLite keeps an infinity, which JSON has no number for.
    base["latency_ms"] = events.as_latency(attrs.get(events.LATENCYMS))
    base[f"{kind}_attributes"] = _attributes_json(attrs)
    base["updated"] = updated
    return base


def _asked_time(attrs: dict[str, Any]) -> str | None:
    """A response's rows' time until its request's is known: when the request came, by the
    response's `time - latencyms` (rows dated by the response's own time split an exchange in two
    at a --since or --until between them); its own time within its latency of year 1."""
    time = attrs.get("time")
    moment = events.as_utc(time)
    if moment is None:
        return _utc(time)  # none, or text with no time in it
    return _utc(audit.request_time(moment, attrs.get(events.LATENCYMS)) or moment)


_INT64 = range(-(1 << 63), 1 << 63)


def _place(token: str, key: str) -> tuple[str | None, str, str, int]:
    """A `page_token`'s row place (time, id, exchange key, instance) on a store whose rows are
    keyed by `key`; ValueError if it is none."""
    try:
        *place, made_for = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        time, event_id, exchange, instance = place
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise ValueError(f"{token[:40]!r} is not a page token of this store") from None
    if not (isinstance(time, str | None) and isinstance(event_id, str) and isinstance(exchange, str)
            and type(instance) is int and instance in _INT64 and made_for in ("id", "exchange")):
        raise ValueError(f"{token[:40]!r} is not a page token of this store")
    if made_for != key:  # another key, another place
        raise ValueError("the page token is of the store before a newer sidecar converted it: page from the start"
                         if key == "exchange" else "the page token is of a newer store than this one (another "
                         "file?): page from the start")
    return time, event_id, exchange, instance


def _from_place(place: tuple[str | None, str, str, int], key: str, order: str) -> list[tuple[str, list[Any]]]:
    """The rows at and after `place` in `records`' order (time, id and key in `order`, instance
    ascending; SQLite puts NULL times first ascending, last descending), as parts read one after
    the other, each a range of the time index."""
    time, event_id, exchange, instance = place
    after = "<" if order == "desc" else ">"
    ties = f"(id {after} ? OR (id = ? AND ({key} {after} ? OR ({key} = ? AND instance >= ?))))"
    values: list[Any] = [event_id, event_id, exchange, exchange, instance]
    undated = f"time IS NULL AND {ties}", values
    if time is None:  # among the undated rows: the last ones descending, the first ones ascending
        return [undated] if order == "desc" else [undated, ("time IS NOT NULL", [])]
    dated = f"time {after}= ? AND (time {after} ? OR (time = ? AND {ties}))", [time, time, time, *values]
    return [dated, ("time IS NULL", [])] if order == "desc" else [dated]


def _utc(value: object) -> str | None:
    """RFC 3339 UTC with microseconds (the form `events.now_rfc3339` makes); naive means UTC.
    Text with no time in it is kept as it is."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and len(value) == 27 and value[10] == "T" and value[19] == "." and value[26] == "Z":
        return value  # already canonical: the common case, skip parsing
    moment = events.as_utc(value)
    if moment is None:
        return str(value)
    # Four-digit years, as the text must sort as the time does: %Y writes year 500 as "500-",
    # after "2024-" (a --since 0500-01-01 found nothing).
    return f"{moment.year:04d}-" + moment.strftime("%m-%dT%H:%M:%S.%fZ")


def _instances_json(event: CloudEvent) -> list[str | None]:
    """Each instance's JSON text. One nested past the 254 levels orjson writes (it reads 1024) is
    written by stdlib json, as deep as Python recurses (~1000); deeper yet, the first such row
    holds the payload as sent (an error body as its text, if text), and later ones nothing (each
    held it whole: MBs per request). NaN and infinities are written as text, "NaN", "Infinity" and
    "-Infinity" (`_non_finite_as_text`)."""
    texts: list[str | None] = []
    raw_kept = False
    body = events.decode_data(event)
    # Only binary tensor data carries NaN and infinities (JSON has none: orjson refuses them), and
    # looking for them costs a second serialisation: 1.3-2.8x on JSON bodies with nulls.
    binary = isinstance(body, binary_tensors.Inlined)
    for item in payloads.split(event, body):
        try:
            text = _dumps(item)
        except TypeError:
            pass
        else:
            # orjson writes them as null: looked for (stdlib json refuses them) only where a null
            # was written.
            if binary and "null" in text and not _finite(item):
                text = _dumps(_non_finite_as_text(item))
            texts.append(text)
            continue
        try:
            texts.append(json.dumps(item, separators=(",", ":"), ensure_ascii=False, allow_nan=False))
        except (RecursionError, ValueError):
            texts.append(None if raw_kept else _dumps(_as_sent(event)))
            raw_kept = True
    return texts


def _as_sent(event: CloudEvent) -> object:
    """The payload as sent: an error body as its text when it is text, as the audit documents'
    `error` has it."""
    return payloads.as_sent(event) if events.is_error(event) else events.RawPayload.of(event.data or b"")


def _finite(value: object) -> bool:
    """Whether no float in `value` (one orjson writes) is a NaN or an infinity."""
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


def _non_finite_as_text(value: Any) -> Any:
    """`value` with NaN and infinities as the text numpy and JavaScript write for them, where
    orjson writes null (a model's inf was stored as a missing value). Recursive: `value` is one
    orjson wrote, no more than 254 levels deep."""
    if isinstance(value, float) and not isfinite(value):
        return "NaN" if isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, list):
        return [_non_finite_as_text(v) for v in value]
    if isinstance(value, dict):
        return {k: _non_finite_as_text(v) for k, v in value.items()}
    return value


def _dumps(value: object) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _attributes_json(attributes: dict[str, Any]) -> str:
    # Attribute names are strings: no need for _dumps' slower non-string-keys option.
    return orjson.dumps(attributes).decode()


def _loads(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text  # e.g. a `metadata` attribute that was not JSON


def _record(row: Sequence[Any]) -> AuditRecord:
    values = {name: _loads(v) if name in _JSON_FIELDS else v for name, v in zip(_COLUMNS, row)}
    latency = values["latency_ms"]
    if latency is not None and not isfinite(latency):  # kept by a store written before it was refused
        values["latency_ms"] = None
    return AuditRecord(**values)


def _percentile(ordered: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence."""
    if not ordered:
        return None
    return float(ordered[max(ceil(pct / 100 * len(ordered)), 1) - 1])


_HEADER = ("TIME", "ID", "INSTANCE", "MODEL", "STATUS", "LATENCY_MS", "PREDICTION")


def format_table(records: Iterable[AuditRecord], *, width: int = 40) -> str:
    """Aligned plain-text columns for `infer-logger query`; the prediction is cut to `width`.

    Characters that are not printable (newlines, tabs, escape sequences, bidi overrides) are
    shown escaped: cells hold what clients sent, which must not break the table or forge lines
    in an operator's terminal.
    """
    records = list(records)
    return "\n".join(table_lines(records, table_widths(records), width=width))


def table_widths(records: Iterable[AuditRecord]) -> list[int]:
    """The widths of `format_table`'s columns but the last (it pads nothing): a pass of its own,
    so that the lines can be written as they are made (`AuditStore.records(payloads=False)` is
    enough for it)."""
    widths = [len(title) for title in _HEADER[:-1]]
    for record in records:
        widths = list(map(max, widths, map(len, _cells(record))))
    return widths


def table_lines(records: Iterable[AuditRecord], widths: Sequence[int], *, width: int = 40) -> Iterator[str]:
    """`format_table`'s lines, header first, a record at a time, in columns of `widths`."""
    pads = [*widths, 0]
    yield _line(_HEADER, pads)
    for record in records:
        yield _line((*_cells(record), _short(record.response, width)), pads)


def _cells(r: AuditRecord) -> tuple[str, ...]:
    return (
        _escaped(r.time or "-"),
        _escaped(r.id),
        str(r.instance),
        _escaped((r.model or "-") + (f":{r.model_version}" if r.model_version else "")),
        "-" if r.status is None else str(r.status),
        "-" if r.latency_ms is None else f"{r.latency_ms:.1f}",
    )


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()


def _short(value: object, width: int) -> str:
    if value is None:
        return "-"
    text = _escaped(value if isinstance(value, str) else _shown_json(value))
    return text if len(text) <= width else text[: width - 1] + "…"


# In place of a payload nested deeper than Python recurses where it is shown (the store's writer
# may have had more of the stack to spare).
_TOO_DEEP = "(nested too deep to show)"


def _shown_json(value: object) -> str:
    """A payload read back from the store as compact JSON text. orjson reads it but writes no more
    than 254 levels; stdlib json writes what the store does."""
    try:
        return _dumps(value)
    except TypeError:
        pass
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except RecursionError:
        return _TOO_DEEP


def _escaped(text: str) -> str:
    """`text` with what is not printable as Python escapes it (`\\n`, `\\x1b`, `\\u202e`)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def records_to_json(records: Iterable[AuditRecord]) -> str:
    """A JSON array of records (payloads embedded as JSON, not as text)."""
    return "".join(json_chunks(records))


def json_chunks(records: Iterable[AuditRecord]) -> Iterator[str]:
    """`records_to_json`'s text a record at a time (the text orjson writes for the whole array:
    each record's lines indented once more)."""
    first = True
    for record in records:
        # JSON text holds no newline but those of its indentation (strings have theirs escaped).
        yield ("[\n  " if first else ",\n  ") + _record_json(record).replace("\n", "\n  ")
        first = False
    yield "[]" if first else "\n]"


def _record_json(record: AuditRecord) -> str:
    try:
        return orjson.dumps(record, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # a payload nested past the 254 levels orjson writes (stdlib json wrote it)
        pass
    row = {name: getattr(record, name) for name in _COLUMNS}
    try:
        return _stdlib_json(row)
    except RecursionError:  # deeper than Python recurses here: such fields are marked instead
        # Each tried as deep as it lies in `row`, a few frames further down the stack.
        return _stdlib_json({name: v if _fits({"": v}) else _TOO_DEEP for name, v in row.items()})


def _stdlib_json(value: object) -> str:
    try:
        return json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False)
    except ValueError:  # NaN or an infinity: null, as orjson writes them (`Infinity` is no JSON)
        return json.dumps(_non_finite_as_null(value), indent=2, ensure_ascii=False)


def _non_finite_as_null(value: Any) -> Any:
    if isinstance(value, float) and not isfinite(value):
        return None
    if isinstance(value, list):
        return [_non_finite_as_null(v) for v in value]
    if isinstance(value, dict):
        return {k: _non_finite_as_null(v) for k, v in value.items()}
    return value


def _fits(value: object) -> bool:
    try:
        json.dumps(value, indent=2)
    except RecursionError:
        return False
    return True
