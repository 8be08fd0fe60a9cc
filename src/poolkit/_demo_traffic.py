"""Load for the demo: `concurrency` workers making one call over and over, for a while
or a number of calls, counting successes, failures and latencies as they go.

`Load` runs the workers as threads making sync calls; `AsyncLoad` as asyncio tasks on an
event loop in another thread (an `EventLoopThread`). Both count the same way and are
read the same way: `snapshot()` while running, `result()` once over.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import threading
import time
from array import array
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Self, TypeVar

import grpc

Call = Callable[[], object]
"""One request, made synchronously; raises `grpc.RpcError` when the call fails."""

CallFactory = Callable[[int], Call]
"""Given a worker's index, the call that worker makes over and over."""

AsyncCall = Callable[[], Awaitable[object]]
"""One request, made on an event loop; awaiting it raises `grpc.RpcError` when the call fails."""

AsyncCallFactory = Callable[[int], AsyncCall]
"""Given a task's index, the call that task makes over and over."""

T = TypeVar("T")

CALL_TIMEOUT = 10.0
"""Deadline of every demo call, so a stuck server cannot hold a worker past its run."""

LOOP_TIMEOUT = 5.0
"""How long the main thread waits for the asyncio run's event loop to start, to open or
close the channel, or to stop: each takes milliseconds, so a loop still busy is stuck."""


class _Tally:
    """One worker's share of the calls and its counts. Only its worker writes the counts;
    readers see a recent value."""

    __slots__ = ("calls", "errors", "first_error", "latencies", "quota")

    def __init__(self, quota: int) -> None:
        self.quota = quota  # calls this worker may make at most
        self.calls = 0
        self.errors = 0
        self.first_error: str | None = None
        self.latencies = array("d")  # seconds, successful calls only

    def record(self, started: float, error: grpc.RpcError | None) -> None:
        """Count a call that began at `started` (`time.monotonic`) and has just ended: its
        latency if it succeeded, else its error."""
        if error is None:
            self.latencies.append(time.monotonic() - started)
        else:
            self.errors += 1
            if self.first_error is None:
                self.first_error = _describe_error(error)
        self.calls += 1


@dataclass(frozen=True)
class LoadSnapshot:
    elapsed: float
    calls: int
    errors: int


@dataclass(frozen=True)
class LoadResult:
    calls: int
    errors: int
    elapsed: float
    latencies: Sequence[float]  # successful calls, sorted, seconds
    first_error: str | None

    @property
    def rate(self) -> float:
        return self.calls / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, fraction: float) -> float | None:
        """Nearest-rank percentile of successful calls' latency, None if none succeeded."""
        if not self.latencies:
            return None
        rank = max(1, math.ceil(fraction * len(self.latencies)))
        return self.latencies[rank - 1]


