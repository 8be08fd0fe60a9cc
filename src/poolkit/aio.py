"""poolkit for asyncio: mirrors `grpc.aio`, so moving over is a one-word change.

channel = poolkit.aio.insecure_channel("dns:///echo.internal:50051")
stub = EchoStub(channel)
reply = await stub.Unary(request)
"""

from ._aio_channel import (
    AioPoolClosedError,
    AioPoolUnavailableError,
    Channel,
    insecure_channel,
    secure_channel,
)

__all__ = ["AioPoolClosedError", "AioPoolUnavailableError", "Channel", "insecure_channel", "secure_channel"]
