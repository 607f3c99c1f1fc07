"""A smoke run of benchmarks/store_write.py: it reaches into the store's internals (the exchange
rows and their columns), so a change there must not leave it broken unnoticed."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def store_write(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import store_write

    yield store_write
    sys.modules.pop("store_write", None)


def test_small_run_reports_every_side(
    store_write: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "store.json"
    assert store_write.main(["--exchanges", "1000", "--rounds", "1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures["cpu_us_per_exchange"]) == {"spool", "store", "store-v4", "insert"}
    assert all(len(v) == 1 and v[0] > 0 for v in figures["cpu_us_per_exchange"].values())
    assert "store / (spool + insert)" in capsys.readouterr().out


def test_bad_option_names_the_range(store_write: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        store_write.main(["--exchanges", "5"])
    assert "--exchanges [1000, 1000000]" in capsys.readouterr().err
