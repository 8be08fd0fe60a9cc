"""A user-space TCP proxy that misbehaves on demand: pass bytes, hold them (a black
hole), refuse or reset connections, or delay them. `poolkit.testing.FaultProxy`."""

from __future__ import annotations

import contextlib
import math
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self


def bracketed(host: str) -> str:
    """`host` as it goes before ":port": an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def split_address(address: str) -> tuple[str, int]:
    """("127.0.0.1", 50051) from "127.0.0.1:50051", ("::1", 50051) from "[::1]:50051"."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not a 'host:port' or '[v6 host]:port' address")
    return host, int(port)


_PROXY_TICK = 0.05
"""Longest a proxy thread waits before it looks again at whether it must stop, reset or
change mode: a 50 ms reaction for tests, 20 wake-ups a second per idle connection."""

_PROXY_CHUNK = 64 * 1024
"""Bytes read at a time: a few HTTP/2 frames of the default 16 KiB size."""

_PROXY_BUFFER = 1 << 20
"""Bytes held per direction before the proxy stops reading that side, so a slow reader
slows its writer through TCP flow control rather than growing the proxy's memory."""

_PROXY_CONNECT_TIMEOUT = 2.0
"""Seconds to connect upstream: loopback answers at once, a stopped server's full
backlog does not."""

_PROXY_JOIN_TIMEOUT = 5.0
"""Seconds `close()` and `reset_all()` wait for the proxy's threads: each looks up within
a tick, or within the connect timeout while connecting upstream."""

_POLLIN = select.POLLIN | select.POLLHUP | select.POLLERR
_POLLOUT = select.POLLOUT | select.POLLHUP | select.POLLERR


@dataclass(frozen=True)
class _ProxyMode:
    name: str
    forward: bool = True  # False holds every byte where it is, in both directions
    refuse_new: bool = False  # reset new connections as soon as they are accepted
    delay: float = 0.0  # seconds each chunk waits before it is forwarded


class FaultProxy:
    """A TCP proxy on loopback in front of one server, told by the test how to misbehave.

    Clients connect to `address`; each connection gets its own upstream connection and a
    thread relaying bytes both ways. The mode applies at once to every connection:

    - `pass_through()` (the default) relays everything;
    - `black_hole()` relays nothing, holding bytes where they are and connections open:
      the client sees a stalled peer, as with a SIGSTOPped server or a firewall that
      drops packets. `pass_through()` afterwards delivers what was held;
    - `refuse()` resets each new connection as soon as it is accepted; open ones go on;
    - `delay(seconds)` holds each chunk that long before relaying it.

    `reset_all()` resets every open connection (RST, not FIN), as a crashed peer or a
    middlebox would. A context manager; `close()` stops every thread and is idempotent.
    """

    def __init__(self, upstream: str, host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self._upstream = split_address(upstream)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.bind((host, 0))
            self._listener.listen(128)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self.address = f"{bracketed(host)}:{self.port}"
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._mode = _ProxyMode("pass")
        self._links: set[_Link] = set()
        self._accepted = 0
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept_all, name=f"poolkit-fault-proxy-{self.port}", daemon=True)
        self._acceptor.start()

    # -- modes

    @property
    def mode(self) -> str:
        """ "pass", "black_hole", "refuse" or "delay"."""
        return self._mode.name

    def pass_through(self) -> None:
        self._set_mode(_ProxyMode("pass"))

    def black_hole(self) -> None:
        self._set_mode(_ProxyMode("black_hole", forward=False))

    def refuse(self) -> None:
        self._set_mode(_ProxyMode("refuse", refuse_new=True))

    def delay(self, seconds: float) -> None:
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"delay must be a finite number of seconds, 0 or more, not {seconds!r}")
        self._set_mode(_ProxyMode("delay", delay=seconds))

    def _set_mode(self, mode: _ProxyMode) -> None:
        with self._lock:
            self._mode = mode
            self._changed.notify_all()

    def reset_all(self) -> int:
        """Reset every open connection, both its client and its upstream side, and wait
        (boundedly) until they are; how many there were."""
        with self._lock:
            links = list(self._links)
            for link in links:
                link.reset = True
            self._changed.notify_all()
        _join_all([link.thread for link in links], _PROXY_JOIN_TIMEOUT)
        return len(links)

    # -- state

    @property
    def connections(self) -> int:
        """Client connections open through the proxy now."""
        with self._lock:
            return len(self._links)

    @property
    def accepted(self) -> int:
        """Client connections accepted so far, refused ones included."""
        with self._lock:
            return self._accepted

    def close(self) -> None:
        """Stop accepting, close every connection, and wait (boundedly) for the threads."""
        with self._lock:
            self._closed = True
            links = list(self._links)
            self._changed.notify_all()
        _join_all([self._acceptor, *(link.thread for link in links)], _PROXY_JOIN_TIMEOUT)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.mode
        return f"<FaultProxy {self.address} -> {self.upstream} {state} connections={self.connections}>"

    # -- the threads' side

    def _accept_all(self) -> None:
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        try:
            while not self._closed:
                if not poller.poll(_PROXY_TICK * 1000):
                    continue
                try:
                    client, _ = self._listener.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue  # the client gave up before we got to it
                except OSError:  # out of file descriptors, say: wait rather than spin
                    with self._lock:
                        self._changed.wait(_PROXY_TICK)
                    continue
                self._admit(client)
        finally:
            self._listener.close()

    def _admit(self, client: socket.socket) -> None:
        with self._lock:
            self._accepted += 1
            refuse = self._closed or self._mode.refuse_new
            if not refuse:
                link = _Link(self, client)
                self._links.add(link)
                link.thread.start()  # under the lock, so close() never sees a link it cannot join
        if refuse:
            _close_socket(client, reset=True)

    def _next_mode(self, link: _Link) -> _ProxyMode | None:
        """The mode to relay in, once any black hole is over; None when `link` must end."""
        with self._lock:
            while not (self._closed or link.reset or self._mode.forward):
                self._changed.wait(_PROXY_TICK)
            return None if self._closed or link.reset else self._mode

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)


