"""Trigger loading: Knative's 25 trigger-validation cases, manifests as they are, the short form,
and errors that name file, line and field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.broker import DocumentError, load_trigger_files, load_triggers
from pipelines.broker.filters import FAIL, PASS
from tests.conformance import ROOT, reason

VALIDATION = ROOT / "knative-filters" / "trigger-filter-validation-cases.yaml"


def _validation_cases() -> list[Any]:
    if not VALIDATION.is_file():
        return [pytest.param(None, id="missing", marks=pytest.mark.skip(reason=reason("knative-filters")))]
    cases = yaml.safe_load(VALIDATION.read_text(encoding="utf-8"))["cases"]
    assert len(cases) == 25
    return [pytest.param(case, id=case["name"]) for case in cases]


def _manifest(spec: dict[str, Any], name: str = "t") -> str:
    return yaml.safe_dump({
        "apiVersion": "eventing.knative.dev/v1", "kind": "Trigger",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"broker": "default", "subscriber": {"uri": "http://127.0.0.1:9/"}, **spec},
    })


@pytest.mark.parametrize("case", _validation_cases())
def test_trigger_validation(case: dict[str, Any]) -> None:
    spec: dict[str, Any] = {key: case[key] for key in ("filter", "filters") if key in case}
    if case["expect"] == "valid":
        assert len(load_triggers(_manifest(spec)).triggers) == 1
        return
    with pytest.raises(DocumentError) as info:
        load_triggers(_manifest(spec))
    # Knative names the field (filters[0].exact[invALID]); the error must name the same one.
    fragment = re.search(r"filters?[\w.\[\]]*", case["error_path_or_message"])
    assert fragment is not None and fragment.group().rstrip(".") in str(info.value)
    if "multiple dialects" in case["error_path_or_message"]:
        assert "multiple dialects found" in str(info.value)


KNATIVE_MANIFESTS = """\
apiVersion: v1
kind: List
items:
  - apiVersion: eventing.knative.dev/v1
    kind: Broker
    metadata:
      name: default
      namespace: inference
    spec:
      config: {apiVersion: v1, kind: ConfigMap, name: config-br-default-channel, namespace: knative-eventing}
      delivery:
        retry: 3
        backoffPolicy: linear
        backoffDelay: PT1S
  - apiVersion: eventing.knative.dev/v1
    kind: Trigger
    metadata:
      name: responses
      namespace: inference
      uid: 8d4e1c6b-0000-4000-8000-000000000001
      resourceVersion: "12345"
      generation: 2
      creationTimestamp: 2024-05-01T10:00:00Z
      labels: {eventing.knative.dev/broker: default}
      annotations: {kubectl.kubernetes.io/last-applied-configuration: "{}"}
    spec:
      broker: default
      filter:
        attributes:
          type: org.kubeflow.serving.inference.response
          inferenceservicename: ""
      subscriber:
        ref: {apiVersion: serving.knative.dev/v1, kind: Service, name: event-display, namespace: inference}
      delivery:
        deadLetterSink:
          uri: http://127.0.0.1:9/dls
    status:
      conditions: [{type: Ready, status: "True"}]
      subscriberUri: http://event-display.inference.svc.cluster.local
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: event-display}
spec: {replicas: 1}
"""


class TestManifests:
    """Knative manifests load as written: metadata and status are ignored, Lists unwrapped."""

    def test_list_of_broker_and_trigger(self) -> None:
        loaded = load_triggers(KNATIVE_MANIFESTS)
        [trigger] = loaded.triggers
        assert trigger.key == ("inference", "responses") and trigger.broker == "default"
        assert trigger.uid == "8d4e1c6b-0000-4000-8000-000000000001"
        assert trigger.subscriber.ref is not None and trigger.subscriber.ref.name == "event-display"
        assert trigger.delivery is not None and trigger.delivery.dead_letter_sink is not None
        [broker] = loaded.brokers
        assert broker.delivery is not None
        assert (broker.namespace, broker.name, broker.delivery.retry) == ("inference", "default", 3)
        event = {"type": "org.kubeflow.serving.inference.response", "inferenceservicename": "iris"}
        assert trigger.filter(event) is PASS and trigger.filter({**event, "inferenceservicename": ""}) is FAIL

    def test_namespace_defaults(self) -> None:
        text = _manifest({}).replace("namespace: default", "uid: x")
        assert load_triggers(text, namespace="ml").triggers[0].namespace == "ml"

    def test_short_form_is_the_same_trigger(self) -> None:
        short = load_triggers("""
