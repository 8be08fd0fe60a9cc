"""`poolkit demo`: one poolkit channel against local echo servers, then the same calls
made the naive way, a fresh grpc channel per request, for contrast.

The pieces are kept apart so a run can be recombined: `Load` (threads, sync calls) and
`AsyncLoad` (asyncio tasks, on an `EventLoopThread`) drive calls and count them the same
way, `ProgressDisplay` shows a running load, the `*_summary` functions turn finished runs
into tables, and `run_demo` strings them together. Everything talks to loopback servers
this process starts and stops itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import shutil
import sys
import threading
import time
from array import array
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Self, TextIO, TypeVar

import grpc

from ._aio_channel import Channel as AioChannel
from ._aio_channel import insecure_channel as aio_insecure_channel
from ._channel import insecure_channel
from ._shell import Pooled
from .testing import EchoRequest, EchoStub, SpawnedEchoServers, StatsResponse, spawn_echo_servers

Call = Callable[[], object]
"""One request, made synchronously; raises `grpc.RpcError` when the call fails."""

CallFactory = Callable[[int], Call]
"""Given a worker's index, the call that worker makes over and over."""

AsyncCall = Callable[[], Awaitable[object]]
"""One request, made on an event loop; awaiting it raises `grpc.RpcError` when the call fails."""

AsyncCallFactory = Callable[[int], AsyncCall]
"""Given a task's index, the call that task makes over and over."""

T = TypeVar("T")

MAX_CALLS = 1_000_000
"""Upper bound on the pooled run whatever the duration: a Python client manages a few
thousand calls per second per core, so this only bites on very long runs, and it keeps
the latency samples (8 bytes each) under 8 MB."""

FRESH_MAX_CALLS = 500
FRESH_MAX_SECONDS = 5.0
"""The fresh-per-request run is bounded to whichever comes first. Each call leaves a
client port in TIME_WAIT for 60 s; 500 is plenty to show the cost and a small dent in
the ~28,000 ports of Linux's default ephemeral range."""

CALL_TIMEOUT = 10.0
"""Deadline of every demo call, so a stuck server cannot hold a worker past its run."""

TICK = 0.25
"""How often the display is refreshed on a terminal (about 4 times a second)."""

PLAIN_INTERVAL = 1.0
"""How often a progress line is printed when output is not a terminal (a log, a pipe)."""

LOOP_TIMEOUT = 5.0
"""How long the main thread waits for the asyncio run's event loop to start, to open or
close the channel, or to stop: each takes milliseconds, so a loop still busy is stuck."""


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """What `poolkit demo` was asked to do (the command line checks the ranges)."""

    duration: float = 10.0
    concurrency: int = 16
    endpoints: int = 4
    payload: int = 64
    max_calls: int = MAX_CALLS
    aio: bool = False  # the pooled run on poolkit.aio, from asyncio tasks instead of threads


# -- command line -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `poolkit demo` flags."""
    defaults = DemoOptions()
    parser.add_argument(
        "--duration",
        type=_number_in(float, 0.1, 3600),
        default=defaults.duration,
        metavar="SECONDS",
        help=f"how long the pooled run lasts (default {defaults.duration:g})",
    )
    parser.add_argument(
        "--concurrency",
        type=_number_in(int, 1, 256),
        default=defaults.concurrency,
        metavar="N",
        help=f"client threads (asyncio tasks with --aio) making calls (default {defaults.concurrency})",
    )
    parser.add_argument(
        "--endpoints",
        type=_number_in(int, 1, 64),
        default=defaults.endpoints,
        metavar="N",
        help=f"local echo servers to start (default {defaults.endpoints})",
    )
    parser.add_argument(
        "--payload",
        type=_number_in(int, 0, 1 << 20),
        default=defaults.payload,
        metavar="BYTES",
        help=f"request payload size (default {defaults.payload})",
    )
    parser.add_argument(
        "--max-calls",
        type=_number_in(int, 1, MAX_CALLS),
        default=defaults.max_calls,
        metavar="N",
        help=f"stop the pooled run after this many calls even if time is left (default {defaults.max_calls:,})",
    )
    parser.add_argument(
        "--aio",
        action="store_true",
        help="make the pooled run's calls through poolkit.aio, from asyncio tasks on one event loop",
    )


def _number_in(kind: Callable[[str], float], low: float, high: float) -> Callable[[str], Any]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (low <= value <= high):
            raise argparse.ArgumentTypeError(f"{text} is not between {low:g} and {high:g}")
        return value

    return parse


