"""The sync shell: `poolkit.Channel`, a `grpc.Channel` backed by a pool of grpc channels.

Per call: ask the core for a slot, call that slot's own grpc multicallable, report the
outcome back. Everything else (which slot, what counts) is the core's business. The
multicallables are built once per (method, slot) and kept, so a call constructs nothing
but what grpc itself does.
"""

from __future__ import annotations

import contextlib
import functools
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Self

import grpc

from ._config import PoolConfig
from ._errors import ConfigError
from ._pool import PoolState, Route, Slot
from ._retry import Attempts, replayable, resend, with_attempts
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
    end_failed,
    slot_options,
)
from ._sync_future import RetryingFuture
from ._sync_retry import RetryingStream, call_general, next_slot, raise_local, retry_blocking, start_on
from ._sync_watch import DiscoveryThread, HealthThread
from ._telemetry import Attempt, CallTrace, start_call

# How long close() waits for each background thread; they stop promptly once told.
_JOIN_TIMEOUT = 2.0
# grpc's connectivity poller wakes every 0.2 s; one told to stop (and, perhaps, to act on a
# reconnect request first) is gone within two wake-ups.
_POLLERS_STOP = 0.5
# How often close() looks whether the pollers have stopped.
_POLLERS_LOOK = 0.005

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
        _await_pollers([slot.channel for slot in slots], time.monotonic() + _POLLERS_STOP)
        for slot in slots:
            slot.channel.close()

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
        if not self._pool.close(checked_grace(grace)):
            return
        self._stop_background()
        self._close_routes(list(self._pool.routes))
        with self._lock:
            self._subscribers.clear()

    def _stop_background(self) -> None:
        threads: list[HealthThread | DiscoveryThread] = list(self._health.values())
        if self._discovery_thread is not None:
            threads.append(self._discovery_thread)
        for thread in threads:
            thread.stop()
        for thread in threads:
            thread.join(_JOIN_TIMEOUT)

    def __del__(self) -> None:
        # A channel dropped without close(): its threads must not outlive it, and its
        # connections are closed as close() would, off the collecting thread (which must
        # not wait for grpc's pollers). Left to grpc, each grpc channel would be closed as
        # it is collected, under its still-running poller.
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
        closer = threading.Thread(target=_close_after_pollers, args=(channels,), name="poolkit-close", daemon=True)
        with contextlib.suppress(RuntimeError):  # the interpreter is shutting down: no new threads
            closer.start()

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


def _await_pollers(channels: list[grpc.Channel], deadline: float) -> None:
    """Wait until grpc's connectivity poller of each channel, no longer needed, has ended
    (read from grpc's own state; a grpc without it is not waited for)."""
    for channel in channels:
        state = getattr(channel, "_connectivity_state", None)
        while getattr(state, "polling", False) and time.monotonic() < deadline:
            time.sleep(_POLLERS_LOOK)


