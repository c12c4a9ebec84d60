"""The benchmark scripts run end to end on small shapes and end in a parseable JSON line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit.expert_threads import auto_split

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _launch(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _run(script: str, *args: str) -> tuple[str, dict]:
    done = _launch(script, *args, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    return done.stdout, json.loads(lines[-1])


@pytest.fixture(scope="module")
def quick_layer() -> tuple[str, dict]:
    return _run("bench_layer.py", "--quick", "--repeats", "1")


@pytest.mark.timeout(150)
def test_bench_layer_quick_reports_ratios(quick_layer):
    stdout, result = quick_layer
    assert result["benchmark"] == "layer" and result["quick"] is True
    assert set(result["ratios"]) == {"coarse", "fine", "decode"}
    for name, ratio in result["ratios"].items():
        assert math.isfinite(ratio) and ratio > 0, name
    for name in ("coarse", "fine"):
        regime = result["regimes"][name]
        # The ratios are what the times say.
        ratio = regime["moe_fwdbwd_ms"] / regime["dense_fwdbwd_ms"]
        assert math.isclose(regime["fwdbwd_ratio"], ratio, rel_tol=1e-9)
    decode = result["regimes"]["decode"]
    assert decode["touched_experts"] >= 1 and decode["floor_ms"] > 0
    assert "coarse" in stdout and "runtime" in stdout


@pytest.mark.timeout(150)
def test_bench_layer_quick_measures_peak_memory(quick_layer):
    stdout, result = quick_layer
    if result["memory_unavailable"] is not None:
        # The benchmark's own probe found the kernel's peak-RSS counter unusable.
        assert "peak memory not measured" in stdout
        pytest.skip(result["memory_unavailable"])
    for name in ("coarse", "fine"):
        regime = result["regimes"][name]
        # Both layers held real memory, and the ratio is what the peaks say.
        assert regime["moe_peak_mib"] > 0 and regime["dense_peak_mib"] > 0
        expected = (regime["moe_peak_mib"] - regime["expert_grad_mib"]) / regime["dense_peak_mib"]
        assert math.isclose(regime["mem_ratio"], expected, rel_tol=1e-9)


def test_peak_rss_probe_sees_a_known_buffer():
    # In a fresh process with the benchmark's malloc threshold, as the memory cases run.
    code = (
        "from _common import peak_rss_problem, peak_bytes_of\n"
        "import torch\n"
        "problem = peak_rss_problem()\n"
        "peak = None if problem else peak_bytes_of(lambda: torch.ones(2**24).add_(1))\n"
        "print(problem if problem else peak)\n"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(BENCHMARKS)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.strip().splitlines()[-1]
    if not out.isdigit():
        pytest.skip(out)
    # torch.ones(2**24) and the result of add_ share one 64 MiB buffer.
    assert 60 * 2**20 <= int(out) <= 80 * 2**20


def _quick_coarse_in_process(bench_layer, capsys) -> tuple[str, dict]:
    """stdout and JSON of bench_layer's quick coarse regime, run in this process."""
    threads = torch.get_num_threads()
    try:
        assert bench_layer.main(["--quick", "--repeats", "1", "--regimes", "coarse"]) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark fixes this process's thread count
    out = capsys.readouterr().out
    return out, json.loads(out.strip().splitlines()[-1])


def test_bench_layer_reports_unmeasurable_memory_instead_of_a_number(monkeypatch, capsys):
    # Where the memory process finds the peak-RSS counter unusable, the run says so and
    # leaves every peak out rather than reporting one.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_layer

    reason = "the peak-RSS counter cannot be reset here (test)"
    monkeypatch.setattr(bench_layer, "peak_rss_problem", lambda: reason)
    assert bench_layer.memory_cases(list(bench_layer.QUICK[:1])) == {"unavailable": reason}
    monkeypatch.setattr(
        bench_layer, "run_in_fresh_process", lambda argv: json.dumps({"unavailable": reason})
    )
    out, result = _quick_coarse_in_process(bench_layer, capsys)
    assert result["memory_unavailable"] == reason
    # Every memory key is there, null: a reader gets None, not a KeyError.
    coarse = result["regimes"]["coarse"]
    for key in ("moe_peak_mib", "dense_peak_mib", "mem_ratio", "meets_mem_target"):
        assert key in coarse and coarse[key] is None, key
    assert f"peak memory not measured: {reason}" in out


