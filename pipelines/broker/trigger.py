"""Triggers from YAML: Knative `Trigger` (and `Broker`) manifests as they are, or a short form.

A file holds any number of YAML documents. Each is a Knative manifest (`apiVersion:
eventing.knative.dev/v1`, kind `Trigger` or `Broker`; a `kind: List` of them; other kinds are
skipped), or the short form:

    triggers:
      - name: failed-predictions
        broker: default                 # default: the broker `POST /` goes to
        filters:
          - cesql: "type LIKE '%.response' AND statuscode >= 500"
        subscriber: http://127.0.0.1:9000/      # or {uri: ...}, {ref: {name: store}}, {component: {...}}
        delivery: {retry: 3, backoffDelay: PT0.5S, deadLetterSink: http://127.0.0.1:9001/}
    brokers:
      - name: default
        delivery: {retry: 10, backoffPolicy: exponential, backoffDelay: PT0.2S}

Everything is checked at load (names, filters as Knative's webhook does, CESQL, durations,
inline component configs); the first error raises `DocumentError` naming file:line:column,
the field path and the reason. Filter values are text: an unquoted `007`, `no` or `0x1F` is
compared as written, not as the number or boolean YAML reads.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from infer_logger.documents import Document, DocumentError, Location, read_documents, read_file
from pipelines.broker.components import component_config
from pipelines.broker.delivery import DeliverySpec, Destination
from pipelines.broker.filters import Filter, FilterError, PathPart, build_trigger_filter, format_path

log = logging.getLogger(__name__)

API_VERSION = "eventing.knative.dev/v1"
# Kubernetes object names (DNS-1123 subdomains): they also name checkpoint files and topics.
_TRIGGER_NAME_MAX = 250  # `<name>.json` within a file name's 255 bytes (names are ASCII)
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def check_name(value: str) -> str:
    if len(value) > 253 or not _NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid name (lower-case letters, digits, '-' and '.')")
    return value


class _Named(BaseModel):
    @field_validator("name", "namespace", "broker", check_fields=False)
    @classmethod
    def _names(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value)


class ObjectMeta(_Named):
    model_config = ConfigDict(extra="ignore")  # labels, annotations, resourceVersion, ...

    name: str
    namespace: str | None = None
    uid: str | None = None


class TriggerFilterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    attributes: dict[str, Any] | None = None


class TriggerSpec(_Named):
    model_config = ConfigDict(extra="forbid")

    broker: str
    filter: TriggerFilterSpec | None = None
    filters: list[Any] | None = None
    subscriber: Destination
    delivery: DeliverySpec | None = None


class TriggerManifest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # status

    apiVersion: Literal["eventing.knative.dev/v1"]
    kind: Literal["Trigger"]
    metadata: ObjectMeta
    spec: TriggerSpec


class BrokerSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")  # config: the class's ConfigMap has no meaning here

    delivery: DeliverySpec | None = None


class BrokerManifest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    apiVersion: Literal["eventing.knative.dev/v1"]
    kind: Literal["Broker"]
    metadata: ObjectMeta
    spec: BrokerSpec = BrokerSpec()


class TriggerEntry(TriggerSpec):
    """The short form: a trigger's spec with its name (and namespace, uid) beside it."""

    name: str
    namespace: str | None = None
    uid: str | None = None
    broker: str | None = None  # type: ignore[assignment]  # the loader's default broker


class BrokerEntry(_Named):
    model_config = ConfigDict(extra="forbid")

    name: str
    namespace: str | None = None
    delivery: DeliverySpec | None = None


class TriggerFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    triggers: list[TriggerEntry] = Field(default_factory=list)
    brokers: list[BrokerEntry] = Field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Trigger:
    """A validated trigger, its filter built."""

    name: str
    namespace: str
    broker: str
    uid: str
    filter: Filter = field(compare=False, repr=False)
    subscriber: Destination
    delivery: DeliverySpec | None = None
    location: Location = field(default=Location("<inline>", 1, 1), compare=False)
    subscriber_location: Location = field(default=Location("<inline>", 1, 1), compare=False)
    dead_letter_location: Location = field(default=Location("<inline>", 1, 1), compare=False)
    fingerprint: str = field(default="", compare=False, repr=False)
    """The spec as canonical JSON: a reload restarts the trigger only when this changes."""

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    @property
    def broker_key(self) -> tuple[str, str]:
        return self.namespace, self.broker

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class BrokerDecl:
    namespace: str
    name: str
    delivery: DeliverySpec | None
    location: Location


