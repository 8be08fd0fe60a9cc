"""The pure core of retries: the retry configuration, the retry decisions (requeue, retry,
backoff, pushback, deadlines, attempt timeouts) as the call state machine (`_call.Call`)
makes them with a method's `_retry.Plan`, the latency window behind hedging, and the
pool's retry bookkeeping (budget, routes not yet tried).

A fake clock, a real `PoolState` over fake endpoints and seeded random sources drive
them: no sockets, no servers, no sleeps. A `Caller` plays the blocking shell: it starts
one call, fails its attempts with the codes, details and trailers a test gives, waits
out each backoff on the fake clock and reports what the call decided. The state
machine's own behaviour, branch by branch, is pinned in test_call_core.py.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

import grpc
import pytest
from _support import FakeClock
from tenacity import RetryCallState

from poolkit import ConfigError, Hedging, PoolClosedError, PoolConfig, PoolUnavailableError, RetryBudget, RetryPolicy
from poolkit._call import Attempt, Call, Method, Step
from poolkit._pool import PoolState, Resend, Route
from poolkit._retry import (
    ATTEMPTS_HEADER,
    MAX_REQUEUES,
    PUSHBACK_HEADER,
    LatencyWindow,
    Plan,
    StopReason,
    never_sent,
    pushback_of,
    with_attempts,
)
from poolkit._target import Endpoint

Code = grpc.StatusCode
UNAVAILABLE = Code.UNAVAILABLE
DEADLINE_EXCEEDED = Code.DEADLINE_EXCEEDED
RESOURCE_EXHAUSTED = Code.RESOURCE_EXHAUSTED
TRANSIENT_FAILURE = grpc.ChannelConnectivity.TRANSIENT_FAILURE

NOT_RETRYABLE = StopReason.NOT_RETRYABLE
ATTEMPTS_USED = StopReason.ATTEMPTS_USED
DEADLINE = StopReason.DEADLINE
PUSHBACK = StopReason.PUSHBACK
NO_REQUEUE = StopReason.NO_REQUEUE

T0 = 1000.0  # where every fake clock starts
REQUEST = b"request"

# What grpc says when a call never left: no connection, or a stream refused after a graceful GOAWAY.
CONNECT_FAILED = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to remote host"
)
GOAWAY_GRACEFUL = "Stream removed (GOAWAY received; Error code: 0; Debug Text: max_age)"
# And what it says when the server may have seen the call.
SOCKET_CLOSED = "Socket closed"
CONNECTION_RESET = "Connection reset by peer"
GOAWAY_ENHANCE_YOUR_CALM = "Stream removed (GOAWAY received; Error code: 11; Debug Text: too_many_pings)"

# What `Caller.fail` answers for a requeue: the call went again at once, with no backoff.
REQUEUED = "requeued"


def endpoint(n: int) -> Endpoint:
    return Endpoint(f"10.0.0.{n}", 50051, f"10.0.0.{n}:50051")


def new_pool(clock: FakeClock, rng: random.Random, routes: int = 4, **config: Any) -> PoolState:
    """A pool with neither health checks nor failure accrual: every route stays in rotation."""
    config = {"health_check": None, "failure_accrual": None, **config}
    endpoints = [endpoint(n) for n in range(1, routes + 1)]
    return PoolState("ipv4:test", endpoints, PoolConfig(**config), clock=clock, rng=rng)


def idempotent(**fields: Any) -> RetryPolicy:
    return RetryPolicy(idempotent=True, **fields)


def plan_of(policy: RetryPolicy | None, seed: int = 1) -> Plan:
    return Plan(policy, random.Random(seed))


class Caller:
    """One unary-unary call driven through `_call.Call` the way the blocking shell drives
    it, on a fake clock starting at T0 and a fresh pool of four routes (whose default
    budget, 100 retries in reserve, never refuses here)."""

    def __init__(
        self, policy: RetryPolicy | None, timeout: float | None = None, *, seed: int = 1, metadata: Any = None
    ) -> None:
        self.clock = FakeClock(T0)
        self.pool = new_pool(self.clock, random.Random(seed))
        self.plan = plan_of(policy, seed)
        method = Method(self.pool, self.plan, unary_response=True, streaming_request=False)
        self.call = Call(method, REQUEST, timeout, metadata, None, None, None)
        assert self.call.start() is Step.SEND

    @property
    def attempt(self) -> Attempt:
        """The attempt in flight (the last one sent)."""
        attempt = self.call.sending
        assert attempt is not None
        return attempt

    def fail(
        self, at: float, code: grpc.StatusCode = UNAVAILABLE, details: str = SOCKET_CLOSED, pushback: Any = None
    ) -> float | str | None:
        """The attempt in flight fails at clock time `at` (with `pushback`, the server's
        grpc-retry-pushback-ms): the call's answer, as the old `Plan.decide` gave it: the
        backoff before the retry, REQUEUED (sent again at once), or None (the call is over)."""
        assert at >= self.clock.now
        self.clock.now = at
        trailing = () if pushback is None else ((PUSHBACK_HEADER, pushback),)
        self.call.ended(self.attempt, code, details, trailing)
        step = self.call.next()
        if step is Step.FINISH:
            assert self.call.over
            return None
        if step is Step.SEND:
            return REQUEUED
        assert step is Step.WAIT
        assert self.call.timer is not None
        assert self.pool.in_flight == 0  # no slot is held through a backoff
        return self.call.timer

    def wait_out(self) -> Attempt:
        """The backoff runs out on the fake clock: the retry is sent."""
        timer = self.call.timer
        assert timer is not None
        self.clock.advance(timer)
        assert self.call.timer_fired() is Step.SEND
        return self.attempt

    @property
    def previous(self) -> int:
        """Attempts before the one in flight, requeues not counted: what the header says."""
        record = self.call.retry
        return 0 if record is None else record.attempt_number - 1

    def header(self) -> str | None:
        """The grpc-previous-rpc-attempts value the attempt in flight is sent with, if any."""
        values = [v for k, v in self.call.attempt_metadata(self.attempt) or () if k == ATTEMPTS_HEADER]
        assert len(values) <= 1
        return values[0] if values else None


def retry_delays(policy: RetryPolicy, attempts: int, duration: float = 0.01, seed: int = 1) -> list[float | str | None]:
    """Fail `attempts` attempts of one call in a row (each taking `duration`), waiting out
    every backoff the call asks for; the call's answer after each failure."""
    caller = Caller(policy, seed=seed)
    answers: list[float | str | None] = []
    for _ in range(attempts):
        delay = caller.fail(caller.clock.now + duration)
        answers.append(delay)
        if delay is None:
            break
        caller.wait_out()
    return answers


