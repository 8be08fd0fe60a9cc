"""The sync shell's retry loops: they sleep and send, `_retry.Plan` decides.

Entered only once a call has failed (or, for hedged methods and attempt timeouts, from
the start): a call that succeeds first time never comes here.
"""

from __future__ import annotations

import functools
import math
import queue
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from ._errors import ConfigError
from ._pool import REQUEUE, RETRY, Slot
from ._retry import REQUEUE as REQUEUE_NOW
from ._retry import Attempts, replayable, resend, with_attempts
from ._shell import end_failed, failed_locally, may_send_again, take_again, take_hedge_slot
from ._telemetry import CallTrace, invoke

if TYPE_CHECKING:
    from ._channel import _MultiCallable

_OK = grpc.StatusCode.OK
_CANCELLED = grpc.StatusCode.CANCELLED
_UNKNOWN = grpc.StatusCode.UNKNOWN


def raise_local(error: grpc.RpcError, timeout: object) -> NoReturn:
    """Raise what a blocking call that failed in this process raises: grpc's error, unless
    the timeout was NaN (grpc reports only 'Deadline Exceeded')."""
    if isinstance(timeout, float) and math.isnan(timeout):
        raise ConfigError("timeout", timeout, "must be a number of seconds, or None") from error
    raise error


def next_slot(
    multicallable: _MultiCallable, state: Attempts, error: grpc.RpcError, wait_for_ready: bool | None
) -> tuple[Slot, float | None]:
    """Wait out the plan's backoff and take the next attempt's slot and timeout; raise
    `error` when the plan, the budget, the deadline or the pool says no."""
    pool, plan, clock = multicallable._pool, multicallable._plan, multicallable._clock
    delay = plan.decide(state, error, clock())
    if delay is None:
        raise error
    kind = REQUEUE if delay == REQUEUE_NOW else RETRY
    if delay > 0:  # a backoff is waited out only if the budget will pay for what follows
        if not may_send_again(pool, state, kind):
            raise error
        time.sleep(delay)
    timeout = plan.next_timeout(state, delay, clock())
    if timeout is not None and timeout <= 0:
        raise error
    slot = take_again(pool, state, None if delay > 0 else kind, wait_for_ready)
    if slot is None:
        raise error
    return slot, timeout


def retry_blocking(
    multicallable: _MultiCallable,
    error: grpc.RpcError,
    state: Attempts,
    attribute: str | None,
    request: Any,
    metadata: Any,
    credentials: grpc.CallCredentials | None,
    wait_for_ready: bool | None,
    compression: grpc.Compression | None,
    streaming_request: bool,
) -> Any:
    """Send a failed blocking call (`__call__`, or `with_call` by `attribute`) again while
    the plan allows; its result, or the last attempt's error."""
    if not replayable(request, streaming_request) or failed_locally(error.code(), error.details(), None):
        raise error
    while True:
        slot, timeout = next_slot(multicallable, state, error, wait_for_ready)
        try:
            return send_on(
                multicallable,
                slot,
                attribute,
                resend(request, streaming_request),
                timeout,
                with_attempts(metadata, state.previous),
                credentials,
                wait_for_ready,
                compression,
                not streaming_request,
                state.trace,
            )
        except grpc.RpcError as failure:
            error = failure


def send_on(
    multicallable: _MultiCallable,
    slot: Slot,
    attribute: str | None,
    request: Any,
    timeout: float | None,
    metadata: Any,
    credentials: grpc.CallCredentials | None,
    wait_for_ready: bool | None,
    compression: grpc.Compression | None,
    sample_latency: bool,
    trace: CallTrace | None = None,
) -> Any:
    """One blocking attempt on a slot already taken, its outcome reported to the pool
    (and to the call's telemetry)."""
    pool, clock = multicallable._pool, multicallable._clock
    bound = slot.callables.get(multicallable._id) or multicallable._bind(slot)
    send = getattr(bound, attribute) if attribute else bound
    attempt = trace.attempt(slot.route) if trace is not None else None
    started = clock() if sample_latency else None
    try:
        result = invoke(trace, send, request, timeout, metadata, credentials, wait_for_ready, compression)
    except grpc.RpcError as error:
        local = end_failed(pool, slot, started, error.code(), error.details(), timeout)
        if attempt is not None:
            attempt.done(error.code(), error.details())
        if local:
            raise_local(error, timeout)
        raise
    except BaseException:  # grpc refused the call's arguments: nothing was sent
        pool.end_local(slot)
        if attempt is not None:
            attempt.done(_UNKNOWN, None)
        raise
    pool.end(slot, started)
    if attempt is not None:
        attempt.done(_OK, None)
    return result


