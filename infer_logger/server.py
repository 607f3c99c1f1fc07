"""Running the sidecar under uvicorn (the only place that knows about the server)."""

from __future__ import annotations

import importlib.util
from typing import Any

import uvicorn

from infer_logger.config import Settings
from infer_logger.logger import InferenceLogger
from infer_logger.proxy import Proxy


def build_app(settings: Settings) -> Proxy:
    return Proxy(InferenceLogger(settings), settings.upstream, timeout=settings.timeout)


def uvicorn_config(app: Any, host: str, port: int, *, log_level: str = "warning") -> uvicorn.Config:
    # uvloop and httptools double uvicorn's throughput (DEPENDENCIES.md); fall back if absent.
    fast = importlib.util.find_spec("uvloop") is not None
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop" if fast else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        lifespan="on",
        log_level=log_level,
        access_log=False,
        # The sidecar answers for the predictor and reads no client address: no header rewriting.
        proxy_headers=False,
        # The predictor's own Date/Server headers pass through; don't add a second pair.
        server_header=False,
        date_header=False,
    )


def serve(settings: Settings, *, log_level: str = "warning") -> None:
    """Run until stopped; a failed start raises its cause (e.g. a sink's ConfigError)."""
    app = build_app(settings)
    try:
        uvicorn.Server(uvicorn_config(app, settings.host, settings.port, log_level=log_level)).run()
    except SystemExit:
        # uvicorn exits on a failed lifespan startup: give the CLI the reason instead.
        if app.startup_error is not None:
            raise app.startup_error from None
        raise
