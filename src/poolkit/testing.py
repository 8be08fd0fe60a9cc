"""Real echo + grpc.health.v1 servers on loopback, for tests, examples, the demo and benchmarks.

In-process::

    with poolkit.testing.start_echo_servers(4) as servers:
        channel = poolkit.insecure_channel(servers.target)
        stub = poolkit.testing.EchoStub(channel)

In another process (so its CPU is not the client's, and it can be killed or stopped)::

    with poolkit.testing.spawn_echo_servers(4) as servers:
        ...
        servers.kill()
        servers.restart()  # the same addresses again

Faults: `EchoServer.fail_code` and `fail_next` make echo calls fail with a status code,
and a `FaultProxy` in front of a server stalls, refuses, resets or delays its connections::

    with poolkit.testing.FaultProxy(server.address) as proxy:
        channel = grpc.insecure_channel(proxy.address)
        proxy.black_hole()

`python -m poolkit.testing --count 4` serves until interrupted and prints the addresses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ._fault_proxy import FaultProxy, bracketed, split_address
from ._proto import echo_pb2, echo_pb2_grpc
from ._proto.echo_pb2 import EchoRequest, EchoResponse, StatsRequest, StatsResponse
from ._proto.echo_pb2_grpc import EchoStub
from ._retry import PUSHBACK_HEADER

__all__ = [
    "ECHO_SERVICE",
    "FAIL_DETAILS",
    "EchoRequest",
    "EchoResponse",
    "EchoServer",
    "EchoServers",
    "EchoStub",
    "FaultProxy",
    "SpawnedEchoServers",
    "StatsRequest",
    "StatsResponse",
    "echo_pb2",
    "echo_pb2_grpc",
    "spawn_echo_servers",
    "start_echo_servers",
]

ECHO_SERVICE = "poolkit.echo.v1.Echo"

FAIL_DETAILS = "poolkit.testing: failing on purpose"
"""The details of an echo call failed by `EchoServer.fail_code` or `fail_next`."""

_NO_SHARED_PORTS = ("grpc.so_reuseport", 0)
"""grpc servers set SO_REUSEPORT by default, so a second server could bind a port a live
one holds and the two would split its connections. Without it a port has one owner;
grpc's SO_REUSEADDR still lets a restarted server bind a port whose old connections
linger in TIME_WAIT."""


@dataclass
class _Counts:
    calls: int = 0
    peers: set[str] = field(default_factory=set)


class _EchoServicer(echo_pb2_grpc.EchoServicer):
    def __init__(self, server_id: str, delay: float) -> None:
        self.server_id = server_id
        self.delay = delay  # extra latency added to every echo call, in seconds
        self.delay_share = 1.0  # the share of calls (at random) that get `delay`
        self._random = random.Random(server_id)
        self._lock = threading.Lock()
        self._counts = _Counts()
        self._fail_code: grpc.StatusCode | None = None  # every echo call fails with it
        self._fail_next: tuple[int, grpc.StatusCode, str | None] = (0, grpc.StatusCode.UNAVAILABLE, None)

    @property
    def fail_code(self) -> grpc.StatusCode | None:
        with self._lock:
            return self._fail_code

    @fail_code.setter
    def fail_code(self, code: grpc.StatusCode | None) -> None:
        with self._lock:
            self._fail_code = code

    def fail_next(self, count: int, code: grpc.StatusCode, pushback_ms: str | None = None) -> None:
        with self._lock:
            self._fail_next = (count, code, pushback_ms)

    def _admit(self, context: grpc.ServicerContext) -> None:
        """Fail the call at once, counted as arrived, if the server is set to fail calls."""
        with self._lock:
            remaining, code, pushback = self._fail_next
            if remaining:
                self._fail_next = (remaining - 1, code, pushback)
            elif self._fail_code is not None:
                code, pushback = self._fail_code, None
            else:
                return
            self._counts.calls += 1
            self._counts.peers.add(context.peer())
        if pushback is not None:
            context.set_trailing_metadata(((PUSHBACK_HEADER, pushback),))
        context.abort(code, FAIL_DETAILS)

    def _arrive(self, request: EchoRequest, context: grpc.ServicerContext) -> None:
        with self._lock:
            self._counts.calls += 1
            self._counts.peers.add(context.peer())
        delay = self.delay if self.delay_share >= 1 or self._random.random() < self.delay_share else 0.0
        pause = delay + request.delay_ms / 1000
        if pause > 0:
            time.sleep(pause)
        if request.fail_code:
            context.abort(grpc.StatusCode(_status_code(request.fail_code)), request.fail_details)

    def _reply(self, request: EchoRequest, context: grpc.ServicerContext, index: int = 0) -> EchoResponse:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        return EchoResponse(
            payload=request.payload,
            server_id=self.server_id,
            peer=context.peer(),
            index=index,
            metadata=metadata,
        )

    def Unary(self, request: EchoRequest, context: grpc.ServicerContext) -> EchoResponse:
        self._admit(context)
        self._arrive(request, context)
        return self._reply(request, context)

    def ServerStream(self, request: EchoRequest, context: grpc.ServicerContext) -> Iterator[EchoResponse]:
        self._admit(context)
        self._arrive(request, context)
        for index in range(max(request.repeat, 1)):
            if index and request.delay_ms:
                time.sleep(request.delay_ms / 1000)
            yield self._reply(request, context, index)

    def ClientStream(self, request_iterator: Iterator[EchoRequest], context: grpc.ServicerContext) -> EchoResponse:
        self._admit(context)
        payloads = []
        last = EchoRequest()
        for request in request_iterator:
            payloads.append(request.payload)
            last = request
        self._arrive(last, context)
        return self._reply(EchoRequest(payload=b"".join(payloads)), context)

    def BidiStream(
        self, request_iterator: Iterator[EchoRequest], context: grpc.ServicerContext
    ) -> Iterator[EchoResponse]:
        self._admit(context)
        for index, request in enumerate(request_iterator):
            if index == 0:
                self._arrive(request, context)
            elif request.delay_ms:
                time.sleep(request.delay_ms / 1000)
            if request.fail_code and index:
                context.abort(grpc.StatusCode(_status_code(request.fail_code)), request.fail_details)
            yield self._reply(request, context, index)

    def Stats(self, request: StatsRequest, context: grpc.ServicerContext) -> StatsResponse:
        with self._lock:
            counts = self._counts
            if request.reset:
                self._counts = _Counts()
        return StatsResponse(server_id=self.server_id, calls=counts.calls, peers=sorted(counts.peers))

    def counts(self) -> _Counts:
        with self._lock:
            return _Counts(self._counts.calls, set(self._counts.peers))


def _status_code(number: int) -> tuple[int, str]:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.value  # type: ignore[no-any-return]
    raise ValueError(f"fail_code {number} is not a grpc status code")


class EchoServer:
    """One in-process echo + health server on loopback, on `port` or (0) one the kernel
    chooses; over TLS when given server `credentials` (`grpc.ssl_server_credentials`)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        server_id: str | None = None,
        delay: float = 0.0,
        max_workers: int = 16,
        options: Sequence[tuple[str, object]] = (),
        port: int = 0,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.host = host
        options = list(options)
        if not any(name == _NO_SHARED_PORTS[0] for name, _ in options):
            options.append(_NO_SHARED_PORTS)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
        listen_host = bracketed(host)
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(f"{listen_host}:{port}")
            else:
                self.port = self._server.add_secure_port(f"{listen_host}:{port}", credentials)
        except RuntimeError as error:  # grpc's way of saying the bind failed
            raise OSError(f"cannot listen on {listen_host}:{port}: {error}") from None
        if self.port == 0:
            raise OSError(f"cannot listen on {listen_host}:{port}")
        self.address = f"{listen_host}:{self.port}"
        self.server_id = server_id or self.address
        self._echo = _EchoServicer(self.server_id, delay)
        self.health = health.HealthServicer()
        echo_pb2_grpc.add_EchoServicer_to_server(self._echo, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.set_serving(True)
        self._server.start()
        self._stopped = False

    @property
    def delay(self) -> float:
        return self._echo.delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        self._echo.delay = seconds

    @property
    def delay_share(self) -> float:
        """The share of echo calls, chosen at random, that `delay` applies to (1.0: all)."""
        return self._echo.delay_share

    @delay_share.setter
    def delay_share(self, share: float) -> None:
        if not 0 <= share <= 1:
            raise ValueError(f"delay_share must be between 0 and 1, not {share}")
        self._echo.delay_share = share

    @property
    def fail_code(self) -> grpc.StatusCode | None:
        """While set, every echo call (not Stats, not health) fails with this code and
        `FAIL_DETAILS`, as a server whose backend is down would. None serves normally."""
        return self._echo.fail_code

    @fail_code.setter
    def fail_code(self, code: grpc.StatusCode | None) -> None:
        if code is grpc.StatusCode.OK:
            raise ValueError("fail_code cannot be OK: a call cannot fail with OK")
        self._echo.fail_code = code

    def fail_next(
        self, count: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, *, pushback_ms: str | int | None = None
    ) -> None:
        """Fail the next `count` echo calls with `code`, whatever `fail_code` says; then
        serve as before. `fail_next(0)` cancels what is left of an earlier count. With
        `pushback_ms`, those failures carry `grpc-retry-pushback-ms` with that value
        (a string is sent as given, so malformed values can be tested too)."""
        if count < 0:
            raise ValueError(f"fail_next count must be 0 or more, not {count}")
        if code is grpc.StatusCode.OK:
            raise ValueError("fail_next code cannot be OK: a call cannot fail with OK")
        self._echo.fail_next(count, code, None if pushback_ms is None else str(pushback_ms))

    @property
    def calls(self) -> int:
        """Echo calls served so far, failed ones included (Stats calls not counted)."""
        return self._echo.counts().calls

    @property
    def peers(self) -> set[str]:
        """Distinct client peers seen by echo calls: one per client TCP connection."""
        return self._echo.counts().peers

    def set_serving(self, serving: bool, service: str = "") -> None:
        """Flip the grpc.health.v1 status of `service` ("" is the whole server) and the echo service."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in {service, ECHO_SERVICE} if not service else {service}:
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> None:
        if not self._stopped:
            self._stopped = True
            self._server.stop(grace).wait()

    def __repr__(self) -> str:
        return f"<EchoServer {self.address} calls={self.calls}>"


class EchoServers(Sequence[EchoServer]):
    """A group of in-process echo servers; a context manager that stops them all."""

    def __init__(self, servers: Sequence[EchoServer]) -> None:
        self._servers = list(servers)

    def __getitem__(self, index: int) -> EchoServer:  # type: ignore[override]
        return self._servers[index]

    def __len__(self) -> int:
        return len(self._servers)

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self._servers]

    @property
    def target(self) -> str:
        """A grpc target naming every server: "ipv4:a:1,b:2" (or "ipv6:..." for IPv6 hosts)."""
        return _target_for(self.addresses)

    def stop(self, grace: float | None = None) -> None:
        for server in self._servers:
            server.stop(grace)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _target_for(addresses: Sequence[str]) -> str:
    scheme = "ipv6" if addresses and addresses[0].startswith("[") else "ipv4"
    return f"{scheme}:{','.join(addresses)}"


def start_echo_servers(
    count: int = 1,
    host: str = "127.0.0.1",
    *,
    delays: Sequence[float] = (),
    max_workers: int = 16,
    options: Sequence[tuple[str, object]] = (),
    ports: Sequence[int] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> EchoServers:
    """Start `count` in-process servers on `host`; `delays[i]` adds latency to server i,
    and server i listens on `ports[i]` (0 or none given: a port the kernel chooses); all
    over TLS with `credentials`, if given."""
    if len(ports) > count:
        raise ValueError(f"{len(ports)} ports given for {count} servers")
    servers: list[EchoServer] = []
    try:
        for i in range(count):
            delay = delays[i] if i < len(delays) else 0.0
            port = ports[i] if i < len(ports) else 0
            servers.append(
                EchoServer(
                    host,
                    server_id=f"echo-{i}",
                    delay=delay,
                    max_workers=max_workers,
                    options=options,
                    port=port,
                    credentials=credentials,
                )
            )
    except BaseException:
        EchoServers(servers).stop()
        raise
    return EchoServers(servers)


class SpawnedEchoServers:
    """Echo servers running in a child process, which the caller can kill, pause, resume
    or restart.

    The whole group lives in one process: `kill()` takes every server down at once.
    Spawn one group per server when servers must fail independently.
    """

    def __init__(self, process: subprocess.Popen[str], addresses: list[str], *, command: Sequence[str] = ()) -> None:
        self.process = process
        self.addresses = addresses
        self._command = list(command)  # the child's command line, less its ports: for restart()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def target(self) -> str:
        return _target_for(self.addresses)

    def stats(self, reset: bool = False) -> list[StatsResponse]:
        """Each server's Stats, asked over a fresh connection that the servers do not count."""
        results = []
        for address in self.addresses:
            with grpc.insecure_channel(address) as channel:
                results.append(EchoStub(channel).Stats(StatsRequest(reset=reset), timeout=10))
        return results

    def pause(self) -> None:
        """SIGSTOP: the servers keep their sockets but answer nothing (a black hole)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the servers vanish at once, as in a crash; their ports are free again."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            self.process.kill()
        self.process.wait(timeout=10)
        self._close_pipe()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._close_pipe()

    def restart(self, startup_timeout: float = 30.0) -> None:
        """Kill the child process if it still runs, then start a new one serving the same
        addresses with the same delays and options, as a supervisor restarts a crashed
        server. The new servers' counts start from zero; `process` is the new child."""
        if not self._command:
            raise RuntimeError("restart() needs servers started by spawn_echo_servers()")
        self.kill()
        ports = [split_address(address)[1] for address in self.addresses]
        process, addresses = _launch([*self._command, "--ports", json.dumps(ports)], startup_timeout)
        if addresses != self.addresses:  # the child binds exactly these ports or fails to start
            process.kill()
            process.wait()
            raise RuntimeError(f"restarted echo servers listen on {addresses}, not {self.addresses}")
        self.process = process

    def _close_pipe(self) -> None:
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __repr__(self) -> str:
        state = "running" if self.process.poll() is None else f"exited {self.process.returncode}"
        return f"<SpawnedEchoServers pid={self.pid} {state} {','.join(self.addresses)}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def spawn_echo_servers(
    count: int = 1,
    host: str = "127.0.0.1",
    *,
    delays: Sequence[float] = (),
    max_workers: int = 16,
    options: Sequence[tuple[str, object]] = (),
    ports: Sequence[int] = (),
    startup_timeout: float = 30.0,
) -> SpawnedEchoServers:
    """Start `count` echo servers in one child process and wait until they listen; server
    i on `ports[i]` (0 or none given: a port the kernel chooses)."""
    if len(ports) > count:
        raise ValueError(f"{len(ports)} ports given for {count} servers")
    command = [
        sys.executable,
        "-m",
        "poolkit.testing",
        "--count",
        str(count),
        "--host",
        host,
        "--max-workers",
        str(max_workers),
    ]
    command += ["--delays", json.dumps(list(delays)), "--options", json.dumps([list(o) for o in options])]
    process, addresses = _launch([*command, "--ports", json.dumps(list(ports))], startup_timeout)
    return SpawnedEchoServers(process, addresses, command=command)


