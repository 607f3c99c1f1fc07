"""Running a broker under uvicorn: in the foreground (`serve`) or on a thread (`BrokerThread`)."""

from __future__ import annotations

import threading
import time

import uvicorn

from infer_logger.errors import InferLoggerError
from infer_logger.server import GracefulServer, uvicorn_config
from pipelines.broker.broker import Broker
from pipelines.broker.settings import BrokerSettings


def config(broker: Broker, host: str, port: int, *, log_level: str = "warning") -> uvicorn.Config:
    cfg = uvicorn_config(broker, host, port, log_level=log_level)
    cfg.proxy_headers = False  # X-Forwarded-* mean nothing to a broker; the middleware costs per event
    return cfg


def serve(settings: BrokerSettings, *, log_level: str = "warning") -> None:
    """Serve until SIGINT/SIGTERM; SIGHUP reloads the trigger files."""
    broker = Broker(settings, reload_on_sighup=True)
    server = GracefulServer(config(broker, settings.host, settings.port, log_level=log_level))
    try:
        server.run()
    except SystemExit:  # uvicorn's exit (3, or 1) for a port it cannot bind, or a failed startup
        if server.started:
            raise
        raise InferLoggerError(f"did not start on {settings.host}:{settings.port} (the reason is logged above)") from None


class BrokerThread:
    """A broker served on a background thread (its own event loop), e.g. for a quickstart:

        with BrokerThread(Broker(settings, triggers=yaml_text)) as running:
            httpx.post(running.url, ...)
    """

    def __init__(self, broker: Broker, host: str | None = None, port: int | None = None) -> None:
        self.broker = broker
        self.host = host or broker.settings.host
        self.port = port if port is not None else broker.settings.port
        self.url = f"http://{self.host}:{self.port}/"
        self._server = uvicorn.Server(config(broker, self.host, self.port))
        self._thread = threading.Thread(target=self._server.run, name="broker", daemon=True)

    def start(self, timeout: float = 30.0) -> BrokerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self._server.should_exit = True
                raise RuntimeError(f"the broker did not start on {self.host}:{self.port} (see the log)")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> BrokerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
