"""TLS end to end, one suite run against the sync and the asyncio channel: server-only TLS
for every call kind over two servers named "localhost"; mutual TLS, where the server sees
the client's certificate and a client without one is refused; call credentials (a token
composed into the channel credentials, per call, and a metadata plugin) reaching every
endpoint; and the ways TLS fails (an unknown CA, a certificate for another name, a
missing client certificate): UNAVAILABLE, fast, with details a human can act on, bounded
however the retry policy is set.

Real TLS servers on loopback (`poolkit.testing.EchoServer` with server credentials, or a
small servicer of our own that reports what TLS told it about the client), certificates
made at test time with trustme. The servers listen on "localhost" (every address it
names, one port), and targets name "localhost", so each certificate is checked against
that name. What a server saw is read from its call count and from the response: the echo
server returns the call's invocation metadata (so `authorization` and other credentials'
headers), the identity servicer the client's certificate identities. Connections that
reached a server's TCP listener are counted by a `FaultProxy` passing bytes in front of it.

Timing assertions are upper bounds only, generous for a loaded 2-core machine: they prove
a failure does not hang and is not retried for ever, not how fast it is.

The `client` fixture gives both channel kinds one blocking interface, as in
tests/test_retry.py: for asyncio, an event loop runs in a thread of its own, the channel
and its calls live there, and the test's thread only submits to it. Tests ask for their
servers before the client, so the channel is closed before its servers stop.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import grpc.aio
import pytest
import trustme
from _loop_thread import LoopThread
from _support import wait_until

import poolkit
import poolkit.aio
from poolkit import HealthCheck, PoolConfig, RetryPolicy
from poolkit._retry import MAX_REQUEUES
from poolkit.testing import (
    EchoRequest,
    EchoResponse,
    EchoServers,
    EchoStub,
    FaultProxy,
    echo_pb2_grpc,
    start_echo_servers,
)

pytestmark = [
    pytest.mark.timeout(90),
    # The pool's background work must never die with an unhandled exception.
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED

REQUEST = EchoRequest(payload=b"tls")
CALL_TIMEOUT = 5.0
# How long the test thread waits on anything it handed to the asyncio loop.
RUN_LIMIT = 30.0
KINDS = ("sync", "aio")

HOST = "localhost"
CLIENT_NAME = "client.example"  # the client certificate's subject alternative name
CLIENT_CN = "poolkit test client"
TOKEN = "tok"  # noqa: S105 - a made-up bearer token the echo server sends back

# A TLS failure must end the call well within this, retry policy or not: it is not a
# measure of speed, only proof that nothing hangs or goes round for ever.
FAIL_FAST_LIMIT = 10.0
# Calls made after the first failure, each of which must fail as fast.
REPEATS = 5
DEADLINE = 2.0
# How far past its deadline a call may end on a loaded machine.
DEADLINE_SLACK = 3.0
# grpc reconnects a failed connection after 1 s (±20 %), then 1.6× longer each time: no
# endpoint sees more than one new connection per 0.8 s unless poolkit forces them.
RECONNECT_MIN_GAP = 0.8

# Unary calls in the spreading test, besides one call of each other kind.
UNARY_CALLS = 20
STREAM_LENGTH = 3

# What grpc says, in a failed call's details, when TLS refused the connection.
WRONG_CA_MARKERS = ("Tls handshake failed", "CERTIFICATE_VERIFY_FAILED")
WRONG_HOST_MARKERS = ("Hostname Verification Check failed",)


def pool_config(**changes: Any) -> PoolConfig:
    """The suite's base config: round robin (each endpoint gets its turn), no active health
    checks and no failure accrual (which would make calls of their own, or change where
    calls go)."""
    settings: dict[str, Any] = {"balancer": "round_robin", "health_check": None, "failure_accrual": None}
    settings.update(changes)
    return PoolConfig(**settings)


# An idempotent method is retried on UNAVAILABLE: a TLS failure must still end fast.
RETRYING = pool_config(retry=RetryPolicy(idempotent=True))
# The same, connecting on the first call rather than at construction, so that the call is
# the one that sees the handshake fail (and carries grpc's reason).
RETRYING_ON_FIRST_CALL = dataclasses.replace(RETRYING, connect_on_start=False)


def targets(ports: Sequence[int]) -> list[str]:
    return [f"{HOST}:{port}" for port in ports]


# -- a uniform client over both channel kinds ----------------------------------------------


class Client(Protocol):
    kind: str

    def open(self, target: str | Sequence[str], credentials: Any, config: PoolConfig) -> None: ...

    def unary(
        self,
        request: EchoRequest = REQUEST,
        *,
        timeout: float = CALL_TIMEOUT,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
    ) -> EchoResponse: ...

    def unary_with_call(self, *, credentials: grpc.CallCredentials | None = None) -> EchoResponse:
        """A unary call through `with_call` (sync) or the call object (asyncio), which must end OK."""
        ...

    def server_stream(self, *, credentials: grpc.CallCredentials | None = None) -> list[EchoResponse]: ...

    def client_stream(self, *, credentials: grpc.CallCredentials | None = None) -> EchoResponse: ...

    def bidi_stream(self, *, credentials: grpc.CallCredentials | None = None) -> list[EchoResponse]: ...

    def describe(self) -> dict[str, Any]: ...

    def shutdown(self) -> None: ...


def _stream_requests() -> list[EchoRequest]:
    return [EchoRequest(payload=bytes([ord("a") + i])) for i in range(STREAM_LENGTH)]


def _secure(module: Any, target: str | Sequence[str], credentials: Any, config: PoolConfig) -> Any:
    return module.secure_channel(target, credentials, config=config)


class SyncClient:
    """A poolkit.Channel driven from the test's thread."""

    kind = "sync"

    def __init__(self) -> None:
        self._opened: list[poolkit.Channel] = []

    def open(self, target: str | Sequence[str], credentials: Any, config: PoolConfig) -> None:
        self.channel = _secure(poolkit, target, credentials, config)
        self._opened.append(self.channel)
        self._stub = EchoStub(self.channel)

    def unary(
        self,
        request: EchoRequest = REQUEST,
        *,
        timeout: float = CALL_TIMEOUT,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
    ) -> EchoResponse:
        return self._stub.Unary(  # type: ignore[no-any-return]
            request, timeout=timeout, credentials=credentials, wait_for_ready=wait_for_ready
        )

    def unary_with_call(self, *, credentials: grpc.CallCredentials | None = None) -> EchoResponse:
        response, call = self._stub.Unary.with_call(REQUEST, timeout=CALL_TIMEOUT, credentials=credentials)
        assert call.code() is grpc.StatusCode.OK
        return response  # type: ignore[no-any-return]

    def server_stream(self, *, credentials: grpc.CallCredentials | None = None) -> list[EchoResponse]:
        request = EchoRequest(payload=b"s", repeat=STREAM_LENGTH)
        return list(self._stub.ServerStream(request, timeout=CALL_TIMEOUT, credentials=credentials))

    def client_stream(self, *, credentials: grpc.CallCredentials | None = None) -> EchoResponse:
        return self._stub.ClientStream(  # type: ignore[no-any-return]
            iter(_stream_requests()), timeout=CALL_TIMEOUT, credentials=credentials
        )

    def bidi_stream(self, *, credentials: grpc.CallCredentials | None = None) -> list[EchoResponse]:
        return list(self._stub.BidiStream(iter(_stream_requests()), timeout=CALL_TIMEOUT, credentials=credentials))

    def describe(self) -> dict[str, Any]:
        return self.channel.describe()

    def shutdown(self) -> None:
        for channel in self._opened:
            channel.close()


