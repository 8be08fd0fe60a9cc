"""Endpoint health end to end, one suite run against the sync and the asyncio channel:
active health checks, failure accrual with ejection and probing, connection faults (a
killed server, a black hole, GOAWAY), discovery, graceful close and fast failure.

Real servers on loopback and real faults. Every wait is bounded and every load loop is
bounded in calls and in time; nothing asserts how long something took (the times a fault
took to take effect are measured and reported instead: `pytest -s` prints them, and
they are appended as JSON lines to the file named by POOLKIT_FAULT_REPORT if it is set).

The `client` fixture gives both channel kinds one blocking interface, so each behaviour
is written once. For asyncio it runs an event loop in a thread of its own: the channel,
its calls and the load's tasks live there, and the test's thread only submits to it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Protocol

import grpc
import grpc.aio
import pytest
from _loop_thread import LoopThread
from _support import wait_until

import poolkit
import poolkit.aio
from poolkit import FailureAccrual, HealthCheck, PoolConfig
from poolkit.testing import (
    EchoRequest,
    EchoResponse,
    EchoServers,
    EchoStub,
    FaultProxy,
    SpawnedEchoServers,
    echo_pb2_grpc,
    spawn_echo_servers,
    start_echo_servers,
)

pytestmark = [
    pytest.mark.timeout(90),
    # The pool's background work (health checks, discovery, reconnects) must never die
    # with an unhandled exception, in its own threads or in grpc's.
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED

REQUEST = EchoRequest(payload=b"x")
CALL_TIMEOUT = 5.0

# A fault (a killed process, a silent connection) takes longer to notice than a health
# update: the first failures, then accrual or grpc's connectivity. Generous for 2 busy cores.
FAULT_WAIT = 10.0
# How long the test thread waits on anything it handed to the asyncio loop or a thread.
RUN_LIMIT = 20.0

# Statuses that take an endpoint out of rotation.
OUT_OF_ROTATION = frozenset({"ejected", "failing", "unhealthy", "draining"})

# Where a test needs a given endpoint to take calls, round robin guarantees it a share;
# peak EWMA would follow latency noise (an endpoint whose first call paid the channel's
# one-off costs is priced out for seconds), which is not what these tests are about.
EVEN = "round_robin"

# Quick health updates for the Check (polling) variant.
FAST_CHECKS = HealthCheck(watch=False, interval=0.2, timeout=0.5)

# The server closes every connection 300 ms after it opens (GOAWAY), and lets calls
# already running on it finish for up to 5 s.
AGEING = [("grpc.max_connection_age_ms", 300), ("grpc.max_connection_age_grace_ms", 5000)]


# -- a uniform client over both channel kinds ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    started: float
    ended: float
    code: grpc.StatusCode


class Load:
    """Unary calls running in the background, at most `concurrency` at once, until `total`
    calls have started, `duration` seconds have passed or `stop()` is called."""

    def __init__(self, total: int, duration: float) -> None:
        self.deadline = time.monotonic() + duration
        self._total = total
        self._numbers = itertools.count()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self.ok = 0
        self.failed = 0
        self.finished: Future[Any] = Future()

    def next_call(self) -> bool:
        return not self._stopping.is_set() and time.monotonic() < self.deadline and next(self._numbers) < self._total

    def record(self, started: float, code: grpc.StatusCode) -> None:
        outcome = Outcome(started, time.monotonic(), code)
        with self._lock:
            self.outcomes.append(outcome)
            if code is OK:
                self.ok += 1
            else:
                self.failed += 1

    def wait(self) -> list[Outcome]:
        """Wait for the load to end by itself (it is bounded) and return every outcome."""
        self.finished.result(timeout=max(0.0, self.deadline - time.monotonic()) + RUN_LIMIT)
        return list(self.outcomes)

    def stop(self) -> list[Outcome]:
        self._stopping.set()
        return self.wait()

    def wait_for_more_ok(self, count: int, what: str) -> None:
        """Wait until `count` more calls than now have succeeded."""
        target = self.ok + count
        wait_until(
            lambda: self.ok >= target or self.finished.done(),
            lambda: f"{what}: {self.ok} of {target} calls OK, {self.failed} failed",
            limit=FAULT_WAIT,
        )
        assert self.ok >= target, f"{what}: the load ended with {self.ok} of {target} calls OK, {self.failed} failed"


class Client(Protocol):
    kind: str

    def open(self, target: str | Sequence[str], *, config: PoolConfig | None = None) -> None: ...

    def call(
        self, request: EchoRequest = REQUEST, *, timeout: float = CALL_TIMEOUT, wait_for_ready: bool | None = None
    ) -> EchoResponse: ...

    def start(
        self, request: EchoRequest = REQUEST, *, timeout: float = CALL_TIMEOUT, wait_for_ready: bool | None = None
    ) -> Future[EchoResponse]: ...

    def load(
        self,
        *,
        concurrency: int,
        total: int,
        duration: float,
        request: EchoRequest = REQUEST,
        timeout: float = CALL_TIMEOUT,
    ) -> Load: ...

    def describe(self) -> dict[str, Any]: ...

    def start_close(self, grace: float | None) -> Future[None]: ...

    def shutdown(self) -> None: ...


def _in_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
    """Run `function` in a daemon thread of its own (a hung call cannot hold up the run)."""
    future: Future[Any] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(function(*args, **kwargs))
        except BaseException as error:
            future.set_exception(error)

    threading.Thread(target=run, daemon=True).start()
    return future


class SyncClient:
    """A poolkit.Channel driven from threads."""

    kind = "sync"

    def __init__(self) -> None:
        self.channel: poolkit.Channel | None = None
        self._opened: list[poolkit.Channel] = []

    def open(self, target: str | Sequence[str], *, config: PoolConfig | None = None) -> None:
        """Open the channel the other methods use (a later call replaces it; all are closed at the end)."""
        self.channel = poolkit.insecure_channel(target, config=config)
        self._opened.append(self.channel)
        self._stub = EchoStub(self.channel)

    def call(
        self, request: EchoRequest = REQUEST, *, timeout: float = CALL_TIMEOUT, wait_for_ready: bool | None = None
    ) -> EchoResponse:
        return self._stub.Unary(request, timeout=timeout, wait_for_ready=wait_for_ready)  # type: ignore[no-any-return]

    def start(
        self, request: EchoRequest = REQUEST, *, timeout: float = CALL_TIMEOUT, wait_for_ready: bool | None = None
    ) -> Future[EchoResponse]:
        return _in_thread(self.call, request, timeout=timeout, wait_for_ready=wait_for_ready)

    def load(
        self,
        *,
        concurrency: int,
        total: int,
        duration: float,
        request: EchoRequest = REQUEST,
        timeout: float = CALL_TIMEOUT,
    ) -> Load:
        load = Load(total, duration)
        unary = self._stub.Unary

        def worker() -> None:
            while load.next_call():
                started = time.monotonic()
                try:
                    unary(request, timeout=timeout)
                    code = OK
                except grpc.RpcError as error:
                    code = error.code()
                load.record(started, code)

        workers = [_in_thread(worker) for _ in range(concurrency)]
        _in_thread(lambda: [w.result() for w in workers]).add_done_callback(lambda done: _copy(done, load.finished))
        return load

    def describe(self) -> dict[str, Any]:
        assert self.channel is not None
        return self.channel.describe()

    def start_close(self, grace: float | None) -> Future[None]:
        assert self.channel is not None
        return _in_thread(self.channel.close, grace)

    def shutdown(self) -> None:
        for channel in self._opened:
            channel.close()


def _copy(source: Future[Any], target: Future[Any]) -> None:
    error = source.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())


class AioClient:
    """A poolkit.aio.Channel driven from tasks on an event loop in its own thread."""

    kind = "aio"

    def __init__(self) -> None:
        self.channel: poolkit.aio.Channel | None = None
        self._opened: list[poolkit.aio.Channel] = []
        self._loop = LoopThread("aio-client-loop", RUN_LIMIT)

    def _submit(self, coroutine: Any) -> Future[Any]:
        return self._loop.submit(coroutine)

    def _run(self, coroutine: Any, limit: float = RUN_LIMIT) -> Any:
        return self._loop.run(coroutine, limit)

    def open(self, target: str | Sequence[str], *, config: PoolConfig | None = None) -> None:
        async def open_channel() -> poolkit.aio.Channel:
            return poolkit.aio.insecure_channel(target, config=config)

        self.channel = self._run(open_channel())
        self._opened.append(self.channel)
        self._stub = EchoStub(self.channel)

    async def _call(self, request: EchoRequest, timeout: float, wait_for_ready: bool | None) -> EchoResponse:
        return await self._stub.Unary(request, timeout=timeout, wait_for_ready=wait_for_ready)  # type: ignore[no-any-return]

    def call(
        self, request: EchoRequest = REQUEST, *, timeout: float = CALL_TIMEOUT, wait_for_ready: bool | None = None
    ) -> EchoResponse:
        return self._run(self._call(request, timeout, wait_for_ready), limit=timeout + RUN_LIMIT)  # type: ignore[no-any-return]

    def start(
        self, request: EchoRequest = REQUEST, *, timeout: float = CALL_TIMEOUT, wait_for_ready: bool | None = None
    ) -> Future[EchoResponse]:
        return self._submit(self._call(request, timeout, wait_for_ready))

    def load(
        self,
        *,
        concurrency: int,
        total: int,
        duration: float,
        request: EchoRequest = REQUEST,
        timeout: float = CALL_TIMEOUT,
    ) -> Load:
        load = Load(total, duration)
        unary = self._stub.Unary

        async def worker() -> None:
            while load.next_call():
                started = time.monotonic()
                try:
                    await unary(request, timeout=timeout)
                    code = OK
                except grpc.RpcError as error:
                    code = error.code()
                load.record(started, code)
                if code is not OK:
                    # A call refused at once never suspended: let the loop's other work run.
                    await asyncio.sleep(0)

        async def run() -> None:
            await asyncio.gather(*(worker() for _ in range(concurrency)))

        self._submit(run()).add_done_callback(lambda done: _copy(done, load.finished))
        return load

    def describe(self) -> dict[str, Any]:
        async def describe() -> dict[str, Any]:
            assert self.channel is not None
            return self.channel.describe()

        return self._run(describe())  # type: ignore[no-any-return]

    def start_close(self, grace: float | None) -> Future[None]:
        assert self.channel is not None
        return self._submit(self.channel.close(grace))

    def shutdown(self) -> None:
        self._loop.stop(self._opened)


@pytest.fixture(params=["sync", "aio"])
def client(request: pytest.FixtureRequest) -> Iterator[Client]:
    """One blocking way to drive a poolkit channel of either kind; the test opens it."""
    driver: Client = SyncClient() if request.param == "sync" else AioClient()
    yield driver
    driver.shutdown()


# -- servers --------------------------------------------------------------------------------


@pytest.fixture
def spawn() -> Iterator[Callable[..., list[SpawnedEchoServers]]]:
    """Starts echo server processes (each with `count` servers) and stops them after the test."""
    groups: list[SpawnedEchoServers] = []

    def start(processes: int, count: int = 1) -> list[SpawnedEchoServers]:
        with ThreadPoolExecutor(max_workers=processes) as pool:
            starting = [pool.submit(spawn_echo_servers, count) for _ in range(processes)]
        started = [f.result() for f in starting if f.exception() is None]
        groups.extend(started)
        for f in starting:
            if f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        return started

    yield start
    for group in groups:
        group.stop()


class _PlainEchoServicer(echo_pb2_grpc.EchoServicer):
    """Echo only: a server with no grpc.health.v1 service at all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0

    def Unary(self, request: EchoRequest, context: grpc.ServicerContext) -> EchoResponse:
        with self._lock:
            self.calls += 1
        return EchoResponse(payload=request.payload, server_id="plain", peer=context.peer())


