"""Trigger filters: Knative's 99 filter cases replayed from the shared data, and the CESQL TCK
through the `cesql` dialect (read in place, never copied)."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import yaml

from pipelines.broker.filters import (
    FAIL,
    NO_FILTER,
    PASS,
    Delivered,
    FilterError,
    FilterResult,
    build_filter,
    build_trigger_filter,
    format_path,
)
from pipelines.cesql import parse
from pipelines.cesql.nodes import Attribute
from tests.conformance import ROOT, reason

KNATIVE = ROOT / "knative-filters"
TCK = ROOT / "cesql-tck"
EXPECT = {"pass": PASS, "fail": FAIL, "no-filter (deliver)": NO_FILTER}


def _cases(name: str) -> list[Any]:
    path = KNATIVE / name
    if not path.is_file():
        return [pytest.param(None, id="missing", marks=pytest.mark.skip(reason=reason("knative-filters")))]
    cases = yaml.safe_load(path.read_text(encoding="utf-8"))["cases"]
    return [pytest.param(case, id=case["name"]) for case in cases]


ATTRIBUTE_CASES = _cases("attributes-filter-cases.yaml")
SUBSCRIPTIONS_CASES = _cases("subscriptionsapi-filter-cases.yaml")


def test_all_99_cases_are_replayed() -> None:
    if not KNATIVE.is_dir():
        pytest.skip(reason("knative-filters"))
    assert len(ATTRIBUTE_CASES) + len(SUBSCRIPTIONS_CASES) == 99


@pytest.mark.parametrize("case", ATTRIBUTE_CASES)
def test_attributes_filter(case: dict[str, Any]) -> None:
    attributes = dict(case["filter"]["attributes"])
    if case["name"] == "TestAllSupportedAttributeFieldsV1":
        # The data's note: Go's zero time matched an event without `time`; here time is just absent.
        del attributes["time"]
    result = build_trigger_filter(attributes, None, validate=False)(case["event"])
    assert result is EXPECT[case["expect"]]


@pytest.mark.parametrize("case", SUBSCRIPTIONS_CASES)
def test_subscriptions_api_filter(case: dict[str, Any]) -> None:
    # Knative's filter unit tests, behind its webhook: a few use names the webhook would refuse
    # (`some-other-attribute`); trigger loading refuses them too (see test_trigger.py).
    result = build_trigger_filter(None, case["filters"], validate=False)(case["event"])
    assert result is EXPECT[case["expect"]]


class TestSemantics:
    """Combinations, precedence and the values Knative compares as text."""

    EVENT: ClassVar[dict[str, Any]] = {
        "specversion": "1.0", "id": "1", "source": "/s", "type": "t.a", "ttl": 20, "flag": True}

    def test_filters_win_over_attributes(self) -> None:
        built = build_trigger_filter({"type": "other"}, [{"exact": {"type": "t.a"}}])
        assert built(self.EVENT) is PASS

    def test_empty_filters_leave_attributes_in_force(self) -> None:
        assert build_trigger_filter({"type": "other"}, [])(self.EVENT) is FAIL

    def test_non_string_attributes_compare_as_text(self) -> None:
        assert build_filter({"exact": {"ttl": 20, "flag": True}}, ())(self.EVENT) is PASS
        assert build_filter({"suffix": {"flag": "rue"}}, ())(self.EVENT) is PASS

    def test_no_filter_is_neutral_in_all_and_any(self) -> None:
        assert build_filter({"all": [{"all": []}, {"exact": {"type": "t.a"}}]}, ())(self.EVENT) is PASS
        assert build_filter({"any": [{"not": None}, {"exact": {"type": "x"}}]}, ())(self.EVENT) is FAIL
        assert build_filter({"not": {"any": []}}, ())(self.EVENT) is NO_FILTER

    def test_legacy_aliases(self) -> None:
        event = {**self.EVENT, "dataschema": "wow", "datacontenttype": "cheers;mate"}
        assert build_trigger_filter({"schemaurl": "wow", "datamediatype": "cheers"}, None)(event) is PASS

    def test_legacy_empty_value_needs_a_non_empty_attribute(self) -> None:
        assert build_trigger_filter({"subject": ""}, None)({**self.EVENT, "subject": ""}) is FAIL

    def test_combining_rules(self) -> None:
        assert PASS.and_(NO_FILTER) is PASS and NO_FILTER.and_(FAIL) is FAIL and PASS.and_(FAIL) is FAIL
        assert FAIL.or_(NO_FILTER) is FAIL and FAIL.or_(PASS) is PASS and NO_FILTER.or_(NO_FILTER) is NO_FILTER


class TestValidation:
    """Bad filters fail at build time with Knative's field path."""

    def test_empty_exact_value_is_refused(self) -> None:
        # Knative skips such a filter (delivering everything); refusing it is the safer reading.
        with pytest.raises(FilterError, match=r"filters\[0\]\.exact\[type\]: the value must not be empty"):
            build_trigger_filter(None, [{"exact": {"type": ""}}])

    @pytest.mark.parametrize("empty", [{"exact": {}}, {"cesql": ""}, {"all": []}, {"any": []}, {"suffix": {}}])
    def test_an_empty_dialect_beside_the_real_one_is_none(self, empty: dict[str, Any]) -> None:
        """As Knative counts dialects (`len(...) > 0`, `cesql != ""`): such filters were refused as
        having two."""
        keep = build_filter({"prefix": {"type": "dev.knative."}, **empty}, ("filters", 0))
        assert keep({"type": "dev.knative.x"}) is PASS and keep({"type": "other"}) is FAIL
        with pytest.raises(FilterError, match="multiple dialects"):  # two real ones still are
            build_filter({"prefix": {"type": "a"}, "suffix": {"type": "b"}}, ("filters", 0))

    @pytest.mark.parametrize("spec", [{"cesql": "   "}, {"not": {"cesql": " "}}])
    def test_a_blank_expression_is_refused(self, spec: dict[str, Any]) -> None:
        """It loaded as no filter and delivered every event; Knative lets only "" through."""
        with pytest.raises(FilterError, match="invalid CESQL"):
            build_filter(spec, ("filters", 0))

    @pytest.mark.parametrize("wrong", [{"exact": []}, {"prefix": ""}, {"all": {}}, {"any": ""}, {"cesql": []}])
    def test_an_empty_value_of_another_type_is_refused(self, wrong: dict[str, Any]) -> None:
        """Read as no dialect, `cesql: []` loaded and passed every event; Knative refuses it."""
        with pytest.raises(FilterError, match="must be"):
            build_filter(wrong, ("filters", 0))

    def test_unknown_dialect(self) -> None:
        with pytest.raises(FilterError, match="unknown filter dialect"):
            build_trigger_filter(None, [{"exactly": {"type": "x"}}])

    def test_cesql_position(self) -> None:
        with pytest.raises(FilterError) as info:
            build_trigger_filter(None, [{"all": [{"cesql": "type = = 'x'"}]}])
        assert info.value.path == ("filters", 0, "all", 0, "cesql")
        assert info.value.column == 7

    def test_nesting_is_bounded(self) -> None:
        spec: dict[str, Any] = {"exact": {"type": "t.a"}}
        for _ in range(2000):
            spec = {"not": spec}
        with pytest.raises(FilterError, match="nested deeper than 40 levels"):
            build_filter(spec, ("filters", 0))

    def test_path_format(self) -> None:
        from pipelines.broker.filters import Key

        assert format_path(("filters", 0, "not", "prefix", Key("invALID"))) == "filters[0].not.prefix[invALID]"


