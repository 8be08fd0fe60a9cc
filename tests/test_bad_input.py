"""Bad input at every public entry point, as tables.

Each row is a call, the exception it must raise and a piece of text its message must
contain that names the problem (the field, the value, or both). Construction errors must
leave no thread (and, in asyncio, no task) behind; calls on a live channel, against real
echo servers, must end within a bounded time whatever they are given.

A row that shows a poolkit bug stays in its table, marked xfail(strict=True): the reason
says what is observed, and `raises` names what the bug raises, so only that counts as
the expected failure. Fixing the bug turns the row into a failure that asks for the mark
to be removed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import math
import socket
import threading
import time
import types
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest
from _support import wait_for_idle, wait_until

import poolkit
import poolkit.aio
from poolkit import (
    ConfigError,
    FailureAccrual,
    HealthCheck,
    Hedging,
    PoolClosedError,
    PoolConfig,
    PoolkitError,
    RetryBudget,
    RetryPolicy,
)
from poolkit.testing import EchoRequest, EchoServers, EchoStub

# Every live call and every wait gives up after this long: a hang fails the row by name
# rather than by pytest-timeout.
LIMIT = 5.0
# Each live-channel test as a whole.
ROW_TIMEOUT = 20
# Nothing listens here; construction errors come before any connection is made.
NOWHERE = "127.0.0.1:1"
REQUEST = EchoRequest(payload=b"x")
UNARY = "/poolkit.echo.v1.Echo/Unary"
UNKNOWN_METHOD = "/poolkit.echo.v1.Echo/NoSuchMethod"
FAILED = pytest.fail.Exception  # what a row that expected an error and got none raises

ExceptionTypes = type[BaseException] | tuple[type[BaseException], ...]


@dataclass(frozen=True)
class Row:
    """One bad input: what to call, what it must raise, what the message must say."""

    id: str
    call: Callable[..., Any]
    error: ExceptionTypes
    says: str
    code: grpc.StatusCode | None = None  # for grpc errors: the status code too
    bug: str | None = None  # a poolkit bug this row shows: what is observed instead
    observed: type[BaseException] = AssertionError  # what the bug raises in this test


def table(rows: list[Row]) -> list[Any]:
    """Rows as pytest params, a row with a bug marked xfail(strict=True)."""
    params = []
    for row in rows:
        marks = [pytest.mark.xfail(strict=True, reason=row.bug, raises=row.observed)] if row.bug else []
        params.append(pytest.param(row, id=row.id, marks=marks))
    return params


def check(row: Row, error: BaseException) -> None:
    """`error` is the row's exception and its message names the problem."""
    if not isinstance(error, row.error):
        raise error  # the wrong type, unchanged: an xfail's `raises` can name it
    assert row.says in str(error), f"{row.id}: {row.says!r} not in the message {str(error)!r}"
    if row.code is not None:
        assert isinstance(error, grpc.RpcError)
        assert error.code() is row.code, f"{row.id}: {error.code()} is not {row.code}"


def raised_by(call: Callable[[], Any]) -> BaseException:
    """What `call` raised; the test fails if it raised nothing."""
    try:
        call()
    except Exception as error:
        return error
    pytest.fail("no exception was raised")


