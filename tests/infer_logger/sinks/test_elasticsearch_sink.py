"""The elasticsearch sink against a real Elasticsearch-8 API (noida-db, or $ES_URL), plus a tiny
real HTTP server for the item statuses noida never answers (429, 503)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import orjson
import pytest
from elasticsearch import ConnectionTimeout, Elasticsearch, NotFoundError
from pydantic import ValidationError

from infer_logger import events
from infer_logger.asgi import read_body, respond
from infer_logger.cloudevents.event import CloudEvent
from infer_logger.dispatch import Backoff, Dispatcher
from infer_logger.elasticsearch_template import TEMPLATE_NAME, VERSION, install_template
from infer_logger.errors import ConfigError, RejectedError, SinkError
from infer_logger.metrics import Metrics
from infer_logger.sinks import elasticsearch as es_sink
from infer_logger.sinks.base import Sink
from infer_logger.sinks.elasticsearch import (
    ElasticsearchSink,
    ElasticsearchSinkConfig,
    IndexNamer,
    _chunks,
    _Op,
    sanitize_index,
    setup_elasticsearch,
)
from infer_logger.spool import DiskSpool
from infer_logger.testing import EventCollector, free_port
from tests.services import NoidaServer

T0 = "2025-01-01T00:00:00.100000Z"
T1 = "2025-01-01T00:00:00.112000Z"  # T0 + the response's 12 ms
T2 = "2025-01-01T00:00:03.000000Z"


def _event(type_: str, id_: str, body: Any, time: str, service: str, **extra: Any) -> CloudEvent:
    attrs = {"id": id_, "source": "http://sidecar", "specversion": "1.0", "type": type_, "time": time,
             "inferenceservicename": service, "namespace": "default", "component": "predictor",
             "modelname": service, "protocol": "v1", "metadata": '{"x-user": ["ann"]}', **extra}
    return CloudEvent(attrs, orjson.dumps(body))


def request(id_: str, service: str, body: Any = None) -> CloudEvent:
    return _event(events.REQUEST, id_, body or {"instances": [[1.0, 2.0], [3.0, 4.0]]}, T0, service)


def response(id_: str, service: str, body: Any = None, status: int = 200) -> CloudEvent:
    body = body or {"predictions": [[0.2, 0.8], [0.9, 0.1]]}
    return _event(events.RESPONSE, id_, body, T1, service, statuscode=status, latencyms=12)


def explanation(id_: str, service: str) -> CloudEvent:
    return _event(events.EXPLANATION, id_, {"explanations": [{"f0": 0.5}, {"f0": -0.5}]}, T2, service)


def unique(prefix: str = "svc") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def es(es_url: str) -> Iterator[Elasticsearch]:
    client = Elasticsearch(es_url, request_timeout=10)
    yield client
    client.close()


@pytest.fixture
def own_es() -> Iterator[NoidaServer]:
    """An Elasticsearch-API server of the test's own, to stop, pause and restart."""
    server = NoidaServer("elasticsearch").start()
    yield server
    server.resume()  # in case the test paused it
    server.stop()


def docs(es: Elasticsearch, service: str, id_: str | None = None) -> dict[str, dict[str, Any]]:
    """The documents of one service's index by _id (after a refresh)."""
    index = f"inference-log-default-{service.lower()}"
    query = {"term": {"id": id_}} if id_ else {"match_all": {}}
    try:
        es.indices.refresh(index=index)
        hits = es.search(index=index, query=query, size=1000)["hits"]["hits"]
    except NotFoundError:
        return {}  # not created yet
    return {h["_id"]: h["_source"] for h in hits}


async def send(config: ElasticsearchSinkConfig, *batches: Sequence[CloudEvent]) -> None:
    sink = config.build()
    try:
        for batch in batches:
            await sink.send_batch(batch)
    finally:
        await sink.aclose()


# What a front without Elasticsearch's `_simulate_index` answers (see SimulateRefused).
_NO_SIMULATE = [
    pytest.param(404, b'{"error": "no handler found for uri", "status": 404}', id="404"),
    pytest.param(501, b"Not Implemented", id="501"),
    pytest.param(200, b"<html>Sign in</html>", id="a 200 page"),
]


