"""Helpers shared by poolkit's asyncio tests: running a coroutine test, bounded polling,
and waiting for a poolkit.aio channel to have nothing in flight."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

import poolkit.aio
from poolkit.testing import EchoServers

# Every wait gives up after this long: generous for a loaded 2-core machine, short enough
# that a hang shows up as a clear failure rather than a pytest timeout.
WAIT_LIMIT = 5.0
_POLL_INTERVAL = 0.01

# A test that hangs is cut off here, inside its own event loop, so the failure names it.
_TEST_LIMIT = 60.0

# grpc servers cancel calls queued beyond their pending-request backlog (1,000 by default,
# 3,000 hard) before any handler sees them: tests that keep thousands of calls in flight
# raise it, so every failure they see is the client's.
BIG_BACKLOG: list[tuple[str, object]] = [
    ("grpc.server.max_pending_requests", 100_000),
    ("grpc.server.max_pending_requests_hard_limit", 100_000),
]


def aio_test(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an `async def` test in a fresh event loop (pytest sees a plain function with
    the same fixtures)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), _TEST_LIMIT))

    return run


async def eventually(condition: Callable[[], bool], what: str | Callable[[], str], limit: float = WAIT_LIMIT) -> None:
    """Poll `condition` until it holds; fail naming `what` if it does not within `limit` seconds."""
    for _ in range(int(limit / _POLL_INTERVAL)):
        if condition():
            return
        await asyncio.sleep(_POLL_INTERVAL)
    if not condition():
        message = what() if callable(what) else what
        raise AssertionError(f"still waiting after {limit} s for {message}")


async def settled(channel: grpc.aio.Channel) -> None:
    """Wait until a poolkit.aio channel has nothing in flight (grpc.aio's done-callback
    releases a call just after its outcome is visible). Plain grpc.aio channels cannot say."""
    if isinstance(channel, poolkit.aio.Channel):
        await eventually(
            lambda: channel.describe()["in_flight"] == 0,
            lambda: f"in-flight calls to return to 0: {channel.describe()}",
        )


def served(servers: EchoServers) -> int:
    """Echo calls the servers have started handling so far."""
    return sum(server.calls for server in servers)


async def until_served(servers: EchoServers, count: int) -> None:
    """Wait until the servers have started handling `count` calls: those calls are on the wire."""
    await eventually(
        lambda: served(servers) >= count, lambda: f"{count} calls to reach the servers ({served(servers)})"
    )