class BaseLoad:
    """`concurrency` workers, each making its call back to back until `duration` seconds
    have passed or `max_calls` calls (over all workers) have been made, whichever is first.

    `Load` runs the workers as threads and `AsyncLoad` as asyncio tasks; what they share
    is here: when each call may start, counting it, and waiting, stopping and reporting.
    Each worker owns its counters, so the call path takes no lock; the calls are split
    evenly between workers up front for the same reason.
    """

    def __init__(self, *, concurrency: int, duration: float, max_calls: int) -> None:
        self.duration = duration
        self._stop = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._running = concurrency
        self._crash: BaseException | None = None
        self._tallies = [
            _Tally(max_calls // concurrency + (1 if i < max_calls % concurrency else 0)) for i in range(concurrency)
        ]
        self.started = time.monotonic()  # when the load began, on the `time.monotonic` clock
        self._ended: float | None = None
        self._deadline = self.started + duration

    def _turns(self, tally: _Tally) -> Iterator[float]:
        """When each of a worker's calls starts, while it has quota left, the deadline has
        not passed and nobody asked the load to stop."""
        clock = time.monotonic
        deadline = self._deadline
        stop = self._stop
        for _ in range(tally.quota):
            started = clock()
            if started >= deadline or stop.is_set():
                return
            yield started

    @contextlib.contextmanager
    def _worker(self) -> Iterator[None]:
        """Around one worker's whole run: a crash stops the others and is kept for
        `result()`; the last worker to end marks the load over."""
        try:
            yield
        except BaseException as error:  # noqa: BLE001 - handed to the main thread by result()
            self._crash = error
            self._stop.set()
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    self._ended = time.monotonic()
                    self._done.set()

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every worker to finish; True if they have."""
        return self._done.wait(timeout)

    def stop(self, timeout: float = CALL_TIMEOUT + 1) -> None:
        """Ask the workers to stop after their current call and wait up to `timeout`."""
        self._stop.set()
        self._done.wait(timeout)

    @property
    def elapsed(self) -> float:
        return (self._ended or time.monotonic()) - self.started

    def snapshot(self) -> LoadSnapshot:
        tallies = self._tallies
        return LoadSnapshot(self.elapsed, sum(t.calls for t in tallies), sum(t.errors for t in tallies))

    def result(self) -> LoadResult:
        """The finished run's figures (call after `wait` returned True or `stop`)."""
        if self._crash is not None:
            raise self._crash
        tallies = self._tallies
        latencies = sorted(itertools.chain.from_iterable(t.latencies for t in tallies))
        first_error = next((t.first_error for t in tallies if t.first_error), None)
        snapshot = self.snapshot()
        return LoadResult(snapshot.calls, snapshot.errors, snapshot.elapsed, latencies, first_error)


class Load(BaseLoad):
    """The workers are threads making sync calls."""

    def __init__(self, make_call: CallFactory, *, concurrency: int, duration: float, max_calls: int) -> None:
        super().__init__(concurrency=concurrency, duration=duration, max_calls=max_calls)
        self._threads = [
            threading.Thread(
                target=self._work,
                args=(make_call(i), tally),
                name=f"poolkit-demo-{i}",
                daemon=True,  # a call stuck past its deadline must not keep the process alive
            )
            for i, tally in enumerate(self._tallies)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self, call: Call, tally: _Tally) -> None:
        with self._worker():
            for started in self._turns(tally):
                try:
                    call()
                except grpc.RpcError as error:
                    tally.record(started, error)
                else:
                    tally.record(started, None)


class AsyncLoad(BaseLoad):
    """The workers are asyncio tasks on `loop`, an event loop running in another thread
    (an `EventLoopThread`), awaiting calls made on that loop."""

    def __init__(
        self,
        make_call: AsyncCallFactory,
        *,
        loop: asyncio.AbstractEventLoop,
        concurrency: int,
        duration: float,
        max_calls: int,
    ) -> None:
        super().__init__(concurrency=concurrency, duration=duration, max_calls=max_calls)
        calls = [make_call(i) for i in range(concurrency)]
        # Kept: through it the tasks stay referenced, which the loop alone does not ensure.
        self._tasks = asyncio.run_coroutine_threadsafe(self._work_all(calls), loop)

    async def _work_all(self, calls: list[AsyncCall]) -> None:
        await asyncio.gather(*(self._work(call, tally) for call, tally in zip(calls, self._tallies, strict=True)))

    async def _work(self, call: AsyncCall, tally: _Tally) -> None:
        with self._worker():
            for started in self._turns(tally):
                try:
                    await call()
                except grpc.RpcError as error:
                    tally.record(started, error)
                else:
                    tally.record(started, None)


class EventLoopThread:
    """An asyncio event loop running in a thread of its own, for sync code to hand
    coroutines to. On `close()` (or leaving the `with` block) the loop stops, whatever
    still runs on it is cancelled, and the thread is joined."""

    loop: asyncio.AbstractEventLoop

    def __init__(self) -> None:
        ready = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._serve,
            args=(ready,),
            name="poolkit-demo-loop",
            daemon=True,  # a loop stuck in a call must not keep the process alive
        )
        self._thread.start()
        if not ready.wait(LOOP_TIMEOUT):
            raise RuntimeError("the demo's event loop did not start")

    def _serve(self, ready: threading.Event) -> None:
        # asyncio.Runner tears the loop down as asyncio.run does: cancels what is left,
        # closes async generators and the default executor, then the loop.
        with asyncio.Runner() as runner:
            self.loop = runner.get_loop()
            ready.set()
            self.loop.run_forever()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the loop; its result, waited for up to `LOOP_TIMEOUT` seconds."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(LOOP_TIMEOUT)
        finally:
            future.cancel()  # nothing to do if it finished; stops it if it overran

    def close(self) -> None:
        """Stop the loop and wait up to `LOOP_TIMEOUT` for its thread to end. Idempotent."""
        if not self._stopping:
            self._stopping = True
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(LOOP_TIMEOUT)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _describe_error(error: grpc.RpcError) -> str:
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    if callable(code) and callable(details):
        return f"{code().name}: {details()}"
    return repr(error)
