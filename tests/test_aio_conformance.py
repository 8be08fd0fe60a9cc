"""One behavioural suite for asyncio channels, run against a plain grpc.aio channel and a
poolkit.aio channel: whatever grpc.aio does, poolkit.aio must do the same, through the
same generated stub and grpc.aio's own call objects. Every test also checks that a
poolkit channel ends with nothing in flight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
from _aio_support import aio_test, served, settled, until_served

import poolkit.aio
from poolkit.testing import EchoRequest, EchoResponse, EchoServers, EchoStub, start_echo_servers

OpenChannel = Callable[..., grpc.aio.Channel]

UNARY = "/poolkit.echo.v1.Echo/Unary"
SERVER_STREAM = "/poolkit.echo.v1.Echo/ServerStream"
CLIENT_STREAM = "/poolkit.echo.v1.Echo/ClientStream"
BIDI_STREAM = "/poolkit.echo.v1.Echo/BidiStream"

NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]

# A server delay far beyond the client's deadline: the deadline always expires first.
SLOW_MS = 500
SHORT_TIMEOUT = 0.05


@pytest.fixture(scope="module")
def echo_servers() -> Iterator[EchoServers]:
    """Two echo servers shared by this module's tests; tests read only deltas of their counts."""
    with start_echo_servers(2) as servers:
        yield servers


@pytest.fixture(params=["grpc.aio", "poolkit.aio"])
def open_channel(request: pytest.FixtureRequest, echo_servers: EchoServers) -> OpenChannel:
    """Opens a channel of one kind to the echo servers; call it inside the test's event loop."""
    target = echo_servers.target
    if request.param == "grpc.aio":
        return lambda **kwargs: grpc.aio.insecure_channel(target, **kwargs)
    return lambda **kwargs: poolkit.aio.insecure_channel(target, **kwargs)


async def requests(*payloads: bytes, **fields: Any) -> AsyncIterator[EchoRequest]:
    for payload in payloads:
        yield EchoRequest(payload=payload, **fields)


# -- the four call kinds ---------------------------------------------------------------------


@aio_test
async def test_unary_call_is_awaited_for_its_response(open_channel: OpenChannel) -> None:
    async with open_channel() as channel:
        reply = await EchoStub(channel).Unary(EchoRequest(payload=b"hello"))
        assert isinstance(reply, EchoResponse)
        assert reply.payload == b"hello"
        assert reply.server_id.startswith("echo-")
        await settled(channel)


@aio_test
async def test_unary_call_object_reports_metadata_and_status(open_channel: OpenChannel) -> None:
    async with open_channel() as channel:
        call = EchoStub(channel).Unary(EchoRequest(payload=b"hello"))
        assert (await call).payload == b"hello"
        assert call.done()
        assert isinstance(await call.initial_metadata(), grpc.aio.Metadata)
        assert isinstance(await call.trailing_metadata(), grpc.aio.Metadata)
        assert await call.code() is grpc.StatusCode.OK
        assert await call.details() == ""
        assert not call.cancelled()
        await settled(channel)


@aio_test
async def test_server_stream_by_async_for(open_channel: OpenChannel) -> None:
    async with open_channel() as channel:
        call = EchoStub(channel).ServerStream(EchoRequest(payload=b"s", repeat=5))
        replies = [reply async for reply in call]
        assert [r.index for r in replies] == [0, 1, 2, 3, 4]
        assert {r.payload for r in replies} == {b"s"}
        assert await call.code() is grpc.StatusCode.OK
        await settled(channel)


@aio_test
async def test_server_stream_by_read_until_eof(open_channel: OpenChannel) -> None:
    async with open_channel() as channel:
        call = EchoStub(channel).ServerStream(EchoRequest(payload=b"s", repeat=3))
        indexes = []
        for _ in range(10):
            reply = await call.read()
            if reply is grpc.aio.EOF:
                break
            indexes.append(reply.index)
        assert indexes == [0, 1, 2]
        assert await call.code() is grpc.StatusCode.OK
        assert isinstance(await call.trailing_metadata(), grpc.aio.Metadata)
        await settled(channel)


