from __future__ import annotations

import random
import re
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from infer_logger.cloudevents.event import CloudEvent
from pipelines.cesql import (
    BUILTINS,
    CesqlFunctionEvaluationError,
    Failure,
    Function,
    FunctionRegistry,
    ValueType,
    parse,
)
from pipelines.cesql.like import LikePattern

ATTRIBUTES: dict[str, str | int | bool] = {
    "specversion": "1.0",
    "id": "abc-1",
    "source": "/models/iris",
    "type": "org.kubeflow.serving.inference.request",
    "ttl": 3,
    "sampled": True,
}


def kinds(expression: str, event: object = ATTRIBUTES) -> tuple[object, list[str]]:
    value, errors = parse(expression).evaluate(event)  # type: ignore[arg-type]
    return value, [error.kind for error in errors]


class TestMatches:
    """`matches` passes an event only on a TRUE result without errors."""

    def test_cloudevent_object(self) -> None:
        event = CloudEvent(dict(ATTRIBUTES), b"{}")
        assert parse("type LIKE 'org.kubeflow.%' AND ttl < 5 AND sampled").matches(event)
        assert not parse("type LIKE 'org.kubeflow.%' AND ttl > 5").matches(event)

    def test_any_error_fails(self) -> None:
        expression = parse("NOT ttl")  # TRUE, but the integer cannot implicitly become a Boolean
        assert expression.evaluate(ATTRIBUTES)[0] is True
        assert not expression.matches(ATTRIBUTES)
        assert not parse("subject = 'x' OR TRUE").matches(ATTRIBUTES)

    def test_non_boolean_result_fails(self) -> None:
        assert not parse("1").matches(ATTRIBUTES)
        assert not parse("'true'").matches(ATTRIBUTES)

    def test_short_circuit_hides_errors(self) -> None:
        assert parse("TRUE OR subject = 'x'").matches(ATTRIBUTES)


class TestEvents:
    """Attributes come from a mapping or `.attributes`; other types are read as strings."""

    @pytest.mark.parametrize(("digits", "expected"), [
        ("1" * 5000, (False, ["cast"])),  # int() raises ValueError past 4300 digits: it stopped
        ("+" + "9" * 11, (False, ["cast"])),  # a trigger's delivery for good
        ("-" + "0" * 5000 + "7", (False, [])),  # leading zeros do not count
    ])
    def test_long_numeric_text(self, digits: str, expected: tuple[object, list[str]]) -> None:
        assert kinds("big > 5", {**ATTRIBUTES, "big": digits}) == expected

    def test_payload_is_not_an_attribute(self) -> None:
        assert kinds("EXISTS data", {**ATTRIBUTES, "data": {"a": 1}}) == (False, [])

    def test_null_is_absent(self) -> None:
        assert kinds("EXISTS subject", {**ATTRIBUTES, "subject": None}) == (False, [])
        assert kinds("subject", {**ATTRIBUTES, "subject": None}) == (False, ["missingAttribute"])

    def test_non_primitive_values_become_strings(self) -> None:
        event = {**ATTRIBUTES, "time": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)}
        assert kinds("time", event) == ("2024-01-02T03:04:05Z", [])
        assert kinds("big", {**ATTRIBUTES, "big": 2**40}) == (str(2**40), [])

    def test_rejects_other_objects(self) -> None:
        with pytest.raises(TypeError):
            parse("TRUE").evaluate(42)  # type: ignore[arg-type]


class TestErrors:
    """Errors are values: each comes with the result the spec prescribes."""

    @pytest.mark.parametrize(
        ("expression", "result", "errors"),
        [
            ("2147483647 + 1", 2147483647, ["math"]),
            ("-2147483648 - 1", -2147483648, ["math"]),
            ("-2147483648 / -1", 2147483647, ["math"]),
            ("-7 / 2", -3, []),
            ("-7 % 2", -1, []),
            ("7 % -2", 1, []),
            ("LENGTH(1 / 0)", 0, ["math"]),
            ("'x' = 1", False, ["cast"]),
            ("TRUE IN (1, TRUE)", True, ["cast"]),
            ("NOPE(1)", False, ["missingFunction"]),
            ("SUBSTRING('abc', 1, -1)", "", ["functionEvaluation"]),
            ("missing + other", 0, ["missingAttribute", "missingAttribute"]),
        ],
    )
    def test_result_and_errors(self, expression: str, result: object, errors: list[str]) -> None:
        assert kinds(expression) == (result, errors)

    def test_errors_carry_positions(self) -> None:
        _, errors = parse("id = 'abc-1' AND subject = 'y'").evaluate(ATTRIBUTES)
        assert [(e.kind, e.position) for e in errors] == [("missingAttribute", 17)]


