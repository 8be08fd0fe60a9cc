"""poolkit's exceptions: one root, configuration errors that are ValueErrors, and call
failures that are grpc.RpcErrors so existing `except grpc.RpcError` handlers keep working."""

from __future__ import annotations

from collections.abc import Callable

import grpc


class PoolkitError(Exception):
    """The root of every exception poolkit raises itself."""


class ConfigError(PoolkitError, ValueError):
    """A configuration value (a config field, a target, an address) is wrong."""

    def __init__(self, name: str, value: object, why: str) -> None:
        super().__init__(f"{name}={value!r}: {why}")
        self.name = name
        self.value = value


class SourceBindingUnavailable(PoolkitError):  # noqa: N818 - the name users look for
    """This grpcio cannot bind connections to a source address (`PoolConfig.source_addresses`):
    poolkit's check on first use failed. Raised at channel construction, never per call."""


class PoolUnavailableError(PoolkitError, grpc.RpcError, grpc.Call):
    """A call that poolkit could not send anywhere (pool closed, no usable endpoint).

    It is a `grpc.RpcError` and a `grpc.Call` with code UNAVAILABLE, like the error grpc
    raises for an unreachable server, and its details say why.
    """

    # Defaults let grpc.aio.AioRpcError's __init__, which calls super().__init__() bare,
    # share a subclass with this one (poolkit.aio's errors).
    def __init__(self, details: str = "", code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> tuple[()]:
        return ()

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    def __str__(self) -> str:
        return f"{self._code.name}: {self._details}"


class PoolClosedError(PoolUnavailableError):
    """A call was made on a poolkit channel after `close()`."""


class ForkedChannelError(PoolClosedError):
    """A call on a poolkit channel made before this process was forked from its parent:
    its connections are the parent's. Create channels after the fork (in each worker)."""


class ForkedProcessError(PoolkitError, RuntimeError):
    """A poolkit channel cannot be built in this process: it was forked while the parent
    had grpc connections open, and grpc's fork support was off, so grpc is not usable here."""
