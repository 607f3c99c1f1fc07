"""The ASGI middleware logs a FastAPI predictor in the same process, like the sidecar does."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import infer_logger
from infer_logger import events as ev
from infer_logger.asgi import run_lifespan
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.config import load_settings
from infer_logger.demo.predictor import EchoModel, create_app
from infer_logger.demo.quickstart import ServerThread
from infer_logger.middleware import InferenceLoggerMiddleware
from infer_logger.server import uvicorn_config
from infer_logger.testing import EventCollector, free_port
from tests.waiting import until

T = TypeVar("T")


def test_logs_a_fastapi_predictor_under_uvicorn(tmp_path: Path) -> None:
    with EventCollector() as sink:
        app = create_app([EchoModel()])
        settings = load_settings(log_url=[sink.url], spool={"dir": str(tmp_path)}, inference_service="echo")
        app.add_middleware(InferenceLoggerMiddleware, settings=settings)
        port = free_port()
        # uvicorn drives the app's lifespan, which starts and (draining) stops the logger.
        with ServerThread(uvicorn_config(app, "127.0.0.1", port)):
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                r = client.post("/v1/models/echo:predict", json={"instances": [[1, 2, 3, 4]]},
                                headers={"ce-id": "mw-1"})
                assert r.json() == {"predictions": [1]}
                assert r.headers["x-request-id"] == "mw-1"
                skipped = client.post("/v1/models/echo:predict", json={"instances": [[1, 2, 3, 4]]},
                                      headers={"ce-id": "mw-skip", "x-skip-logging": "true"})
                assert skipped.status_code == 200
                assert client.get("/v1/models").status_code == 200
                bad = client.post("/v1/models/echo:predict", json={"oops": 1}, headers={"ce-id": "mw-2"})
                assert bad.status_code == 400
        received = sink.wait_for(4)
    by = {(e.id, e.type): e for e in received}
    assert set(by) == {("mw-1", ev.REQUEST), ("mw-1", ev.RESPONSE), ("mw-2", ev.REQUEST), ("mw-2", ev.RESPONSE)}
    assert by[("mw-1", ev.RESPONSE)].json() == {"predictions": [1]}
    assert int(by[("mw-2", ev.RESPONSE)]["statuscode"]) == 400
    assert by[("mw-1", ev.REQUEST)]["inferenceservicename"] == "echo"


def test_cloudevent_requests_as_the_sidecar_takes_them(tmp_path: Path) -> None:
    """A structured CloudEvent keeps its envelope's id; a malformed one is a 400 naming the attribute."""
    with EventCollector() as sink:
        app = create_app([EchoModel()])
        app.add_middleware(InferenceLoggerMiddleware,
                           settings=load_settings(log_url=[sink.url], spool={"dir": str(tmp_path)}))
        port = free_port()
        with ServerThread(uvicorn_config(app, "127.0.0.1", port)):
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                envelope = {"specversion": "1.0", "id": "env-1", "source": "/c", "type": "t",
                            "data": {"instances": [[1, 2, 3, 4]]}}
                r = client.post("/v1/models/echo:predict", json=envelope,
                                headers={"content-type": "application/cloudevents+json"})
                assert r.headers["x-request-id"] == "env-1"
                bad = client.post("/v1/models/echo:predict", json={"instances": [[1]]},
                                  headers={"ce-specversion": "1.0", "ce-id": "b-1", "ce-type": "t"})
                assert bad.status_code == 400 and bad.json()["attribute"] == "source", bad.text
        received = sink.wait_for(2)
    assert {(e.id, e.type) for e in received} == {("env-1", ev.REQUEST), ("env-1", ev.RESPONSE)}


def _served(app: FastAPI, tmp_path: Path, calls: Callable[[httpx.Client], T], events: int) -> tuple[T, list[CloudEvent]]:
    """`calls` made to `app` under uvicorn behind the logging middleware (its sink a collector),
    and the `events` it logged, once the server stopped (its logger drained)."""
    with EventCollector() as sink:
        app.add_middleware(InferenceLoggerMiddleware,
                           settings=load_settings(log_url=[sink.url], spool={"dir": str(tmp_path)}))
        port = free_port()
        with ServerThread(uvicorn_config(app, "127.0.0.1", port)):
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                result = calls(client)
        return result, sink.wait_for(events)


def test_ids_as_the_sidecar_takes_them(tmp_path: Path) -> None:
    """An id no event may carry is replaced (for the app too); a UTF-8 one comes back as sent."""
    app = FastAPI()

    @app.post("/v1/models/m:predict")
    async def predict(request: Request) -> JSONResponse:
        echoed = {"x-request-id": request.headers["x-request-id"]} if "x-echo" in request.headers else {}
        return JSONResponse({"predictions": [1]}, headers=echoed)

    def calls(client: httpx.Client) -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        bad = client.post("/v1/models/m:predict", json={}, headers=[(b"x-request-id", b"bad\tid"), (b"x-echo", b"1")])
        utf8 = client.post("/v1/models/m:predict", json={}, headers=[(b"x-request-id", b"caf\xc3\xa9")])
        # A ce-id no event may carry gives way to the x-request-id, the one the app sees.
        return bad, utf8, client.post("/v1/models/m:predict", json={}, headers=[
            (b"ce-id", b"bad\tid"), (b"x-request-id", b"good-x"), (b"x-echo", b"1")])

    (bad, utf8, good), received = _served(app, tmp_path, calls, 6)
    new = bad.headers["x-request-id"]
    assert bad.status_code == 200 and uuid.UUID(new).version == 7
    assert [v for k, v in utf8.headers.raw if k.lower() == b"x-request-id"] == [b"caf\xc3\xa9"]
    assert [v for k, v in good.headers.raw if k.lower() == b"x-request-id"] == [b"good-x"]
    assert sorted(e.id for e in received) == sorted([new, new, "café", "café", "good-x", "good-x"])


