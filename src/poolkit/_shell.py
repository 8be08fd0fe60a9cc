"""What the sync and asyncio shells share: building the pool from a target, the grpc
options of each slot's channel, and binding a method to a slot's channel once."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from . import _fork, _source, _telemetry
from ._budget import MAX_NUMBER, is_finite
from ._call import Method
from ._config import PoolConfig
from ._discovery import Discovery
from ._errors import ConfigError
from ._pool import PoolState, Route, Slot
from ._retry import Plan
from ._target import Endpoint, Source, sources_for

_log = logging.getLogger("poolkit")
_READY = grpc.ChannelConnectivity.READY
_UNBOUND = "default"  # port_budget()'s key when connections are not bound to a source

# How often the discovery loop looks while routes drain or a re-resolution is wanted,
# and at most how long it sleeps otherwise (so close() never waits long for it).
_DRAIN_POLL = 0.1
_IDLE_POLL = 1.0

# In a forked child: the grpc objects of channels made in the parent, never collected.
_PARENTS_OBJECTS: list[Any] = []

ChannelOptions = Sequence[tuple[str, Any]]
Serializer = Callable[[Any], bytes] | None
Deserializer = Callable[[bytes], Any] | None


def slot_options(route: Route, options: ChannelOptions) -> list[tuple[str, Any]]:
    """The grpc options of one slot's channel: the caller's, plus what pooling (and
    binding to the route's source address) needs."""
    endpoint = route.endpoint
    names = {name for name, _ in options}
    extra: list[tuple[str, Any]] = [
        # Without this, channels with equal targets and options share one connection
        # through grpc's global subchannel pool, and N slots would be one.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if "grpc.enable_retries" not in names:
        # poolkit retries (and requeues what grpc would retry transparently) itself; grpc's
        # own retry layer would also strip the `grpc-previous-rpc-attempts` poolkit sends.
        extra.append(("grpc.enable_retries", 0))
    if "grpc.default_authority" not in names:
        # The slot dials an IP literal; servers (and TLS) should still see the service name.
        extra.append(("grpc.default_authority", endpoint.authority))
    if route.source is not None:
        extra.extend(_source.channel_options(route.source))
    return [*options, *extra]


def validated_options(options: ChannelOptions | None) -> list[tuple[str, Any]]:
    if options is None:
        return []
    if isinstance(options, str | bytes) or not isinstance(options, Sequence):
        raise ConfigError("options", options, "must be a sequence of (name, value) tuples")
    for option in options:
        if not (isinstance(option, tuple) and len(option) == 2 and isinstance(option[0], str)):
            raise ConfigError("options", option, "each option must be a (name, value) tuple")
        if not isinstance(option[1], int | str | bytes):
            raise ConfigError("options", option, f"the value of {option[0]} must be an int or a string")
    return list(options)


# The call that learns why a connection failed: grpc fails a call that does not wait for
# the connection at once with its last connect error. A health check, harmless if it
# does get through.
WHY_METHOD = "/grpc.health.v1.Health/Check"
WHY_TIMEOUT = 5.0


def checked_grace(grace: object) -> float | None:
    """`close(grace)`'s grace, refused (naming it) before anything is closed."""
    if grace is None:
        return None
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not is_finite(grace) or grace < 0:
        raise ConfigError("grace", grace, "must be None or a number of seconds, 0 or more")
    if grace > MAX_NUMBER:
        raise ConfigError("grace", grace, f"must be at most {MAX_NUMBER:g} seconds")
    return float(grace)


class Pooled:
    """The part of a poolkit channel that is neither sync nor async: its pool and methods."""

    _public_name = "poolkit.Channel"

    def __init__(
        self,
        target: str | Sequence[str],
        config: PoolConfig | None,
        options: ChannelOptions | None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        *,
        defer: bool = False,
    ) -> None:
        if config is None:
            config = PoolConfig()
        elif not isinstance(config, PoolConfig):
            raise ConfigError("config", config, "must be a poolkit.PoolConfig")
        self._grpc_options = validated_options(options)
        rng = rng or random.Random()
        self._discovery = Discovery(target, config, rng, clock())
        sources = _source.resolve_sources(config.source_addresses)
        # With `defer`, what would block (a DNS lookup, a resolver, the source-binding
        # self-check) is left to the shell to run off its event loop (`first_endpoints`);
        # the pool starts empty and `resolving` says so until the shell has applied it.
        self.resolving = defer and (self._discovery.dynamic or (bool(sources) and not _source.self_checked()))
        endpoints = [] if self.resolving else self.first_endpoints(sources)
        self._pool = PoolState(self._discovery.target, endpoints, config, clock=clock, rng=rng, sources=sources)
        self._pool.resolver_error = self._discovery.last_error
        self._method_ids: dict[tuple[Any, ...], int] = {}
        self._plans: dict[str, Plan] = {}
        self._lock = threading.Lock()
        self._unroutable: set[Endpoint] = set()  # resolved endpoints no source can reach
        self._semconv = _telemetry.Semconv()  # read when the channel is built
        _telemetry.watch(self)
        _fork.register(self)

    def first_endpoints(self, sources: Sequence[Source]) -> list[Endpoint]:
        """The endpoints the channel starts with (blocking: DNS, a resolver, the
        source-binding self-check). A target that does not resolve, or that no source
        address can reach, is a `ConfigError`."""
        endpoints = self._discovery.first()
        if sources:
            _source.check_routable(endpoints, sources)
            _source.self_check()
        return endpoints

    def _after_fork(self, parent: int) -> None:
        """In a forked child: refuse calls, saying why, and never touch the parent's grpc
        objects again (closing or even collecting them could crash this process, so they
        are kept for its life)."""
        self._lock = threading.Lock()
        _PARENTS_OBJECTS.append([slot.channel for route in self._pool.routes for slot in route.slots])
        self._pool.after_fork(
            f"poolkit channel to {self._pool.target} was created in process {parent}, which this process "
            "was forked from: its connections are the parent's. Create poolkit channels in each worker, "
            "after the fork (gunicorn: in post_fork or on first use; multiprocessing: in the worker function)"
        )

    # -- discovery, shared by both shells -----------------------------------------------

    def _open_route(self, route: Route) -> None:
        """Open the channels of a new route and start watching it (shell-specific)."""
        raise NotImplementedError

    def _close_route(self, route: Route) -> None:
        """Stop watching a drained route and close its channels (shell-specific)."""
        raise NotImplementedError

    def _resolution_due(self) -> bool:
        pool = self._pool
        return not pool.closed and self._discovery.due(pool.clock(), pool.resolve_soon)

    def _apply(self, endpoints: list[Endpoint] | None) -> None:
        """Take discovery's answer (None: keep what we have)."""
        pool = self._pool
        pool.resolve_soon = False
        pool.resolver_error = self._discovery.last_error
        if endpoints is not None and not pool.closed:
            new = pool.unknown(endpoints)
            for endpoint in new:
                if not sources_for(endpoint, pool.sources) and endpoint not in self._unroutable:
                    self._unroutable.add(endpoint)
                    _log.warning(
                        "poolkit channel to %s: no source address of the family of %s; it gets no connection",
                        pool.target,
                        endpoint.address,
                    )
            added = pool.new_routes(new)
            for route in added:
                self._open_route(route)
            pool.update_endpoints(added, endpoints)

    def _retire_drained(self) -> None:
        for route in self._pool.take_drained():
            self._close_route(route)

    def _maintenance_wait(self) -> float:
        """Seconds until discovery next has something to do."""
        pool = self._pool
        if pool.resolve_soon or pool.draining:
            return _DRAIN_POLL
        return min(self._discovery.wait(pool.clock()), _IDLE_POLL)

    @property
    def config(self) -> PoolConfig:
        return self._pool.config

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot: endpoints with their status, health, ejections,
        slots, calls, errors and EWMA; recent transitions; the resolver's record."""
        snapshot = self._pool.describe()
        snapshot["resolver"] = self._discovery.describe()
        snapshot["port_budget"] = self.port_budget()
        return snapshot

    def port_budget(self) -> dict[str, dict[str, Any]]:
        """How much of the kernel's ephemeral port range this channel's source addresses
        use, keyed by source address ("default" when connections are not bound):

        - `routes`, `connections`: the pool's routes from that source, and their slots
          whose connection is READY;
        - `sockets`, `established`, `time_wait`: TCP sockets of this host (its network
          namespace) on that source address, whoever owns them ("default": from any
          address to this channel's endpoints), read from /proc/net/tcp{,6};
        - `ephemeral_range`, `share_in_use`: net.ipv4.ip_local_port_range and the share of
          it those sockets take. A port is needed per (source, server address) pair, so
          the share is an upper bound on how close any one server is to running out.
        """
        pool = self._pool
        routes = list(pool.routes)
        span = _source.port_range()
        size = span[1] - span[0] + 1 if span is not None else None
        if pool.sources:
            counts, _ = _source.socket_counts(source.address for source in pool.sources)
        else:
            servers = {(route.endpoint.host, route.endpoint.port) for route in routes}
            _, to_servers = _source.socket_counts((), servers)
            counts = {_UNBOUND: to_servers}
        budget: dict[str, dict[str, Any]] = {}
        for key, sockets in counts.items():
            mine = [route for route in routes if (route.source.address if route.source else _UNBOUND) == key]
            budget[key] = {
                "routes": len(mine),
                "connections": sum(slot.state is _READY for route in mine for slot in route.slots),
                "sockets": sockets.total,
                "established": sockets.established,
                "time_wait": sockets.time_wait,
                "ephemeral_range": list(span) if span is not None else None,
                "share_in_use": round(sockets.total / size, 6) if size else None,
            }
        return budget

    def _plan(self, method: str) -> Plan:
        """The retry plan of `method`, built on first use and shared by its multicallables
        (so hedging's latency window sees every call of the method)."""
        with self._lock:
            plan = self._plans.get(method)
            if plan is None:
                plan = self._plans[method] = Plan(self.config.retry_policy(method), self._pool.rng)
            return plan

    def _method_id(self, key: tuple[Any, ...]) -> int:
        with self._lock:
            return self._method_ids.setdefault(key, len(self._method_ids))

    def __repr__(self) -> str:
        pool = self._pool
        state = "closed" if pool.closed else pool.connectivity.name.lower()
        return f"<{self._public_name} {pool.target!r} {state} endpoints={len(pool.routes)} in_flight={pool.in_flight}>"


_UNARY_RESPONSE = frozenset({"unary_unary", "stream_unary"})
_STREAMING_REQUEST = frozenset({"stream_unary", "stream_stream"})


class MultiCallableBase:
    """What every multicallable shares: the method, and each slot's own grpc multicallable."""

    __slots__ = (
        "_call",
        "_deserializer",
        "_id",
        "_kind",
        "_method",
        "_pool",
        "_registered",
        "_serializer",
    )

    def __init__(
        self,
        channel: Pooled,
        kind: str,
        method: str,
        request_serializer: Serializer,
        response_deserializer: Deserializer,
        registered: bool | None,
    ) -> None:
        if not isinstance(method, str) or not method.startswith("/"):
            raise ConfigError("method", method, "must be a full method name like '/package.Service/Method'")
        self._pool = channel._pool
        self._kind = kind
        self._method = method
        self._serializer = request_serializer
        self._deserializer = response_deserializer
        self._registered = registered
        self._id = channel._method_id((kind, method, request_serializer, response_deserializer, registered))
        telemetry = (
            _telemetry.MethodTelemetry(method, channel._pool.target, registered, channel._semconv)
            if channel.config.telemetry
            else None
        )
        # What every call of this method shares, for its state machine (`_call.Call`).
        self._call = Method(
            channel._pool,
            channel._plan(method),
            unary_response=kind in _UNARY_RESPONSE,
            streaming_request=kind in _STREAMING_REQUEST,
            telemetry=telemetry,
        )

    def _bind(self, slot: Slot) -> Any:
        """This method on `slot`'s grpc channel, made on first use and kept."""
        make = getattr(slot.channel, self._kind)
        callable_ = make(self._method, self._serializer, self._deserializer, _registered_method=self._registered)
        slot.callables[self._id] = callable_
        return callable_

    def __repr__(self) -> str:
        return f"<poolkit {self._kind} {self._method}>"
