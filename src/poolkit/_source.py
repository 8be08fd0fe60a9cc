"""Binding a connection to a local source address, and the port budget it draws on.

grpcio has no local-address option. It does take a `grpc_socket_mutator*` as the
pointer-valued channel option "grpc.socket_mutator": an object whose `__int__` is a C
address is passed through as a pointer. grpc calls the mutator's `mutate_fd(fd,
mutator)` on one of its threads for every new client connection, before connect(); this
module's mutator sets `IP_BIND_ADDRESS_NO_PORT` and binds the socket to the source
address, so the kernel picks the port at connect() time per destination (without that
option, bind() would reserve a port across the whole source address and shrink its port
space to one range for all destinations).

The mutator is a C struct laid out as grpc's (a vtable of mutate_fd, compare, destroy,
mutate_fd_2; then a reference count), built with ctypes. The layout is not a public API,
so before any channel uses it, `self_check` proves on the installed grpcio that it works
(a connection to a loopback listener must arrive from the source bound); if not,
`SourceBindingUnavailable` says so, and no connection is ever opened unbound instead.

grpc dials IPv4 destinations on dual-stack IPv6 sockets (with the address v4-mapped), so
an IPv4 source is bound as `::ffff:a.b.c.d` on those; an IPv4 source can never reach an
IPv6 destination, and routes are only made for matching families.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import fcntl
import ipaddress
import socket
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from ._errors import ConfigError, SourceBindingUnavailable
from ._target import Endpoint, Source, sources_for

# <linux/in.h>: bind() picks no port; connect() does, per (source, destination) 4-tuple.
IP_BIND_ADDRESS_NO_PORT = 24
_SIOCGIFCONF = 0x8912
_IFREQ_SIZE = 40  # sizeof(struct ifreq) on 64-bit Linux
_IFNAMSIZ = 16
_LINK_LOCAL = 0x20  # /proc/net/if_inet6's scope of fe80::/10
_PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
_TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
# /proc/net/tcp state codes (include/net/tcp_states.h).
_ESTABLISHED = "01"
_TIME_WAIT = "06"
_LISTEN = "0A"
_SELF_CHECK_SOURCE = "127.0.0.2"  # every 127.0.0.0/8 address is local on Linux
_SELF_CHECK_SERVER = "127.0.0.254"
_SELF_CHECK_TIMEOUT = 5.0

_MUTATE_FD = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_int, ctypes.c_void_p)
_COMPARE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_DESTROY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _Vtable(ctypes.Structure):
    _fields_ = (
        ("mutate_fd", _MUTATE_FD),
        ("compare", _COMPARE),
        ("destroy", _DESTROY),
        ("mutate_fd_2", ctypes.c_void_p),  # NULL: grpc calls mutate_fd for client connections
    )


class _Mutator(ctypes.Structure):
    _fields_ = (
        ("vtable", ctypes.POINTER(_Vtable)),
        ("refcount", ctypes.c_ssize_t),  # gpr_refcount: one intptr_t
    )


class SourceBinding:
    """The mutator for one source address: a grpc channel option value (its `__int__` is
    the C struct's address). One per source per process, never freed: grpc may hold the
    pointer until its connections are gone, which is after any channel's close()."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.bound = 0  # connections bound so far
        self.failures = 0
        self.last_error: str | None = None
        self._mutator = _Mutator(ctypes.pointer(_VTABLE), 1)  # our own reference: never reaches 0
        self.pointer = ctypes.addressof(self._mutator)

    def __int__(self) -> int:
        return self.pointer

    def bind(self, fd: int) -> bool:
        """grpc's thread, before connect(): bind `fd` to the source, the port left to connect()."""
        address = self.source.address
        try:
            sock = socket.socket(fileno=fd)
        except OSError as error:
            return self._failed(f"cannot use the socket: {error}")
        try:
            if sock.family == socket.AF_INET6 and not self.source.is_ipv6:
                local: tuple[Any, ...] = (f"::ffff:{address}", 0)  # a dual-stack socket to an IPv4 server
            elif (sock.family == socket.AF_INET6) != self.source.is_ipv6:
                return self._failed(f"cannot bind {address} to an {sock.family.name} socket")
            else:
                local = (address, 0)
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind(local)
        except OSError as error:
            return self._failed(f"cannot bind {address}: {error.strerror or error}")
        finally:
            sock.detach()  # the descriptor is grpc's
        self.bound += 1
        return True

    def _failed(self, why: str) -> bool:
        self.failures += 1
        self.last_error = why
        return False

    def __repr__(self) -> str:
        return f"<SourceBinding {self.source.address} bound={self.bound} failures={self.failures}>"


_BINDINGS: dict[int, SourceBinding] = {}  # C address -> binding, for the callbacks
_BY_SOURCE: dict[Source, SourceBinding] = {}
_LOCK = threading.Lock()


def after_fork() -> None:
    """In a forked child (one thread): the lock a parent thread may have held, renewed."""
    global _LOCK  # noqa: PLW0603 - module state, replaced once in a new process
    _LOCK = threading.Lock()


def _mutate_fd(fd: int, pointer: int | None) -> bool:
    binding = _BINDINGS.get(pointer or 0)
    return binding is not None and binding.bind(fd)


def _compare(a: int | None, b: int | None) -> int:
    a, b = a or 0, b or 0
    return (a > b) - (a < b)


def _destroy(pointer: int | None) -> None:
    """grpc dropped its last reference: nothing to free (the binding lives on)."""


# The C callables and the vtable live as long as the process.
_CALLBACKS = (_MUTATE_FD(_mutate_fd), _COMPARE(_compare), _DESTROY(_destroy))
_VTABLE = _Vtable(*_CALLBACKS, None)


def binding_for(source: Source) -> SourceBinding:
    """The process's binding for `source` (made on first use)."""
    with _LOCK:
        binding = _BY_SOURCE.get(source)
        if binding is None:
            binding = _BY_SOURCE[source] = SourceBinding(source)
            _BINDINGS[binding.pointer] = binding
        return binding


def channel_options(source: Source) -> list[tuple[str, Any]]:
    """The grpc options that bind a channel's connections to `source`."""
    return [
        ("grpc.socket_mutator", binding_for(source)),
        # A proxy from the environment would carry the connection from elsewhere.
        ("grpc.enable_http_proxy", 0),
    ]


# -- proving it works -------------------------------------------------------------------

_checked: bool | None = None
_check_error = ""


def self_checked() -> bool:
    """Whether this process has run the self-check (whatever it found)."""
    with _LOCK:
        return _checked is not None


def self_check() -> None:
    """Prove once per process that grpc binds through the mutator: a connection to a
    loopback listener must arrive from `_SELF_CHECK_SOURCE`. Raise
    `SourceBindingUnavailable` if it does not."""
    global _checked, _check_error
    with _LOCK:
        checked = _checked
    if checked is None:
        error = _try_binding()
        with _LOCK:
            _checked, _check_error = error is None, error or ""
            checked = _checked
    if not checked:
        raise SourceBindingUnavailable(
            f"poolkit cannot bind connections to a source address with grpcio {grpc.__version__}: "
            f"{_check_error}. Leave PoolConfig.source_addresses empty to connect unbound."
        )


def _try_binding() -> str | None:
    """None when a bound connection arrived from the source; else what went wrong."""
    source = Source(_SELF_CHECK_SOURCE)
    binding = binding_for(source)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        # Not 127.0.0.1, and reusing ports in TIME_WAIT: a host short of ports there (the
        # very case for source binding) must still be able to run the check.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((_SELF_CHECK_SERVER, 0))
        except OSError as error:
            return f"cannot listen on {_SELF_CHECK_SERVER} for the check: {error.strerror or error}"
        listener.listen(1)
        listener.settimeout(_SELF_CHECK_TIMEOUT)
        port = listener.getsockname()[1]
        options = [*channel_options(source), ("grpc.use_local_subchannel_pool", 1)]
        channel = grpc.insecure_channel(f"ipv4:{_SELF_CHECK_SERVER}:{port}", options=options)
        # A call, not subscribe(): it makes grpc connect, and ends (the listener speaks no
        # HTTP/2) before the channel is closed. Closing a channel whose connectivity is
        # being watched races grpc's polling thread, which then dies noisily.
        ping = channel.unary_unary("/poolkit.SelfCheck/Bind", request_serializer=None, response_deserializer=None)
        call = ping.future(b"", timeout=_SELF_CHECK_TIMEOUT)
        try:
            try:
                accepted, peer = listener.accept()
            except TimeoutError:
                why = binding.last_error or "grpc never called the socket mutator"
                return f"no connection arrived within {_SELF_CHECK_TIMEOUT:.0f} s ({why})"
            accepted.close()
            with contextlib.suppress(grpc.RpcError, grpc.FutureTimeoutError, grpc.FutureCancelledError):
                call.result(timeout=_SELF_CHECK_TIMEOUT)
        finally:
            call.cancel()  # type: ignore[no-untyped-call]
            channel.close()
    host = str(peer[0]).removeprefix("::ffff:")
    if host != source.address:
        return f"a connection bound to {source.address} arrived from {host}"
    return None


# -- configuration --------------------------------------------------------------------------


def resolve_sources(names: Sequence[str]) -> list[Source]:
    """The sources `names` (IP literals, interface names) stand for, each proven local;
    a name that is neither, or an address not assigned to this host, is a `ConfigError`."""
    sources: dict[str, Source] = {}
    for name in names:
        for address in _addresses_of(name):
            _check_local(address, name)
            sources.setdefault(address, Source(address))
    return list(sources.values())


def check_routable(endpoints: Iterable[Endpoint], sources: Sequence[Source]) -> None:
    """A `ConfigError` for an endpoint that no source address can reach."""
    for endpoint in endpoints:
        if not sources_for(endpoint, sources):
            family = "IPv6" if endpoint.is_ipv6 else "IPv4"
            listed = ", ".join(source.address for source in sources)
            raise ConfigError(
                "source_addresses",
                listed,
                f"has no {family} address, so endpoint {endpoint.address} cannot be reached from any of them",
            )


def _addresses_of(name: str) -> list[str]:
    try:
        return [ipaddress.ip_address(name).compressed]
    except ValueError:
        pass
    interfaces = {interface for _, interface in socket.if_nameindex()}
    if name not in interfaces:
        raise ConfigError("source_addresses", name, "is neither an IP address nor a network interface of this host")
    addresses = [*_ipv4_of(name), *_ipv6_of(name)]
    if not addresses:
        raise ConfigError("source_addresses", name, "is an interface with no usable address")
    return addresses


def _ipv4_of(interface: str) -> list[str]:
    return [address for name, address in _ipv4_table() if name == interface]


def _ipv6_of(interface: str) -> list[str]:
    """The interface's global and loopback IPv6 addresses (link-local ones need a scope
    and serve only link-local servers: left out)."""
    return [address for name, address, scope in _ipv6_table() if name == interface and scope != _LINK_LOCAL]


def _ipv4_table() -> list[tuple[str, str]]:
    """(interface, address) for every IPv4 address of this host, secondary ones included
    (SIOCGIFCONF)."""
    size = _IFREQ_SIZE * 1024
    buffer = array.array("B", bytes(size))
    request = struct.pack("iL", size, buffer.buffer_info()[0])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            answer = fcntl.ioctl(sock.fileno(), _SIOCGIFCONF, request)
        except OSError:
            return []
    length = struct.unpack("iL", answer)[0]
    data = buffer.tobytes()[:length]
    # Each struct ifreq: the name (16 bytes), then a sockaddr_in whose address is at +4.
    return [
        (data[i : i + _IFNAMSIZ].split(b"\0", 1)[0].decode(), socket.inet_ntoa(data[i + 20 : i + 24]))
        for i in range(0, length, _IFREQ_SIZE)
    ]


def _ipv6_table() -> list[tuple[str, str, int]]:
    """(interface, address, scope) for every IPv6 address of this host (/proc/net/if_inet6)."""
    table = []
    with contextlib.suppress(OSError), open("/proc/net/if_inet6", encoding="ascii") as lines:
        for line in lines:
            fields = line.split()
            if len(fields) == 6:
                address = ipaddress.IPv6Address(bytes.fromhex(fields[0])).compressed
                table.append((fields[5], address, int(fields[3], 16)))
    return table


def _check_local(address: str, name: str) -> None:
    """A `ConfigError` unless `address` is local: bind() to it works and, where the kernel
    lets any address be bound (`ip_nonlocal_bind`, common on failover hosts), it is also
    assigned to an interface (or in 127.0.0.0/8, all of which loopback answers)."""
    ipv6 = ":" in address
    what = address if address == name else f"{address} (of {name})"
    with socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            probe.bind((address, 0))
        except OSError as error:
            raise ConfigError(
                "source_addresses", what, f"is not an address of this host ({error.strerror or error})"
            ) from None
    if _nonlocal_bind(ipv6) and not _assigned(address):
        raise ConfigError("source_addresses", what, "is not assigned to any network interface of this host")


def _nonlocal_bind(ipv6: bool) -> bool:
    path = f"/proc/sys/net/{'ipv6' if ipv6 else 'ipv4'}/ip_nonlocal_bind"
    try:
        with open(path, encoding="ascii") as file:
            return file.read().strip() != "0"
    except OSError:
        return False


def _assigned(address: str) -> bool:
    """Whether an interface of this host has `address` (127.0.0.0/8 is all loopback's)."""
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        return ip.is_loopback or any(found == address for _, found in _ipv4_table())
    return any(found == address for _, found, _ in _ipv6_table())


# -- the port budget ----------------------------------------------------------------------------


def port_range() -> tuple[int, int] | None:
    """The kernel's ephemeral port range (net.ipv4.ip_local_port_range), if readable."""
    try:
        with open(_PORT_RANGE, encoding="ascii") as file:
            low, high = (int(part) for part in file.read().split())
    except (OSError, ValueError):
        return None
    return low, high


@dataclass
class SocketCounts:
    """TCP sockets of this network namespace from one local address (or to some servers)."""

    total: int = 0
    established: int = 0
    time_wait: int = 0


def socket_counts(
    sources: Iterable[str], servers: Iterable[tuple[str, int]] = ()
) -> tuple[dict[str, SocketCounts], SocketCounts]:
    """From /proc/net/tcp{,6}: the non-listening sockets on each of `sources` (local
    address), and those from any local address to one of `servers` (host, port).

    Addresses are matched in /proc's own hex spelling, so a line costs a split and two
    dictionary lookups (a host with tens of thousands of sockets in TIME_WAIT is the
    case this is for)."""
    by_source = {address: SocketCounts() for address in sources}
    local_keys = {key: counts for address, counts in by_source.items() for key in _proc_hex(address)}
    remote_keys = {f"{key}:{port:04X}" for host, port in servers for key in _proc_hex(host)}
    to_servers = SocketCounts()
    for path in _TCP_TABLES:
        try:
            with open(path, encoding="ascii") as table:
                lines = table.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split(None, 4)
            if len(fields) < 4 or fields[3] == _LISTEN:
                continue
            counts = local_keys.get(fields[1].partition(":")[0])
            if counts is not None:
                _count(counts, fields[3])
            if fields[2] in remote_keys:
                _count(to_servers, fields[3])
    return by_source, to_servers


def _proc_hex(address: str) -> list[str]:
    """How /proc/net/tcp{,6} spell `address`: each 32-bit word in host (little-endian)
    order, in upper-case hex; an IPv4 address also as the v4-mapped IPv6 address that
    grpc's dual-stack sockets carry."""
    ip = ipaddress.ip_address(address)
    forms = [ip.packed]
    if ip.version == 4:
        forms.append(ipaddress.IPv6Address(f"::ffff:{address}").packed)
    return ["".join(raw[i : i + 4][::-1].hex().upper() for i in range(0, len(raw), 4)) for raw in forms]


def _count(counts: SocketCounts, state: str) -> None:
    counts.total += 1
    if state == _ESTABLISHED:
        counts.established += 1
    elif state == _TIME_WAIT:
        counts.time_wait += 1
