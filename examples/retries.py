"""Retries in a few lines: an idempotent method retried on another endpoint after a
server fails it, the attempt count the server saw, a hedged call, and the budget's counts."""

import grpc

import poolkit
from poolkit import Hedging, PoolConfig, RetryPolicy
from poolkit.testing import EchoRequest, EchoStub, start_echo_servers

UNARY = "/poolkit.echo.v1.Echo/Unary"


def main() -> None:
    with start_echo_servers(2) as servers:
        config = PoolConfig(method_retry={UNARY: RetryPolicy(idempotent=True)}, health_check=None)
        with poolkit.insecure_channel(servers.target, config=config) as channel:
            stub = EchoStub(channel)
            for server in servers:
                server.fail_next(1, grpc.StatusCode.UNAVAILABLE)  # each server fails its next call once
            reply = stub.Unary(EchoRequest(payload=b"hi"), timeout=2.0)
            print(
                "answered by",
                reply.server_id,
                "after",
                reply.metadata["grpc-previous-rpc-attempts"],
                "failed attempt(s)",
            )
            print("budget:", channel.describe()["retry_budget"])

        hedged = PoolConfig(
            method_retry={UNARY: RetryPolicy(idempotent=True, hedging=Hedging(delay=0.02))}, health_check=None
        )
        servers[0].delay = 0.5  # one slow server: calls to it are hedged to the other after 20 ms
        with poolkit.insecure_channel(servers.target, config=hedged) as channel:
            stub = EchoStub(channel)
            answered = [stub.Unary(EchoRequest(payload=b"h"), timeout=2.0).server_id for _ in range(4)]
            print("hedged calls answered by", answered)
            print("budget:", channel.describe()["retry_budget"])


if __name__ == "__main__":
    main()
