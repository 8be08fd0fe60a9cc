"""Many callers on one poolkit channel at once, and closing it under them.

- 64 threads hammer one sync channel with every call kind (blocking unary, `with_call`,
  `future()`, server stream, client stream, bidi), some failing on purpose (`fail_code`),
  some cancelled (`future.cancel()`, a response stream's `cancel()` after its first
  message, or the stream dropped unfinished). Each thread stops after its count or at a
  deadline, whichever comes first, and must then be joinable.
- 5,000 asyncio tasks do the same on one poolkit.aio channel: cancelled by `call.cancel()`,
  by dropping a stream, by `task.cancel()` from the event loop, and unary calls never
  awaited at all.
- Closing a channel (sync `close(grace=None)` and `close(grace=0.5)`, aio `await close()`
  and `close(0.5)`) with slow calls of every kind in flight and callers still calling.
  What poolkit does today, asserted as such: a call still running is cut off by grpc
  (sync: CANCELLED "Stream removed (Channel closed!)"; aio: `asyncio.CancelledError` in
  the awaiting task, as grpc.aio does, or CANCELLED from `code()`); a call that ends
  within the grace ends OK; every new call raises `PoolClosedError` (UNAVAILABLE, "...
  is closed"); nothing stays in flight; no thread (sync) or task (aio) of the channel's,
  its discovery and health checks included, outlives it.

Afterwards the pool's counters must equal what the callers saw, call for call: the slots'
`calls` are the attempts made and their `errors` the attempts that did not end OK
(cancelled ones included: the pool counts every non-OK status). With `retry=None` each
call is one attempt. With retries on, a call's attempts are 1 + its retries + requeues, so
the pool's totals are the calls plus `describe()["retry_budget"]`'s retries and requeues,
and every retry or requeue follows a failed attempt. What a call "saw" is grpc's own
status for it: the call object's `code()` (its done-callback's, for asyncio), not the
exception its caller caught, since a task cancelled just after its call succeeded sees
`CancelledError` while grpc (and the pool) say OK.

The servers run in a child process (`spawn_echo_servers`), so their threads do not
compete with the callers for this process's GIL. `pytest -s` prints the figures.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import gc
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
from _aio_support import BIG_BACKLOG, aio_test, eventually, settled
from _support import wait_for_idle, wait_until

import poolkit
import poolkit.aio
from poolkit import PoolConfig, PoolkitError, RetryPolicy
from poolkit.testing import ECHO_SERVICE, EchoRequest, EchoStub, SpawnedEchoServers, spawn_echo_servers

pytestmark = [
    pytest.mark.timeout(120),
    # The pool's background work, and grpc's pollers of its connections, must never die
    # with an unhandled exception.
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

OK = grpc.StatusCode.OK
CANCELLED = grpc.StatusCode.CANCELLED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE

SERVERS = 3
SLOTS_PER_ENDPOINT = 2  # 6 connections: the slot choice inside a route is exercised too
THREADS = 64
CALLS_PER_THREAD = 400
TASKS = 5_000
CALLS_PER_TASK = 2
# How long callers keep starting calls; each stops at its count or here, whichever is first.
SYNC_SECONDS = 7.0
AIO_SECONDS = 12.0
# Generous: a worker still running this long after its deadline is stuck.
JOIN_LIMIT = 30.0
# How long, once every task is done, the calls they made have to end and leave the count.
SETTLE_LIMIT = 20.0
CALL_TIMEOUT = 30.0  # far beyond any call here: a DEADLINE_EXCEEDED would be a finding

FAIL_SHARE = 0.06
CANCEL_SHARE = 0.06
# Application codes, and UNAVAILABLE/INTERNAL, which failure accrual counts and an
# idempotent policy retries: the accounting must hold through ejections and retries.
FAIL_CODES = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    UNAVAILABLE,
)
FAIL_TEXT = "test_concurrency: failing on purpose"
# A call to be cancelled is slow, so it is still running when it is cancelled.
SLOW_MS = 300
# ...and a unary call whose task is cancelled slower still: 5,000 tasks can hold the event
# loop up for a second, and a call that finishes before its task's cancel lands is the
# race of test_a_task_cancelled_as_its_call_succeeds_leaves_the_call_ok (an xfail).
TASK_CANCEL_MS = 3000
# A stream to be broken out of: 100 messages, 20 ms apart, far longer than reading one.
LONG_STREAM = {"repeat": 100, "delay_ms": 20}

# How a call is meant to end.
SUCCEED = "succeed"
FAIL = "fail"
CANCEL = "cancel"  # future.cancel() / call.cancel()
DROP = "drop"  # a response stream read once and dropped unfinished
TASK_CANCEL = "task_cancel"  # asyncio: the task awaiting it is cancelled
FORGET = "forget"  # asyncio: a unary call never awaited, dropped (it still runs to its end)


@dataclass(frozen=True)
class Fate:
    kind: str
    end: str
    code: grpc.StatusCode = OK


def draw(rng: random.Random, ends: dict[str, tuple[str, ...]]) -> Fate:
    """A call kind and how the call is meant to end: ~6 % failing, ~6 % cancelled
    (kinds that can be cancelled), the rest succeeding."""
    kind = rng.choice(list(ends))
    roll = rng.random()
    if roll < FAIL_SHARE:
        return Fate(kind, FAIL, rng.choice(FAIL_CODES))
    if roll < FAIL_SHARE + CANCEL_SHARE and ends[kind]:
        return Fate(kind, rng.choice(ends[kind]))
    return Fate(kind, SUCCEED)


def every_fate(ends: dict[str, tuple[str, ...]]) -> list[Fate]:
    """One fate of every kind and every way of ending it allows: the first calls of the
    callers, so each shows up however few calls a slow machine makes before the deadline."""
    return [
        Fate(kind, end, FAIL_CODES[number % len(FAIL_CODES)] if end == FAIL else OK)
        for number, (kind, end) in enumerate((k, e) for k, more in ends.items() for e in (SUCCEED, FAIL, *more))
    ]


def request(fate: Fate | None = None, **fields: Any) -> EchoRequest:
    """The request for a fate: a failing one asks the server for its code."""
    if fate is not None and fate.end == FAIL:
        return EchoRequest(payload=b"f", fail_code=fate.code.value[0], fail_details=FAIL_TEXT, **fields)
    return EchoRequest(payload=b"x", **fields)


def failing_last(fate: Fate, count: int = 3) -> list[EchoRequest]:
    """A request stream; for a failing fate its last message asks for the failure."""
    return [request(), *([request()] * (count - 2)), request(fate)]


@dataclass
class Tally:
    """What one caller (thread, or all tasks) made and saw."""

    made: int = 0  # calls that got a slot (poolkit did not refuse them)
    refused: int = 0  # PoolkitError at the start: no attempt made
    failed: int = 0  # calls whose status is not OK
    failed_idempotent_unavailable: int = 0  # calls the idempotent policy may have retried
    outcomes: collections.Counter[tuple[str, str, str]] = field(default_factory=collections.Counter)
    problems: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.made += other.made
        self.refused += other.refused
        self.failed += other.failed
        self.failed_idempotent_unavailable += other.failed_idempotent_unavailable
        self.outcomes.update(other.outcomes)
        self.problems.extend(other.problems)

    def judge(self, fate: Fate, code: grpc.StatusCode, details: str | None) -> None:
        """Record the call's status and check it is the one its fate allows."""
        self.outcomes[fate.kind, fate.end, code.name] += 1
        if code is not OK:
            self.failed += 1
        if fate.end == SUCCEED:
            good = code is OK
        elif fate.end == FAIL:
            good = code is fate.code and details == FAIL_TEXT
        elif fate.end == DROP:
            good = code is CANCELLED
        else:  # cancelled, unless it ended just before the cancel reached it
            good = code in {CANCELLED, OK}
        if not good:
            self.problems.append(f"{fate}: ended {code.name} {details!r}")


