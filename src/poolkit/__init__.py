"""poolkit: one gRPC channel object backed by a balanced, health-checked pool of connections.

    import poolkit
    channel = poolkit.insecure_channel("dns:///echo.internal:50051")
    stub = EchoStub(channel)  # any generated stub, unchanged

`poolkit.aio` mirrors `grpc.aio`; `poolkit.testing` starts real servers for tests.
"""

from . import aio
from ._channel import Channel, insecure_channel, secure_channel
from ._config import FailureAccrual, HealthCheck, Hedging, PoolConfig, RetryBudget, RetryPolicy
from ._errors import (
    ConfigError,
    ForkedChannelError,
    ForkedProcessError,
    PoolClosedError,
    PoolkitError,
    PoolUnavailableError,
    SourceBindingUnavailable,
)
from ._version import __version__

__all__ = [
    "Channel",
    "ConfigError",
    "FailureAccrual",
    "ForkedChannelError",
    "ForkedProcessError",
    "HealthCheck",
    "Hedging",
    "PoolClosedError",
    "PoolConfig",
    "PoolUnavailableError",
    "PoolkitError",
    "RetryBudget",
    "RetryPolicy",
    "SourceBindingUnavailable",
    "__version__",
    "aio",
    "insecure_channel",
    "secure_channel",
]
