"""Trigger filters: Knative's legacy `filter.attributes` and the Subscriptions API `filters` dialects.

A filter is built once from a trigger's spec (`build_trigger_filter`), validating it the way
Knative's webhook does, and then called with an event's attribute mapping for every event. It
answers PASS, FAIL or NO_FILTER (the filter abstains); only FAIL stops a delivery.

    all:  FAIL at the first FAIL child, else the children combined (empty: NO_FILTER)
    any:  PASS at the first PASS child, else the children combined (empty: NO_FILTER)
    not:  swaps PASS and FAIL; NO_FILTER stays
    cesql: PASS on TRUE without errors; any other result or any evaluation error is FAIL

Validation errors carry the Knative-style path (`filters[0].exact[invALID]`) and the raw path
(for pointing at a YAML line). Filters nest at most MAX_NESTING levels, as CESQL expressions do.

Attribute values are strings (Kubernetes refuses anything else in these maps). A number or boolean
is taken as its text: `written(path)` gives the text a YAML file had there (`007`, not `7`;
`no`, not `false`); without it, `attribute_text` makes one.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias

from infer_logger.cloudevents.event import AttributeValue, attribute_text
from pipelines.cesql import CesqlParseError, Expression, ValueType
from pipelines.cesql import parse as parse_cesql
from pipelines.cesql.nodes import Attribute as AttributeNode
from pipelines.cesql.parser import mixed_logic
from pipelines.cesql.values import cast as cast_value

log = logging.getLogger(__name__)

Attributes: TypeAlias = Mapping[str, AttributeValue]
PathPart: TypeAlias = "str | int | Key"

Written: TypeAlias = Callable[[tuple[PathPart, ...]], "str | None"]
# Told of a valid filter read otherwise than its writer may think: (path, reason, CESQL position).
Warn: TypeAlias = Callable[[tuple[PathPart, ...], str, "int | None"], None]

ATTRIBUTE_NAME = re.compile(r"[a-z][a-z0-9]*")
DIALECTS = ("exact", "prefix", "suffix", "all", "any", "not", "cesql")
MAX_NESTING = 40
"""all/any/not levels: deeper filters are refused (building and matching recurse per level)."""


class FilterResult(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    NO_FILTER = "no-filter"

    def and_(self, other: FilterResult) -> FilterResult:
        if self is FilterResult.NO_FILTER:
            return other
        if other is FilterResult.NO_FILTER or self is other:
            return self
        return FilterResult.FAIL

    def or_(self, other: FilterResult) -> FilterResult:
        if self is FilterResult.NO_FILTER:
            return other
        if other is FilterResult.NO_FILTER or self is other:
            return self
        return FilterResult.PASS


PASS, FAIL, NO_FILTER = FilterResult.PASS, FilterResult.FAIL, FilterResult.NO_FILTER

Filter: TypeAlias = Callable[[Attributes], FilterResult]


class Key(str):
    """A map key in a filter path: printed as `[key]`, as Knative's field errors do."""


class FilterError(ValueError):
    """An invalid filter; `path` is the raw path, str(self) the Knative-style path and reason."""

    def __init__(self, path: tuple[PathPart, ...], reason: str, *, column: int | None = None) -> None:
        super().__init__(f"{format_path(path)}: {reason}")
        self.path = path
        self.reason = reason
        self.column = column  # offset inside the scalar at `path` (a CESQL parse error's position)


def format_path(path: Sequence[PathPart]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int | Key):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _text(value: AttributeValue) -> str:
    return value if type(value) is str else attribute_text(value)