def _launch(command: list[str], startup_timeout: float) -> tuple[subprocess.Popen[str], list[str]]:
    """Start a `python -m poolkit.testing` child and read the addresses it listens on."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = _readline_within(process, startup_timeout)
    try:
        addresses: list[str] = json.loads(line)["addresses"]
    except (ValueError, KeyError):
        process.kill()
        process.wait()
        raise RuntimeError(f"echo server process did not start (said {line!r})") from None
    return process, addresses


def _readline_within(process: subprocess.Popen[str], timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(
        target=lambda: result.append(process.stdout.readline() if process.stdout else ""), daemon=True
    )
    reader.start()
    reader.join(timeout)
    if not result:
        process.kill()
        process.wait()
        raise RuntimeError(f"echo server process did not start within {timeout} s")
    return result[0]


def _serve(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m poolkit.testing", description="Serve echo + health on loopback.")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--max-workers", type=int, default=16)
    parser.add_argument("--delays", default="[]", help="JSON list of per-server delays in seconds")
    parser.add_argument("--options", default="[]", help="JSON list of [name, value] server options")
    parser.add_argument("--ports", default="[]", help="JSON list of per-server ports (0: the kernel chooses)")
    args = parser.parse_args(argv)
    options = [tuple(o) for o in json.loads(args.options)]
    servers = start_echo_servers(
        args.count,
        args.host,
        delays=json.loads(args.delays),
        max_workers=args.max_workers,
        options=options,
        ports=json.loads(args.ports),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(json.dumps({"addresses": servers.addresses}), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    servers.stop(grace=1.0)
    return 0


if __name__ == "__main__":
    sys.exit(_serve())