@dataclass(slots=True)
class TriggerSet:
    triggers: list[Trigger] = field(default_factory=list)
    brokers: list[BrokerDecl] = field(default_factory=list)


def load_trigger_files(paths: Iterable[Path], namespace: str = "default", broker: str = "default") -> TriggerSet:
    """Triggers of every file; `namespace` and `broker` are the defaults of those naming none."""
    out = TriggerSet()
    for path in paths:
        _add_documents(read_file(Path(path)), namespace, broker, out)
    return out


def load_triggers(text: str, origin: str = "<inline>", namespace: str = "default",
                  broker: str = "default") -> TriggerSet:
    out = TriggerSet()
    _add_documents(read_documents(text, origin), namespace, broker, out)
    return out


def _add_documents(documents: Sequence[Document], namespace: str, broker: str, out: TriggerSet) -> None:
    seen = {t.key: t.location for t in out.triggers}
    for doc in documents:
        data = doc.data
        if data is None:
            continue
        if not isinstance(data, dict):
            raise DocumentError(doc.locate(()), "", "a document is a mapping: a manifest or `triggers:`")
        if "apiVersion" in data or "kind" in data:
            items = data.get("items") if data.get("kind") == "List" else [data]
            prefix: tuple[str | int, ...] = ("items",) if data.get("kind") == "List" else ()
            for index, item in enumerate(items if isinstance(items, list) else []):
                where = (*prefix, index) if prefix else ()
                _add_manifest(doc, item, where, namespace, out, seen)
            continue
        short = _validate(TriggerFile, data, doc, ())
        for index, entry in enumerate(short.triggers):
            ns = entry.namespace or namespace
            spec = entry if entry.broker else entry.model_copy(update={"broker": broker})
            _add_trigger(doc, ("triggers", index), spec, entry.name, ns, entry.uid, out, seen, ())
        for index, decl in enumerate(short.brokers):
            location = doc.locate(("brokers", index))
            out.brokers.append(BrokerDecl(decl.namespace or namespace, decl.name, decl.delivery, location))


def _add_manifest(doc: Document, item: Any, path: tuple[str | int, ...], namespace: str,
                  out: TriggerSet, seen: dict[tuple[str, str], Location]) -> None:
    kind = item.get("kind") if isinstance(item, dict) else None
    if kind == "Trigger":
        manifest = _validate(TriggerManifest, item, doc, path)
        meta = manifest.metadata
        _add_trigger(doc, path, manifest.spec, meta.name, meta.namespace or namespace, meta.uid, out, seen,
                     ("spec",))
    elif kind == "Broker":
        broker = _validate(BrokerManifest, item, doc, path)
        meta = broker.metadata
        out.brokers.append(BrokerDecl(meta.namespace or namespace, meta.name, broker.spec.delivery,
                                      doc.locate(path)))
    elif isinstance(item, dict) and str(item.get("apiVersion", "")).startswith("eventing.knative.dev"):
        raise DocumentError(doc.locate((*path, "kind")), format_path((*path, "kind")),
                            f"kind {kind!r} is not supported here (Trigger, Broker)")
    else:
        log.info("%s: skipping a %s document (not a Trigger or Broker)", doc.locate(path), kind)