@dataclass
class PlainServer:
    address: str
    servicer: _PlainEchoServicer


@pytest.fixture
def plain_server() -> Iterator[PlainServer]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    servicer = _PlainEchoServicer()
    echo_pb2_grpc.add_EchoServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield PlainServer(f"127.0.0.1:{port}", servicer)
    server.stop(None).wait()


@pytest.fixture
def ageing_servers() -> Iterator[EchoServers]:
    """Two echo servers that close every client connection 300 ms after it opens."""
    with start_echo_servers(2, options=AGEING) as servers:
        yield servers


class Registry:
    """A resolver callable whose answer the test changes: a list of addresses, or an
    exception to raise. Counts its lookups; safe to call from any thread."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self._lock = threading.Lock()
        self._answer: list[str] | Exception = list(addresses)
        self.lookups = 0

    def answer(self, answer: Sequence[str] | Exception) -> None:
        with self._lock:
            self._answer = answer if isinstance(answer, Exception) else list(answer)

    def __call__(self, target: str) -> list[str]:
        with self._lock:
            self.lookups += 1
            answer = self._answer
        if isinstance(answer, Exception):
            raise answer
        return list(answer)

    def wait_for_lookups(self, count: int) -> None:
        """Wait until the channel has asked `count` more times than so far."""
        target = self.lookups + count
        wait_until(lambda: self.lookups >= target, f"{count} more resolutions ({self.lookups} of {target})")


# Any target: with a resolver, the resolver says where its endpoints are.
REGISTRY_TARGET = "echo.registry.test:50051"


# -- reading describe() -------------------------------------------------------------------------


def endpoints_of(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["address"]: e for e in snapshot["endpoints"]}


def started_on(snapshot: dict[str, Any], address: str) -> int:
    """Calls the pool has sent to `address` so far: finished plus in flight."""
    endpoint = endpoints_of(snapshot).get(address)
    return 0 if endpoint is None else endpoint["calls"] + endpoint["in_flight"]


def status_of(client: Client, address: str) -> str | None:
    endpoint = endpoints_of(client.describe()).get(address)
    return None if endpoint is None else endpoint["status"]


def wait_for_status(client: Client, address: str, wanted: str | frozenset[str], limit: float = FAULT_WAIT) -> str:
    statuses = frozenset({wanted}) if isinstance(wanted, str) else wanted
    wait_until(
        lambda: status_of(client, address) in statuses,
        lambda: f"{address} to become {sorted(statuses)}: {brief(client.describe())}",
        limit=limit,
    )
    return status_of(client, address)  # type: ignore[return-value]


def wait_until_all_healthy(client: Client) -> None:
    wait_until(
        lambda: all(e["status"] == "healthy" for e in client.describe()["endpoints"]),
        lambda: f"every endpoint to be healthy: {brief(client.describe())}",
    )


def brief(snapshot: dict[str, Any]) -> dict[str, Any]:
    """What a failure message needs of a snapshot."""
    return {
        "panic": snapshot.get("panic"),
        "resolver": snapshot.get("resolver"),
        "endpoints": [
            {k: e.get(k) for k in ("address", "status", "health", "in_flight", "calls", "errors", "ejections")}
            | {"slots": [s["state"] for s in e.get("slots", [])]}
            for e in snapshot["endpoints"]
        ],
        "transitions": snapshot.get("transitions", [])[-12:],
    }


def transitions_of(snapshot: dict[str, Any], address: str | None = None) -> list[dict[str, Any]]:
    """Transitions, oldest first (stable for equal ages), of one endpoint or of all."""
    chosen = [t for t in snapshot["transitions"] if address is None or t["endpoint"] == address]
    return sorted(chosen, key=lambda t: -t["ago_s"])


def drive_until(client: Client, condition: Callable[[], bool], what: str, calls: int = 2000) -> None:
    """Make calls one at a time until `condition` holds: at most `calls` of them, for at most
    FAULT_WAIT seconds. Every call must succeed."""
    deadline = time.monotonic() + FAULT_WAIT
    for _ in range(calls):
        if condition() or time.monotonic() > deadline:
            break
        client.call()
    assert condition(), f"still waiting, after up to {calls} calls, for {what}: {brief(client.describe())}"


def settled(pending: Future[Any], limit: float, what: str) -> Future[Any]:
    done, _ = futures.wait([pending], timeout=limit)
    assert done, f"{what}: still running after {limit} s"
    return pending


class Sampler:
    """Snapshots describe() every few milliseconds in a thread, to see afterwards when
    something changed without asserting how long it took."""

    def __init__(self, client: Client, interval: float = 0.01) -> None:
        self.samples: list[tuple[float, dict[str, Any]]] = []
        self._halt = threading.Event()
        self._running = _in_thread(self._run, client, interval)

    def _run(self, client: Client, interval: float) -> None:
        while not self._halt.is_set():
            self.samples.append((time.monotonic(), client.describe()))
            self._halt.wait(interval)

    def stop(self) -> None:
        self._halt.set()
        self._running.result(timeout=RUN_LIMIT)

    def seconds_to_last_new_call(self, address: str, since: float) -> float | None:
        """How long after `since` `address` was last seen taking a new call, None if never."""
        last = None
        previous = None
        for at, snapshot in self.samples:
            count = started_on(snapshot, address)
            if previous is not None and count > previous and at > since:
                last = at
            previous = count
        return None if last is None else round(last - since, 3)

    def statuses(self, address: str) -> list[str]:
        """The statuses `address` was seen in, in order, repeats dropped."""
        seen: list[str] = []
        for _, snapshot in self.samples:
            endpoint = endpoints_of(snapshot).get(address)
            status = "gone" if endpoint is None else endpoint["status"]
            if not seen or seen[-1] != status:
                seen.append(status)
        return seen


def report(test: str, client: Client, **figures: Any) -> None:
    """Print what a fault cost, and append it as a JSON line to $POOLKIT_FAULT_REPORT."""
    line = json.dumps({"test": test, "channel": client.kind, **figures}, sort_keys=True)
    print(f"\nfault report: {line}")
    path = os.environ.get("POOLKIT_FAULT_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as file:
            file.write(line + "\n")


def failure_codes(outcomes: Sequence[Outcome]) -> dict[str, int]:
    codes: dict[str, int] = {}
    for outcome in outcomes:
        if outcome.code is not OK:
            codes[outcome.code.name] = codes.get(outcome.code.name, 0) + 1
    return codes


# -- describe -------------------------------------------------------------------------------


def test_describe_reports_health_and_resolution(servers: EchoServers, client: Client) -> None:
    client.open(servers.target)
    wait_until(
        lambda: all(e["health"] == "serving" for e in client.describe()["endpoints"]),
        lambda: f"every endpoint's health check to report serving: {brief(client.describe())}",
    )
    for _ in range(8):
        client.call()

    snapshot = client.describe()
    assert json.loads(json.dumps(snapshot)) == snapshot
    assert snapshot["panic"] is False
    assert {"interval", "resolutions", "last_error"} <= snapshot["resolver"].keys()
    assert snapshot["resolver"]["last_error"] is None
    assert isinstance(snapshot["transitions"], list)
    assert [e["address"] for e in snapshot["endpoints"]] == servers.addresses
    for endpoint in snapshot["endpoints"]:
        assert endpoint["status"] == "healthy"
        assert endpoint["health"] == "serving"
        assert endpoint["ejections"] == 0
        assert endpoint["ejected_for_s"] is None


# -- active health checks -------------------------------------------------------------------


@pytest.mark.parametrize("health_check", [HealthCheck(), FAST_CHECKS], ids=["watch", "check"])
def test_not_serving_endpoint_gets_no_new_calls_until_it_serves_again(
    servers: EchoServers, client: Client, health_check: HealthCheck
) -> None:
    client.open(servers.target, config=PoolConfig(health_check=health_check))
    wait_until_all_healthy(client)
    flipped = servers[0]

    flipped.set_serving(False)
    wait_for_status(client, flipped.address, "unhealthy", limit=5.0)
    assert endpoints_of(client.describe())[flipped.address]["health"] == "not_serving"
    before = flipped.calls
    for _ in range(100):
        client.call()
    assert flipped.calls == before, "an endpoint reporting NOT_SERVING was still picked"

    flipped.set_serving(True)
    wait_for_status(client, flipped.address, "healthy", limit=5.0)
    assert endpoints_of(client.describe())[flipped.address]["health"] == "serving"
    drive_until(client, lambda: flipped.calls > before, "calls to reach the endpoint serving again")
    transitions = transitions_of(client.describe(), flipped.address)
    moves = [(t["from"], t["to"]) for t in transitions]
    assert ("healthy", "unhealthy") in moves
    assert ("unhealthy", "healthy") in moves
    assert all(isinstance(t["why"], str) and t["why"] for t in transitions), transitions


@pytest.mark.parametrize("health_check", [HealthCheck(), FAST_CHECKS], ids=["watch", "check"])
def test_service_unknown_to_an_endpoint_keeps_it_out(
    servers: EchoServers, client: Client, health_check: HealthCheck
) -> None:
    service = "poolkit.test.Ledger"
    for server in servers[1:]:
        server.set_serving(True, service=service)  # servers[0] never heard of it
    client.open(servers.target, config=PoolConfig(health_check=replace(health_check, service=service)))

    stranger = servers[0]
    wait_for_status(client, stranger.address, "unhealthy", limit=5.0)
    for server in servers[1:]:
        wait_for_status(client, server.address, "healthy", limit=5.0)
    before = stranger.calls
    for _ in range(100):
        client.call()
    assert stranger.calls == before


@pytest.mark.parametrize("panic_threshold", [0.5, 0.0], ids=["panic", "no_panic"])
def test_panic_spreads_calls_when_most_endpoints_are_unhealthy(
    servers: EchoServers, client: Client, panic_threshold: float
) -> None:
    client.open(servers.target, config=PoolConfig(balancer=EVEN, panic_threshold=panic_threshold))
    wait_until_all_healthy(client)
    sick, well = servers[:3], servers[3]

    for server in sick:
        server.set_serving(False)
    for server in sick:
        wait_for_status(client, server.address, "unhealthy", limit=5.0)
    before = [server.calls for server in sick]
    for _ in range(200):
        client.call()

    snapshot = client.describe()
    sick_calls = sum(server.calls for server in sick) - sum(before)
    if panic_threshold:
        # One of four healthy is below half: calls spread over every endpoint that connects.
        assert snapshot["panic"] is True, brief(snapshot)
        assert all(server.calls > b for server, b in zip(sick, before, strict=True)), [s.calls for s in servers]
    else:
        assert snapshot["panic"] is False, brief(snapshot)
        assert sick_calls == 0, [s.calls for s in servers]
    assert well.calls > 0

    for server in sick:
        server.set_serving(True)
    wait_until_all_healthy(client)
    assert client.describe()["panic"] is False


@pytest.mark.parametrize("health_check", [HealthCheck(), FAST_CHECKS], ids=["watch", "check"])
def test_server_without_health_service_is_used(
    plain_server: PlainServer, servers: EchoServers, client: Client, health_check: HealthCheck
) -> None:
    client.open([plain_server.address, servers[0].address], config=PoolConfig(balancer=EVEN, health_check=health_check))

    wait_until(
        lambda: endpoints_of(client.describe())[plain_server.address]["health"] == "unimplemented",
        lambda: f"the plain server's health to read unimplemented: {brief(client.describe())}",
    )
    assert status_of(client, plain_server.address) == "healthy"
    drive_until(client, lambda: plain_server.servicer.calls >= 10, "calls to reach the server without health")
    assert status_of(client, plain_server.address) == "healthy"


def test_health_checks_switched_off(servers: EchoServers, client: Client) -> None:
    servers[0].set_serving(False)
    client.open(servers.target, config=PoolConfig(balancer=EVEN, health_check=None))

    drive_until(client, lambda: servers[0].calls >= 5, "calls to reach a NOT_SERVING server nobody asks")
    for endpoint in client.describe()["endpoints"]:
        assert endpoint["health"] == "unchecked"
        assert endpoint["status"] == "healthy"


# -- faults under load ------------------------------------------------------------------------


def wait_until_every_endpoint_is_busy(client: Client, addresses: Sequence[str]) -> None:
    """Before a fault: every endpoint has taken calls, so what changes after it is the fault's doing."""
    wait_until(
        lambda: all(started_on(client.describe(), a) >= 20 for a in addresses),
        lambda: f"every endpoint to take calls: {brief(client.describe())}",
        limit=FAULT_WAIT,
    )


