"""`elasticsearch` sink: the joined audit record, upserted with `_bulk` (one document per prediction).

Each event becomes partial documents (`infer_logger.audit`) sent as `update` + `doc_as_upsert`,
so request, response and explanation merge into one `_id` in any order, and re-delivery
overwrites. Per-item results decide what happens next:

- 2xx: taken.
- 429, 409 (a concurrent update), 5xx, and 401/403/404 (privileges, an index that may not be
  created: the cluster's state, not the document's): those items are sent again, a few times
  with a short backoff, each with the batch's later updates of its document after it, taken or
  not (the merge is per field, last writer wins: applied again in batch order, they leave what
  the batch in order does; the older of a retried exchange's responses no longer ends on top).
  Still failing, the batch raises `SinkError`.
- other 4xx (400: mapping or parse errors): `RejectedError` with exactly those events and the
  reason; the rest of the batch is taken.

Failures of the whole request (connection refused, timeouts, auth, 5xx) raise `SinkError`: they
are never the events' fault. A `SinkError` names as `pending` the batch from its first event not
taken on, which the worker sends again (not the bulks taken before it), its responses with the
instance counts they were made with. A `_bulk` answered 413
(larger than a front such as nginx, or the cluster's `http.max_content_length`, takes) goes
again in smaller bulks, down to single documents, and the sink's bulks stay at most half that
size for a while (`SizeLimit`): only an event with a document too large alone is refused
(`RejectedError`, too large), even when its many instances' documents together are over the limit.

Before its first write the sink creates its index template when
missing (never replacing one, see `infer_logger.elasticsearch_template`): a 429 or 5xx to that (a
cluster still starting), a 401 (a key not valid yet) or an answer that is not Elasticsearch's (a
proxy) is a `SinkError` too, and the template is checked again with the retry; a lasting refusal
(400, 403: no privilege) is logged once and the sink writes anyway. It then asks which template
applies to the first index it writes, and warns once when another one of higher priority does.
A cluster restarted without its data (no volume) has lost the template, and the client reconnects
without a word: the template is checked again before the next bulk once a bulk failed whole, and
once the last check is a minute old (one GET; what it finds is logged once).
`elasticsearch` is an optional extra, so this module imports it only when a sink is built.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import string
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import urlsplit

import orjson
from pydantic import ByteSize, Field, SecretStr, ValidationInfo, field_validator, model_validator

from infer_logger import audit, events
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.elasticsearch_template import (
    INDEX_PATTERNS,
    MANAGED_BY,
    TEMPLATE_NAME,
    Outcome,
    install_template,
    priority,
    retire_shared,
    shadowing,
)
from infer_logger.errors import ConfigError, RejectedError, SinkError
from infer_logger.fields import NamedFile, Seconds
from infer_logger.retry import retry_after
from infer_logger.sinks.base import SinkConfig, without_userinfo
from infer_logger.sinks.size_limit import SizeLimit

if TYPE_CHECKING:
    from elasticsearch import AsyncElasticsearch, TransportError

log = logging.getLogger(__name__)

DEFAULT_INDEX = "inference-log-{namespace}-{inferenceservicename}"
# Item statuses that are the cluster's state, not the document's fault: an index that may not be
# auto-created (404), a key without write privilege (401/403), conflicts, overload.
RETRYABLE = frozenset({401, 403, 404, 408, 409, 429})
# 400s of the same kind, by error type: a closed index (reopened after maintenance), and the
# cluster's shard limit met as an index is auto-created (its reason names "shards").
_CLOSED = "index_closed_exception"
_SHARD_LIMIT = "validation_exception"
# And 5xx: the template check is tried again. 401 too: a key not valid yet (created, or granted,
# after the sink started) would otherwise turn the check off for good, and the first bulk once it
# is valid auto-create indices with dynamic mappings.
_CHECK_AGAIN = frozenset({401, 408, 409, 429})
_INVALID = re.compile(r"[^a-z0-9_.+-]+")  # stricter than Elasticsearch: no \/*?"<>|,#: or spaces
_LEADING = re.compile(r"^[-_+.]+")
_MAX_INDEX_BYTES = 255
# Multi-instance requests whose counts are kept for their responses: one that waits as long as a
# predictor's timeout (60 s) at ~1,600 such requests/s. ~130 bytes an entry (a UUID id): ~13 MB.
_COUNTS_KEPT = 100_000
# Seconds after which the template is checked again (see the module docstring).
_TEMPLATE_CHECK_EVERY = 60.0
# Names Elasticsearch ships index templates under (`logs`, `metrics-apm...`, `profiling-events`):
# a derived name that is one of these, or starts with one and `-`, gets `infer-logger-` before it.
# Index patterns of Elasticsearch's built-in data stream templates (`logs-*-*`...), by their fixed part.
_DATA_STREAMS = ("logs-", "metrics-", "traces-", "synthetics-", "profiling-")
_BUILT_IN_TEMPLATES = ("logs", "metrics", "traces", "synthetics", "profiling", "apm", "ilm-history",
                       "slm-history", "elastic-connectors", "behavioral_analytics")


_NOT_IN_NAMES = ' ,#*\\/?"<>|'


class ElasticsearchSinkConfig(SinkConfig):
    """Upserts one audit document per prediction into Elasticsearch 8 (see `infer_logger.audit`)."""

    type: Literal["elasticsearch"] = "elasticsearch"
    url: str | list[str] = "http://localhost:9200"
    """One node's URL or several (tried in turn when one cannot be reached)."""
    index: str = DEFAULT_INDEX
    """Index name; `{attribute}` takes the event's attribute (empty -> `unknown`). The name is
    lower-cased and every character Elasticsearch refuses becomes `-`."""
    per_instance: bool = True
    """One document per prediction (`<id>-<instance>`); false: one per exchange (`<id>`)."""
    feature_names: dict[str, list[str]] = Field(default_factory=dict)
    """By model name: names of the items of list instances, so `request.features` is an object."""
    api_key: SecretStr | None = None
    """An encoded API key (the `encoded` value Elasticsearch returns)."""
    username: str | None = None
    password: SecretStr | None = None
    """Basic auth; exclusive with `api_key`."""
    verify_certs: bool = True
    """Check the server's TLS certificate (https URLs)."""
    ca_certs: NamedFile | None = None
    """A CA bundle file for the server's certificate."""
    timeout: Seconds = Field(default=10.0, gt=0)
    """Seconds to wait for each request."""
    max_attempts: int = Field(default=3, ge=1, le=10)
    """Bulk attempts for items answered 429/409/5xx before the batch fails (and is resent from its
    first event not taken)."""
    retry_delay: Seconds = Field(default=0.2, ge=0, le=10)
    """Seconds before the first item retry; doubled for each next one."""
    max_bulk_bytes: ByteSize = ByteSize(8 << 20)
    """A batch larger than this goes in several `_bulk` requests: below what the cluster
    (`http.max_content_length`) and any front before it take, since a `_bulk` answered 413 is sent
    again in halves (and the sink's bulks stay at most half its size for a while)."""
    install_template: bool = True
    """Create the index template before the first write when it is missing, and again when it went
    missing (a cluster restarted without its data); never replaces one."""
    template_name: str = TEMPLATE_NAME
    """The index template's name; unset: the index's fixed prefix (`inference-log` for the default
    index; `audit:prefix` for `audit{namespace}`, `audit:exact` for the one index `audit`), so that
    sinks writing other indices have templates of their own. A prefix that
    Elasticsearch's own templates are named by (`logs`, `metrics`, `traces`, `synthetics`,
    `profiling`, `apm`... alone or before `-`) gets `infer-logger-` before it: `infer-logger-logs`."""

    @field_validator("url")
    @classmethod
    def _http_urls(cls, value: str | list[str]) -> str | list[str]:
        urls = [value] if isinstance(value, str) else value
        if not urls:
            raise ValueError("give at least one URL")
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https"):
                raise ValueError(f"{url!r}: an http:// or https:// URL is needed")
            try:
                host, _ = parts.hostname, parts.port  # .port raises for one out of range
            except ValueError as exc:
                raise ValueError(f"{url!r}: {exc}") from None
            if not host:
                raise ValueError(f"{url!r}: the URL names no host")
        return value

    @field_validator("ca_certs")
    @classmethod
    def _ca_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        try:
            is_file = Path(value).is_file()
        except OSError as exc:  # a name too long, a directory not ours to look in
            raise ValueError(f"{value!r}: {exc.strerror or exc}") from None
        if not is_file:
            raise ValueError(f"{value!r} is not a file")
        url = info.data.get("url")
        if any(urlsplit(u).scheme != "https" for u in ([url] if isinstance(url, str) else url or [])):
            return value  # not loaded: `_one_auth` says what is wrong (a CA for http://)
        try:  # as the client loads it, where an ssl.SSLError escaped as a traceback
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=value)
        except ssl.SSLError as exc:
            raise ValueError(f"{value!r}: no certificate could be loaded from it, a PEM CA bundle is "
                             f"needed ({exc.reason or exc})") from None
        except OSError as exc:  # not readable
            raise ValueError(f"{value!r}: {exc.strerror or exc}") from None
        return value

    @field_validator("index")
    @classmethod
    def _index_pattern(cls, value: str) -> str:
        index_fields(value)
        return value

    @field_validator("api_key")
    @classmethod
    def _header_value(cls, value: SecretStr | None) -> SecretStr | None:
        # It goes in a header, which may hold no control character: every send failed, retried
        # for ever. A secret's file read with its final newline is taken without it.
        if value is None:
            return None
        key = value.get_secret_value().strip()
        if not key or any(ord(c) < 32 or ord(c) == 127 for c in key):
            raise ValueError("an API key holds no control character (a header carries it)")
        return SecretStr(key)

    @field_validator("template_name")
    @classmethod
    def _template_name(cls, value: str) -> str:
        # Elasticsearch's own rules for template names: refused there, the sink warned once and
        # wrote into indices it auto-created with dynamic mappings, for good.
        if not value or value != value.lower() or value.startswith("_") or any(c in value for c in _NOT_IN_NAMES):
            raise ValueError(f"{value!r}: a template name is lower case, without spaces or any of "
                             f"{_NOT_IN_NAMES.strip()}, and does not start with _")
        return value

    @model_validator(mode="after")
    def _one_auth(self) -> ElasticsearchSinkConfig:
        if self.api_key is not None and (self.username or self.password):
            raise ValueError("api_key and username/password exclude each other")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if self.ca_certs and any(urlsplit(url).scheme != "https" for url in self.urls):
            raise ValueError("ca_certs is for https:// URLs only")
        if self.install_template:
            patterns = self.template_patterns()
            if "template_name" not in self.model_fields_set:
                # One name per pattern: a shared one was found with the other's patterns and kept.
                self.template_name = _derived_name(patterns[0])
        return self

    @property
    def urls(self) -> list[str]:
        return [self.url] if isinstance(self.url, str) else list(self.url)

    @property
    def where(self) -> str:
        """The node addresses, without credentials (for messages)."""
        return ", ".join(without_userinfo(u) for u in self.urls)

    def template_patterns(self) -> list[str]:
        """The index patterns the template must match: the index name up to its first field,
        sanitized as the names are (`_Audit-{namespace}` writes `audit-prod`: `audit-*`)."""
        prefix = self.index.split("{", 1)[0]
        if "{" not in self.index:
            pattern = sanitize_index(prefix)
            overlaps = [d for d in _DATA_STREAMS if pattern.startswith(d)]
        else:
            fixed = _LEADING.sub("", _INVALID.sub("-", prefix.lower()))
            if not fixed:
                raise ConfigError("index", f"{self.index!r} has no fixed prefix for the index template to match")
            pattern = fixed + "*"
            overlaps = [d for d in _DATA_STREAMS if fixed.startswith(d) or d.startswith(fixed)]
        if overlaps:
            taken = overlaps[0]
            # Our template outranks the built-in one (priority 100): those data streams would
            # become plain indices with our mappings, Elastic Agent's among them.
            raise ConfigError("index", f"{self.index!r} overlaps Elasticsearch's built-in data streams "
                                       f"{taken}*: choose another prefix, or set install_template: false")
        return [pattern]

    def client(self) -> AsyncElasticsearch:
        try:
            from elasticsearch import AsyncElasticsearch
        except ImportError as exc:
            raise ConfigError("type", "elasticsearch needs `pip install 'infer-logger[elasticsearch]'`") from exc
        options: dict[str, Any] = {
            "request_timeout": self.timeout,
            "verify_certs": self.verify_certs,
            # Whole-request failures go back to the worker's backoff; the transport only fails
            # over to the next node, at once.
            "max_retries": len(self.urls) - 1,
            "retry_on_status": (),
            "retry_on_timeout": False,
        }
        if self.ca_certs:
            options["ca_certs"] = self.ca_certs
        if self.api_key is not None:
            options["api_key"] = self.api_key.get_secret_value()
        if self.username is not None and self.password is not None:
            options["basic_auth"] = (self.username, self.password.get_secret_value())
        # The default node class (aiohttp) is a core dependency and as fast as httpx's here.
        try:
            return AsyncElasticsearch(self.urls, **options)
        except ValueError as exc:  # what the validators did not foresee: a bad URL or TLS option
            field = "ca_certs" if self.ca_certs and ("ca_certs" in str(exc) or "TLS" in str(exc)) else "url"
            raise ConfigError(field, f"the Elasticsearch client refused it: {exc}") from exc
        except OSError as exc:  # ssl.SSLError: the CA file changed since it was checked
            if not self.ca_certs:
                raise
            raise ConfigError("ca_certs", f"{self.ca_certs!r} cannot be loaded: {exc}") from exc

    def build(self) -> ElasticsearchSink:
        return ElasticsearchSink(self)


