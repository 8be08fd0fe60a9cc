"""poolkit's OpenTelemetry: spans, trace propagation and metrics, through
opentelemetry-api only. The application brings the SDK and its exporters; with none
installed, a call costs one look at the API's globals and the current context.

Per call (`start_call`, made before the pick so the span covers retries and backoff):

- a CLIENT span named `package.Service/Method` with the RPC semantic-convention
  attributes (`OTEL_SEMCONV_STABILITY_OPT_IN=rpc` or `rpc/dup`, read when a channel is
  built, switch to or add the newer names), the endpoint that answered, and
  `poolkit.attempt`; when the call goes out more than once, one INTERNAL child span per
  attempt (`Attempt.package.Service/Method`); events for a retry the budget refused and
  for an ejection of an endpoint the call went to;
- the trace context, through the global propagator, in the outgoing metadata (also with
  no SDK, when the current context carries one);
- gRPC's per-call metrics (A66): `grpc.client.attempt.started`,
  `grpc.client.attempt.duration`, `grpc.client.call.duration`.

Per channel, read when the application's metric reader collects: slots by state, calls
in flight, endpoint state changes and ejections, retries and budget refusals, and the
port budget per source address (`poolkit.source.*`).

Metadata values and message bodies are never recorded.

The tracer and instruments are made from whichever provider is installed when a call
needs them, and made again if it changes, so a provider set after poolkit is imported
(or replaced, as tests do) is followed.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import grpc
import opentelemetry.metrics._internal as _metrics_state
import opentelemetry.trace as _trace_state
from opentelemetry import context, propagate, trace
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, Context
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.propagators.textmap import Setter
from opentelemetry.trace import SpanKind, Status, StatusCode

from ._target import split_host_port, split_target
from ._version import __version__

if TYPE_CHECKING:
    from ._call import Attempt as CallAttempt
    from ._pool import Route
    from ._shell import Pooled

_OK = grpc.StatusCode.OK
_UNBOUND = "default"  # poolkit.source_address of connections not bound to a source

# gRPC's latency buckets for its duration histograms (A66), in seconds.
LATENCY_BUCKETS = (
    0.0, 0.00001, 0.00005, 0.0001, 0.0003, 0.0006, 0.0008, 0.001, 0.002, 0.003, 0.004, 0.005,
    0.006, 0.008, 0.01, 0.013, 0.016, 0.02, 0.025, 0.03, 0.04, 0.05, 0.065, 0.08, 0.1, 0.13,
    0.16, 0.2, 0.25, 0.3, 0.4, 0.5, 0.65, 0.8, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0,
)  # fmt: skip

# Three port gauges read the same budget in one collection: it is read once per this many seconds.
_BUDGET_REUSE = 1.0


# -- the semantic conventions ------------------------------------------------------------


class Semconv:
    """Which RPC attribute names to emit: the experimental ones (the default), the
    stable ones (`OTEL_SEMCONV_STABILITY_OPT_IN=rpc`) or both (`rpc/dup`)."""

    __slots__ = ("new", "old")

    def __init__(self, opt_in: str | None = None) -> None:
        if opt_in is None:
            opt_in = os.environ.get("OTEL_SEMCONV_STABILITY_OPT_IN", "")
        values = {value.strip() for value in opt_in.split(",")}
        dup = "rpc/dup" in values
        self.new = dup or "rpc" in values
        self.old = dup or not self.new

    def status(self, code: grpc.StatusCode) -> dict[str, Any]:
        attributes: dict[str, Any] = {}
        if self.old:
            attributes["rpc.grpc.status_code"] = code.value[0]
        if self.new:
            attributes["rpc.response.status_code"] = code.name
            if code is not _OK:
                attributes["error.type"] = code.name
        return attributes


def canonical_target(target: str) -> str:
    """The target as gRPC's metrics name it: with its scheme ("dns:///" when it has none)."""
    if "://" in target or target.startswith(("ipv4:", "ipv6:", "unix:")) or "," in target:
        return target
    return f"dns:///{target}"


def _server_of(target: str) -> tuple[str, int] | None:
    """The one server (host, port) a target names, or None when it names several."""
    try:
        specs = split_target(target)
    except ValueError:
        return None
    if len(specs) != 1:
        return None
    return split_host_port(specs[0][0], target)