# -- Configuration: every field rejects bad values, naming itself ------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("idempotent", "yes"),
        ("idempotent", 1),
        ("idempotent", None),
        ("codes", UNAVAILABLE),
        ("codes", "UNAVAILABLE"),
        ("codes", 14),
        ("codes", None),
        ("codes", frozenset({"UNAVAILABLE"})),
        ("codes", frozenset({Code.OK, UNAVAILABLE})),
        ("max_attempts", 0),
        ("max_attempts", 11),
        ("max_attempts", -1),
        ("max_attempts", 2.0),
        ("max_attempts", True),
        ("max_attempts", "3"),
        ("max_attempts", None),
        ("initial_backoff", 0),
        ("initial_backoff", -0.1),
        ("initial_backoff", math.nan),
        ("initial_backoff", math.inf),
        ("initial_backoff", "0.1"),
        ("initial_backoff", True),
        ("initial_backoff", None),
        ("backoff_multiplier", 0.5),
        ("backoff_multiplier", 10.5),
        ("backoff_multiplier", math.nan),
        ("backoff_multiplier", math.inf),
        ("backoff_multiplier", "2"),
        ("backoff_multiplier", True),
        ("backoff_multiplier", None),
        ("max_backoff", 0),
        ("max_backoff", -1.0),
        ("max_backoff", math.nan),
        ("max_backoff", math.inf),
        ("max_backoff", "1"),
        ("max_backoff", 0.05),  # below initial_backoff (0.1)
        ("jitter", -0.1),
        ("jitter", 1.0),
        ("jitter", 1.5),
        ("jitter", math.nan),
        ("jitter", "0.2"),
        ("jitter", True),
        ("jitter", None),
        ("attempt_timeout", 0),
        ("attempt_timeout", -1.0),
        ("attempt_timeout", math.nan),
        ("attempt_timeout", math.inf),
        ("attempt_timeout", "1"),
        ("attempt_timeout", False),
        ("hedging", "fast"),
        ("hedging", 0.05),
    ],
)
def test_bad_retry_policy_fields_are_rejected_by_name(field: str, value: object) -> None:
    """Each RetryPolicy field refuses a wrong value with a ConfigError (a ValueError) naming it."""
    with pytest.raises(ConfigError) as raised:
        RetryPolicy(**{"idempotent": True, field: value})  # type: ignore[arg-type]
    assert raised.value.name == f"retry.{field}"
    assert str(raised.value).startswith(f"retry.{field}=")
    assert isinstance(raised.value, ValueError)


def test_hedging_needs_an_idempotent_method() -> None:
    """Hedging sends a call twice, so a policy that does not declare the method idempotent refuses it."""
    with pytest.raises(ConfigError, match="idempotent=True") as raised:
        RetryPolicy(hedging=Hedging(delay=0.05))
    assert raised.value.name == "retry.hedging"
    assert RetryPolicy(idempotent=True, hedging=Hedging(delay=0.05)).hedging == Hedging(delay=0.05)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("delay", 0),
        ("delay", -0.05),
        ("delay", math.nan),
        ("delay", math.inf),
        ("delay", "0.05"),
        ("delay", True),
        ("min_samples", 0),
        ("min_samples", -5),
        ("min_samples", 1_000_001),
        ("min_samples", 20.0),
        ("min_samples", True),
        ("min_samples", "20"),
        ("min_samples", None),
    ],
)
def test_bad_hedging_fields_are_rejected_by_name(field: str, value: object) -> None:
    """Each Hedging field refuses a wrong value with a ConfigError naming it."""
    with pytest.raises(ConfigError) as raised:
        Hedging(**{field: value})  # type: ignore[arg-type]
    assert raised.value.name == f"hedging.{field}"
    assert str(raised.value).startswith(f"hedging.{field}=")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ratio", -0.1),
        ("ratio", 1000.5),
        ("ratio", math.nan),
        ("ratio", math.inf),
        ("ratio", "0.2"),
        ("ratio", True),
        ("ratio", None),
        ("min_per_second", -1.0),
        ("min_per_second", math.inf),
        ("min_per_second", math.nan),
        ("min_per_second", "10"),
        ("min_per_second", None),
        ("window", 0),
        ("window", -10.0),
        ("window", math.inf),
        ("window", math.nan),
        ("window", "10"),
        ("window", False),
    ],
)
def test_bad_retry_budget_fields_are_rejected_by_name(field: str, value: object) -> None:
    """Each RetryBudget field refuses a wrong value with a ConfigError naming it."""
    with pytest.raises(ConfigError) as raised:
        RetryBudget(**{field: value})  # type: ignore[arg-type]
    assert raised.value.name == f"retry_budget.{field}"
    assert str(raised.value).startswith(f"retry_budget.{field}=")


@pytest.mark.parametrize(
    "fields",
    [
        {"max_attempts": 1},
        {"max_attempts": 10},
        {"backoff_multiplier": 1},
        {"backoff_multiplier": 10.0},
        {"jitter": 0},
        {"jitter": 0.999},
        {"initial_backoff": 0.5, "max_backoff": 0.5},
        {"codes": frozenset()},
        {"attempt_timeout": 0.001},
        {"hedging": Hedging()},
        {"hedging": Hedging(delay=0.01, min_samples=1_000_000)},
    ],
)
def test_edge_retry_policies_are_accepted(fields: dict[str, Any]) -> None:
    """The limits themselves are valid values."""
    policy = RetryPolicy(idempotent=True, **fields)
    for name, value in fields.items():
        assert getattr(policy, name) == value


def test_defaults() -> None:
    """Defaults: a non-idempotent policy on UNAVAILABLE with gRPC A6's numbers, and Finagle's budget."""
    policy = RetryPolicy()
    assert (policy.idempotent, policy.codes, policy.max_attempts) == (False, frozenset({UNAVAILABLE}), 3)
    assert (policy.initial_backoff, policy.backoff_multiplier, policy.max_backoff, policy.jitter) == (
        0.1,
        2.0,
        1.0,
        0.2,
    )
    assert (policy.attempt_timeout, policy.hedging) == (None, None)
    assert (Hedging().delay, Hedging().min_samples) == (None, 20)
    budget = RetryBudget()
    assert (budget.ratio, budget.min_per_second, budget.window) == (0.2, 10.0, 10.0)
    config = PoolConfig()
    assert config.retry == RetryPolicy()
    assert config.retry_budget == RetryBudget()
    assert dict(config.method_retry) == {}


def test_codes_are_kept_as_a_frozenset() -> None:
    """Codes given as a list or set are stored as a frozenset (the policy is hashable and frozen)."""
    policy = RetryPolicy(codes=[UNAVAILABLE, RESOURCE_EXHAUSTED, UNAVAILABLE])  # type: ignore[arg-type]
    assert policy.codes == frozenset({UNAVAILABLE, RESOURCE_EXHAUSTED})
    assert isinstance(policy.codes, frozenset)
    assert hash(policy) == hash(RetryPolicy(codes=frozenset({RESOURCE_EXHAUSTED, UNAVAILABLE})))


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"retry": "idempotent"}, "retry"),
        ({"retry": Hedging()}, "retry"),
        ({"retry_budget": None}, "retry_budget"),
        ({"retry_budget": 0.2}, "retry_budget"),
        ({"method_retry": [("/a.B/C", None)]}, "method_retry"),
        ({"method_retry": None}, "method_retry"),
        ({"method_retry": {"/a.B/C": "fast"}}, "method_retry['/a.B/C']"),
        ({"method_retry": {"a.B": RetryBudget()}}, "method_retry['a.B']"),
    ],
)
def test_bad_pool_retry_settings_are_rejected_by_name(fields: dict[str, Any], name: str) -> None:
    """PoolConfig's retry, method_retry and retry_budget refuse values of the wrong type."""
    with pytest.raises(ConfigError) as raised:
        PoolConfig(**fields)
    assert raised.value.name == name


