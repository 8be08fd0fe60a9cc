"""The call matrix: every call kind, made in every style grpc offers for it, with and
without an OpenTelemetry SDK installed, must give the same answer in each scenario.

Rows are (kind, scenario); columns are (style, telemetry). The answer a row expects is
written once, in `EXPECTED`, and every column of the row is checked against it:

- kinds: unary_unary (Echo/Unary), unary_stream (Echo/ServerStream), stream_unary
  (Echo/ClientStream), stream_stream (Echo/BidiStream);
- styles: `call` (the multicallable's `__call__`), `with_call` and `future` (sync, unary
  responses only: grpc has them for nothing else), `aio` (poolkit.aio: `await` a unary
  response, `async for` over a response stream);
- telemetry: `none` (no provider installed, poolkit's fast path) or `sdk` (SDK tracer
  and meter providers, `_otel_support.installed`);
- scenarios: `SCENARIOS` below.

Each cell checks (a) the status code the caller sees (OK, or the grpc.RpcError's code()),
(b) the attempts the servers saw (every echo call that arrived, failed ones included),
and (c) that the poolkit channel has nothing in flight afterwards (waited for, never
slept for). A request stream is always a list, so it can be sent again; a response
stream is read to its end.

Real grpc servers on loopback, shared by the whole module and reset before each cell:
two `poolkit.testing` echo servers (their `delay`) and a recording server
(`_otel_support.RecordingServer`, its `fail_next`) for the scenarios where a server fails
a call. The recording server fails a call only after reading its whole request stream:
an echo server's `fail_next` fails it at once, and when a server ends a grpc.aio
stream-stream call before the client has finished writing, grpc.aio itself ends the call
INTERNAL ("Internal error from Core") about half the time instead of with the code the
server sent (grpc/grpc#36066; measured here: 242 of 500 plain grpc.aio BidiStream calls),
so an aio stream_stream cell would depend on chance.

Nothing is timed: delays only make the scenarios happen (an attempt outlives its attempt
timeout, a first attempt outlives the hedge delay), each with a wide margin.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from _aio_support import settled
from _otel_support import RecordingServer, installed, providers_unset
from _support import wait_for_idle

import poolkit
import poolkit.aio
from poolkit import Hedging, PoolConfig, RetryBudget, RetryPolicy
from poolkit.testing import ECHO_SERVICE, EchoRequest, EchoServers, EchoStub, start_echo_servers

pytestmark = [
    pytest.mark.timeout(60),
    # The pool's background work must never die with an unhandled exception.
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED

CALL_TIMEOUT = 5.0
# How much longer than the call's own timeout the test waits on a future or an event loop
# before calling it a hang.
HANG_LIMIT = 30.0

STREAM_LENGTH = 2  # messages in every request stream and every response stream

# -- the matrix's axes ------------------------------------------------------------------------

KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
METHOD = {
    "unary_unary": "Unary",
    "unary_stream": "ServerStream",
    "stream_unary": "ClientStream",
    "stream_stream": "BidiStream",
}
STREAMED_REQUEST = frozenset({"stream_unary", "stream_stream"})
STREAMED_RESPONSE = frozenset({"unary_stream", "stream_stream"})

# grpc has with_call and future only for calls with a unary response.
STYLES = ("call", "with_call", "future", "aio")
RESPONSE_STREAM_STYLES = ("call", "aio")
SYNC_STYLES = frozenset({"call", "with_call", "future"})

TELEMETRY = ("none", "sdk")


def styles_of(kind: str) -> tuple[str, ...]:
    return RESPONSE_STREAM_STYLES if kind in STREAMED_RESPONSE else STYLES


def full_method(kind: str) -> str:
    """The method's full name, as `method_retry` keys it."""
    return f"/{ECHO_SERVICE}/{METHOD[kind]}"


# -- scenarios --------------------------------------------------------------------------------

# Which of the module's servers a cell calls.
ONE = "one"  # the first echo server
TWO = "two"  # both echo servers
RECORDING = "recording"  # the recording server, which fails calls after reading them whole
DEAD_AND_ONE = "dead_and_one"  # a loopback port nobody listens on, then the first echo server


@dataclass(frozen=True)
class Scenario:
    """What a cell sets up, the same for every kind and column; the method's retry policy
    goes in `method_retry` under the kind's method."""

    servers: str
    policy: RetryPolicy | None = None  # None: the default policy (requeues only)
    pool: tuple[tuple[str, Any], ...] = ()  # further PoolConfig fields
    timeout: float = CALL_TIMEOUT
    calls: int = 1
    delay: float = 0.0  # added by every echo server of the cell to every call
    fail_next: int = 0  # calls the recording server fails with UNAVAILABLE
    requeues: int | None = None  # describe()["retry_budget"]["requeues"] afterwards, if checked
    refused_at_least: int | None = None  # a lower bound on describe()["retry_budget"]["refused"]

    def config(self, kind: str) -> PoolConfig:
        # No health checks: their RPCs would count as attempts on the echo servers.
        settings: dict[str, Any] = {"health_check": None, **dict(self.pool)}
        if self.policy is not None:
            settings["method_retry"] = {full_method(kind): self.policy}
        return PoolConfig(**settings)


