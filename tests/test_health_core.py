"""The pure core of endpoint health: failure accrual, the pool's health decisions (ejection,
probing, panic, draining, fast failure), the health-check state machine and discovery's
schedule. A fake clock and seeded random sources drive them; no servers, no sleeps, and
where randomness decides, the assertions are statistical with generous bounds.
"""

from __future__ import annotations

import json
import random
import statistics
from collections import Counter
from collections.abc import Iterable
from typing import Any

import grpc
import pytest
from _support import FakeClock
from grpc_health.v1 import health_pb2

from poolkit import FailureAccrual, HealthCheck, PoolClosedError, PoolConfig, PoolUnavailableError
from poolkit._accrual import Accrual
from poolkit._discovery import Discovery
from poolkit._health import CHECK, DONE, WATCH, HealthChecker
from poolkit._pool import _PROBE_SENT, PoolState, Route, Slot
from poolkit._target import Endpoint

READY = grpc.ChannelConnectivity.READY
CONNECTING = grpc.ChannelConnectivity.CONNECTING
IDLE = grpc.ChannelConnectivity.IDLE
TRANSIENT_FAILURE = grpc.ChannelConnectivity.TRANSIENT_FAILURE
SHUTDOWN = grpc.ChannelConnectivity.SHUTDOWN

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
CANCELLED = grpc.StatusCode.CANCELLED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT

# Calls a helper makes before giving up on landing one on a given route: with four routes
# picked uniformly, missing a route this often has probability 0.75^500 ≈ 1e-62.
_TRIES = 500


def endpoint(n: int) -> Endpoint:
    return Endpoint(f"10.0.0.{n}", 50051, f"10.0.0.{n}:50051")


def new_pool(clock: FakeClock, rng: random.Random, routes: int = 4, **config: Any) -> PoolState:
    endpoints = [endpoint(n) for n in range(1, routes + 1)]
    return PoolState("ipv4:test", endpoints, PoolConfig(**config), clock=clock, rng=rng)


def all_ready(pool: PoolState) -> None:
    for slot in pool.slots:
        pool.set_slot_state(slot, READY)


def set_route_state(pool: PoolState, route: Route, state: grpc.ChannelConnectivity) -> None:
    for slot in route.slots:
        pool.set_slot_state(slot, state)


def begin_on(pool: PoolState, route: Route) -> Slot:
    """Start calls until one lands on `route` and return its slot, still in flight; the
    calls that land elsewhere succeed at once."""
    for _ in range(_TRIES):
        slot = pool.begin()
        if slot.route is route:
            return slot
        pool.end(slot, None, None)
    raise AssertionError(f"{_TRIES} calls and none went to {route}: {pool.describe()}")


def call_on(pool: PoolState, route: Route, code: grpc.StatusCode | None) -> None:
    """One call on `route` that ends with `code` (the calls that land elsewhere succeed)."""
    pool.end(begin_on(pool, route), None, code)


def eject(pool: PoolState, route: Route) -> float:
    """Fail calls on `route` until accrual ejects it; the ejection's length."""
    for _ in range(100):
        call_on(pool, route, UNAVAILABLE)
        if route.ejected_until is not None:
            return route.ejected_until - pool.clock()
    raise AssertionError(f"{route} was never ejected: {pool.describe()}")


def picks(pool: PoolState, calls: int, wait_for_ready: bool | None = None) -> Counter[str]:
    """Where `calls` calls go, one at a time, each succeeding at once."""
    landed: Counter[str] = Counter()
    for _ in range(calls):
        slot = pool.begin(wait_for_ready)
        landed[slot.route.endpoint.address] += 1
        pool.end(slot, None, None)
    return landed


def address(route: Route) -> str:
    return route.endpoint.address


def described(pool: PoolState, route: Route) -> dict[str, Any]:
    entries: list[dict[str, Any]] = pool.describe()["endpoints"]
    (entry,) = [e for e in entries if e["address"] == address(route)]
    return entry


def transitions_of(pool: PoolState, route: Route) -> list[tuple[str, str]]:
    return [(t["from"], t["to"]) for t in pool.describe()["transitions"] if t["endpoint"] == address(route)]


# -- Accrual: consecutive failures ---------------------------------------------------------------

ONLY_CONSECUTIVE = FailureAccrual(consecutive_failures=5, success_rate=None)
ONLY_SUCCESS_RATE = FailureAccrual(consecutive_failures=None, success_rate=0.8, success_rate_min_calls=5)


def fail(accrual: Accrual, times: int, now: float) -> list[str | None]:
    return [accrual.failure(now) for _ in range(times)]


@pytest.mark.parametrize("limit", [1, 3, 5, 12])
def test_consecutive_failures_eject_exactly_at_the_nth(limit: int) -> None:
    accrual = Accrual(FailureAccrual(consecutive_failures=limit, success_rate=None), now=0.0)

    reasons = fail(accrual, limit, now=0.0)

    assert reasons[:-1] == [None] * (limit - 1)
    assert reasons[-1] == f"{limit} consecutive failures"


def test_a_success_between_failures_starts_the_count_again() -> None:
    accrual = Accrual(ONLY_CONSECUTIVE, now=0.0)

    assert fail(accrual, 4, now=0.0) == [None] * 4
    accrual.success(0.0)
    assert fail(accrual, 4, now=0.0) == [None] * 4
    assert accrual.consecutive == 4
    assert accrual.failure(0.0) == "5 consecutive failures"


def test_an_ejection_starts_the_count_again() -> None:
    accrual = Accrual(ONLY_CONSECUTIVE, now=0.0)
    fail(accrual, 5, now=0.0)

    accrual.ejection(0.0, random.Random(1))

    assert accrual.consecutive == 0
    assert fail(accrual, 4, now=0.0) == [None] * 4