def outcome(call: Callable[[], Any]) -> BaseException | None:
    """What `call` raised, or None if it returned."""
    try:
        call()
    except Exception as error:
        return error
    return None


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run an asyncio test body in a fresh event loop, cut off after ROW_TIMEOUT."""
    return asyncio.run(asyncio.wait_for(coroutine, ROW_TIMEOUT))


# -- construction: no thread or task is left behind ---------------------------------------------


def threads_left(before: set[threading.Thread]) -> set[threading.Thread]:
    """Threads started since `before` that are still running (given a moment to end)."""
    for thread in set(threading.enumerate()) - before:
        thread.join(0.5)
    return {thread for thread in threading.enumerate() if thread not in before and thread.is_alive()}


def construction_error(shell: types.ModuleType, build: Callable[[types.ModuleType], Any]) -> BaseException:
    """What building a channel with `build(shell)` raised, in a running event loop for
    poolkit.aio. The test fails if a channel was built (it is closed first), or if the
    failed construction left a thread or an asyncio task behind."""
    before, count = set(threading.enumerate()), threading.active_count()
    if shell is poolkit:
        try:
            channel = build(shell)
        except Exception as error:
            failure, tasks = error, set()
        else:
            channel.close()
            pytest.fail(f"a channel was built: {channel!r}")
    else:
        failure, tasks = run(_aio_construction(build))
    left = threads_left(before)
    assert not left, f"construction left threads behind ({count} -> {threading.active_count()}): {left}"
    assert not tasks, f"construction left asyncio tasks behind: {tasks}"
    return failure


async def _aio_construction(build: Callable[[types.ModuleType], Any]) -> tuple[BaseException, set[Any]]:
    before = asyncio.all_tasks()
    try:
        channel = build(poolkit.aio)
    except Exception as error:
        await asyncio.sleep(0)  # anything it scheduled would show up now
        return error, {task for task in asyncio.all_tasks() - before if not task.done()}
    await channel.close()
    pytest.fail(f"a channel was built: {channel!r}")


SHELLS = {"sync": poolkit, "aio": poolkit.aio}


def tls() -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials()


# Every way to build a channel from a target.
ENTRY_POINTS: dict[str, tuple[types.ModuleType, bool]] = {
    "insecure_channel": (poolkit, False),
    "secure_channel": (poolkit, True),
    "aio.insecure_channel": (poolkit.aio, False),
    "aio.secure_channel": (poolkit.aio, True),
}


def opener(secure: bool, target: Any, **kwargs: Any) -> Callable[[types.ModuleType], Any]:
    if secure:
        return lambda shell: shell.secure_channel(target, tls(), **kwargs)
    return lambda shell: shell.insecure_channel(target, **kwargs)


# -- 1. targets -----------------------------------------------------------------------------


def target_row(
    id_: str, target: Any, says: str, bug: str | None = None, observed: type[BaseException] = AssertionError
) -> Row:
    return Row(id_, lambda: target, ConfigError, says, bug=bug, observed=observed)


TARGETS = [
    target_row("empty", "", "target='': is empty"),
    target_row("blank", "  ", "is empty"),
    target_row("no host", ":80", "address ':80' has no host"),
    target_row("port 99999", "host:99999", "port '99999' of 'host:99999' must be a number from 1 to 65535"),
    target_row("port 0", "host:0", "port '0' of 'host:0'"),
    target_row("ipv4 port 0", "ipv4:127.0.0.1:0", "port '0'"),
    target_row("ipv6 port 65536", "ipv6:[::1]:65536", "port '65536'"),
    target_row("ipv4 negative port", "ipv4:127.0.0.1:-1", "port '-1'"),
    target_row("port not a number", "127.0.0.1:1/x", "port '1/x'"),
    target_row("unclosed bracket", "[::1", "malformed IPv6 address '[::1'"),
    target_row("junk after bracket", "[::1]x80", "malformed IPv6 address '[::1]x80'"),
    target_row("ipv6 unbracketed in ipv6:", "ipv6:::1:80", "must be in brackets"),
    target_row("dns authority", "dns://8.8.8.8/x:1", "dns targets with a DNS server authority are not supported"),
    target_row("dns authority without path", "dns://x:1", "DNS server authority"),
    target_row("dns without path", "dns://", "expected dns:///host:port"),
    target_row("unknown scheme", "bogus:///x:1", "unknown scheme 'bogus'"),
    target_row("unix scheme", "unix:/tmp/socket", "unknown scheme 'unix'"),
    target_row("ipv4 with a name", "ipv4:notanip:1", "'notanip' is not an IP address"),
    target_row("ipv4 nothing", "ipv4:", "names no endpoint"),
    target_row("list with a non-string", ["127.0.0.1:1", 5], "sequence of 'host:port' strings"),
    target_row("list of bytes", [b"127.0.0.1:1"], "sequence of 'host:port' strings"),
    target_row("empty list", [], "target=[]: names no endpoint"),
    target_row("list with an empty entry", ["127.0.0.1:1", ""], "has an empty address"),
    target_row("None", None, "target=None"),
    target_row("a number", 50051, "target=50051"),
    target_row("a set", {"127.0.0.1:1"}, "sequence of 'host:port' strings"),
    target_row("several without a scheme", "127.0.0.1:1,127.0.0.1:2", "write ipv4:a:p,b:p"),
    # Once misread as schemes ("unknown scheme 'host'"): now the port or address is named.
    target_row("empty port", "host:", "port '' of 'host:' must be a number from 1 to 65535"),
    target_row("ip with empty port", "127.0.0.1:", "port '' of '127.0.0.1:'"),
    target_row("port abc", "host:abc", "port 'abc'"),
    target_row("negative port", "127.0.0.1:-1", "port '-1'"),
    target_row("ipv6 unbracketed", "::1:80", "IPv6 address '::1:80' must be in brackets"),
    # A trailing ':' with no port is a mistake with brackets too (not grpc's default 443).
    target_row("bracketed ipv6 with empty port", "[::1]:", "port '' of '[::1]:'"),
    # Only ASCII digits make a port ('²' and '٣' are Unicode digits to str.isdigit()).
    target_row("superscript digit port", "127.0.0.1:²", "port '²'"),
    target_row("arabic-indic digit port", "127.0.0.1:٣", "port '٣'"),
    target_row("other grpc scheme", "unix-abstract:name", "unknown scheme 'unix-abstract'"),
    target_row("xds", "xds:///service", "unknown scheme 'xds'"),
]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("row", table(TARGETS))
def test_bad_target(entry: str, row: Row) -> None:
    shell, secure = ENTRY_POINTS[entry]
    target = row.call()

    error = construction_error(shell, opener(secure, target))

    check(row, error)
    assert isinstance(error, ValueError)
    assert error.name == "target"  # type: ignore[attr-defined]


RESOLVER = PoolConfig(resolver=lambda target: [NOWHERE], health_check=None, connect_on_start=False)

TARGETS_WITH_A_RESOLVER = [
    Row(
        "a number",
        lambda shell: shell.insecure_channel(50051, config=RESOLVER),
        ConfigError,
        "target=50051",
    ),
    Row(
        "None",
        lambda shell: shell.insecure_channel(None, config=RESOLVER),
        ConfigError,
        "target=None",
    ),
    Row(
        "list with a non-string",
        lambda shell: shell.insecure_channel(["a", 5], config=RESOLVER),
        ConfigError,
        "target=['a', 5]",
    ),
]


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("row", table(TARGETS_WITH_A_RESOLVER))
def test_bad_target_with_a_resolver(shell: str, row: Row) -> None:
    check(row, construction_error(SHELLS[shell], row.call))


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    "spelling",
    [
        "list",
        "ipv4 list",
        "name and address",
    ],
)
def test_duplicate_endpoints_are_merged_silently(cluster: EchoServers, shell: str, spelling: str) -> None:
    """poolkit does not refuse a target that names one endpoint twice: parse_target keeps
    the first of each (IP, port), so the pool has one route for it, not two."""
    address = cluster.addresses[0]
    port = address.rpartition(":")[2]
    target: Any = {
        "list": [address, address],
        "ipv4 list": f"ipv4:{address},{address}",
        "name and address": [f"localhost:{port}", address],
    }[spelling]
    config = PoolConfig(health_check=None, connect_on_start=False)
    if spelling == "name and address" and "127.0.0.1" not in _addresses_of("localhost"):
        pytest.skip("localhost does not resolve to 127.0.0.1 here")

    if shell == "sync":
        with poolkit.insecure_channel(target, config=config) as channel:
            endpoints = channel.describe()["endpoints"]
    else:

        async def describe() -> list[dict[str, Any]]:
            async with poolkit.aio.insecure_channel(target, config=config) as channel:
                await channel.channel_ready()  # made on the loop: the name is looked up off it
                return channel.describe()["endpoints"]  # type: ignore[no-any-return]

        endpoints = run(describe())

    assert [e["address"] for e in endpoints] == [address]


def _addresses_of(host: str) -> set[str]:
    return {str(info[4][0]) for info in socket.getaddrinfo(host, 1, type=socket.SOCK_STREAM)}


# -- 2. the other channel arguments ---------------------------------------------------------


CHANNEL_ARGUMENTS = [
    Row("options a string", lambda s: s.insecure_channel(NOWHERE, options="grpc.x"), ConfigError, "options='grpc.x'"),
    Row("options a dict", lambda s: s.insecure_channel(NOWHERE, options={"a": 1}), ConfigError, "options={'a': 1}"),
    Row(
        "options a generator",
        lambda s: s.insecure_channel(NOWHERE, options=(o for o in [("a", 1)])),
        ConfigError,
        "must be a sequence of (name, value) tuples",
    ),
    Row("option a list", lambda s: s.insecure_channel(NOWHERE, options=[["a", 1]]), ConfigError, "options=['a', 1]"),
    Row("option a name", lambda s: s.insecure_channel(NOWHERE, options=["grpc.x"]), ConfigError, "options='grpc.x'"),
    Row(
        "option a triple",
        lambda s: s.insecure_channel(NOWHERE, options=[("a", 1, 2)]),
        ConfigError,
        "each option must be a (name, value) tuple",
    ),
    Row(
        "option name not a string",
        lambda s: s.insecure_channel(NOWHERE, options=[(1, 2)]),
        ConfigError,
        "options=(1, 2)",
    ),
    Row(
        "option value None",
        lambda s: s.insecure_channel(NOWHERE, options=[("grpc.max_receive_message_length", None)]),
        ConfigError,
        "the value of grpc.max_receive_message_length must be an int or a string",
    ),
    Row(
        "option value an object",
        lambda s: s.insecure_channel(NOWHERE, options=[("grpc.max_receive_message_length", object())]),
        ConfigError,
        "the value of grpc.max_receive_message_length must be an int or a string",
    ),
    Row("credentials a string", lambda s: s.secure_channel(NOWHERE, "tls"), ConfigError, "credentials='tls'"),
    Row("credentials None", lambda s: s.secure_channel(NOWHERE, None), ConfigError, "credentials=None"),
    Row(
        "call credentials",
        lambda s: s.secure_channel(NOWHERE, grpc.access_token_call_credentials("token")),
        ConfigError,
        "must be grpc.ChannelCredentials",
    ),
    Row(
        "config a dict",
        lambda s: s.insecure_channel(NOWHERE, config={"balancer": "round_robin"}),
        ConfigError,
        "config={'balancer': 'round_robin'}: must be a poolkit.PoolConfig",
    ),
    Row(
        "config the class",
        lambda s: s.insecure_channel(NOWHERE, config=PoolConfig),
        ConfigError,
        "must be a poolkit.PoolConfig",
    ),
    Row(
        "config a HealthCheck",
        lambda s: s.insecure_channel(NOWHERE, config=HealthCheck()),
        ConfigError,
        "config=HealthCheck(",
    ),
]


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("row", table(CHANNEL_ARGUMENTS))
def test_bad_channel_argument(shell: str, row: Row) -> None:
    check(row, construction_error(SHELLS[shell], row.call))


AIO_CHANNEL_ARGUMENTS = [
    Row(
        "interceptor not an interceptor",
        lambda s: s.insecure_channel(NOWHERE, interceptors=[object()]),
        ValueError,
        "must be UnaryUnaryClientInterceptor",
    ),
    Row(
        "compression a name",
        lambda s: s.insecure_channel(NOWHERE, compression="gzip"),
        ConfigError,
        "compression='gzip': must be None or a grpc.Compression",
    ),
]


@pytest.mark.parametrize("row", table(AIO_CHANNEL_ARGUMENTS))
def test_bad_aio_channel_argument(row: Row) -> None:
    check(row, construction_error(poolkit.aio, row.call))


# -- 3. source addresses --------------------------------------------------------------------


def _bindable(address: str) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


# (sources, text the ConfigError must contain): refused by PoolConfig itself.
SOURCES_REFUSED_BY_CONFIG = {
    "interface name too long": (["not-an-interface"], "'not-an-interface': is neither an IP address nor"),
    "duplicate": (["127.0.0.2", "127.0.0.3", "127.0.0.2"], "'127.0.0.2': is listed twice"),
    "duplicate spelled apart": (["::1", "0:0:0:0:0:0:0:1"], "is listed twice"),
    "a string": ("127.0.0.2", "source_addresses='127.0.0.2': must be a list"),
    "an empty entry": ([""], "source_addresses='': each must be an IP address or an interface name"),
    "not a string": ([127], "source_addresses=127"),
    "a network": (["10.0.0.0/8"], "'10.0.0.0/8': is neither"),
}


@pytest.mark.parametrize("case", SOURCES_REFUSED_BY_CONFIG)
def test_bad_source_address_refused_by_config(case: str) -> None:
    sources, says = SOURCES_REFUSED_BY_CONFIG[case]

    error = raised_by(lambda: PoolConfig(source_addresses=sources))

    check(Row(case, print, ConfigError, says), error)


# Valid in a PoolConfig (a name may be an interface of some host), refused when a channel is built here.
SOURCES_REFUSED_BY_CHANNEL = {
    "999.1.1.1": "'999.1.1.1': is neither an IP address nor a network interface of this host",
    "10.255.255.254": "'10.255.255.254': is not an address of this host",
    "nosuchif0": "'nosuchif0': is neither an IP address nor a network interface of this host",
}


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("source", SOURCES_REFUSED_BY_CHANNEL)
def test_bad_source_address_refused_by_channel(shell: str, source: str) -> None:
    if _bindable(source):
        pytest.skip(f"{source} is an address of this host")
    config = PoolConfig(source_addresses=[source], health_check=None)

    error = construction_error(SHELLS[shell], lambda s: s.insecure_channel(NOWHERE, config=config))

    check(Row(source, print, ConfigError, SOURCES_REFUSED_BY_CHANNEL[source]), error)
    assert error.name == "source_addresses"  # type: ignore[attr-defined]


# -- 4. every number of every configuration class ------------------------------------------------

# Where each class's fields are named in its errors.
PREFIX = {
    PoolConfig: "",
    HealthCheck: "health_check.",
    FailureAccrual: "failure_accrual.",
    RetryPolicy: "retry.",
    Hedging: "hedging.",
    RetryBudget: "retry_budget.",
}

# What each numeric field accepts. A field that is not listed fails
# test_every_numeric_field_is_classified, so a new one cannot slip past this table.
DURATION = "duration"  # finite, > 0
RATIO = "ratio"  # finite, 0 to 1000
RESERVE = "reserve"  # finite, >= 0
SHARE = "share"  # 0 to 1
JITTER = "jitter"  # 0 up to (not including) 1
MULTIPLIER = "multiplier"  # 1 to 10
KIND: dict[tuple[type, str], str | int] = {  # an int: a count from 1 to that
    (PoolConfig, "connections_per_endpoint"): 64,
    (PoolConfig, "ewma_decay"): DURATION,
    (PoolConfig, "initial_rtt"): DURATION,
    (PoolConfig, "max_ejected_share"): SHARE,
    (PoolConfig, "panic_threshold"): SHARE,
    (PoolConfig, "resolve_interval"): DURATION,
    (HealthCheck, "interval"): DURATION,
    (HealthCheck, "timeout"): DURATION,
    (FailureAccrual, "consecutive_failures"): 1_000_000,
    (FailureAccrual, "success_rate"): SHARE,
    (FailureAccrual, "success_rate_window"): DURATION,
    (FailureAccrual, "success_rate_min_calls"): 1_000_000,
    (FailureAccrual, "ejection_min"): DURATION,
    (FailureAccrual, "ejection_max"): DURATION,
    (FailureAccrual, "jitter"): JITTER,
    (RetryPolicy, "max_attempts"): 10,
    (RetryPolicy, "initial_backoff"): DURATION,
    (RetryPolicy, "backoff_multiplier"): MULTIPLIER,
    (RetryPolicy, "max_backoff"): DURATION,
    (RetryPolicy, "jitter"): JITTER,
    (RetryPolicy, "attempt_timeout"): DURATION,
    (Hedging, "delay"): DURATION,
    (Hedging, "min_samples"): 1_000_000,
    (RetryBudget, "ratio"): RATIO,
    (RetryBudget, "min_per_second"): RESERVE,
    (RetryBudget, "window"): DURATION,
}

# Wrong for every numeric field: negative, NaN, infinite, booleans, a numeric string.
ALWAYS_BAD: list[Any] = [-1, -0.5, math.nan, math.inf, -math.inf, True, False, "1"]
# Wrong for some kinds only: zero, a value above the range, a float where an int is due.
ALSO_BAD: dict[str, list[Any]] = {
    # Past 1e9 s (31 years): Python's waits refuse such a timeout, in a background thread.
    DURATION: [0, 0.0, -0.0, 1e10],
    RATIO: [1000.5],
    RESERVE: [1e10],
    SHARE: [1.5],
    JITTER: [1, 1.0],
    MULTIPLIER: [0, 0.5, 10.5],
}
# Above every float: math.isfinite() raises OverflowError on it.
HUGE = 10**400


def numeric_fields(cls: type) -> list[str]:
    """The fields of `cls` whose type is a number (or a number or None)."""
    names = []
    for field in dataclasses.fields(cls):
        parts = {part.strip() for part in str(field.type).split("|")} - {"None"}
        if parts and parts <= {"int", "float"}:
            names.append(field.name)
    return names


def numeric_rows() -> list[Row]:
    rows = []
    for cls, prefix in PREFIX.items():
        for name in numeric_fields(cls):
            kind = KIND.get((cls, name), DURATION)
            bad = [*ALWAYS_BAD, 0, kind + 1, 1.0, 2.5] if isinstance(kind, int) else [*ALWAYS_BAD, *ALSO_BAD[kind]]
            for value in bad:
                says = f"{prefix}{name}={value!r}: "
                rows.append(Row(f"{cls.__name__}.{name}={value!r}", _builder(cls, name, value), ConfigError, says))
            says = f"{prefix}{name}={HUGE!r}"[:40]
            rows.append(Row(f"{cls.__name__}.{name}=10**400", _builder(cls, name, HUGE), ConfigError, says))
    return rows


def _builder(cls: type, name: str, value: Any) -> Callable[[], Any]:
    return lambda: cls(**{name: value})


def test_every_numeric_field_is_classified() -> None:
    found = {(cls, name) for cls in PREFIX for name in numeric_fields(cls)}
    assert found == set(KIND), f"classify in KIND: {found ^ set(KIND)}"


@pytest.mark.parametrize("row", table(numeric_rows()))
def test_bad_number_is_refused_naming_field_and_value(row: Row) -> None:
    error = raised_by(row.call)

    check(row, error)
    assert isinstance(error, ValueError)
    assert isinstance(error, PoolkitError)


CONFIG_VALUES = [
    Row("unknown balancer", lambda: PoolConfig(balancer="random"), ConfigError, "balancer='random': must be one of"),
    Row("balancer in capitals", lambda: PoolConfig(balancer="ROUND_ROBIN"), ConfigError, "balancer='ROUND_ROBIN'"),
    Row("balancer with a dash", lambda: PoolConfig(balancer="round-robin"), ConfigError, "balancer='round-robin'"),
    Row("balancer empty", lambda: PoolConfig(balancer=""), ConfigError, "balancer=''"),
    Row("balancer None", lambda: PoolConfig(balancer=None), ConfigError, "balancer=None"),
    Row("balancer a list", lambda: PoolConfig(balancer=["round_robin"]), ConfigError, "balancer=['round_robin']"),
    Row("telemetry a string", lambda: PoolConfig(telemetry="yes"), ConfigError, "telemetry='yes'"),
    Row("health_check True", lambda: PoolConfig(health_check=True), ConfigError, "health_check=True"),
    Row("failure_accrual a dict", lambda: PoolConfig(failure_accrual={}), ConfigError, "failure_accrual={}"),
    Row("resolver not callable", lambda: PoolConfig(resolver="dns"), ConfigError, "resolver='dns'"),
    Row("weights inf", lambda: PoolConfig(weights={"a:1": math.inf}), ConfigError, "weights['a:1']=inf"),
    Row("weights True", lambda: PoolConfig(weights={"a:1": True}), ConfigError, "weights['a:1']=True"),
    Row("health service not str", lambda: HealthCheck(service=5), ConfigError, "health_check.service=5"),
    Row("health watch not bool", lambda: HealthCheck(watch="no"), ConfigError, "health_check.watch='no'"),
    Row(
        "ejection_max below ejection_min",
        lambda: FailureAccrual(ejection_min=10.0, ejection_max=5.0),
        ConfigError,
        "failure_accrual.ejection_max=5.0: must be at least ejection_min",
    ),
    Row(
        "failure codes with OK",
        lambda: FailureAccrual(failure_codes={grpc.StatusCode.OK}),
        ConfigError,
        "cannot include OK",
    ),
    Row(
        "failure codes a name",
        lambda: FailureAccrual(failure_codes="UNAVAILABLE"),
        ConfigError,
        "failure_accrual.failure_codes='UNAVAILABLE'",
    ),
    Row(
        "failure codes numbers",
        lambda: FailureAccrual(failure_codes={14}),
        ConfigError,
        "failure_accrual.failure_codes=14",
    ),
    Row(
        "failure codes a list in a list",
        lambda: FailureAccrual(failure_codes=[[grpc.StatusCode.UNAVAILABLE]]),
        ConfigError,
        "failure_accrual.failure_codes",
    ),
    Row(
        "retry codes a list in a list",
        lambda: RetryPolicy(codes=[[grpc.StatusCode.UNAVAILABLE]]),
        ConfigError,
        "retry.codes",
    ),
    Row(
        "max_backoff below initial_backoff",
        lambda: RetryPolicy(initial_backoff=2.0),
        ConfigError,
        "retry.max_backoff=1.0: must be at least initial_backoff",
    ),
]


@pytest.mark.parametrize("row", table(CONFIG_VALUES))
def test_bad_config_value(row: Row) -> None:
    check(row, raised_by(row.call))


# -- 5. method names ------------------------------------------------------------------------

KINDS = ["unary_unary", "unary_stream", "stream_unary", "stream_stream"]
BAD_METHODS: dict[str, Any] = {
    "no leading slash": "poolkit.echo.v1.Echo/Unary",
    "empty": "",
    "None": None,
    "bytes": b"/poolkit.echo.v1.Echo/Unary",
}


@pytest.fixture(scope="module")
def sync_channel(cluster: EchoServers) -> Iterator[poolkit.Channel]:
    with poolkit.insecure_channel(cluster.target) as channel:
        yield channel


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", BAD_METHODS)
def test_bad_method_name(
    cluster: EchoServers, sync_channel: poolkit.Channel, shell: str, kind: str, method: str
) -> None:
    name = BAD_METHODS[method]
    row = Row(method, print, ValueError, f"method={name!r}: must be a full method name like '/package.Service/Method'")
    if shell == "sync":
        check(row, raised_by(lambda: getattr(sync_channel, kind)(name)))
        return

    async def make() -> BaseException:
        async with poolkit.aio.insecure_channel(cluster.target) as channel:
            return raised_by(lambda: getattr(channel, kind)(name))

    check(row, run(make()))


def test_bad_method_name_is_a_poolkit_error(sync_channel: poolkit.Channel) -> None:
    error = raised_by(lambda: sync_channel.unary_unary("poolkit.echo.v1.Echo/Unary"))

    assert isinstance(error, PoolkitError), repr(error)


# -- 6. calls on a live channel ---------------------------------------------------------------


def fail_with(code: grpc.StatusCode) -> EchoRequest:
    """A request the echo server answers with `code`."""
    return EchoRequest(fail_code=code.value[0], fail_details="failing on purpose")


def serializer_that_raises(request: Any) -> bytes:
    raise RuntimeError("cannot serialise this")


DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED

# (channel, stub) -> what the call returns; each row ends (raises or returns) within LIMIT.
SYNC_CALLS = [
    Row("unary negative timeout", lambda c, s: s.Unary(REQUEST, timeout=-1), grpc.RpcError, "Deadline", DEADLINE),
    Row(
        "unary with_call negative timeout",
        lambda c, s: s.Unary.with_call(REQUEST, timeout=-1),
        grpc.RpcError,
        "Deadline",
        DEADLINE,
    ),
    Row(
        "unary future negative timeout",
        lambda c, s: s.Unary.future(REQUEST, timeout=-1).result(timeout=LIMIT),
        grpc.RpcError,
        "Deadline",
        DEADLINE,
    ),
    Row(
        "server stream negative timeout",
        lambda c, s: list(s.ServerStream(REQUEST, timeout=-1)),
        grpc.RpcError,
        "Deadline",
        DEADLINE,
    ),
    Row(
        "client stream negative timeout",
        lambda c, s: s.ClientStream(iter([REQUEST]), timeout=-1),
        grpc.RpcError,
        "Deadline",
        DEADLINE,
    ),
    Row(
        "bidi stream negative timeout",
        lambda c, s: list(s.BidiStream(iter([REQUEST]), timeout=-1)),
        grpc.RpcError,
        "Deadline",
        DEADLINE,
    ),
    Row(
        "unary NaN timeout",
        lambda c, s: s.Unary(REQUEST, timeout=math.nan),
        ConfigError,
        "timeout=nan: must be a number of seconds, or None",
    ),
    Row(
        "str request to a protobuf method",
        lambda c, s: s.Unary("hello", timeout=LIMIT),
        grpc.RpcError,
        "Exception serializing request",
        grpc.StatusCode.INTERNAL,
    ),
    Row(
        "serializer that raises",
        lambda c, s: c.unary_unary(UNARY, request_serializer=serializer_that_raises)(b"", timeout=LIMIT),
        grpc.RpcError,
        "Exception serializing request",
        grpc.StatusCode.INTERNAL,
    ),
    Row(
        "unknown method",
        lambda c, s: c.unary_unary(UNKNOWN_METHOD)(b"", timeout=LIMIT),
        grpc.RpcError,
        "Method not found",
        grpc.StatusCode.UNIMPLEMENTED,
    ),
    Row(
        "unknown streaming method",
        lambda c, s: list(c.unary_stream(UNKNOWN_METHOD)(b"", timeout=LIMIT)),
        grpc.RpcError,
        "Method not found",
        grpc.StatusCode.UNIMPLEMENTED,
    ),
    Row(
        "metadata key in capitals",
        lambda c, s: s.Unary(REQUEST, timeout=LIMIT, metadata=[("Key", "v")]),
        grpc.RpcError,
        "Invalid metadata",
        grpc.StatusCode.INTERNAL,
    ),
    Row(
        "metadata value not a string",
        lambda c, s: s.Unary(REQUEST, timeout=LIMIT, metadata=[("key", 1)]),
        TypeError,
        "Expected str",
    ),
    Row(
        "client stream with no requests, negative timeout",
        lambda c, s: s.ClientStream(iter([]), timeout=-1),
        grpc.RpcError,
        "Deadline",
        DEADLINE,
    ),
    Row(
        "bidi stream with no requests, negative timeout",
        lambda c, s: list(s.BidiStream(iter([]), timeout=-1)),
        grpc.RpcError,
        "Deadline",
        DEADLINE,
    ),
    Row(
        "server says UNAVAILABLE (passes through)",
        lambda c, s: s.Unary(fail_with(grpc.StatusCode.UNAVAILABLE), timeout=LIMIT),
        grpc.RpcError,
        "failing on purpose",
        grpc.StatusCode.UNAVAILABLE,
    ),
]


@pytest.fixture(scope="module")
def quiet_channel(cluster: EchoServers) -> Iterator[poolkit.Channel]:
    """A channel the rows share: without failure accrual, so that no row's failures change
    where the next row's calls go (rows about accrual build their own)."""
    config = PoolConfig(health_check=None, failure_accrual=None)
    with poolkit.insecure_channel(cluster.target, config=config) as channel:
        yield channel


