"""One call's lifecycle, free of I/O: a state machine that every call path runs.

Events in (`start`, `ended`, `next`, `timer_fired`, `first_message`, `cancel`,
`abandon`, `refused`), steps out (`Step`): send this attempt on this slot with this
timeout and metadata, wait (for an attempt in flight, or `timer` seconds), or finish
with this outcome. The shells are drivers: a loop for blocking calls, callbacks and a
timer for futures, the caller's iteration for response streams, a coroutine for
asyncio. They start grpc calls, sleep and report what grpc said; every decision is
made here, the same way whatever the call style and whether telemetry is on:

- slot taking and release (`PoolState.begin`, `begin_again`, `end`, `end_local`),
  and which durations are latency samples;
- whether a failure is the caller's own (`failed_locally`: never the endpoint's, never
  sent again);
- requeue or retry (`_retry.Plan`'s strategies), the order of budget payment and
  backoff (a backoff is waited out only once the budget has paid for what follows; a
  requeue or hedge is paid for only once it has a slot to go to), the deadline;
- hedging: when, where, who wins, what the latency window learns;
- the stream rule: a response stream is sent again only before its first message;
- what telemetry hears: attempt started and ended, budget refusals, the call's end,
  once.

A call that succeeds first time builds its `Call` and one `Attempt`, takes the pool's
lock twice and nothing else: the retry record is made on the first failure.
"""

from __future__ import annotations

import enum
import math
import threading
from typing import TYPE_CHECKING, Any

import grpc
from tenacity import RetryCallState

from ._errors import ConfigError, PoolUnavailableError
from ._pool import Resend
from ._retry import MAX_REQUEUES, Plan, StopReason, never_sent, pushback_of, replayable, with_attempts
from ._telemetry import CallTrace, start_call

if TYPE_CHECKING:
    from ._pool import PoolState, Route, Slot

_OK = grpc.StatusCode.OK
_CANCELLED = grpc.StatusCode.CANCELLED
_UNKNOWN = grpc.StatusCode.UNKNOWN
_INTERNAL = grpc.StatusCode.INTERNAL
_DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED

# grpc's words for a call it failed itself, before sending anything.
_LOCAL_DETAILS = frozenset({"Invalid metadata", "Exception serializing request!"})
# grpc rounds deadlines to the millisecond: an attempt timeout "ran out" within this.
_CLOCK_SLACK = 0.010
CANCELLED_DETAILS = "Locally cancelled by application!"  # grpc's words for cancel()


class Step(enum.Enum):
    """What the driver does next."""

    SEND = "send"  # start `Call.sending` now; then, if `Call.timer` is set, arm it
    WAIT = "wait"  # start nothing: wait for an attempt in flight to end, or `Call.timer` seconds
    FINISH = "finish"  # the call is over: `Call.final` (an attempt) or `Call.error` speaks for it


class Timer(enum.Enum):
    """What `Call.timer_fired` does when the timer the driver armed runs out."""

    HEDGE = "hedge"  # no answer yet: send the call to another endpoint too
    BACKOFF = "backoff"  # the backoff is over: send the retry


def failed_locally(code: grpc.StatusCode | None, details: str | None, timeout: object) -> bool:
    """Whether an attempt that ended with `code` never left this process: grpc refused its
    metadata or could not serialise its request, or its deadline had passed before it
    started (a timeout of 0 or less, or NaN). Such a failure is the caller's, not the
    endpoint's (`PoolState.end_local`), and the call is not sent again."""
    if code is _INTERNAL:
        return details in _LOCAL_DETAILS
    if code is _DEADLINE_EXCEEDED:
        return isinstance(timeout, int | float) and not timeout > 0
    return False


def checked_timeout(timeout: object) -> None:
    """Refuse a NaN timeout, naming it: grpc would end the call at once as
    DEADLINE_EXCEEDED, naming neither."""
    if isinstance(timeout, float) and math.isnan(timeout):
        raise ConfigError("timeout", timeout, "must be a number of seconds, or None")