# -- Accrual: success rate -----------------------------------------------------------------------


def test_success_rate_below_the_threshold_ejects() -> None:
    accrual = Accrual(ONLY_SUCCESS_RATE, now=0.0)
    for _ in range(3):
        accrual.success(0.0)

    assert accrual.failure(0.0) is None  # 3 of 4: too few calls to judge
    assert accrual.failure(0.0) == "success rate 60% < 80% over 5 calls"


def test_success_rate_exactly_at_the_threshold_does_not_eject() -> None:
    accrual = Accrual(ONLY_SUCCESS_RATE, now=0.0)
    for _ in range(8):
        accrual.success(0.0)

    assert fail(accrual, 2, now=0.0) == [None, None]  # 8 of 10 is 80 %, not below
    assert accrual.failure(0.0) is not None  # 8 of 11


def test_success_rate_needs_the_minimum_number_of_calls() -> None:
    accrual = Accrual(FailureAccrual(consecutive_failures=None, success_rate_min_calls=10), now=0.0)

    assert fail(accrual, 9, now=0.0) == [None] * 9
    assert accrual.failure(0.0) == "success rate 0% < 80% over 10 calls"


def test_outcomes_older_than_the_window_are_forgotten() -> None:
    clock = FakeClock()
    accrual = Accrual(ONLY_SUCCESS_RATE, now=clock())
    assert fail(accrual, 4, now=clock()) == [None] * 4

    clock.advance(ONLY_SUCCESS_RATE.success_rate_window)

    assert fail(accrual, 4, now=clock()) == [None] * 4  # the first four are gone
    assert accrual.failure(clock()) == "success rate 0% < 80% over 5 calls"


def test_outcomes_well_inside_the_window_are_kept() -> None:
    # The window slides in sixths (5 s of 30 s): 20 s old is inside it for certain.
    clock = FakeClock()
    accrual = Accrual(ONLY_SUCCESS_RATE, now=clock())
    fail(accrual, 4, now=clock())

    clock.advance(20.0)

    assert accrual.failure(clock()) == "success rate 0% < 80% over 5 calls"


def test_old_successes_do_not_shield_new_failures() -> None:
    clock = FakeClock()
    accrual = Accrual(ONLY_SUCCESS_RATE, now=clock())
    for _ in range(100):
        accrual.success(clock())
    assert fail(accrual, 5, now=clock()) == [None] * 5  # 100 of 105 is fine

    clock.advance(60.0)

    assert fail(accrual, 4, now=clock()) == [None] * 4
    assert accrual.failure(clock()) is not None


@pytest.mark.parametrize("step", [0.0, 1.0, 7.0, 31.0])
def test_with_both_policies_off_nothing_ejects(step: float) -> None:
    clock = FakeClock()
    accrual = Accrual(FailureAccrual(consecutive_failures=None, success_rate=None), now=clock())

    reasons = []
    for _ in range(1000):
        clock.advance(step)
        reasons.append(accrual.failure(clock()))

    assert set(reasons) == {None}


# -- Accrual: how long an ejection lasts ---------------------------------------------------------


def ejections(accrual: Accrual, count: int, now: float, rng: random.Random) -> list[float]:
    """`count` ejections in a row at `now`, with no revival between them."""
    return [accrual.ejection(now, rng) for _ in range(count)]


def test_ejections_double_up_to_the_maximum_without_jitter() -> None:
    policy = FailureAccrual(ejection_min=5.0, ejection_max=60.0, jitter=0.0)
    accrual = Accrual(policy, now=0.0)

    assert ejections(accrual, 7, now=0.0, rng=random.Random(1)) == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0]


def test_ejections_double_and_cap_within_the_jitter() -> None:
    policy = FailureAccrual(ejection_min=5.0, ejection_max=60.0, jitter=0.2)
    rng = random.Random(3)
    for _ in range(200):
        durations = ejections(Accrual(policy, now=0.0), 7, now=0.0, rng=rng)

        for duration, base in zip(durations, [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0], strict=True):
            assert base * 0.8 <= duration <= base * 1.2, durations


def test_first_ejection_jitter_spans_its_band_over_many_seeds() -> None:
    policy = FailureAccrual(ejection_min=5.0, jitter=0.2)

    durations = [Accrual(policy, now=0.0).ejection(0.0, random.Random(seed)) for seed in range(2000)]

    assert all(4.0 <= d <= 6.0 for d in durations)
    # Uniform over [4, 6]: the extremes are reached and the mean is the nominal length
    # (its standard error is 0.013 s over 2000 draws).
    assert min(durations) < 4.05
    assert max(durations) > 5.95
    assert statistics.fmean(durations) == pytest.approx(5.0, abs=0.06)


def test_healthy_time_after_a_revival_walks_the_doubling_back() -> None:
    policy = FailureAccrual(ejection_min=5.0, ejection_max=300.0, jitter=0.0)
    rng = random.Random(1)

    def accrual_after_three_ejections() -> Accrual:
        accrual = Accrual(policy, now=0.0)
        assert ejections(accrual, 3, now=0.0, rng=rng) == [5.0, 10.0, 20.0]
        accrual.revived(100.0)
        return accrual

    # Each 2 × ejection_min of healthy time takes one doubling off.
    assert accrual_after_three_ejections().ejection(101.0, rng) == 40.0
    assert accrual_after_three_ejections().ejection(110.0, rng) == 20.0
    assert accrual_after_three_ejections().ejection(120.0, rng) == 10.0
    assert accrual_after_three_ejections().ejection(130.0, rng) == 5.0
    assert accrual_after_three_ejections().ejection(10_000.0, rng) == 5.0


