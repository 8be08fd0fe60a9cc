"""The sync shell: `poolkit.Channel`, a `grpc.Channel` backed by a pool of grpc channels.

Per call: ask the core for a slot, call that slot's own grpc multicallable, report the
outcome back. Everything else (which slot, what counts) is the core's business. The
multicallables are built once per (method, slot) and kept, so a call constructs nothing
but what grpc itself does.
"""

from __future__ import annotations

import atexit
import functools
import random
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Self

import grpc

from ._call import Call
from ._config import PoolConfig
from ._errors import ConfigError
from ._pool import PoolState, Route, Slot
from ._shell import (
    _PARENTS_OBJECTS,
    WHY_METHOD,
    WHY_TIMEOUT,
    ChannelOptions,
    Deserializer,
    MultiCallableBase,
    Pooled,
    Serializer,
    checked_grace,
    slot_options,
)
from ._sync_call import CallFuture, CallStream, blocking
from ._sync_watch import DiscoveryThread, HealthThread

# How long close() waits for each background thread; they stop promptly once told.
_JOIN_TIMEOUT = 2.0
# grpc's connectivity poller wakes every 0.2 s; one told to stop (and, perhaps, to act on a
# reconnect request first) is gone within two wake-ups.
_POLLERS_STOP = 0.5
# How often close() looks whether the pollers have stopped.
_POLLERS_LOOK = 0.005

# The sync channels not closed yet, which the exit hook closes (`_close_at_exit`), and the
# threads closing the connections of channels dropped without close(), which it waits for.
_OPEN: weakref.WeakSet[Channel] = weakref.WeakSet()
_CLOSERS: set[threading.Thread] = set()

_OK = grpc.StatusCode.OK
ConnectivityCallback = Callable[[grpc.ChannelConnectivity], None]

if TYPE_CHECKING:  # grpc-stubs makes the multicallables generic; grpc itself does not
    _UnaryUnaryBase = grpc.UnaryUnaryMultiCallable[Any, Any]
    _UnaryStreamBase = grpc.UnaryStreamMultiCallable[Any, Any]
    _StreamUnaryBase = grpc.StreamUnaryMultiCallable[Any, Any]
    _StreamStreamBase = grpc.StreamStreamMultiCallable[Any, Any]
else:
    _UnaryUnaryBase = grpc.UnaryUnaryMultiCallable
    _UnaryStreamBase = grpc.UnaryStreamMultiCallable
    _StreamUnaryBase = grpc.StreamUnaryMultiCallable
    _StreamStreamBase = grpc.StreamStreamMultiCallable


def insecure_channel(
    target: str | Sequence[str], *, config: PoolConfig | None = None, options: ChannelOptions | None = None
) -> Channel:
    """A pooled channel to every endpoint of `target`, without TLS."""
    return Channel(target, None, config=config, options=options)


def secure_channel(
    target: str | Sequence[str],
    credentials: grpc.ChannelCredentials,
    *,
    config: PoolConfig | None = None,
    options: ChannelOptions | None = None,
) -> Channel:
    """A pooled channel to every endpoint of `target` over TLS (and any call credentials
    composed into `credentials`). Certificates are checked against the name in `target`."""
    if not isinstance(credentials, grpc.ChannelCredentials):
        raise ConfigError("credentials", credentials, "must be grpc.ChannelCredentials")
    return Channel(target, credentials, config=config, options=options)