class MethodTelemetry:
    """What every call of one method on one channel reports, worked out once."""

    __slots__ = (
        "attempt_name",
        "by_status",
        "metric_attributes",
        "name",
        "semconv",
        "server",
        "span_attributes",
    )

    def __init__(self, method: str, target: str, registered: bool | None, semconv: Semconv) -> None:
        self.name = name = method[1:]
        self.attempt_name = f"Attempt.{name}"
        self.semconv = semconv
        service, _, short = name.rpartition("/")
        attributes: dict[str, Any] = {}
        if semconv.old:
            attributes.update({"rpc.system": "grpc", "rpc.service": service, "rpc.method": short})
        if semconv.new:  # in rpc/dup, rpc.method takes the stable (full) value
            attributes.update({"rpc.system.name": "grpc", "rpc.method": name})
        self.server = _server_of(target)
        if self.server is not None:
            attributes["server.address"], attributes["server.port"] = self.server
        self.span_attributes = attributes
        # gRPC's metrics name a method only when it is registered (generated stubs):
        # arbitrary names from generic callers would explode the series.
        self.metric_attributes = {
            "grpc.method": name if registered else "other",
            "grpc.target": canonical_target(target),
        }
        self.by_status = {code: {**self.metric_attributes, "grpc.status": code.name} for code in grpc.StatusCode}


# -- providers and instruments -------------------------------------------------------------


