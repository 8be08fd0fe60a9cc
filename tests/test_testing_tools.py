"""poolkit.testing's fault tools on real sockets: servers on given ports, restarts,
failing on purpose, and the fault proxy. Plain grpc channels throughout, so these tools
are checked apart from poolkit."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import pytest
from _support import WAIT_LIMIT, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from poolkit.testing import (
    FAIL_DETAILS,
    EchoRequest,
    EchoServer,
    EchoStub,
    FaultProxy,
    SpawnedEchoServers,
    StatsRequest,
    spawn_echo_servers,
    start_echo_servers,
)

# grpc shares one connection among channels to the same address; each channel here
# must have its own, as separate clients would.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def _channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=OWN_CONNECTION)


def _echo(channel: grpc.Channel, timeout: float = WAIT_LIMIT, wait_for_ready: bool | None = None) -> str:
    return EchoStub(channel).Unary(EchoRequest(payload=b"x"), timeout=timeout, wait_for_ready=wait_for_ready).server_id


def _serves(channel: grpc.Channel) -> bool:
    """Whether a call on `channel` succeeds now: a call sent just after a reset may still go
    out on the dead connection before the client has seen the RST."""
    try:
        _echo(channel, timeout=1.0, wait_for_ready=True)
    except grpc.RpcError:
        return False
    return True


def _code_of(call: Callable[[], object]) -> grpc.StatusCode:
    """The status code a call that must fail failed with."""
    with pytest.raises(grpc.RpcError) as failure:
        call()
    return failure.value.code()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture
def server() -> Iterator[EchoServer]:
    echo = EchoServer()
    yield echo
    echo.stop()


@pytest.fixture
def proxy(server: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy(server.address) as fault_proxy:
        yield fault_proxy


def _proxy_threads(proxy: FaultProxy) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith(f"poolkit-fault-proxy-{proxy.port}")]


# -- servers on given ports, restarts ---------------------------------------------------


def test_a_server_listens_on_the_port_it_is_given_again_after_the_last_one_stopped() -> None:
    first = EchoServer()
    with _channel(first.address) as channel:
        _echo(channel)  # a connection, left in TIME_WAIT by the stop
    first.stop()
    second = EchoServer(port=first.port)
    try:
        assert second.address == first.address
        with _channel(second.address) as channel:
            assert _echo(channel) == second.address
    finally:
        second.stop()


def test_a_port_held_by_a_live_server_is_not_shared(server: EchoServer) -> None:
    with pytest.raises(OSError, match=str(server.port)):
        EchoServer(port=server.port)


def test_start_echo_servers_listens_on_the_ports_given() -> None:
    with start_echo_servers(2) as chosen:
        ports = [chosen[0].port]
    with start_echo_servers(2, ports=ports) as servers:
        assert servers[0].port == ports[0]
        assert servers[1].port not in (0, ports[0])
    with pytest.raises(ValueError, match="3 ports given for 2 servers"):
        start_echo_servers(2, ports=[0, 0, 0])


@pytest.fixture
def spawned() -> Iterator[SpawnedEchoServers]:
    with spawn_echo_servers(1) as servers:
        yield servers


def test_spawned_servers_listen_on_the_ports_given(spawned: SpawnedEchoServers) -> None:
    address = spawned.addresses[0]
    spawned.stop()
    with spawn_echo_servers(1, ports=[int(address.rpartition(":")[2])]) as again:
        assert again.addresses == [address]
        assert [stat.calls for stat in again.stats()] == [0]


def test_restart_after_kill_serves_again_on_the_same_address(spawned: SpawnedEchoServers) -> None:
    address, first_pid = spawned.addresses[0], spawned.pid
    with _channel(address) as channel:
        _echo(channel)
        spawned.kill()
        assert _code_of(lambda: _echo(channel)) == grpc.StatusCode.UNAVAILABLE
    spawned.restart()
    assert spawned.addresses == [address]
    assert spawned.pid != first_pid
    assert spawned.process.poll() is None
    with _channel(address) as channel:
        assert _echo(channel) == "echo-0"
    assert [stat.calls for stat in spawned.stats()] == [1]  # the new process counts from zero


def test_restart_after_stop_and_while_running(spawned: SpawnedEchoServers) -> None:
    address = spawned.addresses[0]
    spawned.stop()
    spawned.restart()
    running = spawned.process
    spawned.restart()  # kills the running child first
    assert running.poll() is not None
    assert spawned.process is not running
    with _channel(address) as channel:
        assert _echo(channel) == "echo-0"


# -- failing on purpose --------------------------------------------------------------------


def _requests() -> Iterator[EchoRequest]:
    yield EchoRequest(payload=b"a")
    yield EchoRequest(payload=b"b")


def test_fail_code_fails_every_echo_call_but_not_stats_or_health(server: EchoServer) -> None:
    server.fail_code = grpc.StatusCode.UNAVAILABLE
    assert server.fail_code is grpc.StatusCode.UNAVAILABLE
    with _channel(server.address) as channel:
        stub = EchoStub(channel)
        calls: dict[str, Callable[[], object]] = {
            "unary": lambda: stub.Unary(EchoRequest(), timeout=WAIT_LIMIT),
            "server stream": lambda: list(stub.ServerStream(EchoRequest(repeat=2), timeout=WAIT_LIMIT)),
            "client stream": lambda: stub.ClientStream(_requests(), timeout=WAIT_LIMIT),
            "bidi stream": lambda: list(stub.BidiStream(_requests(), timeout=WAIT_LIMIT)),
        }
        for kind, call in calls.items():
            with pytest.raises(grpc.RpcError) as failure:
                call()
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE, kind
            assert failure.value.details() == FAIL_DETAILS, kind

        assert stub.Stats(StatsRequest(), timeout=WAIT_LIMIT).calls == 4  # failed calls count as arrived
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=WAIT_LIMIT)
        assert check.status == health_pb2.HealthCheckResponse.SERVING

        server.fail_code = None
        assert _echo(channel) == server.address


def test_fail_next_fails_exactly_that_many_calls_across_threads(server: EchoServer) -> None:
    server.fail_next(50, grpc.StatusCode.RESOURCE_EXHAUSTED)
    with _channel(server.address) as channel, futures.ThreadPoolExecutor(8) as pool:

        def outcome(_: int) -> grpc.StatusCode:
            try:
                _echo(channel)
            except grpc.RpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        outcomes = list(pool.map(outcome, range(200)))
    assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 50
    assert outcomes.count(grpc.StatusCode.OK) == 150
    assert server.calls == 200


def test_fail_next_comes_before_fail_code_and_can_be_cancelled(server: EchoServer) -> None:
    server.fail_code = grpc.StatusCode.INTERNAL
    server.fail_next(1, grpc.StatusCode.ABORTED)
    with _channel(server.address) as channel:
        assert _code_of(lambda: _echo(channel)) == grpc.StatusCode.ABORTED
        assert _code_of(lambda: _echo(channel)) == grpc.StatusCode.INTERNAL
        server.fail_code = None
        server.fail_next(5)
        assert _code_of(lambda: _echo(channel)) == grpc.StatusCode.UNAVAILABLE
        server.fail_next(0)
        assert _echo(channel) == server.address


def test_failing_with_ok_or_a_negative_count_is_refused(server: EchoServer) -> None:
    with pytest.raises(ValueError, match="OK"):
        server.fail_code = grpc.StatusCode.OK
    with pytest.raises(ValueError, match="OK"):
        server.fail_next(1, grpc.StatusCode.OK)
    with pytest.raises(ValueError, match="-1"):
        server.fail_next(-1)


# -- the fault proxy -----------------------------------------------------------------------


def test_proxy_passes_every_kind_of_call_through(server: EchoServer, proxy: FaultProxy) -> None:
    assert proxy.address == f"127.0.0.1:{proxy.port}"
    big = b"y" * (3 << 20)  # more than the proxy holds per direction: flow control at work
    with _channel(proxy.address) as channel:
        stub = EchoStub(channel)
        assert stub.Unary(EchoRequest(payload=big), timeout=WAIT_LIMIT).payload == big
        replies = list(stub.ServerStream(EchoRequest(payload=b"s", repeat=3), timeout=WAIT_LIMIT))
        assert [reply.index for reply in replies] == [0, 1, 2]
        assert stub.ClientStream(_requests(), timeout=WAIT_LIMIT).payload == b"ab"
        assert [reply.payload for reply in stub.BidiStream(_requests(), timeout=WAIT_LIMIT)] == [b"a", b"b"]
        assert (proxy.connections, proxy.accepted) == (1, 1)
    wait_until(lambda: proxy.connections == 0, "the closed channel's connection to end")
    assert server.calls == 4


def test_reset_all_fails_a_call_in_flight_with_unavailable(proxy: FaultProxy) -> None:
    with _channel(proxy.address) as channel:
        stream = EchoStub(channel).ServerStream(
            EchoRequest(payload=b"s", repeat=1000, delay_ms=20), timeout=WAIT_LIMIT * 2
        )
        assert next(iter(stream)).index == 0
        assert proxy.reset_all() == 1
        with pytest.raises(grpc.RpcError) as failure:
            list(stream)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        # The client reconnects through the proxy, which still passes.
        _echo(channel, wait_for_ready=True)
        assert proxy.accepted == 2


def test_black_hole_stalls_open_and_new_connections_until_passing_again(server: EchoServer, proxy: FaultProxy) -> None:
    with _channel(proxy.address) as existing, _channel(proxy.address) as new:
        _echo(existing)
        proxy.black_hole()
        assert proxy.mode == "black_hole"
        assert _code_of(lambda: _echo(existing, timeout=0.5)) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _code_of(lambda: _echo(new, timeout=0.5)) == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: proxy.connections == 2, "both connections to be held open, not refused")
        assert server.calls == 1

        proxy.pass_through()
        assert _echo(existing) == server.address
        assert _echo(new, wait_for_ready=True) == server.address
        assert proxy.accepted == 2


def test_refuse_resets_new_connections_and_keeps_open_ones(server: EchoServer, proxy: FaultProxy) -> None:
    with _channel(proxy.address) as existing, _channel(proxy.address) as new:
        _echo(existing)
        proxy.refuse()
        assert _code_of(lambda: _echo(new)) == grpc.StatusCode.UNAVAILABLE
        assert proxy.accepted >= 2
        assert _echo(existing) == server.address
        assert proxy.connections == 1


def test_delay_holds_each_chunk(proxy: FaultProxy) -> None:
    with _channel(proxy.address) as channel:
        _echo(channel)
        proxy.delay(WAIT_LIMIT * 2)
        assert _code_of(lambda: _echo(channel, timeout=0.5)) == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(ValueError, match="delay"):
        proxy.delay(-1)
    with _channel(proxy.address) as channel:
        proxy.delay(0.01)
        _echo(channel)


def test_an_upstream_that_is_down_shows_as_unavailable() -> None:
    with start_echo_servers(1) as gone:
        address = gone.addresses[0]
    with FaultProxy(address) as proxy, _channel(proxy.address) as channel:
        assert _code_of(lambda: _echo(channel)) == grpc.StatusCode.UNAVAILABLE
        wait_until(lambda: proxy.connections == 0, "the refused upstream to end the client's connection")


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_proxy_between_ipv6_client_and_server() -> None:
    server = EchoServer("::1")
    try:
        with FaultProxy(server.address, host="::1") as proxy, _channel(proxy.address) as channel:
            assert proxy.address == f"[::1]:{proxy.port}"
            assert _echo(channel) == server.address
            assert proxy.reset_all() == 1
            wait_until(lambda: _serves(channel), "the client to reconnect through the proxy")
    finally:
        server.stop()


def test_close_ends_every_thread_and_connection(server: EchoServer) -> None:
    proxy = FaultProxy(server.address)
    with _channel(proxy.address) as passing, _channel(proxy.address) as held:
        _echo(passing)
        proxy.black_hole()
        assert _code_of(lambda: _echo(held, timeout=0.5)) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(_proxy_threads(proxy)) == 3  # the acceptor and two connections
        proxy.close()
        assert _proxy_threads(proxy) == []
        assert proxy.connections == 0
        assert "closed" in repr(proxy)
        proxy.close()  # idempotent
        assert _code_of(lambda: _echo(passing)) == grpc.StatusCode.UNAVAILABLE


def test_bad_upstream_addresses_are_refused() -> None:
    for address in ("localhost", "127.0.0.1:", "127.0.0.1:99999", ":80"):
        with pytest.raises(ValueError, match="host:port"):
            FaultProxy(address)
