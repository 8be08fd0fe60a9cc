"""The soak run (benchmarks/soak.py) in CI, and its checks on figures made up to fail them.

CI runs the script's default, 100,000 calls (plus a 10,000-call warm-up): about 85 s on
the 2-core machine CI uses. One sample every 10,000 calls, so the second half's RSS
slope is fitted over 6 samples (50,000 calls).

The figures checked here are the ones the script prints and writes: the table's rows
(one per sample), the deltas from the first sample to the last, every check passing,
and the JSON's samples behind them. `pytest -s` shows the run's own output.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"
CALLS = 100_000
SAMPLE_EVERY = 10_000
RUN_LIMIT = 240.0  # the run takes ~85 s here; a hang is cut off well before pytest's own limit


def soak_module() -> ModuleType:
    """benchmarks/soak.py as a module (it is a script, not part of the package)."""
    name = "poolkit_soak_script"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SOAK)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(RUN_LIMIT + 30)
def test_a_hundred_thousand_calls_leave_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, str(SOAK), "--calls", str(CALLS), "--sample-every", str(SAMPLE_EVERY), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=RUN_LIMIT,
        check=False,
    )
    took = time.monotonic() - started
    print(f"\n{run.stdout}{run.stderr[-2000:]}\nsoak.py took {took:.1f} s")
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    samples = result["samples"]

    # Its printed figures: a row per sample, the deltas, every check passing.
    text = run.stdout
    rows = [line.split() for line in text.splitlines() if re.fullmatch(r"\s*[\d,]+\s+[\d.]+\s+.*", line)]
    assert [int(row[0].replace(",", "")) for row in rows] == list(range(0, CALLS + 1, SAMPLE_EVERY))
    for row, sample in zip(rows, samples, strict=True):
        rss, threads, os_threads, fds, slots, connections, in_flight = row[3], *map(int, row[5:])
        assert float(rss) == pytest.approx(sample["rss_kb"] / 1024, abs=0.05)
        assert (threads, os_threads, fds, slots, connections, in_flight) == (
            sample["threads"],
            sample["tasks"],
            sample["fds"],
            sample["slots"],
            sample["connections"],
            0,
        )
    assert re.search(r"threads \+0, os threads \+[012], fds \+0, slots \+0, connections \+0, in flight 0", text)
    assert text.count("  PASS  ") == len(result["checks"]) == 8
    assert "FAIL" not in text
    assert text.rstrip().endswith("soak: OK")

    # The figures behind them.
    assert result["ok"]
    assert all(check["ok"] for check in result["checks"])
    first, last = samples[0], samples[-1]
    for key in ("threads", "fds", "slots", "connections"):
        assert all(sample[key] == first[key] for sample in samples), key  # every sample, not just the last
    # grpc core's own thread pool follows the load: a thread or two more, never a trend.
    assert all(first["tasks"] <= sample["tasks"] + 2 and sample["tasks"] <= first["tasks"] + 2 for sample in samples)
    assert first["connections"] == first["slots"] == 6  # 3 servers x 1, sync and aio
    assert all(sample["in_flight"] == 0 for sample in samples)
    assert (last["rss_kb"] - first["rss_kb"]) / 1024 <= 20
    assert result["rss_second_half_mb"] <= 2.0  # the floor; 0.24-0.33 MB measured
    outcomes = result["outcomes"]["all"]
    assert sum(outcomes.values()) == CALLS
    assert 0.035 * CALLS < outcomes["failed"] < 0.065 * CALLS  # ~5 %
    assert 0.01 * CALLS < outcomes["cancelled"] < 0.03 * CALLS  # ~2 %
    assert sum(result["outcomes"]["aio"].values()) == CALLS // 4


# -- the checks themselves, on made-up samples ---------------------------------------------------


def made_up(rss_mb: list[float], **changes: int) -> list[object]:
    """Samples every 10,000 calls with these RSS figures and steady everything else; the
    last one changed by `changes`."""
    soak = soak_module()
    steady = {"threads": 12, "tasks": 18, "fds": 22, "slots": 6, "connections": 6, "in_flight": 0}
    samples = [
        soak.Sample(calls=i * 10_000, elapsed_s=i * 8.0, rss_kb=int(mb * 1024), **steady) for i, mb in enumerate(rss_mb)
    ]
    samples[-1] = replace(samples[-1], **changes)
    return samples


def failed_checks(samples: list[object], *argv: str) -> set[str]:
    soak = soak_module()
    settings, _ = soak.settings_from(["--calls", str(10_000 * (len(samples) - 1)), *argv])
    return {check.name for check in soak.resource_checks(settings, samples) if not check.ok}


# What 60,000 calls looked like here: +0.8 MB while warming up, then flat to within noise.
MEASURED = [46.7, 47.3, 47.5, 47.5, 47.6, 47.6, 47.8]


def test_the_measured_shape_passes() -> None:
    assert failed_checks(made_up(MEASURED)) == set()


def test_an_allocator_settling_in_the_first_half_passes() -> None:
    assert failed_checks(made_up([40.0, 46.0, 49.0, 50.0, 50.2, 49.9, 50.1])) == set()


def test_one_arena_step_late_in_the_run_passes() -> None:
    """One jump of 1.5 MB at the last sample: the slope spreads it, it is not a trend."""
    assert failed_checks(made_up([*MEASURED[:-1], MEASURED[-1] + 1.5])) == set()


def test_a_steady_leak_fails_though_the_total_is_small() -> None:
    """100 B per call: 1 MB per 10,000 calls, far under the 20 MB total, caught by the slope."""
    assert failed_checks(made_up([46.0 + i for i in range(7)])) == {"rss flat"}


def test_a_big_leak_fails_both() -> None:
    assert failed_checks(made_up([46.0 + 5 * i for i in range(7)])) == {"rss flat", "rss total"}


@pytest.mark.parametrize(
    ("changes", "failing"),
    [
        ({"threads": 13}, "threads"),
        ({"tasks": 21}, "threads"),
        ({"fds": 23}, "fds"),
        ({"fds": 21}, "fds"),
        ({"connections": 5}, "slots, connections"),
        ({"slots": 7, "connections": 7}, "slots, connections"),
        ({"in_flight": 1}, "in flight"),
    ],
)
def test_anything_left_behind_fails(changes: dict[str, int], failing: str) -> None:
    assert failed_checks(made_up(MEASURED, **changes)) == {failing}


def test_grpc_cores_thread_pool_may_grow_by_two() -> None:
    """grpc core sizes its thread pool to the load: +1 was seen mid-run in CI."""
    assert failed_checks(made_up(MEASURED, tasks=20)) == set()
    samples = made_up(MEASURED)
    samples[3] = replace(samples[3], tasks=21)  # more than two at any sample fails, even if it shrank back
    assert failed_checks(samples) == {"threads"}


def test_the_flat_tolerance_grows_with_the_calls() -> None:
    """64 B per call of the second half, never under 2 MB."""
    soak = soak_module()
    settings, _ = soak.settings_from([])
    assert settings.rss_flat_mb(10_000) == 2.0
    assert settings.rss_flat_mb(50_000) == pytest.approx(3.05, abs=0.01)
