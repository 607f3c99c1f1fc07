"""Settings of the sidecar, read once: flags > `INFER_LOGGER_*` env vars > YAML file > defaults.

Top-level fields are the sidecar's (KServe agent flag names, with `_` for `-`); `spool`, `delivery`
and `sinks` are sections. Nested env vars use `__`: `INFER_LOGGER_SPOOL__DURABILITY=memory`.
"""

from __future__ import annotations

import contextvars
import difflib
import itertools
import os
import re
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Self, Union, get_args, get_origin
from urllib.parse import unquote, urlparse

import orjson
import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.exceptions import SettingsError

from infer_logger import documents
from infer_logger.cloudevents.validation import source_setting
from infer_logger.errors import ConfigError
from infer_logger.fields import AttributeText, NamedFile, NamedPath, Seconds
from infer_logger.sinks import FileSinkConfig, HttpSinkConfig, SinkSpec, StoreSinkConfig

# Names under a settings class's prefix that are not its settings: the other services' prefixes,
# and variables read elsewhere (the tests' data, `setup elasticsearch --api-key`).
_OTHER_ENV = (
    "INFER_LOGGER_BROKER_", "INFER_LOGGER_EXPLAINER_", "INFER_LOGGER_INGEST_", "INFER_LOGGER_CONFORMANCE",
    "INFER_LOGGER_ES_API_KEY"
)
# Kubernetes gives every pod of a namespace <SERVICE>_SERVICE_HOST, <SERVICE>_PORT_80_TCP and the like
# for each Service there: one named infer-logger-ui must not stop the sidecar.
# Each "_" a service link's suffix may follow: a Service named infer-logger-service gives
# INFER_LOGGER_SERVICE_PORT, its service INFER_LOGGER_SERVICE, not INFER_LOGGER.
_SERVICE_LINK = re.compile(
    r"_(?=(?:SERVICE_HOST|SERVICE_PORT(?:_\w+)?|PORT(?:_\d+_(?:TCP|UDP|SCTP)(?:_(?:PROTO|PORT|ADDR))?)?)$)"
)


def _service_links(names: Iterable[str]) -> set[str]:
    """Those of `names` (upper-cased) that are Kubernetes' links to a Service whose
    <NAME>_SERVICE_HOST is among them too."""
    upper = {name.upper() for name in names}
    return {name for name in upper
            if any(f"{name[:at.start()]}_SERVICE_HOST" in upper for at in _SERVICE_LINK.finditer(name))}


# A Service named as a prefix (infer-logger, infer-logger-broker) gives <PREFIX>PORT=tcp://<ip>:<port>.
_LINK_VALUE = re.compile(r"(?:tcp|udp|sctp)://[^/\s]+:\d+", re.IGNORECASE)

_yaml_data: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("yaml_data", default={})
# Sections a flag gives anew, of another type than the env var's names: that env section is left out.
_env_replaced: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("env_replaced", default=frozenset())
# False while `load(..., env=False)` builds settings: none is read from env vars.
_env_read: contextvars.ContextVar[bool] = contextvars.ContextVar("env_read", default=True)