class Method:
    """What every call of one method (one multicallable) shares."""

    __slots__ = ("clock", "plan", "pool", "samples", "streaming_request", "telemetry", "unary_response")

    def __init__(
        self, pool: PoolState, plan: Plan, *, unary_response: bool, streaming_request: bool, telemetry: Any = None
    ) -> None:
        self.pool = pool
        self.clock = pool.clock
        self.plan = plan
        self.unary_response = unary_response
        self.streaming_request = streaming_request
        # A call's duration is a latency sample of its endpoint only when both sides are
        # single messages: a stream's pace is the caller's or the server's, not the network's.
        self.samples = unary_response and not streaming_request
        self.telemetry = telemetry  # _telemetry.MethodTelemetry, or None when off


class Attempt:
    """One attempt of a call: where it goes, with what timeout and metadata, and how it
    ended. `handle` is the driver's (grpc's call object); `observed` is telemetry's."""

    __slots__ = (
        "code",
        "deadline",
        "details",
        "handle",
        "hedged",
        "local",
        "number",
        "observed",
        "slot",
        "started",
        "timeout",
        "trailing",
    )

    def __init__(self, number: int, slot: Slot, timeout: Any, deadline: float | None, hedged: bool, now: float) -> None:
        self.number = number  # 1 for the first attempt; requeues and hedges count
        self.slot = slot
        self.timeout = timeout  # what grpc is given
        self.deadline = deadline  # when the attempt's own timeout runs out, if it has one
        self.hedged = hedged  # an attempt of a hedged call (each gets a span of its own)
        self.started = now
        self.code: grpc.StatusCode | None = None  # set when it has ended
        self.details: str | None = None
        self.trailing: Any = None
        self.local = False  # it failed without leaving this process: the caller's mistake
        self.handle: Any = None
        self.observed: Any = None

    @property
    def route(self) -> Route:
        return self.slot.route

    def __repr__(self) -> str:
        state = "running" if self.code is None else self.code.name
        return f"<Attempt {self.number} on {self.slot.route.name} {state}>"


