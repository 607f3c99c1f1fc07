"""Scripts run in a process of their own under a file size limit: the kernel refuses a write past
it midway (EFBIG), as a full disk would (ENOSPC); the limit must not touch pytest's process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_PROLOGUE = """
import resource
_, _HARD = resource.getrlimit(resource.RLIMIT_FSIZE)

def limit(size):
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, _HARD))

def unlimit():
    resource.setrlimit(resource.RLIMIT_FSIZE, (_HARD, _HARD))
"""


def run_limited(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`script` (which may call `limit(bytes)` and `unlimit()`) with `args` as sys.argv[1:]."""
    return subprocess.run([sys.executable, "-c", _PROLOGUE + script, *args], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parents[1], check=False)


def cut_short_then_again(setup: str, call: str, *args: str, size: int = 4096) -> subprocess.CompletedProcess[str]:
    """`setup`, then `call` under a `size`-byte limit (printing "failed" if it raised OSError),
    then `call` again without it: what a retry does after a full disk."""
    script = f"{setup}\nlimit({size})\ntry:\n    {call}\nexcept OSError:\n    print('failed')\nunlimit()\n{call}\n"
    return run_limited(script, *args)
