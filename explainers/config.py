"""Settings of the explainer, read once: flags > `INFER_LOGGER_EXPLAINER_*` env vars > YAML > defaults.

    # explainer.yaml (or the `explainer:` section of a larger file)
    model_name: iris
    method: kernel                       # see explainers.registry.METHODS
    predictor_url: http://127.0.0.1:8080 # black box (V1 or V2); or model_file: for white box
    protocol: v2
    binary_data: true                    # V2 rows as binary tensor data (JSON if the predictor refuses)
    background: dataset:iris             # or a .csv/.parquet/.npy/.joblib table
    options: {background_size: 30}       # fit-time options of the method
    params: {nsamples: 100}              # default per-request parameters
    subscriber: {sample: 0.1, batch_size: 64}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from explainers.registry import METHODS, WHITE_BOX
from infer_logger.cloudevents.validation import source_setting
from infer_logger.config import LayeredSettings, http_url
from infer_logger.errors import ConfigError
from infer_logger.fields import NamedPath, Seconds


class SubscriberSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cache_size: int = Field(10_000, ge=1)
    """Request events kept while their response is awaited (and responses awaiting their request)."""
    cache_bytes: ByteSize = Field(ByteSize(256 << 20), ge=1 << 20)
    """Bytes (data and attributes) those events may hold; past it (or `cache_size`) the oldest go
    first. The explanations kept for redeliveries are held to it too, apart. A count alone let
    10,000 requests of the sidecar's 900 KiB cap hold ~8.6 GiB."""
    max_explanation_bytes: ByteSize = Field(ByteSize(1_000_000), ge=16 << 10)
    """Largest explanation event data: past it only the top-k attributions (by absolute value) of
    each output are kept, the largest k that fits (`params.top_k`); an exchange that does not fit
    even with k = 1 is refused (400). Below the broker's `max_event_bytes` (1 MiB), with room for
    attributes: a larger reply is refused by the broker, and the explanation lost."""
    cache_ttl: Seconds = Field(300.0, gt=0)
    """Seconds a cached event is kept; a response later than that is not explained."""
    sample: float = Field(1.0, ge=0, le=1)
    """Share of exchanges explained, chosen by id (so the request and response agree)."""
    batch_size: int = Field(64, ge=1)
    """Instances of several events explained together, to amortize the predictor calls."""
    linger: Seconds = Field(0.05, ge=0)
    """Seconds an event waits for others to fill a batch."""
    source: str = Field("infer-logger-explainer", min_length=1)
    """The `source` of explanation events (a URI reference)."""

    @field_validator("source")
    @classmethod
    def _source(cls, source: str) -> str:
        # Every explanation event carries it: "" or a tab made each one no CloudEvent, refused downstream.
        return source_setting(source, "infer-logger-explainer or http://explainer/") or source