@pytest.mark.parametrize(
    "key",
    [
        "/a",
        "/a/",
        "//b",
        "/a/b/c",
        "/pkg.Service/Method/",
        "pkg.Service/Method",
        "",
        "a b",
        "/pkg.Service/Say Hello",
        "pkg.Service\t",
        5,
        None,
    ],
)
def test_method_retry_keys_must_name_a_method_or_a_service(key: object) -> None:
    """A key that is neither '/pkg.Service/Method' nor 'pkg.Service' is refused."""
    with pytest.raises(ConfigError, match="keys must be") as raised:
        PoolConfig(method_retry={key: None})  # type: ignore[dict-item]
    assert raised.value.name == "method_retry"
    assert raised.value.value == key


@pytest.mark.parametrize("key", ["/pkg.Service/Method", "pkg.Service", "/a.b.c.Service/Get", "/Greeter/SayHello"])
def test_method_retry_accepts_method_and_service_names(key: str) -> None:
    """Full method names (a service may have no package) and service names are accepted."""
    assert PoolConfig(method_retry={key: None}).method_retry == {key: None}


def test_method_retry_is_frozen_and_copied() -> None:
    """The config keeps a read-only copy: changing the caller's dict later changes nothing."""
    table: dict[str, RetryPolicy | None] = {"pkg.Service": None}
    config = PoolConfig(method_retry=table)
    table["pkg.Other"] = None
    assert dict(config.method_retry) == {"pkg.Service": None}
    assert isinstance(config.method_retry, MappingProxyType)
    with pytest.raises(TypeError):
        config.method_retry["pkg.Other"] = None  # type: ignore[index]


FAST = idempotent(max_attempts=5)
SLOW = idempotent(initial_backoff=0.5, max_backoff=2.0)
DEFAULT = RetryPolicy(max_attempts=2)


@pytest.mark.parametrize(
    ("retry", "table", "method", "expected"),
    [
        (DEFAULT, {}, "/pkg.Svc/Get", DEFAULT),
        (DEFAULT, {"pkg.Svc": SLOW}, "/pkg.Svc/Get", SLOW),
        (DEFAULT, {"pkg.Svc": SLOW, "/pkg.Svc/Get": FAST}, "/pkg.Svc/Get", FAST),
        (DEFAULT, {"pkg.Svc": SLOW, "/pkg.Svc/Get": FAST}, "/pkg.Svc/Put", SLOW),
        (DEFAULT, {"pkg.Svc": SLOW, "/pkg.Svc/Get": FAST}, "/pkg.Other/Get", DEFAULT),
        (DEFAULT, {"pkg.Svc": SLOW}, "/pkg.SvcX/Get", DEFAULT),
        (DEFAULT, {"pkg": SLOW}, "/pkg.Svc/Get", DEFAULT),
        (DEFAULT, {"/pkg.Svc/Get": FAST}, "/pkg.Svc/GetAll", DEFAULT),
        (DEFAULT, {"pkg.Svc": SLOW, "/pkg.Svc/Get": None}, "/pkg.Svc/Get", None),
        (DEFAULT, {"pkg.Svc": None, "/pkg.Svc/Get": FAST}, "/pkg.Svc/Get", FAST),
        (DEFAULT, {"pkg.Svc": None, "/pkg.Svc/Get": FAST}, "/pkg.Svc/Put", None),
        (None, {"pkg.Svc": SLOW}, "/pkg.Other/Get", None),
        (None, {"pkg.Svc": SLOW}, "/pkg.Svc/Get", SLOW),
        (DEFAULT, {"Greeter": SLOW}, "/Greeter/SayHello", SLOW),
    ],
)
def test_retry_policy_lookup_order(
    retry: RetryPolicy | None, table: dict[str, RetryPolicy | None], method: str, expected: RetryPolicy | None
) -> None:
    """A method's policy is its own entry, else its service's, else `retry`; a None entry disables."""
    assert PoolConfig(retry=retry, method_retry=table).retry_policy(method) is expected


# -- never_sent, pushback_of, with_attempts ------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (UNAVAILABLE, CONNECT_FAILED, True),
        (UNAVAILABLE, "failed to connect to all addresses", True),
        (UNAVAILABLE, GOAWAY_GRACEFUL, True),
        (UNAVAILABLE, "Stream removed (GOAWAY received; Error code: 0; Debug Text: )", True),
        (UNAVAILABLE, SOCKET_CLOSED, False),
        (UNAVAILABLE, CONNECTION_RESET, False),
        (UNAVAILABLE, GOAWAY_ENHANCE_YOUR_CALM, False),
        (UNAVAILABLE, "Stream removed (GOAWAY received; Error code: 10; Debug Text: )", False),
        (UNAVAILABLE, "", False),
        (UNAVAILABLE, None, False),
        (Code.UNKNOWN, CONNECT_FAILED, False),
        (Code.INTERNAL, GOAWAY_GRACEFUL, False),
        (DEADLINE_EXCEEDED, CONNECT_FAILED, False),
        (Code.CANCELLED, GOAWAY_GRACEFUL, False),
    ],
)
def test_never_sent(code: grpc.StatusCode, details: str | None, expected: bool) -> None:
    """Only UNAVAILABLE with grpc's "no connection" or graceful-GOAWAY words proves a call never left."""
    assert never_sent(code, details) is expected


@pytest.mark.parametrize(
    ("trailing", "expected"),
    [
        ([(PUSHBACK_HEADER, "300")], 0.3),
        ([(PUSHBACK_HEADER, "0")], 0.0),
        ([(PUSHBACK_HEADER, "1")], 0.001),
        ([(PUSHBACK_HEADER, "120000")], 120.0),
        ([(PUSHBACK_HEADER, b"300")], 0.3),
        ([(PUSHBACK_HEADER, b"0")], 0.0),
        ([("x-other", "7"), (PUSHBACK_HEADER, "2500")], 2.5),
        ([], None),
        (None, None),
        ([("x-other", "300"), ("grpc-retry-pushback", "300")], None),
    ],
)
def test_pushback_of_reads_milliseconds(trailing: Any, expected: float | None) -> None:
    """grpc-retry-pushback-ms is read as milliseconds (str or bytes); absent is None."""
    assert pushback_of(trailing) == expected


@pytest.mark.parametrize("value", ["-1", "", "1.5", "abc", " 300", "300ms", "+5", "1e3", b"-1", b"", b"\xff\xfe"])
def test_pushback_of_malformed_means_stop(value: Any) -> None:
    """A negative or non-integer pushback reads as negative: "do not retry"."""
    pushback = pushback_of([(PUSHBACK_HEADER, value)])
    assert pushback is not None
    assert pushback < 0


def test_with_attempts_keeps_the_callers_metadata() -> None:
    """The caller's pairs stay, in order; the header is added last with the count of earlier attempts."""
    metadata = (("x-user", "ann"), ("x-trace-bin", b"\x01\x02"))
    assert list(with_attempts(metadata, 2)) == [("x-user", "ann"), ("x-trace-bin", b"\x01\x02"), (ATTEMPTS_HEADER, "2")]
    assert metadata == (("x-user", "ann"), ("x-trace-bin", b"\x01\x02"))


