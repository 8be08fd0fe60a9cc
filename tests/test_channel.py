"""poolkit.Channel against real echo servers on loopback: connections, in-flight
accounting on every way a call can end, describe(), close(), weights, balancing and
the errors raised for bad targets and configuration."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from _support import wait_for_idle, wait_until

import poolkit
from poolkit import ConfigError, PoolClosedError, PoolConfig, PoolkitError
from poolkit.testing import EchoRequest, EchoServers, EchoStub, spawn_echo_servers

WAIT = 5.0
REQUEST = EchoRequest(payload=b"x")


@pytest.fixture
def channel(cluster: EchoServers) -> Iterator[poolkit.Channel]:
    with poolkit.insecure_channel(cluster.target) as opened:
        yield opened


@pytest.fixture
def stub(channel: poolkit.Channel) -> EchoStub:
    return EchoStub(channel)


def run_concurrently(call: Callable[[], Any], count: int, workers: int) -> list[Any]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda _: call(), range(count)))


def _fail(code: grpc.StatusCode, details: str = "failed on purpose") -> EchoRequest:
    return EchoRequest(fail_code=code.value[0], fail_details=details)


def totals(snapshot: dict[str, Any]) -> tuple[int, int]:
    endpoints = snapshot["endpoints"]
    return sum(e["calls"] for e in endpoints), sum(e["errors"] for e in endpoints)


# -- connections ------------------------------------------------------------------------------


@pytest.mark.parametrize("per_endpoint", [1, 2])
def test_connections_per_endpoint(servers: EchoServers, per_endpoint: int) -> None:
    config = PoolConfig(connections_per_endpoint=per_endpoint)
    with poolkit.insecure_channel(servers.target, config=config) as channel:
        stub = EchoStub(channel)
        run_concurrently(lambda: stub.Unary(REQUEST, timeout=WAIT), count=1000, workers=16)
        snapshot = channel.describe()

    peers = [server.peers for server in servers]
    assert [len(p) for p in peers] == [per_endpoint] * 4, peers
    assert len(set().union(*peers)) == 4 * per_endpoint
    calls = [server.calls for server in servers]
    assert sum(calls) == 1000
    assert min(calls) >= 50, f"every endpoint should serve a share: {calls}"
    assert [e["calls"] for e in snapshot["endpoints"]] == calls
    assert all(slot["calls"] > 0 for e in snapshot["endpoints"] for slot in e["slots"])


def test_connect_on_start_opens_every_slot(cluster: EchoServers) -> None:
    config = PoolConfig(connections_per_endpoint=2)
    with poolkit.insecure_channel(cluster.target, config=config) as channel:
        wait_until(
            lambda: all(s["state"] == "ready" for e in channel.describe()["endpoints"] for s in e["slots"]),
            lambda: f"every slot to connect without a call: {channel.describe()}",
        )
        snapshot = channel.describe()

    assert snapshot["state"] == "ready"
    assert totals(snapshot) == (0, 0)


def test_channel_options_reach_grpc(cluster: EchoServers) -> None:
    options = [("grpc.primary_user_agent", "poolkit-tests/1.0")]
    with poolkit.insecure_channel(cluster.target, options=options) as channel:
        response = EchoStub(channel).Unary(REQUEST, timeout=WAIT)

    assert response.metadata["user-agent"].startswith("poolkit-tests/1.0")


# -- in-flight accounting on every exit path ----------------------------------------------------


def _success(stub: EchoStub) -> None:
    assert stub.Unary(REQUEST, timeout=WAIT).payload == b"x"


def _with_call(stub: EchoStub) -> None:
    assert stub.Unary.with_call(REQUEST, timeout=WAIT)[1].code() is grpc.StatusCode.OK


def _server_error(stub: EchoStub) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub.Unary(_fail(grpc.StatusCode.NOT_FOUND), timeout=WAIT)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND


def _deadline(stub: EchoStub) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub.Unary(EchoRequest(delay_ms=300), timeout=0.05)
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def _future_result(stub: EchoStub) -> None:
    assert stub.Unary.future(REQUEST, timeout=WAIT).result(timeout=WAIT).payload == b"x"


def _future_error(stub: EchoStub) -> None:
    error = stub.Unary.future(_fail(grpc.StatusCode.INTERNAL), timeout=WAIT).exception(timeout=WAIT)
    assert error.code() is grpc.StatusCode.INTERNAL


def _future_deadline(stub: EchoStub) -> None:
    error = stub.Unary.future(EchoRequest(delay_ms=300), timeout=0.05).exception(timeout=WAIT)
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def _future_cancel(stub: EchoStub) -> None:
    future = stub.Unary.future(EchoRequest(delay_ms=1000), timeout=WAIT)
    assert future.cancel()


def _stream_read(stub: EchoStub) -> None:
    assert len(list(stub.ServerStream(EchoRequest(repeat=5), timeout=WAIT))) == 5


def _stream_cancelled(stub: EchoStub) -> None:
    responses = stub.ServerStream(EchoRequest(repeat=1000, delay_ms=5), timeout=WAIT)
    next(responses)
    assert responses.cancel()


def _stream_abandoned(stub: EchoStub) -> None:
    responses = stub.ServerStream(EchoRequest(repeat=1000, delay_ms=5), timeout=WAIT)
    next(responses)
    del responses  # dropped while the server is still streaming
    gc.collect()


def _stream_deadline(stub: EchoStub) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.ServerStream(EchoRequest(repeat=100, delay_ms=20), timeout=0.1))
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def _failing_requests() -> Iterator[EchoRequest]:
    yield REQUEST
    raise RuntimeError("the request source failed")


def _client_stream(stub: EchoStub) -> None:
    assert stub.ClientStream(iter([REQUEST, REQUEST]), timeout=WAIT).payload == b"xx"


def _client_stream_requests_raise(stub: EchoStub) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub.ClientStream(_failing_requests(), timeout=WAIT)
    assert raised.value.code() is grpc.StatusCode.UNKNOWN


def _client_stream_future_requests_raise(stub: EchoStub) -> None:
    error = stub.ClientStream.future(_failing_requests(), timeout=WAIT).exception(timeout=WAIT)
    assert error.code() is grpc.StatusCode.UNKNOWN


def _bidi_read(stub: EchoStub) -> None:
    assert len(list(stub.BidiStream(iter([REQUEST] * 3), timeout=WAIT))) == 3


def _bidi_requests_raise(stub: EchoStub) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.BidiStream(_failing_requests(), timeout=WAIT))
    assert raised.value.code() is grpc.StatusCode.UNKNOWN


def _bidi_abandoned(stub: EchoStub) -> None:
    responses = stub.BidiStream(iter([EchoRequest(delay_ms=5)] * 1000), timeout=WAIT)
    next(responses)
    del responses
    gc.collect()


@dataclasses.dataclass(frozen=True)
class ExitPath:
    run: Callable[[EchoStub], None]
    blocking: bool  # blocking calls release before they return, the rest from grpc's callback
    errors: int | None  # None where whether it counts as an error is a policy, not a fact


EXIT_PATHS = {
    "success": ExitPath(_success, blocking=True, errors=0),
    "with_call": ExitPath(_with_call, blocking=True, errors=0),
    "server_error": ExitPath(_server_error, blocking=True, errors=1),
    "deadline": ExitPath(_deadline, blocking=True, errors=1),
    "future_result": ExitPath(_future_result, blocking=False, errors=0),
    "future_error": ExitPath(_future_error, blocking=False, errors=1),
    "future_deadline": ExitPath(_future_deadline, blocking=False, errors=1),
    "future_cancel": ExitPath(_future_cancel, blocking=False, errors=None),
    "stream_read": ExitPath(_stream_read, blocking=False, errors=0),
    "stream_cancelled": ExitPath(_stream_cancelled, blocking=False, errors=None),
    "stream_abandoned": ExitPath(_stream_abandoned, blocking=False, errors=None),
    "stream_deadline": ExitPath(_stream_deadline, blocking=False, errors=1),
    "client_stream": ExitPath(_client_stream, blocking=True, errors=0),
    "client_stream_requests_raise": ExitPath(_client_stream_requests_raise, blocking=True, errors=1),
    "client_stream_future_requests_raise": ExitPath(_client_stream_future_requests_raise, blocking=False, errors=1),
    "bidi_read": ExitPath(_bidi_read, blocking=False, errors=0),
    "bidi_requests_raise": ExitPath(_bidi_requests_raise, blocking=False, errors=1),
    "bidi_abandoned": ExitPath(_bidi_abandoned, blocking=False, errors=None),
}


@pytest.mark.parametrize("path", EXIT_PATHS)
def test_in_flight_returns_to_zero(channel: poolkit.Channel, stub: EchoStub, path: str) -> None:
    exit_path = EXIT_PATHS[path]

    exit_path.run(stub)

    if exit_path.blocking:
        assert channel.describe()["in_flight"] == 0
    else:
        wait_for_idle(channel)
    snapshot = channel.describe()
    calls, errors = totals(snapshot)
    assert calls == 1, snapshot
    if exit_path.errors is not None:
        assert errors == exit_path.errors, snapshot
    for endpoint in snapshot["endpoints"]:
        assert endpoint["in_flight"] == 0
        assert all(slot["in_flight"] == 0 for slot in endpoint["slots"])


def test_in_flight_counts_calls_still_running(channel: poolkit.Channel, stub: EchoStub) -> None:
    futures = [stub.Unary.future(EchoRequest(delay_ms=2000), timeout=WAIT) for _ in range(3)]
    stream = stub.ServerStream(EchoRequest(repeat=1000, delay_ms=5), timeout=WAIT)

    assert channel.describe()["in_flight"] == 4
    assert "in_flight=4" in repr(channel)

    for call in (stream, *futures):
        assert call.cancel()
    wait_for_idle(channel)


# -- describe ---------------------------------------------------------------------------------


def test_describe_is_json_and_counts_what_was_done(servers: EchoServers) -> None:
    with poolkit.insecure_channel(servers.target) as channel:
        stub = EchoStub(channel)
        for _ in range(12):
            _success(stub)
        for _ in range(3):
            _server_error(stub)
        for _ in range(2):
            _deadline(stub)
        _future_result(stub)
        _stream_read(stub)
        _client_stream(stub)
        _bidi_read(stub)
        wait_for_idle(channel)
        snapshot = channel.describe()

    assert json.loads(json.dumps(snapshot)) == snapshot
    assert snapshot["target"] == servers.target
    assert snapshot["balancer"] == "p2c_peak_ewma"
    assert snapshot["state"] == "ready"
    assert snapshot["in_flight"] == 0
    assert totals(snapshot) == (21, 5)
    endpoints = snapshot["endpoints"]
    assert [e["address"] for e in endpoints] == servers.addresses
    assert [e["authority"] for e in endpoints] == servers.addresses
    for endpoint, server in zip(endpoints, servers, strict=True):
        assert endpoint["calls"] == server.calls  # the server counts every call that reached it
        assert endpoint["weight"] == 1.0
        assert endpoint["in_flight"] == 0
        assert endpoint["ewma_ms"] >= 0
        assert endpoint["load"] >= 0
        assert [s["index"] for s in endpoint["slots"]] == [0]
        assert sum(s["calls"] for s in endpoint["slots"]) == endpoint["calls"]
        assert sum(s["errors"] for s in endpoint["slots"]) == endpoint["errors"]


def test_describe_after_close(channel: poolkit.Channel) -> None:
    channel.close()

    assert channel.describe()["state"] == "closed"
    assert "closed" in repr(channel)


# -- close ------------------------------------------------------------------------------------

CALL_KINDS: dict[str, Callable[[EchoStub], Any]] = {
    "unary": lambda stub: stub.Unary(REQUEST, timeout=WAIT),
    "unary_with_call": lambda stub: stub.Unary.with_call(REQUEST, timeout=WAIT),
    "unary_future": lambda stub: stub.Unary.future(REQUEST, timeout=WAIT).result(timeout=WAIT),
    "server_stream": lambda stub: list(stub.ServerStream(REQUEST, timeout=WAIT)),
    "client_stream": lambda stub: stub.ClientStream(iter([REQUEST]), timeout=WAIT),
    "client_stream_future": lambda stub: stub.ClientStream.future(iter([REQUEST]), timeout=WAIT).result(timeout=WAIT),
    "bidi_stream": lambda stub: list(stub.BidiStream(iter([REQUEST]), timeout=WAIT)),
}


@pytest.mark.parametrize("kind", CALL_KINDS)
def test_calls_after_close_raise_pool_closed(channel: poolkit.Channel, stub: EchoStub, kind: str) -> None:
    stub.Unary(REQUEST, timeout=WAIT)
    channel.close()

    with pytest.raises(PoolClosedError) as raised:
        CALL_KINDS[kind](stub)

    error = raised.value
    assert isinstance(error, grpc.RpcError)
    assert isinstance(error, PoolkitError)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "closed" in error.details()
    assert channel.describe()["in_flight"] == 0


def test_close_is_idempotent(channel: poolkit.Channel, stub: EchoStub) -> None:
    stub.Unary(REQUEST, timeout=WAIT)

    channel.close()
    channel.close()
    channel.close(grace=1.0)
    with channel:
        pass

    with pytest.raises(PoolClosedError):
        stub.Unary(REQUEST, timeout=WAIT)


def test_close_with_grace_lets_in_flight_call_finish(channel: poolkit.Channel, stub: EchoStub) -> None:
    future = stub.Unary.future(EchoRequest(payload=b"slow", delay_ms=200), timeout=WAIT)

    channel.close(grace=WAIT)

    assert future.result(timeout=WAIT).payload == b"slow"
    assert channel.describe()["in_flight"] == 0
    with pytest.raises(PoolClosedError):
        stub.Unary(REQUEST, timeout=WAIT)


def test_close_with_grace_lets_blocking_call_finish(channel: poolkit.Channel, stub: EchoStub) -> None:
    with ThreadPoolExecutor(max_workers=1) as pool:
        blocking = pool.submit(stub.Unary, EchoRequest(payload=b"slow", delay_ms=500), timeout=WAIT)
        wait_until(lambda: channel.describe()["in_flight"] == 1, "the blocking call to start")

        channel.close(grace=WAIT)

        assert blocking.result(timeout=WAIT).payload == b"slow"


@pytest.mark.parametrize("grace", [None, 0.05], ids=["no_grace", "grace_expires"])
def test_close_cancels_calls_still_running(channel: poolkit.Channel, stub: EchoStub, grace: float | None) -> None:
    future = stub.Unary.future(EchoRequest(delay_ms=1000), timeout=WAIT)

    channel.close(grace=grace)

    assert future.exception(timeout=WAIT).code() is grpc.StatusCode.CANCELLED
    wait_for_idle(channel)


def test_dropped_channel_is_collected(cluster: EchoServers) -> None:
    channel = poolkit.insecure_channel(cluster.target)
    EchoStub(channel).Unary(REQUEST, timeout=WAIT)
    dropped = weakref.ref(channel)
    del channel

    try:
        wait_until(
            lambda: gc.collect() >= 0 and dropped() is None,
            "a poolkit channel dropped without close() to be garbage collected (its connections stay open)",
        )
    finally:
        leaked = dropped()
        if leaked is not None:
            leaked.close()


def _sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed since the listing (its own descriptor, or grpc's)
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def test_dropped_channels_close_their_connections_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropped without close(), a channel's connections are closed as close() would: grpc's
    connectivity pollers stop first, so none dies with "Cannot monitor channel state", and
    their threads and sockets are all given back. (Servers in another process, so that
    every thread and socket counted here is the client's.)"""
    died: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    with spawn_echo_servers(2) as spawned:
        gc.collect()
        threads, sockets = threading.active_count(), _sockets()
        drop_channels(spawned.target)
        wait_until(
            # At most: the module's in-process servers may close connections of earlier tests.
            lambda: threading.active_count() <= threads and _sockets() <= sockets,
            f"threads ({threads}) and sockets ({sockets}) given back by dropped channels",
        )
    assert died == []