IDEMPOTENT = RetryPolicy(idempotent=True)

SCENARIOS: dict[str, Scenario] = {
    "success": Scenario(servers=ONE),
    # Round robin over [dead, live] sends one of the two calls to the dead port first, and
    # it is requeued to the live server; which of the two calls that is depends on where
    # RoundRobin starts (a random place), but that it is exactly one does not:
    # - the pool drops a route from rotation only once a connection of it is known to fail
    #   (`Slot.failing`, sticky until READY), and with connect_on_start=False nothing
    #   connects to the dead port before a call is sent there;
    # - the rotation, and with it round robin's place, changes only when a route's status
    #   does (`PoolState._refresh` calls `update` only on change), so the two calls go to
    #   the two routes in turn, whichever comes first;
    # - the call sent to the dead port is requeued to the one route it has not tried (the
    #   live one, `begin_again`), and if it was the first call, the dead route is out of
    #   rotation or next-but-one for the second: the live server either way.
    "requeue": Scenario(
        servers=DEAD_AND_ONE,
        pool=(("balancer", "round_robin"), ("connect_on_start", False)),
        calls=2,
        requeues=1,
    ),
    "retry": Scenario(servers=RECORDING, policy=IDEMPOTENT, fail_next=1),
    # For a response stream the attempt timeout is the attempt's deadline as well: no
    # message comes within 0.2 s (the server answers after 0.5 s), so it is retried once.
    "attempt_timeout": Scenario(
        servers=ONE,
        policy=RetryPolicy(idempotent=True, attempt_timeout=0.2, max_attempts=2),
        delay=0.5,
        timeout=3.0,
    ),
    # Hedging applies to unary responses only: a response stream is never hedged.
    "hedge": Scenario(
        servers=TWO,
        policy=RetryPolicy(idempotent=True, hedging=Hedging(delay=0.05)),
        delay=0.3,
        timeout=5.0,
    ),
    "budget_spent": Scenario(
        servers=RECORDING,
        policy=IDEMPOTENT,
        pool=(("retry_budget", RetryBudget(ratio=0.0, min_per_second=0.0)),),
        fail_next=1,
        refused_at_least=1,
    ),
    # The backoff alone (0.5 s, no jitter) would pass the caller's deadline (0.3 s).
    "deadline_too_short": Scenario(
        servers=RECORDING,
        policy=RetryPolicy(idempotent=True, initial_backoff=0.5, max_backoff=0.5, jitter=0.0),
        fail_next=1,
        timeout=0.3,
    ),
}


@dataclass(frozen=True)
class Expect:
    code: grpc.StatusCode  # what every call of the cell ends with
    attempts: int  # what the cell's servers saw, all its calls together


# The answer of each (scenario, kind), the same in every column: (code, attempts).
EXPECTED: dict[str, dict[str, Expect]] = {
    scenario: {kind: Expect(*answer) for kind, answer in zip(KINDS, row, strict=True)}
    for scenario, row in {
        # scenario            unary_unary        unary_stream       stream_unary       stream_stream
        "success":            ((OK, 1),          (OK, 1),           (OK, 1),           (OK, 1)),
        "requeue":            ((OK, 2),          (OK, 2),           (OK, 2),           (OK, 2)),
        "retry":              ((OK, 2),          (OK, 2),           (OK, 2),           (OK, 2)),
        "attempt_timeout":    ((DEADLINE, 2),    (DEADLINE, 2),     (DEADLINE, 2),     (DEADLINE, 2)),
        "hedge":              ((OK, 2),          (OK, 1),           (OK, 2),           (OK, 1)),
        "budget_spent":       ((UNAVAILABLE, 1), (UNAVAILABLE, 1),  (UNAVAILABLE, 1),  (UNAVAILABLE, 1)),
        "deadline_too_short": ((UNAVAILABLE, 1), (UNAVAILABLE, 1),  (UNAVAILABLE, 1),  (UNAVAILABLE, 1)),
    }.items()
}  # fmt: skip

assert set(EXPECTED) == set(SCENARIOS)


# -- the module's servers -----------------------------------------------------------------------


