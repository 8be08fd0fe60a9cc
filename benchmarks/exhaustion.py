"""The port-exhaustion experiment: a client that opens a channel per request runs out of
ephemeral ports; a poolkit channel does not; spreading a pool's connections over source
addresses spreads the ports they take.

    python benchmarks/exhaustion.py [--scenarios naive,poolkit,recycle] [--json out.json]

Needs root. Each scenario runs in a private network namespace of its own: the script
runs itself again as `unshare -n python benchmarks/exhaustion.py ...`, which brings the
namespace's loopback up, narrows its ephemeral port range to 100 ports
(`net.ipv4.ip_local_port_range`) and sets `tcp_tw_reuse` to 0. Those settings belong to
the namespace, so the host's are untouched, and what takes 28K ports and minutes on a
host shows in 100 ports and seconds. A TCP connection is named by (source address,
source port, server address, server port); the side that closes first keeps the name in
TIME_WAIT for 60 s (Linux's fixed TCP_TIMEWAIT_LEN), so one source address can open
about 100 connections a minute to one server, if the client is the side that closes.

Scenarios (`--scenarios`, a comma list):

  naive      a new `grpc.insecure_channel` + stub per request, closed after it, against
             one server, one request at a time until the first failure (or the cap).
             grpc's global subchannel pool would share a connection between channels
             open at the same time; these never overlap, so each request opens its own
             (the TIME_WAIT count shows it).
  poolkit    one poolkit channel over two servers, `--poolkit-calls` calls from
             `--threads` threads: its few connections carry every call.
  recycle    a server that closes each connection `--max-age-ms` after it opened
             (`grpc.max_connection_age_ms`: GOAWAY, then close), so the pool keeps
             opening new ones. First 8 connections (`--recycle-connections`) from one
             source address, 127.0.0.2, until it runs dry (a call fails for want of a
             port or of a connection) or `--recycle-seconds` pass; then the same 8 spread
             over four, 127.0.0.2-127.0.0.5, on a server of its own, for as long as the
             one source lasted. Health checks are off, so no Watch stream holds an old
             connection open through the grace period, and two threads call.
             Needs `PoolConfig.source_addresses`; reported as unavailable without it.

What the recycle scenario shows, and what it does not: a server closing at max age is
usually the side that closes first, and its TIME_WAIT ("srv TW") costs the client no
port; a port whose only TIME_WAIT is the server's is used again at once. Only the
connections the client happens to close first (a minority, and a varying one) fill the
client's range, so one source takes 15-40 s to run dry here (6-20 s with 50 ports), not
the second or two that 100 ports would last at these rates; four sources, in the same
time, filled about half of each of their ranges and served every call.

Each scenario has its own servers on fixed ports outside the ephemeral range (a fresh
namespace has no other listener), so nothing but the clients takes ephemeral ports.
Sockets are read from /proc/net/tcp and /proc/net/tcp6 (grpc dials IPv4 servers on
dual-stack sockets), every 0.1 s while a scenario runs. The table:

  range            ports in the namespace's ephemeral range
  eps, srcs, slots servers, source addresses (1: unbound), connections per server and source
  requests         calls made (failed ones included)
  until 1st fail   calls that succeeded before the first one failed (- when none did)
  failures         calls that failed; below the table, by kind: "no_port" (grpc passed on
                   the kernel's "Cannot assign requested address"), "no_connection"
                   (poolkit had no connection to offer: every route failing to connect),
                   "other" (such as a call caught by the server's GOAWAY)
  dry at s         seconds into the scenario of the first "no_port" or "no_connection"
  TIME_WAIT        client sockets to this scenario's servers in TIME_WAIT at its end (per
                   source address below the table for `recycle`)
  srv TW           server-side sockets in TIME_WAIT at the end
  conns            the most client connections (ESTABLISHED) seen at once
  ports            distinct client ports the servers saw (their Stats; - if they could
                   not be asked): a port used again after its TIME_WAIT counts once

`--json PATH` writes the same figures, each scenario's first error in full and its most
common errors, the pool's last route transitions, and a per-second timeline of client
TIME_WAIT (and, for poolkit, connections failing to connect) per source address.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import ipaddress
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import grpc

import poolkit
from poolkit import PoolConfig
from poolkit.testing import EchoRequest, EchoStub, SpawnedEchoServers, spawn_echo_servers

# Set by the re-execution to the host's network namespace inode: the script changes
# sysctls only in a namespace that is provably not that one.
NETNS_ENV = "POOLKIT_EXHAUSTION_HOST_NETNS"
PORT_RANGE_SYSCTL = Path("/proc/sys/net/ipv4/ip_local_port_range")
TW_REUSE_SYSCTL = Path("/proc/sys/net/ipv4/tcp_tw_reuse")
TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))

# 100 ports: the naive client runs dry in about 200 requests, well under a second.
DEFAULT_PORT_RANGE = (40000, 40099)
TIME_WAIT_SECONDS = 60  # Linux's TCP_TIMEWAIT_LEN, fixed in the kernel

# Server ports, one block per scenario, outside the ephemeral range so that no client
# connection can take one (and a new namespace has no other listener to collide with).
NAIVE_PORT = 50000
POOLKIT_PORTS = 50100
RECYCLE_PORTS = {1: 50200, 4: 50300}

HOST = "127.0.0.1"
# Every address in 127.0.0.0/8 is local on Linux: sources need no setup.
ONE_SOURCE = ("127.0.0.2",)
FOUR_SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")

NO_PORT = "Cannot assign requested address"  # strerror(EADDRNOTAVAIL): connect() found no free port
REQUEST = EchoRequest(payload=b"x")
CALL_TIMEOUT = 5.0
# A worker whose call failed waits this long before the next, so a pool that fails fast
# is not spun through at full speed (which would starve the connections of CPU).
FAILURE_PAUSE = 0.01
SAMPLE_INTERVAL = 0.1
# Once the one-source pool has run dry, it runs this much longer (to show the failures
# are not a blip and let the watch see every connection failing), then stops.
RUN_DRY_LINGER = 2.0
ERRORS_KEPT = 5  # the most common error texts kept per scenario
SCENARIOS = ("naive", "poolkit", "recycle")
MAX_SECONDS = 600.0  # no scenario option may ask for longer than this
# Beyond a scenario's own time: starting its servers (up to 30 s each on a loaded
# machine, though well under a second here), the namespace and closing the pool.
STARTUP_MARGIN = 60.0

_ESTABLISHED, _TIME_WAIT, _LISTEN = "01", "06", "0A"  # /proc/net/tcp state codes


# -- the namespace --------------------------------------------------------------------------


def _netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def namespace_command() -> list[str]:
    """`unshare -n`, once it has been seen to work here; otherwise exit saying why."""
    if os.geteuid() != 0:
        sys.exit("exhaustion.py: needs root, to make a private network namespace (unshare -n)")
    unshare = shutil.which("unshare")
    if unshare is None:
        sys.exit("exhaustion.py: `unshare` (util-linux) is not installed; it makes the network namespace")
    try:
        probe = subprocess.run([unshare, "-n", "true"], capture_output=True, text=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        sys.exit("exhaustion.py: `unshare -n true` did not finish within 10 s")
    if probe.returncode != 0:
        sys.exit(f"exhaustion.py: cannot make a network namespace: `unshare -n true` said {probe.stderr.strip()!r}")
    return [unshare, "-n"]


def run_in_namespace(unshare: list[str], argv: Sequence[str], name: str, limit: float) -> dict[str, Any]:
    """Scenario `name`, run by this script in a network namespace of its own (so one
    scenario's TIME_WAIT cannot touch the next one's ports); its report."""
    env = {**os.environ, NETNS_ENV: str(_netns_inode())}
    # grpc logs every GOAWAY at INFO; the recycle scenario would bury everything in them.
    env.setdefault("GRPC_VERBOSITY", "ERROR")
    with tempfile.TemporaryDirectory(prefix="poolkit-exhaustion-") as scratch:
        out = Path(scratch) / "report.json"
        command = [*unshare, sys.executable, str(Path(__file__).resolve()), *argv]
        command += ["--scenarios", name, "--json", str(out)]  # argparse keeps the last of each
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
        try:
            code = child.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            kill_tree(child.pid)
            child.wait(timeout=10)
            return failed(name, f"did not finish within {limit:.0f} s")
        if code != 0 or not out.exists():
            return failed(name, f"exited with status {code}")
        report: dict[str, Any] = json.loads(out.read_text())
    return report


def failed(name: str, why: str) -> dict[str, Any]:
    return {"scenarios": [{"name": name, "status": "failed", "reason": why}]}


def kill_tree(pid: int) -> None:
    """SIGKILL a child of ours and every process under it (its echo servers)."""
    found: list[int] = []
    frontier = [pid]
    for _ in range(1000):  # a handful of processes in practice
        if not frontier:
            break
        parent = frontier.pop()
        for listing in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                children = [int(child) for child in listing.read_text().split()]
                found += children
                frontier += children
    for target in [*reversed(found), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)


def set_up_namespace(port_range: tuple[int, int]) -> None:
    """Loopback up, the narrow port range, no TIME_WAIT reuse; only in a namespace of our own."""
    if str(_netns_inode()) == os.environ[NETNS_ENV]:
        sys.exit("exhaustion.py: still in the host's network namespace; refusing to change its sysctls")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
    PORT_RANGE_SYSCTL.write_text(f"{port_range[0]} {port_range[1]}\n")
    TW_REUSE_SYSCTL.write_text("0\n")


def read_sysctls() -> dict[str, str]:
    return {
        "ip_local_port_range": " ".join(PORT_RANGE_SYSCTL.read_text().split()),
        "tcp_tw_reuse": TW_REUSE_SYSCTL.read_text().strip(),
    }


# -- counting sockets -----------------------------------------------------------------------


def _address(text: str) -> tuple[str, int]:
    """ "0100007F:9C40" (or 32 hex digits for IPv6) as ("127.0.0.1", 40000); a v4-mapped
    IPv6 address as its IPv4 form."""
    host, _, port = text.partition(":")
    raw = bytes.fromhex(host)
    # The kernel prints each 32-bit word of the address in host byte order.
    packed = b"".join(int.from_bytes(raw[i : i + 4], "big").to_bytes(4, sys.byteorder) for i in range(0, len(raw), 4))
    if len(packed) == 4:
        return socket.inet_ntop(socket.AF_INET, packed), int(port, 16)
    ip = ipaddress.IPv6Address(packed)
    return str(ip.ipv4_mapped or ip.compressed), int(port, 16)


@dataclasses.dataclass
class Sockets:
    """The sockets between clients and a set of servers at one moment."""

    established: collections.Counter[str]  # client side, by source address
    time_wait: collections.Counter[tuple[str, str]]  # client side, by (source address, server)
    server_time_wait: int  # server side: connections the server closed first

    def time_wait_by_source(self) -> dict[str, int]:
        by_source: collections.Counter[str] = collections.Counter()
        for (source, _), count in self.time_wait.items():
            by_source[source] += count
        return dict(sorted(by_source.items()))


def count_sockets(servers: set[tuple[str, int]]) -> Sockets:
    """Each socket counted once: /proc/net/tcp is read in pages, and a table that changes
    between two reads (connections opening and closing meanwhile) can list a socket on
    both pages, so the sockets are told apart by their address pairs."""
    seen: dict[tuple[tuple[str, int], tuple[str, int]], str] = {}
    for path in TCP_TABLES:
        try:
            lines = path.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split(None, 4)
            if fields[3] != _LISTEN:
                seen[_address(fields[1]), _address(fields[2])] = fields[3]
    established: collections.Counter[str] = collections.Counter()
    time_wait: collections.Counter[tuple[str, str]] = collections.Counter()
    server_time_wait = 0
    for (local, remote), state in seen.items():
        if remote in servers:
            if state == _ESTABLISHED:
                established[local[0]] += 1
            elif state == _TIME_WAIT:
                time_wait[local[0], f"{remote[0]}:{remote[1]}"] += 1
        elif local in servers and state == _TIME_WAIT:
            server_time_wait += 1
    return Sockets(established, time_wait, server_time_wait)


class Watch:
    """Samples, in a thread, while a scenario runs: the sockets to its servers (the most
    client connections open at once, client TIME_WAIT per source address) and, once it
    follows a poolkit channel, the channel's connections failing to connect per source.
    Once a second a sample goes into `timeline`."""

    def __init__(self, addresses: Sequence[str], limit: float) -> None:
        self._servers = {(host, int(port)) for host, _, port in (a.rpartition(":") for a in addresses)}
        self._limit = limit  # the scenario's own time limit; the watch stops by then anyway
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="socket-watch", daemon=True)
        self._channel: poolkit.Channel | None = None
        self._start = time.monotonic()
        self.max_connections = 0
        self.max_by_source: collections.Counter[str] = collections.Counter()
        self.max_failing_by_source: collections.Counter[str] = collections.Counter()
        self.timeline: list[dict[str, Any]] = []

    def follow(self, channel: poolkit.Channel | None) -> None:
        self._channel = channel

    def __enter__(self) -> Self:
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def final(self) -> Sockets:
        return count_sockets(self._servers)

    def _run(self) -> None:
        next_mark = self._start
        for _ in range(int(self._limit / SAMPLE_INTERVAL) + 100):
            now = time.monotonic()
            sockets = self._sample_sockets()
            failing = self._sample_slots()
            if now >= next_mark:
                entry: dict[str, Any] = {"t": round(now - self._start, 1), "time_wait": sockets.time_wait_by_source()}
                if failing is not None:
                    entry["failing_slots"] = failing
                self.timeline.append(entry)
                next_mark += 1.0
            if self._stop.wait(SAMPLE_INTERVAL):
                return

    def _sample_sockets(self) -> Sockets:
        sockets = count_sockets(self._servers)
        self.max_connections = max(self.max_connections, sum(sockets.established.values()))
        for source, count in sockets.established.items():
            self.max_by_source[source] = max(self.max_by_source[source], count)
        return sockets

    def _sample_slots(self) -> dict[str, int] | None:
        """The channel's connections in TRANSIENT_FAILURE, by source address."""
        channel = self._channel
        if channel is None:
            return None
        try:
            endpoints = channel.describe()["endpoints"]
        except Exception:  # closed under us at the end of the scenario
            return None
        failing: collections.Counter[str] = collections.Counter()
        for route in endpoints:
            source = route.get("source") or HOST
            failing[source] += sum(slot["state"] == "transient_failure" for slot in route["slots"])
        for source, count in failing.items():
            self.max_failing_by_source[source] = max(self.max_failing_by_source[source], count)
        return dict(sorted(failing.items()))