class Channel(Pooled, grpc.Channel):
    """A drop-in `grpc.Channel` that balances every call over a pool of connections."""

    def __init__(
        self,
        target: str | Sequence[str],
        credentials: grpc.ChannelCredentials | None,
        *,
        config: PoolConfig | None = None,
        options: ChannelOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(target, config, options, clock, rng)
        self._credentials = credentials
        self._subscribers: dict[ConnectivityCallback, None] = {}
        self._watchers: dict[Slot, Callable[[grpc.ChannelConnectivity], None]] = {}
        self._health: dict[Route, HealthThread] = {}
        self._kick_lock = threading.Lock()
        for route in self._pool.routes:
            self._open_route(route)
        dynamic = self._discovery.dynamic
        self._discovery_thread = DiscoveryThread(self, self._pool.target) if dynamic else None
        _OPEN.add(self)

    def _open_route(self, route: Route) -> None:
        for slot in route.slots:
            slot.channel = self._open(route, self._grpc_options)
        for slot in route.slots:
            # Weakly: grpc's polling thread holds the watcher, and a strong reference would
            # keep a dropped poolkit channel (and its connections) alive for ever.
            watcher = functools.partial(_watch, weakref.ref(self), weakref.ref(slot))
            slot.channel.subscribe(watcher, try_to_connect=self.config.connect_on_start)
            self._watchers[slot] = watcher
        health = self.config.health_check
        if health is not None:
            self._health[route] = HealthThread(self._pool, route, health, self._pool.rng)

    def _after_fork(self, parent: int) -> None:
        # The parent's threads do not exist here; their objects are kept, never touched.
        _PARENTS_OBJECTS.append((self._health, self._discovery_thread, self._watchers))
        self._health, self._discovery_thread, self._watchers = {}, None, {}
        self._kick_lock = threading.Lock()
        super()._after_fork(parent)

    def _reconnect(self, slot: Slot) -> None:
        """Open a new connection for a slot whose connection went idle (server GOAWAY,
        max connection age) now, rather than on the next call that happens to pick it."""
        with self._kick_lock:
            if self._pool.closed or slot not in self._watchers:
                return
            slot.channel.subscribe(_ignore, try_to_connect=True)
            slot.channel.unsubscribe(_ignore)

    def _close_route(self, route: Route) -> None:
        self._close_routes([route])

    def _close_routes(self, routes: list[Route]) -> None:
        """Stop watching these routes' connections, then close them.

        grpc's connectivity poller (one thread per watched grpc channel) wakes every 0.2 s;
        a channel closed while it is between two watches kills it with "Cannot monitor
        channel state" in its own thread, and grpc's close() waits out a watch in progress
        anyway, channel after channel. So every poller is told to stop first and all are
        waited for together (at most one or two wake-ups, including a reconnect request
        still to be acted on); then the closes are immediate.
        """
        _close_after_pollers(self._stop_watching(routes))

    def _stop_watching(self, routes: list[Route]) -> list[grpc.Channel]:
        """Stop the health checks of these routes and grpc's watch of their connections;
        their grpc channels, to close once grpc's pollers are gone (`_close_after_pollers`)."""
        slots = [slot for route in routes for slot in route.slots]
        with self._kick_lock:
            watchers = [(slot, self._watchers.pop(slot, None)) for slot in slots]
        for route in routes:
            checker = self._health.pop(route, None)
            if checker is not None:
                checker.stop()
        for slot, watcher in watchers:
            if watcher is not None:
                slot.channel.unsubscribe(watcher)
        return [slot.channel for slot in slots]

    def _discovery_step(self) -> float:
        """One round of the discovery thread: resolve if due, retire drained routes;
        the seconds to wait before the next round."""
        if self._resolution_due():
            self._apply(self._discovery.resolve(self._pool.clock()))
        self._retire_drained()
        return self._maintenance_wait()

    def _open(self, route: Route, options: ChannelOptions) -> grpc.Channel:
        endpoint = route.endpoint
        slot_opts = slot_options(route, options)
        if self._credentials is None:
            return grpc.insecure_channel(endpoint.grpc_target, options=slot_opts)
        return grpc.secure_channel(endpoint.grpc_target, self._credentials, options=slot_opts)

    # -- the grpc.Channel contract ---------------------------------------------------

    def unary_unary(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryUnaryMultiCallable[Any, Any]:
        return _UnaryUnary(self, "unary_unary", method, request_serializer, response_deserializer, _registered_method)

    def unary_stream(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryStreamMultiCallable[Any, Any]:
        return _UnaryStream(self, "unary_stream", method, request_serializer, response_deserializer, _registered_method)

    def stream_unary(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamUnaryMultiCallable[Any, Any]:
        return _StreamUnary(self, "stream_unary", method, request_serializer, response_deserializer, _registered_method)

    def stream_stream(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamStreamMultiCallable[Any, Any]:
        return _StreamStream(
            self, "stream_stream", method, request_serializer, response_deserializer, _registered_method
        )

    def subscribe(self, callback: ConnectivityCallback, try_to_connect: bool = False) -> None:
        """Call `callback` with the pool's connectivity now and on every change: READY
        while any connection is ready, else CONNECTING, IDLE, TRANSIENT_FAILURE."""
        if not callable(callback):
            raise ConfigError("callback", callback, "must be callable: it is called with a grpc.ChannelConnectivity")
        with self._lock:
            self._subscribers[callback] = None
            state = self._pool.connectivity
        if try_to_connect:
            for slot in self._pool.slots:
                slot.channel.subscribe(_ignore, try_to_connect=True)
                slot.channel.unsubscribe(_ignore)
        callback(state)

    def unsubscribe(self, callback: ConnectivityCallback) -> None:
        with self._lock:
            self._subscribers.pop(callback, None)

    def close(self, grace: float | None = None) -> None:
        """Stop admitting calls, wait up to `grace` seconds for those in flight, then close
        every connection (cancelling what is still running). Idempotent."""
        grace = checked_grace(grace)
        idle = threading.Event()
        if not self._pool.close(idle.set):
            return
        _OPEN.discard(self)
        if grace:
            idle.wait(grace)
        self._stop_background()
        self._close_routes(list(self._pool.routes))
        with self._lock:
            self._subscribers.clear()

    def _background(self) -> list[HealthThread | DiscoveryThread]:
        threads: list[HealthThread | DiscoveryThread] = list(self._health.values())
        if self._discovery_thread is not None:
            threads.append(self._discovery_thread)
        return threads

    def _stop_background(self) -> None:
        threads = self._background()
        for thread in threads:
            thread.stop()
        for thread in threads:
            thread.join(_JOIN_TIMEOUT)

    def __del__(self) -> None:
        # A channel dropped without close(): its threads must not outlive it, and its
        # connections are closed as close() would, off the collecting thread (which must
        # not wait for grpc's pollers). Left to grpc, each grpc channel would be closed as
        # it is collected, under its still-running poller.
        if sys.is_finalizing():
            # Collected as the interpreter shuts down, when no thread can start (3.11 waits
            # for ever on one) and the others stop wherever they are: the exit hook has
            # closed every channel still open before that (`_close_at_exit`).
            return
        for thread in getattr(self, "_health", {}).values():
            thread.stop()
        discovery = getattr(self, "_discovery_thread", None)
        if discovery is not None:
            discovery.stop()
        pool, watchers = getattr(self, "_pool", None), getattr(self, "_watchers", None)
        if pool is None or watchers is None or pool.closed:
            return
        for slot, watcher in list(watchers.items()):
            slot.channel.unsubscribe(watcher)
        watchers.clear()
        channels = [slot.channel for slot in pool.slots if slot.channel is not None]
        closer = threading.Thread(target=_close_dropped, args=(channels,), name="poolkit-close", daemon=True)
        _CLOSERS.add(closer)
        try:
            closer.start()
        except RuntimeError:  # 3.12 starts no thread in an exit hook either: left to grpc
            _CLOSERS.discard(closer)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------

    def _ask_why(self, slot: Slot) -> None:
        """Learn why `slot`'s connection failed, for the errors that name it: grpc keeps the
        last connect error (refused, TLS handshake, no local port) to fail calls with, and
        a call that does not wait for the connection is failed with it at once, without
        leaving this process. A health check is the call: harmless if it does get through."""
        if self._pool.closed:
            return
        ask = slot.channel.unary_unary(WHY_METHOD, request_serializer=None, response_deserializer=None)
        try:
            answer = ask.future(b"", timeout=WHY_TIMEOUT, wait_for_ready=False)
        except ValueError:  # the channel closed meanwhile
            return
        answer.add_done_callback(functools.partial(_heard_why, self._pool, slot))

    def _on_slot_state(self, slot: Slot, state: grpc.ChannelConnectivity) -> None:
        pool = self._pool
        was = slot.state
        overall = pool.set_slot_state(slot, state)
        if state is grpc.ChannelConnectivity.IDLE and was is grpc.ChannelConnectivity.READY:
            self._reconnect(slot)
        elif state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            self._ask_why(slot)
        if overall is None:
            return
        with self._lock:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            callback(overall)


def _watch(channel_ref: weakref.ref[Channel], slot_ref: weakref.ref[Slot], state: grpc.ChannelConnectivity) -> None:
    channel, slot = channel_ref(), slot_ref()
    if channel is not None and slot is not None:
        channel._on_slot_state(slot, state)


def _ignore(state: grpc.ChannelConnectivity) -> None:
    pass


def _heard_why(pool: PoolState, slot: Slot, answer: Any) -> None:
    if answer.code() is grpc.StatusCode.UNAVAILABLE:
        pool.note_connect_error(slot, answer.details() or "")


def _close_after_pollers(channels: list[grpc.Channel]) -> None:
    _await_pollers(channels, time.monotonic() + _POLLERS_STOP)
    for channel in channels:
        channel.close()


def _close_dropped(channels: list[grpc.Channel]) -> None:
    """The closing thread of a channel dropped without close()."""
    try:
        _close_after_pollers(channels)
    finally:
        _CLOSERS.discard(threading.current_thread())


def _close_at_exit() -> None:
    """Close the sync channels still open when the interpreter exits, as close() would
    without grace, and let those dropped just before finish closing.

    A channel never closed (a module global, say) would otherwise be collected during
    the interpreter's finalisation, too late: no thread can start then, and poolkit's and
    grpc's threads are stopped wherever they are. An exit hook runs before that, with
    every thread still running, and after threading has joined the program's own
    (non-daemon) threads. All channels are closed together: their pollers told to stop,
    then waited for at once. A channel with calls still running (in daemon threads) is
    left open, as grpc leaves its own: only poolkit's threads and grpc's pollers stop.
    """
    channels = [channel for channel in list(_OPEN) if not channel._pool.closed]
    closing = [channel for channel in channels if channel._pool.in_flight == 0 and channel._pool.close()]
    threads = [thread for channel in channels for thread in channel._background()]
    for thread in threads:
        thread.stop()
    watched = {channel: channel._stop_watching(list(channel._pool.routes)) for channel in channels}
    _await_pollers(
        [each for grpc_channels in watched.values() for each in grpc_channels], time.monotonic() + _POLLERS_STOP
    )
    for channel in closing:
        for grpc_channel in watched[channel]:
            grpc_channel.close()
    deadline = time.monotonic() + _JOIN_TIMEOUT
    for waited in [*threads, *list(_CLOSERS)]:
        waited.join(max(0.0, deadline - time.monotonic()))


atexit.register(_close_at_exit)


def _await_pollers(channels: list[grpc.Channel], deadline: float) -> None:
    """Wait until grpc's connectivity poller of each channel, no longer needed, has ended
    (read from grpc's own state; a grpc without it is not waited for)."""
    for channel in channels:
        state = getattr(channel, "_connectivity_state", None)
        while getattr(state, "polling", False) and time.monotonic() < deadline:
            time.sleep(_POLLERS_LOOK)


class _MultiCallable(MultiCallableBase):
    """A method of a poolkit channel: each call is a `_call.Call`, carried out by one of
    the sync drivers (`_sync_call`)."""

    __slots__ = ()

    def _new_call(
        self,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> Call:
        return Call(self._call, request, timeout, metadata, credentials, wait_for_ready, compression)


class _UnaryUnary(_MultiCallable, _UnaryUnaryBase):
    __slots__ = ()

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        call = self._new_call(request, timeout, metadata, credentials, wait_for_ready, compression)
        return blocking(self, call, None)

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Any, grpc.Call]:
        call = self._new_call(request, timeout, metadata, credentials, wait_for_ready, compression)
        return blocking(self, call, "with_call")  # type: ignore[no-any-return]

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return CallFuture(self, self._new_call(request, timeout, metadata, credentials, wait_for_ready, compression))


class _UnaryStream(_MultiCallable, _UnaryStreamBase):
    __slots__ = ()

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return CallStream(self, self._new_call(request, timeout, metadata, credentials, wait_for_ready, compression))


class _StreamUnary(_MultiCallable, _StreamUnaryBase):
    __slots__ = ()

    def __call__(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        call = self._new_call(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)
        return blocking(self, call, None)

    def with_call(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Any, grpc.Call]:
        call = self._new_call(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)
        return blocking(self, call, "with_call")  # type: ignore[no-any-return]

    def future(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        call = self._new_call(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)
        return CallFuture(self, call)


class _StreamStream(_MultiCallable, _StreamStreamBase):
    __slots__ = ()

    def __call__(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        call = self._new_call(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)
        return CallStream(self, call)
