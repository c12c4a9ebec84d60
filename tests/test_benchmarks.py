"""The benchmark scripts run end to end on small shapes and end in a parseable JSON line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, *args: str) -> tuple[str, dict]:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    return done.stdout, json.loads(lines[-1])


@pytest.mark.timeout(150)
def test_bench_layer_quick_reports_ratios():
    stdout, result = _run("bench_layer.py", "--quick", "--repeats", "1")
    assert result["benchmark"] == "layer" and result["quick"] is True
    assert set(result["ratios"]) == {"coarse", "fine", "decode"}
    for name, ratio in result["ratios"].items():
        assert math.isfinite(ratio) and ratio > 0, name
    for name in ("coarse", "fine"):
        regime = result["regimes"][name]
        # The ratios are what the times say, and both layers held real memory.
        ratio = regime["moe_fwdbwd_ms"] / regime["dense_fwdbwd_ms"]
        assert math.isclose(regime["fwdbwd_ratio"], ratio, rel_tol=1e-9)
        assert regime["moe_peak_mib"] > 0 and regime["dense_peak_mib"] > 0
        assert math.isfinite(regime["mem_ratio"])
    decode = result["regimes"]["decode"]
    assert decode["touched_experts"] >= 1 and decode["floor_ms"] > 0
    assert "coarse" in stdout and "runtime" in stdout