def drop_channels(target: str) -> None:
    for round_ in range(6):
        config = PoolConfig(connections_per_endpoint=2)
        channels = [poolkit.insecure_channel(target, config=config) for _ in range(3)]
        for channel in channels:
            EchoStub(channel).Unary(REQUEST, timeout=WAIT)
        time.sleep(0.03 * round_)  # catch the pollers at different points of their 0.2 s cycle
        del channels, channel
        gc.collect()


def test_a_pool_with_no_connection_names_why_each_failed() -> None:
    """Nothing listens on the port: the pool learns grpc's reason for each failed connect
    and its own fast error names it."""
    with socket.socket() as placeholder:  # a port nobody listens on: bound, never listening
        placeholder.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{placeholder.getsockname()[1]}"
        config = PoolConfig(health_check=None, retry=None)
        with poolkit.insecure_channel(target, config=config) as channel:
            wait_until(
                lambda: channel.describe()["endpoints"][0]["connect_error"],
                lambda: f"the pool to learn why the connection failed: {channel.describe()['endpoints']}",
            )
            with pytest.raises(PoolkitError) as raised:
                EchoStub(channel).Unary(REQUEST, timeout=WAIT)

    details = raised.value.details()  # type: ignore[attr-defined]
    assert f"every endpoint is unavailable ({target} failing to connect: " in details, details
    assert "Connection refused" in details, details


