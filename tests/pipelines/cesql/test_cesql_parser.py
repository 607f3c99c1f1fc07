from __future__ import annotations

import pytest

from pipelines.cesql import CesqlParseError, evaluate, parse
from pipelines.cesql.parser import MAX_NESTING

EVENT = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "n": "5"}


def value_of(expression: str) -> object:
    value, errors = parse(expression).evaluate(EVENT)
    assert errors == []
    return value


class TestParseErrors:
    """Parse errors carry the 0-based offset of the offending token and show it with a caret."""

    @pytest.mark.parametrize(
        ("expression", "position"),
        [
            ("ABC(", 4),
            ("1 +", 3),
            ("'abc", 0),
            ("id = 'a' )", 9),
            ("x LIKE 123", 7),
            ("a_b = 1", 0),
            ("1abc_d(1)", 0),
            ("2147483648", 0),
            ("- 2147483649", 0),
            ("1" * 5000, 0),  # int() refuses past 4300 digits: out of range, not a ValueError
            ("-" + "9" * 5000, 0),
            ("a NOT = 1", 6),
            ("EXISTS 'id'", 7),
            ("id IN ()", 7),
            ("id = #", 5),
            ("", 0),
        ],
    )
    def test_position(self, expression: str, position: int) -> None:
        with pytest.raises(CesqlParseError) as caught:
            parse(expression)
        assert caught.value.position == position
        assert caught.value.kind == "parse"

    def test_message_points_at_position(self) -> None:
        with pytest.raises(CesqlParseError) as caught:
            parse("type = 'a' AND\tsource LIKE")
        lines = str(caught.value).splitlines()
        assert lines[0] == "LIKE needs a string literal pattern at position 26"
        assert lines[1] == "  type = 'a' AND source LIKE"
        assert lines[2] == "  " + " " * 26 + "^"

    def test_nesting_is_bounded(self) -> None:
        with pytest.raises(CesqlParseError, match="nested"):
            parse("(" * (MAX_NESTING + 1) + "1" + ")" * (MAX_NESTING + 1))
        with pytest.raises(CesqlParseError, match="nested"):
            parse("NOT " * 500 + "TRUE")

    def test_evaluate_reports_parse_error_as_false(self) -> None:
        value, errors = evaluate("ABC(", EVENT)
        assert value is False
        assert [e.kind for e in errors] == ["parse"]


class TestSyntax:
    """Literals, signs, keywords and precedence as spec section 2 and 3.6 define them."""

    def test_signed_integer_literals(self) -> None:
        assert value_of("-2147483648") == -2147483648
        assert value_of("+7") == 7
        assert value_of("4-1") == 3
        assert value_of("4 -1") == 3
        assert value_of("- -3") == 3
        assert value_of("0" * 5000 + "12") == 12  # int() alone raises past 4300 digits

    def test_keywords_case_insensitive_identifiers_lowercased(self) -> None:
        assert value_of("exists ID And Id = '1' oR false") is True
        assert value_of("concat_ws('-', 'a', 'b')") == "a-b"

    def test_string_escapes(self) -> None:
        assert value_of(r"'it\'s' = 'it''s'") is True
        assert value_of(r'"say \"hi\"" = ' + "'say \"hi\"'") is True
        # Only the quote is escaped (the grammar, and the Go SDK Knative uses): `\\` stays two
        # backslashes (it was one here, and a trigger matched other events than Knative's).
        assert value_of(r"LENGTH('a\\b')") == 4
        assert value_of(r"LENGTH('a\b')") == 3  # unknown escapes stay verbatim

    def test_blanks(self) -> None:
        assert value_of("1\t+\r\n2") == 3

    def test_logic_operators_share_one_level_left_to_right(self) -> None:
        # Spec 3.6: AND, OR and XOR have equal precedence, evaluated left to right.
        assert value_of("TRUE OR FALSE AND FALSE") is False
        assert value_of("FALSE AND FALSE OR TRUE") is True

    def test_unary_binds_tighter_than_comparison(self) -> None:
        assert value_of("NOT TRUE = FALSE") is True  # (NOT TRUE) = FALSE
        assert value_of("-n + 1") == -4

    def test_arithmetic_precedence(self) -> None:
        assert value_of("2 + 3 * 4 - 10 / 5 % 3") == 12
        assert value_of("1 + 2 < 4 AND 'a' = 'a'") is True

    def test_like_and_in_are_postfix(self) -> None:
        assert value_of("id LIKE '1' IN (TRUE)") is True
        assert value_of("n NOT IN (1, 2) AND n NOT LIKE '6%'") is True
