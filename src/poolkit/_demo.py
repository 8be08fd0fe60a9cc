"""`poolkit demo`: one poolkit channel against local echo servers, its connections bound to
several loopback source addresses, one server killed a third of the way through and
restarted at two thirds, then the same calls made the naive way, a fresh grpc channel
per request, for contrast.

The pieces are kept apart so a run can be recombined: `_demo_traffic` drives calls and counts
them (threads or asyncio tasks), `LocalServers` owns the servers, `FaultSchedule` kills
and restarts one of them and records the run at each step, `ProgressDisplay` shows a
running load, the `*_summary` functions turn finished runs into tables, and `run_demo`
strings them together. Everything talks to loopback servers this process starts and
stops itself.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import shutil
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Self, TextIO

import grpc

from ._aio_channel import Channel as AioChannel
from ._aio_channel import insecure_channel as aio_insecure_channel
from ._channel import insecure_channel
from ._config import PoolConfig
from ._demo_traffic import (
    CALL_TIMEOUT,
    AsyncCall,
    AsyncLoad,
    BaseLoad,
    Call,
    EventLoopThread,
    Load,
    LoadResult,
    LoadSnapshot,
)
from ._errors import ConfigError, SourceBindingUnavailable
from ._shell import Pooled
from .testing import EchoRequest, EchoStub, SpawnedEchoServers, StatsResponse, spawn_echo_servers

MAX_CALLS = 1_000_000
"""Upper bound on the pooled run whatever the duration: a Python client manages a few
thousand calls per second per core, so this only bites on very long runs, and it keeps
the latency samples (8 bytes each) under 8 MB."""

FRESH_MAX_CALLS = 500
FRESH_MAX_SECONDS = 5.0
"""The fresh-per-request run is bounded to whichever comes first. Each call leaves a
client port in TIME_WAIT for 60 s; 500 is plenty to show the cost and a small dent in
the ~28,000 ports of Linux's default ephemeral range."""

TICK = 0.25
"""How often the display is refreshed on a terminal (about 4 times a second)."""

PLAIN_INTERVAL = 1.0
"""How often a progress line is printed when output is not a terminal (a log, a pipe)."""

KILL_AT = 1 / 3
RESTART_AT = 2 / 3
"""Shares of the pooled run's duration at which one server is killed and restarted: a
third of the run each with every server up, with one down, and after its restart."""

RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500))
"""grpc options of the pooled channel. After losing a server grpc waits 1 s before it
reconnects, then 1.6 times longer after each failed try, up to 120 s: a server restarted
a few seconds into a ten-second run could stay unvisited to its end. These servers are on
loopback and restart in well under a second, so the demo retries every 0.1 s, backing
off to 0.5 s. A service would pick these from how fast its own servers come back."""

MAX_SOURCES = 16
"""`--sources` goes up to 127.0.0.17: enough to see calls and ports spread, few enough
that every route (endpoints × sources) keeps a health check and a connection cheaply."""