# -- balancing end to end -------------------------------------------------------------------------


# One call at a time leaves every least-loaded load at 0, so the share is the weighted draw
# alone. Peak EWMA's picks follow real latency noise here; its weighting is checked in
# test_core, where the loads can be held equal.
@pytest.mark.parametrize("balancer", ["round_robin", "p2c_least_loaded"])
def test_weights_are_honoured(servers: EchoServers, balancer: str) -> None:
    heavy, light = servers[0], servers[1]
    config = PoolConfig(balancer=balancer, weights={heavy.address: 3.0})
    with poolkit.insecure_channel([heavy.address, light.address], config=config) as channel:
        stub = EchoStub(channel)
        for _ in range(600):
            stub.Unary(REQUEST, timeout=WAIT)
        weights = [e["weight"] for e in channel.describe()["endpoints"]]

    assert weights == [3.0, 1.0]
    if balancer == "round_robin":
        assert (heavy.calls, light.calls) == (450, 150)  # smooth weighted round robin is exact
    else:
        share = heavy.calls / 600
        assert 0.65 < share < 0.85, f"weight 3 of 4 should get ~75% of calls, got {heavy.calls}:{light.calls}"


@pytest.mark.parametrize(("balancer", "low", "high"), [("round_robin", 0.20, 0.30), ("p2c_peak_ewma", 0.0, 0.10)])
def test_slow_endpoint_share(servers: EchoServers, balancer: str, low: float, high: float) -> None:
    slow = servers[3]
    slow.delay = 0.020
    with poolkit.insecure_channel(servers.target, config=PoolConfig(balancer=balancer)) as channel:
        stub = EchoStub(channel)
        run_concurrently(lambda: stub.Unary(REQUEST, timeout=WAIT), count=800, workers=8)

    calls = [server.calls for server in servers]
    assert sum(calls) == 800
    assert low <= slow.calls / 800 <= high, f"{balancer}: calls per endpoint {calls}, the last is 20 ms slower"