def test_with_attempts_replaces_an_existing_header() -> None:
    """A header already present (from the caller, or an earlier attempt) is replaced, not repeated."""
    metadata = [("x-user", "ann"), (ATTEMPTS_HEADER, "7"), ("x-more", "1")]
    assert list(with_attempts(metadata, 1)) == [("x-user", "ann"), ("x-more", "1"), (ATTEMPTS_HEADER, "1")]
    assert metadata == [("x-user", "ann"), (ATTEMPTS_HEADER, "7"), ("x-more", "1")]


@pytest.mark.parametrize("metadata", [None, (), []])
def test_with_attempts_without_metadata(metadata: Any) -> None:
    assert list(with_attempts(metadata, 1)) == [(ATTEMPTS_HEADER, "1")]


# -- A method that is not idempotent (the default policy) ---------------------------------------------


def test_non_idempotent_server_failure_is_not_retried() -> None:
    """UNAVAILABLE after the server may have seen the call: a non-idempotent method gives up."""
    caller = Caller(RetryPolicy(), 5.0)
    assert caller.fail(T0 + 0.01, UNAVAILABLE, SOCKET_CLOSED) is None
    assert caller.call.stopped is NOT_RETRYABLE
    assert caller.call.requeues == 0
    assert caller.call.final is caller.attempt
    assert caller.pool.sent_again == dict.fromkeys(Resend, 0)


@pytest.mark.parametrize("code", [DEADLINE_EXCEEDED, Code.INTERNAL, Code.UNKNOWN, RESOURCE_EXHAUSTED, Code.CANCELLED])
def test_non_idempotent_never_retries_any_code(code: grpc.StatusCode) -> None:
    """Even codes listed in the policy are not retried unless the method is idempotent.
    (A CANCELLED attempt is the caller's cancel: it ends the call as it ends, before the
    plan is asked, so no stop reason is recorded.)"""
    caller = Caller(RetryPolicy(codes=frozenset({code})))
    assert caller.fail(T0 + 0.01, code) is None
    assert caller.call.stopped is (None if code is Code.CANCELLED else NOT_RETRYABLE)


@pytest.mark.parametrize("details", [CONNECT_FAILED, GOAWAY_GRACEFUL])
def test_never_sent_is_requeued_and_not_counted_as_an_attempt(details: str) -> None:
    """A call that never left is sent again at once; the next attempt is still the first."""
    caller = Caller(RetryPolicy(), 5.0)
    first = caller.attempt
    assert caller.fail(T0 + 0.25, UNAVAILABLE, details) == REQUEUED
    requeued = caller.attempt
    assert requeued is not first
    assert caller.call.requeues == 1
    assert (requeued.timeout, requeued.started) == (4.75, T0 + 0.25)
    assert (caller.previous, caller.header()) == (0, None)
    assert caller.call.retry is None  # no retry record: nothing was counted, no backoff idled

    assert caller.fail(T0 + 0.5, UNAVAILABLE, details) == REQUEUED
    assert (caller.call.requeues, caller.previous, caller.header()) == (2, 0, None)
    assert caller.call.stopped is None
    assert caller.pool.sent_again[Resend.REQUEUE] == 2
    assert caller.pool.in_flight == 1


def test_requeues_stop_after_max_requeues() -> None:
    """A call is requeued MAX_REQUEUES times; the next never-sent failure is final."""
    caller = Caller(RetryPolicy())
    answers = []
    for _ in range(MAX_REQUEUES + 3):
        answers.append(caller.fail(caller.clock.now + 0.001, UNAVAILABLE, CONNECT_FAILED))
        if answers[-1] is None:
            break
    assert MAX_REQUEUES == 25
    assert answers == [REQUEUED] * MAX_REQUEUES + [None]
    assert caller.call.requeues == MAX_REQUEUES
    assert caller.call.stopped is NO_REQUEUE
    assert caller.previous == 0
    assert caller.call.attempts == MAX_REQUEUES + 1
    assert caller.pool.in_flight == 0


@pytest.mark.parametrize(
    ("elapsed", "expected", "stopped"),
    [(0.999, REQUEUED, None), (1.0, None, DEADLINE), (1.5, None, DEADLINE)],
)
def test_requeue_stops_at_the_deadline(elapsed: float, expected: str | None, stopped: StopReason | None) -> None:
    """No requeue once the caller's deadline has come."""
    caller = Caller(RetryPolicy(), 1.0)
    assert caller.fail(T0 + elapsed, UNAVAILABLE, CONNECT_FAILED) == expected
    assert caller.call.stopped is stopped


def test_requeue_without_a_deadline_never_stops_for_time() -> None:
    caller = Caller(RetryPolicy())
    assert caller.fail(T0 + 1e6, UNAVAILABLE, CONNECT_FAILED) == REQUEUED
    assert caller.attempt.timeout is None


def test_no_policy_means_no_requeue() -> None:
    """retry=None switches requeues off too: a never-sent failure is final, as is any other.
    The call ends as its attempt ends, before any plan is asked: no stop reason is recorded."""
    plan = plan_of(PoolConfig(retry=None).retry_policy("/pkg.Svc/Get"))
    assert (plan.requeues, plan.attempt_timeout, plan.hedge_delay(), plan.latency) == (False, None, None, None)
    assert plan.attempts_used(RetryCallState(plan.retrying, None, (), {}))  # one attempt in all
    assert not plan.retryable(UNAVAILABLE, False)
    assert not plan.retryable(DEADLINE_EXCEEDED, True)
    for details in (CONNECT_FAILED, SOCKET_CLOSED):
        caller = Caller(None, 5.0)
        assert caller.fail(T0 + 0.01, UNAVAILABLE, details) is None
        assert (caller.call.stopped, caller.call.requeues, caller.call.retry) == (None, 0, None)
        assert caller.pool.sent_again == dict.fromkeys(Resend, 0)
        assert caller.pool.budget_refused == 0


def test_start_records_the_call() -> None:
    """`start` notes the start and the caller's deadline and sends the first attempt on a
    route of the pool; the routes tried are noted only once the call goes again."""
    caller = Caller(RetryPolicy(), 2.5)
    call, first = caller.call, caller.attempt
    assert (call.started, call.remaining(), first.started, first.number) == (T0, 2.5, T0, 1)
    assert first.route in caller.pool.routes
    assert (call.attempts, call.requeues, call.stopped, call.retry, call.tried) == (1, 0, None, None, None)
    assert Caller(RetryPolicy()).call.remaining() is None
    caller.fail(T0 + 0.5, UNAVAILABLE, CONNECT_FAILED)
    assert call.tried == {first.route, caller.attempt.route}
    assert caller.attempt.route is not first.route
    assert call.remaining() == 2.0


# -- Idempotent methods --------------------------------------------------------------------------------

RETRIED_CODES = frozenset({UNAVAILABLE, RESOURCE_EXHAUSTED})


@pytest.mark.parametrize("code", [c for c in Code if c is not Code.OK], ids=lambda c: c.name)
def test_idempotent_retries_exactly_its_codes(code: grpc.StatusCode) -> None:
    """An idempotent method is retried on the policy's codes and on nothing else (a
    CANCELLED attempt is the caller's cancel: never retried, no stop reason recorded)."""
    caller = Caller(idempotent(codes=RETRIED_CODES, jitter=0.0))
    delay = caller.fail(T0 + 0.01, code, "boom")
    if code in RETRIED_CODES:
        assert delay == 0.1
        assert caller.call.stopped is None
    else:
        assert delay is None
        assert caller.call.stopped is (None if code is Code.CANCELLED else NOT_RETRYABLE)


