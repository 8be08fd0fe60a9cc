"""Connections bound to local source addresses, end to end, one suite run against the sync
and the asyncio channel: calls spread over every (endpoint, source) route and the servers
see them arrive from the sources; one connection per route and slot; the port budget;
the configuration mistakes refused at construction; IPv6 sources, mixed families and
interface names; TLS with a certificate checked against the host name; binding that
survives a server restart. Then the pieces under it: grpcio's self-check, the /proc
decoding and the socket counts.

Real servers on loopback, real sockets. Every 127.0.0.0/8 address is local on Linux, so
sources 127.0.0.2 and 127.0.0.3 need no setup. Where a server saw a call from is read
from the response's `peer` (the server's `context.peer()`); how many connections exist
is counted with `ss` (netlink), independently of poolkit's own reading of /proc. IPv6
cases are skipped on a host without ::1. Certificates are made at test time (trustme).

The `client` fixture gives both channel kinds one blocking interface, as in
tests/test_retry.py: for asyncio, an event loop runs in a thread of its own, the channel
and its calls live there, and the test's thread only submits to it. Tests ask for their
servers before the client, so the channel is closed before its servers stop: closing a
channel whose connections are changing state races grpc's connectivity poller.

The self-check runs in every test process's first bound channel; it must leave no grpc
thread dying behind it (`test_self_check_leaves_no_grpc_thread_exception`). A non-local
source is refused even where net.ipv4.ip_nonlocal_bind=1 lets any address be bound (in a
private network namespace).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol
from urllib.parse import unquote

import grpc
import grpc.aio
import pytest
import trustme
from _loop_thread import LoopThread
from _support import wait_until

import poolkit
import poolkit.aio
from poolkit import PoolConfig, _source
from poolkit.testing import (
    EchoRequest,
    EchoResponse,
    EchoServer,
    EchoServers,
    EchoStub,
    start_echo_servers,
)

pytestmark = [
    pytest.mark.timeout(90),
    # The pool's background work must never die with an unhandled exception.
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="source binding and /proc/net are Linux's"),
]

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
REQUEST = EchoRequest(payload=b"x")
CALL_TIMEOUT = 5.0
# How long the test thread waits on anything it handed to the asyncio loop.
RUN_LIMIT = 30.0
# A restarted server is found again after grpc's reconnect backoff (1 s, ±20 %, then × 1.6).
RECONNECT_WAIT = 15.0

SOURCES = ("127.0.0.2", "127.0.0.3")
CALLS = 400
CONCURRENCY = 8
# Round robin over the routes gives each source half the calls; the bounds leave room
# for a balancer that is merely fair.
EVEN_LOW, EVEN_HIGH = 0.35, 0.65
KINDS = ("sync", "aio")
# Addresses this host should not have (a test using one is skipped if it does): a
# private address nobody routes to, and one of TEST-NET-1.
NON_LOCAL = ("10.255.255.1", "192.0.2.1")
PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
# port_budget() rounds share_in_use to 6 decimals: one socket of a 28K range is 3.5e-5.
SHARE_PRECISION = 5e-7
# How long to wait for a grpc thread to end: its connectivity poller wakes every 0.2 s.
THREAD_JOIN = 5.0
# The self-check race below hits about one run in ten: 100 runs all escape it once in
# tens of thousands.
SELF_CHECK_RUNS = 100


def pool_config(**changes: Any) -> PoolConfig:
    """The suite's base config: round robin (each route gets its turn, whatever its
    latency), no active health checks and no failure accrual (which would change where
    calls go)."""
    settings: dict[str, Any] = {"balancer": "round_robin", "health_check": None, "failure_accrual": None}
    settings.update(changes)
    return PoolConfig(**settings)


# -- a uniform client over both channel kinds ----------------------------------------------


class Client(Protocol):
    kind: str

    def open(
        self, target: str | Sequence[str], config: PoolConfig, credentials: grpc.ChannelCredentials | None = None
    ) -> None: ...

    def unary(self, *, timeout: float = CALL_TIMEOUT) -> EchoResponse: ...

    def unary_many(self, count: int, *, concurrency: int = CONCURRENCY) -> list[EchoResponse | BaseException]: ...

    def describe(self) -> dict[str, Any]: ...

    def port_budget(self) -> dict[str, dict[str, Any]]: ...

    def construction_error(self, target: str | Sequence[str], make_config: Callable[[], PoolConfig]) -> BaseException:
        """What building the config and a channel with it raised (the test fails if nothing)."""
        ...

    def background(self) -> set[object]:
        """Threads of this process, and for asyncio the tasks on the client's loop."""
        ...

    def shutdown(self) -> None: ...


