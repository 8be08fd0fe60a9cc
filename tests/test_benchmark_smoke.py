"""The benchmark program still runs: its quickest mode end to end, and the shape of its JSON.

Nothing here judges speed; the benchmark reports ratios for people to read.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"
METRICS = {"rps", "mean_ms", "p50_ms", "p90_ms", "p99_ms", "cpu_us_per_call", "conns"}


def _check_case(case: dict[str, object]) -> None:
    assert case.keys() >= METRICS
    assert case["errors"] == 0
    assert isinstance(case["ratios"], dict)
    assert case["ratios"].keys() == METRICS
    assert isinstance(case["rounds"], list)
    assert case["rounds"]
    for metric in METRICS:
        value = case[metric]
        assert isinstance(value, float)
        assert math.isfinite(value)


@pytest.mark.slow
def test_quick_run_writes_the_documented_json(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "grpc-1ch" in done.stdout
    assert "Client CPU per call" in done.stdout

    result = json.loads(out.read_text())
    assert {"environment", "settings", "overhead", "slow_endpoint", "acceptance"} <= result.keys()
    env = result["environment"]
    for key in ("python", "grpcio", "poolkit", "cpu_count", "date"):
        assert env[key]
    assert result["settings"]["quick"] is True

    assert result["overhead"]
    for group in result["overhead"]:
        assert group["concurrency"] in (1, 32)
        assert group["payload"] == 64
        cases = group["cases"]
        assert {"grpc-1ch", "grpc-fresh", "poolkit-1ep", "poolkit-4ep", "grpc-rr-4ep"} <= cases.keys()
        for case in cases.values():
            _check_case(case)
        assert cases["grpc-1ch"]["ratios"]["cpu_us_per_call"] == 1.0
        # Connection counts are facts, not timings: one persistent connection per endpoint used.
        assert cases["grpc-1ch"]["conns"] == 1
        assert cases["poolkit-1ep"]["conns"] == 1
        assert cases["grpc-rr-4ep"]["conns"] == 4

    for result_group in result["slow_endpoint"]:
        cases = result_group["cases"]
        assert {"grpc-round_robin", "poolkit-p2c_peak_ewma"} <= cases.keys()
        for case in cases.values():
            _check_case(case)
            assert 0.0 <= case["slow_share"] <= 1.0

    figures = result["acceptance"]
    assert set(figures["cpu_ratio_64B"]) == {
        "poolkit-1ep c=1",
        "poolkit-4ep c=1",
        "poolkit-1ep c=32",
        "poolkit-4ep c=32",
    }
    assert isinstance(figures["cpu_within_target"], bool)
