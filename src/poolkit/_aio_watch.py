"""The asyncio shell's background work, as tasks on the channel's event loop: one per
connection following its connectivity, one per endpoint for its health check, one per
channel for discovery. They do the I/O; `_health`, `_discovery` and `_pool` decide.
The tasks hold the pool, never the poolkit channel, so a dropped channel can be collected.
"""

from __future__ import annotations

import asyncio
import random
import weakref
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2_grpc

from . import _health
from ._config import HealthCheck
from ._pool import PoolState, Route, Slot
from ._shell import WHY_METHOD, WHY_TIMEOUT

_IDLE = grpc.ChannelConnectivity.IDLE
_READY = grpc.ChannelConnectivity.READY
_TRANSIENT_FAILURE = grpc.ChannelConnectivity.TRANSIENT_FAILURE
# The calls asking why a connection failed, kept until they end (a grpc.aio call that is
# collected is cancelled).
_ASKING: set[asyncio.Task[None]] = set()


async def follow_connectivity(pool: PoolState, slot: Slot, try_to_connect: bool) -> None:
    """Report every connectivity change of `slot` to the pool; reconnect a connection
    that went idle after being ready (server GOAWAY, max connection age) at once."""
    channel: grpc.aio.Channel = slot.channel
    state = channel.get_state(try_to_connect)
    while not pool.closed:
        was = slot.state
        pool.set_slot_state(slot, state)
        if state is _IDLE and was is _READY:
            state = channel.get_state(try_to_connect=True)
            continue
        if state is _TRANSIENT_FAILURE:
            asking = asyncio.get_running_loop().create_task(ask_why(pool, slot, channel))
            _ASKING.add(asking)
            asking.add_done_callback(_ASKING.discard)
        await channel.wait_for_state_change(state)
        state = channel.get_state()


async def ask_why(pool: PoolState, slot: Slot, channel: grpc.aio.Channel) -> None:
    """Learn why `slot`'s connection failed, for the errors that name it (the sync
    shell's `Channel._ask_why`): a call that does not wait is failed with it at once."""
    ask = channel.unary_unary(WHY_METHOD, request_serializer=None, response_deserializer=None)
    try:
        await ask(b"", timeout=WHY_TIMEOUT, wait_for_ready=False)
    except grpc.aio.AioRpcError as error:
        if error.code() is grpc.StatusCode.UNAVAILABLE:
            pool.note_connect_error(slot, error.details() or "")
    except grpc.aio.UsageError:  # the channel closed meanwhile
        pass


async def check_health(
    pool: PoolState, route: Route, channel: grpc.aio.Channel, config: HealthCheck, rng: random.Random
) -> None:
    """grpc.health.v1 checks of one route over `channel`, until cancelled."""
    stub = health_pb2_grpc.HealthStub(channel)
    checker = _health.HealthChecker(config, rng)
    while checker.mode != _health.DONE and not pool.closed:
        try:
            if checker.mode == _health.WATCH:
                # wait_for_ready: while the endpoint is down, wait for it rather than spin.
                async for response in stub.Watch(checker.request, wait_for_ready=True):
                    pool.set_health(route, checker.answered(response))
                health, delay = checker.failed(None)
            else:
                response = await stub.Check(checker.request, timeout=config.timeout, wait_for_ready=True)
                health, delay = checker.answered(response), checker.interval
        except grpc.aio.AioRpcError as error:
            health, delay = checker.failed(error.code())
        if health is not None:
            pool.set_health(route, health)
        await asyncio.sleep(delay)


async def discover(owner_ref: weakref.ref[Any]) -> None:
    """Re-resolve the channel's target when due and retire drained routes, until the
    channel closes or is dropped."""
    while (owner := owner_ref()) is not None and not owner._pool.closed:
        if owner._resolution_due():
            discovery, now = owner._discovery, owner._pool.clock()
            del owner  # not across the await: a dropped channel must be collectable
            endpoints = await asyncio.to_thread(discovery.resolve, now)
            if (owner := owner_ref()) is None:
                return
            owner._apply(endpoints)
        owner._retire_drained()
        wait = owner._maintenance_wait()
        del owner
        await asyncio.sleep(wait)
