"""A black-box client of a KServe V1 or V2 predictor, for the many rows that explainers perturb.

Calls that arrive within `linger` seconds are merged into one request (up to `max_batch_rows`),
and a larger call is split into requests of `max_batch_rows` sent `concurrency` at a time: a
Kernel SHAP explanation of a 100-row batch costs a handful of requests, not thousands. Every
perturbation request carries `x-skip-logging: true`, so the logger sidecar in front of the
predictor keeps it out of the audit log. Timeouts, connection errors, 429 and 502-504 are retried
with backoff; then `PredictorUnavailableError` (a `PredictorError`) says why (the server answers 502).

Over V2 the rows travel as binary tensor data and the outputs are asked for as binary (`binary_data`),
so neither side prints or parses thousands of numbers; a JSON answer is read as well. A predictor
that refuses binary data (400, 415, 422) gets the same rows as JSON, and JSON from then on.

Explainers run in worker threads and call `predict_blocking`. With `linger` 0 (the default) a
worker sends its call itself, over a keep-alive connection of its own, and wakes up to the answer:
no hand-off to the event loop and back around each round trip. With `linger` > 0, and for a call
over `max_batch_rows`, the call goes through the event loop, which merges or splits it. Kernel
SHAP asks for each explained row's output alone before it perturbs the row; `asking_ahead` has the
worker send that request before the explainer starts, so its round trip overlaps the explainer's
set-up instead of following it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import http.client
import itertools
import logging
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import aiohttp.abc
import aiohttp.payload
import numpy as np
import orjson

from explainers import codecs
from explainers.base import named_twice
from explainers.codecs import Schema
from explainers.deadline import Deadline
from explainers.errors import (
    ExplainTimeoutError,
    PredictorError,
    PredictorRefusedError,
    PredictorTimeoutError,
    PredictorUnavailableError,
)
from infer_logger import binary_tensors
from infer_logger.errors import BinaryDataError

log = logging.getLogger(__name__)
SKIP_LOGGING = {"x-skip-logging": "true"}
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
# How servers without the extension refuse a body that is not all JSON (422: FastAPI's validation).
_BINARY_REFUSED = frozenset({400, 415, 422})
_REFUSED = frozenset({400, 422})  # the rows themselves, when in JSON (a binary body may be refused so too)
_JSON = {"content-type": "application/json"}
_WATCH_TICK = 0.1  # seconds between the watchdog's looks: how late past its time an answer is cut off
MAX_ANSWER_BYTES = 64 << 20
"""The most bytes of one predictor answer read (as `max_request_bytes` is of a request): a larger
one is a 502 naming it, not memory taken without end. 10,000 rows of 100 outputs in JSON are ~20 MiB."""


class PredictorClient:
    def __init__(self, url: str, model: str, *, protocol: Literal["v1", "v2"] = "v2", output: str | None = None,
                 timeout: float = 10.0, retries: int = 2, backoff: float = 0.1, max_batch_rows: int = 10_000,
                 concurrency: int = 4, linger: float = 0.0, binary_data: bool = True,
                 max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        self.base = url.rstrip("/")
        self.model, self.protocol, self.output = model, protocol, output
        self.binary_data = binary_data and protocol == "v2"
        """V2: send rows and ask for outputs as binary tensor data (off once the predictor refused it)."""
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.max_batch_rows, self.linger = max_batch_rows, linger
        self.max_answer_bytes = max_answer_bytes
        self.url = (f"{self.base}/v1/models/{model}:predict" if protocol == "v1"
                    else f"{self.base}/v2/models/{model}/infer")
        self.schema: Schema | None = None
        self.requests = 0
        """HTTP requests sent for predictions (for tests and benchmarks)."""
        self._picked = output  # V2: the output explained, asked for alone once known
        self._layout: tuple[tuple[int, ...], bool] | None = None  # the first answer's (shape[1:], numeric)
        self._concurrency = concurrency
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._limit: asyncio.Semaphore | None = None
        self._pending: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = []
        self._pending_rows = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lanes = threading.local()  # each worker thread's own connections, and its rows asked ahead
        self._connections: list[http.client.HTTPConnection] = []
        self._connections_lock = threading.Lock()
        self._watchdog = _Watchdog()

    async def start(self) -> None:
        self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        self._limit = asyncio.Semaphore(self._concurrency)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._concurrency * 2),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            skip_auto_headers=("Accept-Encoding",),
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()
        self._watchdog.stop()

    async def metadata(self) -> dict[str, Any] | None:
        """V2 model metadata (None for V1, which has none, or when the predictor has no answer)."""
        if self.protocol != "v2":
            return None
        try:
            async with self._http().get(f"{self.base}/v2/models/{self.model}") as resp:
                if resp.status != 200:
                    return None
                body = orjson.loads(await self._read(resp, str(resp.url)))
        except (aiohttp.ClientError, OSError, TimeoutError, orjson.JSONDecodeError):
            return None
        return body if isinstance(body, dict) else None

    # -- predictions -----------------------------------------------------------------------------

    async def predict(self, rows: np.ndarray) -> np.ndarray:
        """The predictor's outputs for `rows`: `(n,)` or `(n, outputs)`."""
        n = len(rows)
        if n >= self.max_batch_rows:
            step = self.max_batch_rows
            parts = await asyncio.gather(*(self._call(rows[i:i + step]) for i in range(0, n, step)))
            return np.concatenate(parts)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append((rows, future))
        self._pending_rows += n
        if self._pending_rows >= self.max_batch_rows:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.linger, self._flush)
        return await future

    def predict_blocking(self, rows: np.ndarray) -> np.ndarray:
        """`predict` from a worker thread (the explainers' predict function): sent from this thread
        over its own connection; through the event loop with `linger` > 0 (to be merged) and when
        over `max_batch_rows` (to be split and sent concurrently)."""
        loop = self._loop
        if loop is None:
            raise PredictorError("the predictor client is not started")
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError("predict_blocking called on the event loop's thread: it would deadlock")
        ahead: _Ahead | None = getattr(self._lanes, "ahead", None)
        if ahead is not None and (outputs := ahead.answer(rows)) is not None:
            return outputs
        if self.linger > 0 or len(rows) > self.max_batch_rows:  # merged, or split and sent concurrently
            wait = self.timeout * (self.retries + 1) + self.backoff * 2 ** self.retries + 5
            limit: Deadline | None = getattr(self._lanes, "deadline", None)
            if limit is not None:
                wait = min(wait, limit.left())
            future = asyncio.run_coroutine_threadsafe(self.predict(rows), loop)
            try:
                return future.result(wait)
            except TimeoutError:
                future.cancel()
                if limit is not None:
                    limit.left()  # raises once it has passed
                raise PredictorUnavailableError(f"predictor {self.url}: no answer within {wait:g}s") from None
        return self._call_here(rows)

    @contextmanager
    def deadline(self, deadline: Deadline) -> Iterator[None]:
        """Within the block this thread's predictor calls end by the deadline: a call after it, or
        one it cuts short, raises its `ExplainTimeoutError` (no retry)."""
        self._lanes.deadline = deadline
        try:
            yield
        finally:
            self._lanes.deadline = None

    def _budget(self) -> float:
        """Seconds this thread's next request may take: `timeout`, or what is left of its deadline."""
        limit: Deadline | None = getattr(self._lanes, "deadline", None)
        return self.timeout if limit is None else min(self.timeout, limit.left())

    @contextmanager
    def asking_ahead(self, rows: np.ndarray) -> Iterator[None]:
        """From a worker thread about to explain `rows`: their outputs are asked for now, over a
        connection of this thread's, and within the block `predict_blocking` of one of them alone
        (from this thread) is answered from that request instead of asking again.

        Kernel SHAP asks for each row alone before perturbing it: that round trip then overlaps its
        set-up. Non-numeric rows, and batches over `max_batch_rows`, are not asked ahead; if the
        request fails, the call is made as usual (which retries, and says why).
        """
        index: dict[bytes, int] = {}
        for i in range(len(rows)):
            if (key := _row_key(rows[i:i + 1])) is not None:
                index.setdefault(key, i)
        if not index or len(rows) > self.max_batch_rows or getattr(self._lanes, "ahead", None) is not None:
            yield
            return
        ahead = self._lanes.ahead = _Ahead(self, rows, index)
        try:
            yield
        finally:
            self._lanes.ahead = None
            ahead.close()

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        group, self._pending, self._pending_rows = self._pending, [], 0
        if group:
            task = asyncio.get_running_loop().create_task(self._send_group(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send_group(self, group: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]) -> None:
        try:
            rows = group[0][0] if len(group) == 1 else np.concatenate([r for r, _ in group])
            outputs = await self._call(rows)
        except Exception as exc:  # noqa: BLE001 - every caller of the group gets the failure
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for part, future in group:
            if not future.done():
                future.set_result(outputs[start:start + len(part)])
            start += len(part)

    async def _call(self, rows: np.ndarray) -> np.ndarray:
        if not self.binary_data:
            return await self._send(*self._encode(rows, binary=False), len(rows))
        try:
            return await self._send(*self._encode(rows, binary=True), len(rows))
        except PredictorError as exc:
            if exc.status not in _BINARY_REFUSED:
                raise
            refusal = exc
        # Only a JSON success proves the refusal was about the binary data, not about the rows.
        outputs = await self._send(*self._encode(rows, binary=False), len(rows))
        self._binary_refused(refusal)
        return outputs

    def _call_here(self, rows: np.ndarray) -> np.ndarray:
        """`_call` from a worker thread, over its own connection."""
        if not self.binary_data:
            return self._send_here(*self._encode(rows, binary=False), len(rows))
        try:
            return self._send_here(*self._encode(rows, binary=True), len(rows))
        except PredictorError as exc:
            if exc.status not in _BINARY_REFUSED:
                raise
            refusal = exc
        outputs = self._send_here(*self._encode(rows, binary=False), len(rows))
        self._binary_refused(refusal)
        return outputs

    def _binary_refused(self, refusal: PredictorError) -> None:
        if self.binary_data:
            self.binary_data = False
            log.warning("%s; it takes JSON, so perturbations go as JSON from now on (slower)", refusal)

    def _encode(self, rows: np.ndarray, *, binary: bool) -> tuple[Sequence[bytes | memoryview], dict[str, str]]:
        if self.protocol == "v1":
            return [codecs.encode_v1(rows)], _JSON
        if binary:
            return codecs.encode_v2_binary_parts(rows, self._schema(), self._picked)
        return [codecs.encode_v2(rows, self._schema(), self._picked)], _JSON

    async def _send(self, parts: Sequence[bytes | memoryview], content_headers: Mapping[str, str],
                    n: int) -> np.ndarray:
        headers = {**content_headers, **SKIP_LOGGING}
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(min(self.backoff * 2 ** (attempt - 1), 5.0))
            try:
                assert self._limit is not None
                async with self._limit:
                    self.requests += 1
                    body = parts[0] if len(parts) == 1 else _Parts(parts, headers["content-type"])
                    async with self._http().post(self.url, data=body, headers=headers) as resp:
                        status, payload = resp.status, await self._read(resp, self.url)
                        header_length = resp.headers.get(binary_tensors.HEADER)
            except TimeoutError:
                reason = f"no answer within {self.timeout:g}s"
                continue
            except (aiohttp.ClientError, OSError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
                continue
            outcome = self._outcome(status, payload, header_length, n)
            if isinstance(outcome, str):
                reason = outcome
                continue
            return outcome
        raise PredictorUnavailableError(f"predictor {self.url} failed after {self.retries + 1} attempts: {reason}")

    def _send_here(self, parts: Sequence[bytes | memoryview], content_headers: Mapping[str, str],
                   n: int) -> np.ndarray:
        """`_send` from a worker thread: the same retries, over this thread's connection."""
        headers = {**content_headers, **SKIP_LOGGING}
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 5.0))
            budget = self._budget()  # past the deadline: ExplainTimeoutError
            try:
                self.requests += 1
                status, payload, header_length = self._exchange(parts, headers, budget=budget)
            except TimeoutError:
                self._budget()  # past the deadline: that, not the predictor's own time, ends the call
                reason = f"no answer within {budget:g}s"
                continue
            except (http.client.HTTPException, OSError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
                continue
            outcome = self._outcome(status, payload, header_length, n)
            if isinstance(outcome, str):
                reason = outcome
                continue
            return outcome
        self._budget()
        raise PredictorUnavailableError(f"predictor {self.url} failed after {self.retries + 1} attempts: {reason}")

    def _outcome(self, status: int, payload: bytes, header_length: str | None, n: int) -> np.ndarray | str:
        """The outputs in an answer, or why to ask again; PredictorError for a refusal."""
        if status in _RETRY_STATUSES:
            return f"answered {status}: {_short(payload)}"
        if status >= 400:
            error = PredictorRefusedError if status in _REFUSED else PredictorError
            raise error(f"predictor {self.url} answered {status}: {_short(payload)}", status=status)
        return self._decode(payload, header_length, n)

    def _exchange(self, parts: Sequence[bytes | memoryview], headers: Mapping[str, str], slot: str = "main",
                  *, sent: bool = False, budget: float) -> tuple[int, bytes, str | None]:
        """One POST over this thread's connection in `slot` (`sent`: the request already went on it),
        answered within `budget` seconds; a kept-alive connection the predictor has closed since is
        replaced, and the request sent again, without counting as an attempt."""
        connection, reused = self._connection(slot)
        path = urlsplit(self.url).path
        end = time.monotonic() + budget
        try:
            if not sent:
                _request(connection, path, parts, headers, budget)
            return self._response(connection, end)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            self._drop(slot)
            if not reused:
                raise
        except BaseException:
            self._drop(slot)
            raise
        connection, _ = self._connection(slot)
        try:
            _request(connection, path, parts, headers, max(end - time.monotonic(), 0.001))
            return self._response(connection, end)
        except BaseException:
            self._drop(slot)
            raise

    def _response(self, connection: http.client.HTTPConnection, end: float) -> tuple[int, bytes, str | None]:
        """The answer, read by `end` (`time.monotonic()`). A socket's timeout bounds each read only,
        so a predictor sending a byte now and then (its head, body, chunk sizes or trailers) would
        never time out: the watchdog shuts the socket down at `end` instead."""
        sock = connection.sock  # the connection lets go of it when the answer says `Connection: close`
        if sock is None:
            raise http.client.NotConnected("no connection to read the answer from")
        watch = self._watchdog.watch(sock, end)
        try:
            response = connection.getresponse()
            answer = response.status, self._read_here(response), response.getheader(binary_tensors.HEADER)
        except (http.client.HTTPException, OSError) as exc:
            if self._watchdog.unwatch(watch) or time.monotonic() >= end:
                raise TimeoutError("the answer took too long") from exc
            raise
        except PredictorError:  # too large: the caller drops the connection, with the rest unread
            self._watchdog.unwatch(watch)
            raise
        if self._watchdog.unwatch(watch):  # cut off: an end of stream may have passed for the answer's end
            raise TimeoutError("the answer took too long")
        return answer

    def _connection(self, slot: str) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection in `slot` to the predictor `url` names, and whether it was used before."""
        url = urlsplit(self.url)
        kind: type[http.client.HTTPConnection] = _HTTPSConnection if url.scheme == "https" else _HTTPConnection
        connection: http.client.HTTPConnection | None = getattr(self._lanes, f"{slot}_connection", None)
        host, port = url.hostname or "127.0.0.1", url.port or (443 if url.scheme == "https" else 80)
        if connection is not None and type(connection) is kind and (connection.host, connection.port) == (host, port):
            return connection, True
        if connection is not None:
            self._drop(slot)
        connection = kind(host, port, timeout=self.timeout)
        setattr(self._lanes, f"{slot}_connection", connection)
        with self._connections_lock:
            self._connections.append(connection)
        return connection, False

    def _drop(self, slot: str) -> None:
        connection: http.client.HTTPConnection | None = getattr(self._lanes, f"{slot}_connection", None)
        if connection is None:
            return
        connection.close()
        setattr(self._lanes, f"{slot}_connection", None)
        with self._connections_lock:
            if connection in self._connections:
                self._connections.remove(connection)

    def _decode(self, payload: bytes, header_length: str | None, n: int) -> np.ndarray:
        if self.protocol == "v2":
            try:
                body, raw = binary_tensors.decode(payload, header_length, "outputs")
            except BinaryDataError as exc:
                raise PredictorError(f"predictor {self.url} answered an unreadable body: {exc}") from None
            outputs = codecs.decode_v2_output(body, n, self._picked, raw)
            if self._picked is None:
                self._picked = str(codecs.pick_output(body["outputs"], None).get("name"))
            return self._checked(outputs)
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise PredictorError(f"predictor {self.url} answered with no JSON: {_short(payload)}") from None
        return self._checked(codecs.decode_v1_output(body, n))

    def _checked(self, outputs: np.ndarray) -> np.ndarray:
        """`outputs` if laid out as the first answer's (per row: shape, numbers or labels). Else the
        explainer fails deep inside the library (a 500 with a traceback), so it is the predictor's
        error: 502 naming both layouts."""
        layout = (outputs.shape[1:], outputs.dtype != object)
        if self._layout is None:
            self._layout = layout
        elif layout != self._layout:
            def show(shape: tuple[int, ...], numeric: bool) -> str:
                return f"{list(shape)} {'numbers' if numeric else 'labels'} per row"

            raise PredictorError(f"predictor {self.url} answered {show(*layout)}, "
                                 f"but {show(*self._layout)} before")
        return outputs

    # -- pass-through ----------------------------------------------------------------------------

    async def forward(self, path: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, str, bytes]:
        """A client's own request (e.g. `:predict`), passed on once, as is: it is logged as usual,
        and the predictor's answer, a failure too, is the client's. No answer within `timeout` is
        `PredictorTimeoutError` (a 504), one that cannot be had a `PredictorError` (a 502)."""
        try:
            async with self._http().post(self.base + path, data=body, headers=dict(headers)) as resp:
                content_type = resp.headers.get("content-type", "application/json")
                return resp.status, content_type, await self._read(resp, self.base + path)
        except TimeoutError:
            raise PredictorTimeoutError(f"predictor {self.base}{path}: no answer within {self.timeout:g}s "
                                        "(timeout)") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise PredictorError(f"predictor {self.base}{path}: {type(exc).__name__}: {exc}") from None

    async def _read(self, resp: aiohttp.ClientResponse, url: str) -> bytes:
        """An answer's body, up to `max_answer_bytes` (else PredictorError naming the limit)."""
        limit = self.max_answer_bytes
        # A compressed answer's length is not its body's: aiohttp inflates it (16x the cap read).
        encoded = resp.headers.get("content-encoding", "identity").lower() != "identity"
        if resp.content_length is not None and resp.content_length <= limit and not encoded:
            return await resp.read()
        if resp.content_length is None or encoded:  # chunked, to the end of the connection, or inflated
            body = bytearray()
            async for chunk in resp.content.iter_any():
                body += chunk
                if len(body) > limit:
                    break
            else:
                return bytes(body)
        resp.close()  # the rest unread: the connection cannot carry another request
        raise self._too_large(url)

    def _read_here(self, response: http.client.HTTPResponse) -> bytes:
        """`_read` from a worker thread; the caller drops the connection on an error."""
        limit = self.max_answer_bytes
        if response.length is not None and response.length > limit:
            raise self._too_large(self.url)
        body = response.read(limit + 1)
        if len(body) > limit:
            raise self._too_large(self.url)
        # Empty: it reads what follows a chunked body's last bytes, so the connection can go on.
        return body + response.read()

    def _too_large(self, url: str) -> PredictorError:
        return PredictorError(f"predictor {url} answered more than {self.max_answer_bytes} bytes "
                              "(the explainer's limit of a predictor answer)")

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise PredictorError("the predictor client is not started")
        return self._session

    def _schema(self) -> Schema:
        if self.schema is None:
            raise PredictorError("the predictor client has no input schema yet")
        return self.schema


class _Parts(aiohttp.payload.Payload):
    """A body written as its parts, one write each: the rows' buffer goes to the socket as it is,
    instead of being copied into a joined body (and once more, with the headers, by aiohttp)."""

    def __init__(self, parts: Sequence[bytes | memoryview], content_type: str) -> None:
        super().__init__(parts, content_type=content_type)
        self._parts = parts
        self._size = sum(memoryview(part).nbytes for part in parts)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return b"".join(self._parts).decode(encoding, errors)

    async def write(self, writer: aiohttp.abc.AbstractStreamWriter) -> None:
        for part in self._parts:
            await writer.write(part)


class _FinalResponse(http.client.HTTPResponse):
    """An answer past any interim (1xx) ones. http.client skips 100 Continue only: a 103 Early Hints
    was taken for the answer, and the real one, left on the kept-alive connection, for the next
    request's. Read from the same buffered file, which may hold the real one already."""

    def _read_status(self) -> tuple[str, int, str]:
        while True:
            version, status, reason = super()._read_status()  # type: ignore[misc]  # private: not in typeshed
            # 100: `begin` skips it; 101 (switching protocols) ends HTTP on the connection
            if not 102 <= status < 200:
                return version, status, reason
            http.client.parse_headers(self.fp)  # the interim answer's headers; it has no body


class _HTTPConnection(http.client.HTTPConnection):
    """http.client's connection without Nagle's algorithm (as aiohttp and uvicorn do): the end of a
    request body is not held back waiting for an acknowledgement."""

    response_class = _FinalResponse

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _HTTPSConnection(http.client.HTTPSConnection):
    response_class = _FinalResponse

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Ahead:
    """Rows one worker thread asked for ahead: sent at once over its `ahead` connection, the answer
    read when one of them is first asked for alone."""

    def __init__(self, client: PredictorClient, rows: np.ndarray, index: dict[bytes, int]) -> None:
        self.client, self.n, self.index = client, len(rows), index
        self.outputs: np.ndarray | None = None
        self.pending = False
        try:
            parts, content_headers = client._encode(rows, binary=client.binary_data)
            self.headers = {**content_headers, **SKIP_LOGGING}
            self.parts = parts
            connection, _ = client._connection("ahead")
            client.requests += 1
            _request(connection, urlsplit(client.url).path, parts, self.headers, client._budget())
            self.pending = True
        except (http.client.HTTPException, OSError, PredictorError):
            client._drop("ahead")

    def answer(self, rows: np.ndarray) -> np.ndarray | None:
        """The outputs of `rows` if it is one of these rows alone (None: ask as usual)."""
        key = _row_key(rows)
        if key is None or key not in self.index:
            return None
        if self.pending:
            self.pending = False
            try:
                budget = self.client._budget()
            except ExplainTimeoutError:
                self.client._drop("ahead")  # its answer unread: the connection cannot take another request
                raise
            try:
                status, payload, header_length = self.client._exchange(self.parts, self.headers, "ahead", sent=True,
                                                                       budget=budget)
                if status == 200:
                    self.outputs = self.client._decode(payload, header_length, self.n)
            except (http.client.HTTPException, OSError, PredictorError):
                pass  # asked as usual, which retries and says why
        if self.outputs is None:
            return None
        i = self.index[key]
        return self.outputs[i:i + 1]

    def close(self) -> None:
        if self.pending:  # an answer nobody asked for: not worth waiting for
            self.client._drop("ahead")


class _Watchdog:
    """One thread per client that shuts down the sockets whose answers are late (checked every
    `_WATCH_TICK` s): the worker's blocked read then returns, and `_response` says it timed out.
    Watching costs a worker a lock and a heap push per request, and no wake-up of another thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._heap: list[tuple[float, int, list[Any]]] = []  # (end, order, entry)
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def watch(self, sock: socket.socket, end: float) -> list[Any]:
        entry: list[Any] = [sock, False]  # the socket (None once unwatched), whether it was cut off
        with self._lock:
            heapq.heappush(self._heap, (end, next(self._order), entry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="predictor-watchdog", daemon=True)
                self._thread.start()
        return entry

    def unwatch(self, entry: list[Any]) -> bool:
        """Stop watching; whether the socket was cut off meanwhile."""
        with self._lock:
            entry[0] = None
            return bool(entry[1])

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(_WATCH_TICK):
            now = time.monotonic()
            with self._lock:
                while self._heap and (self._heap[0][0] <= now or self._heap[0][2][0] is None):
                    _, _, entry = heapq.heappop(self._heap)
                    sock, entry[0] = entry[0], None
                    if sock is not None:
                        entry[1] = True
                        with contextlib.suppress(OSError):
                            # The plain socket's shutdown, also under TLS: SSLSocket's own would drop
                            # the TLS state the blocked read is still using.
                            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _request(connection: http.client.HTTPConnection, path: str, parts: Sequence[bytes | memoryview],
             headers: Mapping[str, str], budget: float) -> None:
    connection.timeout = budget  # a connection made now: its connect
    if connection.sock is not None:
        connection.sock.settimeout(budget)
    connection.putrequest("POST", path, skip_accept_encoding=True)
    for name, value in headers.items():
        connection.putheader(name, value)
    connection.putheader("content-length", str(sum(memoryview(part).nbytes for part in parts)))
    connection.endheaders(parts[0])  # the headers and the first part in one packet
    for part in parts[1:]:
        connection.send(part)


def _row_key(rows: np.ndarray) -> bytes | None:
    """One numeric row as bytes, to know it again when an explainer asks for it alone."""
    if rows.ndim != 2 or len(rows) != 1 or rows.dtype.kind not in "biuf":
        return None
    return np.ascontiguousarray(rows, dtype=np.float64).tobytes()


def _short(payload: bytes, limit: int = 300) -> str:
    text = payload.decode("utf-8", "replace").strip()
    return text if len(text) <= limit else text[:limit] + "…"


def schema_from_metadata(metadata: Mapping[str, Any] | None, fallback: Schema) -> Schema:
    """The V2 input layout from model metadata: one `[-1, w]` tensor, or one tensor per feature.

    Feature names come from `parameters.feature_names` when the predictor gives them, else from
    `fallback` (configuration or background data), which also supplies the width when unknown.
    """
    inputs = (metadata or {}).get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, Mapping) for t in inputs):
        return fallback  # none, or not tensor metadata: the configured layout (an AttributeError before)
    params = (metadata or {}).get("parameters") or {}
    given = params.get("feature_names") if isinstance(params, Mapping) else None
    if len(inputs) == 1:
        shape = inputs[0].get("shape")
        shape = shape if isinstance(shape, list) else []
        width = shape[-1] if len(shape) >= 2 and isinstance(shape[-1], int) and shape[-1] > 0 else fallback.width
        names = given if isinstance(given, list) and len(given) == width else list(fallback.feature_names)
        if len(names) != width:
            names = [f"x{i}" for i in range(width)]
        names = _once_each(list(map(str, names)), "parameters.feature_names")
        return Schema(tuple(names), fallback.categorical, str(inputs[0].get("name", "input-0")),
                      str(inputs[0].get("datatype") or fallback.datatype))
    columns = tuple(_once_each([str(t.get("name")) for t in inputs], "inputs"))
    strings = frozenset(str(t.get("name")) for t in inputs if t.get("datatype") == "BYTES")
    datatypes = tuple(str(t.get("datatype") or "FP64") for t in inputs)
    shapes = tuple(_one_value_each(t.get("shape")) for t in inputs)
    return Schema(columns, strings | (fallback.categorical & set(columns)), None, fallback.datatype, datatypes,
                  shapes)


def _one_value_each(shape: Any) -> tuple[int, ...]:
    """A per-feature tensor's sizes after the first (the rows), as sent: `[-1, 1]` takes `[n, 1]`.
    Any size other than 1 (or -1, variable) is not one value per row: `[n]`, as for no shape."""
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        return ()
    rest = shape[1:]
    return tuple(1 for _ in rest) if all(d in (1, -1) for d in rest) else ()


def _once_each(names: list[str], where: str) -> list[str]:
    if twice := named_twice(names):
        raise PredictorError(f"the predictor's metadata names feature(s) {twice} more than once ({where})")
    return names