class TestConfig:
    """Config validation and index naming, without a server."""

    def test_defaults_and_build(self) -> None:
        config = ElasticsearchSinkConfig.model_validate({"type": "elasticsearch"})
        assert config.sink_name == "elasticsearch"
        assert config.urls == ["http://localhost:9200"]
        assert config.template_patterns() == ["inference-log-*"]
        assert config.template_name == "inference-log"
        sink = config.build()
        assert isinstance(sink, Sink)
        asyncio.run(sink.aclose())

    @pytest.mark.parametrize("fields", [
        {"url": "localhost:9200"},
        {"url": []},
        {"index": "log-{namespace!r}"},
        {"index": "log-{attr.x}"},
        {"index": "log-{"},
        {"index": "{namespace}-log"},
        {"api_key": "k", "username": "u", "password": "p"},
        {"username": "u"},
        {"url": "http://127.0.0.1:99999"},
        {"url": "http://:9200"},
        {"url": "https://es:9200", "ca_certs": "/no/such/ca.pem"},
        {"url": "http://es:9200", "ca_certs": __file__},  # a CA for plain http
        {"url": "https://es:9200", "ca_certs": "/tmp/" + "a" * 300},  # stat fails: an OSError escaped
        # Template names Elasticsearch refuses: the sink warned once and wrote into indices with
        # dynamic mappings for good.
        {"template_name": "Inference_Audit"}, {"template_name": "_audit"}, {"template_name": "a b"},
        {"template_name": "audit*"}, {"template_name": "a,b"}, {"template_name": ""},
        # A name of digits reads as a position to str.format: every event was dead-lettered.
        {"index": "audit-{0}"},
        # A header may hold no control character: every send failed, retried for ever.
        {"api_key": "aWQ6a2V5\r\nx"}, {"api_key": "a\tb"},
    ])
    def test_invalid(self, fields: dict[str, Any]) -> None:
        with pytest.raises(ValueError):
            ElasticsearchSinkConfig.model_validate(fields)

    def test_an_api_key_read_with_its_newline_is_taken_without(self) -> None:
        """A Kubernetes secret's file often ends in a newline."""
        config = ElasticsearchSinkConfig(api_key="aWQ6a2V5\n")  # type: ignore[arg-type]
        assert config.api_key is not None and config.api_key.get_secret_value() == "aWQ6a2V5"

    def test_what_the_client_refuses_is_a_config_error(self) -> None:
        unchecked = ElasticsearchSinkConfig.model_construct(url="http://127.0.0.1:99999")
        with pytest.raises(ConfigError, match="^url: .*99999"):
            unchecked.client()
        unchecked = ElasticsearchSinkConfig.model_construct(url="http://es:9200", ca_certs=__file__)
        with pytest.raises(ConfigError, match="^ca_certs: "):
            unchecked.client()

    @pytest.mark.parametrize("content", [b"not a pem\n", b"",
                                         b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"])
    def test_a_ca_file_without_a_certificate_is_a_config_error(self, tmp_path: Path, content: bytes) -> None:
        """The client's ssl.SSLError escaped as a traceback (exit 1) from the setup command and
        the sidecar's start."""
        from click.testing import CliRunner

        from infer_logger.cli import main

        ca = tmp_path / "ca.pem"
        ca.write_bytes(content)
        with pytest.raises(ValidationError, match="ca_certs") as caught:
            ElasticsearchSinkConfig(url="https://es:9200", ca_certs=str(ca))
        assert "no certificate" in str(caught.value)
        unchecked = ElasticsearchSinkConfig.model_construct(url="https://es:9200", ca_certs=str(ca))
        with pytest.raises(ConfigError, match="^ca_certs: "):
            unchecked.client()  # the file changed after it was checked
        ran = CliRunner().invoke(main, ["setup", "elasticsearch", "--url", "https://127.0.0.1:9", "--ca-certs", str(ca)])
        assert ran.exit_code == 2 and "config error: ca_certs" in ran.output, ran.output

    def test_a_ca_bundle_is_taken(self) -> None:
        import certifi

        config = ElasticsearchSinkConfig(url="https://es:9200", ca_certs=certifi.where())
        asyncio.run(config.client().close())

    def test_credentials_stay_out_of_messages(self) -> None:
        config = ElasticsearchSinkConfig(url=["https://u:secret@es1:9200", "http://es2:9200"])
        assert config.where == "https://es1:9200, http://es2:9200"
        # A password holding @ (its last part was shown); a new password is the same destination
        # for every node of a list (the second kept its old one: the checkpoint was not found).
        assert ElasticsearchSinkConfig(url="http://elastic:s3cr@t@es1:9200").where == "http://es1:9200"
        nodes = ["http://u:{}@es1:9200", "http://u:{}@es2:9200"]
        assert (ElasticsearchSinkConfig(url=[n.format("old") for n in nodes]).destination()
                == ElasticsearchSinkConfig(url=[n.format("new") for n in nodes]).destination())
        assert "secret" not in repr(ElasticsearchSinkConfig(api_key="secret"))  # type: ignore[arg-type]

    @pytest.mark.parametrize(("fields", "auth"), [
        ({"api_key": "abc"}, "ApiKey abc"),
        ({"username": "bob", "password": "pw"}, "Basic Ym9iOnB3"),
        ({"url": "https://bob:pw@es1:9200"}, "Basic Ym9iOnB3"),  # credentials in the URL
        ({}, None),
    ])
    def test_credentials_reach_the_client(self, fields: dict[str, Any], auth: str | None) -> None:
        client = ElasticsearchSinkConfig.model_validate(fields).client()
        [node] = client.transport.node_pool.all()
        # The client's own headers, or its node's (credentials in the URL).
        got = client._headers.get("authorization") or node.config.headers.get("authorization")
        assert got == auth
        asyncio.run(client.close())

    @pytest.mark.parametrize(("index", "patterns", "name"), [
        ("audit-{inferenceservicename}", ["audit-*"], "audit"),
        ("_audit-{namespace}", ["audit-*"], "audit"),  # written as audit-<namespace>
        ("+Audit {namespace}", ["audit-*"], "audit"),
        ("audit_{namespace}", ["audit_*"], "audit_:prefix"),
        ("audit{namespace}", ["audit*"], "audit:prefix"),
        ("Audit", ["audit"], "audit:exact"),  # one index
        ("inference-log", ["inference-log"], "inference-log:exact"),  # not the default's template
        # Names of Elasticsearch's own templates are never derived: ours would replace theirs.
        ("apm-app-{namespace}", ["apm-app-*"], "infer-logger-apm-app"),
        ("ilm-history{namespace}", ["ilm-history*"], "ilm-history:prefix"),  # no built-in name holds ":"
        ("logstash-{namespace}", ["logstash-*"], "logstash"),
    ])
    def test_template_follows_the_index(self, index: str, patterns: list[str], name: str) -> None:
        config = ElasticsearchSinkConfig(index=index)
        assert (config.template_patterns(), config.template_name) == (patterns, name)
        written = IndexNamer(index)(request("a", "iris"))
        assert any(written.startswith(p.rstrip("*")) for p in patterns), written
        assert ElasticsearchSinkConfig(index=index, template_name="mine").template_name == "mine"

    @pytest.mark.parametrize("index", ["logs-{namespace}", "Metrics-App-{namespace}", "traces{namespace}",
                                       "logs-app-x", "l{namespace}"])
    def test_an_index_over_a_built_in_data_stream_is_refused(self, index: str) -> None:
        """Our template would outrank `logs-*-*` (priority 100): Elastic Agent's data streams
        would become plain indices with our mappings."""
        with pytest.raises(ValidationError, match="built-in data streams"):
            ElasticsearchSinkConfig(index=index)
        assert ElasticsearchSinkConfig(index=index, install_template=False).index == index

    def test_the_template_keeps_real_elasticsearch_from_refusing_documents(self) -> None:
        """Elasticsearch 8 (not noida-db) refuses a term over 32,766 bytes and, by default, a
        1001st field of an index: a 40,000-character request id, or a 600-feature model's
        explanations, dead-lettered whole exchanges."""
        from infer_logger.elasticsearch_template import index_template

        template = index_template()["template"]
        properties = template["mappings"]["properties"]
        assert all(properties[name]["ignore_above"] * 4 <= 32_766 for name in ("id", "model", "path", "component"))
        assert template["settings"]["index.mapping.total_fields.limit"] >= 5000

    def test_index_names(self) -> None:
        namer = IndexNamer("inference-log-{namespace}-{inferenceservicename}")
        ev = request("a", "My Model/v2")
        assert namer(ev) == "inference-log-default-my-model-v2"
        assert namer(ev.with_attributes(namespace="")) == "inference-log-unknown-my-model-v2"
        assert sanitize_index("_A*B?" + "x" * 300).startswith("a-b-") and len(sanitize_index("x" * 300)) == 255
        unprefixed = ElasticsearchSinkConfig(index="{modelname}", install_template=False)
        with pytest.raises(ConfigError):
            unprefixed.template_patterns()  # a template for `*` would take over every index
        assert unprefixed.build().index(ev) == "my-model-v2"


class TestTemplate:
    """The index template: installed once, idempotent, and applied to new indices."""

    def test_install_is_idempotent(self, es_url: str, es: Elasticsearch) -> None:
        prefix = unique("itest")
        config = ElasticsearchSinkConfig(url=es_url, index=prefix + "-{inferenceservicename}", template_name=prefix)
        try:
            first = setup_elasticsearch(config)
            assert first[1] == f"index template {prefix} for {prefix}-*: created"
            assert setup_elasticsearch(config)[1].endswith(": unchanged")
            asyncio.run(send(config, [request("a", "iris", {"instances": [{"n": 1, "f": 2.5}]})]))
            mapping = es.indices.get_mapping(index=f"{prefix}-iris")[f"{prefix}-iris"]["mappings"]
            props = mapping["properties"]
            assert props["status"]["type"] == "integer" and props["latency_ms"]["type"] == "float"
            assert props["@timestamp"]["type"] == "date" and props["id"]["type"] == "keyword"
            features = props["request"]["properties"]["features"]["properties"]
            assert features["n"]["type"] == features["f"]["type"] == "double"  # numbers as doubles
            assert props["request_attributes"]["properties"]["id"]["type"] == "keyword"
        finally:
            es.indices.delete(index=f"{prefix}-iris", ignore_unavailable=True)
            es.indices.delete_index_template(name=prefix)

    async def test_payloads_of_mixed_types_are_taken(self, es_url: str, es: Elasticsearch) -> None:
        prefix = unique("itest")
        config = ElasticsearchSinkConfig(url=es_url, index=prefix + "-{modelname}", template_name=prefix)

        def explained(id_: str, params: dict[str, Any]) -> CloudEvent:
            body = {"explanations": [{"method": "kernel", "params": params, "attributions": {"a": 0.1}}]}
            return _event(events.EXPLANATION, id_, body, T2, "iris")

        batches = [
            [request("row", "iris", {"instances": [[5.1, "red", 3]]})],  # a categorical column
            [request("date", "iris", {"instances": [{"signup": "2024-01-01"}]})],
            [request("text", "iris", {"instances": [{"signup": "unknown"}]})],  # not a date field
            [response("num", "iris", {"predictions": [1, 0]})],
            [_event(events.RESPONSE, "cut", {"predictions": [1]}, T1, "iris", statuscode=200, truncated=True)],
            [CloudEvent(response("txt", "iris").attributes, b"setosa")],  # not JSON
            [explained("e1", {"nsamples": 200, "l1_reg": False})],
            [explained("e2", {"nsamples": "auto", "l1_reg": "aic"})],
            # Lists holding objects: tokens, {feature, value} pairs.
            [request("tok", "iris", {"instances": [[{"token": "a", "pos": 1}, {"token": "b", "pos": 2}]]})],
            [_event(events.EXPLANATION, "pairs", {"explanations": [[{"feature": "x", "value": 0.3}]]}, T2,
                    "iris")],
        ]
        try:
            await send(config, *batches)  # none refused
            es.indices.refresh(index=f"{prefix}-iris")
            assert es.count(index=f"{prefix}-iris")["count"] == 11
            props = es.indices.get_mapping(index=f"{prefix}-iris")[f"{prefix}-iris"]["mappings"]["properties"]
            assert props["request"]["properties"]["values"]["type"] == "keyword"
            assert props["request"]["properties"]["features"]["properties"]["signup"]["type"] == "keyword"
            assert props["response"]["properties"]["prediction"]["type"] == "double"
            assert props["response"]["properties"]["raw"] == {"type": "keyword", "index": False, "doc_values": False}
            assert props["explanation"]["properties"]["params"]["type"] == "flattened"
            hits = es.search(index=f"{prefix}-iris", query={"term": {"request.values": "red"}})["hits"]["hits"]
            assert [h["_id"] for h in hits] == ["row-0"]
            query = {"term": {"request.items.token": "b"}}
            hits = es.search(index=f"{prefix}-iris", query=query)["hits"]["hits"]
            assert [h["_id"] for h in hits] == ["tok-0"]
            assert props["explanation"]["properties"]["items"]["type"] == "flattened"
        finally:
            es.indices.delete(index=f"{prefix}-iris", ignore_unavailable=True)
            es.indices.delete_index_template(name=prefix)

    async def test_one_index_and_an_index_per_model_of_one_prefix_keep_their_templates(
            self, es_url: str, es: Elasticsearch) -> None:
        """`<p>` (one index) and `<p>-{modelname}` derived one template name: each sink found
        the other's template (kept, with a warning) and wrote without mappings; a mixed row was
        refused (`request.values` a float), and `setup` for one took the other's over."""
        prefix = unique("tmpl")
        one, per_model = (ElasticsearchSinkConfig(url=es_url, index=index) for index in (prefix, prefix + "-{modelname}"))
        assert one.template_name != per_model.template_name
        mixed = [request("m1", "iris", {"instances": [[5.1, "red", 3]]})]
        try:
            for config in (per_model, one):
                await send(config, [request("n1", "iris", {"instances": [[5.1, 2.0, 3]]})], mixed)
            templates = {t["name"]: t["index_template"]["index_patterns"]
                         for t in es.indices.get_index_template(name=f"{prefix}*")["index_templates"]}
            assert templates == {prefix: [prefix + "-*"], prefix + ":exact": [prefix]}
        finally:
            es.indices.delete(index=[prefix, f"{prefix}-iris"], ignore_unavailable=True)
            for name in (one.template_name, per_model.template_name):
                es.options(ignore_status=404).indices.delete_index_template(name=name)

    def test_one_index_and_its_prefix_pattern_get_templates_of_their_own_priorities(
            self, es_url: str, es: Elasticsearch) -> None:
        """`audit` and `audit*` had one priority: Elasticsearch refuses overlapping patterns of equal
        priority, and the second setup failed (its sink wrote without mappings)."""
        prefix = unique("prio")
        try:
            for index in (prefix, prefix + "{namespace}"):
                assert setup_elasticsearch(ElasticsearchSinkConfig(url=es_url, index=index))[1].endswith(": created")
        finally:
            for name in (f"{prefix}:exact", f"{prefix}:prefix"):
                es.options(ignore_status=404).indices.delete_index_template(name=name)

    async def test_sink_creates_a_missing_template(self, es_url: str, es: Elasticsearch) -> None:
        prefix = unique("itest")
        config = ElasticsearchSinkConfig(url=es_url, index=prefix + "-{modelname}", template_name=prefix)
        try:
            await send(config, [response("a", "iris")])
            found = es.indices.get_index_template(name=prefix)["index_templates"][0]["index_template"]
            assert found["index_patterns"] == [f"{prefix}-*"]
            mapping = es.indices.get_mapping(index=f"{prefix}-iris")[f"{prefix}-iris"]["mappings"]
            assert mapping["properties"]["status"]["type"] == "integer"
        finally:
            es.indices.delete(index=f"{prefix}-iris", ignore_unavailable=True)
            es.indices.delete_index_template(name=prefix)

    async def test_a_custom_index_gets_its_own_template_beside_the_default(
            self, es_url: str, es: Elasticsearch, caplog: pytest.LogCaptureFixture) -> None:
        prefix = unique("itest")
        await asyncio.to_thread(setup_elasticsearch, ElasticsearchSinkConfig(url=es_url))  # for inference-log-*
        config = ElasticsearchSinkConfig(url=es_url, index=prefix + "-{modelname}")
        try:
            await send(config, [request("a", "iris", {"instances": [{"x": 5}]})])
            assert es.indices.get_index_template(name=prefix)["index_templates"][0]["index_template"][
                "index_patterns"] == [f"{prefix}-*"]
            assert es.indices.get_index_template(name="inference-log")["index_templates"][0]["index_template"][
                "index_patterns"] == ["inference-log-*"]
            props = es.indices.get_mapping(index=f"{prefix}-iris")[f"{prefix}-iris"]["mappings"]["properties"]
            assert props["id"]["type"] == "keyword"
            # A name shared on purpose, with the other patterns: kept, and said so.
            shared = ElasticsearchSinkConfig(url=es_url, index=prefix + "-x-{modelname}", template_name=prefix)
            await send(shared, [request("b", "iris")])
            assert any(r.levelname == "WARNING" and "kept" in r.getMessage() for r in caplog.records)
        finally:
            es.indices.delete(index=f"{prefix}-iris,{prefix}-x-iris", ignore_unavailable=True)
            es.indices.delete_index_template(name=prefix)

    def test_setup_names_a_template_that_outranks_ours(self, es_url: str, es: Elasticsearch) -> None:
        """`created` while another template of higher priority matched the indices: they got its
        mappings, not ours."""
        prefix = unique("itest")
        config = ElasticsearchSinkConfig(url=es_url, index=prefix + "-{namespace}")
        es.indices.put_index_template(name=f"{prefix}-team", index_patterns=[f"{prefix}*"], priority=900,
                                      template={})
        try:
            with pytest.raises(SinkError) as caught:
                setup_elasticsearch(config)
            assert not isinstance(caught.value, RejectedError)
            assert (f"index template {prefix} for {prefix}-*: created; but index template {prefix}-team "
                    f"(priority 900, for {prefix}*) applies to new indices such as {prefix}-unknown instead"
                    ) in str(caught.value)
            assert es.indices.exists_index_template(name=prefix)  # installed all the same
            es.indices.put_index_template(name=f"{prefix}-team", index_patterns=[f"{prefix}*"], priority=9,
                                          template={})
            assert setup_elasticsearch(config)[1].endswith(": unchanged")
        finally:
            for name in (prefix, f"{prefix}-team"):
                es.options(ignore_status=404).indices.delete_index_template(name=name)

    @pytest.mark.parametrize(("status", "page"), _NO_SIMULATE)
    def test_setup_says_when_it_cannot_check_which_template_applies(
            self, es_url: str, es: Elasticsearch, status: int, page: bytes) -> None:
        """The check after the install failed the setup (exit 1, a traceback for a 200 page)
        though the template was in."""
        prefix = unique("itest")
        with SimulateRefused(es_url, status, page) as proxy:
            lines = setup_elasticsearch(ElasticsearchSinkConfig(url=proxy.url, index=prefix + "-{namespace}"))
        try:
            assert lines[1] == f"index template {prefix} for {prefix}-*: created"
            assert lines[2].startswith(f"could not check which index template applies to {prefix}-unknown: ")
        finally:
            es.options(ignore_status=404).indices.delete_index_template(name=prefix)

    def test_setup_with_a_key_that_may_not_read_the_version(self, es_url: str, es: Elasticsearch) -> None:
        """`GET /` needs the `monitor` cluster privilege, the template APIs `manage_index_templates`:
        a key with only the latter failed the setup (exit 1) before the template was tried."""
        prefix = unique("itest")
        with InfoRefused(es_url) as proxy:
            lines = setup_elasticsearch(ElasticsearchSinkConfig(url=proxy.url, index=prefix + "-{namespace}"))
        try:
            assert proxy.refused == ["GET /"]
            assert lines[0].startswith(f"elasticsearch at {proxy.url} (version unknown: 403 ") and "monitor" in lines[0]
            assert lines[1] == f"index template {prefix} for {prefix}-*: created"
            assert es.indices.get_index_template(name=prefix)["index_templates"]
        finally:
            es.options(ignore_status=404).indices.delete_index_template(name=prefix)

    def test_setup_without_a_server(self) -> None:
        url = f"http://127.0.0.1:{free_port()}"
        with pytest.raises(SinkError, match=url):
            setup_elasticsearch(url)

    def test_other_versions(self, es_url: str, es: Elasticsearch) -> None:
        name = unique("itest")
        es.indices.put_index_template(name=name, index_patterns=[f"{name}-*"], version=VERSION - 1,
                                      template={}, meta={"managed_by": "infer-logger"})

        async def install(overwrite: bool) -> str:
            client = ElasticsearchSinkConfig(url=es_url).client()
            try:
                return await install_template(client, name=name, index_patterns=[f"{name}-*"], overwrite=overwrite)
            finally:
                await client.close()

        try:
            assert asyncio.run(install(False)) == "kept"  # what the sink does: never replace
            assert asyncio.run(install(True)) == "updated"
            assert es.indices.get_index_template(name=name)["index_templates"][0]["index_template"]["version"] == VERSION
        finally:
            es.indices.delete_index_template(name=name)


    async def test_a_template_not_ours_is_left_alone(
            self, es_url: str, es: Elasticsearch, caplog: pytest.LogCaptureFixture) -> None:
        name = unique("itest")
        es.indices.put_index_template(name=name, index_patterns=[f"{name}*"], priority=50, version=7,
                                      meta={"owner": "security-team"}, template={})
        config = ElasticsearchSinkConfig(url=es_url, index=name + "-{modelname}")  # derives `name`

        def theirs() -> bool:
            found = es.indices.get_index_template(name=name)["index_templates"][0]["index_template"]
            return found["_meta"] == {"owner": "security-team"} and found["index_patterns"] == [f"{name}*"]

        try:
            with pytest.raises(SinkError, match=f"{name} that infer-logger did not make.*--force"):
                await asyncio.to_thread(setup_elasticsearch, config)
            assert theirs()
            await send(config, [request("a", "iris")])  # the sink neither
            assert theirs()
            assert any(r.levelname == "WARNING" and "not infer-logger's" in r.getMessage()
                       for r in caplog.records)
            lines = await asyncio.to_thread(setup_elasticsearch, config, force=True)
            assert lines[1] == f"index template {name} for {name}-*: updated"
            assert not theirs()
        finally:
            es.indices.delete(index=f"{name}-iris", ignore_unavailable=True)
            es.indices.delete_index_template(name=name)

    def test_the_more_specific_pattern_wins(self, es_url: str, es: Elasticsearch) -> None:
        prefix = unique("itest")
        specific = ElasticsearchSinkConfig(url=es_url, index=prefix + "-log-{modelname}")
        general = ElasticsearchSinkConfig(url=es_url, index=prefix + "-{modelname}")
        try:
            # Overlapping patterns of equal priority are refused: the longer prefix ranks higher.
            assert setup_elasticsearch(specific)[1].endswith(": created")
            assert setup_elasticsearch(general)[1].endswith(": created")
            found = {t["name"]: t["index_template"]["priority"] for t in
                     es.indices.get_index_template(name=f"{prefix}*")["index_templates"]}
            assert found[f"{prefix}-log"] > found[prefix] > 200
        finally:
            es.indices.delete_index_template(name=f"{prefix}-log")
            es.indices.delete_index_template(name=prefix)

    async def test_the_shared_template_of_an_earlier_version_gets_its_own_patterns_back(
            self, own_es: NoidaServer) -> None:
        """Earlier versions named every sink's template `inference-log`: the derived one takes its
        patterns over, and `inference-log` is for `inference-log-*` again (deleted, a default-index
        sink that had found it first, kept, wrote its indices with no template at all)."""
        es = Elasticsearch(own_es.address)

        def patterns_of(name: str) -> list[str]:
            return list(es.indices.get_index_template(name=name)["index_templates"][0]["index_template"]
                        ["index_patterns"])

        def shared(patterns: list[str]) -> None:  # as an earlier version's sink made it
            es.indices.put_index_template(name=TEMPLATE_NAME, index_patterns=patterns, priority=200,
                                          version=1, meta={"managed_by": "infer-logger"}, template={})

        try:
            shared(["audit-*"])
            lines = await asyncio.to_thread(setup_elasticsearch, ElasticsearchSinkConfig(
                url=own_es.address, index="audit-{namespace}"))
            assert lines[1:] == ["index template audit for audit-*: created",
                                 ("index template inference-log: for inference-log-* again (an earlier "
                                  "version put audit-* in it; audit takes them)")]
            assert patterns_of(TEMPLATE_NAME) == ["inference-log-*"]
            shared(["trail-*"])
            trail = ElasticsearchSinkConfig(url=own_es.address, index="trail-{modelname}")
            await send(trail, [request("a", "iris")])
            assert es.indices.exists_index_template(name="trail")
            assert patterns_of(TEMPLATE_NAME) == ["inference-log-*"]
            props = es.indices.get_mapping(index="trail-iris")["trail-iris"]["mappings"]["properties"]
            assert props["id"]["type"] == "keyword"
            # The upgrade's race: the default sink finds `inference-log` of another version first
            # (kept), then the audit sink takes `audit-*` from it: the default's next new index
            # gets the template.
            shared(["audit-*"])
            default = ElasticsearchSinkConfig(url=own_es.address).build()  # one sink: it checks once
            try:
                await default.send_batch([request("d", "iris").with_attributes(namespace="one")])
                await send(ElasticsearchSinkConfig(url=own_es.address, index="audit-{namespace}"),
                           [request("a", "iris")])
                await default.send_batch([request("d", "iris").with_attributes(namespace="two")])
            finally:
                await default.aclose()
            props = es.indices.get_mapping(index="inference-log-two-iris")["inference-log-two-iris"]["mappings"]
            assert props["properties"]["id"]["type"] == "keyword" and props["date_detection"] is False
            shared(["other-*"])  # another sink's: left to it
            other = ElasticsearchSinkConfig(url=own_es.address, index="x-{a}")
            await asyncio.to_thread(setup_elasticsearch, other)
            assert patterns_of(TEMPLATE_NAME) == ["other-*"]
        finally:
            es.close()


class TemplateRefused(EventCollector):
    """A proxy to a real Elasticsearch that answers the first `refusals` template requests with
    `status` (a cluster still starting, or a key without the privilege); without `product`, with
    no X-Elastic-Product header (a proxy's own page)."""

    def __init__(self, upstream: str, status: int, refusals: int = 1, *, product: bool = True) -> None:
        super().__init__()
        self.upstream, self.status, self.refusals = upstream.rstrip("/"), status, refusals
        self.product = product
        self.refused: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await super().__call__(scope, receive, send)
        import aiohttp

        body = await read_body(receive)
        headers = [(b"content-type", b"application/json"), (b"x-elastic-product", b"Elasticsearch")]
        if scope["path"].startswith("/_index_template") and len(self.refused) < self.refusals:
            self.refused.append(f"{scope['method']} {scope['path']}")
            error = {"error": {"type": "refused", "reason": "refused by the test"}, "status": self.status}
            shown = headers if self.product else headers[:1]
            return await respond(send, self.status, shown, orjson.dumps(error))
        query = scope["query_string"].decode()
        url = self.upstream + scope["path"] + (f"?{query}" if query else "")
        forwarded = {k.decode(): v.decode() for k, v in scope["headers"] if k not in (b"host", b"content-length")}
        async with aiohttp.ClientSession() as session, session.request(
                scope["method"], url, data=body, headers=forwarded) as answer:
            await respond(send, answer.status, headers, await answer.read())

    def __enter__(self) -> Self:
        self.start()
        return self


class SimulateRefused(TemplateRefused):
    """A front that answers Elasticsearch's `_simulate_index` itself (`status`, `page`: an older
    cluster's 404, a gateway's 501, a login page with 200) and passes the rest on."""

    def __init__(self, upstream: str, status: int, page: bytes) -> None:
        super().__init__(upstream, status, refusals=0)
        self.page = page
        self.asked = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and "/_simulate_index/" in scope["path"]:
            await read_body(receive)
            self.asked += 1
            kind = b"application/json" if self.page.startswith(b"{") else b"text/html"
            return await respond(send, self.status, [(b"content-type", kind)], self.page)
        return await super().__call__(scope, receive, send)


class BodyLimit(TemplateRefused):
    """A front such as nginx (`client_max_body_size`) before a real Elasticsearch: a body larger
    than `limit` is answered 413 with nginx's page; the rest is passed on. `taken` counts each
    `_id` in the bulks passed on."""

    PAGE = b"<html><head><title>413 Request Entity Too Large</title></head></html>"

    def __init__(self, upstream: str, limit: int) -> None:
        super().__init__(upstream, 413, refusals=0)
        self.limit = limit
        self.too_large = 0
        self.taken: dict[str, int] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await super().__call__(scope, receive, send)
        body = await read_body(receive)
        if len(body) > self.limit:
            self.too_large += 1
            return await respond(send, 413, [(b"content-type", b"text/html")], self.PAGE)
        if scope["path"] == "/_bulk":
            for line in body.splitlines()[::2]:
                doc_id = orjson.loads(line)["update"]["_id"]
                self.taken[doc_id] = self.taken.get(doc_id, 0) + 1

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        await super().__call__(scope, replay, send)


class InfoRefused(TemplateRefused):
    """Elasticsearch's answer to a key without the `monitor` cluster privilege: `GET /` (the
    version banner) is refused with 403; the rest is passed on."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream, 403, refusals=0)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/":
            await read_body(receive)
            self.refused.append(f"{scope['method']} /")
            reason = ("action [cluster:monitor/main] is unauthorized for API key id [k] of user [setup], this "
                      "action is granted by the cluster privileges [monitor,manage,all]")
            error = {"error": {"type": "security_exception", "reason": reason}, "status": 403}
            headers = [(b"content-type", b"application/json"), (b"x-elastic-product", b"Elasticsearch")]
            return await respond(send, 403, headers, orjson.dumps(error))
        return await super().__call__(scope, receive, send)


async def through_the_worker(spool: DiskSpool, sink: ElasticsearchSink, *, batch_size: int = 100) -> Dispatcher:
    """What `spool` holds sent by a worker (its retries, with `pending`) until it caught up; the
    dispatcher, stopped, and the sink and spool closed."""
    d = Dispatcher(spool, {"es": sink}, Metrics(spool), batch_size=batch_size,
                   backoff=Backoff(initial=0.01, maximum=0.05, retry_after_max=0.05))
    d.start()
    try:
        await until(lambda: d.workers[0].reader.lag() == 0)
    finally:
        await d.stop()
        await sink.aclose()
        spool.close()
    return d


class ItemsRefused(TemplateRefused):
    """A real Elasticsearch whose `_bulk` items at `refused` ((call from 1, position) -> status)
    are refused as a cluster does: not applied, answered 429 (a shard's write queue full) or 409
    (a conflict left after retry_on_conflict). The others are passed on as one `_bulk` and the
    answers merged in order. `calls` holds the `_id`s of each `_bulk`."""

    KINDS = {409: "version_conflict_engine_exception", 429: "es_rejected_execution_exception"}

    def __init__(self, upstream: str, refused: dict[tuple[int, int], int]) -> None:
        super().__init__(upstream, 0, refusals=0)
        self.refused_items = refused
        self.calls: list[list[str]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/_bulk":
            return await super().__call__(scope, receive, send)
        import aiohttp

        lines = (await read_body(receive)).splitlines()
        actions = [orjson.loads(line)["update"] for line in lines[::2]]
        self.calls.append([a["_id"] for a in actions])
        statuses = [self.refused_items.get((len(self.calls), i)) for i in range(len(actions))]
        passed = b"".join(lines[2 * i] + b"\n" + lines[2 * i + 1] + b"\n"
                          for i, status in enumerate(statuses) if status is None)
        answers: Iterator[dict[str, Any]] = iter(())
        if passed:
            forwarded = {k.decode(): v.decode() for k, v in scope["headers"] if k not in (b"host", b"content-length")}
            async with aiohttp.ClientSession() as session, session.post(
                    self.upstream + "/_bulk", data=passed, headers=forwarded) as answer:
                answers = iter((await answer.json())["items"])
        items = [next(answers) if status is None else {"update": {
            "_index": a["_index"], "_id": a["_id"], "status": status,
            "error": {"type": self.KINDS.get(status, "x_exception"), "reason": "refused by the test"}}}
            for a, status in zip(actions, statuses)]
        body = {"took": 1, "errors": any(next(iter(i.values()))["status"] >= 300 for i in items), "items": items}
        headers = [(b"content-type", b"application/json"), (b"x-elastic-product", b"Elasticsearch")]
        await respond(send, 200, headers, orjson.dumps(body))


class TestTemplateCheck:
    """The sink's template check: retried when the cluster is not ready, given up when refused."""

    @pytest.mark.parametrize(("status", "product", "said"), [
        (503, True, "503"),  # a cluster still starting
        # A key not valid yet (created, or granted, after the sink started), and a proxy's own
        # answer: the check was given up for good, and once the key worked the first bulk
        # auto-created the index with dynamic mappings.
        (401, True, "401"),
        (200, False, "not as Elasticsearch"),
    ])
    async def test_a_cluster_not_ready_is_retried_before_any_write(
            self, es_url: str, es: Elasticsearch, status: int, product: bool, said: str) -> None:
        prefix = unique("itest")
        with TemplateRefused(es_url, status, product=product) as proxy:
            config = ElasticsearchSinkConfig(url=proxy.url, index=prefix + "-{modelname}", template_name=prefix)
            sink = config.build()
            try:
                with pytest.raises(SinkError, match=said) as caught:
                    await sink.send_batch([request("a", "iris", {"instances": [{"x": 5}]})])
                assert not isinstance(caught.value, RejectedError)
                assert not es.indices.exists(index=f"{prefix}-iris")  # nothing written without it
                await sink.send_batch([request("a", "iris", {"instances": [{"x": 5}]})])  # the retry
            finally:
                await sink.aclose()
        try:
            assert es.indices.exists_index_template(name=prefix)
            props = es.indices.get_mapping(index=f"{prefix}-iris")[f"{prefix}-iris"]["mappings"]["properties"]
            assert props["id"]["type"] == "keyword"
            assert props["request"]["properties"]["features"]["properties"]["x"]["type"] == "double"
        finally:
            es.indices.delete(index=f"{prefix}-iris", ignore_unavailable=True)
            es.indices.delete_index_template(name=prefix)

    @pytest.mark.slow
    @pytest.mark.parametrize("restart", ["while-idle", "while-writing"])
    async def test_a_cluster_restarted_empty_gets_the_template_again(
            self, own_es: NoidaServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
            restart: str) -> None:
        """A node without a data volume, restarted: the template, checked once per life, was gone,
        the next bulk auto-created the index with dynamic mappings, and rows such as [5.1, "red"]
        were refused (dead-lettered). While idle, aiohttp reconnects without a word: the check is
        made again after a while; a bulk that failed whole has it made before the next one."""
        caplog.set_level(logging.INFO, logger="infer_logger")
        server, row = own_es, {"instances": [[5.1, "red"]]}
        if restart == "while-idle":
            monkeypatch.setattr(es_sink, "_TEMPLATE_CHECK_EVERY", 0.0)
        sink = ElasticsearchSinkConfig(url=server.address, timeout=5).build()
        try:
            await sink.send_batch([request("a", "iris", row)])
            server.stop()
            if restart == "while-writing":
                with pytest.raises(SinkError, match="127.0.0.1") as caught:
                    await sink.send_batch([request("b", "iris", row)])
                assert not isinstance(caught.value, RejectedError)
            server.start()  # the same port, an empty data dir
            with Elasticsearch(server.address) as client:
                assert not client.indices.exists_index_template(name=TEMPLATE_NAME)
            try:
                await sink.send_batch([request("b", "iris", row)])
            except SinkError as exc:  # the connection the restart broke, seen now: the worker resends
                if isinstance(exc, RejectedError):
                    raise
                await sink.send_batch([request("b", "iris", row)])
        finally:
            await sink.aclose()
        with Elasticsearch(server.address) as client:
            assert client.indices.exists_index_template(name=TEMPLATE_NAME)
            assert docs(client, "iris")["b-0"]["request"] == {"values": [5.1, "red"]}
        created = [r for r in caplog.records if "created index template" in r.getMessage()]
        assert len(created) == 2  # once per creation: quiet while it is there

    async def test_no_privilege_writes_anyway_and_says_so_once(
            self, es_url: str, es: Elasticsearch, caplog: pytest.LogCaptureFixture) -> None:
        prefix = unique("itest")
        with TemplateRefused(es_url, 403, refusals=100) as proxy:
            config = ElasticsearchSinkConfig(url=proxy.url, index=prefix + "-{modelname}", template_name=prefix)
            await send(config, [request("a", "iris")], [request("b", "iris")])
            assert len(proxy.refused) == 1
        try:
            es.indices.refresh(index=f"{prefix}-iris")
            assert es.count(index=f"{prefix}-iris")["count"] == 4
            assert sum("cannot install index template" in r.getMessage() for r in caplog.records) == 1
        finally:
            es.indices.delete(index=f"{prefix}-iris", ignore_unavailable=True)

    @pytest.mark.parametrize(("status", "page"), _NO_SIMULATE)
    async def test_a_check_it_cannot_make_does_not_stop_the_writes(
            self, es_url: str, es: Elasticsearch, caplog: pytest.LogCaptureFixture, status: int, page: bytes) -> None:
        """Which template applies is asked once the template is in: a front without the API (a 5xx)
        kept the sink from ever writing, and a 200 page raised AttributeError, retried for ever."""
        prefix = unique("itest")
        with SimulateRefused(es_url, status, page) as proxy:
            config = ElasticsearchSinkConfig(url=proxy.url, index=prefix + "-{modelname}", template_name=prefix)
            await send(config, [request("a", "iris")], [request("b", "iris")])
            assert proxy.asked == 1
        try:
            es.indices.refresh(index=f"{prefix}-iris")
            assert es.count(index=f"{prefix}-iris")["count"] == 4
            (warned,) = [r.getMessage() for r in caplog.records
                         if r.levelname == "WARNING" and r.name.startswith("infer_logger")]
            assert f"cannot check which index template applies to {prefix}-iris" in warned
        finally:
            es.indices.delete(index=f"{prefix}-iris", ignore_unavailable=True)
            es.options(ignore_status=404).indices.delete_index_template(name=prefix)

    async def test_a_template_that_outranks_ours_is_named_once(
            self, es_url: str, es: Elasticsearch, caplog: pytest.LogCaptureFixture) -> None:
        """Only the highest-priority template matching a new index applies: one of higher priority
        over ours (a cluster-wide catch-all) gave the indices its mappings, and the sink said
        nothing. One of lower priority is no concern."""
        prefix = unique("itest")
        config = ElasticsearchSinkConfig(url=es_url, index=prefix + "-{modelname}")

        def warnings() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

        try:
            es.indices.put_index_template(name=f"{prefix}-low", index_patterns=[f"{prefix}*"], priority=10,
                                          template={})
            await send(config, [request("a", "iris")])
            assert warnings() == []
            es.indices.put_index_template(name=f"{prefix}-team", index_patterns=[f"{prefix}-i*"],
                                          priority=900, template={"settings": {"number_of_replicas": 0}})
            await send(config, [request("b", "iris")], [request("c", "iris")])
            (warned,) = warnings()
            assert f"index template {prefix}-team (priority 900, for {prefix}-i*)" in warned
            assert f"{prefix}-iris" in warned and f"not index template {prefix} " in warned
        finally:
            es.indices.delete(index=f"{prefix}-iris", ignore_unavailable=True)
            for name in (prefix, f"{prefix}-low", f"{prefix}-team"):
                es.options(ignore_status=404).indices.delete_index_template(name=name)


class TestJoin:
    """Request, response and explanation end in one document per instance, whatever the order."""

    async def test_all_arrival_orders(self, es_url: str, es: Elasticsearch) -> None:
        service = unique()
        config = ElasticsearchSinkConfig(url=es_url)
        ids = []
        for n, kinds in enumerate(itertools.permutations((request, response, explanation))):
            id_ = f"order{n}"
            ids.append(id_)
            # One batch per event: each order really reaches the server in that order.
            await send(config, *[[make(id_, service)] for make in kinds])
        found = docs(es, service)
        assert sorted(found) == sorted(f"{i}-{k}" for i in ids for k in (0, 1))
        for key, doc in found.items():
            reference = found[f"order0-{key.rsplit('-', 1)[1]}"]
            assert {k: v for k, v in doc.items() if k not in ("id",) and not k.endswith("attributes")} == {
                k: v for k, v in reference.items() if k not in ("id",) and not k.endswith("attributes")}
        doc = found["order3-1"]
        assert doc["@timestamp"] == T0 and doc["status"] == 200 and doc["latency_ms"] == 12.0
        assert doc["request"] == {"values": [3.0, 4.0]}
        assert {k: v for k, v in doc["response"].items() if v is not None} == {
            "prediction": 0, "probabilities": [0.9, 0.1]}  # the others null: they clear an earlier response's
        assert doc["explanation"] == {"f0": -0.5}
        assert doc["model"] == service and doc["metadata"] == {"x-user": ["ann"]}
        assert {"request_attributes", "response_attributes", "explanation_attributes"} <= doc.keys()

    async def test_v2(self, es_url: str, es: Elasticsearch) -> None:
        service = unique()
        body = {"inputs": [{"name": "age", "shape": [3], "datatype": "INT64", "data": [30, 40, 50]},
                           {"name": "city", "shape": [3], "datatype": "BYTES", "data": ["a", "b", "c"]}]}
        out = {"outputs": [{"name": "output-0", "shape": [3], "datatype": "INT64", "data": [1, 0, 1]}]}
        await send(ElasticsearchSinkConfig(url=es_url),
                   [request("v2", service, body), response("v2", service, out)])
        found = docs(es, service)
        assert [found[f"v2-{i}"]["request"]["features"] for i in range(3)] == [
            {"age": 30, "city": "a"}, {"age": 40, "city": "b"}, {"age": 50, "city": "c"}]
        assert [found[f"v2-{i}"]["response"]["prediction"] for i in range(3)] == [1, 0, 1]
        assert es.search(index=f"inference-log-default-{service}", query={"term": {"request.features.city": "b"}},
                         )["hits"]["total"]["value"] == 1  # strings are keywords

    async def test_feature_names_and_per_exchange(self, es_url: str, es: Elasticsearch) -> None:
        service = unique()
        await send(ElasticsearchSinkConfig(url=es_url, feature_names={service: ["a", "b"]}),
                   [request("named", service)])
        assert docs(es, service)["named-0"]["request"] == {"features": {"a": 1.0, "b": 2.0}}
        await send(ElasticsearchSinkConfig(url=es_url, per_instance=False),
                   [response("whole", service), request("whole", service)])
        whole = docs(es, service, "whole")
        assert list(whole) == ["whole"]
        assert whole["whole"]["request"] == [{"values": [1.0, 2.0]}, {"values": [3.0, 4.0]}]
        assert whole["whole"]["status"] == 200

    @pytest.mark.parametrize("order", ["apart", "response-first-in-one-batch", "request-first-in-one-batch"])
    async def test_error_response_marks_every_instance(self, es_url: str, es: Elasticsearch, order: str) -> None:
        """Also ahead of its request in one batch: the count was taken only as the request came,
        so the status went on instance 0 alone."""
        service = unique()
        sink = ElasticsearchSinkConfig(url=es_url).build()
        req = request("err", service, {"instances": [[1], [2], [3]]})
        resp = response("err", service, {"error": "model crashed"}, status=500)
        batches = {"apart": [[req], [resp]], "response-first-in-one-batch": [[resp, req]],
                   "request-first-in-one-batch": [[req, resp]]}[order]
        for batch in batches:
            await sink.send_batch(batch)
        await sink.aclose()
        found = docs(es, service)
        assert sorted(found) == ["err-0", "err-1", "err-2"]
        assert all(d["status"] == 500 and "model crashed" in d["response"]["error"] for d in found.values())

    @pytest.mark.slow
    async def test_a_slow_error_after_many_requests_marks_every_instance(
            self, es_url: str, es: Elasticsearch) -> None:
        """A 504 after the predictor's timeout, 10,001 one-instance requests after its 3-instance
        request (~170 req/s for a minute): the count was evicted, the status went on instance 0 alone."""
        service = unique()
        sink = ElasticsearchSinkConfig(url=es_url).build()
        others = [request(f"o{i}", service, {"instances": [[i]]}) for i in range(10_001)]
        try:
            await sink.send_batch([request("slow", service, {"instances": [[1], [2], [3]]})])
            for start in range(0, len(others), 2500):
                await sink.send_batch(others[start:start + 2500])
            timeout = response("slow", service, {"error": "upstream request timeout"}, status=504)
            await sink.send_batch([timeout])
        finally:
            await sink.aclose()
        found = docs(es, service, "slow")
        assert sorted(found) == ["slow-0", "slow-1", "slow-2"]
        assert all(d.get("status") == 504 and "upstream request timeout" in d["response"]["error"]
                   for d in found.values())

    @pytest.mark.parametrize("order", ["error-then-ok", "ok-then-error"])
    async def test_a_retry_under_the_same_id_replaces_the_response(
            self, es_url: str, es: Elasticsearch, order: str) -> None:
        """Envoy and Istio retries keep x-request-id: deep-merged by the update, a 503's error
        stayed beside the 200's prediction (and the other way round)."""
        service = unique()
        req = request("x", service)
        error = response("x", service, {"error": "upstream busy"}, status=503)
        ok = response("x", service, {"predictions": [0, 1]})
        first, second = (error, ok) if order == "error-then-ok" else (ok, error)
        await send(ElasticsearchSinkConfig(url=es_url), [req, first], [req, second])
        found = docs(es, service)
        got = {k: (d["status"], {f: v for f, v in d["response"].items() if v is not None})
               for k, d in found.items()}
        if second is ok:
            assert got == {"x-0": (200, {"prediction": 0}), "x-1": (200, {"prediction": 1})}
        else:
            assert got == {f"x-{i}": (503, {"error": '{"error":"upstream busy"}'}) for i in (0, 1)}

    async def test_an_error_response_in_flight_beside_its_request(
            self, es_url: str, es: Elasticsearch) -> None:
        """Two batches in flight: the response's batch runs while the request's is still sending."""
        service = unique()
        sink = ElasticsearchSinkConfig(url=es_url, max_bulk_bytes=20_000).build()
        padding = [request(f"pad{i}", service, {"instances": [{"pad": "x" * 3000}]}) for i in range(10)]
        try:
            await asyncio.gather(  # the request in the first batch's second _bulk chunk
                sink.send_batch([*padding, request("err", service, {"instances": [[1], [2], [3]]})]),
                sink.send_batch([response("err", service, {"error": "model crashed"}, status=500)]),
            )
        finally:
            await sink.aclose()
        found = docs(es, service, "err")
        assert sorted(found) == ["err-0", "err-1", "err-2"]
        assert all(d["status"] == 500 and "model crashed" in d["response"]["error"] for d in found.values())

    async def test_a_large_error_body_is_indexed_whole_once(self, es_url: str, es: Elasticsearch) -> None:
        service = unique()
        error = {"error": "E" * 200_000}
        sink = ElasticsearchSinkConfig(url=es_url).build()
        await sink.send_batch([request("big", service, {"instances": [[i] for i in range(50)]})])
        await sink.send_batch([response("big", service, error, status=500)])
        await sink.aclose()
        found = docs(es, service)
        assert len(found) == 50 and all(d["status"] == 500 for d in found.values())
        assert found["big-0"]["response"]["error"] == orjson.dumps(error).decode()
        assert all(len(found[f"big-{i}"]["response"]["error"]) < 1100 for i in range(1, 50))

    async def test_times_and_latencies_out_of_range(self, es_url: str, es: Elasticsearch) -> None:
        service = unique()
        batch = [
            _event(events.REQUEST, "early", {"instances": [[1]]}, "0001-01-01T00:30:00+01:00", service),
            _event(events.RESPONSE, "early", {"predictions": [1]}, "0001-01-01T00:00:00Z", service,
                   statuscode=200, latencyms=5),
            _event(events.REQUEST, "old", {"instances": [[1]]}, "0999-06-01T00:00:00Z", service),
            _event(events.RESPONSE, "huge", {"predictions": [1]}, T1, service, statuscode=200, latencyms=1e20),
        ]
        await send(ElasticsearchSinkConfig(url=es_url), batch)  # none raised, none refused
        found = docs(es, service)
        assert "@timestamp" not in found["early-0"] and found["early-0"]["status"] == 200
        assert found["old-0"]["@timestamp"] == "0999-06-01T00:00:00.000000Z"
        assert "latency_ms" not in found["huge-0"] and found["huge-0"]["@timestamp"] == T1

    async def test_redelivery_does_not_duplicate(self, es_url: str, es: Elasticsearch) -> None:
        service = unique()
        batch = [request("r", service), response("r", service), explanation("r", service)]
        await send(ElasticsearchSinkConfig(url=es_url), batch, batch, list(reversed(batch)))
        index = f"inference-log-default-{service}"
        es.indices.refresh(index=index)
        assert es.count(index=index)["count"] == 2
        assert docs(es, service)["r-0"]["response"]["prediction"] == 1

    async def test_index_per_model(self, es_url: str, es: Elasticsearch) -> None:
        a, b = unique("Iris"), unique("wine")
        await send(ElasticsearchSinkConfig(url=es_url), [request("m", a), request("m", b), response("m", a)])
        assert sorted(docs(es, a)) == ["m-0", "m-1"] and docs(es, a)["m-0"]["status"] == 200
        assert "status" not in docs(es, b)["m-0"]
        assert es.indices.exists(index=f"inference-log-default-{a.lower()}")

    async def test_large_batches_go_in_chunks(self, es_url: str, es: Elasticsearch) -> None:
        service = unique()
        batch = [request(f"c{i}", service) for i in range(40)]
        await send(ElasticsearchSinkConfig(url=es_url, max_bulk_bytes=2048), batch)  # type: ignore[arg-type]
        assert len(docs(es, service)) == 80


class TestFailures:
    """Mapping errors are dead-lettered one by one; a server that is down is retried."""

    async def test_mapping_error_rejects_only_that_event(self, es_url: str, es: Elasticsearch) -> None:
        service = unique()
        config = ElasticsearchSinkConfig(url=es_url)
        await send(config, [request("first", service, {"instances": [{"size": 1.5}]})])
        bad = request("bad", service, {"instances": [{"size": "large"}]})  # `size` is mapped as a number
        good = [request(f"ok{i}", service, {"instances": [{"size": 2.5}]}) for i in range(2)]
        with pytest.raises(RejectedError) as caught:
            await send(config, [good[0], bad, good[1]])
        assert caught.value.events == [bad]
        assert "size" in str(caught.value) and "bad-0" in str(caught.value)
        assert sorted(docs(es, service)) == ["first-0", "ok0-0", "ok1-0"]

    async def test_payloads_deeper_than_python_recurses_are_indexed(self, es_url: str, es: Elasticsearch) -> None:
        """Each raised while its documents were made (RecursionError, TypeError), outside the
        sink's handling: the worker retried the batch forever. Nested 300 deep a request's
        features cannot be encoded: that event alone is rejected."""
        service = unique()
        deep_request = _event(events.REQUEST, "deep", None, T0, service)
        deep_500 = _event(events.RESPONSE, "err", None, T1, service, statuscode=500)
        dims = _event(events.REQUEST, "dims", None, T0, service)
        unencodable = _event(events.REQUEST, "bad", None, T0, service)
        batch = [
            CloudEvent(deep_request.attributes, b'{"instances":' + b"[" * 1100 + b"]" * 1100 + b"}"),
            CloudEvent(deep_500.attributes, b'{"error":' + b"[" * 300 + b"]" * 300 + b"}"),
            CloudEvent(dims.attributes, b'{"inputs":[{"name":"x","datatype":"FP32","shape":['
                       + b",".join([b"1"] * 1000) + b'],"data":[1]}]}'),
            CloudEvent(unencodable.attributes, b'{"instances":' + b"[" * 300 + b"]" * 300 + b"}"),
        ]
        with pytest.raises(RejectedError) as caught:
            await send(ElasticsearchSinkConfig(url=es_url), batch)
        assert [e.id for e in caught.value.events] == ["bad"]
        found = docs(es, service)
        assert sorted(found) == ["deep-0", "dims-0", "err-0"]
        assert set(found["deep-0"]["request"]) == {"raw"}
        assert found["err-0"]["response"]["error"].startswith('{"error":[[[')

    async def test_refused_connection(self) -> None:
        config = ElasticsearchSinkConfig(url=f"http://127.0.0.1:{free_port()}", timeout=2)
        with pytest.raises(SinkError) as caught:
            await send(config, [request("a", "iris")])
        assert not isinstance(caught.value, RejectedError)
        assert config.where in str(caught.value)

    async def test_an_unreachable_server_says_why(self) -> None:
        """elastic_transport says "Connection error" alone for one node: a refusal, an unknown
        host and TLS to a plain HTTP port read the same."""
        said = []
        with FakeBulk([]) as plain:
            for url in (f"http://127.0.0.1:{free_port()}", "http://no-such-host.invalid:9200",
                        plain.url.replace("http://", "https://")):
                config = ElasticsearchSinkConfig(url=url, timeout=5)
                with pytest.raises(SinkError) as caught:
                    await send(config, [request("a", "iris")])
                assert not isinstance(caught.value, RejectedError)
                said.append(str(caught.value).replace(config.where, "<url>"))
                assert said[-1].startswith("elasticsearch at <url>: ")
        assert "ConnectionRefusedError" in said[0]
        assert len(set(said)) == 3 and not any(why.endswith("Connection error") for why in said), said

    @pytest.mark.slow
    async def test_a_server_that_stops_answering_times_out_then_the_retry_does_not_duplicate(
            self, own_es: NoidaServer) -> None:
        server, service = own_es, unique()
        sink = ElasticsearchSinkConfig(url=server.address, timeout=1).build()
        await sink.send_batch([request("s0", service)])
        server.pause()  # it takes the request, answers nothing
        batch = [request(f"s{i}", service) for i in range(1, 6)] + [response("s0", service)]
        try:
            with pytest.raises(SinkError) as caught:
                await asyncio.wait_for(sink.send_batch(batch), 60)  # a hang guard: stopped, it never answers
        except TimeoutError:
            pytest.fail("send_batch still waiting after 60 s: the 1 s request timeout was not applied")
        assert isinstance(caught.value.__cause__, ConnectionTimeout) and not isinstance(caught.value, RejectedError)
        assert f"127.0.0.1:{server.port}" in str(caught.value)
        server.resume()  # it may now apply the timed-out bulk too
        # The worker's retry, as often as it takes: continued, the server first works through what
        # it took while stopped, and a loaded machine may keep it past the 1 s timeout (30 s, a bound).
        deadline = time.monotonic() + 30
        while True:
            try:
                await sink.send_batch(batch)
                break
            except SinkError as exc:
                if isinstance(exc, RejectedError) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        await sink.aclose()
        with Elasticsearch(server.address) as client:
            found = docs(client, service)
        assert len(found) == 12 and found["s0-0"]["status"] == 200  # upserts by id: once each

    @pytest.mark.slow
    async def test_server_down_and_back(self, own_es: NoidaServer) -> None:
        server, service = own_es, unique()
        sink = ElasticsearchSinkConfig(url=server.address, timeout=5).build()
        before = [request(f"b{i}", service) for i in range(5)]
        await sink.send_batch(before)
        server.stop(keep_data=True)
        during = [request(f"d{i}", service) for i in range(5)] + [response("b0", service)]
        for _ in range(2):
            with pytest.raises(SinkError, match=f"127.0.0.1:{server.port}"):
                await sink.send_batch(during)
        server.start(fresh=False)
        await sink.send_batch(during)  # the worker's retry: the same batch, the same client
        await sink.aclose()
        with Elasticsearch(server.address) as client:
            found = docs(client, service)
        assert len(found) == 20
        assert found["b0-0"]["status"] == 200 and found["d4-1"]["request"] == {"values": [3.0, 4.0]}


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Polls `condition` (run in a thread: it may call Elasticsearch) until it holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(condition):
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.05)


class TestWorker:
    """The sink behind a real spool and worker: dead letters, and an outage that loses nothing."""

    async def test_dead_letter_and_keep_going(self, es_url: str, es: Elasticsearch, tmp_path: Path) -> None:
        service = unique()
        spool = DiskSpool(tmp_path / "spool")
        sink = ElasticsearchSinkConfig(url=es_url).build()
        d = Dispatcher(spool, {"es": sink}, Metrics(spool), batch_size=50,
                       backoff=Backoff(initial=0.01, maximum=0.1), deadletter_dir=tmp_path / "dead")
        d.start()
        spool.append(request("first", service, {"instances": [{"size": 1.5}]}))
        await until(lambda: "first-0" in docs(es, service))
        spool.append(request("bad", service, {"instances": [{"size": "large"}]}))
        for i in range(5):
            spool.append(request(f"ok{i}", service, {"instances": [{"size": 2.0}]}))
        await until(lambda: len(docs(es, service)) == 6)
        await d.stop()
        await sink.aclose()
        (line,) = (tmp_path / "dead" / "es.jsonl").read_bytes().splitlines()
        dead = orjson.loads(line)
        assert dead["attributes"]["id"] == "bad" and "size" in dead["reason"]

    @pytest.mark.parametrize("max_bulk_bytes", [8 << 20, 200_000])
    async def test_a_bulk_answered_413_goes_again_in_halves(self, es_url: str, es: Elasticsearch, tmp_path: Path,
                                                            max_bulk_bytes: int) -> None:
        """A front's body limit below max_bulk_bytes (nginx's client_max_body_size): the 413 was a
        SinkError, the same bulk retried for ever: nothing taken, nothing dead-lettered. Now each
        document is taken once (bulks taken before the 413 are not sent again), and only the event
        too large alone is dead-lettered."""
        service = unique()
        batch = [request(f"e{i}", service, {"instances": [["x" * 60_000]]}) for i in range(30)]
        batch.insert(20, request("huge", service, {"instances": [["x" * 300_000]]}))
        # Its documents together are over the front's limit, each is not: it was dead-lettered.
        batch.insert(10, request("many", service, {"instances": [["y" * 20_000]] * 40}))
        spool = DiskSpool(tmp_path / "spool")
        for event in batch:
            spool.append(event)
        with BodyLimit(es_url, 256 << 10) as front:
            sink = ElasticsearchSinkConfig(url=front.url, max_bulk_bytes=max_bulk_bytes).build()
            d = Dispatcher(spool, {"es": sink}, Metrics(spool), batch_size=100,
                           backoff=Backoff(initial=0.01, maximum=0.1), deadletter_dir=tmp_path / "dead")
            d.start()
            try:
                await until(lambda: d.workers[0].reader.lag() == 0)
            finally:
                await d.stop()
                spool.close()
        (line,) = (tmp_path / "dead" / "es.jsonl").read_bytes().splitlines()
        dead = orjson.loads(line)
        assert dead["attributes"]["id"] == "huge" and "answered 413" in dead["reason"]
        many = {f"many-{i}" for i in range(40)}
        assert front.taken == {f"e{i}-0": 1 for i in range(30)} | dict.fromkeys(many, 1)
        assert sorted(docs(es, service)) == sorted({f"e{i}-0" for i in range(30)} | many)
        assert d.metrics.delivered.labels("es")._value.get() == 31 and spool.stats.dropped["rejected"] == 1
        # The sink's bulks shrank below the limit: refusals for the first bulks only, not for each.
        assert 0 < front.too_large <= 6

    @pytest.mark.slow
    async def test_outage_loses_nothing(self, tmp_path: Path, own_es: NoidaServer) -> None:
        server = own_es
        spool = DiskSpool(tmp_path / "spool")
        sink = ElasticsearchSink(ElasticsearchSinkConfig(url=server.address, timeout=5))
        d = Dispatcher(spool, {"es": sink}, Metrics(spool), batch_size=20,
                       backoff=Backoff(initial=0.05, maximum=0.2))
        service = unique()
        try:
            with Elasticsearch(server.address) as client:
                d.start()
                for i in range(10):
                    spool.append(request(f"a{i}", service))
                await until(lambda: len(docs(client, service)) == 20)
                server.stop(keep_data=True)
                for i in range(10):
                    spool.append(request(f"b{i}", service))
                    spool.append(response(f"b{i}", service))
                await until(lambda: d.metrics.retried.labels("es")._value.get() >= 2)
                server.start(fresh=False)
                await until(lambda: len(docs(client, service)) == 40)
                await until(lambda: all("status" in v for k, v in docs(client, service).items() if k[0] == "b"))
        finally:
            await d.stop()
            await sink.aclose()


class FakeBulk(EventCollector):
    """An Elasticsearch stand-in that answers `_bulk` items with scripted statuses per call."""

    def __init__(self, script: list[list[int | tuple[int, str, str]] | int | bytes]) -> None:
        super().__init__()
        # Per call: item statuses (or (status, error type, reason)), one status for the whole
        # request, or a whole body answered 200.
        self.script = script
        self.calls: list[list[str]] = []  # the _ids of each call
        self.retry_after = b"3"  # on a whole-request refusal

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await super().__call__(scope, receive, send)
        lines = (await read_body(receive)).splitlines()
        actions = [orjson.loads(line)["update"] for line in lines[::2]]
        self.calls.append([a["_id"] for a in actions])
        step = self.script[min(len(self.calls), len(self.script)) - 1]
        headers = [(b"content-type", b"application/json"), (b"x-elastic-product", b"Elasticsearch")]
        if isinstance(step, int):
            error = {"error": {"type": "es_rejected_execution_exception", "reason": "busy"}, "status": step}
            await respond(send, step, headers + [(b"retry-after", self.retry_after)], orjson.dumps(error))
            return
        if isinstance(step, bytes):
            await respond(send, 200, headers, step)
            return
        answers = [step[i] if i < len(step) else 200 for i in range(len(actions))]
        errors = [a if isinstance(a, tuple) else (a, "x_exception", f"status {a}") for a in answers]
        items = [{"update": {"_index": a["_index"], "_id": a["_id"], "status": s,
                             **({"error": {"type": kind, "reason": why}} if s >= 300 else {})}}
                 for a, (s, kind, why) in zip(actions, errors)]
        body = {"took": 1, "errors": any(s >= 300 for s, _, _ in errors), "items": items}
        await respond(send, 200, headers, orjson.dumps(body))

    def __enter__(self) -> Self:
        self.start()
        return self


def test_chunks_take_operations_as_they_are_sent() -> None:
    taken: list[int] = []

    def ops() -> Iterator[_Op]:
        for i in range(10):
            taken.append(i)
            yield _Op(i, b"x" * 100, ("i", str(i)))

    chunks = _chunks(ops(), lambda: 250)
    assert [op.event for op in next(chunks)] == [0, 1]
    assert taken == [0, 1, 2]  # the third was read to know the chunk was full, no more
    assert [[op.event for op in chunk] for chunk in chunks] == [[2, 3], [4, 5], [6, 7], [8, 9]]


def _fake_config(fake: FakeBulk) -> ElasticsearchSinkConfig:
    return ElasticsearchSinkConfig(url=fake.url, install_template=False, retry_delay=0.01)


class TestItemRetries:
    """429/5xx items are sent again alone; 4xx items are refused; whole-request errors retry."""

    @pytest.mark.parametrize("status", [429, 503, 409, 404, 403])
    async def test_failed_items_alone_are_retried(self, status: int) -> None:
        batch = [request(f"e{i}", "iris", {"instances": [[i]]}) for i in range(3)]
        with FakeBulk([[200, status, 500], [200, 200]]) as fake:
            await send(_fake_config(fake), batch)
        assert fake.calls == [["e0-0", "e1-0", "e2-0"], ["e1-0", "e2-0"]]

    async def test_still_failing_items_fail_the_batch(self) -> None:
        error = pytest.raises(SinkError, match=r"\[429\] to 1 documents after 3 attempts")
        with FakeBulk([[429]]) as fake, error as caught:
            await send(_fake_config(fake), [request("e", "iris", {"instances": [[1]]})])
        assert not isinstance(caught.value, RejectedError)
        assert len(fake.calls) == 3

    async def test_a_closed_index_or_the_shard_limit_is_retried(self) -> None:
        """400s that are the cluster's state: dead-lettered, every event written while an index
        was closed for maintenance was lost to Elasticsearch."""
        batch = [request(f"e{i}", "iris", {"instances": [[i]]}) for i in range(3)]
        closed = (400, "index_closed_exception", "closed")
        full = (400, "validation_exception", "Validation Failed: 1: this action would add [2] shards, but this "
                                             "cluster currently has [1000]/[1000] maximum normal shards open;")
        with FakeBulk([[closed, full, 200], [200, 200]]) as fake:
            await send(_fake_config(fake), batch)
        assert fake.calls == [["e0-0", "e1-0", "e2-0"], ["e0-0", "e1-0"]]

    @pytest.mark.parametrize("body", [
        b"<html>log in</html>", b"[]", b'{"errors": true}', b'{"errors": true, "items": [{}]}',
        b'{"errors": true, "items": [{"update": {"status": null}}]}', b'{"errors": true, "items": [[1]]}',
    ])
    async def test_an_answer_that_is_no_bulk_answer_is_a_sink_error(self, body: bytes) -> None:
        """A proxy's page or a broken item: retried as a SinkError naming the address (it was an
        AttributeError, or "coroutine raised StopIteration")."""
        with FakeBulk([body]) as fake, pytest.raises(SinkError) as caught:
            await send(_fake_config(fake), [request("e", "iris")])
        assert not isinstance(caught.value, RejectedError) and fake.url.split("//")[1] in str(caught.value)

    async def test_refused_and_retried_items_in_one_batch(self) -> None:
        batch = [request(f"e{i}", "iris", {"instances": [[i]]}) for i in range(3)]
        with FakeBulk([[400, 429, 200], [200]]) as fake, pytest.raises(RejectedError) as caught:
            await send(_fake_config(fake), batch)
        assert caught.value.events == [batch[0]]
        assert fake.calls[1] == ["e1-0"]

    @pytest.mark.parametrize(("script", "refused"), [
        ([[200], 413], ["e1", "e2"]),  # the first bulk was taken: not sent again
        ([[200], [429], [200], 413], ["e1"]),  # only e1 was left, for its retry
        ([[400], [200], 413], ["e0", "e2"]),  # e0's refusal would be lost with it left out
    ])
    async def test_a_document_answered_413_alone_is_refused(self, script: list[list[int] | int],
                                                            refused: list[str]) -> None:
        batch = [request(f"e{i}", "iris", {"instances": [[i]]}) for i in range(3)]
        with FakeBulk(script) as fake, pytest.raises(RejectedError) as caught:
            config = _fake_config(fake).model_copy(update={"max_bulk_bytes": 1})  # a bulk per document
            await send(config, batch)
        assert [e.id for e in caught.value.events] == refused and not caught.value.together
        assert [("answered 413" in why) for _, why in caught.value.refusals([])] == [i != "e0" for i in refused]
        assert caught.value.too_large is ("e0" not in refused)

    async def test_whole_request_refused(self) -> None:
        with FakeBulk([429]) as fake, pytest.raises(SinkError) as caught:
            await send(_fake_config(fake), [request("e", "iris")])
        assert not isinstance(caught.value, RejectedError)
        assert caught.value.retry_after == 3.0 and "429" in str(caught.value)

    async def test_a_retry_after_that_is_no_number_is_ignored(self) -> None:
        """"²" passed str.isdigit() and float() raised: a ValueError instead of the SinkError."""
        with FakeBulk([429]) as fake, pytest.raises(SinkError) as caught:
            fake.retry_after = "²".encode()
            await send(_fake_config(fake), [request("e", "iris")])
        assert caught.value.retry_after is None and "429" in str(caught.value)

    @pytest.mark.parametrize(("refused", "calls"), [
        # A bulk per document: the 503's bulk answered 429 (its shard's write queue full).
        ({(2, 0): 429}, [["x-0"]] * 4 + [["x-0"]] * 3),
        # One bulk: the 503's item answered 409 (a conflict left after retry_on_conflict).
        ({(1, 1): 409}, [["x-0"] * 4, ["x-0"] * 3]),
    ], ids=["a later bulk", "one bulk"])
    async def test_an_item_retried_does_not_overwrite_a_later_update_of_its_document(
            self, es_url: str, es: Elasticsearch, refused: dict[tuple[int, int], int],
            calls: list[list[str]]) -> None:
        """Envoy and Istio retries keep x-request-id: request, 503 response, request, 200 response
        under one id, in one batch. The 503's item was sent again after the later ones were
        taken, and the older response replaced the newer one. Now the later updates of that
        document go again after it, in order."""
        service = unique()
        one = {"instances": [[1.0, 2.0]]}
        batch = [request("x", service, one), response("x", service, {"error": "upstream busy"}, status=503),
                 request("x", service, one), response("x", service, {"predictions": [1]})]
        with ItemsRefused(es_url, refused) as front:
            bulk_bytes = 1 if len(calls) > 2 else 8 << 20
            await send(ElasticsearchSinkConfig(url=front.url, max_bulk_bytes=bulk_bytes, retry_delay=0.01), batch)
        doc = docs(es, service)["x-0"]
        assert (doc["status"], {k: v for k, v in doc["response"].items() if v is not None}) == (200, {"prediction": 1})
        assert front.calls == calls

    async def test_a_mesh_retry_after_a_batch_boundary_keeps_the_instance_count_of_the_first(
            self, es_url: str, es: Elasticsearch, tmp_path: Path) -> None:
        """The retry's request (1 instance), last of its batch with its 200 in the next, was counted
        ahead for the 503 before it, which answers the first request (3) of the batch before."""
        service = unique()
        spool = DiskSpool(tmp_path / "spool")
        for event in [request("x", service, {"instances": [[1.0], [2.0], [3.0]]}), request("a", service),
                      request("b", service), response("x", service, {"error": "busy"}, status=503),
                      request("x", service, {"instances": [[1.0]]}), request("c", service),
                      response("x", service, {"predictions": [7]})]:
            spool.append(event)
        await through_the_worker(spool, ElasticsearchSinkConfig(url=es_url).build(), batch_size=3)
        stored = docs(es, service)
        assert [stored[f"x-{i}"].get("status") for i in range(3)] == [200, 503, 503]

    @pytest.mark.parametrize(("batch_size", "refused"), [
        # One bulk: x-0..2 of the request, x-0..2 of the 503 (x-1 refused), x-0 twice; then x-1
        # alone in the sink's other attempts.
        (100, {(1, 4): 429, (2, 0): 429, (3, 0): 429}),
        # The request in the batch before: x-0..2 of the 503 (x-1 refused), x-0 twice; then x-1 alone.
        (3, {(2, 1): 429, (3, 0): 429, (4, 0): 429}),
    ], ids=["its request in the batch", "its request in the batch before"])
    async def test_a_response_sent_again_keeps_the_instance_count_it_was_made_with(
            self, es_url: str, es: Elasticsearch, tmp_path: Path, batch_size: int,
            refused: dict[tuple[int, int], int]) -> None:
        """The worker sent again from the 503 response (its x-1 item refused), whose instance
        count (3) a later request of the id (1, a mesh's retry) had replaced: instances 1 and 2
        never got the 503."""
        service = unique()
        spool = DiskSpool(tmp_path / "spool")
        for event in [request("x", service, {"instances": [[1.0], [2.0], [3.0]]}),
                      request("a", service), request("b", service),
                      response("x", service, {"error": "busy"}, status=503),
                      request("x", service, {"instances": [[1.0]]}), response("x", service, {"predictions": [7]})]:
            spool.append(event)
        with ItemsRefused(es_url, refused) as front:
            sink = ElasticsearchSinkConfig(url=front.url, retry_delay=0.001, max_attempts=3).build()
            await through_the_worker(spool, sink, batch_size=batch_size)
        stored = docs(es, service)
        assert [stored[f"x-{i}"].get("status") for i in range(3)] == [200, 503, 503]

    @pytest.mark.parametrize(("script", "pending"), [
        ([[200], 429], ["e1", "e2", "e3"]),
        ([[200], [200], 503], ["e2", "e3"]),
        # Refused, e1 goes again to be refused again (left out, it was counted as taken), and what
        # follows it, in order.
        ([[200], [400], [200], 429], ["e1", "e2", "e3"]),
        ([429], ["e0", "e1", "e2", "e3"]),
    ])
    async def test_a_whole_request_failure_names_the_events_not_taken(
            self, script: list[Any], pending: list[str]) -> None:
        """One bulk of several answered 429 or 5xx as a whole: the batch went again from its
        first bulk, those already taken included."""
        batch = [request(f"e{i}", "iris", {"instances": [[i]]}) for i in range(4)]
        with FakeBulk(script) as fake, pytest.raises(SinkError) as caught:
            await send(_fake_config(fake).model_copy(update={"max_bulk_bytes": 1}), batch)  # a bulk per document
        assert not isinstance(caught.value, RejectedError)
        assert [e.id for e in caught.value.pending] == pending

    async def test_items_still_failing_name_the_events_not_taken(self) -> None:
        batch = [request(f"e{i}", "iris", {"instances": [[i]]}) for i in range(3)]
        with FakeBulk([[200, 429, 200], [429]]) as fake, pytest.raises(SinkError) as caught:
            await send(_fake_config(fake), batch)
        assert fake.calls[1:] == [["e1-0"]] * 2
        assert [e.id for e in caught.value.pending] == ["e1", "e2"]  # from the first not taken, in order

    async def test_the_worker_sends_only_what_was_not_taken(self, tmp_path: Path) -> None:
        spool = DiskSpool(tmp_path / "spool")
        for i in range(3):
            spool.append(request(f"e{i}", "iris", {"instances": [[i]]}))
        with FakeBulk([[200], 429, [200]]) as fake:
            d = await through_the_worker(spool, _fake_config(fake).model_copy(update={"max_bulk_bytes": 1}).build())
        assert fake.calls == [["e0-0"], ["e1-0"], ["e1-0"], ["e2-0"]]
        assert d.metrics.delivered.labels("es")._value.get() == 3