def _channel(
    module: Any, target: str | Sequence[str], config: PoolConfig, credentials: grpc.ChannelCredentials | None
) -> Any:
    if credentials is None:
        return module.insecure_channel(target, config=config)
    return module.secure_channel(target, credentials, config=config)


class SyncClient:
    """A poolkit.Channel driven from the test's thread (and a thread pool for load)."""

    kind = "sync"

    def __init__(self) -> None:
        self._opened: list[poolkit.Channel] = []

    def open(
        self, target: str | Sequence[str], config: PoolConfig, credentials: grpc.ChannelCredentials | None = None
    ) -> None:
        self.channel = _channel(poolkit, target, config, credentials)
        self._opened.append(self.channel)
        self._unary = EchoStub(self.channel).Unary

    def unary(self, *, timeout: float = CALL_TIMEOUT) -> EchoResponse:
        return self._unary(REQUEST, timeout=timeout)  # type: ignore[no-any-return]

    def unary_many(self, count: int, *, concurrency: int = CONCURRENCY) -> list[EchoResponse | BaseException]:
        def one(_: int) -> EchoResponse | BaseException:
            try:
                return self.unary()
            except grpc.RpcError as error:
                return error

        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="source-load") as pool:
            return list(pool.map(one, range(count), timeout=RUN_LIMIT))

    def describe(self) -> dict[str, Any]:
        return self.channel.describe()

    def port_budget(self) -> dict[str, dict[str, Any]]:
        return self.channel.port_budget()

    def construction_error(self, target: str | Sequence[str], make_config: Callable[[], PoolConfig]) -> BaseException:
        try:
            channel = poolkit.insecure_channel(target, config=make_config())
        except Exception as error:
            return error
        channel.close()
        raise AssertionError(f"a channel was built with {make_config()}")

    def background(self) -> set[object]:
        return set(threading.enumerate())

    def shutdown(self) -> None:
        for channel in self._opened:
            channel.close()


class AioClient:
    """A poolkit.aio.Channel driven from an event loop in its own thread."""

    kind = "aio"

    def __init__(self) -> None:
        self._opened: list[poolkit.aio.Channel] = []
        self._loop = LoopThread("source-aio-loop", RUN_LIMIT)

    def _run(self, coroutine: Any) -> Any:
        return self._loop.run(coroutine, RUN_LIMIT)

    def open(
        self, target: str | Sequence[str], config: PoolConfig, credentials: grpc.ChannelCredentials | None = None
    ) -> None:
        async def open_channel() -> poolkit.aio.Channel:
            return _channel(poolkit.aio, target, config, credentials)  # type: ignore[no-any-return]

        self.channel = self._run(open_channel())
        self._opened.append(self.channel)
        self._unary = EchoStub(self.channel).Unary

    def unary(self, *, timeout: float = CALL_TIMEOUT) -> EchoResponse:
        async def call() -> EchoResponse:
            return await self._unary(REQUEST, timeout=timeout)  # type: ignore[no-any-return]

        return self._run(call())  # type: ignore[no-any-return]

    def unary_many(self, count: int, *, concurrency: int = CONCURRENCY) -> list[EchoResponse | BaseException]:
        async def batches() -> list[EchoResponse | BaseException]:
            outcomes: list[EchoResponse | BaseException] = []
            for start in range(0, count, concurrency):
                batch = [self._unary(REQUEST, timeout=CALL_TIMEOUT) for _ in range(min(concurrency, count - start))]
                outcomes.extend(await asyncio.gather(*batch, return_exceptions=True))
            return outcomes

        return self._run(batches())  # type: ignore[no-any-return]

    def describe(self) -> dict[str, Any]:
        async def describe() -> dict[str, Any]:
            return self.channel.describe()

        return self._run(describe())  # type: ignore[no-any-return]

    def port_budget(self) -> dict[str, dict[str, Any]]:
        async def budget() -> dict[str, dict[str, Any]]:
            return self.channel.port_budget()

        return self._run(budget())  # type: ignore[no-any-return]

    def construction_error(self, target: str | Sequence[str], make_config: Callable[[], PoolConfig]) -> BaseException:
        async def build() -> BaseException | None:
            try:
                channel = poolkit.aio.insecure_channel(target, config=make_config())
            except Exception as error:
                return error
            await channel.close()
            return None

        error = self._run(build())
        assert error is not None, f"a channel was built with {make_config()}"
        return error  # type: ignore[no-any-return]

    def background(self) -> set[object]:
        async def tasks() -> set[object]:
            return set(asyncio.all_tasks()) - {asyncio.current_task()}

        return set(threading.enumerate()) | self._run(tasks())

    def shutdown(self) -> None:
        self._loop.stop(self._opened)