def test_failed_probes_one_after_another_keep_doubling() -> None:
    policy = FailureAccrual(ejection_min=5.0, ejection_max=300.0, jitter=0.0)
    accrual = Accrual(policy, now=0.0)

    # Each ejection starts the moment the previous one ends: the probe failed at once.
    now, durations = 0.0, []
    for _ in range(5):
        durations.append(accrual.ejection(now, random.Random(1)))
        now += durations[-1]

    assert durations == [5.0, 10.0, 20.0, 40.0, 80.0]


# -- PoolState: ejection -------------------------------------------------------------------------


def test_failing_route_is_ejected_at_the_fifth_failure_and_then_never_picked(
    clock: FakeClock, rng: random.Random
) -> None:
    pool = new_pool(clock, rng)
    all_ready(pool)
    bad = pool.routes[0]

    for _ in range(4):
        call_on(pool, bad, UNAVAILABLE)
    assert bad.status == "healthy"
    call_on(pool, bad, UNAVAILABLE)

    assert bad.status == "ejected"
    assert pool.resolve_soon
    landed = picks(pool, 2000)
    assert landed[address(bad)] == 0
    assert set(landed) == {address(r) for r in pool.routes[1:]}
    assert bad.ejected_until is not None
    clock.now = bad.ejected_until - 0.001  # still ejected a moment before it ends
    assert picks(pool, 500)[address(bad)] == 0


@pytest.mark.parametrize("code", [NOT_FOUND, INVALID_ARGUMENT, CANCELLED], ids=lambda c: c.name)
def test_non_failure_codes_never_eject(clock: FakeClock, rng: random.Random, code: grpc.StatusCode) -> None:
    pool = new_pool(clock, rng)
    route = pool.routes[0]

    for _ in range(200):
        call_on(pool, route, code)
        clock.advance(0.1)

    assert route.status == "healthy"
    assert route.ejections == 0
    assert route.errors == 200


def test_a_cancel_neither_counts_nor_resets_the_failures(clock: FakeClock, rng: random.Random) -> None:
    pool = new_pool(clock, rng, failure_accrual=ONLY_CONSECUTIVE)
    route = pool.routes[0]

    for code in [UNAVAILABLE] * 4 + [CANCELLED] * 3:
        call_on(pool, route, code)
    assert route.status == "healthy"
    call_on(pool, route, UNAVAILABLE)

    assert route.status == "ejected"


def test_an_application_error_between_failures_resets_them(clock: FakeClock, rng: random.Random) -> None:
    pool = new_pool(clock, rng, failure_accrual=ONLY_CONSECUTIVE)
    route = pool.routes[0]

    for code in [UNAVAILABLE] * 4 + [NOT_FOUND] + [UNAVAILABLE] * 4:
        call_on(pool, route, code)

    assert route.status == "healthy"


def test_failure_codes_come_from_the_policy(clock: FakeClock, rng: random.Random) -> None:
    policy = FailureAccrual(failure_codes=frozenset({NOT_FOUND}), success_rate=None)
    pool = new_pool(clock, rng, failure_accrual=policy)
    unavailable, not_found = pool.routes[0], pool.routes[1]

    for _ in range(20):
        call_on(pool, unavailable, UNAVAILABLE)
    for _ in range(5):
        call_on(pool, not_found, NOT_FOUND)

    assert (unavailable.status, not_found.status) == ("healthy", "ejected")


def test_accrual_switched_off_never_ejects(clock: FakeClock, rng: random.Random) -> None:
    pool = new_pool(clock, rng, failure_accrual=None)
    route = pool.routes[0]

    for _ in range(100):
        call_on(pool, route, UNAVAILABLE)

    assert route.status == "healthy"
    assert route.accrual is None


def test_no_more_than_max_ejected_share_is_ejected(clock: FakeClock, rng: random.Random) -> None:
    pool = new_pool(clock, rng, max_ejected_share=0.5)
    bad = set(pool.routes[:3])

    out_counts = []
    for _ in range(3000):
        slot = pool.begin()
        pool.end(slot, None, UNAVAILABLE if slot.route in bad else None)
        out_counts.append(sum(r.status == "ejected" for r in pool.routes))

    assert max(out_counts) == 2
    assert out_counts[-1] == 2
    (kept,) = [r for r in bad if r.status != "ejected"]
    assert kept.status == "healthy"  # kept in rotation, failing, rather than shrink the pool further
    assert not pool.panic
    assert picks(pool, 400)[address(kept)] > 0


def test_max_ejected_share_zero_ejects_nothing(clock: FakeClock, rng: random.Random) -> None:
    pool = new_pool(clock, rng, max_ejected_share=0.0)
    route = pool.routes[0]

    for _ in range(50):
        call_on(pool, route, UNAVAILABLE)

    assert route.ejections == 0


# -- PoolState: probing after an ejection ---------------------------------------------------------


def ejected_pool(clock: FakeClock, rng: random.Random, **config: Any) -> tuple[PoolState, Route]:
    """Four READY routes, the first ejected."""
    pool = new_pool(clock, rng, **config)
    all_ready(pool)
    bad = pool.routes[0]
    eject(pool, bad)
    return pool, bad


def end_ejection(clock: FakeClock, route: Route) -> None:
    assert route.ejected_until is not None
    clock.now = route.ejected_until


def test_when_the_ejection_ends_exactly_one_call_probes_the_route(clock: FakeClock, rng: random.Random) -> None:
    pool, bad = ejected_pool(clock, rng)
    end_ejection(clock, bad)

    probe = pool.begin()

    assert probe.route is bad
    assert bad.status == "probing"
    # Calls in flight and calls that end: none of them goes to the probed route meanwhile.
    held = [pool.begin() for _ in range(300)]
    assert all(slot.route is not bad for slot in held)
    assert picks(pool, 1000)[address(bad)] == 0
    for slot in held:
        pool.end(slot, None, None)

    pool.end(probe, None, None)

    assert bad.status == "healthy"
    assert pool.describe()["transitions"][-1]["why"] == "probe succeeded"
    assert picks(pool, 1000)[address(bad)] > 150  # a quarter, give or take


