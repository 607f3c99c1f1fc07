"""In-process subscribers: the sinks of `infer_logger.sinks` (store, file, http, ...) and anything
registered here (an indexer, an explainer), named by `ref: {name: ...}` or given inline as
`component: {type: ..., ...}`.

A component is a `Sink` (`send_batch([event])` is the delivery: SinkError is retried,
RejectedError is not) or a `Replier`, whose `handle(event)` may return a reply event that goes
back into the broker. Each is built once per name (or per identical inline config) and closed
with the broker.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, TypeAlias, runtime_checkable

import orjson
from pydantic import ValidationError

from infer_logger import sinks
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.sinks.base import Sink, SinkConfig

log = logging.getLogger(__name__)


@runtime_checkable
class Replier(Protocol):
    """A component that answers events: a returned event is a reply, None is "taken, no reply".

    Raising SinkError means "retry", RejectedError "never take this event".
    """

    async def handle(self, event: CloudEvent) -> CloudEvent | None: ...

    async def aclose(self) -> None: ...


Component: TypeAlias = Sink | Replier

_EXTRA: dict[str, type[SinkConfig]] = {}
# Types of the project's other packages, imported when a config names them (the explainer's pulls
# in numpy and its extra: not for every broker).
_OPTIONAL = {"explainer": ("explainers.subscriber", "ExplainerComponentConfig", "explain")}


def register_component(config: type[SinkConfig]) -> type[SinkConfig]:
    """Makes a component config usable by `type` in triggers (usable as a class decorator)."""
    kind = config.model_fields["type"].default
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{config.__name__} needs a `type` literal with a default")
    if kind in component_types() and component_types()[kind] is not config:
        raise ValueError(f"a component type {kind!r} is already registered")
    _EXTRA[kind] = config
    return config


def component_types() -> dict[str, type[SinkConfig]]:
    return {**sinks.REGISTRY, **_EXTRA}


def _type(kind: str) -> type[SinkConfig] | None:
    """The config class of a component type, importing the optional ones when first named."""
    if kind in _OPTIONAL and kind not in component_types():
        module, name, extra = _OPTIONAL[kind]
        try:
            register_component(getattr(importlib.import_module(module), name))
        except ImportError as exc:
            raise ValueError(f"component type {kind!r} needs the {extra} extra (pip install "
                             f"'infer-logger[{extra}]'): {exc}") from None
    return component_types().get(kind)


def component_config(spec: Mapping[str, Any]) -> SinkConfig:
    """The validated config of an inline component; ValueError / ValidationError when it is not."""
    kind = spec.get("type")
    config = _type(kind) if isinstance(kind, str) else None
    if config is None:
        known = ", ".join(sorted(component_types()))
        raise ValueError(f"unknown component type {kind!r} (registered: {known})")
    return config.model_validate(dict(spec))


class Components:
    """The live components of one broker, shared by every trigger that names them."""

    def __init__(self, declared: Mapping[str, SinkConfig] | None = None,
                 instances: Mapping[str, Component] | None = None) -> None:
        self.declared = dict(declared or {})
        self._live: dict[str, Component] = dict(instances or {})
        self._given = set(self._live)  # passed in by the caller, who closes them

    def knows(self, name: str) -> bool:
        return name in self._live or name in self.declared or self._default(name) is not None

    def by_name(self, name: str) -> Component:
        component = self._live.get(name)
        if component is None:
            config = self.declared.get(name) or self._default(name)
            if config is None:
                raise KeyError(name)
            component = self._live[name] = config.build()
        return component

    def by_config(self, spec: Mapping[str, Any]) -> Component:
        key = "config:" + orjson.dumps(dict(spec), option=orjson.OPT_SORT_KEYS).decode()
        component = self._live.get(key)
        if component is None:
            component = self._live[key] = component_config(spec).build()
        return component

    @staticmethod
    def _default(name: str) -> SinkConfig | None:
        """`ref: {name: store}` with no declared `store`: the type's defaults, if it has them."""
        try:
            config = _type(name)
            return None if config is None else config()
        except (ValidationError, ValueError):  # e.g. http needs a url: it must be declared
            return None

    async def prune(self, in_use: Iterable[Component]) -> None:
        """Close the inline (`component: {...}`) ones no trigger uses any more: a reload that
        changed or removed them kept each open until the broker exited. Declared ones stay."""
        used = {id(component) for component in in_use}
        for key, component in list(self._live.items()):
            if key.startswith("config:") and key not in self._given and id(component) not in used:
                del self._live[key]
                try:
                    await component.aclose()
                except Exception:  # noqa: BLE001 - a component failing to close must not fail the reload
                    log.exception("component %s: closing it failed", key)

    async def aclose(self) -> None:
        for key, component in list(self._live.items()):
            if key not in self._given:
                await component.aclose()
                del self._live[key]
