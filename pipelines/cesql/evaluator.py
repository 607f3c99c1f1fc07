"""Evaluates a syntax tree against an event's attributes, collecting errors as it goes.

The error rules, from spec sections 3.2-3.4 as the TCK pins them down:

* An operator or function whose operand already produced an error does not compute: it yields
  the zero value of its return type (`missing / 0` is `0` with only a missingAttribute error,
  `NOT missing` is `false`). A missing attribute on its own is `false`.
* An error an operator raises itself still lets it compute on a stand-in value: a failed cast
  becomes the target's zero value (`NOT 10` is `true` plus a cast error), division by zero is
  `0`, and a result outside 32 bits saturates, as `ABS` does.
* AND and OR skip their right operand once the left one decides the result.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipelines.cesql.context import as_value
from pipelines.cesql.errors import (
    CesqlError,
    CesqlFunctionEvaluationError,
    CesqlMathError,
    CesqlMissingAttributeError,
    CesqlMissingFunctionError,
)
from pipelines.cesql.functions import Failure, FunctionRegistry
from pipelines.cesql.nodes import Attribute, Binary, Call, Exists, In, Like, Literal, Node, Unary
from pipelines.cesql.values import (
    INT32_MAX,
    INT32_MIN,
    Value,
    ValueType,
    coerce,
    in_int32,
    type_of,
    zero_value,
)

_ARITHMETIC = frozenset({"+", "-", "*", "/", "%"})
_ORDERING = frozenset({"<", "<=", ">", ">="})
_LOGIC = frozenset({"AND", "OR", "XOR"})


class Evaluator:
    """Evaluates trees against one event; `errors` accumulates across calls."""

    def __init__(self, attributes: Mapping[str, object], functions: FunctionRegistry) -> None:
        self._attributes = attributes
        self._functions = functions
        self.errors: list[CesqlError] = []

    def evaluate(self, node: Node) -> Value:
        if isinstance(node, Binary):
            return self._binary(node)
        if isinstance(node, Literal):
            return node.value
        if isinstance(node, Attribute):
            raw = self._attributes.get(node.name)
            if raw is None:  # JSON null: an optional attribute that is not set
                return self._fail(CesqlMissingAttributeError(node.name), node, False)
            return as_value(raw)
        if isinstance(node, Exists):
            return self._attributes.get(node.name) is not None
        if isinstance(node, Unary):
            return self._unary(node)
        if isinstance(node, Like):
            return self._like(node)
        if isinstance(node, In):
            return self._in(node)
        if isinstance(node, Call):
            return self._call(node)
        raise TypeError(f"not a CESQL node: {node!r}")

    # --- helpers -------------------------------------------------------------------------

    def _fail(self, error: CesqlError, node: Node, value: Value) -> Value:
        if error.position is None:
            error.position = node.position
        self.errors.append(error)
        return value

    def _coerce(self, value: Value, target: ValueType, node: Node) -> Value:
        result, error = coerce(value, target)
        if error is not None:
            self._fail(error, node, result)
        return result

    def _int(self, value: Value, node: Node) -> int:
        number = self._coerce(value, ValueType.INTEGER, node)
        assert isinstance(number, int)
        return number

    def _bool(self, value: Value, node: Node) -> bool:
        return bool(self._coerce(value, ValueType.BOOLEAN, node))

    def _int32(self, number: int, node: Node) -> int:
        if INT32_MIN <= number <= INT32_MAX:
            return number
        clamped = INT32_MAX if number > INT32_MAX else INT32_MIN
        self._fail(CesqlMathError(f"integer overflow: {number} is outside 32 bits"), node, clamped)
        return clamped

    # --- operators -----------------------------------------------------------------------

    def _unary(self, node: Unary) -> Value:
        mark = len(self.errors)
        value = self.evaluate(node.operand)
        if node.operator == "NOT":
            return False if len(self.errors) > mark else not self._bool(value, node)
        return 0 if len(self.errors) > mark else self._int32(-self._int(value, node), node)

    def _binary(self, node: Binary) -> Value:
        # Walk the left spine in a loop: long chains like `a OR b OR c ...` need no recursion.
        spine: list[Binary] = []
        current: Node = node
        while isinstance(current, Binary):
            spine.append(current)
            current = current.left
        mark = len(self.errors)
        value = self.evaluate(current)
        for step in reversed(spine):
            value = self._apply(step, value, left_failed=len(self.errors) > mark)
        return value

    def _apply(self, node: Binary, left: Value, *, left_failed: bool) -> Value:
        operator = node.operator
        if operator in _LOGIC:
            return self._logic(node, left, left_failed)
        mark = len(self.errors)
        right = self.evaluate(node.right)
        if left_failed or len(self.errors) > mark:
            return 0 if operator in _ARITHMETIC else False
        if operator in ("=", "!="):
            # Ambiguous operator: the right operand's type decides (spec 3.7).
            equal = self._coerce(left, type_of(right), node) == right
            return equal if operator == "=" else not equal
        x, y = self._int(left, node), self._int(right, node)
        if operator in _ORDERING:
            return {"<": x < y, "<=": x <= y, ">": x > y, ">=": x >= y}[operator]
        if operator in ("/", "%") and y == 0:
            return self._fail(CesqlMathError(f"{x} {operator} 0"), node, 0)
        if operator == "/" or operator == "%":
            quotient = abs(x) // abs(y) * (1 if (x < 0) == (y < 0) else -1)  # truncated
            return self._int32(quotient, node) if operator == "/" else x - y * quotient
        return self._int32(x + y if operator == "+" else x - y if operator == "-" else x * y, node)

    def _logic(self, node: Binary, left: Value, left_failed: bool) -> Value:
        if left_failed:
            return False
        x = self._bool(left, node)
        if (node.operator == "AND" and not x) or (node.operator == "OR" and x):
            return x
        mark = len(self.errors)
        right = self.evaluate(node.right)
        if len(self.errors) > mark:
            return False
        y = self._bool(right, node)
        return x != y if node.operator == "XOR" else y

    def _like(self, node: Like) -> Value:
        mark = len(self.errors)
        value = self.evaluate(node.operand)
        if len(self.errors) > mark:
            return False
        text = self._coerce(value, ValueType.STRING, node)
        return node.pattern.matches(str(text)) != node.negated

    def _in(self, node: In) -> Value:
        mark = len(self.errors)
        value = self.evaluate(node.operand)
        items = [self.evaluate(item) for item in node.items]
        if len(self.errors) > mark:
            return False
        # The left operand's type is the target type for every element (spec 3.7).
        target = type_of(value)
        found = [self._coerce(item, target, at) for item, at in zip(items, node.items)]
        return (value in found) != node.negated

    def _call(self, node: Call) -> Value:
        arity = len(node.arguments)
        function = self._functions.resolve(node.name, arity)
        if function is None:
            return self._fail(CesqlMissingFunctionError(node.name, arity), node, False)
        zero = zero_value(function.returns)
        mark = len(self.errors)
        values = [self.evaluate(argument) for argument in node.arguments]
        if len(self.errors) > mark:
            return zero
        types = function.parameter_types(len(values))
        arguments = [self._coerce(v, t, a) for v, t, a in zip(values, types, node.arguments)]
        try:
            result = function.implementation(*arguments)
        except CesqlError as error:
            return self._fail(error, node, zero)
        except Exception as error:  # a user-defined function's bug must not escape a filter
            message = f"{node.name} failed: {error!r}"
            return self._fail(CesqlFunctionEvaluationError(message), node, zero)
        if isinstance(result, Failure):
            self._fail(result.error, node, zero)
            result = result.value
        if not _is_value(result, function.returns):
            message = f"{node.name} returned {result!r}, not a {function.returns.value}"
            return self._fail(CesqlFunctionEvaluationError(message), node, zero)
        return result


def _is_value(result: object, expected: ValueType) -> bool:
    if expected is ValueType.BOOLEAN:
        return isinstance(result, bool)
    if expected is ValueType.INTEGER:
        return isinstance(result, int) and not isinstance(result, bool) and in_int32(result)
    return isinstance(result, str)
