"""Retries end to end, one suite run against the sync and the asyncio channel: a failed
idempotent call is sent again to another endpoint (unary, with_call / the call object,
a response stream before its first message, a request stream given as a list); codes
outside the policy and non-idempotent methods are not retried; a call that never reached
a server is requeued; the caller's deadline, the server's pushback and the retry budget
bound it all; hedged calls are answered by the fast endpoint and the loser is cancelled.

Real servers on loopback (`poolkit.testing`), real failures: an echo server told to fail
its next call (`fail_next`), a request that asks for a failure (`fail_code`), a port
nobody listens on. What a server saw is read from its call count and from the response's
`metadata` (the invocation metadata, `grpc-previous-rpc-attempts` included).

Every call has a timeout and every loop is bounded. Only two kinds of timing assertion
are made, each with slack on the permitted side: a call retried under a deadline ends
no later than the deadline plus `DEADLINE_SLACK`, and a retry the server pushed back
comes no sooner than the pushback. The storm's and the hedging test's figures are
printed (`pytest -s` shows them).

The `client` fixture gives both channel kinds one blocking interface, as in
tests/test_health.py: for asyncio, an event loop runs in a thread of its own, the channel
and its calls live there, and the test's thread only submits to it.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import grpc
import grpc.aio
import pytest
from _loop_thread import LoopThread
from _support import wait_until

import poolkit
import poolkit.aio
from poolkit import Hedging, PoolConfig, RetryBudget, RetryPolicy
from poolkit.testing import (
    ECHO_SERVICE,
    FAIL_DETAILS,
    EchoRequest,
    EchoResponse,
    EchoServers,
    EchoStub,
    start_echo_servers,
)

pytestmark = [
    pytest.mark.timeout(90),
    # The pool's background work must never die with an unhandled exception.
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED

ATTEMPTS_HEADER = "grpc-previous-rpc-attempts"

REQUEST = EchoRequest(payload=b"x")
CALL_TIMEOUT = 5.0
# How long the test thread waits on anything it handed to the asyncio loop.
RUN_LIMIT = 30.0

# An idempotent policy with quick backoffs (10-20 ms), so retries cost the suite little
# time and the pushback test can tell a 300 ms pushback from the backoff.
IDEMPOTENT = RetryPolicy(idempotent=True, initial_backoff=0.01, max_backoff=0.02)
MAX_ATTEMPTS = IDEMPOTENT.max_attempts

# The default budget: retries, requeues and hedges ≤ ratio × calls + min_per_second ×
# window (the reserve, 100), over a sliding window of 10 s.
DEFAULT_BUDGET = RetryBudget()


def method(name: str) -> str:
    """The echo service's full method name, as `method_retry` keys it."""
    return f"/{ECHO_SERVICE}/{name}"


def pool_config(**changes: Any) -> PoolConfig:
    """The suite's base config: no health checks and no failure accrual (retries are the
    subject; an ejection would change where calls go), round robin so each endpoint gets
    its share whatever its latency."""
    settings: dict[str, Any] = {"health_check": None, "failure_accrual": None, "balancer": "round_robin"}
    settings.update(changes)
    return PoolConfig(**settings)


def failing(code: grpc.StatusCode, details: str, **fields: Any) -> EchoRequest:
    """A request the server answers with `code` and `details`, after it arrived and counted."""
    return EchoRequest(payload=b"f", fail_code=code.value[0], fail_details=details, **fields)


def previous_attempts(response: EchoResponse) -> str | None:
    """The `grpc-previous-rpc-attempts` the server saw for this response's attempt."""
    return response.metadata.get(ATTEMPTS_HEADER)


def served(servers: EchoServers) -> int:
    """Echo calls the servers have seen (failed ones included)."""
    return sum(server.calls for server in servers)


def assert_original_error(error: BaseException, code: grpc.StatusCode, details: str) -> None:
    """`error` is the server's own failure as grpc raised it, not one poolkit made up."""
    assert isinstance(error, grpc.RpcError), f"{type(error).__name__}: {error}"
    assert not isinstance(error, poolkit.PoolkitError), f"poolkit's own error, not the server's: {error}"
    assert error.code() is code, error
    assert error.details() == details, error


# -- a uniform client over both channel kinds ----------------------------------------------


class Client(Protocol):
    kind: str

    def open(self, target: str | Sequence[str], config: PoolConfig) -> None: ...

    def unary(self, request: EchoRequest = REQUEST, *, timeout: float = CALL_TIMEOUT) -> EchoResponse: ...

    def unary_with_call(
        self, request: EchoRequest = REQUEST, *, timeout: float = CALL_TIMEOUT
    ) -> tuple[EchoResponse, grpc.StatusCode]: ...

    def server_stream(self, request: EchoRequest, *, timeout: float = CALL_TIMEOUT) -> list[EchoResponse]: ...

    def client_stream(self, requests: Sequence[EchoRequest], *, timeout: float = CALL_TIMEOUT) -> EchoResponse: ...

    def unary_many(
        self, count: int, *, concurrency: int, request: EchoRequest = REQUEST, timeout: float = CALL_TIMEOUT
    ) -> list[EchoResponse | BaseException]: ...

    def describe(self) -> dict[str, Any]: ...

    def in_flight(self) -> int: ...

    def shutdown(self) -> None: ...


