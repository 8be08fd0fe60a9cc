"""The retry budget, driven by a fake clock and seeded schedules: storms stay within
ratio × calls + reserve, a quiet client keeps about min_per_second retries a second, old
traffic stops funding retries, and over long random runs every retry fits its window."""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, field
from fractions import Fraction

import pytest
from _support import FakeClock

from poolkit._budget import _BUCKETS, TokenBudget
from poolkit._errors import ConfigError

# Keeps float time stamps that land on a bucket edge from deciding an exact comparison.
_EDGE = 1e-9


def new_budget(clock: FakeClock, ratio: float = 0.2, min_per_second: float = 10.0, window: float = 10.0) -> TokenBudget:
    return TokenBudget(ratio=ratio, min_per_second=min_per_second, window=window, now=clock.now)


def spend(budget: TokenBudget, now: float, attempts: int) -> int:
    """Try `attempts` retries at `now`; how many went out."""
    return sum(budget.try_withdraw(now) for _ in range(attempts))


def test_defaults_are_finagles() -> None:
    budget = TokenBudget(now=0.0)
    # 10 retries a second over 10 s, with no traffic yet.
    assert budget.balance(0.0) == 100.0
    for _ in range(10):
        budget.deposit(0.0)
    assert budget.balance(0.0) == 102.0


def test_every_call_funds_ratio_of_a_retry(clock: FakeClock) -> None:
    budget = new_budget(clock, ratio=0.2, min_per_second=0.0)
    for _ in range(4):
        budget.deposit(clock.now)
    assert budget.balance(clock.now) == pytest.approx(0.8)
    assert not budget.try_withdraw(clock.now)
    budget.deposit(clock.now)
    assert budget.balance(clock.now) == 1.0
    assert budget.try_withdraw(clock.now)
    assert budget.balance(clock.now) == 0.0
    assert not budget.try_withdraw(clock.now)


def test_ratio_is_exact_in_decimal(clock: FakeClock) -> None:
    # 0.29 × 100 is 28.999… in binary floating point; the budget still funds 29 retries.
    budget = new_budget(clock, ratio=0.29, min_per_second=0.0)
    for _ in range(100):
        budget.deposit(clock.now)
    assert spend(budget, clock.now, 100) == 29


def test_nothing_funds_nothing(clock: FakeClock) -> None:
    budget = new_budget(clock, ratio=0.0, min_per_second=0.0)
    for _ in range(1000):
        budget.deposit(clock.now)
    assert spend(budget, clock.now, 10) == 0
    assert budget.balance(clock.now) == 0.0


@pytest.mark.parametrize("offset", [0.0, 0.049, 0.123_456, 0.999])
@pytest.mark.parametrize("calls", [0, 10, 1000, 20_000])
def test_a_storm_within_one_window_gets_ratio_of_the_calls_plus_the_reserve(offset: float, calls: int) -> None:
    """Every call fails and each failure tries three retries: what gets out is
    ratio × calls + reserve, whatever bucket edges the storm straddles."""
    clock = FakeClock(1000.0 + offset)
    budget = new_budget(clock)
    allowed = spend(budget, clock.now, 3)
    for _ in range(calls):
        clock.advance(9.8 / calls)
        budget.deposit(clock.now)
        allowed += spend(budget, clock.now, 3)
    allowed += spend(budget, clock.now, 500)  # and a last burst
    bound = 0.2 * calls + 10.0 * 10.0
    assert bound - 1 < allowed <= bound
    assert budget.allowed == allowed


def test_a_long_storm_gets_ratio_of_the_calls_plus_a_reserve_per_window(clock: FakeClock) -> None:
    budget = new_budget(clock)
    start = clock.now
    allowed = 0
    for _ in range(30_000):  # 100 calls a second for 300 s, all failing, 3 retries each
        clock.advance(0.01)
        budget.deposit(clock.now)
        allowed += spend(budget, clock.now, 3)
    windows = math.ceil((clock.now - start) / 10.0)
    # 20 retries a second from calls, and a reserve that comes back about once a window.
    assert allowed <= 0.2 * 30_000 + 100 * windows
    assert allowed >= 0.2 * 30_000 + 100 * (windows - 2)


