"""Replays the CloudEvents SQL TCK (cloudevents/spec cesql/cesql_tck, read in place, never copied).

The TCK lives under $INFER_LOGGER_CONFORMANCE/cesql-tck, by default ../shared/conformance next
to the repository. Each case checks both the `result` and the `error` kind, as the TCK README
asks: an erroring expression still has a result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from pipelines.cesql import CesqlParseError, evaluate, parse
from tests.conformance import ROOT, reason

TCK = ROOT / "cesql-tck"
TCK_CASES = 275

# Any valid event will do when a case gives only `eventOverrides` (TCK README).
BASE_EVENT = {
    "specversion": "1.0",
    "id": "tck-event",
    "source": "/cesql/tck",
    "type": "io.cloudevents.cesql.tck",
}


class _TckLoader(yaml.SafeLoader):
    """SafeLoader without the timestamp resolver: `time: 2018-04-26T14:48:09+02:00` must stay
    a string (CESQL has no timestamp type), while ints and bools keep their YAML types."""


_TckLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}

_NO_RESULT = object()


@dataclass(frozen=True)
class TckCase:
    expression: str
    event: dict[str, Any]
    result: Any
    error: str | None


def _load_cases() -> list[Any]:
    if not TCK.is_dir():
        missing = pytest.mark.skip(reason=reason("cesql-tck"))
        return [pytest.param(None, id="cesql-tck-missing", marks=missing)]
    params = []
    for path in sorted(TCK.glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        suite = yaml.load(text, Loader=_TckLoader)
        # Names such as `TRUE` and `tRuE` would all load as the bool True; read them as text.
        names = [test["name"] for test in yaml.load(text, Loader=yaml.BaseLoader)["tests"]]
        for name, test in zip(names, suite["tests"], strict=True):
            event = {**(test.get("event") or BASE_EVENT), **test.get("eventOverrides", {})}
            case = TckCase(
                str(test["expression"]), event, test.get("result", _NO_RESULT), test.get("error")
            )
            params.append(pytest.param(case, id=f"{path.name}::{name}"))
    return params


CASES = _load_cases()


@pytest.mark.parametrize("case", CASES)
def test_tck_case(case: TckCase) -> None:
    value, errors = evaluate(case.expression, case.event)

    kinds = [error.kind for error in errors]
    if case.error is None:
        assert kinds == [], errors
    else:
        assert kinds and set(kinds) == {case.error}, errors
    if case.error == "parse":
        with pytest.raises(CesqlParseError):
            parse(case.expression)
    if case.result is not _NO_RESULT:
        assert value == case.result and type(value) is type(case.result)


def test_tck_is_complete() -> None:
    if not TCK.is_dir():
        pytest.skip(f"CESQL TCK not found at {TCK}")
    assert len(CASES) == TCK_CASES
    assert len({param.id for param in CASES}) == TCK_CASES