class SyncClient:
    """A poolkit.Channel driven from the test's thread (and a thread pool for load)."""

    kind = "sync"

    def __init__(self) -> None:
        self._opened: list[poolkit.Channel] = []

    def open(self, target: str | Sequence[str], config: PoolConfig) -> None:
        self.channel = poolkit.insecure_channel(target, config=config)
        self._opened.append(self.channel)
        self._stub = EchoStub(self.channel)

    def unary(self, request: EchoRequest = REQUEST, *, timeout: float = CALL_TIMEOUT) -> EchoResponse:
        return self._stub.Unary(request, timeout=timeout)  # type: ignore[no-any-return]

    def unary_with_call(
        self, request: EchoRequest = REQUEST, *, timeout: float = CALL_TIMEOUT
    ) -> tuple[EchoResponse, grpc.StatusCode]:
        response, call = self._stub.Unary.with_call(request, timeout=timeout)
        return response, call.code()

    def server_stream(self, request: EchoRequest, *, timeout: float = CALL_TIMEOUT) -> list[EchoResponse]:
        return list(self._stub.ServerStream(request, timeout=timeout))

    def client_stream(self, requests: Sequence[EchoRequest], *, timeout: float = CALL_TIMEOUT) -> EchoResponse:
        return self._stub.ClientStream(list(requests), timeout=timeout)  # type: ignore[no-any-return]

    def unary_many(
        self, count: int, *, concurrency: int, request: EchoRequest = REQUEST, timeout: float = CALL_TIMEOUT
    ) -> list[EchoResponse | BaseException]:
        def one(_: int) -> EchoResponse | BaseException:
            try:
                return self.unary(request, timeout=timeout)
            except grpc.RpcError as error:
                return error

        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="retry-load") as pool:
            return list(pool.map(one, range(count), timeout=RUN_LIMIT))

    def describe(self) -> dict[str, Any]:
        return self.channel.describe()

    def in_flight(self) -> int:
        return sum(channel.describe()["in_flight"] for channel in self._opened)

    def shutdown(self) -> None:
        for channel in self._opened:
            channel.close()


class AioClient:
    """A poolkit.aio.Channel driven from an event loop in its own thread."""

    kind = "aio"

    def __init__(self) -> None:
        self._opened: list[poolkit.aio.Channel] = []
        self._loop = LoopThread("retry-aio-loop", RUN_LIMIT)

    def _run(self, coroutine: Any, limit: float = RUN_LIMIT) -> Any:
        return self._loop.run(coroutine, limit)

    def open(self, target: str | Sequence[str], config: PoolConfig) -> None:
        async def open_channel() -> poolkit.aio.Channel:
            return poolkit.aio.insecure_channel(target, config=config)

        self.channel = self._run(open_channel())
        self._opened.append(self.channel)
        self._stub = EchoStub(self.channel)

    def unary(self, request: EchoRequest = REQUEST, *, timeout: float = CALL_TIMEOUT) -> EchoResponse:
        async def call() -> EchoResponse:
            return await self._stub.Unary(request, timeout=timeout)  # type: ignore[no-any-return]

        return self._run(call(), limit=timeout + RUN_LIMIT)  # type: ignore[no-any-return]

    def unary_with_call(
        self, request: EchoRequest = REQUEST, *, timeout: float = CALL_TIMEOUT
    ) -> tuple[EchoResponse, grpc.StatusCode]:
        async def call() -> tuple[EchoResponse, grpc.StatusCode]:
            rpc = self._stub.Unary(request, timeout=timeout)
            response = await rpc
            return response, await rpc.code()

        return self._run(call(), limit=timeout + RUN_LIMIT)  # type: ignore[no-any-return]

    def server_stream(self, request: EchoRequest, *, timeout: float = CALL_TIMEOUT) -> list[EchoResponse]:
        async def call() -> list[EchoResponse]:
            return [response async for response in self._stub.ServerStream(request, timeout=timeout)]

        return self._run(call(), limit=timeout + RUN_LIMIT)  # type: ignore[no-any-return]

    def client_stream(self, requests: Sequence[EchoRequest], *, timeout: float = CALL_TIMEOUT) -> EchoResponse:
        async def call() -> EchoResponse:
            return await self._stub.ClientStream(list(requests), timeout=timeout)  # type: ignore[no-any-return]

        return self._run(call(), limit=timeout + RUN_LIMIT)  # type: ignore[no-any-return]

    def unary_many(
        self, count: int, *, concurrency: int, request: EchoRequest = REQUEST, timeout: float = CALL_TIMEOUT
    ) -> list[EchoResponse | BaseException]:
        async def one() -> EchoResponse:
            return await self._stub.Unary(request, timeout=timeout)  # type: ignore[no-any-return]

        async def batches() -> list[EchoResponse | BaseException]:
            outcomes: list[EchoResponse | BaseException] = []
            for start in range(0, count, concurrency):
                batch = [one() for _ in range(min(concurrency, count - start))]
                outcomes.extend(await asyncio.gather(*batch, return_exceptions=True))
            return outcomes

        return self._run(batches())  # type: ignore[no-any-return]

    def describe(self) -> dict[str, Any]:
        async def describe() -> dict[str, Any]:
            return self.channel.describe()

        return self._run(describe())  # type: ignore[no-any-return]

    def in_flight(self) -> int:
        async def count() -> int:
            return sum(channel.describe()["in_flight"] for channel in self._opened)

        return self._run(count())  # type: ignore[no-any-return]

    def shutdown(self) -> None:
        self._loop.stop(self._opened)


