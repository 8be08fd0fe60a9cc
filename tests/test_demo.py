"""`poolkit demo`: the command end to end, its fault schedule, and its load generator and
display on their own."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

import pytest
from _support import wait_until

import poolkit
from poolkit import PoolUnavailableError, _demo
from poolkit import _demo_traffic as _load
from poolkit.__main__ import build_parser, main
from poolkit.testing import EchoRequest, EchoStub, StatsResponse


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
    ("flags", "header", "sources"),
    [
        (
            ("--no-fault", "--concurrency", "4", "--sources", "0"),
            "pooled: 4 threads share one poolkit channel for 2 s",
            [],
        ),
        (
            ("--no-fault", "--aio", "--concurrency", "8"),
            "pooled (asyncio): 8 tasks share one poolkit.aio channel for 2 s",
            ["127.0.0.2", "127.0.0.3"],
        ),
    ],
    ids=["threads-unbound", "asyncio-2-sources"],
)
def test_demo_spreads_calls_over_a_connection_per_route_and_contrasts_fresh_channels(
    flags: tuple[str, ...], header: str, sources: list[str]
) -> None:
    finished = _run_demo("--duration", "2", *flags)
    out = finished.stdout
    assert finished.returncode == 0, f"exit {finished.returncode}\n{out}\n{finished.stderr}"
    assert re.search(f"^{re.escape(header)}$", out, re.MULTILINE), out
    routes = 4 * max(len(sources), 1)  # 4 endpoints, each once from every source address

    # Progress went out as plain lines, since stdout is a pipe.
    assert re.search(r"^\s+\d+\.\d s\s+[\d,]+ calls\s+[\d,]+/s\s+\d+ errors  share( +\d+%){4}$", out, re.MULTILINE), out
    assert "\r" not in out
    assert "\x1b" not in out

    pooled = out[out.index("pooled summary") : out.index("fresh-per-request:")]
    calls = _number(r"^  calls\s+([\d,]+)\s+in ", pooled)
    assert calls > 0
    assert _number(r"^  errors\s+([\d,]+)", pooled) == 0
    assert _number(r"^  connections\s+([\d,]+)\s+distinct", pooled) == routes

    rows = re.findall(r"^  (127\.0\.0\.1:\d+)\s+([\d,]+)\s+[\d.]+%\s+([\d,]+)\s", pooled, re.MULTILINE)
    assert len(rows) == 4, pooled
    for address, endpoint_calls, errors in rows:
        assert int(endpoint_calls.replace(",", "")) > 0, address
        assert errors == "0", address
    assert sum(int(c.replace(",", "")) for _, c, _ in rows) == calls
    assert "channel and server counts agree on every endpoint" in pooled
    if sources:
        assert f"  bound to source addresses {', '.join(sources)}: {routes} routes (4 endpoints × 2 sources)" in out
        per_source = _check_sources_table(pooled, sources)
        assert sum(per_source.values()) == calls
    else:
        assert "  not bound to a source address (the kernel picks one): 4 routes, one per endpoint" in out
        row = _row("default", pooled).split()
        assert (_count(row[0]), row[1], _count(row[2])) == (calls, "100.0%", 4), pooled
        assert "  default: not bound, the kernel picked 127.0.0.1; sockets: every socket to the servers," in pooled

    contrast = out[out.index("contrast:") :]
    match = re.search(r"^  connections opened\s+([\d,]+)\s+([\d,]+)$", contrast, re.MULTILINE)
    assert match, contrast
    assert int(match.group(1)) == routes
    fresh_connections = int(match.group(2).replace(",", ""))
    fresh_calls = _number(r"^  calls\s+[\d,]+\s+([\d,]+)$", contrast)
    assert 0 < fresh_calls <= _demo.FRESH_MAX_CALLS
    # One connection per call; a client port reused after TIME_WAIT would count once.
    assert fresh_connections > fresh_calls // 2
    assert re.search(r"^  connections per call\s+\S+\s+\S+$", contrast, re.MULTILINE), contrast
    assert f"pooled: {routes} connections for {calls:,} calls; fresh-per-request:" in contrast


def _check_sources_table(pooled: str, sources: list[str]) -> dict[str, int]:
    """The pooled summary's sources table: a row per source with calls and connections
    from it, calls adding up to its total row and to the endpoint table's. Calls per source."""
    rows = dict(re.findall(r"^  (127\.0\.0\.\d+)\s+(\d.*)$", pooled, re.MULTILINE))
    assert sorted(rows) == sources, pooled
    calls = {}
    for source, row in rows.items():
        cells = row.split()
        assert len(cells) == 6, row  # calls, share, connections, sockets, time_wait, of port range
        calls[source] = _count(cells[0])
        assert calls[source] > 0, pooled
        assert _count(cells[2]) > 0, pooled  # the servers saw connections from it
        assert _count(cells[3]) > 0, pooled  # and it has sockets open
        assert re.fullmatch(r"\d+\.\d{3}%", cells[5]), row
    endpoint_total, source_total = (_count(row.split()[0]) for row in re.findall(r"^  total\s+(.*)$", pooled, re.M))
    assert sum(calls.values()) == source_total == endpoint_total, pooled
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("flags", [(), ("--aio",)], ids=["threads", "asyncio"])
def test_demo_kills_a_server_a_third_of_the_way_and_restarts_it_at_two_thirds(flags: tuple[str, ...]) -> None:
    finished = _run_demo("--duration", "3", "--concurrency", "4", *flags)
    out = finished.stdout
    assert finished.returncode == 0, f"exit {finished.returncode}\n{out}\n{finished.stderr}"
    servers = re.findall(r"^  (127\.0\.0\.1:\d+)  pid (\d+)$", out, re.MULTILINE)
    assert len(servers) == 4, out
    victim, first_pid = servers[0]
    assert f"  fault: {victim} is killed at 1.0 s and restarted on the same port at 2.0 s" in out

    # Both events show among the progress lines, each with the process it concerns.
    killed = re.search(rf"^\s+[\d.]+ s killed {re.escape(victim)} \(SIGKILL to pid (\d+)\)$", out, re.MULTILINE)
    restarted = re.search(
        rf"^\s+[\d.]+ s restarted {re.escape(victim)} on the same port \(pid (\d+)\)$", out, re.MULTILINE
    )
    assert killed, out
    assert restarted, out
    assert killed.group(1) == first_pid != restarted.group(1)

    fault = out[out.index(f"fault: {victim} killed at") : out.index("fresh-per-request:")]
    assert re.search(r"^  calls by phase\s+before\s+while down\s+after restart$", fault, re.MULTILINE), fault
    rows = dict(re.findall(r"^  (127\.0\.0\.1:\d+(?: \*)?)\s+(\d.*)$", fault, re.MULTILINE))
    assert sorted(rows) == sorted([f"{victim} *", *(address for address, _ in servers[1:])]), fault
    for address, _ in servers[1:]:  # the servers left up carry the load before and while one is down
        before, down = _cells(rows[address])[:2]  # a slow restart may leave no time after it
        assert _count(before) > 0, fault
        assert _count(down) > 0, fault
    assert _count(_cells(rows[f"{victim} *"])[0]) > 0
    failed = _cells(_row("failed calls", fault))
    assert len(failed) == 3
    assert failed[0] == "0"  # nothing fails while every server is up
    assert _count(_cells(_row("killed server saw", fault))[0]) > 0
    # Each source address has a route to the killed server, and each saw the kill for itself.
    assert f"  {victim} as the channel saw it, from each source address:" in fault
    for source in ("127.0.0.2", "127.0.0.3"):
        assert re.search(rf"^    from {re.escape(source)}: status \S+, health \S+", fault, re.MULTILINE), fault
        assert re.search(rf"^\s+[\d.]+ s  from {re.escape(source)}  healthy -> ", fault, re.MULTILINE), fault

    pooled = out[out.index("pooled summary") : out.index(f"fault: {victim} killed at")]
    _check_sources_table(pooled, ["127.0.0.2", "127.0.0.3"])


