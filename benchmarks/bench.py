"""poolkit's benchmark: unary echo over loopback, poolkit against plain grpcio.

    python benchmarks/bench.py [--quick] [--json out.json] [--rounds N] [--calls N]
                               [--only {sync,aio,slow,hedge,future,telemetry}[,...]]

Six parts, each of which can be run alone with --only (repeatable, or a comma list):
"sync" (threads), "aio" (asyncio tasks), "slow" (the slow-endpoint case), "hedge"
(hedged requests against one sometimes-slow server), "future" (`future().result()`)
and "telemetry" (OpenTelemetry off, on with no provider, on with the SDK).

The echo servers run in a child process (`poolkit.testing.spawn_echo_servers`), so the
client's CPU time (`time.process_time()`, every thread of this process, grpc's own
included) is the client's alone.

The machine this runs on is shared and noisy, so no absolute number is meant to be
compared with another run. Within one run, every (concurrency, payload) group runs
rounds that interleave its cases, in an order shuffled per round; each metric is the
median over rounds and each ratio is median(case) / median(raw grpcio single channel).
The median of the per-round (paired) ratios and its quartiles are reported too: how far
apart they are says how much the machine's noise moved the figures. The pooled and raw
channels are built once and kept across rounds, as a service keeps them, and are warmed
up before anything is measured.

Cases:
  grpc-1ch        one `grpc.insecure_channel` to one server, stub built once (the baseline)
  poolkit-1ep     poolkit over the same single server
  poolkit-4ep     poolkit over four servers
  poolkit-1ep-noretry  poolkit over the same single server with retry=None: the
                  success-path cost of retries is poolkit-1ep against it
  poolkit-4ep-1src, poolkit-4ep-4src  poolkit over the same four servers with its connections
                  bound to one source address (127.0.0.2) or four (127.0.0.2-5; 16 routes):
                  the cost of source binding is these against poolkit-4ep
  grpc-rr-4ep     one grpc channel with its round_robin policy over the same four servers:
                  the cost of four connections without poolkit, to read poolkit-4ep against
  grpc-fresh      a new grpc channel + stub per call, closed after (contrast; fewer calls).
                  grpc's global subchannel pool lets channels that are open at the same
                  time share one connection, so under concurrency it opens fewer sockets
                  than calls; the column "conns" shows how many it did open.

asyncio cases (part "aio"), each group on one event loop (one `asyncio.run` that opens
the channels, warms them up, runs every round and closes them), the calls made by
`concurrency` tasks on that loop:
  grpc-aio-1ch    one `grpc.aio.insecure_channel` to one server (the baseline of these rows)
  poolkit-aio-1ep poolkit.aio over the same single server
  poolkit-aio-4ep poolkit.aio over four servers
  grpc-aio-rr-4ep one grpc.aio channel with round_robin over the same four servers, to read
                  poolkit-aio-4ep against, as grpc-rr-4ep is for poolkit-4ep
At concurrency 256 a measurement makes at least `aio_calls_per_task` calls per task, so
that it is more than the burst of the first 256 calls and the drain of the last.

The future part (64 B): the same call made as `stub.Unary.future(request).result()`:
  grpc-1ch-future          one grpc channel (the baseline of these rows)
  poolkit-1ep-future       poolkit over the same single server, retries on (the default):
                           its future is poolkit's retrying future
  poolkit-1ep-noretry-future  the same with retry=None: grpc's own future on a pool slot

The telemetry part (64 B, one server), with threads and, as in the "aio" part, with
tasks on one event loop per group:
  poolkit-1ep-notel        PoolConfig(telemetry=False) (the baseline of these rows)
  poolkit-1ep-noop         telemetry on, no OpenTelemetry provider installed (the API's
                           no-op, checked before and after each measurement): held to
                           client CPU per call within 1.02x of notel
  poolkit-1ep-sdk          telemetry on, the SDK installed for this case's measurements
                           only, in its simplest synchronous pipeline: a TracerProvider with
                           SimpleSpanProcessor(InMemorySpanExporter()) and a MeterProvider
                           with an InMemoryMetricReader. Each measurement must have exported
                           spans and recorded calls in grpc.client.call.duration; its extra
                           client CPU per call is reported in microseconds (sdk - notel)
  grpc-1ch                 one grpc channel, for context
  poolkit-aio-1ep-notel, poolkit-aio-1ep-noop, poolkit-aio-1ep-sdk, grpc-aio-1ch: the same
                           with poolkit.aio and grpc.aio

The slow-endpoint case: four servers, one answering 20 ms late; poolkit's P2C peak EWMA
against grpc's own round_robin policy over the same addresses. It reports latency and
the share of calls the slow server received (from the servers' own counts).

"conns" is how many distinct client connections the servers saw during a measurement
(their Stats are reset before each): one per persistent connection, one per new socket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Self

import grpc
import grpc.aio
import opentelemetry.metrics._internal as otel_metrics_state
import opentelemetry.trace as otel_trace_state
from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace as otel_trace
from opentelemetry.util._once import Once

import poolkit
import poolkit.aio
from poolkit import testing

CallFn = Callable[..., Any]
AioCallFn = Callable[..., Awaitable[Any]]
# What a case needs around its warm-up and each of its measurements (outside the clocks).
Around = Callable[[], contextlib.AbstractContextManager[Any]]

# Every call carries a deadline, so a stuck server cannot stall the benchmark.
CALL_TIMEOUT = 10.0
SLOW_DELAY = 0.020
# Enough server threads that concurrency 32 never queues on the server's executor, even
# when every call of the slow-endpoint case lands on the slow server. The asyncio part's
# 256 calls in flight need no more: calls beyond a server's 64 handler threads wait in its
# executor's queue (an echo handler takes microseconds), well inside grpc's defaults of
# unlimited streams per connection and 1,000 pending requests per server; more threads
# would only add GIL contention to the server process on a 2-core machine. A call the
# servers turned away would show in the "errors" column.
SERVER_WORKERS = 64
BASELINE = "grpc-1ch"
AIO_BASELINE = "grpc-aio-1ch"
PARTS = ("sync", "aio", "slow", "hedge", "future", "telemetry")
# The hedging case: one server of four answers this late on this share of its calls.
HEDGE_DELAY = 0.050
HEDGE_SHARE = 0.1
SETTLE = 0.1  # seconds of quiet before each measurement
CPU_TARGET = 1.05
# poolkit with retries (and requeues) switched off: the success path's cost of retries
# is poolkit-1ep against this.
NO_RETRY = "poolkit-1ep-noretry"
AIO_NO_RETRY = "poolkit-aio-1ep-noretry"
FUTURE_BASELINE = "grpc-1ch-future"
FUTURE = "poolkit-1ep-future"
FUTURE_NO_RETRY = "poolkit-1ep-noretry-future"
NO_RETRY_CONFIG = poolkit.PoolConfig(retry=None)
# The telemetry part. The requirement: with no provider installed, telemetry costs
# at most 2 % of client CPU per call over telemetry switched off.
NOTEL = "poolkit-1ep-notel"
NOOP = "poolkit-1ep-noop"
SDK = "poolkit-1ep-sdk"
AIO_NOTEL = "poolkit-aio-1ep-notel"
AIO_NOOP = "poolkit-aio-1ep-noop"
AIO_SDK = "poolkit-aio-1ep-sdk"
NO_TELEMETRY_CONFIG = poolkit.PoolConfig(telemetry=False)
NOOP_TARGET = 1.02
# Source binding: the same four servers from one or four local source addresses.
ONE_SOURCE = "poolkit-4ep-1src"
FOUR_SOURCES = "poolkit-4ep-4src"
SOURCE_CONFIGS = {
    ONE_SOURCE: poolkit.PoolConfig(source_addresses=["127.0.0.2"]),
    FOUR_SOURCES: poolkit.PoolConfig(source_addresses=[f"127.0.0.{i}" for i in range(2, 6)]),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    quick: bool
    rounds: int
    calls: int  # per measurement, persistent-channel cases
    fresh_calls: int  # per measurement, the channel-per-call case
    warmup_calls: int
    concurrencies: tuple[int, ...]
    payloads: tuple[int, ...]
    slow_concurrencies: tuple[int, ...]
    slow_rounds: int
    slow_calls: int
    measurement_limit: float  # seconds; a measurement stops early (and says so) past this
    aio_concurrencies: tuple[int, ...]
    aio_calls_per_task: int  # an asyncio measurement makes at least this many per task
    parts: tuple[str, ...] = PARTS

    def aio_calls(self, concurrency: int) -> int:
        return max(self.calls, self.aio_calls_per_task * concurrency)


def settings_from(args: argparse.Namespace) -> Settings:
    if args.quick:
        base = Settings(
            quick=True,
            rounds=3,
            calls=400,
            fresh_calls=40,
            warmup_calls=150,
            concurrencies=(1, 32),
            payloads=(64,),
            slow_concurrencies=(32,),
            slow_rounds=3,
            slow_calls=600,
            measurement_limit=15.0,
            aio_concurrencies=(1, 256),
            aio_calls_per_task=2,
        )
    else:
        base = Settings(
            quick=False,
            # Many short rounds rather than a few long ones: on a shared machine the load
            # drifts, and short interleaved rounds see the same drift in every case.
            rounds=21,
            calls=1000,
            fresh_calls=100,
            warmup_calls=500,
            concurrencies=(1, 32),
            payloads=(64, 16 * 1024),
            slow_concurrencies=(32, 8),
            slow_rounds=9,
            slow_calls=1000,
            measurement_limit=60.0,
            aio_concurrencies=(1, 256),
            aio_calls_per_task=8,
        )
    changes: dict[str, Any] = {"parts": tuple(part for part in PARTS if part in (args.only or PARTS))}
    if args.rounds is not None:
        changes["rounds"] = changes["slow_rounds"] = args.rounds
    if args.calls is not None:
        # Exactly what was asked, at every concurrency.
        changes["calls"] = changes["slow_calls"] = args.calls
        changes["fresh_calls"] = max(args.calls // 10, 1)
        changes["aio_calls_per_task"] = 0
    return dataclasses.replace(base, **changes)


# -- one measurement ---------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    """One measurement of one case: `calls` calls spread over `concurrency` threads."""

    calls: int
    errors: int
    wall: float
    cpu: float
    latencies: list[float]
    conns: int
    per_server_calls: list[int]
    cut_short: bool

    metrics: dict[str, float] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        ordered = sorted(self.latencies)
        nan = float("nan")
        self.metrics = {
            "rps": self.calls / self.wall if self.wall > 0 else 0.0,
            "mean_ms": statistics.fmean(ordered) * 1000 if ordered else nan,
            "p50_ms": percentile(ordered, 0.50) * 1000,
            "p90_ms": percentile(ordered, 0.90) * 1000,
            "p99_ms": percentile(ordered, 0.99) * 1000,
            "cpu_us_per_call": self.cpu / self.calls * 1e6 if self.calls else nan,
            "conns": float(self.conns),
        }


def percentile(ordered: Sequence[float], q: float) -> float:
    """Of sorted values; linear interpolation between closest ranks (numpy's default)."""
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclasses.dataclass
class Run:
    latencies: list[float]
    errors: int
    cut_short: bool  # the time limit stopped it before every call was made
    wall: float
    cpu: float


def run_calls(call: CallFn, request: Any, calls: int, concurrency: int, limit: float) -> Run:
    """Make `calls` calls from `concurrency` threads. The threads are started and parked
    before the clocks start, so thread start-up is outside the wall and CPU times."""
    shares = _shares(calls, concurrency)
    latencies: list[list[float]] = [[] for _ in shares]
    errors = [0] * concurrency
    failures: list[BaseException] = []
    go = threading.Event()
    deadline_box: list[float] = []

    def worker(index: int) -> None:
        go.wait()
        deadline = deadline_box[0]
        mine = latencies[index]
        clock = time.perf_counter
        try:
            for _ in range(shares[index]):
                if clock() > deadline:
                    return
                start = clock()
                try:
                    call(request, timeout=CALL_TIMEOUT)
                except grpc.RpcError:
                    errors[index] += 1
                    continue
                mine.append(clock() - start)
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    deadline_box.append(wall0 + limit)
    go.set()
    for thread in threads:
        thread.join(limit + CALL_TIMEOUT + 5)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError("benchmark workers did not finish in time")
    if failures:
        raise failures[0]
    flat = [x for part in latencies for x in part]
    return Run(flat, sum(errors), len(flat) + sum(errors) < calls, wall, cpu)


def _shares(calls: int, concurrency: int) -> list[int]:
    return [calls // concurrency + (1 if i < calls % concurrency else 0) for i in range(concurrency)]


async def run_calls_aio(call: AioCallFn, request: Any, calls: int, concurrency: int, limit: float) -> Run:
    """`run_calls` for asyncio: `calls` calls from `concurrency` tasks on the running loop.
    The tasks are created and parked before the clocks start, as the threads are."""
    shares = _shares(calls, concurrency)
    latencies: list[list[float]] = [[] for _ in shares]
    errors = [0] * concurrency
    go = asyncio.Event()
    deadline_box: list[float] = []

    async def worker(index: int) -> None:
        await go.wait()
        deadline = deadline_box[0]
        mine = latencies[index]
        clock = time.perf_counter
        for _ in range(shares[index]):
            if clock() > deadline:
                return
            start = clock()
            try:
                await call(request, timeout=CALL_TIMEOUT)
            except grpc.RpcError:  # grpc.aio.AioRpcError is one
                errors[index] += 1
                continue
            mine.append(clock() - start)

    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    await asyncio.sleep(0)  # every task runs up to `go.wait()`
    wall0, cpu0 = time.perf_counter(), time.process_time()
    deadline_box.append(wall0 + limit)
    go.set()
    _, unfinished = await asyncio.wait(tasks, timeout=limit + CALL_TIMEOUT + 5)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if unfinished:
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        raise RuntimeError("benchmark tasks did not finish in time")
    for task in tasks:
        task.result()  # a task's unexpected exception, raised here
    flat = [x for part in latencies for x in part]
    return Run(flat, sum(errors), len(flat) + sum(errors) < calls, wall, cpu)


def measure(
    servers: testing.SpawnedEchoServers, call: CallFn, request: Any, calls: int, concurrency: int, limit: float
) -> Sample:
    servers.stats(reset=True)
    gc.collect()
    # Let the previous measurement's background work (grpc closing channels, the server
    # tearing down connections) finish before the clocks start, not inside them.
    time.sleep(SETTLE)
    run = run_calls(call, request, calls, concurrency, limit)
    return _sample(run, servers.stats(reset=True))


async def measure_aio(
    servers: testing.SpawnedEchoServers, call: AioCallFn, request: Any, calls: int, concurrency: int, limit: float
) -> Sample:
    """`measure` on the running loop. The servers' Stats are asked with a blocking call,
    which is fine here: nothing else is in flight on the loop between measurements."""
    servers.stats(reset=True)
    gc.collect()
    # Sleeping on the loop, not beside it, lets grpc.aio's and poolkit.aio's callbacks of
    # the previous measurement run now rather than inside this one.
    await asyncio.sleep(SETTLE)
    run = await run_calls_aio(call, request, calls, concurrency, limit)
    return _sample(run, servers.stats(reset=True))


def _sample(run: Run, stats: Sequence[testing.StatsResponse]) -> Sample:
    return Sample(
        calls=len(run.latencies) + run.errors,
        errors=run.errors,
        wall=run.wall,
        cpu=run.cpu,
        latencies=run.latencies,
        conns=sum(len(s.peers) for s in stats),
        per_server_calls=[s.calls for s in stats],
        cut_short=run.cut_short,
    )


# -- the cases ---------------------------------------------------------------------------


class Case:
    """A named way of making a unary echo call, built once and reused for every round;
    `around` is entered for its warm-up and for each of its measurements."""

    def __init__(
        self,
        name: str,
        call: CallFn,
        calls: int,
        closer: Callable[[], None] | None = None,
        around: Around = contextlib.nullcontext,
    ) -> None:
        self.name = name
        self.call = call
        self.calls = calls
        self._closer = closer
        self.around = around

    def close(self) -> None:
        if self._closer is not None:
            self._closer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def grpc_single_channel(address: str, calls: int) -> Case:
    # The "ipv4:" form, as poolkit's own connections use; it also keeps this channel's
    # connection apart from the plain "host:port" channels of grpc-fresh, which grpc's
    # global subchannel pool would otherwise let ride on this one.
    channel = grpc.insecure_channel(f"ipv4:{address}")
    stub = testing.EchoStub(channel)
    return Case(BASELINE, stub.Unary, calls, channel.close)


def as_future(case: Case) -> Case:
    """The same channel's calls made as `future(...).result()` (it closes with `case`)."""
    method = case.call

    def call(request: Any, timeout: float) -> Any:
        return method.future(request, timeout=timeout).result()

    return Case(f"{case.name}-future", call, case.calls, case.close)


def grpc_fresh_channel(address: str, calls: int) -> Case:
    def call(request: Any, timeout: float) -> Any:
        with grpc.insecure_channel(address) as channel:
            return testing.EchoStub(channel).Unary(request, timeout=timeout)

    return Case("grpc-fresh", call, calls)


def poolkit_channel(
    name: str,
    target: str,
    calls: int,
    config: poolkit.PoolConfig | None = None,
    around: Around = contextlib.nullcontext,
) -> Case:
    channel = poolkit.insecure_channel(target, config=config)
    stub = testing.EchoStub(channel)
    return Case(name, stub.Unary, calls, channel.close, around)


def grpc_round_robin(name: str, target: str, calls: int) -> Case:
    """grpc's own answer to many endpoints: one channel, its round_robin policy, one
    connection per address. Next to poolkit-4ep it shows what four connections cost
    with no poolkit involved."""
    channel = grpc.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")])
    stub = testing.EchoStub(channel)
    return Case(name, stub.Unary, calls, channel.close)


@dataclasses.dataclass
class AioCase:
    """An asyncio case: a channel opened on the group's event loop, and its stub's method;
    `around` is entered for its warm-up and for each of its measurements."""

    name: str
    channel: grpc.aio.Channel
    calls: int
    around: Around = contextlib.nullcontext
    call: AioCallFn = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.call = testing.EchoStub(self.channel).Unary

    async def close(self) -> None:
        await self.channel.close(None)


def aio_cases(servers: testing.SpawnedEchoServers, calls: int) -> list[AioCase]:
    """The asyncio cases, opened on the running loop (grpc.aio binds a channel to it)."""
    first = servers.addresses[0]
    channels: list[tuple[str, grpc.aio.Channel]] = [
        # "ipv4:", as in grpc-1ch: the address form poolkit's own connections use.
        (AIO_BASELINE, grpc.aio.insecure_channel(f"ipv4:{first}")),
        ("poolkit-aio-1ep", poolkit.aio.insecure_channel(f"ipv4:{first}")),
        (AIO_NO_RETRY, poolkit.aio.insecure_channel(f"ipv4:{first}", config=NO_RETRY_CONFIG)),
        ("poolkit-aio-4ep", poolkit.aio.insecure_channel(servers.target)),
        (
            "grpc-aio-rr-4ep",
            grpc.aio.insecure_channel(servers.target, options=[("grpc.lb_policy_name", "round_robin")]),
        ),
    ]
    return [AioCase(name, channel, calls) for name, channel in channels]


def telemetry_aio_cases(servers: testing.SpawnedEchoServers, calls: int, sdk: SdkTelemetry) -> list[AioCase]:
    """The telemetry part's asyncio cases, opened on the running loop, all on the one server."""
    target = f"ipv4:{servers.addresses[0]}"
    return [
        AioCase(AIO_BASELINE, grpc.aio.insecure_channel(target), calls),
        AioCase(AIO_NOTEL, poolkit.aio.insecure_channel(target, config=NO_TELEMETRY_CONFIG), calls),
        AioCase(AIO_NOOP, poolkit.aio.insecure_channel(target), calls, around=no_provider),
        AioCase(AIO_SDK, poolkit.aio.insecure_channel(target), calls, around=sdk.installed),
    ]


# -- OpenTelemetry, for the telemetry part -------------------------------------------------


def no_provider_installed() -> bool:
    """Whether poolkit's telemetry is on its no-op path: no tracer or meter provider is
    installed and the current context carries nothing to propagate."""
    return (
        otel_trace_state._TRACER_PROVIDER is None
        and otel_metrics_state._METER_PROVIDER is None
        and not otel_context.get_current()
    )


@contextlib.contextmanager
def no_provider() -> Iterator[None]:
    """Around the no-op case: measured with no provider installed, or not at all. Nothing
    but this script runs between the two checks, and it installs none."""
    if not no_provider_installed():
        raise RuntimeError("an OpenTelemetry provider is installed before a no-op measurement")
    yield
    if not no_provider_installed():
        raise RuntimeError("an OpenTelemetry provider was installed during a no-op measurement")


def uninstall_providers() -> None:
    """Back to a process where no provider was ever set, as opentelemetry-python's own test
    utilities do it (the API lets a process set its providers once). The proxies are new
    too: the old ones forward to the provider that was set."""
    otel_trace_state._TRACER_PROVIDER_SET_ONCE = Once()
    otel_trace_state._TRACER_PROVIDER = None
    otel_trace_state._PROXY_TRACER_PROVIDER = otel_trace_state.ProxyTracerProvider()
    otel_metrics_state._METER_PROVIDER_SET_ONCE = Once()
    otel_metrics_state._METER_PROVIDER = None
    otel_metrics_state._PROXY_METER_PROVIDER = otel_metrics_state._ProxyMeterProvider()


class SdkTelemetry:
    """OpenTelemetry's SDK in its simplest synchronous pipeline: each span exported in the
    calling thread as it ends (SimpleSpanProcessor into an InMemorySpanExporter; no batching
    thread doing the work outside the client's measured path), metrics read on demand (an
    InMemoryMetricReader).

    `installed` makes it the process's providers for one warm-up or measurement and takes
    it out afterwards, so every other case runs with none. It counts what each one
    recorded, outside the clocks, and fails one that recorded nothing."""

    CALL_METRIC = "grpc.client.call.duration"

    def __init__(self) -> None:
        # The SDK is a development dependency, not poolkit's: only this part needs it.
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        self.exporter = InMemorySpanExporter()
        # Shut down by `close`, not at exit: by then they are long out of the globals.
        self.tracer_provider = TracerProvider(shutdown_on_exit=False)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader], shutdown_on_exit=False)
        self._calls_so_far = 0
        # Per installation, in order: (spans exported, calls recorded in CALL_METRIC).
        self.recorded: list[tuple[int, int]] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if not no_provider_installed():
            raise RuntimeError("an OpenTelemetry provider is installed already, or the context carries one")
        otel_trace.set_tracer_provider(self.tracer_provider)
        otel_metrics.set_meter_provider(self.meter_provider)
        try:
            yield
        finally:
            uninstall_providers()
            spans = len(self.exporter.get_finished_spans())
            # Cleared after every measurement, so memory stays bounded however many rounds run.
            self.exporter.clear()
        total = self._calls_in_metric()  # cumulative: this installation's share is the change
        calls, self._calls_so_far = total - self._calls_so_far, total
        self.recorded.append((spans, calls))
        if spans <= 0 or calls <= 0:
            raise RuntimeError(
                f"with the SDK installed poolkit exported {spans} spans and recorded {calls} calls in"
                f" {self.CALL_METRIC}: the sdk case would measure nothing"
            )

    def _calls_in_metric(self) -> int:
        data = self.reader.get_metrics_data()
        if data is None:
            return 0
        return sum(
            point.count
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == self.CALL_METRIC
            for point in metric.data.data_points
        )

    def per_call(self, samples: Sequence[Sample]) -> dict[str, float]:
        """What the last len(`samples`) installations (these measurements) recorded per call made."""
        made = sum(sample.calls for sample in samples)
        recorded = self.recorded[-len(samples) :] if samples else []
        return {
            "spans_per_call": _ratio(sum(spans for spans, _ in recorded), made),
            "metric_calls_per_call": _ratio(sum(calls for _, calls in recorded), made),
        }

    def close(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- rounds and summaries ----------------------------------------------------------------

METRICS = ("rps", "mean_ms", "p50_ms", "p90_ms", "p99_ms", "cpu_us_per_call", "conns")


def run_rounds(
    servers: testing.SpawnedEchoServers,
    cases: Sequence[Case],
    request: Any,
    concurrency: int,
    rounds: int,
    warmup_calls: int,
    limit: float,
    progress: str,
) -> dict[str, list[Sample]]:
    """Warm every case up, then `rounds` rounds that each measure every case once, in an
    order shuffled per round (seeded, so runs are alike) so that no case always follows
    the same neighbour, whose after-effects (closing sockets, say) it would inherit."""
    for case in cases:
        with case.around():
            run_calls(case.call, request, min(warmup_calls, case.calls), concurrency, limit)
    order = random.Random(f"{progress}")
    samples: dict[str, list[Sample]] = {case.name: [] for case in cases}
    for index in range(rounds):
        print(f"  {progress}: round {index + 1}/{rounds}", file=sys.stderr, flush=True)
        for case in order.sample(list(cases), len(cases)):
            with case.around():
                samples[case.name].append(measure(servers, case.call, request, case.calls, concurrency, limit))
    return samples


async def run_rounds_aio(
    servers: testing.SpawnedEchoServers,
    settings: Settings,
    concurrency: int,
    payload: int,
    progress: str,
    open_cases: Callable[[testing.SpawnedEchoServers, int], list[AioCase]] = aio_cases,
) -> dict[str, list[Sample]]:
    """One asyncio group, start to end on the running loop: open every case's channel
    (`open_cases`), warm each up, run the rounds as `run_rounds` does, close the channels."""
    calls = settings.aio_calls(concurrency)
    request = testing.EchoRequest(payload=os.urandom(payload))
    limit = settings.measurement_limit
    cases = open_cases(servers, calls)
    try:
        # At least one call per task: the burst of `concurrency` calls at once has grown
        # the servers' handler threads and grpc's own buffers before anything is measured.
        warmup = max(min(settings.warmup_calls, calls), concurrency)
        for case in cases:
            with case.around():
                await run_calls_aio(case.call, request, warmup, concurrency, limit)
        order = random.Random(f"{progress}")
        samples: dict[str, list[Sample]] = {case.name: [] for case in cases}
        for index in range(settings.rounds):
            print(f"  {progress}: round {index + 1}/{settings.rounds}", file=sys.stderr, flush=True)
            for case in order.sample(cases, len(cases)):
                with case.around():
                    sample = await measure_aio(servers, case.call, request, calls, concurrency, limit)
                samples[case.name].append(sample)
        return samples
    finally:
        for case in cases:
            await case.close()


def summarise(samples: dict[str, list[Sample]], baseline: str) -> dict[str, dict[str, Any]]:
    """Median of each metric over rounds; ratio of medians to the baseline's; and the
    per-round (paired) ratios' median and quartiles, to show how much the noise moved them."""
    medians = {
        name: {metric: statistics.median(s.metrics[metric] for s in runs) for metric in METRICS}
        for name, runs in samples.items()
    }
    summary: dict[str, dict[str, Any]] = {}
    for name, runs in samples.items():
        base_runs = samples[baseline]
        paired = {
            metric: [_ratio(s.metrics[metric], b.metrics[metric]) for s, b in zip(runs, base_runs, strict=True)]
            for metric in METRICS
        }
        summary[name] = {
            **medians[name],
            "calls_per_round": runs[0].calls if runs else 0,
            "errors": sum(s.errors for s in runs),
            "cut_short_rounds": sum(s.cut_short for s in runs),
            "ratios": {metric: _ratio(medians[name][metric], medians[baseline][metric]) for metric in METRICS},
            "paired_ratios": {metric: _spread(v) for metric, v in paired.items()},
            "rounds": [
                {**s.metrics, "calls": s.calls, "errors": s.errors, "per_server_calls": s.per_server_calls}
                for s in runs
            ],
        }
    return summary


def _spread(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "q1": percentile(ordered, 0.25),
        "q3": percentile(ordered, 0.75),
        "min": ordered[0],
        "max": ordered[-1],
    }


def _ratio(value: float, base: float) -> float:
    return value / base if base else float("nan")


# -- the two parts -----------------------------------------------------------------------


def bench_overhead(settings: Settings) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        servers = stack.enter_context(testing.spawn_echo_servers(4, max_workers=SERVER_WORKERS))
        first = servers.addresses[0]
        cases = [
            stack.enter_context(grpc_single_channel(first, settings.calls)),
            stack.enter_context(poolkit_channel("poolkit-1ep", f"ipv4:{first}", settings.calls)),
            stack.enter_context(poolkit_channel(NO_RETRY, f"ipv4:{first}", settings.calls, NO_RETRY_CONFIG)),
            stack.enter_context(poolkit_channel("poolkit-4ep", servers.target, settings.calls)),
            *(
                stack.enter_context(poolkit_channel(name, servers.target, settings.calls, config))
                for name, config in SOURCE_CONFIGS.items()
            ),
            stack.enter_context(grpc_round_robin("grpc-rr-4ep", servers.target, settings.calls)),
            stack.enter_context(grpc_fresh_channel(first, settings.fresh_calls)),
        ]
        for concurrency in settings.concurrencies:
            for payload in settings.payloads:
                request = testing.EchoRequest(payload=os.urandom(payload))
                samples = run_rounds(
                    servers,
                    cases,
                    request,
                    concurrency,
                    settings.rounds,
                    settings.warmup_calls,
                    settings.measurement_limit,
                    f"concurrency {concurrency}, {payload} B",
                )
                groups.append({"concurrency": concurrency, "payload": payload, "cases": summarise(samples, BASELINE)})
    return groups


def bench_future(settings: Settings) -> list[dict[str, Any]]:
    """Futures at 64 B: poolkit's retrying future against grpc's own, on one server."""
    groups: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        servers = stack.enter_context(testing.spawn_echo_servers(1, max_workers=SERVER_WORKERS))
        (address,) = servers.addresses
        cases = [
            stack.enter_context(as_future(grpc_single_channel(address, settings.calls))),
            stack.enter_context(as_future(poolkit_channel("poolkit-1ep", f"ipv4:{address}", settings.calls))),
            stack.enter_context(
                as_future(poolkit_channel(NO_RETRY, f"ipv4:{address}", settings.calls, NO_RETRY_CONFIG))
            ),
        ]
        request = testing.EchoRequest(payload=os.urandom(64))
        for concurrency in settings.concurrencies:
            progress = f"future, concurrency {concurrency}, 64 B"
            samples = run_rounds(
                servers,
                cases,
                request,
                concurrency,
                settings.rounds,
                settings.warmup_calls,
                settings.measurement_limit,
                progress,
            )
            groups.append({"concurrency": concurrency, "payload": 64, "cases": summarise(samples, FUTURE_BASELINE)})
    return groups


def bench_telemetry(settings: Settings) -> list[dict[str, Any]]:
    """Telemetry at 64 B on one server, threads: off, on with no provider, on with the SDK."""
    groups: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        servers = stack.enter_context(testing.spawn_echo_servers(1, max_workers=SERVER_WORKERS))
        (address,) = servers.addresses
        target = f"ipv4:{address}"
        # One pair of providers for the part, made once and kept across rounds as the channels are.
        sdk = stack.enter_context(SdkTelemetry())
        cases = [
            stack.enter_context(grpc_single_channel(address, settings.calls)),
            stack.enter_context(poolkit_channel(NOTEL, target, settings.calls, NO_TELEMETRY_CONFIG)),
            stack.enter_context(poolkit_channel(NOOP, target, settings.calls, around=no_provider)),
            stack.enter_context(poolkit_channel(SDK, target, settings.calls, around=sdk.installed)),
        ]
        request = testing.EchoRequest(payload=os.urandom(64))
        for concurrency in settings.concurrencies:
            samples = run_rounds(
                servers,
                cases,
                request,
                concurrency,
                settings.rounds,
                settings.warmup_calls,
                settings.measurement_limit,
                f"telemetry, concurrency {concurrency}, 64 B",
            )
            groups.append(
                {
                    "concurrency": concurrency,
                    "payload": 64,
                    "cases": summarise(samples, NOTEL),
                    "sdk_recorded": sdk.per_call(samples[SDK]),
                }
            )
    return groups


def bench_telemetry_aio(settings: Settings) -> list[dict[str, Any]]:
    """The telemetry part with poolkit.aio and grpc.aio, each group on one event loop."""
    groups: list[dict[str, Any]] = []
    with testing.spawn_echo_servers(1, max_workers=SERVER_WORKERS) as servers:
        for concurrency in settings.concurrencies:
            progress = f"telemetry aio, concurrency {concurrency}, 64 B"
            # A pair of providers per group, as its channels are. Opening a channel while
            # none is installed has poolkit drop the instruments it made; made again on the
            # same MeterProvider, they would be registered there twice.
            with SdkTelemetry() as sdk:
                open_cases = functools.partial(telemetry_aio_cases, sdk=sdk)
                samples = asyncio.run(run_rounds_aio(servers, settings, concurrency, 64, progress, open_cases))
                recorded = sdk.per_call(samples[AIO_SDK])
            groups.append(
                {
                    "concurrency": concurrency,
                    "payload": 64,
                    "cases": summarise(samples, AIO_NOTEL),
                    "sdk_recorded": recorded,
                }
            )
    return groups


def bench_aio(settings: Settings) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    with testing.spawn_echo_servers(4, max_workers=SERVER_WORKERS) as servers:
        for concurrency in settings.aio_concurrencies:
            for payload in settings.payloads:
                progress = f"aio, concurrency {concurrency}, {payload} B"
                samples = asyncio.run(run_rounds_aio(servers, settings, concurrency, payload, progress))
                groups.append(
                    {"concurrency": concurrency, "payload": payload, "cases": summarise(samples, AIO_BASELINE)}
                )
    return groups


def bench_slow_endpoint(settings: Settings) -> list[dict[str, Any]]:
    delays = (0.0, 0.0, 0.0, SLOW_DELAY)
    slow_index = delays.index(SLOW_DELAY)
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        servers = stack.enter_context(testing.spawn_echo_servers(4, delays=delays, max_workers=SERVER_WORKERS))
        cases = [
            stack.enter_context(grpc_round_robin("grpc-round_robin", servers.target, settings.slow_calls)),
            stack.enter_context(poolkit_channel("poolkit-p2c_peak_ewma", servers.target, settings.slow_calls)),
        ]
        request = testing.EchoRequest(payload=os.urandom(64))
        for concurrency in settings.slow_concurrencies:
            samples = run_rounds(
                servers,
                cases,
                request,
                concurrency,
                settings.slow_rounds,
                settings.warmup_calls,
                settings.measurement_limit,
                f"slow endpoint, concurrency {concurrency}",
            )
            summary = summarise(samples, "grpc-round_robin")
            for name, runs in samples.items():
                shares = [s.per_server_calls[slow_index] / max(sum(s.per_server_calls), 1) for s in runs]
                summary[name]["slow_share"] = statistics.median(shares)
            results.append({"concurrency": concurrency, "payload": 64, "cases": summary})
    return results


def bench_hedging(settings: Settings) -> list[dict[str, Any]]:
    """Four in-process servers, one answering `HEDGE_DELAY` late on `HEDGE_SHARE` of its
    calls (a GC pause, a noisy neighbour): an idempotent method without hedging, hedged
    after the method's observed p95, and hedged after a fixed 10 ms. Latency, and the
    extra load the hedges made (hedges per call, from the channel's own counts). Round
    robin, so the slow server gets its quarter of the calls whatever its latency: the
    figures show what hedging does, not what peak EWMA's avoidance already does."""
    idempotent = poolkit.RetryPolicy(idempotent=True)
    configs = {
        "poolkit-no-hedge": idempotent,
        "poolkit-hedge-p95": dataclasses.replace(idempotent, hedging=poolkit.Hedging()),
        "poolkit-hedge-10ms": dataclasses.replace(idempotent, hedging=poolkit.Hedging(delay=0.010)),
    }
    calls = settings.slow_calls
    results: list[dict[str, Any]] = []
    with testing.start_echo_servers(4, max_workers=SERVER_WORKERS) as servers:
        servers[3].delay = HEDGE_DELAY
        servers[3].delay_share = HEDGE_SHARE
        channels = {
            name: poolkit.insecure_channel(
                servers.target, config=poolkit.PoolConfig(retry=policy, health_check=None, balancer="round_robin")
            )
            for name, policy in configs.items()
        }
        try:
            cases = [Case(name, testing.EchoStub(channel).Unary, calls) for name, channel in channels.items()]
            request = testing.EchoRequest(payload=os.urandom(64))
            concurrency = 8
            for case in cases:
                run_calls(
                    case.call, request, min(settings.warmup_calls, calls), concurrency, settings.measurement_limit
                )
            hedges_before = {name: channel.describe()["retry_budget"]["hedges"] for name, channel in channels.items()}
            order = random.Random("hedge")
            samples: dict[str, list[Run]] = {case.name: [] for case in cases}
            for index in range(settings.slow_rounds):
                print(f"  hedging: round {index + 1}/{settings.slow_rounds}", file=sys.stderr, flush=True)
                for case in order.sample(cases, len(cases)):
                    samples[case.name].append(
                        run_calls(case.call, request, calls, concurrency, settings.measurement_limit)
                    )
            summary: dict[str, dict[str, Any]] = {}
            for name, runs in samples.items():
                made = sum(len(r.latencies) + r.errors for r in runs)
                hedges = channels[name].describe()["retry_budget"]["hedges"] - hedges_before[name]
                summary[name] = {
                    "calls": made,
                    "errors": sum(r.errors for r in runs),
                    "p50_ms": statistics.median(percentile(sorted(r.latencies), 0.50) * 1000 for r in runs),
                    "p99_ms": statistics.median(percentile(sorted(r.latencies), 0.99) * 1000 for r in runs),
                    "p999_ms": statistics.median(percentile(sorted(r.latencies), 0.999) * 1000 for r in runs),
                    "hedges_per_call": hedges / made if made else float("nan"),
                }
            results.append({"concurrency": concurrency, "payload": 64, "cases": summary})
        finally:
            for channel in channels.values():
                channel.close()
    return results


def hedge_table(results: Sequence[dict[str, Any]]) -> str:
    head = f"{'conc':>4} {'case':<20} {'calls':>6} {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8} {'hedges/call':>11}"
    lines = [head, "-" * len(head)]
    for result in results:
        for name, case in result["cases"].items():
            lines.append(
                f"{result['concurrency']:>4} {name:<20} {case['calls']:>6} {_fmt(case['p50_ms']):>7}"
                f" {_fmt(case['p99_ms']):>7} {_fmt(case['p999_ms']):>8} {case['hedges_per_call']:>11.1%}"
            )
    return "\n".join(lines)


# -- output ------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import google.protobuf

    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "poolkit": poolkit.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_start": list(os.getloadavg()),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _fmt(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def overhead_table(groups: Sequence[dict[str, Any]]) -> str:
    width = max([12, *(len(name) for group in groups for name in group["cases"])])
    head = (
        f"{'conc':>4} {'payload':>7} {'case':<{width}} {'calls':>6} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'cpu us/call':>11} {'conns':>5} | {'req/s x':>7} {'p50 x':>6} {'p99 x':>6} {'cpu x':>6}"
        f" {'cpu x paired (IQR)':>18}"
    )
    lines = [head, "-" * len(head)]
    for group in groups:
        for name, case in group["cases"].items():
            ratios, paired = case["ratios"], case["paired_ratios"]["cpu_us_per_call"]
            lines.append(
                f"{group['concurrency']:>4} {_payload(group['payload']):>7} {name:<{width}}"
                f" {case['calls_per_round']:>6}"
                f" {case['rps']:>7.0f} {_fmt(case['p50_ms']):>7} {_fmt(case['p99_ms']):>7}"
                f" {case['cpu_us_per_call']:>11.0f} {case['conns']:>5.0f} |"
                f" {_fmt(ratios['rps']):>7} {_fmt(ratios['p50_ms']):>6} {_fmt(ratios['p99_ms']):>6}"
                f" {_fmt(ratios['cpu_us_per_call']):>6}"
                f" {_fmt(paired['median']):>6} ({_fmt(paired['q1'])}-{_fmt(paired['q3'])})"
            )
        lines.append("")
    return "\n".join(lines)


def slow_table(results: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'conc':>4} {'case':<22} {'calls':>6} {'req/s':>7} {'mean ms':>7} {'p50 ms':>7} {'p90 ms':>7}"
        f" {'p99 ms':>7} {'slow share':>10} | {'req/s x':>7} {'mean x':>6} {'p90 x':>6} {'p99 x':>6}"
    )
    lines = [head, "-" * len(head)]
    for result in results:
        for name, case in result["cases"].items():
            ratios = case["ratios"]
            lines.append(
                f"{result['concurrency']:>4} {name:<22} {case['calls_per_round']:>6} {case['rps']:>7.0f}"
                f" {_fmt(case['mean_ms']):>7} {_fmt(case['p50_ms']):>7} {_fmt(case['p90_ms']):>7}"
                f" {_fmt(case['p99_ms']):>7} {case['slow_share']:>10.1%} |"
                f" {_fmt(ratios['rps']):>7} {_fmt(ratios['mean_ms']):>6} {_fmt(ratios['p90_ms']):>6}"
                f" {_fmt(ratios['p99_ms']):>6}"
            )
        lines.append("")
    return "\n".join(lines)


