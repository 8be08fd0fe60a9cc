"""One behavioural suite, run against a plain grpc channel and a poolkit channel.

Whatever a generated stub can do over `grpc.insecure_channel` it must do the same way
over `poolkit.insecure_channel`: every call kind, metadata, server errors, deadlines,
cancellation, interceptors, raw bytes, connectivity callbacks and the context manager.
For the poolkit channel every test also checks that nothing is left in flight.
"""

from __future__ import annotations

import dataclasses
import gc
import queue
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from conftest import ChannelFactory

from poolkit.testing import EchoRequest, EchoResponse, EchoServers, EchoStub

WAIT = 5.0  # the timeout of every call and wait that should succeed
REQUEST = EchoRequest(payload=b"hello")
METADATA = (("x-tenant", "acme"), ("x-request-id", "42"))
UNARY_METHOD = "/poolkit.echo.v1.Echo/Unary"
SERVER_STREAM_METHOD = "/poolkit.echo.v1.Echo/ServerStream"


@pytest.fixture
def channel(channel_factory: ChannelFactory, cluster: EchoServers) -> Iterator[grpc.Channel]:
    opened = channel_factory(cluster.addresses)
    yield opened
    channel_factory.settle(opened)


@pytest.fixture
def stub(channel: grpc.Channel) -> EchoStub:
    return EchoStub(channel)


# -- the three ways to make a call that returns one response ---------------------------


def call_plain(method: Any, request: Any, **kwargs: Any) -> Any:
    return method(request, **kwargs)


def call_with_call(method: Any, request: Any, **kwargs: Any) -> Any:
    response, call = method.with_call(request, **kwargs)
    assert call.code() is grpc.StatusCode.OK
    return response


def call_future(method: Any, request: Any, **kwargs: Any) -> Any:
    return method.future(request, **kwargs).result(timeout=WAIT)


STYLES: dict[str, Callable[..., Any]] = {"call": call_plain, "with_call": call_with_call, "future": call_future}


def echo_metadata(response: EchoResponse) -> dict[str, str]:
    """The request metadata the server saw, limited to the keys the tests send."""
    return {key: response.metadata[key] for key in response.metadata if key.startswith("x-")}


def _fail(code: grpc.StatusCode, details: str, **fields: Any) -> EchoRequest:
    return EchoRequest(fail_code=code.value[0], fail_details=details, **fields)


# -- unary ------------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_unary(stub: EchoStub, cluster: EchoServers, style: str) -> None:
    response = STYLES[style](stub.Unary, REQUEST, timeout=WAIT)

    assert response.payload == b"hello"
    assert response.server_id in {server.server_id for server in cluster}


def test_unary_with_call_returns_the_call(stub: EchoStub) -> None:
    response, call = stub.Unary.with_call(REQUEST, timeout=WAIT)

    assert response.payload == b"hello"
    assert call.code() is grpc.StatusCode.OK
    assert not call.details()
    assert list(call.initial_metadata()) == []
    assert list(call.trailing_metadata()) == []
    assert not call.is_active()


def test_unary_future_result(stub: EchoStub) -> None:
    future = stub.Unary.future(REQUEST, timeout=WAIT)

    assert future.result(timeout=WAIT).payload == b"hello"
    assert future.done()
    assert not future.cancelled()
    assert future.exception() is None
    assert future.code() is grpc.StatusCode.OK


def test_unary_future_exception(stub: EchoStub) -> None:
    future = stub.Unary.future(_fail(grpc.StatusCode.NOT_FOUND, "no such echo"), timeout=WAIT)

    error = future.exception(timeout=WAIT)
    assert isinstance(error, grpc.RpcError)
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert error.details() == "no such echo"
    with pytest.raises(grpc.RpcError) as raised:
        future.result()
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND


def test_unary_future_cancel(stub: EchoStub) -> None:
    future = stub.Unary.future(EchoRequest(delay_ms=1000), timeout=WAIT)

    assert future.cancel()
    assert future.cancelled()
    with pytest.raises(grpc.FutureCancelledError):
        future.result(timeout=WAIT)
    assert future.code() is grpc.StatusCode.CANCELLED


def test_unary_future_done_callback(stub: EchoStub) -> None:
    finished: queue.Queue[Any] = queue.Queue()
    future = stub.Unary.future(REQUEST, timeout=WAIT)
    future.add_done_callback(finished.put)

    assert finished.get(timeout=WAIT) is future
    assert future.result().payload == b"hello"
    late: list[Any] = []
    future.add_done_callback(late.append)  # on a finished future it runs at once
    assert late == [future]


# -- streams ----------------------------------------------------------------------------