def slot_totals(snapshot: dict[str, Any]) -> tuple[int, int, int]:
    """(calls, errors, in flight) summed over every slot of a describe() snapshot."""
    slots = [slot for endpoint in snapshot["endpoints"] for slot in endpoint["slots"]]
    return (
        sum(slot["calls"] for slot in slots),
        sum(slot["errors"] for slot in slots),
        sum(slot["in_flight"] for slot in slots),
    )


class Watch:
    """Reads describe() every few ms while callers run: no slot may ever show a negative
    in-flight count (a call released twice)."""

    def __init__(self, describe: Callable[[], dict[str, Any]]) -> None:
        self.describe = describe
        self.negative: list[Any] = []
        self.samples = 0
        self.peak = 0

    def look(self) -> None:
        snapshot = self.describe()
        self.samples += 1
        self.peak = max(self.peak, snapshot["in_flight"])
        for endpoint in snapshot["endpoints"]:
            if endpoint["in_flight"] < 0 or any(slot["in_flight"] < 0 for slot in endpoint["slots"]):
                self.negative.append(endpoint)


def poolkit_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("poolkit")]


@pytest.fixture(scope="module")
def spawned() -> Iterator[SpawnedEchoServers]:
    """Echo servers in a child process, with workers and backlog for thousands of calls."""
    with spawn_echo_servers(SERVERS, max_workers=64, options=BIG_BACKLOG) as servers:
        yield servers


# -- sync: 64 threads, one channel -------------------------------------------------------------


def sync_unary(stub: EchoStub, fate: Fate, rng: random.Random) -> tuple[grpc.StatusCode, str | None]:
    stub.Unary(request(fate), timeout=CALL_TIMEOUT)
    return OK, None


def sync_with_call(stub: EchoStub, fate: Fate, rng: random.Random) -> tuple[grpc.StatusCode, str | None]:
    _, call = stub.Unary.with_call(request(fate), timeout=CALL_TIMEOUT)
    return call.code(), call.details()


def sync_future(stub: EchoStub, fate: Fate, rng: random.Random) -> tuple[grpc.StatusCode, str | None]:
    if fate.end == CANCEL:
        future = stub.Unary.future(request(delay_ms=SLOW_MS), timeout=CALL_TIMEOUT)
        time.sleep(rng.random() * 0.005)
        future.cancel()
    else:
        future = stub.Unary.future(request(fate), timeout=CALL_TIMEOUT)
        future.exception(timeout=CALL_TIMEOUT)
    return future.code(), future.details()


def sync_server_stream(stub: EchoStub, fate: Fate, rng: random.Random) -> tuple[grpc.StatusCode, str | None]:
    if fate.end in {CANCEL, DROP}:
        stream = stub.ServerStream(request(**LONG_STREAM), timeout=CALL_TIMEOUT)
        next(stream)
        if fate.end == CANCEL:
            stream.cancel()
            return stream.code(), stream.details()
        # Dropped unfinished (the server has 2 s of messages left): grpc cancels it when
        # it is collected, and poolkit must release its slot all the same.
        assert stream.is_active()
        del stream
        return CANCELLED, None
    stream = stub.ServerStream(request(fate, repeat=3), timeout=CALL_TIMEOUT)
    replies = list(stream)
    assert [reply.index for reply in replies] == [0, 1, 2]
    return stream.code(), stream.details()


def sync_client_stream(stub: EchoStub, fate: Fate, rng: random.Random) -> tuple[grpc.StatusCode, str | None]:
    if fate.end == CANCEL:
        future = stub.ClientStream.future(iter([request(), request(delay_ms=SLOW_MS)]), timeout=CALL_TIMEOUT)
        time.sleep(rng.random() * 0.005)
        future.cancel()
        return future.code(), future.details()
    _, call = stub.ClientStream.with_call(iter(failing_last(fate)), timeout=CALL_TIMEOUT)
    return call.code(), call.details()