@pytest.fixture
def fresh_channel(cluster: EchoServers) -> Iterator[poolkit.Channel]:
    with poolkit.insecure_channel(cluster.target, config=PoolConfig(health_check=None)) as channel:
        yield channel


@pytest.mark.timeout(ROW_TIMEOUT)
@pytest.mark.parametrize("row", table(SYNC_CALLS))
def test_bad_call_sync(quiet_channel: poolkit.Channel, row: Row) -> None:
    stub = EchoStub(quiet_channel)
    started = time.monotonic()

    error = raised_by(lambda: row.call(quiet_channel, stub))

    assert time.monotonic() - started < LIMIT
    wait_for_idle(quiet_channel)
    check(row, error)


async def _read(call: Any) -> Any:
    return await call.read()


# (channel, stub) -> an awaitable.
AIO_CALLS = [
    Row(
        "unary negative timeout", lambda c, s: s.Unary(REQUEST, timeout=-1), grpc.aio.AioRpcError, "Deadline", DEADLINE
    ),
    Row(
        "server stream negative timeout",
        lambda c, s: _read(s.ServerStream(REQUEST, timeout=-1)),
        grpc.aio.AioRpcError,
        "Deadline",
        DEADLINE,
    ),
    Row(
        "client stream negative timeout",
        lambda c, s: s.ClientStream([REQUEST], timeout=-1),
        grpc.aio.AioRpcError,
        "Deadline",
        DEADLINE,
    ),
    Row(
        "bidi stream negative timeout",
        lambda c, s: _read(s.BidiStream([REQUEST], timeout=-1)),
        grpc.aio.AioRpcError,
        "Deadline",
        DEADLINE,
    ),
    Row(
        "unary NaN timeout",
        lambda c, s: s.Unary(REQUEST, timeout=math.nan),
        ConfigError,
        "timeout=nan: must be a number of seconds, or None",
    ),
    Row(
        "str request to a protobuf method",
        lambda c, s: s.Unary("hello", timeout=LIMIT),
        grpc.aio.AioRpcError,
        "Exception serializing request",
        grpc.StatusCode.INTERNAL,
    ),
    Row(
        "serializer that raises",
        lambda c, s: c.unary_unary(UNARY, request_serializer=serializer_that_raises)(b"", timeout=LIMIT),
        grpc.aio.AioRpcError,
        "Exception serializing request",
        grpc.StatusCode.INTERNAL,
    ),
    Row(
        "unknown method",
        lambda c, s: c.unary_unary(UNKNOWN_METHOD)(b"", timeout=LIMIT),
        grpc.aio.AioRpcError,
        "Method not found",
        grpc.StatusCode.UNIMPLEMENTED,
    ),
    Row(
        "unknown streaming method",
        lambda c, s: _read(c.unary_stream(UNKNOWN_METHOD)(b"", timeout=LIMIT)),
        grpc.aio.AioRpcError,
        "Method not found",
        grpc.StatusCode.UNIMPLEMENTED,
    ),
    Row(
        "metadata key in capitals",
        lambda c, s: s.Unary(REQUEST, timeout=LIMIT, metadata=[("Key", "v")]),
        ConfigError,
        "metadata='Key': a metadata key must be lowercase",
    ),
    Row(
        "metadata value not a string",
        lambda c, s: s.Unary(REQUEST, timeout=LIMIT, metadata=[("key", 1)]),
        TypeError,
        "Expected str",
    ),
    Row(
        "client stream with no requests, negative timeout",
        lambda c, s: s.ClientStream([], timeout=-1),
        grpc.aio.AioRpcError,
        "Deadline",
        DEADLINE,
    ),
    Row(
        "bidi stream with no requests, negative timeout",
        lambda c, s: _read(s.BidiStream([], timeout=-1)),
        grpc.aio.AioRpcError,
        "Deadline",
        DEADLINE,
    ),
    Row(
        "server says UNAVAILABLE (passes through)",
        lambda c, s: s.Unary(fail_with(grpc.StatusCode.UNAVAILABLE), timeout=LIMIT),
        grpc.aio.AioRpcError,
        "failing on purpose",
        grpc.StatusCode.UNAVAILABLE,
    ),
]


