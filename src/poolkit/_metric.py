"""Load metrics: how busy a route looks to the balancer. Lower is better.

A metric sees each call start (`pending` grows) and end (an optional latency sample),
and answers `load(now)`. The clock is the caller's, so tests advance time by hand.
"""

from __future__ import annotations

import math

# Keeps in-flight calls meaningful once an idle route's estimate has decayed to nothing
# (Linkerd adds the same floor, 1 ns, in its own unit).
_COST_FLOOR = 1e-6
_exp = math.exp


class PeakEwma:
    """Finagle's peak-EWMA: latency estimate × (calls in flight + 1).

    A sample above the estimate replaces it at once (react to a slowdown immediately);
    a lower one is blended in with weight 1 - e^(-Δt/decay) (forget it slowly). Between
    samples the estimate decays towards zero, so a route shunned for being slow is tried
    again after a while instead of being starved forever. Until its first sample a route
    costs nothing while idle and `initial_rtt` per call in flight (Finagle's probing of
    new nodes, with Linkerd's 30 ms prior as the price of piling on).
    """

    __slots__ = ("_cost", "_decay", "_sampled", "_stamp", "pending")

    def __init__(self, *, decay: float, initial_rtt: float, now: float) -> None:
        self._decay = decay
        self._cost = initial_rtt
        self._stamp = now
        self._sampled = False
        self.pending = 0

    def load(self, now: float) -> float:
        if not self._sampled:
            # Unknown route: free while idle, so it is tried at once, but each call in
            # flight costs the prior, so calls do not pile onto a route that may be dead.
            return self._cost * self.pending
        # estimate(now), inline: this runs twice for every call.
        elapsed = now - self._stamp
        cost = self._cost * _exp(-elapsed / self._decay) if elapsed > 0 else self._cost
        return (cost + _COST_FLOOR) * (self.pending + 1)

    def estimate(self, now: float) -> float:
        """The latency estimate in seconds, decayed to `now`."""
        elapsed = now - self._stamp
        if elapsed <= 0:
            return self._cost
        return self._cost * _exp(-elapsed / self._decay)

    def observe(self, rtt: float, now: float) -> None:
        if not self._sampled:
            # The initial estimate is a prior, not a measurement: the first sample replaces
            # it outright, or a fast route would look slow for several decay periods.
            self._sampled = True
            self._cost = rtt
            self._stamp = now
            return
        elapsed = now - self._stamp
        weight = _exp(-elapsed / self._decay) if elapsed > 0 else 1.0
        cost = self._cost * weight
        # A peak replaces the estimate; a lower sample pulls the decayed estimate towards it.
        self._cost = rtt if rtt > cost else cost + rtt * (1.0 - weight)
        self._stamp = now


class LeastLoaded:
    """Calls in flight, nothing else: for servers whose latency says little about load."""

    __slots__ = ("_rtt", "pending")

    def __init__(self, *, decay: float, initial_rtt: float, now: float) -> None:
        self.pending = 0
        self._rtt = initial_rtt  # last sample, for describe() only

    def load(self, now: float) -> float:
        return float(self.pending)

    def estimate(self, now: float) -> float:
        return self._rtt

    def observe(self, rtt: float, now: float) -> None:
        self._rtt = rtt


LoadMetric = PeakEwma | LeastLoaded