class _Meters:
    """The per-call instruments of one meter provider (and its pool instruments)."""

    def __init__(self, provider: Any) -> None:
        meter = provider.get_meter("poolkit", __version__)
        self.attempt_started = meter.create_counter(
            "grpc.client.attempt.started", unit="{attempt}", description="Attempts started, retries and hedges included"
        )
        self.attempt_duration = meter.create_histogram(
            "grpc.client.attempt.duration",
            unit="s",
            description="Time from an attempt's start to its end, by status",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        self.call_duration = meter.create_histogram(
            "grpc.client.call.duration",
            unit="s",
            description="Time from a call's start to its end, every attempt and backoff included",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        _register_pool_instruments(meter)


class _Instruments:
    """The tracer and the instruments of the providers installed now."""

    __slots__ = ("meter_provider", "meters", "tracer", "tracer_provider")

    def __init__(self, tracer_provider: Any, tracer: Any, meter_provider: Any, meters: _Meters | None) -> None:
        self.tracer_provider = tracer_provider
        self.tracer = tracer
        self.meter_provider = meter_provider
        self.meters = meters


class _Following:
    """The instruments of the providers installed now, made again when they change."""

    def __init__(self) -> None:
        self.current = _Instruments(None, None, None, None)
        self._lock = threading.Lock()
        # A provider's instruments are made once: made again, they would be registered twice.
        self._meters: weakref.WeakKeyDictionary[Any, _Meters] = weakref.WeakKeyDictionary()

    def get(self) -> _Instruments:
        current = self.current
        if (
            current.tracer_provider is _trace_state._TRACER_PROVIDER
            and current.meter_provider is _metrics_state._METER_PROVIDER
        ):
            return current
        with self._lock:
            current = self.current
            tracer_provider = _trace_state._TRACER_PROVIDER
            meter_provider = _metrics_state._METER_PROVIDER
            tracer, meters = current.tracer, current.meters
            if tracer_provider is not current.tracer_provider:
                tracer = tracer_provider.get_tracer("poolkit", __version__) if tracer_provider is not None else None
            if meter_provider is None:
                meters = None
            elif meter_provider is not current.meter_provider:
                meters = self._meters.get(meter_provider)
                if meters is None:
                    meters = self._meters[meter_provider] = _Meters(meter_provider)
            self.current = _Instruments(tracer_provider, tracer, meter_provider, meters)
            return self.current


_following = _Following()
_instruments = _following.get


# -- one call --------------------------------------------------------------------------------


class _CarrierSetter(Setter[MutableMapping[str, str]]):
    """grpc metadata keys must be lowercase; some propagators' headers are not."""

    def set(self, carrier: MutableMapping[str, str], key: str, value: str) -> None:
        carrier[key.lower()] = value


_setter = _CarrierSetter()


def start_call(method: MethodTelemetry | None, metadata: Any) -> CallTrace | None:
    """The telemetry of a call about to start, or None when there is nothing to do: the
    channel's telemetry is off, or no provider is installed and the current context
    carries nothing to propagate. This is all an untraced call pays."""
    if method is None:
        return None
    if _trace_state._TRACER_PROVIDER is None and _metrics_state._METER_PROVIDER is None and not context.get_current():
        return None
    return CallTrace(method, metadata, _instruments())


class Attempt:
    """Telemetry's view of one attempt of a traced call: when it ran and its span."""

    __slots__ = ("code", "details", "ejections", "ended", "span", "started", "wall_ended", "wall_started")

    def __init__(self, ejections: int, wall: int | None) -> None:
        self.started = time.perf_counter()
        self.ended: float | None = None
        self.wall_started = wall
        self.wall_ended: int | None = None
        self.span: Any = None
        self.ejections = ejections  # the route's ejections when it started
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None


class CallTrace:
    """The telemetry of one logical call, an observer of its state machine (`_call.Call`):
    its span, the metadata it sends (the caller's plus the trace context), and the
    metrics its attempts record. It decides nothing: the call says when an attempt
    starts and ends and when the call is over.

    Thread-safe: the attempts of a hedged or retrying call start and end in different threads.
    """

    __slots__ = (
        "_lock",
        "attempts",
        "context",
        "ended",
        "instruments",
        "metadata",
        "method",
        "span",
        "split",
        "started",
        "suppressed",
    )

    def __init__(self, method: MethodTelemetry, metadata: Any, instruments: _Instruments) -> None:
        self.method = method
        self.instruments = instruments
        self.started = time.perf_counter()
        self._lock = threading.Lock()
        self.attempts: list[tuple[Attempt, Route]] = []
        self.ended = False
        self.split = False  # attempts get spans of their own
        tracer = instruments.tracer
        self.context: Context | None = None
        if tracer is not None:
            self.span = tracer.start_span(method.name, kind=SpanKind.CLIENT, attributes=method.span_attributes)
            self.context = trace.set_span_in_context(self.span)
            # While an attempt is handed to grpc: other instrumentations of grpc (say
            # opentelemetry-instrumentation-grpc) see the call as traced already.
            self.suppressed: Any = context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True, self.context)
        else:
            self.span = None
            self.suppressed = None
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=self.context, setter=_setter)
        self.metadata = _merge(metadata, carrier)

    # -- attempts ------------------------------------------------------------------------

    def attempt_started(self, attempt: CallAttempt) -> Attempt:
        """`attempt` of the call starts. From the second attempt on (or any of a hedged
        call), each attempt gets a span; the first gets its own late."""
        route = attempt.slot.route
        traced = self.span is not None
        observed = Attempt(route.ejections, time.time_ns() if traced else None)
        with self._lock:
            self.attempts.append((observed, route))
            if traced and not self.ended and (self.split or attempt.hedged or attempt.number > 1):
                self.split = True
                for number, (each, where) in enumerate(self.attempts, 1):
                    if each.span is None:
                        self._attempt_span(each, where, number)
        meters = self.instruments.meters
        if meters is not None:
            meters.attempt_started.add(1, self.method.metric_attributes)
        return observed

    def _attempt_span(self, observed: Attempt, route: Route, number: int) -> None:
        """The span of an attempt, closed at once if the attempt is over (lock held)."""
        tracer = self.instruments.tracer
        assert tracer is not None
        observed.span = tracer.start_span(
            self.method.attempt_name,
            context=self.context,
            kind=SpanKind.INTERNAL,
            attributes={"poolkit.attempt": number, **_where(route)},
            start_time=observed.wall_started,
        )
        if observed.code is not None:
            self._close_attempt_span(observed)

    def _close_attempt_span(self, observed: Attempt) -> None:
        code = observed.code
        assert code is not None
        span = observed.span
        span.set_attributes(self.method.semconv.status(code))
        if code is not _OK:
            span.set_status(Status(StatusCode.ERROR, observed.details))
        span.end(end_time=observed.wall_ended)

    def attempt_ended(self, attempt: CallAttempt, code: grpc.StatusCode, details: str | None) -> None:
        """`attempt` ended with `code` (the pool has been told)."""
        observed: Attempt = attempt.observed
        observed.ended = time.perf_counter()
        meters = self.instruments.meters
        if meters is not None:
            meters.attempt_duration.record(observed.ended - observed.started, self.method.by_status[code])
        span = self.span
        if span is None:
            observed.code = code
            return
        with self._lock:
            observed.wall_ended = time.time_ns()
            observed.details = details
            observed.code = code
            if observed.span is not None:
                self._close_attempt_span(observed)
        route = attempt.slot.route
        if route.ejections != observed.ejections and not self.ended:
            span.add_event("poolkit.endpoint.ejected", _where(route))

    def refused(self, kind: str) -> None:
        """The retry budget refused to send the call again (`kind`: retries, requeues, hedges)."""
        span = self.span
        if span is not None and not self.ended:
            span.add_event("poolkit.retry_budget.exhausted", {"poolkit.retry.kind": str(kind)})

    def call_ended(
        self, code: grpc.StatusCode, details: str | None, answered: CallAttempt | None, attempts: int
    ) -> None:
        """The call is over with `code`; `answered` is the attempt that said so (None when
        none did: the pool refused it, or it was cancelled between attempts). Once."""
        with self._lock:
            if self.ended:
                return
            self.ended = True
        meters = self.instruments.meters
        if meters is not None:
            meters.call_duration.record(time.perf_counter() - self.started, self.method.by_status[code])
        span = self.span
        if span is None:
            return
        attributes = self.method.semconv.status(code)
        attributes["poolkit.attempt"] = attempts
        route = answered.slot.route if answered is not None else (self.attempts[-1][1] if self.attempts else None)
        if route is not None:
            attributes.update(_where(route))
            if self.method.server is None:
                attributes["server.address"], attributes["server.port"] = _authority(route)
        span.set_attributes(attributes)
        if code is not _OK:
            span.set_status(Status(StatusCode.ERROR, details))
        span.end()


