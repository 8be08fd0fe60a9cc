"""OpenTelemetry end to end, one suite run against the sync and the asyncio channel: a
CLIENT span per call (every call kind, and the sync `with_call` and `future`) with its
attributes and status, one INTERNAL child span per attempt of a retried call, events for
an ejection and a refused retry; the trace context in the metadata the server receives
(also with no SDK installed, and never with `telemetry=False`); the stable RPC semantic
conventions on request; gRPC's per-call metrics (A66) and the pool's own observables;
and no metadata value or message body anywhere in what is exported.

Real servers on loopback: `poolkit.testing`'s echo servers (their `fail_code` and
`fail_next` make calls fail), and a recording echo server (`_otel_support`) that keeps
the metadata of every call it receives, failed attempts included. SDK providers with
in-memory exporters are installed for one test at a time and removed after
(`_otel_support.installed`): the rest of the suite runs with none.

A span or a metric of a call may be recorded just after the caller sees the outcome
(grpc's done-callbacks end it), so the suite waits for what it expects to appear, then
for the channel to have nothing in flight, before it counts. Nothing is timed.

The `client` fixture gives both channel kinds one blocking interface, as in
tests/test_retry.py: for asyncio, an event loop runs in a thread of its own, the channel
and its calls live there, and the test's thread only submits to it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import grpc
import grpc.aio
import pytest
from _loop_thread import LoopThread
from _otel_support import (
    SEMCONV_ENV,
    Point,
    Received,
    RecordingServer,
    Telemetry,
    installed,
    parse_traceparent,
    providers_unset,
)
from _support import wait_until
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.metrics.export import Histogram, Sum
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags

import poolkit
import poolkit.aio
from poolkit import FailureAccrual, PoolConfig, RetryBudget, RetryPolicy
from poolkit.testing import (
    ECHO_SERVICE,
    FAIL_DETAILS,
    EchoRequest,
    EchoResponse,
    EchoServer,
    EchoServers,
    EchoStub,
    start_echo_servers,
)

pytestmark = [
    pytest.mark.timeout(60),
    # The pool's background work must never die with an unhandled exception.
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
NOT_FOUND = grpc.StatusCode.NOT_FOUND

REQUEST = EchoRequest(payload=b"x")
# A request stream is [HEAD, request]: the request under test goes last, so a server that
# fails the call because of it has read the whole stream first. (A server that fails a
# call before reading its request stream races grpc.aio's writer, which may then end the
# call INTERNAL instead, with plain grpc.aio channels too.)
HEAD = EchoRequest(payload=b"h")
STREAM_LENGTH = 2  # messages a server stream answers with
CALL_TIMEOUT = 5.0
# How long the test thread waits on anything it handed to the asyncio loop.
RUN_LIMIT = 30.0

# An idempotent policy with quick backoffs (10-20 ms), so a retry costs the suite little.
IDEMPOTENT = RetryPolicy(idempotent=True, initial_backoff=0.01, max_backoff=0.02)
# Smooth weighted round robin sends a fresh channel's first picks to an endpoint ten
# times heavier than the other: the first attempt lands there, the retry elsewhere.
HEAVY = 10.0

# gRPC's latency buckets (A66), for every duration histogram.
A66_BUCKETS = [
    0, 0.00001, 0.00005, 0.0001, 0.0003, 0.0006, 0.0008, 0.001, 0.002, 0.003, 0.004, 0.005,
    0.006, 0.008, 0.01, 0.013, 0.016, 0.02, 0.025, 0.03, 0.04, 0.05, 0.065, 0.08, 0.1, 0.13,
    0.16, 0.2, 0.25, 0.3, 0.4, 0.5, 0.65, 0.8, 1, 2, 5, 10, 20, 50, 100,
]  # fmt: skip

STARTED = "grpc.client.attempt.started"
ATTEMPT_DURATION = "grpc.client.attempt.duration"
CALL_DURATION = "grpc.client.call.duration"
PER_CALL_METRICS = {STARTED: "{attempt}", ATTEMPT_DURATION: "s", CALL_DURATION: "s"}

CONNECTIVITY_NAMES = {state.name.lower() for state in grpc.ChannelConnectivity}


def pool_config(**changes: Any) -> PoolConfig:
    """The suite's base config: no health checks and no failure accrual (unless a test is
    about them), round robin so weights decide where a fresh channel's first call goes."""
    settings: dict[str, Any] = {"health_check": None, "failure_accrual": None, "balancer": "round_robin"}
    settings.update(changes)
    return PoolConfig(**settings)


def full(method: str) -> str:
    """The span name (and stable `rpc.method`) of an echo method: "poolkit.echo.v1.Echo/Unary"."""
    return f"{ECHO_SERVICE}/{method}"


def attempt_name(method: str) -> str:
    return f"Attempt.{full(method)}"


# -- call kinds ------------------------------------------------------------------------------

# shape: the echo method it calls. "with_call" is `with_call` for sync and awaiting the call
# object, then its code(), for asyncio; `future()` and a request stream's `with_call` are
# sync only.
METHOD_OF = {
    "unary": "Unary",
    "with_call": "Unary",
    "future": "Unary",
    "server_stream": "ServerStream",
    "client_stream": "ClientStream",
    "client_stream_with_call": "ClientStream",
    "client_stream_future": "ClientStream",
    "bidi": "BidiStream",
}
SYNC_ONLY = {"future", "client_stream_with_call", "client_stream_future"}
KINDS = ("sync", "aio")


def shape_cases(shapes: Sequence[str]) -> list[Any]:
    """(client kind, shape) pairs for `shapes`; asyncio has no future() or with_call."""
    return [
        pytest.param(kind, shape, id=f"{kind}-{shape}")
        for kind in KINDS
        for shape in shapes
        if not (kind == "aio" and shape in SYNC_ONLY)
    ]


