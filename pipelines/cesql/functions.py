"""Function definitions and the registry that dispatches a call by name and arity (spec 3.5).

A function's implementation receives arguments already cast to its parameter types and returns
a value of its return type, or a `Failure` when the spec asks for a value *and* an error (e.g.
`LEFT('abc', -2)` is `'abc'` plus a functionEvaluation error). If it raises instead, the call
evaluates to the zero value of its return type with a functionEvaluation error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from pipelines.cesql.errors import CesqlError
from pipelines.cesql.values import Value, ValueType

_NAME = re.compile(r"[A-Za-z][A-Za-z_]*")


@dataclass(frozen=True, slots=True)
class Failure:
    """A function result that comes with an error, as CESQL's total functions require."""

    value: Value
    error: CesqlError


Implementation = Callable[..., Value | Failure]


@dataclass(frozen=True, slots=True)
class Function:
    """`name(parameters..., variadic...) -> returns`; `variadic` types any trailing arguments."""

    name: str
    parameters: tuple[ValueType, ...]
    returns: ValueType
    implementation: Implementation
    variadic: ValueType | None = None

    def __post_init__(self) -> None:
        if _NAME.fullmatch(self.name) is None:
            raise ValueError(f"invalid CESQL function name {self.name!r}")
        if self.returns is ValueType.ANY:
            raise ValueError(f"{self.name}: the return type must be Boolean, Integer or String")
        object.__setattr__(self, "name", self.name.upper())

    def accepts(self, arity: int) -> bool:
        if self.variadic is None:
            return arity == len(self.parameters)
        return arity >= len(self.parameters)

    def parameter_types(self, arity: int) -> tuple[ValueType, ...]:
        extra = arity - len(self.parameters)
        return self.parameters + (self.variadic or ValueType.ANY,) * extra


class FunctionRegistry:
    """An immutable set of functions; `extended` returns a new registry with more of them.

    Enforces the spec's overloading rules: one definition per name and arity, and at most one
    variadic definition per name, whose fixed parameters outnumber every other overload's.
    """

    def __init__(self, functions: Iterable[Function] = ()) -> None:
        self._fixed: dict[tuple[str, int], Function] = {}
        self._variadic: dict[str, Function] = {}
        for function in functions:
            self._add(function)

    def extended(self, *functions: Function) -> FunctionRegistry:
        return FunctionRegistry([*self, *functions])

    def resolve(self, name: str, arity: int) -> Function | None:
        name = name.upper()
        function = self._fixed.get((name, arity))
        if function is None:
            function = self._variadic.get(name)
        return function if function is not None and function.accepts(arity) else None

    def __iter__(self) -> Iterator[Function]:
        yield from self._fixed.values()
        yield from self._variadic.values()

    def __len__(self) -> int:
        return len(self._fixed) + len(self._variadic)

    def _add(self, function: Function) -> None:
        name, fixed = function.name, len(function.parameters)
        arities = [arity for (other, arity) in self._fixed if other == name]
        variadic = self._variadic.get(name)
        if function.variadic is None:
            if (name, fixed) in self._fixed:
                raise ValueError(f"function {name} with {fixed} argument(s) is already defined")
            if variadic is not None and len(variadic.parameters) <= fixed:
                raise ValueError(f"{name}/{fixed} clashes with the variadic {name}")
            self._fixed[(name, fixed)] = function
            return
        if variadic is not None:
            raise ValueError(f"function {name} already has a variadic definition")
        if any(arity >= fixed for arity in arities):
            raise ValueError(f"variadic {name} needs more than {max(arities)} fixed parameters")
        self._variadic[name] = function