def test_idempotent_never_sent_is_a_requeue_not_a_retry() -> None:
    """For an idempotent method too, a call that never left is requeued at once, uncounted."""
    caller = Caller(idempotent())
    assert caller.fail(T0 + 0.01, UNAVAILABLE, CONNECT_FAILED) == REQUEUED
    assert (caller.call.requeues, caller.previous, caller.header()) == (1, 0, None)
    delay = caller.fail(T0 + 0.02, UNAVAILABLE, SOCKET_CLOSED)
    assert isinstance(delay, float)
    assert delay > 0
    caller.wait_out()
    assert (caller.call.requeues, caller.previous, caller.header()) == (1, 1, "1")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ({"initial_backoff": 0.05, "backoff_multiplier": 3, "max_backoff": 2.0}, [0.05, 0.15, 0.45, 1.35, 2.0]),
        ({"initial_backoff": 0.25, "backoff_multiplier": 1}, [0.25, 0.25, 0.25, 0.25]),
        ({"initial_backoff": 0.5, "max_backoff": 0.5}, [0.5, 0.5, 0.5]),
    ],
)
def test_backoff_without_jitter_is_exact(fields: dict[str, Any], expected: list[float]) -> None:
    """With jitter 0, the n-th retry waits initial × multiplier^(n-1), capped at max_backoff."""
    delays = retry_delays(idempotent(jitter=0.0, max_attempts=10, **fields), len(expected))
    assert delays == pytest.approx(expected, rel=1e-12, abs=0)
    if not fields:
        assert delays == expected  # powers of two times 0.1 are exact in binary


def test_backoff_jitter_stays_within_bounds_and_uses_them() -> None:
    """Over many seeds each retry waits within ±20 % of its exponential backoff, and the
    jitter really spreads: both ends of the range are reached."""
    expected = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    by_retry: list[list[float]] = [[] for _ in expected]
    for seed in range(300):
        delays = retry_delays(idempotent(max_attempts=8), len(expected), seed=seed)
        for retry, delay in enumerate(delays):
            assert isinstance(delay, float)
            by_retry[retry].append(delay)
    for base, seen in zip(expected, by_retry, strict=True):
        assert base * 0.8 <= min(seen) < base * 0.82
        assert base * 1.18 < max(seen) <= base * 1.2
        assert sum(seen) / len(seen) == pytest.approx(base, rel=0.03)


def test_same_seed_same_delays() -> None:
    """The jitter comes from the rng it is given: a seed replays the same schedule."""
    policy = idempotent(max_attempts=6)
    assert retry_delays(policy, 5, seed=7) == retry_delays(policy, 5, seed=7)
    assert retry_delays(policy, 5, seed=7) != retry_delays(policy, 5, seed=8)


@pytest.mark.parametrize("max_attempts", [1, 2, 3, 5, 10])
def test_max_attempts_counts_every_attempt(max_attempts: int) -> None:
    """max_attempts attempts in all: max_attempts - 1 retries, then the call stops."""
    caller = Caller(idempotent(max_attempts=max_attempts, jitter=0.0))
    retries = 0
    while caller.fail(caller.clock.now + 0.01) is not None:
        retries += 1
        caller.wait_out()
        assert (caller.previous, caller.header()) == (retries, str(retries))
        assert retries < 20
    assert retries == max_attempts - 1
    assert caller.call.stopped is ATTEMPTS_USED
    assert caller.call.attempts == max_attempts
    assert caller.previous == max_attempts - 1


def test_requeues_do_not_use_up_attempts() -> None:
    """Requeues between retries leave the attempt count, and so max_attempts, alone."""
    caller = Caller(idempotent(max_attempts=2, jitter=0.0))
    for _ in range(3):
        assert caller.fail(T0, UNAVAILABLE, CONNECT_FAILED) == REQUEUED
    assert caller.fail(T0 + 0.01) == 0.1
    caller.wait_out()
    assert caller.fail(T0 + 0.12, UNAVAILABLE, GOAWAY_GRACEFUL) == REQUEUED
    assert caller.header() == "1"  # a requeue of the retry: one attempt went before it
    assert caller.fail(T0 + 0.13) is None
    assert caller.call.stopped is ATTEMPTS_USED
    assert (caller.call.requeues, caller.previous) == (4, 1)


@pytest.mark.parametrize(
    ("duration", "expected", "stopped"),
    [
        # deadline T0 + 1, backoff 0.5: retry iff failure time + 0.5 + the attempt's duration < deadline.
        (0.125, 0.5, None),  # 0.125 + 0.5 + 0.125 = 0.75
        (0.2, 0.5, None),  # 0.9
        (0.25, None, DEADLINE),  # exactly 1.0: it could not finish in time
        (0.3, None, DEADLINE),  # 1.1
    ],
)
def test_a_retry_that_cannot_finish_before_the_deadline_is_not_started(
    duration: float, expected: float | None, stopped: StopReason | None
) -> None:
    """The next attempt is judged to take as long as the last: it is sent only if, after
    its backoff, it would finish before the caller's deadline."""
    caller = Caller(idempotent(initial_backoff=0.5, max_backoff=1.0, jitter=0.0), 1.0)
    assert caller.fail(T0 + duration) == expected
    assert caller.call.stopped is stopped


def test_deadline_judged_on_the_latest_attempt() -> None:
    """The second retry's backoff is longer: what fit once no longer fits."""
    caller = Caller(idempotent(initial_backoff=0.25, max_backoff=1.0, jitter=0.0), 1.0)
    assert caller.fail(T0 + 0.125) == 0.25  # 0.125 + 0.25 + 0.125 = 0.5
    retry = caller.wait_out()
    assert (retry.started, retry.timeout) == (T0 + 0.375, 0.625)
    # The second attempt fails after 0.125 at 0.5: 0.5 + 0.5 + 0.125 = 1.125 > 1.
    assert caller.fail(T0 + 0.5) is None
    assert caller.call.stopped is DEADLINE
    assert caller.previous == 1


def test_the_stop_reason_prefers_attempts_used() -> None:
    """When the attempts are used and the deadline is near too, the attempts are the reason."""
    caller = Caller(idempotent(max_attempts=1, jitter=0.0), 0.05)
    assert caller.fail(T0 + 0.04) is None
    assert caller.call.stopped is ATTEMPTS_USED


@pytest.mark.parametrize(("value", "expected"), [("250", 0.25), ("0", 0.0), (b"40", 0.04), ("3000", 3.0)])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pushback_replaces_the_backoff_exactly(value: Any, expected: float, seed: int) -> None:
    """The server's pushback is the delay, with no jitter; the next retry without one backs off again."""
    caller = Caller(idempotent(max_attempts=5), seed=seed)
    assert caller.fail(T0 + 0.01, pushback=value) == expected
    caller.wait_out()
    assert caller.attempt.started == T0 + 0.01 + expected
    delay = caller.fail(caller.clock.now + 0.01)
    assert isinstance(delay, float)
    assert 0.2 * 0.8 <= delay <= 0.2 * 1.2