class Call:
    """The state machine of one call. Thread-safe: a future's attempts end on grpc's
    threads while its timer fires on another and its caller cancels on a third."""

    __slots__ = (
        "_lock",
        "_over",
        "_replay",
        "_running",
        "_timer_kind",
        "attempts",
        "cancelled",
        "compression",
        "credentials",
        "error",
        "final",
        "last",
        "metadata",
        "method",
        "pending_decision",
        "read",
        "request",
        "requeues",
        "resendable",
        "retry",
        "sending",
        "started",
        "stopped",
        "timeout",
        "timer",
        "timer_token",
        "trace",
        "tried",
        "wait_for_ready",
    )

    def __init__(
        self,
        method: Method,
        request: Any,
        timeout: Any,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> None:
        self.method = method
        self.trace: CallTrace | None = None  # made by `start` when telemetry is on
        # The caller's arguments, as grpc's ClientCallDetails carries them; the metadata
        # gains the trace context when traced.
        self.request = request
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression
        # Whether a failed attempt may be followed by another: a plan that allows it and a
        # request that can be sent again (until a response stream's first message).
        again = replayable(request, method.streaming_request)
        self.resendable = method.plan.requeues and again
        self._replay = method.streaming_request and again
        self._lock = threading.Lock()
        self.started = 0.0
        self.attempts = 0  # attempts started
        self._running: list[Attempt] = []
        self.last: Attempt | None = None  # the attempt that ended last
        self.sending: Attempt | None = None  # what Step.SEND sends
        self.timer: float | None = None  # what the driver arms after SEND or with WAIT
        self.timer_token = 0  # names the timer armed last: `timer_fired` ignores an older one
        self._timer_kind: Timer | None = None
        self._over = False
        self.final: Attempt | None = None  # the attempt that speaks for the call once it is over
        self.error: BaseException | None = None  # or the error that does (the pool's refusal)
        self.cancelled = False
        self.read = False  # a response message was read: never sent again
        self.pending_decision = False  # an attempt failed; `next` has not decided yet
        self.retry: RetryCallState | None = None  # tenacity's record, made on the first retry decision
        self.tried: set[Route] | None = None  # routes this call went to, once it goes again
        self.requeues = 0
        self.stopped: StopReason | None = None  # why the call stopped going again

    # -- events ------------------------------------------------------------------------

    def start(self) -> Step:
        """The call begins: SEND its first attempt, or FINISH when the pool has no route
        for it (`error` says why). A NaN timeout raises `ConfigError`."""
        method = self.method
        checked_timeout(self.timeout)
        if method.telemetry is not None:
            self.trace = trace = start_call(method.telemetry, self.metadata)
            if trace is not None:
                self.metadata = trace.metadata
        self.started = now = method.clock()
        try:
            slot = method.pool.begin(self.wait_for_ready)
        except PoolUnavailableError as refused:
            self.error = refused
            self._finish_with(refused.code(), refused.details(), None)
            return Step.FINISH
        plan = method.plan
        if plan.attempt_timeout is None:
            timeout, deadline = self.timeout, None
        else:
            timeout, deadline = self._attempt_timeout(now)
        hedge_after = None
        if plan.hedging is not None and method.unary_response and self.resendable:
            hedge_after = plan.hedge_delay()
            if hedge_after is not None:
                self._set_timer(hedge_after, Timer.HEDGE)
        self._send(slot, timeout, deadline, hedged=hedge_after is not None, now=now)
        return Step.SEND

    def ended(self, attempt: Attempt, code: grpc.StatusCode, details: str | None, trailing: Any = None) -> None:
        """An attempt is over, as grpc reports it: release its slot, count it against its
        endpoint (unless the failure is the caller's own), tell telemetry. Only the first
        report of an attempt counts (a driver and grpc's callback may both report it).
        When nothing can follow (it succeeded, or the call cannot go again) the call is
        over too; else `next` decides."""
        method = self.method
        pool = method.pool
        with self._lock:
            if attempt.code is not None:
                if self.pending_decision and attempt is self.last and code is not _OK:
                    # What the driver was told (the error it caught) is what the call
                    # decides on: grpc.aio's done-callback can see a request stream's
                    # writer fail after the server answered ("Internal error from Core").
                    attempt.code, attempt.details, attempt.trailing = code, details, trailing
                return
            attempt.code, attempt.details, attempt.trailing = code, details, trailing
            self._running.remove(attempt)
            started = attempt.started if method.samples else None
            if code is _OK:
                pool.end(attempt.slot, started)
            elif failed_locally(code, details, attempt.timeout):
                attempt.local = True
                pool.end_local(attempt.slot)
            else:
                pool.end(attempt.slot, started, code)
            if self.trace is not None:
                self.trace.attempt_ended(attempt, code, details)
            if self._over:
                return  # a hedge's loser, or the call was over before it ended
            self.last = attempt
            if code is _OK:
                self._won(attempt)
            elif self._running:
                return  # a hedge is still out: it may yet answer
            elif code is _CANCELLED or self.cancelled or not self.resendable or attempt.local:
                # A cancelled attempt is the caller's cancel (or its task's): never sent again.
                self._finish(attempt)
            else:
                self.pending_decision = True

    def next(self) -> Step:
        """What now, after an attempt ended (and was reported with `ended`): FINISH,
        WAIT (for a hedge still out; or `timer` seconds of backoff, then `timer_fired`),
        or SEND a requeue at once."""
        with self._lock:
            if self._over:
                return Step.FINISH
            if not self.pending_decision:
                return Step.WAIT
            self.pending_decision = False
            failed = self.last
            assert failed is not None
            return self._decide(failed)

    def timer_fired(self, token: int | None = None) -> Step:
        """The timer the driver armed ran out: send the hedge or the retry, if the call
        still needs it and the deadline and the pool allow. A driver whose timers may
        outlive their turn passes the `timer_token` it armed: an older timer does nothing."""
        with self._lock:
            if token is not None and token != self.timer_token:
                return Step.FINISH if self._over else Step.WAIT
            kind, self.timer, self._timer_kind = self._timer_kind, None, None
            if self._over:
                return Step.FINISH
            if self.cancelled:
                return Step.WAIT if self._running else self._finish_cancelled()
            if kind is Timer.HEDGE:
                return self._hedge()
            if kind is Timer.BACKOFF:
                return self._retry_now()
            return Step.WAIT

    def first_message(self) -> None:
        """A response message was read: from now on the call is never sent again, and
        its attempt's end is the call's."""
        if self.read:
            return
        with self._lock:
            self.read = True
            self.resendable = False
            if self.pending_decision and self.last is not None:
                self._finish(self.last)

    def cancel(self) -> list[Attempt]:
        """The caller cancels: no attempt is sent from now on; the attempts still in
        flight are returned for the driver to cancel (their ends finish the call). With
        none in flight, the call is over now, CANCELLED."""
        with self._lock:
            if self._over:
                return []
            self.cancelled = True
            self._set_timer(None, None)
            if self._running:
                return list(self._running)
            self._finish_cancelled()
            return []

    def abandon(self) -> None:
        """The caller dropped the call: an attempt's failure awaiting a decision ends it."""
        with self._lock:
            self.resendable = False
            if self.pending_decision and self.last is not None:
                self._finish(self.last)

    def refused(self, attempt: Attempt, error: BaseException) -> None:
        """grpc refused to start `attempt` (the caller's arguments): nothing was sent. The
        slot is released as the caller's failure and the call is over with `error`."""
        with self._lock:
            if attempt.code is not None:
                return
            attempt.code = _UNKNOWN
            self._running.remove(attempt)
            self.method.pool.end_local(attempt.slot)
            if self.trace is not None:
                self.trace.attempt_ended(attempt, _UNKNOWN, None)
            if not self._over:
                self.error = error
                code, details = described(error)
                self._finish_with(code, details, attempt)

    def outstanding(self) -> list[Attempt]:
        """Attempts still in flight (a finished call's losers, for the driver to cancel)."""
        with self._lock:
            return list(self._running)

    @property
    def over(self) -> bool:
        """Whether the call is over: `final` or `error` says how."""
        return self._over

    def remaining(self) -> float | None:
        """Seconds left of the caller's timeout (None: none), as `time_remaining()` says."""
        deadline = self._deadline()
        return None if deadline is None else max(0.0, deadline - self.method.clock())

    # -- decisions (the lock held) -------------------------------------------------------

    def _send(self, slot: Slot, timeout: Any, deadline: float | None, *, hedged: bool, now: float) -> None:
        self.attempts += 1
        attempt = Attempt(self.attempts, slot, timeout, deadline, hedged, now)
        self._running.append(attempt)
        if self.tried is not None:
            self.tried.add(slot.route)
        self.sending = attempt
        if self.trace is not None:
            attempt.observed = self.trace.attempt_started(attempt)

    def attempt_metadata(self, attempt: Attempt) -> Any:
        """The metadata `attempt` is sent with: the caller's (with the trace context), plus
        `grpc-previous-rpc-attempts` from the first retry or hedge on (gRPC A6)."""
        previous = 0 if self.retry is None else self.retry.attempt_number - 1
        if previous == 0 and attempt.number == 1:
            return self.metadata
        return with_attempts(self.metadata, previous)

    def _won(self, attempt: Attempt) -> None:
        plan = self.method.plan
        if plan.latency is not None and self.method.samples:
            plan.latency.add(self.method.clock() - attempt.started)
        self._finish(attempt)

    def _finish(self, attempt: Attempt) -> None:
        if self._over:
            return
        self.final = attempt
        assert attempt.code is not None
        self._finish_with(attempt.code, attempt.details, attempt)

    def _finish_cancelled(self) -> Step:
        if not self._over:
            self.error = grpc.FutureCancelledError()
            self._finish_with(_CANCELLED, CANCELLED_DETAILS, None)
        return Step.FINISH

    def payload(self) -> Any:
        """The request for the attempt being sent: a request stream given as a sequence
        is sent from a fresh iterator each time."""
        return iter(self.request) if self._replay else self.request

    def _finish_with(self, code: grpc.StatusCode, details: str | None, attempt: Attempt | None) -> None:
        """The call is over (once: `final` or `error` is set): nothing is decided or
        armed from now on, and telemetry hears how it ended."""
        self._over = True
        self.pending_decision = False
        self._set_timer(None, None)
        if self.trace is not None:
            self.trace.call_ended(code, details, attempt, self.attempts)

    def _record(self) -> RetryCallState:
        """tenacity's record of this call's retries (its public constructor, with the plan's
        Retrying): its attempt number and outcome feed the plan's strategies."""
        if self.retry is None:
            self.retry = RetryCallState(self.method.plan.retrying, None, (), {})
        return self.retry

    def _routes_tried(self) -> set[Route]:
        if self.tried is None:
            self.tried = set()
            # Every attempt so far: the running ones and the one that ended last.
            for attempt in (*self._running, self.last):
                if attempt is not None:
                    self.tried.add(attempt.slot.route)
        return self.tried

    def _decide(self, failed: Attempt) -> Step:
        """After `failed` (the only attempt left) failed: requeue, retry, or finish."""
        now = self.method.clock()
        assert failed.code is not None
        if never_sent(failed.code, failed.details):
            return self._requeue(failed, now)
        why, backoff = self._backoff(failed, now)
        if why is not None:
            return self._stop(failed, why)
        # The backoff is waited out only once the budget has paid for what follows.
        if not self._spend(Resend.RETRY):
            return self._stop(failed, StopReason.BUDGET)
        record = self._record()
        record.prepare_for_next_attempt()
        record.idle_for += backoff
        self._set_timer(backoff, Timer.BACKOFF)
        return Step.WAIT

    def _set_timer(self, seconds: float | None, kind: Timer | None) -> None:
        self.timer, self._timer_kind = seconds, kind
        if seconds is not None:
            self.timer_token += 1

    def _backoff(self, failed: Attempt, now: float) -> tuple[StopReason | None, float]:
        """Whether the plan retries `failed` (a failure the server may have seen): why not,
        or the seconds to wait first (the server's pushback, else the plan's backoff)."""
        plan = self.method.plan
        deadline = self._deadline()
        assert failed.code is not None
        timed_out = (  # the attempt's own timeout was the nearer one, and ran out
            failed.code is _DEADLINE_EXCEEDED
            and failed.deadline is not None
            and now >= failed.deadline - _CLOCK_SLACK
            and (deadline is None or failed.deadline < deadline)
        )
        if not plan.retryable(failed.code, timed_out):
            return StopReason.NOT_RETRYABLE, 0.0
        pushback = pushback_of(failed.trailing)
        if pushback is not None and pushback < 0:
            return StopReason.PUSHBACK, 0.0
        record = self._record()
        backoff = pushback if pushback is not None else plan.backoff(record)
        if plan.attempts_used(record):
            return StopReason.ATTEMPTS_USED, backoff
        # The next attempt, after its backoff, could not finish before the caller's
        # deadline, judging by how long this one took.
        if deadline is not None and now + backoff + (now - failed.started) >= deadline:
            return StopReason.DEADLINE, backoff
        return None, backoff

    def _requeue(self, failed: Attempt, now: float) -> Step:
        deadline = self._deadline()
        if self.requeues >= MAX_REQUEUES:
            return self._stop(failed, StopReason.NO_REQUEUE)
        if deadline is not None and now >= deadline:
            return self._stop(failed, StopReason.DEADLINE)
        timeout, attempt_deadline = self._attempt_timeout(now)
        slot = self._take_again(Resend.REQUEUE)
        if isinstance(slot, StopReason):
            return self._stop(failed, slot)
        self.requeues += 1
        self._send(slot, timeout, attempt_deadline, hedged=False, now=now)
        return Step.SEND

    def _retry_now(self) -> Step:
        """The backoff is over (and paid for): send the retry, if time and a slot remain."""
        failed = self.last
        assert failed is not None
        now = self.method.clock()
        timeout, attempt_deadline = self._attempt_timeout(now)
        if timeout is not None and timeout <= 0:
            return self._stop(failed, StopReason.DEADLINE)
        slot = self._take_again(None)
        if isinstance(slot, StopReason):
            return self._stop(failed, slot)
        self._send(slot, timeout, attempt_deadline, hedged=False, now=now)
        return Step.SEND

    def _hedge(self) -> Step:
        """No answer within the hedge delay: the call goes to an endpoint it has not tried
        too, if the deadline, the pool and the budget allow."""
        pool = self.method.pool
        now = self.method.clock()
        deadline = self._deadline()
        if len(self._running) != 1 or (deadline is not None and deadline <= now):
            return Step.WAIT
        tried = self._routes_tried()
        if not pool.has_untried(tried):
            return Step.WAIT
        try:
            # A copy: a hedge the budget refuses must leave its route untried.
            slot = pool.begin_again(self.wait_for_ready, set(tried), fresh_only=True)
        except PoolUnavailableError:
            return Step.WAIT
        if not self._spend(Resend.HEDGE):
            pool.untake(slot)
            return Step.WAIT
        self._record().prepare_for_next_attempt()
        timeout, attempt_deadline = self._attempt_timeout(now)
        self._send(slot, timeout, attempt_deadline, hedged=True, now=now)
        return Step.SEND

    def _take_again(self, unpaid: Resend | None) -> Slot | StopReason:
        """The slot for the call's next attempt, preferring a route it has not tried; with
        `unpaid`, the budget pays for it now, once a slot is found. Why not, if not."""
        pool = self.method.pool
        try:
            slot = pool.begin_again(self.wait_for_ready, self._routes_tried())
        except PoolUnavailableError:
            return StopReason.NO_ENDPOINT
        if unpaid is not None and not self._spend(unpaid):
            pool.untake(slot)
            return StopReason.BUDGET
        return slot

    def _spend(self, kind: Resend) -> bool:
        if self.method.pool.spend(kind):
            return True
        if self.trace is not None:
            self.trace.refused(kind)
        return False

    def _stop(self, failed: Attempt, why: StopReason) -> Step:
        self.stopped = why
        self._finish(failed)
        return Step.FINISH

    def _deadline(self) -> float | None:
        timeout = self.timeout
        if timeout is None or isinstance(timeout, bool) or not isinstance(timeout, int | float):
            return None
        return self.started + timeout

    def _attempt_timeout(self, now: float) -> tuple[float | None, float | None]:
        """The next attempt's timeout (the least of what is left of the caller's and the
        plan's attempt timeout) and, when the latter, when it runs out."""
        deadline = self._deadline()
        remaining = None if deadline is None else deadline - now
        limit = self.method.plan.attempt_timeout
        if limit is not None and (remaining is None or limit < remaining):
            return limit, now + limit
        return remaining, None

    def __repr__(self) -> str:
        if self.final is not None:
            state = f"over: {self.final!r}"
        elif self.error is not None:
            state = f"over: {type(self.error).__name__}"
        else:
            state = f"running={len(self._running)}"
        return f"<Call attempts={self.attempts} {state}>"


def described(error: BaseException | None) -> tuple[grpc.StatusCode, str | None]:
    """The status a call that ended with `error` reports: a grpc error's own; CANCELLED
    for a cancel between attempts; another exception's type name only (its text might
    quote the request)."""
    if isinstance(error, grpc.FutureCancelledError):
        return _CANCELLED, CANCELLED_DETAILS
    if isinstance(error, grpc.RpcError) and callable(getattr(error, "code", None)):
        return error.code(), error.details()
    return _UNKNOWN, type(error).__qualname__
