"""Where the shared conformance data is: `$INFER_LOGGER_CONFORMANCE`, else `../shared/conformance`.

Read in place, never copied into the repo. Module-level so parametrized tests can list cases at
collection time; tests that need it skip with `reason(...)` when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
ROOT = Path(os.environ.get("INFER_LOGGER_CONFORMANCE") or _REPO.parent / "shared" / "conformance")


def reason(subdir: str) -> str:
    return f"conformance data not found at {ROOT / subdir} (set INFER_LOGGER_CONFORMANCE)"