def test_server_stream(stub: EchoStub) -> None:
    responses = stub.ServerStream(EchoRequest(payload=b"s", repeat=5), timeout=WAIT)

    received = list(responses)
    assert [r.index for r in received] == [0, 1, 2, 3, 4]
    assert {r.payload for r in received} == {b"s"}
    assert len({r.server_id for r in received}) == 1
    assert responses.code() is grpc.StatusCode.OK


@pytest.mark.parametrize("style", STYLES)
def test_client_stream(stub: EchoStub, style: str) -> None:
    requests = iter([EchoRequest(payload=part) for part in (b"a", b"bc", b"d")])

    response = STYLES[style](stub.ClientStream, requests, timeout=WAIT)

    assert response.payload == b"abcd"


def test_bidi_stream_answers_each_request_in_turn(stub: EchoStub) -> None:
    outbox: queue.Queue[EchoRequest] = queue.Queue()

    def requests() -> Iterator[EchoRequest]:
        for _ in range(3):
            yield outbox.get(timeout=WAIT)

    responses = stub.BidiStream(requests(), timeout=WAIT)
    for index in range(3):
        outbox.put(EchoRequest(payload=b"m%d" % index))
        response = next(responses)
        assert (response.index, response.payload) == (index, b"m%d" % index)
    assert list(responses) == []
    assert responses.code() is grpc.StatusCode.OK


# -- metadata, errors, deadlines, cancellation --------------------------------------------


def test_metadata_reaches_the_server_for_every_kind(stub: EchoStub) -> None:
    responses = [
        stub.Unary(REQUEST, metadata=METADATA, timeout=WAIT),
        stub.Unary.future(REQUEST, metadata=METADATA, timeout=WAIT).result(timeout=WAIT),
        *stub.ServerStream(EchoRequest(repeat=2), metadata=METADATA, timeout=WAIT),
        stub.ClientStream(iter([REQUEST, REQUEST]), metadata=METADATA, timeout=WAIT),
        *stub.BidiStream(iter([REQUEST, REQUEST]), metadata=METADATA, timeout=WAIT),
    ]

    assert len(responses) == 7
    for response in responses:
        assert echo_metadata(response) == dict(METADATA)


ERROR_CODES = [
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAVAILABLE,
]


@pytest.mark.parametrize("code", ERROR_CODES, ids=lambda c: c.name)
@pytest.mark.parametrize("style", STYLES)
def test_unary_server_error_passes_through(stub: EchoStub, style: str, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        STYLES[style](stub.Unary, _fail(code, f"{code.name} from the server"), timeout=WAIT)

    assert raised.value.code() is code
    assert raised.value.details() == f"{code.name} from the server"


def test_stream_server_errors_pass_through(stub: EchoStub) -> None:
    stream = stub.ServerStream(_fail(grpc.StatusCode.NOT_FOUND, "no stream", repeat=3), timeout=WAIT)
    with pytest.raises(grpc.RpcError) as raised:
        list(stream)
    assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.NOT_FOUND, "no stream")

    with pytest.raises(grpc.RpcError) as raised:
        stub.ClientStream(iter([_fail(grpc.StatusCode.ABORTED, "no upload")]), timeout=WAIT)
    assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.ABORTED, "no upload")

    # The echo server fails a bidi stream on its second message, after one answer.
    bidi = stub.BidiStream(iter([REQUEST, _fail(grpc.StatusCode.OUT_OF_RANGE, "no more")]), timeout=WAIT)
    assert next(bidi).payload == b"hello"
    with pytest.raises(grpc.RpcError) as raised:
        next(bidi)
    assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.OUT_OF_RANGE, "no more")


@pytest.mark.parametrize("style", STYLES)
def test_unary_deadline_exceeded(stub: EchoStub, style: str) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        STYLES[style](stub.Unary, EchoRequest(delay_ms=400), timeout=0.05)

    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_stream_deadline_exceeded(stub: EchoStub) -> None:
    responses = stub.ServerStream(EchoRequest(repeat=100, delay_ms=20), timeout=0.1)

    with pytest.raises(grpc.RpcError) as raised:
        list(responses)
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_cancel_server_stream_midway(stub: EchoStub) -> None:
    responses = stub.ServerStream(EchoRequest(repeat=1000, delay_ms=5), timeout=WAIT)
    assert [next(responses).index for _ in range(3)] == [0, 1, 2]

    assert responses.cancel()

    with pytest.raises(grpc.RpcError) as raised:
        list(responses)
    assert raised.value.code() is grpc.StatusCode.CANCELLED
    assert responses.code() is grpc.StatusCode.CANCELLED


def test_cancel_bidi_stream_midway(stub: EchoStub) -> None:
    def requests() -> Iterator[EchoRequest]:
        for _ in range(1000):
            yield EchoRequest(payload=b"b", delay_ms=5)

    responses = stub.BidiStream(requests(), timeout=WAIT)
    assert next(responses).index == 0

    assert responses.cancel()

    with pytest.raises(grpc.RpcError) as raised:
        list(responses)
    assert raised.value.code() is grpc.StatusCode.CANCELLED


