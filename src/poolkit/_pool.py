"""The pool's state and decisions, free of I/O: which slot a call goes to, what is in
flight, how each route is doing, which routes are out of rotation and why.

A route is an endpoint, or an endpoint × source address when connections are bound to
local sources; a slot is one grpc channel, one TCP connection, of a route. The shells
(sync, asyncio) create and close the channels and run the health checks and
resolutions; they report what they see here
(`set_slot_state`, `set_health`, `update_endpoints`) and this module decides. It takes a
lock for its own bookkeeping and never holds it across I/O, so one instance serves
threads and tasks alike.

A route is out of rotation when discovery removed it (draining), failure accrual ejected
it, its health check says NOT_SERVING, or every connection of it is failing. Calls go to
the routes in rotation; when fewer than `panic_threshold` of the routes are, to every
route that can still connect (panic); when none can, they fail at once with the reason.
"""

from __future__ import annotations

import collections
import enum
import math
import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from . import _health
from ._accrual import Accrual
from ._balancer import Picker, PowerOfTwoChoices, RoundRobin
from ._budget import TokenBudget
from ._config import PoolConfig
from ._errors import ForkedChannelError, PoolClosedError, PoolUnavailableError
from ._metric import LeastLoaded, LoadMetric, PeakEwma
from ._target import Endpoint, Source, sources_for

Clock = Callable[[], float]
_Connectivity = grpc.ChannelConnectivity
_READY = _Connectivity.READY
_CANCELLED = grpc.StatusCode.CANCELLED

# Codes whose elapsed time says something about the route's latency: a timed-out call
# was at least that slow. Other failures return fast and would flatter a broken route.
_SLOW_FAILURES = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED})


class Status(enum.StrEnum):
    """A route's status, as describe() shows it, in the order they win when several hold."""

    DRAINING = "draining"  # removed by discovery; in-flight calls finish, then it closes
    EJECTED = "ejected"  # failure accrual took it out until `ejected_until`
    PROBING = "probing"  # its ejection is over; one call decides whether it comes back
    FAILING = "failing"  # every connection of it is in TRANSIENT_FAILURE (or shut down)
    UNHEALTHY = "unhealthy"  # its health check says NOT_SERVING
    HEALTHY = "healthy"


DRAINING, EJECTED, PROBING, FAILING, UNHEALTHY, HEALTHY = Status


class Probe(enum.IntEnum):
    """Probe progress of a route whose ejection has run out (false when none)."""

    NONE = 0
    WAITING = 1  # for a connection to be READY before spending a call on it
    OPEN = 2  # the next call goes there
    SENT = 3  # that call is in flight


_NO_PROBE, _PROBE_WAITING, _PROBE_OPEN, _PROBE_SENT = Probe

_TRANSITIONS_KEPT = 64


class Resend(enum.StrEnum):
    """What the retry budget pays for (and describe() counts under these names)."""

    RETRY = "retries"
    REQUEUE = "requeues"
    HEDGE = "hedges"


class Slot:
    """One grpc channel of a route, and what it has carried."""

    __slots__ = (
        "__weakref__",
        "callables",
        "calls",
        "channel",
        "errors",
        "failing",
        "index",
        "pending",
        "route",
        "state",
    )

    def __init__(self, route: Route, index: int) -> None:
        self.route = route
        self.index = index
        self.channel: Any = None  # set by the shell that opens it
        self.callables: dict[int, Any] = {}  # method id -> this channel's multicallable
        self.state = _Connectivity.IDLE
        # Set by TRANSIENT_FAILURE, cleared only by READY (gRPC's "sticky" failure): a
        # connection retrying in the background flips to CONNECTING between failures,
        # and calls sent to it then would only fail in turn.
        self.failing = False
        self.pending = 0
        self.calls = 0
        self.errors = 0

    def __repr__(self) -> str:
        return f"<Slot {self.route.name}#{self.index} {self.state.name} pending={self.pending}>"