async def settled(channel: poolkit.aio.Channel) -> None:
    for _ in range(int(LIMIT / 0.01)):
        if channel.describe()["in_flight"] == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"calls still in flight after {LIMIT} s: {channel.describe()}")


async def aio_error(channel: poolkit.aio.Channel, call: Callable[..., Any]) -> BaseException:
    """What `call(channel, stub)` raised, when made or when awaited; fails if nothing."""
    try:
        await asyncio.wait_for(call(channel, EchoStub(channel)), LIMIT)
    except Exception as error:
        return error
    pytest.fail("no exception was raised")


@pytest.mark.timeout(ROW_TIMEOUT)
@pytest.mark.parametrize("row", table(AIO_CALLS))
def test_bad_call_aio(cluster: EchoServers, row: Row) -> None:
    async def body() -> BaseException:
        async with poolkit.aio.insecure_channel(cluster.target, config=PoolConfig(health_check=None)) as channel:
            try:
                return await aio_error(channel, row.call)
            finally:
                await settled(channel)

    check(row, run(body()))


# -- 7. odd timeouts never hang -------------------------------------------------------------

ODD_TIMEOUTS = {"negative": -1.0, "zero": 0.0, "NaN": math.nan, "inf": math.inf, "-inf": -math.inf, "tiny": 1e-9}


