"""PoolConfig: every knob of a poolkit channel, frozen and validated when built."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import grpc

from ._budget import DEFAULT_MIN_PER_SECOND, DEFAULT_RATIO, DEFAULT_WINDOW, MAX_NUMBER, is_finite, validate_budget
from ._errors import ConfigError

_IFNAMSIZ = 16  # an interface name is shorter than this (Linux)

Balancer = Literal["p2c_peak_ewma", "p2c_least_loaded", "round_robin"]
BALANCERS: tuple[str, ...] = ("p2c_peak_ewma", "p2c_least_loaded", "round_robin")


Resolver = Callable[[str], Iterable[str]]
"""Given the channel's target, the endpoints' "host:port" addresses now (a service registry lookup)."""

DEFAULT_FAILURE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


@dataclass(frozen=True, kw_only=True)
class HealthCheck:
    """Active health checking with grpc.health.v1, per endpoint, over the pool's own connection.

    `Watch` streams status changes when the server implements it; otherwise `Check` is
    called every `interval` with a `timeout`. NOT_SERVING or SERVICE_UNKNOWN takes the
    endpoint out of rotation until it reports SERVING again. A server without the health
    service (UNIMPLEMENTED) is assumed healthy.
    """

    service: str = ""
    """The service name to ask about; "" asks about the server as a whole."""

    interval: float = 5.0
    """Seconds between `Check` calls when `Watch` is not available (Envoy's default)."""

    timeout: float = 1.0
    """Seconds a `Check` call may take; a check that times out leaves the status unknown."""

    watch: bool = True
    """Use the streaming `Watch` when the server supports it; False polls with `Check`."""

    def __post_init__(self) -> None:
        if not isinstance(self.service, str):
            raise ConfigError("health_check.service", self.service, "must be a string")
        _check_positive("health_check.interval", self.interval)
        _check_positive("health_check.timeout", self.timeout)
        if not isinstance(self.watch, bool):
            raise ConfigError("health_check.watch", self.watch, "must be True or False")


@dataclass(frozen=True, kw_only=True)
class FailureAccrual:
    """Passive health: which call outcomes count against an endpoint, and when it is ejected.

    An endpoint is ejected after `consecutive_failures` failures in a row, or when its
    success rate over `success_rate_window` seconds (with at least `success_rate_min_calls`
    calls) falls below `success_rate`. The first ejection lasts `ejection_min` seconds,
    each further one twice as long up to `ejection_max`, all ±`jitter`. When it ends, one
    call is let through as a probe: success restores the endpoint, failure ejects it again.
    """

    consecutive_failures: int | None = 5
    """Failures in a row that eject an endpoint (Finagle's default); None turns this policy off."""

    success_rate: float | None = 0.8
    """Minimum share of successful calls over the window (Finagle, Envoy); None turns it off."""

    success_rate_window: float = 30.0
    """Seconds over which the success rate is measured."""

    success_rate_min_calls: int = 5
    """Calls the window must hold before the success rate can eject."""

    failure_codes: frozenset[grpc.StatusCode] = DEFAULT_FAILURE_CODES
    """Status codes that count as the endpoint's failure. Other codes (NOT_FOUND,
    INVALID_ARGUMENT, ...) are the application's answer and count as successes."""

    ejection_min: float = 5.0
    """Seconds of the first ejection."""

    ejection_max: float = 300.0
    """Longest ejection, however often the endpoint fails its probes."""

    jitter: float = 0.2
    """Ejection durations vary by up to this share either way, so endpoints ejected
    together do not all come back together."""

    def __post_init__(self) -> None:
        if self.consecutive_failures is not None:
            _check_int("failure_accrual.consecutive_failures", self.consecutive_failures, low=1, high=1_000_000)
        if self.success_rate is not None:
            _check_share("failure_accrual.success_rate", self.success_rate)
        _check_positive("failure_accrual.success_rate_window", self.success_rate_window)
        _check_int("failure_accrual.success_rate_min_calls", self.success_rate_min_calls, low=1, high=1_000_000)
        object.__setattr__(self, "failure_codes", _status_codes("failure_accrual.failure_codes", self.failure_codes))
        _check_positive("failure_accrual.ejection_min", self.ejection_min)
        _check_positive("failure_accrual.ejection_max", self.ejection_max)
        if self.ejection_max < self.ejection_min:
            raise ConfigError("failure_accrual.ejection_max", self.ejection_max, "must be at least ejection_min")
        _check_jitter("failure_accrual.jitter", self.jitter)


@dataclass(frozen=True, kw_only=True)
class Hedging:
    """Send a second attempt of a slow call to another endpoint; the first answer wins and
    the other attempt is cancelled. Only for idempotent methods; hedges draw on the retry
    budget, so a slow pool cannot double its own load."""

    delay: float | None = None
    """Seconds to wait for the first attempt before hedging; None: the method's observed
    p95 latency (no hedging until `min_samples` calls have been timed)."""

    min_samples: int = 20
    """With `delay=None`: calls timed before the observed p95 is trusted."""

    def __post_init__(self) -> None:
        if self.delay is not None:
            _check_positive("hedging.delay", self.delay)
        _check_int("hedging.min_samples", self.min_samples, low=1, high=1_000_000)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """When a failed call is tried again (gRPC A6's numbers).

    A method is taken to be non-idempotent unless `idempotent=True`: then only a call that
    provably never reached a server (no connection; a stream the server refused unseen)
    is sent again, as a requeue. An idempotent method is also retried on `codes`, and when
    `attempt_timeout` runs out, up to `max_attempts` attempts, each after a backoff and on
    another endpoint when there is one. The caller's deadline bounds it all: an attempt
    that cannot finish before it is not started.
    """

    idempotent: bool = False
    """Safe to run twice: a retry after the server may have acted on the request is fine."""

    codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})
    """Status codes an idempotent method is retried on."""

    max_attempts: int = 3
    """Attempts in all, the first included (requeues do not count)."""

    initial_backoff: float = 0.1
    """Seconds before the first retry; each further one waits `backoff_multiplier` times longer."""

    backoff_multiplier: float = 2.0
    max_backoff: float = 1.0
    """The longest backoff, before jitter."""

    jitter: float = 0.2
    """Each backoff varies by up to this share either way."""

    attempt_timeout: float | None = None
    """Seconds one attempt may take before it is abandoned and (if idempotent) retried;
    None: each attempt may use what is left of the caller's deadline."""

    hedging: Hedging | None = None
    """Opt-in hedged requests for this method (requires `idempotent=True`)."""

    def __post_init__(self) -> None:
        if not isinstance(self.idempotent, bool):
            raise ConfigError("retry.idempotent", self.idempotent, "must be True or False")
        object.__setattr__(self, "codes", _status_codes("retry.codes", self.codes))
        _check_int("retry.max_attempts", self.max_attempts, low=1, high=10)
        _check_positive("retry.initial_backoff", self.initial_backoff)
        _check_positive("retry.max_backoff", self.max_backoff)
        if isinstance(self.backoff_multiplier, bool) or not isinstance(self.backoff_multiplier, int | float):
            raise ConfigError("retry.backoff_multiplier", self.backoff_multiplier, "must be a number")
        if not 1 <= self.backoff_multiplier <= 10:
            raise ConfigError("retry.backoff_multiplier", self.backoff_multiplier, "must be between 1 and 10")
        if self.max_backoff < self.initial_backoff:
            raise ConfigError("retry.max_backoff", self.max_backoff, "must be at least initial_backoff")
        _check_jitter("retry.jitter", self.jitter)
        if self.attempt_timeout is not None:
            _check_positive("retry.attempt_timeout", self.attempt_timeout)
        if self.hedging is not None:
            if not isinstance(self.hedging, Hedging):
                raise ConfigError("retry.hedging", self.hedging, "must be a poolkit.Hedging or None")
            if not self.idempotent:
                raise ConfigError("retry.hedging", self.hedging, "hedging sends a call twice: needs idempotent=True")