class AioClient:
    """A poolkit.aio.Channel driven from an event loop in its own thread."""

    kind = "aio"

    def __init__(self) -> None:
        self._opened: list[poolkit.aio.Channel] = []
        self._loop = LoopThread("tls-aio-loop", RUN_LIMIT)

    def _run(self, coroutine: Any) -> Any:
        return self._loop.run(coroutine, RUN_LIMIT)

    def open(self, target: str | Sequence[str], credentials: Any, config: PoolConfig) -> None:
        async def open_channel() -> poolkit.aio.Channel:
            return _secure(poolkit.aio, target, credentials, config)  # type: ignore[no-any-return]

        self.channel = self._run(open_channel())
        self._opened.append(self.channel)
        self._stub = EchoStub(self.channel)

    def unary(
        self,
        request: EchoRequest = REQUEST,
        *,
        timeout: float = CALL_TIMEOUT,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
    ) -> EchoResponse:
        async def call() -> EchoResponse:
            return await self._stub.Unary(  # type: ignore[no-any-return]
                request, timeout=timeout, credentials=credentials, wait_for_ready=wait_for_ready
            )

        return self._run(call())  # type: ignore[no-any-return]

    def unary_with_call(self, *, credentials: grpc.CallCredentials | None = None) -> EchoResponse:
        async def call() -> EchoResponse:
            rpc = self._stub.Unary(REQUEST, timeout=CALL_TIMEOUT, credentials=credentials)
            response = await rpc
            assert await rpc.code() is grpc.StatusCode.OK
            return response  # type: ignore[no-any-return]

        return self._run(call())  # type: ignore[no-any-return]

    def server_stream(self, *, credentials: grpc.CallCredentials | None = None) -> list[EchoResponse]:
        async def call() -> list[EchoResponse]:
            request = EchoRequest(payload=b"s", repeat=STREAM_LENGTH)
            stream = self._stub.ServerStream(request, timeout=CALL_TIMEOUT, credentials=credentials)
            return [response async for response in stream]

        return self._run(call())  # type: ignore[no-any-return]

    def client_stream(self, *, credentials: grpc.CallCredentials | None = None) -> EchoResponse:
        async def call() -> EchoResponse:
            return await self._stub.ClientStream(  # type: ignore[no-any-return]
                iter(_stream_requests()), timeout=CALL_TIMEOUT, credentials=credentials
            )

        return self._run(call())  # type: ignore[no-any-return]

    def bidi_stream(self, *, credentials: grpc.CallCredentials | None = None) -> list[EchoResponse]:
        async def call() -> list[EchoResponse]:
            stream = self._stub.BidiStream(iter(_stream_requests()), timeout=CALL_TIMEOUT, credentials=credentials)
            return [response async for response in stream]

        return self._run(call())  # type: ignore[no-any-return]

    def describe(self) -> dict[str, Any]:
        async def describe() -> dict[str, Any]:
            return self.channel.describe()

        return self._run(describe())  # type: ignore[no-any-return]

    def shutdown(self) -> None:
        self._loop.stop(self._opened)