def _derived_name(pattern: str) -> str:
    """`audit-*` -> `audit`; `audit*` -> `audit:prefix`; `audit` (one index) -> `audit:exact`.
    One name per pattern (`audit-*` and one index `audit` shared `audit`: each config took the
    other's template over, and indices were made without our mappings); an index name holds no
    `:`, so no `X-*` makes one of the others."""
    if pattern.endswith("-*"):
        name = pattern.removesuffix("-*")
    elif pattern.endswith("*"):
        name = pattern.removesuffix("*") + ":prefix"
    else:
        name = pattern + ":exact"
    name = name or TEMPLATE_NAME
    if any(name == built_in or name.startswith(built_in + "-") for built_in in _BUILT_IN_TEMPLATES):
        return f"infer-logger-{name}"
    return name


def index_fields(pattern: str) -> list[str]:
    """The attribute names an index pattern uses; ConfigError for anything but `{name}`."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as exc:
        raise ConfigError("index", f"{pattern!r}: {exc}") from exc
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not re.fullmatch(r"[a-z0-9]+", name) or spec or conversion:
            raise ConfigError("index", f"{pattern!r}: `{{{name}}}` is not an event attribute name")
        if name.isdigit():  # str.format reads it as a position: every event failed to be named
            raise ConfigError("index", f"{pattern!r}: `{{{name}}}`, all digits, is not taken as an attribute")
        names.append(name)
    return names


def sanitize_index(name: str) -> str:
    """A valid index name: lower case, refused characters as `-`, no leading `-_+.`, <= 255 bytes."""
    name = _LEADING.sub("", _INVALID.sub("-", name.lower()))
    return name.encode()[:_MAX_INDEX_BYTES].decode(errors="ignore") or "unknown"


class IndexNamer:
    """Event -> index name from a pattern; names are cached by the attribute values they use."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.fields = index_fields(pattern)
        self._cache: dict[tuple[str, ...], str] = {}

    def __call__(self, event: CloudEvent) -> str:
        return self._named(tuple(str(event.get(f) or "") for f in self.fields))

    def example(self) -> str:
        """The name of an event without the attributes (`unknown` for each)."""
        return self._named(("",) * len(self.fields))

    def _named(self, values: tuple[str, ...]) -> str:
        name = self._cache.get(values)
        if name is None:
            if len(self._cache) >= 1024:  # bounded: attribute values come from requests
                self._cache.clear()
            filled = {f: _INVALID.sub("-", v.lower()) or "unknown" for f, v in zip(self.fields, values)}
            name = self._cache[values] = sanitize_index(self.pattern.format_map(filled))
        return name