@pytest.fixture(params=KINDS)
def client(request: pytest.FixtureRequest) -> Iterator[Client]:
    """One blocking way to drive a poolkit channel of either kind; the test opens it."""
    driver: Client = SyncClient() if request.param == "sync" else AioClient()
    yield driver
    driver.shutdown()


def responses(outcomes: Sequence[EchoResponse | BaseException]) -> list[EchoResponse]:
    """`outcomes`, every one of which must be a response."""
    failed = [outcome for outcome in outcomes if not isinstance(outcome, EchoResponse)]
    assert not failed, f"{len(failed)} of {len(outcomes)} calls failed, first: {failed[0]}"
    return list(outcomes)  # type: ignore[arg-type]


# -- servers, hosts and sockets -------------------------------------------------------------


@pytest.fixture
def echo() -> Iterator[Callable[..., EchoServers]]:
    """Starts in-process echo servers (`count` on `host`, at `ports`); stops them after the test."""
    started: list[EchoServers] = []

    def start(count: int, host: str = "127.0.0.1", ports: Sequence[int] = ()) -> EchoServers:
        servers = start_echo_servers(count, host, ports=ports)
        started.append(servers)
        return servers

    yield start
    for servers in started:
        servers.stop()


def can_bind(address: str) -> bool:
    """Whether a TCP socket can be bound to `address` here (it is assigned to this host)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


@pytest.fixture
def ipv6() -> None:
    """Skip unless this host has IPv6 loopback (::1)."""
    if not socket.has_ipv6 or not can_bind("::1"):
        pytest.skip("no IPv6 loopback (::1) on this host")


def peer_host(peer: str) -> str:
    """The address in a grpc peer string: "ipv4:127.0.0.2:40312" -> "127.0.0.2",
    "ipv6:[::1]:40312" (or %-encoded) -> "::1"."""
    _, _, rest = unquote(peer).partition(":")
    host = rest.rsplit(":", 1)[0].strip("[]")
    return host.removeprefix("::ffff:") if "." in host else host


def peer_hosts(replies: Sequence[EchoResponse]) -> Counter[str]:
    return Counter(peer_host(reply.peer) for reply in replies)


def split_host_port(text: str) -> tuple[str, int]:
    """ "[::ffff:127.0.0.2]:4000" or "127.0.0.2:4000" as ("127.0.0.2", 4000)."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]").split("%")[0]
    return host.removeprefix("::ffff:") if "." in host else host, int(port)


def established() -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """(local, remote) of every ESTABLISHED TCP socket here, as `ss` (netlink) lists them."""
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is needed to count connections")
    listing = subprocess.run(
        ["ss", "-Htn", "state", "established"], capture_output=True, text=True, check=True, timeout=10
    )
    sockets = []
    for line in listing.stdout.splitlines():
        fields = line.split()
        sockets.append((split_host_port(fields[2]), split_host_port(fields[3])))
    return sockets


def server_addresses(servers: Sequence[EchoServer]) -> set[tuple[str, int]]:
    return {(server.host, server.port) for server in servers}


def connections(sources: Sequence[str], servers: Sequence[EchoServer]) -> int:
    """Established client connections from any of `sources` to any of `servers`."""
    wanted = server_addresses(servers)
    return sum(local[0] in sources and remote in wanted for local, remote in established())


def any_connection_to(servers: Sequence[EchoServer]) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    wanted = server_addresses(servers)
    return [(local, remote) for local, remote in established() if remote in wanted]


def routes_by_source(snapshot: dict[str, Any]) -> Counter[str | None]:
    return Counter(endpoint["source"] for endpoint in snapshot["endpoints"])


def ready_slots(snapshot: dict[str, Any], source: str | None) -> int:
    return sum(
        slot["state"] == "ready"
        for endpoint in snapshot["endpoints"]
        if endpoint["source"] == source
        for slot in endpoint["slots"]
    )


def wait_all_ready(client: Client) -> dict[str, Any]:
    """Wait until every slot's connection is READY; the snapshot that showed it."""
    snapshots: list[dict[str, Any]] = []

    def all_ready() -> bool:
        snapshots.append(client.describe())
        slots = [slot["state"] for endpoint in snapshots[-1]["endpoints"] for slot in endpoint["slots"]]
        return bool(slots) and all(state == "ready" for state in slots)

    wait_until(all_ready, lambda: f"every slot to be ready: {snapshots[-1]['endpoints']}")
    return snapshots[-1]


def assert_share_consistent(entry: dict[str, Any], range_size: int) -> None:
    """`share_in_use` is the entry's sockets over the ephemeral range, to its printed
    precision, and a handful of sockets never shows as 0."""
    share = entry["share_in_use"]
    assert share == pytest.approx(entry["sockets"] / range_size, abs=SHARE_PRECISION), entry
    assert (share > 0) == (entry["sockets"] > 0), entry
    assert share <= 1, entry