def test_abandoned_stream_is_cancelled(stub: EchoStub) -> None:
    responses = stub.ServerStream(EchoRequest(repeat=1000, delay_ms=5), timeout=WAIT)
    done: queue.Queue[None] = queue.Queue()
    responses.add_callback(lambda: done.put(None))
    next(responses)

    del responses
    gc.collect()

    done.get(timeout=WAIT)  # the call ended long before the server would have finished


# -- interceptors, raw bytes ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class AddMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """A client interceptor that adds one metadata pair to every call and notes the method."""

    def __init__(self, key: str, value: str) -> None:
        self.pair = (key, value)
        self.methods: list[str] = []

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        self.methods.append(details.method)
        metadata = [*(details.metadata or ()), self.pair]
        return _CallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, details.compression
        )

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


def test_interceptor_adds_metadata_to_every_kind(channel: grpc.Channel) -> None:
    interceptor = AddMetadata("x-intercepted", "yes")
    stub = EchoStub(grpc.intercept_channel(channel, interceptor))

    responses = [
        stub.Unary(REQUEST, timeout=WAIT),
        stub.Unary.with_call(REQUEST, timeout=WAIT)[0],
        stub.Unary.future(REQUEST, timeout=WAIT).result(timeout=WAIT),
        *stub.ServerStream(EchoRequest(repeat=2), timeout=WAIT),
        stub.ClientStream(iter([REQUEST]), timeout=WAIT),
        *stub.BidiStream(iter([REQUEST, REQUEST]), timeout=WAIT),
    ]

    assert len(responses) == 8
    for response in responses:
        assert echo_metadata(response) == {"x-intercepted": "yes"}
    assert [m.rsplit("/", 1)[1] for m in interceptor.methods] == [
        "Unary",
        "Unary",
        "Unary",
        "ServerStream",
        "ClientStream",
        "BidiStream",
    ]


def test_interceptor_sees_server_errors(channel: grpc.Channel) -> None:
    stub = EchoStub(grpc.intercept_channel(channel, AddMetadata("x-intercepted", "yes")))

    with pytest.raises(grpc.RpcError) as raised:
        stub.Unary(_fail(grpc.StatusCode.NOT_FOUND, "intercepted failure"), timeout=WAIT)

    assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.NOT_FOUND, "intercepted failure")


def test_bytes_pass_through_without_serializers(channel: grpc.Channel) -> None:
    unary = channel.unary_unary(UNARY_METHOD)
    server_stream = channel.unary_stream(SERVER_STREAM_METHOD)

    raw = unary(EchoRequest(payload=b"raw").SerializeToString(), timeout=WAIT)
    raw_stream = list(server_stream(EchoRequest(payload=b"r", repeat=3).SerializeToString(), timeout=WAIT))

    assert isinstance(raw, bytes)
    assert EchoResponse.FromString(raw).payload == b"raw"
    assert all(isinstance(chunk, bytes) for chunk in raw_stream)
    assert [EchoResponse.FromString(chunk).index for chunk in raw_stream] == [0, 1, 2]


# -- connectivity, lifetime ---------------------------------------------------------------


# grpc's connectivity polling thread raises "Channel closed!" when a channel is closed
# within one polling tick (0.2 s) of subscribe(try_to_connect=True); plain grpc channels do
# it too, and the exception stays in that thread.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_subscribe_reports_ready_and_unsubscribe(channel: grpc.Channel) -> None:
    states: queue.Queue[grpc.ChannelConnectivity] = queue.Queue()
    callback = states.put

    channel.subscribe(callback, try_to_connect=True)
    seen = []
    for _ in range(20):  # a channel passes through a handful of states on its way to READY
        seen.append(states.get(timeout=WAIT))
        if seen[-1] is grpc.ChannelConnectivity.READY:
            break
    channel.unsubscribe(callback)

    assert seen[-1] is grpc.ChannelConnectivity.READY, seen
    assert all(isinstance(state, grpc.ChannelConnectivity) for state in seen)


def test_context_manager(channel_factory: ChannelFactory, cluster: EchoServers) -> None:
    opened = channel_factory(cluster.addresses)

    with opened as entered:
        assert entered is opened
        assert EchoStub(entered).Unary(REQUEST, timeout=WAIT).payload == b"hello"

    # grpc raises ValueError on a closed channel; poolkit an RpcError (UNAVAILABLE).
    with pytest.raises((grpc.RpcError, ValueError)):
        EchoStub(opened).Unary(REQUEST, timeout=WAIT)
    channel_factory.settle(opened)