ALL_SHAPES = shape_cases(list(METHOD_OF))
# Without retries (`retry=None`) a future is grpc's own, and grpc reads a request stream
# with next(): a list, which every other shape here sends (so it can be sent again), fails.
PLAIN_SHAPES = shape_cases([shape for shape in METHOD_OF if shape != "client_stream_future"])
UNARY_SHAPES = shape_cases(["unary", "with_call", "future"])
RETRIED_SHAPES = shape_cases(
    ["unary", "with_call", "future", "client_stream", "client_stream_with_call", "client_stream_future"]
)
RETRIED_STREAM_SHAPES = shape_cases(["server_stream", "bidi"])  # retried before their first message


def repeated(request: EchoRequest) -> EchoRequest:
    """`request` asking for a server stream of `STREAM_LENGTH` messages."""
    streamed = EchoRequest()
    streamed.CopyFrom(request)
    streamed.repeat = STREAM_LENGTH
    return streamed


Metadata = Sequence[tuple[str, str | bytes]] | None


def _sync_unary(stub: EchoStub, request: EchoRequest, metadata: Metadata) -> list[EchoResponse]:
    return [stub.Unary(request, timeout=CALL_TIMEOUT, metadata=metadata)]


def _sync_with_call(stub: EchoStub, request: EchoRequest, metadata: Metadata) -> list[EchoResponse]:
    response, call = stub.Unary.with_call(request, timeout=CALL_TIMEOUT, metadata=metadata)
    assert call.code() is OK
    return [response]


def _sync_future(stub: EchoStub, request: EchoRequest, metadata: Metadata) -> list[EchoResponse]:
    return [stub.Unary.future(request, timeout=CALL_TIMEOUT, metadata=metadata).result(timeout=CALL_TIMEOUT)]


def _sync_server_stream(stub: EchoStub, request: EchoRequest, metadata: Metadata) -> list[EchoResponse]:
    return list(stub.ServerStream(repeated(request), timeout=CALL_TIMEOUT, metadata=metadata))


def _sync_client_stream(stub: EchoStub, request: EchoRequest, metadata: Metadata) -> list[EchoResponse]:
    return [stub.ClientStream([HEAD, request], timeout=CALL_TIMEOUT, metadata=metadata)]


def _sync_client_stream_with_call(stub: EchoStub, request: EchoRequest, metadata: Metadata) -> list[EchoResponse]:
    response, call = stub.ClientStream.with_call([HEAD, request], timeout=CALL_TIMEOUT, metadata=metadata)
    assert call.code() is OK
    return [response]


def _sync_client_stream_future(stub: EchoStub, request: EchoRequest, metadata: Metadata) -> list[EchoResponse]:
    future = stub.ClientStream.future([HEAD, request], timeout=CALL_TIMEOUT, metadata=metadata)
    return [future.result(timeout=CALL_TIMEOUT)]


def _sync_bidi(stub: EchoStub, request: EchoRequest, metadata: Metadata) -> list[EchoResponse]:
    return list(stub.BidiStream([HEAD, request], timeout=CALL_TIMEOUT, metadata=metadata))


SYNC_CALLS: dict[str, Callable[[EchoStub, EchoRequest, Metadata], list[EchoResponse]]] = {
    "unary": _sync_unary,
    "with_call": _sync_with_call,
    "future": _sync_future,
    "server_stream": _sync_server_stream,
    "client_stream": _sync_client_stream,
    "client_stream_with_call": _sync_client_stream_with_call,
    "client_stream_future": _sync_client_stream_future,
    "bidi": _sync_bidi,
}


async def _aio_call(stub: EchoStub, shape: str, request: EchoRequest, metadata: Metadata) -> list[EchoResponse]:
    kwargs: dict[str, Any] = {"timeout": CALL_TIMEOUT, "metadata": metadata}
    if shape == "unary":
        return [await stub.Unary(request, **kwargs)]
    if shape == "with_call":
        call = stub.Unary(request, **kwargs)
        response = await call
        assert await call.code() is OK
        return [response]
    if shape == "server_stream":
        return [response async for response in stub.ServerStream(repeated(request), **kwargs)]
    if shape == "client_stream":
        return [await stub.ClientStream([HEAD, request], **kwargs)]
    assert shape == "bidi", shape
    return [response async for response in stub.BidiStream([HEAD, request], **kwargs)]


@contextlib.contextmanager
def attached(parent: otel_context.Context | None) -> Iterator[None]:
    """`parent` as the current OpenTelemetry context for the block (None: leave it)."""
    if parent is None:
        yield
        return
    token = otel_context.attach(parent)
    try:
        yield
    finally:
        otel_context.detach(token)


# -- a uniform client over both channel kinds ----------------------------------------------


class Bidi(Protocol):
    """A bidirectional stream driven one message at a time."""

    def send(self, request: EchoRequest) -> None: ...

    def receive(self) -> EchoResponse: ...

    def finish(self) -> list[EchoResponse]:
        """Half-close, then read what is left."""
        ...

    def abandon(self) -> None:
        """Stop feeding the request stream (after the call failed)."""
        ...


class Client(Protocol):
    kind: str

    def open(self, target: str | Sequence[str], config: PoolConfig) -> None: ...

    def call(
        self,
        shape: str,
        request: EchoRequest = REQUEST,
        *,
        metadata: Metadata = None,
        parent: otel_context.Context | None = None,
    ) -> list[EchoResponse]:
        """One call of `shape`, made with `parent` as the current context; its responses."""
        ...

    def unregistered_unary(self, request: EchoRequest = REQUEST) -> EchoResponse:
        """Unary through `channel.unary_unary` without `_registered_method`."""
        ...

    def bidi(self) -> Bidi: ...

    def describe(self) -> dict[str, Any]: ...

    def shutdown(self) -> None: ...


class SyncBidi:
    def __init__(self, stub: EchoStub) -> None:
        self._requests: queue.Queue[EchoRequest | None] = queue.Queue()
        self._responses = stub.BidiStream(iter(self._requests.get, None), timeout=CALL_TIMEOUT)

    def send(self, request: EchoRequest) -> None:
        self._requests.put(request)

    def receive(self) -> EchoResponse:
        return next(self._responses)  # type: ignore[no-any-return]

    def finish(self) -> list[EchoResponse]:
        self._requests.put(None)
        return list(self._responses)

    def abandon(self) -> None:
        self._requests.put(None)


