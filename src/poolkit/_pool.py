"""The pool's state and decisions, free of I/O: which slot a call goes to, what is in
flight, how each route has been doing, and what the pool looks like as a whole.

A route is an endpoint (later, an endpoint × source address); a slot is one grpc
channel, one TCP connection, of a route. The shells (sync, asyncio) create and close the
channels; this module only holds them as opaque handles. It takes a lock for its own
bookkeeping and never holds it across I/O, so one instance serves threads and tasks alike.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from ._balancer import Picker, PowerOfTwoChoices, RoundRobin
from ._config import PoolConfig
from ._errors import PoolClosedError, PoolUnavailableError
from ._metric import LeastLoaded, LoadMetric, PeakEwma
from ._target import Endpoint

Clock = Callable[[], float]
_Connectivity = grpc.ChannelConnectivity

# Codes whose elapsed time says something about the route's latency: a timed-out call
# was at least that slow. Other failures return fast and would flatter a broken route.
_SLOW_FAILURES = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED})


class Slot:
    """One grpc channel of a route, and what it has carried."""

    __slots__ = ("__weakref__", "callables", "calls", "channel", "errors", "index", "pending", "route", "state")

    def __init__(self, route: Route, index: int) -> None:
        self.route = route
        self.index = index
        self.channel: Any = None  # set by the shell that opens it
        self.callables: dict[int, Any] = {}  # method id -> this channel's multicallable
        self.state = _Connectivity.IDLE
        self.pending = 0
        self.calls = 0
        self.errors = 0

    def __repr__(self) -> str:
        return f"<Slot {self.route.endpoint.address}#{self.index} {self.state.name} pending={self.pending}>"


class Route:
    """An endpoint as the balancer sees it: a load metric, a weight and its slots."""

    __slots__ = ("endpoint", "metric", "slots", "weight")

    def __init__(self, endpoint: Endpoint, metric: LoadMetric, weight: float, slot_count: int) -> None:
        self.endpoint = endpoint
        self.metric = metric
        self.weight = weight
        self.slots = [Slot(self, i) for i in range(slot_count)]

    @property
    def calls(self) -> int:
        return sum(slot.calls for slot in self.slots)

    @property
    def errors(self) -> int:
        return sum(slot.errors for slot in self.slots)

    def __repr__(self) -> str:
        return f"<Route {self.endpoint.address} pending={self.metric.pending} calls={self.calls}>"


def _slot_pending(slot: Slot) -> int:
    return slot.pending


class PoolState:
    """Routes, picks and accounting for one poolkit channel."""

    def __init__(
        self,
        target: str,
        endpoints: Sequence[Endpoint],
        config: PoolConfig,
        *,
        clock: Clock,
        rng: random.Random,
    ) -> None:
        self.target = target
        self.config = config
        self.clock = clock
        now = clock()
        metric_type = LeastLoaded if config.balancer == "p2c_least_loaded" else PeakEwma
        self.routes = [
            Route(
                endpoint,
                metric_type(decay=config.ewma_decay, initial_rtt=config.initial_rtt, now=now),
                _weight_of(endpoint, config),
                config.connections_per_endpoint,
            )
            for endpoint in endpoints
        ]
        self._picker: Picker[Route] = RoundRobin(rng) if config.balancer == "round_robin" else PowerOfTwoChoices(rng)
        self._picker.update(self.routes)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.closed = False
        self.connectivity = _Connectivity.IDLE

    @property
    def slots(self) -> list[Slot]:
        return [slot for route in self.routes for slot in route.slots]

    def begin(self) -> Slot:
        """Choose the slot for a new call and count the call in flight on it."""
        with self._lock:
            if self.closed:
                raise PoolClosedError(f"poolkit channel to {self.target} is closed")
            if not self.routes:
                raise PoolUnavailableError(f"poolkit channel to {self.target} has no endpoint")
            route = self._picker.pick(self.clock())
            slots = route.slots
            slot = slots[0] if len(slots) == 1 else min(slots, key=_slot_pending)
            slot.pending += 1
            route.metric.pending += 1
        return slot

    def end(self, slot: Slot, started: float | None, code: grpc.StatusCode | None = None) -> None:
        """A call on `slot` finished with `code` (None for OK). `started` is the clock when
        it began if its duration is a latency sample (unary responses), else None.

        This and `begin` are the per-call path: only the counters the balancer reads are
        kept here; totals are summed when someone asks (`describe`, `in_flight`)."""
        now = self.clock() if started is not None else 0.0
        with self._lock:
            slot.pending -= 1
            slot.calls += 1
            metric = slot.route.metric
            metric.pending -= 1
            if code is not None:
                slot.errors += 1
            if started is not None and (code is None or code in _SLOW_FAILURES):
                metric.observe(now - started, now)
            if self.closed:
                self._idle.notify_all()

    @property
    def in_flight(self) -> int:
        return sum(route.metric.pending for route in self.routes)

    def close(self, grace: float | None = None) -> bool:
        """Stop admitting calls; with a grace, wait up to that long for in-flight calls to
        finish. True if this call closed the pool, False if it was already closed."""
        with self._lock:
            was_open = not self.closed
            self.closed = True
            if grace is not None and grace > 0:
                self._idle.wait_for(lambda: self.in_flight == 0, timeout=grace)
        return was_open

    def set_slot_state(self, slot: Slot, state: _Connectivity) -> _Connectivity | None:
        """Record a slot's connectivity; the pool's new overall state if that changed."""
        with self._lock:
            slot.state = state
            overall = _overall(s.state for route in self.routes for s in route.slots)
            if overall is self.connectivity:
                return None
            self.connectivity = overall
            return overall

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot of the pool."""
        with self._lock:
            now = self.clock()
            return {
                "target": self.target,
                "balancer": self.config.balancer,
                "state": "closed" if self.closed else self.connectivity.name.lower(),
                "in_flight": self.in_flight,
                "endpoints": [_describe_route(route, now) for route in self.routes],
            }

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.connectivity.name.lower()
        return f"<PoolState {self.target} {state} routes={len(self.routes)} in_flight={self.in_flight}>"


def _weight_of(endpoint: Endpoint, config: PoolConfig) -> float:
    weights = config.weights
    return float(weights.get(endpoint.address, weights.get(endpoint.authority, 1.0)))


_STATE_ORDER = (
    _Connectivity.READY,
    _Connectivity.CONNECTING,
    _Connectivity.IDLE,
    _Connectivity.TRANSIENT_FAILURE,
    _Connectivity.SHUTDOWN,
)


def _overall(states: Any) -> _Connectivity:
    """The pool is as good as its best slot: READY if any slot is, and so on down."""
    present = set(states)
    for state in _STATE_ORDER:
        if state in present:
            return state
    return _Connectivity.IDLE


def _describe_route(route: Route, now: float) -> dict[str, Any]:
    return {
        "address": route.endpoint.address,
        "authority": route.endpoint.authority,
        "weight": route.weight,
        "in_flight": route.metric.pending,
        "calls": route.calls,
        "errors": route.errors,
        "ewma_ms": round(route.metric.estimate(now) * 1000, 3),
        "load": round(route.metric.load(now), 6),
        "slots": [
            {
                "index": s.index,
                "state": s.state.name.lower(),
                "in_flight": s.pending,
                "calls": s.calls,
                "errors": s.errors,
            }
            for s in route.slots
        ],
    }