def test_pushback_still_obeys_the_deadline_and_max_attempts() -> None:
    """A pushback past the caller's deadline stops the call; so does the last attempt."""
    caller = Caller(idempotent(), 1.0)
    assert caller.fail(T0 + 0.01, pushback="2000") is None
    assert caller.call.stopped is DEADLINE

    caller = Caller(idempotent(max_attempts=2))
    assert caller.fail(T0 + 0.01, pushback="10") == 0.01
    caller.wait_out()
    assert caller.fail(T0 + 0.03, pushback="10") is None
    assert caller.call.stopped is ATTEMPTS_USED


@pytest.mark.parametrize("value", ["-1", "", "1.5", "abc", b"-100"])
def test_malformed_pushback_stops(value: Any) -> None:
    """A negative or malformed pushback means "do not retry" (gRPC A6)."""
    caller = Caller(idempotent())
    assert caller.fail(T0 + 0.01, pushback=value) is None
    assert caller.call.stopped is PUSHBACK


def test_pushback_on_a_code_not_retried_changes_nothing() -> None:
    """The pushback is read only for a failure the policy would retry."""
    caller = Caller(idempotent())
    assert caller.fail(T0 + 0.01, Code.INVALID_ARGUMENT, pushback="-1") is None
    assert caller.call.stopped is NOT_RETRYABLE


# -- Attempt timeouts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt_timeout", "timeout", "expected", "attempt_deadline"),
    [
        (0.5, 2.0, 0.5, T0 + 0.5),
        (0.5, None, 0.5, T0 + 0.5),
        (0.5, 0.25, 0.25, None),
        (0.5, 0.5, 0.5, None),
        (None, 2.0, 2.0, None),
        (None, None, None, None),
    ],
)
def test_first_timeout_is_the_least_of_the_attempt_timeout_and_the_deadline(
    attempt_timeout: float | None, timeout: float | None, expected: float | None, attempt_deadline: float | None
) -> None:
    """An attempt may take attempt_timeout or what is left of the caller's time, whichever is less;
    only when its own timeout is the shorter does the attempt get its own deadline."""
    first = Caller(idempotent(attempt_timeout=attempt_timeout), timeout).attempt
    assert (first.timeout, first.deadline) == (expected, attempt_deadline)


def test_an_attempt_timeout_is_retried_for_an_idempotent_method() -> None:
    """DEADLINE_EXCEEDED when the attempt's own timeout ran out, before the caller's
    deadline, is retried, although DEADLINE_EXCEEDED is not among the policy's codes."""
    caller = Caller(idempotent(attempt_timeout=0.5, initial_backoff=0.25, jitter=0.0), 2.0)
    assert caller.plan.policy is not None
    assert DEADLINE_EXCEEDED not in caller.plan.policy.codes
    assert caller.attempt.timeout == 0.5
    assert caller.fail(T0 + 0.5, DEADLINE_EXCEEDED, "Deadline Exceeded") == 0.25
    # The retry gets the attempt timeout again, as there is time enough left.
    retry = caller.wait_out()
    assert (retry.started, retry.timeout, retry.deadline) == (T0 + 0.75, 0.5, T0 + 1.25)


def test_an_attempt_cut_short_by_the_callers_deadline_is_not_retried() -> None:
    """When what is left of the caller's time is shorter than the attempt timeout, the
    attempt's DEADLINE_EXCEEDED is the caller's: not retried."""
    caller = Caller(idempotent(attempt_timeout=0.5, initial_backoff=0.25, jitter=0.0), 1.0)
    assert caller.attempt.timeout == 0.5
    # A quick failure: 0.3125 + 0.25 + 0.3125 < 1, so the retry goes out with 0.4375 left.
    assert caller.fail(T0 + 0.3125, UNAVAILABLE) == 0.25
    retry = caller.wait_out()
    assert (retry.timeout, retry.deadline) == (0.4375, None)
    assert caller.fail(T0 + 1.0, DEADLINE_EXCEEDED) is None
    assert caller.call.stopped is NOT_RETRYABLE


def test_a_caller_deadline_shorter_than_the_attempt_timeout_is_not_retried() -> None:
    caller = Caller(idempotent(attempt_timeout=0.5), 0.25)
    assert (caller.attempt.timeout, caller.attempt.deadline) == (0.25, None)
    assert caller.fail(T0 + 0.25, DEADLINE_EXCEEDED) is None
    assert caller.call.stopped is NOT_RETRYABLE


def test_a_server_deadline_exceeded_before_the_attempt_timeout_is_not_retried() -> None:
    """DEADLINE_EXCEEDED that came before the attempt's own timeout ran out is the server's
    answer: retried only if the policy lists the code."""
    caller = Caller(idempotent(attempt_timeout=0.5), 2.0)
    assert caller.fail(T0 + 0.2, DEADLINE_EXCEEDED) is None
    assert caller.call.stopped is NOT_RETRYABLE

    caller = Caller(idempotent(attempt_timeout=0.5, codes=frozenset({DEADLINE_EXCEEDED}), jitter=0.0), 2.0)
    assert caller.fail(T0 + 0.2, DEADLINE_EXCEEDED) == 0.1


def test_an_attempt_timeout_of_a_non_idempotent_method_is_not_retried() -> None:
    caller = Caller(RetryPolicy(attempt_timeout=0.5), 2.0)
    assert caller.attempt.timeout == 0.5
    assert caller.fail(T0 + 0.5, DEADLINE_EXCEEDED) is None
    assert caller.call.stopped is NOT_RETRYABLE


def test_an_attempt_timeout_uses_up_attempts() -> None:
    caller = Caller(idempotent(attempt_timeout=0.5, initial_backoff=0.25, max_attempts=2, jitter=0.0))
    assert caller.fail(T0 + 0.5, DEADLINE_EXCEEDED) == 0.25
    assert caller.wait_out().timeout == 0.5
    assert caller.fail(T0 + 1.25, DEADLINE_EXCEEDED) is None
    assert caller.call.stopped is ATTEMPTS_USED


# -- Hedging's delay and the latency window ------------------------------------------------------------


def test_hedge_delay() -> None:
    """A fixed delay is used as is; the default waits for min_samples timings, then uses their p95."""
    assert plan_of(idempotent()).hedge_delay() is None
    assert plan_of(idempotent(hedging=Hedging(delay=0.05))).hedge_delay() == 0.05
    assert plan_of(idempotent(hedging=Hedging(delay=0.05))).latency is None
    plan = plan_of(idempotent(hedging=Hedging(min_samples=3)))
    assert plan.latency is not None
    for seconds in (0.01, 0.02):
        plan.latency.add(seconds)
        assert plan.hedge_delay() is None
    plan.latency.add(0.03)
    assert plan.hedge_delay() == 0.03


@pytest.mark.parametrize(("min_samples", "p95"), [(1, 0.5), (5, 0.5), (20, 0.5), (100, 0.096)])
def test_latency_p95_is_none_until_min_samples(min_samples: int, p95: float) -> None:
    """No p95 before min_samples timings; at the min_samples-th, the p95 of those seen."""
    window = LatencyWindow(min_samples)
    for n in range(min_samples - 1):
        window.add(0.001 * (n + 1))
        assert window.p95 is None
    window.add(0.5)
    assert window.p95 == pytest.approx(p95)


