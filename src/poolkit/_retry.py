"""Retry decisions: whether a failed attempt is sent again, after how long, and how.

One implementation for both shells: they run the attempts and the sleeps, this module
decides. The decisions are tenacity's strategies (`retry`, `wait`, `stop`) over a
tenacity `RetryCallState` per failing call. A `Plan` is built once per method; the
per-call record (`Attempts`) only once that call has failed, so a call that succeeds
first time builds nothing and asks nothing. The pool's budget is asked last (by the
shell), so an attempt the policy would not send costs the budget nothing.

Two ways to go again:
- a **requeue**: the attempt provably never reached a server (no connection could be
  made; the server refused the stream unseen after a graceful GOAWAY). Any method may be
  requeued, at once and to another endpoint; it is not counted as an attempt.
- a **retry**: the server may have seen the request. Only for methods declared
  idempotent, on the policy's codes or an attempt timeout, after a backoff (or the
  server's `grpc-retry-pushback-ms`), counted as an attempt.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from tenacity import RetryCallState, stop_after_attempt, wait_exponential
from tenacity.retry import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base

if TYPE_CHECKING:
    from ._config import RetryPolicy
    from ._pool import Route

ATTEMPTS_HEADER = "grpc-previous-rpc-attempts"
PUSHBACK_HEADER = "grpc-retry-pushback-ms"

# grpc's words for a call that never left: no connection to send it on, or a stream the
# server refused unprocessed (a graceful GOAWAY's last-stream-id was below it). grpc's
# own transparent retries are switched off on the pool's channels, as they would strip
# `grpc-previous-rpc-attempts`; these are the cases they covered.
_NEVER_SENT = ("failed to connect to all addresses", "GOAWAY received; Error code: 0;")
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED

# A call is requeued at most this many times (each to a route it has not tried).
MAX_REQUEUES = 25

# What `Plan.decide` returns for "send it again now, as a requeue".
REQUEUE = -1.0

# Why a call stopped going again, as `Attempts.stopped` records it.
NOT_RETRYABLE = "not retryable"
ATTEMPTS_USED = "attempts used"
DEADLINE = "deadline"
PUSHBACK = "server pushback"
NO_REQUEUE = "requeue limit"


def never_sent(code: grpc.StatusCode, details: str | None) -> bool:
    """Whether a failed attempt provably never reached a server's handler."""
    return code is _UNAVAILABLE and details is not None and any(marker in details for marker in _NEVER_SENT)


_MALFORMED = -1.0
_CLOCK_SLACK = 0.010
_PUSHBACK_DIGITS = 12
# A pushback is honoured up to an hour: longer is a server's mistake, not a plan.
MAX_PUSHBACK = 3600.0


def pushback_of(trailing: Iterable[Any] | None) -> float | None:
    """The server's `grpc-retry-pushback-ms` in seconds; None when absent; `_MALFORMED`
    (negative) when it is negative or not an integer, which means "do not retry"."""
    for key, value in trailing or ():
        if key != PUSHBACK_HEADER:
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
        if not (text.isascii() and text.isdigit()) or len(text) > _PUSHBACK_DIGITS:  # "-1", "", "1.5", "soon"
            return _MALFORMED
        return min(int(text) / 1000, MAX_PUSHBACK)
    return None


def replayable(request: Any, streaming_request: bool) -> bool:
    """Whether the request can be sent again: a single message can; a request stream only
    if it is a sequence (a list, a tuple) that iterates afresh, not a one-shot iterator."""
    return not streaming_request or (isinstance(request, Sequence) and not isinstance(request, str | bytes))


def resend(request: Any, streaming_request: bool) -> Any:
    """The request for one more attempt: a request stream from a fresh iterator."""
    return iter(request) if streaming_request else request


def with_attempts(metadata: Any, previous: int) -> tuple[tuple[str, Any], ...]:
    """The caller's metadata plus `grpc-previous-rpc-attempts` (gRPC A6) when attempts
    went before (a requeued first attempt has none: the header is left out)."""
    pairs = tuple((k, v) for k, v in (metadata or ()) if k != ATTEMPTS_HEADER)
    return (*pairs, (ATTEMPTS_HEADER, str(previous))) if previous else pairs