def test_a_failed_probe_ejects_the_route_again_for_longer(clock: FakeClock, rng: random.Random) -> None:
    pool, bad = ejected_pool(clock, rng)
    assert bad.ejected_until is not None
    first = bad.ejected_until - clock()
    end_ejection(clock, bad)

    pool.end(pool.begin(), None, UNAVAILABLE)

    assert bad.status == "ejected"
    assert bad.ejections == 2
    assert bad.ejected_until is not None
    second = bad.ejected_until - clock()
    assert 4.0 <= first <= 6.0
    assert 8.0 <= second <= 12.0
    assert pool.describe()["transitions"][-1]["why"].startswith("probe failed; ejected for")
    assert picks(pool, 500)[address(bad)] == 0


def test_a_failed_probe_ejects_for_longer_after_a_long_healthy_stretch(clock: FakeClock, rng: random.Random) -> None:
    pool = new_pool(clock, rng)
    all_ready(pool)
    bad = pool.routes[0]
    for _ in range(60):  # a minute of good traffic
        clock.advance(1.0)
        picks(pool, 4)
    first = eject(pool, bad)
    end_ejection(clock, bad)

    pool.end(pool.begin(), None, UNAVAILABLE)

    assert bad.ejected_until is not None
    assert 4.0 <= first <= 6.0
    assert 8.0 <= bad.ejected_until - clock() <= 12.0


def test_a_cancelled_probe_lets_the_next_call_probe(clock: FakeClock, rng: random.Random) -> None:
    pool, bad = ejected_pool(clock, rng)
    end_ejection(clock, bad)
    probe = pool.begin()
    assert probe.route is bad

    pool.end(probe, None, CANCELLED)

    assert bad.status == "probing"
    second = pool.begin()
    assert second.route is bad
    assert picks(pool, 500)[address(bad)] == 0  # and again only the one
    pool.end(second, None, None)
    assert bad.status == "healthy"
    assert bad.ejections == 1


def test_a_probe_waits_for_a_ready_connection(clock: FakeClock, rng: random.Random) -> None:
    pool, bad = ejected_pool(clock, rng)
    set_route_state(pool, bad, TRANSIENT_FAILURE)
    assert bad.status == "ejected"  # ejected wins over failing
    end_ejection(clock, bad)

    assert picks(pool, 500)[address(bad)] == 0
    assert bad.status == "probing"
    set_route_state(pool, bad, CONNECTING)
    assert picks(pool, 500)[address(bad)] == 0

    pool.set_slot_state(bad.slots[0], READY)

    probe = pool.begin()
    assert probe.route is bad
    pool.end(probe, None, None)
    assert bad.status == "healthy"


def test_calls_in_flight_before_the_ejection_do_not_decide_it(clock: FakeClock, rng: random.Random) -> None:
    # Round robin: peak EWMA would steer every further call away from the busy route.
    pool = new_pool(clock, rng, balancer="round_robin")
    all_ready(pool)
    bad = pool.routes[0]
    earlier = begin_on(pool, bad)
    eject(pool, bad)

    pool.end(earlier, None, None)  # a success from before the ejection

    assert bad.status == "ejected"


# -- PoolState: health checks and connectivity ----------------------------------------------------


def test_not_serving_takes_a_route_out_and_serving_brings_it_back(clock: FakeClock, rng: random.Random) -> None:
    pool = new_pool(clock, rng)
    route = pool.routes[1]
    assert route.health == "unknown"  # checks are on by default; no answer yet is not a verdict

    pool.set_health(route, "not_serving")

    assert route.status == "unhealthy"
    assert picks(pool, 1000)[address(route)] == 0
    assert transitions_of(pool, route)[-1] == ("healthy", "unhealthy")
    assert pool.describe()["transitions"][-1]["why"] == "health check: not serving"

    pool.set_health(route, "serving")

    assert route.status == "healthy"
    assert picks(pool, 1000)[address(route)] > 150


def test_without_health_checks_a_route_is_unchecked(clock: FakeClock, rng: random.Random) -> None:
    pool = new_pool(clock, rng, health_check=None)

    assert {e["health"] for e in pool.describe()["endpoints"]} == {"unchecked"}


@pytest.mark.parametrize("state", [TRANSIENT_FAILURE, SHUTDOWN], ids=lambda s: s.name)
def test_a_route_whose_connections_all_fail_is_not_picked(
    clock: FakeClock, rng: random.Random, state: grpc.ChannelConnectivity
) -> None:
    pool = new_pool(clock, rng, connections_per_endpoint=2)
    all_ready(pool)
    route = pool.routes[2]

    pool.set_slot_state(route.slots[0], state)

    assert route.status == "healthy"  # one connection of two still works
    landed_slots: Counter[tuple[bool, int]] = Counter()
    for _ in range(1000):
        slot = pool.begin()
        landed_slots[slot.route is route, slot.index] += 1
        pool.end(slot, None, None)
    assert landed_slots[True, 0] == 0
    assert landed_slots[True, 1] > 150

    pool.set_slot_state(route.slots[1], state)

    assert route.status == "failing"
    assert pool.resolve_soon
    assert picks(pool, 1000)[address(route)] == 0


