"""The explainer's core, free of any transport: the HTTP app, the event subscriber and the benchmark
all call it.

    service = ExplainerService(settings)
    service.prepare()                    # read the files: a bad artifact fails here, naming it
    await service.start()                # predictor metadata, fit (or restore), warm-up
    explanation = await service.explain(service.decode(body), params)

Explain work runs on `settings.workers` threads, a batch split in chunks of `chunk_size`: the
event loop stays free to serve, and to carry the black-box predictor calls the workers make.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from pydantic import BaseModel

from explainers import codecs
from explainers.artifacts import Artifact, check_target, load_artifact, restore, save_artifact
from explainers.base import BaseExplainer, Explanation, Model, PredictFn, named_twice
from explainers.client import PredictorClient, schema_from_metadata
from explainers.codecs import Schema
from explainers.config import ExplainerSettings
from explainers.data import Table, load_model_file, load_table, local_model
from explainers.deadline import Deadline
from explainers.errors import (
    ArtifactError,
    ExplainerError,
    ExplainTimeoutError,
    InvalidInputError,
    InvalidParametersError,
    NotReadyError,
    SettingsError,
    UnsupportedModelError,
)
from explainers.registry import METHODS, UnknownMethodError, create, explainer_class

log = logging.getLogger(__name__)


@functools.cache
def parameter_names() -> frozenset[str]:
    """Every explain method's per-request parameters: over V2 these are read directly under
    `parameters` too (`codecs.explain_parameters`), and another method's is refused naming this one's."""
    return frozenset(name for method in METHODS for name in explainer_class(method).Params.model_fields)


class ExplainerService:
    def __init__(self, settings: ExplainerSettings) -> None:
        self.settings = settings
        self.name = settings.model_name
        self.client: PredictorClient | None = None
        self.model: Model | None = None
        self.explainer: BaseExplainer | None = None
        self.schema: Schema | None = None
        self.ready = False
        self.warmup_seconds: float | None = None
        self._executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="explain")
        self._artifact: Artifact | None = None
        self._estimator: Any = None
        self._table: Table | None = None
        self._background: np.ndarray | None = None  # the table's rows in the schema's column order
        self._prepared = False
        self._lanes = threading.local()  # each worker thread's deadline, for a local model's calls

    # -- lifecycle -------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Read the artifact, model file and background data; errors name the file and the cause."""
        if self._prepared:
            return
        s = self.settings
        if s.save_artifact is not None:
            check_target(s.save_artifact)  # not after the whole fit
        if s.artifact is not None:
            self._artifact = load_artifact(s.artifact)
        if s.model_file is not None:
            self._estimator = load_model_file(s.model_file)
        if self._artifact is None and s.background is not None:
            self._table = load_table(s.background)
        self._check_method()
        self._check_features()
        self._prepared = True

    def _check_method(self) -> None:
        """The method's options and default parameters, checked before any fitting: the defaults
        within `max_samples` too, or every request would be refused. An artifact's own are checked
        first (a bad one is the artifact's fault), then the configured `params` over them."""
        a, s = self._artifact, self.settings
        method, options = (a.method, a.options) if a else (s.method, s.options)
        if a is not None:
            try:
                create(a.method, a.options, a.params)
            except (InvalidParametersError, UnknownMethodError) as exc:
                raise ArtifactError(s.artifact, str(exc)) from None
        try:
            explainer = create(method, options, {**(a.params if a else {}), **s.params})
        except (InvalidParametersError, UnknownMethodError) as exc:  # bad settings: exit 2
            field = "options" if str(exc).startswith(f"{method} options") else "params"
            raise SettingsError(field, f"the configured {exc}") from None
        try:
            explainer.params(None, max_samples=s.max_samples)
        except InvalidParametersError as exc:  # a settings problem (exit 2): every request would be refused
            raise SettingsError("params", f"the configured {exc}") from None

    def _check_features(self) -> None:
        """The configured names against the data's and the model's, before any fitting."""
        s, table = self.settings, self._table
        if twice := named_twice(s.feature_names):
            raise SettingsError("feature_names", f"feature_names: {twice} named more than once")
        if s.feature_names and table is not None and len(s.feature_names) != table.rows.shape[1]:
            raise SettingsError("feature_names", f"feature_names: {len(s.feature_names)} names for the "
                                                 f"{table.rows.shape[1]} columns of {s.background}")
        if s.predictor_url is None:  # else the predictor's metadata may name the features
            schema = self._fallback_schema()
            self._check_schema(schema)
            self._model(schema)  # the model file's features against the data's

    def _check_schema(self, schema: Schema) -> None:
        s, table = self.settings, self._table
        unknown = sorted(set(s.categorical) - set(schema.feature_names))
        if unknown:
            raise SettingsError("categorical", f"categorical: {', '.join(map(repr, unknown))} name no feature "
                                               f"(features: {', '.join(schema.feature_names)})")
        if table is not None and table.rows.shape[1] != schema.width:
            raise ArtifactError(s.background, f"{table.rows.shape[1]} columns, the model takes {schema.width}: "
                                              f"{', '.join(schema.feature_names)}")

    def _background_rows(self, schema: Schema) -> np.ndarray | None:
        """The background's rows in the schema's column order, matched by name: the predictor's
        metadata may list its features in another order than the file, and rows taken by position
        give each feature another's values (as `match_columns` does for a model file). A table with
        no names of its own (an array's x0, x1, ...) is taken by position."""
        s, table = self.settings, self._table
        if table is None:
            return None
        names = list(s.feature_names or (() if table.unnamed else table.feature_names))  # configured: by position
        wanted = list(schema.feature_names)
        if not names or names == wanted:
            return table.rows
        if sorted(names) != sorted(wanted):
            raise SettingsError("background", f"background: the columns of {s.background} ({', '.join(names)}) "
                                              f"are not the model's features ({', '.join(wanted)}): name them "
                                              "alike, or name the file's columns with feature_names")
        return table.rows[:, [names.index(name) for name in wanted]]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.prepare)
        fallback = self._fallback_schema()
        s = self.settings
        try:
            if s.predictor_url is not None:
                self.client = PredictorClient(
                    s.predictor_url, s.predictor_model or s.model_name, protocol=s.protocol, output=s.output,
                    timeout=s.timeout, retries=s.retries, max_batch_rows=s.max_batch_rows,
                    concurrency=s.predictor_concurrency, linger=s.linger, binary_data=s.binary_data)
                await self.client.start()
                self.client.schema = schema_from_metadata(await self.client.metadata(), fallback)
                fallback = self.client.schema
            self._check_schema(fallback)
            self._background = self._background_rows(fallback)
            self.schema = Schema(fallback.feature_names, fallback.categorical)
            self.model = self._model(self.schema)
            self.explainer = await loop.run_in_executor(self._executor, self._explainer, self.model)
            if s.warmup:
                await self._warm_up()
            if s.save_artifact is not None:  # only an explainer that works
                await loop.run_in_executor(self._executor, save_artifact, s.save_artifact, self.explainer)
        except BaseException:
            # A failed start may be tried again (the subscriber does, on each delivery): the
            # client of this attempt, its watchdog thread too, must not outlive it.
            if self.client is not None:
                client, self.client = self.client, None
                await client.aclose()
            raise
        self.ready = True
        log.info("explainer %s ready: %s over %d features", self.name, self.explainer.method, self.schema.width)

    async def aclose(self) -> None:
        self.ready = False
        if self.client is not None:
            await self.client.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _fallback_schema(self) -> Schema:
        s, artifact, table = self.settings, self._artifact, self._table
        names = s.feature_names or (artifact.feature_names if artifact else None) or (
            table.feature_names if table and not table.unnamed else None)
        if not names and self._estimator is not None and hasattr(self._estimator, "feature_names_in_"):
            names = [str(n) for n in self._estimator.feature_names_in_]  # before an array's x0, x1, ...
        if not names and table is not None:
            names = table.feature_names
        if not names:
            raise ExplainerError("no feature names: give feature_names, background data or an artifact")
        categorical = s.categorical or (list(artifact.categorical) if artifact else None) or (
            list(table.categorical) if table else [])
        return Schema(tuple(names), frozenset(categorical))

    def _model(self, schema: Schema) -> Model:
        s = self.settings
        outputs = s.output_names or (self._artifact.output_names if self._artifact else None)
        if self._estimator is not None:
            try:
                model = local_model(self._estimator, list(schema.feature_names), tuple(sorted(schema.categorical)))
            except UnsupportedModelError as exc:
                if self._artifact is not None:  # the features are the artifact's
                    raise ArtifactError(s.artifact, f"does not fit the model file {s.model_file}: {exc}") from None
                raise ArtifactError(s.model_file, str(exc)) from None
            return dataclasses.replace(model, predict=self._within_deadline(model.predict),
                                       output_names=list(outputs) if outputs else model.output_names)
        assert self.client is not None
        if outputs is None and self._table is not None and self._table.target_names:
            outputs = self._table.target_names
        return Model(self.client.predict_blocking, list(schema.feature_names), list(outputs) if outputs else None,
                     None, tuple(sorted(schema.categorical)), s.task)

    def _explainer(self, model: Model) -> BaseExplainer:
        s = self.settings
        if self._artifact is not None:
            assert s.artifact is not None
            return restore(self._artifact, s.artifact, model, s.params)
        assert self._background is not None
        explainer = create(s.method, s.options, s.params)
        explainer.fit(model, self._background)
        return explainer

    async def _warm_up(self) -> None:
        """One explanation per worker thread: builds each thread's engine and compiles numba code."""
        assert self.explainer is not None
        row = self._warmup_rows()
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._executor, self.explainer.explain, row, None)
                               for _ in range(self.settings.workers)))
        self.warmup_seconds = time.perf_counter() - started

    def _warmup_rows(self) -> np.ndarray:
        if self._background is not None:
            return self._background[:1]
        state = self.explainer.state() if self.explainer else {}
        rows = state.get("example")
        if isinstance(rows, np.ndarray) and len(rows):
            return rows[:1]
        raise NotReadyError("no row to warm up with")

    # -- work ------------------------------------------------------------------------------------

    def decode(self, body: Any) -> np.ndarray:
        """The instances of a V1 or V2 request body (InvalidInputError names the expected shape)."""
        if self.schema is None:
            raise NotReadyError(f"explainer {self.name} is not ready")
        return codecs.decode_instances(body, self.schema, self.settings.max_instances)

    @property
    def max_values(self) -> int | None:
        """The most values one input tensor of a request within `max_instances` can hold (all of
        them in one `[n, width]` tensor): a binary one over it is refused before it is unpacked."""
        return None if self.schema is None else self.settings.max_instances * self.schema.width

    async def explain(self, rows: np.ndarray, params: Mapping[str, Any] | None = None) -> Explanation:
        """Every instance explained; the batch runs in chunks on the worker threads."""
        if not self.ready or self.explainer is None:
            raise NotReadyError(f"explainer {self.name} is not ready")
        s = self.settings
        chosen = self.explainer.params(params, max_samples=s.max_samples)  # bad parameters fail before any work
        loop = asyncio.get_running_loop()
        late = (f"explaining {len(rows)} instance(s) took over {s.explain_timeout:g}s (explain_timeout): "
                "ask for fewer instances or samples, or add workers")
        deadline = Deadline(time.monotonic() + s.explain_timeout, late)
        size = s.chunk_size
        chunks = [loop.run_in_executor(self._executor, self._explain_chunk, rows[i:i + size], chosen, deadline)
                  for i in range(0, len(rows), size)]
        timeout = asyncio.timeout(s.explain_timeout)
        try:
            async with timeout:
                parts = await asyncio.gather(*chunks)
        except TimeoutError:
            if timeout.expired():
                raise ExplainTimeoutError(late) from None
            raise
        finally:
            # Answered (or failed, timed out, cancelled): the chunks still queued are dropped, and
            # those running stop at their next model call (gather leaves them running on an error;
            # the timeout's error: the predictor client drops a connection it cuts short then).
            deadline.end("the request of this explanation has ended: its work is given up")
            for chunk in chunks:
                chunk.cancel()
        return Explanation.concat(parts)

    def _explain_chunk(self, rows: np.ndarray, params: BaseModel, deadline: Deadline) -> Explanation:
        """On a worker thread, stopped at `deadline` by its next call of the model (the predictor
        client's, or the local model's); a black-box method that asks for each row alone first
        gets them asked ahead. A white-box method that never calls the model runs to its end."""
        assert self.explainer is not None
        deadline.left()  # queued behind other work until too late: raises
        if self.client is None or self._estimator is not None:
            self._lanes.deadline = deadline
            try:
                return self.explainer.explain(rows, params)
            finally:
                self._lanes.deadline = None
        with self.client.deadline(deadline):
            if not self.explainer.asks_rows_alone:
                return self.explainer.explain(rows, params)
            with self.client.asking_ahead(rows):
                return self.explainer.explain(rows, params)

    def _within_deadline(self, predict: PredictFn) -> PredictFn:
        """A local model's predict that stops its worker's explanation past the deadline."""
        def checked(rows: np.ndarray) -> np.ndarray:
            deadline: Deadline | None = getattr(self._lanes, "deadline", None)
            if deadline is not None:
                deadline.left()
            try:
                return predict(rows)
            except ExplainerError:
                raise
            except (ValueError, TypeError) as exc:
                if not self.ready:  # at start (warm-up): the model's own failure, as it was
                    raise
                # Rows the model cannot take (a category its encoder never saw): the black box's
                # PredictorRefusedError, a 400, not a 500.
                raise InvalidInputError(f"the model cannot take these rows: {exc}") from exc

        return checked

    async def predict(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, str, bytes]:
        """A V1 `:predict` call: to the predictor as is, or answered by the local model (white box).

        It goes to the predictor's V1 `:predict` whatever `protocol` the explainer's own calls use:
        KServe's model servers answer V1 beside V2 (the default setup), and mapping V1 instances to
        V2 tensors would not be the client's request passed on. A V2-only predictor (Triton,
        MLServer) answers it with its own 404, passed on as its every answer is."""
        if self.client is not None:
            return await self.client.forward(f"/v1/models/{self.client.model}:predict", body, headers)
        import orjson

        if self.model is None:
            raise NotReadyError(f"explainer {self.name} is not ready")
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:  # a ValueError, not ours: it was a 500
            raise InvalidInputError(f"the body is not JSON: {exc}") from None
        rows = self.decode(doc)
        outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self.model.predict, rows)
        return 200, "application/json", orjson.dumps({"predictions": np.asarray(outputs).tolist()})
