"""Which calls the logger logs, read off the method and path as KServe's routes read them."""

from __future__ import annotations

import pytest

from infer_logger.logger import Route, match_route


@pytest.mark.parametrize(("path", "route"), [
    ("/v1/models/iris:predict", Route("v1", "iris", None, "predict")),
    ("/v1/models/iris:explain", Route("v1", "iris", None, "explain")),
    # Starlette's {model_name}:predict takes the last colon: KServe serves model "ns:iris" (it
    # was proxied unlogged).
    ("/v1/models/ns:iris:predict", Route("v1", "ns:iris", None, "predict")),
    ("/v2/models/iris/infer", Route("v2", "iris", None, "infer")),
    ("/v2/models/iris/versions/2/infer", Route("v2", "iris", "2", "infer")),
    ("/v2/models/ns:iris/infer", Route("v2", "ns:iris", None, "infer")),
])
def test_logged_routes(path: str, route: Route) -> None:
    assert match_route("POST", path) == route


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/models/iris:predict"),
    ("POST", "/v1/models/iris"),
    ("POST", "/v1/models/:predict"),
    ("POST", "/v1/models/a/b:predict"),
    ("POST", "/v1/models/iris:predict/x"),
    ("POST", "/v2/models/iris/ready"),
    ("POST", "/healthz"),
    # `$` matched before a last newline: /v1/models/echo:predict%0A, another path, logged as echo's
    ("POST", "/v1/models/echo:predict\n"),
    ("POST", "/v2/models/echo/infer\n"),
])
def test_unlogged(method: str, path: str) -> None:
    assert match_route(method, path) is None