def start_on(
    multicallable: _MultiCallable,
    slot: Slot,
    attribute: str | None,
    started: float | None,
    request: Any,
    timeout: float | None,
    metadata: Any,
    credentials: grpc.CallCredentials | None,
    wait_for_ready: bool | None,
    compression: grpc.Compression | None,
    trace: CallTrace | None = None,
) -> Any:
    """Start a call that returns at once (a future, a response stream) on `slot`, and
    release the slot from grpc's callback, which runs whichever way the call ends:
    response, error, deadline, cancel(), or the call object being dropped unfinished."""
    bound = slot.callables.get(multicallable._id) or multicallable._bind(slot)
    attempt = trace.attempt(slot.route) if trace is not None else None
    try:
        target = getattr(bound, attribute) if attribute else bound
        call = invoke(trace, target, request, timeout, metadata, credentials, wait_for_ready, compression)
    except BaseException:  # grpc refused the call's arguments: nothing was sent
        multicallable._pool.end_local(slot)
        if attempt is not None:
            attempt.done(_UNKNOWN, None)
        raise
    if not isinstance(call, grpc.Call):
        # A client interceptor on the slot's channel (opentelemetry-instrumentation-grpc's,
        # for one) may hand back a bare iterator of responses: it ends when it is used up.
        return _messages_of(call, multicallable, slot, attempt)
    # add_callback, not add_done_callback: grpc keeps done-callbacks bound to the call
    # object, which would keep an abandoned stream alive (and its slot busy) until the
    # server ends it; a plain callback with a weak reference lets grpc cancel it on collection.
    end = functools.partial(multicallable._end_call, slot, started, weakref.ref(call), attempt, timeout)
    if not call.add_callback(end):
        end()  # already over
    return call


def _messages_of(messages: Any, multicallable: _MultiCallable, slot: Slot, attempt: Any) -> Any:
    """A response stream that is only an iterator, its end reported to the pool when it
    is used up, fails, or is dropped."""
    code, details = _OK, None
    try:
        yield from messages
    except grpc.RpcError as error:
        code, details = error.code(), error.details()
        raise
    except GeneratorExit:
        code = _CANCELLED
        raise
    except BaseException:
        code = _UNKNOWN
        raise
    finally:
        multicallable._pool.end(slot, None, None if code is _OK else code)
        if attempt is not None:
            attempt.done(code, details)


def call_general(
    multicallable: _MultiCallable,
    trace: CallTrace | None,
    attribute: str | None,
    request: Any,
    timeout: float | None,
    metadata: Any,
    credentials: grpc.CallCredentials | None,
    wait_for_ready: bool | None,
    compression: grpc.Compression | None,
    streaming_request: bool,
) -> Any:
    """A blocking call off the plain path: traced, hedged, or with an attempt timeout."""
    if trace is not None:
        metadata = trace.metadata
    try:
        result = _first_attempt(
            multicallable,
            trace,
            attribute,
            request,
            timeout,
            metadata,
            credentials,
            wait_for_ready,
            compression,
            streaming_request,
        )
    except BaseException as error:
        if trace is not None:
            trace.give_up(error)
        raise
    if trace is not None:
        trace.end(_OK, None)
    return result


def _first_attempt(
    multicallable: _MultiCallable,
    trace: CallTrace | None,
    attribute: str | None,
    request: Any,
    timeout: float | None,
    metadata: Any,
    credentials: grpc.CallCredentials | None,
    wait_for_ready: bool | None,
    compression: grpc.Compression | None,
    streaming_request: bool,
) -> Any:
    plan, pool, clock = multicallable._plan, multicallable._pool, multicallable._clock
    hedge_after = None if streaming_request else plan.hedge_delay()
    if hedge_after is not None:
        return _hedged(
            multicallable,
            trace,
            hedge_after,
            attribute,
            request,
            timeout,
            metadata,
            credentials,
            wait_for_ready,
            compression,
        )
    now = clock()
    state = plan.first(now, timeout, None)
    state.trace = trace
    attempt_timeout = plan.first_timeout(state, now)
    slot = pool.begin(wait_for_ready)
    state.tried.add(slot.route)
    # A request stream given as a list (or tuple) is sent from a fresh iterator each attempt.
    sent = resend(request, True) if streaming_request and replayable(request, True) else request
    try:
        result = send_on(
            multicallable,
            slot,
            attribute,
            sent,
            attempt_timeout,
            metadata,
            credentials,
            wait_for_ready,
            compression,
            not streaming_request,
            trace,
        )
    except grpc.RpcError as error:
        return retry_blocking(
            multicallable,
            error,
            state,
            attribute,
            request,
            metadata,
            credentials,
            wait_for_ready,
            compression,
            streaming_request,
        )
    if not streaming_request and plan.latency is not None:
        plan.latency.add(clock() - now)
    return result