def ended_as_expected(error: BaseException | None) -> bool:
    """Answered (grpc sends a call with a timeout of 0 or 1 ns most of the time), or
    DEADLINE_EXCEEDED, as grpc ends the others; or an error naming the timeout, as poolkit
    may one day refuse a NaN one (see the "NaN timeout" rows)."""
    if error is None:
        return True
    if isinstance(error, grpc.RpcError):
        return error.code() is DEADLINE  # type: ignore[no-any-return]
    return isinstance(error, ValueError) and "timeout" in str(error)


SYNC_KINDS: dict[str, Callable[[EchoStub, float], Any]] = {
    "unary": lambda s, t: s.Unary(REQUEST, timeout=t),
    "future": lambda s, t: s.Unary.future(REQUEST, timeout=t).result(timeout=LIMIT),
    "server_stream": lambda s, t: list(s.ServerStream(REQUEST, timeout=t)),
    "client_stream": lambda s, t: s.ClientStream(iter([REQUEST]), timeout=t),
    "bidi_stream": lambda s, t: list(s.BidiStream(iter([REQUEST]), timeout=t)),
}

AIO_KINDS: dict[str, Callable[[EchoStub, float], Any]] = {
    "unary": lambda s, t: s.Unary(REQUEST, timeout=t),
    "server_stream": lambda s, t: _read(s.ServerStream(REQUEST, timeout=t)),
    "client_stream": lambda s, t: s.ClientStream([REQUEST], timeout=t),
    "bidi_stream": lambda s, t: _read(s.BidiStream([REQUEST], timeout=t)),
}


