"""Recursive-descent parser for CESQL v1 expressions.

Precedence, loosest first, as spec section 3.6 lists it (equal precedence associates left):

    AND OR XOR                      (one level: `a OR b AND c` is `(a OR b) AND c`)
    = != <> < <= > >=
    + -
    * / %
    IN, NOT IN, LIKE, NOT LIKE      (postfix, applied left to right)
    NOT, unary -                    (so `NOT a LIKE 'x'` is `(NOT a) LIKE 'x'`)
    function call, EXISTS, literal, attribute, ( ... )

The spec's text is followed where the ANTLR grammar published with the SDKs differs (that
grammar makes AND/OR/XOR right-associative); parenthesise mixed logic to be portable.
"""

from __future__ import annotations

import re

from pipelines.cesql.errors import CesqlParseError
from pipelines.cesql.lexer import Token, TokenKind, tokenize
from pipelines.cesql.like import LikePattern
from pipelines.cesql.nodes import Attribute, Binary, Call, Exists, In, Like, Literal, Node, Unary
from pipelines.cesql.values import in_int32

# Bounds on parenthesis nesting and tree depth keep parser and evaluator far from Python's
# recursion limit, whatever the caller's own stack use.
MAX_NESTING = 40
MAX_DEPTH = 100

_ATTRIBUTE_NAME = re.compile(r"[A-Za-z0-9]+")
_FUNCTION_NAME = re.compile(r"[A-Za-z][A-Za-z_]*")

_LEVELS: tuple[frozenset[TokenKind], ...] = (
    frozenset({TokenKind.AND, TokenKind.OR, TokenKind.XOR}),
    frozenset({TokenKind.EQ, TokenKind.NE, TokenKind.LT, TokenKind.LE, TokenKind.GT, TokenKind.GE}),
    frozenset({TokenKind.PLUS, TokenKind.MINUS}),
    frozenset({TokenKind.STAR, TokenKind.SLASH, TokenKind.PERCENT}),
)


def mixed_logic(source: str) -> int | None:
    """The position of the first operator that mixes two of AND, OR and XOR unparenthesised (`a OR
    b AND c`), where this parser (the spec: one level, left to right) and the SDKs' grammar, which
    Knative runs (right to left), read the expression differently; None if there is none. For a
    valid expression."""
    seen: list[set[TokenKind]] = [set()]  # the logic operators of each open parenthesis, or argument
    for token in tokenize(source):
        if token.kind is TokenKind.LPAREN:
            seen.append(set())
        elif token.kind is TokenKind.RPAREN and len(seen) > 1:
            seen.pop()
        elif token.kind is TokenKind.COMMA:
            seen[-1] = set()
        elif token.kind in _LEVELS[0]:
            seen[-1].add(token.kind)
            if len(seen[-1]) > 1:
                return token.position
    return None


def parse_tree(source: str) -> Node:
    """The syntax tree of `source`; raises `CesqlParseError`."""
    return _Parser(source).parse()