def command(args: argparse.Namespace) -> int:
    """Run the demo with parsed flags: 0 if every pooled call succeeded, 1 if some failed,
    130 if interrupted."""
    options = DemoOptions(
        duration=args.duration,
        concurrency=args.concurrency,
        endpoints=args.endpoints,
        payload=args.payload,
        max_calls=args.max_calls,
        aio=args.aio,
    )
    try:
        return run_demo(options, sys.stdout)
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130


# -- the demo -----------------------------------------------------------------------------


def run_demo(options: DemoOptions, out: TextIO) -> int:
    """Start servers, run the pooled load and the fresh-per-request load, print both,
    stop the servers. 0 if the pooled run had no errors, 1 if it had, 2 if the servers
    would not start."""
    say = _printer(out)
    try:
        servers = spawn_echo_servers(options.endpoints, host="127.0.0.1")
    except RuntimeError as error:
        print(f"poolkit demo: cannot start the echo servers: {error}", file=sys.stderr)
        return 2
    try:
        say(f"echo servers: {len(servers.addresses)} in child process {servers.pid}, on loopback")
        for address in servers.addresses:
            say(f"  {address}")
        servers.stats(reset=True)
        pooled = (run_pooled_aio if options.aio else run_pooled)(servers, options, out)
        fresh = run_fresh(servers, options, out)
    finally:
        servers.stop()
    say("")
    for line in contrast_summary(pooled, fresh):
        say(line)
    say("")
    say(
        f"pooled: {pooled.connections:,} connections for {pooled.load.calls:,} calls; "
        f"fresh-per-request: {fresh.connections:,} connections for {fresh.load.calls:,} calls"
    )
    return 1 if pooled.load.errors else 0


@dataclass(frozen=True)
class PhaseResult:
    load: LoadResult
    stats: list[StatsResponse]  # what each server saw during the phase, in address order

    @property
    def connections(self) -> int:
        """Client TCP connections the servers saw: distinct client ip:port pairs."""
        return sum(len(stat.peers) for stat in self.stats)


def run_pooled(servers: SpawnedEchoServers, options: DemoOptions, out: TextIO) -> PhaseResult:
    """The main act: every thread calls through one poolkit channel."""
    request = EchoRequest(payload=b"x" * options.payload)
    with insecure_channel(servers.target) as channel:
        unary = EchoStub(channel).Unary

        def pooled_call(_worker: int) -> Call:
            return lambda: unary(request, timeout=CALL_TIMEOUT)

        def start() -> BaseLoad:
            return Load(
                pooled_call, concurrency=options.concurrency, duration=options.duration, max_calls=options.max_calls
            )

        title = f"pooled: {options.concurrency} threads share one poolkit channel"
        result, described = _drive_pooled(channel, title, start, options, out)
    return _pooled_phase(servers, result, described, out)


def run_pooled_aio(servers: SpawnedEchoServers, options: DemoOptions, out: TextIO) -> PhaseResult:
    """The main act on asyncio: tasks on one event loop call through one poolkit.aio channel.
    The channel belongs to that loop, so it is opened and closed there. The display reads
    it from this thread: `describe()` takes the pool's lock and asks grpc for each
    connection's state, and neither needs the loop."""
    request = EchoRequest(payload=b"x" * options.payload)
    with EventLoopThread() as loop:
        channel = loop.run(_open_aio_channel(servers.target))
        try:
            unary = EchoStub(channel).Unary

            def pooled_call(_worker: int) -> AsyncCall:
                return lambda: unary(request, timeout=CALL_TIMEOUT)

            def start() -> BaseLoad:
                return AsyncLoad(
                    pooled_call,
                    loop=loop.loop,
                    concurrency=options.concurrency,
                    duration=options.duration,
                    max_calls=options.max_calls,
                )

            title = f"pooled (asyncio): {options.concurrency} tasks share one poolkit.aio channel"
            result, described = _drive_pooled(channel, title, start, options, out)
        finally:
            loop.run(channel.close())
    return _pooled_phase(servers, result, described, out)


async def _open_aio_channel(target: str) -> AioChannel:
    """A poolkit.aio channel, made on the loop that will run its calls (a coroutine so that
    it runs there)."""
    return aio_insecure_channel(target)


def _drive_pooled(
    channel: Pooled, title: str, start: Callable[[], BaseLoad], options: DemoOptions, out: TextIO
) -> tuple[LoadResult, dict[str, Any]]:
    """Announce the pooled run, start it and show its progress until it ends: its figures,
    and the channel's account of where the calls went."""
    say = _printer(out)
    config = channel.config
    connections = _plural(config.connections_per_endpoint, "connection")
    say("")
    say(f"{title} for {options.duration:g} s")
    say(f"  {config.balancer} balancer, {connections} per endpoint, {options.payload}-byte payloads")
    load = start()
    watch(load, ProgressDisplay.for_stream(out), lambda: endpoint_shares(channel.describe()))
    return load.result(), channel.describe()