@pytest.mark.timeout(ROW_TIMEOUT)
@pytest.mark.parametrize("timeout", ODD_TIMEOUTS)
@pytest.mark.parametrize("kind", SYNC_KINDS)
def test_odd_timeout_ends_at_once_sync(quiet_channel: poolkit.Channel, kind: str, timeout: str) -> None:
    """Whatever grpc makes of the timeout, the call ends at once and nothing stays in flight."""
    stub = EchoStub(quiet_channel)
    started = time.monotonic()

    error = outcome(lambda: SYNC_KINDS[kind](stub, ODD_TIMEOUTS[timeout]))

    assert time.monotonic() - started < LIMIT
    assert ended_as_expected(error), repr(error)
    wait_for_idle(quiet_channel)


@pytest.mark.timeout(ROW_TIMEOUT)
@pytest.mark.parametrize("timeout", ODD_TIMEOUTS)
@pytest.mark.parametrize("kind", AIO_KINDS)
def test_odd_timeout_ends_at_once_aio(cluster: EchoServers, kind: str, timeout: str) -> None:
    async def body() -> BaseException | None:
        async with poolkit.aio.insecure_channel(cluster.target, config=PoolConfig(health_check=None)) as channel:
            try:
                await asyncio.wait_for(AIO_KINDS[kind](EchoStub(channel), ODD_TIMEOUTS[timeout]), LIMIT)
            except Exception as error:
                return error
            finally:
                await settled(channel)
            return None

    started = time.monotonic()
    error = run(body())

    assert time.monotonic() - started < LIMIT * 2
    assert ended_as_expected(error) or (kind in REQUEST_STREAMS and _core_race(error)), repr(error)