def test_the_app_sees_the_id_and_the_client_gets_the_one_its_events_carry(tmp_path: Path) -> None:
    """Without an id sent, the app never saw the one made (the sidecar's predictor does); an app
    answering with an x-request-id of its own kept it, naming no event."""
    app = FastAPI()
    seen: list[str | None] = []

    @app.post("/v1/models/m:predict")
    async def predict(request: Request) -> JSONResponse:
        seen.append(request.headers.get("x-request-id"))
        return JSONResponse({"predictions": [1]}, headers={"x-request-id": "the-apps-own"})

    r, received = _served(app, tmp_path, lambda client: client.post("/v1/models/m:predict", json={}), 2)
    rid = r.headers["x-request-id"]
    assert seen == [rid] and [v for k, v in r.headers.raw if k.lower() == b"x-request-id"] == [rid.encode()]
    assert {e.id for e in received} == {rid}


def test_a_compressing_middleware_inside_it_is_not_asked_to(tmp_path: Path) -> None:
    """GZipMiddleware inside the logging one compressed for a client accepting gzip: the
    response event held gzip bytes labelled JSON."""
    from starlette.middleware.gzip import GZipMiddleware

    app = FastAPI()
    predictions = {"predictions": list(range(300))}  # past GZipMiddleware's 500-byte minimum

    @app.post("/v1/models/m:predict")
    async def predict() -> JSONResponse:
        return JSONResponse(predictions)

    app.add_middleware(GZipMiddleware)
    r, received = _served(app, tmp_path, lambda client: client.post(
        "/v1/models/m:predict", json={}, headers={"accept-encoding": "gzip"}), 2)
    assert r.json() == predictions
    assert next(e for e in received if e.type == ev.RESPONSE).json() == predictions


def test_an_answer_compressed_though_identity_was_asked_for_is_logged_decoded(tmp_path: Path) -> None:
    """An app answering pre-compressed bytes whatever it is asked: logged as gzip bytes labelled
    JSON. Decoded as a compressed request is; a coding it cannot decode, said to be bytes."""
    import gzip

    from fastapi.responses import Response

    app = FastAPI()

    @app.post("/v1/models/{name}:predict")
    async def predict(name: str) -> Response:
        if name == "br":
            return Response(b"\x0b\x03\x80{}\x03", media_type="application/json", headers={"content-encoding": "br"})
        return Response(gzip.compress(b'{"predictions": [1]}'), media_type="application/json",
                        headers={"content-encoding": "gzip"})

    def calls(client: httpx.Client) -> list[httpx.Response]:
        return [client.post(f"/v1/models/{name}:predict", json={}, headers={"ce-id": name}) for name in ("gz", "br")]

    (gz, br), received = _served(app, tmp_path, calls, 4)
    assert gz.json() == {"predictions": [1]} and br.content == b"\x0b\x03\x80{}\x03"  # as the app sent them
    responses = {e.id: e for e in received if e.type == ev.RESPONSE}
    assert responses["gz"].json() == {"predictions": [1]} and responses["gz"].datacontenttype == "application/json"
    assert responses["br"].datacontenttype == "application/octet-stream" and responses["br"].data == b"\x0b\x03\x80{}\x03"


def test_a_body_over_max_request_bytes_is_refused_as_the_sidecar_refuses_it(tmp_path: Path) -> None:
    """The middleware held any body whole (to log and replay it) whatever `max_request_bytes` said."""
    calls = []
    app = FastAPI()

    @app.post("/v1/models/m:predict")
    async def predict(request: Request) -> JSONResponse:
        calls.append(len(await request.body()))
        return JSONResponse({"predictions": [1]})

    with EventCollector() as sink:
        app.add_middleware(InferenceLoggerMiddleware, settings=load_settings(
            log_url=[sink.url], spool={"dir": str(tmp_path)}, max_request_bytes=1000))
        port = free_port()
        with ServerThread(uvicorn_config(app, "127.0.0.1", port)):
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                big = client.post("/v1/models/m:predict", content=b"x" * 5000, headers={"ce-id": "big"})
                small = client.post("/v1/models/m:predict", json={"instances": [[1]]}, headers={"ce-id": "ok"})
        received = sink.wait_for(2)
    assert big.status_code == 413 and "max_request_bytes" in big.json()["error"]
    assert small.status_code == 200 and calls == [len(small.request.content)]
    assert {e.id for e in received} == {"ok"}


def test_attributes_read_off_the_client_keep_the_events_valid(tmp_path: Path) -> None:
    """As in the sidecar: a `%09` in the model name, a C1 control in a `metadata` header, a broken
    traceparent and an app answering `content-type: json` made events that every sink refused."""
    app = FastAPI()

    @app.post("/v1/models/{name}:predict")
    async def predict(name: str) -> JSONResponse:
        return JSONResponse({"model": name}, media_type="json")

    with EventCollector() as sink:  # it refuses (400) an invalid event, as the broker does
        settings = load_settings(log_url=[sink.url], spool={"dir": str(tmp_path)}, metadata_headers=["Foo"])
        app.add_middleware(InferenceLoggerMiddleware, settings=settings)
        port = free_port()
        with ServerThread(uvicorn_config(app, "127.0.0.1", port)):
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                r = client.post("/v1/models/a%09b:predict", json={},
                                headers=[(b"foo", b"a\x85b"), (b"traceparent", b"00-a\tb")])
        received = sink.wait_for(2)
    assert r.status_code == 200 and r.json() == {"model": "a\tb"}  # the app gets the name as sent
    for event in received:
        assert event["modelname"] == "a%09b" and event.get("traceparent") is None
        assert orjson.loads(event["metadata"]) == {"Foo": ["a\x85b"]}
        assert event.datacontenttype == "application/json"