def test_a_quiet_client_gets_about_min_per_second(clock: FakeClock) -> None:
    """No calls at all, a retry attempt every 10 ms: the reserve, spent in bursts, averages
    min_per_second (less the one bucket a retry outstays its window)."""
    budget = new_budget(clock, min_per_second=10.0)
    duration, allowed = 1000.0, 0
    for _ in range(int(duration / 0.01)):
        allowed += budget.try_withdraw(clock.now)
        clock.advance(0.01)
    assert allowed <= 100 * math.ceil(duration / 10.0)
    assert allowed / duration == pytest.approx(10.0 * _BUCKETS / (_BUCKETS + 1), rel=0.01)


def test_a_client_retrying_less_than_min_per_second_is_never_refused(clock: FakeClock) -> None:
    budget = new_budget(clock, min_per_second=10.0)
    for _ in range(10_000):  # 5 retries a second for 2000 s, no calls
        assert budget.try_withdraw(clock.now)
        clock.advance(0.2)
    assert budget.refused == 0


def test_reserve_scales_with_the_window(clock: FakeClock) -> None:
    budget = new_budget(clock, ratio=0.0, min_per_second=2.0, window=5.0)
    assert spend(budget, clock.now, 100) == 10
    clock.advance(5.0 + 1.5 * 5.0 / _BUCKETS)  # a window and a bucket: mid-bucket, clear of float edges
    assert spend(budget, clock.now, 100) == 10


def test_calls_older_than_the_window_fund_nothing(clock: FakeClock) -> None:
    budget = new_budget(clock, min_per_second=0.0)
    start = clock.now
    for _ in range(100):
        budget.deposit(start)
    clock.now = start + 9.8
    assert budget.balance(clock.now) == 20.0
    clock.now = start + 10.0
    assert budget.balance(clock.now) == 0.0
    assert not budget.try_withdraw(clock.now)
    clock.now = start + 1e6
    assert budget.balance(clock.now) == 0.0


def test_only_the_calls_still_in_the_window_count(clock: FakeClock) -> None:
    budget = new_budget(clock, min_per_second=0.0)
    start = clock.now
    for _ in range(50):
        budget.deposit(start)
    for _ in range(50):
        budget.deposit(start + 6.0)
    assert budget.balance(start + 9.5) == 20.0
    assert budget.balance(start + 10.5) == 10.0
    assert budget.balance(start + 16.5) == 0.0


def test_retries_outlive_the_calls_that_funded_them(clock: FakeClock) -> None:
    """Calls from t0 fund 20 retries at t0 + 9.5; at t0 + 10.5 those calls are gone but
    the retries still count, so new calls pay them off before funding more."""
    budget = new_budget(clock, min_per_second=0.0)
    start = clock.now
    for _ in range(100):
        budget.deposit(start)
    assert spend(budget, start + 9.5, 100) == 20
    assert budget.balance(start + 10.5) == 0.0  # in debt, shown as nothing available
    for _ in range(100):
        budget.deposit(start + 10.5)
    assert budget.balance(start + 10.5) == 0.0
    assert not budget.try_withdraw(start + 10.5)
    # The retries leave the window one window (and at most one bucket) after going out.
    assert budget.balance(start + 19.5 + 1.5 * 10.0 / _BUCKETS) == 20.0


def test_counters_count_attempts_and_balance_changes_nothing(clock: FakeClock) -> None:
    budget = new_budget(clock, ratio=0.5, min_per_second=0.1)  # 1 retry in reserve
    for _ in range(4):
        budget.deposit(clock.now)
    assert spend(budget, clock.now, 10) == 3
    assert (budget.allowed, budget.refused) == (3, 7)
    for _ in range(5):
        budget.balance(clock.now)
    assert (budget.allowed, budget.refused) == (3, 7)
    assert "allowed=3" in repr(budget)
    assert "refused=7" in repr(budget)


def test_a_clock_read_slightly_late_counts_as_now(clock: FakeClock) -> None:
    budget = new_budget(clock, min_per_second=0.0)
    start = clock.now
    budget.deposit(start + 1.0)
    for _ in range(9):
        budget.deposit(start + 0.5)  # read before the deposit above, delivered after it
    assert budget.balance(start + 1.0) == 2.0
    assert budget.balance(start + 10.9) == 2.0
    assert budget.balance(start + 11.0) == 0.0


def test_long_idle_starts_afresh(clock: FakeClock) -> None:
    budget = new_budget(clock)
    for _ in range(1000):
        budget.deposit(clock.now)
    spend(budget, clock.now, 1000)
    clock.advance(86_400.0)
    assert budget.balance(clock.now) == 100.0


