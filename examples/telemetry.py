"""OpenTelemetry in a few lines: install the SDK's providers, make calls inside a span of
your own, and poolkit's spans, the trace context the server receives, and gRPC's metrics
follow. Spans and metrics go to the console, or to an OTLP collector when
OTEL_EXPORTER_OTLP_ENDPOINT is set (that needs `pip install opentelemetry-exporter-otlp`)."""

import os

import grpc
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

import poolkit
from poolkit import PoolConfig, RetryPolicy
from poolkit.testing import EchoRequest, EchoStub, start_echo_servers

UNARY = "/poolkit.echo.v1.Echo/Unary"


def one_line(span: ReadableSpan) -> str:
    """A span on one line (the console exporter's default is a page of JSON per span)."""
    parent = f"{span.parent.span_id:016x}" if span.parent else "-"
    attributes = span.attributes or {}
    where = attributes.get("poolkit.endpoint", "")
    status = span.status.status_code.name
    return f"span {span.name:42} {span.context.span_id:016x} parent {parent} {where} {status}\n"


def metric_names(data: MetricsData) -> str:
    return "".join(
        f"metric {metric.name} ({metric.unit}): {len(metric.data.data_points)} series\n"
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    )


def exporters() -> tuple[SpanExporter, MetricExporter]:
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter,
        )
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(), OTLPMetricExporter()
    return ConsoleSpanExporter(formatter=one_line), ConsoleMetricExporter(formatter=metric_names)


def main() -> None:
    resource = Resource.create({"service.name": "poolkit-example"})
    span_exporter, metric_exporter = exporters()
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(tracer_provider)
    reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=60_000)
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    metrics.set_meter_provider(meter_provider)

    tracer = trace.get_tracer("example")
    config = PoolConfig(method_retry={UNARY: RetryPolicy(idempotent=True)}, health_check=None)
    with start_echo_servers(2) as servers, poolkit.insecure_channel(servers.target, config=config) as channel:
        stub = EchoStub(channel)
        with tracer.start_as_current_span("checkout") as checkout:
            reply = stub.Unary(EchoRequest(payload=b"hi"), timeout=2.0)
            trace_id = f"{checkout.get_span_context().trace_id:032x}"
            print("the server received traceparent", reply.metadata["traceparent"])
            print("its trace id is the caller's:", reply.metadata["traceparent"].split("-")[1] == trace_id)
            for server in servers:
                server.fail_next(1, grpc.StatusCode.UNAVAILABLE)
            stub.Unary(EchoRequest(payload=b"again"), timeout=2.0)  # retried: one call span, attempt spans
        meter_provider.shutdown()  # exports the metrics, the pool's too while the channel is open
    tracer_provider.shutdown()  # exports the spans


if __name__ == "__main__":
    main()
