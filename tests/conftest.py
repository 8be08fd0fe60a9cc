"""Fixtures shared by poolkit's tests.

- `cluster`: four in-process echo servers on loopback, shared by a module's tests.
- `servers`: four fresh echo servers for a test that reads their counts or changes them.
- `clock`, `rng`: a fake clock and a seeded random source for the sans-I/O core.
- `channel_factory`: opens channels of every kind the behavioural suite runs against.
  Each kind is one entry in `CHANNEL_KINDS`; an asyncio kind is added the same way,
  with its own small call helpers, and the suite runs against it unchanged in shape.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

import grpc
import pytest
from _support import FakeClock, wait_for_idle

import poolkit
from poolkit.testing import EchoServers, start_echo_servers

SEED = 20_261_126


@pytest.fixture(scope="module")
def cluster() -> Iterator[EchoServers]:
    """Four echo servers shared by one module's tests. Tests must not change them."""
    with start_echo_servers(4) as servers:
        yield servers


@pytest.fixture
def servers() -> Iterator[EchoServers]:
    """Four fresh echo servers whose calls, peers and delay belong to this test alone."""
    with start_echo_servers(4) as fresh:
        yield fresh


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rng() -> random.Random:
    return random.Random(SEED)


def _grpc_target(addresses: Sequence[str]) -> str:
    scheme = "ipv6" if addresses[0].startswith("[") else "ipv4"
    return f"{scheme}:{','.join(addresses)}"


def open_grpc_channel(addresses: Sequence[str]) -> grpc.Channel:
    """A plain grpc channel: to the one address, or round robin over several."""
    if len(addresses) == 1:
        return grpc.insecure_channel(addresses[0])
    return grpc.insecure_channel(_grpc_target(addresses), options=[("grpc.lb_policy_name", "round_robin")])


def open_poolkit_channel(addresses: Sequence[str]) -> grpc.Channel:
    return poolkit.insecure_channel(list(addresses))


CHANNEL_KINDS: dict[str, Callable[[Sequence[str]], grpc.Channel]] = {
    "grpc": open_grpc_channel,
    "poolkit": open_poolkit_channel,
}


class ChannelFactory:
    """Opens channels of one kind and closes them when the test ends."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._open = CHANNEL_KINDS[kind]
        self._opened: list[grpc.Channel] = []

    def __call__(self, addresses: str | Sequence[str]) -> grpc.Channel:
        """A channel to one "host:port" or to each of several."""
        channel = self._open([addresses] if isinstance(addresses, str) else list(addresses))
        self._opened.append(channel)
        return channel

    def settle(self, channel: grpc.Channel) -> None:
        """Wait until `channel` has nothing in flight; only poolkit channels can say."""
        if isinstance(channel, poolkit.Channel):
            wait_for_idle(channel)

    def close_all(self) -> None:
        for channel in self._opened:
            channel.close()


@pytest.fixture(params=sorted(CHANNEL_KINDS))
def channel_factory(request: pytest.FixtureRequest) -> Iterator[ChannelFactory]:
    factory = ChannelFactory(request.param)
    yield factory
    factory.close_all()