class ExplainerSettings(LayeredSettings):
    model_config = SettingsConfigDict(
        env_prefix="INFER_LOGGER_EXPLAINER_", env_nested_delimiter="__", extra="forbid", populate_by_name=True
    )

    host: str = Field("127.0.0.1", min_length=1)  # "" is every address to uvicorn
    port: int = Field(9083, ge=0, le=65535)
    model_name: str = "model"
    """The name this server answers to (`/v1/models/<name>:explain`)."""
    method: str = "kernel"
    predictor_url: str | None = None
    """Black-box mode: the predictor's base URL (KServe V1 or V2)."""
    predictor_model: str | None = None
    """The model's name at the predictor; defaults to `model_name`."""
    protocol: Literal["v1", "v2"] = "v2"
    binary_data: bool = True
    """V2: perturbed rows and the outputs travel as binary tensor data (the Open Inference Protocol
    extension) instead of JSON numbers; a predictor that refuses it gets JSON from then on."""
    output: str | None = None
    """V2 output to explain; default: the first named like `*proba*`, else the first."""
    model_file: NamedPath | None = None
    """White-box mode: a joblib/pickle file of a fitted scikit-learn-API model."""
    background: str | None = None
    """`dataset:<name>` or a table file; needed unless `artifact` is given."""
    feature_names: list[str] = []
    categorical: list[str] = []
    output_names: list[str] = []
    """Names of the explained outputs (class labels); default: the model's classes, or output-<i>."""
    task: Literal["classification", "regression"] | None = None
    artifact: NamedPath | None = None
    """Load a fitted explainer from here instead of fitting (its method wins over `method`)."""
    save_artifact: NamedPath | None = None
    """Save the fitted explainer here after fitting."""
    options: dict[str, Any] = {}
    params: dict[str, Any] = {}
    timeout: Seconds = Field(10.0, gt=0)
    """Seconds per predictor request (the whole answer, not each read)."""
    explain_timeout: Seconds = Field(60.0, gt=0)
    """Seconds one explain request (or one batch of explain-on-event) may take, time queued for the
    workers included: past it the caller gets a 504, and its work still queued or calling the
    predictor is given up."""
    max_samples: int = Field(10_000, ge=1)
    """The most any per-request parameter that counts samples or model evaluations may ask for
    (`nsamples`, `max_evals`, `batch_size`, `coverage_samples`, `min_samples_start`): each costs
    model rows and memory, so one request could otherwise exhaust the server."""
    retries: int = Field(2, ge=0, le=10)
    max_batch_rows: int = Field(10_000, ge=1)
    predictor_concurrency: int = Field(4, ge=1, le=64)
    """Requests in flight at once from the event loop (rows asked ahead, and the explainers' calls
    when `linger` > 0); with `linger` 0 each worker thread has one connection of its own."""
    linger: Seconds = Field(0.0, ge=0)
    """Seconds the predictor client waits to merge concurrent calls into one request (0: no merging;
    each worker thread sends its own calls, with no hand-off to the event loop and back, and waiting
    would cost more latency than merging saves here)."""
    workers: int = Field(2, ge=1, le=64)
    """Threads doing explain work (off the event loop)."""
    chunk_size: int = Field(8, ge=1)
    """Instances per explain task; a batch's tasks run on the workers in parallel."""
    max_instances: int = Field(1000, ge=1)
    max_request_bytes: ByteSize = Field(ByteSize(64 << 20), ge=1)  # 0: every request refused 413
    """Request bodies longer than this are refused with 413 (a body is held whole to be decoded)."""
    request_read_timeout: Seconds = Field(60.0, gt=0)
    """Seconds a request body may take to arrive whole, from its head, before it is answered 408 and
    the connection closed (a client dribbling it would hold the connection for ever)."""
    warmup: bool = True
    subscriber: SubscriberSettings = SubscriberSettings()

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r} (known: {', '.join(METHODS)})")
        return value

    @field_validator("predictor_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        return http_url(url)  # the sidecar's rule: `localhost:8080` failed only when fitting

    @model_validator(mode="after")
    def _sources(self) -> ExplainerSettings:
        if self.predictor_url is None and self.model_file is None:
            raise ValueError("give predictor_url (black box) or model_file (white box)")
        if self.artifact is None and self.background is None:
            raise ValueError("give background data (or an artifact of a fitted explainer)")
        if self.artifact is None and self.method in WHITE_BOX and self.model_file is None:
            raise ValueError(f"method {self.method!r} reads the model itself: give model_file")
        if self.artifact is not None and self.save_artifact is not None:
            # Nothing is fitted from a loaded artifact: `--fit-only` said "saved" and wrote nothing.
            raise ValueError("artifact and save_artifact: an artifact is loaded, not fitted; give one of them")
        return self


def load_explainer_settings(config_file: Path | None = None, **flags: Any) -> ExplainerSettings:
    """Merge the sources and validate; ConfigError names the first bad field."""
    return ExplainerSettings.load(config_file, section="explainer", **flags)


__all__ = ["ConfigError", "ExplainerSettings", "SubscriberSettings", "load_explainer_settings"]