@pytest.fixture(params=KINDS)
def client(request: pytest.FixtureRequest) -> Iterator[Client]:
    """One blocking way to drive a poolkit channel of either kind; the test opens it."""
    driver: Client = SyncClient() if request.param == "sync" else AioClient()
    yield driver
    driver.shutdown()


def every_call_kind(client: Client, credentials: grpc.CallCredentials | None = None) -> list[EchoResponse]:
    """`UNARY_CALLS` unary calls and one call of each other kind; every response, each
    checked for its payload. One echo call per unary call and per stream."""
    responses = [client.unary(credentials=credentials) for _ in range(UNARY_CALLS)]
    responses.append(client.unary_with_call(credentials=credentials))
    assert all(r.payload == REQUEST.payload for r in responses)
    server_stream = client.server_stream(credentials=credentials)
    assert [r.index for r in server_stream] == list(range(STREAM_LENGTH))
    client_stream = client.client_stream(credentials=credentials)
    assert client_stream.payload == b"".join(r.payload for r in _stream_requests())
    bidi = client.bidi_stream(credentials=credentials)
    assert [r.payload for r in bidi] == [r.payload for r in _stream_requests()]
    return [*responses, *server_stream, client_stream, *bidi]


ECHO_CALLS_PER_ROUND = UNARY_CALLS + 4  # with_call, and one call per stream kind


def failure(call: Callable[[], object]) -> tuple[grpc.RpcError, float]:
    """The error `call` raised and how long it took to raise it (the test fails if it
    returned)."""
    started = time.monotonic()
    try:
        outcome = call()
    except grpc.RpcError as error:
        return error, time.monotonic() - started
    raise AssertionError(f"the call succeeded: {outcome}")


# -- certificates and servers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    """The CA the servers' (and the client's) certificates come from."""
    return trustme.CA()


@pytest.fixture(scope="module")
def stranger() -> trustme.CA:
    """A CA nobody's certificate comes from: trusting only it is trusting the wrong CA."""
    return trustme.CA()


