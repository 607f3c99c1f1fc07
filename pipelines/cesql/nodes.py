"""The syntax tree `parse` builds. Nodes are immutable; `position` is the 0-based source offset.

`depth` bounds the evaluator's recursion. A binary node's left operand does not add to it,
because the evaluator walks left-leaning chains such as `a OR b OR c ...` in a loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.cesql.like import LikePattern
from pipelines.cesql.values import Value


@dataclass(frozen=True, slots=True)
class Node:
    position: int
    depth: int = field(init=False, default=1, compare=False, repr=False)

    def _nest(self, *children: Node) -> None:
        object.__setattr__(self, "depth", 1 + max((c.depth for c in children), default=0))


@dataclass(frozen=True, slots=True)
class Literal(Node):
    value: Value


@dataclass(frozen=True, slots=True)
class Attribute(Node):
    name: str  # lower-cased: CloudEvents attribute names are lower case


@dataclass(frozen=True, slots=True)
class Exists(Node):
    name: str


@dataclass(frozen=True, slots=True)
class Unary(Node):
    operator: str  # "NOT" or "-"
    operand: Node

    def __post_init__(self) -> None:
        self._nest(self.operand)


@dataclass(frozen=True, slots=True)
class Binary(Node):
    operator: str  # "AND" "OR" "XOR" "=" "!=" "<" "<=" ">" ">=" "+" "-" "*" "/" "%"
    left: Node
    right: Node

    def __post_init__(self) -> None:
        object.__setattr__(self, "depth", max(self.left.depth, self.right.depth + 1))


@dataclass(frozen=True, slots=True)
class Like(Node):
    operand: Node
    pattern: LikePattern
    negated: bool

    def __post_init__(self) -> None:
        self._nest(self.operand)


@dataclass(frozen=True, slots=True)
class In(Node):
    operand: Node
    items: tuple[Node, ...]
    negated: bool

    def __post_init__(self) -> None:
        self._nest(self.operand, *self.items)


@dataclass(frozen=True, slots=True)
class Call(Node):
    name: str  # upper-cased: function names are case-insensitive
    arguments: tuple[Node, ...]

    def __post_init__(self) -> None:
        self._nest(*self.arguments)
