"""A small program written against poolkit's public API, typed the way a user would type it.

tests/test_packaging.py checks it with `mypy --strict` against the installed wheel (so
the wheel must ship py.typed and typed generated stubs) and then runs it against echo
servers. Not a test module: pytest does not collect it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import grpc

import poolkit
import poolkit.aio
from poolkit.testing import EchoRequest, EchoResponse, EchoStub, start_echo_servers

ECHO = "poolkit.echo.v1.Echo"


def make_config() -> poolkit.PoolConfig:
    lookup = poolkit.RetryPolicy(idempotent=True, max_attempts=2, hedging=poolkit.Hedging(delay=0.05))
    config = poolkit.PoolConfig(
        balancer="p2c_least_loaded",
        health_check=poolkit.HealthCheck(interval=1.0, timeout=0.5),
        failure_accrual=poolkit.FailureAccrual(consecutive_failures=3),
        retry_budget=poolkit.RetryBudget(ratio=0.1),
        method_retry={ECHO: lookup, f"/{ECHO}/ServerStream": None},
    )
    return dataclasses.replace(config, connections_per_endpoint=2)


def refused_field() -> str:
    """The field a bad configuration is refused for."""
    try:
        poolkit.PoolConfig(connections_per_endpoint=0)
    except poolkit.ConfigError as error:
        return error.name
    raise AssertionError("connections_per_endpoint=0 was accepted")


def seen_by_handler(error: grpc.RpcError) -> str:
    """What an existing `except grpc.RpcError` handler makes of an error."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    return f"{code.name} from {'poolkit' if isinstance(error, poolkit.PoolkitError) else 'the server'}"


def call_sync(target: str, config: poolkit.PoolConfig) -> tuple[set[str], str]:
    with poolkit.insecure_channel(target, config=config) as channel:
        stub = EchoStub(channel)
        reply: EchoResponse = stub.Unary(EchoRequest(payload=b"hi"), timeout=5.0)
        assert reply.payload == b"hi"
        indexes = [r.index for r in stub.ServerStream(EchoRequest(payload=b"s", repeat=3), timeout=5.0)]
        assert indexes == [0, 1, 2], indexes
        answered = {stub.Unary(EchoRequest(payload=b"x"), timeout=5.0).server_id for _ in range(40)}
        snapshot: dict[str, Any] = channel.describe()
        calls = sum(int(endpoint["calls"]) for endpoint in snapshot["endpoints"])
        assert calls >= 42, snapshot["endpoints"]
        budget: dict[str, dict[str, Any]] = channel.port_budget()
        assert budget, budget
    try:
        stub.Unary(EchoRequest(payload=b"late"), timeout=1.0)
    except grpc.RpcError as error:
        return answered, seen_by_handler(error)
    raise AssertionError("a call on a closed channel succeeded")


async def call_aio(target: str, config: poolkit.PoolConfig) -> set[str]:
    async with poolkit.aio.insecure_channel(target, config=config) as channel:
        await channel.channel_ready()
        stub = EchoStub(channel)
        replies = await asyncio.gather(*(stub.Unary(EchoRequest(payload=b"x"), timeout=5.0) for _ in range(40)))
        indexes = [r.index async for r in stub.ServerStream(EchoRequest(payload=b"s", repeat=3), timeout=5.0)]
        assert indexes == [0, 1, 2], indexes
        in_flight: int = channel.describe()["in_flight"]
        assert in_flight == 0, in_flight
    return {reply.server_id for reply in replies}


def nothing_to_call() -> str:
    """A channel whose resolver never answers fails its calls at once, as UNAVAILABLE."""

    def lookup(target: str) -> list[str]:
        return []

    config = poolkit.PoolConfig(resolver=lookup, retry=None)
    with poolkit.insecure_channel("echo.invalid:50051", config=config) as channel:
        try:
            EchoStub(channel).Unary(EchoRequest(), timeout=1.0)
        except poolkit.PoolUnavailableError as error:
            return seen_by_handler(error)
    raise AssertionError("a call with no endpoint succeeded")


def main() -> None:
    config = make_config()
    with start_echo_servers(3) as servers:
        sync_servers, after_close = call_sync(servers.target, config)
        aio_servers = asyncio.run(call_aio(servers.target, config))
    print("poolkit", poolkit.__version__, "from", poolkit.__file__)
    print("refused:", refused_field())
    print("sync calls answered by", len(sync_servers), "servers; asyncio calls by", len(aio_servers))
    print("after close():", after_close)
    print("with no endpoint:", nothing_to_call())


if __name__ == "__main__":
    main()
