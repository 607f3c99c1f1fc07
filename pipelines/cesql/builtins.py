"""The built-in functions every CESQL engine provides (spec 3.5.1, 3.5.2 and the cast functions).

Arguments arrive already cast to the declared parameter types, so each implementation only
handles its own types.
"""

from __future__ import annotations

from pipelines.cesql.errors import CesqlFunctionEvaluationError, CesqlMathError
from pipelines.cesql.functions import Failure, Function, FunctionRegistry
from pipelines.cesql.values import INT32_MAX, INT32_MIN, Value, ValueType, cast

B, I, S, ANY = ValueType.BOOLEAN, ValueType.INTEGER, ValueType.STRING, ValueType.ANY

# Unicode's White_Space characters. str.strip() without arguments would also remove the
# control characters U+001C..U+001F, which the spec says TRIM keeps.
_WHITESPACE = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)


def _left(text: str, count: int) -> Value | Failure:
    if count < 0:
        return Failure(text, CesqlFunctionEvaluationError(f"LEFT: negative length {count}"))
    return text[:count]


def _right(text: str, count: int) -> Value | Failure:
    if count < 0:
        return Failure(text, CesqlFunctionEvaluationError(f"RIGHT: negative length {count}"))
    return text[max(len(text) - count, 0) :]


def _substring(text: str, position: int, length: int | None = None) -> Value | Failure:
    if length is not None and length < 0:
        return Failure("", CesqlFunctionEvaluationError(f"SUBSTRING: negative length {length}"))
    if position == 0:
        return ""
    if not -len(text) <= position <= len(text):
        message = f"SUBSTRING: position {position} is outside a string of length {len(text)}"
        return Failure("", CesqlFunctionEvaluationError(message))
    start = position - 1 if position > 0 else len(text) + position
    return text[start:] if length is None else text[start : start + length]


def _abs(number: int) -> Value | Failure:
    if number == INT32_MIN:
        return Failure(INT32_MAX, CesqlMathError(f"ABS({number}) overflows 32 bits"))
    return abs(number)


def _cast_to(target: ValueType) -> Function:
    def convert(value: Value) -> Value | Failure:
        result, error = cast(value, target)
        return result if error is None else Failure(result, error)

    name = {B: "BOOL", I: "INT", S: "STRING"}[target]
    return Function(name, (ANY,), target, convert)


def _castable(target: ValueType) -> Function:
    name = {B: "IS_BOOL", I: "IS_INT"}[target]
    return Function(name, (S,), B, lambda text: cast(text, target)[1] is None)


BUILTINS = FunctionRegistry(
    [
        Function("LENGTH", (S,), I, len),
        Function("CONCAT", (), S, lambda *parts: "".join(parts), variadic=S),
        Function("CONCAT_WS", (S,), S, lambda sep, *parts: sep.join(parts), variadic=S),
        Function("LOWER", (S,), S, str.lower),
        Function("UPPER", (S,), S, str.upper),
        Function("TRIM", (S,), S, lambda text: text.strip(_WHITESPACE)),
        Function("LEFT", (S, I), S, _left),
        Function("RIGHT", (S, I), S, _right),
        Function("SUBSTRING", (S, I), S, _substring),
        Function("SUBSTRING", (S, I, I), S, _substring),
        Function("ABS", (I,), I, _abs),
        _cast_to(B),
        _cast_to(I),
        _cast_to(S),
        _castable(B),
        _castable(I),
    ]
)