@pytest.mark.parametrize("accrual", [True, False], ids=["accrual", "connectivity_only"])
def test_killed_server_gets_no_new_calls_and_the_rest_serve(
    spawn: Callable[..., list[SpawnedEchoServers]], client: Client, accrual: bool
) -> None:
    groups = spawn(4)
    addresses = [group.addresses[0] for group in groups]
    # Without failure accrual only the dead connection's state can take the endpoint out.
    client.open(addresses, config=PoolConfig() if accrual else PoolConfig(failure_accrual=None))
    victim, victim_process = addresses[0], groups[0]
    load = client.load(concurrency=16, total=30_000, duration=20.0)
    sampler = Sampler(client)
    try:
        wait_until_every_endpoint_is_busy(client, addresses)
        killed_at = time.monotonic()
        victim_process.kill()
        noticed = wait_for_status(client, victim, OUT_OF_ROTATION)
        noticed_at = time.monotonic()
        quiet_from = client.describe()
        load.wait_for_more_ok(1000, "the surviving servers to serve")
        quiet_until = client.describe()
    finally:
        outcomes = load.stop()
        sampler.stop()

    late = [o for o in outcomes if o.started > noticed_at and o.code is not OK]
    report(
        "kill_one_of_four",
        client,
        accrual=accrual,
        calls=len(outcomes),
        failed=sum(o.code is not OK for o in outcomes),
        failures=failure_codes(outcomes),
        seconds_to_last_new_call=sampler.seconds_to_last_new_call(victim, since=killed_at),
        seconds_to_status=round(noticed_at - killed_at, 3),
        statuses=sampler.statuses(victim),
    )
    assert noticed in OUT_OF_ROTATION
    if not accrual:
        assert noticed == "failing"
    assert started_on(quiet_until, victim) == started_on(quiet_from, victim), (
        f"the killed endpoint ({noticed}) still took new calls: {brief(quiet_until)}"
    )
    assert not late, f"calls failed after the dead endpoint left rotation: {failure_codes(late)}"