# -- calls ----------------------------------------------------------------------------------


def failure_kind(error: grpc.RpcError) -> str:
    """ "no_port": a connect() failed for want of a port (grpc passes the kernel's
    strerror on); "no_connection": poolkit had no connection to offer the call (every
    route failing to connect); "other": anything else, such as a call caught by a
    server's GOAWAY as it closed the connection."""
    if NO_PORT in (error.details() or ""):
        return "no_port"
    if isinstance(error, poolkit.PoolUnavailableError):
        return "no_connection"
    return "other"


@dataclasses.dataclass
class Outcome:
    """What a scenario's calls came to."""

    requests: int = 0
    ok: int = 0
    failures: int = 0
    until_first_failure: int | None = None
    first_error: dict[str, str] | None = None
    first_failure_seconds: float | None = None
    ran_dry_seconds: float | None = None  # the first failure for want of a port or connection
    kinds: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def record(self, error: grpc.RpcError | None, elapsed: float) -> None:
        self.requests += 1
        if error is None:
            self.ok += 1
            return
        self.failures += 1
        code, details = error.code(), error.details() or ""
        name = code.name if code is not None else "UNKNOWN"
        if self.first_error is None:
            self.until_first_failure = self.ok
            self.first_error = {"code": name, "details": details}
            self.first_failure_seconds = round(elapsed, 2)
        kind = failure_kind(error)
        self.kinds[kind] += 1
        if kind != "other" and self.ran_dry_seconds is None:
            self.ran_dry_seconds = round(elapsed, 2)
        self.errors[f"{name}: {details[:300]}"] += 1