class _Flow:
    """Bytes read from one side of a link and not yet written to the other, each chunk
    with the time it may go."""

    __slots__ = ("chunks", "open", "queued", "shut")

    def __init__(self) -> None:
        self.chunks: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self.open = True  # the source has not ended its side
        self.shut = False  # the sink was told the source has ended (shutdown SHUT_WR)

    def wants_input(self) -> bool:
        return self.open and self.queued < _PROXY_BUFFER

    def due(self, now: float) -> bool:
        return bool(self.chunks) and self.chunks[0][0] <= now

    def read(self, source: socket.socket, due: float) -> None:
        try:
            data = source.recv(_PROXY_CHUNK)
        except (BlockingIOError, InterruptedError):  # readiness was a false alarm
            return
        if data:
            self.chunks.append((due, data))
            self.queued += len(data)
        else:
            self.open = False

    def write(self, sink: socket.socket) -> None:
        due, data = self.chunks[0]
        try:
            sent = sink.send(data)
        except (BlockingIOError, InterruptedError):
            return
        self.queued -= sent
        if sent == len(data):
            self.chunks.popleft()
        else:
            self.chunks[0] = (due, data[sent:])

    def finish(self, sink: socket.socket) -> bool:
        """Pass the source's end on once everything before it went; True when done."""
        if not self.open and not self.chunks and not self.shut:
            self.shut = True
            sink.shutdown(socket.SHUT_WR)
        return self.shut


class _Link:
    """One client connection through a `FaultProxy`, its upstream connection, and the
    thread relaying between them."""

    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.reset = False  # set (under the proxy's lock) to end the link with RSTs
        self.thread = threading.Thread(target=self._run, name=f"poolkit-fault-proxy-{proxy.port}-link", daemon=True)

    def _run(self) -> None:
        reset = True  # unless the relay ends cleanly: whatever broke one side breaks the other
        try:
            reset = self._relay()
        except OSError:  # a side was reset or refused
            pass
        finally:
            for sock in (self.client, self.upstream):
                if sock is not None:
                    _close_socket(sock, reset=reset)
            self.proxy._forget(self)

    def _relay(self) -> bool:
        """Relay until both sides have ended (False) or the link must end now (whether
        with a reset)."""
        upward, downward = _Flow(), _Flow()
        while True:
            mode = self.proxy._next_mode(self)
            if mode is None:
                return self.reset
            if self.upstream is None:
                self.upstream = self._connect()
            flows = ((self.client, self.upstream, upward), (self.upstream, self.client, downward))
            self._step(flows, mode.delay)
            upstream_done = upward.finish(self.upstream)
            client_done = downward.finish(self.client)
            if upstream_done and client_done:
                return False

    def _connect(self) -> socket.socket:
        """Connect upstream now that there is something to relay (a black hole never does)."""
        upstream = socket.create_connection(self.proxy._upstream, timeout=_PROXY_CONNECT_TIMEOUT)
        for sock in (self.client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return upstream

    @staticmethod
    def _step(flows: Sequence[tuple[socket.socket, socket.socket, _Flow]], delay: float) -> None:
        """Wait up to a tick for a side to be readable or writable, then read and write."""
        now = time.monotonic()
        masks: dict[int, int] = {}
        for source, sink, flow in flows:
            if flow.wants_input():
                masks[source.fileno()] = masks.get(source.fileno(), 0) | select.POLLIN
            if flow.due(now):
                masks[sink.fileno()] = masks.get(sink.fileno(), 0) | select.POLLOUT
        wait = _PROXY_TICK
        for _, _, flow in flows:
            if flow.chunks and not flow.due(now):
                wait = min(wait, flow.chunks[0][0] - now)
        poller = select.poll()
        for fd, mask in masks.items():
            poller.register(fd, mask)
        events = dict(poller.poll(max(1, math.ceil(wait * 1000))))
        now = time.monotonic()
        for source, sink, flow in flows:
            if masks.get(source.fileno(), 0) & select.POLLIN and events.get(source.fileno(), 0) & _POLLIN:
                flow.read(source, now + delay)
            if masks.get(sink.fileno(), 0) & select.POLLOUT and events.get(sink.fileno(), 0) & _POLLOUT:
                flow.write(sink)


def _close_socket(sock: socket.socket, *, reset: bool) -> None:
    """Close `sock`; with `reset`, abortively (SO_LINGER 0), so the peer gets an RST."""
    with contextlib.suppress(OSError):
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _join_all(threads: Sequence[threading.Thread], timeout: float) -> None:
    """Join `threads`, all within `timeout` seconds together."""
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