def test_latency_p95_of_a_known_distribution() -> None:
    """Exponential latencies with a 10 ms mean: p95 is about -ln(0.05) × 10 ms ≈ 30 ms."""
    rng = random.Random(5)
    window = LatencyWindow(20)
    for _ in range(5000):
        window.add(rng.expovariate(100.0))
    assert window.p95 == pytest.approx(-math.log(0.05) / 100.0, rel=0.2)


def test_latency_p95_of_an_exact_ramp() -> None:
    """512 samples 1..512 ms in shuffled order: the p95 is the 487th smallest."""
    samples = [(n + 1) / 1000 for n in range(512)]
    random.Random(3).shuffle(samples)
    window = LatencyWindow(20)
    for seconds in samples:
        window.add(seconds)
    assert window.p95 == 0.487


def test_latency_window_forgets_old_samples() -> None:
    """Only the most recent samples count: a method that got fast has a low p95 again."""
    window = LatencyWindow(20)
    for _ in range(512):
        window.add(1.0)
    assert window.p95 == 1.0
    for _ in range(512):
        window.add(0.01)
    assert window.p95 == 0.01


# -- The pool's retry bookkeeping ----------------------------------------------------------------------


def calls(pool: PoolState, count: int) -> None:
    """`count` calls that begin (paying into the budget) and succeed."""
    for _ in range(count):
        pool.end(pool.begin(), None, None)


def budget_of(pool: PoolState) -> dict[str, Any]:
    described: dict[str, Any] = pool.describe()["retry_budget"]
    return described


def test_begin_pays_into_the_budget(clock: FakeClock, rng: random.Random) -> None:
    """Each call begun funds `ratio` of a retry; begin_again (a retry's own begin) funds nothing."""
    pool = new_pool(clock, rng, retry_budget=RetryBudget(ratio=0.2, min_per_second=0.0))
    assert budget_of(pool)["balance"] == 0.0
    calls(pool, 4)
    assert budget_of(pool)["balance"] == 0.8
    calls(pool, 1)
    assert budget_of(pool)["balance"] == 1.0
    for _ in range(10):
        pool.end(pool.begin_again(None, set()), None, None)
    assert budget_of(pool)["balance"] == 1.0


@pytest.mark.parametrize(
    ("ratio", "min_per_second", "window", "made", "allowed", "balance"),
    [
        (0.2, 10.0, 10.0, 0, 100, 0.0),
        (0.2, 10.0, 10.0, 50, 110, 0.0),
        (0.2, 0.0, 10.0, 50, 10, 0.0),
        (0.2, 0.0, 10.0, 4, 0, 0.8),
        (0.5, 1.0, 4.0, 10, 9, 0.0),
        (1.5, 0.5, 2.0, 7, 11, 0.5),
        (0.0, 0.0, 10.0, 100, 0, 0.0),
        (0.0, 2.5, 2.0, 100, 5, 0.0),
    ],
)
def test_spend_allows_ratio_of_the_calls_plus_the_reserve(
    clock: FakeClock,
    rng: random.Random,
    ratio: float,
    min_per_second: float,
    window: float,
    made: int,
    allowed: int,
    balance: float,
) -> None:
    """Within a window, spend() lets through ratio × calls + min_per_second × window, then
    refuses and counts each refusal."""
    budget = RetryBudget(ratio=ratio, min_per_second=min_per_second, window=window)
    pool = new_pool(clock, rng, retry_budget=budget)
    calls(pool, made)
    answers = [pool.spend(Resend.RETRY) for _ in range(allowed + 5)]
    assert answers == [True] * allowed + [False] * 5
    assert pool.sent_again == {Resend.RETRY: allowed, Resend.REQUEUE: 0, Resend.HEDGE: 0}
    assert pool.budget_refused == 5
    assert budget_of(pool) == {"retries": allowed, "requeues": 0, "hedges": 0, "refused": 5, "balance": balance}


def test_describe_counts_what_the_budget_paid_for_by_kind(clock: FakeClock, rng: random.Random) -> None:
    """Retries, requeues and hedges share one budget; describe() counts each kind, the refusals and the balance."""
    pool = new_pool(clock, rng, retry_budget=RetryBudget(ratio=0.2, min_per_second=1.0, window=10.0))
    assert budget_of(pool) == {"retries": 0, "requeues": 0, "hedges": 0, "refused": 0, "balance": 10.0}
    calls(pool, 50)  # 10 + 10 in all
    assert budget_of(pool)["balance"] == 20.0
    kinds = [Resend.RETRY] * 9 + [Resend.REQUEUE] * 7 + [Resend.HEDGE] * 4
    assert all(pool.spend(kind) for kind in kinds)
    assert budget_of(pool) == {"retries": 9, "requeues": 7, "hedges": 4, "refused": 0, "balance": 0.0}
    assert not pool.spend(Resend.HEDGE)
    assert not pool.spend(Resend.REQUEUE)
    assert not pool.spend(Resend.RETRY)
    assert budget_of(pool) == {"retries": 9, "requeues": 7, "hedges": 4, "refused": 3, "balance": 0.0}
    assert pool.budget.allowed == 20
    assert pool.budget.refused == 3


def test_spent_retries_count_for_a_window(clock: FakeClock, rng: random.Random) -> None:
    """Retries count against the budget for one window (and a step); then the reserve is back."""
    pool = new_pool(clock, rng, retry_budget=RetryBudget(ratio=0.2, min_per_second=1.0, window=10.0))
    assert sum(pool.spend(Resend.RETRY) for _ in range(15)) == 10
    clock.advance(9.5)
    assert budget_of(pool)["balance"] == 0.0
    assert not pool.spend(Resend.RETRY)
    clock.advance(1.0)
    assert budget_of(pool)["balance"] == 10.0
    assert budget_of(pool)["retries"] == 10
    assert budget_of(pool)["refused"] == 6


def addresses(routes: Sequence[Route]) -> set[str]:
    return {route.endpoint.address for route in routes}


def test_begin_again_prefers_a_route_not_tried(clock: FakeClock, rng: random.Random) -> None:
    """With several untried routes in rotation, a retry goes to one of them, never to a tried
    one, and the route is added to the call's tried set."""
    pool = new_pool(clock, rng)
    first = pool.routes[0]
    landed: Counter[str] = Counter()
    for _ in range(300):
        tried = {first}
        slot = pool.begin_again(None, tried)
        assert slot.route is not first
        assert tried == {first, slot.route}
        landed[slot.route.endpoint.address] += 1
        pool.end(slot, None, None)
    assert set(landed) == addresses(pool.routes[1:])
    assert min(landed.values()) > 50
    assert pool.in_flight == 0


def test_begin_again_takes_the_one_route_left(clock: FakeClock, rng: random.Random) -> None:
    pool = new_pool(clock, rng)
    for _ in range(20):
        tried = set(pool.routes[:3])
        slot = pool.begin_again(None, tried, fresh_only=True)
        assert slot.route is pool.routes[3]
        assert tried == set(pool.routes)
        pool.end(slot, None, None)