@dataclass(frozen=True, slots=True)
class _Op:
    """One `update` action and its document, NDJSON-encoded, for the event at `event`, of the
    document `key` (index, _id)."""

    event: int
    lines: bytes
    key: tuple[str, str]


class ElasticsearchSink:
    def __init__(self, config: ElasticsearchSinkConfig, client: AsyncElasticsearch | None = None) -> None:
        self.config = config
        self.client = client or config.client()
        self.index = IndexNamer(config.index)
        # When the template was last checked (monotonic); None: before the next bulk.
        self._template_checked: float | None = None
        self._template_checks = 0
        self._said: set[str] = set()  # warnings given: a check made again repeats them
        self._bulk_bytes = SizeLimit(int(config.max_bulk_bytes))  # lowered by a 413
        # Request instance counts by id (those over 1), so a response with fewer items (an error)
        # still marks every instance; the spool orders a request before its response.
        self._counts: dict[str, int] = {}

    async def send_batch(self, events: Sequence[CloudEvent]) -> None:
        rejected: dict[int, str] = {}  # by the event's position: why it was refused
        too_large: set[int] = set()  # those refused for a document's size
        # Counted before the first await: a batch sent meanwhile (in flight beside this one) may
        # hold the responses of requests in this one, and must know how many instances to mark.
        self._count_requests(events)
        # Encoded as the chunks go out: a batch's documents are never all in memory at once.
        made_with: dict[int, int] = {}  # the instance count each response's documents were made with
        ops: Iterable[_Op] = self._ops(events, rejected, made_with)
        delay = self.config.retry_delay
        for attempt in range(1, self.config.max_attempts + 1):
            retry: list[_Op] = []  # in batch order
            # The documents with an update to send again, and its status: each later update of
            # one of them, taken meanwhile, goes again after it (the older must not end on top:
            # a retried exchange's 503 response over its 200).
            failed: dict[tuple[str, str], int] = {}
            for chunk in _chunks(ops, self._bulk_bytes):
                try:
                    if self._template_due():
                        await self._ensure_template(self.index(events[chunk[0].event]))
                    items = await self._bulk_fitting(chunk)
                except SinkError as exc:
                    if not isinstance(exc, RejectedError):  # down, or 5xx: it may come back empty
                        self._template_checked = None
                    exc.pending = self._not_taken(events, rejected, retry, chunk[0].event, made_with)
                    raise
                for op, item in zip(chunk, items):
                    if item is None:
                        if op.event not in rejected:
                            too_large.add(op.event)
                            rejected[op.event] = (f"elasticsearch at {self.config.where} answered 413 to a "
                                                  f"document of {len(op.lines)} bytes alone")
                        continue
                    status = item["status"]
                    if status < 300:
                        if op.key in failed:  # applied before the earlier one that goes again
                            retry.append(op)
                        continue
                    if _retryable(status, item):
                        retry.append(op)
                        failed.setdefault(op.key, status)
                    else:  # not applied: nothing to send again after an earlier one
                        rejected.setdefault(op.event, _reason(item))
            if not retry:
                break
            if attempt == self.config.max_attempts:
                raise SinkError(
                    f"elasticsearch at {self.config.where} answered {sorted(set(failed.values()))} to "
                    f"{len(failed)} documents after {attempt} attempts",
                    pending=self._not_taken(events, rejected, retry, len(events), made_with),
                )
            ops = retry
            await asyncio.sleep(delay)
            delay *= 2
        if rejected:
            more = f" (and {len(rejected) - 1} more)" if len(rejected) > 1 else ""
            order = sorted(rejected)
            raise RejectedError(
                f"elasticsearch at {self.config.where} refused {len(rejected)} events: "
                f"{rejected[order[0]]}{more}",
                [events[i] for i in order],
                too_large=all(i in too_large for i in order),
                reasons=[rejected[i] for i in order],
            )

    def _not_taken(self, batch: Sequence[CloudEvent], rejected: Mapping[int, str], retry: Sequence[_Op],
                   unsent: int, made_with: Mapping[int, int]) -> list[CloudEvent]:
        """What the worker sends again (`SinkError.pending`): the batch from its first event not
        taken on: one with an update to send again, refused (so it is refused again, not counted
        taken), or not sent yet (from `unsent`). The rest of it too, though some were taken: sent
        again alone, an earlier event would be applied after a later one of the same document.

        Each id's first response in it gets back the instance count it was made with: a later
        request of the id (a mesh's retry), made meanwhile, had replaced it, and sent again, a 503
        marked instance 0 only (its request in this batch or an earlier one)."""
        first = min([unsent, *rejected, *(op.event for op in retry)])
        seen: set[str] = set()
        for i in range(first, len(batch)):
            event = batch[i]
            if event.type not in (events.REQUEST, events.RESPONSE) or event.id in seen:
                continue
            seen.add(event.id)  # a request first sets the count itself
            if event.type == events.RESPONSE and i in made_with:
                self._remember(event.id, made_with[i])
        return list(batch[first:])

    def _ops(self, batch: Sequence[CloudEvent], rejected: dict[int, str],
             made_with: dict[int, int]) -> Iterator[_Op]:
        """The batch's `update` operations, event by event; events that cannot be encoded go
        to `rejected` instead, by their position, and each response's instance count to `made_with`."""
        for i, event in enumerate(batch):
            names = self.config.feature_names.get(str(event.get(events.MODELNAME) or ""))
            known = self._counts.get(event.id, 0) if event.type == events.RESPONSE else 0
            if event.type == events.RESPONSE:
                made_with[i] = known
            try:
                docs = audit.documents(
                    event, per_instance=self.config.per_instance, feature_names=names, instances=known
                )
                if event.type == events.REQUEST and self.config.per_instance:
                    self._remember(event.id, len(docs))  # for its response, later in the batch
                index = self.index(event) if docs else ""
                ops = [_Op(i, _update(index, doc_id, doc), (index, doc_id)) for doc_id, doc in docs]
            except TypeError as exc:  # orjson: not JSON-encodable
                rejected[i] = f"cannot encode a document: {exc}"
                continue
            except Exception as exc:  # a payload no document can be made of: never retried forever
                rejected[i] = f"cannot make a document: {type(exc).__name__}: {exc}"
                continue
            yield from ops

    def _count_requests(self, batch: Sequence[CloudEvent]) -> None:
        """The instance counts of the batch's requests but those whose responses come after them
        in it (they get theirs as `_ops` reaches them, their payload decoded once). A response
        before its request needs the count first: without it, its status went on instance 0 only."""
        if not self.config.per_instance:
            return
        answered_first = {e.id for e in batch if e.type == events.RESPONSE and e.id in self._counts}
        answered_later: set[str] = set()
        for event in reversed(batch):
            if event.type == events.RESPONSE:
                answered_later.add(event.id)
            elif event.type == events.REQUEST and event.id not in answered_later:
                if event.id in answered_first:
                    # Its id's response before it answers an earlier batch's request (of the count
                    # kept), which a mesh's retry, last in this batch, wiped: a 503 on instance 0 only.
                    continue
                try:
                    self._remember(event.id, audit.instances(event))
                except Exception:  # `_ops` rejects the event with the reason
                    continue

    def _remember(self, event_id: str, count: int) -> None:
        self._counts.pop(event_id, None)
        if count <= 1:  # what a response does without a count: one-instance traffic evicts nothing
            return
        self._counts[event_id] = count
        if len(self._counts) > _COUNTS_KEPT:
            del self._counts[next(iter(self._counts))]  # the oldest

    async def _bulk_fitting(self, chunk: list[_Op]) -> list[Mapping[str, Any] | None]:
        """The chunk's item results; a chunk answered 413 goes again in smaller pieces (None: a
        document refused alone for its size). Each 413 lowers the sink's bulk size (`SizeLimit`)
        for the pieces and what follows: a front's limit costs a few refusals, not some for every
        batch."""
        try:
            return list(await self._bulk(chunk))
        except RejectedError as exc:
            if not exc.too_large:
                raise
            lower = self._bulk_bytes.refused(sum(len(op.lines) for op in chunk), len(chunk))
            if lower is not None:
                log.warning("%s; sending bulks of at most %d bytes for a while", exc, lower)
            if len(chunk) == 1:
                return [None]
            # Cut as they go: once a first piece found the limit, the next ones are cut below it.
            items: list[Mapping[str, Any] | None] = []
            for piece in _chunks(chunk, self._bulk_bytes):
                items += await self._bulk_fitting(piece)
            return items

    async def _bulk(self, chunk: Sequence[_Op]) -> list[Mapping[str, Any]]:
        """The chunk's item results; RejectedError (no events named) when it is too large to be taken."""
        from elasticsearch import ApiError, TransportError

        body = b"".join(op.lines for op in chunk)
        try:
            # Pre-encoded NDJSON: the client passes bytes through (typed as a list of dicts).
            resp = await self.client.bulk(operations=cast("Sequence[Mapping[str, Any]]", body))
        except ApiError as exc:
            if exc.meta.status == 413:  # its body, often a front's HTML page, says no more than this
                raise RejectedError(f"elasticsearch at {self.config.where} answered 413 to a _bulk of "
                                    f"{len(body)} bytes ({len(chunk)} documents)", too_large=True,
                                    together=True) from exc
            after = retry_after(exc.meta.headers.get("retry-after"))
            raise SinkError(
                f"elasticsearch at {self.config.where} answered {exc.meta.status} to _bulk: {exc.message}",
                retry_after=after,
            ) from exc
        except TransportError as exc:
            raise SinkError(f"elasticsearch at {self.config.where}: {_failure(exc)}") from exc
        body = resp.body
        items = body.get("items") if isinstance(body, Mapping) else None
        if not isinstance(items, list):  # a proxy's login page answered 200, or no _bulk API
            raise SinkError(f"elasticsearch at {self.config.where} answered _bulk with no items: "
                            f"{str(body)[:200]!r}")
        if len(items) != len(chunk):
            raise SinkError(
                f"elasticsearch at {self.config.where} answered {len(items)} items to {len(chunk)} actions"
            )
        if not body.get("errors"):
            return [{"status": 200}] * len(chunk)
        results = [next(iter(item.values()), None) if isinstance(item, Mapping) and len(item) == 1 else None
                   for item in items]
        for result in results:
            if not (isinstance(result, Mapping) and type(result.get("status")) is int):
                raise SinkError(f"elasticsearch at {self.config.where} answered a _bulk item that has no "
                                f"status: {str(result)[:200]!r}")
        return cast("list[Mapping[str, Any]]", results)

    def _template_due(self) -> bool:
        checked = self._template_checked
        return self.config.install_template and (
            checked is None or time.monotonic() - checked >= _TEMPLATE_CHECK_EVERY
        )

    def _warn_once(self, message: str, *args: object) -> None:
        text = message % args
        if text not in self._said:
            self._said.add(text)
            log.warning(message, *args)

    async def _ensure_template(self, index: str) -> None:
        """Install the template when missing, then check that it is the one `index` (the first
        one written) gets. Checked again, only what is new is asked: the template, and when it
        had to be created again, the rest."""
        from elasticsearch import ApiError, TransportError, UnsupportedProductError

        name, patterns = self.config.template_name, self.config.template_patterns()
        try:
            outcome = await install_template(self.client, name=name, index_patterns=patterns, overwrite=False)
            anew = self._template_checks == 0 or outcome == "created"
            retired = anew and outcome in ("created", "unchanged") and await retire_shared(
                self.client, name=name, index_patterns=patterns
            )
            self._installed(outcome, retired)
        except UnsupportedProductError as exc:  # an ApiError, of a 200: a proxy's page, not a refusal
            raise SinkError(f"elasticsearch at {self.config.where} answered the index template check, "
                            f"but not as Elasticsearch: {exc.message}") from exc
        except ApiError as exc:
            if exc.meta.status in _CHECK_AGAIN or exc.meta.status >= 500:
                # A cluster still starting, or overloaded, or a key not valid yet: writing now would
                # auto-create indices without the template, for good. Checked again with the
                # batch's retry.
                raise SinkError(
                    f"elasticsearch at {self.config.where} answered {exc.meta.status} to the index "
                    f"template check: {exc.message}",
                    retry_after=retry_after(exc.meta.headers.get("retry-after")),
                ) from exc
            # A refusal that will not change, e.g. an API key without manage_index_templates
            # (403): write anyway, say so once.
            self._warn_once("elasticsearch sink: cannot install index template %s: %s", name, exc)
        except TransportError as exc:
            raise SinkError(f"elasticsearch at {self.config.where}: {_failure(exc)}") from exc
        else:
            shadow, unchecked = (None, None) if outcome == "foreign" or not anew else await _shadowed(
                self.client, name, index
            )
            if unchecked:
                self._warn_once("elasticsearch sink: cannot check which index template applies to %s: %s",
                                index, unchecked)
            if shadow:
                self._warn_once(
                    "elasticsearch sink: %s applies to new indices such as %s, not index template %s "
                    "(priority %d): only the highest-priority match does, so they get its mappings, not "
                    "infer-logger's (lower its priority or narrow its patterns)",
                    shadow, index, name, priority(patterns),
                )
        self._template_checked = time.monotonic()
        self._template_checks += 1

    def _installed(self, outcome: Outcome, retired: bool) -> None:
        name, patterns = self.config.template_name, self.config.template_patterns()
        if outcome == "created":
            log.info("elasticsearch sink: created index template %s", name)
        if retired:
            log.info("elasticsearch sink: index template %s is for %s again (%s, now %s's, was in it)",
                     TEMPLATE_NAME, ", ".join(INDEX_PATTERNS), ", ".join(patterns), name)
        if outcome == "foreign":
            self._warn_once(
                "elasticsearch sink: index template %s is not infer-logger's: left as it is, so indices "
                "%s may be created without our mappings (give the sink another template_name)",
                name, ", ".join(patterns),
            )
        elif outcome == "kept":
            self._warn_once(
                "elasticsearch sink: index template %s exists for other index patterns or of another "
                "version: kept, so indices %s may be created without our mappings (replace it with "
                "`infer-logger setup elasticsearch --index '%s' --template-name %s`)",
                name, ", ".join(patterns), self.config.index, name,
            )

    async def aclose(self) -> None:
        await self.client.close()