class Servers:
    """The servers every cell shares; `prepare` resets them and sets up one scenario."""

    def __init__(self, echo: EchoServers, recording: RecordingServer, dead: str) -> None:
        self.echo = echo
        self.recording = recording
        self.dead = dead

    def reset(self) -> None:
        for server in self.echo:
            server.fail_next(0)
            server.delay = 0.0
        self.recording.fail_next(0)

    def prepare(self, scenario: Scenario) -> None:
        self.reset()
        if scenario.servers in {ONE, TWO}:
            for server in self._echo_of(scenario):
                server.delay = scenario.delay
        if scenario.fail_next:
            assert scenario.servers == RECORDING, "only the recording server fails calls here"
            self.recording.fail_next(scenario.fail_next, UNAVAILABLE)

    def addresses(self, scenario: Scenario) -> list[str]:
        if scenario.servers == RECORDING:
            return [self.recording.address]
        if scenario.servers == DEAD_AND_ONE:
            return [self.dead, self.echo[0].address]
        return [server.address for server in self._echo_of(scenario)]

    def seen(self, scenario: Scenario) -> int:
        """Calls the cell's servers have seen so far, failed ones included."""
        if scenario.servers == RECORDING:
            return len(self.recording.received)
        return sum(server.calls for server in self._echo_of(scenario))

    def _echo_of(self, scenario: Scenario) -> list[Any]:
        return list(self.echo) if scenario.servers == TWO else [self.echo[0]]


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    # The dead port is bound but never listened on: every connect is refused at once, and
    # no other process can take the port while the module runs.
    with (
        start_echo_servers(2) as echo,
        RecordingServer("matrix-recording") as recording,
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as dead,
    ):
        dead.bind(("127.0.0.1", 0))
        shared = Servers(echo, recording, f"127.0.0.1:{dead.getsockname()[1]}")
        yield shared
        shared.reset()


