"""Small helpers shared by poolkit's tests: a fake clock and bounded waiting."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# Every wait in the suite gives up after this long: generous for a loaded CI machine,
# short enough that a hang shows up as a clear failure rather than a pytest timeout.
WAIT_LIMIT = 5.0
_POLL_INTERVAL = 0.002


class FakeClock:
    """A clock that moves only when told to: pass it as `clock=`."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_until(condition: Callable[[], bool], what: str | Callable[[], str], limit: float = WAIT_LIMIT) -> None:
    """Poll `condition` until it holds; fail naming `what` if it does not within `limit` seconds."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            message = what() if callable(what) else what
            raise AssertionError(f"still waiting after {limit} s for {message}")
        time.sleep(_POLL_INTERVAL)


def wait_for_idle(channel: Any) -> None:
    """Wait until a poolkit channel has nothing in flight (futures and streams release it
    from grpc's completion callback, just after their outcome becomes visible)."""
    wait_until(
        lambda: channel.describe()["in_flight"] == 0,
        lambda: f"in-flight to return to 0: {channel.describe()}",
    )
