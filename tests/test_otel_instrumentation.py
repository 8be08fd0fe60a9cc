"""poolkit next to opentelemetry-instrumentation-grpc's client instrumentation, which
wraps every grpc channel made while it is on (poolkit's connections included).

With poolkit's telemetry on, poolkit's spans are the only client spans and the server
gets one `traceparent`, poolkit's: poolkit marks its attempts with OpenTelemetry's
suppress-instrumentation flag, which the instrumentation honours. With
`PoolConfig(telemetry=False)`, the instrumentation's spans are the ones, and every call
kind still works over its wrapped channels (a response stream it hands back as a bare
generator included), sync and asyncio.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from _otel_support import Telemetry, installed, parse_traceparent
from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcInstrumentorClient

import poolkit
import poolkit.aio
from poolkit.testing import EchoRequest, EchoResponse, EchoStub, start_echo_servers

POOLKIT_SCOPE = "poolkit"
INSTRUMENTATION_SCOPE = "opentelemetry.instrumentation.grpc"
KINDS = ("Unary", "ServerStream", "ClientStream", "BidiStream")


def _config(telemetry: bool) -> poolkit.PoolConfig:
    return poolkit.PoolConfig(telemetry=telemetry, health_check=None)


def _requests() -> list[EchoRequest]:
    return [EchoRequest(payload=b"a"), EchoRequest(payload=b"b")]


def _sync_calls(stub: EchoStub) -> dict[str, list[EchoResponse]]:
    """One call of each kind; the responses each gave."""
    return {
        "Unary": [stub.Unary(EchoRequest(payload=b"u"), timeout=5)],
        "ServerStream": list(stub.ServerStream(EchoRequest(payload=b"s", repeat=2), timeout=5)),
        "ClientStream": [stub.ClientStream(iter(_requests()), timeout=5)],
        "BidiStream": list(stub.BidiStream(iter(_requests()), timeout=5)),
    }


async def _aio_calls(stub: EchoStub) -> dict[str, list[EchoResponse]]:
    return {
        "Unary": [await stub.Unary(EchoRequest(payload=b"u"), timeout=5)],
        "ServerStream": [r async for r in stub.ServerStream(EchoRequest(payload=b"s", repeat=2), timeout=5)],
        "ClientStream": [await stub.ClientStream(iter(_requests()), timeout=5)],
        "BidiStream": [r async for r in stub.BidiStream(iter(_requests()), timeout=5)],
    }


@pytest.fixture
def instrumented(request: pytest.FixtureRequest) -> Iterator[Telemetry]:
    """SDK providers installed and the instrumentation on (sync or asyncio, by the test's
    `flavour` parameter) for one test; both undone after."""
    instrumentor = (
        GrpcAioInstrumentorClient() if request.node.callspec.params["flavour"] == "aio" else GrpcInstrumentorClient()
    )
    with installed() as telemetry:
        instrumentor.instrument()
        try:
            yield telemetry
        finally:
            instrumentor.uninstrument()


def _calls(flavour: str, telemetry_on: bool, target: str) -> dict[str, list[EchoResponse]]:
    if flavour == "sync":
        with poolkit.insecure_channel(target, config=_config(telemetry_on)) as channel:
            return _sync_calls(EchoStub(channel))

    async def run() -> dict[str, list[EchoResponse]]:
        async with poolkit.aio.insecure_channel(target, config=_config(telemetry_on)) as channel:
            return await _aio_calls(EchoStub(channel))

    return asyncio.run(run())


@pytest.mark.parametrize("flavour", ["sync", "aio"])
def test_poolkit_spans_only_and_one_traceparent(flavour: str, instrumented: Telemetry) -> None:
    with start_echo_servers(1) as servers:
        replies = _calls(flavour, True, servers.target)
    spans = instrumented.spans()
    assert {span.instrumentation_scope.name for span in spans} == {POOLKIT_SCOPE}
    by_name = {span.name: span for span in spans}
    assert sorted(by_name) == sorted(f"poolkit.echo.v1.Echo/{kind}" for kind in KINDS)
    assert len(spans) == len(KINDS)
    for kind, responses in replies.items():
        assert responses, kind
        header = responses[0].metadata["traceparent"]  # the echo server returns what it received
        trace_id, parent_id, _ = parse_traceparent(header)
        span = by_name[f"poolkit.echo.v1.Echo/{kind}"]
        assert (trace_id, parent_id) == (span.context.trace_id, span.context.span_id), kind


@pytest.mark.parametrize("flavour", ["sync", "aio"])
def test_telemetry_off_leaves_the_instrumentation_its_spans(flavour: str, instrumented: Telemetry) -> None:
    with start_echo_servers(1) as servers:
        replies = _calls(flavour, False, servers.target)
    assert [len(replies[kind]) for kind in KINDS] == [1, 2, 1, 2]
    spans = instrumented.spans()
    assert spans
    assert {span.instrumentation_scope.name for span in spans} == {INSTRUMENTATION_SCOPE}
    unary = [span for span in spans if span.name == "/poolkit.echo.v1.Echo/Unary"]
    assert len(unary) == 1
    trace_id, parent_id, _ = parse_traceparent(replies["Unary"][0].metadata["traceparent"])
    assert (trace_id, parent_id) == (unary[0].context.trace_id, unary[0].context.span_id)
