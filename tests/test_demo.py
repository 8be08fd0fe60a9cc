"""`poolkit demo`: the command end to end, and its load generator and display on their own."""

from __future__ import annotations

import asyncio
import functools
import io
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

import pytest

from poolkit import PoolUnavailableError, _demo
from poolkit.__main__ import main
from poolkit.testing import StatsResponse


def _run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "poolkit", "demo", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def _number(pattern: str, text: str) -> int:
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return int(match.group(1).replace(",", ""))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "header"),
    [
        (("--concurrency", "4"), "pooled: 4 threads share one poolkit channel for 2 s"),
        (("--aio", "--concurrency", "8"), "pooled (asyncio): 8 tasks share one poolkit.aio channel for 2 s"),
    ],
    ids=["threads", "asyncio"],
)
def test_demo_spreads_calls_over_four_connections_and_contrasts_fresh_channels(
    flags: tuple[str, ...], header: str
) -> None:
    finished = _run_demo("--duration", "2", *flags)
    out = finished.stdout
    assert finished.returncode == 0, f"exit {finished.returncode}\n{out}\n{finished.stderr}"
    assert re.search(f"^{re.escape(header)}$", out, re.MULTILINE), out

    # Progress went out as plain lines, since stdout is a pipe.
    assert re.search(r"^\s+\d+\.\d s\s+[\d,]+ calls\s+[\d,]+/s\s+\d+ errors  share( +\d+%){4}$", out, re.MULTILINE), out
    assert "\r" not in out
    assert "\x1b" not in out

    pooled = out[out.index("pooled summary") : out.index("fresh-per-request:")]
    calls = _number(r"^  calls\s+([\d,]+)\s+in ", pooled)
    assert calls > 0
    assert _number(r"^  errors\s+([\d,]+)", pooled) == 0
    assert _number(r"^  connections\s+([\d,]+)\s+distinct", pooled) == 4

    rows = re.findall(r"^  (127\.0\.0\.1:\d+)\s+([\d,]+)\s+[\d.]+%\s+([\d,]+)\s", pooled, re.MULTILINE)
    assert len(rows) == 4, pooled
    for address, endpoint_calls, errors in rows:
        assert int(endpoint_calls.replace(",", "")) > 0, address
        assert errors == "0", address
    assert sum(int(c.replace(",", "")) for _, c, _ in rows) == calls
    assert "channel and server counts agree on every endpoint" in pooled

    contrast = out[out.index("contrast:") :]
    match = re.search(r"^  connections opened\s+([\d,]+)\s+([\d,]+)$", contrast, re.MULTILINE)
    assert match, contrast
    assert int(match.group(1)) == 4
    fresh_connections = int(match.group(2).replace(",", ""))
    fresh_calls = _number(r"^  calls\s+[\d,]+\s+([\d,]+)$", contrast)
    assert 0 < fresh_calls <= _demo.FRESH_MAX_CALLS
    # One connection per call; a client port reused after TIME_WAIT would count once.
    assert fresh_connections > fresh_calls // 2
    assert re.search(r"^  connections per call\s+\S+\s+\S+$", contrast, re.MULTILINE), contrast
    assert f"pooled: 4 connections for {calls:,} calls; fresh-per-request:" in contrast


def test_bad_flags_are_refused() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--concurrency", "0"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


# -- the load generator, threads and asyncio tasks alike ---------------------------------

CallBody = Callable[[int], None]
"""What one call does, given its worker's index: return to succeed, raise to fail."""


class StartLoad(Protocol):
    def __call__(
        self, body: CallBody, *, pause: float = 0.0, concurrency: int, duration: float, max_calls: int
    ) -> _demo.BaseLoad:
        """A running load whose every call runs `body`, then takes `pause` seconds more."""


def _start_thread_load(
    body: CallBody, *, pause: float = 0.0, concurrency: int, duration: float, max_calls: int
) -> _demo.BaseLoad:
    never = threading.Event()

    def make_call(worker: int) -> _demo.Call:
        def call() -> None:
            body(worker)
            if pause:
                never.wait(pause)

        return call

    return _demo.Load(make_call, concurrency=concurrency, duration=duration, max_calls=max_calls)


def _start_async_load(
    loop: _demo.EventLoopThread,
    body: CallBody,
    *,
    pause: float = 0.0,
    concurrency: int,
    duration: float,
    max_calls: int,
) -> _demo.BaseLoad:
    def make_call(worker: int) -> _demo.AsyncCall:
        async def call() -> None:
            body(worker)
            await asyncio.sleep(pause)

        return call

    return _demo.AsyncLoad(make_call, loop=loop.loop, concurrency=concurrency, duration=duration, max_calls=max_calls)