def test_a_streamed_response_passes_through_and_only_its_logged_part_is_held(tmp_path: Path) -> None:
    """A response over `max_payload_bytes` streams to the client whole; the event keeps its first
    bytes, marked truncated with the whole size, and the middleware holds no more than that."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    chunk, count = b"x" * 65536, 64  # 4 MiB

    async def predict(request: object) -> StreamingResponse:
        async def body():  # type: ignore[no-untyped-def]
            for _ in range(count):
                yield chunk
        return StreamingResponse(body(), media_type="application/octet-stream")

    held: list[int] = []
    with EventCollector() as sink:
        settings = load_settings(log_url=[sink.url], spool={"dir": str(tmp_path)}, max_payload_bytes=1000)
        middleware = InferenceLoggerMiddleware(Starlette(routes=[Route("/v1/models/big:predict", predict,
                                                                       methods=["POST"])]), settings=settings)
        end = middleware.logger.end

        def spy(exchange, status, content_type, body, size=None, **kwargs):  # type: ignore[no-untyped-def]
            held.append(len(body))
            end(exchange, status, content_type, body, size, **kwargs)

        middleware.logger.end = spy  # type: ignore[method-assign]
        port = free_port()
        with ServerThread(uvicorn_config(middleware, "127.0.0.1", port)):
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                r = client.post("/v1/models/big:predict", json={"instances": [1]}, headers={"ce-id": "big-1"})
                assert r.status_code == 200 and r.content == chunk * count
        received = sink.wait_for(2)
    response = next(e for e in received if e.type == ev.RESPONSE)
    assert response.data == b"x" * 1000
    assert response[ev.TRUNCATED] in (True, "true") and int(response[ev.DATASIZE]) == len(chunk) * count
    assert held == [1000]


def test_a_logger_that_cannot_start_fails_the_apps_startup(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A sink that cannot be built is a failed startup: uvicorn exits saying why, the app is not started."""
    started: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started.append("app")
        yield

    app = FastAPI(lifespan=lifespan)
    bad = tmp_path / "not-a-dir"
    bad.write_text("")  # a file where the sink's directory should be
    settings = load_settings(log_url=[f"file://{bad}/events.jsonl"], spool={"dir": str(tmp_path / "spool")})
    app.add_middleware(InferenceLoggerMiddleware, settings=settings)
    # lifespan "auto", uvicorn's default: a raise there reads as "lifespan unsupported".
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), lifespan="auto",
                                           log_config=None))
    with caplog.at_level(logging.ERROR, logger="uvicorn.error"), pytest.raises(SystemExit) as exited:
        asyncio.run(server.serve())
    assert exited.value.code == 3  # uvicorn's startup failure
    assert not server.started and started == []
    assert any(r.getMessage().startswith("infer-logger:") and "not-a-dir" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("mode", ["process", "inline"])
def test_the_apps_lifespan_can_run_again(tmp_path: Path, mode: str) -> None:
    """A second lifespan in the same process (two TestClient blocks, an in-process restart) logs
    and delivers like the first (stop closed the spool and start never opened it again)."""
    with EventCollector() as sink:
        app = create_app([EchoModel()])
        app.add_middleware(InferenceLoggerMiddleware, settings=load_settings(
            log_url=[sink.url], spool={"dir": str(tmp_path)}, delivery={"mode": mode}))
        for run in (1, 2):
            port = free_port()
            with ServerThread(uvicorn_config(app, "127.0.0.1", port)):
                r = httpx.post(f"http://127.0.0.1:{port}/v1/models/echo:predict",
                               json={"instances": [[1, 2, 3, 4]]}, headers={"ce-id": f"run-{run}"})
                assert r.status_code == 200
        received = sink.wait_for(4)
    assert sorted((e.id, e.type) for e in received) == [
        ("run-1", ev.REQUEST), ("run-1", ev.RESPONSE), ("run-2", ev.REQUEST), ("run-2", ev.RESPONSE)]


def test_two_uvicorn_workers_on_one_spool_fail_the_startup(tmp_path: Path) -> None:
    """The second worker cannot lock the spool: its startup fails saying so and uvicorn stops
    (the lock was taken where Starlette builds the middleware, outside its lifespan handling:
    uvicorn took it for "lifespan unsupported" and that worker answered every request 500)."""
    (tmp_path / "mwapp.py").write_text(
        "from fastapi import FastAPI\n"
        "from infer_logger.config import load_settings\n"
        "from infer_logger.middleware import InferenceLoggerMiddleware\n"
        "app = FastAPI()\n"
        f"app.add_middleware(InferenceLoggerMiddleware, settings=load_settings(\n"
        f"    log_url=['file://{tmp_path}/events.jsonl'], spool={{'dir': '{tmp_path}/spool'}}))\n"
    )
    here = str(Path(infer_logger.__file__).parents[1])  # the workers import this infer_logger
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(tmp_path), "mwapp:app", "--port", str(free_port()),
         "--workers", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # still serving: its workers too (the group is the parent's pid)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert f"infer-logger: spool {tmp_path}/spool: in use by another process" in out, out
    assert "failed to start, stopping the parent process" in out and "unsupported" not in out, out


def test_as_the_outermost_wrapper_it_logs_what_an_exception_handler_answered(tmp_path: Path) -> None:
    """Wrapped around the app (not added to it), the middleware sees the answer of an
    `exception_handler(Exception)`, which Starlette sends outside user middleware: that status
    and body are logged and carry the x-request-id; the app's own lifespan still runs."""
    from fastapi.responses import JSONResponse

    started: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started.append("app")
        yield

    inner = FastAPI(lifespan=lifespan)

    @inner.exception_handler(Exception)
    async def not_ready(request: object, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "model not ready, retry"}, status_code=503)

    @inner.post("/v1/models/{name}:predict")
    async def predict(name: str) -> None:
        raise LookupError("not loaded")

    with EventCollector() as sink:
        app = InferenceLoggerMiddleware(inner, settings=load_settings(log_url=[sink.url],
                                                                      spool={"dir": str(tmp_path)}))
        port = free_port()
        with ServerThread(uvicorn_config(app, "127.0.0.1", port)):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/models/m:predict", json={}, headers={"ce-id": "h-1"})
        received = sink.wait_for(2)
    assert r.status_code == 503 and r.headers["x-request-id"] == "h-1"
    response = next(e for e in received if e.type == ev.RESPONSE)
    assert int(response[ev.STATUSCODE]) == 503 and response.json() == {"error": "model not ready, retry"}
    assert started == ["app"]


