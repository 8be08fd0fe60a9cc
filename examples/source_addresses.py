"""Source addresses: connections that leave from two local IP addresses, each another
ephemeral port range towards every server; the channel's port budget; and this host's
kernel settings that decide how far the ports go (read only: nothing is changed).

Linux only: every 127.0.0.0/8 address is local there, so 127.0.0.1 and 127.0.0.2 can
both be sources without configuring anything.
"""

from pathlib import Path

import grpc

import poolkit
from poolkit import PoolConfig
from poolkit.testing import EchoRequest, EchoStub, StatsRequest, start_echo_servers

SOURCES = ("127.0.0.1", "127.0.0.2")
# The servers listen on another address: port_budget() counts every socket of the host on
# a source address, and a server's accepted connections on 127.0.0.1 would count there too.
SERVER_HOST = "127.0.0.3"


def source_of(peer: str) -> str:
    """'ipv4:127.0.0.2:51234' (or 'ipv6:[::ffff:127.0.0.2]:51234') -> '127.0.0.2'."""
    host = peer.partition(":")[2].rpartition(":")[0]
    return host.strip("[]").removeprefix("::ffff:")


def sysctl(name: str) -> str:
    try:
        return " ".join(Path("/proc/sys", *name.split(".")).read_text().split())
    except OSError:
        return "unreadable"


def kernel_advice() -> None:
    port_range = sysctl("net.ipv4.ip_local_port_range")
    if port_range != "unreadable":
        low, high = (int(port) for port in port_range.split())
        print(f"net.ipv4.ip_local_port_range = {port_range}: {high - low + 1:,} ports per source and server address")
        if high - low + 1 < 60_000:
            print("  to widen it: sysctl -w net.ipv4.ip_local_port_range='1024 65535' (reserve your listeners'")
            print("  ports with net.ipv4.ip_local_reserved_ports), or add source addresses")
    reuse = sysctl("net.ipv4.tcp_tw_reuse")
    meaning = {
        "0": "a port in TIME_WAIT cannot be used again towards the same server for 60 s",
        "1": "new outgoing connections may reuse a port in TIME_WAIT (needs TCP timestamps)",
        "2": "only loopback connections may reuse a port in TIME_WAIT (Linux's default)",
    }
    print(f"net.ipv4.tcp_tw_reuse = {reuse}: {meaning.get(reuse, 'see the README')}")


def main() -> None:
    config = PoolConfig(source_addresses=SOURCES)
    with start_echo_servers(2, host=SERVER_HOST) as servers:
        with poolkit.insecure_channel(servers.target, config=config) as channel:
            stub = EchoStub(channel)
            for _ in range(200):
                stub.Unary(EchoRequest(payload=b"x"), timeout=5.0)
            routes = channel.describe()["endpoints"]
            print(f"200 calls over {len(routes)} routes:", [f"{r['address']} from {r['source']}" for r in routes])
            # Per source: this channel's routes and READY connections, then every TCP socket of
            # the host on that address (other programs' too) and the share of the port range.
            for source, budget in channel.port_budget().items():
                print(f"port_budget {source}: {budget}")

        for server in servers:
            with grpc.insecure_channel(server.address) as direct:
                peers = EchoStub(direct).Stats(StatsRequest(), timeout=5.0).peers
            sources = sorted({source_of(peer) for peer in peers})
            print(f"{server.server_id} saw connections from {sources} ({len(peers)} connections)")
            if sources != sorted(SOURCES):
                raise SystemExit(f"{server.server_id}: calls did not come from both source addresses")
    kernel_advice()


if __name__ == "__main__":
    main()