KINDS = ("sync", "aio")


@pytest.fixture(params=KINDS)
def client(request: pytest.FixtureRequest) -> Iterator[Client]:
    """One blocking way to drive a poolkit channel of either kind; the test opens it."""
    driver: Client = SyncClient() if request.param == "sync" else AioClient()
    yield driver
    driver.shutdown()


def assert_settles(client: Client) -> None:
    """Every call, attempt, requeue and hedge has been accounted for: nothing in flight."""
    wait_until(lambda: client.in_flight() == 0, lambda: f"in-flight to return to 0: {client.describe()}")


# -- servers --------------------------------------------------------------------------------


@pytest.fixture
def echo() -> Iterator[Callable[..., EchoServers]]:
    """Starts in-process echo servers (`count`, with per-server `delays` and grpc server
    `options`); stops them after the test."""
    started: list[EchoServers] = []

    def start(count: int, *, delays: Sequence[float] = (), options: Sequence[tuple[str, object]] = ()) -> EchoServers:
        servers = start_echo_servers(count, delays=delays, options=options)
        started.append(servers)
        return servers

    yield start
    for servers in started:
        servers.stop()


@pytest.fixture
def dead_address() -> Iterator[str]:
    """An address where nobody listens: the port is bound but never listened on, so every
    connect is refused at once, and no other process can take it while the test runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


# -- 1. a failure, then success on another endpoint -----------------------------------------

# The first server is given this weight, the second 1: smooth weighted round robin then
# sends the first five picks of a fresh channel to the first server. So the first attempt
# deterministically lands on it, and a retry that did not avoid the endpoint it just
# failed on would land there again (and, its one failure spent, succeed there): only a
# retry that really moved on is answered by the second server.
HEAVY = 10.0
STREAM_LENGTH = 2


def _unary(client: Client) -> list[EchoResponse]:
    return [client.unary()]


def _with_call(client: Client) -> list[EchoResponse]:
    response, code = client.unary_with_call()
    assert code is OK  # the call object is the successful attempt's
    return [response]


def _server_stream(client: Client) -> list[EchoResponse]:
    responses = client.server_stream(EchoRequest(payload=b"s", repeat=STREAM_LENGTH))
    assert [response.index for response in responses] == list(range(STREAM_LENGTH))
    return responses


def _client_stream(client: Client) -> list[EchoResponse]:
    response = client.client_stream([EchoRequest(payload=b"a"), EchoRequest(payload=b"b")])
    assert response.payload == b"ab"  # the whole list went again, not an exhausted iterator
    return [response]


# shape: (the echo method, how the call is made and its responses checked)
SHAPES: dict[str, tuple[str, Callable[[Client], list[EchoResponse]]]] = {
    "unary": ("Unary", _unary),
    "with_call": ("Unary", _with_call),
    "server_stream": ("ServerStream", _server_stream),
    "client_stream": ("ClientStream", _client_stream),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("policy_source", ["retry", "method_retry"])
def test_failed_idempotent_call_is_retried_on_another_endpoint(
    client: Client, echo: Callable[..., EchoServers], shape: str, policy_source: str
) -> None:
    """An idempotent call that fails with UNAVAILABLE is sent again, once, to the other
    endpoint, saying so in grpc-previous-rpc-attempts; the caller sees only the success.
    The policy may be the channel's default or the method's own entry in method_retry."""
    servers = echo(2)
    first, other = servers
    name, make_call = SHAPES[shape]
    policy = {"retry": IDEMPOTENT} if policy_source == "retry" else {"method_retry": {method(name): IDEMPOTENT}}
    client.open(servers.addresses, pool_config(weights={first.address: HEAVY}, **policy))
    first.fail_next(1)

    responses = make_call(client)

    assert (first.calls, other.calls) == (1, 1), "one failed attempt on the first server, one retry on the other"
    assert {response.server_id for response in responses} == {other.server_id}
    assert {previous_attempts(response) for response in responses} == {"1"}
    budget = client.describe()["retry_budget"]
    assert (budget["retries"], budget["requeues"], budget["refused"]) == (1, 0, 0)
    assert_settles(client)


# -- 2. codes outside the policy ------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        # From the server, not the caller's deadline or an attempt timeout: an answer.
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ],
    ids=lambda code: code.name,
)
def test_codes_outside_the_policy_are_not_retried(
    client: Client, echo: Callable[..., EchoServers], code: grpc.StatusCode
) -> None:
    """An idempotent method is retried only on its policy's codes (UNAVAILABLE by
    default): any other failure reaches the caller as the server sent it, after one attempt."""
    servers = echo(2)
    client.open(servers.addresses, pool_config(retry=IDEMPOTENT))
    details = f"not retryable: {code.name}"

    with pytest.raises(grpc.RpcError) as raised:
        client.unary(failing(code, details))

    assert_original_error(raised.value, code, details)
    assert served(servers) == 1
    assert client.describe()["retry_budget"]["retries"] == 0
    assert_settles(client)


# -- 3. idempotence decides whether a call that reached a server is retried ----------------


@pytest.mark.parametrize("idempotent", [False, True], ids=["non_idempotent", "idempotent"])
def test_only_idempotent_calls_are_retried_after_reaching_a_server(
    client: Client, echo: Callable[..., EchoServers], idempotent: bool
) -> None:
    """A call the server received and failed with UNAVAILABLE is not sent again under the
    default (non-idempotent) policy; declared idempotent, it is, up to max_attempts. Either
    way the caller gets the server's error."""
    servers = echo(2)
    policy = IDEMPOTENT if idempotent else RetryPolicy()
    client.open(servers.addresses, pool_config(retry=policy))
    details = "failed after it arrived"

    with pytest.raises(grpc.RpcError) as raised:
        client.unary(failing(UNAVAILABLE, details))

    assert_original_error(raised.value, UNAVAILABLE, details)
    attempts = MAX_ATTEMPTS if idempotent else 1
    assert served(servers) == attempts
    assert client.describe()["retry_budget"]["retries"] == attempts - 1
    assert_settles(client)