class Attempts(RetryCallState):
    """tenacity's record of one failing call, plus what gRPC retries need: the caller's
    deadline, the routes tried, the requeues, the current attempt's start and timeout."""

    def __init__(self, now: float, timeout: float | None, route: Route | None) -> None:
        # No tenacity Retrying object: the shells run the loop, with their own sleeps.
        super().__init__(None, None, (), {})  # type: ignore[arg-type]
        self.start_time = now
        self.deadline = None if timeout is None else now + timeout
        self.tried: set[Route] = set() if route is None else {route}
        self.requeues = 0
        self.attempt_started = now
        self.attempt_deadline: float | None = None  # set when the attempt has its own timeout
        self.pushback: float | None = None
        self.timed_out = False  # the last attempt ran out of its own timeout
        self.stopped = ""  # why the call stopped going again
        self.trace: Any = None  # the call's telemetry (a _telemetry.CallTrace), when traced

    @property
    def previous(self) -> int:
        """Attempts before the current one, requeues not counted (the header's value)."""
        return self.attempt_number - 1

    @property
    def last_duration(self) -> float:
        assert self.outcome_timestamp is not None
        return self.outcome_timestamp - self.attempt_started


class _Retryable(retry_base):
    """tenacity retry strategy: the policy's codes, or an attempt timeout, for idempotent methods."""

    def __init__(self, policy: RetryPolicy | None) -> None:
        self._idempotent = policy is not None and policy.idempotent
        self._codes = policy.codes if policy is not None else frozenset()

    def __call__(self, state: RetryCallState) -> bool:
        if not self._idempotent:
            return False
        assert isinstance(state, Attempts)
        assert state.outcome is not None
        error = state.outcome.exception()
        return state.timed_out or error.code() in self._codes  # type: ignore[union-attr]


class _Backoff(wait_base):
    """tenacity wait strategy: the server's pushback if it sent one, else exponential
    backoff (tenacity's) with ±jitter."""

    def __init__(self, policy: RetryPolicy | None, rng: random.Random) -> None:
        initial, multiplier, ceiling, jitter = (
            (policy.initial_backoff, policy.backoff_multiplier, policy.max_backoff, policy.jitter)
            if policy is not None
            else (0.1, 2.0, 1.0, 0.2)
        )
        self._exponential = wait_exponential(multiplier=initial, max=ceiling, exp_base=multiplier)
        self._jitter = jitter
        self._rng = rng

    def __call__(self, state: RetryCallState) -> float:
        assert isinstance(state, Attempts)
        if state.pushback is not None:
            return state.pushback
        return float(self._exponential(state)) * (1 + self._jitter * (2 * self._rng.random() - 1))


class _PastDeadline(stop_base):
    """tenacity stop strategy: the next attempt, after its backoff, could not finish before
    the caller's deadline (judging by how long the last one took)."""

    def __call__(self, state: RetryCallState) -> bool:
        assert isinstance(state, Attempts)
        assert state.outcome_timestamp is not None
        if state.deadline is None:
            return False
        return state.outcome_timestamp + state.upcoming_sleep + state.last_duration >= state.deadline


