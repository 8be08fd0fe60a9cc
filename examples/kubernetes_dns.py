"""What a Kubernetes headless Service's changing DNS answer does to a poolkit pool.

In a cluster the target is "dns:///my-svc.my-ns.svc.cluster.local:50051" with no
resolver: poolkit looks the name up every `resolve_interval` and gets every ready pod's
IP. Here `PoolConfig(resolver=...)` stands in for the cluster DNS: it answers with the
local echo servers that are "ready pods" right now. The pool scales up with the answer,
then a rolling deploy replaces the pod an open stream is on: that pod drains (the stream
finishes, new calls go elsewhere), its connection closes, and no call fails.
"""

import queue
import time
from collections.abc import Callable, Iterator

import grpc

import poolkit
from poolkit import PoolConfig
from poolkit.testing import EchoRequest, EchoServer, EchoStub, StatsRequest, start_echo_servers

TARGET = "dns:///my-svc.my-ns.svc.cluster.local:50051"


def expect(condition: bool, claim: str) -> None:
    if not condition:
        raise SystemExit(f"the pool did not follow the DNS answer: {claim}")


def wait_for(condition: Callable[[], bool], claim: str, timeout: float = 10.0) -> None:
    """Poll until `condition` holds; fail after `timeout` seconds (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        expect(time.monotonic() < deadline, claim)
        time.sleep(0.02)


def calls_since_last_look(pods: list[EchoServer]) -> dict[str, int]:
    """Each pod's echo calls since the last look, from its own Stats (asked directly)."""
    counts = {}
    for pod in pods:
        with grpc.insecure_channel(pod.address) as direct:
            counts[pod.server_id] = EchoStub(direct).Stats(StatsRequest(reset=True), timeout=5.0).calls
    return counts


def endpoints(channel: poolkit.Channel) -> dict[str, str]:
    """describe()'s endpoints: address -> status ("healthy", "draining", ...)."""
    return {e["address"]: e["status"] for e in channel.describe()["endpoints"]}


def ready(channel: poolkit.Channel, pod: EchoServer) -> bool:
    described = [e for e in channel.describe()["endpoints"] if e["address"] == pod.address]
    return bool(described) and described[0]["slots"][0]["state"] == "ready"


def make_calls(stub: EchoStub, count: int) -> None:
    for _ in range(count):
        stub.Unary(EchoRequest(payload=b"x"), timeout=5.0)  # any failure ends the example


def requests(outbox: queue.Queue[EchoRequest | None]) -> Iterator[EchoRequest]:
    while (request := outbox.get()) is not None:
        yield request


def main() -> None:
    with start_echo_servers(4) as servers:
        pods = {pod.server_id: pod for pod in servers}
        print("pods:", ", ".join(f"{pod.server_id} {pod.address}" for pod in servers))
        answer = [servers[0], servers[1]]  # the ready pods; servers 2 and 3 are not "ready" yet

        def cluster_dns(_target: str) -> list[str]:
            return [pod.address for pod in answer]

        # round_robin only so the counts below are easy to read; the default balancer
        # follows the DNS answer the same way.
        config = PoolConfig(resolver=cluster_dns, resolve_interval=0.5, balancer="round_robin")
        with poolkit.insecure_channel(TARGET, config=config) as channel:
            stub = EchoStub(channel)
            make_calls(stub, 200)
            print("2 pods:", calls_since_last_look(list(servers)))

            answer = [*answer, servers[2]]  # scale up: a third pod passes its readiness probe
            wait_for(lambda: ready(channel, servers[2]), "the new pod got no connection")
            make_calls(stub, 300)
            counts = calls_since_last_look(list(servers))
            print("scaled up to 3 pods:", counts)
            expect(all(counts[pod.server_id] > 0 for pod in answer), "a ready pod got no calls")

            # A long-lived call, as a client keeps a watch open: a bidirectional stream.
            outbox: queue.Queue[EchoRequest | None] = queue.Queue()
            replies = iter(stub.BidiStream(requests(outbox), timeout=30.0))
            outbox.put(EchoRequest(payload=b"first"))
            old = pods[next(replies).server_id]
            calls_since_last_look(list(servers))  # start counting afresh

            answer = [*(pod for pod in answer if pod is not old), servers[3]]  # a rolling-deploy step
            print(f"rolling deploy: {old.server_id} ({old.address}) leaves the answer, echo-3 joins")
            wait_for(lambda: endpoints(channel).get(old.address) == "draining", "the old pod is not draining")
            wait_for(lambda: ready(channel, servers[3]), "the replacement pod got no connection")
            print("  while the stream is open:", endpoints(channel))
            make_calls(stub, 300)
            outbox.put(EchoRequest(payload=b"last"))
            expect(next(replies).payload == b"last", "the open stream lost a message")
            outbox.put(None)  # the client ends its stream: nothing is in flight on the old pod
            expect(list(replies) == [], "the stream did not end cleanly")
            counts = calls_since_last_look(list(servers))
            print("  calls meanwhile:", counts)
            expect(counts[old.server_id] == 0, "a draining pod got new calls")
            expect(all(counts[pod.server_id] > 0 for pod in answer), "a ready pod got no calls")

            wait_for(lambda: old.address not in endpoints(channel), "the drained pod was not closed")
            old.stop(grace=2.0)  # the pod terminates gracefully, as on SIGTERM
            print("  after the stream ended:", endpoints(channel))
            for change in channel.describe()["transitions"]:
                if change["endpoint"] == old.address:
                    print(f"  {old.server_id}: {change['from']} -> {change['to']} ({change['why']})")
            make_calls(stub, 300)
            counts = calls_since_last_look([pod for pod in servers if pod is not old])
            print("after the deploy step:", counts)
            expect(all(counts[pod.server_id] > 0 for pod in answer), "a ready pod got no calls")
            print("resolver:", channel.describe()["resolver"])


if __name__ == "__main__":
    main()