class SyncClient:
    """A poolkit.Channel driven from the test's thread."""

    kind = "sync"

    def __init__(self) -> None:
        self._opened: list[poolkit.Channel] = []
        self._bidis: list[SyncBidi] = []

    def open(self, target: str | Sequence[str], config: PoolConfig) -> None:
        self.channel = poolkit.insecure_channel(target, config=config)
        self._opened.append(self.channel)
        self._stub = EchoStub(self.channel)

    def call(
        self,
        shape: str,
        request: EchoRequest = REQUEST,
        *,
        metadata: Metadata = None,
        parent: otel_context.Context | None = None,
    ) -> list[EchoResponse]:
        with attached(parent):
            return SYNC_CALLS[shape](self._stub, request, metadata)

    def unregistered_unary(self, request: EchoRequest = REQUEST) -> EchoResponse:
        unary = self.channel.unary_unary(
            f"/{full('Unary')}",
            request_serializer=EchoRequest.SerializeToString,
            response_deserializer=EchoResponse.FromString,
        )
        return unary(request, timeout=CALL_TIMEOUT)  # type: ignore[no-any-return]

    def bidi(self) -> Bidi:
        stream = SyncBidi(self._stub)
        self._bidis.append(stream)
        return stream

    def describe(self) -> dict[str, Any]:
        return self.channel.describe()

    def shutdown(self) -> None:
        for stream in self._bidis:
            stream.abandon()  # so grpc's request-reading thread ends
        for channel in self._opened:
            channel.close()


class AioBidi:
    def __init__(self, client: AioClient) -> None:
        self._run = client.run

        async def start() -> Any:
            return client.stub.BidiStream(timeout=CALL_TIMEOUT)

        self._call = self._run(start())

    def send(self, request: EchoRequest) -> None:
        self._run(self._call.write(request))

    def receive(self) -> EchoResponse:
        return self._run(self._call.read())  # type: ignore[no-any-return]

    def finish(self) -> list[EchoResponse]:
        async def rest() -> list[EchoResponse]:
            await self._call.done_writing()
            responses = []
            while (response := await self._call.read()) is not grpc.aio.EOF:
                responses.append(response)
            return responses

        return self._run(rest())  # type: ignore[no-any-return]

    def abandon(self) -> None:
        pass  # the call is over; closing the channel cleans up the rest


class AioClient:
    """A poolkit.aio.Channel driven from an event loop in its own thread."""

    kind = "aio"

    def __init__(self) -> None:
        self._opened: list[poolkit.aio.Channel] = []
        self._loop = LoopThread("telemetry-aio-loop", RUN_LIMIT)

    def run(self, coroutine: Any) -> Any:
        return self._loop.run(coroutine, RUN_LIMIT)

    def open(self, target: str | Sequence[str], config: PoolConfig) -> None:
        async def open_channel() -> poolkit.aio.Channel:
            return poolkit.aio.insecure_channel(target, config=config)

        self.channel = self.run(open_channel())
        self._opened.append(self.channel)
        self.stub = EchoStub(self.channel)

    def call(
        self,
        shape: str,
        request: EchoRequest = REQUEST,
        *,
        metadata: Metadata = None,
        parent: otel_context.Context | None = None,
    ) -> list[EchoResponse]:
        async def call() -> list[EchoResponse]:
            with attached(parent):
                return await _aio_call(self.stub, shape, request, metadata)

        return self.run(call())  # type: ignore[no-any-return]

    def unregistered_unary(self, request: EchoRequest = REQUEST) -> EchoResponse:
        async def call() -> EchoResponse:
            unary = self.channel.unary_unary(
                f"/{full('Unary')}",
                request_serializer=EchoRequest.SerializeToString,
                response_deserializer=EchoResponse.FromString,
            )
            return await unary(request, timeout=CALL_TIMEOUT)  # type: ignore[no-any-return]

        return self.run(call())  # type: ignore[no-any-return]

    def bidi(self) -> Bidi:
        return AioBidi(self)

    def describe(self) -> dict[str, Any]:
        async def describe() -> dict[str, Any]:
            return self.channel.describe()

        return self.run(describe())  # type: ignore[no-any-return]

    def shutdown(self) -> None:
        self._loop.stop(self._opened)


@pytest.fixture(params=KINDS)
def client(request: pytest.FixtureRequest) -> Iterator[Client]:
    """One blocking way to drive a poolkit channel of either kind; the test opens it."""
    driver: Client = SyncClient() if request.param == "sync" else AioClient()
    yield driver
    driver.shutdown()


def settle(client: Client) -> None:
    """Wait until the channel has nothing in flight: every call has been accounted for."""
    wait_until(lambda: client.describe()["in_flight"] == 0, lambda: f"in-flight to return to 0: {client.describe()}")


# -- providers and servers ------------------------------------------------------------------


@pytest.fixture
def otel(request: pytest.FixtureRequest) -> Iterator[Telemetry]:
    """SDK providers for this test alone; parametrize indirectly with a value of
    OTEL_SEMCONV_STABILITY_OPT_IN ("rpc", "rpc/dup") to set it (default: unset)."""
    with installed(getattr(request, "param", None)) as telemetry:
        yield telemetry


@pytest.fixture
def echo() -> Iterator[Callable[..., EchoServers]]:
    """Starts in-process echo servers; stops them after the test."""
    started: list[EchoServers] = []

    def start(count: int = 1) -> EchoServers:
        servers = start_echo_servers(count)
        started.append(servers)
        return servers

    yield start
    for servers in started:
        servers.stop()


