"""Failure accrual: from the outcomes of one endpoint's calls, when to eject it and for how long.

Two policies, either of which ejects (Finagle's and Envoy's): too many failures in a row,
or too low a success rate over a sliding window. Ejections grow from `ejection_min`,
doubling each time the endpoint fails again soon after coming back, up to
`ejection_max`; time spent healthy walks the doubling back down, so a blip an hour ago
does not cost a long ejection today. Pure: the caller passes the clock and the random source.
"""

from __future__ import annotations

import random

from ._config import FailureAccrual

# The success-rate window is kept as this many buckets: an outcome costs one counter
# bump, and the window slides in steps of window / _BUCKETS (5 s for the default 30 s).
_BUCKETS = 6


class Accrual:
    """One endpoint's outcome record under a `FailureAccrual` policy."""

    __slots__ = (
        "_bucket",
        "_failed",
        "_healthy_since",
        "_ok",
        "_per_second",
        "consecutive",
        "policy",
        "streak",
    )

    def __init__(self, policy: FailureAccrual, now: float) -> None:
        self.policy = policy
        self.consecutive = 0  # failures since the last success
        self.streak = 0  # ejections not yet walked back by healthy time
        self._per_second = _BUCKETS / policy.success_rate_window
        self._bucket = int(now * self._per_second)
        self._ok = [0] * _BUCKETS
        self._failed = [0] * _BUCKETS
        self._healthy_since: float | None = now

    def success(self, now: float) -> None:
        self.consecutive = 0
        bucket = int(now * self._per_second)
        if bucket != self._bucket:
            self._slide(bucket)
        self._ok[bucket % _BUCKETS] += 1

    def failure(self, now: float) -> str | None:
        """Count a failure; the reason to eject the endpoint now, or None."""
        self.consecutive += 1
        bucket = int(now * self._per_second)
        if bucket != self._bucket:
            self._slide(bucket)
        self._failed[bucket % _BUCKETS] += 1
        policy = self.policy
        limit = policy.consecutive_failures
        if limit is not None and self.consecutive >= limit:
            return f"{self.consecutive} consecutive failures"
        if policy.success_rate is not None:
            ok, failed = sum(self._ok), sum(self._failed)
            total = ok + failed
            if total >= policy.success_rate_min_calls and ok < policy.success_rate * total:
                return f"success rate {ok / total:.0%} < {policy.success_rate:.0%} over {total} calls"
        return None

    def ejection(self, now: float, rng: random.Random) -> float:
        """Start an ejection now: how long it lasts. Forgets the outcomes so far, so the
        endpoint is judged afresh when it comes back."""
        policy = self.policy
        # Each 2 × ejection_min spent healthy since the last revival takes one doubling off
        # (once: the time is used up here, and ejected time is not healthy time).
        if self._healthy_since is not None:
            walked_back = int((now - self._healthy_since) / (2 * policy.ejection_min))
            self.streak = max(0, self.streak - walked_back)
            self._healthy_since = None
        base = min(policy.ejection_max, policy.ejection_min * 2.0**self.streak)
        self.streak += 1
        self.consecutive = 0
        self._ok = [0] * _BUCKETS
        self._failed = [0] * _BUCKETS
        return base * (1.0 + policy.jitter * (2.0 * rng.random() - 1.0))

    def revived(self, now: float) -> None:
        """The endpoint passed its probe: healthy again from now."""
        self.consecutive = 0
        self._healthy_since = now

    def is_failure(self, code: object) -> bool:
        return code in self.policy.failure_codes

    def _slide(self, bucket: int) -> None:
        """Empty the buckets that fell out of the window since the last outcome."""
        stale = min(bucket - self._bucket, _BUCKETS)
        for step in range(1, stale + 1):
            index = (self._bucket + step) % _BUCKETS
            self._ok[index] = 0
            self._failed[index] = 0
        self._bucket = bucket

    def __repr__(self) -> str:
        return f"<Accrual consecutive={self.consecutive} ok={sum(self._ok)} failed={sum(self._failed)}>"
