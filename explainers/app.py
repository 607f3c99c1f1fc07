"""The explainer server: KServe V1 (`:explain`, `:predict`), V2 (`/infer` answering an `explanation`
output; JSON or binary tensor data both ways), health and metadata, `POST /events` for
explain-on-event, and Prometheus `/metrics`. It only translates: the work is `ExplainerService`'s,
the events' `ExplainSubscriber`'s.

The lifespan fits (or restores) and warms the explainer before the server takes requests, so the
first one is not slow; errors answer `{"error": "..."}` with the status of their class.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from explainers import codecs
from explainers.errors import (
    ExplainerError,
    ExplainTimeoutError,
    InvalidInputError,
    InvalidParametersError,
    NotReadyError,
    PredictorError,
    PredictorTimeoutError,
    UnknownModelError,
)
from explainers.metrics import ExplainerMetrics
from explainers.service import ExplainerService, parameter_names
from explainers.subscriber import ExplainSubscriber
from infer_logger import binary_tensors
from infer_logger.asgi import BodyLimit, BodyTimeoutError, BodyTooLargeError
from infer_logger.proxy import end_to_end

log = logging.getLogger(__name__)
Endpoint = Callable[[Request], Awaitable[Response]]
T = TypeVar("T")
_STATUS: dict[type[ExplainerError], int] = {  # the first class that fits: subclasses before their base
    InvalidInputError: 400, InvalidParametersError: 400, UnknownModelError: 404,
    PredictorTimeoutError: 504, PredictorError: 502, NotReadyError: 503, ExplainTimeoutError: 504,
}
_VERBS = (":explain", ":predict")  # V1's POST-only paths, which `GET /v1/models/{name}` matches too


class Liveness(BaseModel):
    status: str = "alive"


class ModelList(BaseModel):
    models: list[str]


class ModelReady(BaseModel):
    name: str
    ready: bool


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] | None = None
    platform: str = ""
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = {}


def _json(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


class _StartFailureInOneLine:
    """Starlette reports any failed start to the server as a traceback, which uvicorn prints; an
    `ExplainerError` (a predictor that does not answer, bad parameters) was logged in one line
    naming the cause, so the server is told no more. Other errors keep their traceback."""

    def __init__(self, app: Callable[..., Awaitable[None]], failures: list[ExplainerError]) -> None:
        self.app, self.failures = app, failures

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Awaitable[Any]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def told(message: dict[str, Any]) -> None:
            if message["type"] == "lifespan.startup.failed" and self.failures:
                message = {**message, "message": ""}
            await send(message)

        await self.app(scope, receive, told)


class _Unexpected:
    """A bug (ours or a library's) is answered here, in JSON, its traceback logged. Not by an
    `exception_handler(Exception)`: Starlette's outermost middleware runs that one and then raises
    again, and uvicorn closed the kept-alive connection, failing the client's next request on it."""

    def __init__(self, app: Callable[..., Awaitable[None]], answer: Callable[[Exception], Response]) -> None:
        self.app, self.answer = app, answer

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Awaitable[Any]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            log.error("%s %s failed", scope["method"], scope["path"], exc_info=exc)
            if started:  # too late to answer: the connection goes
                raise
            await self.answer(exc)(scope, receive, send)


async def _unless_gone(request: Request, work: Awaitable[T]) -> T:
    """`work` (an explanation), cancelled if the client disconnects first: no one is left to answer,
    and its workers and predictor calls are freed for the next request (ClientDisconnect then).
    Only once the body is read: the next message `receive` gives is then the disconnect."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        task.cancel()  # done: nothing; else the client left, or this request itself was cancelled
    if task in done:
        return task.result()
    await asyncio.wait((task,))  # its cancellation run: the explanation's chunks are given up
    raise ClientDisconnect


def create_app(service: ExplainerService, subscriber: ExplainSubscriber | None = None) -> FastAPI:
    events = subscriber or ExplainSubscriber(service)
    failures: list[ExplainerError] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        failures.clear()
        try:
            await service.start()
        except ExplainerError as exc:
            log.error("explainer %s failed to start: %s", service.name, exc)
            failures.append(exc)
            await service.aclose()
            raise
        try:
            yield
        finally:
            await events.aclose()
            await service.aclose()

    app = FastAPI(title="infer-logger explainer", lifespan=lifespan)
    app.state.service, app.state.subscriber = service, events
    app.state.metrics = metrics = ExplainerMetrics(service, events)
    app.add_middleware(BodyLimit, limit=int(service.settings.max_request_bytes),
                       timeout=service.settings.request_read_timeout)
    app.add_middleware(_StartFailureInOneLine, failures=failures)
    app.state.start_failures = failures  # the command's exit code tells settings from the rest
    app.add_middleware(
        _Unexpected,
        answer=lambda exc: failed(500, f"internal error in the explainer ({type(exc).__name__}); see its log"),
    )

    def failed(status: int, reason: str) -> Response:
        metrics.errors.labels(str(status)).inc()
        return _json({"error": reason}, status)

    @app.exception_handler(BodyTooLargeError)
    async def too_large(request: Request, exc: BodyTooLargeError) -> Response:
        answer = failed(413, f"{exc} (max_request_bytes)")
        if exc.unsent:  # the client may send the body or not: uvicorn closes it, no request misread
            answer.headers["connection"] = "close"
        return answer

    @app.exception_handler(BodyTimeoutError)
    async def too_slow(request: Request, exc: BodyTimeoutError) -> Response:
        answer = failed(408, f"{exc} (request_read_timeout)")
        answer.headers["connection"] = "close"  # uvicorn closes it: the rest of the body is not read
        return answer

    @app.exception_handler(ExplainerError)
    async def explainer_error(request: Request, exc: ExplainerError) -> Response:
        status = next((code for kind, code in _STATUS.items() if isinstance(exc, kind)), 500)
        return failed(status, str(exc))

    @app.exception_handler(HTTPException)
    async def no_route(request: Request, exc: HTTPException) -> Response:
        # An unknown path or method: the protocol's {"error": ...}, not FastAPI's {"detail": ...};
        # not counted among the explainer's errors (a probe of /favicon.ico is none).
        answer = _json({"error": str(exc.detail)}, exc.status_code)
        answer.headers.update(exc.headers or {})  # a 405's Allow
        return answer

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client left mid-body, or while it was explained: no one to answer, and no error of
        # ours (it was a logged 500).
        log.debug("%s %s: the client disconnected before it was answered", request.method, request.url.path)
        return Response(status_code=400)

    def model(name: str) -> ExplainerService:
        if name != service.name:
            raise UnknownModelError(name)
        if not service.ready:
            raise NotReadyError(f"explainer {name} is not ready")
        return service

    async def body_of(request: Request) -> Any:
        try:
            return orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise InvalidInputError(f"the body is not JSON: {exc}") from None

    @app.get("/", response_model=Liveness)
    async def live() -> Liveness:
        return Liveness()

    @app.get("/v1/models", response_model=ModelList)
    async def v1_models() -> ModelList:
        return ModelList(models=[service.name])

    @app.get("/v1/models/{name}", response_model=ModelReady)
    async def v1_model(name: str) -> ModelReady:
        if name.endswith(_VERBS) and name != service.name:  # a GET of `iris:explain`: the method is wrong
            raise HTTPException(405, headers={"Allow": "POST"})
        return ModelReady(name=model(name).name, ready=True)

    async def v1_explain(request: Request) -> Response:
        found = model(request.path_params["name"])
        body = await body_of(request)
        rows = found.decode(body)
        explanation = await _unless_gone(request, found.explain(rows, codecs.explain_parameters(body)))
        return _json(explanation.to_dict())

    @app.post("/v1/models/{name}:predict")
    async def v1_predict(name: str, request: Request) -> Response:
        found = model(name)
        # Hop-by-hop headers describe this connection: a client's `transfer-encoding: chunked`
        # beside the content-length the predictor client sets made the predictor refuse.
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in end_to_end(request.headers.raw)}
        status, content_type, body = await found.predict(await request.body(), headers)
        return Response(body, status_code=status, media_type=content_type)

    @app.get("/v2", response_model=ServerMetadata)
    async def v2_server() -> ServerMetadata:
        try:
            ours = version("infer-logger")
        except PackageNotFoundError:
            ours = "0"
        return ServerMetadata(name="infer-logger-explainer", version=ours, extensions=["binary_tensor_data"])

    @app.get("/v2/health/live", response_model=ServerLive)
    async def v2_live() -> ServerLive:
        return ServerLive(live=True)

    @app.get("/v2/health/ready", response_model=ServerReady)
    async def v2_ready() -> Response:
        return _json({"ready": service.ready}, 200 if service.ready else 503)

    @app.get("/v2/models/{name}/ready", response_model=ModelReady)
    @app.get("/v2/models/{name}/versions/{model_version}/ready", response_model=ModelReady)
    async def v2_model_ready(name: str) -> ModelReady:
        return ModelReady(name=model(name).name, ready=True)

    @app.get("/v2/models/{name}", response_model=ModelMetadata)
    @app.get("/v2/models/{name}/versions/{model_version}", response_model=ModelMetadata)
    async def v2_metadata(name: str) -> ModelMetadata:
        found = model(name)
        assert found.schema is not None and found.explainer is not None
        schema = found.schema
        datatype = "BYTES" if schema.categorical else "FP64"
        return ModelMetadata(
            name=name,
            inputs=[TensorMetadata(name="input-0", datatype=datatype, shape=[-1, schema.width])],
            outputs=[TensorMetadata(name="explanation", datatype="BYTES", shape=[1])],
            parameters={"feature_names": list(schema.feature_names), "method": found.explainer.method,
                        "categorical": sorted(schema.categorical)},
        )

    async def v2_infer(request: Request) -> Response:
        name, model_version = request.path_params["name"], request.path_params.get("model_version")
        found = model(name)
        body = codecs.decode_body(await request.body(), request.headers.get(binary_tensors.HEADER),
                                  found.max_values)
        rows = found.decode(body)
        request_id = body.get("id")
        if not isinstance(request_id, str | int | float | None):  # echoed: a list nested deep fails orjson
            raise InvalidInputError("`id` must be a string")
        wanted = body.get("outputs")
        if wanted is not None and not (isinstance(wanted, list) and all(isinstance(o, Mapping) for o in wanted)):
            # Read only after explaining: refused now, before the work is spent.
            raise InvalidInputError("`outputs` must be a list of objects")
        for output in wanted or ():
            asked = output.get("name")
            if asked != "explanation":  # answered 200 anyway: the client never learnt its mistake
                named = repr(asked[:100]) if isinstance(asked, str) else "with no string `name`"
                raise InvalidInputError(f"unknown output {named}: this model has one output, 'explanation'")
        params = codecs.explain_parameters(body, parameter_names())
        explanation = await _unless_gone(request, found.explain(rows, params))
        response = codecs.v2_explanation_response(name, explanation.to_dict(), request_id)
        if model_version is not None:
            response["model_version"] = model_version
        if not binary_tensors.wants_binary(body, "explanation"):
            return _json(response)
        [output] = response["outputs"]
        content, headers = binary_tensors.encode(
            response, "outputs", {"explanation": binary_tensors.pack_values("BYTES", output["data"])})
        return Response(content, headers=headers)

    # The explain endpoints are plain routes: FastAPI's per-request parameter resolution is pure
    # overhead for handlers that read the body themselves, and it is on every explanation's path.
    def timed(protocol: str, handler: Endpoint) -> Endpoint:
        seconds = metrics.explain_seconds.labels(protocol)

        async def route(request: Request) -> Response:
            with seconds.time():
                return await handler(request)

        return route

    app.add_route("/v1/models/{name}:explain", timed("v1", v1_explain), methods=["POST"])
    app.add_route("/v2/models/{name}/infer", timed("v2", v2_infer), methods=["POST"])
    app.add_route("/v2/models/{name}/versions/{model_version}/infer", timed("v2", v2_infer), methods=["POST"])

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/events")
    async def on_events(request: Request) -> Response:
        status, headers, body = await events.handle_http(dict(request.headers), await request.body())
        if status >= 400:
            metrics.errors.labels(str(status)).inc()
        return Response(body, status_code=status, headers=headers)

    return app