# -- 4. requeue: a call that never reached a server ----------------------------------------

REQUEUE_CALLS = 10


def test_call_that_never_left_is_requeued(client: Client, echo: Callable[..., EchoServers], dead_address: str) -> None:
    """A non-idempotent call whose endpoint could not be connected to ("failed to connect
    to all addresses") is requeued to another endpoint: every call succeeds, each reached
    a server exactly once, and a requeue is not counted as an attempt."""
    (live,) = echo(1)
    # Not connecting at construction: the dead endpoint stays in rotation until a call
    # tries it, and round robin sends one of the first two calls there.
    client.open([dead_address, live.address], pool_config(connect_on_start=False))

    responses = [client.unary() for _ in range(REQUEUE_CALLS)]

    assert {response.server_id for response in responses} == {live.server_id}
    assert live.calls == REQUEUE_CALLS, "no call reached the live server twice"
    # A requeued first attempt is still the first: no grpc-previous-rpc-attempts at all.
    assert [previous_attempts(response) for response in responses] == [None] * REQUEUE_CALLS
    budget = client.describe()["retry_budget"]
    assert budget["requeues"] >= 1, budget
    assert budget["retries"] == 0, budget
    assert_settles(client)


# -- 5. the caller's deadline bounds the retries --------------------------------------------

SLOW_FAILURE = 0.3  # each attempt takes this long on the server, then fails
DEADLINE = 1.0
DEADLINE_SLACK = 0.5
DEADLINE_POLICY = RetryPolicy(idempotent=True, max_attempts=5)


def test_retries_stop_at_the_callers_deadline(client: Client, echo: Callable[..., EchoServers]) -> None:
    """Retries of a slowly failing call stop at the caller's deadline, well short of
    max_attempts: no attempt is started that could not finish in time, and the call
    ends no later than the deadline (plus slack)."""
    servers = echo(2, delays=(SLOW_FAILURE, SLOW_FAILURE))
    client.open(servers.addresses, pool_config(retry=DEADLINE_POLICY))
    # A request that fails is slowed by the server's delay (a server-wide fail_code would
    # fail at once, before the delay).
    request = failing(UNAVAILABLE, "slow failure")

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        client.unary(request, timeout=DEADLINE)
    elapsed = time.monotonic() - started

    print(f"\n[deadline {client.kind}] {served(servers)} attempts, ended after {elapsed:.3f} s")
    assert raised.value.code() in {UNAVAILABLE, DEADLINE_EXCEEDED}, raised.value
    assert elapsed <= DEADLINE + DEADLINE_SLACK
    assert 1 <= served(servers) <= 4 < DEADLINE_POLICY.max_attempts
    assert_settles(client)


# -- 6. a retry storm is capped by the budget -----------------------------------------------

STORM_SERVERS = 4
STORM_CALLS = 1000
STORM_CONCURRENCY = 16  # threads (sync) or calls per gathered batch (aio)
STORM_POLICY = RetryPolicy(idempotent=True, initial_backoff=0.001, max_backoff=0.002, max_attempts=3)
STORM_SLACK = 10