def test_black_holed_endpoint_is_ejected_and_gets_no_new_calls(servers: EchoServers, client: Client) -> None:
    with FaultProxy(servers[0].address) as proxy:
        addresses = [proxy.address, *servers.addresses[1:]]
        # Round robin: latency-aware picks would starve the silent endpoint on their own;
        # this way only failure accrual can stop its traffic.
        client.open(addresses, config=PoolConfig(balancer=EVEN))
        victim = proxy.address
        load = client.load(concurrency=8, total=30_000, duration=20.0, timeout=0.5)
        sampler = Sampler(client)
        try:
            wait_until_every_endpoint_is_busy(client, addresses)
            silenced_at = time.monotonic()
            proxy.black_hole()
            wait_for_status(client, victim, "ejected")
            ejected_at = time.monotonic()
            quiet_from = client.describe()
            load.wait_for_more_ok(1000, "the other servers to serve")
            quiet_until = client.describe()
        finally:
            outcomes = load.stop()
            sampler.stop()

    late = [o for o in outcomes if o.started > ejected_at and o.code is not OK]
    report(
        "black_hole_one_of_four",
        client,
        calls=len(outcomes),
        failed=sum(o.code is not OK for o in outcomes),
        failures=failure_codes(outcomes),
        seconds_to_last_new_call=sampler.seconds_to_last_new_call(victim, since=silenced_at),
        seconds_to_ejection=round(ejected_at - silenced_at, 3),
        statuses=sampler.statuses(victim),
    )
    endpoint = endpoints_of(quiet_until)[victim]
    assert endpoint["ejections"] >= 1
    assert endpoint["ejected_for_s"] is not None
    assert endpoint["ejected_for_s"] > 0
    assert started_on(quiet_until, victim) == started_on(quiet_from, victim), (
        f"the ejected endpoint still took new calls: {brief(quiet_until)}"
    )
    assert not late, f"calls failed after the silent endpoint was ejected: {failure_codes(late)}"


