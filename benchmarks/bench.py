"""poolkit's benchmark: unary echo over loopback, poolkit against plain grpcio.

    python benchmarks/bench.py [--quick] [--json out.json] [--rounds N] [--calls N]

The echo servers run in a child process (`poolkit.testing.spawn_echo_servers`), so the
client's CPU time (`time.process_time()`, every thread of this process, grpc's own
included) is the client's alone.

The machine this runs on is shared and noisy, so no absolute number is meant to be
compared with another run. Within one run, every (concurrency, payload) group runs
rounds that interleave its cases, in an order shuffled per round; each metric is the
median over rounds and each ratio is median(case) / median(raw grpcio single channel).
The median of the per-round (paired) ratios and its quartiles are reported too: how far
apart they are says how much the machine's noise moved the figures. The pooled and raw
channels are built once and kept across rounds, as a service keeps them, and are warmed
up before anything is measured.

Cases:
  grpc-1ch        one `grpc.insecure_channel` to one server, stub built once (the baseline)
  poolkit-1ep     poolkit over the same single server
  poolkit-4ep     poolkit over four servers
  grpc-rr-4ep     one grpc channel with its round_robin policy over the same four servers:
                  the cost of four connections without poolkit, to read poolkit-4ep against
  grpc-fresh      a new grpc channel + stub per call, closed after (contrast; fewer calls).
                  grpc's global subchannel pool lets channels that are open at the same
                  time share one connection, so under concurrency it opens fewer sockets
                  than calls; the column "conns" shows how many it did open.

The slow-endpoint case: four servers, one answering 20 ms late; poolkit's P2C peak EWMA
against grpc's own round_robin policy over the same addresses. It reports latency and
the share of calls the slow server received (from the servers' own counts).

"conns" is how many distinct client connections the servers saw during a measurement
(their Stats are reset before each): one per persistent connection, one per new socket.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Self

import grpc

import poolkit
from poolkit import testing

CallFn = Callable[..., Any]

# Every call carries a deadline, so a stuck server cannot stall the benchmark.
CALL_TIMEOUT = 10.0
SLOW_DELAY = 0.020
# Enough server threads that concurrency 32 never queues on the server's executor, even
# when every call of the slow-endpoint case lands on the slow server.
SERVER_WORKERS = 64
BASELINE = "grpc-1ch"
SETTLE = 0.1  # seconds of quiet before each measurement
CPU_TARGET = 1.05


@dataclasses.dataclass(frozen=True)
class Settings:
    quick: bool
    rounds: int
    calls: int  # per measurement, persistent-channel cases
    fresh_calls: int  # per measurement, the channel-per-call case
    warmup_calls: int
    concurrencies: tuple[int, ...]
    payloads: tuple[int, ...]
    slow_concurrencies: tuple[int, ...]
    slow_rounds: int
    slow_calls: int
    measurement_limit: float  # seconds; a measurement stops early (and says so) past this


def settings_from(args: argparse.Namespace) -> Settings:
    if args.quick:
        base = Settings(
            quick=True,
            rounds=3,
            calls=400,
            fresh_calls=40,
            warmup_calls=150,
            concurrencies=(1, 32),
            payloads=(64,),
            slow_concurrencies=(32,),
            slow_rounds=3,
            slow_calls=600,
            measurement_limit=15.0,
        )
    else:
        base = Settings(
            quick=False,
            # Many short rounds rather than a few long ones: on a shared machine the load
            # drifts, and short interleaved rounds see the same drift in every case.
            rounds=21,
            calls=1000,
            fresh_calls=100,
            warmup_calls=500,
            concurrencies=(1, 32),
            payloads=(64, 16 * 1024),
            slow_concurrencies=(32, 8),
            slow_rounds=9,
            slow_calls=1000,
            measurement_limit=60.0,
        )
    changes: dict[str, Any] = {}
    if args.rounds is not None:
        changes["rounds"] = changes["slow_rounds"] = args.rounds
    if args.calls is not None:
        changes["calls"] = changes["slow_calls"] = args.calls
        changes["fresh_calls"] = max(args.calls // 10, 1)
    return dataclasses.replace(base, **changes)


# -- one measurement ---------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    """One measurement of one case: `calls` calls spread over `concurrency` threads."""

    calls: int
    errors: int
    wall: float
    cpu: float
    latencies: list[float]
    conns: int
    per_server_calls: list[int]
    cut_short: bool

    metrics: dict[str, float] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        ordered = sorted(self.latencies)
        nan = float("nan")
        self.metrics = {
            "rps": self.calls / self.wall if self.wall > 0 else 0.0,
            "mean_ms": statistics.fmean(ordered) * 1000 if ordered else nan,
            "p50_ms": percentile(ordered, 0.50) * 1000,
            "p90_ms": percentile(ordered, 0.90) * 1000,
            "p99_ms": percentile(ordered, 0.99) * 1000,
            "cpu_us_per_call": self.cpu / self.calls * 1e6 if self.calls else nan,
            "conns": float(self.conns),
        }


def percentile(ordered: Sequence[float], q: float) -> float:
    """Of sorted values; linear interpolation between closest ranks (numpy's default)."""
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclasses.dataclass
class Run:
    latencies: list[float]
    errors: int
    cut_short: bool  # the time limit stopped it before every call was made
    wall: float
    cpu: float


def run_calls(call: CallFn, request: Any, calls: int, concurrency: int, limit: float) -> Run:
    """Make `calls` calls from `concurrency` threads. The threads are started and parked
    before the clocks start, so thread start-up is outside the wall and CPU times."""
    shares = [calls // concurrency + (1 if i < calls % concurrency else 0) for i in range(concurrency)]
    latencies: list[list[float]] = [[] for _ in shares]
    errors = [0] * concurrency
    failures: list[BaseException] = []
    go = threading.Event()
    deadline_box: list[float] = []

    def worker(index: int) -> None:
        go.wait()
        deadline = deadline_box[0]
        mine = latencies[index]
        clock = time.perf_counter
        try:
            for _ in range(shares[index]):
                if clock() > deadline:
                    return
                start = clock()
                try:
                    call(request, timeout=CALL_TIMEOUT)
                except grpc.RpcError:
                    errors[index] += 1
                    continue
                mine.append(clock() - start)
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    deadline_box.append(wall0 + limit)
    go.set()
    for thread in threads:
        thread.join(limit + CALL_TIMEOUT + 5)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError("benchmark workers did not finish in time")
    if failures:
        raise failures[0]
    flat = [x for part in latencies for x in part]
    return Run(flat, sum(errors), len(flat) + sum(errors) < calls, wall, cpu)


def measure(
    servers: testing.SpawnedEchoServers, call: CallFn, request: Any, calls: int, concurrency: int, limit: float
) -> Sample:
    servers.stats(reset=True)
    gc.collect()
    # Let the previous measurement's background work (grpc closing channels, the server
    # tearing down connections) finish before the clocks start, not inside them.
    time.sleep(SETTLE)
    run = run_calls(call, request, calls, concurrency, limit)
    stats = servers.stats(reset=True)
    return Sample(
        calls=len(run.latencies) + run.errors,
        errors=run.errors,
        wall=run.wall,
        cpu=run.cpu,
        latencies=run.latencies,
        conns=sum(len(s.peers) for s in stats),
        per_server_calls=[s.calls for s in stats],
        cut_short=run.cut_short,
    )


# -- the cases ---------------------------------------------------------------------------


class Case:
    """A named way of making a unary echo call, built once and reused for every round."""

    def __init__(self, name: str, call: CallFn, calls: int, closer: Callable[[], None] | None = None) -> None:
        self.name = name
        self.call = call
        self.calls = calls
        self._closer = closer

    def close(self) -> None:
        if self._closer is not None:
            self._closer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def grpc_single_channel(address: str, calls: int) -> Case:
    # The "ipv4:" form, as poolkit's own connections use; it also keeps this channel's
    # connection apart from the plain "host:port" channels of grpc-fresh, which grpc's
    # global subchannel pool would otherwise let ride on this one.
    channel = grpc.insecure_channel(f"ipv4:{address}")
    stub = testing.EchoStub(channel)
    return Case(BASELINE, stub.Unary, calls, channel.close)


def grpc_fresh_channel(address: str, calls: int) -> Case:
    def call(request: Any, timeout: float) -> Any:
        with grpc.insecure_channel(address) as channel:
            return testing.EchoStub(channel).Unary(request, timeout=timeout)

    return Case("grpc-fresh", call, calls)


def poolkit_channel(name: str, target: str, calls: int, config: poolkit.PoolConfig | None = None) -> Case:
    channel = poolkit.insecure_channel(target, config=config)
    stub = testing.EchoStub(channel)
    return Case(name, stub.Unary, calls, channel.close)


def grpc_round_robin(name: str, target: str, calls: int) -> Case:
    """grpc's own answer to many endpoints: one channel, its round_robin policy, one
    connection per address. Next to poolkit-4ep it shows what four connections cost
    with no poolkit involved."""
    channel = grpc.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")])
    stub = testing.EchoStub(channel)
    return Case(name, stub.Unary, calls, channel.close)


# -- rounds and summaries ----------------------------------------------------------------

METRICS = ("rps", "mean_ms", "p50_ms", "p90_ms", "p99_ms", "cpu_us_per_call", "conns")


def run_rounds(
    servers: testing.SpawnedEchoServers,
    cases: Sequence[Case],
    request: Any,
    concurrency: int,
    rounds: int,
    warmup_calls: int,
    limit: float,
    progress: str,
) -> dict[str, list[Sample]]:
    """Warm every case up, then `rounds` rounds that each measure every case once, in an
    order shuffled per round (seeded, so runs are alike) so that no case always follows
    the same neighbour, whose after-effects (closing sockets, say) it would inherit."""
    for case in cases:
        run_calls(case.call, request, min(warmup_calls, case.calls), concurrency, limit)
    order = random.Random(f"{progress}")
    samples: dict[str, list[Sample]] = {case.name: [] for case in cases}
    for index in range(rounds):
        print(f"  {progress}: round {index + 1}/{rounds}", file=sys.stderr, flush=True)
        for case in order.sample(list(cases), len(cases)):
            samples[case.name].append(measure(servers, case.call, request, case.calls, concurrency, limit))
    return samples


def summarise(samples: dict[str, list[Sample]], baseline: str) -> dict[str, dict[str, Any]]:
    """Median of each metric over rounds; ratio of medians to the baseline's; and the
    per-round (paired) ratios' median and quartiles, to show how much the noise moved them."""
    medians = {
        name: {metric: statistics.median(s.metrics[metric] for s in runs) for metric in METRICS}
        for name, runs in samples.items()
    }
    summary: dict[str, dict[str, Any]] = {}
    for name, runs in samples.items():
        base_runs = samples[baseline]
        paired = {
            metric: [_ratio(s.metrics[metric], b.metrics[metric]) for s, b in zip(runs, base_runs, strict=True)]
            for metric in METRICS
        }
        summary[name] = {
            **medians[name],
            "calls_per_round": runs[0].calls if runs else 0,
            "errors": sum(s.errors for s in runs),
            "cut_short_rounds": sum(s.cut_short for s in runs),
            "ratios": {metric: _ratio(medians[name][metric], medians[baseline][metric]) for metric in METRICS},
            "paired_ratios": {metric: _spread(v) for metric, v in paired.items()},
            "rounds": [
                {**s.metrics, "calls": s.calls, "errors": s.errors, "per_server_calls": s.per_server_calls}
                for s in runs
            ],
        }
    return summary


def _spread(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "q1": percentile(ordered, 0.25),
        "q3": percentile(ordered, 0.75),
        "min": ordered[0],
        "max": ordered[-1],
    }


def _ratio(value: float, base: float) -> float:
    return value / base if base else float("nan")


# -- the two parts -----------------------------------------------------------------------


def bench_overhead(settings: Settings) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        servers = stack.enter_context(testing.spawn_echo_servers(4, max_workers=SERVER_WORKERS))
        first = servers.addresses[0]
        cases = [
            stack.enter_context(grpc_single_channel(first, settings.calls)),
            stack.enter_context(poolkit_channel("poolkit-1ep", f"ipv4:{first}", settings.calls)),
            stack.enter_context(poolkit_channel("poolkit-4ep", servers.target, settings.calls)),
            stack.enter_context(grpc_round_robin("grpc-rr-4ep", servers.target, settings.calls)),
            stack.enter_context(grpc_fresh_channel(first, settings.fresh_calls)),
        ]
        for concurrency in settings.concurrencies:
            for payload in settings.payloads:
                request = testing.EchoRequest(payload=os.urandom(payload))
                samples = run_rounds(
                    servers,
                    cases,
                    request,
                    concurrency,
                    settings.rounds,
                    settings.warmup_calls,
                    settings.measurement_limit,
                    f"concurrency {concurrency}, {payload} B",
                )
                groups.append({"concurrency": concurrency, "payload": payload, "cases": summarise(samples, BASELINE)})
    return groups


def bench_slow_endpoint(settings: Settings) -> list[dict[str, Any]]:
    delays = (0.0, 0.0, 0.0, SLOW_DELAY)
    slow_index = delays.index(SLOW_DELAY)
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        servers = stack.enter_context(testing.spawn_echo_servers(4, delays=delays, max_workers=SERVER_WORKERS))
        cases = [
            stack.enter_context(grpc_round_robin("grpc-round_robin", servers.target, settings.slow_calls)),
            stack.enter_context(poolkit_channel("poolkit-p2c_peak_ewma", servers.target, settings.slow_calls)),
        ]
        request = testing.EchoRequest(payload=os.urandom(64))
        for concurrency in settings.slow_concurrencies:
            samples = run_rounds(
                servers,
                cases,
                request,
                concurrency,
                settings.slow_rounds,
                settings.warmup_calls,
                settings.measurement_limit,
                f"slow endpoint, concurrency {concurrency}",
            )
            summary = summarise(samples, "grpc-round_robin")
            for name, runs in samples.items():
                shares = [s.per_server_calls[slow_index] / max(sum(s.per_server_calls), 1) for s in runs]
                summary[name]["slow_share"] = statistics.median(shares)
            results.append({"concurrency": concurrency, "payload": 64, "cases": summary})
    return results


# -- output ------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import google.protobuf

    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "poolkit": poolkit.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_start": list(os.getloadavg()),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _fmt(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def overhead_table(groups: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'conc':>4} {'payload':>7} {'case':<12} {'calls':>6} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'cpu us/call':>11} {'conns':>5} | {'req/s x':>7} {'p50 x':>6} {'p99 x':>6} {'cpu x':>6}"
        f" {'cpu x paired (IQR)':>18}"
    )
    lines = [head, "-" * len(head)]
    for group in groups:
        for name, case in group["cases"].items():
            ratios, paired = case["ratios"], case["paired_ratios"]["cpu_us_per_call"]
            lines.append(
                f"{group['concurrency']:>4} {_payload(group['payload']):>7} {name:<12} {case['calls_per_round']:>6}"
                f" {case['rps']:>7.0f} {_fmt(case['p50_ms']):>7} {_fmt(case['p99_ms']):>7}"
                f" {case['cpu_us_per_call']:>11.0f} {case['conns']:>5.0f} |"
                f" {_fmt(ratios['rps']):>7} {_fmt(ratios['p50_ms']):>6} {_fmt(ratios['p99_ms']):>6}"
                f" {_fmt(ratios['cpu_us_per_call']):>6}"
                f" {_fmt(paired['median']):>6} ({_fmt(paired['q1'])}-{_fmt(paired['q3'])})"
            )
        lines.append("")
    return "\n".join(lines)


def slow_table(results: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'conc':>4} {'case':<22} {'calls':>6} {'req/s':>7} {'mean ms':>7} {'p50 ms':>7} {'p90 ms':>7}"
        f" {'p99 ms':>7} {'slow share':>10} | {'req/s x':>7} {'mean x':>6} {'p90 x':>6} {'p99 x':>6}"
    )
    lines = [head, "-" * len(head)]
    for result in results:
        for name, case in result["cases"].items():
            ratios = case["ratios"]
            lines.append(
                f"{result['concurrency']:>4} {name:<22} {case['calls_per_round']:>6} {case['rps']:>7.0f}"
                f" {_fmt(case['mean_ms']):>7} {_fmt(case['p50_ms']):>7} {_fmt(case['p90_ms']):>7}"
                f" {_fmt(case['p99_ms']):>7} {case['slow_share']:>10.1%} |"
                f" {_fmt(ratios['rps']):>7} {_fmt(ratios['mean_ms']):>6} {_fmt(ratios['p90_ms']):>6}"
                f" {_fmt(ratios['p99_ms']):>6}"
            )
        lines.append("")
    return "\n".join(lines)


