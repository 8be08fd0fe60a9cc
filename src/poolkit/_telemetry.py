"""poolkit's OpenTelemetry instruments, through opentelemetry-api only: the application
brings the SDK and its exporters (with none, the API's no-op provider makes all of this
free of cost).

The port budget: observable gauges, read when the application's metric reader collects,
over every live poolkit channel, per source address (or "default" for unbound channels):

- `poolkit.source.connections`: the channel's READY connections from the address;
- `poolkit.source.ports_in_use`: TCP sockets of this host on the address, TIME_WAIT
  included (for "default": to the channel's endpoints);
- `poolkit.source.port_range_share`: those sockets over the ephemeral port range.

Attributes: `grpc.target` (the channel's target) and `poolkit.source_address`.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from ._version import __version__

if TYPE_CHECKING:
    from ._shell import Pooled

# Three gauges read the same budget in one collection: it is read once per this many seconds.
_BUDGET_REUSE = 1.0


class _PortBudgets:
    """The live channels, and their budgets as last read (shared by the three gauges)."""

    def __init__(self) -> None:
        self.channels: weakref.WeakSet[Pooled] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._read_at = -_BUDGET_REUSE
        self._budgets: list[tuple[str, dict[str, dict[str, Any]]]] = []

    def add(self, channel: Pooled) -> None:
        with self._lock:
            self.channels.add(channel)

    def current(self) -> list[tuple[str, dict[str, dict[str, Any]]]]:
        with self._lock:
            now = time.monotonic()
            if now - self._read_at >= _BUDGET_REUSE:
                open_channels = [channel for channel in list(self.channels) if not channel._pool.closed]
                self._budgets = [(channel._pool.target, channel.port_budget()) for channel in open_channels]
                self._read_at = now
            return self._budgets

    def observer(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            observations = []
            for target, budget in self.current():
                for source, figures in budget.items():
                    value = figures[field]
                    if value is not None:
                        attributes = {"grpc.target": target, "poolkit.source_address": source}
                        observations.append(Observation(value, attributes))
            return observations

        return observe


_budgets = _PortBudgets()


def watch_ports(channel: Pooled) -> None:
    """Report `channel`'s port budget while it lives and is open (it is held weakly)."""
    _budgets.add(channel)


_meter = metrics.get_meter("poolkit", __version__)
_meter.create_observable_gauge(
    "poolkit.source.connections",
    callbacks=[_budgets.observer("connections")],
    unit="{connection}",
    description="READY connections of a poolkit channel from a source address",
)
_meter.create_observable_gauge(
    "poolkit.source.ports_in_use",
    callbacks=[_budgets.observer("sockets")],
    unit="{port}",
    description="TCP sockets of this host on a source address (TIME_WAIT included)",
)
_meter.create_observable_gauge(
    "poolkit.source.port_range_share",
    callbacks=[_budgets.observer("share_in_use")],
    unit="1",
    description="ports in use on a source address over the ephemeral port range",
)