class Delivered(Mapping[str, str]):
    """An event's attributes as its subscriber gets them, which is what every filter sees: each
    value as its text (binary HTTP carries text, and a Kafka channel stores the binary binding:
    a typed value would pass or fail by the channel) and without `hidden` (the broker's TTL,
    which Knative drops before filtering)."""

    __slots__ = ("_attributes", "_hidden")

    def __init__(self, attributes: Attributes, hidden: str) -> None:
        self._attributes = attributes
        self._hidden = hidden

    def __getitem__(self, name: str) -> str:
        if name == self._hidden:
            raise KeyError(name)
        return _text(self._attributes[name])

    def get(self, name: str, default: Any = None) -> Any:  # the filters' one lookup: no KeyError
        value = self._attributes.get(name)
        return default if value is None or name == self._hidden else _text(value)

    def __contains__(self, name: object) -> bool:  # Mapping's goes through __getitem__ and a KeyError
        return name != self._hidden and name in self._attributes

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._attributes if name != self._hidden)

    def __len__(self) -> int:
        return len(self._attributes) - (self._hidden in self._attributes)


def _no_filter(attributes: Attributes) -> FilterResult:
    return NO_FILTER


# -- leaves ------------------------------------------------------------------------------------


class AttributesFilter:
    """Legacy `filter.attributes`: every key present; "" = any non-empty value, else exact match."""

    __slots__ = ("items",)

    def __init__(self, attributes: Mapping[str, str]) -> None:
        self.items = tuple(attributes.items())

    def __call__(self, attributes: Attributes) -> FilterResult:
        for name, wanted in self.items:
            value = _legacy_lookup(attributes, name)
            if value is None or value == "" or (wanted and value != wanted):
                return FAIL
        return PASS


def _legacy_lookup(attributes: Attributes, name: str) -> str | None:
    # Knative's aliases from CloudEvents 0.3 days; `time` compares as its RFC 3339 text.
    if name == "schemaurl":
        name = "dataschema"
    elif name == "datamediatype":
        content_type = attributes.get("datacontenttype")
        return None if content_type is None else _text(content_type).split(";", 1)[0].strip()
    value = attributes.get(name)
    return None if value is None else _text(value)


class ExactFilter:
    __slots__ = ("items",)

    def __init__(self, attributes: Mapping[str, str]) -> None:
        self.items = tuple(attributes.items())

    def __call__(self, attributes: Attributes) -> FilterResult:
        for name, wanted in self.items:
            value = attributes.get(name)
            if value is None or _text(value) != wanted:
                return FAIL
        return PASS


class PrefixFilter(ExactFilter):
    def __call__(self, attributes: Attributes) -> FilterResult:
        for name, wanted in self.items:
            value = attributes.get(name)
            if value is None or not _text(value).startswith(wanted):
                return FAIL
        return PASS


class SuffixFilter(ExactFilter):
    def __call__(self, attributes: Attributes) -> FilterResult:
        for name, wanted in self.items:
            value = attributes.get(name)
            if value is None or not _text(value).endswith(wanted):
                return FAIL
        return PASS


class CesqlFilter:
    __slots__ = ("bare", "expression")

    def __init__(self, expression: Expression) -> None:
        self.expression = expression
        self.bare = isinstance(expression.tree, AttributeNode)

    def __call__(self, attributes: Attributes) -> FilterResult:
        value, errors = self.expression.evaluate(attributes)
        if self.bare and isinstance(value, str):
            # Filters see text (`Delivered`): `cesql: sampled` on a boolean extension yields the
            # String "true", which passes as the Boolean it is cast to ("yes" fails: a cast error).
            # Only a bare attribute: any other String result fails, as the spec says (STRING(TRUE)
            # or UPPER('true') passed).
            value, error = cast_value(value, ValueType.BOOLEAN)
            errors = [*errors, error] if error else errors
        if errors and log.isEnabledFor(logging.DEBUG):
            # The spec's answer (no match) says nothing of why: a mistyped comparison dropped
            # every event unsaid (Knative logs these at debug too).
            log.debug("CESQL %r: %s error: %s (the filter fails)", self.expression.source, errors[0].kind,
                      errors[0].message)
        return PASS if value is True and not errors else FAIL


# -- combinators -------------------------------------------------------------------------------


class AllFilter:
    __slots__ = ("filters",)

    def __init__(self, filters: Sequence[Filter]) -> None:
        self.filters = tuple(filters)

    def __call__(self, attributes: Attributes) -> FilterResult:
        result = NO_FILTER
        for child in self.filters:
            result = result.and_(child(attributes))
            if result is FAIL:
                return FAIL
        return result