def sync_bidi(stub: EchoStub, fate: Fate, rng: random.Random) -> tuple[grpc.StatusCode, str | None]:
    if fate.end == CANCEL:
        stream = stub.BidiStream(iter([request(), request(delay_ms=SLOW_MS)]), timeout=CALL_TIMEOUT)
        next(stream)
        stream.cancel()
        return stream.code(), stream.details()
    # The last message of a failing fate asks for the failure, after two replies.
    stream = stub.BidiStream(iter(failing_last(fate)), timeout=CALL_TIMEOUT)
    for _ in stream:
        pass
    return stream.code(), stream.details()


SYNC_CALLS: dict[str, Callable[[EchoStub, Fate, random.Random], tuple[grpc.StatusCode, str | None]]] = {
    "unary": sync_unary,
    "with_call": sync_with_call,
    "future": sync_future,
    "server_stream": sync_server_stream,
    "client_stream": sync_client_stream,
    "bidi": sync_bidi,
}
SYNC_ENDS: dict[str, tuple[str, ...]] = {
    "unary": (),
    "with_call": (),
    "future": (CANCEL,),
    "server_stream": (CANCEL, DROP),
    "client_stream": (CANCEL,),
    "bidi": (CANCEL,),
}
UNARY_KINDS = {"unary", "with_call", "future"}
SYNC_FATES = every_fate(SYNC_ENDS)
assert len(SYNC_FATES) <= THREADS


