"""What only a poolkit.aio channel does: balance thousands of concurrent calls over a pool,
account for every call however it ends, keep one connection per slot, close cleanly, and
describe itself."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
from _aio_support import BIG_BACKLOG, aio_test, eventually, served, settled, until_served
from _otel_support import installed
from opentelemetry.trace import StatusCode

import poolkit
import poolkit.aio
from poolkit.testing import EchoRequest, EchoResponse, EchoServers, EchoStub, start_echo_servers

BALANCERS = ["p2c_peak_ewma", "p2c_least_loaded", "round_robin"]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


@pytest.fixture
def fresh_servers() -> Iterator[EchoServers]:
    """Four echo servers whose counts belong to this test alone."""
    with start_echo_servers(4) as servers:
        yield servers


@pytest.fixture
def busy_servers() -> Iterator[EchoServers]:
    """Four echo servers with enough workers and backlog for thousands of calls in flight."""
    with start_echo_servers(4, max_workers=64, options=BIG_BACKLOG) as servers:
        yield servers


def totals(channel: poolkit.aio.Channel) -> tuple[int, int]:
    """(calls, errors) summed over every endpoint of the channel's snapshot."""
    endpoints = channel.describe()["endpoints"]
    return sum(e["calls"] for e in endpoints), sum(e["errors"] for e in endpoints)


async def call_many(stub: EchoStub, total: int, concurrency: int) -> None:
    """`total` unary calls, at most `concurrency` in flight at once."""
    numbers = iter(range(total))

    async def worker() -> None:
        for number in numbers:
            reply = await stub.Unary(EchoRequest(payload=b"%d" % number))
            assert reply.payload == b"%d" % number

    await asyncio.gather(*(worker() for _ in range(concurrency)))


# -- many calls, however they end ------------------------------------------------------------


@aio_test
async def test_ten_thousand_concurrent_unary_calls(busy_servers: EchoServers) -> None:
    async with poolkit.aio.insecure_channel(busy_servers.target) as channel:
        stub = EchoStub(channel)
        replies = await asyncio.gather(*(stub.Unary(EchoRequest(payload=b"x")) for _ in range(10_000)))
        assert all(isinstance(r, EchoResponse) and r.payload == b"x" for r in replies)
        await settled(channel)
        assert totals(channel) == (10_000, 0)
        assert served(busy_servers) == 10_000
        assert all(e["calls"] > 0 for e in channel.describe()["endpoints"])
        assert {r.server_id for r in replies} == {f"echo-{i}" for i in range(4)}


@pytest.mark.parametrize("how", ["call.cancel", "task.cancel"])
@aio_test
async def test_cancelling_half_of_many_slow_calls_leaks_nothing(busy_servers: EchoServers, how: str) -> None:
    total = 2_000
    async with poolkit.aio.insecure_channel(busy_servers.target) as channel:
        stub = EchoStub(channel)
        calls: list[Any] = []

        async def one() -> Any:
            call = stub.Unary(EchoRequest(payload=b"x", delay_ms=200))
            calls.append(call)
            return await call

        tasks = [asyncio.create_task(one()) for _ in range(total)]
        await until_served(busy_servers, 100)  # calls are on the wire
        if how == "call.cancel":
            cancelled = sum(call.cancel() for call in calls[::2])
        else:
            cancelled = sum(task.cancel() for task in tasks[::2])
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)

        kept, dropped = outcomes[1::2], outcomes[::2]
        assert all(isinstance(r, EchoResponse) for r in kept)
        assert sum(isinstance(r, asyncio.CancelledError) for r in dropped) == cancelled
        assert all(isinstance(r, EchoResponse | asyncio.CancelledError) for r in dropped)
        assert cancelled > 0
        await settled(channel)
        # A task cancelled just after its call finished leaves that call OK: poolkit counts
        # as errors exactly the calls grpc cancelled.
        grpc_cancelled = sum(call.cancelled() for call in calls)
        assert totals(channel) == (total, grpc_cancelled)
        if how == "call.cancel":
            assert grpc_cancelled == cancelled
        else:
            assert 0 < grpc_cancelled <= cancelled


