from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from pathlib import Path

import orjson
import pytest

from infer_logger import events
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.errors import RejectedError, SinkError
from infer_logger.sinks.base import Sink
from infer_logger.sinks.store import StoreSink, StoreSinkConfig
from infer_logger.store import AuditStore


def _event(type_: str, id_: str, body: object, **attrs: str | int) -> CloudEvent:
    base = {"id": id_, "source": "s", "specversion": "1.0", "type": type_, "modelname": "iris", **attrs}
    return CloudEvent(base, orjson.dumps(body))


class TestStoreSink:
    """The store sink writes records off the event loop and maps SQLite failures to retries."""

    def test_config(self, tmp_path: Path) -> None:
        config = StoreSinkConfig.model_validate({"type": "store", "path": str(tmp_path / "d" / "a.db")})
        assert config.sink_name == "store"
        assert StoreSinkConfig().path == "infer-logger-data/audit.db"
        sink = config.build()
        assert isinstance(sink, Sink)
        assert (tmp_path / "d" / "a.db").exists()
        asyncio.run(sink.aclose())

    async def test_send_batch(self, tmp_path: Path) -> None:
        sink = StoreSinkConfig(path=str(tmp_path / "a.db")).build()
        await sink.send_batch([_event(events.REQUEST, "a", {"instances": [[1], [2]]})])
        await asyncio.gather(
            sink.send_batch([_event(events.RESPONSE, "a", {"predictions": [5, 6]}, statuscode=200)]),
            sink.send_batch([_event(events.REQUEST, "b", {"instances": [[3]]})]),
        )
        await sink.aclose()
        with AuditStore(tmp_path / "a.db", readonly=True) as store:
            records = store.query(order="asc", limit=None)
        assert sorted((r.id, r.instance, r.response, r.status) for r in records) == [
            ("a", 0, 5, 200),
            ("a", 1, 6, 200),
            ("b", 0, None, None),
        ]

    async def test_locked_database_is_retryable(self, tmp_path: Path) -> None:
        path = tmp_path / "a.db"
        sink = StoreSink(AuditStore(path, timeout=0.05))
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        try:
            with pytest.raises(SinkError, match="locked") as caught:
                await sink.send_batch([_event(events.REQUEST, "a", {"instances": [[1]]})])
            assert not isinstance(caught.value, RejectedError)  # retried, not dead-lettered
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        await sink.send_batch([_event(events.REQUEST, "a", {"instances": [[1]]})])  # the retry succeeds
        assert len(sink.store.query()) == 1
        await sink.aclose()

    @pytest.mark.parametrize("poison", [
        {"statuscode": "1e300"},  # a number past SQLite's 64 bits
        {"statuscode": 2**70},
    ])
    async def test_an_event_no_row_can_hold_is_rejected_and_the_rest_written(
        self, tmp_path: Path, poison: dict[str, str | int]
    ) -> None:
        sink = StoreSinkConfig(path=str(tmp_path / "a.db")).build()
        batch = [
            _event(events.REQUEST, "good", {"instances": [[1]]}),
            _event(events.RESPONSE, "bad", {"predictions": [1]}, **poison),
            _event(events.RESPONSE, "good", {"predictions": [2]}, statuscode=200),
        ]
        with pytest.raises(RejectedError) as caught:  # dead-lettered, never retried
            await sink.send_batch(batch)
        assert [e.id for e in caught.value.events] == ["bad"] and "bad" in str(caught.value)
        assert [(r.id, r.response, r.status) for r in sink.store.query()] == [("good", 2, 200)]
        await sink.aclose()

    async def test_a_time_with_no_utc_form_is_stored_as_written(self, tmp_path: Path) -> None:
        """Before year 1 in UTC: its row keeps the text (it sorts first), not a dead letter."""
        sink = StoreSinkConfig(path=str(tmp_path / "a.db")).build()
        await sink.send_batch([_event(events.RESPONSE, "old", {"predictions": [1]}, time="0001-01-01T00:00:00+01:00")])
        assert [(r.id, r.time) for r in sink.store.query()] == [("old", "0001-01-01T00:00:00+01:00")]
        await sink.aclose()

    async def test_payloads_deeper_than_python_recurses_or_orjson_writes_are_written(
        self, tmp_path: Path
    ) -> None:
        """The first two raised RecursionError, which the worker retried forever: the store never
        got past them. Nested 300 deep (orjson reads 1024 levels, writes 254) the event was
        dead-lettered, the exchange's row left without its request: kept as sent."""
        def request(id_: str, body: bytes) -> CloudEvent:
            return CloudEvent({"id": id_, "source": "s", "specversion": "1.0", "type": events.REQUEST}, body)

        past_orjson = b'{"instances":' + b"[" * 2000 + b"]" * 2000 + b"}"
        many_dims = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[' + b",".join([b"1"] * 1000) + b'],"data":[1]}]}'
        sink = StoreSinkConfig(path=str(tmp_path / "a.db")).build()
        deep = request("deep", b'{"instances":' + b"[" * 300 + b"]" * 300 + b"}")
        too_deep = b"[" * 1018 + b"]" * 1018  # orjson reads it, stdlib json does not write it
        deepest = request("deepest", b'{"instances":[' + too_deep + b"," + too_deep + b"]}")
        later = request("later", b'{"instances":[[1],' + too_deep + b"]}")  # the first failing row, not row 0
        await sink.send_batch([request("past", past_orjson), deep, request("dims", many_dims), deepest, later])
        stored = {(r.id, r.instance): r.request for r in sink.store.query(limit=None)}
        assert set(stored) == {("past", 0), ("deep", 0), ("dims", 0), ("deepest", 0), ("deepest", 1),
                               ("later", 0), ("later", 1)}
        assert stored["later", 0] == [1] and base64.b64decode(stored["later", 1]["base64"]) == later.data
        # The same with its response in the batch (written as one exchange).
        paired = CloudEvent({**later.attributes, "id": "paired"}, later.data)
        await sink.send_batch([paired, _event(events.RESPONSE, "paired", {"predictions": [1, 2]}, statuscode=200)])
        rows = {r.instance: r for r in sink.store.query(id="paired")}
        assert rows[0].request == [1] and base64.b64decode(rows[1].request["base64"]) == later.data
        assert [rows[0].response, rows[1].response] == [1, 2]
        assert set(stored["past", 0]) == {"base64"}
        assert json.dumps(stored["deep", 0], separators=(",", ":")) == "[" * 299 + "]" * 299  # by stdlib json
        # Past what stdlib json writes too: the payload as sent, once (in every row it took MBs).
        assert base64.b64decode(stored["deepest", 0]["base64"]) == deepest.data and stored["deepest", 1] is None
        assert stored["dims", 0]["inputs"][0]["shape"] == [1] * 1000
        await sink.aclose()