def test_a_failing_connection_stays_failing_until_ready(clock: FakeClock, rng: random.Random) -> None:
    pool = new_pool(clock, rng)
    all_ready(pool)
    route = pool.routes[0]

    for state in (TRANSIENT_FAILURE, CONNECTING, IDLE, CONNECTING, TRANSIENT_FAILURE, CONNECTING):
        pool.set_slot_state(route.slots[0], state)
        assert route.status == "failing", state
        assert picks(pool, 200)[address(route)] == 0

    pool.set_slot_state(route.slots[0], READY)

    assert route.status == "healthy"
    assert transitions_of(pool, route) == [("healthy", "failing"), ("failing", "healthy")]


def test_a_connection_that_never_failed_may_take_calls_while_connecting(clock: FakeClock, rng: random.Random) -> None:
    pool = new_pool(clock, rng)

    pool.set_slot_state(pool.routes[0].slots[0], CONNECTING)

    assert pool.routes[0].status == "healthy"
    assert picks(pool, 1000)[address(pool.routes[0])] > 150


# -- PoolState: panic and fast failure ----------------------------------------------------------


def test_panic_spreads_calls_over_every_route_that_can_connect(clock: FakeClock, rng: random.Random) -> None:
    pool = new_pool(clock, rng, panic_threshold=0.5)
    all_ready(pool)
    healthy, unhealthy, ejected, failing = pool.routes
    pool.set_health(unhealthy, "not_serving")
    eject(pool, ejected)
    assert not pool.panic  # two of four healthy: at the threshold, not below it

    set_route_state(pool, failing, TRANSIENT_FAILURE)

    assert pool.describe()["panic"] is True
    landed = picks(pool, 6000)
    assert landed[address(failing)] == 0
    for route in (healthy, unhealthy, ejected):
        assert landed[address(route)] / 6000 == pytest.approx(1 / 3, abs=0.05), landed


def test_panic_with_three_of_four_not_serving_uses_all_four(clock: FakeClock, rng: random.Random) -> None:
    pool = new_pool(clock, rng)
    for route in pool.routes[1:]:
        pool.set_health(route, "not_serving")

    assert pool.panic
    landed = picks(pool, 8000)
    for route in pool.routes:
        assert landed[address(route)] / 8000 == pytest.approx(0.25, abs=0.04), landed

    pool.set_health(pool.routes[1], "serving")

    assert not pool.panic
    assert set(picks(pool, 1000)) == {address(pool.routes[0]), address(pool.routes[1])}


def test_without_panic_calls_go_only_to_healthy_routes(clock: FakeClock, rng: random.Random) -> None:
    pool = new_pool(clock, rng, panic_threshold=0.0)
    for route in pool.routes[1:]:
        pool.set_health(route, "not_serving")

    assert not pool.panic
    assert picks(pool, 1000) == {address(pool.routes[0]): 1000}


def unavailable_details(pool: PoolState, wait_for_ready: bool | None = None) -> str:
    with pytest.raises(PoolUnavailableError) as raised:
        pool.begin(wait_for_ready)
    assert isinstance(raised.value, grpc.RpcError)
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    return raised.value.details()


def test_with_no_healthy_route_and_no_panic_a_call_fails_at_once_saying_why(
    clock: FakeClock, rng: random.Random
) -> None:
    pool = new_pool(clock, rng, routes=3, panic_threshold=0.0)
    all_ready(pool)
    ejected, failing, not_serving = pool.routes
    eject(pool, ejected)
    set_route_state(pool, failing, TRANSIENT_FAILURE)
    pool.set_health(not_serving, "not_serving")

    details = unavailable_details(pool)

    assert "every endpoint is unavailable" in details
    assert "10.0.0.1:50051 ejected for " in details
    assert "10.0.0.2:50051 failing" in details
    assert "10.0.0.3:50051 not serving" in details


def test_wait_for_ready_picks_a_route_instead_of_failing(clock: FakeClock, rng: random.Random) -> None:
    pool = new_pool(clock, rng, routes=3, panic_threshold=0.0)
    for route in pool.routes:
        pool.set_health(route, "not_serving")
    unavailable_details(pool)

    landed = picks(pool, 3000, wait_for_ready=True)

    for route in pool.routes:
        assert landed[address(route)] / 3000 == pytest.approx(1 / 3, abs=0.05), landed
    assert pool.in_flight == 0


def test_when_every_route_is_failing_even_panic_fails_at_once(clock: FakeClock, rng: random.Random) -> None:
    pool = new_pool(clock, rng, routes=2)
    for route in pool.routes:
        set_route_state(pool, route, TRANSIENT_FAILURE)

    details = unavailable_details(pool)

    assert "10.0.0.1:50051 failing" in details
    assert "10.0.0.2:50051 failing" in details
    assert not pool.panic


def test_a_closed_pool_refuses_calls(clock: FakeClock, rng: random.Random) -> None:
    pool = new_pool(clock, rng)
    pool.close()

    with pytest.raises(PoolClosedError) as raised:
        pool.begin(wait_for_ready=True)

    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "closed" in raised.value.details()


def test_a_pool_without_endpoints_says_so_with_the_resolver_error(clock: FakeClock, rng: random.Random) -> None:
    pool = PoolState("dns:///orders.internal:50051", [], PoolConfig(), clock=clock, rng=rng)

    assert "no endpoint" in unavailable_details(pool)
    assert "no endpoint" in unavailable_details(pool, wait_for_ready=True)
    pool.resolver_error = "OSError: registry down"
    details = unavailable_details(pool)
    assert "no endpoint" in details
    assert "OSError: registry down" in details


# -- PoolState: discovery updates and draining ----------------------------------------------------