def test_an_app_served_under_a_root_path_is_logged(tmp_path: Path) -> None:
    """uvicorn --root-path /api (behind a proxy that strips it) puts it before `path`: routes
    matched on the whole path never matched, and every prediction went unlogged."""
    with EventCollector() as sink:
        app = create_app([EchoModel()])
        app.add_middleware(InferenceLoggerMiddleware,
                           settings=load_settings(log_url=[sink.url], spool={"dir": str(tmp_path)}))
        port = free_port()
        config = uvicorn_config(app, "127.0.0.1", port)
        config.root_path = "/api"
        with ServerThread(config):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/models/echo:predict", json={"instances": [[1, 2, 3, 4]]},
                           headers={"x-request-id": "rp-1"})
            assert r.json() == {"predictions": [1]} and r.headers["x-request-id"] == "rp-1"
        received = sink.wait_for(2)
    assert {(e.id, e.type) for e in received} == {("rp-1", ev.REQUEST), ("rp-1", ev.RESPONSE)}
    assert {e["path"] for e in received} == {"/v1/models/echo:predict"}


def test_a_mounted_app_whose_lifespan_never_runs_is_served_unlogged_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Starlette runs no lifespan of a mounted app: its events were spooled into a logger never
    started, and never delivered (with durability: memory, lost), and nothing said so."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    with EventCollector() as sink:
        inner = create_app([EchoModel()])
        inner.add_middleware(InferenceLoggerMiddleware,
                             settings=load_settings(log_url=[sink.url], spool={"dir": str(tmp_path)}))
        outer = Starlette(routes=[Mount("/api", app=inner)])
        port = free_port()
        with caplog.at_level(logging.ERROR, logger="infer_logger.middleware"), \
                ServerThread(uvicorn_config(outer, "127.0.0.1", port)):
            for i in range(2):
                r = httpx.post(f"http://127.0.0.1:{port}/api/v1/models/echo:predict",
                               json={"instances": [[1, 2, 3, 4]]}, headers={"ce-id": f"mounted-{i}"})
                assert r.status_code == 200 and r.json() == {"predictions": [1]}
    said = [r.getMessage() for r in caplog.records if "logger is not running" in r.getMessage()]
    assert len(said) == 1 and "served unlogged" in said[0]
    assert not any(tmp_path.iterdir())  # nothing spooled for no one (its spool was not even opened)


def _streaming_app() -> FastAPI:
    from fastapi.responses import FileResponse, StreamingResponse

    app = FastAPI()

    @app.post("/v1/models/{name}:predict")
    async def predict(name: str, request: Request) -> object:
        if name == "stream":
            async def tokens() -> AsyncIterator[bytes]:
                for i in range(1000):
                    yield f"data: {i}\n\n".encode()
                    await asyncio.sleep(0.01)
            return StreamingResponse(tokens(), media_type="text/event-stream")
        if name == "late":  # a first token slow to come
            async def late() -> AsyncIterator[bytes]:
                await asyncio.sleep(30)
                yield b"data: 0\n\n"
            return StreamingResponse(late(), media_type="text/event-stream")
        if name == "file":
            return FileResponse(Path(infer_logger.__file__).with_name("events.py"))
        return JSONResponse({"accept_encoding": request.headers.get("accept-encoding")})

    return app


async def test_a_stream_the_client_leaves_is_logged_cut_off(tmp_path: Path) -> None:
    """Starlette ends such a stream quietly: no response event came at all."""
    with EventCollector() as sink:
        app = InferenceLoggerMiddleware(_streaming_app(), settings=load_settings(
            log_url=[sink.url], spool={"dir": str(tmp_path)}))
        port = free_port()
        with ServerThread(uvicorn_config(app, "127.0.0.1", port)):
            async with httpx.AsyncClient() as client:
                async with client.stream("POST", f"http://127.0.0.1:{port}/v1/models/stream:predict",
                                         json={"instances": [[1]]}, headers={"ce-id": "left-1"}) as r:
                    async for _ in r.aiter_bytes():
                        break  # one chunk, then gone
            received = await asyncio.to_thread(sink.wait_for, 2)
    [response] = [e for e in received if e.type == ev.RESPONSE]
    assert response.id == "left-1" and int(response["statuscode"]) == 200
    assert response.get("truncated") in (True, "true") and (response.data or b"").startswith(b"data: 0")


async def test_a_stream_the_client_leaves_before_its_first_chunk_is_logged_cut_off(tmp_path: Path) -> None:
    """Starlette sees the client go and returns after its start, with no body: that is no app
    failing before its body, and was logged as a 500 `the app returned without a response body`."""
    with EventCollector() as sink:
        app = InferenceLoggerMiddleware(_streaming_app(), settings=load_settings(
            log_url=[sink.url], spool={"dir": str(tmp_path)}))
        port = free_port()
        with ServerThread(uvicorn_config(app, "127.0.0.1", port)):
            async with httpx.AsyncClient() as client:
                with pytest.raises(httpx.ReadTimeout):
                    await client.post(f"http://127.0.0.1:{port}/v1/models/late:predict", json={"instances": [[1]]},
                                      headers={"ce-id": "left-2"}, timeout=httpx.Timeout(30, read=0.5))
            received = await asyncio.to_thread(sink.wait_for, 2)
    [response] = [e for e in received if e.type == ev.RESPONSE]
    assert response.id == "left-2" and int(response["statuscode"]) == 200
    assert response.get("truncated") in (True, "true") and not response.data