def server_credentials(
    authority: trustme.CA, name: str = HOST, *, client_ca: trustme.CA | None = None
) -> grpc.ServerCredentials:
    """A certificate for `name` from `authority`; with `client_ca`, clients must present
    a certificate from that CA."""
    cert = authority.issue_cert(name)
    key_pair = (cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())
    if client_ca is None:
        return grpc.ssl_server_credentials([key_pair])
    return grpc.ssl_server_credentials(
        [key_pair], root_certificates=client_ca.cert_pem.bytes(), require_client_auth=True
    )


def trusting(authority: trustme.CA) -> grpc.ChannelCredentials:
    """Channel credentials that trust `authority` and present no client certificate."""
    return grpc.ssl_channel_credentials(root_certificates=authority.cert_pem.bytes())


@pytest.fixture
def tls_echo() -> Iterator[Callable[..., EchoServers]]:
    """Starts `count` echo servers on "localhost" with the given server credentials; stops
    them after the test."""
    started: list[EchoServers] = []

    def start(count: int, credentials: grpc.ServerCredentials) -> EchoServers:
        servers = start_echo_servers(count, HOST, credentials=credentials)
        started.append(servers)
        return servers

    yield start
    for servers in started:
        servers.stop()


def _proxy_host() -> str:
    """Where a proxy must listen for "localhost:<its port>" to reach it: the one address
    "localhost" names or, when it names an IPv4 and an IPv6 address (as many CI hosts'
    /etc/hosts do), the IPv6 wildcard, which on Linux takes IPv4 connections on the same
    port too."""
    addresses = {str(info[4][0]) for info in socket.getaddrinfo(HOST, None, type=socket.SOCK_STREAM)}
    return addresses.pop() if len(addresses) == 1 else "::"


@pytest.fixture
def proxies() -> Iterator[Callable[[Sequence[int]], list[FaultProxy]]]:
    """Puts a pass-through TCP proxy in front of each of the given server ports, which
    counts the connections that reach it (`accepted`); closes them after the test."""
    opened: list[FaultProxy] = []

    def start(ports: Sequence[int]) -> list[FaultProxy]:
        host = _proxy_host()
        fronts = [FaultProxy(f"{HOST}:{port}", host=host) for port in ports]
        opened.extend(fronts)
        return fronts

    yield start
    for proxy in opened:
        proxy.close()


class IdentityEcho(echo_pb2_grpc.EchoServicer):
    """Answers `Unary` with what TLS told the server about the client, in the response's
    `metadata`: the security type, the peer identity key and identities, and the
    certificate's common name."""

    def __init__(self, server_id: str) -> None:
        self.server_id = server_id
        self._lock = threading.Lock()
        self._calls = 0

    @property
    def calls(self) -> int:
        with self._lock:
            return self._calls

    def Unary(self, request: EchoRequest, context: grpc.ServicerContext) -> EchoResponse:
        with self._lock:
            self._calls += 1
        auth = context.auth_context()
        seen = {
            "transport_security_type": _joined(auth.get("transport_security_type")),
            "peer_identity_key": context.peer_identity_key() or "",
            "peer_identities": _joined(context.peer_identities()),
            "x509_common_name": _joined(auth.get("x509_common_name")),
        }
        return EchoResponse(payload=request.payload, server_id=self.server_id, peer=context.peer(), metadata=seen)


def _joined(values: Any) -> str:
    return ",".join(value.decode() for value in values or ())


@dataclass
class IdentityServer:
    server: grpc.Server
    servicer: IdentityEcho
    port: int