class _Parser:
    def __init__(self, source: str) -> None:
        self._source = source
        self._tokens = tokenize(source)
        self._index = 0
        self._nesting = 0

    def parse(self) -> Node:
        if self._peek().kind is TokenKind.END:
            raise self._error("empty expression", self._peek())
        node = self._expression()
        if self._peek().kind is not TokenKind.END:
            raise self._error(f"unexpected {_describe(self._peek())}", self._peek())
        return node

    # --- helpers -------------------------------------------------------------------------

    def _peek(self, ahead: int = 0) -> Token:
        return self._tokens[min(self._index + ahead, len(self._tokens) - 1)]

    def _next(self) -> Token:
        token = self._peek()
        self._index += 1
        return token

    def _expect(self, kind: TokenKind, what: str) -> Token:
        token = self._peek()
        if token.kind is not kind:
            raise self._error(f"expected {what}, found {_describe(token)}", token)
        return self._next()

    def _error(self, message: str, token: Token) -> CesqlParseError:
        return CesqlParseError(message, expression=self._source, position=token.position)

    def _checked(self, node: Node) -> Node:
        if node.depth > MAX_DEPTH:
            raise CesqlParseError(
                f"expression nested deeper than {MAX_DEPTH}",
                expression=self._source,
                position=node.position,
            )
        return node

    # --- grammar -------------------------------------------------------------------------

    def _expression(self) -> Node:
        self._nesting += 1
        if self._nesting > MAX_NESTING:
            raise self._error(f"more than {MAX_NESTING} nested sub-expressions", self._peek())
        node = self._binary(0)
        self._nesting -= 1
        return node

    def _binary(self, level: int) -> Node:
        if level == len(_LEVELS):
            return self._postfix()
        node = self._binary(level + 1)
        while self._peek().kind in _LEVELS[level]:
            operator = self._next()
            right = self._binary(level + 1)
            name = "!=" if operator.kind is TokenKind.NE else operator.kind.value
            node = self._checked(Binary(operator.position, name, node, right))
        return node

    def _postfix(self) -> Node:
        node = self._unary()
        while True:
            negated = self._peek().kind is TokenKind.NOT
            keyword = self._peek(1 if negated else 0)
            if keyword.kind is TokenKind.LIKE:
                self._index += 2 if negated else 1
                pattern = self._peek()
                if pattern.kind is not TokenKind.STRING:
                    raise self._error("LIKE needs a string literal pattern", pattern)
                self._next()
                compiled = LikePattern.compile(str(pattern.value))
                node = Like(keyword.position, node, compiled, negated)
            elif keyword.kind is TokenKind.IN:
                self._index += 2 if negated else 1
                node = In(keyword.position, node, self._set(), negated)
            elif negated:
                raise self._error("expected LIKE or IN after NOT", keyword)
            else:
                return node
            node = self._checked(node)

    def _set(self) -> tuple[Node, ...]:
        self._expect(TokenKind.LPAREN, "'(' to open the IN set")
        items = [self._expression()]
        while self._peek().kind is TokenKind.COMMA:
            self._next()
            items.append(self._expression())
        self._expect(TokenKind.RPAREN, "',' or ')' in the IN set")
        return tuple(items)

    def _unary(self) -> Node:
        # Prefix operators are collected in a loop so `NOT NOT ... x` costs no recursion.
        operators: list[Token] = []
        while self._peek().kind in (TokenKind.NOT, TokenKind.MINUS):
            if self._peek().kind is TokenKind.MINUS and self._peek(1).kind is TokenKind.INTEGER:
                break  # a negative literal, folded by _primary
            operators.append(self._next())
        node = self._primary()
        for operator in reversed(operators):
            node = self._checked(Unary(operator.position, operator.kind.value, node))
        return node

    def _primary(self) -> Node:
        token = self._next()
        kind = token.kind
        if kind in (TokenKind.MINUS, TokenKind.PLUS) and self._peek().kind is TokenKind.INTEGER:
            digits = self._next()
            assert isinstance(digits.value, int)
            return self._integer(-digits.value if kind is TokenKind.MINUS else digits.value, token)
        if kind is TokenKind.INTEGER:
            assert isinstance(token.value, int)
            return self._integer(token.value, token)
        if kind is TokenKind.STRING:
            return Literal(token.position, str(token.value))
        if kind in (TokenKind.TRUE, TokenKind.FALSE):
            return Literal(token.position, kind is TokenKind.TRUE)
        if kind is TokenKind.EXISTS:
            name = self._expect(TokenKind.WORD, "an attribute name after EXISTS")
            return Exists(token.position, self._attribute_name(name))
        if kind is TokenKind.WORD:
            if self._peek().kind is TokenKind.LPAREN:
                return self._call(token)
            return Attribute(token.position, self._attribute_name(token))
        if kind is TokenKind.LPAREN:
            node = self._expression()
            self._expect(TokenKind.RPAREN, "')'")
            return node
        raise self._error(f"unexpected {_describe(token)}", token)

    def _integer(self, number: int, token: Token) -> Node:
        if not in_int32(number):
            raise self._error("integer literal outside the 32-bit range", token)
        return Literal(token.position, number)

    def _attribute_name(self, token: Token) -> str:
        if _ATTRIBUTE_NAME.fullmatch(token.text) is None:
            raise self._error(f"invalid attribute name {token.text!r}", token)
        return token.text.lower()

    def _call(self, name: Token) -> Node:
        if _FUNCTION_NAME.fullmatch(name.text) is None:
            raise self._error(f"invalid function name {name.text!r}", name)
        self._expect(TokenKind.LPAREN, "'('")
        arguments: list[Node] = []
        if self._peek().kind is not TokenKind.RPAREN:
            arguments.append(self._expression())
            while self._peek().kind is TokenKind.COMMA:
                self._next()
                arguments.append(self._expression())
        self._expect(TokenKind.RPAREN, "',' or ')' after the function arguments")
        return self._checked(Call(name.position, name.text.upper(), tuple(arguments)))


def _describe(token: Token) -> str:
    if token.kind is TokenKind.END:
        return "end of expression"
    return f"{token.text!r}"