@dataclass(frozen=True, kw_only=True)
class RetryBudget:
    """How many retries, requeues and hedges the whole channel may send (Finagle, Linkerd):
    `ratio` of the calls made plus `min_per_second`, over a sliding `window`. A retry the
    budget refuses is not sent; the caller gets the error it would have retried."""

    ratio: float = DEFAULT_RATIO
    min_per_second: float = DEFAULT_MIN_PER_SECOND
    window: float = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        validate_budget(self.ratio, self.min_per_second, self.window)


def _is_method_key(key: object) -> bool:
    """'/package.Service/Method' or 'package.Service'."""
    if not isinstance(key, str) or not key or any(c.isspace() for c in key):
        return False
    if key.startswith("/"):
        service, _, method = key[1:].partition("/")
        return bool(service) and bool(method) and "/" not in method
    return "/" not in key


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """How a poolkit channel pools, balances and connects. Change with `dataclasses.replace`.

    Durations are float seconds.
    """

    balancer: Balancer = "p2c_peak_ewma"
    """How a call picks its endpoint. "p2c_peak_ewma" (default): of two random endpoints,
    the one with the lower peak-EWMA latency × (in-flight + 1), as Finagle and Linkerd do.
    "p2c_least_loaded": the one with fewer calls in flight. "round_robin": each in turn."""

    connections_per_endpoint: int = 1
    """grpc channels (each its own TCP connection) per endpoint. One HTTP/2 connection
    multiplexes many calls; more exist for server stream limits and spreading load."""

    source_addresses: Sequence[str] = ()
    """Local addresses to open connections from: IPv4 and IPv6 literals, or network
    interface names (standing for their addresses). Each (endpoint, source) pair of the
    same address family is a route with its own connection(s), balanced like any other,
    so connections and their ports spread over the sources: each source address is
    another ephemeral port range towards every server. Every address must be assigned
    to this host (checked when a channel is built). Empty: the kernel chooses."""

    weights: Mapping[str, float] = field(default_factory=dict)
    """Relative share of calls per endpoint, keyed by its address ("10.0.0.1:50051",
    "[::1]:50051"). Endpoints not named weigh 1.0."""

    ewma_decay: float = 10.0
    """Peak EWMA time constant: how fast old latency samples fade (Finagle's default, 10 s)."""

    initial_rtt: float = 0.030
    """Peak EWMA: what each in-flight call costs on an endpoint with no latency sample yet
    (Linkerd's default, 30 ms). An idle unsampled endpoint costs nothing, so it is tried
    at once; this price stops calls piling onto it before its first answer."""

    connect_on_start: bool = True
    """Open every connection when the channel is built rather than on its first call."""

    health_check: HealthCheck | None = field(default_factory=HealthCheck)
    """Active grpc.health.v1 checks of every endpoint; None switches them off."""

    failure_accrual: FailureAccrual | None = field(default_factory=FailureAccrual)
    """Passive health from call outcomes, with ejection and probing; None switches it off."""

    max_ejected_share: float = 0.5
    """Failure accrual never ejects more than this share of the endpoints (Envoy's 50 %)."""

    panic_threshold: float = 0.5
    """When fewer than this share of the endpoints are healthy, calls are spread over every
    endpoint that can still connect instead of piling onto the few (Envoy's panic mode,
    50 %). 0 turns panic off: calls then fail fast once no endpoint is healthy."""

    resolve_interval: float | None = 30.0
    """Seconds between re-resolutions of a name (a `dns:///` target or a `resolver`),
    jittered; an endpoint failing brings the next one forward. None resolves only once."""

    resolver: Resolver | None = None
    """A callable that, given the target string, returns the endpoints' "host:port"
    addresses, for service registries. Called at construction and then like DNS."""

    retry: RetryPolicy | None = field(default_factory=RetryPolicy)
    """The retry policy of every method not named in `method_retry`. The default retries
    nothing that may have reached a server; None turns requeues off too."""

    method_retry: Mapping[str, RetryPolicy | None] = field(default_factory=dict)
    """Retry policies by full method name ("/package.Service/Method") or by service
    ("package.Service"); the method's own entry wins over its service's. None: no retries."""

    retry_budget: RetryBudget = field(default_factory=RetryBudget)
    """What retries, requeues and hedges may add to the calls made, shared by the channel."""

    telemetry: bool = True
    """OpenTelemetry for every call: a CLIENT span (attempt spans when it is retried), the
    trace context in the outgoing metadata, and gRPC's per-call metrics, through whatever
    providers the application installed (with none, next to no cost). False leaves the
    calls of this channel untraced, unpropagated and uncounted; the pool's own gauges stay."""

    def retry_policy(self, method: str) -> RetryPolicy | None:
        """The policy for a full method name: its own, its service's, or `retry`."""
        table = self.method_retry
        if method in table:
            return table[method]
        service = method[1:].partition("/")[0]
        if service in table:
            return table[service]
        return self.retry

    def __post_init__(self) -> None:
        if self.balancer not in BALANCERS:
            raise ConfigError("balancer", self.balancer, f"must be one of {', '.join(BALANCERS)}")
        _check_int("connections_per_endpoint", self.connections_per_endpoint, low=1, high=64)
        _check_positive("ewma_decay", self.ewma_decay)
        _check_positive("initial_rtt", self.initial_rtt)
        if not isinstance(self.connect_on_start, bool):
            raise ConfigError("connect_on_start", self.connect_on_start, "must be True or False")
        if not isinstance(self.telemetry, bool):
            raise ConfigError("telemetry", self.telemetry, "must be True or False")
        object.__setattr__(self, "source_addresses", _source_addresses(self.source_addresses))
        if not isinstance(self.weights, Mapping):
            raise ConfigError("weights", self.weights, "must be a mapping of endpoint address to weight")
        for address, weight in self.weights.items():
            if not isinstance(address, str) or not address:
                raise ConfigError("weights", address, "keys must be endpoint addresses like '10.0.0.1:50051'")
            _check_positive(f"weights[{address!r}]", weight)
        object.__setattr__(self, "weights", MappingProxyType(dict(self.weights)))
        if self.health_check is not None and not isinstance(self.health_check, HealthCheck):
            raise ConfigError("health_check", self.health_check, "must be a poolkit.HealthCheck or None")
        if self.failure_accrual is not None and not isinstance(self.failure_accrual, FailureAccrual):
            raise ConfigError("failure_accrual", self.failure_accrual, "must be a poolkit.FailureAccrual or None")
        _check_share("max_ejected_share", self.max_ejected_share)
        _check_share("panic_threshold", self.panic_threshold)
        if self.resolve_interval is not None:
            _check_positive("resolve_interval", self.resolve_interval)
        if self.resolver is not None and not callable(self.resolver):
            raise ConfigError("resolver", self.resolver, "must be a callable taking the target, or None")
        self._check_retry()

    def _check_retry(self) -> None:
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            raise ConfigError("retry", self.retry, "must be a poolkit.RetryPolicy or None")
        if not isinstance(self.method_retry, Mapping):
            raise ConfigError(
                "method_retry", self.method_retry, "must be a mapping of method or service name to policy"
            )
        for key, policy in self.method_retry.items():
            if not _is_method_key(key):
                raise ConfigError("method_retry", key, "keys must be '/package.Service/Method' or 'package.Service'")
            if policy is not None and not isinstance(policy, RetryPolicy):
                raise ConfigError(f"method_retry[{key!r}]", policy, "must be a poolkit.RetryPolicy or None")
        object.__setattr__(self, "method_retry", MappingProxyType(dict(self.method_retry)))
        if not isinstance(self.retry_budget, RetryBudget):
            raise ConfigError("retry_budget", self.retry_budget, "must be a poolkit.RetryBudget")


