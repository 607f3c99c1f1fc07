"""The index template of the audit documents (see `infer_logger.audit`) and its installer.

A composable template (`PUT _index_template/inference-log`) for `inference-log-*`: explicit types
for the attributes, objects with dynamic mapping for the payload parts. Dynamic fields are mapped
so that the first document cannot fix a bad type for all later ones: strings become `keyword`
(Kibana aggregates them), all numbers `double` (a feature first seen as 5 must take 5.5 later,
and float32 would round large integers), and every `*_attributes` value is a `keyword`.

Dynamic fields still take the type they are first seen with: a feature that is a number in one
request and text in another is refused (400) from then on, and the sink dead-letters that event.
Indices per model (the sink's default name) keep such clashes between models apart. Where one
field routinely holds several types, it has a type that takes them all:

- `request.values` and `explanation.values` (list instances without names, e.g. a tabular row
  `[5.1, "red", 3]`) are `keyword`: numbers are kept and searchable as terms, not as ranges.
  Configure the sink's `feature_names` for the model to get typed per-feature fields
  (`request.features.<name>`, `explanation.attributions.<name>`). `response.values` stays numeric.
- `request.items` and `explanation.items` (list instances holding objects, e.g. tokens
  `[{"token": "a", "pos": 1}]`) are `flattened`: every leaf a keyword, searchable as
  `request.items.token`.
- `*.raw` (a payload that is not JSON, or was truncated, as base64) is kept, not indexed.
- `explanation.params` (the explainer's settings: `nsamples` 200 or "auto") is `flattened`.
- Strings are never detected as dates (`date_detection` off): a feature "2024-01-01" is a
  keyword, so a later "unknown" in it is taken.

`version` marks our revision: installing skips a template of the same version, so running setup
again changes nothing, and the sink creates the template only when it is missing.

Templates live beside others in a cluster, so:

- A template is replaced only when `_meta.managed_by` says it is ours: one of the same name that
  is not is `foreign` and left alone (setup replaces it with `--force` only; the sink never).
- The priority is 200 (above the built-in `logs-*-*` etc. at 100) plus the length of the
  pattern's fixed part, so a more specific pattern wins where two overlap (`inference-*` beside
  `inference-log-*`); Elasticsearch refuses two overlapping templates of equal priority.
- Only the highest-priority template matching a new index applies: one of another's with a
  higher priority over our pattern (a cluster-wide `*` setting replicas) gives our indices its
  mappings. `shadowing` asks Elasticsearch which one applies.
- Before templates were named after their index, every sink used `inference-log`, with its own
  index's patterns (`audit-*`). Installing a template for those patterns under the new name
  gives that old one its own patterns back (`retire_shared`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from elasticsearch import AsyncElasticsearch

TEMPLATE_NAME = "inference-log"
INDEX_PATTERNS = ("inference-log-*",)
# 2: date_detection off, keyword `values`, `raw`, flattened `explanation.params`;
# 3: priority by pattern length, flattened `items`; 4: ignore_above on the attribute keywords,
# room for 5000 fields; 5: flattened `payload` (the Fluentd path's whole payloads)
VERSION = 5
# Above the built-in templates (`logs-*-*` etc. sit at 100); equal priorities may not overlap.
PRIORITY = 200
MANAGED_BY = "infer-logger"

# created/updated/unchanged; kept: ours, of another version or patterns, left (overwrite off);
# foreign: not ours, left (force off).
Outcome = Literal["created", "updated", "unchanged", "kept", "foreign"]

_KEYWORD = {"type": "keyword", "ignore_above": 1024}
# Elasticsearch refuses a document with a term over 32,766 bytes ("immense term"): an id that long
# (the sidecar takes headers up to 64 KiB) dead-lettered its exchange. Longer ones are kept, not indexed.
_LONG_KEYWORD = {"type": "keyword", "ignore_above": 8191}
_DATE = {"type": "date"}
_PAYLOAD = {"type": "object", "dynamic": True}
_STORED = {"type": "keyword", "index": False, "doc_values": False}  # in _source only
_FLATTENED = {"type": "flattened", "ignore_above": 1024}  # any shape, every leaf a keyword

MAPPINGS: dict[str, Any] = {
    "date_detection": False,
    "dynamic_templates": [
        {"attributes_as_keywords": {"path_match": "*_attributes.*", "mapping": _KEYWORD}},
        {"strings_as_keywords": {"match_mapping_type": "string", "mapping": _KEYWORD}},
        {"integers_as_doubles": {"match_mapping_type": "long", "mapping": {"type": "double"}}},
        {"floats_as_doubles": {"match_mapping_type": "double", "mapping": {"type": "double"}}},
    ],
    "properties": {
        "@timestamp": _DATE,
        "id": _LONG_KEYWORD,
        "instance": {"type": "integer"},
        **{name: _LONG_KEYWORD for name in ("model", "model_version", "service", "namespace", "component", "endpoint",
                                  "protocol", "path")},
        "status": {"type": "integer"},
        "latency_ms": {"type": "float"},
        "metadata": {"type": "object", "dynamic": True},
        "request": {
            **_PAYLOAD,
            "properties": {"features": _PAYLOAD, "values": _KEYWORD, "items": _FLATTENED, "raw": _STORED,
                           "payload": _FLATTENED},
        },
        "response": {
            **_PAYLOAD,
            "properties": {
                "probabilities": {"type": "float"},
                "outputs": _PAYLOAD,
                "error": {"type": "text"},
                "raw": _STORED,
                "payload": _FLATTENED,
            },
        },
        "explanation": {
            **_PAYLOAD,
            "properties": {"values": _KEYWORD, "items": _FLATTENED, "raw": _STORED, "params": _FLATTENED,
                           "payload": _FLATTENED},
        },
        **{f"{kind}_time": _DATE for kind in ("request", "response", "explanation")},
        **{f"{kind}_attributes": _PAYLOAD for kind in ("request", "response", "explanation")},
    },
}


# A model's features and their attributions are fields of their own (`request.features.<name>`,
# `explanation.attributions.<name>`): Elasticsearch's default of 1000 fields an index refused
# every document of a 600-feature model once its explanations came (a 400: dead-lettered).
SETTINGS: dict[str, Any] = {"index.mapping.total_fields.limit": 5000}


def priority(index_patterns: Sequence[str]) -> int:
    """The more specific pattern wins: 200 + twice the longest fixed part (index names are at
    most 255 bytes), + 1 for one index. Elasticsearch refuses templates of equal priority whose
    patterns overlap: one index `audit` and `audit*` had the same, and the second was refused."""
    return PRIORITY + max((2 * min(len(p.split("*", 1)[0]), 255) + ("*" not in p) for p in index_patterns),
                          default=0)


def index_template(index_patterns: Sequence[str] = INDEX_PATTERNS) -> dict[str, Any]:
    """The body of `PUT _index_template/<name>`."""
    return {
        "index_patterns": list(index_patterns),
        "priority": priority(index_patterns),
        "version": VERSION,
        "_meta": {"managed_by": MANAGED_BY, "description": "one audit record per prediction"},
        "template": {"settings": SETTINGS, "mappings": MAPPINGS},
    }


async def install_template(
    client: AsyncElasticsearch,
    *,
    name: str = TEMPLATE_NAME,
    index_patterns: Sequence[str] = INDEX_PATTERNS,
    overwrite: bool = True,
    force: bool = False,
) -> Outcome:
    """Create the template, or replace one of ours of another version (`kept` when `overwrite`
    is off); one that is not ours is `foreign` and left, unless `force`.

    Indices that exist already keep their mappings; the template applies to new ones.
    """
    from elasticsearch import BadRequestError

    body = index_template(index_patterns)
    current = await _get(client, name)
    if current is not None:
        if not _ours(current) and not force:
            return "foreign"
        if _ours(current) and current.get("version") == VERSION and (
            list(current.get("index_patterns", ())) == body["index_patterns"]
        ):
            return "unchanged"
        if not overwrite:
            return "kept"
    try:
        await client.indices.put_index_template(
            name=name,
            create=current is None,
            index_patterns=body["index_patterns"],
            priority=body["priority"],
            version=body["version"],
            meta=body["_meta"],
            template=body["template"],
        )
    except BadRequestError as exc:
        # Another process created it between our GET and PUT: theirs is as good as ours.
        if current is None and "already exists" in str(exc):
            return "unchanged"
        raise
    return "created" if current is None else "updated"


async def retire_shared(client: AsyncElasticsearch, *, name: str, index_patterns: Sequence[str]) -> bool:
    """Give our `inference-log` template its own patterns back when it holds `index_patterns`,
    now the template `name`'s (it was every sink's before templates were named after their
    index); True if so. Call it once `name` is installed, so that no index is created without a
    template meanwhile. Not deleted: a default-index sink may have found it first (kept, as of
    another version) and would write `inference-log-*` indices with no template at all."""
    if name == TEMPLATE_NAME or list(index_patterns) == list(INDEX_PATTERNS):
        return False
    shared = await _get(client, TEMPLATE_NAME)
    if shared is None or not _ours(shared) or list(shared.get("index_patterns", ())) != list(index_patterns):
        return False
    await install_template(client, name=TEMPLATE_NAME, index_patterns=INDEX_PATTERNS, overwrite=True)
    return True


async def shadowing(client: AsyncElasticsearch, *, name: str, index: str) -> str | None:
    """What applies to a new index `index` instead of our template `name` (which matches it),
    e.g. "index template team (priority 500, for inference-*)"; None when ours applies."""
    # `_simulate_index` lists the matching templates that lose under `overlapping` (Elasticsearch:
    # those whose patterns meet the winner's, never the winner), but does not name the winner.
    # ValueError for an answer of another shape (a front's page: the client checks that it talks
    # to Elasticsearch only until its first answer).
    simulated = (await client.indices.simulate_index_template(name=index)).body
    if not isinstance(simulated, dict):
        raise ValueError(f"_simulate_index answered {str(simulated)[:80]!r}")
    losers = simulated.get("overlapping") or ()
    if not any(isinstance(t, dict) and t.get("name") == name for t in losers):
        return None
    found = (await client.indices.get_index_template()).body
    listed = found.get("index_templates") if isinstance(found, dict) else None
    if not isinstance(listed, list):
        raise ValueError(f"_index_template answered {str(found)[:80]!r}")
    matching: list[tuple[int, str, list[str]]] = []
    for t in listed:
        body = t.get("index_template") if isinstance(t, dict) else None
        if not isinstance(body, dict) or t.get("name") == name:
            continue
        patterns = body.get("index_patterns")
        patterns = [str(patterns)] if isinstance(patterns, str) else [str(p) for p in patterns or ()]
        if any(_matches(p, index) for p in patterns):
            rank = body.get("priority")
            matching.append((rank if isinstance(rank, int) else 0, str(t.get("name")), patterns))
    if not matching:
        return "another index template"
    rank, winner, patterns = max(matching)
    return f"index template {winner} (priority {rank}, for {', '.join(patterns)})"


def _matches(pattern: str, index: str) -> bool:
    """Elasticsearch's simple match: `*` alone is a wildcard."""
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), index) is not None


async def _get(client: AsyncElasticsearch, name: str) -> dict[str, Any] | None:
    from elasticsearch import NotFoundError

    try:
        found = await client.indices.get_index_template(name=name)
    except NotFoundError:
        return None
    template: dict[str, Any] = found["index_templates"][0]["index_template"]
    return template


def _ours(template: dict[str, Any]) -> bool:
    meta = template.get("_meta")
    return isinstance(meta, dict) and meta.get("managed_by") == MANAGED_BY
