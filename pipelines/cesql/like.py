"""LIKE patterns: `%` is any run of characters, `_` exactly one; `\\%` and `\\_` are literal. A
backslash before any other character is itself literal, before another backslash too (the TCK's
`'ab\\c'` matches itself; `\\\\` is two backslashes, as `=` reads it: the spec defines only `\\%`
and `\\_`).

Matching is a greedy scan that backtracks only to the last `%`, so it runs in O(len(text) *
len(pattern)) whatever the pattern; a translated regular expression could backtrack
exponentially on patterns like `%a%a%a%b`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Wildcard(Enum):
    ONE = "_"
    MANY = "%"


Piece = str | Wildcard  # a str piece is one literal character


@dataclass(frozen=True, slots=True)
class LikePattern:
    source: str
    pieces: tuple[Piece, ...]

    @classmethod
    def compile(cls, source: str) -> LikePattern:
        pieces: list[Piece] = []
        index = 0
        while index < len(source):
            char = source[index]
            following = source[index + 1 : index + 2]
            if char == "\\" and following in ("%", "_"):
                pieces.append(following)
                index += 2
                continue
            pieces.append(Wildcard(char) if char in "%_" else char)
            index += 1
        return cls(source, tuple(pieces))

    def matches(self, text: str) -> bool:
        pieces = self.pieces
        p = t = 0
        star = -1  # index of the last MANY seen, or -1
        resume = 0  # text position that MANY currently absorbs up to
        while t < len(text):
            piece = pieces[p] if p < len(pieces) else None
            if piece is Wildcard.MANY:
                star, resume = p, t
                p += 1
            elif piece is not None and (piece is Wildcard.ONE or piece == text[t]):
                p += 1
                t += 1
            elif star >= 0:
                resume += 1
                p, t = star + 1, resume
            else:
                return False
        return all(piece is Wildcard.MANY for piece in pieces[p:])