def test_connections_closed_by_the_server_lose_no_calls(ageing_servers: EchoServers, client: Client) -> None:
    client.open(ageing_servers.target)
    load = client.load(concurrency=4, total=200_000, duration=2.0)
    slow: list[Future[EchoResponse]] = []
    try:
        load.wait_for_more_ok(50, "calls to flow")
        # Calls longer than a connection's age: they outlive the GOAWAY on their connection.
        slow = [client.start(EchoRequest(payload=b"slow", delay_ms=700), timeout=10) for _ in range(4)]
        outcomes = load.wait()
    finally:
        load.stop()
    slow_codes = []
    for pending in slow:
        error = settled(pending, RUN_LIMIT, "a slow call over a recycled connection").exception()
        slow_codes.append(OK if error is None else error.code())  # type: ignore[attr-defined]

    peers = [len(server.peers) for server in ageing_servers]
    report(
        "goaway_max_connection_age",
        client,
        calls=len(outcomes),
        failed=sum(o.code is not OK for o in outcomes),
        failures=failure_codes(outcomes),
        peers_per_server=peers,
    )
    assert failure_codes(outcomes) == {}
    assert slow_codes == [OK] * 4
    assert all(count >= 2 for count in peers), f"each server should have seen several connections: {peers}"
    assert sum(server.calls for server in ageing_servers) == len(outcomes) + 4