def test_bench_split_quick_reports_the_rule_beside_the_times():
    stdout, result = _run("bench_split.py", "--quick")
    assert result["benchmark"] == "split" and len(result["shapes"]) == 3
    for shape in result["shapes"]:
        assert shape["split_s"] > 0 and shape["loop_s"] > 0
        ratio = shape["split_s"] / shape["loop_s"]
        assert math.isclose(shape["ratio_split_over_loop"], ratio, rel_tol=1e-9)
        E, N = shape["E"], shape["N"]
        chosen = auto_split([N] * E, list(range(E)), result["threads"], shape["D"], shape["F"])
        assert shape["auto_split"] == chosen
    assert "split/loop" in stdout and "runtime" in stdout


def test_bench_train_quick_reports_each_shape_and_the_headline():
    stdout, result = _run("bench_train.py", "--quick")
    assert result["benchmark"] == "train" and result["quick"] is True
    assert [(r["batch_size"], r["seq_len"]) for r in result["shapes"]] == [(4, 64), (4, 32)]
    for shape in result["shapes"]:
        moe, dense = shape["moe"], shape["dense_twin"]
        tokens = shape["batch_size"] * shape["seq_len"]
        assert math.isclose(moe["tokens_per_s"], tokens / moe["step_s"], rel_tol=1e-9)
        ratio = moe["tokens_per_s"] / dense["tokens_per_s"]
        assert math.isclose(shape["ratio_moe_over_dense"], ratio, rel_tol=1e-9)
        # 2.9x the parameters, about the same active ones (the router is the difference).
        assert moe["params"] > 2 * moe["active_params"]
        assert moe["active_params"] == pytest.approx(dense["params"], rel=0.01)
        # Each model ran alone in one process: the one pair's ratio is the shape's.
        assert shape["pair_ratios"] == pytest.approx([shape["ratio_moe_over_dense"]], rel=1e-9)
    assert result["method"] == "processes" and result["pairs"] == 1
    # The headline is the first shape's.
    assert result["ratio_moe_over_dense"] == result["shapes"][0]["ratio_moe_over_dense"]
    assert "4 x 32" in stdout and "target >= 0.90" in stdout
    assert "--quick: a smoke test, not a measurement" in stdout


def test_quick_keeps_the_flags_given_explicitly():
    args = ("--quick", "--shapes", "2x16", "--rounds", "1", "--method", "interleaved")
    _, result = _run("bench_train.py", *args)
    assert [(r["batch_size"], r["seq_len"]) for r in result["shapes"]] == [(2, 16)]
    assert result["rounds"] == 1 and result["quick"] is True
    # Both models in this process: no pairs of processes.
    assert result["method"] == "interleaved" and result["pairs"] is None
    assert result["shapes"][0]["pair_ratios"] is None