def _pooled_phase(
    servers: SpawnedEchoServers, result: LoadResult, described: dict[str, Any], out: TextIO
) -> PhaseResult:
    """The finished pooled run, with what the servers saw of it, summarised on `out`."""
    say = _printer(out)
    phase = PhaseResult(result, servers.stats(reset=True))
    say("")
    for line in pooled_summary(phase, described, servers.addresses):
        say(line)
    return phase


def run_fresh(servers: SpawnedEchoServers, options: DemoOptions, out: TextIO) -> PhaseResult:
    """The contrast: the same calls, each on a grpc channel opened for it and closed after."""
    say = _printer(out)
    request = EchoRequest(payload=b"x" * options.payload)
    addresses = servers.addresses
    # grpcio shares one connection among channels to the same address with equal options
    # while they are open at the same time (its process-wide subchannel pool), so threads
    # overlapping in time would hide the cost. A local subchannel pool gives each channel
    # its own connection, as it is whenever the requests come from separate processes.
    fresh_options = [("grpc.use_local_subchannel_pool", 1)]

    def fresh_call(worker: int) -> Call:
        rotation = itertools.islice(itertools.cycle(addresses), worker, None)

        def call() -> object:
            with grpc.insecure_channel(next(rotation), options=fresh_options) as channel:
                return EchoStub(channel).Unary(request, timeout=CALL_TIMEOUT)

        return call

    duration = min(FRESH_MAX_SECONDS, options.duration)
    max_calls = min(FRESH_MAX_CALLS, options.max_calls)
    say("")
    say(f"fresh-per-request: {options.concurrency} threads open a new grpc channel for every call")
    say(f"  at most {max_calls:,} calls or {duration:g} s, {options.payload}-byte payloads")
    load = Load(fresh_call, concurrency=options.concurrency, duration=duration, max_calls=max_calls)
    watch(load, ProgressDisplay.for_stream(out), None)
    return PhaseResult(load.result(), servers.stats(reset=True))


def _printer(out: TextIO) -> Callable[[str], None]:
    def say(line: str) -> None:
        print(line, file=out, flush=True)

    return say


# -- load generation ----------------------------------------------------------------------


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
        self._started = time.monotonic()
        self._ended: float | None = None
        self._deadline = self._started + duration

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
        return (self._ended or time.monotonic()) - self._started

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


# -- progress -----------------------------------------------------------------------------


class ProgressDisplay:
    """A running load's progress: on a terminal, one line redrawn in place; otherwise a
    plain line every `PLAIN_INTERVAL` seconds, so logs stay readable."""

    def __init__(self, out: TextIO, *, interactive: bool, width: int = 100) -> None:
        self._out = out
        self._interactive = interactive
        self._width = width
        self._last_plain: float | None = None

    @classmethod
    def for_stream(cls, out: TextIO) -> ProgressDisplay:
        interactive = out.isatty()
        width = shutil.get_terminal_size((100, 24)).columns if interactive else 100
        return cls(out, interactive=interactive, width=width)

    def show(self, line: str, now: float) -> None:
        if self._interactive:
            # Cut to the terminal's width: a wrapped line cannot be redrawn with "\r".
            self._out.write("\r" + line[: self._width - 1] + "\x1b[K")
            self._out.flush()
        elif self._last_plain is None or now - self._last_plain >= PLAIN_INTERVAL:
            self._last_plain = now
            print(line, file=self._out, flush=True)

    def finish(self, line: str) -> None:
        """The final state stays on screen; later output starts on a line of its own."""
        if self._interactive:
            self.show(line, 0.0)
            self._out.write("\n")
            self._out.flush()
        else:
            print(line, file=self._out, flush=True)


def watch(load: BaseLoad, display: ProgressDisplay, shares: Callable[[], list[float]] | None) -> None:
    """Refresh `display` until `load` is over (or overdue by more than a call's deadline)."""
    limit = load.duration + CALL_TIMEOUT + 5
    try:
        while not load.wait(TICK) and load.elapsed < limit:
            display.show(progress_line(load.snapshot(), shares() if shares else None), load.elapsed)
    finally:
        load.stop()
        display.finish(progress_line(load.snapshot(), shares() if shares else None))


def progress_line(snapshot: LoadSnapshot, shares: list[float] | None) -> str:
    rate = snapshot.calls / snapshot.elapsed if snapshot.elapsed > 0 else 0.0
    # Short enough that four endpoints' shares fit an 80-column terminal.
    line = f"  {snapshot.elapsed:5.1f} s {snapshot.calls:>9,} calls {rate:>7,.0f}/s {snapshot.errors:>4,} errors"
    if shares:
        line += "  share " + " ".join(f"{share:3.0%}" for share in shares)
    return line


