"""The asyncio shell: `poolkit.aio.Channel`, a `grpc.aio.Channel` backed by a pool of
grpc.aio channels, deciding through the same core as the sync shell.

Per call: ask the core for a slot, start the call on that slot's own grpc.aio
multicallable, and return grpc's call object (streams behind a thin proxy that
cancels them when dropped); a done-callback reports the outcome to the core, whichever
way the call ends (awaited, cancelled, timed out, or a stream left unread). No lock is
held across an await; nothing is built per call but the callback.

What grpc.aio would misreport is refused before a slot is taken: a NaN timeout,
metadata grpc would not send, a request that will not serialise (grpc.aio sends an
empty message instead). A call that fails without leaving this process is the caller's
failure, not the endpoint's (`PoolState.end_local`), and is never sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import random
import re
import time
import weakref
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any, Self

import grpc
import grpc.aio

from ._aio_watch import check_health, discover, follow_connectivity
from ._config import PoolConfig
from ._errors import ConfigError, PoolClosedError, PoolUnavailableError
from ._pool import REQUEUE, RETRY, Route, Slot
from ._retry import REQUEUE as REQUEUE_NOW
from ._retry import Attempts, replayable, with_attempts
from ._shell import (
    _PARENTS_OBJECTS,
    ChannelOptions,
    Deserializer,
    MultiCallableBase,
    Pooled,
    Serializer,
    checked_grace,
    end_failed,
    failed_locally,
    may_send_again,
    slot_options,
    take_again,
    take_hedge_slot,
)
from ._telemetry import Attempt, CallTrace, invoke, start_call

_OK = grpc.StatusCode.OK
_UNKNOWN = grpc.StatusCode.UNKNOWN
_INTERNAL = grpc.StatusCode.INTERNAL
_DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED
Interceptors = Sequence[grpc.aio.ClientInterceptor]

if TYPE_CHECKING:  # grpc-stubs makes the multicallables generic; grpc itself does not
    _UnaryUnaryBase = grpc.aio.UnaryUnaryMultiCallable[Any, Any]
    _UnaryStreamBase = grpc.aio.UnaryStreamMultiCallable[Any, Any]
    _StreamUnaryBase = grpc.aio.StreamUnaryMultiCallable[Any, Any]
    _StreamStreamBase = grpc.aio.StreamStreamMultiCallable[Any, Any]
    _UnaryStreamCallBase = grpc.aio.UnaryStreamCall[Any, Any]
    _StreamStreamCallBase = grpc.aio.StreamStreamCall[Any, Any]
    _UnaryUnaryCallBase = grpc.aio.UnaryUnaryCall[Any, Any]
    _StreamUnaryCallBase = grpc.aio.StreamUnaryCall[Any, Any]
else:
    _UnaryUnaryBase = grpc.aio.UnaryUnaryMultiCallable
    _UnaryStreamBase = grpc.aio.UnaryStreamMultiCallable
    _StreamUnaryBase = grpc.aio.StreamUnaryMultiCallable
    _StreamStreamBase = grpc.aio.StreamStreamMultiCallable
    _UnaryStreamCallBase = grpc.aio.UnaryStreamCall
    _StreamStreamCallBase = grpc.aio.StreamStreamCall
    _UnaryUnaryCallBase = grpc.aio.UnaryUnaryCall
    _StreamUnaryCallBase = grpc.aio.StreamUnaryCall


class AioPoolUnavailableError(grpc.aio.AioRpcError, PoolUnavailableError):  # type: ignore[misc]
    """`PoolUnavailableError` that is also a `grpc.aio.AioRpcError`, for asyncio handlers."""

    def __init__(self, details: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        grpc.aio.AioRpcError.__init__(self, code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)
        PoolUnavailableError.__init__(self, details, code)


class AioPoolClosedError(AioPoolUnavailableError, PoolClosedError):  # type: ignore[misc]
    """A call was made on a poolkit.aio channel after `close()`."""


def insecure_channel(
    target: str | Sequence[str],
    *,
    config: PoolConfig | None = None,
    options: ChannelOptions | None = None,
    compression: grpc.Compression | None = None,
    interceptors: Interceptors | None = None,
) -> Channel:
    """A pooled asyncio channel to every endpoint of `target`, without TLS."""
    return Channel(target, None, config=config, options=options, compression=compression, interceptors=interceptors)


def secure_channel(
    target: str | Sequence[str],
    credentials: grpc.ChannelCredentials,
    *,
    config: PoolConfig | None = None,
    options: ChannelOptions | None = None,
    compression: grpc.Compression | None = None,
    interceptors: Interceptors | None = None,
) -> Channel:
    """A pooled asyncio channel to every endpoint of `target` over TLS."""
    if not isinstance(credentials, grpc.ChannelCredentials):
        raise ConfigError("credentials", credentials, "must be grpc.ChannelCredentials")
    return Channel(
        target, credentials, config=config, options=options, compression=compression, interceptors=interceptors
    )


class Channel(Pooled, grpc.aio.Channel):
    """A drop-in `grpc.aio.Channel` that balances every call over a pool of connections."""

    _public_name = "poolkit.aio.Channel"

    def __init__(
        self,
        target: str | Sequence[str],
        credentials: grpc.ChannelCredentials | None,
        *,
        config: PoolConfig | None = None,
        options: ChannelOptions | None = None,
        compression: grpc.Compression | None = None,
        interceptors: Interceptors | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if compression is not None and not isinstance(compression, grpc.Compression):
            # grpc.aio would take it too and fail on the first call, naming neither.
            raise ConfigError("compression", compression, "must be None or a grpc.Compression")
        super().__init__(target, config, options, clock, rng)
        self._credentials = credentials
        self._compression = compression
        self._interceptors = list(interceptors) if interceptors is not None else None
        # Background tasks (connectivity, health, discovery) need the event loop; they
        # start here when one is running, else with the first call or channel_ready().
        self._tasks: dict[object, list[asyncio.Task[None]]] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()
        self._health_channels: dict[Route, grpc.aio.Channel] = {}
        for route in self._pool.routes:
            self._open_route(route)
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop()
            self._start_background()

    def _after_fork(self, parent: int) -> None:
        # The parent's tasks belong to its event loop; they are kept, never touched.
        _PARENTS_OBJECTS.append((self._tasks, self._health_channels))
        self._tasks, self._health_channels = None, {}
        super()._after_fork(parent)

    def _open_route(self, route: Route) -> None:
        for slot in route.slots:
            slot.channel = self._open(route)
            if self.config.connect_on_start:
                slot.channel.get_state(try_to_connect=True)
        if self._tasks is not None:
            self._start_route(route)

    def _start_route(self, route: Route) -> None:
        assert self._tasks is not None
        pool = self._pool
        tasks = [
            asyncio.ensure_future(follow_connectivity(pool, slot, self.config.connect_on_start)) for slot in route.slots
        ]
        health = self.config.health_check
        if health is not None:
            channel = route.slots[0].channel
            if self._interceptors:
                # The caller's interceptors are for the caller's calls: health checks get a
                # connection of their own rather than showing up in their traces and metrics.
                channel = self._health_channels[route] = self._open(route, interceptors=False)
            tasks.append(asyncio.ensure_future(check_health(pool, route, channel, health, pool.rng)))
        self._tasks[route] = tasks

    def _start_background(self) -> None:
        """Start the background tasks on the running loop (once)."""
        if self._tasks is not None or self._pool.closed:
            return
        self._tasks = {}
        for route in self._pool.routes:
            self._start_route(route)
        if self._discovery.dynamic:
            self._tasks[self] = [asyncio.ensure_future(discover(weakref.ref(self)))]

    def _close_route(self, route: Route) -> None:
        for task in self._tasks.pop(route, []) if self._tasks is not None else []:
            task.cancel()
        channels = [slot.channel for slot in route.slots]
        if route in self._health_channels:
            channels.append(self._health_channels.pop(route))
        for channel in channels:
            closing = asyncio.ensure_future(channel.close(None))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    def __del__(self) -> None:
        # A channel dropped without close(): its tasks must not outlive it.
        for tasks in (getattr(self, "_tasks", None) or {}).values():
            for task in tasks:
                task.cancel()

    def _open(self, route: Route, *, interceptors: bool = True) -> grpc.aio.Channel:
        endpoint = route.endpoint
        options = slot_options(route, self._grpc_options)
        chain = self._interceptors if interceptors else None
        # By keyword: wrappers of these functions (opentelemetry-instrumentation-grpc's
        # adds its interceptors to `interceptors=`) expect them so.
        if self._credentials is None:
            return grpc.aio.insecure_channel(
                endpoint.grpc_target, options=options, compression=self._compression, interceptors=chain
            )
        return grpc.aio.secure_channel(
            endpoint.grpc_target, self._credentials, options=options, compression=self._compression, interceptors=chain
        )

    # -- the grpc.aio.Channel contract -----------------------------------------------------

    def unary_unary(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
        return _UnaryUnary(self, "unary_unary", method, request_serializer, response_deserializer, _registered_method)

    def unary_stream(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.UnaryStreamMultiCallable[Any, Any]:
        return _UnaryStream(self, "unary_stream", method, request_serializer, response_deserializer, _registered_method)

    def stream_unary(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.StreamUnaryMultiCallable[Any, Any]:
        return _StreamUnary(self, "stream_unary", method, request_serializer, response_deserializer, _registered_method)

    def stream_stream(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.StreamStreamMultiCallable[Any, Any]:
        return _StreamStream(
            self, "stream_stream", method, request_serializer, response_deserializer, _registered_method
        )

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """The pool's connectivity: READY while any connection is ready, else CONNECTING,
        IDLE, TRANSIENT_FAILURE; SHUTDOWN once closed."""
        if self._pool.closed:
            return grpc.ChannelConnectivity.SHUTDOWN
        for slot in self._pool.slots:
            self._pool.set_slot_state(slot, slot.channel.get_state(try_to_connect))
        return self._pool.connectivity

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        while self.get_state() is last_observed_state and not self._pool.closed:
            waits = [
                asyncio.ensure_future(slot.channel.wait_for_state_change(slot.channel.get_state()))
                for slot in self._pool.slots
            ]
            # grpc.aio does not always wake a state waiter when the channel closes under it.
            waits.append(asyncio.ensure_future(self._closed.wait()))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()

    async def channel_ready(self) -> None:
        """Wait until at least one connection of the pool is ready."""
        self._start_background()
        while (state := self.get_state(try_to_connect=True)) is not grpc.ChannelConnectivity.READY:
            if state is grpc.ChannelConnectivity.SHUTDOWN:
                raise AioPoolClosedError(f"poolkit channel to {self._pool.target} is closed")
            await self.wait_for_state_change(state)

    async def close(self, grace: float | None = None) -> None:
        """Stop admitting calls, let those in flight finish for up to `grace` seconds, then
        close every connection (cancelling what is still running). Idempotent."""
        grace = checked_grace(grace)
        if not self._pool.close():
            return
        self._closed.set()
        # Health streams first: a channel's close(grace) would wait for them too.
        tasks = [task for route_tasks in (self._tasks or {}).values() for task in route_tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._closing, return_exceptions=True)
        channels = [slot.channel for slot in self._pool.slots]
        await asyncio.gather(
            *(channel.close(grace) for channel in channels), *(c.close(None) for c in self._health_channels.values())
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot: endpoints, slots, their state, calls, errors, EWMA."""
        self.get_state()
        return super().describe()