class _MultiCallable(MultiCallableBase):
    __slots__ = ()

    def _with_call(
        self,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
        sample_latency: bool,
    ) -> tuple[Any, grpc.Call]:
        """A blocking `with_call` on the chosen slot; its duration is a latency sample
        only for unary requests (a request stream's pace is the caller's)."""
        trace = start_call(self._telemetry, metadata)
        if trace is not None or (sample_latency and self._special):
            return call_general(  # type: ignore[no-any-return]
                self,
                trace,
                "with_call",
                request,
                timeout,
                metadata,
                credentials,
                wait_for_ready,
                compression,
                not sample_latency,
            )
        pool = self._pool
        slot = pool.begin(wait_for_ready)
        call = slot.callables.get(self._id) or self._bind(slot)
        started = self._clock()
        # A request stream given as a list (or tuple) is sent from a fresh iterator each attempt.
        sent = request if sample_latency or not replayable(request, True) else resend(request, True)
        try:
            result = call.with_call(sent, timeout, metadata, credentials, wait_for_ready, compression)
        except grpc.RpcError as error:
            if end_failed(pool, slot, started if sample_latency else None, error.code(), error.details(), timeout):
                raise_local(error, timeout)
            return retry_blocking(  # type: ignore[no-any-return]
                self,
                error,
                self._plan.first(started, timeout, slot.route),
                "with_call",
                request,
                metadata,
                credentials,
                wait_for_ready,
                compression,
                not sample_latency,
            )
        except BaseException:  # grpc refused the call's arguments: nothing was sent
            pool.end_local(slot)
            raise
        pool.end(slot, started if sample_latency else None)
        return result  # type: ignore[no-any-return]

    def _end_call(
        self, slot: Slot, started: float | None, call_ref: weakref.ref[Any], attempt: Attempt | None, timeout: object
    ) -> None:
        call = call_ref()
        # A call collected unfinished was cancelled by grpc on the way out.
        code = call.code() if call is not None else grpc.StatusCode.CANCELLED
        if code is _OK:
            self._pool.end(slot, started)
            if attempt is not None:
                attempt.done(code, None)
            return
        details = call.details() if call is not None else "dropped unfinished"
        end_failed(self._pool, slot, started, code, details, timeout)
        if attempt is not None:
            attempt.done(code, details)


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
        trace = start_call(self._telemetry, metadata)
        if trace is not None or self._special:
            return call_general(
                self, trace, None, request, timeout, metadata, credentials, wait_for_ready, compression, False
            )
        pool = self._pool
        slot = pool.begin(wait_for_ready)
        call = slot.callables.get(self._id) or self._bind(slot)
        started = self._clock()
        try:
            response = call(request, timeout, metadata, credentials, wait_for_ready, compression)
        except grpc.RpcError as error:
            if end_failed(pool, slot, started, error.code(), error.details(), timeout):
                raise_local(error, timeout)
            return retry_blocking(
                self,
                error,
                self._plan.first(started, timeout, slot.route),
                None,
                request,
                metadata,
                credentials,
                wait_for_ready,
                compression,
                False,
            )
        except BaseException:  # grpc refused the call's arguments: nothing was sent
            pool.end_local(slot)
            raise
        pool.end(slot, started)
        return response

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Any, grpc.Call]:
        return self._with_call(request, timeout, metadata, credentials, wait_for_ready, compression, True)

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return _future(self, request, timeout, metadata, credentials, wait_for_ready, compression, False)


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
        return _start_stream(self, request, timeout, metadata, credentials, wait_for_ready, compression, False)


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
        return self._with_call(request_iterator, timeout, metadata, credentials, wait_for_ready, compression, False)[0]

    def with_call(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Any, grpc.Call]:
        return self._with_call(request_iterator, timeout, metadata, credentials, wait_for_ready, compression, False)

    def future(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return _future(self, request_iterator, timeout, metadata, credentials, wait_for_ready, compression, True)


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
        return _start_stream(self, request_iterator, timeout, metadata, credentials, wait_for_ready, compression, True)


def _future(
    multicallable: _MultiCallable,
    request: Any,
    timeout: float | None,
    metadata: Any,
    credentials: grpc.CallCredentials | None,
    wait_for_ready: bool | None,
    compression: grpc.Compression | None,
    streaming_request: bool,
) -> Any:
    """Start a call that returns a future at once: grpc's own future on a slot of its own
    when it is never sent again, else one that retries (`RetryingFuture`)."""
    trace = start_call(multicallable._telemetry, metadata)
    if trace is not None:
        metadata = trace.metadata
    if multicallable._plan.requeues and replayable(request, streaming_request):
        return RetryingFuture(
            multicallable,
            trace,
            request,
            timeout,
            metadata,
            credentials,
            wait_for_ready,
            compression,
            streaming_request,
        )
    slot = _begin(multicallable, wait_for_ready, trace)
    started = None if streaming_request else multicallable._clock()
    return start_on(
        multicallable,
        slot,
        "future",
        started,
        request,
        timeout,
        metadata,
        credentials,
        wait_for_ready,
        compression,
        trace,
    )


def _start_stream(
    multicallable: _MultiCallable,
    request: Any,
    timeout: float | None,
    metadata: Any,
    credentials: grpc.CallCredentials | None,
    wait_for_ready: bool | None,
    compression: grpc.Compression | None,
    streaming_request: bool,
) -> Any:
    """Start a response stream; behind a `RetryingStream` when it may be sent again."""
    trace = start_call(multicallable._telemetry, metadata)
    if trace is not None:
        metadata = trace.metadata
    started = multicallable._clock()
    again = replayable(request, streaming_request)
    sent = resend(request, streaming_request) if again else request
    restartable = again and multicallable._plan.requeues
    slot = _begin(multicallable, wait_for_ready, trace, restartable)
    call = start_on(
        multicallable, slot, None, None, sent, timeout, metadata, credentials, wait_for_ready, compression, trace
    )
    if not restartable:
        return call
    state: list[Attempts] = []  # made on the first failure
    route = slot.route

    def restart(error: grpc.RpcError) -> Any:
        if not state:
            state.append(multicallable._plan.first(started, timeout, route))
            state[0].trace = trace
        attempts = state[0]
        try:
            slot, attempt_timeout = next_slot(multicallable, attempts, error, wait_for_ready)
        except BaseException as failure:
            if trace is not None:
                trace.give_up(failure)
            raise
        return start_on(
            multicallable,
            slot,
            None,
            None,
            resend(request, streaming_request),
            attempt_timeout,
            with_attempts(metadata, attempts.previous),
            credentials,
            wait_for_ready,
            compression,
            trace,
        )

    return RetryingStream(call, restart, trace)


def _begin(
    multicallable: _MultiCallable, wait_for_ready: bool | None, trace: CallTrace | None, again: bool = False
) -> Slot:
    """The first slot of a call that returns at once (a future, a stream); with telemetry,
    a refusal ends the call's span, and `again` says whether a failed attempt may be
    followed by another (else the first attempt's end is the call's)."""
    if trace is None:
        return multicallable._pool.begin(wait_for_ready)
    trace.again = again
    try:
        return multicallable._pool.begin(wait_for_ready)
    except BaseException as error:
        trace.give_up(error)
        raise