def kernel_port_range() -> list[int]:
    with open(PORT_RANGE, encoding="ascii") as file:
        return [int(part) for part in file.read().split()]


# -- 1. calls spread over the sources, one connection per route and slot --------------------


@pytest.mark.parametrize("per_endpoint", [1, 2])
def test_calls_spread_over_sources_with_a_connection_per_route(
    echo: Callable[..., EchoServers], client: Client, per_endpoint: int
) -> None:
    servers = echo(2)
    client.open(servers.target, pool_config(source_addresses=list(SOURCES), connections_per_endpoint=per_endpoint))

    replies = responses(client.unary_many(CALLS))

    by_source = peer_hosts(replies)
    assert set(by_source) == set(SOURCES), by_source
    for source in SOURCES:
        assert EVEN_LOW * CALLS <= by_source[source] <= EVEN_HIGH * CALLS, by_source
    for server in servers:
        assert {peer_host(peer) for peer in server.peers} == set(SOURCES), (server, server.peers)
    snapshot = wait_all_ready(client)
    routes = len(SOURCES) * len(servers)
    assert len(snapshot["endpoints"]) == routes
    assert routes_by_source(snapshot) == {source: len(servers) for source in SOURCES}
    assert {endpoint["address"] for endpoint in snapshot["endpoints"]} == set(servers.addresses)
    assert all(len(endpoint["slots"]) == per_endpoint for endpoint in snapshot["endpoints"])
    assert connections(SOURCES, servers) == routes * per_endpoint
    # Nothing reached the servers unbound.
    assert all(local[0] in SOURCES for local, _ in any_connection_to(servers)), any_connection_to(servers)


# -- 2. the port budget ---------------------------------------------------------------------


def test_port_budget_counts_each_source(echo: Callable[..., EchoServers], client: Client) -> None:
    servers = echo(2)
    client.open(servers.target, pool_config(source_addresses=list(SOURCES)))
    responses(client.unary_many(40))
    snapshot = wait_all_ready(client)

    budget = snapshot["port_budget"]
    assert set(budget) == set(SOURCES)
    assert set(client.port_budget()) == set(SOURCES)
    low, high = kernel_port_range()
    mine = Counter(local[0] for local, remote in established() if remote in server_addresses(servers))
    for source in SOURCES:
        entry = budget[source]
        assert entry["routes"] == len(servers), entry
        assert entry["connections"] == ready_slots(snapshot, source) == len(servers), entry
        assert entry["sockets"] >= entry["established"] >= entry["connections"], entry
        assert entry["established"] >= mine[source], (entry, mine)
        assert entry["sockets"] >= entry["established"] + entry["time_wait"], entry
        assert entry["ephemeral_range"] == [low, high], entry
        assert_share_consistent(entry, high - low + 1)


def test_port_budget_of_an_unbound_channel(echo: Callable[..., EchoServers], client: Client) -> None:
    servers = echo(2)
    client.open(servers.target, pool_config())
    responses(client.unary_many(20))
    snapshot = wait_all_ready(client)

    assert [endpoint["source"] for endpoint in snapshot["endpoints"]] == [None, None]
    budget = snapshot["port_budget"]
    assert set(budget) == {"default"}
    assert set(client.port_budget()) == {"default"}
    entry = budget["default"]
    low, high = kernel_port_range()
    assert entry["routes"] == len(servers), entry
    assert entry["connections"] == ready_slots(snapshot, None) == len(servers), entry
    assert entry["sockets"] >= entry["established"] >= len(any_connection_to(servers)) >= len(servers), entry
    assert entry["ephemeral_range"] == [low, high], entry
    assert_share_consistent(entry, high - low + 1)


# -- 3. mistakes refused at construction, and the address families --------------------------


def _non_local(address: str) -> list[str]:
    if can_bind(address):
        pytest.skip(f"{address} is an address of this host")
    return [address]