# -- configuration errors -------------------------------------------------------------------------

BAD_TARGETS = {
    "empty string": "",
    "blank string": "   ",
    "empty list": [],
    "empty entry": ["127.0.0.1:50051", ""],
    "not strings": [50051],
    "bytes": b"127.0.0.1:50051",
    "port 0": "127.0.0.1:0",
    "port 70000": "127.0.0.1:70000",
    "port not a number": "localhost:http",
    "unix scheme": "unix:/tmp/socket",
    "xds scheme": "xds:///service",
    "unresolvable": "no-such-host.invalid:50051",
    "ipv4 name": "ipv4:not-an-ip:1",
    "ipv4 nothing": "ipv4:",
    "dns authority": "dns://8.8.8.8/localhost:50051",
    "bare ipv6": "::1:50051",
    "unclosed bracket": "[::1:50051",
}


@pytest.mark.parametrize("target", BAD_TARGETS.values(), ids=BAD_TARGETS.keys())
def test_bad_target_raises_config_error(target: Any) -> None:
    with pytest.raises(ConfigError) as raised:
        poolkit.insecure_channel(target)

    assert isinstance(raised.value, ValueError)
    assert isinstance(raised.value, PoolkitError)
    assert raised.value.name == "target"
    assert str(raised.value).startswith(f"target={target!r}")


