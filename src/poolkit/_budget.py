"""The retry budget: how many retries (and hedges, and requeues) the pool may send.

Retries that are each reasonable on their own turn an overloaded server into a dead one
when every client adds them at once; the budget caps them at a share of the calls
actually made, plus a small reserve so a quiet client can still retry (Finagle's
RetryBudget, Linkerd's retry budget). Pure: the caller passes the clock.
"""

from __future__ import annotations

import math

from ._errors import ConfigError

# Defaults, Finagle's and Linkerd's: retries may add 20 % to the calls made, plus 10 retries
# a second that every client has whatever its traffic, counted over a 10 s window.
DEFAULT_RATIO = 0.2
DEFAULT_MIN_PER_SECOND = 10.0
DEFAULT_WINDOW = 10.0

# The window is kept as this many buckets (0.1 s each for a 10 s window): a call or a retry
# costs one counter bump, and the window slides in steps of window / _BUCKETS. Finagle's
# WindowedAdder uses 10; finer steps matter here because a retry is counted for a full
# window plus up to one step, so a client that does nothing but retry gets its reserve
# back every window + one step: 1 % below min_per_second rather than 9 %.
_BUCKETS = 100

# Credit is counted in millionths of a retry: integers add up exactly, so 5 calls at a 0.2
# ratio fund exactly one retry, and a ratio like 0.29 means 0.29, not its binary neighbour.
_UNIT = 1_000_000

# Finagle's bound too: a budget of more than 1000 retries per call is surely a mistake.
_MAX_RATIO = 1000.0
# The largest duration (seconds) or rate poolkit takes: 31 years. Python's own waits refuse
# a timeout past about 9.2e9 s (threading.TIMEOUT_MAX), in a background thread.
MAX_NUMBER = 1e9


class TokenBudget:
    """Finagle's token retry budget over a sliding window.

    Each call (`deposit`) earns `ratio` of a retry; the reserve, `min_per_second × window`
    retries, is there whatever the traffic. A retry (`try_withdraw`) goes out only if,
    counting it, retries in the window ≤ ratio × calls in the window + reserve. Calls
    count for at most one window, retries for at least one, so for every retry at time t
    the bound holds exactly over (t - window, t]: traffic long ago funds no storm now.

    The reserve is a fixed allowance per window, not a refilling bucket: a client with no
    traffic may spend it at once and gets it back as those retries leave the window, so
    it never sends more than the reserve in any window. Retries whose calls have left the
    window still count until they leave too; the budget is then in debt and `balance`
    reports 0.

    Not thread-safe by itself: the pool calls it under its own lock.
    """

    __slots__ = (
        "_bucket",
        "_calls",
        "_calls_in_window",
        "_per_call",
        "_per_second",
        "_reserve",
        "_retries",
        "_retries_in_window",
        "_retry_slot",
        "_slot",
        "allowed",
        "refused",
    )

    def __init__(
        self,
        *,
        ratio: float = DEFAULT_RATIO,
        min_per_second: float = DEFAULT_MIN_PER_SECOND,
        window: float = DEFAULT_WINDOW,
        now: float,
    ) -> None:
        validate_budget(ratio, min_per_second, window)
        self._per_call = round(ratio * _UNIT)
        self._reserve = round(min_per_second * window * _UNIT)
        self._per_second = _BUCKETS / window
        # Calls live in _BUCKETS buckets, so they count for (window - step, window];
        # retries in one more, so they count for [window, window + step).
        self._calls = [0] * _BUCKETS
        self._retries = [0] * (_BUCKETS + 1)
        self._calls_in_window = 0
        self._retries_in_window = 0
        self._bucket = int(now * self._per_second)
        self._slot = self._bucket % _BUCKETS
        self._retry_slot = self._bucket % (_BUCKETS + 1)
        self.allowed = 0  # retries let through so far
        self.refused = 0  # retries refused so far

    def deposit(self, now: float) -> None:
        """One call was made (not a retry): it funds `ratio` of a retry for one window."""
        # Every call passes here: one bucket check and two bumps, unless a step has passed.
        if int(now * self._per_second) != self._bucket:
            self._advance(now)
        self._calls[self._slot] += 1
        self._calls_in_window += 1

    def try_withdraw(self, now: float) -> bool:
        """May one retry, hedge or requeue go out now? If so, it is counted as sent."""
        if int(now * self._per_second) != self._bucket:
            self._advance(now)
        if self._credit() < (self._retries_in_window + 1) * _UNIT:
            self.refused += 1
            return False
        self._retries[self._retry_slot] += 1
        self._retries_in_window += 1
        self.allowed += 1
        return True

    def balance(self, now: float) -> float:
        """Retries that could go out now (fractions included); 0 while in debt."""
        if int(now * self._per_second) != self._bucket:
            self._advance(now)
        return max(0, self._credit() - self._retries_in_window * _UNIT) / _UNIT

    def _credit(self) -> int:
        """What the calls in the window and the reserve fund, in millionths of a retry."""
        return self._calls_in_window * self._per_call + self._reserve

    def _advance(self, now: float) -> None:
        """Empty the buckets that fell out of the window since the last step."""
        bucket = int(now * self._per_second)
        if bucket < self._bucket:
            return  # a clock read a little before another one: count it as now
        calls, retries = self._calls, self._retries
        # _BUCKETS + 1 steps visit every slot of both rings, so a long idle spell costs no more.
        for step in range(self._bucket + 1, self._bucket + 1 + min(bucket - self._bucket, _BUCKETS + 1)):
            slot = step % _BUCKETS
            self._calls_in_window -= calls[slot]
            calls[slot] = 0
            slot = step % (_BUCKETS + 1)
            self._retries_in_window -= retries[slot]
            retries[slot] = 0
        self._bucket = bucket
        self._slot = bucket % _BUCKETS
        self._retry_slot = bucket % (_BUCKETS + 1)

    def __repr__(self) -> str:
        return (
            f"<TokenBudget calls_in_window={self._calls_in_window} retries_in_window={self._retries_in_window}"
            f" allowed={self.allowed} refused={self.refused}>"
        )


def validate_budget(ratio: object, min_per_second: object, window: object) -> None:
    if not 0 <= _number("retry_budget.ratio", ratio) <= _MAX_RATIO:
        raise ConfigError("retry_budget.ratio", ratio, f"must be between 0 and {_MAX_RATIO:g}")
    if _number("retry_budget.min_per_second", min_per_second) < 0:
        raise ConfigError("retry_budget.min_per_second", min_per_second, "must be 0 or more")
    if _number("retry_budget.window", window) <= 0:
        raise ConfigError("retry_budget.window", window, "must be greater than 0")


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not is_finite(value):
        raise ConfigError(name, value, "must be a finite number")
    if value > MAX_NUMBER:
        raise ConfigError(name, value, f"must be at most {MAX_NUMBER:g}")
    return value


def is_finite(value: float) -> bool:
    """Whether `value` is a real number a float can hold (an int past 1e308 is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