@pytest.mark.slow
def test_the_pool_sends_calls_to_a_killed_server_again_once_it_is_restarted() -> None:
    notes: list[str] = []
    with (
        _demo.LocalServers.start(2) as servers,
        poolkit.insecure_channel(servers.target, options=_demo.RECONNECT_OPTIONS) as channel,
    ):
        unary = EchoStub(channel).Unary
        schedule = _demo.FaultSchedule(servers, channel.describe, notes.append, duration=0.0)  # both due at once
        load = _load.Load(
            lambda _worker: lambda: unary(EchoRequest(), timeout=_load.CALL_TIMEOUT),
            concurrency=4,
            duration=120,
            max_calls=10**9,
        )
        try:
            wait_until(lambda: load.snapshot().calls > 100, "calls to flow")
            schedule.tick(load)  # the kill
            wait_until(
                lambda: channel.describe()["endpoints"][0]["slots"][0]["state"] != "ready",
                "the channel to see the killed server's connection fail",
            )
            schedule.tick(load)  # the restart
            wait_until(
                lambda: _served(servers, 0) > 0,
                lambda: f"the restarted server to be called again: {channel.describe()}",
                limit=30,  # an ejection lasts at most 6 s by default; then a probe brings it back
            )
        finally:
            load.stop()
        report = schedule.finish(load)

    victim = servers.addresses[0]
    assert [mark.phase for mark in report.marks] == ["start", "before", "down", "after"]
    assert report.victim == victim
    assert report.errors_before == 0
    assert report.error is None
    assert report.killed_at is not None
    assert report.restarted_at is not None
    after = report.marks[-1].stats[0]
    assert after is not None
    assert after.calls > 0
    assert [note.split(" s ", 1)[1].split(" (")[0] for note in notes] == [
        f"killed {victim}",
        f"restarted {victim} on the same port",
    ]
    lines = list(_demo.fault_summary(report))
    assert f"  the killed server served {after.calls:,} calls after its restart" in lines
    totals = report.server_totals()
    assert [total.server_id for total in totals] == servers.addresses
    assert totals[0].calls == sum(mark.stats[0].calls for mark in report.marks[1:] if mark.stats[0] is not None)