class _MultiCallable(MultiCallableBase):
    __slots__ = ("_owner", "_serialize")

    def __init__(
        self,
        channel: Channel,
        kind: str,
        method: str,
        request_serializer: Serializer,
        response_deserializer: Deserializer,
        registered: bool | None,
    ) -> None:
        super().__init__(channel, kind, method, request_serializer, response_deserializer, registered)
        self._owner = channel
        # grpc.aio logs a request its serializer refuses and sends an empty message in its
        # place, so poolkit serialises a single request itself, before the call starts, and
        # fails the call instead. grpc then gets the bytes and nothing to do (no second
        # serialisation), unless the caller's interceptors are on the channel: they are
        # handed the message, as grpc.aio hands it to them, and grpc serialises it again.
        self._serialize = None if self._streaming_request else request_serializer
        if self._serialize is not None and not channel._interceptors:
            self._serializer = None  # what the slot's grpc multicallable serialises with (`_bind`)

    # What a call of this kind does besides starting: whether its duration is a latency
    # sample (unary responses) and whether its caller gets the cancelling stream proxy.
    _sample_latency = False
    _streaming = False
    _streaming_request = False

    def _start(
        self,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> Any:
        if isinstance(timeout, float) and math.isnan(timeout):
            # NaN: grpc would end the call at once as DEADLINE_EXCEEDED, naming neither.
            raise ConfigError("timeout", timeout, "must be a number of seconds, or None")
        if metadata is not None:
            _check_metadata(metadata)
        if self._serialize is not None:
            request = self._serialized(request)
        if self._owner._tasks is None:
            self._owner._start_background()
        trace = start_call(self._telemetry, metadata)
        if trace is not None:
            return self._start_traced(trace, request, timeout, credentials, wait_for_ready, compression)
        slot = self._begin(wait_for_ready)
        started = self._clock()
        args = (request, timeout, metadata, credentials, wait_for_ready, compression)
        if self._special and self._sample_latency:
            return _UnaryCall.special(_Restart(self, started, slot, args))
        call = self._invoke(slot, args, timeout, metadata)
        call.add_done_callback(
            functools.partial(self._end_call, slot, started if self._sample_latency else None, timeout)
        )
        if self._plan.requeues and replayable(request, self._streaming_request):
            restart = _Restart(self, started, slot, args)
            return _Stream(call, restart) if self._streaming else _UnaryCall(call, restart)
        if self._streaming:
            return _Stream(call, None)
        if self._streaming_request:
            # Never sent again, but awaited through poolkit all the same (`_expired`).
            return _UnaryCall(call, _Restart(self, started, slot, args, resend=False))
        return call

    def _serialized(self, request: Any) -> Any:
        """The request as the slot's grpc multicallable takes it (see `__init__`): its bytes,
        or the request itself once it is known to serialise."""
        assert self._serialize is not None
        try:
            data = self._serialize(request)
        except Exception as error:
            # The status and words sync grpc gives such a call (and `failed_locally` knows).
            raise grpc.aio.AioRpcError(
                _INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(), "Exception serializing request!", None
            ) from error
        return data if self._serializer is None else request

    def _begin(self, wait_for_ready: bool | None) -> Slot:
        """The first slot of a call; the pool's refusal as a grpc.aio error."""
        try:
            return self._pool.begin(wait_for_ready)
        except PoolClosedError as error:
            raise AioPoolClosedError(error.details(), error.code()) from None
        except PoolUnavailableError as error:
            raise AioPoolUnavailableError(error.details(), error.code()) from None

    def _start_traced(
        self,
        trace: CallTrace,
        request: Any,
        timeout: float | None,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> Any:
        """`_start` for a call with telemetry: every attempt reports its end through
        grpc's done-callback, and the call's end is told by its last attempt or by
        whoever stops sending it again."""
        metadata = trace.metadata
        restartable = self._plan.requeues and replayable(request, self._streaming_request)
        trace.again = restartable
        try:
            slot = self._begin(wait_for_ready)
        except BaseException as error:
            trace.give_up(error)
            raise
        args = (request, timeout, metadata, credentials, wait_for_ready, compression)
        restart = _Restart(self, self._clock(), slot, args, trace, resend=restartable)
        try:
            if self._special and self._sample_latency:
                return _UnaryCall.special(restart)
            call = self._send(slot, args, timeout, metadata, trace)
        except BaseException as error:
            trace.give_up(error)  # grpc refused to start it: nothing will send it again
            raise
        if self._streaming:
            return _Stream(call, restart if restartable else None, trace)
        # A request stream's call is awaited through poolkit even when never sent again (`_expired`).
        return _UnaryCall(call, restart) if restartable or self._streaming_request else call

    def _invoke(
        self, slot: Slot, args: _Args, timeout: float | None, metadata: Any, attempt: Attempt | None = None
    ) -> Any:
        """Start one attempt on `slot`; if grpc refuses to start it (the caller's
        arguments), the slot is released as the caller's failure, not the endpoint's."""
        request, _, _, credentials, wait_for_ready, compression = args
        bound = slot.callables.get(self._id) or self._bind(slot)
        try:
            return invoke(
                attempt.call if attempt is not None else None,
                bound,
                request,
                timeout=timeout,
                metadata=metadata,
                credentials=credentials,
                wait_for_ready=wait_for_ready,
                compression=compression,
            )
        except BaseException:
            self._pool.end_local(slot)
            if attempt is not None:
                attempt.done(_UNKNOWN, None)
            raise

    def _send(
        self,
        slot: Slot,
        args: _Args,
        timeout: float | None,
        metadata: Any,
        trace: CallTrace | None = None,
        hedge: bool = False,
    ) -> Any:
        """Start one attempt on a slot already taken, its outcome reported to the pool
        (and the call's telemetry) by grpc's done-callback."""
        attempt = trace.attempt(slot.route, hedge) if trace is not None else None
        call = self._invoke(slot, args, timeout, metadata, attempt)
        started = self._clock() if self._sample_latency else None
        if attempt is None:
            call.add_done_callback(functools.partial(self._end_call, slot, started, timeout))
        else:
            call.add_done_callback(functools.partial(self._end_attempt, slot, started, timeout, attempt))
        return call

    async def _next_call(self, state: Attempts, error: BaseException, args: _Args) -> Any:
        """Wait out the plan's backoff and start the next attempt; raise `error` when the
        plan, the budget, the deadline or the pool says no."""
        if not isinstance(error, grpc.aio.AioRpcError):
            raise error
        if failed_locally(error.code(), error.details(), args[1]):
            raise error  # the caller's mistake: it would fail the same way anywhere
        pool, plan, clock = self._pool, self._plan, self._clock
        delay = plan.decide(state, error, clock())
        if delay is None:
            raise error
        kind = REQUEUE if delay == REQUEUE_NOW else RETRY
        if delay > 0:  # a backoff is waited out only if the budget will pay for what follows
            if not may_send_again(pool, state, kind):
                raise error
            await asyncio.sleep(delay)
        timeout = plan.next_timeout(state, delay, clock())
        if timeout is not None and timeout <= 0:
            raise error
        slot = take_again(pool, state, None if delay > 0 else kind, args[4])
        if slot is None:
            raise error
        return self._send(slot, args, timeout, with_attempts(args[2], state.previous), state.trace)

    def _end_call(self, slot: Slot, started: float | None, timeout: float | None, call: Any) -> None:
        code = _finished(call.code(), _UNKNOWN)
        if code is _OK:
            self._pool.end(slot, started)
        else:
            end_failed(self._pool, slot, started, code, _finished(call.details(), None), timeout)

    def _end_attempt(
        self, slot: Slot, started: float | None, timeout: float | None, attempt: Attempt, call: Any
    ) -> None:
        code = _finished(call.code(), _UNKNOWN)
        details = _finished(call.details(), None)
        if code is _OK:
            self._pool.end(slot, started)
        else:
            end_failed(self._pool, slot, started, code, details, timeout)
        attempt.done(code, details)


def _check_metadata(metadata: Any) -> None:
    """Refuse, naming the key, metadata grpc would refuse: for a unary call grpc.aio raises
    its internal ExecuteBatchError (or a TypeError) when the call is awaited, and leaves
    the call unfinished, its slot taken, until it is collected."""
    for pair in metadata:
        try:
            key, value = pair
        except (TypeError, ValueError):
            raise ConfigError("metadata", pair, "each item must be a (key, value) pair") from None
        text = key.decode("latin-1") if isinstance(key, bytes) else key
        if not isinstance(text, str):
            raise TypeError(f"metadata key {key!r}: Expected str or bytes, not {type(key).__name__}")
        if _METADATA_KEY.match(text) is None:
            raise ConfigError("metadata", key, _BAD_KEY)
        if text.endswith("-bin"):
            if not isinstance(value, bytes):
                raise TypeError(f"metadata value of {key!r}: Expected bytes (a '-bin' key), not {type(value).__name__}")
        elif isinstance(value, str):
            if not (value.isascii() and value.isprintable()):
                raise ConfigError("metadata", key, _BAD_VALUE)
        elif isinstance(value, bytes):
            if _METADATA_VALUE.match(value) is None:
                raise ConfigError("metadata", key, _BAD_VALUE)
        else:
            raise TypeError(f"metadata value of {key!r}: Expected str or bytes, not {type(value).__name__}")


# What grpc core accepts in metadata (HTTP/2 header names are lowercase): a key of
# lowercase letters, digits, '-', '_' and '.'; a value of printable ASCII unless its key
# ends in '-bin' (any bytes, sent base64-encoded).
_METADATA_KEY = re.compile(r"[-._0-9a-z]+\Z")
_METADATA_VALUE = re.compile(rb"[\x20-\x7e]*\Z")
_BAD_KEY = "a metadata key must be lowercase letters, digits, '-', '_' or '.' (gRPC refuses others)"
_BAD_VALUE = "its value must be printable ASCII; other bytes need a key ending in '-bin'"


def _finished(coroutine: Any, otherwise: Any) -> Any:
    """What a finished call's status coroutine (`code()`, `details()`) returns, read
    without suspending: on a finished call it completes at its first step."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    except Exception:  # noqa: BLE001 - an interceptor's own exception surfaces here
        return otherwise
    coroutine.close()  # not expected of a done call; count it failed rather than lose it
    return otherwise


_Args = tuple[Any, float | None, Any, grpc.CallCredentials | None, bool | None, grpc.Compression | None]


class _UnaryCall(_UnaryUnaryCallBase, _StreamUnaryCallBase):
    """A unary-response call that may be sent again: awaiting it awaits the current
    attempt, and on a failure the plan allows, the next one. Everything else is the
    current attempt's (grpc's call object).

    Every attempt's outcome reaches the pool through grpc's done-callback, as grpc
    reports it, whatever the caller does with this object: a task cancelled just after
    its call succeeded leaves the call OK, and a finished call held unawaited is not in
    flight."""

    __slots__ = ("_call", "_hedge_after", "_restart")

    def __init__(self, call: Any, restart: _Restart) -> None:
        self._call = call
        self._restart = restart
        self._hedge_after: float | None = None

    def __del__(self) -> None:
        trace = self._restart.trace
        if trace is not None:
            trace.no_more()  # dropped: its attempt's end is the call's

    @classmethod
    def special(cls, restart: _Restart) -> _UnaryCall:
        """The first attempt of a hedged method, or one whose attempts have their own timeout."""
        multicallable, started = restart.multicallable, restart.started
        plan = multicallable._plan
        state = restart.state = plan.first(started, restart.args[1], restart.slot.route)
        state.trace = restart.trace
        hedge_after = plan.hedge_delay()
        call = multicallable._send(
            restart.slot,
            restart.args,
            plan.first_timeout(state, started),
            restart.args[2],
            restart.trace,
            hedge_after is not None,
        )
        self = cls(call, restart)
        self._hedge_after = hedge_after
        return self

    def __await__(self) -> Generator[Any, None, Any]:
        if self._hedge_after is not None:
            return (yield from self._hedged().__await__())
        call = self._call
        try:
            response = yield from call.__await__()
        except grpc.aio.AioRpcError as error:
            return (yield from self._again(error).__await__())
        except asyncio.CancelledError as cancelled:
            if _expired(call):
                raise _deadline_exceeded() from cancelled
            raise
        except Exception:
            _abandon(call)
            raise
        multicallable = self._restart.multicallable
        if multicallable._plan.latency is not None:
            multicallable._plan.latency.add(multicallable._clock() - self._restart.started)
        return response

    async def _again(self, error: BaseException) -> Any:
        while True:
            self._call = call = await self._restart.next_call(error)
            try:
                return await call
            except grpc.aio.AioRpcError as failure:
                error = failure
            except asyncio.CancelledError as cancelled:
                if _expired(call):
                    raise _deadline_exceeded() from cancelled
                raise
            except Exception:
                _abandon(call)
                raise

    async def _hedged(self) -> Any:
        restart = self._restart
        multicallable, state, args = restart.multicallable, restart.state, restart.args
        assert state is not None
        assert self._hedge_after is not None
        started = multicallable._clock()
        attempts = {asyncio.ensure_future(_outcome(self._call)): (self._call, started)}
        try:
            done, _ = await asyncio.wait(attempts, timeout=self._hedge_after)
            if not done:
                slot = take_hedge_slot(multicallable, state, args[4])
                if slot is not None:
                    now = multicallable._clock()
                    timeout = multicallable._plan.first_timeout(state, now)
                    call = multicallable._send(slot, args, timeout, with_attempts(args[2], 1), restart.trace, True)
                    attempts[asyncio.ensure_future(_outcome(call))] = (call, now)
            error: BaseException | None = None
            while attempts:
                done, _ = await asyncio.wait(attempts, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    call, began = attempts.pop(task)
                    self._call = call
                    response, error = task.result()
                    if error is None:
                        if multicallable._plan.latency is not None:
                            multicallable._plan.latency.add(multicallable._clock() - began)
                        return response
        finally:
            for task, (call, _) in attempts.items():
                call.cancel()
                task.cancel()
        assert error is not None
        return await self._again(error)

    # grpc.aio.Call: the current attempt's.
    async def initial_metadata(self) -> Any:
        return await self._call.initial_metadata()

    async def trailing_metadata(self) -> Any:
        return await self._call.trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        return await self._call.code()  # type: ignore[no-any-return]

    async def details(self) -> str:
        return await self._call.details()  # type: ignore[no-any-return]

    async def wait_for_connection(self) -> None:
        await self._call.wait_for_connection()

    async def write(self, request: Any) -> None:
        await self._call.write(request)

    async def done_writing(self) -> None:
        await self._call.done_writing()

    def cancelled(self) -> bool:
        return self._call.cancelled()  # type: ignore[no-any-return]

    def done(self) -> bool:
        return self._call.done()  # type: ignore[no-any-return]

    def time_remaining(self) -> float | None:
        return self._call.time_remaining()  # type: ignore[no-any-return]

    def cancel(self) -> bool:
        return self._call.cancel()  # type: ignore[no-any-return]

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._call.add_done_callback(callback)

    def __repr__(self) -> str:
        return repr(self._call)


def _expired(call: Any) -> bool:
    """Whether a CancelledError out of `call` is its deadline, not a cancel: grpc.aio
    raises one, rather than DEADLINE_EXCEEDED, when a request stream that has sent
    nothing meets a deadline already past. It is, if the caller's own task is not being
    cancelled and the call's deadline has passed."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        return False
    try:
        remaining = call.time_remaining()
    except NotImplementedError:  # an intercepted call cannot say
        return False
    return remaining is not None and remaining <= 0


def _deadline_exceeded() -> grpc.aio.AioRpcError:
    """The error grpc.aio gives a call whose deadline has passed."""
    return grpc.aio.AioRpcError(_DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), "Deadline Exceeded", None)