def test_begin_again_falls_back_to_a_tried_route(clock: FakeClock, rng: random.Random) -> None:
    """Every route tried: a retry still goes out, to one of them as the balancer picks."""
    pool = new_pool(clock, rng)
    landed: Counter[str] = Counter()
    for _ in range(200):
        tried = set(pool.routes)
        slot = pool.begin_again(None, tried)
        assert tried == set(pool.routes)
        landed[slot.route.endpoint.address] += 1
        pool.end(slot, None, None)
    assert set(landed) == addresses(pool.routes)


def test_begin_again_fresh_only_refuses_when_every_route_was_tried(clock: FakeClock, rng: random.Random) -> None:
    """A hedge needs a route the call has not tried: with none, PoolUnavailableError, and nothing is taken."""
    pool = new_pool(clock, rng)
    tried = set(pool.routes)
    with pytest.raises(PoolUnavailableError, match="no other endpoint to try") as raised:
        pool.begin_again(None, tried, fresh_only=True)
    assert raised.value.code() is UNAVAILABLE
    assert tried == set(pool.routes)
    assert pool.in_flight == 0


def test_a_route_out_of_rotation_is_not_somewhere_to_go(clock: FakeClock, rng: random.Random) -> None:
    """An untried route that is failing to connect is not offered: has_untried says no,
    fresh_only refuses, and an ordinary retry goes back to a tried route in rotation."""
    pool = new_pool(clock, rng)
    failing = pool.routes[3]
    for slot in failing.slots:
        pool.set_slot_state(slot, TRANSIENT_FAILURE)
    tried = set(pool.routes[:3])
    assert not pool.has_untried(tried)
    with pytest.raises(PoolUnavailableError):
        pool.begin_again(None, set(tried), fresh_only=True)
    for _ in range(50):
        slot = pool.begin_again(None, set(tried))
        assert slot.route is not failing
        pool.end(slot, None, None)


@pytest.mark.parametrize(("tried", "expected"), [(0, True), (1, True), (3, True), (4, False)])
def test_has_untried(clock: FakeClock, rng: random.Random, tried: int, expected: bool) -> None:
    pool = new_pool(clock, rng)
    assert pool.has_untried(set(pool.routes[:tried])) is expected


def test_begin_again_on_a_closed_pool(clock: FakeClock, rng: random.Random) -> None:
    pool = new_pool(clock, rng)
    pool.close()
    with pytest.raises(PoolClosedError):
        pool.begin_again(None, set())


# -- A retry storm through the pure core ---------------------------------------------------------------

_STORM_CALLS = 1000
_STORM_SPACING = 0.0095  # 1000 calls over 9.5 s
_ATTEMPT_TIME = 0.01  # every attempt fails after 10 ms
_STORM_SEED = 11


@pytest.mark.parametrize(
    ("policy", "details", "kind", "limit"),
    [
        (idempotent(max_attempts=3), SOCKET_CLOSED, Resend.RETRY, ATTEMPTS_USED),
        (RetryPolicy(), CONNECT_FAILED, Resend.REQUEUE, NO_REQUEUE),
    ],
    ids=["retries", "requeues"],
)
def test_a_storm_is_held_to_the_budget(
    clock: FakeClock, policy: RetryPolicy, details: str, kind: Resend, limit: StopReason
) -> None:
    """1000 calls over 9.5 s of fake time, every attempt failing, every failure wanting to
    go again (as a retry, or a requeue up to 25 times): what the budget lets out is exactly
    1000 × 0.2 + 10 × 10. Calls, failures and retries (backoffs are ≤ 0.36 s) all fall
    within one 10 s window, less its 0.1 s step, so no credit leaves the window and the
    bound needs no slack; the demand is far above it, so the budget ends fully spent.
    Every call stops either at its own limit or when the budget refuses it."""
    rng = random.Random(_STORM_SEED)
    pool = new_pool(clock, rng)
    method = Method(pool, Plan(policy, rng), unary_response=True, streaming_request=False)
    calls = [Call(method, REQUEST, None, None, None, None, None) for _ in range(_STORM_CALLS)]
    start = clock.now
    # (time, sequence, what, call, attempt): "start" a call, "fail" its attempt in flight,
    # "timer" when its backoff is over.
    events: list[tuple[float, int, str, Call, Attempt | None]] = [
        (start + n * _STORM_SPACING, n, "start", call, None) for n, call in enumerate(calls)
    ]
    heapq.heapify(events)
    sequence = _STORM_CALLS
    last_spend = start
    while events:
        at, _, what, call, attempt = heapq.heappop(events)
        assert at >= clock.now
        clock.now = at
        paid = pool.sent_again[kind]
        if what == "start":
            step = call.start()
        elif what == "timer":
            step = call.timer_fired()
        else:
            assert attempt is not None
            call.ended(attempt, UNAVAILABLE, details)
            step = call.next()
        if pool.sent_again[kind] > paid:
            last_spend = at
        sequence += 1
        if step is Step.SEND:
            heapq.heappush(events, (at + _ATTEMPT_TIME, sequence, "fail", call, call.sending))
        elif step is Step.WAIT:
            assert call.timer is not None
            heapq.heappush(events, (at + call.timer, sequence, "timer", call, None))

    assert last_spend - start < 10.0 - 0.1
    allowed, refused = pool.sent_again[kind], pool.budget_refused
    bound = _STORM_CALLS * 0.2 + 10.0 * 10.0
    assert allowed <= bound
    assert allowed == bound  # the budget was the only limit, and it was used to the last retry
    assert allowed + refused > 3 * bound
    assert all(call.over and call.final is not None and call.final.code is UNAVAILABLE for call in calls)
    # A refused call stops at once; every other one went as far as its limit. (That a
    # refused requeue is recorded as NO_ENDPOINT, not BUDGET, is pinned in test_call_core.)
    assert Counter(call.stopped for call in calls)[limit] + refused == _STORM_CALLS
    described = budget_of(pool)
    assert described[kind] == allowed
    assert described["refused"] == refused
    assert described["balance"] == 0.0
    assert sum(described[k] for k in Resend) == allowed
    assert pool.in_flight == 0


# -- Edge cases -------------------------------------------------------------------------------


def test_a_bare_name_is_a_service_without_a_package() -> None:
    """'Greeter' names the package-less service of '/Greeter/SayHello'."""
    config = PoolConfig(method_retry={"Greeter": RetryPolicy(idempotent=True)})
    policy = config.retry_policy("/Greeter/SayHello")
    assert policy is not None
    assert policy.idempotent


@pytest.mark.parametrize("value", ["²", "٣٠٠", "9" * 5000])
def test_pushback_that_int_cannot_read_means_stop(value: str) -> None:
    """Any pushback that is not a plain non-negative integer must read as "stop", not raise."""
    caller = Caller(idempotent())
    assert caller.fail(T0 + 0.01, pushback=value) is None
    assert caller.call.stopped is PUSHBACK


def test_an_attempt_timeout_is_retried_even_with_no_codes() -> None:
    """The docs: an idempotent method is retried on `codes`, and when `attempt_timeout` runs out."""
    caller = Caller(idempotent(codes=frozenset(), attempt_timeout=0.5, jitter=0.0), 5.0)
    assert caller.attempt.timeout == 0.5
    assert caller.fail(T0 + 0.5, DEADLINE_EXCEEDED) == 0.1
