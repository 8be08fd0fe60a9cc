"""The sans-I/O core: load metrics, pick algorithms, pool state and target parsing,
driven by a fake clock and a seeded random source, with statistical assertions."""

from __future__ import annotations

import heapq
import itertools
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from _support import FakeClock

from poolkit import ConfigError, PoolClosedError, PoolConfig
from poolkit._balancer import PowerOfTwoChoices, RoundRobin
from poolkit._metric import LeastLoaded, PeakEwma
from poolkit._pool import PoolState
from poolkit._target import DEFAULT_PORT, Endpoint, parse_target

DECAY = 10.0
INITIAL_RTT = 0.030
# Chi-square critical value for 3 degrees of freedom at p = 0.001: four equally likely
# outcomes exceed it by chance once in a thousand seeds.
CHI2_3DF_P001 = 16.27


def new_peak_ewma(now: float = 0.0) -> PeakEwma:
    return PeakEwma(decay=DECAY, initial_rtt=INITIAL_RTT, now=now)


# -- PeakEwma ---------------------------------------------------------------------------------


def test_first_sample_replaces_the_prior() -> None:
    metric = new_peak_ewma()

    metric.observe(0.001, now=5.0)

    assert metric.estimate(5.0) == pytest.approx(0.001)


def test_higher_sample_replaces_the_estimate_at_once() -> None:
    metric = new_peak_ewma()
    metric.observe(0.010, now=0.0)

    metric.observe(0.200, now=1.0)

    assert metric.estimate(1.0) == pytest.approx(0.200)


def test_sample_above_the_decayed_estimate_replaces_it() -> None:
    metric = new_peak_ewma()
    metric.observe(0.100, now=0.0)  # decays to 0.1 / e ≈ 0.037 by t = 10

    metric.observe(0.050, now=DECAY)

    assert metric.estimate(DECAY) == pytest.approx(0.050)


@pytest.mark.parametrize("elapsed", [0.5, 3.0, 10.0])
def test_lower_sample_blends_with_weight_of_elapsed_time(elapsed: float) -> None:
    # 0.020 stays below the decayed estimate (0.1 / e at 10 s), so it is blended, not taken.
    metric = new_peak_ewma()
    metric.observe(0.100, now=0.0)

    metric.observe(0.020, now=elapsed)

    weight = math.exp(-elapsed / DECAY)
    assert metric.estimate(elapsed) == pytest.approx(0.100 * weight + 0.020 * (1 - weight))


def test_estimate_decays_towards_zero_when_idle() -> None:
    metric = new_peak_ewma()
    metric.observe(0.050, now=0.0)

    estimates = [metric.estimate(t) for t in (0.0, 1.0, 10.0, 50.0, 200.0)]

    assert estimates[0] == pytest.approx(0.050)
    assert estimates[2] == pytest.approx(0.050 / math.e)
    assert all(a > b > 0 for a, b in itertools.pairwise(estimates))
    assert estimates[-1] < 1e-9


def test_unsampled_route_is_free_while_idle_and_costs_the_prior_per_call() -> None:
    metric = new_peak_ewma()

    assert metric.load(0.0) == 0.0
    assert metric.load(1000.0) == 0.0
    metric.pending = 3
    assert metric.load(0.0) == pytest.approx(3 * INITIAL_RTT)
    assert metric.load(1000.0) == pytest.approx(3 * INITIAL_RTT)


def test_sampled_load_is_estimate_times_pending_plus_one() -> None:
    metric = new_peak_ewma()
    metric.observe(0.010, now=0.0)

    assert metric.load(0.0) == pytest.approx(0.010, rel=1e-3)
    metric.pending = 4
    assert metric.load(0.0) == pytest.approx(0.050, rel=1e-3)
    assert metric.load(DECAY) == pytest.approx(0.050 / math.e, rel=1e-3)


def test_sampled_load_never_reaches_zero_while_calls_are_pending() -> None:
    metric = new_peak_ewma()
    metric.observe(0.010, now=0.0)
    metric.pending = 2

    assert metric.load(10_000.0) > 0


def test_least_loaded_counts_calls_in_flight_only() -> None:
    metric = LeastLoaded(decay=DECAY, initial_rtt=INITIAL_RTT, now=0.0)

    metric.observe(5.0, now=1.0)
    assert metric.load(1.0) == 0.0
    metric.pending = 7
    assert metric.load(1.0) == 7.0
    assert metric.estimate(1.0) == 5.0