BAD_CONFIG: list[tuple[str, Any]] = [
    ("balancer", "random"),
    ("balancer", None),
    ("connections_per_endpoint", 0),
    ("connections_per_endpoint", 65),
    ("connections_per_endpoint", 1.5),
    ("connections_per_endpoint", True),
    ("connections_per_endpoint", "2"),
    ("ewma_decay", 0),
    ("ewma_decay", -1.0),
    ("ewma_decay", math.inf),
    ("ewma_decay", math.nan),
    ("ewma_decay", "10"),
    ("initial_rtt", 0.0),
    ("initial_rtt", True),
    ("connect_on_start", "yes"),
    ("connect_on_start", 1),
    ("weights", [("127.0.0.1:50051", 2.0)]),
    ("weights", {"": 2.0}),
    ("weights", {50051: 2.0}),
    ("weights", {"127.0.0.1:50051": 0}),
    ("weights", {"127.0.0.1:50051": -2.0}),
    ("weights", {"127.0.0.1:50051": math.nan}),
    ("weights", {"127.0.0.1:50051": "3"}),
]


@pytest.mark.parametrize(("field", "value"), BAD_CONFIG, ids=[f"{f}={v!r}" for f, v in BAD_CONFIG])
def test_bad_config_raises_config_error_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError) as raised:
        PoolConfig(**{field: value})

    error = raised.value
    assert isinstance(error, ValueError)
    assert error.name.startswith(field)
    assert str(error).startswith(f"{error.name}=")
    assert repr(error.value) in str(error)