# -- the CESQL TCK through the cesql dialect -----------------------------------------------------


class _TckLoader(yaml.SafeLoader):
    """Timestamps stay text; ints and bools keep their YAML types (the TCK's typing trap)."""


_TckLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_BASE = {"specversion": "1.0", "id": "tck", "source": "/cesql/tck", "type": "io.cloudevents.cesql.tck"}


def _tck_cases() -> list[Any]:
    if not TCK.is_dir():
        return [pytest.param(None, id="missing", marks=pytest.mark.skip(reason=reason("cesql-tck")))]
    params = []
    for path in sorted(TCK.glob("*.yaml")):
        suite = yaml.load(path.read_text(encoding="utf-8"), Loader=_TckLoader)
        for index, test in enumerate(suite["tests"]):
            params.append(pytest.param(test, id=f"{path.stem}[{index}]"))
    return params


@pytest.mark.parametrize("test", _tck_cases())
def test_cesql_tck_as_trigger_filter(test: dict[str, Any]) -> None:
    """PASS exactly when the TCK's result is TRUE (or "true", of a bare attribute) with no error; a
    parse error, or a function the registry does not have, fails the trigger's load."""
    expression = str(test["expression"])
    if test.get("error") in ("parse", "missingFunction"):
        with pytest.raises(FilterError):
            build_filter({"cesql": expression}, ())
        return
    event = {**(test.get("event") or _BASE), **test.get("eventOverrides", {})}
    true = test.get("result") is True and not test.get("error")
    # As a trigger filters: the values as text, and so a bare attribute's String cast to Boolean
    # (`mybool` is the String "true" there); any other String result fails (STRING(TRUE) too).
    bare = isinstance(parse(expression).tree, Attribute)
    as_text = bare and str(test.get("result")).lower() == "true" and not test.get("error")
    result: FilterResult = build_filter({"cesql": expression}, ())(Delivered(event, "knativebrokerttl"))
    assert result is (PASS if true or as_text else FAIL)
    assert parse(expression).matches(event) is true  # the engine, on the typed event


