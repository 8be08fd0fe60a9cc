"""The sync shell's drivers of a call's state machine (`_call.Call`): they start grpc
calls, sleep and report what grpc said; the machine decides.

- `blocking`: `__call__` and `with_call`, a loop in the caller's thread;
- `CallFuture`: `future()` (and a hedged blocking call), driven by grpc's callbacks and a timer;
- `CallStream`: a response stream, driven by the caller's iteration.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from ._call import CANCELLED_DETAILS, Attempt, Call, Step, described
from ._telemetry import invoke

if TYPE_CHECKING:
    from ._channel import _MultiCallable

    _FutureBase = grpc.Future[Any]  # grpc-stubs makes Future generic; grpc itself does not
else:
    _FutureBase = grpc.Future

_OK = grpc.StatusCode.OK
_CANCELLED = grpc.StatusCode.CANCELLED

_log = logging.getLogger(__name__)


def _start(multicallable: _MultiCallable, call: Call, attempt: Attempt, how: str | None) -> Any:
    """Hand `attempt` to grpc on its slot's own multicallable (`how`: None for the
    blocking call, or "with_call", "future"); grpc refusing the arguments ends the call."""
    slot = attempt.slot
    bound = slot.callables.get(multicallable._id) or multicallable._bind(slot)
    send = getattr(bound, how) if how is not None else bound
    try:
        return invoke(
            call.trace,
            send,
            call.payload(),
            attempt.timeout,
            call.attempt_metadata(attempt),
            call.credentials,
            call.wait_for_ready,
            call.compression,
        )
    except grpc.RpcError:
        raise
    except BaseException as error:  # grpc refused the call's arguments: nothing was sent
        call.refused(attempt, error)
        raise


def blocking(multicallable: _MultiCallable, call: Call, how: str | None) -> Any:
    """A blocking call (`how`: None for `__call__`, "with_call"): its result, or the
    error of the attempt that ended it. A hedged call runs as a future."""
    step = call.start()
    if call.timer is not None and step is Step.SEND:
        future = CallFuture(multicallable, call, step)
        response = future.result()
        return (response, future) if how == "with_call" else response
    error: grpc.RpcError | None = None
    while True:
        if step is Step.SEND:
            attempt = call.sending
            assert attempt is not None
            try:
                result = _start(multicallable, call, attempt, how)
            except grpc.RpcError as failed:
                error = failed
                call.ended(attempt, failed.code(), failed.details(), failed.trailing_metadata())
                step = call.next()
                continue
            call.ended(attempt, _OK, None)
            return result
        if step is Step.WAIT:
            assert call.timer is not None  # a blocking call waits only for a backoff
            time.sleep(call.timer)
            step = call.timer_fired()
            continue
        if call.error is not None:
            raise call.error
        assert error is not None
        raise error


class CallFuture(grpc.Call, _FutureBase):
    """A unary-response call started with `future()`: every attempt is a grpc future, and
    grpc's callback thread (or the timer's) carries out what the call decides next, while
    the caller holds this one future. `result()`, `code()`, the done-callbacks and
    `cancel()` are the call's, not an attempt's."""

    __slots__ = ("_call", "_callbacks", "_gate", "_lock", "_multicallable", "_timer")

    def __init__(self, multicallable: _MultiCallable, call: Call, step: Step | None = None) -> None:
        self._multicallable = multicallable
        self._call = call
        self._lock = threading.Lock()
        # Held until the call is over: waiters pass through it once it is released. A bare
        # lock, not a threading.Event (a Python-level Condition): this is the per-call path.
        self._gate = threading.Lock()
        self._gate.acquire()
        self._timer: threading.Timer | None = None
        self._callbacks: list[Callable[[], None]] | None = []
        if step is None:
            step = call.start()
            if step is Step.FINISH:  # the pool had no route for it
                assert call.error is not None
                raise call.error
        self._carry_out(step, first=True)

    # -- the driver ------------------------------------------------------------------------

    def _carry_out(self, step: Step, first: bool = False) -> None:
        call = self._call
        while step is Step.SEND:
            attempt = call.sending
            assert attempt is not None
            timer = call.timer
            try:
                handle = _start(self._multicallable, call, attempt, "future")
            except Exception:
                if first:
                    raise  # the caller's arguments: `future()` raises, as grpc's does
                _log.exception("poolkit: could not send a call again; it ends with its error")
                step = Step.FINISH
                break
            attempt.handle = handle
            if call.cancelled:  # cancelled while this attempt was being started
                handle.cancel()
            handle.add_done_callback(functools.partial(self._attempt_done, attempt))
            if timer is None:
                return
            step = Step.WAIT
        if step is Step.WAIT:
            if call.timer is not None:
                self._arm(call.timer)
            return
        self._finished()

    def _attempt_done(self, attempt: Attempt, handle: Any) -> None:
        """grpc's callback thread: an attempt ended."""
        code = handle.code()
        if code is _OK:
            self._call.ended(attempt, code, None)
        else:
            self._call.ended(attempt, code, handle.details(), handle.trailing_metadata())
        self._carry_out(self._call.next())

    def _arm(self, seconds: float) -> None:
        """Arm the call's timer (the hedge delay, a backoff), replacing an older one: a
        timer already firing is told apart by its token."""
        timer = threading.Timer(seconds, self._fired, (self._call.timer_token,))
        timer.daemon = True
        with self._lock:
            if self._callbacks is None:
                return
            older, self._timer = self._timer, timer
        if older is not None:
            older.cancel()
        timer.start()

    def _fired(self, token: int) -> None:
        self._carry_out(self._call.timer_fired(token))

    def _finished(self) -> None:
        """The call is over: cancel its losers, wake the waiters, run the callbacks."""
        for loser in self._call.outstanding():
            if loser.handle is not None:
                loser.handle.cancel()
        with self._lock:
            callbacks, self._callbacks = self._callbacks, None
            timer, self._timer = self._timer, None
        if callbacks is None:
            return
        if timer is not None:
            timer.cancel()
        self._gate.release()
        for callback in callbacks:
            _run(callback)

    def _outcome(self, timeout: float | None = None) -> Any:
        """The grpc future of the attempt that ended the call (None: it ended without one)."""
        call = self._call
        if not call.over:
            gate = self._gate
            if not gate.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
                raise grpc.FutureTimeoutError()
            gate.release()
        final = call.final
        return final.handle if final is not None else None

    # -- grpc.Future ------------------------------------------------------------------------

    def cancel(self) -> bool:
        """Cancel the call: the attempts in flight (grpc's cancel), or the retry it waits
        to send. False when the call is over."""
        call = self._call
        if call.over:
            return False
        running = call.cancel()
        if not running:  # between attempts: over now
            self._finished()
            return True
        cancelled = False
        for attempt in running:
            if attempt.handle is not None and attempt.handle.cancel():
                # grpc's callback comes later, from its own thread: the cancel is the
                # attempt's end now, as grpc's future reports it at once.
                call.ended(attempt, _CANCELLED, CANCELLED_DETAILS)
                cancelled = True
        if cancelled:
            self._carry_out(call.next())
        return cancelled

    def cancelled(self) -> bool:
        call = self._call
        if call.final is not None:
            return call.final.code is _CANCELLED
        return isinstance(call.error, grpc.FutureCancelledError)

    def running(self) -> bool:
        return not self._call.over

    def done(self) -> bool:
        return self._call.over

    def result(self, timeout: float | None = None) -> Any:
        final = self._outcome(timeout)
        if final is None:
            raise self._error()
        return final.result()

    def exception(self, timeout: float | None = None) -> Any:
        final = self._outcome(timeout)
        if final is None:
            return self._error()
        return final.exception()

    def traceback(self, timeout: float | None = None) -> Any:
        final = self._outcome(timeout)
        if final is None:
            return None
        return final.traceback()

    def _error(self) -> BaseException:
        error = self._call.error
        assert error is not None
        if isinstance(error, grpc.FutureCancelledError):
            raise error
        return error

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        callback = functools.partial(fn, self)
        with self._lock:
            if self._callbacks is not None:
                self._callbacks.append(callback)
                return
        _run(callback)

    # -- grpc.Call: the attempt that ended the call ------------------------------------------

    def initial_metadata(self) -> Any:
        final = self._outcome()
        return None if final is None else final.initial_metadata()

    def trailing_metadata(self) -> Any:
        final = self._outcome()
        return None if final is None else final.trailing_metadata()

    def code(self) -> Any:
        final = self._outcome()
        return described(self._call.error)[0] if final is None else final.code()

    def details(self) -> Any:
        final = self._outcome()
        return described(self._call.error)[1] if final is None else final.details()

    def debug_error_string(self) -> Any:
        final = self._outcome()
        return None if final is None else final.debug_error_string()

    def is_active(self) -> bool:
        return not self._call.over

    def time_remaining(self) -> Any:
        return self._call.remaining()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if self._callbacks is None:
                return False
            self._callbacks.append(callback)
            return True

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._call!r}>"