def source_addresses(count: int) -> list[str]:
    """The pooled channel's `count` source addresses, 127.0.0.2 onwards. Linux routes all
    of 127.0.0.0/8 to the loopback interface, so each is an address of this host with no
    set-up, and each is an ephemeral port range of its own towards the servers (on
    127.0.0.1)."""
    return [f"127.0.0.{2 + index}" for index in range(count)]


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """What `poolkit demo` was asked to do (the command line checks the ranges)."""

    duration: float = 10.0
    concurrency: int = 16
    endpoints: int = 4
    payload: int = 64
    max_calls: int = MAX_CALLS
    aio: bool = False  # the pooled run on poolkit.aio, from asyncio tasks instead of threads
    fault: bool = True  # kill one server during the pooled run and restart it
    sources: int = 2  # source addresses the pooled channel binds to (`source_addresses`); 0: unbound

    @property
    def config(self) -> PoolConfig:
        """The pooled channel's configuration: the defaults, bound to the demo's sources."""
        return PoolConfig(source_addresses=source_addresses(self.sources))


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
        "--sources",
        type=_number_in(int, 0, MAX_SOURCES),
        default=defaults.sources,
        metavar="N",
        help=f"bind the pooled channel's connections to N loopback source addresses, 127.0.0.2 onwards "
        f"(default {defaults.sources}; 0: unbound, the kernel picks)",
    )
    parser.add_argument(
        "--aio",
        action="store_true",
        help="make the pooled run's calls through poolkit.aio, from asyncio tasks on one event loop",
    )
    parser.add_argument(
        "--no-fault",
        dest="fault",
        action="store_false",
        help="keep every server up (by default the first is killed a third of the way through the pooled run "
        "and restarted on the same port at two thirds)",
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
    """Run the demo with parsed flags: 0 if the pooled run went as it should, 1 if not (see
    `run_demo`), 130 if interrupted."""
    options = DemoOptions(
        duration=args.duration,
        concurrency=args.concurrency,
        endpoints=args.endpoints,
        payload=args.payload,
        max_calls=args.max_calls,
        aio=args.aio,
        fault=args.fault,
        sources=args.sources,
    )
    try:
        return run_demo(options, sys.stdout)
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130


# -- the demo -----------------------------------------------------------------------------


def run_demo(options: DemoOptions, out: TextIO) -> int:
    """Start servers, run the pooled load (killing and restarting a server on the way
    unless told not to) and the fresh-per-request load, print both, stop the servers.

    0 if no pooled call failed that the fault does not explain, 1 if one did: with the
    fault, calls may fail once a server is killed, but not before, and the server must
    restart. 2 if the servers would not start or the channel could not bind its sources."""
    say = _printer(out)
    try:
        servers = LocalServers.start(options.endpoints)
    except (RuntimeError, OSError) as error:
        print(f"poolkit demo: cannot start the echo servers: {error}", file=sys.stderr)
        return 2
    with servers:
        say(f"echo servers: {len(servers)} on loopback, each in a child process of its own")
        for address, pid in zip(servers.addresses, servers.pids, strict=True):
            say(f"  {address}  pid {pid}")
        servers.stats(reset=True)
        try:
            pooled = (run_pooled_aio if options.aio else run_pooled)(servers, options, out)
        except (SourceBindingUnavailable, ConfigError) as error:
            print(f"poolkit demo: {error} (--sources 0 runs unbound)", file=sys.stderr)
            return 2
        fresh = run_fresh(servers, options, out)
    say("")
    for line in contrast_summary(pooled, fresh):
        say(line)
    say("")
    say(
        f"pooled: {pooled.connections:,} connections for {pooled.load.calls:,} calls; "
        f"fresh-per-request: {fresh.connections:,} connections for {fresh.load.calls:,} calls"
    )
    if pooled.fault is None:
        return 1 if pooled.load.errors else 0
    return 1 if pooled.fault.errors_before or pooled.fault.error else 0


@dataclass(frozen=True)
class PhaseResult:
    load: LoadResult
    stats: list[StatsResponse]  # what each server saw during the phase, in address order
    fault: FaultReport | None = None  # the pooled run's server kill and restart, if there was one

    @property
    def connections(self) -> int:
        """Client TCP connections the servers saw: distinct client ip:port pairs."""
        return sum(len(stat.peers) for stat in self.stats)


def run_pooled(servers: LocalServers, options: DemoOptions, out: TextIO) -> PhaseResult:
    """The main act: every thread calls through one poolkit channel."""
    request = EchoRequest(payload=b"x" * options.payload)
    with insecure_channel(servers.target, config=options.config, options=RECONNECT_OPTIONS) as channel:
        unary = EchoStub(channel).Unary

        def pooled_call(_worker: int) -> Call:
            return lambda: unary(request, timeout=CALL_TIMEOUT)

        def start() -> BaseLoad:
            return Load(
                pooled_call, concurrency=options.concurrency, duration=options.duration, max_calls=options.max_calls
            )

        title = f"pooled: {options.concurrency} threads share one poolkit channel"
        result, described, fault = _drive_pooled(channel, title, start, servers, options, out)
    return _pooled_phase(servers, result, described, fault, out)


def run_pooled_aio(servers: LocalServers, options: DemoOptions, out: TextIO) -> PhaseResult:
    """The main act on asyncio: tasks on one event loop call through one poolkit.aio channel.
    The channel belongs to that loop, so it is opened and closed there. The display and
    the fault schedule read it from this thread: `describe()` takes the pool's lock and
    asks grpc for each connection's state, and neither needs the loop."""
    request = EchoRequest(payload=b"x" * options.payload)
    with EventLoopThread() as loop:
        channel = loop.run(_open_aio_channel(servers.target, options.config))
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
            result, described, fault = _drive_pooled(channel, title, start, servers, options, out)
        finally:
            loop.run(channel.close())
    return _pooled_phase(servers, result, described, fault, out)


async def _open_aio_channel(target: str, config: PoolConfig) -> AioChannel:
    """A poolkit.aio channel, made on the loop that will run its calls (a coroutine so that
    it runs there), once it has a connection ready (its first resolution and the
    source-binding self-check run off the loop: the display reads its routes at once)."""
    channel = aio_insecure_channel(target, config=config, options=RECONNECT_OPTIONS)
    await asyncio.wait_for(channel.channel_ready(), CALL_TIMEOUT * 10)
    return channel


def _drive_pooled(
    channel: Pooled,
    title: str,
    start: Callable[[], BaseLoad],
    servers: LocalServers,
    options: DemoOptions,
    out: TextIO,
) -> tuple[LoadResult, dict[str, Any], FaultReport | None]:
    """Announce the pooled run, start it, kill and restart a server on schedule, and show
    its progress until it ends: its figures, the channel's account of where the calls
    went, and the fault's."""
    say = _printer(out)
    config = channel.config
    say("")
    say(f"{title} for {options.duration:g} s")
    connections = _plural(config.connections_per_endpoint, "connection")
    say(f"  {config.balancer} balancer, {connections} per route, {options.payload}-byte payloads")
    say(f"  {routes_line(channel.describe()['endpoints'])}")
    display = ProgressDisplay.for_stream(out)
    schedule = FaultSchedule(servers, channel.describe, display.note, options.duration) if options.fault else None
    if schedule is not None:
        say(f"  {schedule.plan()}")
    load = start()
    # The shares need only the routes' counts: the pool's own view, without describe()'s
    # port budget, which parses /proc/net/tcp{,6} (about 20 ms with the few thousand
    # TIME_WAIT sockets a run or two leaves behind) and would take that from the load's
    # threads several times a second.
    routes = channel._pool.describe
    watch(load, display, lambda: endpoint_shares(routes()), schedule.tick if schedule else None)
    fault = schedule.finish(load) if schedule else None
    return load.result(), channel.describe(), fault


def _pooled_phase(
    servers: LocalServers,
    result: LoadResult,
    described: dict[str, Any],
    fault: FaultReport | None,
    out: TextIO,
) -> PhaseResult:
    """The finished pooled run, with what the servers saw of it, summarised on `out`."""
    say = _printer(out)
    stats = fault.server_totals() if fault else _known(servers.addresses, servers.stats(reset=True))
    phase = PhaseResult(result, stats, fault)
    say("")
    for line in pooled_summary(phase, described, servers.addresses):
        say(line)
    if fault is not None:
        say("")
        for line in fault_summary(fault):
            say(line)
    return phase


def run_fresh(servers: LocalServers, options: DemoOptions, out: TextIO) -> PhaseResult:
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
    return PhaseResult(load.result(), _known(addresses, servers.stats(reset=True)))


def _printer(out: TextIO) -> Callable[[str], None]:
    def say(line: str) -> None:
        print(line, file=out, flush=True)

    return say


# -- the servers and the fault ------------------------------------------------------------


class LocalServers:
    """The demo's echo servers, each in a child process of its own so that one can be
    killed, and restarted, alone. A context manager that stops them all."""

    def __init__(self, groups: Sequence[SpawnedEchoServers]) -> None:
        self._groups = list(groups)  # one server each

    @classmethod
    def start(cls, count: int) -> LocalServers:
        """Start `count` servers on loopback, side by side: each child takes a moment to
        import grpc. If one fails to start, the others are stopped."""
        with futures.ThreadPoolExecutor(count) as pool:
            starting = [pool.submit(spawn_echo_servers, 1, "127.0.0.1") for _ in range(count)]
            try:
                return cls([start.result() for start in starting])
            except BaseException:
                pool.shutdown()  # every start has ended, so each server that did start is stopped
                cls([start.result() for start in starting if start.exception() is None]).stop()
                raise

    def __len__(self) -> int:
        return len(self._groups)

    @property
    def addresses(self) -> list[str]:
        return [group.addresses[0] for group in self._groups]

    @property
    def pids(self) -> list[int]:
        return [group.pid for group in self._groups]

    @property
    def target(self) -> str:
        return "ipv4:" + ",".join(self.addresses)

    def stats(self, reset: bool = False) -> list[StatsResponse | None]:
        """Each server's Stats, in address order; None for a server that is down."""
        results: list[StatsResponse | None] = []
        for group in self._groups:
            try:
                results.append(group.stats(reset)[0] if group.process.poll() is None else None)
            except grpc.RpcError:  # it went down just now
                results.append(None)
        return results

    def kill(self, index: int) -> int:
        """SIGKILL server `index`'s process; its pid."""
        pid = self._groups[index].pid
        self._groups[index].kill()
        return pid

    def restart(self, index: int) -> int:
        """Start server `index` again on its port; the new process's pid."""
        self._groups[index].restart()
        return self._groups[index].pid

    def stop(self) -> None:
        for group in self._groups:
            group.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _known(addresses: Sequence[str], stats: Sequence[StatsResponse | None]) -> list[StatsResponse]:
    """`stats` with a server that was down counted as having seen nothing."""
    return [
        StatsResponse(server_id=address) if stat is None else stat
        for address, stat in zip(addresses, stats, strict=True)
    ]


@dataclass(frozen=True)
class Mark:
    """The pooled run as it stood at the end of a phase (or, for "start", at its start)."""

    phase: str  # "start", then "before", "down" (the server killed) and "after" (restarted)
    at: float  # seconds into the run (for the last mark, its end)
    load: LoadSnapshot
    described: dict[str, Any]  # the channel's describe()
    stats: list[StatsResponse | None]  # what each server saw during the phase; None: it was down
    described_at: float  # seconds into the run when `described` was taken, after a finished run too


@dataclass(frozen=True)
class FaultReport:
    """A server killed and restarted during the pooled run, and the run around it."""

    victim: str  # the killed server's address
    addresses: list[str]  # every server's, in the order of each mark's stats
    marks: list[Mark]
    killed_at: float | None  # seconds into the run; None if the run ended first
    restarted_at: float | None  # None if it was restarted only after the run, or could not be
    error: str | None  # why the restart failed

    def phases(self) -> list[tuple[Mark, Mark]]:
        """Each phase as the marks at its start and end."""
        return list(itertools.pairwise(self.marks))

    @property
    def errors_before(self) -> int:
        """Calls that failed while every server was up."""
        return self.marks[1].load.errors if len(self.marks) > 1 else 0

    def server_totals(self) -> list[StatsResponse]:
        """What each server saw over the whole run, its phases added up."""
        totals = []
        for index, address in enumerate(self.addresses):
            seen = [mark.stats[index] for mark in self.marks[1:] if index < len(mark.stats)]
            known = [stat for stat in seen if stat is not None]
            peers = sorted({peer for stat in known for peer in stat.peers})
            totals.append(StatsResponse(server_id=address, calls=sum(stat.calls for stat in known), peers=peers))
        return totals


class FaultSchedule:
    """Kills the first server a third of the way through the run (SIGKILL, as a crash
    would) and restarts it on the same port at two thirds, as its supervisor would,
    recording the run at each step. `tick` is called as the run goes, `finish` at its end."""

    victim = 0  # the index of the server that is killed

    def __init__(
        self,
        servers: LocalServers,
        describe: Callable[[], dict[str, Any]],
        note: Callable[[str], None],
        duration: float,
    ) -> None:
        self._servers = servers
        self._describe = describe
        self._note = note
        self._kill_due = duration * KILL_AT
        self._restart_due = duration * RESTART_AT
        self.address = servers.addresses[self.victim]
        self.marks = [Mark("start", 0.0, LoadSnapshot(0.0, 0, 0), describe(), [], 0.0)]
        self._killed_at: float | None = None
        self._restarted_at: float | None = None
        self._error: str | None = None

    def plan(self) -> str:
        return (
            f"fault: {self.address} is killed at {self._kill_due:.1f} s "
            f"and restarted on the same port at {self._restart_due:.1f} s"
        )

    def tick(self, load: BaseLoad) -> None:
        if self._killed_at is None:
            if load.elapsed >= self._kill_due:
                self._end_phase("before", load)
                self._kill(load)
        elif not self._restart_done() and load.elapsed >= self._restart_due:
            self._restart(load)
            self._end_phase("down", load)

    def finish(self, load: BaseLoad) -> FaultReport:
        """Close the last phase. A server still down is restarted after the run, since
        later runs need every server."""
        if self._killed_at is None:
            self._end_phase("before", load)
        elif not self._restart_done():
            self._end_phase("down", load)
            self._restart(load, during_run=False)
        else:
            self._end_phase("after", load)
        return FaultReport(
            self.address, self._servers.addresses, self.marks, self._killed_at, self._restarted_at, self._error
        )

    def _restart_done(self) -> bool:
        return self._restarted_at is not None or self._error is not None

    def _end_phase(self, phase: str, load: BaseLoad) -> None:
        # The servers first: asking them takes longest, and the kill follows the channel's view.
        stats = self._servers.stats(reset=True)
        described_at = time.monotonic() - load.started
        self.marks.append(Mark(phase, load.elapsed, load.snapshot(), self._describe(), stats, described_at))

    def _kill(self, load: BaseLoad) -> None:
        pid = self._servers.kill(self.victim)
        self._killed_at = load.elapsed
        self._note(f"  {self._killed_at:5.1f} s killed {self.address} (SIGKILL to pid {pid})")

    def _restart(self, load: BaseLoad, *, during_run: bool = True) -> None:
        try:
            pid = self._servers.restart(self.victim)
        except (RuntimeError, OSError) as error:
            self._error = f"could not restart {self.address}: {error}"
            self._note(f"  {load.elapsed:5.1f} s {self._error}")
            return
        if during_run:
            self._restarted_at = load.elapsed
            self._note(f"  {self._restarted_at:5.1f} s restarted {self.address} on the same port (pid {pid})")
        else:
            self._note(f"  restarted {self.address} after the run (pid {pid})")


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

    def note(self, line: str) -> None:
        """Something that happened during the run, on a line of its own."""
        if self._interactive:
            self._out.write("\r" + line[: self._width - 1] + "\x1b[K\n")
            self._out.flush()
        else:
            print(line, file=self._out, flush=True)

    def finish(self, line: str) -> None:
        """The final state stays on screen; later output starts on a line of its own."""
        if self._interactive:
            self.show(line, 0.0)
            self._out.write("\n")
            self._out.flush()
        else:
            print(line, file=self._out, flush=True)


def watch(
    load: BaseLoad,
    display: ProgressDisplay,
    shares: Callable[[], list[float]] | None,
    on_tick: Callable[[BaseLoad], None] | None = None,
) -> None:
    """Refresh `display` until `load` is over (or overdue by more than a call's deadline),
    calling `on_tick` with the load at every refresh."""
    limit = load.duration + CALL_TIMEOUT + 5
    try:
        while not load.wait(TICK) and load.elapsed < limit:
            if on_tick is not None:
                on_tick(load)
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
    """Each endpoint's fraction of the calls a poolkit channel has made (all its routes),
    in target order."""
    calls = [_calls(routes) for routes in _by_address(described).values()]
    total = sum(calls)
    return [count / total if total else 0.0 for count in calls]


def routes_line(endpoints: Sequence[dict[str, Any]]) -> str:
    """Where the pooled channel's connections leave from, and its routes (`endpoints` is
    describe()'s list of routes)."""
    sources = list(dict.fromkeys(str(route["source"]) for route in endpoints if route.get("source")))
    routes = _plural(len(endpoints), "route")
    if not sources:
        return f"not bound to a source address (the kernel picks one): {routes}, one per endpoint"
    addresses = len(dict.fromkeys(route["address"] for route in endpoints))
    # The demo's sources are consecutive: more than two read better as a range.
    shown = ", ".join(sources) if len(sources) <= 2 else f"{sources[0]} to {sources[-1]}"
    return (
        f"bound to source addresses {shown}: {routes} "
        f"({_plural(addresses, 'endpoint')} × {_plural(len(sources), 'source')})"
    )


# -- summaries ----------------------------------------------------------------------------

UNBOUND = "default"
"""How `port_budget()` names connections bound to no source address, and so the sources
table too."""


def pooled_summary(phase: PhaseResult, described: dict[str, Any], addresses: Sequence[str]) -> Iterator[str]:
    """The pooled run: totals, each endpoint as the channel and as the server saw it, then
    each source address: the calls and connections from it and the ports it uses."""
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
    yield from _endpoints_table(phase, described, addresses)
    yield ""
    yield from sources_summary(phase, described)


def _endpoints_table(phase: PhaseResult, described: dict[str, Any], addresses: Sequence[str]) -> Iterator[str]:
    """Calls per endpoint, its routes (one per source address) added up, against the
    server's own count."""
    stats = dict(zip(addresses, phase.stats, strict=True))
    by_address = _by_address(described)
    rows = [("endpoint", "calls", "share", "errors", "peak ewma", "server saw", "connections")]
    total_calls = sum(_calls(routes) for routes in by_address.values())
    mismatched = 0
    for (address, routes), share in zip(by_address.items(), endpoint_shares(described), strict=True):
        seen = stats.get(address)
        server_calls = int(seen.calls) if seen is not None else 0
        mismatched += seen is None or server_calls != _calls(routes)
        rows.append(
            (
                address,
                f"{_calls(routes):,}",
                f"{share:.1%}",
                f"{_errors(routes):,}",
                f"{max(float(route['ewma_ms']) for route in routes):.2f} ms",
                f"{server_calls:,}" if seen is not None else "-",
                f"{len(seen.peers):,}" if seen is not None else "-",
            )
        )
    server_total = sum(int(s.calls) for s in phase.stats)
    rows.append(
        (
            "total",
            f"{total_calls:,}",
            "100.0%",
            f"{sum(_errors(routes) for routes in by_address.values()):,}",
            "",
            f"{server_total:,}",
            f"{phase.connections:,}",
        )
    )
    yield from _table(rows, "<>>>>>>", indent=2, rule_before_last=True)
    if any(len(routes) > 1 for routes in by_address.values()):
        yield "  calls, errors: the endpoint's routes (one per source address) added up"
        yield "  peak ewma: the highest of its routes' latency estimates"
    yield ""
    if mismatched:
        # A call that failed on the client (a deadline, say) may or may not have reached the server.
        yield f"  channel and server counts differ on {mismatched} endpoint(s)"
        if phase.fault is not None:
            yield "  (a killed server's count of the calls it served last dies with it)"
    else:
        yield "  channel and server counts agree on every endpoint"


def sources_summary(phase: PhaseResult, described: dict[str, Any]) -> Iterator[str]:
    """Per source address: the calls its routes made, the client connections the servers
    saw from it, and its share of the kernel's ephemeral ports (describe()'s port_budget).
    Unbound, one row, "default", holds every connection."""
    budget: dict[str, dict[str, Any]] = described.get("port_budget", {})
    by_source = _by_source(described)
    bound = UNBOUND not in by_source
    hosts = [_peer_host(peer) for stat in phase.stats for peer in stat.peers]
    connections: dict[str, int] = {}
    for host in hosts:
        key = host if bound else UNBOUND
        connections[key] = connections.get(key, 0) + 1
    # A server seeing a peer from an address not among the sources would get a row of its own.
    names = list(dict.fromkeys([*budget, *by_source, *connections]))
    total_calls = sum(_calls(routes) for routes in by_source.values())
    rows = [("source", "calls", "share", "connections", "sockets", "time_wait", "of port range")]
    for name in names:
        routes = by_source.get(name)
        ports = budget.get(name, {})
        rows.append(
            (
                name,
                f"{_calls(routes):,}" if routes else "-",
                f"{_calls(routes) / total_calls:.1%}" if routes and total_calls else "-",
                f"{connections.get(name, 0):,}",
                _count_of(ports, "sockets"),
                _count_of(ports, "time_wait"),
                _range_share(ports),
            )
        )
    if len(names) > 1:
        sockets = sum(int(ports.get("sockets", 0)) for ports in budget.values())
        time_wait = sum(int(ports.get("time_wait", 0)) for ports in budget.values())
        rows.append(("total", f"{total_calls:,}", "100.0%", f"{len(hosts):,}", f"{sockets:,}", f"{time_wait:,}", ""))
    yield from _table(rows, "<>>>>>>", indent=2, rule_before_last=len(names) > 1)
    yield "  connections: distinct client ports the servers saw from the address"
    yield "  sockets, time_wait: its TCP sockets at the end of the run, whoever owns them"
    span = next((ports["ephemeral_range"] for ports in budget.values() if ports.get("ephemeral_range")), None)
    if span is not None:
        low, high = span
        yield f"  of port range: sockets over the {high - low + 1:,} ephemeral ports ({low}-{high}) per address"
    if not bound:
        picked = ", ".join(sorted(set(hosts))) or "-"
        yield f"  default: not bound, the kernel picked {picked}; sockets: every socket to the servers,"
        yield "  the demo's own Stats queries (a connection each) among them"


def _by_address(described: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """describe()'s routes grouped by endpoint address, in target order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for route in described["endpoints"]:
        groups.setdefault(str(route["address"]), []).append(route)
    return groups


def _by_source(described: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """describe()'s routes grouped by source address ("default" when unbound)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for route in described["endpoints"]:
        groups.setdefault(str(route.get("source") or UNBOUND), []).append(route)
    return groups


def _calls(routes: Sequence[dict[str, Any]]) -> int:
    return sum(int(route.get("calls", 0)) for route in routes)


def _errors(routes: Sequence[dict[str, Any]]) -> int:
    return sum(int(route.get("errors", 0)) for route in routes)


def _count_of(ports: dict[str, Any], field: str) -> str:
    return f"{int(ports[field]):,}" if field in ports else "-"


def _range_share(ports: dict[str, Any]) -> str:
    """The share of the ephemeral port range a source's sockets take (port_budget's own
    `share_in_use` is rounded to 0.01 %, too coarse for a handful of connections)."""
    span = ports.get("ephemeral_range")
    if not span or "sockets" not in ports:
        return "-"
    low, high = span
    return f"{int(ports['sockets']) / (high - low + 1):.3%}"


def _peer_host(peer: str) -> str:
    """The IP address in a grpc peer: "ipv4:127.0.0.2:40312" and "ipv6:%5B::ffff:127.0.0.2%5D:40312"
    are both "127.0.0.2" (grpc dials IPv4 on dual-stack sockets)."""
    _, _, address = urllib.parse.unquote(peer).partition(":")
    host = address.rpartition(":")[0].strip("[]")
    return host.removeprefix("::ffff:")


PHASE_NAMES = {"before": "before", "down": "while down", "after": "after restart"}


def fault_summary(report: FaultReport) -> Iterator[str]:
    """The killed server's story: calls per endpoint and phase, failures, what the server
    itself saw, and its status changes as the channel reported them."""
    yield f"fault: {report.victim} {_fault_story(report)}"
    phases = report.phases()
    victim = report.addresses.index(report.victim)
    rows = [
        ("calls by phase", *(PHASE_NAMES[end.phase] for _, end in phases)),
        ("seconds", *(f"{start.at:.1f}-{end.at:.1f}" for start, end in phases)),
    ]
    for address in report.addresses:
        marker = " *" if address == report.victim else ""
        rows.append((address + marker, *(_endpoint_calls(address, start, end) for start, end in phases)))
    rule = len(rows)
    rows.append(("all calls", *(f"{end.load.calls - start.load.calls:,}" for start, end in phases)))
    rows.append(("failed calls", *(f"{end.load.errors - start.load.errors:,}" for start, end in phases)))
    rows.append(("killed server saw", *(_server_calls(end.stats, victim) for _, end in phases)))
    yield from _table(rows, "<" + ">" * len(phases), indent=2, rule_before=rule)
    yield "  * killed: calls the channel made to each server (failed ones in brackets); the killed"
    yield "    server's own count starts again from zero when it restarts"
    yield ""
    after = [end for _, end in phases if end.phase == "after"]
    if after:
        served = _server_calls(after[0].stats, victim)
        yield f"  the killed server served {served} calls after its restart"
    yield from _transitions(report.victim, report.marks[-1])


def _fault_story(report: FaultReport) -> str:
    if report.killed_at is None:
        return "was to be killed, but the run ended first"
    story = f"killed at {report.killed_at:.1f} s"
    if report.error is not None:
        return f"{story}; {report.error}"
    if report.restarted_at is None:
        return f"{story}, restarted after the run"
    return f"{story}, restarted on the same port at {report.restarted_at:.1f} s"


def _endpoint_calls(address: str, start: Mark, end: Mark) -> str:
    """Calls the channel made to `address` (all its routes) between two marks, failed ones
    in brackets."""
    before = _by_address(start.described).get(address, [])
    after = _by_address(end.described).get(address, [])
    calls = _calls(after) - _calls(before)
    errors = _errors(after) - _errors(before)
    return f"{calls:,} ({errors:,} failed)" if errors else f"{calls:,}"


def _server_calls(stats: Sequence[StatsResponse | None], index: int) -> str:
    stat = stats[index] if index < len(stats) else None
    return "down" if stat is None else f"{int(stat.calls):,}"


def _transitions(address: str, mark: Mark) -> Iterator[str]:
    """`address`'s status now and its changes, in seconds into the run, as `mark`'s
    describe() reported them (a pool without endpoint health reports none). Bound to
    source addresses, the endpoint is a route per source, each with a status of its own,
    and the pool names each "<address> from <source>" in its transitions."""
    routes = _by_address(mark.described).get(address, [])
    if any(route.get("source") for route in routes):
        yield f"  {address} as the channel saw it, from each source address:"
        for route in routes:
            yield f"    from {route.get('source') or UNBOUND}: {_route_status(route)}"
    else:
        yield f"  {address} as the channel saw it: {_route_status(routes[0] if routes else {})}"
    if "transitions" not in mark.described:
        yield "    (this channel reports no status changes)"
        return
    changes = [t for t in mark.described["transitions"] if _names_route_to(str(t.get("endpoint", "")), address)]
    if not changes:
        yield "    no status changes"
    for change in changes:
        at = mark.described_at - float(change["ago_s"])
        via = str(change["endpoint"]).removeprefix(address).strip()  # "from 127.0.0.2", or "" unbound
        yield f"    {at:5.1f} s  {via + '  ' if via else ''}{change['from']} -> {change['to']}  ({change['why']})"


def _route_status(route: dict[str, Any]) -> str:
    ejections = route.get("ejections")
    ejected = "-" if ejections is None else _plural(int(ejections), "time")
    return f"status {route.get('status', '-')}, health {route.get('health', '-')}, ejected {ejected}"


def _names_route_to(name: str, address: str) -> bool:
    """Whether a route named `name` ("10.0.0.1:50051", "10.0.0.1:50051 from 10.0.0.7") goes
    to the endpoint `address`."""
    return name == address or name.startswith(address + " ")


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
    rows: Sequence[Sequence[str]],
    align: str,
    *,
    indent: int = 0,
    rule_before_last: bool = False,
    rule_before: int | None = None,
) -> Iterator[str]:
    """Rows as aligned columns: `align` has one "<" (left) or ">" (right) per column; a
    rule of dashes before the last row, or before row `rule_before`."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(align))]
    pad = " " * indent
    if rule_before_last:
        rule_before = len(rows) - 1
    for index, row in enumerate(rows):
        if index == rule_before:
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