class Route:
    """An endpoint (from a source address, if bound) as the balancer sees it: a load
    metric, a weight, its slots and health."""

    __slots__ = (
        "accrual",
        "changes",
        "connect_error",
        "draining",
        "ejected_until",
        "ejections",
        "endpoint",
        "health",
        "live",
        "metric",
        "name",
        "probe",
        "slots",
        "source",
        "status",
        "weight",
    )

    def __init__(
        self,
        endpoint: Endpoint,
        metric: LoadMetric,
        weight: float,
        slot_count: int,
        accrual: Accrual | None,
        source: Source | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.source = source
        # How logs, errors and transitions name it: "10.0.0.1:50051 from 10.0.0.7".
        self.name = endpoint.address if source is None else f"{endpoint.address} from {source.address}"
        self.metric = metric
        self.weight = weight
        self.slots = [Slot(self, i) for i in range(slot_count)]
        self.live = self.slots  # the slots a call may take: ready ones first
        self.accrual = accrual
        self.health = _health.UNCHECKED
        self.draining = False
        self.ejected_until: float | None = None
        self.ejections = 0
        self.probe = _NO_PROBE
        self.status = HEALTHY
        self.changes: dict[str, int] = {}  # times it entered each status, for telemetry
        # What grpc said when a connection last failed (a refused connect, a TLS handshake
        # error), until one is READY again: the reason a failing endpoint is named with.
        self.connect_error: str | None = None

    @property
    def failing(self) -> bool:
        return all(slot.failing for slot in self.slots)

    @property
    def calls(self) -> int:
        return sum(slot.calls for slot in self.slots)

    @property
    def errors(self) -> int:
        return sum(slot.errors for slot in self.slots)

    def _status(self) -> Status:
        if self.draining:
            return DRAINING
        if self.ejected_until is not None:
            return EJECTED
        if self.probe != _NO_PROBE:
            return PROBING
        if self.failing:
            return FAILING
        if self.health == _health.NOT_SERVING:
            return UNHEALTHY
        return HEALTHY

    def _choose_live(self) -> None:
        ready = [s for s in self.slots if s.state is _READY]
        self.live = ready or [s for s in self.slots if not s.failing] or self.slots

    def __repr__(self) -> str:
        return f"<Route {self.name} {self.status} pending={self.metric.pending} calls={self.calls}>"


def _slot_pending(slot: Slot) -> int:
    return slot.pending


def _take(route: Route) -> Slot:
    """Count a new call in flight on the route's least busy live slot (lock held)."""
    live = route.live
    slot = live[0] if len(live) == 1 else min(live, key=_slot_pending)
    slot.pending += 1
    route.metric.pending += 1
    return slot


class PoolState:
    """Routes, picks, accounting and health for one poolkit channel."""

    def __init__(
        self,
        target: str,
        endpoints: Sequence[Endpoint],
        config: PoolConfig,
        *,
        clock: Clock,
        rng: random.Random,
        sources: Sequence[Source] = (),
    ) -> None:
        self.target = target
        self.config = config
        self.sources = list(sources)  # local addresses to bind to; none: the kernel chooses
        self.clock = clock
        self.rng = rng
        self._lock = threading.Lock()
        self.closed = False
        self._on_idle: Callable[[], None] | None = None  # told when, closed, the last call ends
        self.forked_from: str | None = None  # why this copy of the pool is closed in a forked child
        self.connectivity = _Connectivity.IDLE
        self.panic = False
        self.resolve_soon = False  # an endpoint failed: discovery should look again early
        self.resolver_error: str | None = None
        self.routes: list[Route] = []
        self._in_rotation: list[Route] = []
        self._fallback: list[Route] = []  # where wait_for_ready calls go when nothing is in rotation
        self._probes: collections.deque[Route] = collections.deque()
        self._next_expiry = math.inf  # earliest ejected_until
        self.transitions: collections.deque[tuple[float, str, str, str, str]] = collections.deque(
            maxlen=_TRANSITIONS_KEPT
        )
        self._picker: Picker[Route] = RoundRobin(rng) if config.balancer == "round_robin" else PowerOfTwoChoices(rng)
        budget = config.retry_budget
        self.budget = TokenBudget(
            ratio=budget.ratio, min_per_second=budget.min_per_second, window=budget.window, now=clock()
        )
        # What the budget let through, by kind, and what it refused.
        self.sent_again = dict.fromkeys(Resend, 0)
        self.budget_refused = 0
        self.routes = self.new_routes(endpoints)
        self._refresh(clock(), "")

    def new_routes(self, endpoints: Sequence[Endpoint]) -> list[Route]:
        """Routes for `endpoints`, not yet in the pool: the shell opens their channels,
        then hands them to `update_endpoints`."""
        config = self.config
        now = self.clock()
        metric_type = LeastLoaded if config.balancer == "p2c_least_loaded" else PeakEwma
        routes = []
        for endpoint in endpoints:
            for source in sources_for(endpoint, self.sources):
                accrual = Accrual(config.failure_accrual, now) if config.failure_accrual is not None else None
                metric = metric_type(decay=config.ewma_decay, initial_rtt=config.initial_rtt, now=now)
                weight = _weight_of(endpoint, config)
                route = Route(endpoint, metric, weight, config.connections_per_endpoint, accrual, source)
                if config.health_check is not None:
                    route.health = _health.UNKNOWN
                routes.append(route)
        return routes

    @property
    def slots(self) -> list[Slot]:
        return [slot for route in self.routes for slot in route.slots]

    # -- the per-call path ----------------------------------------------------------------

    def begin(self, wait_for_ready: bool | None = None) -> Slot:
        """Choose the slot for a new call and count the call in flight on it; raise
        `PoolUnavailableError` at once, saying why, when no route can take it."""
        with self._lock:
            if self.closed:
                raise self._closed_error()
            now = self.clock()
            self.budget.deposit(now)
            if now >= self._next_expiry:
                self._end_ejections(now)
            if self._probes and (route := self._probes.popleft()).probe == _PROBE_OPEN and not route.draining:
                route.probe = _PROBE_SENT
            elif self._in_rotation:
                route = self._picker.pick(now)
            elif wait_for_ready and self._fallback:
                # The caller would rather wait for a connection than fail: let grpc wait.
                route = self._fallback[int(self.rng.random() * len(self._fallback))]
            else:
                raise PoolUnavailableError(self._why_unavailable(now))
            return _take(route)

    def spend(self, kind: Resend) -> bool:
        """May a retry, requeue or hedge (`kind`) be sent now? Counts it if so, and the
        refusal if not."""
        with self._lock:
            if self.budget.try_withdraw(self.clock()):
                self.sent_again[kind] += 1
                return True
            self.budget_refused += 1
            return False

    def begin_again(self, wait_for_ready: bool | None, tried: set[Route], *, fresh_only: bool = False) -> Slot:
        """`begin` for a retry, requeue or hedge: the budget is not paid into again, and
        a route the call has not tried yet is preferred when one is in rotation (with
        `fresh_only`, required: `PoolUnavailableError` if there is none)."""
        with self._lock:
            if self.closed:
                raise self._closed_error()
            now = self.clock()
            if now >= self._next_expiry:
                self._end_ejections(now)
            fresh = [r for r in self._in_rotation if r not in tried]
            if len(fresh) > 1:
                route = self._picker.pick(now)
                if route in tried:
                    route = fresh[int(self.rng.random() * len(fresh))]
            elif fresh:
                route = fresh[0]
            elif fresh_only:
                raise PoolUnavailableError(f"poolkit channel to {self.target}: no other endpoint to try")
            elif self._in_rotation:
                route = self._picker.pick(now)
            elif wait_for_ready and self._fallback:
                route = self._fallback[int(self.rng.random() * len(self._fallback))]
            else:
                raise PoolUnavailableError(self._why_unavailable(now))
            tried.add(route)
            return _take(route)

    def untake(self, slot: Slot) -> None:
        """Give back a slot taken by `begin_again` for an attempt that is not sent after
        all (the budget refused it): no call is counted."""
        with self._lock:
            slot.pending -= 1
            slot.route.metric.pending -= 1
            if self.closed:
                self._idle_yet()

    def has_untried(self, tried: set[Route]) -> bool:
        """Whether a route in rotation is not among `tried` (somewhere for a hedge to go)."""
        with self._lock:
            return any(route not in tried for route in self._in_rotation)

    def end(self, slot: Slot, started: float | None, code: grpc.StatusCode | None = None) -> None:
        """A call on `slot` finished with `code` (None for OK). `started` is the clock when
        it began if its duration is a latency sample (unary responses), else None.

        This and `begin` are the per-call path: only what the balancer and the accrual
        read is kept here; totals are summed when someone asks (`describe`, `in_flight`)."""
        now = self.clock()
        with self._lock:
            slot.pending -= 1
            slot.calls += 1
            route = slot.route
            metric = route.metric
            metric.pending -= 1
            if code is not None:
                slot.errors += 1
            if started is not None:
                if code is None or code in _SLOW_FAILURES:
                    metric.observe(now - started, now)
                elif code is _CANCELLED and now - started > metric.estimate(now):
                    # Cancelled unanswered (a hedge's loser, say): at least this slow.
                    metric.observe(now - started, now)
            accrual = route.accrual
            if accrual is None:
                pass
            elif code is _CANCELLED:  # a caller's cancel says nothing of the server
                if route.probe == _PROBE_SENT:
                    self._open_probe(route)  # nor does a cancelled probe: send another
            else:
                failed = code is not None and code in accrual.policy.failure_codes
                if route.probe or route.ejected_until is not None:
                    self._probe_outcome(route, failed, now)
                elif not failed:
                    accrual.success(now)
                elif (why := accrual.failure(now)) is not None:
                    self._eject(route, now, why)
            if self.closed:
                self._idle_yet()

    def end_local(self, slot: Slot) -> None:
        """A call on `slot` failed before its request left this process: the caller's
        mistake (arguments grpc refused, metadata it would not send, a request that would
        not serialise, a deadline already past). The slot is released and the call counted
        as an error of the slot's, but it says nothing of the endpoint: no accrual, no
        latency sample; a probe that never left is sent again."""
        with self._lock:
            slot.pending -= 1
            slot.calls += 1
            slot.errors += 1
            route = slot.route
            route.metric.pending -= 1
            if route.probe == _PROBE_SENT:
                self._open_probe(route)
            if self.closed:
                self._idle_yet()

    # -- what the shells report -----------------------------------------------------------

    def set_slot_state(self, slot: Slot, state: _Connectivity) -> _Connectivity | None:
        """Record a slot's connectivity; the pool's new overall state if that changed."""
        with self._lock:
            slot.state = state
            route = slot.route
            was_failing = route.failing
            if state is _READY:
                slot.failing = False
                route.connect_error = None
            elif state is _Connectivity.TRANSIENT_FAILURE or state is _Connectivity.SHUTDOWN:
                slot.failing = True
            route._choose_live()
            if route.failing != was_failing:
                if route.failing:
                    self.resolve_soon = True
                self._refresh(self.clock(), f"connection {state.name.lower()}")
            if state is _READY and route.probe == _PROBE_WAITING:
                self._open_probe(route)
            overall = _overall(s.state for r in self.routes for s in r.slots)
            if overall is self.connectivity:
                return None
            self.connectivity = overall
            return overall

    def note_connect_error(self, slot: Slot, details: str) -> None:
        """What grpc said of a call refused because `slot`'s connection is failing."""
        with self._lock:
            if slot.failing:
                slot.route.connect_error = details

    def set_health(self, route: Route, health: _health.Health) -> None:
        """Record what the route's active health check says."""
        with self._lock:
            if route.health == health:
                return
            route.health = health
            if health == _health.SERVING and route.ejected_until is not None:
                # Back from a restart, say: probe it now rather than when the ejection
                # would have run out (Envoy unejects on a passing active check too).
                self._end_ejection(route)
            self._refresh(self.clock(), f"health check: {health.replace('_', ' ')}")

    def update_endpoints(self, added: Sequence[Route], wanted: Sequence[Endpoint]) -> None:
        """Discovery's new answer: `wanted` is the whole set; `added` are routes made by
        `new_routes` (channels open) for the endpoints the pool did not have. Routes not
        wanted any more drain; a draining route wanted again comes back."""
        keys = {(e.host, e.port) for e in wanted}
        with self._lock:
            now = self.clock()
            present = set()
            for route in self.routes:
                key = (route.endpoint.host, route.endpoint.port)
                present.add(key)
                route.draining = key not in keys
                if not route.draining and route.probe == _PROBE_OPEN and route not in self._probes:
                    self._probes.append(route)  # its probe came due while it was draining
            self.routes.extend(r for r in added if (r.endpoint.host, r.endpoint.port) not in present)
            self._refresh(now, "resolver")

    def unknown(self, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        """Those of `endpoints` the pool has no route for."""
        with self._lock:
            present = {(r.endpoint.host, r.endpoint.port) for r in self.routes}
        return [e for e in endpoints if (e.host, e.port) not in present]

    def take_drained(self) -> list[Route]:
        """Remove and return the draining routes with nothing left in flight: the shell
        closes their channels."""
        with self._lock:
            drained = [r for r in self.routes if r.draining and r.metric.pending == 0]
            if drained:
                self.routes = [r for r in self.routes if r not in drained]
                now = self.clock()
                for route in drained:
                    self.transitions.append((now, route.name, DRAINING, "closed", "drained"))
                self._refresh(now, "")
            return drained

    @property
    def draining(self) -> bool:
        return any(route.draining for route in self.routes)

    @property
    def in_flight(self) -> int:
        return sum(route.metric.pending for route in self.routes)

    def after_fork(self, why: str) -> None:
        """In a forked child (one thread): closed, calls refused saying `why`, and a fresh
        lock (a parent thread may have held this one when the process was copied)."""
        self._lock = threading.Lock()
        self._on_idle = None
        self.closed = True
        self.forked_from = why

    def _closed_error(self) -> PoolClosedError:
        if self.forked_from is not None:
            return ForkedChannelError(self.forked_from)
        return PoolClosedError(f"poolkit channel to {self.target} is closed")

    def close(self, on_idle: Callable[[], None] | None = None) -> bool:
        """Stop admitting calls. True if this call closed the pool, False if it was already
        closed. `on_idle` is called (lock held: it must only signal) once nothing is in
        flight, now or when the last call ends: a shell that closes with a grace waits for it."""
        with self._lock:
            if self.closed:
                return False
            self.closed = True
            self._on_idle = on_idle
            self._idle_yet()
        return True

    def _idle_yet(self) -> None:
        """The pool is closed: tell whoever waits once its last call has ended (lock held)."""
        if self._on_idle is not None and self.in_flight == 0:
            self._on_idle()
            self._on_idle = None

    # -- decisions (called with the lock held) --------------------------------------------

    def _eject(self, route: Route, now: float, why: str, *, capped: bool = True) -> None:
        assert route.accrual is not None
        if capped:
            active = sum(1 for r in self.routes if not r.draining)
            out = sum(1 for r in self.routes if not r.draining and (r.ejected_until is not None or r.probe))
            if out + 1 > self.config.max_ejected_share * active:
                return  # at the cap: keep the route, as Envoy does, rather than shrink the pool further
        duration = route.accrual.ejection(now, self.rng)
        route.ejected_until = now + duration
        route.ejections += 1
        route.probe = _NO_PROBE
        self._next_expiry = min(self._next_expiry, route.ejected_until)
        self.resolve_soon = True
        self._refresh(now, f"{why}; ejected for {duration:.1f} s")

    def _end_ejections(self, now: float) -> None:
        self._next_expiry = math.inf
        for route in self.routes:
            until = route.ejected_until
            if until is None:
                continue
            if until > now:
                self._next_expiry = min(self._next_expiry, until)
                continue
            self._end_ejection(route)
        self._refresh(now, "ejection over")

    def _end_ejection(self, route: Route) -> None:
        """Let one probe call decide: now if a connection is ready, else once one is."""
        route.ejected_until = None
        if any(slot.state is _READY for slot in route.slots):
            self._open_probe(route)
        else:
            route.probe = _PROBE_WAITING

    def _open_probe(self, route: Route) -> None:
        route.probe = _PROBE_OPEN
        self._probes.append(route)

    def _probe_outcome(self, route: Route, failed: bool, now: float) -> None:
        """A call on an ejected or probing route ended. Only the probe's outcome counts:
        calls sent before the ejection say nothing new. (A probing route takes no call
        but the probe, so the first to end after it is sent is taken as its answer.)"""
        assert route.accrual is not None
        if route.probe != _PROBE_SENT:
            return
        route.probe = _NO_PROBE
        if failed:
            self._eject(route, now, "probe failed", capped=False)  # it was already out
        else:
            route.accrual.revived(now)
            self._refresh(now, "probe succeeded")

    def _refresh(self, now: float, why: str) -> None:
        """Recompute each route's status and the routes calls may go to."""
        active = []
        for route in self.routes:
            status = route._status()
            if status is not route.status:
                self.transitions.append((now, route.name, route.status, status, why))
                route.status = status
                route.changes[status] = route.changes.get(status, 0) + 1
            if status != DRAINING:
                active.append(route)
        healthy = [r for r in active if r.status == HEALTHY]
        threshold = self.config.panic_threshold
        if healthy and len(healthy) >= threshold * len(active):
            rotation, self.panic = healthy, False
        elif threshold > 0:
            rotation = [r for r in active if not r.failing]
            self.panic = bool(rotation)
        else:
            rotation, self.panic = [], False
        if rotation != self._in_rotation:
            self._picker.update(rotation)  # only on change: round robin's place survives
        self._in_rotation = rotation
        self._fallback = active

    def _why_unavailable(self, now: float) -> str:
        if not self.routes:
            error = f" (last resolution: {self.resolver_error})" if self.resolver_error else ""
            return f"poolkit channel to {self.target} has no endpoint{error}"
        reasons = ", ".join(f"{r.name} {_reason(r, now)}" for r in self.routes)
        return f"poolkit channel to {self.target}: every endpoint is unavailable ({reasons})"

    # -- views --------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot of the pool."""
        with self._lock:
            now = self.clock()
            return {
                "target": self.target,
                "balancer": self.config.balancer,
                "state": "closed" if self.closed else self.connectivity.name.lower(),
                "in_flight": self.in_flight,
                "panic": self.panic,
                "retry_budget": {
                    **{kind.value: count for kind, count in self.sent_again.items()},
                    "refused": self.budget_refused,
                    "balance": round(self.budget.balance(now), 3),
                },
                "endpoints": [_describe_route(route, now) for route in self.routes],
                "transitions": [
                    {"ago_s": round(now - at, 3), "endpoint": address, "from": old, "to": new, "why": why}
                    for at, address, old, new, why in self.transitions
                ],
            }

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.connectivity.name.lower()
        return f"<PoolState {self.target} {state} routes={len(self.routes)} in_flight={self.in_flight}>"


def _weight_of(endpoint: Endpoint, config: PoolConfig) -> float:
    weights = config.weights
    return float(weights.get(endpoint.address, weights.get(endpoint.authority, 1.0)))


def _reason(route: Route, now: float) -> str:
    status = route.status
    if status == EJECTED and route.ejected_until is not None:
        return f"ejected for {route.ejected_until - now:.1f} s more"
    if status == FAILING:
        return f"failing to connect: {route.connect_error}" if route.connect_error else "failing to connect"
    if status == UNHEALTHY:
        return "not serving"
    return status


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
    until = route.ejected_until
    return {
        "address": route.endpoint.address,
        "source": route.source.address if route.source is not None else None,
        "authority": route.endpoint.authority,
        "weight": route.weight,
        "status": route.status,
        "connect_error": route.connect_error,
        "health": route.health,
        "ejections": route.ejections,
        "ejected_for_s": round(max(0.0, until - now), 3) if until is not None else None,
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