def _update(index: str, doc_id: str, doc: Mapping[str, Any]) -> bytes:
    # retry_on_conflict: the indexer or another sidecar may update the same _id at once.
    action = {"update": {"_index": index, "_id": doc_id, "retry_on_conflict": 3}}
    return orjson.dumps(action) + b"\n" + orjson.dumps({"doc": doc, "doc_as_upsert": True}) + b"\n"


def _chunks(ops: Iterable[_Op], limit: Callable[[], int]) -> Iterator[list[_Op]]:
    """`ops` in lists of up to `limit()` bytes (or one larger op), taken from `ops` as needed."""
    chunk: list[_Op] = []
    size = 0
    for op in ops:
        if chunk and size + len(op.lines) > limit():
            yield chunk
            chunk, size = [], 0
        chunk.append(op)
        size += len(op.lines)
    if chunk:
        yield chunk


def _retryable(status: int, item: Mapping[str, Any]) -> bool:
    if status in RETRYABLE or status >= 500:
        return True
    error = item.get("error")
    if not isinstance(error, Mapping):
        return False
    kind = error.get("type")
    return kind == _CLOSED or (kind == _SHARD_LIMIT and "shards" in str(error.get("reason")))


async def _shadowed(client: AsyncElasticsearch, name: str, index: str) -> tuple[str | None, str | None]:
    """(What applies to `index` instead of template `name`, why that could not be asked). Only a
    check, once the template is in: whatever it meets (a front without the API, its page, a 5xx)
    is said, never a reason not to write or a failed setup."""
    from elasticsearch import ApiError, TransportError

    try:
        return await shadowing(client, name=name, index=index), None
    except ApiError as exc:
        return None, f"{exc.meta.status} {exc.message}"
    except TransportError as exc:
        return None, _failure(exc)
    except ValueError as exc:
        return None, str(exc)