async def test_a_blocked_store_holds_none_of_the_default_threads(tmp_path: Path) -> None:
    """A store another writer holds locked waits in its own thread: its batches (a broker's
    component takes 64 per trigger at once) filled asyncio's default pool, which the broker's
    other triggers resolve subscriber hosts with: a healthy trigger timed out and lost events."""
    db = tmp_path / "audit.db"
    sink = StoreSink(AuditStore(db, timeout=60))  # its writers wait far past the guard below
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        writes = [asyncio.create_task(sink.send_batch([_event(events.REQUEST, f"r{i}", {"instances": [[i]]})]))
                  for i in range(40)]
        await asyncio.sleep(0.1)
        # A free default pool answers at once; one filled by the writers only after their 60 s.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 20) == "free"
    finally:
        holder.execute("COMMIT")
        holder.close()
    await asyncio.gather(*writes, return_exceptions=True)
    await sink.aclose()


async def test_closed_twice_and_written_after_close_retried_not_refused(tmp_path: Path) -> None:
    sink = StoreSink(AuditStore(tmp_path / "audit.db"))
    await sink.aclose()
    await sink.aclose()
    with pytest.raises(SinkError, match="closed") as info:
        await sink.send_batch([_event(events.REQUEST, "r1", {"instances": [[1]]})])
    assert not isinstance(info.value, RejectedError)