@pytest.mark.parametrize("read_first", [False, True], ids=["unread", "partly_read"])
@aio_test
async def test_an_abandoned_server_stream_is_released(fresh_servers: EchoServers, read_first: bool) -> None:
    async with poolkit.aio.insecure_channel(fresh_servers.target) as channel:
        call = EchoStub(channel).ServerStream(EchoRequest(payload=b"x", repeat=3))
        await until_served(fresh_servers, 1)
        if read_first:
            assert (await call.read()).index == 0
        del call
        gc.collect()
        await settled(channel)


@aio_test
async def test_an_abandoned_server_stream_with_a_deadline_is_released(fresh_servers: EchoServers) -> None:
    async with poolkit.aio.insecure_channel(fresh_servers.target) as channel:
        call = EchoStub(channel).ServerStream(EchoRequest(payload=b"x", repeat=3), timeout=0.2)
        del call
        gc.collect()
        await settled(channel)
        assert totals(channel) == (1, 1)  # it ended DEADLINE_EXCEEDED


@aio_test
async def test_server_errors_are_counted_against_their_endpoint(fresh_servers: EchoServers) -> None:
    async with poolkit.aio.insecure_channel(fresh_servers.target) as channel:
        stub = EchoStub(channel)
        for _ in range(5):
            await stub.Unary(EchoRequest(payload=b"x"))
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Unary(EchoRequest(fail_code=NOT_FOUND))
        await settled(channel)
        assert totals(channel) == (8, 3)
        for endpoint in channel.describe()["endpoints"]:
            assert endpoint["calls"] == sum(s["calls"] for s in endpoint["slots"])
            assert endpoint["errors"] == sum(s["errors"] for s in endpoint["slots"])


# -- a caller's mistakes ---------------------------------------------------------------------

UNARY = "/poolkit.echo.v1.Echo/Unary"
LIMIT = 5.0
# Two failures in a row would eject an endpoint, and an idempotent policy would retry a
# deadline: neither may happen for a call that never left this process.
STRICT = poolkit.PoolConfig(
    health_check=None,
    failure_accrual=poolkit.FailureAccrual(consecutive_failures=2, success_rate=None),
    retry=poolkit.RetryPolicy(
        idempotent=True, codes=frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
    ),
)


def ejections(channel: poolkit.aio.Channel) -> int:
    return sum(e["ejections"] for e in channel.describe()["endpoints"])


def sent_again(channel: poolkit.aio.Channel) -> int:
    budget = channel.describe()["retry_budget"]
    return budget["retries"] + budget["requeues"] + budget["hedges"]  # type: ignore[no-any-return]


async def _first(call: Any) -> Any:
    return await call.read()


async def _every(call: Any) -> list[Any]:
    return [reply async for reply in call]


PAST_DEADLINE = {
    "unary": lambda stub: stub.Unary(EchoRequest(), timeout=-1),
    "server_stream": lambda stub: _every(stub.ServerStream(EchoRequest(), timeout=-1)),
}


@pytest.mark.parametrize("kind", PAST_DEADLINE)
@aio_test
async def test_a_deadline_already_past_is_not_the_endpoints_failure(fresh_servers: EchoServers, kind: str) -> None:
    """grpc ends such a call DEADLINE_EXCEEDED without sending it (a propagated deadline
    that ran out, say): an error of the slot's, never the endpoint's, never sent again."""
    async with poolkit.aio.insecure_channel(fresh_servers.target, config=STRICT) as channel:
        stub = EchoStub(channel)
        for _ in range(12):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await PAST_DEADLINE[kind](stub)
            assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await settled(channel)
        assert totals(channel) == (12, 12)
        assert ejections(channel) == 0
        assert sent_again(channel) == 0
        assert served(fresh_servers) == 0


NOTHING_SENT = {
    "client_stream list": lambda stub: stub.ClientStream([], timeout=-1),
    "client_stream iterator": lambda stub: stub.ClientStream(iter([]), timeout=-1),
    "bidi_stream read": lambda stub: _first(stub.BidiStream([], timeout=-1)),
    "bidi_stream async for": lambda stub: _every(stub.BidiStream(iter([]), timeout=-1)),
}