class AnyFilter(AllFilter):
    def __call__(self, attributes: Attributes) -> FilterResult:
        result = NO_FILTER
        for child in self.filters:
            result = result.or_(child(attributes))
            if result is PASS:
                return PASS
        return result


class NotFilter:
    __slots__ = ("inner",)

    def __init__(self, inner: Filter) -> None:
        self.inner = inner

    def __call__(self, attributes: Attributes) -> FilterResult:
        result = self.inner(attributes)
        return PASS if result is FAIL else FAIL if result is PASS else NO_FILTER


# -- building (and validating) from a spec -----------------------------------------------------


def build_trigger_filter(attributes: Mapping[str, Any] | None, filters: Sequence[Any] | None, *,
                         validate: bool = True, written: Written | None = None,
                         warn: Warn | None = None) -> Filter:
    """The filter of a trigger: a non-empty `filters` wins over `filter.attributes`.

    Both are validated even when `filters` wins, as Knative's webhook does. `validate=False`
    skips the attribute-name rule only (as Knative's filter code, behind its webhook, does).
    `written` gives the source text of a non-string value at a path (see the module docstring).
    """
    legacy = build_attributes_filter(attributes, ("filter", "attributes"), validate=validate, written=written)
    if filters:
        return build_filters(filters, ("filters",), validate=validate, written=written, warn=warn)
    return legacy


def build_attributes_filter(attributes: Mapping[str, Any] | None, path: tuple[PathPart, ...], *,
                            validate: bool = True, written: Written | None = None) -> Filter:
    if attributes is None:
        return _no_filter
    checked = _attribute_map(attributes, path, allow_empty_values=True, validate=validate, written=written)
    return AttributesFilter(checked) if checked else _no_filter


def build_filters(filters: Sequence[Any], path: tuple[PathPart, ...], *, validate: bool = True,
                  written: Written | None = None, warn: Warn | None = None) -> Filter:
    """A `filters` list: its members are ANDed; an empty list does not filter."""
    if not isinstance(filters, list):
        raise FilterError(path, f"must be a list of filters, not {_kind(filters)}")
    children = [build_filter(item, (*path, i), validate=validate, written=written, warn=warn)
                for i, item in enumerate(filters)]
    if not children:
        return _no_filter
    return children[0] if len(children) == 1 else AllFilter(children)


def build_filter(spec: Any, path: tuple[PathPart, ...], *, validate: bool = True, written: Written | None = None,
                 warn: Warn | None = None, _nesting: int = 0) -> Filter:
    """One Subscriptions API filter object: exactly one dialect (none set = no filter)."""
    if spec is None:
        return _no_filter
    if _nesting > MAX_NESTING:
        raise FilterError(path, f"filters nested deeper than {MAX_NESTING} levels of all, any and not")
    if not isinstance(spec, Mapping):
        raise FilterError(path, f"a filter is a mapping with one dialect, not {_kind(spec)}")
    unknown = [str(k) for k in spec if k not in DIALECTS]
    if unknown:
        raise FilterError((*path, unknown[0]), f"unknown filter dialect; use one of {', '.join(DIALECTS)}")
    # As Knative counts them: an empty map, list or expression beside the real one is no dialect
    # (Knative-valid filters with `exact: {}` next to a `prefix` were refused as two dialects).
    present = [d for d in DIALECTS if _given(d, spec.get(d))]
    if len(present) > 1:
        raise FilterError(
            path, f"multiple dialects found ({', '.join(present)}), filters can have only one dialect set"
        )
    if not present:
        return _no_filter
    dialect = present[0]
    value, here = spec[dialect], (*path, dialect)
    if dialect in ("exact", "prefix", "suffix"):
        checked = _attribute_map(value, here, allow_empty_values=False, validate=validate, written=written)
        if not checked:
            return _no_filter
        return {"exact": ExactFilter, "prefix": PrefixFilter, "suffix": SuffixFilter}[dialect](checked)
    if dialect in ("all", "any"):
        if not isinstance(value, list):
            raise FilterError(here, f"must be a list of filters, not {_kind(value)}")
        children = [build_filter(item, (*here, i), validate=validate, written=written, warn=warn,
                                 _nesting=_nesting + 1)
                    for i, item in enumerate(value)]
        if not children:
            return _no_filter
        return AllFilter(children) if dialect == "all" else AnyFilter(children)
    if dialect == "not":
        return NotFilter(build_filter(value, here, validate=validate, written=written, warn=warn,
                                      _nesting=_nesting + 1))
    return _cesql(value, here, warn or _log_warning)