class TestFunctions:
    """Built-ins beyond the TCK, and user functions through an extended registry."""

    @pytest.mark.parametrize(
        ("expression", "result"),
        [
            ("IS_INT('-12')", True),
            ("IS_INT('1.5')", False),
            ("IS_BOOL('False')", True),
            ("IS_BOOL(1)", False),
            ("TRIM('\u3000 a\x1c ')", "a\x1c"),
            ("RIGHT('abc', 0)", ""),
            ("CONCAT(1, TRUE, 'x')", "1truex"),
        ],
    )
    def test_builtins(self, expression: str, result: object) -> None:
        assert kinds(expression) == (result, [])

    def test_user_function(self) -> None:
        double = Function("DOUBLE", (ValueType.INTEGER,), ValueType.INTEGER, lambda n: 2 * n)
        registry = BUILTINS.extended(double)
        assert parse("double('21')", functions=registry).evaluate(ATTRIBUTES) == (42, [])
        assert kinds("double(1)")[1] == ["missingFunction"]  # BUILTINS is left as it was

    def test_user_function_failures(self) -> None:
        def explode(text: str) -> str:
            raise RuntimeError("boom")

        def soft(text: str) -> Failure:
            return Failure("fallback", CesqlFunctionEvaluationError("soft"))

        registry = FunctionRegistry(
            [
                Function("EXPLODE", (ValueType.STRING,), ValueType.STRING, explode),
                Function("SOFT", (ValueType.STRING,), ValueType.STRING, soft),
                Function("WRONG", (), ValueType.INTEGER, lambda: "not an int"),
            ]
        )
        for expression, result in [("EXPLODE('a')", ""), ("SOFT('a')", "fallback"), ("WRONG()", 0)]:
            value, errors = parse(expression, functions=registry).evaluate(ATTRIBUTES)
            assert (value, [e.kind for e in errors]) == (result, ["functionEvaluation"])

    def test_registry_enforces_overloading_rules(self) -> None:
        length = Function("LENGTH", (ValueType.STRING,), ValueType.INTEGER, len)
        with pytest.raises(ValueError, match="already defined"):
            BUILTINS.extended(length)
        string = ValueType.STRING
        with pytest.raises(ValueError, match="fixed parameters"):
            BUILTINS.extended(Function("LEFT", (string,), string, str, variadic=string))
        with pytest.raises(ValueError, match="invalid"):
            Function("9LIVES", (), ValueType.INTEGER, lambda: 9)


class TestLike:
    """LIKE escapes and its linear-time matcher."""

    @pytest.mark.parametrize(
        ("expression", "result"),
        [
            (r"'a\b' LIKE 'a\b'", True),
            # A literal keeps `\\` (two backslashes), and LIKE does too, as `=` and the Go SDK do:
            (r"'a\\b' LIKE 'a\\b'", True),  # (LIKE read one, and disagreed with `=`)
            (r"'a\b' LIKE 'a\\b'", False),
            (r"'a\\b' = 'a\\b'", True),
            (r"'a%' LIKE 'a\%'", True),
            (r"'ab' LIKE 'a\%'", False),
            ("'' LIKE '%'", True),
            ("'a' LIKE '_%_'", False),
            ("'line\nbreak' LIKE 'line_break'", True),
        ],
    )
    def test_patterns(self, expression: str, result: bool) -> None:
        assert kinds(expression) == (result, [])

    def test_pathological_pattern_is_fast(self) -> None:
        # Backtracking would take ~C(5000, 30) steps (never done), the linear matcher milliseconds:
        # a hang guard, not a timing. In a child: a regex holding the GIL cannot be cut off here.
        expression = "'" + "a" * 5000 + "' LIKE '" + "%a" * 30 + "%b'"
        code = f"from pipelines.cesql import parse; print(parse({expression!r}).evaluate({ATTRIBUTES!r}))"
        try:
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("LIKE did not answer within 60 s: the matcher backtracks (not linear-time)")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "(False, [])"


    def test_the_runs_between_wildcards_match_as_a_whole_pattern_does(self) -> None:
        """Runs found with str.find and fixed-length patterns, against a whole regular expression
        on small random patterns and texts (where its backtracking costs nothing)."""
        rng = random.Random(7)
        for _ in range(3000):
            pattern = "".join(rng.choice("ab%_") for _ in range(rng.randint(0, 6)))
            text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 8)))
            whole = "".join({"%": ".*", "_": "."}.get(c, re.escape(c)) for c in pattern)
            expected = re.fullmatch(whole, text, re.DOTALL) is not None
            assert LikePattern.compile(pattern).matches(text) == expected, (pattern, text)


class TestLimits:
    """Long flat chains evaluate without deep recursion."""

    def test_long_or_chain(self) -> None:
        expression = parse(" OR ".join(f"ttl = {n}" for n in range(2000)))
        assert expression.matches(ATTRIBUTES)

    def test_a_long_chain_compares_and_hashes(self) -> None:
        """The dataclasses' generated __eq__ and __hash__ recursed down the tree's left spine."""
        source = " OR ".join(["type = 'x'"] * 5000)
        assert parse(source) == parse(source) and hash(parse(source)) == hash(parse(source))
        assert parse(source) != parse(source + " OR type = 'y'")
