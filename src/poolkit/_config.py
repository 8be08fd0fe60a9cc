"""PoolConfig: every knob of a poolkit channel, frozen and validated when built."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from ._errors import ConfigError

Balancer = Literal["p2c_peak_ewma", "p2c_least_loaded", "round_robin"]
BALANCERS: tuple[str, ...] = ("p2c_peak_ewma", "p2c_least_loaded", "round_robin")


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

    def __post_init__(self) -> None:
        if self.balancer not in BALANCERS:
            raise ConfigError("balancer", self.balancer, f"must be one of {', '.join(BALANCERS)}")
        _check_int("connections_per_endpoint", self.connections_per_endpoint, low=1, high=64)
        _check_positive("ewma_decay", self.ewma_decay)
        _check_positive("initial_rtt", self.initial_rtt)
        if not isinstance(self.connect_on_start, bool):
            raise ConfigError("connect_on_start", self.connect_on_start, "must be True or False")
        if not isinstance(self.weights, Mapping):
            raise ConfigError("weights", self.weights, "must be a mapping of endpoint address to weight")
        for address, weight in self.weights.items():
            if not isinstance(address, str) or not address:
                raise ConfigError("weights", address, "keys must be endpoint addresses like '10.0.0.1:50051'")
            _check_positive(f"weights[{address!r}]", weight)
        object.__setattr__(self, "weights", MappingProxyType(dict(self.weights)))


def _check_int(name: str, value: object, *, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, value, "must be an integer")
    if not low <= value <= high:
        raise ConfigError(name, value, f"must be between {low} and {high}")


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(name, value, "must be a number")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(name, value, "must be a finite number greater than 0")