class LayeredSettings(BaseSettings):
    """Settings read once: flags (init kwargs) > env vars > a YAML file > defaults.

    Subclasses set their `env_prefix`; `load` is the one way in, and turns a validation error
    into a ConfigError naming the field.
    """

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        env = _EnvSource(settings_cls) if isinstance(env_settings, EnvSettingsSource) else env_settings
        yaml_data = InitSettingsSource(settings_cls, _yaml_data.get())
        return (init_settings, env, yaml_data) if _env_read.get() else (init_settings, yaml_data)

    @field_validator("host", check_fields=False)  # every service's address to listen on
    @classmethod
    def _listen_host(cls, host: str) -> str:
        return listen_host(host)

    @classmethod
    def load(cls, config_file: Path | None = None, *, section: str | None = None, env: bool = True,
             **flags: Any) -> Self:
        """Merge the sources and validate. `section` picks that key of the file when present,
        so one YAML file can configure several services; unset flags (None, empty) are skipped.
        `env=False` reads no env var (a demo that runs every service itself: the user's settings
        of a real one are not its own)."""
        data = read_yaml(config_file) if config_file else {}
        if section and isinstance(data.get(section), dict):
            data = data[section]
        if env:
            cls._refuse_unknown_env()
        given = {k: v for k, v in flags.items() if v is not None and v != () and v != {}}
        try:
            from_env = _EnvSource(cls)() if env else {}
            data = cls._replaced(cls._replaced(data, from_env), given)
            replaced = frozenset(key for key, section in cls._replaced(from_env, given).items()
                                 if section is not from_env[key])
            tokens = _yaml_data.set(data), _env_replaced.set(replaced), _env_read.set(env)
            try:
                settings = cls(**given)
            finally:
                _yaml_data.reset(tokens[0])
                _env_replaced.reset(tokens[1])
                _env_read.reset(tokens[2])
        except ValidationError as exc:
            error = config_error(exc)
            first = exc.errors()[0]
            # `missing`: nothing is at its `loc`; what lacks it was given
            loc = first["loc"][:-1] if first["type"] == "missing" else first["loc"]
            var = cls._env_var(loc, given) if env else None
            raise (ConfigError(f"{var} ({error.field})", error.message) if var else error) from None
        except SettingsError as exc:
            if isinstance(exc.__cause__, ConfigError):  # see _EnvSource
                raise exc.__cause__ from None
            raise ConfigError("environment", str(exc)) from None
        # Text that is not UTF-8 (a byte of a flag or variable that is not, a surrogate escape)
        # taken, a JSON encoder refused it later: a 500 per request, or per /readyz. Not in file
        # names (Path) or secrets (SecretStr): bytes to the system or a digest, and never shown.
        if (found := _not_utf8(settings, ())) is not None:
            place, char = found
            field = ".".join(map(str, place))
            var = cls._env_var(place, given) if env else None
            raise ConfigError(f"{var} ({field})" if var else field,
                              f"holds U+{ord(char):04X}, which is not UTF-8 text (a byte of a flag or variable "
                              "that is not UTF-8, or a surrogate escape): give it in UTF-8")
        return settings

    @classmethod
    def _replaced(cls, data: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
        """The file's data without the sections a flag (or env var) gives anew: a section of
        another `type` (`--db` over the file's http sink) is not merged into, which mixed their
        options. One naming no type is the default's (and replaced) when that type has every key
        it gives and the flag's does not (`source: {port: ...}` with `--source kafka`); else it is
        merged under the flag's type (the env's group id or TLS settings were dropped under
        `--source kafka`, silently), which names a key it lacks (a typo dropped the section)."""
        for key, value in flags.items():
            section = data.get(key)
            if not (isinstance(value, dict) and "type" in value and isinstance(section, dict)):
                continue
            if "type" in section:
                other = section["type"] != value["type"]
            elif (field := cls.model_fields.get(key)) is None:
                continue
            else:
                default = getattr(field.default, "type", None)
                takes = _member_fields(field.annotation, value["type"]) or set()
                theirs = _member_fields(field.annotation, default) or set()
                other = default != value["type"] and set(section) <= theirs and not set(section) <= takes
            if other:
                data = {**data, key: {}}
        return data

    @classmethod
    def _env_var(cls, loc: tuple[int | str, ...], flags: dict[str, Any]) -> str | None:
        """The env var the bad value at `loc` came from, if one did: the error then names it, not
        only the field. Not when a flag or the YAML file gave it: `INFER_LOGGER_SPOOL` may hold
        other keys."""
        env = _EnvSource(cls)()
        if not loc or _holds(flags, loc) or not _holds(env, loc):
            return None
        prefix = str(cls.model_config.get("env_prefix", ""))
        delimiter = cls.model_config.get("env_nested_delimiter") or ""
        # Not past a list's index: an item has no variable of its own; nor a union's tag
        # (`source.forward.port` is SOURCE__PORT).
        keys: list[str] = []
        for part in itertools.takewhile(lambda part: isinstance(part, str), loc):
            if isinstance(env, dict) and part in env:
                keys.append(str(part))
                env = env[part]
        names = [prefix + delimiter.join(keys[:n]) for n in range(1, len(keys) + 1 if delimiter else 2)]
        present = {key.upper(): key for key in os.environ}  # env var names are case-insensitive here
        # The deepest first: `SPOOL__MAX_BYTES` is merged over the JSON of `SPOOL`.
        return next((present[name.upper()] for name in reversed(names) if name.upper() in present), None)

    @classmethod
    def _refuse_unknown_env(cls) -> None:
        """A misspelt top-level variable was ignored (a nested one is refused, `extra="forbid"`)."""
        prefix = str(cls.model_config.get("env_prefix", "")).upper()
        delimiter = cls.model_config.get("env_nested_delimiter")
        if not prefix:
            return
        fields = {name.upper(): name for name in cls.model_fields}
        others = tuple(other for other in _OTHER_ENV if other.startswith(prefix) and other != prefix)
        links = _service_links(os.environ)
        for key in os.environ:
            name = key.upper()
            if not name.startswith(prefix) or name.startswith(others):
                continue
            rest = name[len(prefix):]
            head, nested, _ = rest.partition(delimiter) if delimiter else (rest, "", "")
            if head in fields and not nested:
                continue
            if name in links:
                continue  # a Service's (a name may hold "--": INFER_LOGGER_TIMEOUT__X_SERVICE_HOST)
            if head in fields:
                # pydantic-settings reads NAME__KEY into a section only: under a scalar it was
                # ignored, and under a list it is a key, not an index ("Input should be a valid list").
                field = fields[head]
                keys = _takes_keys(cls.model_fields[field].annotation)
                if keys is None:
                    raise ConfigError(key, f"a list's items cannot be given one by one: give {prefix}{head} "
                                           f"whole, as JSON ({prefix}{head}='[…]')")
                if not keys:
                    raise ConfigError(key, f"matches no setting: {field} has no keys (give {prefix}{head})")
                continue
            # A section's setting given flat is pointed to its section, before a near top-level name
            # (INFER_LOGGER_EXPLAINER_CACHE_BYTES was pointed to ..._RETRIES).
            near = [f"{prefix}{up}{delimiter}{head}" for up, field in fields.items()
                    if delimiter and head in _section_fields(cls.model_fields[field].annotation)]
            near = near or difflib.get_close_matches(name, [prefix + field for field in fields], n=1)
            raise ConfigError(key, "matches no setting" + (f" (did you mean {near[0]}?)" if near else ""))


def _section_fields(annotation: Any) -> set[str]:
    """The names (upper case) of a section's settings: a model's fields, or a union's model's."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {name.upper() for name in annotation.model_fields}
    return {name for arg in get_args(annotation) for name in _section_fields(arg)}


def _member_fields(annotation: Any, type_name: object) -> set[str] | None:
    """The settings (as written, aliases too) of the union member whose `type` is `type_name`."""
    if get_origin(annotation) is Annotated:
        return _member_fields(get_args(annotation)[0], type_name)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        own = annotation.model_fields.get("type")
        if own is None or own.default != type_name:
            return None
        return set(annotation.model_fields) | {f.alias for f in annotation.model_fields.values() if f.alias}
    return next((found for arg in get_args(annotation) if (found := _member_fields(arg, type_name)) is not None),
                None)


def _takes_keys(annotation: Any) -> bool | None:
    """Whether a setting of this type is a section, whose keys `NAME__KEY` variables give: a
    model, a map, or a union holding one. None for a list: pydantic-settings reads no `NAME__0`."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _takes_keys(get_args(annotation)[0])
    if origin is Union or origin is UnionType:
        found = [_takes_keys(arg) for arg in get_args(annotation)]
        return True if any(found) else None if None in found else False
    kind = origin if origin is not None else annotation  # list[str]: list; Literal[...]: no type
    if not isinstance(kind, type):
        return False
    return None if issubclass(kind, list | tuple | set | frozenset) else issubclass(kind, BaseModel | Mapping)


def _not_utf8(value: object, place: tuple[int | str, ...]) -> tuple[tuple[int | str, ...], str] | None:
    """Where in validated settings text holds a surrogate (`documents.first_surrogate`), and which
    one. Path and SecretStr values (file names, keys: bytes to the system or a digest) are left alone."""
    if isinstance(value, str):
        bad = documents.first_surrogate(value)
        return None if bad is None else (place, bad)
    if isinstance(value, BaseModel):
        items: Iterable[tuple[Any, object]] = ((name, getattr(value, name)) for name in type(value).model_fields)
    elif isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:  # numbers, Path, SecretStr, ...
        return None
    for key, item in items:
        found = _not_utf8(key, place) or _not_utf8(item, (*place, key))
        if found is not None:
            return found
    return None


def listen_host(host: str) -> str:
    """An address to listen on, checked as getaddrinfo reads a name (IDNA): `my..host`, or a label
    over 63 characters, was a UnicodeError traceback at start, where a bad port is a message."""
    try:
        host.encode("idna")
    except UnicodeError as exc:
        raise ValueError(f"{host!r} is not a host name or address: {exc.__cause__ or exc}") from None
    return host


def _holds(data: Any, loc: tuple[int | str, ...]) -> bool:
    """Whether `data`, one source's input, gave the value at `loc`."""
    for index, part in enumerate(loc):
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and -len(data) <= part < len(data):
            data = data[part]
        elif isinstance(data, dict) and (part in data.values() or (index + 1 < len(loc) and loc[index + 1] in data)):
            # A union's tag, not a key: sinks.0.http.url; source.forward.port when the tag was
            # left to its default (not in this input)
            continue
        else:
            return not isinstance(data, dict | list)  # a scalar given where a section goes is what is bad
    return True


class _EnvSource(EnvSettingsSource):
    """The env var source, whose JSON errors name the variable and show the form it takes
    (pydantic_settings says only that a field's value could not be parsed); without the sections
    a flag of another type gives anew (`load`), which were merged into the flag's."""

    def __call__(self) -> dict[str, Any]:
        replaced = _env_replaced.get()
        return {key: value for key, value in super().__call__().items() if key not in replaced}

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # Not a link to a Service named with "--" (infer-logger-sinks--x): read as a key of the
        # setting (SINKS__X_SERVICE_HOST), it failed the start, naming no variable. One without
        # is a setting's (`<PREFIX>PORT`: see get_field_value).
        env = super()._load_env_vars()
        delimiter = (self.env_nested_delimiter or "").upper()
        links = {name for name in _service_links(env) if delimiter and delimiter in name}
        return {key: value for key, value in env.items() if key.upper() not in links}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Not a Kubernetes service link's value: `<PREFIX>PORT`, the port of the Service named
        as the prefix (`infer-logger`), or `<PREFIX>COMPONENT_PORT`, of `infer-logger-component`."""
        value, key, complex_ = super().get_field_value(field, field_name)
        if field_name.endswith("port") and isinstance(value, str) and _LINK_VALUE.fullmatch(value.strip()):
            host = f"{self.env_prefix}{field_name.removesuffix('port')}SERVICE_HOST".upper()
            if (host if self.case_sensitive else host.lower()) in self.env_vars:
                return None, key, complex_
        return value, key, complex_

    def prepare_field_value(self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool) -> Any:
        try:
            return super().prepare_field_value(field_name, field, value, value_is_complex)
        except ValueError as exc:
            name = f"{self.env_prefix}{field_name}".upper()
            if value is None:  # from a nested variable: NAME__KEY
                raise ConfigError(f"{name}__…", f"not valid JSON: {exc}") from None
            if isinstance(field.default, list):
                example = f"""{name}='["…", "…"]'"""
            else:
                example = f"""{name}='{{"key": "…"}}' or {name}__KEY=… (a key lower-cased)"""
            raise ConfigError(name, f"not valid JSON ({exc}): e.g. {example}") from None


def comma_list(value: Any, separator: str = ",") -> Any:
    """A list given as one string (an env var, a YAML scalar): JSON when it starts with `[`,
    else items split at `separator` (a regex)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not a JSON list ({exc}); or give the items separated by commas") from None
    return [item.strip() for item in re.split(separator, text) if item.strip()]


class SpoolSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dir: NamedPath = Path("infer-logger-data/spool")
    """Where spool segments, sink checkpoints and dead letters live."""
    durability: Literal["disk", "memory"] = "disk"
    """`disk`: every event a client saw survives kill -9. `memory`: faster; a restart loses what
    the sinks had not taken yet."""
    segment_bytes: ByteSize = Field(ByteSize(16 << 20), gt=0)
    """Size of a spool file, the unit in which delivered events are deleted (and `drop_oldest`
    drops). At most a quarter of `max_bytes` is used, so a small cap just works."""
    max_bytes: ByteSize = Field(ByteSize(1 << 30), gt=0)
    """Cap on spool size, on disk or in memory (`durability: memory`); past it the overflow
    policy applies (and is counted). At least 4 x `max_payload_bytes`."""
    overflow: Literal["drop_newest", "drop_oldest"] = "drop_newest"
    """`drop_newest` refuses new events; `drop_oldest` deletes the oldest segment and counts the
    events in it that a sink had not taken yet (all of them when delivery runs in its process)."""
    fsync_interval: Seconds | None = Field(None, gt=0)
    """Seconds between fsyncs of the spool; unset = never (page cache only, survives kill -9)."""
    memory_max_events: int = Field(100_000, ge=1)
    """Bound on the events of the in-memory log when `durability: memory` (`max_bytes` bounds
    its size); past it the overflow policy applies."""

    @field_validator("dir", mode="before")
    @classmethod
    def _named(cls, value: object) -> object:
        # Path("") is ".": segments, locks and checkpoints were spread in the working directory.
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: name the spool directory")
        return value


class DeliverySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["process", "inline"] = "process"
    """`process`: the sink workers run in a child process that reads the disk spool, so sink
    work never competes with the proxy for the GIL. `inline`: in the sidecar's own event loop
    (always so with `durability: memory`)."""

    priority: Literal["idle", "low", "normal"] = "idle"
    """CPU priority of the delivery process (`mode: process`) once it has caught up with the
    spool. `idle` (Linux SCHED_IDLE, else nice 19): it runs on CPU the proxy and the predictor
    leave over, so under saturating load logging costs inference little and delivery lags
    (the spool holds it); `low`: nice 19; `normal`: an equal share."""
    catch_up_bytes: ByteSize | None = None
    """Backlog past which a lowered delivery process is restarted at normal priority until it
    has caught up (so a saturated machine fills the spool no further). Default: a quarter of
    `spool.max_bytes`."""

    batch_size: int = Field(500, ge=1)
    in_flight: int = Field(1, ge=1, le=64)
    """Batches a sink may hold at once (per-sink `in_flight` overrides); 1 keeps spool order."""
    backoff_initial: Seconds = Field(0.1, gt=0)
    backoff_max: Seconds = Field(5.0, gt=0)
    """Cap of the jittered backoff; also how long a recovered sink may wait for its first retry."""
    retry_after_max: Seconds = Field(60.0, ge=0)
    """The longest wait a sink's receiver may ask for with Retry-After (429, 503)."""
    linger: Seconds = Field(0.05, ge=0)
    """Seconds a sink worker waits after new events arrive, so they go out in one batch."""
    drain_timeout: Seconds = Field(5.0, ge=0)
    """Seconds to keep delivering at shutdown; what is left stays in the spool for next start."""


class Settings(LayeredSettings):
    model_config = SettingsConfigDict(
        env_prefix="INFER_LOGGER_", env_nested_delimiter="__", extra="forbid", populate_by_name=True
    )

    host: str = Field("127.0.0.1", min_length=1)
    """Address to listen on (use 0.0.0.0 in a pod). Empty is refused: asyncio reads it as every
    address (an unset manifest value gives it)."""
    port: int = Field(9081, ge=0, le=65535)
    component_port: int = Field(8080, ge=1, le=65535)
    """Port of the predictor on localhost (KServe's agent flag)."""
    predictor_url: str | None = None
    """Predictor base URL; overrides --component-port."""
    log_url: Annotated[list[str], NoDecode] = []
    """Shorthand sinks: http(s)://… (http sink), file://….jsonl (file sink), sqlite://…db (store).
    As one string (an env var): a URL, several separated by commas, or a JSON list. Each is a sink
    named by its type, the second of a type `<type>2`, and so on."""
    log_tls_skip_verify: bool = False
    """The https sinks `log_url` makes take any certificate (KServe's --logger-tls-skip-verify)."""
    log_ca_cert_file: NamedFile | None = None
    """A PEM file of the CAs those sinks trust (KServe's --logger-ca-cert-file); a file that is not
    there leaves the system's (KServe mounts it from an optional ConfigMap)."""
    log_mode: Literal["all", "request", "response"] = "all"
    source_uri: str | None = Field(None, validate_default=True)
    """CloudEvents `source`, a URI reference; defaults to the sidecar's own URL (so with `port` 0,
    any free port, it must be given)."""
    inference_service: AttributeText = ""
    namespace: AttributeText = ""
    component: AttributeText = "predictor"
    endpoint: AttributeText = ""
    metadata_headers: Annotated[list[str], NoDecode] = []
    """Request headers copied into the `metadata` attribute (case-insensitive); as one string,
    comma-separated or a JSON list."""
    annotations: dict[str, str] = {}
    max_payload_bytes: ByteSize = ByteSize(900 << 10)
    """Payloads longer than this are logged cut short with `truncated: true`. 900 KiB: an event
    cut to 1 MiB, its attributes added, was over the broker's `max_event_bytes` (1 MiB) and Kafka's
    record limit (1,000,000 bytes), and refused by both."""
    max_request_bytes: ByteSize = ByteSize(256 << 20)
    """Request bodies longer than this are refused with 413: the sidecar holds a request whole
    while it forwards it, so this bounds its memory."""
    timeout: Seconds = Field(60.0, gt=0)
    """Seconds to wait for the predictor before answering 504."""
    request_read_timeout: Seconds = Field(60.0, gt=0)
    """Seconds a request's head and body may take to arrive, from its first byte, plus one per MiB
    that arrived (a 256 MiB upload at 1 MiB/s passes), before it is answered 408 and the connection
    closed (a client sending it a byte at a time would hold the connection for ever). Under
    `server: uvicorn` the body only: uvicorn reads the head."""
    server: Literal["httptools", "uvicorn"] = "httptools"
    """`httptools`: the sidecar's own HTTP/1.1 server (a third of uvicorn's CPU per request);
    `uvicorn`: the same proxy as an ASGI app under uvicorn."""
    spool: SpoolSettings = SpoolSettings()
    delivery: DeliverySettings = DeliverySettings()
    sinks: list[SinkSpec] = Field([], validate_default=True)  # checked against log_url's even when unset
    """Sinks in full; with none here or in --log-url the embedded store is used."""

    @field_validator("sinks")
    @classmethod
    def _sinks_named_once(cls, sinks: list[SinkSpec]) -> list[SinkSpec]:
        seen: set[str] = set()
        for sink in sinks:
            if sink.sink_name in seen:
                raise ValueError(f"two sinks are named {sink.sink_name!r}: give them distinct `name`s")
            seen.add(sink.sink_name)
        return sinks

    @field_validator("sinks")
    @classmethod
    def _one_sink_per_file(cls, sinks: list[SinkSpec], info: ValidationInfo) -> list[SinkSpec]:
        """Two file sinks on one file (`file://e.jsonl` and `file://./e.jsonl`, or one in `sinks`
        and one in `log_url`) wrote every event twice, and each could cut the other's lines."""
        files = [sink for sink in sinks if isinstance(sink, FileSinkConfig)]
        for url in info.data.get("log_url") or ():
            if isinstance(sink := sink_from_url(url), FileSinkConfig):
                files.append(sink)
        seen: dict[object, Path] = {}
        for sink in files:
            try:  # what it is, links followed (/dev/stdout to the pipe it is now)
                found = os.stat(sink.path)
            except OSError:  # not there yet: its name tells
                key: object = os.path.realpath(sink.path)
            else:
                if stat.S_ISCHR(found.st_mode):
                    continue  # a terminal, /dev/null: each write whole, nothing to cut
                key = (found.st_dev, found.st_ino)
            if key in seen:  # a pipe too: a batch over its buffer is written in pieces, lines mixed
                raise ValueError(f"file sinks on {seen[key]} and {sink.path} write one file: give each its own")
            seen[key] = sink.path
        return sinks

    @field_validator("spool")
    @classmethod
    def _room_for_events(cls, spool: SpoolSettings, info: ValidationInfo) -> SpoolSettings:
        # A cap of a few payloads holds no backlog worth the name, and one below a payload
        # refuses every event that size.
        payload = info.data.get("max_payload_bytes")
        if payload is not None and spool.max_bytes < 4 * payload:
            raise ValueError(
                f"spool.max_bytes ({spool.max_bytes.human_readable()}) must be at least 4 x max_payload_bytes "
                f"({payload.human_readable()}): raise spool.max_bytes or lower max_payload_bytes")
        return spool

    @field_validator("log_url", mode="before")
    @classmethod
    def _urls(cls, value: Any) -> Any:
        # Split only at a comma before a sink URL's scheme and `//`: a URL's own commas (a
        # query's `tags=env,team:ml`, a password's `p,w:d`) stay.
        return comma_list(value, r"(?i),\s*(?=(?:https?|file|sqlite)://)")

    @field_validator("metadata_headers", mode="before")
    @classmethod
    def _headers(cls, value: Any) -> Any:
        return comma_list(value)

    @field_validator("source_uri")
    @classmethod
    def _uri_reference(cls, uri: str | None, info: ValidationInfo) -> str | None:
        if not uri and info.data.get("port") == 0:  # every event's source said :0 ("" is unset too)
            raise ValueError("port 0 picks any free port, which the events' source cannot name: set it "
                             "(--source-uri)")
        return source_setting(uri, "http://my-model/ or /my-model")

    @field_validator("predictor_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        return http_url(url)

    @field_validator("log_url")
    @classmethod
    def _known_schemes(cls, urls: list[str]) -> list[str]:
        for url in urls:
            sink_from_url(url)
        if len(set(urls)) < len(urls):
            twice = next(url for url in urls if urls.count(url) > 1)
            raise ValueError(f"{twice!r} is given twice")
        return urls

    def all_sinks(self) -> list[SinkSpec]:
        sinks: list[SinkSpec] = list(self.sinks)
        taken = {s.sink_name for s in self.sinks}
        ca = self.log_ca_cert_file if self.log_ca_cert_file and Path(self.log_ca_cert_file).is_file() else None
        for url in self.log_url:
            sink = sink_from_url(url)
            if isinstance(sink, HttpSinkConfig):
                sink = sink.model_copy(update={"tls_verify": not self.log_tls_skip_verify, "ca_certs": ca})
            name, n = sink.sink_name, 1
            while name in taken:  # several --log-url of one type: http, http2, …
                n += 1
                name = f"{sink.sink_name}{n}"
            taken.add(name)
            sinks.append(sink.model_copy(update={"name": name}))
        return sinks or [StoreSinkConfig()]

    def destinations(self) -> dict[str, str]:
        """Where each sink delivers, by name (`SinkConfig.destination`). Names of `--log-url` sinks
        go by place (`http`, `http2`), a checkpoint by its sink's name: the spool keeps the
        destination with it, so that a sink given another's name does not take its checkpoint
        (events it never had, skipped), and a renamed one finds its own (no events sent twice)."""
        return {spec.sink_name: spec.destination() for spec in self.all_sinks()}

    @property
    def source(self) -> str:
        """The events' `source`: `source_uri`, else the sidecar's URL."""
        return self.source_uri or self.url

    @property
    def url(self) -> str:
        """The sidecar's own URL (an IPv6 host in brackets, its zone's `%` escaped, RFC 6874:
        `http://:::9081/` is no URI)."""
        host = f"[{self.host.replace('%', '%25')}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def upstream(self) -> str:
        return (self.predictor_url or f"http://127.0.0.1:{self.component_port}").rstrip("/")


def http_url(url: str | None) -> str | None:
    """A predictor's base URL, checked: `localhost:8080` parses as scheme `localhost`, and was
    only refused by the first request's connection error."""
    if url is not None:
        parts = urlparse(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s)://host[:port] URL")
        try:  # as the client reads them: a port out of range, or a host IDNA refuses, was a traceback
            parts.port  # noqa: B018
            parts.hostname.encode("idna")
        except ValueError as exc:  # UnicodeError too
            raise ValueError(f"{url!r} is not an http(s)://host[:port] URL: {exc.__cause__ or exc}") from None
    return url


def sink_from_url(url: str) -> SinkSpec:
    """A `--log-url` value as a sink config (KServe's flag takes only a URL)."""
    parts = urlparse(url)
    if parts.scheme in ("http", "https"):
        return HttpSinkConfig(url=url)
    if parts.scheme not in ("file", "sqlite"):
        raise ValueError(f"{url!r}: scheme must be http, https, file or sqlite")
    # A query or fragment was taken into the file's name (`a.db?cache=shared`): no option is read from one.
    if "?" in url or "#" in url:
        raise ValueError(f"{url!r}: a {parts.scheme} URL takes no query or fragment, it names a file "
                         "(a `?` or `#` in the file's name is %3F, %23)")
    # What follows `//` is the path, relative unless it starts with `/`: file://events.jsonl and
    # sqlite://audit.db are files in the working directory, file:///var/log/e.jsonl is absolute
    # (as is file://localhost/var/log/e.jsonl, RFC 8089). Percent-decoded, as a URL's path is
    # (`my%20audit.db` was a file of that name); a `%` starting no escape stays as written.
    path = url.split("://", 1)[1] if "://" in url and parts.netloc != "localhost" else parts.path
    try:
        path = unquote(path, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"{url!r}: its %-escapes are not UTF-8 text") from None
    if not path or path.endswith("/"):
        name = "events.jsonl" if parts.scheme == "file" else "audit.db"
        raise ValueError(f"{url!r} names no file (e.g. {parts.scheme}://{name}, {parts.scheme}:///abs/{name})")
    if parts.scheme == "file":
        return FileSinkConfig(path=Path(path))
    return StoreSinkConfig(path=path)


class _Loader(documents.Loader):
    """`yaml.safe_load`, but a key given twice in one mapping is an error (the last one won,
    unseen), and so is a key that is not text (YAML 1.1 reads `on`, `off`, `yes`, `no` as
    booleans: settings code took `off: true` for a string and failed with a traceback). As for
    trigger files, nesting is bounded (5000 `[` was a RecursionError) and timestamps stay text."""


def _mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    _check_keys(loader, node, deep, set())
    return loader.construct_mapping(node, deep)


def _check_keys(loader: _Loader, node: yaml.MappingNode, deep: bool, checked: set[int]) -> None:
    checked.add(id(node))  # a mapping merged into itself (`a: &x {<<: *x}`) is checked once
    seen: set[str] = set()
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden,
            merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for mapping in merged:  # but checked too (an inline one is never constructed alone)
                if isinstance(mapping, yaml.MappingNode) and id(mapping) not in checked:
                    _check_keys(loader, mapping, deep, checked)
            continue
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, str):
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} is not text (quote it: YAML reads on/off/yes/no as booleans)",
                key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                    key_node.start_mark)
        seen.add(key)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read config file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), f"not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_Loader) or {}  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", exc)
        raise ConfigError(where, problem if isinstance(exc, documents.LimitError) else f"not valid YAML: {problem}") from exc
    if not isinstance(data, dict):
        raise ConfigError(str(path), "the top level must be a mapping")
    return data


def load_settings(config_file: Path | None = None, **flags: Any) -> Settings:
    """The sidecar's settings; ConfigError names the first bad field."""
    return Settings.load(config_file, **flags)


def config_error(exc: ValidationError) -> ConfigError:
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"]) or "settings"
    return ConfigError(field, error["msg"])