# -- pick algorithms -----------------------------------------------------------------------------


class FixedLoad:
    """A metric whose load is whatever the test says; records each time it is asked."""

    def __init__(self, value: float = 0.0, asked: list[FixedLoad] | None = None) -> None:
        self.value = value
        self.pending = 0
        self._asked = asked

    def load(self, now: float) -> float:
        if self._asked is not None:
            self._asked.append(self)
        return self.value


@dataclass(eq=False)
class Node:
    name: str
    metric: Any
    weight: float = 1.0
    picked_at: list[float] = field(default_factory=list)  # fake-clock time of each pick

    @property
    def picks(self) -> int:
        return len(self.picked_at)


def picker_over(kind: type[PowerOfTwoChoices | RoundRobin], nodes: list[Node], seed: int) -> Any:
    picker = kind(random.Random(seed))
    picker.update(nodes)
    return picker


def shares(picker: Any, picks: int, now: float = 0.0) -> Counter[str]:
    return Counter(picker.pick(now).name for _ in range(picks))


def test_p2c_compares_two_distinct_nodes_and_takes_the_lighter() -> None:
    asked: list[FixedLoad] = []
    nodes = [Node(str(i), FixedLoad(float(i), asked)) for i in range(5)]
    picker = picker_over(PowerOfTwoChoices, nodes, seed=1)
    compared: Counter[frozenset[int]] = Counter()

    for _ in range(5000):
        asked.clear()
        chosen = picker.pick(0.0)
        assert len(asked) == 2
        assert asked[0] is not asked[1]
        assert chosen.metric is min(asked, key=lambda m: m.value)
        compared[frozenset(int(m.value) for m in asked)] += 1

    assert len(compared) == 10  # every pair of the five nodes met
    assert min(compared.values()) > 5000 / 10 * 0.8


def test_p2c_with_one_node_picks_it() -> None:
    only = Node("only", FixedLoad(1.0))
    picker = picker_over(PowerOfTwoChoices, [only], seed=1)

    assert all(picker.pick(0.0) is only for _ in range(10))


@pytest.mark.parametrize("load", [0.0, 0.004])
def test_p2c_picks_uniformly_when_loads_are_equal(load: float) -> None:
    nodes = [Node(str(i), FixedLoad(load)) for i in range(4)]
    picker = picker_over(PowerOfTwoChoices, nodes, seed=7)

    counts = shares(picker, 40_000)

    chi2 = sum((counts[n.name] - 10_000) ** 2 / 10_000 for n in nodes)
    assert chi2 < CHI2_3DF_P001, counts


def test_p2c_pending_calls_raise_load() -> None:
    a, b = Node("a", new_peak_ewma()), Node("b", new_peak_ewma())
    for node in (a, b):
        node.metric.observe(0.010, now=0.0)
    picker = picker_over(PowerOfTwoChoices, [a, b], seed=3)

    a.metric.pending = 1
    assert shares(picker, 200) == {"b": 200}
    b.metric.pending = 2
    assert shares(picker, 200) == {"a": 200}


def test_p2c_least_loaded_prefers_fewer_calls_in_flight() -> None:
    nodes = [Node(str(i), LeastLoaded(decay=DECAY, initial_rtt=INITIAL_RTT, now=0.0)) for i in range(3)]
    nodes[0].metric.pending = 5
    nodes[1].metric.pending = 1
    picker = picker_over(PowerOfTwoChoices, nodes, seed=3)

    counts = shares(picker, 3000)

    # Node 0 loses every comparison; node 2 is in two of the three pairs and wins both.
    assert counts["0"] == 0
    assert counts["2"] / 3000 == pytest.approx(2 / 3, abs=0.03)


def simulate(picker: Any, latency: dict[str, float], calls: int, concurrency: int) -> None:
    """Drive `picker` as a closed loop: `concurrency` calls always in flight, each taking
    its node's latency on a fake clock and reporting it to the node's metric, as a pool does."""
    clock = 0.0
    running: list[tuple[float, int, Node, float]] = []
    order = itertools.count()
    for _ in range(calls):
        while len(running) >= concurrency:
            finish, _, done, started = heapq.heappop(running)
            clock = finish
            done.metric.pending -= 1
            done.metric.observe(finish - started, finish)
        node = picker.pick(clock)
        node.metric.pending += 1
        node.picked_at.append(clock)
        heapq.heappush(running, (clock + latency[node.name], next(order), node, clock))