triggers:
  - name: t
    subscriber: http://127.0.0.1:9/
    filters: [{prefix: {type: org.kubeflow.}}]
""").triggers[0]
        long = load_triggers(_manifest({"filters": [{"prefix": {"type": "org.kubeflow."}}]})).triggers[0]
        assert short == long and short.fingerprint == long.fingerprint

    def test_destination_forms(self) -> None:
        loaded = load_triggers("""
triggers:
  - {name: a, subscriber: "http://127.0.0.1:9/"}
  - {name: b, subscriber: {ref: {name: store}}}
  - {name: c, subscriber: {component: {type: file, path: /tmp/events.jsonl}}}
""")
        a, b, c = loaded.triggers
        assert a.subscriber.uri == "http://127.0.0.1:9/" and b.subscriber.ref is not None
        assert c.subscriber.component == {"type": "file", "path": "/tmp/events.jsonl"}


def _error(text: str) -> DocumentError:
    with pytest.raises(DocumentError) as info:
        load_triggers(text, origin="triggers.yaml")
    return info.value


class TestErrors:
    """Errors name the file, the line (and column), the field and the reason."""

    def test_yaml_syntax(self) -> None:
        error = _error("triggers:\n  - name: a\n    subscriber: [unclosed\n")
        assert str(error).startswith("triggers.yaml:4:") and "not valid YAML" in str(error)

    def test_cesql_points_at_the_token(self) -> None:
        error = _error("triggers:\n  - name: a\n    subscriber: http://127.0.0.1:9/\n"
                       "    filters:\n      - cesql: \"type = = 'x'\"\n")
        assert error.location.line == 5 and error.location.column == 17 + 7  # the opening quote is at 16
        assert "triggers[0].filters[0].cesql" in str(error) and "position 7" in str(error)

    def test_a_filter_error_names_the_trigger(self) -> None:
        """The path (`filters[0].cesql`) and line alone did not say which trigger it was."""
        error = _error("triggers:\n  - name: failures\n    subscriber: http://127.0.0.1:9/\n"
                       "    filters:\n      - cesql: statuscode >= 500 AND\n")
        assert error.reason.startswith("trigger default/failures: invalid CESQL"), str(error)

    @pytest.mark.parametrize(("scalar", "column"), [
        ("type = = 'x'", 16 + 7),  # plain: the token
        ("'type = = ''x'''", 16),  # a doubled quote: columns no longer map, so the scalar's start
        (r'"type = \"x\" AND AND"', 16),  # escapes
        (">-\n          type = 'x' AND\n          AND", 16),  # folded: the expression is on later lines
    ])
    def test_cesql_column_only_where_it_maps(self, scalar: str, column: int) -> None:
        error = _error("triggers:\n  - name: a\n    subscriber: http://127.0.0.1:9/\n    filters:\n"
                       f"      - cesql: {scalar}\n")
        assert (error.location.line, error.location.column) == (5, column), str(error)

    def test_mixed_logic_warning_names_the_file_line_and_trigger(self, caplog: pytest.LogCaptureFixture) -> None:
        """Valid, so loaded: the warning is all a reader gets, and it named neither the file nor
        the trigger (`filters[0].cesql` of which of a broker's triggers?)."""
        load_triggers("triggers:\n  - name: a\n    subscriber: http://127.0.0.1:9/\n    filters:\n"
                      "      - cesql: type = 'a' OR type = 'b' AND source = '/ok'\n", origin="triggers.yaml",
                      namespace="ml")
        said = [r.getMessage() for r in caplog.records if "without parentheses" in r.getMessage()]
        assert len(said) == 1 and said[0].startswith("triggers.yaml:5:41: trigger ml/a, triggers[0].filters[0].cesql: ")

    def test_bad_attribute_name_in_a_manifest(self) -> None:
        error = _error(_manifest({"filter": {"attributes": {"Type": "x"}}}))
        assert "spec.filter.attributes[Type]" in str(error)
        assert error.location.line == _manifest({"filter": {"attributes": {"Type": "x"}}}).splitlines().index(
            "      Type: x") + 1

    def test_unknown_field(self) -> None:
        error = _error("triggers:\n  - name: a\n    subscriber: http://127.0.0.1:9/\n    filterz: []\n")
        assert error.location.line == 4 and "triggers[0].filterz: unknown field" in str(error)

    def test_bad_duration(self) -> None:
        error = _error("triggers:\n  - name: a\n    subscriber: http://127.0.0.1:9/\n"
                       "    delivery:\n      backoffDelay: 2s\n")
        assert error.location.line == 5 and "backoffDelay" in str(error) and "ISO-8601" in str(error)

    def test_subscriber_needed(self) -> None:
        error = _error("triggers:\n  - name: a\n")
        assert "triggers[0].subscriber: Field required" in str(error)

    def test_relative_uri(self) -> None:
        error = _error("triggers:\n  - name: a\n    subscriber: /relative\n")
        assert error.location.line == 3 and "absolute http(s) URL" in str(error)

    def test_duplicate_trigger(self) -> None:
        error = _error("triggers:\n  - {name: a, subscriber: 'http://h/'}\n  - {name: a, subscriber: 'http://h/'}\n")
        assert error.location.line == 3 and "already defined at triggers.yaml:2" in str(error)

    def test_bad_name(self) -> None:
        error = _error("triggers:\n  - {name: Not_Valid, subscriber: 'http://h/'}\n")
        assert "triggers[0].name" in str(error) and "not a valid name" in str(error)

    @pytest.mark.parametrize("form", ["short", "manifest"])
    def test_a_name_too_long_for_its_checkpoint_file(self, form: str) -> None:
        """Valid up to 253 characters, as Kubernetes names: past 250, `<name>.json` is past a file
        name's 255 bytes, and the broker's start failed with an OSError (`--check` said ok)."""
        name = "a" * 251
        text = (f"triggers:\n  - {{name: {name}, subscriber: 'http://h/'}}\n" if form == "short" else
                "apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n"
                f"  name: {name}\nspec:\n  broker: default\n  subscriber: {{uri: 'http://h/'}}\n")
        error = _error(text)
        field = "triggers[0].name" if form == "short" else "metadata.name"
        assert field in str(error) and "at most 250 characters" in str(error), str(error)
        assert load_triggers(text.replace(name, "a" * 250)).triggers[0].name == "a" * 250

    def test_unknown_component_type(self) -> None:
        error = _error("triggers:\n  - name: a\n    subscriber:\n      component: {type: nope}\n")
        assert error.location.line == 4 and "unknown component type 'nope'" in str(error)

    def test_bad_component_option(self) -> None:
        error = _error("triggers:\n  - name: a\n    subscriber:\n      component:\n        type: store\n"
                       "        colour: red\n")
        assert error.location.line == 6 and "subscriber.component.colour" in str(error)

    def test_unsupported_eventing_kind(self) -> None:
        error = _error("apiVersion: eventing.knative.dev/v1\nkind: Parallel\nmetadata: {name: p}\n")
        assert "kind 'Parallel' is not supported" in str(error)

    def test_files_name_themselves(self, tmp_path: Path) -> None:
        good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
        good.write_text("triggers:\n  - {name: a, subscriber: 'http://h/'}\n")
        bad.write_text("triggers:\n  - {name: b, subscriber: 'http://h/', filters: [{cesql: 'AND'}]}\n")
        assert len(load_trigger_files([good]).triggers) == 1
        with pytest.raises(DocumentError, match=rf"^{re.escape(str(bad))}:2:"):
            load_trigger_files([good, bad])
        with pytest.raises(DocumentError, match="cannot read"):
            load_trigger_files([tmp_path / "missing.yaml"])


class TestOddYaml:
    """What YAML can say beyond a plain manifest: refused with file, line and field, or read as written."""

    LINE = _manifest({}).count("\n") + 1  # the line of a field added to _manifest's text
    LAUGHS = "apiVersion: v1\nkind: ConfigMap\nl0: &l0 [lol]\n" + "".join(
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9))

    @pytest.mark.timeout(30)  # before the fix, these walked 2**64 paths
    @pytest.mark.parametrize(("text", "line", "field"), [
        ("x: &a [*a, *a]\n", 1, "x[0]"),
        ("a: &a {b: *a, c: *a}\n", 1, "a.b"),
        ("x: &a {<<: *a}\n", 1, "x"),
        (_manifest({}) + "  filters: &f [{all: *f}]\n", LINE, "spec.filters[0].all"),
    ])
    def test_an_alias_inside_its_anchor_is_refused(self, text: str, line: int, field: str) -> None:
        error = _error(text)
        assert error.location.line == line and error.path == field
        assert "an alias inside its own anchor" in str(error)

    @pytest.mark.timeout(30)
    def test_an_alias_bomb_is_refused_even_in_a_skipped_document(self) -> None:
        error = _error(self.LAUGHS)
        assert str(error).startswith("triggers.yaml:") and "alias bomb" in str(error)

    def test_aliases_and_merge_keys_within_bounds_still_work(self) -> None:
        loaded = load_triggers("""
triggers:
  - &a {name: a, subscriber: 'http://h/', delivery: &d {retry: 3}}
  - {<<: *a, name: b}
  - {name: c, subscriber: 'http://h/', delivery: *d}
""")
        assert [(t.name, t.delivery and t.delivery.retry) for t in loaded.triggers] == [("a", 3), ("b", 3), ("c", 3)]

    @pytest.mark.parametrize(("merge", "expected"), [
        # The mapping's own key wins; then the later merge key; in a list, the earlier entry.
        ("<<: {type: dev.foo, source: 007}\n      source:", (("type", "dev.foo"), ("source", ""))),
        ("<<: {source: 010}\n      <<: {source: 0x10}", (("source", "0x10"),)),
        ("<<: [{source: 010}, {source: 0x10}]", (("source", "010"),)),
    ], ids=["own", "later-key", "earlier-in-list"])
    def test_a_value_a_merge_overrode_is_not_the_filter(self, merge: str, expected: tuple[Any, ...]) -> None:
        """Values are compared as written: the text of a merged value the mapping overrides (as
        YAML merges) was taken for the filter (`source:` over a merged 007 filtered on '007')."""
        text = ("apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {name: t1}\nspec:\n"
                "  broker: default\n  subscriber: {uri: 'http://a/'}\n  filter:\n    attributes:\n"
                "      " + merge + "\n")
        assert load_triggers(text).triggers[0].filter.items == expected

    @pytest.mark.parametrize(("text", "line"), [
        ("x: " + "[" * 5000 + "]" * 5000 + "\n", 1),
        (_manifest({}) + "  filters: " + "[{not: " * 400 + "{exact: {type: a}}" + "}]" * 400 + "\n", LINE),
        ("a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 1000)), 1),
        ("m0: &m0 {x: 1}\n" + "".join(f"m{i}: &m{i} {{<<: *m{i - 1}, y{i}: 1}}\n" for i in range(1, 1000)), 1),
    ])
    def test_deep_nesting_is_refused(self, text: str, line: int) -> None:
        error = _error(text)
        assert error.location.line == line and "nested deeper than 100 levels" in str(error)

    def test_filters_nest_at_most_40_levels(self) -> None:
        text = _manifest({}) + "  filters: [" + "{not: " * 45 + "{exact: {type: a}}" + "}" * 45 + "]\n"
        error = _error(text)
        assert error.location.line == self.LINE and "filters nested deeper than 40 levels" in str(error)

    def test_a_lone_surrogate_is_refused(self) -> None:
        error = _error(_manifest({}) + '  filters: [{exact: {type: "\\ud800"}}]\n')
        assert error.location.line == self.LINE and error.path == "spec.filters[0].exact.type"
        assert "U+D800" in str(error)

    def test_a_key_set_twice_is_refused(self) -> None:
        error = _error("triggers:\n  - name: failures\n    subscriber: http://127.0.0.1:9/\n"
                       "    filters: [{exact: {type: x}}]\n    filters: []\n")
        assert error.location.line == 5 and error.path == "triggers[0].filters"
        assert "already set at line 4" in str(error)

    def test_integers_beyond_64_bits(self) -> None:
        loaded = load_triggers("""
triggers:
  - name: a
    subscriber: http://127.0.0.1:9/
    filters: [{exact: {requestid: 123456789012345678901234}}]
    delivery: {retry: 99999999999999999999999}
""")
        [trigger] = loaded.triggers
        assert trigger.filter({"requestid": "123456789012345678901234"}) is PASS
        assert trigger.delivery is not None and trigger.delivery.retry == 99999999999999999999999

    @pytest.mark.parametrize("written", ["007", "0x1F", "1_000", "no", "on", "+1", "5", "true", "1.50", ".inf"])
    def test_unquoted_filter_values_are_taken_as_written(self, written: str) -> None:
        loaded = load_triggers(f"""
triggers:
  - {{name: a, subscriber: 'http://h/', filters: [{{exact: {{v: {written}}}}}, {{prefix: {{w: {written}}}}}]}}
  - {{name: b, subscriber: 'http://h/', filter: {{attributes: {{v: {written}}}}}}}
""")
        for trigger in loaded.triggers:
            assert trigger.filter({"v": written, "w": written + "x"}) is PASS

    def test_a_filter_value_written_differently_is_another_trigger(self) -> None:
        def fingerprint(value: str) -> str:
            return load_triggers(f"triggers: [{{name: a, subscriber: 'http://h/', "
                                 f"filters: [{{exact: {{v: {value}}}}}]}}]").triggers[0].fingerprint

        assert fingerprint("007") != fingerprint("7") and fingerprint("7") == fingerprint("7")

    def test_a_delivery_field_set_to_null_is_another_trigger(self) -> None:
        """`deadLetterSink: null` opts out of the broker's: fingerprinted as unset, a reload adding
        or removing it kept the old dispatcher (and its dead-letter sink)."""
        def fingerprint(delivery: str) -> str:
            return load_triggers(f"triggers: [{{name: a, subscriber: 'http://h/', delivery: {delivery}}}]"
                                 ).triggers[0].fingerprint

        assert fingerprint("{retry: 1}") != fingerprint("{retry: 1, deadLetterSink: null}")
        assert fingerprint("{retry: 1, timeout: null}") != fingerprint("{retry: 1}")


EXAMPLES = sorted((Path(__file__).resolve().parents[3] / "examples" / "triggers").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_load_and_resolve(path: Path, tmp_path: Path) -> None:
    from pipelines.broker import Broker, BrokerSettings

    settings = BrokerSettings(dir=tmp_path, trigger_files=[path], addresses={"event-display": "http://127.0.0.1:9/"})
    assert Broker(settings).check() >= 2