def _payload(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 else f"{size} B"


def acceptance(groups: Sequence[dict[str, Any]], slow: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The figures the design holds poolkit to: client CPU per call within 5 % of plain
    grpcio at 64 B, and a much better tail than round_robin when one endpoint is slow.

    Four endpoints also cost plain grpc more than one (four connections, four servers
    sharing one process), so poolkit-4ep is also set against grpc-rr-4ep: that ratio is
    poolkit's own share of the four-endpoint cost."""
    cpu, cpu_paired, cpu_vs_rr = {}, {}, {}
    for group in groups:
        if group["payload"] != 64:
            continue
        cases = group["cases"]
        for name in ("poolkit-1ep", "poolkit-4ep"):
            key, case = f"{name} c={group['concurrency']}", cases[name]
            cpu[key] = case["ratios"]["cpu_us_per_call"]
            cpu_paired[key] = case["paired_ratios"]["cpu_us_per_call"]["median"]
        if "grpc-rr-4ep" in cases:
            pooled, plain = cases["poolkit-4ep"], cases["grpc-rr-4ep"]
            per_round = [
                _ratio(a["cpu_us_per_call"], b["cpu_us_per_call"])
                for a, b in zip(pooled["rounds"], plain["rounds"], strict=True)
            ]
            cpu_vs_rr[f"poolkit-4ep c={group['concurrency']}"] = {
                "ratio": _ratio(pooled["cpu_us_per_call"], plain["cpu_us_per_call"]),
                "paired_median": statistics.median(per_round),
            }
    p99 = {
        f"c={result['concurrency']}": result["cases"]["poolkit-p2c_peak_ewma"]["ratios"]["p99_ms"] for result in slow
    }
    return {
        "cpu_ratio_64B": cpu,
        "cpu_ratio_64B_paired_median": cpu_paired,
        "cpu_ratio_target": CPU_TARGET,
        "cpu_within_target": all(v <= CPU_TARGET for v in cpu.values()),
        "cpu_ratio_64B_4ep_vs_grpc_rr_4ep": cpu_vs_rr,
        "slow_endpoint_p99_ratio_vs_round_robin": p99,
    }


def acceptance_text(figures: dict[str, Any]) -> str:
    title = f"Client CPU per call, poolkit / grpc-1ch, 64 B (target <= {CPU_TARGET:.2f});"
    lines = [f"{title} ratio of medians, then median of per-round ratios:"]
    for key, value in figures["cpu_ratio_64B"].items():
        paired = figures["cpu_ratio_64B_paired_median"][key]
        verdict = "ok" if value <= CPU_TARGET else "ABOVE TARGET"
        lines.append(f"  {key:<18} {value:6.3f}  {paired:6.3f}  {verdict}")
    if figures["cpu_ratio_64B_4ep_vs_grpc_rr_4ep"]:
        lines.append("Client CPU per call, poolkit-4ep / grpc-rr-4ep (same four servers), 64 B:")
        lines.extend(
            f"  {key:<18} {value['ratio']:6.3f}  {value['paired_median']:6.3f}"
            for key, value in figures["cpu_ratio_64B_4ep_vs_grpc_rr_4ep"].items()
        )
    lines.append("Slow endpoint p99, poolkit p2c_peak_ewma / grpc round_robin:")
    lines.extend(
        f"  {key:<18} {value:6.3f}" for key, value in figures["slow_endpoint_p99_ratio_vs_round_robin"].items()
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (64 B only, few calls) for smoke tests")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--rounds", type=int, help="rounds per group (default 21, quick 3)")
    parser.add_argument("--calls", type=int, help="calls per measurement (default 1000, quick 400)")
    args = parser.parse_args(argv)
    if (args.rounds is not None and args.rounds < 1) or (args.calls is not None and args.calls < 1):
        parser.error("--rounds and --calls must be at least 1")
    settings = settings_from(args)
    env = environment()
    started = time.perf_counter()
    groups = bench_overhead(settings)
    slow = bench_slow_endpoint(settings)
    figures = acceptance(groups, slow)
    env["loadavg_end"] = list(os.getloadavg())
    env["duration_s"] = round(time.perf_counter() - started, 1)

    print(
        f"poolkit {env['poolkit']}, grpcio {env['grpcio']}, Python {env['python']}, {env['cpu_count']} CPUs,"
        f" {env['date']}; medians of {settings.rounds} interleaved rounds; x = ratio to grpc-1ch"
    )
    print("cpu x paired (IQR): median and quartiles of the per-round ratios; conns: connections the servers saw")
    print()
    print(overhead_table(groups))
    print(f"Slow endpoint: 4 servers, one {SLOW_DELAY * 1000:.0f} ms slower; medians of {settings.slow_rounds} rounds;")
    print("x = ratio to grpc-round_robin; slow share = calls the slow server received")
    print()
    print(slow_table(slow))
    print(acceptance_text(figures))
    print(f"\n({env['duration_s']} s; load average {env['loadavg_start'][0]:.2f} -> {env['loadavg_end'][0]:.2f})")

    if args.json:
        document = {
            "environment": env,
            "settings": dataclasses.asdict(settings),
            "overhead": groups,
            "slow_endpoint": slow,
            "acceptance": figures,
        }
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(_finite(document), out, indent=2, allow_nan=False)
            out.write("\n")
    return 0


def _finite(value: Any) -> Any:
    """`value` with NaN (a metric of a case that completed no call) as null, for strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
