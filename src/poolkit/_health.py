"""Active health checking, as decisions: what to ask an endpoint next and what its answer means.

The shells run the calls (a thread or a task per endpoint); this module decides. The
protocol is grpc.health.v1 (gRPC A17): `Watch` streams status changes; a server that
does not implement `Watch` is polled with `Check`; a server with no health service at all
is assumed healthy. Errors other than UNIMPLEMENTED are retried with backoff, grpc's
own reconnect schedule (1 s × 1.6, ±20 %), capped lower because a health check is cheap.
"""

from __future__ import annotations

import enum
import random

import grpc
from grpc_health.v1 import health_pb2

from ._config import HealthCheck


class Health(enum.StrEnum):
    """What a route's active health check says (`Route.health`)."""

    UNCHECKED = "unchecked"  # checks are off for this pool
    UNKNOWN = "unknown"  # no answer yet, or the last attempt failed
    SERVING = "serving"
    NOT_SERVING = "not_serving"  # NOT_SERVING or SERVICE_UNKNOWN: take it out of rotation
    UNIMPLEMENTED = "unimplemented"  # the server has no health service: assume healthy


class Mode(enum.Enum):
    """Which health RPC the checker makes next."""

    WATCH = "watch"
    CHECK = "check"
    DONE = "done"  # nothing more to ask


UNCHECKED, UNKNOWN, SERVING, NOT_SERVING, UNIMPLEMENTED = (
    Health.UNCHECKED,
    Health.UNKNOWN,
    Health.SERVING,
    Health.NOT_SERVING,
    Health.UNIMPLEMENTED,
)
WATCH, CHECK, DONE = Mode.WATCH, Mode.CHECK, Mode.DONE

_BACKOFF_FIRST = 1.0
_BACKOFF_FACTOR = 1.6
_BACKOFF_MAX = 30.0
_BACKOFF_JITTER = 0.2

_Status = health_pb2.HealthCheckResponse
_STATUS = {
    _Status.SERVING: SERVING,
    _Status.NOT_SERVING: NOT_SERVING,
    _Status.SERVICE_UNKNOWN: NOT_SERVING,
}


class HealthChecker:
    """The check of one endpoint: which RPC to make next, and when."""

    __slots__ = ("_failures", "_rng", "config", "mode")

    def __init__(self, config: HealthCheck, rng: random.Random) -> None:
        self.config = config
        self.mode = WATCH if config.watch else CHECK
        self._failures = 0
        self._rng = rng

    @property
    def request(self) -> health_pb2.HealthCheckRequest:
        return health_pb2.HealthCheckRequest(service=self.config.service)

    def answered(self, response: health_pb2.HealthCheckResponse) -> Health:
        """An answer arrived (a Check response or a Watch update): the endpoint's health."""
        self._failures = 0
        return _STATUS.get(response.status, UNKNOWN)

    def failed(self, code: grpc.StatusCode | None) -> tuple[Health | None, float]:
        """The check RPC ended with `code` (None: a Watch stream ended without error).
        Returns the endpoint's health now (None: unchanged) and the seconds to wait
        before asking again."""
        if code is grpc.StatusCode.UNIMPLEMENTED:
            if self.mode == WATCH:
                self.mode = CHECK  # an older server: poll instead
                return None, 0.0
            self.mode = DONE
            return UNIMPLEMENTED, 0.0
        if code is grpc.StatusCode.NOT_FOUND:
            # Check's answer for a service the server does not know.
            return NOT_SERVING, self.config.interval
        if code is None:
            return None, 0.0  # the server ended the stream (shutting down?): watch again
        if self.mode == CHECK:
            return UNKNOWN, self.config.interval
        self._failures += 1
        return UNKNOWN, self._backoff()

    @property
    def interval(self) -> float:
        """Seconds between two `Check` polls."""
        return self.config.interval

    def _backoff(self) -> float:
        delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * _BACKOFF_FACTOR ** (self._failures - 1))
        return delay * (1.0 + _BACKOFF_JITTER * (2.0 * self._rng.random() - 1.0))

    def __repr__(self) -> str:
        return f"<HealthChecker {self.mode} service={self.config.service!r}>"