def _run(callback: Callable[[], None]) -> None:
    """A caller's callback: its exception is logged, as grpc does, and the others still run."""
    try:
        callback()
    except Exception:  # noqa: BLE001 - one caller's callback must not stop the others
        _log.exception("poolkit: exception calling a future's callback")


class CallStream(grpc.Call, _FutureBase):
    """A response stream: the caller's iteration drives the call. Before the first message
    a failed attempt may be followed by another (the call decides); from then on, errors
    go to the caller as they come. Holds grpc's call object of the current attempt and
    passes everything else to it; dropped unfinished, grpc cancels it."""

    __slots__ = ("_attempt", "_call", "_handle", "_multicallable", "_tracks_end")

    def __init__(self, multicallable: _MultiCallable, call: Call) -> None:
        self._multicallable = multicallable
        self._call = call
        step = call.start()
        if step is Step.FINISH:
            assert call.error is not None
            raise call.error
        self._launch()

    def _launch(self) -> None:
        call = self._call
        attempt = call.sending
        assert attempt is not None
        self._attempt = attempt
        handle = _start(self._multicallable, call, attempt, None)
        self._handle = handle
        # An interceptor on the slot's channel (opentelemetry-instrumentation-grpc's, for
        # one) may hand back a bare iterator of responses: its end is seen by iterating.
        self._tracks_end = not isinstance(handle, grpc.Call)
        if not self._tracks_end:
            # add_callback, not add_done_callback: grpc keeps done-callbacks bound to the
            # call object, which would keep an abandoned stream alive (and its slot busy)
            # until the server ends it; with a weak reference grpc cancels it on collection.
            end = functools.partial(_stream_ended, call, attempt, weakref.ref(handle))
            if not handle.add_callback(end):
                end()  # already over

    def __del__(self) -> None:
        call = getattr(self, "_call", None)
        if call is None:
            return
        if getattr(self, "_tracks_end", False):
            call.ended(self._attempt, _CANCELLED, "dropped unfinished")
        call.abandon()

    def __iter__(self) -> CallStream:
        return self

    def __next__(self) -> Any:
        call = self._call
        while True:
            try:
                message = next(self._handle)
            except grpc.RpcError as error:
                call.ended(self._attempt, error.code(), error.details(), error.trailing_metadata())
                step = call.next()
                while step is Step.WAIT:
                    assert call.timer is not None  # a stream waits only for a backoff
                    time.sleep(call.timer)
                    step = call.timer_fired()
                if step is Step.FINISH:
                    raise
                self._launch()
                continue
            except StopIteration:
                if self._tracks_end:
                    call.ended(self._attempt, _OK, None)
                raise
            if not call.read:
                call.first_message()
            return message

    next = __next__

    # grpc.Call and grpc.Future: the current attempt's.
    def initial_metadata(self) -> Any:
        return self._handle.initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._handle.trailing_metadata()

    def code(self) -> Any:
        return self._handle.code()

    def details(self) -> Any:
        return self._handle.details()

    def debug_error_string(self) -> Any:
        return self._handle.debug_error_string()

    def is_active(self) -> bool:
        return self._handle.is_active()  # type: ignore[no-any-return]

    def time_remaining(self) -> Any:
        return self._handle.time_remaining()

    def cancel(self) -> bool:
        self._call.cancel()
        return self._handle.cancel()  # type: ignore[no-any-return]

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return self._handle.add_callback(callback)  # type: ignore[no-any-return]

    def cancelled(self) -> bool:
        return self._handle.cancelled()  # type: ignore[no-any-return]

    def running(self) -> bool:
        return self._handle.running()  # type: ignore[no-any-return]

    def done(self) -> bool:
        return self._handle.done()  # type: ignore[no-any-return]

    def result(self, timeout: float | None = None) -> Any:
        return self._handle.result(timeout)

    def exception(self, timeout: float | None = None) -> Any:
        return self._handle.exception(timeout)

    def traceback(self, timeout: float | None = None) -> Any:
        return self._handle.traceback(timeout)

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._handle.add_done_callback(fn)

    def __repr__(self) -> str:
        return repr(self._handle)


def _stream_ended(call: Call, attempt: Attempt, handle_ref: weakref.ref[Any]) -> None:
    """grpc's callback: a stream's attempt ended, however (read to the end, failed,
    cancelled, or collected unfinished, which grpc cancels)."""
    handle = handle_ref()
    if handle is None:
        call.ended(attempt, _CANCELLED, "dropped unfinished")
        return
    code = handle.code()
    if code is _OK:
        call.ended(attempt, code, None)
    else:
        call.ended(attempt, code, handle.details(), handle.trailing_metadata())
