"""Turn a grpc-style target into the endpoints poolkit connects to.

Accepted: "host:port", "dns:///host:port", "dns:host:port", "ipv4:a:p,b:p",
"ipv6:[a]:p,[b]:p", or a sequence of "host:port" strings. Host names are resolved here,
so every endpoint is one IP address and every mistake surfaces at construction.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from ._errors import ConfigError

DEFAULT_PORT = 443  # grpc's own default when a dns target names no port
# grpc's other schemes: named as schemes poolkit does not take, not misread as a host.
_OTHER_SCHEMES = frozenset({"unix", "unix-abstract", "vsock", "xds", "google-c2p", "passthrough"})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One server address: an IP literal and a port, plus the name it was found under."""

    host: str
    port: int
    authority: str  # "name:port" as the caller wrote it; the :authority and TLS name

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def address(self) -> str:
        """ "10.0.0.1:50051" or "[::1]:50051"."""
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"

    @property
    def grpc_target(self) -> str:
        """The target a grpc channel to exactly this address is built with."""
        return f"ipv6:{self.address}" if self.is_ipv6 else f"ipv4:{self.address}"


Spec = tuple[str, bool]
"""A "host:port" of a target, and whether its host may be a name to resolve."""


def parse_target(target: str | Sequence[str]) -> list[Endpoint]:
    """The endpoints `target` names, resolved, in order, without duplicates."""
    return resolve_specs(split_target(target), target)


def split_target(target: str | Sequence[str]) -> list[Spec]:
    """The addresses `target` names, unresolved; a malformed target raises `ConfigError`."""
    if isinstance(target, str):
        specs = _split_target(target)
    elif isinstance(target, Sequence) and all(isinstance(t, str) for t in target):
        specs = [(t, True) for t in target]
    else:
        raise ConfigError("target", target, "must be a string or a sequence of 'host:port' strings")
    if not specs:
        raise ConfigError("target", target, "names no endpoint")
    for spec, _ in specs:
        split_host_port(spec, target)
    return specs


def names_a_host(specs: Sequence[Spec]) -> bool:
    """Whether any address is a host name, whose IP addresses may change over time."""
    for spec, may_resolve in specs:
        host = split_host_port(spec, spec)[0]
        if may_resolve and not _is_ip(host):
            return True
    return False


def resolve_specs(specs: Sequence[Spec], target: object) -> list[Endpoint]:
    """Every IP endpoint of `specs`, in order, without duplicates (DNS lookups block)."""
    endpoints: dict[tuple[str, int], Endpoint] = {}
    for spec, may_resolve in specs:
        for endpoint in _endpoints_of(spec, may_resolve, target):
            endpoints.setdefault((endpoint.host, endpoint.port), endpoint)
    return list(endpoints.values())


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _split_target(target: str) -> list[tuple[str, bool]]:
    """(host:port, may be a name) pairs of a target string."""
    text = target.strip()
    if not text:
        raise ConfigError("target", target, "is empty")
    scheme, sep, rest = text.partition(":")
    if scheme in ("ipv4", "ipv6") and sep:
        return [(part.strip(), False) for part in rest.split(",")] if rest else []
    if scheme == "dns" and sep:
        if rest.startswith("//"):
            authority, slash, rest = rest[2:].partition("/")
            if authority:
                raise ConfigError("target", target, "dns targets with a DNS server authority are not supported")
            if not slash:
                raise ConfigError("target", target, "expected dns:///host:port")
        return [(rest, True)]
    if "://" in text or scheme in _OTHER_SCHEMES:
        scheme = text.partition("://")[0] if "://" in text else scheme
        raise ConfigError("target", target, f"unknown scheme {scheme!r}: use host:port, dns:///, ipv4: or ipv6:")
    if "," in text:
        raise ConfigError("target", target, "names several addresses: write ipv4:a:p,b:p (or ipv6:), or pass a list")
    return [(text, True)]


def _endpoints_of(spec: str, may_resolve: bool, target: object) -> list[Endpoint]:
    host, port = split_host_port(spec, target)
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        return [Endpoint(literal.compressed, port, authority)]
    if not may_resolve:
        raise ConfigError("target", target, f"{host!r} is not an IP address (ipv4:/ipv6: targets take literals)")
    return [Endpoint(ip, port, authority) for ip in _resolve(host, port, target)]


def split_host_port(spec: str, target: object) -> tuple[str, int]:
    spec = spec.strip()
    if not spec:
        raise ConfigError("target", target, "has an empty address")
    if spec.startswith("["):
        host, bracket, rest = spec[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ConfigError("target", target, f"malformed IPv6 address {spec!r}")
        port_text = rest[1:] if rest else ""
    elif spec.count(":") > 1:
        raise ConfigError("target", target, f"IPv6 address {spec!r} must be in brackets: [addr]:port")
    else:
        host, colon, port_text = spec.partition(":")
        rest = colon + port_text
    if not host:
        raise ConfigError("target", target, f"address {spec!r} has no host")
    if not rest:
        return host, DEFAULT_PORT
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ConfigError("target", target, f"port {port_text!r} of {spec!r} must be a number from 1 to 65535")
    return host, int(port_text)


def _resolve(host: str, port: int, target: object) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise ConfigError("target", target, f"cannot resolve {host!r}: {error}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)))
    if not addresses:
        raise ConfigError("target", target, f"{host!r} resolved to no IP address")
    return addresses


@dataclass(frozen=True, slots=True)
class Source:
    """A local address that connections may be bound to."""

    address: str  # compressed IP literal

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.address

    def serves(self, host: str) -> bool:
        """Whether a connection to `host` (an IP literal) can leave from this source."""
        return self.is_ipv6 == (":" in host)


def sources_for(endpoint: Endpoint, sources: Sequence[Source]) -> list[Source | None]:
    """The sources a route to `endpoint` may leave from: those of its address family;
    [None] (unbound) when the pool binds none."""
    if not sources:
        return [None]
    return [source for source in sources if source.serves(endpoint.host)]
