"""A poolkit channel's life at its end: a program that never closes its channels still
exits promptly and quietly, sync and asyncio, and a channel dropped without close() gives
back its connections and threads.

The exit tests run each program in a fresh interpreter (its own script, servers in this
process); at the end of its run, the interpreter collects whatever is left while it shuts
down, when no new thread can start (3.11 waits for ever on one). The drop tests count
real connections (`ss`) and this process's sockets and threads, with the servers in
another process so that every one counted is the client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from _aio_support import eventually
from _support import wait_until

import poolkit
import poolkit.aio
from poolkit import PoolConfig
from poolkit.testing import EchoRequest, EchoServers, EchoStub, spawn_echo_servers, start_echo_servers

# A program that hangs at exit is cut off here; a healthy one exits in well under a second.
EXIT_LIMIT = 20.0
REQUEST = EchoRequest(payload=b"lifecycle")
SOURCE = "127.0.0.2"  # every 127.0.0.0/8 address is local on Linux

# The program under test: makes a channel (`sys.argv[1]` says how and where it lives),
# calls through it, prints the reply and ends without closing it. An exit hook
# registered before poolkit is imported runs after poolkit's, just before the
# interpreter finalises: it reports the threads still running then.
SCRIPT = r"""
import atexit, sys, threading, time

def threads_left():
    # A thread told to stop may take a moment to end (grpc.aio's own poller never does).
    deadline = time.monotonic() + (2.0 if scenario.startswith("sync") else 0.2)
    while threading.active_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    print("threads at finalisation:", sorted(t.name for t in threading.enumerate()), flush=True)

scenario, target = sys.argv[1], sys.argv[2]
atexit.register(threads_left)
source = sys.argv[3] if len(sys.argv) > 3 else None


def late():
    global channel
    channel = poolkit.insecure_channel([target], config=CONFIG)
    call(channel)


if scenario == "sync-made-at-exit":  # after poolkit's exit hook: collected while finalising
    atexit.register(late)

import asyncio
import poolkit, poolkit.aio
from poolkit.testing import EchoRequest, EchoStub

CONFIG = poolkit.PoolConfig(source_addresses=[source]) if source else None
REQUEST = EchoRequest(payload=b"lifecycle")


def call(channel):
    print("reply", EchoStub(channel).Unary(REQUEST, timeout=10).payload, flush=True)


async def call_aio(channel):
    print("reply", (await EchoStub(channel).Unary(REQUEST, timeout=10)).payload, flush=True)


if scenario == "sync-global":
    channel = poolkit.insecure_channel([target], config=CONFIG)
    call(channel)
elif scenario == "sync-local":  # dropped just before the end: closed by a thread of its own
    def main():
        channel = poolkit.insecure_channel([target], config=CONFIG)
        call(channel)
    main()
elif scenario == "sync-several":  # closed together at exit, in one wait for grpc's pollers
    per_endpoint = poolkit.PoolConfig(connections_per_endpoint=3)
    channels = [poolkit.insecure_channel([target], config=CONFIG or per_endpoint) for _ in range(4)]
    for channel in channels:
        call(channel)
elif scenario == "sync-cycle":  # unreachable, but left for the cyclic collector
    class Holder:
        pass
    holder = Holder()
    holder.itself, holder.channel = holder, poolkit.insecure_channel([target], config=CONFIG)
    call(holder.channel)
    del holder
elif scenario == "sync-daemon-stream":  # a daemon thread is still reading a stream at exit
    channel = poolkit.insecure_channel([target], config=CONFIG)
    call(channel)
    reading = threading.Event()
    def read():
        for _ in EchoStub(channel).ServerStream(EchoRequest(payload=b"x", repeat=1000, delay_ms=100)):
            reading.set()
    threading.Thread(target=read, daemon=True).start()
    reading.wait(10)
elif scenario == "sync-made-at-exit":
    pass
elif scenario == "aio-local":
    async def main():
        channel = poolkit.aio.insecure_channel([target], config=CONFIG)
        await call_aio(channel)
    asyncio.run(main())
elif scenario == "aio-global":  # a module global made inside the loop, outliving it
    channel = None
    async def main():
        global channel
        channel = poolkit.aio.insecure_channel([target], config=CONFIG)
        await call_aio(channel)
    asyncio.run(main())