@pytest.fixture
def mtls_servers(authority: trustme.CA) -> Iterator[list[IdentityServer]]:
    """Two identity servers on "localhost" that require a client certificate from `authority`."""
    servers = []
    for index in range(2):
        # As poolkit.testing's servers: a port has one owner (no SO_REUSEPORT sharing).
        server = grpc.server(ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
        servicer = IdentityEcho(f"mtls-{index}")
        echo_pb2_grpc.add_EchoServicer_to_server(servicer, server)
        port = server.add_secure_port(f"{HOST}:0", server_credentials(authority, client_ca=authority))
        assert port, f"cannot listen on {HOST}"
        server.start()
        servers.append(IdentityServer(server, servicer, port))
    yield servers
    for each in servers:
        each.server.stop(None).wait()


# -- 1. server-only TLS ----------------------------------------------------------------------


def test_every_call_kind_over_tls_is_spread_over_both_servers(
    tls_echo: Callable[..., EchoServers], authority: trustme.CA, client: Client
) -> None:
    servers = tls_echo(2, server_credentials(authority))
    # Active health checks on: they run over the same TLS connections.
    client.open(targets([s.port for s in servers]), trusting(authority), pool_config(health_check=HealthCheck()))

    responses = every_call_kind(client)

    assert {r.server_id for r in responses} == {"echo-0", "echo-1"}
    counts = [server.calls for server in servers]
    assert sum(counts) == ECHO_CALLS_PER_ROUND
    # Round robin: half each (a quarter is the least "spread" allows, should "localhost"
    # name two addresses and make two routes per server).
    assert min(counts) >= ECHO_CALLS_PER_ROUND // 4, counts
    described = client.describe()
    assert {e["authority"] for e in described["endpoints"]} == set(targets([s.port for s in servers]))
    wait_until(
        lambda: all(e["health"] == "serving" for e in client.describe()["endpoints"]),
        lambda: f"health checks over TLS to answer SERVING: {client.describe()['endpoints']}",
    )


# -- 2. mutual TLS ----------------------------------------------------------------------------


def test_mutual_tls_shows_the_servers_who_the_client_is(
    mtls_servers: list[IdentityServer], authority: trustme.CA, client: Client
) -> None:
    cert = authority.issue_cert(CLIENT_NAME, common_name=CLIENT_CN)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=authority.cert_pem.bytes(),
        private_key=cert.private_key_pem.bytes(),
        certificate_chain=cert.cert_chain_pems[0].bytes(),
    )
    client.open(targets([s.port for s in mtls_servers]), credentials, pool_config())

    responses = [client.unary() for _ in range(4)]

    assert {r.server_id for r in responses} == {"mtls-0", "mtls-1"}
    for response in responses:
        assert dict(response.metadata) == {
            "transport_security_type": "ssl",
            "peer_identity_key": "x509_subject_alternative_name",
            "peer_identities": CLIENT_NAME,
            "x509_common_name": CLIENT_CN,
        }


def test_mutual_tls_without_a_client_certificate_is_refused_fast(
    mtls_servers: list[IdentityServer], authority: trustme.CA, client: Client
) -> None:
    # Connect on the first call, so that it is the call which sees the handshake fail.
    client.open(targets([s.port for s in mtls_servers]), trusting(authority), pool_config(connect_on_start=False))

    error, elapsed = failure(client.unary)

    assert error.code() is UNAVAILABLE, error
    assert elapsed < FAIL_FAST_LIMIT
    details = error.details() or ""
    # TLS 1.3: the client finishes its side of the handshake before the server checks for
    # a certificate, so grpc reports the server hanging up ("Socket closed"), not a
    # handshake failure. The details at least name the endpoint that refused.
    assert any(f":{s.port}" in details for s in mtls_servers), details
    assert any(marker in details for marker in ("Socket closed", "handshake", "CERTIFICATE")), details
    assert sum(s.servicer.calls for s in mtls_servers) == 0


# -- 3. call credentials ----------------------------------------------------------------------


def test_a_token_composed_into_the_channel_credentials_reaches_every_endpoint(
    tls_echo: Callable[..., EchoServers], authority: trustme.CA, client: Client
) -> None:
    servers = tls_echo(2, server_credentials(authority))
    credentials = grpc.composite_channel_credentials(trusting(authority), grpc.access_token_call_credentials(TOKEN))
    client.open(targets([s.port for s in servers]), credentials, pool_config())

    responses = every_call_kind(client)

    assert {r.server_id for r in responses} == {"echo-0", "echo-1"}
    assert [r.metadata.get("authorization") for r in responses] == [f"Bearer {TOKEN}"] * len(responses)


