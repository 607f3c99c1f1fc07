"""Turns CESQL text into tokens (the spec's CESQLLexer grammar, keywords case-insensitive).

Signs are always separate tokens; the parser folds `-` followed by an integer into a negative
literal, so `-2147483648` is a valid literal and `4-1` still reads as a subtraction.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pipelines.cesql.errors import CesqlParseError


class TokenKind(Enum):
    INTEGER = "integer"
    STRING = "string"
    WORD = "identifier"
    TRUE = "TRUE"
    FALSE = "FALSE"
    AND = "AND"
    OR = "OR"
    XOR = "XOR"
    NOT = "NOT"
    LIKE = "LIKE"
    IN = "IN"
    EXISTS = "EXISTS"
    LPAREN = "("
    RPAREN = ")"
    COMMA = ","
    PLUS = "+"
    MINUS = "-"
    STAR = "*"
    SLASH = "/"
    PERCENT = "%"
    EQ = "="
    NE = "!="
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    END = "end of expression"


KEYWORDS = {
    kind.value: kind
    for kind in (
        TokenKind.TRUE, TokenKind.FALSE, TokenKind.AND, TokenKind.OR, TokenKind.XOR,
        TokenKind.NOT, TokenKind.LIKE, TokenKind.IN, TokenKind.EXISTS,
    )
}

# Longest first, so "<=" wins over "<".
_SYMBOLS = {
    "!=": TokenKind.NE, "<>": TokenKind.NE, "<=": TokenKind.LE, ">=": TokenKind.GE,
    "<": TokenKind.LT, ">": TokenKind.GT, "=": TokenKind.EQ, "(": TokenKind.LPAREN,
    ")": TokenKind.RPAREN, ",": TokenKind.COMMA, "+": TokenKind.PLUS, "-": TokenKind.MINUS,
    "*": TokenKind.STAR, "/": TokenKind.SLASH, "%": TokenKind.PERCENT,
}

_BLANK = " \t\r\n"
_WORD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


@dataclass(frozen=True, slots=True)
class Token:
    kind: TokenKind
    text: str
    position: int
    # The decoded literal: an int for INTEGER (not yet range-checked), the unescaped str for STRING.
    value: int | str | None = None


def tokenize(source: str) -> list[Token]:
    """All tokens of `source`, ending with an END token; raises `CesqlParseError`."""
    tokens: list[Token] = []
    index = 0
    while index < len(source):
        char = source[index]
        if char in _BLANK:
            index += 1
        elif char in "'\"":
            token = _string(source, index)
            tokens.append(token)
            index += len(token.text)
        elif char in _WORD_CHARS:
            end = index
            while end < len(source) and source[end] in _WORD_CHARS:
                end += 1
            tokens.append(_word(source[index:end], index))
            index = end
        else:
            for symbol, kind in _SYMBOLS.items():
                if source.startswith(symbol, index):
                    tokens.append(Token(kind, symbol, index))
                    index += len(symbol)
                    break
            else:
                raise CesqlParseError(
                    f"unexpected character {char!r}", expression=source, position=index
                )
    tokens.append(Token(TokenKind.END, "", len(source)))
    return tokens


def _word(text: str, position: int) -> Token:
    if text.isdigit():  # only ASCII digits reach here
        # Past 10 digits it is out of range whatever its sign (the parser says so); int() raises
        # ValueError past 4300, leading zeros included.
        digits = text.lstrip("0") or "0"
        number = int(digits) if len(digits) <= 10 else 1 << 32
        return Token(TokenKind.INTEGER, text, position, number)
    keyword = KEYWORDS.get(text.upper())
    if keyword is not None:
        return Token(keyword, text, position)
    return Token(TokenKind.WORD, text, position, text)


def _string(source: str, start: int) -> Token:
    """A quoted literal. `\\<quote>` and a doubled quote stand for the quote (the grammar's one
    escape); any other backslash is kept as written, `\\\\` too (as the Go SDK Knative uses
    reads it; it was one backslash here), so LIKE patterns see their escapes `\\%` and `\\_`."""
    quote = source[start]
    chars: list[str] = []
    index = start + 1
    while index < len(source):
        char = source[index]
        following = source[index + 1] if index + 1 < len(source) else ""
        if char == "\\" and following:
            chars.append(following if following == quote else char + following)
            index += 2
        elif char == quote and following == quote:
            chars.append(quote)
            index += 2
        elif char == quote:
            return Token(TokenKind.STRING, source[start : index + 1], start, "".join(chars))
        else:
            chars.append(char)
            index += 1
    raise CesqlParseError("unterminated string literal", expression=source, position=start)