@pytest.fixture
def recording() -> Iterator[Callable[[], RecordingServer]]:
    """Starts servers that record the metadata of every call; stops them after the test."""
    started: list[RecordingServer] = []

    def start() -> RecordingServer:
        server = RecordingServer(f"recording-{len(started)}")
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def finished(otel: Telemetry, name: str, count: int = 1) -> list[ReadableSpan]:
    """The spans named `name`, once `count` of them have ended, in the order they started."""
    wait_until(
        lambda: len(otel.spans(name)) >= count,
        lambda: f"{count} span(s) named {name!r}; finished: {[span.name for span in otel.spans()]}",
    )
    return sorted(otel.spans(name), key=lambda span: span.start_time or 0)


def only_span(otel: Telemetry, client: Client, name: str) -> ReadableSpan:
    """The one span named `name`, once the channel has nothing in flight."""
    finished(otel, name)
    settle(client)
    spans = otel.spans(name)
    assert len(spans) == 1, [span.to_json() for span in spans]
    return spans[0]


def attempt_spans(otel: Telemetry) -> list[ReadableSpan]:
    return [span for span in otel.spans() if span.name.startswith("Attempt.")]


def call_attributes(method: str, answered: EchoServer | RecordingServer, *, code: int = 0, attempt: int = 1) -> dict:
    """A call span's default attributes, for a call answered by `answered` on 127.0.0.1."""
    return {
        "rpc.system": "grpc",
        "rpc.service": ECHO_SERVICE,
        "rpc.method": method,
        "rpc.grpc.status_code": code,
        "server.address": "127.0.0.1",
        "server.port": answered.port,
        "network.peer.address": "127.0.0.1",
        "network.peer.port": answered.port,
        "poolkit.endpoint": answered.address,
        "poolkit.attempt": attempt,
    }


def caller_span(otel: Telemetry) -> tuple[trace.Span, otel_context.Context]:
    """A span of the test's own, and a context in which it is the current span."""
    span = otel.tracer.start_span("caller")
    return span, trace.set_span_in_context(span)


def points(otel: Telemetry, name: str, **attributes: Any) -> list[Point]:
    """The data points of metric `name` whose attributes include `attributes`."""
    return [
        point
        for point in otel.points(name)
        if all(point.attributes.get(key) == value for key, value in attributes.items())
    ]


def histogram_counts(otel: Telemetry, name: str, **attributes: Any) -> dict[str, int]:
    """Recorded values of a duration histogram by `grpc.status` (the points matching `attributes`)."""
    return {point.attributes["grpc.status"]: point.point.count for point in points(otel, name, **attributes)}


# -- 1. one span per call -------------------------------------------------------------------


@pytest.mark.parametrize(("client", "shape"), ALL_SHAPES, indirect=["client"])
def test_call_has_one_client_span(
    otel: Telemetry, echo: Callable[..., EchoServers], client: Client, shape: str
) -> None:
    """A successful call of any kind: one CLIENT span named after the full method, a
    child of the caller's current span, with the RPC attributes of the endpoint that
    answered, status UNSET, and no attempt spans; and one call.duration, OK."""
    (server,) = echo(1)
    client.open(server.address, pool_config())
    method = METHOD_OF[shape]
    caller, parent = caller_span(otel)

    responses = client.call(shape, parent=parent)
    caller.end()

    assert responses
    span = only_span(otel, client, full(method))
    assert span.kind is SpanKind.CLIENT
    assert span.parent is not None
    assert span.parent.span_id == caller.get_span_context().span_id
    assert span.context.trace_id == caller.get_span_context().trace_id
    assert dict(span.attributes or {}) == call_attributes(method, server)
    assert span.status.status_code is StatusCode.UNSET
    assert attempt_spans(otel) == []
    wait_until(lambda: histogram_counts(otel, CALL_DURATION) == {"OK": 1}, "one call.duration, OK")


@pytest.mark.parametrize(("client", "shape"), ALL_SHAPES, indirect=["client"])
def test_server_error_sets_the_span_status(
    otel: Telemetry, echo: Callable[..., EchoServers], client: Client, shape: str
) -> None:
    """A call the server fails with NOT_FOUND (after reading its requests): its span's
    status is ERROR with the server's details, and `rpc.grpc.status_code` is 5."""
    (server,) = echo(1)
    client.open(server.address, pool_config())
    method = METHOD_OF[shape]
    details = "no such thing"

    with pytest.raises(grpc.RpcError) as raised:
        client.call(shape, EchoRequest(payload=b"x", fail_code=NOT_FOUND.value[0], fail_details=details))

    assert raised.value.code() is NOT_FOUND
    span = only_span(otel, client, full(method))
    assert span.kind is SpanKind.CLIENT
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == details
    assert dict(span.attributes or {}) == call_attributes(method, server, code=NOT_FOUND.value[0])
    assert attempt_spans(otel) == []


# -- 2. a stream's span lasts as long as the stream ----------------------------------------


def test_stream_span_ends_when_the_stream_ends(
    otel: Telemetry, echo: Callable[..., EchoServers], client: Client
) -> None:
    """A bidirectional stream still open after a message each way has no finished span;
    once the caller half-closes and the server ends it, the span ends, OK."""
    (server,) = echo(1)
    client.open(server.address, pool_config())
    stream = client.bidi()

    stream.send(EchoRequest(payload=b"first"))
    assert stream.receive().payload == b"first"
    assert otel.spans(full("BidiStream")) == []  # open: nothing ended yet
    stream.send(EchoRequest(payload=b"second"))
    rest = stream.finish()

    assert [response.payload for response in rest] == [b"second"]
    span = only_span(otel, client, full("BidiStream"))
    assert span.status.status_code is StatusCode.UNSET
    assert dict(span.attributes or {}) == call_attributes("BidiStream", server)


def test_stream_failing_midway_ends_its_span_with_the_error(
    otel: Telemetry, echo: Callable[..., EchoServers], client: Client
) -> None:
    """A stream the server ends with an error after a first answer: the span's status is
    the stream's end, not its start."""
    (server,) = echo(1)
    client.open(server.address, pool_config())
    stream = client.bidi()
    details = "the second message was refused"

    stream.send(EchoRequest(payload=b"first"))
    assert stream.receive().payload == b"first"
    stream.send(EchoRequest(payload=b"second", fail_code=NOT_FOUND.value[0], fail_details=details))
    with pytest.raises(grpc.RpcError) as raised:
        stream.receive()
    stream.abandon()

    assert raised.value.code() is NOT_FOUND
    span = only_span(otel, client, full("BidiStream"))
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == details
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == NOT_FOUND.value[0]


