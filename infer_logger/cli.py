"""`infer-logger`: the command line. The only module that reads argv."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from infer_logger.errors import ConfigError, InferLoggerError, StoreBusyError

if TYPE_CHECKING:
    from infer_logger.store import AuditStore

_HELP = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
_SQLITE_INT_MAX = 2**63 - 1  # a larger number cannot be bound as a query parameter

# Commands of the other packages, imported only when named: the sidecar package must not pull
# in the broker or the explain stack (DESIGN.md: imports go one way).
_LAZY = {
    "broker": ("pipelines.broker.cli", "broker_command"),
    "cesql": ("pipelines.broker.cli", "cesql_command"),
    "explainer": ("explainers.cli", "explainer_command"),
    "ingest": ("pipelines.sources.cli", "ingest_command"),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *_LAZY])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in _LAZY:
            module, attribute = _LAZY[name]
            command: click.Command = getattr(importlib.import_module(module), attribute)
            return command
        return super().get_command(ctx, name)


def _settings(config: Path | None, **flags: Any) -> Any:
    from infer_logger.config import load_settings

    try:
        return load_settings(config, **flags)
    except ConfigError as exc:
        click.echo(f"infer-logger: config error: {exc}", err=True)
        sys.exit(2)


@click.group(cls=_LazyGroup, context_settings=_HELP)
@click.version_option(package_name="infer-logger")
def main() -> None:
    """Log every prediction: a sidecar in front of your model server, an embedded audit store,
    and CloudEvents to the sinks you choose.

    \b
    Start here:   infer-logger quickstart
    Run it:       infer-logger proxy --component-port 8080 --port 9081
    Look back:    infer-logger query --model iris --status 200
    """


@main.command(context_settings=_HELP)
@click.option("-c", "--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML settings file (flags and INFER_LOGGER_* env vars override it).")
@click.option("--host", help="Address to listen on.  [default: 127.0.0.1]")
@click.option("--port", type=int, help="Port to listen on.  [default: 9081]")
@click.option("--component-port", type=int, help="Predictor port on localhost.  [default: 8080]")
@click.option("--predictor-url", help="Predictor base URL (instead of --component-port).")
@click.option("--log-url", multiple=True,
              help="Sink by URL: http(s)://… (CloudEvents over HTTP), file://….jsonl, sqlite://….db. "
                   "Repeatable. [default: the embedded store]")
@click.option("--log-mode", type=click.Choice(["all", "request", "response"]),
              help="Which events to log.  [default: all]")
@click.option("--source-uri", help="CloudEvents source, a URI reference.  [default: the sidecar's URL]")
@click.option("--inference-service", help="InferenceService name (inferenceservicename).")
@click.option("--namespace", help="Namespace attribute.")
@click.option("--component", help="Component attribute.  [default: predictor]")
@click.option("--endpoint", help="Endpoint attribute (e.g. default, canary).")
@click.option("--metadata-headers", multiple=True,
              help="Comma-separated request headers to copy into `metadata`. Repeatable.")
@click.option("--annotation", "annotations", multiple=True, metavar="KEY=VALUE",
              help="Adds to the `annotations` attribute (JSON). Repeatable.")
@click.option("--metadata-annotations", multiple=True, metavar="KEY=VALUE,…",
              help="Comma-separated KEY=VALUE pairs, as --annotation (KServe's agent flag). Repeatable.")
@click.option("--logger-tls-skip-verify", "log_tls_skip_verify", type=click.BOOL, is_flag=False, flag_value=True,
              default=None, metavar="BOOL",
              help="https --log-url sinks take any certificate (KServe's agent flag).  [default: false]")
@click.option("--logger-ca-cert-file", "log_ca_cert_file", metavar="FILE",
              help="PEM CAs the https --log-url sinks trust (KServe's agent flag); a missing file leaves "
                   "the system's.")
@click.option("--max-payload-bytes", help="Log payloads cut to this size.  [default: 900KiB]")
@click.option("--max-request-bytes", help="Refuse larger request bodies with 413.  [default: 256MiB]")
@click.option("--timeout", type=float, help="Seconds to wait for the predictor.  [default: 60]")
@click.option("--request-read-timeout", type=float,
              help="Seconds a request may take to arrive whole before a 408.  [default: 60]")
@click.option("--spool-dir", type=click.Path(),
              help="Spool directory, where events wait for their sinks.  [default: infer-logger-data/spool]")
@click.option("--durability", type=click.Choice(["disk", "memory"]),
              help="disk: survives kill -9 (default); memory: faster, loses unsent events on restart.")
@click.option("--delivery", type=click.Choice(["process", "inline"]),
              help="process: sinks run in a child process (default with disk durability); inline: in the sidecar.")
@click.option("--server", type=click.Choice(["httptools", "uvicorn"]),
              help="httptools: the sidecar's own HTTP/1.1 server (default, fastest); uvicorn: an ASGI server.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def proxy(config: Path | None, metadata_headers: tuple[str, ...], annotations: tuple[str, ...],
          metadata_annotations: tuple[str, ...], spool_dir: str | None,
          durability: str | None, delivery: str | None, log_level: str, **flags: Any) -> None:
    """Run the logger sidecar in front of a predictor (KServe V1 and V2 / Open Inference Protocol).

    Accepts KServe's agent flags, so it can stand in for KServe's logger.
    """
    from infer_logger.server import serve

    if metadata_headers:
        # Every occurrence, each comma-split: as KServe's agent takes it (a pflag StringSlice).
        flags["metadata_headers"] = [h.strip() for given in metadata_headers for h in given.split(",") if h.strip()]
    flags["log_url"] = list(flags["log_url"]) or None
    # KServe joins the pairs with commas (an empty value when no annotation was found).
    pairs = [(p.strip(), "--metadata-annotations") for m in metadata_annotations for p in m.split(",")]
    pairs = [(p, hint) for p, hint in pairs if p] + [(a, "--annotation") for a in annotations]
    if pairs:
        if bad := [(p, hint) for p, hint in pairs if "=" not in p]:
            raise click.BadParameter(f"{bad[0][0]!r} is not KEY=VALUE", param_hint=bad[0][1])
        flags["annotations"] = dict(p.split("=", 1) for p, _ in pairs)
    # Sources are deep-merged: these two keys override only themselves in the spool section.
    spool = {k: v for k, v in (("dir", spool_dir), ("durability", durability)) if v is not None}
    settings = _settings(config, **flags, spool=spool or None, delivery={"mode": delivery} if delivery else None)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sinks = ", ".join(f"{s.sink_name} ({s.type})" for s in settings.all_sinks())
    click.echo(f"infer-logger: {settings.url.rstrip('/')} -> {settings.upstream}; sinks: {sinks}", err=True)
    if settings.log_ca_cert_file and not Path(settings.log_ca_cert_file).is_file():
        click.echo(f"infer-logger: {settings.log_ca_cert_file} is not a file: https sinks trust the system's CAs",
                   err=True)
    try:
        serve(settings, log_level="warning" if log_level != "debug" else "info")
    except ConfigError as exc:  # e.g. a sink's client refused its settings when built
        click.echo(f"infer-logger: config error: {exc}", err=True)
        sys.exit(2)
    except InferLoggerError as exc:
        click.echo(f"infer-logger: {exc}", err=True)
        sys.exit(1)


def _time(value: str | None, name: str) -> datetime | None:
    from infer_logger import events

    if value is None:
        return None
    # As the store reads times (RFC 3339's lower-case t and z too); without an offset, UTC.
    moment = events.as_utc(value)
    if moment is None:  # no time, or one at either end of the calendar with no UTC form
        raise click.BadParameter(f"{value!r} is not an ISO-8601 time with a UTC form", param_hint=name)
    return moment


@main.command(context_settings=_HELP)
@click.option("-c", "--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The proxy's YAML settings: the store is its `store` sink's file (INFER_LOGGER_* apply too).")
# Taken as text: Path("") is ".", which SQLite opened and answered "disk I/O error".
@click.option("--db", type=click.Path(dir_okay=False),
              help="The store's SQLite file.  [default: the configured store sink's, else "
                   "infer-logger-data/audit.db]")
@click.option("--id", "id_", help="One prediction's id (x-request-id / ce-id).")
@click.option("--model", help="Model name.")
@click.option("--since", help="From this time, inclusive (ISO-8601 / RFC 3339, e.g. 2026-11-25T10:00:00Z; "
                              "without an offset, UTC).")
@click.option("--until", help="Up to this time, exclusive (as --since).")
@click.option("--status", type=click.IntRange(0, 999), help="HTTP status of the prediction.")
@click.option("--limit", type=click.IntRange(1, _SQLITE_INT_MAX),
              help="Rows to show at most (a row per instance of a prediction), newest first; stderr says "
                   "when more matched.  [default: 20; all with --id]")
@click.option("--page", "page", metavar="TOKEN",
              help="Begin where the page before ended: the token stderr gives when more matched (the same "
                   "filters), unmoved by rows written since.")
@click.option("--offset", type=click.IntRange(0, _SQLITE_INT_MAX), default=0, show_default=True,
              help="Rows to skip first, in the same order: --offset 20 shows the page after --limit 20's "
                   "(while a sidecar writes, rows move: --page does not).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def query(config: Path | None, db: str | None, id_: str | None, model: str | None, since: str | None,
          until: str | None, status: int | None, limit: int | None, page: str | None, offset: int,
          fmt: str) -> None:
    """Read audit records (request, response and explanation joined) from the embedded store."""
    from infer_logger.store import AuditStore

    for value, flag in ((id_, "--id"), (model, "--model")):
        if value is not None:
            _text(value, flag)
    if limit is None and id_ is None:
        limit = 20
    filters: dict[str, Any] = {"id": id_, "model": model, "since": _time(since, "--since"),
                               "until": _time(until, "--until"), "status": status, "start": page}
    if db == "":
        raise click.BadParameter("an empty path names no file", param_hint="--db")
    path = _store_path(_settings(config)) if db is None else Path(db)
    try:
        exists, regular = path.exists(), path.is_file()
    except OSError as exc:  # a name too long, a directory not ours to look in
        raise click.BadParameter(f"{path}: {exc.strerror or exc}", param_hint="--db") from None
    if not exists:
        raise click.BadParameter(f"{path} does not exist (run the proxy or the quickstart first)",
                                 param_hint="--db")
    if not regular:  # a FIFO blocked in open() for good
        raise click.BadParameter(f"{path} is not a regular file", param_hint="--db")
    try:
        store = AuditStore(path, readonly=True)
    except StoreBusyError as exc:  # not the path's fault: another exit code than a usage error's
        click.echo(f"infer-logger: {exc}; try again", err=True)
        sys.exit(1)
    except InferLoggerError as exc:  # not an SQLite file, or a newer schema
        raise click.BadParameter(str(exc), param_hint="--db") from None
    if page is not None:
        try:
            store.check_page_token(page)
        except ValueError as exc:
            store.close()
            raise click.BadParameter(str(exc), param_hint="--page") from None
    # Made into a file (on disk past 8 MiB), then written out: a read transaction held while the
    # output waited on a pager (`| less`) kept the sidecar's WAL from being reset, growing for good.
    # With no room for it (a full or small TMPDIR), written out as made instead.
    made = tempfile.SpooledTemporaryFile(max_size=8 << 20, mode="w+", encoding="utf-8", errors="surrogatepass")
    try:
        try:
            next_page = _rows(store, fmt, filters, limit, offset, made.write)
            made.flush()  # its last bytes, buffered, find no room only now
        except OSError:  # no room for it (reading the store raises no OSError)
            with contextlib.suppress(OSError):  # what it could not write, tried again
                made.close()
            next_page = _rows(store, fmt, filters, limit, offset, _out)
    except InferLoggerError as exc:  # damaged past what opening it read
        click.echo(f"infer-logger: {exc}", err=True)
        sys.exit(1)
    finally:
        store.close()
    if not made.closed:
        with made:
            made.seek(0)
            _echo(iter(lambda: made.read(1 << 16), ""))
    else:
        _echo([])
    if next_page is not None:
        click.echo(f"infer-logger: more rows match: --page {next_page} shows the next ones "
                   "(or raise --limit)", err=True)


def _rows(store: AuditStore, fmt: str, filters: dict[str, Any], limit: int | None, offset: int,
          write: Callable[[str], object]) -> str | None:
    """The rows, written; the token of the next page when more match. In one read transaction:
    the table's two passes, and the look past the limit, see the same rows."""
    from infer_logger.store import json_chunks, table_lines, table_widths

    with store.snapshot():
        if fmt == "json":
            for chunk in json_chunks(store.records(**filters, limit=limit, offset=offset)):
                write(chunk)
        else:
            widths = table_widths(store.records(**filters, limit=limit, offset=offset, payloads=False))
            for n, line in enumerate(table_lines(store.records(**filters, limit=limit, offset=offset), widths)):
                write(("\n" if n else "") + line)
        if limit is not None and offset + limit <= _SQLITE_INT_MAX:
            return store.page_token(**filters, offset=offset + limit)
    return None


