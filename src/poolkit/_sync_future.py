"""The sync shell's retrying future: `future()` of a method that may be sent again.

A blocking call retries in the caller's thread; a future has no thread of its own. Its
attempts end in grpc's callback thread, which decides at once (the same `_retry.Plan`
decisions as every other call shape), sends a requeue at once and a retry after its
backoff from a timer, and hedges from a timer. The caller holds one future throughout:
`result()`, `code()`, the done-callbacks and `cancel()` are the call's, not an attempt's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from ._pool import REQUEUE, RETRY, Slot
from ._retry import REQUEUE as REQUEUE_NOW
from ._retry import Attempts, resend, with_attempts
from ._shell import end_failed, may_send_again, take_again, take_hedge_slot
from ._telemetry import Attempt, CallTrace, invoke

if TYPE_CHECKING:
    from ._channel import _MultiCallable

    _FutureBase = grpc.Future[Any]  # grpc-stubs makes Future generic; grpc itself does not
else:
    _FutureBase = grpc.Future

_OK = grpc.StatusCode.OK
_UNKNOWN = grpc.StatusCode.UNKNOWN
_CANCELLED = grpc.StatusCode.CANCELLED
_CANCELLED_DETAILS = "Locally cancelled by application!"  # grpc's words for cancel()

_log = logging.getLogger(__name__)


class _Cancelled:
    """The outcome of a future cancelled between attempts (no attempt to speak for it)."""


_CANCELLED_BETWEEN = _Cancelled()


class RetryingFuture(grpc.Call, _FutureBase):
    """A unary-response call started with `future()`, sent again (requeued, retried,
    hedged) as the method's plan allows, while the caller holds this one future."""

    __slots__ = (
        "_args",
        "_callbacks",
        "_cancelled",
        "_final",
        "_first_route",
        "_gate",
        "_lock",
        "_multicallable",
        "_request",
        "_running",
        "_sample_latency",
        "_started",
        "_state",
        "_streaming_request",
        "_timeout",
        "_timer",
        "_trace",
    )

    def __init__(
        self,
        multicallable: _MultiCallable,
        trace: CallTrace | None,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
        streaming_request: bool,
    ) -> None:
        self._multicallable = multicallable
        self._trace = trace
        self._request = request
        self._streaming_request = streaming_request
        self._sample_latency = not streaming_request
        self._args = (metadata, credentials, wait_for_ready, compression)
        self._lock = threading.Lock()
        # Held until the call is over: waiters pass through it once it is released. A bare
        # lock, not a threading.Event (a Python-level Condition): this is the per-call path.
        self._gate = threading.Lock()
        self._gate.acquire()
        # Attempts not yet ended: future → (slot, start, its telemetry)
        self._running: dict[Any, tuple[Slot, float, Attempt | None, float | None]] = {}
        self._final: Any = None  # the attempt that speaks for the call once it is over
        self._cancelled = False
        self._timer: threading.Timer | None = None
        self._callbacks: list[Callable[[], None]] = []
        plan, clock = multicallable._plan, multicallable._clock
        self._started = now = clock()
        self._timeout = timeout  # the caller's, for the whole call
        try:
            slot = multicallable._pool.begin(wait_for_ready)
        except BaseException as error:
            if trace is not None:
                trace.give_up(error)
            raise
        self._first_route = slot.route
        self._state: Attempts | None = None  # made on the first failure, or now if special
        hedge_after = None
        if multicallable._special:
            self._state = state = plan.first(now, timeout, slot.route)
            state.trace = trace
            timeout = plan.first_timeout(state, now)
            hedge_after = plan.hedge_delay()
        self._launch(slot, timeout, metadata, hedge_after is not None)
        if hedge_after is not None:
            self._later(hedge_after, self._hedge)

    # -- attempts -------------------------------------------------------------------------

    def _launch(self, slot: Slot, timeout: float | None, metadata: Any, hedged: bool = False) -> None:
        """Start an attempt on `slot` (already taken); `_attempt_done` releases the slot."""
        multicallable = self._multicallable
        _, credentials, wait_for_ready, compression = self._args
        bound = slot.callables.get(multicallable._id) or multicallable._bind(slot)
        trace = self._trace
        attempt = trace.attempt(slot.route, hedged) if trace is not None else None
        started = multicallable._clock()
        request = resend(self._request, self._streaming_request)
        try:
            call = invoke(trace, bound.future, request, timeout, metadata, credentials, wait_for_ready, compression)
        except BaseException:  # grpc refused the call's arguments: nothing was sent
            multicallable._pool.end_local(slot)
            if attempt is not None:
                attempt.done(_UNKNOWN, None)
            raise
        with self._lock:
            self._running[call] = (slot, started, attempt, timeout)
            late = self._cancelled or self._final is not None
        if late:  # cancelled (or over) while this attempt was being started
            call.cancel()
        call.add_done_callback(self._attempt_done)

    def _attempt_done(self, call: Any) -> None:
        """grpc's callback thread: an attempt ended. Release its slot; then finish, wait
        for a hedge, or go again."""
        code = call.code()
        with self._lock:
            slot, started, attempt, timeout = self._running.pop(call)
        pool, sample = self._multicallable._pool, started if self._sample_latency else None
        details = None if code is _OK else call.details()
        # A caller's mistake (`end_failed` says) is not the endpoint's, nor worth sending again.
        local = code is not _OK and end_failed(pool, slot, sample, code, details, timeout)
        if code is _OK:
            pool.end(slot, sample)
        if attempt is not None:
            attempt.done(code, details)
        with self._lock:
            if self._final is not None:
                return  # a hedge's loser, or the call is already over
            if code is not _OK and not self._cancelled and not local and self._running:
                return  # a hedge is still out: it may yet succeed
            others = list(self._running)
        if code is _OK or self._cancelled or local:
            for other in others:
                other.cancel()
            latency = self._multicallable._plan.latency
            if code is _OK and latency is not None:
                latency.add(self._multicallable._clock() - started)
            self._finish(call)
            return
        try:
            self._again(call)
        except Exception:  # noqa: BLE001 - grpc's thread would only log it; the caller must hear
            _log.exception("poolkit: could not send a call again; it ends with its last error")
            self._finish(call)

    def _again(self, failed: Any) -> None:
        """Decide on a failed attempt: finish with it, or send the call again (at once for a
        requeue, after the backoff for a retry)."""
        multicallable = self._multicallable
        pool, plan, clock = multicallable._pool, multicallable._plan, multicallable._clock
        state = self._state
        if state is None:
            state = self._state = plan.first(self._started, self._timeout, self._first_route)
            state.trace = self._trace
        delay = plan.decide(state, failed, clock())
        if delay is None:
            self._finish(failed)
        elif delay > 0:  # a backoff is waited out only if the budget will pay for what follows
            if may_send_again(pool, state, RETRY):
                self._later(delay, self._resend, failed, delay)
            else:
                self._finish(failed)
        else:
            self._resend(failed, delay)

    def _resend(self, failed: Any, delay: float) -> None:
        multicallable = self._multicallable
        state = self._state
        assert state is not None
        with self._lock:
            self._timer = None
            if self._final is not None or self._cancelled:
                return
        metadata, _, wait_for_ready, _ = self._args
        timeout = multicallable._plan.next_timeout(state, delay, multicallable._clock())
        if timeout is not None and timeout <= 0:
            self._finish(failed)
            return
        unpaid = None if delay > 0 else (REQUEUE if delay == REQUEUE_NOW else RETRY)
        slot = take_again(multicallable._pool, state, unpaid, wait_for_ready)
        if slot is None:
            self._finish(failed)
            return
        try:
            self._launch(slot, timeout, with_attempts(metadata, state.previous))
        except Exception:  # noqa: BLE001 - the slot is released; the caller gets the last answer
            _log.exception("poolkit: could not send a call again; it ends with its last error")
            self._finish(failed)

    def _hedge(self) -> None:
        """Timer thread: the first attempt has not answered in time; send a second one to
        another endpoint, if the budget and the deadline allow."""
        with self._lock:
            self._timer = None
            if self._final is not None or self._cancelled or len(self._running) != 1:
                return
        state = self._state
        assert state is not None
        multicallable = self._multicallable
        metadata, _, wait_for_ready, _ = self._args
        slot = take_hedge_slot(multicallable, state, wait_for_ready)
        if slot is None:
            return
        timeout = multicallable._plan.first_timeout(state, multicallable._clock())
        try:
            self._launch(slot, timeout, with_attempts(metadata, 1), True)
        except Exception:  # noqa: BLE001 - the first attempt is still out: it answers the call
            _log.exception("poolkit: could not send a hedge")

    def _later(self, delay: float, action: Callable[..., None], *args: Any) -> None:
        timer = threading.Timer(delay, action, args)
        timer.daemon = True
        with self._lock:
            if self._final is not None or self._cancelled:
                return
            self._timer = timer
        timer.start()

    def _finish(self, outcome: Any) -> None:
        """The call is over: `outcome` (an attempt, or `_CANCELLED_BETWEEN`) speaks for it."""
        with self._lock:
            if self._final is not None:
                return
            self._final = outcome
            callbacks, self._callbacks = self._callbacks, []
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        trace = self._trace
        if trace is not None:
            if outcome is _CANCELLED_BETWEEN:
                trace.end(_CANCELLED, _CANCELLED_DETAILS)
            else:
                trace.end(outcome.code(), outcome.details())
        self._gate.release()
        for callback in callbacks:
            _run(callback)

    def _outcome(self, timeout: float | None = None) -> Any:
        final = self._final
        if final is not None:
            return final
        gate = self._gate
        if not gate.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            raise grpc.FutureTimeoutError()
        gate.release()
        return self._final

    # -- grpc.Future ------------------------------------------------------------------------

    def cancel(self) -> bool:
        """Cancel the call: the attempt in flight (grpc's cancel), or the retry it waits
        to send. False when the call is over (or its attempts ended just now on their own)."""
        with self._lock:
            if self._final is not None:
                return False
            self._cancelled = True  # no attempt is sent after this
            running = list(self._running)
        cancelled = [call for call in running if call.cancel()]
        if cancelled or not running:
            self._finish(cancelled[0] if cancelled else _CANCELLED_BETWEEN)
            return True
        return False

    def cancelled(self) -> bool:
        final = self._final
        return final is _CANCELLED_BETWEEN or (final is not None and final.cancelled())

    def running(self) -> bool:
        return self._final is None

    def done(self) -> bool:
        return self._final is not None

    def result(self, timeout: float | None = None) -> Any:
        final = self._outcome(timeout)
        if final is _CANCELLED_BETWEEN:
            raise grpc.FutureCancelledError()
        return final.result()

    def exception(self, timeout: float | None = None) -> Any:
        final = self._outcome(timeout)
        if final is _CANCELLED_BETWEEN:
            raise grpc.FutureCancelledError()
        return final.exception()

    def traceback(self, timeout: float | None = None) -> Any:
        final = self._outcome(timeout)
        if final is _CANCELLED_BETWEEN:
            raise grpc.FutureCancelledError()
        return final.traceback()

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        callback = _bind(fn, self)
        with self._lock:
            if self._final is None:
                self._callbacks.append(callback)
                return
        _run(callback)

    # -- grpc.Call: the attempt that ended the call ----------------------------------------------

    def initial_metadata(self) -> Any:
        final = self._outcome()
        return None if final is _CANCELLED_BETWEEN else final.initial_metadata()

    def trailing_metadata(self) -> Any:
        final = self._outcome()
        return None if final is _CANCELLED_BETWEEN else final.trailing_metadata()

    def code(self) -> Any:
        final = self._outcome()
        return _CANCELLED if final is _CANCELLED_BETWEEN else final.code()

    def details(self) -> Any:
        final = self._outcome()
        return _CANCELLED_DETAILS if final is _CANCELLED_BETWEEN else final.details()

    def debug_error_string(self) -> Any:
        final = self._outcome()
        return None if final is _CANCELLED_BETWEEN else final.debug_error_string()

    def is_active(self) -> bool:
        return self._final is None

    def time_remaining(self) -> Any:
        if self._timeout is None:
            return None
        return max(0.0, self._started + self._timeout - self._multicallable._clock())

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if self._final is not None:
                return False
            self._callbacks.append(callback)
            return True

    def __repr__(self) -> str:
        final = self._final
        if final is None:
            return f"<{type(self).__name__} running>"
        if final is _CANCELLED_BETWEEN:
            return f"<{type(self).__name__} cancelled>"
        return f"<{type(self).__name__} of {final!r}>"


def _bind(fn: Callable[[Any], None], future: RetryingFuture) -> Callable[[], None]:
    return lambda: fn(future)


def _run(callback: Callable[[], None]) -> None:
    """A caller's callback: its exception is logged, as grpc does, and the others still run."""
    try:
        callback()
    except Exception:  # noqa: BLE001 - one caller's callback must not stop the others
        _log.exception("poolkit: exception calling a future's callback")