# -- 3. a retried call: a span per attempt, under the call's ---------------------------------


def retry_once_elsewhere(
    client: Client, recording: Callable[[], RecordingServer], shape: str
) -> tuple[RecordingServer, RecordingServer]:
    """A call of `shape` that fails with UNAVAILABLE on a first endpoint and is sent again
    to the other, which answers; the two servers."""
    first, other = recording(), recording()
    weights = {first.address: HEAVY}
    client.open([first.address, other.address], pool_config(weights=weights, retry=IDEMPOTENT))
    first.fail_next(1)
    client.call(shape)
    return first, other


def assert_retried_once(
    otel: Telemetry, client: Client, method: str, first: RecordingServer, other: RecordingServer
) -> None:
    """One CLIENT span (attempt 2, the answering endpoint, OK) ending after two INTERNAL
    children named Attempt.<method>, in order, the first failed; every attempt carried
    the call span's trace context; one call, OK, in call.duration."""
    call_span = finished(otel, full(method))[0]
    attempts = finished(otel, attempt_name(method), 2)
    settle(client)
    assert len(otel.spans(full(method))) == 1
    assert len(attempt_spans(otel)) == 2

    call_context = call_span.context
    assert call_span.kind is SpanKind.CLIENT
    assert call_span.status.status_code is StatusCode.UNSET
    assert dict(call_span.attributes or {}) == call_attributes(method, other, attempt=2)
    for number, (attempt, server, code) in enumerate(((attempts[0], first, 14), (attempts[1], other, 0)), 1):
        assert attempt.kind is SpanKind.INTERNAL
        assert attempt.parent is not None
        assert attempt.parent.span_id == call_context.span_id
        assert attempt.context.trace_id == call_context.trace_id
        attributes = dict(attempt.attributes or {})
        assert attributes["poolkit.attempt"] == number
        assert attributes["network.peer.address"] == "127.0.0.1"
        assert attributes["network.peer.port"] == server.port
        assert attributes["poolkit.endpoint"] == server.address
        assert attributes["rpc.grpc.status_code"] == code
    assert attempts[0].status.status_code is StatusCode.ERROR
    assert attempts[1].status.status_code is StatusCode.UNSET
    # an order, not a duration: the call is over only once its last attempt is
    assert (call_span.end_time or 0) >= (attempts[1].end_time or 0), "the call ended before its last attempt"

    received = first.received + other.received
    assert [call.method for call in received] == [method, method]
    for call in received:
        (traceparent,) = call.get("traceparent")
        trace_id, parent_id, _ = parse_traceparent(str(traceparent))
        assert (trace_id, parent_id) == (call_context.trace_id, call_context.span_id)
    wait_until(
        lambda: histogram_counts(otel, CALL_DURATION) == {"OK": 1},
        lambda: f"one call, OK, in call.duration: {histogram_counts(otel, CALL_DURATION)}",
    )


@pytest.mark.parametrize(("client", "shape"), RETRIED_SHAPES, indirect=["client"])
def test_retried_call_has_a_child_span_per_attempt(
    otel: Telemetry, recording: Callable[[], RecordingServer], client: Client, shape: str
) -> None:
    """A call that failed with UNAVAILABLE on one endpoint and succeeded on the other: a
    call span and a child span per attempt (`assert_retried_once`)."""
    first, other = retry_once_elsewhere(client, recording, shape)
    assert_retried_once(otel, client, METHOD_OF[shape], first, other)


@pytest.mark.parametrize(("client", "shape"), RETRIED_STREAM_SHAPES, indirect=["client"])
def test_retried_response_stream_ends_with_its_last_attempt(
    otel: Telemetry, recording: Callable[[], RecordingServer], client: Client, shape: str
) -> None:
    """A response stream that failed before its first message and was sent again: like
    any retried call, its span ends with the attempt that answered, OK, once that stream
    has ended."""
    first, other = retry_once_elsewhere(client, recording, shape)
    assert_retried_once(otel, client, METHOD_OF[shape], first, other)


# -- 4. the trace context reaches the server -----------------------------------------------

CALLER_METADATA = (("x-caller", "kept as sent"), ("x-caller-bin", b"\x00\x01\xff"))


def assert_caller_metadata_kept(received: Received) -> None:
    for key, value in CALLER_METADATA:
        assert received.get(key) == [value], received.metadata


@pytest.mark.parametrize(("client", "shape"), PLAIN_SHAPES, indirect=["client"])
def test_server_receives_the_call_spans_trace_context(
    otel: Telemetry, recording: Callable[[], RecordingServer], client: Client, shape: str
) -> None:
    """The server gets one `traceparent`: the call span's trace id, and the call span as
    the parent, sampled; the caller's own metadata arrives unchanged. (With `retry=None`
    a call is never sent again, so it takes grpc's own call object: the path the other
    tests, under the default policy's requeues, do not take.)"""
    server = recording()
    client.open(server.address, pool_config(retry=None))
    method = METHOD_OF[shape]

    client.call(shape, metadata=CALLER_METADATA)

    span = only_span(otel, client, full(method))
    assert dict(span.attributes or {}) == call_attributes(method, server)
    (received,) = server.received
    (traceparent,) = received.get("traceparent")
    assert parse_traceparent(str(traceparent)) == (
        span.context.trace_id,
        span.context.span_id,
        span.context.trace_flags,
    )
    assert span.context.trace_flags.sampled
    assert_caller_metadata_kept(received)


REMOTE_TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
REMOTE_SPAN_ID = 0xB7AD6B7169203331


