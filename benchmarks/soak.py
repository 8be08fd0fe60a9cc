"""poolkit's soak run: many calls over one long-lived channel, watching for leaks.

    python benchmarks/soak.py [--calls 100000] [--json out.json] [--aio-share 0.25]
                              [--threads 16] [--tasks 64] [--sample-every 10000]

Makes `--calls` calls of every kind (unary, `with_call`, `future()`, server stream, client
stream, bidi), about 5 % of them failing on purpose (the echo server's `fail_code`) and
about 2 % cancelled (`future.cancel()`, `call.cancel()`, a response stream cancelled or
dropped after its first message), from `--threads` threads on one sync channel and,
for `--aio-share` of the calls, from `--tasks` asyncio tasks on one poolkit.aio channel
(its event loop runs in a thread of its own for the whole run). The echo servers run in
a child process (`poolkit.testing.spawn_echo_servers`), so this process holds only the
client. Both channels are opened once and kept, as a service keeps them.

The calls go in rounds of `--sample-every`. After a warm-up round (`--warmup` calls,
not counted), and after each round, with every caller thread joined, nothing in flight
and a `gc.collect()`, the run samples this process: RSS (VmRSS in /proc/self/status),
threads (`threading.active_count()` and the kernel's /proc/self/task), open file
descriptors (/proc/self/fd), the pools' slots and connections (READY slots, from
`describe()`) and calls in flight. It prints one row per sample, then the deltas from
the first sample to the last, then the checks; it exits 1 if any check fails:

  in flight     0 at every sample: a call that ended always released its slot.
  threads       Python threads exactly as many at the end as at the start. Callers'
                threads are joined before each sample, so what is left is the pools'
                (health checks, grpc's pollers) and this script's event-loop thread.
                The process's OS threads (grpc core's included) at most
                `OS_THREAD_SLACK` (2) more at every sample: grpc core's thread pool
                sizes itself to the load, and was seen one thread larger after
                30,000 calls of a CI run; a thread leaked per call, or per thousand
                calls, is far past that.
  fds           exactly as many at the end as at the start: sockets are the pools' few
                connections, opened once.
  slots, connections  unchanged: no connection was replaced, none was lost.
  rss total     at most `--rss-total-mb` (20 MB) more at the end than at the start: a
                coarse bound (measured: +1.0 to +1.2 MB over 60,000 and 100,000 calls).
  rss flat      over the second half of the run, growth by the least-squares slope of
                its samples times its calls at most `--rss-flat-bytes-per-call` (64 B)
                per call of that half, and never less than `--rss-flat-floor-mb` (2 MB).
                An allocator still filling its pools shows in the first half; a leak
                grows in both. A small Python object kept per call (a weakref or a
                `functools.partial` is 64-100 B) adds 3-5 MB over the second half of a
                100,000-call run. The slope rather than last minus first, so that one
                sample taken as an allocator grows an arena does not decide.
  counted       each channel's slots counted exactly the attempts made (calls plus
                requeues and retries), so no call was lost or counted twice.
  outcomes      every call ended as it was meant to (OK, its failure, or cancelled).

Why those tolerances, measured on the 2-core machine CI uses (the defaults, one sample
every 10,000 calls after a warm-up of a tenth of the calls): RSS moved by at most 0.6 MB
from one sample to the next; the second half's slope was +0.24 MB (100,000 calls) and
+0.30 to +0.33 MB (60,000); and `tracemalloc`, started after the warm-up, found the
Python heap 27 KiB larger after 18,000 more calls. What RSS still shows is native memory
(glibc's arenas, grpc core) settling; the 2 MB floor is six times the largest slope seen.
Python threads and fds came back to the same counts in every run.

`--json PATH` writes the settings, every sample, the deltas and the checks.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import grpc.aio

import poolkit
import poolkit.aio
from poolkit import PoolConfig
from poolkit.testing import EchoRequest, EchoStub, spawn_echo_servers

FAIL_SHARE = 0.05
OS_THREAD_SLACK = 2  # grpc core's thread pool grows and shrinks with the load
CANCEL_SHARE = 0.02
FAIL_CODES = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INTERNAL,
)
FAIL_TEXT = "soak: failing on purpose"
SLOW_MS = 100  # a call to be cancelled is still running when it is
LONG_STREAM = {"repeat": 100, "delay_ms": 10}  # a stream to break out of: 1 s of messages
CALL_TIMEOUT = 30.0
KINDS = ("unary", "with_call", "future", "server_stream", "client_stream", "bidi")
# grpc servers cancel calls queued beyond their pending-request backlog (1,000 by default).
BIG_BACKLOG = [
    ("grpc.server.max_pending_requests", 100_000),
    ("grpc.server.max_pending_requests_hard_limit", 100_000),
]
IDLE_LIMIT = 10.0  # how long a sample waits for the pools to have nothing in flight

OK = "ok"
FAILED = "failed"
CANCELLED = "cancelled"


@dataclass
class Settings:
    calls: int
    warmup: int
    sample_every: int
    threads: int
    tasks: int
    aio_share: float
    servers: int
    slots: int
    seed: int
    rss_total_mb: float
    rss_flat_bytes_per_call: float
    rss_flat_floor_mb: float

    def rss_flat_mb(self, calls: int) -> float:
        """The RSS growth allowed over a stretch of `calls` calls once warmed up."""
        return max(self.rss_flat_floor_mb, self.rss_flat_bytes_per_call * calls / 2**20)


@dataclass
class Sample:
    calls: int  # counted calls made so far (the warm-up not included)
    elapsed_s: float
    rss_kb: int
    threads: int  # threading.active_count()
    tasks: int  # /proc/self/task: every thread of the process, grpc's C++ ones included
    fds: int
    slots: int
    connections: int
    in_flight: int


@dataclass
class Tally:
    """What the callers made and saw."""

    made: int = 0  # calls started on a slot (refused ones are not)
    outcomes: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, made: int, outcomes: Counter[str], unexpected: list[str]) -> None:
        with self.lock:
            self.made += made
            self.outcomes.update(outcomes)
            self.unexpected.extend(unexpected[:10])


@dataclass(frozen=True)
class Fate:
    kind: str
    end: str  # OK, FAILED or CANCELLED
    code: grpc.StatusCode = grpc.StatusCode.OK


def draw(rng: random.Random) -> Fate:
    kind = rng.choice(KINDS)
    roll = rng.random()
    if roll < FAIL_SHARE:
        return Fate(kind, FAILED, rng.choice(FAIL_CODES))
    if roll < FAIL_SHARE + CANCEL_SHARE:
        return Fate(kind, CANCELLED)
    return Fate(kind, OK)


def request(fate: Fate | None = None, **fields: Any) -> EchoRequest:
    if fate is not None and fate.end == FAILED:
        return EchoRequest(payload=b"f", fail_code=fate.code.value[0], fail_details=FAIL_TEXT, **fields)
    return EchoRequest(payload=b"x" * 64, **fields)


def judged(fate: Fate, code: grpc.StatusCode, details: str | None) -> str | None:
    """The outcome's label if it is one the fate allows, else None."""
    if code is grpc.StatusCode.OK:
        return OK if fate.end in {OK, CANCELLED} else None  # a cancel can come too late
    if fate.end == FAILED:
        return FAILED if code is fate.code and details == FAIL_TEXT else None
    if fate.end == CANCELLED:
        return CANCELLED if code is grpc.StatusCode.CANCELLED else None
    return None