elif scenario == "aio-loop-closed":  # a loop run and closed by hand: nothing cancels the tasks
    channel = None
    async def main():
        global channel
        channel = poolkit.aio.insecure_channel([target], config=CONFIG)
        await call_aio(channel)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(main())
    loop.close()
else:
    raise SystemExit(f"unknown scenario {scenario}")
"""


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServers]:
    with start_echo_servers(1) as servers:
        yield servers


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lifecycle") / "program.py"
    path.write_text(SCRIPT)
    return path


def run_to_exit(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the program to its end; fail, naming what it printed, if it does not exit."""
    try:
        return subprocess.run(
            [sys.executable, str(script), *args], capture_output=True, text=True, timeout=EXIT_LIMIT, check=False
        )
    except subprocess.TimeoutExpired as hung:
        message = f"{args} did not exit within {EXIT_LIMIT} s; it printed {hung.stdout!r} {hung.stderr!r}"
        raise AssertionError(message) from None


def assert_exited_quietly(done: subprocess.CompletedProcess[str]) -> list[str]:
    """It answered, exited 0 and printed no error; the threads running at finalisation."""
    assert done.returncode == 0, done.stderr
    assert f"reply {REQUEST.payload!r}" in done.stdout, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr
    assert "Task was destroyed" not in done.stderr, done.stderr
    left = [line for line in done.stdout.splitlines() if line.startswith("threads at finalisation:")]
    assert len(left) == 1, done.stdout
    return left[0].removeprefix("threads at finalisation:").strip(" []").replace("'", "").split(", ")