def _served(servers: _demo.LocalServers, index: int) -> int:
    stat = servers.stats()[index]
    return 0 if stat is None else int(stat.calls)


def _row(name: str, text: str) -> str:
    match = re.search(rf"^  {re.escape(name)}\s+(.*)$", text, re.MULTILINE)
    assert match, f"no {name!r} row in:\n{text}"
    return match.group(1)


def _cells(row: str) -> list[str]:
    """A phase table row's cells: "12 (5 failed)" is one cell."""
    return re.findall(r"[\d,]+ \([\d,]+ failed\)|\S+", row)


def _count(cell: str) -> int:
    return int(cell.split(" ", maxsplit=1)[0].replace(",", ""))


def test_bad_flags_are_refused() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--concurrency", "0"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


def test_no_fault_turns_the_fault_off() -> None:
    assert build_parser().parse_args(["demo"]).fault is True
    assert build_parser().parse_args(["demo", "--no-fault"]).fault is False
    assert _demo.DemoOptions().fault is True


def test_sources_bind_the_pooled_channel_to_loopback_addresses_from_127_0_0_2() -> None:
    assert build_parser().parse_args(["demo"]).sources == 2 == _demo.DemoOptions().sources
    assert _demo.DemoOptions().config.source_addresses == ("127.0.0.2", "127.0.0.3")
    assert _demo.DemoOptions(sources=0).config.source_addresses == ()
    assert _demo.source_addresses(16)[-1] == "127.0.0.17"
    assert build_parser().parse_args(["demo", "--sources", "16"]).sources == 16
    for bad in ("-1", "17", "two"):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(["demo", "--sources", bad])
        assert exit_info.value.code == 2


# -- the load generator, threads and asyncio tasks alike ---------------------------------

CallBody = Callable[[int], None]
"""What one call does, given its worker's index: return to succeed, raise to fail."""


class StartLoad(Protocol):
    def __call__(
        self, body: CallBody, *, pause: float = 0.0, concurrency: int, duration: float, max_calls: int
    ) -> _load.BaseLoad:
        """A running load whose every call runs `body`, then takes `pause` seconds more."""