class Plan:
    """A method's retry policy as tenacity strategies, built once per method."""

    __slots__ = (
        "attempt_timeout",
        "hedging",
        "latency",
        "max_attempts",
        "policy",
        "requeues",
        "retry",
        "stop",
        "wait",
    )

    def __init__(self, policy: RetryPolicy | None, rng: random.Random) -> None:
        self.policy = policy
        self.requeues = policy is not None
        self.max_attempts = policy.max_attempts if policy is not None else 1
        self.attempt_timeout = policy.attempt_timeout if policy is not None else None
        self.hedging = hedging = policy.hedging if policy is not None else None
        self.latency = LatencyWindow(hedging.min_samples) if hedging is not None and hedging.delay is None else None
        self.retry = _Retryable(policy)
        self.wait = _Backoff(policy, rng)
        self.stop = stop_after_attempt(self.max_attempts) | _PastDeadline()

    def hedge_delay(self) -> float | None:
        """Seconds to wait for an attempt before hedging it; None: do not hedge (yet)."""
        hedging = self.hedging
        if hedging is None:
            return None
        if hedging.delay is not None:
            return hedging.delay
        assert self.latency is not None
        return self.latency.p95

    def first(self, now: float, timeout: float | None, route: Route | None) -> Attempts:
        """The record of a call that began at `now` with the caller's `timeout`."""
        return Attempts(now, timeout, route)

    def decide(self, state: Attempts, error: grpc.RpcError, now: float) -> float | None:
        """After a failed attempt: the seconds to wait before the next attempt, `REQUEUE`
        to send it again at once as a requeue, or None to give up (`state.stopped` says why)."""
        code: grpc.StatusCode = error.code()
        if never_sent(code, error.details()):
            if not self.requeues:
                state.stopped = NOT_RETRYABLE
            elif state.requeues >= MAX_REQUEUES:
                state.stopped = NO_REQUEUE
            elif state.deadline is not None and now >= state.deadline:
                state.stopped = DEADLINE
            else:
                state.requeues += 1
                return REQUEUE
            return None
        state.set_exception((type(error), error, None))
        state.outcome_timestamp = now
        attempt_deadline = state.attempt_deadline
        # The attempt's own timeout was the nearer one and has run out (give or take grpc's
        # millisecond rounding): that is what ended it, not the server's answer.
        state.timed_out = (
            code is _DEADLINE_EXCEEDED
            and attempt_deadline is not None
            and now >= attempt_deadline - _CLOCK_SLACK
            and (state.deadline is None or attempt_deadline < state.deadline)
        )
        if not self.retry(state):
            state.stopped = NOT_RETRYABLE
            return None
        pushback = pushback_of(error.trailing_metadata())
        if pushback == _MALFORMED:
            state.stopped = PUSHBACK
            return None
        state.pushback = pushback
        state.upcoming_sleep = self.wait(state)
        if self.stop(state):
            state.stopped = ATTEMPTS_USED if state.attempt_number >= self.max_attempts else DEADLINE
            return None
        return state.upcoming_sleep

    def next_timeout(self, state: Attempts, delay: float, now: float) -> float | None:
        """Start the next attempt (after `delay`, or a requeue) at `now`: its timeout, the
        least of the caller's remaining time and the policy's attempt timeout."""
        if delay != REQUEUE:
            state.prepare_for_next_attempt()
            state.idle_for += delay
        state.attempt_started = now
        return self.first_timeout(state, now)

    def first_timeout(self, state: Attempts, now: float) -> float | None:
        remaining = None if state.deadline is None else state.deadline - now
        limit = self.attempt_timeout
        if limit is not None and (remaining is None or limit < remaining):
            state.attempt_deadline = now + limit
            return limit
        state.attempt_deadline = None
        return remaining


class LatencyWindow:
    """The recent latencies of one method and their p95, for hedging's default delay.

    A ring of the last `_SIZE` samples; the quantile is recomputed every `_EVERY` samples,
    so adding one costs a store and an increment. Races between threads can lose or
    reorder a sample, which a quantile estimate does not mind.
    """

    __slots__ = ("_count", "_min_samples", "_quantile", "_samples", "p95")

    _SIZE = 512
    _EVERY = 32

    def __init__(self, min_samples: int, quantile: float = 0.95) -> None:
        self._samples = [0.0] * self._SIZE
        self._count = 0
        self._min_samples = min_samples
        self._quantile = quantile
        self.p95: float | None = None  # None until `min_samples` have been seen

    def add(self, seconds: float) -> None:
        count = self._count
        self._samples[count % self._SIZE] = seconds
        self._count = count = count + 1
        if count >= self._min_samples and (count % self._EVERY == 0 or self.p95 is None):
            recent = sorted(self._samples[: min(count, self._SIZE)])
            self.p95 = recent[min(len(recent) - 1, int(self._quantile * len(recent)))]