def _hedged(
    multicallable: _MultiCallable,
    trace: CallTrace | None,
    hedge_after: float,
    attribute: str | None,
    request: Any,
    timeout: float | None,
    metadata: Any,
    credentials: grpc.CallCredentials | None,
    wait_for_ready: bool | None,
    compression: grpc.Compression | None,
) -> Any:
    """Send the call; if no answer came within `hedge_after`, send it to another endpoint
    too (budget allowing). The first success wins and the other attempt is cancelled; if
    both fail, the last failure goes through the ordinary retry decisions."""
    plan, pool, clock = multicallable._plan, multicallable._pool, multicallable._clock
    now = clock()
    state = plan.first(now, timeout, None)
    state.trace = trace
    finished: queue.SimpleQueue[Any] = queue.SimpleQueue()
    running: list[Any] = []

    def launch(slot: Slot, attempt_timeout: float | None, attempt_metadata: Any) -> None:
        args = (request, attempt_timeout, attempt_metadata, credentials, wait_for_ready, compression)
        running.append(_hedge_attempt(multicallable, trace, slot, args, finished))

    slot = pool.begin(wait_for_ready)
    state.tried.add(slot.route)
    launch(slot, plan.first_timeout(state, now), metadata)
    pending = 1
    try:
        first = finished.get(timeout=hedge_after)
    except queue.Empty:
        first = None
        hedge_slot = take_hedge_slot(multicallable, state, wait_for_ready)
        if hedge_slot is not None:
            launch(hedge_slot, plan.first_timeout(state, clock()), with_attempts(metadata, 1))
            pending += 1
    while True:
        future, started = first if first is not None else finished.get()
        first = None
        pending -= 1
        if future.code() is _OK:
            for other in running:
                if other is not future:
                    other.cancel()
            if plan.latency is not None:
                plan.latency.add(clock() - started)
            response = future.result()
            return (response, future) if attribute == "with_call" else response
        if pending == 0:
            break
    error = future.exception()
    return retry_blocking(
        multicallable, error, state, attribute, request, metadata, credentials, wait_for_ready, compression, False
    )


def _hedge_attempt(
    multicallable: _MultiCallable,
    trace: CallTrace | None,
    slot: Slot,
    args: tuple[Any, ...],
    finished: queue.SimpleQueue[Any],
) -> Any:
    """Start one attempt of a hedged call as a future on `slot`; when it ends, release the
    slot and put (future, start) on `finished`."""
    pool, clock = multicallable._pool, multicallable._clock
    bound = slot.callables.get(multicallable._id) or multicallable._bind(slot)
    attempt = trace.attempt(slot.route, hedge=True) if trace is not None else None
    started = clock()
    try:
        future = invoke(trace, bound.future, *args)
    except BaseException:  # grpc refused the call's arguments: nothing was sent
        pool.end_local(slot)
        if attempt is not None:
            attempt.done(_UNKNOWN, None)
        raise

    def done(future: Any) -> None:
        code = future.code()
        if code is _OK:
            pool.end(slot, started)
        else:
            end_failed(pool, slot, started, code, future.details(), args[1])
        if attempt is not None:
            attempt.done(code, future.details())
        finished.put((future, started))

    future.add_done_callback(done)
    return future


if TYPE_CHECKING:  # grpc-stubs makes Future generic; grpc itself does not
    _FutureBase = grpc.Future[Any]
else:
    _FutureBase = grpc.Future


class RetryingStream(grpc.Call, _FutureBase):
    """A response stream that is sent again, while no response has been read, when the
    plan allows; once a response has been read, errors go to the caller as they come.

    Holds grpc's call object of the current attempt and passes everything else to it.
    """

    __slots__ = ("_call", "_received", "_restart", "_trace")

    def __init__(self, call: Any, restart: Callable[[grpc.RpcError], Any], trace: CallTrace | None) -> None:
        self._call = call
        self._restart = restart  # given the failed attempt's error: the next attempt's call, or raises
        self._received = False
        self._trace = trace

    def __del__(self) -> None:
        if self._trace is not None:
            self._trace.no_more()  # dropped: its attempt's end (grpc cancels it) is the call's

    def __iter__(self) -> RetryingStream:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                message = next(self._call)
            except grpc.RpcError as error:
                if self._received:
                    raise
                self._call = self._restart(error)
                continue
            if not self._received:
                self._received = True
                if self._trace is not None:
                    self._trace.no_more()
            return message

    next = __next__

    # grpc.Call and grpc.Future: the current attempt's.
    def initial_metadata(self) -> Any:
        return self._call.initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._call.trailing_metadata()

    def code(self) -> Any:
        return self._call.code()

    def details(self) -> Any:
        return self._call.details()

    def debug_error_string(self) -> Any:
        return self._call.debug_error_string()

    def is_active(self) -> bool:
        return self._call.is_active()  # type: ignore[no-any-return]

    def time_remaining(self) -> Any:
        return self._call.time_remaining()

    def cancel(self) -> bool:
        return self._call.cancel()  # type: ignore[no-any-return]

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return self._call.add_callback(callback)  # type: ignore[no-any-return]

    def cancelled(self) -> bool:
        return self._call.cancelled()  # type: ignore[no-any-return]

    def running(self) -> bool:
        return self._call.running()  # type: ignore[no-any-return]

    def done(self) -> bool:
        return self._call.done()  # type: ignore[no-any-return]

    def result(self, timeout: float | None = None) -> Any:
        return self._call.result(timeout)

    def exception(self, timeout: float | None = None) -> Any:
        return self._call.exception(timeout)

    def traceback(self, timeout: float | None = None) -> Any:
        return self._call.traceback(timeout)

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._call.add_done_callback(fn)

    def __repr__(self) -> str:
        return repr(self._call)