TARGETS = {
    "ipv4": "127.0.0.1:{port}",  # an address: no discovery
    "dns": "localhost:{port}",  # a name: re-resolved by the discovery thread (or task)
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("scenario", ["sync-global", "sync-local", "sync-cycle"])
def test_a_sync_program_that_never_closes_its_channel_exits(
    echo: EchoServers, script: Path, scenario: str, target: str
) -> None:
    """Health checks on (the default), with and without discovery: every thread of
    poolkit's and of grpc's (pollers included) has ended before the interpreter finalises."""
    done = run_to_exit(script, scenario, TARGETS[target].format(port=echo[0].port))
    assert assert_exited_quietly(done) == ["MainThread"]


def test_a_program_with_several_channels_open_exits(echo: EchoServers, script: Path) -> None:
    done = run_to_exit(script, "sync-several", TARGETS["dns"].format(port=echo[0].port))
    assert assert_exited_quietly(done) == ["MainThread"]


@pytest.mark.parametrize("scenario", ["sync-global", "aio-global"])
def test_a_program_whose_channel_binds_a_source_address_exits(echo: EchoServers, script: Path, scenario: str) -> None:
    done = run_to_exit(script, scenario, TARGETS["dns"].format(port=echo[0].port), SOURCE)
    assert not [name for name in assert_exited_quietly(done) if name.startswith("poolkit")]


def test_a_daemon_thread_in_a_call_at_exit_is_left_alone(echo: EchoServers, script: Path) -> None:
    """Its call is not cut short (no error raised in it, as with grpc's own channels):
    the process just ends, as it would with grpc alone."""
    done = run_to_exit(script, "sync-daemon-stream", TARGETS["dns"].format(port=echo[0].port))
    left = assert_exited_quietly(done)
    assert [name for name in left if name.endswith("(read)")], left  # still reading
    assert not [name for name in left if name.startswith("poolkit")], left


@pytest.mark.skipif(sys.version_info[:2] == (3, 12), reason="3.12 starts no thread in an exit hook")
def test_a_channel_collected_while_the_interpreter_finalises_starts_no_thread(echo: EchoServers, script: Path) -> None:
    """Made by an exit hook that runs after poolkit's, the channel is still open when the
    interpreter collects it: its finaliser must not start the thread that would close it."""
    assert_exited_quietly(run_to_exit(script, "sync-made-at-exit", TARGETS["dns"].format(port=echo[0].port)))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("scenario", ["aio-local", "aio-global", "aio-loop-closed"])
def test_an_asyncio_program_that_never_closes_its_channel_exits(
    echo: EchoServers, script: Path, scenario: str, target: str
) -> None:
    """asyncio.run() cancels the channel's tasks; a loop closed by hand leaves them
    pending, and they go without asyncio's "Task was destroyed" for each."""
    done = run_to_exit(script, scenario, TARGETS[target].format(port=echo[0].port))
    assert not [name for name in assert_exited_quietly(done) if name.startswith("poolkit")]


# -- channels dropped while the program runs ---------------------------------------------------


def _sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed since the listing (its own descriptor, or grpc's)
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def _connections(ports: set[int]) -> int:
    """Established TCP connections from here to `ports` on loopback (their client side)."""
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is needed to count connections")
    listing = subprocess.run(
        ["ss", "-Htn", "state", "established"], capture_output=True, text=True, check=True, timeout=10
    )
    return sum(int(line.split()[3].rpartition(":")[2]) in ports for line in listing.stdout.splitlines())


def _ports(addresses: list[str]) -> set[int]:
    return {int(address.rpartition(":")[2]) for address in addresses}


def _dns_targets(addresses: list[str]) -> list[str]:
    return [f"localhost:{port}" for port in sorted(_ports(addresses))]


CONFIGS = {"default": PoolConfig(), "source": PoolConfig(source_addresses=[SOURCE], connections_per_endpoint=2)}


@pytest.mark.parametrize("config", CONFIGS)
def test_a_dropped_sync_channel_gives_back_its_connections_and_threads(config: str) -> None:
    """Health checks and discovery running, every connection open: dropped without close(),
    the channel closes its connections and stops its threads and grpc's."""
    with spawn_echo_servers(2) as spawned:
        ports = _ports(spawned.addresses)
        gc.collect()
        threads, sockets = threading.active_count(), _sockets()
        channel = poolkit.insecure_channel(_dns_targets(spawned.addresses), config=CONFIGS[config])
        for _ in range(4):
            EchoStub(channel).Unary(REQUEST, timeout=10)
        slots = sum(len(endpoint["slots"]) for endpoint in channel.describe()["endpoints"])
        wait_until(lambda: _connections(ports) >= slots, f"{slots} connections to open")
        assert threading.active_count() > threads
        del channel
        gc.collect()
        wait_until(
            lambda: _connections(ports) == 0 and threading.active_count() <= threads and _sockets() <= sockets,
            lambda: (
                f"connections ({_connections(ports)} open), threads ({threading.active_count()}, "
                f"{threads} before) and sockets ({_sockets()}, {sockets} before) given back by a dropped channel"
            ),
        )


@pytest.mark.parametrize("config", CONFIGS)
def test_a_dropped_asyncio_channel_gives_back_its_connections_and_tasks(config: str) -> None:
    with spawn_echo_servers(2) as spawned:
        asyncio.run(_drop_aio_channel(_dns_targets(spawned.addresses), _ports(spawned.addresses), CONFIGS[config]))


async def _drop_aio_channel(targets: list[str], ports: set[int], config: PoolConfig) -> None:
    async with poolkit.aio.insecure_channel(targets, config=config) as warm_up:  # grpc.aio's own thread starts
        await EchoStub(warm_up).Unary(REQUEST, timeout=10)
    await eventually(lambda: _connections(ports) == 0, "the warm-up channel's connections to close")
    gc.collect()
    threads, sockets, tasks = threading.active_count(), _sockets(), len(asyncio.all_tasks())
    channel = poolkit.aio.insecure_channel(targets, config=config)
    for _ in range(4):
        await EchoStub(channel).Unary(REQUEST, timeout=10)
    slots = sum(len(endpoint["slots"]) for endpoint in channel.describe()["endpoints"])
    await eventually(lambda: _connections(ports) >= slots, f"{slots} connections to open")
    assert len(asyncio.all_tasks()) > tasks
    del channel
    gc.collect()
    await eventually(
        lambda: (
            _connections(ports) == 0
            and threading.active_count() <= threads
            and _sockets() <= sockets
            and len(asyncio.all_tasks()) <= tasks
        ),
        lambda: (
            f"connections ({_connections(ports)} open), threads ({threading.active_count()}, {threads} "
            f"before), sockets ({_sockets()}, {sockets} before) and tasks ({len(asyncio.all_tasks())}, {tasks} "
            "before) given back by a dropped channel"
        ),
    )