def test_per_call_credentials_reach_the_server(
    tls_echo: Callable[..., EchoServers], authority: trustme.CA, client: Client
) -> None:
    servers = tls_echo(2, server_credentials(authority))
    client.open(targets([s.port for s in servers]), trusting(authority), pool_config())

    with_token = every_call_kind(client, grpc.access_token_call_credentials("per-call"))
    without = client.unary()

    assert {r.server_id for r in with_token} == {"echo-0", "echo-1"}
    assert [r.metadata.get("authorization") for r in with_token] == ["Bearer per-call"] * len(with_token)
    assert "authorization" not in without.metadata


class ApiKeyPlugin(grpc.AuthMetadataPlugin):
    """Adds `x-api-key` to every call and records what grpc told it about each call."""

    KEY = "k-123"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen: list[tuple[str, str]] = []  # (service_url, method_name)

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        with self._lock:
            self.seen.append((context.service_url, context.method_name))
        callback((("x-api-key", self.KEY),), None)


def test_a_metadata_plugin_is_asked_for_every_call(
    tls_echo: Callable[..., EchoServers], authority: trustme.CA, client: Client
) -> None:
    (server,) = tls_echo(1, server_credentials(authority))
    plugin = ApiKeyPlugin()
    credentials = grpc.composite_channel_credentials(trusting(authority), grpc.metadata_call_credentials(plugin))
    client.open(f"dns:///{HOST}:{server.port}", credentials, pool_config())

    responses = every_call_kind(client)

    assert [r.metadata.get("x-api-key") for r in responses] == [ApiKeyPlugin.KEY] * len(responses)
    # Once per call; the service URL names the target's host, not the IP address dialled.
    assert len(plugin.seen) == ECHO_CALLS_PER_ROUND
    assert {url for url, _ in plugin.seen} == {f"https://{HOST}:{server.port}/poolkit.echo.v1.Echo"}
    assert {method for _, method in plugin.seen} == {"Unary", "ServerStream", "ClientStream", "BidiStream"}


# -- 4. TLS failures ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Mistake:
    """A TLS misconfiguration: the servers' certificate name, whether the client trusts the
    right CA, and what grpc's details say about it."""

    cert_name: str
    right_ca: bool
    markers: tuple[str, ...]


MISTAKES = {
    "wrong-ca": Mistake(HOST, right_ca=False, markers=WRONG_CA_MARKERS),
    "wrong-host": Mistake("other.example", right_ca=True, markers=WRONG_HOST_MARKERS),
}


def misconfigured(
    mistake: Mistake, authority: trustme.CA, stranger: trustme.CA
) -> tuple[grpc.ServerCredentials, grpc.ChannelCredentials]:
    return server_credentials(authority, mistake.cert_name), trusting(authority if mistake.right_ca else stranger)


def assert_fast_unavailable(error: grpc.RpcError, elapsed: float) -> None:
    assert error.code() is UNAVAILABLE, error  # not DEADLINE_EXCEEDED: nothing waited
    assert elapsed < FAIL_FAST_LIMIT, f"took {elapsed:.1f} s: {error}"


@pytest.mark.parametrize("mistake", MISTAKES.values(), ids=MISTAKES.keys())
def test_a_tls_mistake_fails_fast_with_details_that_say_why(
    tls_echo: Callable[..., EchoServers],
    proxies: Callable[[Sequence[int]], list[FaultProxy]],
    authority: trustme.CA,
    stranger: trustme.CA,
    client: Client,
    mistake: Mistake,
) -> None:
    server_creds, channel_creds = misconfigured(mistake, authority, stranger)
    servers = tls_echo(2, server_creds)
    fronts = proxies([s.port for s in servers])
    client.open(targets([p.port for p in fronts]), channel_creds, RETRYING_ON_FIRST_CALL)
    started = time.monotonic()

    first, elapsed = failure(lambda: client.unary(wait_for_ready=False))
    assert_fast_unavailable(first, elapsed)
    assert any(marker in (first.details() or "") for marker in mistake.markers), first.details()
    for _ in range(REPEATS):
        again, elapsed = failure(lambda: client.unary(wait_for_ready=False))
        assert_fast_unavailable(again, elapsed)

    calls = 1 + REPEATS
    budget = client.describe()["retry_budget"]
    assert budget["retries"] == 0, budget  # a failed handshake is never a server's answer
    assert budget["requeues"] <= MAX_REQUEUES * calls, budget  # bounded per call
    # Connections: grpc's reconnect backoff, not one per call or per requeue.
    allowed = 1 + int((time.monotonic() - started) / RECONNECT_MIN_GAP)
    accepted = [p.accepted for p in fronts]
    assert sum(accepted) >= 1, accepted
    assert max(accepted) <= allowed, f"{accepted} connections, {allowed} allowed by grpc's backoff"
    assert sum(s.calls for s in servers) == 0  # no handler ever ran