@pytest.mark.parametrize("retry", ["default_policy", "retry_none"])
@pytest.mark.parametrize("shape", NOTHING_SENT)
@aio_test
async def test_a_request_stream_that_sent_nothing_past_its_deadline_is_deadline_exceeded(
    fresh_servers: EchoServers, shape: str, retry: str
) -> None:
    """grpc.aio raises asyncio.CancelledError for it, which to asyncio says the caller's
    own task was cancelled; poolkit.aio raises the DEADLINE_EXCEEDED grpc reports otherwise."""
    config = poolkit.PoolConfig(health_check=None, retry=None if retry == "retry_none" else poolkit.RetryPolicy())
    async with poolkit.aio.insecure_channel(fresh_servers.target, config=config) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await asyncio.wait_for(NOTHING_SENT[shape](EchoStub(channel)), LIMIT)
        assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert raised.value.details() == "Deadline Exceeded"
        await settled(channel)
        assert ejections(channel) == 0


async def _never_ending() -> AsyncIterator[EchoRequest]:
    yield EchoRequest(payload=b"x")
    await asyncio.Event().wait()
    yield EchoRequest(payload=b"never")  # pragma: no cover - the call is cancelled first


@pytest.mark.parametrize("how", ["call.cancel", "task.cancel"])
@aio_test
async def test_a_cancelled_request_stream_still_raises_cancelled_error(fresh_servers: EchoServers, how: str) -> None:
    """Only an expired deadline is turned into DEADLINE_EXCEEDED: a cancel stays a cancel."""
    async with poolkit.aio.insecure_channel(fresh_servers.target) as channel:
        call = EchoStub(channel).ClientStream(_never_ending(), timeout=LIMIT)
        task = asyncio.ensure_future(_awaited(call))
        await call.wait_for_connection()  # the call is on the wire
        assert call.cancel() if how == "call.cancel" else task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await settled(channel)
        assert totals(channel) == (1, 1)


async def _awaited(call: Any) -> Any:
    return await call


REFUSED_METADATA = [
    pytest.param(("Key", "v"), poolkit.ConfigError, "metadata='Key': a metadata key must be lowercase", id="capitals"),
    pytest.param(("", "v"), poolkit.ConfigError, "metadata=''", id="empty key"),
    pytest.param(
        ("x-y", "caf\u00e9"), poolkit.ConfigError, "metadata='x-y': its value must be printable ASCII", id="not ASCII"
    ),
    pytest.param(("x-y", "a\nb"), poolkit.ConfigError, "metadata='x-y'", id="a newline"),
    pytest.param(("x-y", b"\xff"), poolkit.ConfigError, "metadata='x-y'", id="bytes not ASCII"),
    pytest.param(("x-bin", "text"), TypeError, "'x-bin': Expected bytes", id="-bin text"),
    pytest.param(("x-y", 1), TypeError, "'x-y': Expected str or bytes, not int", id="a number"),
    pytest.param("xyz", poolkit.ConfigError, "(key, value) pair", id="not a pair"),
]


@pytest.mark.parametrize("kind", ["unary", "server_stream"])
@pytest.mark.parametrize(("pair", "error", "says"), REFUSED_METADATA)
@aio_test
async def test_metadata_grpc_would_refuse_is_refused_naming_its_key(
    fresh_servers: EchoServers, kind: str, pair: Any, error: type[Exception], says: str
) -> None:
    """grpc.aio would fail a unary call with its internal ExecuteBatchError when awaited
    (and leave it unfinished, its slot taken), a stream with INTERNAL 'Invalid metadata'."""
    async with poolkit.aio.insecure_channel(fresh_servers.target) as channel:
        stub = EchoStub(channel)
        method = stub.Unary if kind == "unary" else stub.ServerStream
        with pytest.raises(error) as raised:
            method(EchoRequest(), timeout=LIMIT, metadata=[pair])
        assert says in str(raised.value)
        assert totals(channel) == (0, 0)  # refused before it took a connection


