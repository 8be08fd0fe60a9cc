"""Discovery: which endpoints a target names now, and when to ask again.

A target of IP literals is fixed. A host name (`dns:///`, `host:port`) or a user
`resolver` is asked again every `resolve_interval` (jittered, so a fleet of clients does
not ask in step) and soon after an endpoint fails. An answer that is empty or an error
keeps the last good set: a DNS hiccup must not empty a working pool (gRPC, Finagle).
The lookup itself is the only I/O here; the shells run it off their hot paths.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from ._config import PoolConfig
from ._errors import ConfigError
from ._target import Endpoint, Spec, names_a_host, resolve_specs, split_target

# Jitter on the interval, either way: enough to spread a fleet's lookups.
_JITTER = 0.2
# Earliest re-resolution after the last one when an endpoint fails: soon, but not a
# lookup per failed call.
_SOON_GAP = 1.0


class Discovery:
    """The resolution schedule and record of one channel."""

    def __init__(self, target: str | Sequence[str], config: PoolConfig, rng: random.Random, now: float) -> None:
        self._resolver = config.resolver
        self._specs: list[Spec] = [] if self._resolver is not None else split_target(target)
        if not isinstance(target, str) and not (
            isinstance(target, Sequence) and all(isinstance(t, str) for t in target)
        ):
            raise ConfigError("target", target, "must be a string or a sequence of 'host:port' strings")
        self.target = target if isinstance(target, str) else ",".join(target)
        self._rng = rng
        dynamic = self._resolver is not None or names_a_host(self._specs)
        self.interval = config.resolve_interval if dynamic else None
        self.resolutions = 0
        self.last_error: str | None = None
        self._last = now
        self.next_at = self._schedule(now)

    @property
    def dynamic(self) -> bool:
        return self.interval is not None

    def first(self) -> list[Endpoint]:
        """The endpoints at construction. A target that does not resolve is a
        `ConfigError`; a resolver that fails starts the pool empty, its error recorded."""
        if self._resolver is None:
            self.resolutions = 1
            return resolve_specs(self._specs, self.target)
        return self.resolve(self._last) or []

    def due(self, now: float, soon: bool) -> bool:
        """Whether to resolve now: the interval is up, or an endpoint failed (`soon`)."""
        if self.interval is None:
            return False
        return now >= self.next_at or (soon and now >= self._last + min(_SOON_GAP, self.interval))

    def wait(self, now: float) -> float:
        """Seconds until the next scheduled resolution."""
        return max(0.0, self.next_at - now)

    def resolve(self, now: float) -> list[Endpoint] | None:
        """Look the target up (blocking); the new endpoint set, or None to keep the last
        one (the answer was empty or an error, recorded in `last_error`)."""
        self._last = now
        self.next_at = self._schedule(now)
        self.resolutions += 1
        try:
            endpoints = self._lookup()
        except Exception as error:  # noqa: BLE001 - a resolver's failure is reported, never raised into calls
            self.last_error = f"{type(error).__name__}: {error}"
            return None
        if not endpoints:
            self.last_error = "resolved to no address"
            return None
        self.last_error = None
        return endpoints

    def _lookup(self) -> list[Endpoint]:
        if self._resolver is None:
            return resolve_specs(self._specs, self.target)
        answer = self._resolver(self.target)
        if isinstance(answer, str | bytes) or not isinstance(answer, Iterable):
            raise ConfigError("resolver", answer, "must return an iterable of 'host:port' strings")
        addresses = list(answer)
        if not all(isinstance(a, str) for a in addresses):
            raise ConfigError("resolver", answer, "must return an iterable of 'host:port' strings")
        return resolve_specs([(address, True) for address in addresses], self.target) if addresses else []

    def _schedule(self, now: float) -> float:
        if self.interval is None:
            return float("inf")
        return now + self.interval * (1.0 + _JITTER * (2.0 * self._rng.random() - 1.0))

    def describe(self) -> dict[str, object]:
        return {"interval": self.interval, "resolutions": self.resolutions, "last_error": self.last_error}