@pytest.mark.parametrize("form", ["wrapped", "added"])
def test_a_stream_the_app_breaks_off_is_logged_as_the_client_got_it(tmp_path: Path, form: str) -> None:
    """The app raising after its answer began: the client has its 200 and the body cut, which was
    logged as a 500 `{"error": ...}` no one sent. Raising before it began is still the 500."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def predict(request: Any) -> StreamingResponse:
        await request.body()

        async def body() -> AsyncIterator[bytes]:
            yield b'{"predictions": [1,'
            raise RuntimeError("the model failed mid-stream")
        return StreamingResponse(body(), media_type="application/json")

    async def boom(request: Any) -> None:
        raise RuntimeError("before any answer")

    inner = Starlette(routes=[Route("/v1/models/m:predict", predict, methods=["POST"]),
                              Route("/v1/models/boom:predict", boom, methods=["POST"])])
    statuses: dict[str, int] = {}
    with EventCollector() as sink:
        settings = load_settings(log_url=[sink.url], spool={"dir": str(tmp_path)})
        if form == "wrapped":
            app: Any = InferenceLoggerMiddleware(inner, settings=settings)
        else:
            inner.add_middleware(InferenceLoggerMiddleware, settings=settings)
            app = inner
        port = free_port()
        with ServerThread(uvicorn_config(app, "127.0.0.1", port)):
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                for name in ("m", "boom"):
                    with client.stream("POST", f"/v1/models/{name}:predict", json={}, headers={"ce-id": name}) as r:
                        statuses[name] = r.status_code
                        with contextlib.suppress(httpx.HTTPError):  # the cut chunked body
                            r.read()
        received = sink.wait_for(4)
    responses = {e.id: e for e in received if e.type == ev.RESPONSE}
    assert statuses == {"m": 200, "boom": 500}
    assert int(responses["m"][ev.STATUSCODE]) == 200, responses["m"].data
    assert responses["m"].get(ev.TRUNCATED) in (True, "true") and responses["m"].data == b'{"predictions": [1,'
    assert int(responses["boom"][ev.STATUSCODE]) == 500


@pytest.mark.parametrize("gzip", [True, False], ids=["gzip-outside", "plain"])
def test_a_stream_failing_before_its_body_is_its_500(tmp_path: Path, gzip: bool) -> None:
    """GZipMiddleware (as Hypercorn) holds the answer's start until a body comes: the app raising
    before its first chunk is answered 500 further out, which was logged as a cut 200. Plain
    uvicorn sent the start at once: a 200 head and a cut, logged as the 500 it was not; the
    middleware holds the start too now, and the client gets the 500."""
    from starlette.applications import Starlette
    from starlette.middleware.gzip import GZipMiddleware
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def predict(request: Any) -> StreamingResponse:
        await request.body()

        async def body() -> AsyncIterator[bytes]:
            raise RuntimeError("the model failed before its first row")
            yield b""
        return StreamingResponse(body(), media_type="application/json")

    app = Starlette(routes=[Route("/v1/models/m:predict", predict, methods=["POST"])])
    with EventCollector() as sink:
        app.add_middleware(InferenceLoggerMiddleware, settings=load_settings(log_url=[sink.url],
                                                                             spool={"dir": str(tmp_path)}))
        if gzip:
            app.add_middleware(GZipMiddleware)  # outside the logger
        port = free_port()
        with ServerThread(uvicorn_config(app, "127.0.0.1", port)):
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                status = client.post("/v1/models/m:predict", json={}, headers={"ce-id": "m"}).status_code
        received = sink.wait_for(2)
    [response] = [e for e in received if e.type == ev.RESPONSE]
    assert status == 500 and int(response[ev.STATUSCODE]) == 500, response.data


async def test_files_and_encodings_reach_the_log_as_the_client_reads_them(tmp_path: Path) -> None:
    """A server offering `http.response.pathsend` had a FileResponse sent as a path: never logged.
    With no Accept-Encoding any coding may do: the app is asked for `identity`."""
    sent: list[dict[str, object]] = []
    with EventCollector() as sink:
        app = InferenceLoggerMiddleware(_streaming_app(), settings=load_settings(
            log_url=[sink.url], spool={"dir": str(tmp_path)}))
        await app.logger.start()
        try:
            for name in ("file", "echo"):
                scope = {"type": "http", "method": "POST", "path": f"/v1/models/{name}:predict", "raw_path": b"",
                         "root_path": "", "query_string": b"", "headers": [(b"content-type", b"application/json"),
                                                                           (b"ce-id", name.encode())],
                         "extensions": {"http.response.pathsend": {}}, "http_version": "1.1", "scheme": "http",
                         "server": ("x", 80), "client": ("y", 1)}
                messages = iter([{"type": "http.request", "body": b"{}", "more_body": False}])

                async def receive() -> dict[str, object]:
                    if (message := next(messages, None)) is None:  # the client stays: no disconnect
                        await asyncio.Event().wait()
                    return message  # type: ignore[return-value]

                async def send(message: dict[str, object]) -> None:
                    sent.append(message)

                await app(scope, receive, send)
        finally:
            await app.logger.stop()
        received = await asyncio.to_thread(sink.wait_for, 4)
    assert "http.response.pathsend" not in [m["type"] for m in sent]
    responses = {e.id: e for e in received if e.type == ev.RESPONSE}
    assert (responses["file"].data or b"").startswith(b'"""')
    assert orjson.loads(responses["echo"].data or b"") == {"accept_encoding": "identity"}


