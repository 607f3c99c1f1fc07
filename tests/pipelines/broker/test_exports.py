"""The package's public names resolve (they are imported lazily)."""

from __future__ import annotations

import pipelines.broker


def test_every_export_resolves() -> None:
    for name in pipelines.broker.__all__:
        assert getattr(pipelines.broker, name) is not None, name


def test_all_lists_exactly_the_exports() -> None:
    assert sorted(pipelines.broker.__all__) == sorted(pipelines.broker._EXPORTS)