def test_p2c_peak_ewma_gives_a_slow_node_a_small_share() -> None:
    nodes = [Node(name, new_peak_ewma()) for name in ("fast-0", "fast-1", "fast-2", "slow")]
    latency = {"fast-0": 0.010, "fast-1": 0.010, "fast-2": 0.010, "slow": 0.100}
    picker = picker_over(PowerOfTwoChoices, nodes, seed=11)

    simulate(picker, latency, calls=20_000, concurrency=8)

    slow = nodes[-1]
    assert slow.picks / 20_000 < 0.02, [n.picks for n in nodes]
    fast = [n.picks for n in nodes[:-1]]
    assert min(fast) > 0.25 * 20_000, fast


def test_p2c_peak_ewma_tries_a_shunned_node_again_once_its_estimate_decays() -> None:
    fast, slow = Node("fast", new_peak_ewma()), Node("slow", new_peak_ewma())
    picker = picker_over(PowerOfTwoChoices, [fast, slow], seed=5)

    # One call at a time for 40 s of fake time: four decay periods.
    simulate(picker, {"fast": 0.010, "slow": 0.100}, calls=4000, concurrency=1)

    # Probed at once while unknown, then shunned until 0.1 s has decayed below 0.01 s,
    # which takes DECAY * ln(10) ≈ 23 s.
    assert slow.picked_at[0] < 0.1
    later = [t for t in slow.picked_at if t > 1.0]
    assert later, f"the slow node was never tried again: {slow.picked_at}"
    assert later[0] == pytest.approx(DECAY * math.log(10), abs=1.0)
    assert slow.picks < 10


@pytest.mark.parametrize("load", [0.0, 0.004], ids=["idle", "busy"])
def test_p2c_weights_3_to_1_give_3_to_1_when_loads_are_equal(load: float) -> None:
    heavy, light = Node("heavy", FixedLoad(load), weight=3.0), Node("light", FixedLoad(load), weight=1.0)
    picker = picker_over(PowerOfTwoChoices, [heavy, light], seed=13)

    counts = shares(picker, 40_000)

    # One standard deviation of the share is 0.002 here; 0.02 is a wide margin.
    assert counts["heavy"] / 40_000 == pytest.approx(0.75, abs=0.02), counts


def test_p2c_weights_3_to_1_in_a_closed_loop() -> None:
    nodes = [Node("heavy", new_peak_ewma(), weight=3.0), Node("light", new_peak_ewma(), weight=1.0)]
    latency = {"heavy": 0.010, "light": 0.010}
    picker = picker_over(PowerOfTwoChoices, nodes, seed=17)

    simulate(picker, latency, calls=20_000, concurrency=8)

    assert nodes[0].picks / 20_000 == pytest.approx(0.75, abs=0.05), [n.picks for n in nodes]


def test_round_robin_is_exact() -> None:
    nodes = [Node(str(i), FixedLoad(float(i))) for i in range(5)]
    picker = picker_over(RoundRobin, nodes, seed=1)

    order = [int(picker.pick(0.0).name) for _ in range(1000)]

    assert Counter(order) == dict.fromkeys(range(5), 200)
    assert all(b == (a + 1) % 5 for a, b in itertools.pairwise(order))


def test_round_robin_starts_at_a_random_node() -> None:
    nodes = [Node(str(i), FixedLoad()) for i in range(5)]

    firsts = {picker_over(RoundRobin, nodes, seed=seed).pick(0.0).name for seed in range(40)}

    assert len(firsts) > 1


def test_smooth_weighted_round_robin_gives_3_of_every_4() -> None:
    heavy, light = Node("h", FixedLoad(), weight=3.0), Node("l", FixedLoad(), weight=1.0)
    picker = picker_over(RoundRobin, [heavy, light], seed=1)

    order = "".join(picker.pick(0.0).name for _ in range(4000))

    assert all(order[i : i + 4].count("h") == 3 for i in range(0, 4000, 4)), order[:40]
    assert "hhhh" not in order  # spread out, not in bursts


def test_smooth_weighted_round_robin_matches_nginx() -> None:
    nodes = [Node("a", FixedLoad(), weight=5.0), Node("b", FixedLoad(), weight=1.0), Node("c", FixedLoad(), weight=1.0)]
    picker = picker_over(RoundRobin, nodes, seed=1)

    order = "".join(picker.pick(0.0).name for _ in range(21))

    assert order == "aabacaa" * 3


# -- PoolState --------------------------------------------------------------------------------

CODES = [None, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND]