def test_new_endpoints_get_calls_and_missing_ones_drain(clock: FakeClock, rng: random.Random) -> None:
    pool = new_pool(clock, rng, routes=3)
    one, two, three = pool.routes
    in_flight = begin_on(pool, two)
    wanted = [endpoint(1), endpoint(3), endpoint(4)]

    pool.update_endpoints(pool.new_routes(pool.unknown(wanted)), wanted)

    four = pool.routes[-1]
    assert address(four) == "10.0.0.4:50051"
    assert two.status == "draining"
    landed = picks(pool, 3000)
    assert landed[address(two)] == 0
    for route in (one, three, four):
        assert landed[address(route)] / 3000 == pytest.approx(1 / 3, abs=0.05), landed
    assert pool.take_drained() == []  # a call is still in flight on it
    assert two in pool.routes

    pool.end(in_flight, None, None)

    assert pool.take_drained() == [two]
    assert two not in pool.routes
    assert pool.take_drained() == []
    assert pool.in_flight == 0
    history = [(t["from"], t["to"], t["why"]) for t in pool.describe()["transitions"] if t["endpoint"] == address(two)]
    assert history == [("healthy", "draining", "resolver"), ("draining", "closed", "drained")]


def test_a_draining_route_wanted_again_comes_back(clock: FakeClock, rng: random.Random) -> None:
    pool = new_pool(clock, rng, routes=3)
    route = pool.routes[0]
    everything = [r.endpoint for r in pool.routes]

    pool.update_endpoints([], everything[1:])
    assert route.status == "draining"
    pool.update_endpoints(pool.new_routes(pool.unknown(everything)), everything)

    assert len(pool.routes) == 3
    assert route.status == "healthy"
    assert picks(pool, 1000)[address(route)] > 150
    assert pool.take_drained() == []


def test_a_route_that_drained_away_and_returns_is_a_new_route(clock: FakeClock, rng: random.Random) -> None:
    pool = new_pool(clock, rng, routes=2)
    old = pool.routes[0]
    pool.update_endpoints([], [endpoint(2)])
    assert pool.take_drained() == [old]

    pool.update_endpoints(pool.new_routes(pool.unknown([endpoint(1), endpoint(2)])), [endpoint(1), endpoint(2)])

    (new,) = [r for r in pool.routes if address(r) == address(old)]
    assert new is not old
    assert picks(pool, 1000)[address(new)] > 300


def test_a_route_whose_probe_came_due_while_draining_is_probed_when_it_returns(
    clock: FakeClock, rng: random.Random
) -> None:
    pool, bad = ejected_pool(clock, rng)
    everything = [r.endpoint for r in pool.routes]
    pool.update_endpoints([], everything[1:])  # a DNS answer without it
    end_ejection(clock, bad)
    picks(pool, 10)  # the ejection ends during these calls
    pool.update_endpoints([], everything)  # the next answer has it again

    clock.advance(600.0)

    assert picks(pool, 1000)[address(bad)] > 0
    assert bad.status == "healthy"


# -- PoolState: describe -------------------------------------------------------------------------


def test_describe_reports_each_routes_health(clock: FakeClock, rng: random.Random) -> None:
    pool, bad = ejected_pool(clock, rng)
    pool.set_health(pool.routes[1], "serving")
    pool.set_health(pool.routes[2], "not_serving")
    clock.advance(1.0)

    snapshot = pool.describe()

    assert json.loads(json.dumps(snapshot)) == snapshot
    entries = {e["address"]: e for e in snapshot["endpoints"]}
    ejected = entries[address(bad)]
    assert (ejected["status"], ejected["health"], ejected["ejections"]) == ("ejected", "unknown", 1)
    assert bad.ejected_until is not None
    assert ejected["ejected_for_s"] == pytest.approx(bad.ejected_until - clock(), abs=0.001)
    assert 3.0 <= ejected["ejected_for_s"] <= 5.0
    assert [(e["status"], e["health"], e["ejections"], e["ejected_for_s"]) for e in snapshot["endpoints"][1:]] == [
        ("healthy", "serving", 0, None),
        ("unhealthy", "not_serving", 0, None),
        ("healthy", "unknown", 0, None),
    ]
    (ejection,) = [t for t in snapshot["transitions"] if t["to"] == "ejected"]
    assert ejection["endpoint"] == address(bad)
    assert ejection["from"] == "healthy"
    assert ejection["why"].startswith("5 consecutive failures; ejected for ")
    assert ejection["ago_s"] == pytest.approx(1.0)


def test_describe_ejected_for_never_goes_negative(clock: FakeClock, rng: random.Random) -> None:
    pool, bad = ejected_pool(clock, rng)

    clock.advance(3600.0)  # long over, but no call has come to end it yet

    assert described(pool, bad)["ejected_for_s"] == 0.0


# -- PoolState: accounting under random traffic and events -----------------------------------

_CODES = [None, None, UNAVAILABLE, UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, CANCELLED, NOT_FOUND]
_STATES = [READY, READY, CONNECTING, IDLE, TRANSIENT_FAILURE, SHUTDOWN]
_HEALTH = ["serving", "not_serving", "unknown", "unimplemented"]
_EVERY_ENDPOINT = [endpoint(n) for n in range(1, 7)]


def check_pick(pool: PoolState, slot: Slot, wait_for_ready: bool) -> None:
    """A call goes to a route in rotation: the probe, a healthy route, or in panic any that
    can connect; only wait_for_ready falls back to the rest, and never to a draining one."""
    route = slot.route
    assert route.status != "draining"
    if route.probe == _PROBE_SENT or wait_for_ready:
        return
    if pool.panic:
        assert not route.failing, route
    else:
        assert route.status == "healthy", route


def check_accounting(pool: PoolState, running: Iterable[Slot]) -> None:
    in_flight = Counter(running)
    assert pool.in_flight == sum(in_flight.values())
    for route in pool.routes:
        assert route.status == route._status(), route
        assert route.metric.pending == sum(slot.pending for slot in route.slots), route
        for slot in route.slots:
            assert slot.pending == in_flight[slot] >= 0, slot