def _start_thread_load(
    body: CallBody, *, pause: float = 0.0, concurrency: int, duration: float, max_calls: int
) -> _load.BaseLoad:
    never = threading.Event()

    def make_call(worker: int) -> _load.Call:
        def call() -> None:
            body(worker)
            if pause:
                never.wait(pause)

        return call

    return _load.Load(make_call, concurrency=concurrency, duration=duration, max_calls=max_calls)


def _start_async_load(
    loop: _load.EventLoopThread,
    body: CallBody,
    *,
    pause: float = 0.0,
    concurrency: int,
    duration: float,
    max_calls: int,
) -> _load.BaseLoad:
    def make_call(worker: int) -> _load.AsyncCall:
        async def call() -> None:
            body(worker)
            await asyncio.sleep(pause)

        return call

    return _load.AsyncLoad(make_call, loop=loop.loop, concurrency=concurrency, duration=duration, max_calls=max_calls)


@pytest.fixture(params=["threads", "asyncio"])
def start_load(request: pytest.FixtureRequest) -> Iterator[StartLoad]:
    if request.param == "threads":
        yield _start_thread_load
        return
    with _load.EventLoopThread() as loop:
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

    def make_call(_worker: int) -> _load.AsyncCall:
        async def call() -> None:
            nonlocal in_flight, peak
            threads.add(threading.current_thread().name)
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.01)
            in_flight -= 1

        return call

    with _load.EventLoopThread() as loop:
        load = _load.AsyncLoad(make_call, loop=loop.loop, concurrency=4, duration=60, max_calls=40)
        assert load.wait(10)
    assert load.result().calls == 40
    assert peak == 4
    assert threads == {"poolkit-demo-loop"}


def test_percentiles_are_nearest_rank() -> None:
    result = _load.LoadResult(
        calls=100, errors=0, elapsed=1.0, latencies=[i / 1000 for i in range(1, 101)], first_error=None
    )
    assert result.percentile(0.50) == 0.050
    assert result.percentile(0.99) == 0.099
    assert result.rate == 100
    empty = _load.LoadResult(calls=0, errors=0, elapsed=0.0, latencies=[], first_error=None)
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
        load = _load.LoadResult(calls=calls, errors=0, elapsed=2.0, latencies=[0.001, 0.002], first_error=None)
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


def test_a_note_gets_a_line_of_its_own_between_progress_lines() -> None:
    out = _Terminal()
    display = _demo.ProgressDisplay(out, interactive=True, width=40)
    display.show("progress 1", 0.0)
    display.note("  1.0 s killed 127.0.0.1:1")
    display.show("progress 2", 0.25)
    assert out.getvalue() == "\rprogress 1\x1b[K\r  1.0 s killed 127.0.0.1:1\x1b[K\n\rprogress 2\x1b[K"
    plain = io.StringIO()
    _demo.ProgressDisplay(plain, interactive=False).note("  1.0 s killed 127.0.0.1:1")
    assert plain.getvalue() == "  1.0 s killed 127.0.0.1:1\n"


VICTIM, OTHER = "127.0.0.1:1001", "127.0.0.1:1002"


def _mark(
    phase: str, at: float, load: tuple[int, int], endpoints: dict[str, tuple[int, int]], **described: object
) -> _demo.Mark:
    """A mark whose channel made `endpoints[address]` = (calls, errors) so far."""
    rows = [{"address": address, "calls": calls, "errors": errors} for address, (calls, errors) in endpoints.items()]
    stats = [StatsResponse(server_id=address, calls=calls) for address, (calls, _) in endpoints.items()]
    snapshot = _load.LoadSnapshot(at, *load)
    return _demo.Mark(phase, at, snapshot, {"endpoints": rows, **described}, list(stats), described_at=at + 0.5)