def endpoint_shares(described: dict[str, Any]) -> list[float]:
    """Each endpoint's fraction of the calls a poolkit channel has made, in target order."""
    calls = [int(endpoint["calls"]) for endpoint in described["endpoints"]]
    total = sum(calls)
    return [count / total if total else 0.0 for count in calls]


# -- summaries ----------------------------------------------------------------------------


def pooled_summary(phase: PhaseResult, described: dict[str, Any], addresses: Sequence[str]) -> Iterator[str]:
    """The pooled run: totals, then each endpoint as the channel and as the server saw it."""
    load = phase.load
    yield "pooled summary"
    yield from _table(
        [
            ("calls", f"{load.calls:,}", f"in {load.elapsed:.1f} s"),
            ("calls/s", f"{load.rate:,.0f}", ""),
            ("errors", f"{load.errors:,}", load.first_error or ""),
            ("latency p50", _ms(load.percentile(0.50)), ""),
            ("latency p99", _ms(load.percentile(0.99)), ""),
            ("connections", f"{phase.connections:,}", "distinct client ports the servers saw"),
        ],
        "<><",
        indent=2,
    )
    yield ""
    stats = dict(zip(addresses, phase.stats, strict=True))
    rows = [("endpoint", "calls", "share", "errors", "peak ewma", "server saw", "connections")]
    total_calls = sum(int(e["calls"]) for e in described["endpoints"])
    mismatched = 0
    for endpoint, share in zip(described["endpoints"], endpoint_shares(described), strict=True):
        seen = stats.get(endpoint["address"])
        server_calls = int(seen.calls) if seen is not None else 0
        mismatched += seen is None or server_calls != int(endpoint["calls"])
        rows.append(
            (
                endpoint["address"],
                f"{int(endpoint['calls']):,}",
                f"{share:.1%}",
                f"{int(endpoint['errors']):,}",
                f"{float(endpoint['ewma_ms']):.2f} ms",
                f"{server_calls:,}" if seen is not None else "-",
                f"{len(seen.peers):,}" if seen is not None else "-",
            )
        )
    server_total = sum(int(s.calls) for s in phase.stats)
    rows.append(
        ("total", f"{total_calls:,}", "100.0%", f"{load.errors:,}", "", f"{server_total:,}", f"{phase.connections:,}")
    )
    yield from _table(rows, "<>>>>>>", indent=2, rule_before_last=True)
    yield ""
    if mismatched:
        # A call that failed on the client (a deadline, say) may or may not have reached the server.
        yield f"  channel and server counts differ on {mismatched} endpoint(s)"
    else:
        yield "  channel and server counts agree on every endpoint"


def contrast_summary(pooled: PhaseResult, fresh: PhaseResult) -> Iterator[str]:
    """The two runs side by side."""
    runs = (pooled, fresh)
    yield "contrast: one pooled channel vs a fresh channel per request"
    yield from _table(
        [
            ("", "pooled", "fresh-per-request"),
            ("calls", *(f"{run.load.calls:,}" for run in runs)),
            ("errors", *(f"{run.load.errors:,}" for run in runs)),
            ("connections opened", *(f"{run.connections:,}" for run in runs)),
            ("connections per call", *(_ratio(run.connections, run.load.calls) for run in runs)),
            ("calls/s", *(f"{run.load.rate:,.0f}" for run in runs)),
            ("latency p50", *(_ms(run.load.percentile(0.50)) for run in runs)),
            ("latency p99", *(_ms(run.load.percentile(0.99)) for run in runs)),
        ],
        "<>>",
        indent=2,
    )
    for name, run in zip(("pooled", "fresh-per-request"), runs, strict=True):
        if run.load.first_error:
            yield f"  {name}: first error {run.load.first_error}"


def _table(
    rows: Sequence[Sequence[str]], align: str, *, indent: int = 0, rule_before_last: bool = False
) -> Iterator[str]:
    """Rows as aligned columns: `align` has one "<" (left) or ">" (right) per column."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(align))]
    pad = " " * indent
    for index, row in enumerate(rows):
        if rule_before_last and index == len(rows) - 1:
            yield pad + "  ".join("-" * width for width in widths)
        cells = [cell.ljust(w) if a == "<" else cell.rjust(w) for cell, w, a in zip(row, widths, align, strict=True)]
        yield (pad + "  ".join(cells)).rstrip()


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


def _ratio(part: int, whole: int) -> str:
    """`part / whole` with two significant digits and no exponent: 0.00017, 1.00."""
    if whole == 0:
        return "-"
    value = part / whole
    if value == 0:
        return "0"
    decimals = max(2, 1 - math.floor(math.log10(value)))
    return f"{value:.{decimals}f}"