@aio_test
async def test_metadata_grpc_accepts_goes_out(fresh_servers: EchoServers) -> None:
    accepted = [
        ("x-text", "printable ~!"),
        ("x-bytes", b"ascii"),
        (b"x-key-bytes", "v"),
        ("x-bin", b"\x00\xff"),
        ("x.y_z-1", ""),
    ]
    async with poolkit.aio.insecure_channel(fresh_servers.target) as channel:
        stub = EchoStub(channel)
        reply = await stub.Unary(EchoRequest(), timeout=LIMIT, metadata=accepted)
        assert reply.metadata["x-text"] == "printable ~!"
        assert reply.metadata["x-bytes"] == "ascii"
        assert reply.metadata["x-key-bytes"] == "v"
        assert reply.metadata["x.y_z-1"] == ""
        reply = await stub.Unary(EchoRequest(), timeout=LIMIT, metadata=grpc.aio.Metadata(("x-m", "v")))
        assert reply.metadata["x-m"] == "v"
        await settled(channel)
        assert totals(channel) == (2, 0)


class RecordRequests(grpc.aio.UnaryUnaryClientInterceptor):
    """Records the request of every unary call it sees."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        self.requests.append(request)
        return await continuation(client_call_details, request)


UNSERIALISABLE = {
    "unary": lambda stub: stub.Unary("hello", timeout=LIMIT),
    "server_stream": lambda stub: stub.ServerStream("hello", timeout=LIMIT),
}


@pytest.mark.parametrize("intercepted", [False, True], ids=["plain", "intercepted"])
@pytest.mark.parametrize("kind", UNSERIALISABLE)
@aio_test
async def test_a_request_that_will_not_serialise_fails_the_call(
    fresh_servers: EchoServers, kind: str, intercepted: bool
) -> None:
    """grpc.aio logs such a request and sends an empty message instead; poolkit.aio fails
    the call as sync grpc does. Interceptors still see the request message itself."""
    interceptor = RecordRequests()
    interceptors = [interceptor] if intercepted else None
    async with poolkit.aio.insecure_channel(fresh_servers.target, interceptors=interceptors) as channel:
        stub = EchoStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            UNSERIALISABLE[kind](stub)
        assert raised.value.code() is grpc.StatusCode.INTERNAL
        assert raised.value.details() == "Exception serializing request!"
        assert raised.value.__cause__ is not None  # the serializer's own exception
        request = EchoRequest(payload=b"x")
        assert (await stub.Unary(request, timeout=LIMIT)).payload == b"x"
        await settled(channel)
        assert totals(channel) == (1, 0)
        assert served(fresh_servers) == 1
        assert interceptor.requests == ([request] if intercepted else [])


@aio_test
async def test_an_attempt_grpc_aio_cannot_start_is_released_at_once(fresh_servers: EchoServers) -> None:
    """A serializer that returns text: grpc.aio's task for the call raises TypeError and
    leaves the call unfinished, its slot taken, for as long as anything holds it (here,
    the exception's traceback)."""
    async with poolkit.aio.insecure_channel(fresh_servers.target, config=STRICT) as channel:
        method = channel.unary_unary(UNARY, request_serializer=lambda request: "text, not bytes")
        raised = []
        for _ in range(3):
            with pytest.raises(TypeError) as caught:
                await method(EchoRequest(), timeout=LIMIT)
            raised.append(caught.value)
        await settled(channel)
        assert totals(channel) == (3, 3)
        assert ejections(channel) == 0


@aio_test
async def test_a_call_grpc_refuses_to_start_ends_its_span(fresh_servers: EchoServers) -> None:
    with installed() as telemetry:
        async with poolkit.aio.insecure_channel(fresh_servers.target, config=STRICT) as channel:
            stub = EchoStub(channel)
            for _ in range(3):
                with pytest.raises(TypeError):
                    stub.Unary(EchoRequest(), timeout="1")
            await settled(channel)
            assert totals(channel) == (3, 3)  # the slot's errors, not the endpoint's
            assert ejections(channel) == 0
        spans = telemetry.spans("poolkit.echo.v1.Echo/Unary")
    assert len(spans) == 3
    assert all(span.status.status_code is StatusCode.ERROR for span in spans)


# -- connections -----------------------------------------------------------------------------


@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.parametrize("balancer", BALANCERS)
@aio_test
async def test_each_slot_is_one_connection(fresh_servers: EchoServers, balancer: str, slots: int) -> None:
    config = poolkit.PoolConfig(balancer=balancer, connections_per_endpoint=slots)
    async with poolkit.aio.insecure_channel(fresh_servers.target, config=config) as channel:
        await call_many(EchoStub(channel), total=1_000, concurrency=64)
        await settled(channel)
        assert totals(channel) == (1_000, 0)
        endpoints = {e["address"]: e for e in channel.describe()["endpoints"]}
        for server in fresh_servers:
            endpoint = endpoints[server.address]
            used_slots = sum(s["calls"] > 0 for s in endpoint["slots"])
            assert server.calls == endpoint["calls"] > 0, f"{server.address} served no share"
            assert len(server.peers) == used_slots, f"{server.address}: peers {server.peers}, slots {endpoint}"
        if slots == 1:
            assert sum(len(server.peers) for server in fresh_servers) == 4


@aio_test
async def test_channel_ready_needs_only_one_endpoint() -> None:
    with start_echo_servers(2) as servers:
        servers[1].stop()
        async with poolkit.aio.insecure_channel(servers.target) as channel:
            await asyncio.wait_for(channel.channel_ready(), 5)
            assert channel.get_state() is grpc.ChannelConnectivity.READY
            assert channel.describe()["state"] == "ready"


# -- closing ---------------------------------------------------------------------------------


async def _unary(stub: EchoStub) -> None:
    await stub.Unary(EchoRequest())


async def _server_stream(stub: EchoStub) -> None:
    async for _ in stub.ServerStream(EchoRequest()):
        pass


async def _client_stream(stub: EchoStub) -> None:
    await stub.ClientStream(iter([EchoRequest()]))


async def _bidi_stream(stub: EchoStub) -> None:
    async for _ in stub.BidiStream(iter([EchoRequest()])):
        pass


@pytest.mark.parametrize(
    "make_call", [_unary, _server_stream, _client_stream, _bidi_stream], ids=lambda f: f.__name__[1:]
)
@aio_test
async def test_every_call_kind_after_close_raises_pool_closed(fresh_servers: EchoServers, make_call: Any) -> None:
    channel = poolkit.aio.insecure_channel(fresh_servers.target)
    stub = EchoStub(channel)
    await _unary(stub)
    await channel.close()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await make_call(stub)
    error = raised.value
    assert isinstance(error, poolkit.aio.AioPoolClosedError)
    assert isinstance(error, grpc.RpcError)
    assert isinstance(error, poolkit.PoolkitError)
    assert isinstance(error, poolkit.PoolClosedError)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "closed" in error.details()
    assert served(fresh_servers) == 1


@aio_test
async def test_a_closed_channel_says_so(fresh_servers: EchoServers) -> None:
    channel = poolkit.aio.insecure_channel(fresh_servers.target)
    await channel.close()
    await channel.close()  # idempotent
    assert channel.get_state() is grpc.ChannelConnectivity.SHUTDOWN
    assert channel.describe()["state"] == "closed"
    assert "closed" in repr(channel)
    with pytest.raises(poolkit.aio.AioPoolClosedError):
        await channel.channel_ready()
    # Waiting for a change from READY returns once the channel is closed (SHUTDOWN).
    await asyncio.wait_for(channel.wait_for_state_change(grpc.ChannelConnectivity.READY), 5)


@aio_test
async def test_closing_wakes_a_task_waiting_for_a_state_change(fresh_servers: EchoServers) -> None:
    channel = poolkit.aio.insecure_channel(fresh_servers.target)
    await channel.channel_ready()
    waiter = asyncio.create_task(channel.wait_for_state_change(grpc.ChannelConnectivity.READY))
    await asyncio.sleep(0)  # one loop turn: the waiter runs up to its first await
    assert not waiter.done()
    await channel.close()
    await asyncio.wait_for(waiter, 5)
    assert channel.get_state() is grpc.ChannelConnectivity.SHUTDOWN


async def _slow_unary(stub: EchoStub) -> Any:
    return (await stub.Unary(EchoRequest(payload=b"slow", delay_ms=300))).payload


async def _slow_server_stream(stub: EchoStub) -> Any:
    return [r.index async for r in stub.ServerStream(EchoRequest(repeat=3, delay_ms=100))]


@pytest.mark.parametrize(
    ("consume", "expected"),
    [(_slow_unary, b"slow"), (_slow_server_stream, [0, 1, 2])],
    ids=["unary", "server_stream"],
)
@aio_test
async def test_close_with_grace_lets_an_in_flight_call_finish(
    fresh_servers: EchoServers, consume: Any, expected: Any
) -> None:
    channel = poolkit.aio.insecure_channel(fresh_servers.target)
    stub = EchoStub(channel)
    task = asyncio.create_task(consume(stub))
    await until_served(fresh_servers, 1)
    closing = asyncio.create_task(channel.close(grace=10))
    await eventually(lambda: channel.describe()["state"] == "closed", "the channel to stop admitting calls")
    with pytest.raises(poolkit.aio.AioPoolClosedError):
        await stub.Unary(EchoRequest())
    assert await task == expected
    await closing
    await settled(channel)
    assert totals(channel) == (1, 0)


@aio_test
async def test_close_without_grace_cancels_in_flight_calls(fresh_servers: EchoServers) -> None:
    channel = poolkit.aio.insecure_channel(fresh_servers.target)
    task = asyncio.create_task(_slow_unary(EchoStub(channel)))
    await until_served(fresh_servers, 1)
    await channel.close()
    with pytest.raises((asyncio.CancelledError, grpc.aio.AioRpcError)):
        await task
    await settled(channel)
    assert totals(channel) == (1, 1)


# -- the channel as an object ----------------------------------------------------------------


@aio_test
async def test_describe_is_a_json_snapshot(fresh_servers: EchoServers) -> None:
    config = poolkit.PoolConfig(balancer="round_robin", connections_per_endpoint=2)
    async with poolkit.aio.insecure_channel(fresh_servers.target, config=config) as channel:
        stub = EchoStub(channel)
        await call_many(stub, total=20, concurrency=4)
        await settled(channel)
        slow = stub.Unary(EchoRequest(delay_ms=300))
        await until_served(fresh_servers, 21)

        snapshot = json.loads(json.dumps(channel.describe()))
        assert snapshot["target"] == fresh_servers.target
        assert snapshot["balancer"] == "round_robin"
        assert snapshot["state"] == "ready"
        assert snapshot["in_flight"] == 1
        assert [e["address"] for e in snapshot["endpoints"]] == fresh_servers.addresses
        for endpoint in snapshot["endpoints"]:
            assert {"address", "calls", "errors", "in_flight", "ewma_ms", "slots"} <= endpoint.keys()
            assert len(endpoint["slots"]) == 2
            assert endpoint["ewma_ms"] >= 0
        assert sum(e["in_flight"] for e in snapshot["endpoints"]) == 1
        assert sum(s["in_flight"] for e in snapshot["endpoints"] for s in e["slots"]) == 1
        assert sum(e["calls"] for e in snapshot["endpoints"]) == 20

        await slow
        await settled(channel)
        assert totals(channel) == (21, 0)
    assert json.loads(json.dumps(channel.describe()))["state"] == "closed"


@aio_test
async def test_a_poolkit_channel_is_a_grpc_aio_channel(fresh_servers: EchoServers) -> None:
    async with poolkit.aio.insecure_channel(fresh_servers.addresses) as channel:
        assert isinstance(channel, grpc.aio.Channel)
        assert "poolkit.aio.Channel" in repr(channel)
        assert "in_flight=0" in repr(channel)
        assert (await EchoStub(channel).Unary(EchoRequest(payload=b"x"))).payload == b"x"


def test_secure_channel_wants_grpc_credentials() -> None:
    with pytest.raises(poolkit.ConfigError) as raised:
        poolkit.aio.secure_channel("ipv4:127.0.0.1:1", "not credentials")
    assert isinstance(raised.value, ValueError)
    assert "credentials" in str(raised.value)


@aio_test
async def test_a_pool_with_no_connection_names_why_each_failed() -> None:
    """As the sync channel: nothing listens on the port, and the pool's own fast error
    names grpc's reason for each failed connect."""
    with socket.socket() as placeholder:  # bound, never listening: connects are refused
        placeholder.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{placeholder.getsockname()[1]}"
        config = poolkit.PoolConfig(health_check=None, retry=None)
        async with poolkit.aio.insecure_channel(target, config=config) as channel:
            await eventually(
                lambda: channel.describe()["endpoints"][0]["connect_error"],
                lambda: f"the pool to learn why the connection failed: {channel.describe()['endpoints']}",
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await EchoStub(channel).Unary(EchoRequest(payload=b"x"), timeout=5)

    details = raised.value.details() or ""
    assert f"every endpoint is unavailable ({target} failing to connect: " in details, details
    assert "Connection refused" in details, details


# -- construction on a running loop ---------------------------------------------------------------
#
# What would block (a DNS lookup, a resolver, the source-binding self-check) runs in a worker
# thread when a channel is made on a running loop; calls made meanwhile wait for it.


def _held_resolver(servers: EchoServers, release: threading.Event) -> Any:
    """A resolver that answers `servers` only once `release` is set (10 s at most): if
    construction waited for it on the loop, nothing could set it in time."""

    def resolve(_target: str) -> list[str]:
        assert release.wait(10), "the resolver was never released: construction blocked the loop"
        return servers.addresses

    return resolve


@aio_test
async def test_construction_on_a_loop_leaves_the_first_resolution_to_a_worker_thread(
    fresh_servers: EchoServers,
) -> None:
    release = threading.Event()
    config = poolkit.PoolConfig(resolver=_held_resolver(fresh_servers, release), health_check=None)
    async with poolkit.aio.insecure_channel("echo.internal", config=config) as channel:
        stub = EchoStub(channel)
        assert channel.describe()["endpoints"] == []
        unary = stub.Unary(EchoRequest(payload=b"early"), timeout=10)  # made before the answer
        stream = stub.ServerStream(EchoRequest(repeat=2), timeout=10)
        ready = asyncio.ensure_future(channel.channel_ready())
        await asyncio.sleep(0)
        assert not ready.done(), "channel_ready() waits for the first resolution"
        release.set()

        assert (await unary).payload == b"early"
        assert [reply.index async for reply in stream] == [0, 1]
        await asyncio.wait_for(ready, 10)
        assert {e["address"] for e in channel.describe()["endpoints"]} == set(fresh_servers.addresses)
        await settled(channel)


@aio_test
async def test_a_call_cancelled_while_the_first_resolution_runs_is_never_sent(fresh_servers: EchoServers) -> None:
    release = threading.Event()
    config = poolkit.PoolConfig(resolver=_held_resolver(fresh_servers, release), health_check=None)
    async with poolkit.aio.insecure_channel("echo.internal", config=config) as channel:
        call = EchoStub(channel).Unary(EchoRequest(), timeout=10)
        assert call.cancel()
        assert call.cancelled()
        assert call.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await call
        await channel.channel_ready()
        assert served(fresh_servers) == 0
        assert totals(channel) == (0, 0)


@aio_test
async def test_a_target_that_does_not_resolve_fails_calls_at_once_saying_why() -> None:
    async with poolkit.aio.insecure_channel(
        "no-such-host.invalid:50051", config=poolkit.PoolConfig(health_check=None)
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await EchoStub(channel).Unary(EchoRequest(), timeout=10)
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "no-such-host.invalid" in raised.value.details()
        assert "has no endpoint" in raised.value.details()
