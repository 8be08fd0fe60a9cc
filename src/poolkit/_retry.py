"""Retry policy pieces: what a method's plan allows, and the facts of gRPC retries.

The decisions themselves (requeue or retry, when, where, paid by whom) are made in one
place, the call state machine (`_call.Call`); this module gives it the method's `Plan`
(tenacity's strategies, built once per method) and the wire facts: which failures never
left, the server's pushback, the attempts header, which requests can be sent again.

Two ways to go again:
- a **requeue**: the attempt provably never reached a server (no connection could be
  made; the server refused the stream unseen after a graceful GOAWAY). Any method may be
  requeued, at once and to another endpoint; it is not counted as an attempt.
- a **retry**: the server may have seen the request. Only for methods declared
  idempotent, on the policy's codes or an attempt timeout, after a backoff (or the
  server's `grpc-retry-pushback-ms`), counted as an attempt.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from tenacity import RetryCallState, Retrying, stop_after_attempt, wait_exponential
from tenacity.wait import wait_base

if TYPE_CHECKING:
    from ._config import RetryPolicy

ATTEMPTS_HEADER = "grpc-previous-rpc-attempts"
PUSHBACK_HEADER = "grpc-retry-pushback-ms"

# grpc's words for a call that never left: no connection to send it on, or a stream the
# server refused unprocessed (a graceful GOAWAY's last-stream-id was below it). grpc's
# own transparent retries are switched off on the pool's channels, as they would strip
# `grpc-previous-rpc-attempts`; these are the cases they covered.
_NEVER_SENT = ("failed to connect to all addresses", "GOAWAY received; Error code: 0;")
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE

# A call is requeued at most this many times (each to a route it has not tried).
MAX_REQUEUES = 25


class StopReason(enum.Enum):
    """Why a call stopped going again."""

    NOT_RETRYABLE = "not retryable"
    ATTEMPTS_USED = "attempts used"
    DEADLINE = "deadline"
    PUSHBACK = "server pushback"
    NO_REQUEUE = "requeue limit"
    BUDGET = "retry budget"
    NO_ENDPOINT = "no endpoint to go to"


def never_sent(code: grpc.StatusCode, details: str | None) -> bool:
    """Whether a failed attempt provably never reached a server's handler."""
    return code is _UNAVAILABLE and details is not None and any(marker in details for marker in _NEVER_SENT)


_MALFORMED = -1.0
_PUSHBACK_DIGITS = 12
# A pushback is honoured up to an hour: longer is a server's mistake, not a plan.
MAX_PUSHBACK = 3600.0


def pushback_of(trailing: Iterable[Any] | None) -> float | None:
    """The server's `grpc-retry-pushback-ms` in seconds; None when absent; a negative
    number when it is negative or not an integer, which means "do not retry"."""
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


class _Backoff(wait_base):
    """tenacity wait strategy: exponential backoff (tenacity's) with ±jitter."""

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
        return float(self._exponential(state)) * (1 + self._jitter * (2 * self._rng.random() - 1))


def _never_sleep(_seconds: float) -> None:
    raise AssertionError("poolkit's drivers wait; tenacity's Retrying only holds the plan's strategies")


class Plan:
    """A method's retry policy, built once per method: tenacity's `wait` and `stop`
    strategies (held by a `Retrying`, whose `RetryCallState` is each failing call's
    record of attempts), the retryable codes, hedging and the attempt timeout."""

    __slots__ = ("_codes", "_idempotent", "attempt_timeout", "hedging", "latency", "policy", "requeues", "retrying")

    def __init__(self, policy: RetryPolicy | None, rng: random.Random) -> None:
        self.policy = policy
        self.requeues = policy is not None
        self._idempotent = policy is not None and policy.idempotent
        self._codes = policy.codes if policy is not None else frozenset()
        self.attempt_timeout = policy.attempt_timeout if policy is not None else None
        self.hedging = hedging = policy.hedging if policy is not None else None
        self.latency = LatencyWindow(hedging.min_samples) if hedging is not None and hedging.delay is None else None
        max_attempts = policy.max_attempts if policy is not None else 1
        self.retrying = Retrying(
            stop=stop_after_attempt(max_attempts), wait=_Backoff(policy, rng), sleep=_never_sleep, name="poolkit"
        )

    def retryable(self, code: grpc.StatusCode, timed_out: bool) -> bool:
        """Whether a failure the server may have seen is retried: for idempotent methods,
        on the policy's codes, or when the attempt's own timeout ended it."""
        return self._idempotent and (timed_out or code in self._codes)

    def backoff(self, record: RetryCallState) -> float:
        """Seconds to wait before the attempt after `record.attempt_number`."""
        return float(self.retrying.wait(record))

    def attempts_used(self, record: RetryCallState) -> bool:
        return bool(self.retrying.stop(record))

    def hedge_delay(self) -> float | None:
        """Seconds to wait for an attempt before hedging it; None: do not hedge (yet)."""
        hedging = self.hedging
        if hedging is None:
            return None
        if hedging.delay is not None:
            return hedging.delay
        assert self.latency is not None
        return self.latency.p95


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