def _payload(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 else f"{size} B"


def acceptance(
    groups: Sequence[dict[str, Any]],
    slow: Sequence[dict[str, Any]],
    aio: Sequence[dict[str, Any]] = (),
    futures: Sequence[dict[str, Any]] = (),
    telemetry: Sequence[dict[str, Any]] = (),
    telemetry_aio: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The figures the design holds poolkit to: client CPU per call within 5 % of plain
    grpcio at 64 B, and a much better tail than round_robin when one endpoint is slow;
    telemetry with no provider installed within 2 % of telemetry off, and the SDK's extra
    CPU per call, reported.

    Four endpoints also cost plain grpc more than one (four connections, four servers
    sharing one process), so poolkit-4ep is also set against grpc-rr-4ep: that ratio is
    poolkit's own share of the four-endpoint cost. The same goes for the asyncio rows,
    where the target is held by poolkit-aio-1ep (same single server as grpc-aio-1ch) and
    poolkit-aio-4ep is reported, and set against grpc-aio-rr-4ep.

    Only the parts that ran have figures here."""
    figures: dict[str, Any] = {"cpu_ratio_target": CPU_TARGET}
    if groups:
        cpu, cpu_paired, cpu_vs_rr = _cpu_figures(groups, ("poolkit-1ep", "poolkit-4ep"), "grpc-rr-4ep")
        figures["cpu_ratio_64B"] = cpu
        figures["cpu_ratio_64B_paired_median"] = cpu_paired
        figures["cpu_within_target"] = all(v <= CPU_TARGET for v in cpu.values())
        figures["cpu_ratio_64B_4ep_vs_grpc_rr_4ep"] = cpu_vs_rr
        figures["retry_cpu_ratio_64B"] = _pair_figures(groups, "poolkit-1ep", NO_RETRY)
        figures["source_cpu_ratio_64B"] = {
            **_pair_figures(groups, ONE_SOURCE, "poolkit-4ep"),
            **_pair_figures(groups, FOUR_SOURCES, "poolkit-4ep"),
        }
    if aio:
        cpu, cpu_paired, cpu_vs_rr = _cpu_figures(aio, ("poolkit-aio-1ep", "poolkit-aio-4ep"), "grpc-aio-rr-4ep")
        figures["aio_cpu_ratio_64B"] = cpu
        figures["aio_cpu_ratio_64B_paired_median"] = cpu_paired
        held = {key: value for key, value in cpu.items() if key.startswith("poolkit-aio-1ep ")}
        figures["aio_cpu_within_target"] = all(v <= CPU_TARGET for v in held.values())
        figures["aio_cpu_ratio_64B_4ep_vs_grpc_aio_rr_4ep"] = cpu_vs_rr
        figures["aio_retry_cpu_ratio_64B"] = _pair_figures(aio, "poolkit-aio-1ep", AIO_NO_RETRY)
    if futures:
        figures["future_cpu_ratio_64B"] = _pair_figures(futures, FUTURE, FUTURE_BASELINE)
        figures["future_retry_cpu_ratio_64B"] = _pair_figures(futures, FUTURE, FUTURE_NO_RETRY)
    if telemetry or telemetry_aio:
        figures["telemetry_noop_cpu_target"] = NOOP_TARGET
        ratios = {
            **_telemetry_ratios(telemetry, (NOOP, SDK)),
            **_telemetry_ratios(telemetry_aio, (AIO_NOOP, AIO_SDK)),
        }
        figures["telemetry_cpu_ratio_64B"] = ratios
        noop = [value["ratio"] for key, value in ratios.items() if key.startswith((f"{NOOP} ", f"{AIO_NOOP} "))]
        figures["telemetry_noop_within_target"] = all(v <= NOOP_TARGET for v in noop)
        figures["telemetry_sdk_extra_us_per_call"] = {
            **_sdk_extra(telemetry, SDK, NOTEL),
            **_sdk_extra(telemetry_aio, AIO_SDK, AIO_NOTEL),
        }
    if slow:
        figures["slow_endpoint_p99_ratio_vs_round_robin"] = {
            f"c={result['concurrency']}": result["cases"]["poolkit-p2c_peak_ewma"]["ratios"]["p99_ms"]
            for result in slow
        }
    return figures


def _pair_figures(groups: Sequence[dict[str, Any]], name: str, other: str) -> dict[str, dict[str, float]]:
    """Of the 64 B groups: `name`'s client CPU per call against `other`'s, per concurrency
    (ratio of medians, and the median of per-round ratios)."""
    figures: dict[str, dict[str, float]] = {}
    for group in groups:
        cases = group["cases"]
        if group["payload"] != 64 or name not in cases or other not in cases:
            continue
        a, b = cases[name], cases[other]
        per_round = [
            _ratio(x["cpu_us_per_call"], y["cpu_us_per_call"]) for x, y in zip(a["rounds"], b["rounds"], strict=True)
        ]
        figures[f"{name} c={group['concurrency']}"] = {
            "ratio": _ratio(a["cpu_us_per_call"], b["cpu_us_per_call"]),
            "paired_median": statistics.median(per_round),
        }
    return figures


def _telemetry_ratios(groups: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Of the telemetry groups (summarised against their notel case): each case's client CPU
    per call against notel, the ratio of medians and the per-round ratios' median and quartiles."""
    figures: dict[str, dict[str, float]] = {}
    for group in groups:
        for name in names:
            case = group["cases"][name]
            paired = case["paired_ratios"]["cpu_us_per_call"]
            figures[f"{name} c={group['concurrency']}"] = {
                "ratio": case["ratios"]["cpu_us_per_call"],
                "paired_median": paired["median"],
                "paired_q1": paired["q1"],
                "paired_q3": paired["q3"],
            }
    return figures


def _sdk_extra(groups: Sequence[dict[str, Any]], sdk: str, notel: str) -> dict[str, dict[str, float]]:
    """The SDK's extra client CPU per call in microseconds: sdk minus notel medians, and
    the median of the per-round differences; with what the SDK recorded per call."""
    figures: dict[str, dict[str, float]] = {}
    for group in groups:
        a, b = group["cases"][sdk], group["cases"][notel]
        per_round = [x["cpu_us_per_call"] - y["cpu_us_per_call"] for x, y in zip(a["rounds"], b["rounds"], strict=True)]
        figures[f"{sdk} c={group['concurrency']}"] = {
            "extra_us": a["cpu_us_per_call"] - b["cpu_us_per_call"],
            "paired_median": statistics.median(per_round),
            **group["sdk_recorded"],
        }
    return figures


def _cpu_figures(
    groups: Sequence[dict[str, Any]], pooled_names: Sequence[str], round_robin: str
) -> tuple[dict[str, float], dict[str, float], dict[str, dict[str, float]]]:
    """Of the 64 B groups: each pooled case's CPU ratio to the group's baseline (of
    medians, and the median of per-round ratios), and the four-endpoint case's to
    `round_robin` over the same four servers."""
    cpu: dict[str, float] = {}
    cpu_paired: dict[str, float] = {}
    cpu_vs_rr: dict[str, dict[str, float]] = {}
    for group in groups:
        if group["payload"] != 64:
            continue
        cases = group["cases"]
        for name in pooled_names:
            key, case = f"{name} c={group['concurrency']}", cases[name]
            cpu[key] = case["ratios"]["cpu_us_per_call"]
            cpu_paired[key] = case["paired_ratios"]["cpu_us_per_call"]["median"]
        if round_robin in cases:
            four = pooled_names[-1]
            pooled, plain = cases[four], cases[round_robin]
            per_round = [
                _ratio(a["cpu_us_per_call"], b["cpu_us_per_call"])
                for a, b in zip(pooled["rounds"], plain["rounds"], strict=True)
            ]
            cpu_vs_rr[f"{four} c={group['concurrency']}"] = {
                "ratio": _ratio(pooled["cpu_us_per_call"], plain["cpu_us_per_call"]),
                "paired_median": statistics.median(per_round),
            }
    return cpu, cpu_paired, cpu_vs_rr


def acceptance_text(figures: dict[str, Any]) -> str:
    lines: list[str] = []
    if "cpu_ratio_64B" in figures:
        title = f"Client CPU per call, poolkit / grpc-1ch, 64 B (target <= {CPU_TARGET:.2f});"
        lines.append(f"{title} ratio of medians, then median of per-round ratios:")
        lines.extend(_cpu_lines(figures["cpu_ratio_64B"], figures["cpu_ratio_64B_paired_median"], lambda _: True))
        if figures["cpu_ratio_64B_4ep_vs_grpc_rr_4ep"]:
            lines.append("Client CPU per call, poolkit-4ep / grpc-rr-4ep (same four servers), 64 B:")
            lines.extend(_vs_rr_lines(figures["cpu_ratio_64B_4ep_vs_grpc_rr_4ep"]))
    if "aio_cpu_ratio_64B" in figures:
        title = f"Client CPU per call, poolkit.aio / grpc.aio, 64 B (target <= {CPU_TARGET:.2f}, held by 1ep);"
        lines.append(f"{title} ratio of medians, then median of per-round ratios:")
        lines.extend(
            _cpu_lines(
                figures["aio_cpu_ratio_64B"],
                figures["aio_cpu_ratio_64B_paired_median"],
                lambda key: key.startswith("poolkit-aio-1ep "),
            )
        )
        if figures["aio_cpu_ratio_64B_4ep_vs_grpc_aio_rr_4ep"]:
            lines.append("Client CPU per call, poolkit-aio-4ep / grpc-aio-rr-4ep (same four servers), 64 B:")
            lines.extend(_vs_rr_lines(figures["aio_cpu_ratio_64B_4ep_vs_grpc_aio_rr_4ep"]))
    if figures.get("source_cpu_ratio_64B"):
        lines.append("Client CPU per call with connections bound to source addresses / poolkit-4ep (unbound), 64 B:")
        lines.extend(_vs_rr_lines(figures["source_cpu_ratio_64B"]))
    if figures.get("future_cpu_ratio_64B"):
        lines.append(f"Client CPU per call of future().result(), {FUTURE} / {FUTURE_BASELINE}, 64 B:")
        lines.extend(_vs_rr_lines(figures["future_cpu_ratio_64B"]))
    for key, label in (
        ("retry_cpu_ratio_64B", NO_RETRY),
        ("aio_retry_cpu_ratio_64B", AIO_NO_RETRY),
        ("future_retry_cpu_ratio_64B", FUTURE_NO_RETRY),
    ):
        if figures.get(key):
            lines.append(f"Client CPU per call with retries on (the default) / {label}, 64 B:")
            lines.extend(_vs_rr_lines(figures[key]))
    if "telemetry_cpu_ratio_64B" in figures:
        lines.append(
            f"Client CPU per call, telemetry on / {NOTEL} (or {AIO_NOTEL}), 64 B (no-op target <= {NOOP_TARGET:.2f});"
            " ratio of medians, then median (IQR) of per-round ratios:"
        )
        for key, value in figures["telemetry_cpu_ratio_64B"].items():
            if key.startswith((f"{NOOP} ", f"{AIO_NOOP} ")):
                verdict = "ok" if value["ratio"] <= NOOP_TARGET else "ABOVE TARGET"
            else:
                verdict = "(reported, not held to the target)"
            lines.append(
                f"  {key:<27} {value['ratio']:6.3f}  {value['paired_median']:6.3f}"
                f" ({value['paired_q1']:.3f}-{value['paired_q3']:.3f})  {verdict}"
            )
        lines.append(
            "The SDK's extra client CPU per call (SimpleSpanProcessor into InMemorySpanExporter, InMemoryMetricReader):"
            " sdk - notel medians, then median of per-round differences; what it recorded per call:"
        )
        lines.extend(
            f"  {key:<27} {value['extra_us']:+7.1f} us  {value['paired_median']:+7.1f} us"
            f"  ({value['spans_per_call']:.2f} spans, {value['metric_calls_per_call']:.2f} calls in"
            f" {SdkTelemetry.CALL_METRIC})"
            for key, value in figures["telemetry_sdk_extra_us_per_call"].items()
        )
    if "slow_endpoint_p99_ratio_vs_round_robin" in figures:
        lines.append("Slow endpoint p99, poolkit p2c_peak_ewma / grpc round_robin:")
        lines.extend(
            f"  {key:<22} {value:6.3f}" for key, value in figures["slow_endpoint_p99_ratio_vs_round_robin"].items()
        )
    return "\n".join(lines)


def _cpu_lines(cpu: dict[str, float], paired: dict[str, float], held: Callable[[str], bool]) -> list[str]:
    lines = []
    for key, value in cpu.items():
        if not held(key):
            verdict = "(reported, not held to the target)"
        else:
            verdict = "ok" if value <= CPU_TARGET else "ABOVE TARGET"
        lines.append(f"  {key:<22} {value:6.3f}  {paired[key]:6.3f}  {verdict}")
    return lines


def _vs_rr_lines(figures: dict[str, dict[str, float]]) -> list[str]:
    return [f"  {key:<22} {value['ratio']:6.3f}  {value['paired_median']:6.3f}" for key, value in figures.items()]


def _parts(value: str) -> list[str]:
    """--only's argument: one part or a comma list of them."""
    parts = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"{value!r}: choose from {', '.join(PARTS)} (or a comma list of them)")
    return parts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (64 B only, few calls) for smoke tests")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--rounds", type=int, help="rounds per group (default 21, quick 3)")
    parser.add_argument(
        "--calls",
        type=int,
        help="calls per measurement (default 1000, quick 400; asyncio at concurrency 256: 8 or 2 per task)",
    )
    parser.add_argument(
        "--only",
        type=_parts,
        action="extend",
        metavar="{" + ",".join(PARTS) + "}",
        help="run only these parts (repeatable, or a comma list); default: all",
    )
    args = parser.parse_args(argv)
    if (args.rounds is not None and args.rounds < 1) or (args.calls is not None and args.calls < 1):
        parser.error("--rounds and --calls must be at least 1")
    settings = settings_from(args)
    env = environment()
    started = time.perf_counter()
    # asyncio last: once grpc.aio has been started in this process, it is not the process
    # the sync parts were always measured in.
    groups = bench_overhead(settings) if "sync" in settings.parts else []
    slow = bench_slow_endpoint(settings) if "slow" in settings.parts else []
    hedging = bench_hedging(settings) if "hedge" in settings.parts else []
    futures = bench_future(settings) if "future" in settings.parts else []
    telemetry = bench_telemetry(settings) if "telemetry" in settings.parts else []
    aio = bench_aio(settings) if "aio" in settings.parts else []
    telemetry_aio = bench_telemetry_aio(settings) if "telemetry" in settings.parts else []
    figures = acceptance(groups, slow, aio, futures, telemetry, telemetry_aio)
    env["loadavg_end"] = list(os.getloadavg())
    env["duration_s"] = round(time.perf_counter() - started, 1)

    print(
        f"poolkit {env['poolkit']}, grpcio {env['grpcio']}, Python {env['python']}, {env['cpu_count']} CPUs,"
        f" {env['date']}; parts: {', '.join(settings.parts)}"
    )
    print("cpu x paired (IQR): median and quartiles of the per-round ratios; conns: connections the servers saw")
    print()
    if groups:
        print(f"Threads: medians of {settings.rounds} interleaved rounds; x = ratio to {BASELINE}")
        print()
        print(overhead_table(groups))
    if aio:
        print(
            f"asyncio: tasks on one event loop per group; medians of {settings.rounds} interleaved rounds;"
            f" x = ratio to {AIO_BASELINE}"
        )
        print()
        print(overhead_table(aio))
    if futures:
        print(f"Futures: medians of {settings.rounds} interleaved rounds; x = ratio to {FUTURE_BASELINE}")
        print()
        print(overhead_table(futures))
    if telemetry:
        print(f"Telemetry, threads, one server: medians of {settings.rounds} interleaved rounds; x = ratio to {NOTEL}")
        print()
        print(overhead_table(telemetry))
    if telemetry_aio:
        print(
            f"Telemetry, asyncio, one server: tasks on one event loop per group; medians of {settings.rounds}"
            f" interleaved rounds; x = ratio to {AIO_NOTEL}"
        )
        print()
        print(overhead_table(telemetry_aio))
    if slow:
        print(f"Slow endpoint: 4 servers, one {SLOW_DELAY * 1000:.0f} ms slower;", end=" ")
        print(f"medians of {settings.slow_rounds} rounds; x = ratio to grpc-round_robin;")
        print("slow share = calls the slow server received")
        print()
        print(slow_table(slow))
    if hedging:
        print(
            f"Hedging: 4 in-process servers, one {HEDGE_DELAY * 1000:.0f} ms slower on {HEDGE_SHARE:.0%} of its calls;"
            f" medians of {settings.slow_rounds} rounds"
        )
        print()
        print(hedge_table(hedging))
        print()
    print(acceptance_text(figures))
    print(f"\n({env['duration_s']} s; load average {env['loadavg_start'][0]:.2f} -> {env['loadavg_end'][0]:.2f})")

    if args.json:
        document = {
            "environment": env,
            "settings": dataclasses.asdict(settings),
            "overhead": groups,
            "aio": aio,
            "slow_endpoint": slow,
            "hedging": hedging,
            "future": futures,
            "telemetry": telemetry,
            "telemetry_aio": telemetry_aio,
            "acceptance": figures,
        }
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(_finite(document), out, indent=2, allow_nan=False)
            out.write("\n")
    return 0


def _finite(value: Any) -> Any:
    """`value` with NaN (a metric of a case that completed no call) as null, for strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
