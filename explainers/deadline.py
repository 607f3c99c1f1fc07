"""The deadline of one explanation, checked by whatever its worker thread calls the model through."""

from __future__ import annotations

import time

from explainers.errors import ExplainTimeoutError


class Deadline:
    """`at` on the `time.monotonic()` clock; past it, `left()` raises `ExplainTimeoutError(message)`."""

    __slots__ = ("at", "message")

    def __init__(self, at: float, message: str) -> None:
        self.at, self.message = at, message

    def left(self) -> float:
        """Seconds left; ExplainTimeoutError once none are."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise ExplainTimeoutError(self.message)
        return left

    def end(self, message: str) -> None:
        """Brought forward to now (its request answered or gone): `left()` raises `message` from here
        on, and the work checking it stops at its next model call."""
        self.at, self.message = float("-inf"), message