@pytest.mark.parametrize(("client", "shape"), ALL_SHAPES, indirect=["client"])
def test_trace_context_is_propagated_without_an_sdk(
    recording: Callable[[], RecordingServer], client: Client, shape: str
) -> None:
    """With no provider installed, a current context carrying a remote span context
    still reaches the server, as that span's `traceparent`."""
    assert providers_unset()
    server = recording()
    client.open(server.address, pool_config())
    remote = SpanContext(
        trace_id=REMOTE_TRACE_ID,
        span_id=REMOTE_SPAN_ID,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )

    client.call(shape, metadata=CALLER_METADATA, parent=trace.set_span_in_context(NonRecordingSpan(remote)))

    (received,) = server.received
    assert received.get("traceparent") == [f"00-{REMOTE_TRACE_ID:032x}-{REMOTE_SPAN_ID:016x}-01"]
    assert_caller_metadata_kept(received)


@pytest.mark.parametrize(("client", "shape"), ALL_SHAPES, indirect=["client"])
def test_telemetry_off_records_and_injects_nothing(
    otel: Telemetry, recording: Callable[[], RecordingServer], client: Client, shape: str
) -> None:
    """telemetry=False: inside a caller's span, a call makes no span and no per-call
    metric, and the server gets no trace context, only the caller's metadata."""
    server = recording()
    client.open(server.address, pool_config(telemetry=False))
    caller, parent = caller_span(otel)

    client.call(shape, metadata=CALLER_METADATA, parent=parent)
    caller.end()
    settle(client)

    assert [span.name for span in otel.spans()] == ["caller"]
    (received,) = server.received
    assert received.get("traceparent") == []
    assert received.get("tracestate") == []
    assert_caller_metadata_kept(received)
    assert [point.name for point in otel.points() if point.name in PER_CALL_METRICS] == []


# -- 5. the stable RPC semantic conventions --------------------------------------------------


# The variable is a comma-separated list of opt-ins ("http,rpc" opts in to rpc too).
@pytest.mark.parametrize("otel", ["rpc", "rpc/dup", "http,rpc"], indirect=True)
@pytest.mark.parametrize("code", [OK, NOT_FOUND], ids=["ok", "not_found"])
def test_semconv_stability_opt_in(
    otel: Telemetry, echo: Callable[..., EchoServers], client: Client, code: grpc.StatusCode
) -> None:
    """OTEL_SEMCONV_STABILITY_OPT_IN=rpc: `rpc.system.name`, the full `rpc.method`,
    `rpc.response.status_code` as a name and `error.type` when failed, and none of the
    older names; rpc/dup: both, `rpc.method` taking the new value."""
    (server,) = echo(1)
    if code is not OK:
        server.fail_code = code
    client.open(server.address, pool_config())

    with pytest.raises(grpc.RpcError) if code is not OK else contextlib.nullcontext():
        client.call("unary")

    span = only_span(otel, client, full("Unary"))
    expected: dict[str, Any] = {
        "rpc.system.name": "grpc",
        "rpc.method": full("Unary"),
        "rpc.response.status_code": code.name,
        "server.address": "127.0.0.1",
        "server.port": server.port,
        "network.peer.address": "127.0.0.1",
        "network.peer.port": server.port,
        "poolkit.endpoint": server.address,
        "poolkit.attempt": 1,
    }
    if code is not OK:
        expected["error.type"] = code.name
    if os.environ[SEMCONV_ENV] == "rpc/dup":
        expected.update({"rpc.system": "grpc", "rpc.service": ECHO_SERVICE, "rpc.grpc.status_code": code.value[0]})
    assert dict(span.attributes or {}) == expected


# -- 6. gRPC's per-call metrics (A66) ----------------------------------------------------------


def test_per_call_metrics_count_attempts_and_calls(
    otel: Telemetry, echo: Callable[..., EchoServers], client: Client
) -> None:
    """One call retried once on its one endpoint: attempt.started 2; attempt.duration one
    UNAVAILABLE and one OK; call.duration one OK; each with exactly gRPC's attributes,
    the target with its default scheme, and A66's buckets."""
    (server,) = echo(1)
    client.open(server.address, pool_config(retry=IDEMPOTENT))
    server.fail_next(1)
    method, target = full("Unary"), f"dns:///{server.address}"

    client.call("unary")

    wait_until(lambda: histogram_counts(otel, CALL_DURATION) == {"OK": 1}, "the call's duration")
    settle(client)
    collected = otel.points()
    assert {point.name: point.unit for point in collected if point.name.startswith("grpc.")} == PER_CALL_METRICS

    (started,) = [point for point in collected if point.name == STARTED]
    assert isinstance(started.data, Sum)
    assert started.data.is_monotonic
    assert started.attributes == {"grpc.method": method, "grpc.target": target}
    assert started.point.value == 2

    for name, expected in ((ATTEMPT_DURATION, {"UNAVAILABLE": 1, "OK": 1}), (CALL_DURATION, {"OK": 1})):
        recorded = [point for point in collected if point.name == name]
        assert {point.attributes["grpc.status"]: point.point.count for point in recorded} == expected, name
        for point in recorded:
            assert isinstance(point.data, Histogram), name
            assert set(point.attributes) == {"grpc.method", "grpc.target", "grpc.status"}, name
            assert (point.attributes["grpc.method"], point.attributes["grpc.target"]) == (method, target)
            assert list(point.point.explicit_bounds) == A66_BUCKETS, name


def test_unregistered_method_is_counted_as_other(
    otel: Telemetry, echo: Callable[..., EchoServers], client: Client
) -> None:
    """A method made with `channel.unary_unary` and no `_registered_method` is "other" in
    the metrics (generated stubs' methods are named); its span still names it."""
    (server,) = echo(1)
    client.open(server.address, pool_config())

    client.unregistered_unary()
    client.call("unary")

    finished(otel, full("Unary"), 2)
    wait_until(lambda: len(otel.points(CALL_DURATION)) == 2, "both calls' durations")
    settle(client)
    started = {point.attributes["grpc.method"]: point.point.value for point in otel.points(STARTED)}
    assert started == {"other": 1, full("Unary"): 1}
    for name in (ATTEMPT_DURATION, CALL_DURATION):
        methods = sorted(point.attributes["grpc.method"] for point in otel.points(name))
        assert methods == sorted(["other", full("Unary")]), name