# grpc.aio alone does this too: a request stream whose deadline runs out while the first
# message is being written now and then ends INTERNAL "Internal error from Core" (a failed
# SendMessageOperation) instead of DEADLINE_EXCEEDED.
REQUEST_STREAMS = {"client_stream", "bidi_stream"}


def _core_race(error: BaseException | None) -> bool:
    return (
        isinstance(error, grpc.RpcError)
        and error.code() is grpc.StatusCode.INTERNAL
        and ("Internal error from Core" in str(error))
    )


# -- 8. a caller's mistake is not the endpoint's failure -------------------------------------------

# (channel, stub) -> one bad call; `bug` when poolkit counts it against the endpoint.
MISTAKES_SYNC = [
    Row("timeout a string", lambda c, s: s.Unary(REQUEST, timeout="1"), TypeError, ""),
    Row(
        "metadata value not a string",
        lambda c, s: s.Unary(REQUEST, timeout=LIMIT, metadata=[("key", 1)]),
        TypeError,
        "",
    ),
    Row(
        "metadata key in capitals",
        lambda c, s: s.Unary(REQUEST, timeout=LIMIT, metadata=[("Key", "v")]),
        grpc.RpcError,
        "",
    ),
    Row(
        "request not serialisable",
        lambda c, s: s.Unary("hello", timeout=LIMIT),
        grpc.RpcError,
        "",
    ),
    Row(
        "negative timeout (a propagated deadline already past)",
        lambda c, s: s.Unary(REQUEST, timeout=-1),
        grpc.RpcError,
        "",
    ),
    Row(
        "NaN timeout",
        lambda c, s: s.Unary(REQUEST, timeout=math.nan),
        ConfigError,
        "",
    ),
    Row(
        "future with a negative timeout",
        lambda c, s: s.Unary.future(REQUEST, timeout=-1).result(),
        grpc.RpcError,
        "",
    ),
    Row(
        "response stream with metadata in capitals",
        lambda c, s: list(s.ServerStream(REQUEST, timeout=LIMIT, metadata=[("Key", "v")])),
        grpc.RpcError,
        "",
    ),
    Row(
        "with_call with a request stream that will not serialise",
        lambda c, s: s.ClientStream.with_call(iter(["hello"]), timeout=LIMIT),
        grpc.RpcError,
        "",
    ),
    Row(
        "unknown method (the server's answer)",
        lambda c, s: c.unary_unary(UNKNOWN_METHOD)(b"", timeout=LIMIT),
        grpc.RpcError,
        "",
    ),
]

MISTAKES_AIO = [
    Row("timeout a string", lambda c, s: s.Unary(REQUEST, timeout="1"), TypeError, ""),
    Row(
        "metadata value not a string",
        lambda c, s: s.Unary(REQUEST, timeout=LIMIT, metadata=[("key", 1)]),
        TypeError,
        "",
    ),
    Row(
        "metadata key in capitals",
        lambda c, s: s.Unary(REQUEST, timeout=LIMIT, metadata=[("Key", "v")]),
        ConfigError,
        "",
    ),
    Row(
        "negative timeout (a propagated deadline already past)",
        lambda c, s: s.Unary(REQUEST, timeout=-1),
        grpc.RpcError,
        "",
    ),
    Row(
        "NaN timeout",
        lambda c, s: s.Unary(REQUEST, timeout=math.nan),
        ConfigError,
        "",
    ),
    Row(
        "unknown method (the server's answer)",
        lambda c, s: c.unary_unary(UNKNOWN_METHOD)(b"", timeout=LIMIT),
        grpc.RpcError,
        "",
    ),
]

# Two failures in a row eject an endpoint; each bad call is made this many times, enough for
# every endpoint the balancer sends them to.
ACCRUAL = PoolConfig(health_check=None, failure_accrual=FailureAccrual(consecutive_failures=2, success_rate=None))
REPEATS = 12


def ejected(snapshot: dict[str, Any]) -> list[str]:
    return [e["address"] for e in snapshot["endpoints"] if e["status"] != "healthy" or e["ejections"]]


@pytest.mark.timeout(ROW_TIMEOUT)
@pytest.mark.parametrize("row", table(MISTAKES_SYNC))
def test_a_callers_mistake_is_not_the_endpoints_failure_sync(cluster: EchoServers, row: Row) -> None:
    with poolkit.insecure_channel(cluster.target, config=ACCRUAL) as channel:
        stub = EchoStub(channel)
        stub.Unary(REQUEST, timeout=LIMIT)
        for _ in range(REPEATS):
            check(row, raised_by(lambda: row.call(channel, stub)))
        wait_for_idle(channel)
        snapshot = channel.describe()

    assert not ejected(snapshot), f"ejected for the caller's mistake: {ejected(snapshot)}"


@pytest.mark.timeout(ROW_TIMEOUT)
@pytest.mark.parametrize("row", table(MISTAKES_AIO))
def test_a_callers_mistake_is_not_the_endpoints_failure_aio(cluster: EchoServers, row: Row) -> None:
    async def body() -> dict[str, Any]:
        async with poolkit.aio.insecure_channel(cluster.target, config=ACCRUAL) as channel:
            await EchoStub(channel).Unary(REQUEST, timeout=LIMIT)
            for _ in range(REPEATS):
                check(row, await aio_error(channel, row.call))
            await settled(channel)
            return channel.describe()

    snapshot = run(body())

    assert not ejected(snapshot), f"ejected for the caller's mistake: {ejected(snapshot)}"


@pytest.mark.timeout(ROW_TIMEOUT)
def test_a_servers_failure_does_eject(cluster: EchoServers) -> None:
    """The control for the two tests above: the same check sees a real server failure."""
    with poolkit.insecure_channel(cluster.target, config=ACCRUAL) as channel:
        stub = EchoStub(channel)
        for _ in range(REPEATS):
            raised_by(lambda: stub.Unary(fail_with(grpc.StatusCode.UNAVAILABLE), timeout=LIMIT))
        wait_for_idle(channel)

        assert ejected(channel.describe())


# -- 9. after close, and bad arguments to close and subscribe -------------------------------------------

CLOSED_SYNC: dict[str, Callable[[EchoStub], Any]] = {
    "unary": lambda s: s.Unary(REQUEST, timeout=LIMIT),
    "with_call": lambda s: s.Unary.with_call(REQUEST, timeout=LIMIT),
    "future": lambda s: s.Unary.future(REQUEST, timeout=LIMIT).result(timeout=LIMIT),
    "server_stream": lambda s: list(s.ServerStream(REQUEST, timeout=LIMIT)),
    "client_stream": lambda s: s.ClientStream(iter([REQUEST]), timeout=LIMIT),
    "bidi_stream": lambda s: list(s.BidiStream(iter([REQUEST]), timeout=LIMIT)),
}