def _echo(chunks: Iterable[str]) -> None:
    """Written out, and a newline."""
    for chunk in chunks:
        _out(chunk)
    _out("\n")
    try:
        if sys.stdout is not None:  # None: started with stdout closed (`>&-`), which click.echo skips
            sys.stdout.flush()
    except OSError as exc:
        _gone(exc)


def _out(text: str) -> None:
    """To stdout; a reader gone (`| head`) ends the command quietly."""
    try:
        click.echo(text, nl=False)
    except OSError as exc:
        _gone(exc)


def _gone(exc: OSError) -> None:
    if not isinstance(exc, BrokenPipeError):  # a full disk (`> out.json`): said, not a traceback
        click.echo(f"infer-logger: cannot write the output: {exc.strerror or exc}", err=True)
    # What is still buffered would fail again at exit ("Exception ignored"): to nowhere.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)


def _text(value: str, flag: str) -> None:
    """Bytes not UTF-8 in an argument reach Python as lone surrogates, which no text column
    holds: binding one raised UnicodeEncodeError (a traceback)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise click.BadParameter(f"{value.encode(errors='surrogateescape')!r} is not UTF-8 text",
                                 param_hint=flag) from None


def _store_path(settings: Any) -> Path:
    """The file of the first `store` sink the proxy would run with these settings (the embedded
    default when none are configured); one without a store sink needs --db."""
    stores = [sink.path for sink in settings.all_sinks() if sink.type == "store"]
    if not stores:
        raise click.UsageError("the configured sinks have no store: name its file with --db")
    return Path(stores[0])


@main.command(context_settings=_HELP)
@click.option("--requests", "n_requests", type=click.IntRange(min=1), default=300, show_default=True,
              help="How many predictions to send.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("infer-logger-data/quickstart"), show_default=True,
              help="Where the store, spool and event log go: a new or empty directory, or one an earlier "
                   "quickstart made (what that run left is replaced).")
def quickstart(n_requests: int, workdir: Path) -> None:
    """Train a small model, serve it behind the sidecar, send traffic, and show the audit log.

    Needs no external server: the predictor, the sidecar and the store all run here.
    """
    try:
        from infer_logger.demo.quickstart import run
    except ImportError as exc:
        raise click.ClickException(
            f"the quickstart needs the demo extra ({exc.name} is missing): pip install 'infer-logger[demo]'"
        ) from None
    try:
        run(n_requests=n_requests, workdir=workdir)
    except ConfigError as exc:  # it reads no settings: one is a bug here, but a line, not a traceback
        click.echo(f"infer-logger: config error: {exc}", err=True)
        sys.exit(2)


@main.group(context_settings=_HELP)
def setup() -> None:
    """Prepare external systems (index templates, …) for the sinks."""


@setup.command("elasticsearch", context_settings=_HELP)
@click.option("--url", default="http://localhost:9200", show_default=True, help="Elasticsearch URL.")
@click.option("--index", help="The sink's `index` setting, whose prefix the template matches.  "
                              "[default: inference-log-{namespace}-{inferenceservicename}]")
@click.option("--template-name", help="The sink's `template_name` setting.  [default: the index's prefix]")
@click.option("--keep/--overwrite", default=False, show_default=True,
              help="Keep an existing template of another version instead of replacing it.")
@click.option("--force", is_flag=True,
              help="Replace a template of that name that infer-logger did not make (refused otherwise).")
@click.option("--api-key", envvar="INFER_LOGGER_ES_API_KEY", help="An encoded API key (the sink's `api_key`; "
              "or env INFER_LOGGER_ES_API_KEY). Basic auth: user:password@ in the URL.")
@click.option("--ca-certs", help="A CA bundle file for an https URL's certificate (the sink's `ca_certs`).")
@click.option("--verify-certs/--no-verify-certs", default=True, show_default=True,
              help="Check an https URL's certificate.")
def setup_elasticsearch_command(url: str, index: str | None, template_name: str | None, keep: bool,
                                force: bool, api_key: str | None, ca_certs: str | None, verify_certs: bool) -> None:
    """Install the index template a sink with these settings uses (explicit mappings for the
    audit record): `inference-log` for `inference-log-*` by default. A template of that name
    that is not infer-logger's is left alone (exit 1) unless --force. Exit 1 too when another
    template of higher priority matches the sink's indices (named): only the highest-priority
    match applies, so they would get its mappings, not these."""
    from pydantic import ValidationError

    from infer_logger.config import config_error
    from infer_logger.sinks.elasticsearch import ElasticsearchSinkConfig, setup_elasticsearch

    # Elasticsearch 8 serves https with its own CA and needs credentials by default.
    given = {"index": index, "template_name": template_name, "api_key": api_key, "ca_certs": ca_certs,
             "verify_certs": None if verify_certs else False}
    try:
        config = ElasticsearchSinkConfig(url=url, **{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        click.echo(f"infer-logger: config error: {config_error(exc)}", err=True)
        sys.exit(2)
    try:
        for line in setup_elasticsearch(config, overwrite=not keep, force=force):
            click.echo(line)
    except ConfigError as exc:
        click.echo(f"infer-logger: config error: {exc}", err=True)
        sys.exit(2)
    except InferLoggerError as exc:
        click.echo(f"infer-logger: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
