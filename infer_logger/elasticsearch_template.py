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
- `*.raw` (a payload that is not JSON, or was truncated, as base64) is kept, not indexed.
- `explanation.params` (the explainer's settings: `nsamples` 200 or "auto") is `flattened`.
- Strings are never detected as dates (`date_detection` off): a feature "2024-01-01" is a
  keyword, so a later "unknown" in it is taken.

`version` marks our revision: installing skips a template of the same version, so running setup
again changes nothing, and the sink creates the template only when it is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from elasticsearch import AsyncElasticsearch

TEMPLATE_NAME = "inference-log"
INDEX_PATTERNS = ("inference-log-*",)
VERSION = 2  # 2: date_detection off, keyword `values`, `raw`, flattened `explanation.params`
# Above the built-in templates (`logs-*-*` etc. sit at 100); equal priorities may not overlap.
PRIORITY = 200

Outcome = Literal["created", "updated", "unchanged", "kept"]

_KEYWORD = {"type": "keyword", "ignore_above": 1024}
_DATE = {"type": "date"}
_PAYLOAD = {"type": "object", "dynamic": True}
_STORED = {"type": "keyword", "index": False, "doc_values": False}  # in _source only

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
        "id": {"type": "keyword"},
        "instance": {"type": "integer"},
        "model": {"type": "keyword"},
        "model_version": {"type": "keyword"},
        "service": {"type": "keyword"},
        "namespace": {"type": "keyword"},
        "component": {"type": "keyword"},
        "endpoint": {"type": "keyword"},
        "protocol": {"type": "keyword"},
        "path": {"type": "keyword"},
        "status": {"type": "integer"},
        "latency_ms": {"type": "float"},
        "metadata": {"type": "object", "dynamic": True},
        "request": {**_PAYLOAD, "properties": {"features": _PAYLOAD, "values": _KEYWORD, "raw": _STORED}},
        "response": {
            **_PAYLOAD,
            "properties": {
                "probabilities": {"type": "float"},
                "outputs": _PAYLOAD,
                "error": {"type": "text"},
                "raw": _STORED,
            },
        },
        "explanation": {
            **_PAYLOAD,
            "properties": {"values": _KEYWORD, "raw": _STORED, "params": {"type": "flattened"}},
        },
        **{f"{kind}_time": _DATE for kind in ("request", "response", "explanation")},
        **{f"{kind}_attributes": _PAYLOAD for kind in ("request", "response", "explanation")},
    },
}


def index_template(index_patterns: Sequence[str] = INDEX_PATTERNS) -> dict[str, Any]:
    """The body of `PUT _index_template/<name>`."""
    return {
        "index_patterns": list(index_patterns),
        "priority": PRIORITY,
        "version": VERSION,
        "_meta": {"managed_by": "infer-logger", "description": "one audit record per prediction"},
        "template": {"mappings": MAPPINGS},
    }


async def install_template(
    client: AsyncElasticsearch,
    *,
    name: str = TEMPLATE_NAME,
    index_patterns: Sequence[str] = INDEX_PATTERNS,
    overwrite: bool = True,
) -> Outcome:
    """Create the template, or replace one of another version (`kept` when `overwrite` is off).

    Indices that exist already keep their mappings; the template applies to new ones.
    """
    from elasticsearch import BadRequestError, NotFoundError

    body = index_template(index_patterns)
    try:
        found = await client.indices.get_index_template(name=name)
        current = found["index_templates"][0]["index_template"]
    except NotFoundError:
        current = None
    if current is not None:
        if current.get("version") == VERSION and list(current.get("index_patterns", ())) == body["index_patterns"]:
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
