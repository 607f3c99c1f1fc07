"""Fixtures of the explainer tests: a predictor process serving models trained on bundled data, and
explainer servers on uvicorn threads (free loopback ports)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from infer_logger.testing import free_port
from tests.servers import Process

# Without the explain extra (shap, pandas, scikit-learn) there is nothing to test here.
collect_ignore_glob = [] if importlib.util.find_spec("shap") else ["test_*.py"]
HAS_ALIBI = importlib.util.find_spec("alibi") is not None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "alibi" in item.keywords and not HAS_ALIBI:
            item.add_marker(pytest.mark.skip(reason="alibi is not installed (the `alibi` extra; see .venv-alibi)"))


@pytest.fixture(scope="session")
def model_server() -> Iterator[Process]:
    """iris (V1 labels, V2 probabilities), iris-proba, cancer (probabilities), diabetes, penguins."""
    port = free_port()
    proc = Process([sys.executable, "-m", "tests.explainers.models", "--port", str(port)], port).start(60)
    yield proc
    proc.stop()


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """An ASGI app on a uvicorn thread; yields its base URL."""
    from infer_logger.demo.quickstart import ServerThread
    from infer_logger.server import uvicorn_config

    port = free_port()
    with ServerThread(uvicorn_config(app, "127.0.0.1", port)):
        yield f"http://127.0.0.1:{port}"


def settings(**values: Any) -> Any:
    """Explainer settings for tests: small background, few samples, one retry."""
    from explainers.config import ExplainerSettings

    base: dict[str, Any] = {"options": {"background_size": 20}, "params": {}, "retries": 1, "timeout": 10.0,
                            "workers": 2, "port": 0}
    return ExplainerSettings(**{**base, **values})


async def refused_start(service: Any, error: type[Exception], match: str) -> None:
    """`service.start()` fails with `error` matching `match`; the service is closed either way."""
    try:
        with pytest.raises(error, match=match):
            await service.start()
    finally:
        await service.aclose()
