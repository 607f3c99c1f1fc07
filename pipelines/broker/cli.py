"""`infer-logger broker` and `infer-logger cesql`: click commands for `main.add_command(...)`.

Also runnable alone: `python -m pipelines.broker ...` is `infer-logger broker ...`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click
import orjson

from infer_logger.errors import ConfigError, InferLoggerError, InvalidEventError

_HELP = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command("broker", context_settings=_HELP)
@click.option("-c", "--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML broker settings (flags and INFER_LOGGER_BROKER_* env vars override it).")
@click.option("-t", "--triggers", "trigger_files", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML file of triggers: Knative Trigger manifests or `triggers:`. Repeatable.")
@click.option("--host", help="Address to listen on.  [default: 127.0.0.1]")
@click.option("--port", type=int, help="Port to listen on.  [default: 9082]")
@click.option("--channel", type=click.Choice(["disk", "memory", "kafka"]),
              help="Where the broker's log lives.  [default: disk]")
@click.option("--dir", "dir_", type=click.Path(file_okay=False, path_type=Path),
              help="Spool directory (disk channel).  [default: infer-logger-data/broker]")
@click.option("--kafka-bootstrap",
              help="Kafka brokers host:port[,...] (kafka channel).  [default: 127.0.0.1:9092]")
@click.option("--role", type=click.Choice(["all", "ingress", "dispatcher"]),
              help="kafka channel: run only the ingress or only the trigger dispatchers.  [default: all]")
@click.option("--check", is_flag=True, help="Validate the settings and trigger files, then exit.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def broker_command(config: Path | None, trigger_files: tuple[Path, ...], dir_: Path | None,
                   kafka_bootstrap: str | None, check: bool, log_level: str, **flags: Any) -> None:
    """Run a CloudEvents broker with triggers (Knative Eventing's model, Knative YAML as is).

    POST events to / (the default broker) or /<namespace>/<broker>: binary, structured or batch
    mode. Triggers filter them (attributes, exact, prefix, suffix, all, any, not, cesql) and
    deliver to a URL or an in-process component (store, ...), with retries, backoff and a
    dead-letter sink. SIGHUP reloads the trigger files; an invalid file is reported (file:line)
    and the running triggers stay as they were.
    """
    from pipelines.broker.settings import load_broker_settings

    if trigger_files:
        flags["trigger_files"] = list(trigger_files)
    if dir_ is not None:
        flags["dir"] = dir_
    if kafka_bootstrap is not None:  # an empty value is an error, not unset
        flags["kafka"] = {"bootstrap_servers": kafka_bootstrap}
    try:
        settings = load_broker_settings(config, **flags)
    except ConfigError as exc:
        click.echo(f"infer-logger broker: config error: {exc}", err=True)
        sys.exit(2)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    count = _check(settings)  # a bad trigger file is exit 2 naming it, not uvicorn's exit 3 at startup
    if check:
        click.echo(f"ok: {count} triggers")
        return
    from pipelines.broker.server import serve

    click.echo(f"infer-logger broker: http://{settings.host}:{settings.port}/ ({settings.channel} channel, "
               f"{len(settings.trigger_files)} trigger files)", err=True)
    try:
        serve(settings, log_level="warning" if log_level != "debug" else "info")
    except InferLoggerError as exc:
        click.echo(f"infer-logger broker: {exc}", err=True)
        sys.exit(1)


def _check(settings: Any) -> int:
    """The number of triggers; exit 2 naming what is wrong in them."""
    from pipelines.broker.broker import Broker

    try:
        return Broker(settings).check()
    except ConfigError as exc:
        click.echo(f"infer-logger broker: {exc}", err=True)
        sys.exit(2)


@click.command("cesql", context_settings=_HELP)
@click.argument("expression")
@click.option("--event", "event_file", type=click.File("rb"),
              help="A JSON CloudEvent (or a JSON object of attributes) to evaluate against; - is stdin.")
def cesql_command(expression: str, event_file: Any) -> None:
    """Check a CESQL expression as a trigger loads it, and evaluate it against an event.

    An expression that begins with "-" goes after "--":

    \b
      infer-logger cesql -- '-1 < 0'

    \b
    Exit status:
      0  valid (and, with --event, the event matches as a trigger filter
         would take it: TRUE without errors)
      1  the event does not match
      2  invalid expression (syntax, or a function that does not exist) or event
    """
    from pipelines.broker.channel import TTL
    from pipelines.broker.filters import PASS, Delivered, FilterError, build_filter
    from pipelines.cesql import CesqlParseError, parse

    if not expression:  # as a trigger's `cesql: ""` loads: no filter (it was "invalid" here)
        if event_file is not None:
            _read_event(event_file)  # an event that does not read is refused all the same
        click.echo("valid (empty: no filter, every event passes)")
        if event_file is not None:
            click.echo("matches: yes")
        return
    try:
        parsed = parse(expression)
        loaded = build_filter({"cesql": expression}, ())  # as a trigger loads it: functions looked up too
    except CesqlParseError as exc:
        click.echo(f"invalid CESQL: {exc}", err=True)
        sys.exit(2)
    except FilterError as exc:
        click.echo(exc.reason, err=True)
        sys.exit(2)
    if event_file is None:
        click.echo("valid")
        return
    # As a trigger sees it: values as text, without the broker's TTL.
    attributes = Delivered(_read_event(event_file), TTL)
    value, errors = parsed.evaluate(attributes)
    click.echo(f"result: {_literal(value)}")
    for error in errors:
        where = "" if error.position is None else f" at position {error.position}"
        click.echo(f"error ({error.kind}){where}: {error.message}")
    matches = loaded(attributes) is PASS
    click.echo(f"matches: {'yes' if matches else 'no'}")
    sys.exit(0 if matches else 1)


def _read_event(stream: Any) -> dict[str, Any]:
    from infer_logger.cloudevents.json_format import from_dict

    try:
        data = orjson.loads(stream.read())
    except orjson.JSONDecodeError as exc:
        click.echo(f"--event: not JSON: {exc}", err=True)
        sys.exit(2)
    if not isinstance(data, dict):
        click.echo("--event: expected a JSON object (a CloudEvent)", err=True)
        sys.exit(2)
    if "specversion" not in data:  # a bare attribute mapping, as the CESQL TCK writes events
        return {k: v for k, v in data.items() if k not in ("data", "data_base64")}
    try:
        return dict(from_dict(data).attributes)
    except InvalidEventError as exc:
        click.echo(f"--event: not a valid CloudEvent: {exc}", err=True)
        sys.exit(2)


def _literal(value: object) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)


if __name__ == "__main__":
    broker_command()
