"""poolkit in a few lines: a pooled channel over 4 local servers, a generated stub, describe()."""

import poolkit
from poolkit.testing import EchoRequest, EchoStub, start_echo_servers


def main() -> None:
    with start_echo_servers(4) as servers, poolkit.insecure_channel(servers.target) as channel:
        stub = EchoStub(channel)
        print("unary answered by", stub.Unary(EchoRequest(payload=b"hi"), timeout=1.0).server_id)
        print("stream indexes", [r.index for r in stub.ServerStream(EchoRequest(payload=b"s", repeat=3))])
        for _ in range(100):
            stub.Unary(EchoRequest(payload=b"x"), timeout=1.0)
        for endpoint in channel.describe()["endpoints"]:
            print(f"{endpoint['address']}: {endpoint['calls']} calls over {len(endpoint['slots'])} connection(s)")


if __name__ == "__main__":
    main()