def call_once(stub: EchoStub) -> grpc.RpcError | None:
    try:
        stub.Unary(REQUEST, timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        return error
    return None


def drive(
    call: Callable[[], grpc.RpcError | None],
    total: int,
    threads: int,
    seconds: float,
    *,
    linger: float | None = None,
) -> tuple[Outcome, float]:
    """`total` calls from `threads` threads, or as many as fit in `seconds`; with
    `linger`, stop that long after the pool first ran dry (see `failure_kind`)."""
    outcome = Outcome()
    lock = threading.Lock()
    issued = 0
    start = time.monotonic()
    deadline = start + seconds

    def worker() -> None:
        nonlocal issued, deadline
        while time.monotonic() < deadline:
            with lock:
                if issued >= total:
                    return
                issued += 1
            error = call()
            with lock:
                outcome.record(error, time.monotonic() - start)
                if linger is not None and outcome.ran_dry_seconds is not None:
                    deadline = min(deadline, start + outcome.ran_dry_seconds + linger)
            if error is not None:
                time.sleep(FAILURE_PAUSE)

    workers = [threading.Thread(target=worker, name=f"caller-{i}") for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=seconds + CALL_TIMEOUT + 10)
    return outcome, time.monotonic() - start


def ports_seen(servers: SpawnedEchoServers) -> dict[str, int] | None:
    """Distinct client ports the servers saw connect, by client address (a port used
    again for a later connection counts once). Asked over a fresh connection from
    127.0.0.1; None when that pair has no port left to ask with."""
    try:
        stats = servers.stats()
    except grpc.RpcError:
        return None
    peers = {peer for reply in stats for peer in reply.peers}  # "ipv4:127.0.0.2:40012"
    by_source = collections.Counter(peer.removeprefix("ipv4:").rpartition(":")[0] for peer in peers)
    return dict(sorted(by_source.items()))


# -- scenarios ------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """What a scenario runs: its clients' shape."""

    name: str
    description: str
    endpoints: int
    sources: tuple[str, ...] = ()  # () : unbound, the kernel picks 127.0.0.1
    slots: int | None = None  # connections_per_endpoint; None: not a pool

    def summary(self) -> dict[str, Any]:
        bound = None if self.slots is None else self.endpoints * max(len(self.sources), 1) * self.slots
        return {
            "name": self.name,
            "description": self.description,
            "endpoints": self.endpoints,
            "sources": list(self.sources),
            "slots": self.slots,
            "connections_bound": bound,
        }


@dataclasses.dataclass
class Measured:
    outcome: Outcome
    seconds: float
    watch: Watch
    final: Sockets
    ports: dict[str, int] | None
    transitions: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def ran(setup: Setup, measured: Measured) -> dict[str, Any]:
    outcome, final, watch = measured.outcome, measured.final, measured.watch
    failing_routes = [t for t in measured.transitions if t.get("to") == "failing"]
    return {
        **setup.summary(),
        "status": "ran",
        "requests": outcome.requests,
        "ok": outcome.ok,
        "failures": outcome.failures,
        "until_first_failure": outcome.until_first_failure,
        "first_failure_seconds": outcome.first_failure_seconds,
        "first_error": outcome.first_error,
        "ran_dry_seconds": outcome.ran_dry_seconds,
        "failures_by_kind": {kind: outcome.kinds[kind] for kind in ("no_port", "no_connection", "other")},
        "errors": dict(outcome.errors.most_common(ERRORS_KEPT)),
        "seconds": round(measured.seconds, 2),
        "time_wait": sum(final.time_wait.values()),
        "time_wait_by_source": final.time_wait_by_source(),
        "time_wait_by_pair": {f"{source}->{server}": n for (source, server), n in sorted(final.time_wait.items())},
        "max_time_wait_per_pair": max(final.time_wait.values(), default=0),
        "server_time_wait": final.server_time_wait,
        "max_connections": watch.max_connections,
        "max_connections_by_source": dict(sorted(watch.max_by_source.items())),
        "max_failing_slots_by_source": dict(sorted(watch.max_failing_by_source.items())),
        "routes_failing": len(failing_routes),  # endpoint-source routes whose every slot failed to connect
        "route_transitions": measured.transitions[-ERRORS_KEPT:],
        "ports_seen": sum(measured.ports.values()) if measured.ports is not None else None,
        "ports_seen_by_source": measured.ports,
        "timeline": watch.timeline,
    }


def unavailable(setup: Setup, why: str) -> dict[str, Any]:
    return {**setup.summary(), "status": "unavailable", "reason": why}


def run_naive(args: argparse.Namespace) -> list[dict[str, Any]]:
    setup = Setup("naive", "a new grpc channel per request, one server, sequential, until the first failure", 1)
    with spawn_echo_servers(1, HOST, ports=[NAIVE_PORT]) as servers:
        address = servers.addresses[0]
        outcome = Outcome()
        with Watch(servers.addresses, args.naive_seconds) as watch:
            start = time.monotonic()
            for _ in range(args.naive_cap):
                if time.monotonic() - start > args.naive_seconds:
                    break
                channel = grpc.insecure_channel(address)
                try:
                    outcome.record(call_once(EchoStub(channel)), time.monotonic() - start)
                finally:
                    channel.close()
                if outcome.failures:
                    break
            seconds = time.monotonic() - start
        measured = Measured(outcome, seconds, watch, watch.final(), ports_seen(servers))
    return [ran(setup, measured)]


def run_pool(
    setup: Setup,
    config: PoolConfig,
    *,
    calls: int,
    threads: int,
    seconds: float,
    ports: Sequence[int],
    server_options: Sequence[tuple[str, object]] = (),
    linger: float | None = None,
) -> dict[str, Any]:
    """One poolkit channel over `setup.endpoints` fresh servers, called from `threads` threads."""
    with spawn_echo_servers(setup.endpoints, HOST, options=server_options, ports=ports) as servers:
        with Watch(servers.addresses, seconds) as watch:
            try:
                channel = poolkit.insecure_channel(servers.target, config=config)
            except poolkit.PoolkitError as error:
                return unavailable(setup, f"{type(error).__name__}: {error}")
            with channel:
                watch.follow(channel)
                stub = EchoStub(channel)
                outcome, took = drive(lambda: call_once(stub), calls, threads, seconds, linger=linger)
                transitions = channel.describe()["transitions"]
                watch.follow(None)
        measured = Measured(outcome, took, watch, watch.final(), ports_seen(servers), transitions)
    return ran(setup, measured)


def run_poolkit(args: argparse.Namespace) -> list[dict[str, Any]]:
    setup = Setup(
        "poolkit",
        f"one poolkit channel, {args.endpoints} servers, {args.threads} threads",
        args.endpoints,
        slots=args.poolkit_slots,
    )
    config = PoolConfig(connections_per_endpoint=args.poolkit_slots)
    ports = [POOLKIT_PORTS + i for i in range(args.endpoints)]
    return [
        run_pool(
            setup, config, calls=args.poolkit_calls, threads=args.threads, seconds=args.poolkit_seconds, ports=ports
        )
    ]


def run_recycle(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One source until it runs dry (or `--recycle-seconds`); then four sources, with the
    same connections per server, on servers of their own, for as long as the one lasted."""
    server_options = [
        ("grpc.max_connection_age_ms", args.max_age_ms),
        ("grpc.max_connection_age_grace_ms", args.max_age_grace_ms),
    ]
    results: list[dict[str, Any]] = []
    seconds = args.recycle_seconds
    for sources in (ONE_SOURCE, FOUR_SOURCES):
        # The same connections per server either way, from one source or spread over four.
        slots = max(args.recycle_connections // len(sources), 1)
        setup = Setup(
            f"recycle-{len(sources)}-source{'s' if len(sources) > 1 else ''}",
            f"poolkit, {args.recycle_endpoints} server(s) closing each connection after {args.max_age_ms} ms, "
            f"{slots * len(sources)} connections per server from {len(sources)} source address(es)",
            args.recycle_endpoints,
            sources,
            slots,
        )
        try:
            # Health checks off: a Watch stream would hold each old connection open for the
            # whole grace period; the experiment is about the ports of the new ones.
            config = PoolConfig(source_addresses=sources, connections_per_endpoint=slots, health_check=None)
        except TypeError as error:
            results.append(unavailable(setup, f"PoolConfig has no source_addresses yet ({error})"))
            continue
        row = run_pool(
            setup,
            config,
            calls=args.recycle_calls,
            threads=args.recycle_threads,
            seconds=seconds,
            ports=[RECYCLE_PORTS[len(sources)] + i for i in range(args.recycle_endpoints)],
            server_options=server_options,
            linger=RUN_DRY_LINGER if len(sources) == 1 else None,
        )
        if row["status"] == "ran":
            seconds = min(seconds, row["seconds"])  # the four sources get as long as the one had
        results.append(row)
    return results


RUNNERS: dict[str, Callable[[argparse.Namespace], list[dict[str, Any]]]] = {
    "naive": run_naive,
    "poolkit": run_poolkit,
    "recycle": run_recycle,
}


# -- output ---------------------------------------------------------------------------------


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


COLUMNS = (
    # (heading, width, the row's figure)
    ("range", 5, lambda row: row["range_size"]),
    ("eps", 3, lambda row: row["endpoints"]),
    ("srcs", 4, lambda row: max(len(row["sources"]), 1)),
    ("slots", 5, lambda row: row["slots"]),
    ("requests", 8, lambda row: row["requests"]),
    ("until 1st fail", 14, lambda row: row["until_first_failure"]),
    ("failures", 8, lambda row: row["failures"]),
    ("dry at s", 8, lambda row: row["ran_dry_seconds"]),
    ("TIME_WAIT", 9, lambda row: row["time_wait"]),
    ("srv TW", 6, lambda row: row["server_time_wait"]),
    ("conns", 5, lambda row: row["max_connections"]),
    ("ports", 5, lambda row: row["ports_seen"]),
    ("seconds", 7, lambda row: f"{row['seconds']:.1f}"),
)


def table(report: dict[str, Any]) -> str:
    ns = report["namespace"]
    lines = [
        (
            f"each scenario in a network namespace of its own: tcp_tw_reuse {ns['tcp_tw_reuse']}, "
            f"TIME_WAIT lasts {TIME_WAIT_SECONDS} s; grpcio {grpc.__version__}"
        ),
        "",
        " ".join([f"{'scenario':<18}", *(f"{heading:>{width}}" for heading, width, _ in COLUMNS)]),
    ]
    notes = []
    for row in report["scenarios"]:
        if row["status"] != "ran":
            lines.append(f"{row['name']:<18} {row['status']}: {row['reason']}")
            continue
        lines.append(" ".join([f"{row['name']:<18}", *(f"{_dash(cell(row)):>{width}}" for _, width, cell in COLUMNS)]))
        error = row["first_error"]
        if error is not None:
            kinds = ", ".join(f"{count} {kind}" for kind, count in row["failures_by_kind"].items() if count)
            notes.append(f"  {row['name']} ({kinds}): {error['code']}: {error['details']}")
    if notes:
        lines += ["", "failures by kind, and the first error:", *notes]
    bound = [row for row in report["scenarios"] if row["status"] == "ran" and row["sources"]]
    if bound:
        lines += [
            "",
            (
                "per source address: client TIME_WAIT at the end / most connections at once / "
                "most connections failing to connect at once / distinct ports the servers saw"
            ),
        ]
        for row in bound:
            figures = (
                row["time_wait_by_source"],
                row["max_connections_by_source"],
                row["max_failing_slots_by_source"],
                row["ports_seen_by_source"] or {},
            )
            cells = [f"{source} {'/'.join(str(f.get(source, 0)) for f in figures)}" for source in row["sources"]]
            lines.append(f"  {row['name']:<18} {'  '.join(cells)}")
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------


def _scenarios(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown scenario {', '.join(unknown)!r}; choose from {', '.join(SCENARIOS)}")
    return tuple(name for name in SCENARIOS if name in names)


def _port_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        span = int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW-HIGH") from None
    if not 1024 <= span[0] <= span[1] < NAIVE_PORT:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1024 <= LOW <= HIGH < {NAIVE_PORT} (the servers' ports)")
    return span


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text}: need more than 0 and at most {MAX_SECONDS} seconds")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="exhaustion.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--scenarios", type=_scenarios, default=SCENARIOS, help="comma list of naive,poolkit,recycle (all)")
    add("--json", type=Path, help="also write the figures to this file")
    add("--port-range", type=_port_range, default=DEFAULT_PORT_RANGE, help="LOW-HIGH (40000-40099)")
    add("--recycle-port-range", type=_port_range, help="recycle: LOW-HIGH (as --port-range)")
    add("--naive-cap", type=_positive, default=3000, help="naive: at most this many requests (3000)")
    add("--naive-seconds", type=_seconds, default=60.0, help="naive: at most this long (60)")
    add("--endpoints", type=_positive, default=2, help="poolkit: servers (2)")
    add("--threads", type=_positive, default=8, help="poolkit: calling threads (8)")
    add("--poolkit-calls", type=_positive, default=20_000, help="poolkit: calls (20000)")
    add("--poolkit-seconds", type=_seconds, default=60.0, help="poolkit: at most this long (60)")
    add("--poolkit-slots", type=_positive, default=1, help="poolkit: connections_per_endpoint (1)")
    add("--recycle-endpoints", type=_positive, default=1, help="recycle: servers (1)")
    add("--max-age-ms", type=_positive, default=30, help="recycle: the servers' grpc.max_connection_age_ms (30)")
    add("--max-age-grace-ms", type=_positive, default=1000, help="recycle: grpc.max_connection_age_grace_ms (1000)")
    add("--recycle-connections", type=_positive, default=8, help="recycle: connections per server, all sources (8)")
    add("--recycle-threads", type=_positive, default=2, help="recycle: calling threads (2)")
    add("--recycle-calls", type=_positive, default=1_000_000, help="recycle: at most this many calls per case")
    add("--recycle-seconds", type=_seconds, default=60.0, help="recycle: at most this long per case (60)")
    return parser.parse_args(argv)


def scenario_limit(name: str, args: argparse.Namespace) -> float:
    """How long scenario `name` may take, its servers' start-up and the pool's close included."""
    seconds = {
        "naive": args.naive_seconds,
        "poolkit": args.poolkit_seconds,
        "recycle": 2 * args.recycle_seconds,
    }[name]
    return seconds + STARTUP_MARGIN


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if NETNS_ENV in os.environ:
        return run_here(args)
    unshare = namespace_command()
    report: dict[str, Any] = {
        "namespace": {"tcp_tw_reuse": 0, "time_wait_seconds": TIME_WAIT_SECONDS},
        "grpcio": grpc.__version__,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "scenarios": [],
    }
    for name in args.scenarios:
        print(f"running {name} in a new network namespace ...", file=sys.stderr, flush=True)
        part = run_in_namespace(unshare, argv, name, scenario_limit(name, args))
        report["namespace"] = part.get("namespace", report["namespace"])
        report["scenarios"] += part["scenarios"]
    print(table(report), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any(row["status"] == "failed" for row in report["scenarios"]) else 0


def run_here(args: argparse.Namespace) -> int:
    """Inside the namespace: set it up, run the scenarios, report."""
    report: dict[str, Any] = {"scenarios": []}
    for name in args.scenarios:
        span = args.recycle_port_range if name == "recycle" and args.recycle_port_range else args.port_range
        set_up_namespace(span)
        sysctls = read_sysctls()
        report["namespace"] = {"tcp_tw_reuse": int(sysctls["tcp_tw_reuse"]), "time_wait_seconds": TIME_WAIT_SECONDS}
        low, high = (int(part) for part in sysctls["ip_local_port_range"].split())
        for row in RUNNERS[name](args):
            report["scenarios"].append({**row, "port_range": [low, high], "range_size": high - low + 1})
    print(table(report), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