@pytest.mark.parametrize("style", ["async generator", "plain iterator"])
@aio_test
async def test_client_stream_from_an_iterator(open_channel: OpenChannel, style: str) -> None:
    parts = [b"a", b"b", b"c"]
    source = requests(*parts) if style == "async generator" else iter([EchoRequest(payload=p) for p in parts])
    async with open_channel() as channel:
        call = EchoStub(channel).ClientStream(source)
        assert (await call).payload == b"abc"
        assert await call.code() is grpc.StatusCode.OK
        await settled(channel)


@aio_test
async def test_client_stream_by_write_and_done_writing(open_channel: OpenChannel) -> None:
    async with open_channel() as channel:
        call = EchoStub(channel).ClientStream()
        for part in (b"a", b"b", b"c"):
            await call.write(EchoRequest(payload=part))
        await call.done_writing()
        assert (await call).payload == b"abc"
        await settled(channel)


@aio_test
async def test_bidi_stream_from_an_async_generator(open_channel: OpenChannel) -> None:
    async with open_channel() as channel:
        call = EchoStub(channel).BidiStream(requests(b"a", b"b", b"c"))
        replies = [reply async for reply in call]
        assert [(r.index, r.payload) for r in replies] == [(0, b"a"), (1, b"b"), (2, b"c")]
        assert await call.code() is grpc.StatusCode.OK
        await settled(channel)


@aio_test
async def test_bidi_stream_by_write_and_read(open_channel: OpenChannel) -> None:
    async with open_channel() as channel:
        call = EchoStub(channel).BidiStream()
        for index, part in enumerate((b"a", b"b", b"c")):
            await call.write(EchoRequest(payload=part))
            reply = await call.read()
            assert (reply.index, reply.payload) == (index, part)
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() is grpc.StatusCode.OK
        await settled(channel)


# -- what passes through unchanged -----------------------------------------------------------


@aio_test
async def test_metadata_reaches_the_server_on_every_call_kind(open_channel: OpenChannel) -> None:
    metadata = (("x-tenant", "acme"), ("x-request-id", "42"))
    async with open_channel() as channel:
        stub = EchoStub(channel)
        unary = await stub.Unary(EchoRequest(), metadata=metadata)
        streamed = [r async for r in stub.ServerStream(EchoRequest(repeat=2), metadata=metadata)]
        collected = await stub.ClientStream(requests(b"x"), metadata=metadata)
        bidi = [r async for r in stub.BidiStream(requests(b"x"), metadata=metadata)]
        for reply in [unary, *streamed, collected, *bidi]:
            assert reply.metadata["x-tenant"] == "acme"
            assert reply.metadata["x-request-id"] == "42"
        await settled(channel)


async def _fail_unary(stub: EchoStub) -> None:
    await stub.Unary(EchoRequest(fail_code=NOT_FOUND, fail_details="no such echo"))


async def _fail_server_stream(stub: EchoStub) -> None:
    async for _ in stub.ServerStream(EchoRequest(repeat=3, fail_code=NOT_FOUND, fail_details="no such echo")):
        pass


async def _fail_client_stream(stub: EchoStub) -> None:
    await stub.ClientStream(requests(b"a", b"b", fail_code=NOT_FOUND, fail_details="no such echo"))


async def _fail_bidi_stream(stub: EchoStub) -> None:
    call = stub.BidiStream()
    await call.write(EchoRequest(payload=b"a"))
    assert (await call.read()).payload == b"a"
    await call.write(EchoRequest(payload=b"b", fail_code=NOT_FOUND, fail_details="no such echo"))
    await call.read()


@pytest.mark.parametrize(
    "fail", [_fail_unary, _fail_server_stream, _fail_client_stream, _fail_bidi_stream], ids=lambda f: f.__name__[6:]
)
@aio_test
async def test_server_errors_pass_through_unchanged(open_channel: OpenChannel, fail: Any) -> None:
    async with open_channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await fail(EchoStub(channel))
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND
        assert raised.value.details() == "no such echo"
        assert not isinstance(raised.value, poolkit.PoolkitError)
        await settled(channel)


@aio_test
async def test_unary_deadline_exceeded(open_channel: OpenChannel) -> None:
    async with open_channel() as channel:
        call = EchoStub(channel).Unary(EchoRequest(delay_ms=SLOW_MS), timeout=SHORT_TIMEOUT)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert await call.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await settled(channel)