def _abandon(call: Any) -> None:
    """An attempt raised what is not a grpc status (grpc.aio's task for it failed): grpc
    would never end it, nor its done-callback release its slot, until it is collected.
    Cancelling it ends it now (CANCELLED, which says nothing against the endpoint)."""
    call.cancel()


async def _outcome(call: Any) -> tuple[Any, BaseException | None]:
    """An attempt's response or error, for waiting on several attempts at once."""
    try:
        return await call, None
    except grpc.aio.AioRpcError as error:
        return None, error


class _Restart:
    """What a call needs to be sent again: its method, start, first slot, arguments,
    and (made on its first failure) its retry record. With `resend` False, the call is
    never sent again (a request stream that cannot be replayed, or no retry policy)."""

    __slots__ = ("args", "multicallable", "resend", "slot", "started", "state", "trace")

    def __init__(
        self,
        multicallable: _MultiCallable,
        started: float,
        slot: Slot,
        args: _Args,
        trace: CallTrace | None = None,
        *,
        resend: bool = True,
    ) -> None:
        self.multicallable = multicallable
        self.started = started
        self.slot = slot
        self.args = args
        self.state: Attempts | None = None
        self.trace = trace
        self.resend = resend

    async def next_call(self, error: BaseException) -> Any:
        if not self.resend:
            raise error
        if self.state is None:
            self.state = self.multicallable._plan.first(self.started, self.args[1], self.slot.route)
            self.state.trace = self.trace
        try:
            return await self.multicallable._next_call(self.state, error, self.args)
        except BaseException as failure:
            if self.trace is not None:
                self.trace.give_up(failure)
            raise