def random_event(pool: PoolState, script: random.Random) -> None:
    roll = script.random()
    if roll < 0.6:
        pool.set_slot_state(script.choice(pool.slots), script.choice(_STATES))
    elif roll < 0.85:
        pool.set_health(script.choice(pool.routes), script.choice(_HEALTH))
    else:
        wanted = script.sample(_EVERY_ENDPOINT, script.randint(1, len(_EVERY_ENDPOINT)))
        pool.update_endpoints(pool.new_routes(pool.unknown(wanted)), wanted)
        assert all(route.metric.pending == 0 for route in pool.take_drained())


@pytest.mark.parametrize("seed", range(8))
def test_in_flight_stays_exact_under_random_calls_and_events(seed: int) -> None:
    clock = FakeClock()
    script = random.Random(seed)
    pool = new_pool(clock, random.Random(seed + 1_000), connections_per_endpoint=2)
    running: list[Slot] = []
    statuses: Counter[str] = Counter()

    for _ in range(4000):
        clock.advance(script.random() * 0.05)
        roll = script.random()
        if roll < 0.45:
            wait_for_ready = script.random() < 0.1
            try:
                slot = pool.begin(wait_for_ready)
            except PoolUnavailableError:
                statuses["unavailable"] += 1
            else:
                check_pick(pool, slot, wait_for_ready)
                running.append(slot)
        elif roll < 0.9 and running:
            slot = running.pop(script.randrange(len(running)))
            pool.end(slot, clock() - script.random(), script.choice(_CODES))
        else:
            random_event(pool, script)
        check_accounting(pool, running)
        statuses.update(route.status for route in pool.routes)

    for slot in running:
        pool.end(slot, None, None)
    check_accounting(pool, [])
    assert pool.describe()["in_flight"] == 0
    # The walk went through the states it is meant to exercise.
    assert {"healthy", "ejected", "probing", "failing", "unhealthy", "draining"} <= set(statuses), statuses


# -- HealthChecker ---------------------------------------------------------------------------------

_Response = health_pb2.HealthCheckResponse


def test_watch_falls_back_to_check_then_to_assuming_healthy() -> None:
    checker = HealthChecker(HealthCheck(service="orders"), random.Random(1))
    assert checker.mode == WATCH
    assert checker.request.service == "orders"

    assert checker.failed(grpc.StatusCode.UNIMPLEMENTED) == (None, 0.0)
    assert checker.mode == CHECK
    assert checker.failed(grpc.StatusCode.UNIMPLEMENTED) == ("unimplemented", 0.0)
    assert checker.mode == DONE


def test_polling_when_watch_is_off() -> None:
    checker = HealthChecker(HealthCheck(watch=False, interval=2.5), random.Random(1))

    assert checker.mode == CHECK
    assert checker.interval == 2.5
    assert checker.failed(grpc.StatusCode.DEADLINE_EXCEEDED) == ("unknown", 2.5)
    assert checker.failed(UNAVAILABLE) == ("unknown", 2.5)
    assert checker.failed(grpc.StatusCode.UNIMPLEMENTED) == ("unimplemented", 0.0)


@pytest.mark.parametrize("watch", [True, False])
def test_an_unknown_service_is_not_serving(watch: bool) -> None:
    checker = HealthChecker(HealthCheck(watch=watch, interval=5.0), random.Random(1))

    assert checker.failed(NOT_FOUND) == ("not_serving", 5.0)


@pytest.mark.parametrize(
    ("status", "health"),
    [
        (_Response.SERVING, "serving"),
        (_Response.NOT_SERVING, "not_serving"),
        (_Response.SERVICE_UNKNOWN, "not_serving"),
        (_Response.UNKNOWN, "unknown"),
    ],
)
def test_answers_map_to_health(status: int, health: str) -> None:
    checker = HealthChecker(HealthCheck(), random.Random(1))

    assert checker.answered(_Response(status=status)) == health


def test_a_watch_the_server_ends_cleanly_is_started_again_at_once() -> None:
    checker = HealthChecker(HealthCheck(), random.Random(1))

    assert checker.failed(None) == (None, 0.0)
    assert checker.mode == WATCH


def watch_delays(checker: HealthChecker, failures: int) -> list[float]:
    delays = []
    for _ in range(failures):
        health, delay = checker.failed(UNAVAILABLE)
        assert health == "unknown"
        delays.append(delay)
    return delays


# 1 s × 1.6 per failure, capped at 30 s: the 9th failure is the first past the cap.
_BACKOFF = [min(30.0, 1.6**n) for n in range(12)]


def test_watch_backoff_grows_and_caps_within_its_jitter() -> None:
    for seed in range(300):
        delays = watch_delays(HealthChecker(HealthCheck(), random.Random(seed)), len(_BACKOFF))

        for delay, base in zip(delays, _BACKOFF, strict=True):
            assert base * 0.8 <= delay <= base * 1.2, (seed, delays)
    assert _BACKOFF[-4:] == [30.0] * 4


def test_watch_backoff_jitter_spans_its_band() -> None:
    firsts = [watch_delays(HealthChecker(HealthCheck(), random.Random(seed)), 1)[0] for seed in range(2000)]

    assert min(firsts) < 0.81
    assert max(firsts) > 1.19
    assert statistics.fmean(firsts) == pytest.approx(1.0, abs=0.015)  # standard error 0.0026


def test_an_answer_resets_the_backoff() -> None:
    checker = HealthChecker(HealthCheck(), random.Random(5))
    assert watch_delays(checker, 8)[-1] > 20.0

    checker.answered(_Response(status=_Response.SERVING))

    assert 0.8 <= watch_delays(checker, 1)[0] <= 1.2


# -- Discovery -------------------------------------------------------------------------------------


