"""YAML documents that remember where each value was written, for errors that name file and line.

PyYAML's composed nodes carry marks; this keeps one per path (`("spec", "filters", 0, "cesql")`)
next to the plain data. Timestamps stay strings (a trigger never wants a datetime), so a filter
on `time: 2018-04-05T03:56:24Z` compares text with text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from infer_logger.errors import ConfigError


class _Loader(yaml.SafeLoader):
    pass


# Drop the timestamp resolver: every other implicit type (int, bool, null, float) stays.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}

Path_ = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Location:
    origin: str
    line: int  # 1-based
    column: int  # 1-based
    quoted: bool = False

    def __str__(self) -> str:
        return f"{self.origin}:{self.line}:{self.column}"


@dataclass(slots=True)
class Document:
    """One YAML document: its data, and the location of the values under each path."""

    data: Any
    origin: str
    index: int
    marks: dict[Path_, Location] = field(default_factory=dict)

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
    loader = _Loader(text)
    documents: list[Document] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            document = Document(loader.construct_document(node), origin, len(documents))
            _walk(node, (), document.marks, origin)
            documents.append(document)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Location(origin, mark.line + 1, mark.column + 1) if mark else Location(origin, 1, 1)
        raise DocumentError(where, "", f"not valid YAML: {exc.problem or exc}") from None
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
    return read_documents(text, str(path))


def _walk(node: yaml.Node, path: Path_, marks: dict[Path_, Location], origin: str) -> None:
    if len(path) > 64:  # a recursive alias: deep enough for any error to find its line
        return
    mark = node.start_mark
    quoted = isinstance(node, yaml.ScalarNode) and node.style in ("'", '"')
    marks.setdefault(path, Location(origin, mark.line + 1, mark.column + 1, quoted))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                _walk(value_node, (*path, str(key_node.value)), marks, origin)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*path, index), marks, origin)