# -- 7. the pool's observables -----------------------------------------------------------------

ENDPOINT_KEYS = {"grpc.target", "poolkit.endpoint", "poolkit.source_address"}
ONE_RETRY = RetryBudget(ratio=0.0, min_per_second=0.1, window=10.0)  # a reserve of one retry per 10 s
EJECT_AT_ONCE = FailureAccrual(consecutive_failures=1, success_rate=None, ejection_min=60.0, ejection_max=60.0)


def test_pool_observables(otel: Telemetry, echo: Callable[..., EchoServers], client: Client) -> None:
    """After a retry that ejected its first endpoint and a retry the budget refused, the
    pool's gauges and counters have the right names, units, attribute keys and values:
    slots by state, calls in flight, state changes, ejections, retries, refusals, and the
    port budget, all under the target as written (it has a scheme)."""
    servers = echo(2)
    first, other = servers
    target = servers.target  # "ipv4:...": a target with a scheme stays as written
    config = pool_config(
        weights={first.address: HEAVY}, retry=IDEMPOTENT, retry_budget=ONE_RETRY, failure_accrual=EJECT_AT_ONCE
    )
    client.open(target, config)

    first.fail_next(1)
    client.call("unary")  # fails on `first`, which is ejected; the budget's one retry answers
    other.fail_next(1)
    with pytest.raises(grpc.RpcError):
        client.call("unary")  # fails on `other` (not ejected: the cap); its retry is refused
    settle(client)

    snapshots: list[list[Point]] = []

    def settled_view() -> bool:
        """Both slots READY, and the port budget (read at most once a second, for every
        channel at once) has caught up with this channel's two connections."""
        snapshots.append([point for point in otel.points() if point.attributes.get("grpc.target") == target])
        ready = {
            point.attributes["poolkit.endpoint"]: point.point.value
            for point in snapshots[-1]
            if point.name == "poolkit.slots" and point.attributes["poolkit.slot.state"] == "ready"
        }
        connections = [point.point.value for point in snapshots[-1] if point.name == "poolkit.source.connections"]
        return ready == {first.address: 1, other.address: 1} and connections == [2]

    wait_until(settled_view, lambda: f"both slots ready and counted: {snapshots[-1]}")
    collected = snapshots[-1]
    by_name: dict[str, list[Point]] = {}
    for point in collected:
        by_name.setdefault(point.name, []).append(point)
    units = {name: {point.unit for point in found} for name, found in by_name.items()}
    assert units == {
        **{name: {unit} for name, unit in PER_CALL_METRICS.items()},
        "poolkit.slots": {"{slot}"},
        "poolkit.calls.in_flight": {"{call}"},
        "poolkit.endpoint.state_changes": {"{change}"},
        "poolkit.endpoint.ejections": {"{ejection}"},
        "poolkit.retries": {"{attempt}"},
        "poolkit.retry_budget.refusals": {"{attempt}"},
        "poolkit.source.connections": {"{connection}"},
        "poolkit.source.ports_in_use": {"{port}"},
        "poolkit.source.port_range_share": {"1"},
    }

    for point in by_name["poolkit.slots"]:
        assert set(point.attributes) == {*ENDPOINT_KEYS, "poolkit.slot.state"}
        assert point.attributes["poolkit.source_address"] == "default"
        assert point.attributes["poolkit.slot.state"] in CONNECTIVITY_NAMES
    slots = Counter[str]()
    for point in by_name["poolkit.slots"]:
        slots[point.attributes["poolkit.endpoint"]] += point.point.value
    assert slots == {first.address: 1, other.address: 1}

    in_flight = {
        point.attributes["poolkit.endpoint"]: point.point.value for point in by_name["poolkit.calls.in_flight"]
    }
    assert in_flight == {first.address: 0, other.address: 0}
    for point in by_name["poolkit.calls.in_flight"]:
        assert set(point.attributes) == ENDPOINT_KEYS
        assert point.attributes["poolkit.source_address"] == "default"

    changes = by_name["poolkit.endpoint.state_changes"]
    assert all(isinstance(point.data, Sum) and point.data.is_monotonic for point in changes)
    for point in changes:
        assert set(point.attributes) == {*ENDPOINT_KEYS, "poolkit.endpoint.state"}
    entered = {
        (point.attributes["poolkit.endpoint"], point.attributes["poolkit.endpoint.state"]): point.point.value
        for point in changes
        if point.point.value
    }
    assert entered == {(first.address, "ejected"): 1}

    ejections = {
        point.attributes["poolkit.endpoint"]: point.point.value for point in by_name["poolkit.endpoint.ejections"]
    }
    assert ejections.get(first.address) == 1
    assert ejections.get(other.address, 0) == 0
    for point in by_name["poolkit.endpoint.ejections"]:
        assert set(point.attributes) == ENDPOINT_KEYS

    retries = by_name["poolkit.retries"]
    for point in retries:
        assert set(point.attributes) == {"grpc.target", "poolkit.retry.kind"}
        assert point.attributes["poolkit.retry.kind"] in {"retries", "requeues", "hedges"}
    assert {point.attributes["poolkit.retry.kind"]: point.point.value for point in retries if point.point.value} == {
        "retries": 1
    }

    (refusals,) = by_name["poolkit.retry_budget.refusals"]
    assert refusals.attributes == {"grpc.target": target}
    assert refusals.point.value == 1

    for name in ("poolkit.source.connections", "poolkit.source.ports_in_use", "poolkit.source.port_range_share"):
        assert [point.attributes for point in by_name[name]] == [
            {"grpc.target": target, "poolkit.source_address": "default"}
        ], name
    # the per-call metrics name the target the same way
    assert {point.attributes["grpc.target"] for point in by_name[STARTED]} == {target}