def make_pool(clock: FakeClock, rng: random.Random, endpoints: int = 3, **config: Any) -> PoolState:
    listed = [Endpoint("127.0.0.1", 50051 + i, f"127.0.0.1:{50051 + i}") for i in range(endpoints)]
    return PoolState("ipv4:test", listed, PoolConfig(**config), clock=clock, rng=rng)


@pytest.mark.parametrize("balancer", ["p2c_peak_ewma", "p2c_least_loaded", "round_robin"])
def test_pool_accounting_stays_consistent(clock: FakeClock, rng: random.Random, balancer: str) -> None:
    pool = make_pool(clock, rng, balancer=balancer, connections_per_endpoint=2)
    script = random.Random(99)
    running: list[Any] = []
    calls: Counter[str] = Counter()
    errors: Counter[str] = Counter()

    def check() -> None:
        assert pool.in_flight == len(running) >= 0
        for route in pool.routes:
            assert route.metric.pending == sum(slot.pending for slot in route.slots)
            for slot in route.slots:
                assert slot.pending == sum(1 for s, _ in running if s is slot) >= 0

    for _ in range(5000):
        clock.advance(script.random() * 0.01)
        if running and script.random() < 0.5:
            slot, started = running.pop(script.randrange(len(running)))
            code = script.choice(CODES)
            pool.end(slot, started if script.random() < 0.8 else None, code)
            calls[slot.route.endpoint.address] += 1
            errors[slot.route.endpoint.address] += code is not None
        else:
            running.append((pool.begin(), clock()))
        check()
    for slot, started in running:
        pool.end(slot, started, None)
        calls[slot.route.endpoint.address] += 1
    running.clear()
    check()

    snapshot = pool.describe()
    assert json.loads(json.dumps(snapshot)) == snapshot
    assert snapshot["in_flight"] == 0
    for endpoint in snapshot["endpoints"]:
        assert endpoint["calls"] == calls[endpoint["address"]]
        assert endpoint["errors"] == errors[endpoint["address"]]
        assert endpoint["in_flight"] == 0
        assert sum(s["calls"] for s in endpoint["slots"]) == endpoint["calls"]


def test_pool_spreads_calls_over_a_routes_slots(clock: FakeClock, rng: random.Random) -> None:
    pool = make_pool(clock, rng, endpoints=1, connections_per_endpoint=3)

    slots = [pool.begin() for _ in range(6)]

    assert [s.pending for s in pool.routes[0].slots] == [2, 2, 2]
    for slot in slots:
        pool.end(slot, None, None)
    assert pool.in_flight == 0