class Closer:
    """Closes sync channels in the background. `poolkit.Channel.close()` takes about 0.2 s
    (grpc's connectivity polling thread notices an unsubscribe only when it next wakes),
    which would add some 20 s to this module's 112 sync cells. Each cell has waited for
    its channel to have nothing in flight first; every close is waited for, and its
    error raised, when the module ends."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="matrix-close")
        self._closing: list[Future[None]] = []

    def later(self, channel: poolkit.Channel) -> None:
        self._closing.append(self._pool.submit(channel.close))

    def finish(self) -> None:
        try:
            for closing in self._closing:
                closing.result(timeout=HANG_LIMIT)
        finally:
            self._pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def closer() -> Iterator[Closer]:
    closer = Closer()
    yield closer
    closer.finish()


# -- making the calls ---------------------------------------------------------------------------


def request_for(kind: str) -> EchoRequest | list[EchoRequest]:
    """A list for a request stream (replayable); a server stream answers STREAM_LENGTH messages."""
    if kind in STREAMED_REQUEST:
        return [EchoRequest(payload=bytes([ord("a") + i])) for i in range(STREAM_LENGTH)]
    return EchoRequest(payload=b"x", repeat=STREAM_LENGTH)


def replies_for(kind: str) -> int:
    """Messages a successful call of `kind` answers with."""
    return STREAM_LENGTH if kind in STREAMED_RESPONSE else 1


def sync_call(stub: EchoStub, kind: str, style: str, timeout: float) -> tuple[grpc.StatusCode, int]:
    """One call; the code the caller sees and the messages it got."""
    multicallable = getattr(stub, METHOD[kind])
    request = request_for(kind)
    try:
        if style == "call":
            result = multicallable(request, timeout=timeout)
            return OK, len(list(result)) if kind in STREAMED_RESPONSE else 1
        if style == "with_call":
            _, call = multicallable.with_call(request, timeout=timeout)
            return call.code(), 1
        assert style == "future", style
        future = multicallable.future(request, timeout=timeout)
        future.result(timeout=timeout + HANG_LIMIT)
        return future.code(), 1
    except grpc.RpcError as error:
        return error.code(), 0


async def aio_call(stub: EchoStub, kind: str, timeout: float) -> tuple[grpc.StatusCode, int]:
    multicallable = getattr(stub, METHOD[kind])
    request = request_for(kind)
    try:
        if kind in STREAMED_RESPONSE:
            return OK, len([reply async for reply in multicallable(request, timeout=timeout)])
        await multicallable(request, timeout=timeout)
        return OK, 1
    except grpc.RpcError as error:
        return error.code(), 0


@dataclass(frozen=True)
class Observed:
    codes: tuple[str, ...]  # each call's code, in order
    replies: tuple[int, ...]  # each call's messages
    attempts: int
    budget: dict[str, Any]  # describe()["retry_budget"] at the end

    def __str__(self) -> str:
        codes = self.codes[0] if len(set(self.codes)) == 1 else "/".join(self.codes)
        return f"{codes}, {self.attempts} attempt(s)"


def run_sync(servers: Servers, closer: Closer, kind: str, style: str, scenario: Scenario) -> Observed:
    before = servers.seen(scenario)
    channel = poolkit.insecure_channel(servers.addresses(scenario), config=scenario.config(kind))
    try:
        stub = EchoStub(channel)
        results = [sync_call(stub, kind, style, scenario.timeout) for _ in range(scenario.calls)]
        wait_for_idle(channel)
        budget = channel.describe()["retry_budget"]
    finally:
        closer.later(channel)
    return Observed(
        tuple(code.name for code, _ in results),
        tuple(count for _, count in results),
        servers.seen(scenario) - before,
        budget,
    )


async def run_aio(servers: Servers, kind: str, scenario: Scenario) -> Observed:
    before = servers.seen(scenario)
    async with poolkit.aio.insecure_channel(servers.addresses(scenario), config=scenario.config(kind)) as channel:
        stub = EchoStub(channel)
        results = [await aio_call(stub, kind, scenario.timeout) for _ in range(scenario.calls)]
        await settled(channel)
        budget = channel.describe()["retry_budget"]
    return Observed(
        tuple(code.name for code, _ in results),
        tuple(count for _, count in results),
        servers.seen(scenario) - before,
        budget,
    )


def run_cell(servers: Servers, closer: Closer, kind: str, style: str, telemetry: str, scenario_name: str) -> Observed:
    scenario = SCENARIOS[scenario_name]
    servers.prepare(scenario)

    def run() -> Observed:
        if style in SYNC_STYLES:
            return run_sync(servers, closer, kind, style, scenario)
        assert style == "aio", style
        limit = scenario.calls * scenario.timeout + HANG_LIMIT
        return asyncio.run(asyncio.wait_for(run_aio(servers, kind, scenario), limit))  # type: ignore[no-any-return]

    if telemetry == "sdk":
        with installed():
            return run()
    assert telemetry == "none", telemetry
    assert providers_unset(), "an OpenTelemetry provider is installed: the 'none' column would not be"
    return run()


def assert_expected(observed: Observed, kind: str, scenario_name: str) -> None:
    scenario = SCENARIOS[scenario_name]
    expect = EXPECTED[scenario_name][kind]
    wanted = ((expect.code.name,) * scenario.calls, expect.attempts)
    got = (observed.codes, observed.attempts)
    assert got == wanted, (
        f"expected {expect.code.name}, {expect.attempts} attempt(s); got {observed} (budget {observed.budget})"
    )
    if expect.code is OK:
        assert observed.replies == (replies_for(kind),) * scenario.calls, observed
    if scenario.requeues is not None:
        assert observed.budget["requeues"] == scenario.requeues, observed.budget
    if scenario.refused_at_least is not None:
        assert observed.budget["refused"] >= scenario.refused_at_least, observed.budget


# -- the matrix ---------------------------------------------------------------------------------

CELLS = [
    pytest.param(kind, style, telemetry, scenario, id=f"{kind}-{style}-{telemetry}-{scenario}")
    for scenario in SCENARIOS
    for kind in KINDS
    for style in styles_of(kind)
    for telemetry in TELEMETRY
]


@pytest.mark.parametrize(("kind", "style", "telemetry", "scenario"), CELLS)
def test_call_matrix(servers: Servers, closer: Closer, kind: str, style: str, telemetry: str, scenario: str) -> None:
    """Every column of a (kind, scenario) row gives the row's one expected answer."""
    observed = run_cell(servers, closer, kind, style, telemetry, scenario)
    assert_expected(observed, kind, scenario)


# The bug report this suite exists for: a stream-unary call with an attempt timeout ended
# differently with a TracerProvider installed than without one.
BLOCKING_AND_AIO = ["call", "with_call", "aio"]


@pytest.mark.parametrize("style", BLOCKING_AND_AIO)
def test_stream_unary_attempt_timeout_is_the_same_with_a_tracer(servers: Servers, closer: Closer, style: str) -> None:
    """A stream-unary call with an attempt timeout ends the same with a TracerProvider
    installed as without one, and as the matrix expects."""
    without = run_cell(servers, closer, "stream_unary", style, "none", "attempt_timeout")
    traced = run_cell(servers, closer, "stream_unary", style, "sdk", "attempt_timeout")

    assert (traced.codes, traced.attempts) == (without.codes, without.attempts), (
        f"without a TracerProvider: {without}; with one: {traced}"
    )
    assert_expected(without, "stream_unary", "attempt_timeout")
