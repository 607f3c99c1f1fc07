"""Just enough Gherkin to replay the conformance feature files without pytest-bdd.

Handles Background, Scenario, Scenario Outline with Examples, doc strings and data tables:
everything the CloudEvents feature files use, and nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_KEYWORDS = ("Given", "When", "Then", "And", "But")


@dataclass
class Step:
    text: str  # without its keyword
    doc: str | None = None
    table: list[list[str]] = field(default_factory=list)

    def rows(self) -> list[dict[str, str]]:
        """The table as dicts keyed by its header row."""
        header, *body = self.table
        return [dict(zip(header, row, strict=True)) for row in body]


@dataclass
class Scenario:
    name: str
    steps: list[Step] = field(default_factory=list)
    examples: list[list[str]] = field(default_factory=list)


def parse_feature(text: str) -> list[Scenario]:
    """The feature's scenarios, outlines expanded, each with the Background steps first."""
    background = Scenario("Background")
    scenarios: list[Scenario] = []
    current: Scenario | None = None
    in_examples = False
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        if stripped.startswith("Background:"):
            current, in_examples = background, False
        elif stripped.startswith(("Scenario:", "Scenario Outline:")):
            current, in_examples = Scenario(stripped.partition(":")[2].strip()), False
            scenarios.append(current)
        elif stripped.startswith("Examples:"):
            in_examples = True
        elif current is None:
            pass  # tags, the Feature line and its free text
        elif stripped.startswith('"""'):
            # A doc string loses the indentation of its opening quotes, as Gherkin specifies.
            indent = len(line) - len(line.lstrip())
            end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == '"""')
            current.steps[-1].doc = "\n".join(raw[indent:] for raw in lines[index + 1 : end])
            index = end
        elif stripped.startswith("|"):
            row = [cell.strip() for cell in stripped.strip("|").split("|")]
            (current.examples if in_examples else current.steps[-1].table).append(row)
        elif stripped.split(" ", 1)[0] in _KEYWORDS:
            current.steps.append(Step(stripped.split(" ", 1)[1]))
        index += 1
    return [
        Scenario(s.name, background.steps + s.steps)
        for outline in scenarios
        for s in _expand(outline)
    ]


def _expand(outline: Scenario) -> list[Scenario]:
    if not outline.examples:
        return [outline]
    header, *rows = outline.examples
    expanded = []
    for row in rows:
        values = dict(zip(header, row, strict=True))

        def fill(text: str, values: dict[str, str] = values) -> str:
            return re.sub(r"<([^<>]+)>", lambda m: values.get(m.group(1), m.group(0)), text)

        steps = [
            Step(fill(s.text), None if s.doc is None else fill(s.doc), [[fill(c) for c in r] for r in s.table])
            for s in outline.steps
        ]
        expanded.append(Scenario(fill(outline.name), steps))
    return expanded
