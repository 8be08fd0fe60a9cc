"""The asyncio shell's calls: poolkit.aio's multicallables, and the drivers of a call's
state machine (`_call.Call`): a coroutine for a unary response (`_UnaryCall`), the
caller's reads for a response stream (`_Stream`).

Per call: the machine takes a slot; the attempt starts on that slot's own grpc.aio
multicallable; grpc's done-callback reports its end to the machine, whichever way the
call ends (awaited, cancelled, timed out, or a stream left unread). No lock is held
across an await.

What grpc.aio would misreport is refused before a slot is taken: a NaN timeout,
metadata grpc would not send, a request that will not serialise (grpc.aio sends an
empty message instead). A call that fails without leaving this process is the caller's
failure, not the endpoint's, and is never sent again (the machine's `failed_locally`).
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from ._call import Attempt, Call, Step, checked_timeout
from ._errors import ConfigError, PoolClosedError, PoolUnavailableError
from ._shell import Deserializer, MultiCallableBase, Serializer
from ._telemetry import invoke

if TYPE_CHECKING:
    from ._aio_channel import Channel

_OK = grpc.StatusCode.OK
_UNKNOWN = grpc.StatusCode.UNKNOWN
_INTERNAL = grpc.StatusCode.INTERNAL
_DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED

if TYPE_CHECKING:  # grpc-stubs makes the multicallables generic; grpc itself does not
    _UnaryUnaryBase = grpc.aio.UnaryUnaryMultiCallable[Any, Any]
    _UnaryStreamBase = grpc.aio.UnaryStreamMultiCallable[Any, Any]
    _StreamUnaryBase = grpc.aio.StreamUnaryMultiCallable[Any, Any]
    _StreamStreamBase = grpc.aio.StreamStreamMultiCallable[Any, Any]
    _UnaryStreamCallBase = grpc.aio.UnaryStreamCall[Any, Any]
    _StreamStreamCallBase = grpc.aio.StreamStreamCall[Any, Any]
    _UnaryUnaryCallBase = grpc.aio.UnaryUnaryCall[Any, Any]
    _StreamUnaryCallBase = grpc.aio.StreamUnaryCall[Any, Any]
else:
    _UnaryUnaryBase = grpc.aio.UnaryUnaryMultiCallable
    _UnaryStreamBase = grpc.aio.UnaryStreamMultiCallable
    _StreamUnaryBase = grpc.aio.StreamUnaryMultiCallable
    _StreamStreamBase = grpc.aio.StreamStreamMultiCallable
    _UnaryStreamCallBase = grpc.aio.UnaryStreamCall
    _StreamStreamCallBase = grpc.aio.StreamStreamCall
    _UnaryUnaryCallBase = grpc.aio.UnaryUnaryCall
    _StreamUnaryCallBase = grpc.aio.StreamUnaryCall


class AioPoolUnavailableError(grpc.aio.AioRpcError, PoolUnavailableError):  # type: ignore[misc]
    """`PoolUnavailableError` that is also a `grpc.aio.AioRpcError`, for asyncio handlers."""

    def __init__(self, details: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        grpc.aio.AioRpcError.__init__(self, code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)
        PoolUnavailableError.__init__(self, details, code)


class AioPoolClosedError(AioPoolUnavailableError, PoolClosedError):  # type: ignore[misc]
    """A call was made on a poolkit.aio channel after `close()`."""


class _MultiCallable(MultiCallableBase):
    """A method of a poolkit.aio channel: each call is a `_call.Call`, carried out by a
    coroutine (`_UnaryCall`) or the caller's reads (`_Stream`)."""

    __slots__ = ("_owner", "_serialize")

    def __init__(
        self,
        channel: Channel,
        kind: str,
        method: str,
        request_serializer: Serializer,
        response_deserializer: Deserializer,
        registered: bool | None,
    ) -> None:
        super().__init__(channel, kind, method, request_serializer, response_deserializer, registered)
        self._owner = channel
        # grpc.aio logs a request its serializer refuses and sends an empty message in its
        # place, so poolkit serialises a single request itself, before the call starts, and
        # fails the call instead. grpc then gets the bytes and nothing to do (no second
        # serialisation), unless the caller's interceptors are on the channel: they are
        # handed the message, as grpc.aio hands it to them, and grpc serialises it again.
        self._serialize = None if self._streaming_request else request_serializer
        if self._serialize is not None and not channel._interceptors:
            self._serializer = None  # what the slot's grpc multicallable serialises with (`_bind`)

    # Whether the caller gets the cancelling stream proxy, and whether requests stream.
    _streaming = False
    _streaming_request = False

    def _start(
        self,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> Any:
        checked_timeout(timeout)
        if metadata is not None:
            _check_metadata(metadata)
        if self._serialize is not None:
            request = self._serialized(request)
        if self._owner._tasks is None:
            self._owner._start_background()
        call = Call(self._call, request, timeout, metadata, credentials, wait_for_ready, compression)
        if self._owner.resolving:
            # The channel's first resolution is still running off the loop: the call
            # starts once it is in, when first awaited, read or written.
            return _Stream(self, call, None, None) if self._streaming else _UnaryCall(self, call, None, None)
        if call.start() is Step.FINISH:
            raise _aio_error(call.error)
        attempt = call.sending
        assert attempt is not None
        handle = self._send(call, attempt)
        if self._streaming:
            return _Stream(self, call, attempt, handle)
        if call.resendable or self._streaming_request:
            # A request stream's call is awaited through poolkit even when never sent again (`_expired`).
            return _UnaryCall(self, call, attempt, handle)
        return handle

    def _serialized(self, request: Any) -> Any:
        """The request as the slot's grpc multicallable takes it (see `__init__`): its bytes,
        or the request itself once it is known to serialise."""
        assert self._serialize is not None
        try:
            data = self._serialize(request)
        except Exception as error:
            # The status and words sync grpc gives such a call (and `failed_locally` knows).
            raise grpc.aio.AioRpcError(
                _INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(), "Exception serializing request!", None
            ) from error
        return data if self._serializer is None else request

    def _send(self, call: Call, attempt: Attempt) -> Any:
        """Start `attempt` on its slot's own grpc.aio multicallable; its end reaches the call
        through grpc's done-callback, whatever the caller does with it. If grpc refuses to
        start it (the caller's arguments), the call is over with that error."""
        slot = attempt.slot
        bound = slot.callables.get(self._id) or self._bind(slot)
        try:
            handle = invoke(
                call.trace,
                bound,
                call.payload(),
                timeout=attempt.timeout,
                metadata=call.attempt_metadata(attempt),
                credentials=call.credentials,
                wait_for_ready=call.wait_for_ready,
                compression=call.compression,
            )
        except BaseException as error:
            call.refused(attempt, error)
            raise
        attempt.handle = handle
        handle.add_done_callback(functools.partial(_report, call, attempt))
        return handle


def _report(call: Call, attempt: Attempt, handle: Any) -> None:
    """grpc.aio's done-callback: an attempt ended, as grpc reports it (a task cancelled
    just after its call succeeded leaves the call OK)."""
    if attempt.code is not None:
        return  # the driver that awaited it reported it already
    code = _finished(handle.code(), _UNKNOWN)
    if code is _OK:
        call.ended(attempt, code, None)
    else:
        call.ended(attempt, code, _finished(handle.details(), None), _finished(handle.trailing_metadata(), None))


def _aio_error(error: BaseException | None) -> BaseException:
    """The pool's refusal as a grpc.aio error."""
    if isinstance(error, PoolClosedError):
        return AioPoolClosedError(error.details(), error.code())
    if isinstance(error, PoolUnavailableError):
        return AioPoolUnavailableError(error.details(), error.code())
    assert error is not None
    return error


def _check_metadata(metadata: Any) -> None:
    """Refuse, naming the key, metadata grpc would refuse: for a unary call grpc.aio raises
    its internal ExecuteBatchError (or a TypeError) when the call is awaited, and leaves
    the call unfinished, its slot taken, until it is collected."""
    for pair in metadata:
        try:
            key, value = pair
        except (TypeError, ValueError):
            raise ConfigError("metadata", pair, "each item must be a (key, value) pair") from None
        text = key.decode("latin-1") if isinstance(key, bytes) else key
        if not isinstance(text, str):
            raise TypeError(f"metadata key {key!r}: Expected str or bytes, not {type(key).__name__}")
        if _METADATA_KEY.match(text) is None:
            raise ConfigError("metadata", key, _BAD_KEY)
        if text.endswith("-bin"):
            if not isinstance(value, bytes):
                raise TypeError(f"metadata value of {key!r}: Expected bytes (a '-bin' key), not {type(value).__name__}")
        elif isinstance(value, str):
            if not (value.isascii() and value.isprintable()):
                raise ConfigError("metadata", key, _BAD_VALUE)
        elif isinstance(value, bytes):
            if _METADATA_VALUE.match(value) is None:
                raise ConfigError("metadata", key, _BAD_VALUE)
        else:
            raise TypeError(f"metadata value of {key!r}: Expected str or bytes, not {type(value).__name__}")


# What grpc core accepts in metadata (HTTP/2 header names are lowercase): a key of
# lowercase letters, digits, '-', '_' and '.'; a value of printable ASCII unless its key
# ends in '-bin' (any bytes, sent base64-encoded).
_METADATA_KEY = re.compile(r"[-._0-9a-z]+\Z")
_METADATA_VALUE = re.compile(rb"[\x20-\x7e]*\Z")
_BAD_KEY = "a metadata key must be lowercase letters, digits, '-', '_' or '.' (gRPC refuses others)"
_BAD_VALUE = "its value must be printable ASCII; other bytes need a key ending in '-bin'"


def _finished(coroutine: Any, otherwise: Any) -> Any:
    """What a finished call's status coroutine (`code()`, `details()`) returns, read
    without suspending: on a finished call it completes at its first step."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    except Exception:  # noqa: BLE001 - an interceptor's own exception surfaces here
        return otherwise
    coroutine.close()  # not expected of a done call; count it failed rather than lose it
    return otherwise


class _Proxy:
    """What poolkit.aio's call objects share: the call's state machine, its current
    attempt (grpc's call object, `_handle`), to which the rest of grpc.aio's call API
    passes through, and a start put off while the channel's first resolution runs."""

    __slots__ = ("_attempt", "_call", "_callbacks", "_handle", "_multicallable", "_starting")

    def __init__(self, multicallable: _MultiCallable, call: Call, attempt: Attempt | None, handle: Any) -> None:
        self._multicallable = multicallable
        self._call = call
        self._attempt = attempt
        self._handle = handle
        self._starting: asyncio.Future[None] | None = None
        self._callbacks: list[Callable[[Any], None]] = []

    @property
    def _current(self) -> Attempt:
        """The attempt in flight (or the last to end), once the call has started."""
        attempt = self._attempt
        assert attempt is not None
        return attempt

    async def _started(self) -> Any:
        """The current attempt, once the call has started."""
        if self._handle is None:
            if self._starting is None:
                self._starting = asyncio.ensure_future(self._start_late())
            await self._starting
        return self._handle

    async def _start_late(self) -> None:
        await self._multicallable._owner._first_resolution()
        call = self._call
        if call.over:  # cancelled while it waited
            raise asyncio.CancelledError
        if call.start() is Step.FINISH:
            raise _aio_error(call.error)
        attempt = call.sending
        assert attempt is not None
        self._attempt, self._handle = attempt, self._multicallable._send(call, attempt)
        for callback in self._callbacks:
            self._handle.add_done_callback(callback)

    # grpc.aio.Call: the current attempt's.
    async def initial_metadata(self) -> Any:
        return await (await self._started()).initial_metadata()

    async def trailing_metadata(self) -> Any:
        return await (await self._started()).trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        return await (await self._started()).code()  # type: ignore[no-any-return]

    async def details(self) -> str:
        return await (await self._started()).details()  # type: ignore[no-any-return]

    async def wait_for_connection(self) -> None:
        await (await self._started()).wait_for_connection()

    async def write(self, request: Any) -> None:
        await (await self._started()).write(request)

    async def done_writing(self) -> None:
        await (await self._started()).done_writing()

    def cancelled(self) -> bool:
        handle = self._handle
        return self._call.cancelled if handle is None else handle.cancelled()

    def done(self) -> bool:
        handle = self._handle
        return self._call.over if handle is None else handle.done()

    def time_remaining(self) -> float | None:
        handle = self._handle
        return self._call.remaining() if handle is None else handle.time_remaining()

    def cancel(self) -> bool:
        handle = self._handle
        for attempt in self._call.cancel():
            if attempt.handle is not handle:
                attempt.handle.cancel()
        if handle is None:
            return self._call.cancelled
        return handle.cancel()  # type: ignore[no-any-return]

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._handle is None:
            self._callbacks.append(callback)
        else:
            self._handle.add_done_callback(callback)

    def __repr__(self) -> str:
        if self._handle is None:
            return f"<poolkit.aio call waiting for the first resolution {self._call!r}>"
        return repr(self._handle)


class _UnaryCall(_Proxy, _UnaryUnaryCallBase, _StreamUnaryCallBase):
    """A unary-response call that may be sent again: awaiting it awaits the current
    attempt and, while the call goes on, the next."""

    __slots__ = ()

    def __del__(self) -> None:
        call = getattr(self, "_call", None)
        if call is not None:
            call.abandon()

    def __await__(self) -> Generator[Any, None, Any]:
        if self._handle is None:
            yield from self._started().__await__()
        call = self._call
        if call.timer is not None:  # hedged: several attempts may be out at once
            return (yield from self._drive(Step.WAIT).__await__())
        handle = self._handle
        try:
            response = yield from handle.__await__()
        except grpc.aio.AioRpcError as error:
            call.ended(self._current, error.code(), error.details(), error.trailing_metadata())
            return (yield from self._drive(call.next()).__await__())
        except asyncio.CancelledError as cancelled:
            if _expired(handle):
                raise _deadline_exceeded() from cancelled
            raise
        except Exception:
            _abandon(handle)
            raise
        call.ended(self._current, _OK, None)
        return response

    async def _drive(self, step: Step) -> Any:
        """Carry out the call's steps until it is over: attempts in flight awaited
        together (a hedge), backoffs slept, the answer of the attempt that ends it."""
        call = self._call
        first = self._current
        running: dict[asyncio.Future[Any], Attempt] = {}
        if first.code is None:
            running[asyncio.ensure_future(_outcome(self._handle))] = first
        answers: dict[Attempt, Any] = {}
        try:
            while step is not Step.FINISH:
                if step is Step.SEND:
                    attempt = call.sending
                    assert attempt is not None
                    self._attempt, self._handle = attempt, self._multicallable._send(call, attempt)
                    running[asyncio.ensure_future(_outcome(self._handle))] = attempt
                    step = Step.WAIT
                    continue
                step = await self._wait(running, answers)
        except asyncio.CancelledError as cancelled:
            call.cancel()
            if _expired(self._handle):
                raise _deadline_exceeded() from cancelled
            raise
        finally:
            for task, attempt in running.items():
                attempt.handle.cancel()
                task.cancel()
        final = call.final
        if final is None:
            raise _aio_error(call.error)
        self._attempt, self._handle = final, final.handle
        if final.code is _OK and final in answers:
            return answers[final]
        return await final.handle  # a failed attempt raises its error again

    async def _wait(self, running: dict[asyncio.Future[Any], Attempt], answers: dict[Attempt, Any]) -> Step:
        """Wait for the call's timer or an attempt in flight, whichever comes first; report
        what ended; what the call does next."""
        call = self._call
        if not running:
            assert call.timer is not None  # a backoff
            await asyncio.sleep(call.timer)
            return call.timer_fired()
        done, _ = await asyncio.wait(running, timeout=call.timer, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            return call.timer_fired()
        for task in done:
            attempt = running.pop(task)
            answers[attempt], error = task.result()
            if error is None:
                _report(call, attempt, attempt.handle)
            else:
                call.ended(attempt, error.code(), error.details(), error.trailing_metadata())
        return call.next()


async def _outcome(handle: Any) -> tuple[Any, grpc.aio.AioRpcError | None]:
    """An attempt's response, or the error it failed with (neither when it was
    cancelled: its done-callback reports that), for waiting on several attempts at once."""
    try:
        return await handle, None
    except grpc.aio.AioRpcError as error:
        return None, error
    except asyncio.CancelledError:
        return None, None


def _expired(call: Any) -> bool:
    """Whether a CancelledError out of `call` is its deadline, not a cancel: grpc.aio
    raises one, rather than DEADLINE_EXCEEDED, when a request stream that has sent
    nothing meets a deadline already past. It is, if the caller's own task is not being
    cancelled and the call's deadline has passed."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        return False
    try:
        remaining = call.time_remaining()
    except NotImplementedError:  # an intercepted call cannot say
        return False
    return remaining is not None and remaining <= 0


def _deadline_exceeded() -> grpc.aio.AioRpcError:
    """The error grpc.aio gives a call whose deadline has passed."""
    return grpc.aio.AioRpcError(_DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), "Deadline Exceeded", None)


def _abandon(call: Any) -> None:
    """An attempt raised what is not a grpc status (grpc.aio's task for it failed): grpc
    would never end it, nor its done-callback release its slot, until it is collected.
    Cancelling it ends it now (CANCELLED, which says nothing against the endpoint)."""
    call.cancel()


class _UnaryUnary(_MultiCallable, _UnaryUnaryBase):
    __slots__ = ()

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._start(request, timeout, metadata, credentials, wait_for_ready, compression)


class _UnaryStream(_MultiCallable, _UnaryStreamBase):
    __slots__ = ()
    _streaming = True

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._start(request, timeout, metadata, credentials, wait_for_ready, compression)


class _StreamUnary(_MultiCallable, _StreamUnaryBase):
    __slots__ = ()
    _streaming_request = True

    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._start(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)


class _StreamStream(_MultiCallable, _StreamStreamBase):
    __slots__ = ()
    _streaming = True
    _streaming_request = True

    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._start(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)


class _Stream(_Proxy, _UnaryStreamCallBase, _StreamStreamCallBase):
    """grpc.aio's streaming call, as the caller sees it: the caller's reads drive the call
    (before the first message a failed attempt may be followed by another, as the call
    decides), and it is cancelled when the caller drops it.

    grpc.aio's own tasks keep its call object alive, so a response stream left unread
    would stay open, and its slot busy, until the server ended it. Callers hold this
    proxy instead; when it is collected unfinished, the call is cancelled and its slot
    released. Iteration goes through `_Messages`, which holds the proxy, so
    `async for reply in stub.Stream(request)` keeps the call alive while it runs.
    """

    __slots__ = ()

    def __del__(self) -> None:
        call = getattr(self, "_call", None)
        if call is None:
            return
        call.abandon()
        handle = self._handle
        if handle is not None and not handle.done():
            handle.cancel()

    async def _again(self, error: grpc.aio.AioRpcError) -> bool:
        """The current attempt failed before any message: start the next one if the call
        goes on (True), after its backoff."""
        call = self._call
        call.ended(self._current, error.code(), error.details(), error.trailing_metadata())
        step = call.next()
        while step is Step.WAIT:
            assert call.timer is not None  # a stream waits only for a backoff
            await asyncio.sleep(call.timer)
            step = call.timer_fired()
        if step is Step.FINISH:
            return False
        attempt = call.sending
        assert attempt is not None
        self._attempt, self._handle = attempt, self._multicallable._send(call, attempt)
        return True

    def __aiter__(self) -> _Messages:
        return _Messages(self, None if self._handle is None else self._handle.__aiter__())

    async def read(self) -> Any:
        call = self._call
        if self._handle is None:
            await self._started()
        try:
            while not call.read:
                try:
                    message = await self._handle.read()
                except grpc.aio.AioRpcError as error:
                    if await self._again(error):
                        continue
                    raise
                call.first_message()
                return message
            return await self._handle.read()
        except asyncio.CancelledError as cancelled:
            if _expired(self._handle):
                raise _deadline_exceeded() from cancelled
            raise


class _Messages:
    """The response iterator of a `_Stream`; holding the stream keeps the call open.
    Once a message has come, each next one is grpc's iterator's, untouched."""

    __slots__ = ("_iterator", "_started", "_stream")

    def __init__(self, stream: _Stream, iterator: Any) -> None:
        self._stream = stream
        self._iterator = iterator
        self._started = False

    def __aiter__(self) -> _Messages:
        return self

    def __anext__(self) -> Any:
        if self._started:
            return self._iterator.__anext__()
        return self._first()

    async def _first(self) -> Any:
        """The first message, sending the call again while the call goes on (and a
        deadline that grpc.aio reports as a cancellation, as the DEADLINE_EXCEEDED it is)."""
        stream = self._stream
        if self._iterator is None:
            self._iterator = (await stream._started()).__aiter__()
        try:
            while True:
                try:
                    message = await self._iterator.__anext__()
                    break
                except grpc.aio.AioRpcError as error:
                    if not await stream._again(error):
                        raise
                    self._iterator = stream._handle.__aiter__()
        except asyncio.CancelledError as cancelled:
            if _expired(stream._handle):
                raise _deadline_exceeded() from cancelled
            raise
        stream._call.first_message()
        self._started = True
        return message