def test_retry_storm_is_capped_by_the_budget(client: Client, echo: Callable[..., EchoServers]) -> None:
    """With every server failing, retries add at most the budget's share (20 % of the
    calls plus the 100-retry reserve) instead of tripling the load; the calls the budget
    refused end with the server's own error."""
    servers = echo(STORM_SERVERS)
    for server in servers:
        server.fail_code = UNAVAILABLE
    client.open(servers.addresses, pool_config(retry=STORM_POLICY))

    started = time.monotonic()
    outcomes = client.unary_many(STORM_CALLS, concurrency=STORM_CONCURRENCY)
    elapsed = time.monotonic() - started

    attempts = served(servers)
    budget = client.describe()["retry_budget"]
    # A storm longer than the window would have its reserve back once per window.
    windows = 1 + int(elapsed // DEFAULT_BUDGET.window)
    reserve = DEFAULT_BUDGET.min_per_second * DEFAULT_BUDGET.window
    allowed = STORM_CALLS * (1 + DEFAULT_BUDGET.ratio) + reserve * windows
    print(
        f"\n[storm {client.kind}] {attempts} server-side attempts for {STORM_CALLS} calls "
        f"(at most {allowed:.0f} allowed, {STORM_CALLS * STORM_POLICY.max_attempts} without a budget) "
        f"in {elapsed:.2f} s; budget {budget}"
    )
    assert len(outcomes) == STORM_CALLS
    for outcome in outcomes:
        assert isinstance(outcome, BaseException), f"a call succeeded against failing servers: {outcome}"
        assert_original_error(outcome, UNAVAILABLE, FAIL_DETAILS)
    assert attempts == STORM_CALLS + budget["retries"], "every retry the budget paid for reached a server"
    assert attempts <= allowed + STORM_SLACK
    assert budget["refused"] > 0
    assert_settles(client)


# -- 7. the server's pushback ---------------------------------------------------------------

PUSHBACK_MS = 300


def test_retry_waits_for_the_servers_pushback(client: Client, echo: Callable[..., EchoServers]) -> None:
    """A failure carrying grpc-retry-pushback-ms is retried after that long, not after the
    policy's backoff (here 10-20 ms)."""
    servers = echo(1)
    (server,) = servers
    client.open(servers.addresses, pool_config(retry=IDEMPOTENT))
    server.fail_next(1, pushback_ms=PUSHBACK_MS)

    started = time.monotonic()
    response = client.unary()
    elapsed = time.monotonic() - started

    print(f"\n[pushback {client.kind}] retried call took {elapsed:.3f} s (pushback {PUSHBACK_MS} ms)")
    assert previous_attempts(response) == "1"
    assert server.calls == 2
    assert elapsed >= PUSHBACK_MS / 1000
    assert_settles(client)


@pytest.mark.parametrize("pushback", [-1, "abc"], ids=["negative", "not_a_number"])
def test_malformed_pushback_stops_retries(client: Client, echo: Callable[..., EchoServers], pushback: Any) -> None:
    """A negative or malformed grpc-retry-pushback-ms means "do not retry": the caller
    gets the failure after one attempt (a retry would have succeeded)."""
    servers = echo(1)
    (server,) = servers
    client.open(servers.addresses, pool_config(retry=IDEMPOTENT))
    server.fail_next(1, pushback_ms=pushback)

    with pytest.raises(grpc.RpcError) as raised:
        client.unary()

    assert_original_error(raised.value, UNAVAILABLE, FAIL_DETAILS)
    assert server.calls == 1
    assert client.describe()["retry_budget"]["retries"] == 0
    assert_settles(client)


# -- 8. hedging -----------------------------------------------------------------------------

SLOW = 0.5  # the slow server's latency
HEDGE_DELAY = 0.05
HEDGE_CALLS = 20
HEDGING_POLICY = RetryPolicy(idempotent=True, hedging=Hedging(delay=HEDGE_DELAY))


def test_hedged_calls_are_answered_by_the_fast_endpoint(client: Client, echo: Callable[..., EchoServers]) -> None:
    """With one slow endpoint, a call sent there first is hedged to the other after the
    hedge delay; the fast answer wins, and the losing attempt is cancelled. Round robin
    (not latency-aware balancing) keeps sending half the first attempts to the slow one."""
    servers = echo(2, delays=(SLOW, 0.0))
    slow, fast = servers
    client.open(servers.addresses, pool_config(retry=HEDGING_POLICY))

    latencies = []
    responses = []
    for _ in range(HEDGE_CALLS):
        started = time.monotonic()
        responses.append(client.unary())
        latencies.append(time.monotonic() - started)
    assert_settles(client)

    # A hedge carries grpc-previous-rpc-attempts 1: these calls went to the slow server first.
    hedged = sum(previous_attempts(response) == "1" for response in responses)
    described = client.describe()
    hedges = described["retry_budget"]["hedges"]
    slow_route = next(e for e in described["endpoints"] if e["address"] == slow.address)
    print(
        f"\n[hedging {client.kind}] {HEDGE_CALLS} calls: {hedged} sent to the slow server first, "
        f"{hedges} hedges, {served(servers) - HEDGE_CALLS} extra server-side attempts; "
        f"latency median {statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
        f"(slow server {SLOW * 1000:.0f} ms, hedge after {HEDGE_DELAY * 1000:.0f} ms)"
    )
    assert {response.server_id for response in responses} == {fast.server_id}
    assert hedged >= HEDGE_CALLS // 4, "round robin sends about half the first attempts to the slow server"
    assert hedged <= hedges <= HEDGE_CALLS
    assert served(servers) <= HEDGE_CALLS + hedges
    reserve = DEFAULT_BUDGET.min_per_second * DEFAULT_BUDGET.window
    assert hedges <= DEFAULT_BUDGET.ratio * HEDGE_CALLS + reserve
    # Every attempt on the slow server was cancelled: none ran to its (OK) end.
    assert slow_route["calls"] >= hedged
    assert slow_route["errors"] == slow_route["calls"], slow_route


# -- 9. an exhausted budget returns the original error --------------------------------------

ONE_RETRY = RetryBudget(ratio=0.0, min_per_second=0.1, window=10.0)  # a reserve of one retry per 10 s
BUDGET_CALLS = 5


def test_exhausted_budget_returns_the_original_error(client: Client, echo: Callable[..., EchoServers]) -> None:
    """Once the budget is spent, a retryable failure is not retried: the caller gets the
    server's error after one attempt, and each refusal is counted."""
    servers = echo(2)
    client.open(servers.addresses, pool_config(retry=IDEMPOTENT, retry_budget=ONE_RETRY))
    details = "failing until the budget runs out"

    refused = []
    attempts = []
    for _ in range(BUDGET_CALLS):
        with pytest.raises(grpc.RpcError) as raised:
            client.unary(failing(UNAVAILABLE, details))
        assert_original_error(raised.value, UNAVAILABLE, details)
        refused.append(client.describe()["retry_budget"]["refused"])
        attempts.append(served(servers))

    # The first call: two attempts (the reserve's one retry), then its second retry is
    # refused. Every later call: one attempt, one refusal.
    assert attempts == list(range(2, BUDGET_CALLS + 2))
    assert refused == list(range(1, BUDGET_CALLS + 1))
    assert client.describe()["retry_budget"]["retries"] == 1
    assert_settles(client)


# -- 10. an attempt timeout ends a slow attempt and the call goes on -------------------------

STUCK = 3.0  # the stuck server's latency: far beyond the attempt timeout
ATTEMPT_TIMEOUT_POLICY = RetryPolicy(idempotent=True, attempt_timeout=0.2, initial_backoff=0.01, max_backoff=0.02)


def test_attempt_timeout_moves_a_stuck_call_on(client: Client, echo: Callable[..., EchoServers]) -> None:
    """An idempotent method with an attempt timeout: the attempt on a stuck server is ended
    by its own timeout (not the caller's deadline) and the call is answered by the other
    endpoint, as attempt 2."""
    servers = echo(2, delays=(STUCK, 0.0))
    stuck, fast = servers
    client.open(servers.addresses, pool_config(weights={stuck.address: HEAVY}, retry=ATTEMPT_TIMEOUT_POLICY))

    response = client.unary(timeout=CALL_TIMEOUT)

    assert response.server_id == fast.server_id
    assert previous_attempts(response) == "1"
    assert (stuck.calls, fast.calls) == (1, 1)
    assert client.describe()["retry_budget"]["retries"] == 1
    assert_settles(client)


# -- 11. connections recycled under load: refused streams are requeued ----------------------

# Servers close every connection after 50 ms with a GOAWAY; a stream that crosses the
# GOAWAY is refused unprocessed and must be requeued, for any method.
RECYCLING = [("grpc.max_connection_age_ms", 50), ("grpc.max_connection_age_grace_ms", 10_000)]
RECYCLE_CALLS = 1500
RECYCLE_CONCURRENCY = 8


def test_calls_survive_connections_recycled_by_goaway(client: Client, echo: Callable[..., EchoServers]) -> None:
    """Under the default (non-idempotent) policy, calls over connections the servers keep
    recycling with GOAWAY all succeed: none reached a server twice, and whatever grpc
    refused unsent was requeued."""
    servers = echo(2, options=RECYCLING)
    client.open(servers.addresses, pool_config())

    outcomes = client.unary_many(RECYCLE_CALLS, concurrency=RECYCLE_CONCURRENCY)

    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    budget = client.describe()["retry_budget"]
    print(f"\n[recycling {client.kind}] {RECYCLE_CALLS} calls, {len(failures)} failed, {budget['requeues']} requeued")
    assert failures == []
    assert served(servers) == RECYCLE_CALLS, "a call reached a server twice"
    assert budget["retries"] == 0, budget
    assert_settles(client)


# -- 12. the sync future() -----------------------------------------------------------------
# A future has no thread of its own: its retries are decided in grpc's callback thread and
# sent from a timer. These tests drive poolkit.Channel directly (asyncio has no future()).


@pytest.fixture
def sync_channel() -> Iterator[Callable[..., poolkit.Channel]]:
    opened: list[poolkit.Channel] = []

    def open_channel(target: str | Sequence[str], config: PoolConfig) -> poolkit.Channel:
        channel = poolkit.insecure_channel(target, config=config)
        opened.append(channel)
        return channel

    yield open_channel
    for channel in opened:
        channel.close()


def settled(channel: poolkit.Channel) -> None:
    wait_until(lambda: channel.describe()["in_flight"] == 0, lambda: f"in-flight to return to 0: {channel.describe()}")


class DoneCallbacks:
    """Records each call of a future's done-callback: which future, and its code then."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, grpc.StatusCode]] = []

    def __call__(self, future: Any) -> None:
        self.calls.append((future, future.code()))


def start_future(stub: EchoStub, shape: str, request: EchoRequest = REQUEST, **kwargs: Any) -> Any:
    if shape == "unary":
        return stub.Unary.future(request, **kwargs)
    return stub.ClientStream.future([request, EchoRequest(payload=b"b")], **kwargs)


@pytest.mark.parametrize("shape", ["unary", "client_stream"])
def test_future_is_retried_on_another_endpoint(
    sync_channel: Callable[..., poolkit.Channel], echo: Callable[..., EchoServers], shape: str
) -> None:
    """future() of an idempotent method that fails with UNAVAILABLE is sent again to the
    other endpoint; the caller's one future gives the success, and its done-callback runs
    once, when the call (not the failed attempt) is over."""
    servers = echo(2)
    first, other = servers
    channel = sync_channel(servers.addresses, pool_config(weights={first.address: HEAVY}, retry=IDEMPOTENT))
    first.fail_next(1)
    callbacks = DoneCallbacks()

    future = start_future(EchoStub(channel), shape, timeout=CALL_TIMEOUT)
    future.add_done_callback(callbacks)
    response = future.result(timeout=CALL_TIMEOUT)

    assert response.server_id == other.server_id
    assert previous_attempts(response) == "1"
    assert (first.calls, other.calls) == (1, 1)
    assert future.code() is OK
    assert future.done()
    assert not future.cancelled()
    wait_until(lambda: len(callbacks.calls) == 1, lambda: f"one done-callback: {callbacks.calls}")
    assert callbacks.calls == [(future, OK)]
    late = DoneCallbacks()
    future.add_done_callback(late)  # added when over: called at once
    assert late.calls == [(future, OK)]
    assert channel.describe()["retry_budget"]["retries"] == 1
    settled(channel)


def test_future_that_never_left_is_requeued(
    sync_channel: Callable[..., poolkit.Channel], echo: Callable[..., EchoServers], dead_address: str
) -> None:
    """Futures of a non-idempotent method sent towards a refusing endpoint are requeued to
    the live one, from grpc's callback thread: all succeed, each reached a server once."""
    (live,) = echo(1)
    channel = sync_channel([dead_address, live.address], pool_config(connect_on_start=False))
    stub = EchoStub(channel)

    futures = [stub.Unary.future(REQUEST, timeout=CALL_TIMEOUT) for _ in range(REQUEUE_CALLS)]
    responses = [future.result(timeout=CALL_TIMEOUT) for future in futures]

    assert {response.server_id for response in responses} == {live.server_id}
    assert live.calls == REQUEUE_CALLS
    budget = channel.describe()["retry_budget"]
    assert budget["requeues"] >= 1, budget
    assert budget["retries"] == 0, budget
    settled(channel)


def test_future_of_a_non_idempotent_method_is_not_retried(
    sync_channel: Callable[..., poolkit.Channel], echo: Callable[..., EchoServers]
) -> None:
    """A non-idempotent future the server failed is over after one attempt: result()
    raises, and exception() returns, the server's own error."""
    servers = echo(2)
    channel = sync_channel(servers.addresses, pool_config())
    details = "failed after it arrived"

    future = EchoStub(channel).Unary.future(failing(UNAVAILABLE, details), timeout=CALL_TIMEOUT)

    with pytest.raises(grpc.RpcError) as raised:
        future.result(timeout=CALL_TIMEOUT)
    assert_original_error(raised.value, UNAVAILABLE, details)
    assert_original_error(future.exception(), UNAVAILABLE, details)
    assert (future.code(), future.details()) == (UNAVAILABLE, details)
    assert served(servers) == 1
    settled(channel)


def test_future_with_a_one_shot_request_stream_is_sent_once(
    sync_channel: Callable[..., poolkit.Channel], echo: Callable[..., EchoServers]
) -> None:
    """A request stream given as a generator cannot be sent again: its future is grpc's
    own, and its failure is final even for an idempotent method."""
    servers = echo(2)
    channel = sync_channel(servers.addresses, pool_config(retry=IDEMPOTENT))
    for server in servers:
        server.fail_next(1)

    future = EchoStub(channel).ClientStream.future((r for r in [REQUEST]), timeout=CALL_TIMEOUT)

    assert future.exception(timeout=CALL_TIMEOUT).code() is UNAVAILABLE
    assert served(servers) == 1
    settled(channel)


LONG_BACKOFF = RetryPolicy(idempotent=True, initial_backoff=0.3, max_backoff=0.3, jitter=0.0)


def test_future_cancelled_while_waiting_to_retry(
    sync_channel: Callable[..., poolkit.Channel], echo: Callable[..., EchoServers]
) -> None:
    """cancel() between attempts ends the call at once, as cancelled, and the retry it was
    waiting to send is never sent."""
    servers = echo(2)
    channel = sync_channel(servers.addresses, pool_config(retry=LONG_BACKOFF))
    callbacks = DoneCallbacks()
    future = EchoStub(channel).Unary.future(failing(UNAVAILABLE, "retry me"), timeout=CALL_TIMEOUT)
    future.add_done_callback(callbacks)
    wait_until(lambda: channel.describe()["retry_budget"]["retries"] == 1, "the first attempt to fail")

    assert future.cancel()

    assert future.cancelled()
    assert future.done()
    assert not future.running()
    assert (future.code(), future.details()) == (grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    assert callbacks.calls == [(future, grpc.StatusCode.CANCELLED)]
    assert not future.cancel(), "already over"
    time.sleep(2 * LONG_BACKOFF.max_backoff)  # past when the retry would have gone
    assert served(servers) == 1
    settled(channel)


def test_future_cancelled_in_flight(
    sync_channel: Callable[..., poolkit.Channel], echo: Callable[..., EchoServers]
) -> None:
    """cancel() while an attempt is out cancels that attempt; nothing is sent again."""
    servers = echo(2, delays=(STUCK, STUCK))
    channel = sync_channel(servers.addresses, pool_config(retry=IDEMPOTENT))
    future = EchoStub(channel).Unary.future(REQUEST, timeout=CALL_TIMEOUT)
    wait_until(lambda: served(servers) == 1, "the attempt to reach a server")

    assert future.cancel()

    assert future.cancelled()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    assert future.code() is grpc.StatusCode.CANCELLED
    settled(channel)
    assert served(servers) == 1
    assert channel.describe()["retry_budget"]["retries"] == 0


def test_future_retries_stop_at_the_callers_deadline(
    sync_channel: Callable[..., poolkit.Channel], echo: Callable[..., EchoServers]
) -> None:
    """A future of a slowly failing call is retried only while an attempt could finish
    before the caller's deadline; it ends no later than the deadline (plus slack)."""
    servers = echo(2, delays=(SLOW_FAILURE, SLOW_FAILURE))
    channel = sync_channel(servers.addresses, pool_config(retry=DEADLINE_POLICY))

    started = time.monotonic()
    future = EchoStub(channel).Unary.future(failing(UNAVAILABLE, "slow failure"), timeout=DEADLINE)
    remaining = future.time_remaining()
    error = future.exception(timeout=CALL_TIMEOUT)
    elapsed = time.monotonic() - started

    assert remaining is not None
    assert 0 < remaining <= DEADLINE
    assert error.code() in {UNAVAILABLE, DEADLINE_EXCEEDED}, error
    assert elapsed <= DEADLINE + DEADLINE_SLACK
    assert 1 <= served(servers) <= 4 < DEADLINE_POLICY.max_attempts
    settled(channel)


def test_future_attempt_timeout_and_hedging(
    sync_channel: Callable[..., poolkit.Channel], echo: Callable[..., EchoServers]
) -> None:
    """future() of a hedged method sent to a stuck server first is hedged to the other
    one, whose answer wins; with an attempt timeout instead, the stuck attempt times out
    and the retry answers. Either way the stuck attempt ends cancelled or timed out."""
    servers = echo(2, delays=(STUCK, 0.0))
    stuck, fast = servers
    weights = {stuck.address: HEAVY}
    hedged = sync_channel(servers.addresses, pool_config(weights=weights, retry=HEDGING_POLICY))
    timed = sync_channel(servers.addresses, pool_config(weights=weights, retry=ATTEMPT_TIMEOUT_POLICY))

    for channel, counter in ((hedged, "hedges"), (timed, "retries")):
        response = EchoStub(channel).Unary.future(REQUEST, timeout=CALL_TIMEOUT).result(timeout=CALL_TIMEOUT)
        assert response.server_id == fast.server_id
        assert previous_attempts(response) == "1"
        assert channel.describe()["retry_budget"][counter] == 1
        settled(channel)
        stuck_route = next(e for e in channel.describe()["endpoints"] if e["address"] == stuck.address)
        assert (stuck_route["calls"], stuck_route["errors"]) == (1, 1), stuck_route
    assert (stuck.calls, fast.calls) == (2, 2)