def _report(**final: object) -> _demo.FaultReport:
    marks = [
        _mark("start", 0.0, (0, 0), {VICTIM: (0, 0), OTHER: (0, 0)}),
        _mark("before", 3.0, (200, 0), {VICTIM: (100, 0), OTHER: (100, 0)}),
        _mark("down", 6.0, (405, 3), {VICTIM: (105, 3), OTHER: (300, 0)}),
        _mark("after", 9.0, (545, 3), {VICTIM: (145, 3), OTHER: (400, 0)}, **final),
    ]
    down = marks[2]
    marks[2] = dataclasses.replace(down, stats=[None, down.stats[1]])
    return _demo.FaultReport(VICTIM, [VICTIM, OTHER], marks, 3.0, 6.0, None)


def test_fault_summary_reads_a_channel_without_endpoint_health() -> None:
    report = _report()
    lines = list(_demo.fault_summary(report))
    assert lines[0] == f"fault: {VICTIM} killed at 3.0 s, restarted on the same port at 6.0 s"
    table = lines[1 : lines.index("") - 2]
    assert len({len(line) for line in table}) == 1, "\n".join(lines)
    assert table[0].split() == ["calls", "by", "phase", "before", "while", "down", "after", "restart"]
    assert table[1].split() == ["seconds", "0.0-3.0", "3.0-6.0", "6.0-9.0"]
    assert table[2].split() == [VICTIM, "*", "100", "5", "(3", "failed)", "40"]
    assert table[3].split() == [OTHER, "100", "200", "100"]
    assert table[5].split() == ["all", "calls", "200", "205", "140"]
    assert table[6].split() == ["failed", "calls", "0", "3", "0"]
    assert table[7].split() == ["killed", "server", "saw", "100", "down", "145"]
    assert "  the killed server served 145 calls after its restart" in lines
    assert lines[-2:] == [
        f"  {VICTIM} as the channel saw it: status -, health -, ejected -",
        "    (this channel reports no status changes)",
    ]
    assert report.errors_before == 0
    assert [(total.calls, list(total.peers)) for total in report.server_totals()] == [(245, []), (800, [])]


def test_fault_summary_shows_the_killed_servers_status_changes_in_run_time() -> None:
    report = _report(
        transitions=[
            {"ago_s": 6.0, "endpoint": VICTIM, "from": "healthy", "to": "ejected", "why": "5 consecutive failures"},
            {"ago_s": 5.5, "endpoint": OTHER, "from": "healthy", "to": "draining", "why": "not this one"},
            {"ago_s": 1.5, "endpoint": VICTIM, "from": "ejected", "to": "probing", "why": "ejection over"},
        ]
    )
    endpoints = report.marks[-1].described["endpoints"]
    endpoints[0].update(status="healthy", health="serving", ejections=1)
    lines = list(_demo.fault_summary(report))
    assert lines[-3:] == [
        f"  {VICTIM} as the channel saw it: status healthy, health serving, ejected 1 time",
        "      3.5 s  healthy -> ejected  (5 consecutive failures)",
        "      8.0 s  ejected -> probing  (ejection over)",
    ]


def _route(address: str, source: str | None, calls: int, errors: int = 0, ewma_ms: float = 1.0) -> dict[str, object]:
    return {"address": address, "source": source, "calls": calls, "errors": errors, "ewma_ms": ewma_ms}


def _budget(sockets: int, time_wait: int) -> dict[str, object]:
    return {"sockets": sockets, "time_wait": time_wait, "ephemeral_range": [32768, 60999]}