def test_config_is_frozen_keyword_only_and_revalidated_on_replace() -> None:
    weights = {"127.0.0.1:50051": 2.0}
    config = PoolConfig(balancer="round_robin", weights=weights)
    weights["127.0.0.1:50051"] = 5.0

    assert config.weights == {"127.0.0.1:50051": 2.0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.balancer = "p2c_peak_ewma"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.weights["127.0.0.1:50051"] = 9.0  # type: ignore[index]
    with pytest.raises(TypeError):
        PoolConfig("round_robin")  # type: ignore[misc]
    assert dataclasses.replace(config, connections_per_endpoint=3).connections_per_endpoint == 3
    with pytest.raises(ConfigError, match="connections_per_endpoint"):
        dataclasses.replace(config, connections_per_endpoint=0)


BAD_CHANNEL_ARGUMENTS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "config not a PoolConfig": ("config", lambda t: poolkit.insecure_channel(t, config={"balancer": "round_robin"})),
    "option not a pair": ("options", lambda t: poolkit.insecure_channel(t, options=[("grpc.primary_user_agent",)])),
    "option name not a string": ("options", lambda t: poolkit.insecure_channel(t, options=[(1, 2)])),
    "options a string": ("options", lambda t: poolkit.insecure_channel(t, options="grpc.lb_policy_name")),
    "credentials not credentials": ("credentials", lambda t: poolkit.secure_channel(t, "tls")),
}


@pytest.mark.parametrize("case", BAD_CHANNEL_ARGUMENTS)
def test_bad_channel_arguments_raise_config_error(cluster: EchoServers, case: str) -> None:
    field, build = BAD_CHANNEL_ARGUMENTS[case]

    with pytest.raises(ConfigError) as raised:
        build(cluster.target)

    assert raised.value.name == field
    assert str(raised.value).startswith(f"{field}=")
