"""`infer-logger explainer`: the explainer server (register with `main.add_command(explainer_command)`).

Nothing heavy is imported until the command runs: `infer-logger --help` stays fast.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import click
import orjson

from infer_logger.errors import ConfigError

_HELP = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _pairs(values: tuple[str, ...], flag: str) -> dict[str, Any] | None:
    """KEY=VALUE pairs; values are JSON when they parse as JSON (100, true, "auto"), else text."""
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=flag)
        try:
            out[key] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            out[key] = raw
    return out or None


def _names(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@click.command("explainer", context_settings=_HELP)
@click.option("-c", "--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML settings (or a file with an `explainer:` section).")
@click.option("--host", help="Address to listen on.  [default: 127.0.0.1]")
@click.option("--port", type=int, help="Port to listen on.  [default: 9083]")
@click.option("--model-name", help="The model name served (/v1/models/<name>:explain).  [default: model]")
@click.option("--method", help="tree, kernel, linear, permutation, partition, auto; with the alibi extra: "
                               "anchor_tabular, alibi_kernel_shap, alibi_tree_shap.  [default: kernel]")
@click.option("--predictor-url", help="Black box: the predictor's base URL (KServe V1 or V2).")
@click.option("--predictor-model", help="The model's name at the predictor.  [default: --model-name]")
@click.option("--protocol", type=click.Choice(["v1", "v2"]), help="Predictor protocol.  [default: v2]")
@click.option("--binary-data/--no-binary-data", default=None,
              help="V2: send perturbations and get outputs as binary tensor data, not JSON numbers.  "
                   "[default: on]")
@click.option("--output", help="V2 output to explain.  [default: *proba*, else the first]")
@click.option("--model-file", type=click.Path(path_type=Path), help="White box: a joblib/pickle model file.")
@click.option("--background", help="dataset:NAME (iris, breast_cancer, wine, diabetes, penguins), or a "
                                   ".csv/.parquet/.npy/.joblib table.")
@click.option("--feature-names", help="Comma-separated feature names.")
@click.option("--categorical", help="Comma-separated names of string features.")
@click.option("--output-names", help="Comma-separated output (class) names.")
@click.option("--artifact", type=click.Path(path_type=Path), help="Load this fitted explainer instead of fitting.")
@click.option("--save-artifact", type=click.Path(path_type=Path), help="Save the fitted explainer here.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="Fit-time option. Repeatable.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Default explain parameter (requests may override). Repeatable.")
@click.option("--workers", type=int, help="Explain threads.  [default: 2]")
@click.option("--max-request-bytes", help="Refuse larger request bodies with 413.  [default: 64MiB]")
@click.option("--request-read-timeout", type=float,
              help="Seconds a request body may take to arrive whole before a 408.  [default: 60]")
@click.option("--explain-timeout", type=float,
              help="Seconds one explain request may take (queueing included); then 504.  [default: 60]")
@click.option("--max-samples", type=int,
              help="Cap of nsamples, max_evals and the like per request (400 above).  [default: 10000]")
@click.option("--max-instances", type=int,
              help="Rows one request may ask to explain (400 above, before they are converted).  [default: 1000]")
@click.option("--fit-only", is_flag=True, help="Fit, save --save-artifact, and exit without serving.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def explainer_command(config: Path | None, feature_names: str | None, categorical: str | None,
                      output_names: str | None, options: tuple[str, ...], params: tuple[str, ...], fit_only: bool,
                      log_level: str, **flags: Any) -> None:
    """Serve explanations of a model's predictions (KServe V1 `:explain`, V2 `/infer`), and explain
    inference events from a broker (`POST /events`).

    \b
    Black box:  infer-logger explainer --predictor-url http://127.0.0.1:8080 \\
                    --model-name iris --background dataset:iris --method kernel
    White box:  infer-logger explainer --model-file model.joblib \\
                    --background data.csv --method tree
    """
    from explainers.config import load_explainer_settings
    from explainers.errors import ExplainerError

    try:
        settings = load_explainer_settings(
            config, **flags, feature_names=_names(feature_names), categorical=_names(categorical),
            output_names=_names(output_names), options=_pairs(options, "--option"), params=_pairs(params, "--param"))
    except ConfigError as exc:
        click.echo(f"infer-logger explainer: config error: {exc}", err=True)
        sys.exit(2)
    if fit_only and settings.save_artifact is None:
        raise click.BadParameter("--fit-only needs --save-artifact", param_hint="--fit-only")
    _logging(log_level)
    from explainers.service import ExplainerService

    service = ExplainerService(settings)
    try:
        service.prepare()  # a file that does not load fails here, naming the path and the cause
        if fit_only:
            asyncio.run(_fit(service))
            click.echo(f"infer-logger explainer: saved {settings.save_artifact}", err=True)
            return
    except ExplainerError as exc:
        click.echo(f"infer-logger explainer: {exc}", err=True)
        sys.exit(2 if isinstance(exc, ConfigError) else 1)  # settings that do not fit the method or data: 2
    _serve(service, log_level)


async def _fit(service: Any) -> None:
    try:
        await service.start()
    finally:
        await service.aclose()


def _logging(level: str) -> None:
    # Other libraries' info is their working (shap logs each explanation's sums: 4 lines each, 300
    # a second at 80 explanations/s): theirs from WARNING, or at the level asked when that is debug
    # or error; ours at the level asked.
    logging.basicConfig(level=level.upper() if level in ("debug", "error") else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for ours in ("explainers", "infer_logger", "pipelines"):
        logging.getLogger(ours).setLevel(level.upper())


def _serve(service: Any, log_level: str) -> None:
    from explainers.app import create_app
    from infer_logger.server import GracefulServer, uvicorn_config

    s = service.settings
    click.echo(f"infer-logger explainer: http://{s.host}:{s.port}/v1/models/{s.model_name}:explain "
               f"({s.method}, {'white box' if s.model_file else s.predictor_url})", err=True)
    app = create_app(service)
    server = GracefulServer(uvicorn_config(app, s.host, s.port, log_level="warning" if log_level != "debug" else "info"))
    try:
        server.run()
    except SystemExit:  # uvicorn's own code (3) for any failed start
        if server.started:
            raise
    if not server.started:
        # The lifespan failed (fitting, warm-up) and it was logged. Settings only the predictor's
        # metadata refutes (a black box's features) are a config error, as those found before.
        sys.exit(2 if any(isinstance(exc, ConfigError) for exc in app.state.start_failures) else 1)