def resolver_returning(answer: Any) -> Any:
    def resolve(target: str) -> Any:
        return answer

    return resolve


def registry(answer: Any, *, interval: float = 10.0, seed: int = 1, now: float = 0.0) -> Discovery:
    config = PoolConfig(resolver=resolver_returning(answer), resolve_interval=interval)
    return Discovery("registry:orders", config, random.Random(seed), now)


def test_a_resolver_is_asked_again_after_the_jittered_interval() -> None:
    waits = []
    for seed in range(500):
        discovery = registry(["10.0.0.1:50051"], seed=seed, now=100.0)
        waits.append(discovery.wait(100.0))

        assert discovery.dynamic
        assert not discovery.due(107.99, soon=False)
        assert not discovery.due(discovery.next_at - 1e-6, soon=False)
        assert discovery.due(discovery.next_at, soon=False)
        assert discovery.due(112.01, soon=False)

    assert all(8.0 <= w <= 12.0 for w in waits)
    assert min(waits) < 8.1
    assert max(waits) > 11.9


def test_a_failure_brings_the_next_resolution_forward_but_not_before_a_second() -> None:
    discovery = registry(["10.0.0.1:50051"], now=0.0)

    assert not discovery.due(0.5, soon=True)
    assert discovery.due(1.0, soon=True)
    assert not discovery.due(1.0, soon=False)

    discovery.resolve(50.0)

    assert not discovery.due(50.99, soon=True)
    assert discovery.due(51.0, soon=True)


def test_resolving_reschedules_and_returns_the_endpoints() -> None:
    asked: list[str] = []

    def resolver(target: str) -> list[str]:
        asked.append(target)
        return ["10.0.0.1:50051", "[::1]:7"]

    discovery = Discovery("registry:orders", PoolConfig(resolver=resolver), random.Random(1), 0.0)

    endpoints = discovery.resolve(40.0)

    assert asked == ["registry:orders"]
    assert endpoints == [Endpoint("10.0.0.1", 50051, "10.0.0.1:50051"), Endpoint("::1", 7, "[::1]:7")]
    assert discovery.last_error is None
    assert 40.0 + 24.0 <= discovery.next_at <= 40.0 + 36.0
    assert discovery.describe() == {"interval": 30.0, "resolutions": 1, "last_error": None}


def test_a_failing_resolver_keeps_the_last_endpoints_and_says_why() -> None:
    answers: list[Any] = [RuntimeError("registry down"), [], ["10.0.0.1:50051"]]

    def resolver(target: str) -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    discovery = Discovery("registry:orders", PoolConfig(resolver=resolver), random.Random(1), 0.0)

    assert discovery.first() == []
    assert discovery.last_error == "RuntimeError: registry down"
    assert discovery.resolve(30.0) is None
    assert discovery.last_error is not None
    assert "no address" in discovery.last_error
    assert discovery.resolve(60.0) == [endpoint(1)]
    assert discovery.last_error is None
    assert discovery.resolutions == 3


@pytest.mark.parametrize(
    "answer",
    [
        "10.0.0.1:50051",
        [50051],
        ["10.0.0.1:50051", b"10.0.0.2:50051"],
        None,
        50051,
    ],
    ids=["a string", "numbers", "bytes", "None", "a number"],
)
def test_a_resolver_answer_of_the_wrong_type_is_reported(answer: Any) -> None:
    discovery = registry(answer)

    assert discovery.resolve(1.0) is None

    assert discovery.last_error is not None
    assert "resolver" in discovery.last_error
    assert "'host:port' strings" in discovery.last_error


def test_a_resolver_answer_with_a_bad_port_is_reported() -> None:
    discovery = registry(["10.0.0.1:50051", "10.0.0.2:99999"])

    assert discovery.resolve(1.0) is None

    assert discovery.last_error is not None
    assert "99999" in discovery.last_error


@pytest.mark.parametrize("target", ["ipv4:10.0.0.1:1,10.0.0.2:2", "10.0.0.1:50051", "[::1]:50051"])
def test_ip_literals_are_resolved_once(target: str) -> None:
    discovery = Discovery(target, PoolConfig(resolve_interval=10.0), random.Random(1), 0.0)

    assert discovery.interval is None
    assert not discovery.dynamic
    assert not discovery.due(1e9, soon=True)
    assert discovery.wait(0.0) == float("inf")
    assert discovery.first()


@pytest.mark.parametrize("target", ["localhost:123", "dns:///localhost:123", ["localhost:123"]])
def test_host_names_are_resolved_again(target: Any) -> None:
    # Built only: construction does no lookup, so nothing here touches DNS.
    discovery = Discovery(target, PoolConfig(resolve_interval=10.0), random.Random(1), 0.0)

    assert discovery.dynamic
    assert discovery.interval == 10.0
    assert 8.0 <= discovery.next_at <= 12.0


def test_a_host_name_without_a_resolve_interval_is_resolved_once() -> None:
    discovery = Discovery("localhost:123", PoolConfig(resolve_interval=None), random.Random(1), 0.0)

    assert not discovery.dynamic
    assert not discovery.due(1e9, soon=True)


def test_an_ejected_route_whose_health_check_turns_serving_is_probed_at_once(
    clock: FakeClock, rng: random.Random
) -> None:
    pool = new_pool(clock, rng)
    all_ready(pool)
    bad = pool.routes[0]
    pool.set_health(bad, "unknown")  # its health stream broke when it went down
    eject(pool, bad)
    assert bad.status == "ejected"
    pool.set_health(bad, "serving")  # back up: the Watch answers again
    assert bad.status == "probing"
    probe = pool.begin()
    assert probe.route is bad
    pool.end(probe, None, None)
    assert bad.status == "healthy"