# -- failure accrual --------------------------------------------------------------------------


def test_no_more_than_half_the_endpoints_are_ejected(servers: EchoServers, client: Client) -> None:
    for server in servers[1:]:
        server.fail_code = UNAVAILABLE
    # Long ejections: nothing comes back while the test watches.
    accrual = FailureAccrual(ejection_min=30.0, ejection_max=60.0)
    client.open(servers.target, config=PoolConfig(failure_accrual=accrual))
    load = client.load(concurrency=8, total=20_000, duration=15.0)
    sampler = Sampler(client)
    try:
        wait_until(
            lambda: sum(e["status"] == "ejected" for e in client.describe()["endpoints"]) >= 2,
            lambda: f"two failing endpoints to be ejected: {brief(client.describe())}",
            limit=FAULT_WAIT,
        )
        seen = len(load.outcomes)
        wait_until(
            lambda: len(load.outcomes) >= seen + 300 or load.finished.done(),
            "300 more calls with three endpoints failing",
            limit=FAULT_WAIT,
        )
    finally:
        load.stop()
        sampler.stop()

    snapshot = client.describe()
    most_seen = max(sum(e["status"] == "ejected" for e in s["endpoints"]) for _, s in sampler.samples)
    assert most_seen == 2, f"ejected at once, at most: {most_seen}"
    assert _most_ejected_at_once(transitions_of(snapshot)) <= 2, transitions_of(snapshot)
    assert endpoints_of(snapshot)[servers[0].address]["status"] == "healthy"


def _most_ejected_at_once(transitions: Sequence[dict[str, Any]]) -> int:
    ejected: set[str] = set()
    most = 0
    for transition in transitions:
        if transition["to"] == "ejected":
            ejected.add(transition["endpoint"])
        else:
            ejected.discard(transition["endpoint"])
        most = max(most, len(ejected))
    return most