@pytest.mark.parametrize("mistake", MISTAKES.values(), ids=MISTAKES.keys())
def test_the_reason_for_a_tls_failure_survives_once_the_pool_knows(
    tls_echo: Callable[..., EchoServers],
    authority: trustme.CA,
    stranger: trustme.CA,
    client: Client,
    mistake: Mistake,
) -> None:
    """Once every connection has failed, calls fail at once with the pool's own error,
    which names each endpoint with grpc's reason (here the certificate's)."""
    server_creds, channel_creds = misconfigured(mistake, authority, stranger)
    servers = tls_echo(2, server_creds)
    client.open(targets([s.port for s in servers]), channel_creds, RETRYING)
    wait_until(
        lambda: all(e["status"] == "failing" and e["connect_error"] for e in client.describe()["endpoints"]),
        lambda: f"every endpoint to be failing, and why: {client.describe()['endpoints']}",
    )

    error, elapsed = failure(lambda: client.unary(wait_for_ready=False))

    assert_fast_unavailable(error, elapsed)
    assert any(marker in (error.details() or "") for marker in mistake.markers), error.details()


def test_every_requeue_paid_for_is_sent(
    tls_echo: Callable[..., EchoServers], authority: trustme.CA, stranger: trustme.CA, client: Client
) -> None:
    servers = tls_echo(2, server_credentials(authority))
    outcomes = []
    for _ in range(3):  # fresh channels: the first call on each meets the failing handshakes
        client.open(targets([s.port for s in servers]), trusting(stranger), RETRYING_ON_FIRST_CALL)
        failure(lambda: client.unary(wait_for_ready=False))
        wait_until(lambda: client.describe()["in_flight"] == 0, "the call's attempts to end")
        described = client.describe()
        sent = sum(e["calls"] for e in described["endpoints"])
        outcomes.append((sent, described["retry_budget"]["requeues"]))

    # Every requeue the budget paid for was sent. (Until the pool hears that a connection
    # failed, a requeue may go back to an endpoint the call already tried: at most
    # MAX_REQUEUES of them.)
    assert all(requeues == sent - 1 for sent, requeues in outcomes), (
        f"(attempts sent, requeues counted) per call: {outcomes}"
    )
    assert all(sent <= MAX_REQUEUES + 1 for sent, _ in outcomes), outcomes


@pytest.mark.parametrize("wait_for_ready", [False, True], ids=["fail-fast", "wait-for-ready"])
def test_a_call_with_a_deadline_under_a_wrong_ca_ends_by_its_deadline(
    tls_echo: Callable[..., EchoServers],
    authority: trustme.CA,
    stranger: trustme.CA,
    client: Client,
    wait_for_ready: bool,
) -> None:
    servers = tls_echo(2, server_credentials(authority))
    client.open(targets([s.port for s in servers]), trusting(stranger), RETRYING)

    error, elapsed = failure(lambda: client.unary(timeout=DEADLINE, wait_for_ready=wait_for_ready))

    assert error.code() in {UNAVAILABLE, DEADLINE_EXCEEDED}, error
    assert elapsed < DEADLINE + DEADLINE_SLACK, f"took {elapsed:.1f} s: {error}"
    print(
        f"{client.kind} wait_for_ready={wait_for_ready}: {error.code().name} after {elapsed:.2f} s: {error.details()}"
    )


# -- 5. construction --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "credentials", ["not creds", grpc.access_token_call_credentials(TOKEN)], ids=["a-string", "call-credentials"]
)
def test_secure_channel_refuses_what_is_not_channel_credentials(kind: str, credentials: Any) -> None:
    module: Any = poolkit if kind == "sync" else poolkit.aio

    with pytest.raises(poolkit.ConfigError) as caught:
        module.secure_channel(f"{HOST}:443", credentials)

    assert caught.value.name == "credentials"
    assert "credentials" in str(caught.value)
    assert isinstance(caught.value, ValueError)