def _failure(exc: TransportError) -> str:
    """Why a connection failed. elastic_transport's str drops the reason once the error holds no
    `errors` (one node): refused, a DNS failure and TLS to a plain port all read "Connection
    error". Its message has aiohttp's reason, and the OSError under that is named when it is
    Python's own: "Connect call failed" never says refused, and a reset (TLS to a plain port)
    reads "[None]"."""
    text, message = str(exc), str(exc.message)
    if message.startswith(text):
        text = message
    elif message not in text:
        text = f"{text}: {message}"
    # aiohttp's ClientConnectorError, raised `from None` by the node: the context, not the cause.
    os_error = getattr(exc.__cause__ or exc.__context__, "os_error", None)
    if isinstance(os_error, OSError) and type(os_error).__module__ == "builtins":
        text += f" ({type(os_error).__name__})"
    return text


def _reason(item: Mapping[str, Any]) -> str:
    error = item.get("error")
    if isinstance(error, Mapping):
        return f"{item.get('status')} {error.get('type')}: {error.get('reason')} (_id {item.get('_id')})"
    return f"{item.get('status')} {error} (_id {item.get('_id')})"


def setup_elasticsearch(
    target: str | ElasticsearchSinkConfig, *, overwrite: bool = True, force: bool = False
) -> list[str]:
    """Install the index template (what `infer-logger setup elasticsearch` runs); lines saying what
    was done. Safe to run again: a template of our version is left as it is. A template of that
    name that is not ours is a SinkError, unless `force` (replace it); so is another template that
    applies to the sink's indices instead of ours (of a higher priority over them)."""
    config = target if isinstance(target, ElasticsearchSinkConfig) else ElasticsearchSinkConfig(url=target)
    example = IndexNamer(config.index).example()

    async def run() -> list[str]:
        from elasticsearch import ApiError, TransportError

        client = config.client()
        try:
            try:
                info = await client.info()
                banner = f"elasticsearch {info.get('version', {}).get('number', '?')} at {config.where}"
            except ApiError as exc:
                # GET / needs the `monitor` cluster privilege, which the setup does not (a key
                # with manage_index_templates alone): the version is only shown.
                if exc.meta.status not in (401, 403):
                    raise
                banner = (f"elasticsearch at {config.where} (version unknown: {exc.meta.status} to GET /, "
                          f"which needs the monitor privilege)")
            patterns = config.template_patterns()
            outcome = await install_template(
                client, name=config.template_name, index_patterns=patterns, overwrite=overwrite, force=force
            )
            retired = outcome in ("created", "updated", "unchanged") and await retire_shared(
                client, name=config.template_name, index_patterns=patterns
            )
            shadow, unchecked = (None, None) if outcome == "foreign" else await _shadowed(
                client, config.template_name, example
            )
        except ApiError as exc:
            error = exc.body.get("error") if isinstance(exc.body, dict) else None
            reason = f": {error.get('reason')}" if isinstance(error, dict) and error.get("reason") else ""
            raise SinkError(
                f"elasticsearch at {config.where} answered {exc.meta.status}: {exc.message}{reason}"
            ) from exc
        except TransportError as exc:
            raise SinkError(f"elasticsearch at {config.where}: {_failure(exc)}") from exc
        finally:
            await client.close()
        if outcome == "foreign":
            raise SinkError(
                f"elasticsearch at {config.where} has an index template {config.template_name} that "
                f"infer-logger did not make (its _meta.managed_by is not {MANAGED_BY!r}): left as it is; "
                f"give another --template-name, or --force to replace it"
            )
        lines = [
            banner,
            f"index template {config.template_name} for {', '.join(patterns)}: {outcome}",
        ]
        if retired:
            lines.append(f"index template {TEMPLATE_NAME}: for {', '.join(INDEX_PATTERNS)} again (an earlier "
                         f"version put {', '.join(patterns)} in it; {config.template_name} takes them)")
        if unchecked:
            lines.append(f"could not check which index template applies to {example}: {unchecked}")
        if shadow:
            # Installed, yet no index gets it: "created" alone hid that.
            raise SinkError(
                f"elasticsearch at {config.where}: {'; '.join(lines[1:])}; but {shadow} applies to new "
                f"indices such as {example} instead (only the highest-priority match does, and "
                f"{config.template_name}'s is {priority(patterns)}), so they get its mappings: lower its "
                f"priority or narrow its patterns"
            )
        return lines

    return asyncio.run(run())