def test_ejected_endpoint_comes_back_after_a_successful_probe(servers: EchoServers, client: Client) -> None:
    failing = servers[0]
    failing.fail_code = UNAVAILABLE
    accrual = FailureAccrual(ejection_min=0.3, ejection_max=1.0)
    # Round robin, so the revived endpoint's share does not wait on its latency history.
    client.open(servers.target, config=PoolConfig(balancer=EVEN, failure_accrual=accrual))
    load = client.load(concurrency=4, total=50_000, duration=20.0)
    sampler = Sampler(client)
    try:
        wait_for_status(client, failing.address, "ejected")
        failing.fail_code = None
        failing.delay = 0.2  # the probe stays in flight long enough to be seen
        wait_for_status(client, failing.address, "healthy")
        failing.delay = 0.0
        back = failing.calls
        wait_until(
            lambda: failing.calls >= back + 10,
            lambda: f"calls to reach the revived endpoint: {brief(client.describe())}",
            limit=FAULT_WAIT,
        )
    finally:
        load.stop()
        sampler.stop()

    snapshot = client.describe()
    endpoint = endpoints_of(snapshot)[failing.address]
    assert endpoint["ejections"] >= 1
    assert endpoint["ejected_for_s"] is None
    moves = transitions_of(snapshot, failing.address)
    assert any(t["to"] == "ejected" for t in moves), moves
    revival = next(t for t in reversed(moves) if t["to"] == "healthy")
    assert revival["from"] == "probing", moves
    probing_in_flight = [
        endpoints_of(s)[failing.address]["in_flight"]
        for _, s in sampler.samples
        if endpoints_of(s)[failing.address]["status"] == "probing"
    ]
    assert all(count <= 1 for count in probing_in_flight), f"more than one probe at once: {probing_in_flight}"
    ejected_for = [
        endpoints_of(s)[failing.address]["ejected_for_s"]
        for _, s in sampler.samples
        if endpoints_of(s)[failing.address]["ejected_for_s"] is not None
    ]
    assert ejected_for, "no sample saw the endpoint ejected"
    assert max(ejected_for) <= accrual.ejection_max * (1 + accrual.jitter) + 0.05, max(ejected_for)


# -- discovery --------------------------------------------------------------------------------


@pytest.fixture
def three_servers() -> Iterator[EchoServers]:
    with start_echo_servers(3) as servers:
        yield servers


def test_resolver_adds_drains_and_keeps_endpoints(three_servers: EchoServers, client: Client) -> None:
    first, second, third = three_servers
    registry = Registry([first.address, second.address])
    client.open(REGISTRY_TARGET, config=PoolConfig(resolver=registry, resolve_interval=0.2))
    assert set(endpoints_of(client.describe())) == {first.address, second.address}
    assert client.describe()["resolver"]["interval"] == 0.2

    # Added: it gets traffic.
    registry.answer([first.address, second.address, third.address])
    wait_until(lambda: third.address in endpoints_of(client.describe()), "the added endpoint to appear")
    drive_until(client, lambda: third.calls > 0, "calls to reach the added endpoint")

    # Removed while a slow call runs on it: the call finishes, no new call goes there.
    slow: list[Future[EchoResponse]] = []
    arrived = first.calls
    for _ in range(12):
        total = sum(s.calls for s in three_servers)
        slow.append(client.start(EchoRequest(payload=b"slow", delay_ms=2000), timeout=15))
        wait_until(lambda t=total: sum(s.calls for s in three_servers) > t, "a slow call to arrive")  # type: ignore[misc]
        if first.calls > arrived:
            break
    assert first.calls > arrived, "no slow call reached the endpoint about to be removed"
    registry.answer([second.address, third.address])
    wait_for_status(client, first.address, "draining", limit=5.0)
    on_first = first.calls
    for _ in range(50):
        client.call()
    assert first.calls == on_first, "a draining endpoint took new calls"
    replies = [settled(p, RUN_LIMIT, "a slow call on a draining endpoint").result() for p in slow]
    assert [r.payload for r in replies] == [b"slow"] * len(slow)
    wait_until(
        lambda: first.address not in endpoints_of(client.describe()),
        lambda: f"the drained endpoint to go: {brief(client.describe())}",
    )
    assert first.calls == on_first
    wait_until(
        lambda: established_to(first.port) == 0,
        lambda: f"the drained endpoint's connections to close ({established_to(first.port)} open)",
    )

    # An empty answer, then a failing resolver: the last good set stays.
    for answer in ([], RuntimeError("registry is down")):
        registry.answer(answer)
        registry.wait_for_lookups(3)
        snapshot = client.describe()
        assert set(endpoints_of(snapshot)) == {second.address, third.address}, brief(snapshot)
        assert snapshot["resolver"]["last_error"], brief(snapshot)
        for _ in range(10):
            client.call()
    assert "registry is down" in client.describe()["resolver"]["last_error"]


def test_a_failed_endpoint_brings_the_next_resolution_forward(three_servers: EchoServers, client: Client) -> None:
    first, second, third = three_servers
    registry = Registry([first.address, second.address])
    # Far longer than the test: only the failure can explain an early lookup.
    client.open(REGISTRY_TARGET, config=PoolConfig(resolver=registry, resolve_interval=120.0))
    drive_until(client, lambda: first.calls > 0 and second.calls > 0, "calls to reach both endpoints")
    registry.answer([second.address, third.address])  # the registry already knows
    lookups = registry.lookups

    first.stop()
    wait_until(
        lambda: registry.lookups > lookups,
        lambda: f"a resolution soon after an endpoint failed: {brief(client.describe())}",
        limit=FAULT_WAIT,
    )
    wait_until(lambda: third.address in endpoints_of(client.describe()), "the registry's new endpoint to appear")
    drive_until(client, lambda: third.calls > 0, "calls to reach the new endpoint")