def _refused(script: str, *args: str) -> str:
    """stderr of a benchmark run that must exit 2 (argparse's usage error)."""
    done = _launch(script, *args, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    return done.stderr


def test_bench_train_refuses_a_malformed_shape():
    stderr = _refused("bench_train.py", "--shapes", "16x0")
    assert "--shapes takes BxS[,BxS...] of positive ints, got '16x0'" in stderr


def test_a_peak_below_its_own_gradients_is_not_reported(monkeypatch):
    # A peak-RSS counter that passed its probe can still miss a small case (a quick
    # dense peak once read 0): the benchmark must say so instead of dividing by it.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from _common import implausible_peak

    zero = implausible_peak("dense", 0, 270336)
    assert "dense layer's measured peak (0 KiB) is not above the weight gradients it " in zero
    assert "allocates (264 KiB)" in zero
    assert "(264 KiB) is not above" in implausible_peak("MoE", 270336, 270336)
    assert implausible_peak("MoE", 400000, 270336) is None


def test_an_under_read_moe_peak_is_not_reported(monkeypatch, capsys):
    # An MoE peak of 0 once gave mem_ratio -0.52 and meets_mem_target True: the MoE's
    # measured call allocates its expert gradients, so its peak must exceed them too.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_layer

    peaks = {"coarse/moe": 0, "coarse/dense": 2**21}
    monkeypatch.setattr(
        bench_layer, "run_in_fresh_process", lambda argv: json.dumps({"peaks": peaks})
    )
    out, result = _quick_coarse_in_process(bench_layer, capsys)
    assert "coarse: the MoE layer's measured peak (0 KiB)" in result["memory_unavailable"]
    assert result["regimes"]["coarse"]["meets_mem_target"] is None


def test_bench_layer_says_why_memory_was_not_measured():
    _, result = _run(
        "bench_layer.py", "--quick", "--repeats", "1", "--regimes", "coarse", "--no-memory"
    )
    assert result["memory_unavailable"] == "not requested (--no-memory)"
    assert result["regimes"]["coarse"]["mem_ratio"] is None
    _, result = _run("bench_layer.py", "--quick", "--repeats", "1", "--regimes", "decode")
    assert result["memory_unavailable"] == "no training regime was run"
    decode = result["regimes"]["decode"]
    assert decode["moe_fwd_cpu_ms"] > 0 and decode["dense_fwd_cpu_ms"] > 0


def test_rounds_alternate_their_order(monkeypatch):
    # A fixed order hands what one case leaves behind (heap, caches) always to the same
    # next case; reversed odd rounds give each case each predecessor equally often.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from _common import time_interleaved

    calls = []
    cases = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    wall, cpu = time_interleaved(cases, repeats=3, warmup=1)
    assert "".join(calls) == "abccbaabccba"
    assert all(len(wall[n]) == len(cpu[n]) == 3 for n in "abc")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench_train.py", "--rounds", "0"], "argument --rounds: expected an int >= 1, got 0"),
        (["bench_train.py", "--threads", "0"], "argument --threads: expected an int >= 1, got 0"),
        (["bench_train.py", "--pairs", "0"], "argument --pairs: expected an int >= 1, got 0"),
        (["bench_train.py", "--preset", "mixtral-8x7b"], "invalid choice: 'mixtral-8x7b'"),
        (
            ["bench_train.py", "--shapes", "1x300"],
            "--shapes 1x300: preset tiny's max_seq_len is 256",
        ),
        (["bench_decode.py", "--new", "0"], "argument --new: expected an int >= 1, got 0"),
        (["bench_decode.py", "--preset", "deepseek-v3"], "invalid choice: 'deepseek-v3'"),
        (["bench_layer.py", "--warmup", "-1"], "argument --warmup: expected an int >= 0, got -1"),
        (["bench_layer.py", "--regimes", ","], "--regimes names no regime (',')"),
        (["bench_split.py", "--threads", "1"], "--threads must be >= 2 (the split runs a worker"),
        (["bench_parallel.py", "--experts", "3"], "--experts must be a multiple of the 2 ranks"),
        (["bench_parallel.py", "--tokens", "0"], "argument --tokens: expected an int >= 1, got 0"),
        (["bench_layer_cuda.py", "--repeats", "0"], "argument --repeats: expected an int >= 1"),
        (["bench_layer_cuda.py", "--dtypes", ","], "--dtypes names no dtype (',')"),
    ],
)
def test_bad_flags_are_refused_by_name(argv, message):
    assert message in _refused(*argv)


@pytest.mark.timeout(150)
def test_bench_layer_cuda_quick():
    # Without a GPU the script must say so in its JSON instead of failing; with one, its
    # ratios must be what its times say.
    stdout, result = _run("bench_layer_cuda.py", "--quick")
    assert result["benchmark"] == "layer_cuda"
    if not torch.cuda.is_available():
        assert result["unavailable"] == "no CUDA device"
        assert "no CUDA device" in stdout
        return
    regimes = {(r["regime"], r["dtype"]) for r in result["results"]}
    assert regimes == {(n, d) for n in ("coarse", "fine", "decode") for d in ("bf16", "fp32")}
    for r in result["results"]:
        assert math.isclose(r["fwd_ratio"], r["moe_fwd_ms"] / r["dense_fwd_ms"], rel_tol=1e-9)
        if r["regime"] != "decode":
            assert r["moe_peak_mib"] > 0 and r["dense_peak_mib"] > 0


def test_bench_layer_cuda_refuses_an_unknown_dtype():
    assert "--dtypes: unknown ['fp8']" in _refused("bench_layer_cuda.py", "--dtypes", "fp8")


@pytest.mark.timeout(120)
def test_bench_decode_quick_reports_both_batches():
    stdout, result = _run("bench_decode.py", "--quick")
    assert result["benchmark"] == "decode" and result["new_tokens"] == 8
    assert [r["batch"] for r in result["results"]] == [1, 8]
    for r in result["results"]:
        ratio = r["dense_ms_per_token"] / r["moe_ms_per_token"]
        assert math.isclose(r["ratio_moe_over_dense"], ratio, rel_tol=1e-9)
    assert "MoE / dense speed" in stdout