# case: (sources, the server's host, the text the error must contain; {endpoint} is filled in)
MISTAKES: dict[str, tuple[Callable[[], list[str]], str, str]] = {
    "non-local": (lambda: _non_local(NON_LOCAL[0]), "127.0.0.1", NON_LOCAL[0]),
    "test-net": (lambda: _non_local(NON_LOCAL[1]), "127.0.0.1", NON_LOCAL[1]),
    "garbage-name": (lambda: ["not an interface"], "127.0.0.1", "not an interface"),
    "unknown-interface": (lambda: ["nosuchif0"], "127.0.0.1", "nosuchif0"),
    "duplicate": (lambda: ["127.0.0.2", "127.0.0.3", "127.0.0.2"], "127.0.0.1", "127.0.0.2"),
    "duplicate-spelled-apart": (lambda: ["::1", "0:0:0:0:0:0:0:1"], "127.0.0.1", "0:0:0:0:0:0:0:1"),
    "no-source-of-the-family": (lambda: ["127.0.0.2"], "::1", "{endpoint}"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_mistake_is_refused_at_construction(
    echo: Callable[..., EchoServers], client: Client, mistake: str, request: pytest.FixtureRequest
) -> None:
    make_sources, host, named = MISTAKES[mistake]
    if ":" in host:
        request.getfixturevalue("ipv6")
    sources = make_sources()
    servers = echo(1, host)
    before = client.background()

    error = client.construction_error(servers.target, lambda: pool_config(source_addresses=sources))

    assert isinstance(error, poolkit.ConfigError), repr(error)
    assert isinstance(error, ValueError)
    assert error.name == "source_addresses", error
    assert named.format(endpoint=servers.addresses[0]) in str(error), error
    assert client.background() - before == set(), "construction left a thread or task behind"
    assert any_connection_to(servers) == []
    assert servers[0].calls == 0


def test_ipv6_source_serves_an_ipv6_endpoint(echo: Callable[..., EchoServers], client: Client, ipv6: None) -> None:
    servers = echo(1, "::1")
    client.open(servers.target, pool_config(source_addresses=["::1"]))

    replies = responses(client.unary_many(20))

    assert peer_hosts(replies) == {"::1": 20}
    assert routes_by_source(client.describe()) == {"::1": 1}
    assert connections(["::1"], servers) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_ipv6_sources_are_bound(kind: str) -> None:
    """From ::1 to ::1 a connection looks the same bound or not, so the binding is shown
    with a second IPv6 address, added to loopback in a private network namespace: the
    server sees calls from both sources, about evenly, over one connection each."""
    outcome = run_in_namespace(_IPV6_IN_NAMESPACE, kind, _EXTRA_IPV6)
    by_source, connections_seen = outcome
    assert set(by_source) == {"::1", _EXTRA_IPV6}, by_source
    assert all(EVEN_LOW * 100 <= count <= EVEN_HIGH * 100 for count in by_source.values()), by_source
    assert connections_seen == 2


def test_mixed_families_pair_each_endpoint_with_its_own(
    echo: Callable[..., EchoServers], client: Client, ipv6: None
) -> None:
    """IPv4 and IPv6 sources against an IPv4-only endpoint: only the IPv4 source is used.
    With an IPv6 endpoint too, each endpoint gets the source of its family."""
    v4 = echo(1)
    client.open(v4.target, pool_config(source_addresses=["127.0.0.2", "::1"]))

    assert peer_hosts(responses(client.unary_many(20))) == {"127.0.0.2": 20}
    snapshot = client.describe()
    assert routes_by_source(snapshot) == {"127.0.0.2": 1}
    assert set(snapshot["port_budget"]) == {"127.0.0.2", "::1"}
    assert snapshot["port_budget"]["::1"]["routes"] == 0
    assert snapshot["port_budget"]["::1"]["connections"] == 0

    v6 = echo(1, "::1")
    client.open([*v4.addresses, *v6.addresses], pool_config(source_addresses=["127.0.0.2", "::1"]))
    assert peer_hosts(responses(client.unary_many(40))) == {"127.0.0.2": 20, "::1": 20}
    pairs = {(endpoint["address"], endpoint["source"]) for endpoint in client.describe()["endpoints"]}
    assert pairs == {(v4.addresses[0], "127.0.0.2"), (v6.addresses[0], "::1")}


def test_interface_name_stands_for_its_addresses(echo: Callable[..., EchoServers], client: Client) -> None:
    expected = {"127.0.0.1"} | ({"::1"} if socket.has_ipv6 and can_bind("::1") else set())
    servers = echo(1)
    targets = list(servers.addresses)
    if "::1" in expected:
        targets += echo(1, "::1").addresses
    client.open(targets, pool_config(source_addresses=["lo"]))

    replies = responses(client.unary_many(10 * len(targets)))

    assert set(client.port_budget()) == expected
    assert routes_by_source(client.describe()) == dict.fromkeys(expected, 1)
    assert set(peer_hosts(replies)) == expected


# -- 4. TLS -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_server(authority: trustme.CA) -> Iterator[Callable[[str], EchoServer]]:
    """Starts TLS echo servers on 127.0.0.1 whose certificate (from `authority`) is for a
    given name only; stops them after the test."""
    started: list[EchoServer] = []

    def start(name: str) -> EchoServer:
        cert = authority.issue_cert(name)
        key_pair = (cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())
        server = EchoServer(server_id=f"tls-{name}", credentials=grpc.ssl_server_credentials([key_pair]))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def test_tls_with_a_bound_source(
    tls_server: Callable[[str], EchoServer], authority: trustme.CA, client: Client
) -> None:
    server = tls_server("localhost")
    port = server.port
    credentials = grpc.ssl_channel_credentials(authority.cert_pem.bytes())
    client.open(f"localhost:{port}", pool_config(source_addresses=["127.0.0.2"]), credentials)

    reply = client.unary()

    assert peer_host(reply.peer) == "127.0.0.2"
    assert {peer_host(peer) for peer in server.peers} == {"127.0.0.2"}


@pytest.mark.parametrize(
    ("target_host", "cert_name"),
    [("127.0.0.1", "localhost"), ("localhost", "elsewhere.test")],
    ids=["literal-address", "other-name"],
)
def test_tls_refuses_a_certificate_for_another_name(
    tls_server: Callable[[str], EchoServer],
    authority: trustme.CA,
    client: Client,
    target_host: str,
    cert_name: str,
) -> None:
    server = tls_server(cert_name)
    port = server.port
    credentials = grpc.ssl_channel_credentials(authority.cert_pem.bytes())
    client.open(f"{target_host}:{port}", pool_config(source_addresses=["127.0.0.2"]), credentials)

    with pytest.raises(grpc.RpcError) as caught:
        client.unary(timeout=CALL_TIMEOUT)

    assert caught.value.code() is UNAVAILABLE, caught.value  # not DEADLINE_EXCEEDED: it did not hang
    assert server.calls == 0


# -- 5. binding survives a reconnection -------------------------------------------------------


def test_binding_survives_a_server_restart(echo: Callable[..., EchoServers], client: Client) -> None:
    servers = echo(2)
    client.open(servers.target, pool_config(source_addresses=list(SOURCES)))
    responses(client.unary_many(40))
    wait_all_ready(client)

    old = servers[1]
    old.stop()
    back = echo(1, ports=[old.port])[0]  # the same address again
    assert back.address == old.address

    def back_sees_both_sources() -> bool:
        client.unary_many(8)  # some may fail while the connection comes back
        return {peer_host(peer) for peer in back.peers} == set(SOURCES)

    wait_until(
        back_sees_both_sources,
        lambda: f"the restarted server to see both sources: {back.peers} {client.describe()['endpoints']}",
        limit=RECONNECT_WAIT,
    )
    wait_all_ready(client)
    replies = responses(client.unary_many(100))
    assert set(peer_hosts(replies)) == set(SOURCES)
    assert {peer_host(peer) for peer in back.peers} == set(SOURCES)
    live = [servers[0], back]
    assert connections(SOURCES, live) == len(SOURCES) * len(live)
    assert all(local[0] in SOURCES for local, _ in any_connection_to(live)), any_connection_to(live)


# -- 6. the pieces under it ---------------------------------------------------------------------


def test_self_check_passes_on_this_grpcio() -> None:
    _source.self_check()  # raises SourceBindingUnavailable if grpcio cannot bind


def thread_exceptions_of(work: Callable[[], None]) -> list[BaseException | None]:
    """Run `work`, then wait for the threads it started; the exceptions that ended any
    thread meanwhile (kept from pytest's hook, which would pin them on the next test)."""
    caught: list[BaseException | None] = []
    before = set(threading.enumerate())
    previous = threading.excepthook
    threading.excepthook = lambda args: caught.append(args.exc_value)
    try:
        work()
        for thread in set(threading.enumerate()) - before:
            thread.join(THREAD_JOIN)
    finally:
        threading.excepthook = previous
    return caught


def test_self_check_leaves_no_grpc_thread_exception() -> None:
    def check_repeatedly() -> None:
        for _ in range(SELF_CHECK_RUNS):
            assert _source._try_binding() is None

    errors = thread_exceptions_of(check_repeatedly)
    assert errors == [], f"{len(errors)} of {SELF_CHECK_RUNS} self-checks left a thread exception: {errors[0]!r}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0100007F:1F90", ("127.0.0.1", 8080)),
        ("0400007F:01BB", ("127.0.0.4", 443)),
        ("00000000000000000000000001000000:1F90", ("::1", 8080)),
        ("B80D0120000000000000000001000000:01BB", ("2001:db8::1", 443)),
        ("0000000000000000FFFF00000400007F:B2AD", ("127.0.0.4", 0xB2AD)),
    ],
    ids=["ipv4", "ipv4-other", "ipv6-loopback", "ipv6", "ipv4-mapped"],
)
def test_proc_hex_spells_addresses_as_proc_net_tcp_does(text: str, expected: tuple[str, int]) -> None:
    address, port = expected
    host, _, port_text = text.partition(":")
    assert host in _source._proc_hex(address)
    assert int(port_text, 16) == port


