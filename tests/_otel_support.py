"""OpenTelemetry for one test: SDK providers installed as the process's global ones, and
put back to unset afterwards; and an echo server that records the metadata of every
call it receives, failed attempts included.

OpenTelemetry's global providers can be set once per process, and the rest of the suite
runs with none (poolkit's fast path). So `installed()` resets the API's private state
afterwards, as opentelemetry-python's own test utilities (`reset_trace_globals`,
`reset_metrics_globals`) do; poolkit looks the provider up on every call and starts
afresh when it changes, so each test sees only its own spans and metrics.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Self

import grpc
import opentelemetry.metrics._internal as metrics_state
import opentelemetry.trace as trace_state
import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from poolkit.testing import EchoRequest, EchoResponse, echo_pb2_grpc

SEMCONV_ENV = "OTEL_SEMCONV_STABILITY_OPT_IN"


def providers_unset() -> bool:
    """Whether no tracer or meter provider is installed (the API's proxies answer)."""
    return trace_state._TRACER_PROVIDER is None and metrics_state._METER_PROVIDER is None


def reset_globals() -> None:
    """Back to a process where no provider was ever set. The proxies are replaced too, as
    opentelemetry-python's test utilities do: the old ones forward to the provider that
    was set, and anything still holding them would keep recording into it."""
    trace_state._TRACER_PROVIDER_SET_ONCE = Once()
    trace_state._TRACER_PROVIDER = None
    trace_state._PROXY_TRACER_PROVIDER = trace_state.ProxyTracerProvider()
    metrics_state._METER_PROVIDER_SET_ONCE = Once()
    metrics_state._METER_PROVIDER = None
    metrics_state._PROXY_METER_PROVIDER = metrics_state._ProxyMeterProvider()


@dataclass(frozen=True)
class Point:
    """One data point of one metric, flattened."""

    name: str
    unit: str
    data: Any  # the metric's data: Sum, Gauge or Histogram (its type, temporality, monotonicity)
    attributes: dict[str, Any]
    point: Any  # NumberDataPoint (`value`) or HistogramDataPoint (`count`, `explicit_bounds`)


class Telemetry:
    """The SDK providers of one test and what they recorded."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    @property
    def tracer(self) -> trace.Tracer:
        """A tracer for the test's own spans (a caller's span, say)."""
        return self.tracer_provider.get_tracer("poolkit-tests")

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        """Spans finished so far (named `name`, if given), in the order they ended."""
        finished = list(self.exporter.get_finished_spans())
        return [span for span in finished if name is None or span.name == name]

    def spans_json(self) -> str:
        return "\n".join(span.to_json() for span in self.spans())

    def points(self, name: str | None = None) -> list[Point]:
        """Every data point collected now (of the metric `name`, if given)."""
        data = self.reader.get_metrics_data()
        if data is None:
            return []
        return [
            Point(metric.name, metric.unit, metric.data, dict(point.attributes or {}), point)
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if name is None or metric.name == name
            for point in metric.data.data_points
        ]

    def metrics_json(self) -> str:
        data = self.reader.get_metrics_data()
        return "" if data is None else data.to_json()

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@contextlib.contextmanager
def installed(semconv: str | None = None) -> Iterator[Telemetry]:
    """SDK tracer and meter providers, in memory, as the global ones for the block;
    `OTEL_SEMCONV_STABILITY_OPT_IN` set to `semconv` (None: unset) for channels made in
    it (poolkit reads it when a channel is built)."""
    assert providers_unset(), "an OpenTelemetry provider is already installed: the suite must run with none"
    telemetry = Telemetry()
    with pytest.MonkeyPatch.context() as patch:
        if semconv is None:
            patch.delenv(SEMCONV_ENV, raising=False)
        else:
            patch.setenv(SEMCONV_ENV, semconv)
        trace.set_tracer_provider(telemetry.tracer_provider)
        metrics.set_meter_provider(telemetry.meter_provider)
        try:
            yield telemetry
        finally:
            reset_globals()
            telemetry.shutdown()


def parse_traceparent(value: str) -> tuple[int, int, int]:
    """W3C `traceparent` ("00-<trace id>-<parent span id>-<flags>") as (trace id, span id, flags)."""
    version, trace_id, span_id, flags = value.split("-")
    assert version == "00", value
    assert (len(trace_id), len(span_id), len(flags)) == (32, 16, 2), value
    return int(trace_id, 16), int(span_id, 16), int(flags, 16)


# -- a server that records what every call carried ------------------------------------------


@dataclass(frozen=True)
class Received:
    """One call as the server saw it: its method and invocation metadata (in order,
    binary values as bytes)."""

    method: str
    metadata: tuple[tuple[str, str | bytes], ...]

    def get(self, key: str) -> list[str | bytes]:
        return [value for name, value in self.metadata if name == key]


class _RecordingServicer(echo_pb2_grpc.EchoServicer):
    def __init__(self, server_id: str) -> None:
        self.server_id = server_id
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self.failures: tuple[int, grpc.StatusCode] = (0, grpc.StatusCode.UNAVAILABLE)

    def _record(self, method: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.received.append(Received(method, tuple((k, v) for k, v in context.invocation_metadata())))
            remaining, code = self.failures
            if remaining:
                self.failures = (remaining - 1, code)
        if remaining:
            context.abort(code, "recording server: failing on purpose")

    def _reply(self, payload: bytes, index: int = 0) -> EchoResponse:
        return EchoResponse(payload=payload, server_id=self.server_id, index=index)

    def Unary(self, request: EchoRequest, context: grpc.ServicerContext) -> EchoResponse:
        self._record("Unary", context)
        return self._reply(request.payload)

    def ServerStream(self, request: EchoRequest, context: grpc.ServicerContext) -> Iterator[EchoResponse]:
        self._record("ServerStream", context)
        for index in range(max(request.repeat, 1)):
            yield self._reply(request.payload, index)

    # A call with a request stream is recorded (and failed) once the stream is read to its
    # end: failing it earlier races grpc.aio's request writer, which may end the call
    # INTERNAL instead of with the code sent. So these answer only after the half-close.

    def ClientStream(self, request_iterator: Iterator[EchoRequest], context: grpc.ServicerContext) -> EchoResponse:
        requests = list(request_iterator)
        self._record("ClientStream", context)
        return self._reply(b"".join(request.payload for request in requests))

    def BidiStream(
        self, request_iterator: Iterator[EchoRequest], context: grpc.ServicerContext
    ) -> Iterator[EchoResponse]:
        requests = list(request_iterator)
        self._record("BidiStream", context)
        for index, request in enumerate(requests):
            yield self._reply(request.payload, index)


class RecordingServer:
    """An echo server on 127.0.0.1 (a port the kernel chooses) that records the method and
    the metadata of every call it receives; `fail_next` fails the next calls, after
    recording them."""

    def __init__(self, server_id: str = "recording") -> None:
        self._servicer = _RecordingServicer(server_id)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.so_reuseport", 0)])
        echo_pb2_grpc.add_EchoServicer_to_server(self._servicer, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.server_id = server_id
        self._server.start()

    @property
    def received(self) -> list[Received]:
        with self._servicer.lock:
            return list(self._servicer.received)

    def fail_next(self, count: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        with self._servicer.lock:
            self._servicer.failures = (count, code)

    def stop(self) -> None:
        self._server.stop(None).wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RecordingServer {self.address} received={len(self.received)}>"
