"""A parsed CESQL expression, ready to evaluate against any number of events."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from pipelines.cesql.builtins import BUILTINS
from pipelines.cesql.context import Event, attributes_of
from pipelines.cesql.errors import CesqlError, CesqlParseError
from pipelines.cesql.evaluator import Evaluator
from pipelines.cesql.functions import FunctionRegistry
from pipelines.cesql.nodes import Call, Node
from pipelines.cesql.parser import parse_tree
from pipelines.cesql.values import Value


@dataclass(frozen=True)
class Expression:
    source: str
    tree: Node = field(repr=False)
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
        found: list[Call] = []
        stack: list[Node] = [self.tree]
        while stack:  # no recursion: trees nest as deep as the parser allows
            node = stack.pop()
            if isinstance(node, Call) and self.functions.resolve(node.name, len(node.arguments)) is None:
                found.append(node)
            for part in fields(node):
                value = getattr(node, part.name)
                if isinstance(value, Node):
                    stack.append(value)
                elif isinstance(value, tuple):
                    stack.extend(item for item in value if isinstance(item, Node))
        return sorted(found, key=lambda call: call.position)

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
