"""poolkit.aio: the same pool for asyncio code, a one-word change from grpc.aio."""

import asyncio

import poolkit.aio
from poolkit.testing import EchoRequest, EchoStub, start_echo_servers


async def main() -> None:
    with start_echo_servers(4) as servers:
        async with poolkit.aio.insecure_channel(servers.target) as channel:
            stub = EchoStub(channel)
            replies = await asyncio.gather(*(stub.Unary(EchoRequest(payload=b"x"), timeout=5.0) for _ in range(100)))
            print("answered by", sorted({r.server_id for r in replies}))
            print("in flight after:", channel.describe()["in_flight"])


if __name__ == "__main__":
    asyncio.run(main())