def _given(dialect: str, value: Any) -> bool:
    """Whether `dialect` is set: an empty value of its own type is not (one of another type is,
    for its check to refuse it: `cesql: []` passed every event)."""
    if value is None:
        return False
    own = {"all": list, "any": list, "cesql": str, "not": None}.get(dialect, Mapping)
    return own is None or not (isinstance(value, own) and not value)


def _log_warning(path: tuple[PathPart, ...], reason: str, column: int | None) -> None:
    log.warning("%s: %s", format_path(path) or "cesql", reason)


def _cesql(value: Any, path: tuple[PathPart, ...], warn: Warn) -> Filter:
    if not isinstance(value, str):
        raise FilterError(path, f"must be a CESQL expression string, not {_kind(value)}")
    if value == "":  # as Knative: only an empty one is no filter (a blank one delivered every event)
        return _no_filter
    try:
        expression = parse_cesql(value)
    except CesqlParseError as exc:
        reason = f"invalid CESQL {value!r}: {exc.reason} at position {exc.position}"
        raise FilterError(path, reason, column=exc.position) from None
    # The functions are known now: a misspelt one failed every event, and no one was told.
    if calls := expression.unresolved_calls():
        call = calls[0]
        reason = (f"invalid CESQL {value!r}: no function {call.name} of {len(call.arguments)} "
                  f"argument{'s' if len(call.arguments) != 1 else ''} at position {call.position}")
        raise FilterError(path, reason, column=call.position)
    if (mixed := mixed_logic(value)) is not None:  # valid, and read as the spec says: said, not refused
        warn(path, f"CESQL {value!r} mixes AND, OR or XOR without parentheses at position {mixed}: read left "
                   "to right as the CESQL spec says (`a OR b AND c` is `(a OR b) AND c`), where Knative reads it "
                   "right to left: parenthesise it", mixed)
    for negated, attribute in expression.negated_attributes():
        if value[attribute.position + len(attribute.name):].lstrip().startswith(")"):
            continue  # `(NOT sampled) = TRUE`: parenthesised as meant
        warn(path, f"CESQL {value!r}: NOT at position {negated.position} applies to {attribute.name} "
                   f"alone, as the CESQL grammar binds it (`NOT a = b` is `(NOT a) = b`, which fails every event "
                   "whose attribute is not a boolean): write NOT (...) around the comparison", negated.position)
    return CesqlFilter(expression)


def _attribute_map(value: Any, path: tuple[PathPart, ...], *, allow_empty_values: bool,
                   validate: bool, written: Written | None) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise FilterError(path, f"must be a mapping of attribute name to value, not {_kind(value)}")
    checked: dict[str, str] = {}
    for name, wanted in value.items():
        here = (*path, Key(str(name)))
        if not isinstance(name, str) or (validate and not ATTRIBUTE_NAME.fullmatch(name)):
            raise FilterError(
                here, "Attribute name must start with a letter and can only contain lowercase alphanumeric"
            )
        source = written(here) if written is not None and not isinstance(wanted, str) else None
        if source is not None:
            text = source
        elif isinstance(wanted, bool | int | str):
            text = attribute_text(wanted)
        elif wanted is None and allow_empty_values:
            text = ""
        else:
            raise FilterError(here, f"the value must be a string, not {_kind(wanted)}")
        if not text and not allow_empty_values:
            # Knative skips such a filter silently, which would deliver everything: refuse instead.
            raise FilterError(here, "the value must not be empty")
        checked[name] = text
    return checked


def _kind(value: object) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", int: "a number", float: "a number",
             bool: "a boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)