# -- sync calls -------------------------------------------------------------------------------

Status = tuple[grpc.StatusCode, str | None]


def sync_cancelled(stub: EchoStub, fate: Fate, rng: random.Random) -> Status:
    """A slow call cancelled at once: a future's `cancel()`, or a response stream's after
    its first message, or (half of those) the stream dropped unfinished."""
    if fate.kind in {"unary", "with_call", "future", "client_stream"}:
        if fate.kind == "client_stream":
            future = stub.ClientStream.future(iter([request(), request(delay_ms=SLOW_MS)]), timeout=CALL_TIMEOUT)
        else:
            future = stub.Unary.future(request(delay_ms=SLOW_MS), timeout=CALL_TIMEOUT)
        future.cancel()
        return future.code(), future.details()
    if fate.kind == "bidi":
        stream = stub.BidiStream(iter([request(), request(delay_ms=SLOW_MS)]), timeout=CALL_TIMEOUT)
    else:
        stream = stub.ServerStream(request(**LONG_STREAM), timeout=CALL_TIMEOUT)
    next(stream)
    if rng.random() < 0.5 and stream.is_active():
        del stream  # dropped unfinished: grpc cancels it when collected
        return grpc.StatusCode.CANCELLED, None
    stream.cancel()
    return stream.code(), stream.details()