async def test_a_client_gone_under_asgi_2_4_and_a_final_body_sent_twice(tmp_path: Path) -> None:
    """An ASGI 2.4 server raises OSError from `send` once the client left: logged as the app's 500
    (`ClientDisconnect`), not as the answer cut off. A final body sent twice logged two responses."""
    async def app(scope: dict[str, object], receive: object, send: Callable[..., object]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        if str(scope["path"]).endswith("c:predict"):  # its own OSError (an upstream timeout) once it began: cut off
            await send({"type": "http.response.body", "body": b"chunk0", "more_body": True})
            raise TimeoutError("the upstream model did not answer")
        streaming = scope["path"].endswith("a:predict")
        await send({"type": "http.response.body", "body": b"chunk0", "more_body": streaming})
        await send({"type": "http.response.body", "body": b"chunk1", "more_body": streaming})
        await send({"type": "http.response.body", "body": b"chunk2", "more_body": False})

    with EventCollector() as sink:
        middleware = InferenceLoggerMiddleware(app, settings=load_settings(log_url=[sink.url], spool={"dir": str(tmp_path)}))
        await middleware.logger.start()
        try:
            for name in ("a", "b", "c"):
                messages = iter([{"type": "http.request", "body": b"{}", "more_body": False}])
                sends: list[dict[str, object]] = []

                async def receive() -> dict[str, object]:
                    if (message := next(messages, None)) is None:
                        await asyncio.Event().wait()
                    return message  # type: ignore[return-value]

                async def send(message: dict[str, object]) -> None:
                    if name == "a" and len(sends) == 2:
                        raise OSError("the client is gone")  # what an ASGI 2.4 server raises
                    sends.append(message)

                scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST",
                         "path": f"/v1/models/{name}:predict", "root_path": "", "query_string": b"",
                         "headers": [(b"ce-id", name.encode())]}
                with contextlib.suppress(OSError):
                    await middleware(scope, receive, send)
        finally:
            await middleware.logger.stop()
        received = await asyncio.to_thread(sink.wait_for, 6)
    responses = [e for e in received if e.type == ev.RESPONSE]
    by = {e.id: e for e in responses}
    assert len(responses) == 3  # b's second final body logged no second response
    assert int(by["c"]["statuscode"]) == 200 and by["c"].get("truncated") in (True, "true")
    assert by["c"].data == b"chunk0"
    assert int(by["a"]["statuscode"]) == 200 and by["a"].get("truncated") in (True, "true")
    assert (by["a"].data or b"").startswith(b"chunk0") and b"chunk2" not in (by["a"].data or b"")
    assert by["b"].data == b"chunk0"


async def test_predictions_the_servers_stop_cancels_get_their_response_event(tmp_path: Path) -> None:
    """uvicorn cancels what still runs once its graceful-shutdown timeout is over: the client got
    its 500 (or its stream cut), the request event was logged, the response event never was."""
    from fastapi.responses import StreamingResponse

    entered: list[str] = []
    app = FastAPI()

    @app.post("/v1/models/{name}:predict")
    async def predict(name: str) -> object:
        entered.append(name)
        if name == "stream":
            async def tokens() -> AsyncIterator[bytes]:
                yield b"data: 0\n\n"
                await asyncio.Event().wait()  # the next token never comes
            return StreamingResponse(tokens(), media_type="text/event-stream")
        await asyncio.Event().wait()  # never answers
        return None

    with EventCollector() as sink:
        app.add_middleware(InferenceLoggerMiddleware,
                           settings=load_settings(log_url=[sink.url], spool={"dir": str(tmp_path)}))
        config = uvicorn_config(app, "127.0.0.1", free_port())
        config.timeout_graceful_shutdown = 1
        server = ServerThread(config).__enter__()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{config.port}", timeout=60) as client:
                slow = asyncio.create_task(client.post("/v1/models/slow:predict", json={}, headers={"ce-id": "slow"}))
                async with client.stream("POST", "/v1/models/stream:predict", json={},
                                         headers={"ce-id": "stream"}) as r:
                    chunks = r.aiter_bytes()
                    first = await anext(chunks)
                    await until(lambda: "slow" in entered, 30, "the slow prediction running")
                    await asyncio.to_thread(server.__exit__)  # the stop, cancelling both after the grace
                    with contextlib.suppress(httpx.HTTPError):
                        async for _ in chunks:
                            pass
                answered = await slow
        finally:
            await asyncio.to_thread(server.__exit__)
        received = await asyncio.to_thread(sink.wait_for, 4)
    assert first == b"data: 0\n\n" and answered.status_code == 500
    responses = {e.id: e for e in received if e.type == ev.RESPONSE}
    assert int(responses["slow"][ev.STATUSCODE]) == 500
    assert "cancelled before it answered" in responses["slow"].json()["error"]
    assert int(responses["stream"][ev.STATUSCODE]) == 200 and responses["stream"].data == b"data: 0\n\n"
    assert responses["stream"].get(ev.TRUNCATED) in (True, "true")