class _UnaryUnary(_MultiCallable, _UnaryUnaryBase):
    __slots__ = ()
    _sample_latency = True

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._start(request, timeout, metadata, credentials, wait_for_ready, compression)


class _UnaryStream(_MultiCallable, _UnaryStreamBase):
    __slots__ = ()
    _streaming = True

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._start(request, timeout, metadata, credentials, wait_for_ready, compression)


class _StreamUnary(_MultiCallable, _StreamUnaryBase):
    __slots__ = ()
    _streaming_request = True

    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._start(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)


class _StreamStream(_MultiCallable, _StreamStreamBase):
    __slots__ = ()
    _streaming = True
    _streaming_request = True

    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._start(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)


class _Stream(_UnaryStreamCallBase, _StreamStreamCallBase):
    """grpc.aio's streaming call, as the caller sees it, cancelled when the caller drops it.

    grpc.aio's own tasks keep its call object alive, so a response stream left unread
    would stay open, and its slot busy, until the server ended it. Callers hold this
    proxy instead; when it is collected unfinished, the call is cancelled and its slot
    released. Iteration goes through `_Messages`, which holds the proxy, so
    `async for reply in stub.Stream(request)` keeps the call alive while it runs.
    """

    __slots__ = ("_call", "_restart", "_trace")

    def __init__(self, call: Any, restart: _Restart | None, trace: CallTrace | None = None) -> None:
        self._call = call
        self._restart = restart  # until the first message: how to send the call again
        self._trace = trace

    def __del__(self) -> None:
        if self._trace is not None:
            self._trace.no_more()  # dropped: its attempt's end (cancelled here) is the call's
        call = self._call
        if not call.done():
            call.cancel()

    def _received(self) -> None:
        """The first message came: the call is not sent again from now on."""
        self._restart = None
        if self._trace is not None:
            self._trace.no_more()

    def __aiter__(self) -> _Messages:
        return _Messages(self, self._call.__aiter__())

    async def read(self) -> Any:
        try:
            while self._restart is not None:
                try:
                    message = await self._call.read()
                except grpc.aio.AioRpcError as error:
                    self._call = await self._restart.next_call(error)
                    continue
                self._received()
                return message
            return await self._call.read()
        except asyncio.CancelledError as cancelled:
            if _expired(self._call):
                raise _deadline_exceeded() from cancelled
            raise

    async def write(self, request: Any) -> None:
        await self._call.write(request)

    async def done_writing(self) -> None:
        await self._call.done_writing()

    async def wait_for_connection(self) -> None:
        await self._call.wait_for_connection()

    async def initial_metadata(self) -> Any:
        return await self._call.initial_metadata()

    async def trailing_metadata(self) -> Any:
        return await self._call.trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        return await self._call.code()  # type: ignore[no-any-return]

    async def details(self) -> str:
        return await self._call.details()  # type: ignore[no-any-return]

    def cancelled(self) -> bool:
        return self._call.cancelled()  # type: ignore[no-any-return]

    def done(self) -> bool:
        return self._call.done()  # type: ignore[no-any-return]

    def time_remaining(self) -> float | None:
        return self._call.time_remaining()  # type: ignore[no-any-return]

    def cancel(self) -> bool:
        return self._call.cancel()  # type: ignore[no-any-return]

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._call.add_done_callback(callback)

    def __repr__(self) -> str:
        return repr(self._call)


class _Messages:
    """The response iterator of a `_Stream`; holding the stream keeps the call open.
    Once a message has come, each next one is grpc's iterator's, untouched."""

    __slots__ = ("_iterator", "_started", "_stream")

    def __init__(self, stream: _Stream, iterator: Any) -> None:
        self._stream = stream
        self._iterator = iterator
        self._started = False

    def __aiter__(self) -> _Messages:
        return self

    def __anext__(self) -> Any:
        if self._started:
            return self._iterator.__anext__()
        return self._first()

    async def _first(self) -> Any:
        """The first message, sending the call again while the plan allows (and a
        deadline that grpc.aio reports as a cancellation, as the DEADLINE_EXCEEDED it is)."""
        stream = self._stream
        try:
            while True:
                try:
                    message = await self._iterator.__anext__()
                    break
                except grpc.aio.AioRpcError as error:
                    if stream._restart is None:
                        raise
                    stream._call = await stream._restart.next_call(error)
                    self._iterator = stream._call.__aiter__()
        except asyncio.CancelledError as cancelled:
            if _expired(stream._call):
                raise _deadline_exceeded() from cancelled
            raise
        stream._received()
        self._started = True
        return message