@pytest.mark.parametrize(
    ("code", "sampled"),
    [
        (None, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, True),
        (grpc.StatusCode.UNAVAILABLE, False),
        (grpc.StatusCode.INTERNAL, False),
        (grpc.StatusCode.NOT_FOUND, False),
        # Cancelled unanswered after longer than the estimate (a hedge's loser): at least that slow.
        (grpc.StatusCode.CANCELLED, True),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_latency_is_sampled_only_for_successes_and_deadlines(
    clock: FakeClock, rng: random.Random, code: grpc.StatusCode | None, sampled: bool
) -> None:
    pool = make_pool(clock, rng, endpoints=1)
    metric = pool.routes[0].metric

    slot = pool.begin()
    started = clock()
    clock.advance(0.250)
    pool.end(slot, started, code)

    if sampled:
        assert metric.estimate(clock()) == pytest.approx(0.250)
        assert metric.load(clock()) == pytest.approx(0.250, rel=1e-3)
    else:
        assert metric.load(clock()) == 0.0  # still unsampled: an idle unknown route is free


def test_a_quick_cancel_does_not_flatter_a_slow_route(clock: FakeClock, rng: random.Random) -> None:
    """A call cancelled sooner than the route's estimate says nothing: the estimate stays."""
    pool = make_pool(clock, rng, endpoints=1)
    metric = pool.routes[0].metric
    slot = pool.begin()
    started = clock()
    clock.advance(0.200)
    pool.end(slot, started)
    slot = pool.begin()
    started = clock()
    clock.advance(0.001)
    pool.end(slot, started, grpc.StatusCode.CANCELLED)

    assert metric.estimate(clock()) == pytest.approx(0.200, rel=0.01)


def test_no_latency_sample_without_a_start_time(clock: FakeClock, rng: random.Random) -> None:
    pool = make_pool(clock, rng, endpoints=1)

    slot = pool.begin()
    clock.advance(0.250)
    pool.end(slot, None, None)

    assert pool.routes[0].metric.load(clock()) == 0.0
    assert pool.routes[0].calls == 1


def test_pool_weights_come_from_config(clock: FakeClock, rng: random.Random) -> None:
    pool = make_pool(clock, rng, endpoints=3, weights={"127.0.0.1:50052": 4.0})

    assert [route.weight for route in pool.routes] == [1.0, 4.0, 1.0]


def test_closed_pool_rejects_new_calls(clock: FakeClock, rng: random.Random) -> None:
    pool = make_pool(clock, rng)
    slot = pool.begin()

    assert pool.close() is True
    assert pool.close() is False

    with pytest.raises(PoolClosedError) as raised:
        pool.begin()
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "closed" in raised.value.details()
    pool.end(slot, None, None)  # a call admitted before close still finishes cleanly
    assert pool.in_flight == 0
    assert pool.describe()["state"] == "closed"


def test_close_tells_when_the_last_call_in_flight_ends(clock: FakeClock, rng: random.Random) -> None:
    """The core never waits: closing with a grace is the shell's wait, for `on_idle`."""
    pool = make_pool(clock, rng)
    first, second = pool.begin(), pool.begin()
    told: list[int] = []

    assert pool.close(lambda: told.append(pool.in_flight)) is True
    assert told == []
    pool.end(first, None, None)
    assert told == []
    pool.end(second, None, grpc.StatusCode.UNAVAILABLE)
    assert told == [0]
    assert pool.close(lambda: told.append(-1)) is False, "closed once"
    assert told == [0]


def test_close_with_nothing_in_flight_tells_at_once(clock: FakeClock, rng: random.Random) -> None:
    pool = make_pool(clock, rng)
    told: list[bool] = []

    assert pool.close(lambda: told.append(True)) is True
    assert told == [True]


def test_pool_connectivity_is_its_best_slot(clock: FakeClock, rng: random.Random) -> None:
    state = grpc.ChannelConnectivity
    pool = make_pool(clock, rng, endpoints=2)
    first, second = pool.slots

    assert pool.describe()["state"] == "idle"
    assert pool.set_slot_state(first, state.CONNECTING) is state.CONNECTING
    assert pool.set_slot_state(second, state.CONNECTING) is None
    assert pool.set_slot_state(second, state.READY) is state.READY
    assert pool.set_slot_state(first, state.TRANSIENT_FAILURE) is None
    assert pool.describe()["state"] == "ready"
    assert pool.set_slot_state(second, state.TRANSIENT_FAILURE) is state.TRANSIENT_FAILURE
    assert pool.set_slot_state(second, state.IDLE) is state.IDLE
    assert [s["state"] for e in pool.describe()["endpoints"] for s in e["slots"]] == ["transient_failure", "idle"]


# -- target parsing -----------------------------------------------------------------------------

GOOD_TARGETS: dict[str, tuple[Any, list[tuple[str, int, str]]]] = {
    "host:port": ("127.0.0.1:50051", [("127.0.0.1", 50051, "127.0.0.1:50051")]),
    "ipv4 list": (
        "ipv4:127.0.0.1:1,127.0.0.2:2",
        [("127.0.0.1", 1, "127.0.0.1:1"), ("127.0.0.2", 2, "127.0.0.2:2")],
    ),
    "ipv4 list with spaces": (
        "ipv4:127.0.0.1:1, 127.0.0.2:2",
        [("127.0.0.1", 1, "127.0.0.1:1"), ("127.0.0.2", 2, "127.0.0.2:2")],
    ),
    "ipv6 brackets": ("[::1]:8080", [("::1", 8080, "[::1]:8080")]),
    "ipv6 list": ("ipv6:[::1]:1,[::1]:2", [("::1", 1, "[::1]:1"), ("::1", 2, "[::1]:2")]),
    "ipv6 long form": ("ipv6:[0:0:0:0:0:0:0:1]:5", [("::1", 5, "[0:0:0:0:0:0:0:1]:5")]),
    "list": (["127.0.0.1:1", "[::1]:2"], [("127.0.0.1", 1, "127.0.0.1:1"), ("::1", 2, "[::1]:2")]),
    "tuple": (("127.0.0.1:1",), [("127.0.0.1", 1, "127.0.0.1:1")]),
    "duplicates removed": (
        "ipv4:127.0.0.1:1,127.0.0.2:2,127.0.0.1:1",
        [("127.0.0.1", 1, "127.0.0.1:1"), ("127.0.0.2", 2, "127.0.0.2:2")],
    ),
    "duplicates in a list": (["127.0.0.1:1", "127.0.0.1:1"], [("127.0.0.1", 1, "127.0.0.1:1")]),
    "ipv4 default port": ("ipv4:127.0.0.1", [("127.0.0.1", DEFAULT_PORT, f"127.0.0.1:{DEFAULT_PORT}")]),
    "ipv6 default port": ("[::1]", [("::1", DEFAULT_PORT, f"[::1]:{DEFAULT_PORT}")]),
}


@pytest.mark.parametrize("target", GOOD_TARGETS, ids=GOOD_TARGETS.keys())
def test_parse_target(target: str) -> None:
    text, expected = GOOD_TARGETS[target]

    endpoints = parse_target(text)

    assert [(e.host, e.port, e.authority) for e in endpoints] == expected


def test_endpoint_addresses() -> None:
    v4, v6 = parse_target("ipv4:127.0.0.1:1")[0], parse_target("[::1]:2")[0]

    assert DEFAULT_PORT == 443
    assert (v4.address, v4.grpc_target, v4.is_ipv6) == ("127.0.0.1:1", "ipv4:127.0.0.1:1", False)
    assert (v6.address, v6.grpc_target, v6.is_ipv6) == ("[::1]:2", "ipv6:[::1]:2", True)


@pytest.mark.parametrize(
    "target", ["dns:///localhost:1234", "dns:localhost:1234", "localhost:1234", ["localhost:1234"]]
)
def test_names_resolve_to_addresses(target: Any) -> None:
    endpoints = parse_target(target)

    assert "127.0.0.1" in [e.host for e in endpoints]
    assert {(e.port, e.authority) for e in endpoints} == {(1234, "localhost:1234")}
    assert len({(e.host, e.port) for e in endpoints}) == len(endpoints)


@pytest.mark.parametrize("target", ["dns:///localhost", "localhost"])
def test_name_without_port_gets_the_default(target: str) -> None:
    endpoints = parse_target(target)

    assert {(e.port, e.authority) for e in endpoints} == {(DEFAULT_PORT, f"localhost:{DEFAULT_PORT}")}


def test_a_name_and_its_address_are_one_endpoint() -> None:
    endpoints = parse_target(["localhost:1", "127.0.0.1:1"])

    assert [(e.host, e.authority) for e in endpoints if e.host == "127.0.0.1"] == [("127.0.0.1", "localhost:1")]


MALFORMED_TARGETS = {
    "empty": "",
    "blank": "  ",
    "empty list": [],
    "empty entry": ["127.0.0.1:1", ""],
    "not a string": 50051,
    "list of numbers": [50051],
    "bytes": b"127.0.0.1:1",
    "port 0": "127.0.0.1:0",
    "port 70000": "127.0.0.1:70000",
    "negative port": "127.0.0.1:-1",
    "port 0 in a list": ["127.0.0.1:0"],
    "port 70000 in ipv4": "ipv4:127.0.0.1:70000",
    "port not a number": "localhost:http",
    "unix": "unix:/x",
    "unix abstract": "unix-abstract:x",
    "xds": "xds:///a",
    "http url": "http://localhost:1",
    "unresolvable": "no-such-host.invalid:50051",
    "ipv4 with a name": "ipv4:not-an-ip:1",
    "ipv4 empty": "ipv4:",
    "ipv4 trailing comma": "ipv4:127.0.0.1:1,",
    "ipv6 empty": "ipv6:",
    "ipv6 without brackets": "ipv6:::1:5",
    "bare ipv6": "::1:5",
    "unclosed bracket": "[::1:5",
    "junk after bracket": "[::1]x5",
    "empty brackets": "[]:5",
    "dns with authority": "dns://8.8.8.8/localhost:1",
    "dns without path": "dns://localhost:1",
    "dns empty": "dns:///",
    "no host": ":50051",
    "address list without a scheme": "127.0.0.1:1,127.0.0.1:2",
}


def test_address_list_without_a_scheme_says_what_to_write() -> None:
    with pytest.raises(ConfigError, match="ipv4:a:p,b:p"):
        parse_target("127.0.0.1:1,127.0.0.1:2")


@pytest.mark.parametrize("target", MALFORMED_TARGETS.values(), ids=MALFORMED_TARGETS.keys())
def test_malformed_target_raises_config_error(target: Any) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_target(target)

    assert raised.value.name == "target"
    assert raised.value.value == target