def established_to(port: int) -> int:
    """Established TCP connections to `port` on loopback (the client's side of them)."""
    listing = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    return len(listing.stdout.splitlines())


def test_no_endpoint_resolved_fails_fast_until_one_is(three_servers: EchoServers, client: Client) -> None:
    registry = Registry([])
    client.open(REGISTRY_TARGET, config=PoolConfig(resolver=registry, resolve_interval=0.2))

    pending = client.start(timeout=30)
    error = settled(pending, FAULT_WAIT, "a call with nothing resolved").exception()
    assert isinstance(error, poolkit.PoolUnavailableError), error
    assert error.code() is UNAVAILABLE
    assert "no endpoint" in error.details()

    registry.answer([three_servers[0].address])
    wait_until(lambda: three_servers[0].address in endpoints_of(client.describe()), "the endpoint to appear")
    assert client.call().payload == b"x"


# -- closing and fast failure -----------------------------------------------------------------


def test_close_lets_calls_in_flight_finish_and_refuses_new_ones(servers: EchoServers, client: Client) -> None:
    client.open(servers.target)
    slow = [client.start(EchoRequest(payload=b"slow", delay_ms=600), timeout=10) for _ in range(4)]
    wait_until(lambda: sum(s.calls for s in servers) >= 4, "the slow calls to reach the servers")

    closing = client.start_close(grace=10.0)
    wait_until(lambda: client.describe()["state"] == "closed", "the channel to stop admitting calls")
    with pytest.raises(grpc.RpcError) as raised:
        client.call()

    error = raised.value
    assert isinstance(error, poolkit.PoolClosedError)
    assert error.code() is UNAVAILABLE
    assert "closed" in error.details()
    assert [settled(p, RUN_LIMIT, "a call in flight at close").result().payload for p in slow] == [b"slow"] * 4
    settled(closing, RUN_LIMIT, "close(grace)").result()
    assert sum(s.calls for s in servers) == 4


def test_closing_just_after_connections_went_idle_leaves_no_background_errors(client: Client) -> None:
    # A server going away turns a ready connection idle, and the pool reconnects it in the
    # background; a close() that follows at once must stop that work cleanly (the module's
    # filterwarnings turns an exception in any thread into a failure). A race: several rounds.
    for _ in range(8):
        with start_echo_servers(1) as servers:
            client.open(servers.target, config=PoolConfig(health_check=None))
            client.call()
        wait_until(
            lambda: all(s["state"] != "ready" for e in client.describe()["endpoints"] for s in e["slots"]),
            lambda: f"the connection to leave READY: {brief(client.describe())}",
        )
        settled(client.start_close(None), RUN_LIMIT, "close()").result()


@pytest.mark.parametrize("panic_threshold", [0.5, 0.0], ids=["panic", "no_panic"])
def test_calls_fail_fast_when_every_endpoint_is_down(
    spawn: Callable[..., list[SpawnedEchoServers]], client: Client, panic_threshold: float
) -> None:
    (group,) = spawn(1, count=2)
    client.open(group.addresses, config=PoolConfig(panic_threshold=panic_threshold))
    assert client.call(wait_for_ready=True, timeout=FAULT_WAIT).payload == b"x"

    group.kill()
    for address in group.addresses:
        wait_for_status(client, address, OUT_OF_ROTATION)

    # Bounded: a call that returns at all well before its 30 s deadline failed fast.
    began = time.monotonic()
    error = settled(client.start(timeout=30), FAULT_WAIT, "a call with every endpoint down").exception()
    failed_after = time.monotonic() - began
    fast_details = error.details() if isinstance(error, grpc.RpcError) else repr(error)  # type: ignore[attr-defined]
    assert isinstance(error, grpc.RpcError), error
    assert error.code() is UNAVAILABLE, error  # type: ignore[attr-defined]
    if client.kind == "aio":
        assert isinstance(error, grpc.aio.AioRpcError)
    if panic_threshold == 0.0:
        assert isinstance(error, poolkit.PoolUnavailableError)
        details = error.details()
        assert any(why in details for why in ("failing", "ejected", "not serving")), details

    began = time.monotonic()
    waiting = client.start(timeout=1.0, wait_for_ready=True)
    error = settled(waiting, FAULT_WAIT, "a wait_for_ready call with every endpoint down").exception()
    waited = time.monotonic() - began
    report(
        "fast_failure_all_down",
        client,
        panic_threshold=panic_threshold,
        seconds_to_fail=round(failed_after, 3),
        details=fast_details,
        wait_for_ready_seconds=round(waited, 3),
        wait_for_ready_code=None if error is None else error.code().name,  # type: ignore[attr-defined]
    )
    assert isinstance(error, grpc.RpcError), error
    assert error.code() in {DEADLINE_EXCEEDED, UNAVAILABLE}  # type: ignore[attr-defined]
    # A lower bound, not a timing assertion: a call told to wait must not give up at once.
    assert waited >= 0.5, f"a wait_for_ready call with a 1 s deadline ended after {waited:.3f} s"
