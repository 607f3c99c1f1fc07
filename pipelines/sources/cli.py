"""`infer-logger ingest`: a click command for `main`'s lazy group (see `infer_logger.cli`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from infer_logger.errors import ConfigError, InferLoggerError

_HELP = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
# The `source:` keys the flags give, by flag, and the one source type that has them.
_SOURCE_FLAGS = {"--listen": ("forward", ("host", "port")), "--kafka-bootstrap": ("kafka", ("bootstrap_servers",)),
                 "--topic": ("kafka", ("topics",)), "--group-id": ("kafka", ("group_id",))}


@click.command("ingest", context_settings=_HELP)
@click.option("-c", "--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML settings: `source:`, `sink:`, `host`, `port` (flags and INFER_LOGGER_INGEST_* "
                   "env vars override it).")
@click.option("--source", "source_type", type=click.Choice(["forward", "kafka"]),
              help="Where events come from: a Fluentd Forward server, or a Kafka consumer group.  "
                   "[default: forward]")
@click.option("--listen", metavar="HOST:PORT",
              help="forward: the address Fluent Bit / Fluentd ship to.  [default: 127.0.0.1:24224]")
@click.option("--kafka-bootstrap", metavar="HOST:PORT[,…]", help="kafka: the brokers to start from.")
@click.option("--topic", "topics", multiple=True, help="kafka: a topic to read (^regex for a pattern). Repeatable.")
@click.option("--group-id", help="kafka: the consumer group.  [default: infer-logger]")
@click.option("--sink-url", help="Send the events as CloudEvents to this URL (e.g. the broker) instead of the store.")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path),
              help="The audit store to write (the default sink).  [default: infer-logger-data/audit.db]")
@click.option("--host", help="Address of /healthz, /readyz and /metrics.  [default: 127.0.0.1]")
@click.option("--port", type=int, help="Their port.  [default: 9084]")
@click.option("--check", is_flag=True,
              help="Validate the settings, then exit (their form: peers and paths are tried at start).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def ingest_command(config: Path | None, source_type: str | None, listen: str | None, kafka_bootstrap: str | None,
                   topics: tuple[str, ...], group_id: str | None, sink_url: str | None, db: Path | None,
                   check: bool, log_level: str, **flags: Any) -> None:
    """Feed events from Fluent Bit / Fluentd (the Forward protocol) or from Kafka topics into a sink.

    \b
    infer-logger ingest                                   # Forward on 127.0.0.1:24224 -> the store
    infer-logger ingest --source kafka --kafka-bootstrap kafka:9092 --topic inference-events \\
        --sink-url http://127.0.0.1:9082/                 # a consumer group -> the broker

    A Forward chunk is acked, a Kafka offset committed, only once the sink took its events;
    records that are not CloudEvents arrive as `io.fluentd.record` events (Forward) or go to the
    dead-letter topic or file (Kafka). Other source and sink options: the YAML file.
    """
    from pipelines.sources.settings import load_ingest_settings

    source: dict[str, Any] = {}
    if source_type:
        source["type"] = source_type
    if listen is not None:  # an empty value is an error, not unset
        host, _, port = listen.rpartition(":")
        # `::1` was read as host ":" and port 1, accepted by --check and failing at start; `[]:24224`
        # as host "", every address
        if (not host.strip("[]") or not port.isdigit()
                or (":" in host and not (host.startswith("[") and host.endswith("]")))):
            _fail(2, f"config error: --listen: {listen!r} is not HOST:PORT (IPv6 in brackets: [::1]:24224)")
        source.update(host=host.strip("[]"), port=int(port))
    if kafka_bootstrap is not None:
        source["bootstrap_servers"] = kafka_bootstrap
    if topics:
        source["topics"] = list(topics)
    if group_id is not None:
        source["group_id"] = group_id
    if sink_url is not None and db:
        _fail(2, "config error: --sink-url and --db: choose one sink")
    if source_type and (wrong := _other_sources_flag(source, source_type)):
        _fail(2, f"config error: {wrong}")
    try:
        if source:
            flags["source"] = source  # merged over the file's `source:`
        if sink_url is not None:
            flags["sink"] = {"type": "http", "url": sink_url}
        elif db:
            flags["sink"] = {"type": "store", "path": str(db)}
        settings = load_ingest_settings(config, **flags)
    except ConfigError as exc:
        # Without --source the type is the file's, the env's or forward: a flag of the other one is
        # an extra key of it (`source.forward.bootstrap_servers: Extra inputs are not permitted`).
        place = exc.field.split(".")
        given = len(place) == 3 and place[0] == "source" and place[2] in source
        wrong = _other_sources_flag(source, place[1]) if given else None
        _fail(2, f"config error: {wrong or exc}")
    if check:
        click.echo(f"ok: {settings.source.type} source -> {settings.sink.type} sink")
        return
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipelines.sources.service import serve

    def banner(ingest: Any, port: int) -> None:
        click.echo(f"infer-logger ingest: {ingest.name} source -> {settings.sink.type} sink; "
                   f"health and metrics on http://{settings.host}:{port}/", err=True)

    try:
        serve(settings, log_level="warning" if log_level != "debug" else "info", banner=banner)
    except ConfigError as exc:
        _fail(2, f"config error: {exc}")
    except InferLoggerError as exc:
        _fail(1, str(exc))


def _other_sources_flag(source: dict[str, Any], source_type: str) -> str | None:
    """What to say of the first flag given that a `source_type` source does not take, if one was."""
    for flag, (kind, keys) in _SOURCE_FLAGS.items():
        if kind != source_type and any(key in source for key in keys):
            return f"{flag} needs --source {kind}" + ("" if kind == "kafka" else " (the default)")
    return None


def _fail(code: int, message: str) -> None:
    click.echo(f"infer-logger ingest: {message}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    ingest_command()