def _add_trigger(doc: Document, path: tuple[str | int, ...], spec: TriggerSpec, name: str, namespace: str,
                 uid: str | None, out: TriggerSet, seen: dict[tuple[str, str], Location],
                 spec_path: tuple[str, ...]) -> None:
    location = doc.locate(path)
    base = (*path, *spec_path)
    if len(name) > _TRIGGER_NAME_MAX:
        name_path = (*path, "metadata", "name") if spec_path else (*path, "name")
        raise DocumentError(doc.locate(name_path), format_path(name_path),
                            f"a trigger's name is at most {_TRIGGER_NAME_MAX} characters: it names its "
                            f"checkpoint file (<name>.json), this one has {len(name)}")
    if (namespace, name) in seen:
        raise DocumentError(location, format_path(path),
                            f"trigger {namespace}/{name} is already defined at {seen[(namespace, name)]}")
    texts: list[tuple[str, str]] = []  # the filter's values as written: `007` and `7` are two filters

    def written(filter_path: tuple[PathPart, ...]) -> str | None:
        text = doc.texts.get((*base, *filter_path))
        if text is not None:
            texts.append((format_path(filter_path), text))
        return text

    def warn(filter_path: tuple[PathPart, ...], reason: str, column: int | None) -> None:
        full = (*base, *filter_path)
        log.warning("%s: trigger %s/%s, %s: %s", _pointed(doc, full, column), namespace, name, format_path(full),
                    reason)

    try:
        trigger_filter = build_trigger_filter(spec.filter.attributes if spec.filter else None, spec.filters,
                                              written=written, warn=warn)
    except FilterError as exc:
        raise _filter_error(doc, base, exc, f"trigger {namespace}/{name}") from None
    _check_component(doc, (*base, "subscriber"), spec.subscriber)
    dead_letter = spec.delivery.dead_letter_sink if spec.delivery else None
    if dead_letter is not None:
        _check_component(doc, (*base, "delivery", "deadLetterSink"), dead_letter)
    # json, not orjson: a YAML integer may be beyond 64 bits (`retry: 99999999999999999999999`).
    # Unset and null are told apart (a delivery's `deadLetterSink: null` opts out of the broker's):
    # fingerprinted alike, a reload adding or removing one kept the old dispatcher.
    fingerprint = json.dumps(
        [namespace, name, spec.model_dump(mode="json", by_alias=True, exclude_unset=True,
                                          exclude={"name", "namespace", "uid"}), texts],
        sort_keys=True, separators=(",", ":"), default=repr,
    )
    seen[(namespace, name)] = location
    out.triggers.append(Trigger(
        name=name,
        namespace=namespace,
        broker=spec.broker,
        uid=uid or str(uuid.uuid5(uuid.NAMESPACE_URL, f"trigger:{namespace}/{name}")),
        filter=trigger_filter,
        subscriber=spec.subscriber,
        delivery=spec.delivery,
        location=location,
        subscriber_location=doc.locate((*base, "subscriber")),
        dead_letter_location=doc.locate((*base, "delivery", "deadLetterSink")),
        fingerprint=fingerprint,
    ))


def _check_component(doc: Document, path: tuple[str | int, ...], destination: Destination) -> None:
    if destination.component is None:
        return
    try:
        component_config(destination.component)
    except ValidationError as exc:
        raise _pydantic_error(doc, (*path, "component"), exc) from None
    except ValueError as exc:
        raise DocumentError(doc.locate((*path, "component", "type")), format_path((*path, "component")),
                            str(exc)) from None


def _validate(model: type[Any], data: Any, doc: Document, path: tuple[str | int, ...]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _pydantic_error(doc, path, exc) from None


def _pydantic_error(doc: Document, path: tuple[str | int, ...], exc: ValidationError) -> DocumentError:
    error = exc.errors()[0]
    # Union and validator tags (e.g. "function-after[...]") are not fields: leave them out.
    loc = [p for p in error["loc"] if isinstance(p, int) or "[" not in p]
    full = (*path, *loc)
    reason = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        reason = "unknown field"
    return DocumentError(doc.locate(full), format_path(full), reason)


def _filter_error(doc: Document, base: tuple[str | int, ...], exc: FilterError, trigger: str) -> DocumentError:
    # The path alone (`filters[0].cesql`) does not say which of a file's triggers it is.
    full = (*base, *exc.path)
    return DocumentError(_pointed(doc, full, exc.column), format_path(full), f"{trigger}: {exc.reason}")


def _pointed(doc: Document, full: tuple[PathPart, ...], column: int | None) -> Location:
    location = doc.locate(full)
    if column is not None and location.offset is not None:  # point at the CESQL token
        location = Location(location.origin, location.line, location.column + location.offset + column)
    return location