@pytest.fixture(params=["threads", "asyncio"])
def start_load(request: pytest.FixtureRequest) -> Iterator[StartLoad]:
    if request.param == "threads":
        yield _start_thread_load
        return
    with _demo.EventLoopThread() as loop:
        yield functools.partial(_start_async_load, loop)


def test_load_stops_at_its_call_count(start_load: StartLoad) -> None:
    made = [0] * 3

    def count(worker: int) -> None:
        made[worker] += 1

    load = start_load(count, concurrency=3, duration=60, max_calls=1000)
    assert load.wait(30)
    result = load.result()
    assert result.calls == 1000 == sum(made)
    assert made == [334, 333, 333]
    assert result.errors == 0
    assert len(result.latencies) == 1000
    assert list(result.latencies) == sorted(result.latencies)


def test_load_stops_at_its_duration(start_load: StartLoad) -> None:
    load = start_load(lambda _worker: None, pause=0.01, concurrency=2, duration=0.2, max_calls=1_000_000)
    assert load.wait(10)
    result = load.result()
    assert 0 < result.calls < 1_000_000
    assert result.elapsed < 5


def test_load_counts_failed_calls_and_keeps_the_first_error(start_load: StartLoad) -> None:
    def fail_on_worker_0(worker: int) -> None:
        if worker == 0:
            raise PoolUnavailableError("no endpoint is ready")

    load = start_load(fail_on_worker_0, concurrency=2, duration=60, max_calls=100)
    assert load.wait(30)
    result = load.result()
    assert (result.calls, result.errors, len(result.latencies)) == (100, 50, 50)
    assert result.first_error == "UNAVAILABLE: no endpoint is ready"


def test_a_crashing_call_stops_the_load_and_surfaces_from_result(start_load: StartLoad) -> None:
    def crash_on_worker_0(worker: int) -> None:
        if worker == 0:
            raise ValueError("not a grpc error")

    load = start_load(crash_on_worker_0, pause=0.01, concurrency=2, duration=60, max_calls=1_000_000)
    assert load.wait(10)
    with pytest.raises(ValueError, match="not a grpc error"):
        load.result()


def test_async_load_runs_its_tasks_together_on_one_loop_thread() -> None:
    in_flight = peak = 0
    threads: set[str] = set()

    def make_call(_worker: int) -> _demo.AsyncCall:
        async def call() -> None:
            nonlocal in_flight, peak
            threads.add(threading.current_thread().name)
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.01)
            in_flight -= 1

        return call

    with _demo.EventLoopThread() as loop:
        load = _demo.AsyncLoad(make_call, loop=loop.loop, concurrency=4, duration=60, max_calls=40)
        assert load.wait(10)
    assert load.result().calls == 40
    assert peak == 4
    assert threads == {"poolkit-demo-loop"}


def test_percentiles_are_nearest_rank() -> None:
    result = _demo.LoadResult(
        calls=100, errors=0, elapsed=1.0, latencies=[i / 1000 for i in range(1, 101)], first_error=None
    )
    assert result.percentile(0.50) == 0.050
    assert result.percentile(0.99) == 0.099
    assert result.rate == 100
    empty = _demo.LoadResult(calls=0, errors=0, elapsed=0.0, latencies=[], first_error=None)
    assert empty.percentile(0.5) is None
    assert empty.rate == 0


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_one_line_on_a_terminal() -> None:
    out = _Terminal()
    display = _demo.ProgressDisplay(out, interactive=True, width=20)
    display.show("first " * 10, 0.0)
    display.show("second", 0.25)
    display.finish("last")
    text = out.getvalue()
    assert text.count("\n") == 1
    assert text.endswith("\rlast\x1b[K\n")
    assert "\rfirst first first f\x1b[K" in text  # cut short of the width, never wrapped


def test_progress_prints_plain_lines_at_most_once_a_second() -> None:
    out = io.StringIO()
    display = _demo.ProgressDisplay(out, interactive=False)
    for tick in range(9):
        display.show(f"at {tick * 0.25:.2f}", tick * 0.25)
    display.finish("done")
    assert out.getvalue().splitlines() == ["at 0.00", "at 1.00", "at 2.00", "done"]


def test_contrast_table_lines_up() -> None:
    def phase(calls: int, connections: int) -> _demo.PhaseResult:
        load = _demo.LoadResult(calls=calls, errors=0, elapsed=2.0, latencies=[0.001, 0.002], first_error=None)
        stats = [
            StatsResponse(
                server_id="echo-0", calls=calls, peers=[f"ipv4:127.0.0.1:{40000 + i}" for i in range(connections)]
            )
        ]
        return _demo.PhaseResult(load, stats)

    lines = list(_demo.contrast_summary(phase(120_000, 4), phase(500, 500)))
    assert lines[0].startswith("contrast:")
    assert len({len(line) for line in lines[1:]}) == 1, "\n".join(lines)
    assert "  connections per call  0.000033               1.00" in lines
