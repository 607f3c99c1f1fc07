"""`SizeLimit`: how large a request a receiver takes, learned from its 413s.

A sink that cuts batches into requests (`_bulk`s, batch POSTs) at a configured size may meet a
lower limit on the way: a front such as nginx (`client_max_body_size`, 1 MiB by default) or the
receiver's own. Sent at the configured size, every batch was refused again and went in halves.
A 413 lowers the limit to half the refused request's size (below a request of one item), so later
requests fit; since a 413 may also be a receiver's limit per item (our broker's per-event one),
not per request, the configured size comes back after `forget_after` seconds without a 413.
"""

from __future__ import annotations

import time


class SizeLimit:
    def __init__(self, configured: int, *, forget_after: float = 300.0) -> None:
        self.configured = configured
        self.forget_after = forget_after
        self._lowered: int | None = None
        self._since = 0.0

    def __call__(self) -> int:
        """The size to cut requests at now."""
        if self._lowered is not None and time.monotonic() - self._since > self.forget_after:
            self._lowered = None
        return self.configured if self._lowered is None else self._lowered

    def refused(self, size: int, items: int) -> int | None:
        """A request of `size` bytes holding `items` items was answered 413: the new, lower limit,
        or None when it already was at most that."""
        lower = max(1, size // 2 if items > 1 else size - 1)
        if lower >= self():
            return None  # a 413 that lowers nothing keeps nothing longer (one item over a per-item limit)
        self._lowered, self._since = lower, time.monotonic()
        return lower