def sync_worker(stub: EchoStub, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    first = SYNC_FATES[seed % len(SYNC_FATES)]
    for number in range(CALLS_PER_THREAD):
        if time.monotonic() >= deadline:
            return
        fate = draw(rng, SYNC_ENDS) if number else first
        try:
            code, details = SYNC_CALLS[fate.kind](stub, fate, rng)
        except PoolkitError as error:  # refused before any attempt: not the server's
            tally.refused += 1
            tally.problems.append(f"{fate}: refused: {error}")
            continue
        except grpc.RpcError as error:
            code, details = error.code(), error.details()
        except Exception as error:  # anything else is a finding, not a call outcome
            tally.problems.append(f"{fate}: raised {type(error).__name__}: {error}")
            continue
        tally.made += 1
        if fate.kind in UNARY_KINDS and fate.end == FAIL and fate.code is UNAVAILABLE:
            tally.failed_idempotent_unavailable += 1
        tally.judge(fate, code, details)


def hammer_sync(channel: poolkit.Channel) -> tuple[Tally, Watch, float]:
    """64 threads of mixed calls on `channel` until their counts or the deadline."""
    stub = EchoStub(channel)
    tallies = [Tally() for _ in range(THREADS)]
    deadline = time.monotonic() + SYNC_SECONDS
    workers = [
        threading.Thread(target=sync_worker, args=(stub, i, deadline, tallies[i]), name=f"hammer-{i}")
        for i in range(THREADS)
    ]
    watch = Watch(channel.describe)
    started = time.monotonic()
    for worker in workers:
        worker.start()
    while any(worker.is_alive() for worker in workers) and time.monotonic() < deadline + JOIN_LIMIT:
        watch.look()
        time.sleep(0.02)
    for worker in workers:
        worker.join(timeout=max(0.0, deadline + JOIN_LIMIT - time.monotonic()))
    stuck = [worker.name for worker in workers if worker.is_alive()]
    assert not stuck, f"{len(stuck)} threads still calling {JOIN_LIMIT} s after the deadline: {stuck}"
    total = Tally()
    for tally in tallies:
        total.add(tally)
    return total, watch, time.monotonic() - started


def report(name: str, tally: Tally, snapshot: dict[str, Any], elapsed: float, watch: Watch) -> None:
    calls, errors, _ = slot_totals(snapshot)
    ended = collections.Counter(code for (_, _, code), count in tally.outcomes.items() for _ in range(count))
    print(
        f"\n{name}: {tally.made} calls in {elapsed:.1f} s ({tally.made / elapsed:.0f}/s), "
        f"slots counted {calls} calls / {errors} errors, callers saw {tally.failed} not OK "
        f"{dict(ended)}; retry budget {snapshot['retry_budget']}; peak in flight {watch.peak} "
        f"over {watch.samples} looks"
    )


def check_sync_counts(channel: poolkit.Channel, tally: Tally, watch: Watch) -> dict[str, Any]:
    assert not tally.problems, f"{len(tally.problems)} calls ended wrongly, e.g. {tally.problems[:5]}"
    assert not watch.negative, f"a slot showed a negative in-flight count: {watch.negative[:2]}"
    # Every kind and every way of ending happened, with the counts and the deadline used.
    assert {kind for kind, _, _ in tally.outcomes} == set(SYNC_CALLS)
    assert {end for _, end, _ in tally.outcomes} == {SUCCEED, FAIL, CANCEL, DROP}
    assert tally.made >= THREADS  # each thread made a call at least (~7,500 in all, idle)
    assert tally.refused == 0
    gc.collect()  # dropped streams are released when grpc's cancel comes back
    wait_for_idle(channel)
    snapshot = channel.describe()
    assert snapshot["in_flight"] == 0
    assert slot_totals(snapshot)[2] == 0
    assert all(endpoint["in_flight"] == 0 for endpoint in snapshot["endpoints"])
    return snapshot


def test_64_threads_on_one_channel_account_for_every_call(spawned: SpawnedEchoServers) -> None:
    config = PoolConfig(retry=None, connections_per_endpoint=SLOTS_PER_ENDPOINT)
    with poolkit.insecure_channel(spawned.target, config=config) as channel:
        tally, watch, elapsed = hammer_sync(channel)
        snapshot = check_sync_counts(channel, tally, watch)
        report("sync, retry=None", tally, snapshot, elapsed, watch)

        calls, errors, _ = slot_totals(snapshot)
        # One attempt per call: the slots counted each call once, and as an error exactly
        # when its status was not OK (cancelled and dropped ones included).
        assert calls == tally.made
        assert errors == tally.failed
        assert sum(endpoint["calls"] for endpoint in snapshot["endpoints"]) == calls
        assert sum(endpoint["errors"] for endpoint in snapshot["endpoints"]) == errors
        assert snapshot["retry_budget"]["retries"] == snapshot["retry_budget"]["requeues"] == 0


def test_64_threads_with_retries_account_for_every_attempt(spawned: SpawnedEchoServers) -> None:
    """The default policy (requeues, the retrying future and stream) plus an idempotent
    Unary retried on UNAVAILABLE: a failing Unary call makes up to 3 attempts."""
    idempotent = RetryPolicy(idempotent=True, initial_backoff=0.005, max_backoff=0.01)
    config = PoolConfig(
        connections_per_endpoint=SLOTS_PER_ENDPOINT, method_retry={f"/{ECHO_SERVICE}/Unary": idempotent}
    )
    with poolkit.insecure_channel(spawned.target, config=config) as channel:
        tally, watch, elapsed = hammer_sync(channel)
        snapshot = check_sync_counts(channel, tally, watch)
        report("sync, retries", tally, snapshot, elapsed, watch)

        calls, errors, _ = slot_totals(snapshot)
        again = snapshot["retry_budget"]
        sent_again = again["retries"] + again["requeues"]
        assert again["hedges"] == 0
        # Every retry or requeue is one more attempt, and follows an attempt that failed.
        assert calls == tally.made + sent_again
        assert errors == tally.failed + sent_again
        # Only the failing idempotent calls were retried, each at most twice.
        assert 0 < again["retries"] <= 2 * tally.failed_idempotent_unavailable
        assert again["requeues"] == 0  # every server was up: nothing went unsent


# -- asyncio: 5,000 tasks, one channel -------------------------------------------------------------


async def until_cancelled() -> None:
    """A task meant to be cancelled whose slow call ended first (the loop was that busy)
    waits here for the cancel already scheduled."""
    await asyncio.sleep(2 * JOIN_LIMIT)


class AioCaller:
    """Runs fated calls on a poolkit.aio channel and keeps grpc's own record of each: every
    call object's done-callback hands over grpc's call, whose code() is the truth."""

    def __init__(self, stub: EchoStub, tally: Tally) -> None:
        self.stub = stub
        self.tally = tally
        self.ended: list[Any] = []  # grpc's call objects, as their done-callbacks ran
        self.running: dict[int, tuple[str, float]] = {}  # each call not ended yet: its fate, start

    def made(self, call: Any, fate: Fate) -> Any:
        self.tally.made += 1
        number = self.tally.made
        self.running[number] = (f"{fate.kind} {fate.end}", time.monotonic())
        call.add_done_callback(functools.partial(self.call_ended, number))
        return call

    def call_ended(self, number: int, call: Any) -> None:
        self.ended.append(call)
        del self.running[number]

    def still_running(self) -> str:
        now = time.monotonic()
        return ", ".join(f"{what} for {now - since:.1f} s" for what, since in list(self.running.values())[:5])

    async def run(self, fate: Fate, rng: random.Random) -> None:
        tally = self.tally
        try:
            code, details = await getattr(self, fate.kind)(fate, rng)
        except PoolkitError as error:
            tally.refused += 1
            tally.problems.append(f"{fate}: refused: {error}")
            return
        except grpc.aio.AioRpcError as error:
            code, details = error.code(), error.details()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            if fate.end == TASK_CANCEL or task.cancelling():
                raise  # the task was cancelled: let it end so
            tally.problems.append(f"{fate}: CancelledError nobody asked for")
            return
        except Exception as error:
            tally.problems.append(f"{fate}: raised {type(error).__name__}: {error}")
            return
        if fate.end == TASK_CANCEL:
            tally.problems.append(f"{fate}: the task was meant to be cancelled but ended {code.name}")
            return
        if code is None:  # never awaited: only grpc's record knows how it ended
            tally.outcomes[fate.kind, fate.end, "unseen"] += 1
            return
        tally.judge(fate, code, details)

    def cancel_me_soon(self, rng: random.Random) -> None:
        """`task.cancel()` from the event loop within 50 ms: the task's slow call is in flight."""
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_later(rng.random() * 0.05, task.cancel)

    async def cancel(self, call: Any, rng: random.Random) -> tuple[grpc.StatusCode, str | None]:
        """`call.cancel()` a moment after the call started; its status."""
        await asyncio.sleep(rng.random() * 0.005)
        call.cancel()
        try:
            await call
        except asyncio.CancelledError:  # what awaiting a cancelled grpc.aio call raises
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        return await call.code(), await call.details()

    async def unary(self, fate: Fate, rng: random.Random) -> tuple[grpc.StatusCode | None, str | None]:
        if fate.end == FORGET:
            self.made(self.stub.Unary(request(), timeout=CALL_TIMEOUT), fate)
            return None, None
        if fate.end in {CANCEL, TASK_CANCEL}:
            slow = TASK_CANCEL_MS if fate.end == TASK_CANCEL else SLOW_MS
            call = self.made(self.stub.Unary(request(delay_ms=slow), timeout=CALL_TIMEOUT), fate)
            if fate.end == TASK_CANCEL:
                self.cancel_me_soon(rng)
                await call
                await until_cancelled()
            return await self.cancel(call, rng)
        call = self.made(self.stub.Unary(request(fate), timeout=CALL_TIMEOUT), fate)
        await call
        return OK, None

    async def unary_status(self, fate: Fate, rng: random.Random) -> tuple[grpc.StatusCode, str | None]:
        """The call's status read without awaiting the call itself."""
        call = self.made(self.stub.Unary(request(fate), timeout=CALL_TIMEOUT), fate)
        return await call.code(), await call.details()

    async def server_stream(self, fate: Fate, rng: random.Random) -> tuple[grpc.StatusCode, str | None]:
        if fate.end in {CANCEL, DROP, TASK_CANCEL}:
            call = self.made(self.stub.ServerStream(request(**LONG_STREAM), timeout=CALL_TIMEOUT), fate)
            if fate.end == TASK_CANCEL:
                self.cancel_me_soon(rng)
                async for _ in call:
                    pass
                await until_cancelled()
            await call.read()
            if fate.end == DROP:
                assert not call.done()
                del call  # poolkit's proxy cancels it when collected
                return CANCELLED, None
            call.cancel()
            return await call.code(), await call.details()
        call = self.made(self.stub.ServerStream(request(fate, repeat=3), timeout=CALL_TIMEOUT), fate)
        replies = [reply async for reply in call]
        assert [reply.index for reply in replies] == [0, 1, 2]
        return await call.code(), await call.details()

    async def client_stream(self, fate: Fate, rng: random.Random) -> tuple[grpc.StatusCode, str | None]:
        if fate.end in {CANCEL, TASK_CANCEL}:
            call = self.made(self.stub.ClientStream(timeout=CALL_TIMEOUT), fate)
            await call.write(request())
            await call.write(request(delay_ms=SLOW_MS))
            await call.done_writing()
            if fate.end == TASK_CANCEL:
                self.cancel_me_soon(rng)
                await call
                await until_cancelled()
            return await self.cancel(call, rng)
        call = self.made(self.stub.ClientStream(failing_last(fate), timeout=CALL_TIMEOUT), fate)
        await call
        return await call.code(), await call.details()

    async def bidi(self, fate: Fate, rng: random.Random) -> tuple[grpc.StatusCode, str | None]:
        call = self.made(self.stub.BidiStream(timeout=CALL_TIMEOUT), fate)
        await call.write(request())
        await call.read()
        if fate.end in {CANCEL, TASK_CANCEL}:
            await call.write(request(delay_ms=SLOW_MS))
            if fate.end == TASK_CANCEL:
                self.cancel_me_soon(rng)
                await call.read()
                await until_cancelled()
            call.cancel()
            return await call.code(), await call.details()
        await call.write(request(fate))  # a failing fate fails here, after one reply
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass
        return await call.code(), await call.details()


AIO_ENDS: dict[str, tuple[str, ...]] = {
    "unary": (CANCEL, TASK_CANCEL, FORGET),
    "unary_status": (),
    "server_stream": (CANCEL, DROP, TASK_CANCEL),
    "client_stream": (CANCEL, TASK_CANCEL),
    "bidi": (CANCEL, TASK_CANCEL),
}
AIO_FATES = every_fate(AIO_ENDS)


@pytest.mark.parametrize("retry", ["retry_none", "default_policy"])
@aio_test
async def test_5000_tasks_on_one_aio_channel_account_for_every_call(spawned: SpawnedEchoServers, retry: str) -> None:
    config = PoolConfig(connections_per_endpoint=SLOTS_PER_ENDPOINT)
    if retry == "retry_none":
        config = PoolConfig(retry=None, connections_per_endpoint=SLOTS_PER_ENDPOINT)
    async with poolkit.aio.insecure_channel(spawned.target, config=config) as channel:
        tally = Tally()
        caller = AioCaller(EchoStub(channel), tally)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + AIO_SECONDS

        async def task_body(seed: int) -> None:
            rng = random.Random(seed)
            for number in range(CALLS_PER_TASK):
                if loop.time() >= deadline:
                    return
                fate = draw(rng, AIO_ENDS) if number or seed >= len(AIO_FATES) else AIO_FATES[seed]
                await caller.run(fate, rng)

        watch = Watch(channel.describe)

        async def watching() -> None:
            while True:
                watch.look()
                await asyncio.sleep(0.02)

        started = time.monotonic()
        watcher = asyncio.create_task(watching())
        tasks = [asyncio.create_task(task_body(seed)) for seed in range(TASKS)]
        _, stuck = await asyncio.wait(tasks, timeout=AIO_SECONDS + JOIN_LIMIT)
        elapsed = time.monotonic() - started
        watcher.cancel()
        assert not stuck, f"{len(stuck)} of {TASKS} tasks still running {JOIN_LIMIT} s after the deadline"
        task_cancelled = sum(task.cancelled() for task in tasks)
        crashed = [task.exception() for task in tasks if not task.cancelled() and task.exception()]
        assert not crashed, crashed[:3]

        assert not tally.problems, f"{len(tally.problems)} calls ended wrongly, e.g. {tally.problems[:5]}"
        assert not watch.negative, f"a slot showed a negative in-flight count: {watch.negative[:2]}"
        assert {kind for kind, _, _ in tally.outcomes} == set(AIO_ENDS)
        assert {end for _, end, _ in tally.outcomes} == {SUCCEED, FAIL, CANCEL, DROP, FORGET}
        assert task_cancelled > 0
        assert tally.refused == 0
        gc.collect()  # dropped streams are cancelled when collected
        # Every call ended (its done-callback ran) and left the pool's count. A loaded
        # machine may still be finishing the last calls (a forgotten one, say): give it time.
        settling = time.monotonic()
        await eventually(
            lambda: not caller.running and channel.describe()["in_flight"] == 0,
            lambda: (
                f"calls to end: {len(caller.running)} running ({caller.still_running()}), "
                f"{channel.describe()['in_flight']} in flight"
            ),
            limit=SETTLE_LIMIT,
        )
        settled_in = time.monotonic() - settling
        codes = [await call.code() for call in caller.ended]
        not_ok = sum(code is not OK for code in codes)
        snapshot = channel.describe()
        report(f"aio, {retry}", tally, snapshot, elapsed, watch)
        print(
            f"  {task_cancelled} tasks cancelled; grpc says {not_ok} of {len(codes)} calls not OK; "
            f"settled {settled_in:.2f} s after the last task"
        )

        calls, errors, in_flight = slot_totals(snapshot)
        assert in_flight == 0
        again = snapshot["retry_budget"]
        assert again["retries"] == again["requeues"] == again["hedges"] == 0
        assert calls == tally.made
        assert errors == not_ok


@pytest.mark.parametrize("retry", ["retry_none", "default_policy"])
@aio_test
async def test_a_task_cancelled_as_its_call_succeeds_leaves_the_call_ok(
    spawned: SpawnedEchoServers, retry: str
) -> None:
    """The 5,000-task run's race, made certain: the awaiting task is cancelled from the
    call's own done-callback, so the call is over (OK) before the task sees the cancel."""
    config = PoolConfig(retry=None) if retry == "retry_none" else PoolConfig()
    async with poolkit.aio.insecure_channel(spawned.target, config=config) as channel:
        stub = EchoStub(channel)
        calls = []
        for _ in range(20):
            call = stub.Unary(request(), timeout=CALL_TIMEOUT)
            calls.append(call)

            async def wait_for(call: Any = call) -> None:
                await call

            waiter = asyncio.create_task(wait_for())
            call.add_done_callback(lambda _, waiter=waiter: waiter.cancel())
            with pytest.raises(asyncio.CancelledError):
                await waiter  # the caller sees its task cancelled...
        codes = [await call.code() for call in calls]
        assert codes == [OK] * len(calls)  # ...but grpc finished every call OK
        await settled(channel)
        assert slot_totals(channel.describe()) == (len(calls), 0, 0)


@pytest.mark.parametrize("retry", ["retry_none", "default_policy"])
@aio_test
async def test_a_finished_call_held_unawaited_is_not_in_flight(spawned: SpawnedEchoServers, retry: str) -> None:
    config = PoolConfig(retry=None) if retry == "retry_none" else PoolConfig()
    async with poolkit.aio.insecure_channel(spawned.target, config=config) as channel:
        stub = EchoStub(channel)
        calls = [stub.Unary(request(), timeout=CALL_TIMEOUT) for _ in range(10)]
        await eventually(lambda: all(call.done() for call in calls), "grpc to finish the calls")
        for call in calls:
            assert await call.details() == ""  # read, but neither awaited nor its code() asked
        await eventually(
            lambda: channel.describe()["in_flight"] == 0,
            lambda: f"finished calls to leave the pool's count ({channel.describe()['in_flight']} in flight)",
            limit=1.0,
        )
        assert all(call.done() for call in calls)  # held to the end


# -- close under load ---------------------------------------------------------------------------

GRACE_SLACK = 3.0  # close() returns within grace + this: closing 6 grpc channels took 0.2-1.1 s here
SHORT_MS = 250  # a call still running at close() that finishes within a 0.5 s grace
LONG_MS = 3000  # one that does not
HAMMERS = 8


NAME = "echo.test:50051"


def discovering(servers: SpawnedEchoServers) -> PoolConfig:
    """A pool that resolves `NAME` to the servers every 0.2 s: its discovery thread (or
    task) runs while the channel closes, with a health check per endpoint."""
    return PoolConfig(
        connections_per_endpoint=SLOTS_PER_ENDPOINT,
        resolver=lambda _: servers.addresses,
        resolve_interval=0.2,
    )


@dataclass
class Ended:
    """How one caller's call ended: a status, or an exception that is not an RpcError."""

    code: grpc.StatusCode | None = None
    details: str | None = None
    error: BaseException | None = None


def ended_by(run: Callable[[], Any]) -> Ended:
    try:
        run()
    except grpc.RpcError as error:
        return Ended(error.code(), error.details(), error)
    except BaseException as error:
        return Ended(error=error)
    return Ended(OK)


def sync_slow_calls(stub: EchoStub, ms: int) -> dict[str, Callable[[], Any]]:
    """One call of every kind, each taking about `ms` at the server."""
    slow = EchoRequest(payload=b"s", delay_ms=ms)
    half = EchoRequest(payload=b"s", delay_ms=ms // 2, repeat=2)
    return {
        "unary": lambda: stub.Unary(slow, timeout=CALL_TIMEOUT),
        "with_call": lambda: stub.Unary.with_call(slow, timeout=CALL_TIMEOUT),
        "future": lambda: stub.Unary.future(slow, timeout=CALL_TIMEOUT).result(),
        "server_stream": lambda: list(stub.ServerStream(half, timeout=CALL_TIMEOUT)),
        "client_stream": lambda: stub.ClientStream(iter([request(), slow]), timeout=CALL_TIMEOUT),
        "client_stream_future": lambda: stub.ClientStream.future(iter([slow]), timeout=CALL_TIMEOUT).result(),
        "bidi": lambda: list(stub.BidiStream(iter([slow]), timeout=CALL_TIMEOUT)),
    }


def served(servers: SpawnedEchoServers) -> int:
    return sum(stats.calls for stats in servers.stats())


def wait_for_served(servers: SpawnedEchoServers, count: int, what: str) -> None:
    wait_until(lambda: served(servers) >= count, what)


def channel_closed(outcome: Ended) -> bool:
    """grpc's status for a call cut off by closing its channel."""
    return outcome.code is CANCELLED and "Channel closed" in (outcome.details or "")


def pool_closed(outcome: Ended) -> bool:
    error = outcome.error
    return (
        isinstance(error, poolkit.PoolClosedError)
        and outcome.code is UNAVAILABLE
        and "closed" in (outcome.details or "")
    )


SlowCalls = dict[str, Callable[[], Any]]


def start_sync_calls(
    channel: poolkit.Channel, servers: SpawnedEchoServers, slow: SlowCalls, outcomes: dict[str, Ended]
) -> list[threading.Thread]:
    """Start the slow calls, a thread each recording how its call ended: the long ones
    first and, once they reach their servers, the short ones (so those are on the wire
    just before close(), and the 0.5 s grace is theirs)."""

    def slow_call(name: str, run: Callable[[], Any]) -> None:
        outcomes[name] = ended_by(run)

    base = served(servers)
    threads = []
    for length in ("long", "short"):
        batch = [
            threading.Thread(target=slow_call, args=(name, run), name=f"slow {name}")
            for name, run in slow.items()
            if name.startswith(length)
        ]
        for thread in batch:
            thread.start()
        threads += batch
        if length == "long":
            wait_for_served(servers, base + len(threads), "every long call to reach its server")
        else:  # quicker to see than the servers' counts: the short calls have 250 ms to live
            wait_until(lambda: channel.describe()["in_flight"] >= len(slow), "every short call to start")
    return threads


def start_sync_hammers(stub: EchoStub, hammered: list[list[Ended]]) -> list[threading.Thread]:
    """Callers that keep calling until the pool refuses them as closed."""

    def hammer(log: list[Ended]) -> None:
        while True:
            outcome = ended_by(lambda: stub.Unary(request(), timeout=CALL_TIMEOUT))
            log.append(outcome)
            if (outcome.error is not None and not isinstance(outcome.error, grpc.RpcError)) or pool_closed(outcome):
                return

    hammers = [threading.Thread(target=hammer, args=(log,), name=f"hammer-{i}") for i, log in enumerate(hammered)]
    for thread in hammers:
        thread.start()
    wait_until(lambda: any(hammered), "the hammers to be calling")
    return hammers


@pytest.mark.parametrize("grace", [None, 0.5], ids=["grace_none", "grace_0.5"])
def test_closing_a_sync_channel_under_load(spawned: SpawnedEchoServers, grace: float | None) -> None:
    before = set(threading.enumerate())
    channel = poolkit.insecure_channel(NAME, config=discovering(spawned))
    assert "poolkit-discovery " + NAME in poolkit_threads()  # one more thread close() must end
    stub = EchoStub(channel)
    stub.Unary(request(), timeout=CALL_TIMEOUT)
    slow = {f"long {kind}": run for kind, run in sync_slow_calls(stub, LONG_MS).items()}
    if grace is not None:  # without a grace nothing finishes: the long calls say it all
        slow |= {f"short {kind}": run for kind, run in sync_slow_calls(stub, SHORT_MS).items()}
    outcomes: dict[str, Ended] = {}
    threads = start_sync_calls(channel, spawned, slow, outcomes)
    hammered: list[list[Ended]] = [[] for _ in range(HAMMERS)]
    threads += start_sync_hammers(stub, hammered)

    running = [name for name in slow if name not in outcomes]
    started = time.monotonic()
    channel.close(grace=grace)
    took = time.monotonic() - started

    for thread in threads:
        thread.join(timeout=JOIN_LIMIT)
    stuck = [thread.name for thread in threads if thread.is_alive()]
    assert not stuck, f"still running {JOIN_LIMIT} s after close(): {stuck}"
    print(f"\nclose(grace={grace}) took {took:.3f} s; {sum(map(len, hammered))} hammer calls; running: {running}")
    for name, outcome in sorted(outcomes.items()):
        print(f"  {name}: {outcome.code} {outcome.details!r} {outcome.error if outcome.code is None else ''}")

    # close() waits for the grace (the long calls never finish in it), then cuts them off.
    assert (grace or 0.0) <= took < (grace or 0.0) + GRACE_SLACK
    # The long calls were running (they had seconds left); the short ones almost surely
    # were too (`running` is printed), and those end OK whether or not they were.
    assert {name for name in slow if name.startswith("long")} <= set(running)
    for name, outcome in outcomes.items():
        if name.startswith("short"):
            assert outcome.code is OK, (name, outcome)  # finished within the grace
        else:
            assert channel_closed(outcome), (name, outcome)  # CANCELLED "... (Channel closed!)"
    # A caller still calling sees its calls succeed, be cut off, or be refused as closed.
    for log in hammered:
        assert pool_closed(log[-1]), log[-1]
        assert all(o.code is OK or channel_closed(o) or pool_closed(o) for o in log), log

    for kind, run in sync_slow_calls(stub, 0).items():
        outcome = ended_by(run)
        assert pool_closed(outcome), (kind, outcome)  # a new call of any kind: refused

    wait_for_idle(channel)
    snapshot = channel.describe()
    assert snapshot["state"] == "closed"
    # The close cut off no call uncounted: each attempt once, each cancelled one an error.
    made = 1 + len(slow) + sum(not pool_closed(o) for log in hammered for o in log)
    cut_off = sum(channel_closed(o) for o in outcomes.values()) + sum(
        channel_closed(o) for log in hammered for o in log
    )
    assert slot_totals(snapshot) == (made, cut_off, 0)
    # No thread of the channel's (poolkit's health checks, grpc's pollers) outlives it.
    wait_until(lambda: not poolkit_threads(), lambda: f"poolkit threads to end: {poolkit_threads()}")
    wait_until(
        lambda: set(threading.enumerate()) <= before,
        lambda: f"threads to end: {[t.name for t in set(threading.enumerate()) - before]}",
    )


async def aio_slow_calls(stub: EchoStub, ms: int) -> dict[str, Callable[[], Any]]:
    slow = EchoRequest(payload=b"s", delay_ms=ms)
    half = EchoRequest(payload=b"s", delay_ms=ms // 2, repeat=2)

    async def unary() -> None:
        await stub.Unary(slow, timeout=CALL_TIMEOUT)

    async def unary_status() -> tuple[grpc.StatusCode, str]:
        call = stub.Unary(slow, timeout=CALL_TIMEOUT)
        return await call.code(), await call.details()  # the status, not an exception

    async def server_stream() -> None:
        async for _ in stub.ServerStream(half, timeout=CALL_TIMEOUT):
            pass

    async def client_stream() -> None:
        await stub.ClientStream([request(), slow], timeout=CALL_TIMEOUT)

    async def bidi() -> None:
        call = stub.BidiStream(timeout=CALL_TIMEOUT)
        await call.write(slow)
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass

    return {
        "unary": unary,
        "unary_status": unary_status,
        "server_stream": server_stream,
        "client_stream": client_stream,
        "bidi": bidi,
    }


async def aio_ended_by(run: Callable[[], Any]) -> Ended:
    try:
        status = await run()
    except grpc.aio.AioRpcError as error:
        return Ended(error.code(), error.details(), error)
    except BaseException as error:  # CancelledError included: it is what is asserted
        return Ended(error=error)
    return Ended(*status) if isinstance(status, tuple) else Ended(OK)


async def start_aio_calls(
    channel: poolkit.aio.Channel, servers: SpawnedEchoServers, slow: SlowCalls
) -> dict[str, asyncio.Task[Ended]]:
    """Start the slow calls, a task each: the long ones first and, once they reach their
    servers, the short ones."""
    base = await asyncio.to_thread(served, servers)
    tasks: dict[str, asyncio.Task[Ended]] = {}
    for length in ("long", "short"):
        tasks |= {name: asyncio.create_task(aio_ended_by(run)) for name, run in slow.items() if name.startswith(length)}
        if length == "long":
            while await asyncio.to_thread(served, servers) < base + len(tasks):
                await asyncio.sleep(0.01)
        else:
            await eventually(lambda: channel.describe()["in_flight"] >= len(slow), "every short call to start")
    return tasks


async def start_aio_hammers(stub: EchoStub, hammered: list[list[Ended]]) -> list[asyncio.Task[None]]:
    """Tasks that keep calling until the pool refuses them as closed."""

    async def hammer(log: list[Ended]) -> None:
        while True:
            outcome = await aio_ended_by(lambda: stub.Unary(request(), timeout=CALL_TIMEOUT))
            log.append(outcome)
            if pool_closed(outcome) or (outcome.code is None and not isinstance(outcome.error, asyncio.CancelledError)):
                return

    hammers = [asyncio.create_task(hammer(log)) for log in hammered]
    await eventually(lambda: any(hammered), "the hammers to be calling")
    return hammers


@pytest.mark.parametrize("grace", [None, 0.5], ids=["grace_none", "grace_0.5"])
@aio_test
async def test_closing_an_aio_channel_under_load(spawned: SpawnedEchoServers, grace: float | None) -> None:
    tasks_before = asyncio.all_tasks()
    channel = poolkit.aio.insecure_channel(NAME, config=discovering(spawned))
    stub = EchoStub(channel)
    await stub.Unary(request(), timeout=CALL_TIMEOUT)
    slow = {f"long {kind}": run for kind, run in (await aio_slow_calls(stub, LONG_MS)).items()}
    if grace is not None:
        slow |= {f"short {kind}": run for kind, run in (await aio_slow_calls(stub, SHORT_MS)).items()}
    tasks = await start_aio_calls(channel, spawned, slow)
    hammered: list[list[Ended]] = [[] for _ in range(HAMMERS)]
    hammers = await start_aio_hammers(stub, hammered)

    running = [name for name, task in tasks.items() if not task.done()]
    started = time.monotonic()
    await channel.close(grace)
    took = time.monotonic() - started
    _, stuck = await asyncio.wait([*tasks.values(), *hammers], timeout=JOIN_LIMIT)
    assert not stuck, f"{len(stuck)} calls still running {JOIN_LIMIT} s after close()"
    outcomes = {name: task.result() for name, task in tasks.items()}
    print(f"\naio close(grace={grace}) took {took:.3f} s; {sum(map(len, hammered))} hammer calls; running: {running}")
    for name, outcome in sorted(outcomes.items()):
        print(f"  {name}: {outcome.code} {outcome.details!r} {outcome.error!r}")

    assert (grace or 0.0) <= took + 0.01 < (grace or 0.0) + GRACE_SLACK
    # The long calls were running (they had seconds left); the short ones almost surely
    # were too (`running` is printed), and those end OK whether or not they were.
    assert {name for name in slow if name.startswith("long")} <= set(running)
    for name, outcome in outcomes.items():
        if name.startswith("short"):
            assert outcome.code is OK, (name, outcome)
        elif name == "long unary_status":
            assert outcome.code is CANCELLED, (name, outcome)  # its status says so
        else:
            # grpc.aio cancels what is left when its channel closes, and a cancelled call
            # raises asyncio.CancelledError in the task awaiting it, as with grpc.aio itself.
            assert isinstance(outcome.error, asyncio.CancelledError), (name, outcome)
    for log in hammered:
        assert pool_closed(log[-1]), log[-1]
        assert all(o.code is OK or isinstance(o.error, asyncio.CancelledError) or pool_closed(o) for o in log), log

    for kind, run in (await aio_slow_calls(stub, 0)).items():
        outcome = await aio_ended_by(run)
        assert pool_closed(outcome), (kind, outcome)
        assert isinstance(outcome.error, poolkit.aio.AioPoolClosedError)

    await settled(channel)
    snapshot = channel.describe()
    assert snapshot["state"] == "closed"
    made = 1 + len(slow) + sum(not pool_closed(o) for log in hammered for o in log)
    cut_off = sum(outcome.code is not OK for outcome in outcomes.values()) + sum(
        isinstance(o.error, asyncio.CancelledError) for log in hammered for o in log
    )
    assert slot_totals(snapshot) == (made, cut_off, 0)
    # Nothing of the channel's keeps running: no task of its own, no thread.
    await eventually(
        lambda: asyncio.all_tasks() <= tasks_before,
        lambda: f"the channel's tasks to end: {asyncio.all_tasks() - tasks_before}",
    )
    assert not poolkit_threads()