def proc_local_addresses(local_port: int, remote_port: int) -> list[str]:
    """The /proc/net/tcp{,6} local addresses (hex, as printed) of the sockets from
    `local_port` to `remote_port`."""
    found = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path, encoding="ascii") as table:
            for line in table.readlines()[1:]:
                local, remote = line.split()[1:3]
                if (
                    int(local.rpartition(":")[2], 16) == local_port
                    and int(remote.rpartition(":")[2], 16) == remote_port
                ):
                    found.append(local)
    return found


def fresh_loopback() -> str:
    """A 127.0.0.0/8 address no other test uses, so no old connection to it lingers in
    TIME_WAIT and the counts of sockets to it are ours alone."""
    rng = random.Random()
    return f"127.{rng.randrange(100, 200)}.{rng.randrange(1, 255)}.{rng.randrange(1, 255)}"


# family of the client socket, its source, whether the server is IPv6 (IPv4 on a
# dual-stack socket shows up in /proc/net/tcp6 as ::ffff:a.b.c.d)
SOCKET_CASES = {
    "ipv4": (socket.AF_INET, "127.0.0.4", False),
    "ipv4-mapped": (socket.AF_INET6, "127.0.0.4", False),
    "ipv6": (socket.AF_INET6, "::1", True),
}


@pytest.mark.parametrize("case", list(SOCKET_CASES))
def test_socket_counts_see_a_socket_of_our_own(case: str, request: pytest.FixtureRequest) -> None:
    family, source, v6_server = SOCKET_CASES[case]
    if family == socket.AF_INET6:
        request.getfixturevalue("ipv6")
    # ::1 may have old connections in TIME_WAIT to this port number: only the live ones
    # (to the listener we hold) are surely ours there.
    server = "::1" if v6_server else fresh_loopback()
    with socket.socket(socket.AF_INET6 if v6_server else socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((server, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        sock = socket.socket(family, socket.SOCK_STREAM)
        mapped = family == socket.AF_INET6 and not v6_server
        sock.bind((f"::ffff:{source}" if mapped else source, 0))
        sock.connect((f"::ffff:{server}" if mapped else server, port))
        accepted, _ = listener.accept()
        local_port = sock.getsockname()[1]
        # The line /proc prints for our socket spells the address it is bound to as poolkit does.
        printed = proc_local_addresses(local_port, port)
        assert len(printed) == 1, printed
        assert printed[0].partition(":")[0] in _source._proc_hex(source), printed

        by_source, to_server = _source.socket_counts([source], [(server, port)])
        assert to_server.established == 1, to_server
        if not v6_server:
            assert (to_server.total, to_server.time_wait) == (1, 0), to_server
        assert by_source[source].established >= 1, by_source
        assert by_source[source].total >= by_source[source].established + by_source[source].time_wait

        sock.close()  # the side that closes first holds the TIME_WAIT
        accepted.close()

        def closed() -> bool:
            counts = _source.socket_counts([], [(server, port)])[1]
            return counts.established == 0 and counts.time_wait >= 1

        wait_until(closed, "our closed connection to reach TIME_WAIT")
        by_source, to_server = _source.socket_counts([source], [(server, port)])
        assert to_server.time_wait >= 1, to_server
        if not v6_server:
            assert (to_server.total, to_server.established, to_server.time_wait) == (1, 0, 1), to_server
        assert by_source[source].time_wait >= 1, by_source


# -- a host that allows binding to addresses it does not have -----------------------------------

_IN_NAMESPACE = """
import json, os, subprocess, sys
import poolkit
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
with open("/proc/sys/net/ipv4/ip_nonlocal_bind", "w") as knob:
    knob.write(sys.argv[1])
config = poolkit.PoolConfig(source_addresses=[sys.argv[2]], health_check=None, connect_on_start=False)
try:
    poolkit.insecure_channel("ipv4:127.0.0.1:9", config=config).close()
except poolkit.ConfigError as error:
    print(json.dumps(["refused", str(error)]), flush=True)
else:
    print(json.dumps(["accepted", ""]), flush=True)
# Skip interpreter shutdown: grpc's daemon poller threads can be frozen holding a lock
# that a grpc channel's __del__ then waits for, and the child would never exit.
os._exit(0)
"""


_EXTRA_IPV6 = "fd00:5::2"  # a unique-local address this test gives the namespace's loopback

_IPV6_IN_NAMESPACE = """
import asyncio, collections, json, os, subprocess, sys
import poolkit, poolkit.aio
from poolkit.testing import EchoRequest, EchoStub, start_echo_servers

kind, extra = sys.argv[1], sys.argv[2]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["ip", "-6", "addr", "add", f"{extra}/128", "dev", "lo", "nodad"], check=True)
servers = start_echo_servers(1, "::1")
config = poolkit.PoolConfig(source_addresses=["::1", extra], balancer="round_robin", health_check=None)
request = EchoRequest(payload=b"x")

def host(peer):
    return peer.partition(":")[2].rsplit(":", 1)[0].strip("[]").replace("%5B", "").replace("%5D", "")

if kind == "sync":
    with poolkit.insecure_channel(servers.target, config=config) as channel:
        replies = [EchoStub(channel).Unary(request, timeout=5) for _ in range(100)]
else:
    async def calls():
        async with poolkit.aio.insecure_channel(servers.target, config=config) as channel:
            return [await EchoStub(channel).Unary(request, timeout=5) for _ in range(100)]
    replies = asyncio.run(calls())
by_source = collections.Counter(host(reply.peer) for reply in replies)
print(json.dumps([by_source, len(servers[0].peers)]), flush=True)
os._exit(0)  # as above: no interpreter shutdown behind grpc's threads
"""


def run_in_namespace(script: str, *args: str) -> Any:
    """Run `script` in a private network namespace (its own addresses and sysctls); the
    JSON it printed last."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare and ip for a private network namespace")
    run = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if run.returncode != 0 and "unshare" in run.stderr:
        pytest.skip(f"no private network namespace here: {run.stderr.strip()[-300:]}")
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.splitlines()[-1])


def construct_in_namespace(nonlocal_bind: int, source: str) -> tuple[str, str]:
    """Build a channel bound to `source` in a private network namespace with
    net.ipv4.ip_nonlocal_bind set as given: ("refused", why) or ("accepted", "")."""
    outcome, why = run_in_namespace(_IN_NAMESPACE, str(nonlocal_bind), source)
    return outcome, why


def test_non_local_source_is_refused_in_a_namespace() -> None:
    outcome, why = construct_in_namespace(0, NON_LOCAL[0])
    assert outcome == "refused"
    assert NON_LOCAL[0] in why


def test_non_local_source_is_refused_where_non_local_binds_are_allowed() -> None:
    outcome, why = construct_in_namespace(1, NON_LOCAL[0])
    assert outcome == "refused"
    assert NON_LOCAL[0] in why


# -- 7. the port budget as OpenTelemetry metrics ------------------------------------------------

# Run in a child process: an OpenTelemetry meter provider is global to a process, once set.
METRICS_SCRIPT = """
import json, sys
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

import poolkit
from poolkit.testing import EchoRequest, EchoStub, start_echo_servers

servers = start_echo_servers(2)
config = poolkit.PoolConfig(source_addresses=sys.argv[1:], balancer="round_robin")
with poolkit.insecure_channel(servers.addresses, config=config) as channel:
    for _ in range(20):
        EchoStub(channel).Unary(EchoRequest(payload=b"x"), timeout=5)
    budget = channel.port_budget()
    points = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if not metric.name.startswith("poolkit.source."):
                    continue  # the per-call histograms and the pool's other instruments
                points[metric.name] = {
                    "unit": metric.unit,
                    "points": [[dict(p.attributes), p.value] for p in metric.data.data_points],
                }
    print(json.dumps({"target": channel.describe()["target"], "budget": budget, "metrics": points}))
servers.stop()
"""


def test_port_budget_is_reported_as_metrics() -> None:
    """With an SDK meter provider, every source address of a live channel has the three
    port-budget gauges, agreeing with port_budget(), under the channel's target."""
    sources = ["127.0.0.2", "127.0.0.3"]
    done = subprocess.run(
        [sys.executable, "-c", METRICS_SCRIPT, *sources],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    metrics = report["metrics"]
    expected_units = {
        "poolkit.source.connections": "{connection}",
        "poolkit.source.ports_in_use": "{port}",
        "poolkit.source.port_range_share": "1",
    }
    assert {name: metrics[name]["unit"] for name in expected_units} == expected_units
    for name, field in (
        ("poolkit.source.connections", "connections"),
        ("poolkit.source.ports_in_use", "sockets"),
        ("poolkit.source.port_range_share", "share_in_use"),
    ):
        points = metrics[name]["points"]
        assert sorted(attributes["poolkit.source_address"] for attributes, _ in points) == sources
        assert {attributes["grpc.target"] for attributes, _ in points} == {report["target"]}
        for attributes, value in points:
            if field == "connections":  # the others may move between two reads of /proc
                assert value == report["budget"][attributes["poolkit.source_address"]][field] == 2
            else:
                assert value > 0