async def test_a_cancel_is_logged_and_not_swallowed(tmp_path: Path) -> None:
    """An outer timeout cancelling the app: its response event is logged and the cancel goes on."""
    async def app(scope: dict[str, object], receive: Any, send: Any) -> None:
        await asyncio.Event().wait()

    with EventCollector() as sink:
        middleware = InferenceLoggerMiddleware(app, settings=load_settings(log_url=[sink.url],
                                                                            spool={"dir": str(tmp_path)}))
        await middleware.logger.start()
        try:
            messages = iter([{"type": "http.request", "body": b"{}", "more_body": False}])

            async def receive() -> dict[str, object]:
                if (message := next(messages, None)) is None:
                    await asyncio.Event().wait()
                return message  # type: ignore[return-value]

            async def send(message: dict[str, object]) -> None:
                pass

            scope = {"type": "http", "method": "POST", "path": "/v1/models/m:predict", "root_path": "",
                     "query_string": b"", "headers": [(b"ce-id", b"c-1")]}
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await middleware(scope, receive, send)
        finally:
            await middleware.logger.stop()
        received = await asyncio.to_thread(sink.wait_for, 2)
    [response] = [e for e in received if e.type == ev.RESPONSE]
    assert response.id == "c-1" and int(response[ev.STATUSCODE]) == 500
    assert response.json()["error"].startswith("the app was cancelled before it answered")


@pytest.mark.parametrize(("started", "error"), [
    (False, "the app returned without a response"),
    (True, "the app returned without a response body"),
], ids=["nothing", "a-start"])
def test_an_app_returning_without_an_answer_is_logged_as_the_500_the_client_gets(
        tmp_path: Path, started: bool, error: str) -> None:
    """uvicorn answers 500 for an app that returned without starting a response: no response event
    came. With a start and no body, the start was sent as the app left it, and the client got a 200
    head cut off under uvicorn, a 500 under Hypercorn (which holds a start for its body), logged as
    a cut 200: held back, every server answers the 500 logged."""
    async def nothing() -> None:
        pass

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await run_lifespan(receive, send, nothing, nothing)
            return
        while (await receive()).get("more_body"):
            pass
        if started:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})

    with EventCollector() as sink:
        wrapped = InferenceLoggerMiddleware(app, settings=load_settings(log_url=[sink.url],
                                                                        spool={"dir": str(tmp_path)}))
        port = free_port()
        with ServerThread(uvicorn_config(wrapped, "127.0.0.1", port)):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/models/m:predict", json={}, headers={"ce-id": "none-1"})
        received = sink.wait_for(2)
    assert r.status_code == 500
    [response] = [e for e in received if e.type == ev.RESPONSE]
    assert int(response[ev.STATUSCODE]) == 500 and response.get(ev.TRUNCATED) in (None, False, "false")
    assert response.json()["error"] == error


