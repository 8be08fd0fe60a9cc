"""An asyncio event loop in a thread of its own, so a blocking test can drive poolkit.aio:
the channel, its calls and their tasks live on the loop; the test's thread submits to it."""

from __future__ import annotations

import asyncio
import os
import threading
import traceback
from collections.abc import Coroutine, Iterable
from concurrent.futures import Future
from typing import Any

import grpc.aio

import poolkit

_POOLKIT_DIR = os.path.dirname(poolkit.__file__)


class LoopThread:
    """A running event loop; `stop` closes what the test opened and fails the test if
    poolkit's own code left an exception unhandled on the loop."""

    def __init__(self, name: str, limit: float) -> None:
        self.limit = limit  # the longest wait for anything submitted, unless told otherwise
        self._loop = asyncio.new_event_loop()
        # What nobody awaited (a background task's exception, say) ends up here.
        self.errors: list[dict[str, Any]] = []
        self._loop.set_exception_handler(lambda _, context: self.errors.append(context))
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coroutine: Coroutine[Any, Any, Any]) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def run(self, coroutine: Coroutine[Any, Any, Any], limit: float | None = None) -> Any:
        return self.submit(coroutine).result(timeout=self.limit if limit is None else limit)

    def stop(self, channels: Iterable[grpc.aio.Channel]) -> None:
        """Close `channels`, cancel every task left, stop the loop and check its errors."""
        try:
            for channel in channels:
                self.run(channel.close())
            self.run(_cancel_other_tasks())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(self.limit)
            if not self._thread.is_alive():
                self._loop.close()
        # grpc.aio's own poller reports "Event loop is closed" when a test's fresh loop
        # follows a closed one; only what poolkit's code left unhandled counts here.
        ours = [context for context in self.errors if _from_poolkit(context)]
        assert not ours, f"unhandled errors on the event loop: {ours}"


def _from_poolkit(context: dict[str, Any]) -> bool:
    """Whether an event loop error came from poolkit's code (a task or a frame of it)."""
    error = context.get("exception")
    frames = traceback.extract_tb(error.__traceback__) if isinstance(error, BaseException) else []
    if any(frame.filename.startswith(_POOLKIT_DIR) for frame in frames):
        return True
    return any("poolkit" in repr(context.get(key)) for key in ("task", "future"))


async def _cancel_other_tasks() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