def test_pooled_summary_adds_up_each_endpoints_routes_and_shows_each_source() -> None:
    described = {
        "endpoints": [
            _route(VICTIM, "127.0.0.2", 300, errors=2, ewma_ms=1.5),
            _route(VICTIM, "127.0.0.3", 100, ewma_ms=4.0),
            _route(OTHER, "127.0.0.2", 350),
            _route(OTHER, "127.0.0.3", 250),
        ],
        "port_budget": {"127.0.0.2": _budget(4, 2), "127.0.0.3": _budget(2, 0)},
    }
    stats = [
        StatsResponse(server_id=VICTIM, calls=400, peers=["ipv4:127.0.0.2:40001", "ipv4:127.0.0.3:40002"]),
        # grpc may write an IPv4 client of a dual-stack socket as a v4-mapped IPv6 address.
        StatsResponse(server_id=OTHER, calls=600, peers=["ipv4:127.0.0.2:40003", "ipv6:%5B::ffff:127.0.0.3%5D:40004"]),
    ]
    load = _load.LoadResult(calls=1000, errors=0, elapsed=2.0, latencies=[0.001], first_error=None)
    phase = _demo.PhaseResult(load, stats)
    lines = list(_demo.pooled_summary(phase, described, [VICTIM, OTHER]))
    text = "\n".join(lines)

    assert _demo.endpoint_shares(described) == [0.4, 0.6]
    assert _row(VICTIM, text).split() == ["400", "40.0%", "2", "4.00", "ms", "400", "2"]  # ewma: the highest
    assert _row(OTHER, text).split() == ["600", "60.0%", "0", "1.00", "ms", "600", "2"]
    assert "  channel and server counts agree on every endpoint" in lines
    assert _row("127.0.0.2", text).split() == ["650", "65.0%", "2", "4", "2", "0.014%"]
    assert _row("127.0.0.3", text).split() == ["350", "35.0%", "2", "2", "0", "0.007%"]
    totals = [line.split()[1:] for line in lines if line.startswith("  total ")]
    assert totals == [["1,000", "100.0%", "2", "1,000", "4"], ["1,000", "100.0%", "4", "6", "2"]]
    header = next(index for index, line in enumerate(lines) if line.startswith("  source "))
    assert len({len(line) for line in lines[header : header + 4]}) == 1, text  # the total row ends short
    assert _demo.routes_line(described["endpoints"]) == (
        "bound to source addresses 127.0.0.2, 127.0.0.3: 4 routes (2 endpoints × 2 sources)"
    )


def test_fault_summary_counts_and_lists_every_route_to_the_killed_server() -> None:
    routes = [(VICTIM, "127.0.0.2"), (VICTIM, "127.0.0.3"), (OTHER, "127.0.0.2"), (OTHER, "127.0.0.3")]

    def mark(phase: str, at: float, calls: list[tuple[int, int]], **described: object) -> _demo.Mark:
        endpoints = [_route(a, s, c, e) for (a, s), (c, e) in zip(routes, calls, strict=True)]
        stats = [StatsResponse(server_id=VICTIM, calls=calls[0][0]), StatsResponse(server_id=OTHER, calls=0)]
        snapshot = _load.LoadSnapshot(at, sum(c for c, _ in calls), 0)
        return _demo.Mark(phase, at, snapshot, {"endpoints": endpoints, **described}, list(stats), at + 0.5)

    final = mark(
        "down",
        6.0,
        [(60, 3), (55, 5), (200, 0), (210, 0)],
        transitions=[
            {"ago_s": 3.0, "endpoint": f"{VICTIM} from 127.0.0.3", "from": "healthy", "to": "ejected", "why": "5"},
            {"ago_s": 2.9, "endpoint": f"{OTHER} from 127.0.0.2", "from": "healthy", "to": "failing", "why": "no"},
            {"ago_s": 2.8, "endpoint": f"{VICTIM} from 127.0.0.2", "from": "healthy", "to": "failing", "why": "tf"},
        ],
    )
    final.described["endpoints"][1].update(status="ejected", health="serving", ejections=1)
    marks = [mark("start", 0.0, [(0, 0)] * 4), mark("before", 3.0, [(50, 0), (50, 0), (100, 0), (100, 0)]), final]
    lines = list(_demo.fault_summary(_demo.FaultReport(VICTIM, [VICTIM, OTHER], marks, 3.0, None, None)))
    assert _row(f"{VICTIM} *", "\n".join(lines)).split() == ["100", "15", "(8", "failed)"]
    assert lines[-5:] == [
        f"  {VICTIM} as the channel saw it, from each source address:",
        "    from 127.0.0.2: status -, health -, ejected -",
        "    from 127.0.0.3: status ejected, health serving, ejected 1 time",
        "      3.5 s  from 127.0.0.3  healthy -> ejected  (5)",
        "      3.7 s  from 127.0.0.2  healthy -> failing  (tf)",
    ]