def test_wrapping_the_outer_app_logs_a_mounted_predictor(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As the README says for a mounted app: wrap the outer app. There the path still holds the
    mount's prefix, and routes matched on the whole path never matched: nothing logged, nothing said."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    with EventCollector() as sink:
        outer = Starlette(routes=[Mount("/api", app=create_app([EchoModel()]))])
        app = InferenceLoggerMiddleware(outer, settings=load_settings(log_url=[sink.url], spool={"dir": str(tmp_path)}))
        port = free_port()
        with caplog.at_level(logging.ERROR, logger="infer_logger.middleware"), \
                ServerThread(uvicorn_config(app, "127.0.0.1", port)):
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                r = client.post("/api/v1/models/echo:predict", json={"instances": [[1, 2, 3, 4]]},
                                headers={"ce-id": "m-1"})
                assert r.json() == {"predictions": [1]} and r.headers["x-request-id"] == "m-1"
                # Not an inference route under the prefix, nor a prefix cutting a segment: unlogged.
                assert client.get("/api/v1/models/echo").status_code == 200
                assert client.post("/apiv1/models/echo:predict", json={}).status_code == 404
        received = sink.wait_for(2)
    assert {(e.id, e.type) for e in received} == {("m-1", ev.REQUEST), ("m-1", ev.RESPONSE)}
    assert {e["path"] for e in received} == {"/api/v1/models/echo:predict"}  # as the client sent it
    assert {e["modelname"] for e in received} == {"echo"}
    assert not caplog.records


def test_the_outer_and_the_mounted_app_wrapped_with_one_logger_log_once(tmp_path: Path) -> None:
    """Before the outer middleware matched under a prefix, wrapping both with one logger was the
    way to log a mounted predictor: now both logged each prediction, two pairs of events."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from infer_logger.logger import InferenceLogger

    with EventCollector() as sink:
        logger = InferenceLogger(load_settings(log_url=[sink.url], spool={"dir": str(tmp_path)}))
        inner = InferenceLoggerMiddleware(create_app([EchoModel()]), logger=logger)
        app = InferenceLoggerMiddleware(Starlette(routes=[Mount("/api", app=inner)]), logger=logger)
        port = free_port()
        with ServerThread(uvicorn_config(app, "127.0.0.1", port)):
            r = httpx.post(f"http://127.0.0.1:{port}/api/v1/models/echo:predict", json={"instances": [[1, 2, 3, 4]]},
                           headers={"ce-id": "d-1"})
            assert r.status_code == 200
            sink.wait_for(2)
        time.sleep(0.5)  # a second pair would follow the first
    assert sorted((e.type, e["path"]) for e in sink.events) == [(ev.REQUEST, "/api/v1/models/echo:predict"),
                                                               (ev.RESPONSE, "/api/v1/models/echo:predict")]


def test_the_outer_and_the_mounted_app_wrapped_alike_log_once_and_say_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Wrapped with the same settings, not one logger: the mounted app's never starts (its
    lifespan never runs), and it said its calls were served unlogged, which the outer one logged."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    with EventCollector() as sink:
        settings = load_settings(log_url=[sink.url], spool={"dir": str(tmp_path)})
        inner = InferenceLoggerMiddleware(create_app([EchoModel()]), settings=settings)
        app = InferenceLoggerMiddleware(Starlette(routes=[Mount("/api", app=inner)]), settings=settings)
        port = free_port()
        with caplog.at_level(logging.ERROR, logger="infer_logger.middleware"), \
                ServerThread(uvicorn_config(app, "127.0.0.1", port)):
            r = httpx.post(f"http://127.0.0.1:{port}/api/v1/models/echo:predict", json={"instances": [[1, 2, 3, 4]]},
                           headers={"ce-id": "m-2"})
            assert r.status_code == 200
            received = sink.wait_for(2)
    assert sorted(e.type for e in received) == [ev.REQUEST, ev.RESPONSE]
    assert not caplog.records


def test_a_mounted_app_wrapped_for_other_sinks_says_it_serves_unlogged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its lifespan never runs: its own sinks get nothing, and that it says (not logged outside)."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    with EventCollector() as sink, EventCollector() as other:
        inner = InferenceLoggerMiddleware(create_app([EchoModel()]), settings=load_settings(
            log_url=[other.url], spool={"dir": str(tmp_path / "inner")}))
        app = InferenceLoggerMiddleware(Starlette(routes=[Mount("/api", app=inner)]), settings=load_settings(
            log_url=[sink.url], spool={"dir": str(tmp_path / "outer")}))
        port = free_port()
        with caplog.at_level(logging.ERROR, logger="infer_logger.middleware"), \
                ServerThread(uvicorn_config(app, "127.0.0.1", port)):
            r = httpx.post(f"http://127.0.0.1:{port}/api/v1/models/echo:predict", json={"instances": [[1, 2, 3, 4]]})
            assert r.status_code == 200
            sink.wait_for(2)
    assert ["served unlogged" in record.getMessage() for record in caplog.records] == [True]


def test_two_middlewares_with_loggers_of_their_own_both_log(tmp_path: Path) -> None:
    """The mark that an exchange was logged outside made one inside with another logger (its own
    sink and spool) log nothing."""
    with EventCollector() as outer_sink, EventCollector() as inner_sink:
        inner = InferenceLoggerMiddleware(create_app([EchoModel()]), settings=load_settings(
            log_url=[inner_sink.url], spool={"dir": str(tmp_path / "inner")}))
        app = InferenceLoggerMiddleware(inner, settings=load_settings(
            log_url=[outer_sink.url], spool={"dir": str(tmp_path / "outer")}))
        port = free_port()
        with ServerThread(uvicorn_config(app, "127.0.0.1", port)):  # the lifespan runs through both
            r = httpx.post(f"http://127.0.0.1:{port}/v1/models/echo:predict", json={"instances": [[1, 2, 3, 4]]},
                           headers={"ce-id": "two-1"})
            assert r.status_code == 200
            outer, inner_events = outer_sink.wait_for(2), inner_sink.wait_for(2)
    assert {e.id for e in outer} == {e.id for e in inner_events} == {"two-1"}


def test_what_the_router_sets_in_the_scope_reaches_outer_middlewares(tmp_path: Path) -> None:
    """The app was called with a copy of the scope: the `route`, `endpoint` and `path_params`
    Starlette's router sets never reached a middleware outside (route-labelled metrics)."""
    seen: list[tuple[object, object]] = []
    after: list[tuple[object, object]] = []
    app = FastAPI()

    @app.post("/v1/models/{name}:predict")
    async def predict(name: str) -> dict[str, list[int]]:
        return {"predictions": [1]}

    with EventCollector() as sink:
        app.add_middleware(InferenceLoggerMiddleware,
                           settings=load_settings(log_url=[sink.url], spool={"dir": str(tmp_path)}))

        @app.middleware("http")  # added after: outside it, as metrics middlewares are
        async def metrics(request: Request, call_next: Any) -> Any:
            response = await call_next(request)
            seen.append((getattr(request.scope.get("route"), "path", None), request.scope.get("path_params")))
            return response

        async def outermost(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await app(scope, receive, send)
            if scope["type"] == "http":
                after.append((getattr(scope.get("route"), "path", None), scope.get("endpoint")))

        port = free_port()
        with ServerThread(uvicorn_config(outermost, "127.0.0.1", port)):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/models/iris:predict", json={}, headers={"ce-id": "r-1"})
            assert r.status_code == 200
        sink.wait_for(2)
    assert seen == [("/v1/models/{name}:predict", {"name": "iris"})]
    assert after == [("/v1/models/{name}:predict", predict)]


@pytest.mark.parametrize("mode", ["process", "inline"])
def test_a_failed_app_startup_stops_the_logger(tmp_path: Path, mode: str) -> None:
    """The app's own startup failed after the middleware started the logger: it went on running
    (a delivery child left behind, or inline workers), and the next lifespan started it again on top."""
    from infer_logger.logger import InferenceLogger

    fail = [True]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if fail[0]:
            raise RuntimeError("model file missing")
        yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1/models/m:predict")
    async def predict() -> dict[str, list[int]]:
        return {"predictions": [1]}

    with EventCollector() as sink:
        logger = InferenceLogger(load_settings(log_url=[sink.url], spool={"dir": str(tmp_path)},
                                               delivery={"mode": mode}))
        app.add_middleware(InferenceLoggerMiddleware, logger=logger)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), lifespan="on",
                                               log_config=None))
        try:
            with pytest.raises(SystemExit):
                asyncio.run(server.serve())
            assert not logger.started
            assert logger.delivery is None or logger.delivery.pid is None  # no child left
        finally:
            if logger.delivery is not None and (pid := logger.delivery.pid) is not None:
                os.kill(pid, signal.SIGKILL)  # the leak, when there is one
        fail[0] = False
        port = free_port()
        with ServerThread(uvicorn_config(app, "127.0.0.1", port)):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/models/m:predict", json={}, headers={"ce-id": "again"})
            assert r.status_code == 200
        received = sink.wait_for(2)
    assert sorted((e.id, e.type) for e in received) == [("again", ev.REQUEST), ("again", ev.RESPONSE)]