@aio_test
async def test_server_stream_deadline_exceeded(open_channel: OpenChannel) -> None:
    async with open_channel() as channel:
        call = EchoStub(channel).ServerStream(EchoRequest(repeat=3, delay_ms=SLOW_MS), timeout=SHORT_TIMEOUT)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call.read()
        assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await settled(channel)


@aio_test
async def test_bytes_pass_through_without_serializers(open_channel: OpenChannel) -> None:
    def raw(payload: bytes) -> bytes:
        return EchoRequest(payload=payload, repeat=2).SerializeToString()

    async with open_channel() as channel:
        unary = await channel.unary_unary(UNARY)(raw(b"u"))
        assert isinstance(unary, bytes)
        assert EchoResponse.FromString(unary).payload == b"u"

        streamed = [r async for r in channel.unary_stream(SERVER_STREAM)(raw(b"s"))]
        assert [EchoResponse.FromString(r).index for r in streamed] == [0, 1]

        collected = await channel.stream_unary(CLIENT_STREAM)(iter([raw(b"a"), raw(b"b")]))
        assert EchoResponse.FromString(collected).payload == b"ab"

        bidi = [r async for r in channel.stream_stream(BIDI_STREAM)(iter([raw(b"a"), raw(b"b")]))]
        assert [EchoResponse.FromString(r).payload for r in bidi] == [b"a", b"b"]
        await settled(channel)


# -- cancellation ----------------------------------------------------------------------------


@aio_test
async def test_cancel_a_unary_call(open_channel: OpenChannel, echo_servers: EchoServers) -> None:
    async with open_channel() as channel:
        before = served(echo_servers)
        call = EchoStub(channel).Unary(EchoRequest(delay_ms=SLOW_MS))
        await until_served(echo_servers, before + 1)
        assert call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert call.cancelled()
        assert await call.code() is grpc.StatusCode.CANCELLED
        assert not call.cancel()  # already done
        await settled(channel)


@aio_test
async def test_cancel_a_server_stream_midway(open_channel: OpenChannel) -> None:
    async with open_channel() as channel:
        call = EchoStub(channel).ServerStream(EchoRequest(repeat=50, delay_ms=20))
        assert (await call.read()).index == 0
        assert call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call.read()
        assert await call.code() is grpc.StatusCode.CANCELLED
        await settled(channel)


@aio_test
async def test_cancel_a_bidi_stream_midway(open_channel: OpenChannel) -> None:
    async with open_channel() as channel:
        call = EchoStub(channel).BidiStream()
        await call.write(EchoRequest(payload=b"a"))
        assert (await call.read()).payload == b"a"
        assert call.cancel()
        assert await call.code() is grpc.StatusCode.CANCELLED
        await settled(channel)


async def _await_unary(stub: EchoStub) -> Any:
    return await stub.Unary(EchoRequest(delay_ms=SLOW_MS))


async def _read_server_stream(stub: EchoStub) -> Any:
    return [reply async for reply in stub.ServerStream(EchoRequest(repeat=3, delay_ms=SLOW_MS))]