def test_observables_name_a_single_address_target_with_its_scheme(
    otel: Telemetry, echo: Callable[..., EchoServers], client: Client
) -> None:
    """A "host:port" target is "dns:///host:port" in the pool's metrics too."""
    (server,) = echo(1)
    client.open(server.address, pool_config())
    client.call("unary")
    settle(client)
    target = f"dns:///{server.address}"

    names = ("poolkit.slots", "poolkit.calls.in_flight", "poolkit.source.connections", STARTED)
    snapshots: list[dict[str, set[str]]] = []

    def targets_seen() -> bool:
        """The targets naming this channel's server, by metric (the port budget is read
        at most once a second, so it may take that long to show a new channel)."""
        snapshots.append(
            {
                name: {
                    point.attributes["grpc.target"]
                    for point in otel.points(name)
                    if server.address in point.attributes.get("grpc.target", "")
                }
                for name in names
            }
        )
        return all(snapshots[-1].values())

    wait_until(targets_seen, lambda: f"every metric to name the channel: {snapshots[-1]}")
    assert snapshots[-1] == {name: {target} for name in names}


# -- 8. events: an ejection, a refused retry ----------------------------------------------------


def test_ejection_is_an_event_of_the_call(otel: Telemetry, echo: Callable[..., EchoServers], client: Client) -> None:
    """A call whose failure makes failure accrual eject its endpoint has an event
    `poolkit.endpoint.ejected` naming that endpoint."""
    (server,) = echo(1)
    server.fail_code = UNAVAILABLE
    client.open(server.address, pool_config(failure_accrual=EJECT_AT_ONCE, max_ejected_share=1.0))

    with pytest.raises(grpc.RpcError) as raised:
        client.call("unary")

    assert raised.value.code() is UNAVAILABLE
    span = only_span(otel, client, full("Unary"))
    assert [event.name for event in span.events] == ["poolkit.endpoint.ejected"]
    assert span.events[0].attributes is not None
    assert span.events[0].attributes["poolkit.endpoint"] == server.address
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == FAIL_DETAILS
    assert client.describe()["endpoints"][0]["status"] == "ejected"


def test_refused_retry_is_an_event_of_the_call(
    otel: Telemetry, echo: Callable[..., EchoServers], client: Client
) -> None:
    """A retryable failure whose retry the budget refuses: the call span has the event
    `poolkit.retry_budget.exhausted` (kind "retries"), made one attempt, and has no
    attempt spans."""
    (server,) = echo(1)
    no_budget = RetryBudget(ratio=0.0, min_per_second=0.0)
    client.open(server.address, pool_config(retry=IDEMPOTENT, retry_budget=no_budget))
    server.fail_next(1)

    with pytest.raises(grpc.RpcError) as raised:
        client.call("unary")

    assert raised.value.code() is UNAVAILABLE
    span = only_span(otel, client, full("Unary"))
    events = [(event.name, dict(event.attributes or {})) for event in span.events]
    assert events == [("poolkit.retry_budget.exhausted", {"poolkit.retry.kind": "retries"})]
    assert span.attributes is not None
    assert span.attributes["poolkit.attempt"] == 1
    assert span.status.status_code is StatusCode.ERROR
    assert attempt_spans(otel) == []
    assert client.describe()["retry_budget"]["refused"] == 1


# -- 9. source binding ---------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="127.0.0.2 is local on Linux loopback")
def test_bound_source_address_is_an_attribute(
    otel: Telemetry, echo: Callable[..., EchoServers], client: Client
) -> None:
    """A channel bound to a source address names it on the call span
    (`poolkit.source_address`) and on its slots."""
    (server,) = echo(1)
    client.open(server.address, pool_config(source_addresses=("127.0.0.2",)))

    client.call("unary")

    span = only_span(otel, client, full("Unary"))
    assert dict(span.attributes or {}) == {**call_attributes("Unary", server), "poolkit.source_address": "127.0.0.2"}
    target = f"dns:///{server.address}"
    wait_until(
        lambda: bool(points(otel, "poolkit.slots", **{"grpc.target": target, "poolkit.slot.state": "ready"})),
        "a ready slot",
    )
    sources = {
        point.attributes["poolkit.source_address"] for point in points(otel, "poolkit.slots", **{"grpc.target": target})
    }
    assert sources == {"127.0.0.2"}


# -- 10. no secrets --------------------------------------------------------------------------------


def test_no_metadata_value_or_message_body_is_recorded(
    otel: Telemetry, echo: Callable[..., EchoServers], client: Client
) -> None:
    """A secret sent in metadata (text and binary) and in every request, over calls of
    each kind, a retried one and a failed one, appears in no exported span or metric."""
    (server,) = echo(1)
    client.open(server.address, pool_config(retry=IDEMPOTENT))
    secret = f"poolkit-secret-{uuid.uuid4().hex}"
    metadata = (("x-secret", secret), ("x-secret-bin", secret.encode()))
    request = EchoRequest(payload=secret.encode())

    for shape in ("unary", "server_stream", "client_stream", "bidi"):
        client.call(shape, request, metadata=metadata)
    server.fail_next(1)
    client.call("unary", request, metadata=metadata)  # retried
    server.fail_code = NOT_FOUND
    with pytest.raises(grpc.RpcError):
        client.call("unary", request, metadata=metadata)

    finished(otel, full("Unary"), 3)
    finished(otel, attempt_name("Unary"), 2)
    settle(client)
    spans, metrics = otel.spans_json(), otel.metrics_json()
    assert full("BidiStream") in spans  # what was searched is really there
    assert CALL_DURATION in metrics
    assert secret not in spans
    assert secret not in metrics


# -- 11. the fixture itself -------------------------------------------------------------------------


def test_providers_are_unset_after_a_test() -> None:
    """`installed()` leaves the process as it found it: no provider, so the rest of the
    suite runs poolkit's no-SDK path."""
    assert providers_unset()
    with installed() as telemetry:
        assert trace.get_tracer_provider() is telemetry.tracer_provider
        assert not providers_unset()
    assert providers_unset()
    assert not isinstance(trace.get_tracer_provider(), type(telemetry.tracer_provider))