def invoke(trace_: CallTrace | None, send: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`send(...)`, with other grpc instrumentations told the call is traced already."""
    if trace_ is None or trace_.suppressed is None:
        return send(*args, **kwargs)
    token = context.attach(trace_.suppressed)
    try:
        return send(*args, **kwargs)
    finally:
        context.detach(token)


def _where(route: Route) -> dict[str, Any]:
    endpoint = route.endpoint
    attributes: dict[str, Any] = {
        "network.peer.address": endpoint.host,
        "network.peer.port": endpoint.port,
        "poolkit.endpoint": endpoint.address,
    }
    if route.source is not None:
        attributes["poolkit.source_address"] = route.source.address
    return attributes


def _authority(route: Route) -> tuple[str, int]:
    authority = route.endpoint.authority
    try:
        return split_host_port(authority, authority)
    except ValueError:
        return route.endpoint.host, route.endpoint.port


def _merge(metadata: Any, carrier: Mapping[str, str]) -> Any:
    """The caller's metadata, in order, plus the propagator's entries (which replace any
    of the caller's under the same keys)."""
    if not carrier:
        return metadata
    if not metadata:
        return tuple(carrier.items())
    return (*((key, value) for key, value in metadata if key not in carrier), *carrier.items())


# -- the pool's instruments, read at collection ---------------------------------------------


class _Channels:
    """The live channels, and their port budgets as last read (shared by three gauges)."""

    def __init__(self) -> None:
        self.channels: weakref.WeakSet[Pooled] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._read_at = -_BUDGET_REUSE
        self._budgets: list[tuple[str, dict[str, dict[str, Any]]]] = []

    def add(self, channel: Pooled) -> None:
        with self._lock:
            self.channels.add(channel)

    def open(self) -> list[Pooled]:
        with self._lock:
            return [channel for channel in list(self.channels) if not channel._pool.closed]

    def budgets(self) -> list[tuple[str, dict[str, dict[str, Any]]]]:
        open_channels = self.open()
        with self._lock:
            now = time.monotonic()
            if now - self._read_at >= _BUDGET_REUSE or len(open_channels) != len(self._budgets):
                self._budgets = [(canonical_target(c._pool.target), c.port_budget()) for c in open_channels]
                self._read_at = now
            return self._budgets


_channels = _Channels()


def watch(channel: Pooled) -> None:
    """Report `channel`'s pool while it lives and is open (it is held weakly)."""
    _channels.add(channel)
    _instruments()  # a provider installed since the last call gets the pool's instruments now


def _budget_observer(field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(_options: CallbackOptions) -> Iterable[Observation]:
        observations = []
        for target, budget in _channels.budgets():
            for source, figures in budget.items():
                value = figures[field]
                if value is not None:
                    observations.append(Observation(value, {"grpc.target": target, "poolkit.source_address": source}))
        return observations

    return observe


def _route_attributes(target: str, route: Route) -> dict[str, Any]:
    source = route.source.address if route.source is not None else _UNBOUND
    return {"grpc.target": target, "poolkit.endpoint": route.endpoint.address, "poolkit.source_address": source}


def _per_route(read: Callable[[str, Route], Iterable[tuple[int, dict[str, Any]]]]) -> Callable[..., Any]:
    def observe(_options: CallbackOptions) -> Iterable[Observation]:
        observations: list[Observation] = []
        for channel in _channels.open():
            target = canonical_target(channel._pool.target)
            for route in list(channel._pool.routes):
                observations.extend(Observation(value, attributes) for value, attributes in read(target, route))
        return observations

    return observe


def _slots(target: str, route: Route) -> Iterable[tuple[int, dict[str, Any]]]:
    states: dict[str, int] = {}
    for slot in route.slots:
        name = slot.state.name.lower()
        states[name] = states.get(name, 0) + 1
    base = _route_attributes(target, route)
    return [(count, {**base, "poolkit.slot.state": state}) for state, count in states.items()]


def _in_flight(target: str, route: Route) -> Iterable[tuple[int, dict[str, Any]]]:
    return [(route.metric.pending, _route_attributes(target, route))]


def _state_changes(target: str, route: Route) -> Iterable[tuple[int, dict[str, Any]]]:
    base = _route_attributes(target, route)
    return [(count, {**base, "poolkit.endpoint.state": state}) for state, count in list(route.changes.items())]


def _ejections(target: str, route: Route) -> Iterable[tuple[int, dict[str, Any]]]:
    return [(route.ejections, _route_attributes(target, route))]


def _sent_again(_options: CallbackOptions) -> Iterable[Observation]:
    observations = []
    for channel in _channels.open():
        target = canonical_target(channel._pool.target)
        for kind, count in dict(channel._pool.sent_again).items():
            observations.append(Observation(count, {"grpc.target": target, "poolkit.retry.kind": kind}))
    return observations


def _refusals(_options: CallbackOptions) -> Iterable[Observation]:
    return [
        Observation(channel._pool.budget_refused, {"grpc.target": canonical_target(channel._pool.target)})
        for channel in _channels.open()
    ]


def _register_pool_instruments(meter: Meter) -> None:
    meter.create_observable_gauge(
        "poolkit.slots",
        callbacks=[_per_route(_slots)],
        unit="{slot}",
        description="Connections (slots) of each endpoint and source address, by connectivity state",
    )
    meter.create_observable_up_down_counter(
        "poolkit.calls.in_flight",
        callbacks=[_per_route(_in_flight)],
        unit="{call}",
        description="Calls in flight on each endpoint and source address",
    )
    meter.create_observable_counter(
        "poolkit.endpoint.state_changes",
        callbacks=[_per_route(_state_changes)],
        unit="{change}",
        description="Times an endpoint (from a source address) entered each state",
    )
    meter.create_observable_counter(
        "poolkit.endpoint.ejections",
        callbacks=[_per_route(_ejections)],
        unit="{ejection}",
        description="Times failure accrual took an endpoint (from a source address) out of rotation",
    )
    meter.create_observable_counter(
        "poolkit.retries",
        callbacks=[_sent_again],
        unit="{attempt}",
        description="Calls sent again, by kind: retries, requeues, hedges",
    )
    meter.create_observable_counter(
        "poolkit.retry_budget.refusals",
        callbacks=[_refusals],
        unit="{attempt}",
        description="Retries, requeues and hedges the retry budget refused",
    )
    meter.create_observable_gauge(
        "poolkit.source.connections",
        callbacks=[_budget_observer("connections")],
        unit="{connection}",
        description="READY connections of a poolkit channel from a source address",
    )
    meter.create_observable_gauge(
        "poolkit.source.ports_in_use",
        callbacks=[_budget_observer("sockets")],
        unit="{port}",
        description="TCP sockets of this host on a source address (TIME_WAIT included)",
    )
    meter.create_observable_gauge(
        "poolkit.source.port_range_share",
        callbacks=[_budget_observer("share_in_use")],
        unit="1",
        description="ports in use on a source address over the ephemeral port range",
    )


def after_fork() -> None:
    """In a forked child (one thread): locks a parent thread may have held, renewed."""
    _following._lock = threading.Lock()
    _channels._lock = threading.Lock()