@pytest.mark.parametrize("consume", [_await_unary, _read_server_stream], ids=["unary", "server_stream"])
@aio_test
async def test_cancel_the_task_awaiting_a_call(
    open_channel: OpenChannel, echo_servers: EchoServers, consume: Any
) -> None:
    async with open_channel() as channel:
        before = served(echo_servers)
        task = asyncio.create_task(consume(EchoStub(channel)))
        await until_served(echo_servers, before + 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await settled(channel)


# -- grpc.aio client interceptors ------------------------------------------------------------


def _with_metadata(details: grpc.aio.ClientCallDetails, key: str, value: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(key, value)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


def _method_name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


class TagUnary(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds `x-intercepted: unary-unary` to every unary call and records the methods it saw."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        self.methods.append(_method_name(client_call_details.method))
        return await continuation(_with_metadata(client_call_details, "x-intercepted", "unary-unary"), request)


class TagServerStream(grpc.aio.UnaryStreamClientInterceptor):
    """Adds `x-intercepted: unary-stream` to every server-streaming call."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        self.methods.append(_method_name(client_call_details.method))
        return await continuation(_with_metadata(client_call_details, "x-intercepted", "unary-stream"), request)


class RefuseUnary(grpc.aio.UnaryUnaryClientInterceptor):
    """Fails every unary call before it is sent, as a client-side policy check would."""

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        raise PermissionError("refused by a client interceptor")


@aio_test
async def test_client_interceptors_work_unchanged(open_channel: OpenChannel) -> None:
    unary, stream = TagUnary(), TagServerStream()
    async with open_channel(interceptors=[unary, stream]) as channel:
        stub = EchoStub(channel)
        reply = await stub.Unary(EchoRequest(payload=b"u"), metadata=(("x-tenant", "acme"),))
        assert reply.payload == b"u"
        assert reply.metadata["x-intercepted"] == "unary-unary"
        assert reply.metadata["x-tenant"] == "acme"

        call = stub.ServerStream(EchoRequest(payload=b"s", repeat=2))
        replies = [r async for r in call]
        assert [r.index for r in replies] == [0, 1]
        assert {r.metadata["x-intercepted"] for r in replies} == {"unary-stream"}
        assert await call.code() is grpc.StatusCode.OK

        collected = await stub.ClientStream(requests(b"a", b"b"))  # no interceptor for this kind
        assert "x-intercepted" not in collected.metadata

        assert unary.methods == [UNARY]
        assert stream.methods == [SERVER_STREAM]
        await settled(channel)


@aio_test
async def test_intercepted_calls_report_status_and_cancel(open_channel: OpenChannel, echo_servers: EchoServers) -> None:
    async with open_channel(interceptors=[TagUnary(), TagServerStream()]) as channel:
        stub = EchoStub(channel)
        call = stub.Unary(EchoRequest(fail_code=NOT_FOUND, fail_details="no such echo"))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND
        assert await call.code() is grpc.StatusCode.NOT_FOUND

        before = served(echo_servers)
        slow = stub.Unary(EchoRequest(delay_ms=SLOW_MS))
        await until_served(echo_servers, before + 1)
        assert slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow

        stream = stub.ServerStream(EchoRequest(repeat=50, delay_ms=20))
        assert (await stream.read()).index == 0
        assert stream.cancel()
        assert await stream.code() is grpc.StatusCode.CANCELLED
        await settled(channel)


@aio_test
async def test_an_interceptor_that_raises_fails_the_call_and_leaks_nothing(open_channel: OpenChannel) -> None:
    async with open_channel(interceptors=[RefuseUnary()]) as channel:
        stub = EchoStub(channel)
        with pytest.raises(PermissionError, match="refused by a client interceptor"):
            await stub.Unary(EchoRequest(payload=b"u"))
        assert [r.index async for r in stub.ServerStream(EchoRequest(repeat=2))] == [0, 1]
        await settled(channel)


# -- the channel itself ----------------------------------------------------------------------


@aio_test
async def test_channel_ready_then_get_state_is_ready(open_channel: OpenChannel) -> None:
    async with open_channel() as channel:
        await asyncio.wait_for(channel.channel_ready(), 5)
        assert channel.get_state() is grpc.ChannelConnectivity.READY
        assert channel.get_state(try_to_connect=True) is grpc.ChannelConnectivity.READY


@aio_test
async def test_wait_for_state_change_follows_the_channel_to_ready(open_channel: OpenChannel) -> None:
    async with open_channel() as channel:
        state = channel.get_state(try_to_connect=True)
        for _ in range(10):  # IDLE -> CONNECTING -> READY takes two changes on loopback
            if state is grpc.ChannelConnectivity.READY:
                break
            await asyncio.wait_for(channel.wait_for_state_change(state), 5)
            new_state = channel.get_state(try_to_connect=True)
            assert new_state is not state
            state = new_state
        assert state is grpc.ChannelConnectivity.READY


@aio_test
async def test_async_with_closes_the_channel(open_channel: OpenChannel) -> None:
    channel = open_channel()
    async with channel as entered:
        assert entered is channel
        assert (await EchoStub(channel).Unary(EchoRequest(payload=b"x"))).payload == b"x"
    assert channel.get_state() is grpc.ChannelConnectivity.SHUTDOWN
    await channel.close()  # idempotent
    assert channel.get_state() is grpc.ChannelConnectivity.SHUTDOWN