def _source_addresses(value: object) -> tuple[str, ...]:
    """`source_addresses` as a tuple of IP literals (compressed) and interface names."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ConfigError("source_addresses", value, "must be a list of local IP addresses or interface names")
    names: list[str] = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ConfigError("source_addresses", item, "each must be an IP address or an interface name")
        try:
            name = ipaddress.ip_address(item.strip()).compressed
        except ValueError:
            name = item.strip()
            if "/" in name or " " in name or len(name) >= _IFNAMSIZ:
                raise ConfigError(
                    "source_addresses", item, "is neither an IP address nor a network interface name"
                ) from None
        if name in names:
            raise ConfigError("source_addresses", item, "is listed twice")
        names.append(name)
    return tuple(names)


def _check_int(name: str, value: object, *, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, value, "must be an integer")
    if not low <= value <= high:
        raise ConfigError(name, value, f"must be between {low} and {high}")


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(name, value, "must be a number")
    if not is_finite(value) or value <= 0:
        raise ConfigError(name, value, "must be a finite number greater than 0")
    if value > MAX_NUMBER:
        raise ConfigError(name, value, f"must be at most {MAX_NUMBER:g}")


def _check_share(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(name, value, "must be a number")
    if not 0 <= value <= 1:
        raise ConfigError(name, value, "must be between 0 and 1")


def _check_jitter(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ConfigError(name, value, "must be a number from 0 up to (not including) 1")


def _status_codes(name: str, codes: object) -> frozenset[grpc.StatusCode]:
    if isinstance(codes, grpc.StatusCode | str) or not isinstance(codes, Iterable):
        raise ConfigError(name, codes, "must be a set of grpc.StatusCode")
    items = list(codes)
    for code in items:
        if not isinstance(code, grpc.StatusCode):
            raise ConfigError(name, code, "must be a grpc.StatusCode")
    result = frozenset(items)
    if grpc.StatusCode.OK in result:
        raise ConfigError(name, codes, "cannot include OK: OK is not a failure")
    return result
