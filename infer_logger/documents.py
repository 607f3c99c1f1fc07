"""YAML documents that remember where each value was written, for errors that name file and line.

PyYAML's composed nodes carry marks; this keeps one per path (`("spec", "filters", 0, "cesql")`)
next to the plain data. Timestamps stay strings (a trigger never wants a datetime), so a filter
on `time: 2018-04-05T03:56:24Z` compares text with text; an unquoted `007` or `no` is read as
YAML's number or boolean, and `Document.texts` keeps the text written for it.

A document is refused (DocumentError) when it could not be read safely or means something else
than it seems: nesting deeper than MAX_DEPTH (aliases included), an alias inside its own anchor,
aliases repeating more than MAX_ALIAS_REPEATS values (a 15-byte `x: &a [*a, *a]` or a "billion
laughs" file expands without end), a key written twice in a mapping (kubectl refuses it; the last
one would silently win), and a lone UTF-16 surrogate (`"\\ud800"`: not a character).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from infer_logger.errors import ConfigError

MAX_DEPTH = 100
"""Nesting levels of a document, through aliases too: far below Python's recursion limit."""
MAX_ALIAS_REPEATS = 100_000
"""Values reached again through aliases, in all: generous for shared specs, fatal to alias bombs."""

_SURROGATE = re.compile("[\ud800-\udfff]")
_PLAIN_TYPES = {"tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool"}
_MERGE = "tag:yaml.org,2002:merge"


class LimitError(yaml.MarkedYAMLError):
    """Valid YAML beyond what is read here (its `problem` is the whole reason)."""


