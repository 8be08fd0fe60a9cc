"""The sync shell's background work: a thread per endpoint for its health check, and one
thread per channel for discovery. They do the I/O; `_health`, `_discovery` and `_pool`
decide. All stop on `close()`: each waits on an event, and a blocked Watch is cancelled.
"""

from __future__ import annotations

import random
import threading
import weakref
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from . import _health
from ._config import HealthCheck
from ._pool import PoolState, Route


class HealthThread:
    """grpc.health.v1 checks of one route, over its first connection."""

    def __init__(self, pool: PoolState, route: Route, config: HealthCheck, rng: random.Random) -> None:
        self._pool = pool
        self._route = route
        self._checker = _health.HealthChecker(config, rng)
        self._stop = threading.Event()
        self._call: Any = None
        self._thread = threading.Thread(target=self._run, name=f"poolkit-health {route.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        stub = health_pb2_grpc.HealthStub(self._route.slots[0].channel)
        checker = self._checker
        while not self._stop.is_set() and checker.mode != _health.DONE:
            try:
                health, delay = self._watch(stub) if checker.mode == _health.WATCH else self._check(stub)
            except grpc.RpcError as error:
                health, delay = checker.failed(error.code())
            except ValueError:  # the channel was closed under us
                return
            if self._stop.is_set():
                return
            if health is not None:
                self._pool.set_health(self._route, health)
            self._stop.wait(delay)

    def _watch(self, stub: health_pb2_grpc.HealthStub) -> tuple[_health.Health | None, float]:
        checker = self._checker
        # wait_for_ready: while the endpoint is down, wait for it rather than spin.
        call = stub.Watch(checker.request, wait_for_ready=True)
        self._call = call
        if self._stop.is_set():
            call.cancel()
        for response in call:
            self._pool.set_health(self._route, checker.answered(response))
        return checker.failed(None)

    def _check(self, stub: health_pb2_grpc.HealthStub) -> tuple[_health.Health | None, float]:
        checker = self._checker
        response = stub.Check(checker.request, timeout=checker.config.timeout, wait_for_ready=True)
        return checker.answered(response), checker.interval


class DiscoveryThread:
    """Re-resolves the target and retires drained routes, for one sync channel."""

    def __init__(self, owner: Any, name: str) -> None:
        self._owner: Callable[[], Any] = weakref.ref(owner)  # a dropped channel stops it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"poolkit-discovery {name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            owner = self._owner()
            if owner is None:
                return
            wait = owner._discovery_step()
            del owner
            self._stop.wait(wait)
