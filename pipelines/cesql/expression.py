"""A parsed CESQL expression, ready to evaluate against any number of events."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields

from pipelines.cesql.builtins import BUILTINS
from pipelines.cesql.context import Event, attributes_of
from pipelines.cesql.errors import CesqlError, CesqlParseError
from pipelines.cesql.evaluator import Evaluator
from pipelines.cesql.functions import FunctionRegistry
from pipelines.cesql.nodes import Attribute, Binary, Call, In, Like, Node, Unary
from pipelines.cesql.parser import parse_tree
from pipelines.cesql.values import Value

_COMPARISONS = frozenset({"=", "!=", "<>", "<", "<=", ">", ">="})


@dataclass(frozen=True)
class Expression:
    source: str
    # Compared and hashed by `source`, which decides the tree: the generated __eq__/__hash__
    # would recurse down a 5000-term `a OR b OR ...` chain the evaluator walks in a loop.
    tree: Node = field(repr=False, compare=False)
    functions: FunctionRegistry = field(default=BUILTINS, compare=False, repr=False)

    def evaluate(self, event: Event) -> tuple[Value, list[CesqlError]]:
        """The result and every error met on the way; CESQL always produces a result."""
        evaluator = Evaluator(attributes_of(event), self.functions)
        value = evaluator.evaluate(self.tree)
        return value, evaluator.errors

    def matches(self, event: Event) -> bool:
        """Whether `event` passes this expression used as a filter: the result is TRUE and no
        error occurred (spec 1.2; Knative likewise fails a trigger on any error)."""
        value, errors = self.evaluate(event)
        return value is True and not errors

    def unresolved_calls(self) -> list[Call]:
        """The calls of functions this expression's registry does not have (by name and number of
        arguments): each evaluation would fail them (missingFunction), so a caller that knows its
        registry is final may refuse the expression at once (spec 3.3: at compile time if possible)."""
        found = [node for node in self._nodes()
                 if isinstance(node, Call) and self.functions.resolve(node.name, len(node.arguments)) is None]
        return sorted(found, key=lambda call: call.position)

    def negated_attributes(self) -> list[tuple[Unary, Attribute]]:
        """The NOTs of a bare attribute compared, matched or listed (`NOT type = 'x'`): the grammar
        binds NOT tighter, so that is `(NOT type) = 'x'`, a cast error on every event whose `type`
        is not a boolean, where SQL's reader meant `NOT (type = 'x')`."""
        found: list[tuple[Unary, Attribute]] = []
        for node in self._nodes():
            operand = (node.left if isinstance(node, Binary) and node.operator in _COMPARISONS
                       else node.operand if isinstance(node, Like | In) else None)
            if isinstance(operand, Unary) and operand.operator == "NOT" and isinstance(operand.operand, Attribute):
                found.append((operand, operand.operand))
        return sorted(found, key=lambda pair: pair[0].position)

    def _nodes(self) -> Iterator[Node]:
        stack: list[Node] = [self.tree]
        while stack:  # no recursion: trees nest as deep as the parser allows
            node = stack.pop()
            yield node
            for part in fields(node):
                value = getattr(node, part.name)
                if isinstance(value, Node):
                    stack.append(value)
                elif isinstance(value, tuple):
                    stack.extend(item for item in value if isinstance(item, Node))

    def __str__(self) -> str:
        return self.source


def parse(expression: str, *, functions: FunctionRegistry = BUILTINS) -> Expression:
    """Parse `expression`; raises `CesqlParseError` (with `.position`) if it is not valid CESQL.

    Function names are resolved when evaluating, so an unknown function is a missingFunction
    error then, as the spec and TCK require, not a parse error.
    """
    return Expression(expression, parse_tree(expression), functions)


def evaluate(
    expression: str, event: Event, *, functions: FunctionRegistry = BUILTINS
) -> tuple[Value, list[CesqlError]]:
    """Parse and evaluate in one go; a parse error comes back as `(False, [error])`."""
    try:
        parsed = parse(expression, functions=functions)
    except CesqlParseError as error:
        return False, [error]
    return parsed.evaluate(event)