def sync_unary(stub: EchoStub, fate: Fate) -> Status:
    stub.Unary(request(fate), timeout=CALL_TIMEOUT)
    return grpc.StatusCode.OK, None


def sync_with_call(stub: EchoStub, fate: Fate) -> Status:
    _, call = stub.Unary.with_call(request(fate), timeout=CALL_TIMEOUT)
    return call.code(), call.details()


def sync_future(stub: EchoStub, fate: Fate) -> Status:
    future = stub.Unary.future(request(fate), timeout=CALL_TIMEOUT)
    future.exception(timeout=CALL_TIMEOUT)
    return future.code(), future.details()


def sync_server_stream(stub: EchoStub, fate: Fate) -> Status:
    stream = stub.ServerStream(request(fate, repeat=3), timeout=CALL_TIMEOUT)
    for _ in stream:
        pass
    return stream.code(), stream.details()


def sync_client_stream(stub: EchoStub, fate: Fate) -> Status:
    _, call = stub.ClientStream.with_call(iter([request(), request(), request(fate)]), timeout=CALL_TIMEOUT)
    return call.code(), call.details()


def sync_bidi(stub: EchoStub, fate: Fate) -> Status:
    stream = stub.BidiStream(iter([request(), request(fate), request()]), timeout=CALL_TIMEOUT)
    for _ in stream:
        pass
    return stream.code(), stream.details()


SYNC_CALLS: dict[str, Callable[[EchoStub, Fate], Status]] = {
    "unary": sync_unary,
    "with_call": sync_with_call,
    "future": sync_future,
    "server_stream": sync_server_stream,
    "client_stream": sync_client_stream,
    "bidi": sync_bidi,
}


def sync_call(stub: EchoStub, fate: Fate, rng: random.Random) -> Status:
    """Make one call as `fate` says; grpc's status for it."""
    try:
        if fate.end == CANCELLED:
            return sync_cancelled(stub, fate, rng)
        return SYNC_CALLS[fate.kind](stub, fate)
    except grpc.RpcError as error:
        if isinstance(error, poolkit.PoolkitError):
            raise  # refused by the pool: no call was made
        return error.code(), error.details()