class Loader(yaml.SafeLoader):
    """A SafeLoader that reads timestamps as text and refuses nesting past MAX_DEPTH (LimitError)."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        # The composer recurses per level: 5000 `[` would end in a RecursionError.
        if self._depth >= MAX_DEPTH:
            raise LimitError(problem=f"nested deeper than {MAX_DEPTH} levels",
                              problem_mark=self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# Drop the timestamp resolver: every other implicit type (int, bool, null, float) stays.
Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}

Path_ = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Location:
    origin: str
    line: int  # 1-based
    column: int  # 1-based
    offset: int | None = None
    """Columns from here to a scalar value's first character, when its characters lie one to one
    on this line (plain or quoted, without escapes); None otherwise (folded, multi-line, escaped)."""

    def __str__(self) -> str:
        return f"{self.origin}:{self.line}:{self.column}"


@dataclass(slots=True)
class Document:
    """One YAML document: its data, and the location of the values under each path."""

    data: Any
    origin: str
    index: int
    marks: dict[Path_, Location] = field(default_factory=dict)
    texts: dict[Path_, str] = field(default_factory=dict)
    """The text written for each unquoted scalar YAML read as a number or boolean (`007`, `no`)."""

    def locate(self, path: Sequence[object]) -> Location:
        """The location of the deepest value on `path` that exists (parts not found are skipped,
        so a pydantic error location with union tags in it still lands on the right line)."""
        best = self.marks.get((), Location(self.origin, 1, 1))
        prefix: Path_ = ()
        for part in path:
            key = part if isinstance(part, int) else str(part)
            if (*prefix, key) in self.marks:
                prefix = (*prefix, key)
                best = self.marks[prefix]
        return best


class DocumentError(ConfigError):
    """Bad input in a config file: `str()` reads `file:line:column: path: reason`."""

    def __init__(self, location: Location, path: str, reason: str) -> None:
        super().__init__(f"{location}: {path}" if path else str(location), reason)
        self.location = location
        self.path = path
        self.reason = reason


def read_documents(text: str, origin: str) -> list[Document]:
    """Every document of a YAML stream; a syntax error becomes a DocumentError at its line."""
    loader = Loader(text)
    documents: list[Document] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            document = Document(None, origin, len(documents))
            _Walk(document).visit(node, ())  # first: it refuses what constructing would choke on
            document.data = loader.construct_document(node)
            documents.append(document)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Location(origin, mark.line + 1, mark.column + 1) if mark else Location(origin, 1, 1)
        reason = exc.problem if isinstance(exc, LimitError) else f"not valid YAML: {exc.problem or exc}"
        raise DocumentError(where, "", str(reason)) from None
    except yaml.YAMLError as exc:
        raise DocumentError(Location(origin, 1, 1), "", f"not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    return documents


def read_file(path: Path) -> list[Document]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DocumentError(Location(str(path), 1, 1), "", f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise DocumentError(Location(str(path), 1, 1), "", f"not UTF-8 text: {exc.reason}") from exc
    except ValueError as exc:  # a NUL in the name, which no file has ("embedded null byte")
        raise DocumentError(Location(str(path).replace("\0", "\\0"), 1, 1), "", f"cannot read: {exc}") from None
    return read_documents(text, str(path))


class _Walk:
    """Records marks and texts per path, visiting each node's own checks once however many
    aliases reach it; refuses what `read_documents` documents as refused."""

    def __init__(self, document: Document) -> None:
        self.document = document
        self.seen: set[int] = set()
        self.open: set[int] = set()  # the collections on the current path
        self.repeats = 0

    def visit(self, node: yaml.Node, path: Path_, skip: frozenset[str] = frozenset()) -> set[str]:
        """Walk `node` at `path`; a mapping's keys in `skip` are set by a mapping merging this one
        (its own, or an earlier merge source), so they are not its value: not walked, no text
        recorded. Returns the keys a mapping gives at `path` (empty for anything else)."""
        location = self._location(node)
        if len(self.open) >= MAX_DEPTH:  # not len(path): chained merge keys (`<<: *b`) keep the path
            raise DocumentError(location, _format(path), f"nested deeper than {MAX_DEPTH} levels (through aliases)")
        if id(node) in self.seen:
            self.repeats += 1
            if self.repeats > MAX_ALIAS_REPEATS:
                raise DocumentError(location, _format(path),
                                    f"aliases repeat more than {MAX_ALIAS_REPEATS} values: refused as an alias bomb")
        else:
            self.seen.add(id(node))
            self._check(node, path)
        self.document.marks.setdefault(path, location)
        if isinstance(node, yaml.ScalarNode):
            if node.style is None and node.tag in _PLAIN_TYPES:
                self.document.texts.setdefault(path, node.value)
            return set()
        if id(node) in self.open:
            raise DocumentError(location, _format(path), "an alias inside its own anchor (a value containing itself)")
        self.open.add(id(node))
        taken = set(skip)
        if isinstance(node, yaml.MappingNode):
            merged = []
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE:
                    merged.append(value_node)
                elif isinstance(key_node, yaml.ScalarNode):
                    if (key := str(key_node.value)) not in skip:
                        self.visit(value_node, (*path, key))
                    taken.add(key)
            # `<<: *base` or `<<: [*a, *b]`: their keys land at this path, as PyYAML merges them:
            # the mapping's own keys win, a later `<<` over an earlier one, *a over *b.
            for value_node in reversed(merged):
                for source in value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]:
                    taken |= self.visit(source, path, frozenset(taken))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.visit(item, (*path, index))
        self.open.discard(id(node))
        return taken

    def _check(self, node: yaml.Node, path: Path_) -> None:
        if isinstance(node, yaml.ScalarNode):
            _check_text(node, path, self._location(node))
            return
        if not isinstance(node, yaml.MappingNode):
            return
        keys: dict[tuple[str, str], yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE:
                continue
            here = (*path, str(key_node.value))
            _check_text(key_node, here, self._location(key_node))
            first = keys.setdefault((key_node.tag, key_node.value), key_node)
            if first is not key_node:
                raise DocumentError(self._location(key_node), _format(here),
                                    f"the key {key_node.value!r} is already set at line {first.start_mark.line + 1}")

    def _location(self, node: yaml.Node) -> Location:
        mark = node.start_mark
        offset = None
        if isinstance(node, yaml.ScalarNode) and node.style in (None, "'", '"') and node.end_mark.line == mark.line:
            quotes = 0 if node.style is None else 2
            if node.end_mark.index - mark.index == len(node.value) + quotes:
                offset = quotes // 2
        return Location(self.document.origin, mark.line + 1, mark.column + 1, offset)


def first_surrogate(text: str) -> str | None:
    """The first lone UTF-16 surrogate in `text` (what UTF-8 cannot encode: a byte of argv or env
    that is not UTF-8 reads as U+DC80..U+DCFF, a `\\udcXX` escape in YAML), if any."""
    found = None if text.isascii() else _SURROGATE.search(text)
    return None if found is None else found.group()


def _check_text(node: yaml.ScalarNode, path: Path_, location: Location) -> None:
    found = first_surrogate(node.value)
    if found:
        raise DocumentError(location, _format(path),
                            f"U+{ord(found):04X} is half of a UTF-16 surrogate pair, not a character: "
                            "write the character itself (or a \\U escape of 8 hex digits)")


def _format(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out