@pytest.mark.timeout(ROW_TIMEOUT)
@pytest.mark.parametrize("kind", CLOSED_SYNC)
def test_call_after_close_sync(cluster: EchoServers, kind: str) -> None:
    channel = poolkit.insecure_channel(cluster.target)
    channel.close()

    error = raised_by(lambda: CLOSED_SYNC[kind](EchoStub(channel)))

    check(Row(kind, print, PoolClosedError, "is closed", grpc.StatusCode.UNAVAILABLE), error)


CLOSED_AIO: dict[str, Callable[[EchoStub], Any]] = {
    "unary": lambda s: s.Unary(REQUEST, timeout=LIMIT),
    "server_stream": lambda s: _read(s.ServerStream(REQUEST, timeout=LIMIT)),
    "client_stream": lambda s: s.ClientStream([REQUEST], timeout=LIMIT),
    "bidi_stream": lambda s: _read(s.BidiStream([REQUEST], timeout=LIMIT)),
}


@pytest.mark.timeout(ROW_TIMEOUT)
@pytest.mark.parametrize("kind", CLOSED_AIO)
def test_call_after_close_aio(cluster: EchoServers, kind: str) -> None:
    async def body() -> BaseException:
        channel = poolkit.aio.insecure_channel(cluster.target)
        await channel.close()
        return await aio_error(channel, lambda c, s: CLOSED_AIO[kind](s))

    error = run(body())

    check(Row(kind, print, poolkit.aio.AioPoolClosedError, "is closed", grpc.StatusCode.UNAVAILABLE), error)
    assert isinstance(error, PoolClosedError)
    assert isinstance(error, grpc.aio.AioRpcError)


def health_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name.startswith("poolkit-")}


@pytest.mark.timeout(ROW_TIMEOUT)
@pytest.mark.parametrize("grace", [0.0, 0, None])
def test_close_with_no_grace_closes_at_once_sync(cluster: EchoServers, grace: float | None) -> None:
    """No grace (zero or None): close() cancels the call in flight and closes everything."""
    before = health_threads()
    channel = poolkit.insecure_channel(cluster.target)
    slow = EchoStub(channel).Unary.future(EchoRequest(delay_ms=4000), timeout=LIMIT)
    wait_until(lambda: channel.describe()["in_flight"] == 1, "the slow call to be in flight")

    channel.close(grace)

    failed = outcome(lambda: slow.result(timeout=LIMIT))
    assert isinstance(failed, grpc.RpcError), failed
    assert failed.code() is grpc.StatusCode.CANCELLED, failed
    wait_until(lambda: not health_threads() - before, "the channel's health threads to end")


@pytest.mark.timeout(ROW_TIMEOUT)
@pytest.mark.parametrize(
    "grace", ["1", -1.0, math.nan, math.inf, 10**400], ids=["a string", "negative", "NaN", "inf", "10**400"]
)
def test_close_with_a_bad_grace_is_refused_and_closes_nothing_sync(cluster: EchoServers, grace: Any) -> None:
    """A bad grace is refused, naming it, before anything is closed: the channel still
    works, and a close() after it closes everything."""
    before = health_threads()
    channel = poolkit.insecure_channel(cluster.target)
    try:
        error = raised_by(lambda: channel.close(grace))
        EchoStub(channel).Unary(REQUEST, timeout=LIMIT)
        channel.close()

        assert isinstance(error, ConfigError), repr(error)
        assert error.name == "grace"
        wait_until(lambda: not health_threads() - before, "the channel's health threads to end", limit=2.0)
    finally:
        _force_close(channel)


def _force_close(channel: poolkit.Channel) -> None:
    """Close what close() left open, through poolkit's internals, so grpc's threads do
    not outlive the test and fail noisily when the channel is collected."""
    channel._stop_background()
    for route in channel._pool.routes:
        channel._close_route(route)


def _closed(channel: poolkit.aio.Channel) -> bool:
    """Whether every grpc channel of the pool is shut down (the pool's own view says only 'closed')."""
    return all(slot.channel.get_state() is grpc.ChannelConnectivity.SHUTDOWN for slot in channel._pool.slots)


@pytest.mark.timeout(ROW_TIMEOUT)
@pytest.mark.parametrize(
    "grace", [-1.0, "1", math.nan, math.inf, 0.0], ids=["negative", "a string", "NaN", "inf", "zero"]
)
def test_close_with_an_odd_grace_closes_aio(cluster: EchoServers, grace: Any) -> None:
    """As for the sync channel: close() with a bad grace is refused, naming it (zero cancels
    the call in flight at once), and a close() after it closes every connection."""

    async def body() -> None:
        channel = poolkit.aio.insecure_channel(cluster.target)
        stream = EchoStub(channel).BidiStream(timeout=2 * LIMIT)
        try:
            await stream.write(REQUEST)
            await stream.read()  # in flight, and the server waits for more
            refused = await _refusal(asyncio.wait_for(channel.close(grace), 3.0))
            if grace == 0.0:
                assert refused is None
            else:
                assert isinstance(refused, ConfigError), repr(refused)
                assert refused.name == "grace"
            await channel.close()
            assert _closed(channel), "a grpc channel of the pool is still open"
        finally:
            await _force_close_aio(channel, stream)

    run(body())


async def _refusal(awaitable: Any) -> BaseException | None:
    """The ValueError or TypeError `awaitable` raised, or None if it returned."""
    try:
        await awaitable
    except (ValueError, TypeError) as error:
        return error
    return None


async def _force_close_aio(channel: poolkit.aio.Channel, stream: Any) -> None:
    """Close what close() left open, through poolkit's internals, while the event loop
    still runs: grpc.aio objects collected after their loop closed fail noisily, and
    have been seen to upset the interpreter's AST recursion check in later tests."""
    stream.cancel()
    grpc_channels = [slot.channel for slot in channel._pool.slots]
    grpc_channels += list(channel._health_channels.values())
    await asyncio.gather(*(grpc_channel.close(None) for grpc_channel in grpc_channels), return_exceptions=True)
    gc.collect()


def test_subscribe_a_callback_that_is_not_callable(fresh_channel: poolkit.Channel) -> None:
    try:
        error = raised_by(lambda: fresh_channel.subscribe(None))  # type: ignore[arg-type]

        assert isinstance(error, ConfigError)
        assert "callback=None: must be callable" in str(error)
        assert None not in fresh_channel._subscribers, "None stayed subscribed"
    finally:
        fresh_channel.unsubscribe(None)  # type: ignore[arg-type]