@pytest.mark.parametrize("expression", ["'true'", "STRING(TRUE)", "UPPER('true')", "subject"])
def test_only_a_bare_attribute_s_text_passes_as_a_boolean(expression: str) -> None:
    """Spec 1.2: a result that is not a Boolean fails. Every String "true" passed (any letter case)."""
    event = Delivered({"id": "1", "subject": "TRUE", "sampled": True}, "knativebrokerttl")
    assert build_filter({"cesql": expression}, ())(event) is (PASS if expression == "subject" else FAIL)
    assert build_filter({"cesql": "sampled"}, ())(event) is PASS


@pytest.mark.parametrize(("expression", "words"), [
    ("LENGHT(type) > 3", "no function LENGHT of 1 argument at position 0"),
    ("type = 'a' OR LOWER(type, 'x') = 'a'", "no function LOWER of 2 arguments at position 14"),
])
def test_a_function_that_does_not_exist_fails_the_load(expression: str, words: str) -> None:
    """It failed every event (the OR's other side aside), and no one was told."""
    with pytest.raises(FilterError, match=words) as info:
        build_filter({"cesql": expression}, ("filters", 0))
    assert info.value.column == int(words.rsplit(" ", 1)[1])


def test_delivered_view() -> None:
    """What filters see: text values, as binary HTTP and a Kafka channel carry them, and no TTL."""
    view = Delivered({"id": "1", "statuscode": 500, "sampled": True, "knativebrokerttl": 255}, "knativebrokerttl")
    assert dict(view) == {"id": "1", "statuscode": "500", "sampled": "true"}
    assert len(view) == 3 and "knativebrokerttl" not in view and view.get("knativebrokerttl") is None
    cesql = build_trigger_filter(None, [{"cesql": "sampled IN ('yes', 'true') AND statuscode = 500"}])
    assert cesql(view) is PASS


def test_an_evaluation_error_is_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    """The filter fails, as the spec says, and said nothing of why: a mistyped comparison
    dropped every event unsaid."""
    caplog.set_level("DEBUG", logger="pipelines.broker.filters")
    assert build_filter({"cesql": "latencyms > 100"}, ())({"latencyms": "250.5"}) is FAIL
    assert "cannot cast '250.5' to Integer" in caplog.text and "latencyms > 100" in caplog.text


@pytest.mark.parametrize(("expression", "position"), [
    ("type = 'a' OR type = 'b' AND source = '/ok'", 25),
    ("a AND b XOR c", 8),
    ("(type = 'a' OR type = 'b') AND source = '/ok'", None),
    ("type = 'a' OR (type = 'b' AND source = '/ok')", None),
    ("a AND b AND c", None),
    ("CONCAT(a, 'x') = 'y' OR b", None),
])
def test_logic_mixed_without_parentheses_is_said_at_load(expression: str, position: int | None,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Read left to right, as the spec says, where Knative's engine (the SDKs' grammar) reads it
    right to left: a copied Knative trigger picked other events, unsaid."""
    build_filter({"cesql": expression}, ())
    said = [r.getMessage() for r in caplog.records if "without parentheses" in r.getMessage()]
    assert said == ([] if position is None else [said[0]]) and (position is None or f"position {position}" in said[0])


@pytest.mark.parametrize(("expression", "position"), [
    ("NOT type = 'x'", 0),
    ("source = '/a' AND NOT type LIKE 'x%'", 18),
    ("NOT type IN ('a', 'b')", 0),
    ("NOT (type = 'x')", None),
    ("NOT EXISTS x", None),
    ("NOT TRUE = FALSE", None),
    ("(NOT sampled) = TRUE", None),
    ("(NOT type = 'x')", 1),
])
def test_a_not_of_a_bare_attribute_is_said_at_load(expression: str, position: int | None,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """`NOT type = 'x'` is `(NOT type) = 'x'` in the CESQL grammar: valid, and failing every event
    (a cast error, logged at debug), where one used to SQL meant `NOT (type = 'x')`."""
    keep = build_filter({"cesql": expression}, ())
    said = [r.getMessage() for r in caplog.records if "applies to" in r.getMessage()]
    assert said == ([] if position is None else [said[0]]) and (position is None or f"position {position}" in said[0])
    if position == 0 and "=" in expression:
        assert keep({"type": "y", "source": "/a"}) is FAIL  # read as the grammar says, only said
