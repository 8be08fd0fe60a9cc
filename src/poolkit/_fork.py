"""poolkit across fork(): pre-forking servers (gunicorn, uWSGI, multiprocessing's "fork"
start method) copy a process with its poolkit channels into every worker.

A channel's connections, threads and grpc internals belong to the process that made
them; in a forked child, grpc's threads are gone. So in the child, every channel made
before the fork is closed on the spot (without touching grpc), and a call on it raises
`ForkedChannelError`, saying to create channels in the worker. If the parent had a
channel open when it forked and grpc's fork support was off (`GRPC_ENABLE_FORK_SUPPORT`
unset, grpc's default), grpc itself is unusable in the child (using it crashes the
process), and building a new channel there raises `ForkedProcessError` instead. A parent
that closes its channels before forking, or enables grpc's fork support, leaves its
children free to build their own.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING

from . import _source, _telemetry
from ._errors import ForkedProcessError

if TYPE_CHECKING:
    from ._shell import Pooled


def _grpc_fork_support() -> bool:
    """Whether grpc's own fork support is on (it reads the variable when it starts)."""
    return os.environ.get("GRPC_ENABLE_FORK_SUPPORT", "").strip().lower() in ("1", "true", "yes")


class _Forks:
    def __init__(self) -> None:
        self.channels: weakref.WeakSet[Pooled] = weakref.WeakSet()
        self.lock = threading.Lock()
        self.unusable: str | None = None  # why grpc cannot be used in this (forked) process

    def add(self, channel: Pooled) -> None:
        if self.unusable is not None:
            raise ForkedProcessError(self.unusable)
        with self.lock:
            self.channels.add(channel)

    def before(self) -> None:
        self.lock.acquire()  # no channel is half-registered when the process is copied

    def in_parent(self) -> None:
        self.lock.release()

    def in_child(self) -> None:
        """The forked child, one thread, before anything else runs: close every channel
        of the parent's without touching grpc, and renew the locks a parent thread may
        have held at the fork (they would never be released here)."""
        self.lock = threading.Lock()
        _telemetry.after_fork()
        _source.after_fork()
        parent = os.getppid()
        open_channels = 0
        for channel in list(self.channels):
            if not channel._pool.closed:
                open_channels += 1
            channel._after_fork(parent)
        self.channels = weakref.WeakSet()
        if open_channels and not _grpc_fork_support():
            self.unusable = (
                f"this process was forked from process {parent} while it had {open_channels} poolkit "
                "channel(s) open, and grpc cannot be used after such a fork unless GRPC_ENABLE_FORK_SUPPORT=1 "
                "was set before the parent started. Create channels only after forking (in each worker: "
                "gunicorn's post_fork hook, or on first use), close the parent's channels before it forks, "
                "or start workers with multiprocessing's 'spawn' or 'forkserver' method"
            )


_forks = _Forks()
os.register_at_fork(before=_forks.before, after_in_parent=_forks.in_parent, after_in_child=_forks.in_child)


def register(channel: Pooled) -> None:
    """Track `channel` across forks; refuse to build one where grpc is unusable."""
    _forks.add(channel)