def sync_worker(stub: EchoStub, count: int, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    made, outcomes, unexpected = 0, Counter[str](), []
    for _ in range(count):
        fate = draw(rng)
        try:
            code, details = sync_call(stub, fate, rng)
        except Exception as error:  # a refusal or a crash: reported, not counted as made
            unexpected.append(f"{fate}: {type(error).__name__}: {error}")
            continue
        made += 1
        label = judged(fate, code, details)
        if label is None:
            unexpected.append(f"{fate}: ended {code.name} {details!r}")
        else:
            outcomes[label] += 1
    tally.add(made, outcomes, unexpected)


def sync_round(stub: EchoStub, calls: int, threads: int, seed: int, tally: Tally) -> None:
    """`calls` calls from `threads` threads made for this round and joined at its end."""
    shares = [calls // threads + (1 if i < calls % threads else 0) for i in range(threads)]
    workers = [
        threading.Thread(target=sync_worker, args=(stub, share, seed * 1000 + i, tally), name=f"soak-{i}")
        for i, share in enumerate(shares)
        if share
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


# -- asyncio calls ----------------------------------------------------------------------------


async def aio_cancelled(stub: EchoStub, fate: Fate, rng: random.Random) -> Status:
    """A slow call cancelled at once: `call.cancel()`, or a response stream's after its
    first message, or (half of those) the stream dropped unfinished."""
    if fate.kind in {"unary", "with_call", "future", "client_stream"}:
        if fate.kind == "client_stream":
            call = stub.ClientStream([request(), request(delay_ms=SLOW_MS)], timeout=CALL_TIMEOUT)
        else:
            call = stub.Unary(request(delay_ms=SLOW_MS), timeout=CALL_TIMEOUT)
        await asyncio.sleep(0)
        call.cancel()
        return await call.code(), await call.details()
    if fate.kind == "bidi":
        call = stub.BidiStream([request(), request(delay_ms=SLOW_MS)], timeout=CALL_TIMEOUT)
    else:
        call = stub.ServerStream(request(**LONG_STREAM), timeout=CALL_TIMEOUT)
    await call.read()
    if rng.random() < 0.5 and not call.done():
        del call  # dropped unfinished: poolkit's proxy cancels it when collected
        return grpc.StatusCode.CANCELLED, None
    call.cancel()
    return await call.code(), await call.details()


async def aio_unary(stub: EchoStub, fate: Fate) -> Status:
    await stub.Unary(request(fate), timeout=CALL_TIMEOUT)
    return grpc.StatusCode.OK, None


async def aio_unary_status(stub: EchoStub, fate: Fate) -> Status:
    """The status read from the call object, the call itself never awaited."""
    call = stub.Unary(request(fate), timeout=CALL_TIMEOUT)
    return await call.code(), await call.details()


async def aio_server_stream(stub: EchoStub, fate: Fate) -> Status:
    call = stub.ServerStream(request(fate, repeat=3), timeout=CALL_TIMEOUT)
    async for _ in call:
        pass
    return await call.code(), await call.details()


async def aio_client_stream(stub: EchoStub, fate: Fate) -> Status:
    await stub.ClientStream([request(), request(), request(fate)], timeout=CALL_TIMEOUT)
    return grpc.StatusCode.OK, None


async def aio_bidi(stub: EchoStub, fate: Fate) -> Status:
    call = stub.BidiStream(timeout=CALL_TIMEOUT)
    for message in (request(), request(fate), request()):
        await call.write(message)
        await call.read()
    await call.done_writing()
    await call.read()
    return await call.code(), await call.details()


# asyncio has no `with_call` or `future()`: their share goes to the call object's status
# and to a plain await.
AIO_CALLS: dict[str, Callable[[EchoStub, Fate], Coroutine[Any, Any, Status]]] = {
    "unary": aio_unary,
    "with_call": aio_unary_status,
    "future": aio_unary,
    "server_stream": aio_server_stream,
    "client_stream": aio_client_stream,
    "bidi": aio_bidi,
}


async def aio_call(stub: EchoStub, fate: Fate, rng: random.Random) -> Status:
    try:
        if fate.end == CANCELLED:
            return await aio_cancelled(stub, fate, rng)
        return await AIO_CALLS[fate.kind](stub, fate)
    except grpc.aio.AioRpcError as error:
        if isinstance(error, poolkit.PoolkitError):
            raise
        return error.code(), error.details()


async def aio_round(stub: EchoStub, calls: int, tasks: int, seed: int, tally: Tally) -> None:
    """`calls` calls from `tasks` tasks, each taking the next call until none is left."""
    left = [calls]
    made, outcomes, unexpected = 0, Counter[str](), []

    async def worker(rng: random.Random) -> None:
        nonlocal made
        while left[0] > 0:
            left[0] -= 1
            fate = draw(rng)
            try:
                code, details = await aio_call(stub, fate, rng)
            except Exception as error:
                unexpected.append(f"{fate}: {type(error).__name__}: {error}")
                continue
            made += 1
            label = judged(fate, code, details)
            if label is None:
                unexpected.append(f"{fate}: ended {code.name} {details!r}")
            else:
                outcomes[label] += 1

    await asyncio.gather(*(worker(random.Random(seed * 1000 + i)) for i in range(tasks)))
    tally.add(made, outcomes, unexpected)


class LoopThread:
    """An event loop in a thread of its own, alive for the whole run, with the aio channel."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="soak-event-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result()

    def stop(self) -> None:
        """Let what grpc.aio still has running (its status handlers of the calls close()
        cancelled) finish, then stop the loop."""

        async def drain() -> None:
            current = asyncio.current_task()
            others = [task for task in asyncio.all_tasks() if task is not current]
            await asyncio.wait(others, timeout=5.0) if others else None

        self.run(drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# -- sampling ---------------------------------------------------------------------------------


def rss_kb() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def slot_states(channels: Sequence[Any]) -> list[dict[str, Any]]:
    return [slot for channel in channels for e in channel.describe()["endpoints"] for slot in e["slots"]]


def in_flight(channels: Sequence[Any]) -> int:
    return sum(channel.describe()["in_flight"] for channel in channels)


def sample(channels: Sequence[Any], calls: int, started: float) -> Sample:
    """The process's resources once the pools are idle (or IDLE_LIMIT has passed)."""
    deadline = time.monotonic() + IDLE_LIMIT
    while in_flight(channels) and time.monotonic() < deadline:
        gc.collect()  # a dropped stream is released when grpc's cancel comes back
        time.sleep(0.01)
    gc.collect()
    slots = slot_states(channels)
    return Sample(
        calls=calls,
        elapsed_s=round(time.monotonic() - started, 2),
        rss_kb=rss_kb(),
        threads=threading.active_count(),
        tasks=len(os.listdir("/proc/self/task")),
        fds=len(os.listdir("/proc/self/fd")),
        slots=len(slots),
        connections=sum(slot["state"] == "ready" for slot in slots),
        in_flight=in_flight(channels),
    )


def slope_mb(samples: Sequence[Sample]) -> float:
    """RSS growth over `samples`, in MB: the least-squares slope (per call) × their calls."""
    xs = [s.calls for s in samples]
    ys = [s.rss_kb / 1024 for s in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if not spread:
        return 0.0
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
    return slope * (xs[-1] - xs[0])


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def run(settings: Settings) -> dict[str, Any]:
    config = PoolConfig(connections_per_endpoint=settings.slots)
    loop = LoopThread() if settings.aio_share > 0 else None
    sync_tally, aio_tally = Tally(), Tally()
    with spawn_echo_servers(settings.servers, max_workers=64, options=BIG_BACKLOG) as servers:
        channel = poolkit.insecure_channel(servers.target, config=config)
        stub = EchoStub(channel)
        channels: list[Any] = [channel]
        aio_stub = None
        if loop is not None:

            async def open_aio() -> poolkit.aio.Channel:
                return poolkit.aio.insecure_channel(servers.target, config=config)

            aio_channel = loop.run(open_aio())
            aio_stub = EchoStub(aio_channel)
            channels.append(aio_channel)

        def round_of(calls: int, number: int, sync: Tally, aio: Tally) -> None:
            seed = settings.seed * 1_000_003 + number
            aio_calls = round(calls * settings.aio_share) if aio_stub is not None else 0
            pending = None
            if aio_calls and loop is not None and aio_stub is not None:
                coroutine = aio_round(aio_stub, aio_calls, settings.tasks, seed, aio)
                pending = asyncio.run_coroutine_threadsafe(coroutine, loop.loop)
            sync_round(stub, calls - aio_calls, settings.threads, seed, sync)
            if pending is not None:
                pending.result()

        warm = Tally()
        round_of(settings.warmup, 0, warm, warm)
        started = time.monotonic()
        before = [attempts(c) for c in channels]
        samples = [sample(channels, 0, started)]
        print_header()
        print_row(samples[0], samples[0])
        done = 0
        number = 0
        while done < settings.calls:
            number += 1
            calls = min(settings.sample_every, settings.calls - done)
            round_of(calls, number, sync_tally, aio_tally)
            done += calls
            samples.append(sample(channels, done, started))
            print_row(samples[-1], samples[0])
        after = [attempts(c) for c in channels]
        channel.close()
        if loop is not None:
            loop.run(channels[1].close())
            loop.stop()
    tallies = [sync_tally, aio_tally][: len(channels)]
    counted = [
        Counted(name, made_after - made_before, tally.made, again_after - again_before)
        for name, tally, (made_before, again_before), (made_after, again_after) in zip(
            ("sync", "aio"), tallies, before, after, strict=False
        )
    ]
    unexpected = [u for tally in (warm, *tallies) for u in tally.unexpected]
    checks = resource_checks(settings, samples) + call_checks(settings, counted, unexpected)
    outcomes = sync_tally.outcomes + aio_tally.outcomes
    return {
        "settings": asdict(settings),
        "samples": [asdict(s) for s in samples],
        "deltas": deltas(samples),
        "rss_second_half_mb": round(slope_mb(second_half(samples)), 3),
        "outcomes": {"sync": dict(sync_tally.outcomes), "aio": dict(aio_tally.outcomes), "all": dict(outcomes)},
        "unexpected": unexpected[:20],
        "checks": [asdict(c) for c in checks],
        "ok": all(c.ok for c in checks),
    }


def attempts(channel: Any) -> tuple[int, int]:
    """(attempts its slots counted, calls its pool sent again) so far."""
    snapshot = channel.describe()
    slots = [slot for e in snapshot["endpoints"] for slot in e["slots"]]
    again = snapshot["retry_budget"]
    return sum(s["calls"] for s in slots), again["retries"] + again["requeues"] + again["hedges"]


def second_half(samples: Sequence[Sample]) -> Sequence[Sample]:
    return samples[(len(samples) - 1) // 2 :]


def deltas(samples: Sequence[Sample]) -> dict[str, float]:
    first, last = samples[0], samples[-1]
    return {
        "rss_mb": round((last.rss_kb - first.rss_kb) / 1024, 2),
        "threads": last.threads - first.threads,
        "tasks": last.tasks - first.tasks,
        "fds": last.fds - first.fds,
        "slots": last.slots - first.slots,
        "connections": last.connections - first.connections,
        "in_flight": last.in_flight,
    }


@dataclass
class Counted:
    """One channel's own count of the attempts made since the first sample, against the
    calls its callers made and what the pool sent again (requeues, retries, hedges)."""

    name: str
    attempts: int
    calls: int
    sent_again: int


def resource_checks(settings: Settings, samples: Sequence[Sample]) -> list[Check]:
    """The checks of the process's resources, from the samples alone."""
    first, last = samples[0], samples[-1]
    growth = (last.rss_kb - first.rss_kb) / 1024
    half = second_half(samples)
    flat = slope_mb(half)
    flat_limit = settings.rss_flat_mb(half[-1].calls - half[0].calls)
    busy = [s.calls for s in samples if s.in_flight]
    most_tasks = max(s.tasks for s in samples)
    return [
        Check("in flight", not busy, "0 at every sample" if not busy else f"calls in flight at samples {busy}"),
        Check(
            "threads",
            last.threads == first.threads and most_tasks - first.tasks <= OS_THREAD_SLACK,
            f"python {first.threads} -> {last.threads}, os {first.tasks} -> {last.tasks} "
            f"(at most {most_tasks} at a sample; at most +{OS_THREAD_SLACK})",
        ),
        Check("fds", last.fds == first.fds, f"{first.fds} -> {last.fds}"),
        Check(
            "slots, connections",
            (last.slots, last.connections) == (first.slots, first.connections) and last.connections == last.slots,
            f"slots {first.slots} -> {last.slots}, ready {first.connections} -> {last.connections}",
        ),
        Check("rss total", growth <= settings.rss_total_mb, f"{growth:+.1f} MB (at most +{settings.rss_total_mb})"),
        Check(
            "rss flat",
            flat <= flat_limit,
            f"second half ({half[0].calls:,} to {half[-1].calls:,} calls) {flat:+.2f} MB by slope "
            f"(at most +{flat_limit:.2f})",
        ),
    ]


def call_checks(settings: Settings, counted: Sequence[Counted], unexpected: Sequence[str]) -> list[Check]:
    """Each pool counted every attempt once; every call was made and ended as meant."""
    made = sum(c.calls for c in counted)
    return [
        Check(
            "counted",
            all(c.attempts == c.calls + c.sent_again for c in counted),
            ", ".join(f"{c.name}: {c.attempts} attempts, {c.calls} calls + {c.sent_again} sent again" for c in counted),
        ),
        Check(
            "outcomes",
            not unexpected and made == settings.calls,
            f"{made} of {settings.calls} calls made; {len(unexpected)} unexpected"
            + (f", e.g. {list(unexpected[:3])}" if unexpected else ""),
        ),
    ]


COLUMNS = (
    ("calls", 8),
    ("secs", 7),
    ("calls/s", 8),
    ("rss MB", 8),
    ("Δrss", 7),
    ("threads", 8),
    ("os thr", 7),
    ("fds", 5),
    ("slots", 6),
    ("conns", 6),
    ("in flight", 10),
)


def print_header() -> None:
    print("  ".join(name.rjust(width) for name, width in COLUMNS), flush=True)


def print_row(row: Sample, first: Sample) -> None:
    rate = row.calls / row.elapsed_s if row.elapsed_s else 0.0
    cells = (
        f"{row.calls:,}",
        f"{row.elapsed_s:.1f}",
        f"{rate:,.0f}",
        f"{row.rss_kb / 1024:.1f}",
        f"{(row.rss_kb - first.rss_kb) / 1024:+.1f}",
        str(row.threads),
        str(row.tasks),
        str(row.fds),
        str(row.slots),
        str(row.connections),
        str(row.in_flight),
    )
    print("  ".join(cell.rjust(width) for cell, (_, width) in zip(cells, COLUMNS, strict=True)), flush=True)


def print_summary(result: dict[str, Any]) -> None:
    d = result["deltas"]
    print(
        f"\ndeltas (end - start): rss {d['rss_mb']:+.2f} MB, threads {d['threads']:+d}, os threads "
        f"{d['tasks']:+d}, fds {d['fds']:+d}, slots {d['slots']:+d}, connections {d['connections']:+d}, "
        f"in flight {d['in_flight']}; rss over the second half {result['rss_second_half_mb']:+.2f} MB (slope)"
    )
    print(f"outcomes: {result['outcomes']['all']}")
    for check in result["checks"]:
        print(f"  {'PASS' if check['ok'] else 'FAIL'}  {check['name']}: {check['detail']}")
    print("soak: OK" if result["ok"] else "soak: FAILED", flush=True)


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text}: must be more than 0")
        return value

    return parse


def settings_from(argv: Sequence[str] | None) -> tuple[Settings, str | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=positive(int), default=100_000, help="calls to make (default 100000)")
    parser.add_argument("--warmup", type=int, default=None, help="calls before the first sample (default calls/10)")
    parser.add_argument("--sample-every", type=positive(int), default=10_000, help="calls between samples")
    parser.add_argument("--threads", type=positive(int), default=16, help="sync caller threads (default 16)")
    parser.add_argument("--tasks", type=positive(int), default=64, help="asyncio caller tasks (default 64)")
    parser.add_argument("--aio-share", type=float, default=0.25, help="share of the calls made from asyncio (0: none)")
    parser.add_argument("--servers", type=positive(int), default=3, help="echo servers (default 3)")
    parser.add_argument("--slots", type=positive(int), default=1, help="connections per server (default 1)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rss-total-mb", type=float, default=20.0, help="RSS growth allowed over the run")
    parser.add_argument(
        "--rss-flat-bytes-per-call",
        type=float,
        default=64.0,
        help="RSS growth allowed over the second half, per call (default 64)",
    )
    parser.add_argument(
        "--rss-flat-floor-mb", type=float, default=2.0, help="... but never less than this (default 2 MB)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if not 0 <= args.aio_share <= 1:
        parser.error("--aio-share must be between 0 and 1")
    warmup = args.warmup if args.warmup is not None else max(1_000, args.calls // 10)
    settings = Settings(
        calls=args.calls,
        warmup=warmup,
        sample_every=args.sample_every,
        threads=args.threads,
        tasks=args.tasks,
        aio_share=args.aio_share,
        servers=args.servers,
        slots=args.slots,
        seed=args.seed,
        rss_total_mb=args.rss_total_mb,
        rss_flat_bytes_per_call=args.rss_flat_bytes_per_call,
        rss_flat_floor_mb=args.rss_flat_floor_mb,
    )
    return settings, args.json


def main(argv: Sequence[str] | None = None) -> int:
    settings, json_path = settings_from(argv)
    print(
        f"soak: {settings.calls:,} calls (+{settings.warmup:,} warm-up) in rounds of {settings.sample_every:,}, "
        f"{settings.threads} threads + {settings.tasks} asyncio tasks ({settings.aio_share:.0%} of calls), "
        f"{settings.servers} servers x {settings.slots} connections, ~{FAIL_SHARE:.0%} failing, "
        f"~{CANCEL_SHARE:.0%} cancelled",
        flush=True,
    )
    result = run(settings)
    print_summary(result)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