@dataclass
class Trace:
    calls: list[float] = field(default_factory=list)
    retries: list[float] = field(default_factory=list)
    refusals: list[float] = field(default_factory=list)


# (calls a second, retry attempts a second): steady traffic, storms, silence, trickles.
_PHASES = [(200.0, 0.0), (200.0, 100.0), (0.0, 30.0), (50.0, 500.0), (400.0, 400.0), (0.0, 0.5), (5.0, 5.0)]


def run_schedule(budget: TokenBudget, clock: FakeClock, rng: random.Random, phases: int) -> Trace:
    """Random phases of random length, events at random times; records what happened and
    checks at every step that balance is never negative and predicts try_withdraw."""
    trace = Trace()
    for _ in range(phases):
        call_rate, attempt_rate = rng.choice(_PHASES)
        end = clock.now + rng.uniform(0.5, 25.0)
        while True:
            clock.advance(rng.expovariate(call_rate + attempt_rate))
            if clock.now >= end:
                break
            now = clock.now
            if rng.random() * (call_rate + attempt_rate) < call_rate:
                budget.deposit(now)
                trace.calls.append(now)
                continue
            balance = budget.balance(now)
            assert balance >= 0.0
            allowed = budget.try_withdraw(now)
            assert allowed == (balance >= 1.0)
            (trace.retries if allowed else trace.refusals).append(now)
    return trace


def count(times: list[float], after: float, upto: float) -> int:
    """Events in (after, upto]."""
    return bisect.bisect_right(times, upto) - bisect.bisect_right(times, after)


@pytest.mark.parametrize(
    ("ratio", "min_per_second", "window"),
    [(0.2, 10.0, 10.0), (0.5, 0.0, 2.0), (1.5, 1.0, 3.0), (0.05, 2.5, 7.0)],
)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_retry_fits_its_window_and_every_refusal_is_due(
    ratio: float, min_per_second: float, window: float, seed: int
) -> None:
    """Over a long random run: at every retry at time t, retries in (t - window, t] ≤
    ratio × calls in (t - window, t] + reserve; and at every refusal the budget really
    was spent, give or take the one bucket of window granularity."""
    clock = FakeClock(1000.0 + seed / 7)
    budget = new_budget(clock, ratio, min_per_second, window)
    trace = run_schedule(budget, clock, random.Random(seed), phases=40)
    share, reserve = Fraction(str(ratio)), Fraction(str(min_per_second)) * Fraction(str(window))
    step = window / _BUCKETS

    for t in trace.retries:
        retries = count(trace.retries, t - window - _EDGE, t)
        calls = count(trace.calls, t - window + _EDGE, t)
        assert retries <= share * calls + reserve, f"{retries} retries, {calls} calls in the window to {t}"

    for t in trace.refusals:
        retries = count(trace.retries, t - window - step - _EDGE, t)
        calls = count(trace.calls, t - window + step + _EDGE, t)
        assert share * calls + reserve < retries + 1, f"refused at {t} with {retries} retries, {calls} calls"

    # The run went through storms and quiet spells alike.
    assert trace.retries
    assert trace.refusals
    assert (budget.allowed, budget.refused) == (len(trace.retries), len(trace.refusals))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ratio", -0.1),
        ("ratio", 1000.5),
        ("ratio", math.nan),
        ("ratio", math.inf),
        ("ratio", "0.2"),
        ("ratio", True),
        ("min_per_second", -1.0),
        ("min_per_second", math.inf),
        ("min_per_second", math.nan),
        ("min_per_second", None),
        ("window", 0.0),
        ("window", -10.0),
        ("window", math.inf),
        ("window", math.nan),
    ],
)
def test_bad_settings_name_the_field(name: str, value: object) -> None:
    with pytest.raises(ConfigError) as raised:
        TokenBudget(now=0.0, **{name: value})  # type: ignore[arg-type]
    assert raised.value.name == f"retry_budget.{name}"
    assert f"retry_budget.{name}=" in str(raised.value)
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize(
    ("ratio", "min_per_second", "window"),
    [(0.0, 0.0, 10.0), (1000.0, 0.0, 10.0), (0, 0, 1), (0.2, 10.0, 0.001)],
)
def test_edge_settings_are_accepted(ratio: float, min_per_second: float, window: float) -> None:
    TokenBudget(ratio=ratio, min_per_second=min_per_second, window=window, now=0.0)
