"""The asyncio shell: `poolkit.aio.Channel`, a `grpc.aio.Channel` backed by a pool of
grpc.aio channels, deciding through the same core as the sync shell. Its calls are in
`_aio_call`; its health checks, connectivity and discovery tasks in `_aio_watch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Self

import grpc
import grpc.aio

from ._aio_call import (
    AioPoolClosedError,
    AioPoolUnavailableError,
    _StreamStream,
    _StreamUnary,
    _UnaryStream,
    _UnaryUnary,
)
from ._aio_watch import check_health, discover, follow_connectivity
from ._config import PoolConfig
from ._errors import ConfigError, SourceBindingUnavailable
from ._pool import Route
from ._shell import (
    _PARENTS_OBJECTS,
    ChannelOptions,
    Deserializer,
    Pooled,
    Serializer,
    checked_grace,
    slot_options,
)
from ._target import Endpoint

Interceptors = Sequence[grpc.aio.ClientInterceptor]

__all__ = ["AioPoolClosedError", "AioPoolUnavailableError", "Channel", "insecure_channel", "secure_channel"]


def insecure_channel(
    target: str | Sequence[str],
    *,
    config: PoolConfig | None = None,
    options: ChannelOptions | None = None,
    compression: grpc.Compression | None = None,
    interceptors: Interceptors | None = None,
) -> Channel:
    """A pooled asyncio channel to every endpoint of `target`, without TLS."""
    return Channel(target, None, config=config, options=options, compression=compression, interceptors=interceptors)


def secure_channel(
    target: str | Sequence[str],
    credentials: grpc.ChannelCredentials,
    *,
    config: PoolConfig | None = None,
    options: ChannelOptions | None = None,
    compression: grpc.Compression | None = None,
    interceptors: Interceptors | None = None,
) -> Channel:
    """A pooled asyncio channel to every endpoint of `target` over TLS."""
    if not isinstance(credentials, grpc.ChannelCredentials):
        raise ConfigError("credentials", credentials, "must be grpc.ChannelCredentials")
    return Channel(
        target, credentials, config=config, options=options, compression=compression, interceptors=interceptors
    )


class Channel(Pooled, grpc.aio.Channel):
    """A drop-in `grpc.aio.Channel` that balances every call over a pool of connections."""

    _public_name = "poolkit.aio.Channel"

    def __init__(
        self,
        target: str | Sequence[str],
        credentials: grpc.ChannelCredentials | None,
        *,
        config: PoolConfig | None = None,
        options: ChannelOptions | None = None,
        compression: grpc.Compression | None = None,
        interceptors: Interceptors | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if compression is not None and not isinstance(compression, grpc.Compression):
            # grpc.aio would take it too and fail on the first call, naming neither.
            raise ConfigError("compression", compression, "must be None or a grpc.Compression")
        # Made on an event loop, what would block it (DNS, a resolver, the source-binding
        # self-check) runs in a worker thread instead: calls made meanwhile wait for it.
        super().__init__(target, config, options, clock, rng, defer=_on_a_loop())
        self._resolved = asyncio.Event()
        if not self.resolving:
            self._resolved.set()
        self._credentials = credentials
        self._compression = compression
        self._interceptors = list(interceptors) if interceptors is not None else None
        # Background tasks (connectivity, health, discovery) need the event loop; they
        # start here when one is running, else with the first call or channel_ready().
        self._tasks: dict[object, list[asyncio.Task[None]]] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()
        self._health_channels: dict[Route, grpc.aio.Channel] = {}
        for route in self._pool.routes:
            self._open_route(route)
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop()
            self._start_background()

    def _after_fork(self, parent: int) -> None:
        # The parent's tasks belong to its event loop; they are kept, never touched.
        _PARENTS_OBJECTS.append((self._tasks, self._health_channels))
        self._tasks, self._health_channels = None, {}
        super()._after_fork(parent)

    def _open_route(self, route: Route) -> None:
        for slot in route.slots:
            slot.channel = self._open(route)
            if self.config.connect_on_start:
                slot.channel.get_state(try_to_connect=True)
        if self._tasks is not None:
            self._start_route(route)

    def _start_route(self, route: Route) -> None:
        assert self._tasks is not None
        pool = self._pool
        tasks = [
            asyncio.ensure_future(follow_connectivity(pool, slot, self.config.connect_on_start)) for slot in route.slots
        ]
        health = self.config.health_check
        if health is not None:
            channel = route.slots[0].channel
            if self._interceptors:
                # The caller's interceptors are for the caller's calls: health checks get a
                # connection of their own rather than showing up in their traces and metrics.
                channel = self._health_channels[route] = self._open(route, interceptors=False)
            tasks.append(asyncio.ensure_future(check_health(pool, route, channel, health, pool.rng)))
        self._tasks[route] = tasks

    def _start_background(self) -> None:
        """Start the background tasks on the running loop (once)."""
        if self._tasks is not None or self._pool.closed:
            return
        self._tasks = {}
        for route in self._pool.routes:
            self._start_route(route)
        background = []
        if self.resolving:
            background.append(asyncio.ensure_future(self._resolve_first()))
        if self._discovery.dynamic:
            background.append(asyncio.ensure_future(discover(weakref.ref(self))))
        if background:
            self._tasks[self] = background

    async def _resolve_first(self) -> None:
        """The first resolution of a channel made on the loop, in a worker thread. A target
        that does not resolve (or no source can reach) leaves the pool empty, and calls
        fail at once saying why, as they would after any failed resolution."""
        loop = asyncio.get_running_loop()
        endpoints: list[Endpoint] | None = None
        error = None
        try:
            endpoints = await loop.run_in_executor(None, self.first_endpoints, self._pool.sources)
        except (ConfigError, SourceBindingUnavailable) as failure:
            error = str(failure)
        finally:
            if endpoints is not None:
                self._apply(endpoints)
            if error is not None:
                self._pool.resolver_error = error
            self.resolving = False
            self._resolved.set()

    async def _first_resolution(self) -> None:
        """Wait for the channel's first resolution, when it runs off the loop."""
        if self.resolving:
            self._start_background()
            await self._resolved.wait()

    def _close_route(self, route: Route) -> None:
        for task in self._tasks.pop(route, []) if self._tasks is not None else []:
            task.cancel()
        channels = [slot.channel for slot in route.slots]
        if route in self._health_channels:
            channels.append(self._health_channels.pop(route))
        for channel in channels:
            closing = asyncio.ensure_future(channel.close(None))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    def __del__(self) -> None:
        # A channel dropped without close(): its tasks must not outlive it, and its
        # connections are closed on its loop as close() would, rather than whenever the
        # collector gets to its grpc channels (which its ending tasks hold meanwhile).
        tasks = [task for route_tasks in (getattr(self, "_tasks", None) or {}).values() for task in route_tasks]
        for task in tasks:
            _drop(task)
        pool = getattr(self, "_pool", None)
        if not tasks or pool is None or pool.closed:
            return  # never started on a loop (nothing to close there), or closed already
        channels = [slot.channel for slot in pool.slots]
        channels.extend(getattr(self, "_health_channels", {}).values())
        _on_loop(tasks[0].get_loop(), functools.partial(_close_dropped, channels))

    def _open(self, route: Route, *, interceptors: bool = True) -> grpc.aio.Channel:
        endpoint = route.endpoint
        options = slot_options(route, self._grpc_options)
        chain = self._interceptors if interceptors else None
        # By keyword: wrappers of these functions (opentelemetry-instrumentation-grpc's
        # adds its interceptors to `interceptors=`) expect them so.
        if self._credentials is None:
            return grpc.aio.insecure_channel(
                endpoint.grpc_target, options=options, compression=self._compression, interceptors=chain
            )
        return grpc.aio.secure_channel(
            endpoint.grpc_target, self._credentials, options=options, compression=self._compression, interceptors=chain
        )

    # -- the grpc.aio.Channel contract -----------------------------------------------------

    def unary_unary(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
        return _UnaryUnary(self, "unary_unary", method, request_serializer, response_deserializer, _registered_method)

    def unary_stream(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.UnaryStreamMultiCallable[Any, Any]:
        return _UnaryStream(self, "unary_stream", method, request_serializer, response_deserializer, _registered_method)

    def stream_unary(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.StreamUnaryMultiCallable[Any, Any]:
        return _StreamUnary(self, "stream_unary", method, request_serializer, response_deserializer, _registered_method)

    def stream_stream(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.StreamStreamMultiCallable[Any, Any]:
        return _StreamStream(
            self, "stream_stream", method, request_serializer, response_deserializer, _registered_method
        )

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """The pool's connectivity: READY while any connection is ready, else CONNECTING,
        IDLE, TRANSIENT_FAILURE; SHUTDOWN once closed."""
        if self._pool.closed:
            return grpc.ChannelConnectivity.SHUTDOWN
        for slot in self._pool.slots:
            self._pool.set_slot_state(slot, slot.channel.get_state(try_to_connect))
        return self._pool.connectivity

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        while self.get_state() is last_observed_state and not self._pool.closed:
            waits = [
                asyncio.ensure_future(slot.channel.wait_for_state_change(slot.channel.get_state()))
                for slot in self._pool.slots
            ]
            # grpc.aio does not always wake a state waiter when the channel closes under it.
            waits.append(asyncio.ensure_future(self._closed.wait()))
            if self.resolving:
                waits.append(asyncio.ensure_future(self._first_resolution()))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()

    async def channel_ready(self) -> None:
        """Wait until at least one connection of the pool is ready."""
        self._start_background()
        await self._first_resolution()
        while (state := self.get_state(try_to_connect=True)) is not grpc.ChannelConnectivity.READY:
            if state is grpc.ChannelConnectivity.SHUTDOWN:
                raise AioPoolClosedError(f"poolkit channel to {self._pool.target} is closed")
            await self.wait_for_state_change(state)

    async def close(self, grace: float | None = None) -> None:
        """Stop admitting calls, let those in flight finish for up to `grace` seconds, then
        close every connection (cancelling what is still running). Idempotent."""
        grace = checked_grace(grace)
        if not self._pool.close():
            return
        self._closed.set()
        self._resolved.set()  # calls waiting for the first resolution find the pool closed
        # Health streams first: a channel's close(grace) would wait for them too.
        await self._stop_background()
        channels = [slot.channel for slot in self._pool.slots]
        await asyncio.gather(
            *(channel.close(grace) for channel in channels), *(c.close(None) for c in self._health_channels.values())
        )

    async def _stop_background(self) -> None:
        """Cancel the background tasks and wait until they end, then forget them: a task
        ended by its health check's cancellation keeps that call, and so the connection,
        open for as long as it is kept."""
        tasks = [task for route_tasks in (self._tasks or {}).values() for task in route_tasks]
        self._tasks = {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._closing, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot: endpoints, slots, their state, calls, errors, EWMA."""
        self.get_state()
        return super().describe()


# The closes of dropped channels' grpc channels, kept until they end (a task that nothing
# holds may be collected before it ends).
_CLOSING: set[asyncio.Task[None]] = set()


def _drop(task: asyncio.Task[None]) -> None:
    """Cancel a background task of a dropped channel, from whichever thread collects it."""
    if task.done():
        return
    loop = task.get_loop()
    if loop.is_closed():
        # Closed with the task pending (asyncio.run cancels them first; a loop closed by
        # hand does not): nothing will run it again, and it goes quietly rather than
        # with asyncio's "Task was destroyed but it is pending!" for a task the
        # application never made.
        task._log_destroy_pending = False  # type: ignore[attr-defined]
        return
    _on_loop(loop, task.cancel)


def _on_loop(loop: asyncio.AbstractEventLoop, action: Callable[[], object]) -> None:
    """Do `action` on `loop`: now if this is its thread, else soon, from its thread."""
    try:
        here = asyncio.get_running_loop()
    except RuntimeError:  # no loop runs on this thread
        here = None
    if here is loop:
        action()
        return
    with contextlib.suppress(RuntimeError):  # the loop is closed: nothing can be done on it
        loop.call_soon_threadsafe(action)


def _close_dropped(channels: list[grpc.aio.Channel]) -> None:
    for channel in channels:
        closing = asyncio.ensure_future(channel.close(None))
        _CLOSING.add(closing)
        closing.add_done_callback(_CLOSING.discard)


def _on_a_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
