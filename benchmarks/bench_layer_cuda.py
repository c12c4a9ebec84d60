"""The MoE layer on a CUDA GPU: grouped GEMM against the reference loop and a dense FFN.

bench_layer.py's shapes (coarse: D=1024 F=2816 E=8 K=2; fine: D=1024 F=704 E=64 K=8;
decode: the coarse experts, 8 tokens), the training regimes at each of --tokens token
counts, in bf16 and fp32 (the whole module in that dtype). Cases:

  moe        impl="grouped": torch's grouped GEMM (F.grouped_mm), autograd backward
  reference  impl="reference": one chain of matmuls per expert, the readable truth
  dense      moekit's SwiGLU MLP of width K*F over the same tokens (equal active FLOPs)

"fwd" is a forward with autograd recording, "fwd+bwd" adds the backward of (y * g).sum()
plus the balancing loss, gradients dropped before each call (bench_layer.forward_backward).
Each call is timed alone between two synchronizations with CUDA events, so the host's
launch time counts as it does in a training step; times are medians over interleaved
rounds after warm-up. Peak memory: torch.cuda.max_memory_allocated over one fwd+bwd, from
the memory allocated before it (weights and inputs, no gradients); `mem_ratio` is (MoE
peak - MoE expert-weight gradients) / dense peak, as in bench_layer.py.

Decode floor: the bytes of the weight slices the 8 tokens select, over the device-to-device
copy bandwidth measured in the same run (bytes read + written by one large clone).

    python benchmarks/bench_layer_cuda.py                    # needs a CUDA device
    python benchmarks/bench_layer_cuda.py --quick            # small shapes, seconds
    python benchmarks/bench_layer_cuda.py --tokens 4096 --dtypes bf16

Without a CUDA device it says so, ends with a JSON line naming the reason, and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable

import torch
from _common import emit_json, fill_defaults, median, positive_int, print_table
from bench_layer import (
    QUICK,
    REGIMES,
    Regime,
    build,
    dense_grad_bytes,
    expert_grad_bytes,
    forward,
    forward_backward,
    forward_no_grad,
    release_held_buffers,
    touched_weights,
)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def time_cuda(
    cases: dict[str, Callable[[], object]], repeats: int, warmup: int
) -> dict[str, float]:
    """Median milliseconds per call of each case, over interleaved rounds (odd rounds in
    reverse order, as _common.time_interleaved)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    order = list(cases.items())
    for r in range(warmup + repeats):
        for name, fn in order if r % 2 == 0 else order[::-1]:
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            if r >= warmup:
                times[name].append(start.elapsed_time(end))
    return {name: median(v) for name, v in times.items()}


def peak_bytes(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> int:
    """Bytes one fwd+bwd allocates above what was allocated before it (no gradients).

    The expert bank's storage kept from the last call is released first (as bench_layer's
    memory cases do): where the fused path runs (shapes grouped_mm refuses), the measured
    call would otherwise write its gradients into storage counted in the base.
    """
    for p in module.parameters():
        p.grad = None
    x.grad = None
    release_held_buffers(module)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    forward_backward(module, x, g)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth(num_bytes: int = 2**30) -> float:
    """Device memory bandwidth in bytes/s: bytes read + written by one large clone."""
    src = torch.empty(num_bytes // 4, dtype=torch.float32, device="cuda").uniform_()
    ms = time_cuda({"clone": lambda: src.clone()}, repeats=10, warmup=3)["clone"]
    return 2 * num_bytes / (ms / 1e3)


def on_cuda(regime: Regime, kind: str, dtype: torch.dtype):
    module, x, g = build(regime, kind)
    module = module.to("cuda", dtype)
    x = x.detach().to("cuda", dtype).requires_grad_(regime.backward)
    return module, x, g.to("cuda", dtype)


def training_regime(regime: Regime, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    built = {kind: on_cuda(regime, kind, dtype) for kind in ("moe", "reference", "dense")}
    cases: dict[str, Callable[[], object]] = {}
    for kind, (module, x, g) in built.items():
        if kind != "reference":
            cases[f"{kind} fwd"] = lambda m=module, x=x: forward(m, x)
        cases[f"{kind} fwd+bwd"] = lambda m=module, x=x, g=g: forward_backward(m, x, g)
    t = time_cuda(cases, repeats, warmup=3)
    moe, dense = built["moe"][0], built["dense"][0]
    moe_peak, dense_peak = peak_bytes(*built["moe"]), peak_bytes(*built["dense"])
    return {
        "moe_fwd_ms": t["moe fwd"],
        "dense_fwd_ms": t["dense fwd"],
        "moe_fwdbwd_ms": t["moe fwd+bwd"],
        "reference_fwdbwd_ms": t["reference fwd+bwd"],
        "dense_fwdbwd_ms": t["dense fwd+bwd"],
        "fwd_ratio": t["moe fwd"] / t["dense fwd"],
        "fwdbwd_ratio": t["moe fwd+bwd"] / t["dense fwd+bwd"],
        "reference_over_moe": t["reference fwd+bwd"] / t["moe fwd+bwd"],
        "moe_peak_mib": moe_peak / 2**20,
        "dense_peak_mib": dense_peak / 2**20,
        "mem_ratio": (moe_peak - expert_grad_bytes(moe)) / dense_peak,
        "act_mem_ratio": (moe_peak - expert_grad_bytes(moe))
        / (dense_peak - dense_grad_bytes(dense)),
    }


def decode_regime(
    regime: Regime, dtype: torch.dtype, repeats: int, bandwidth: float
) -> dict[str, float]:
    moe, x, _ = on_cuda(regime, "moe", dtype)
    dense, _, _ = on_cuda(regime, "dense", dtype)
    touched = sum(w.numel() * w.element_size() for w in touched_weights(moe, x))

    cases = {"moe": lambda: forward_no_grad(moe, x), "dense": lambda: forward_no_grad(dense, x)}
    t = time_cuda(cases, repeats * 4, warmup=3)
    floor_ms = touched / bandwidth * 1e3
    return {
        "moe_fwd_ms": t["moe"],
        "dense_fwd_ms": t["dense"],
        "floor_ms": floor_ms,
        "touched_weight_mib": touched / 2**20,
        "floor_ratio": t["moe"] / floor_ms,
        "fwd_ratio": t["moe"] / t["dense"],
    }


def report(results: list[dict[str, object]]) -> None:
    rows = []
    for r in results:
        shape = f"{r['regime']} T={r['tokens']}"
        if "fwdbwd_ratio" in r:
            rows.append(
                [
                    shape,
                    r["dtype"],
                    f"{r['moe_fwd_ms']:.3f} / {r['dense_fwd_ms']:.3f}",
                    f"{r['fwd_ratio']:.2f}x",
                    f"{r['moe_fwdbwd_ms']:.3f} / {r['dense_fwdbwd_ms']:.3f}",
                    f"{r['fwdbwd_ratio']:.2f}x",
                    f"{r['reference_fwdbwd_ms']:.3f} ({r['reference_over_moe']:.2f}x)",
                    f"{r['mem_ratio']:.2f}x ({r['act_mem_ratio']:.2f}x act)",
                ]
            )
        else:
            rows.append(
                [
                    shape,
                    r["dtype"],
                    f"{r['moe_fwd_ms']:.3f} / {r['dense_fwd_ms']:.3f}",
                    f"{r['fwd_ratio']:.2f}x",
                    f"floor {r['floor_ms']:.3g}",
                    f"{r['floor_ratio']:.2f}x floor",
                    "-",
                    "-",
                ]
            )
    header = [
        "regime",
        "dtype",
        "fwd ms moe/dense",
        "fwd",
        "fwd+bwd ms moe/dense",
        "fwd+bwd",
        "reference fwd+bwd ms",
        "peak mem vs dense",
    ]
    print_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes, few rounds")
    p.add_argument(
        "--tokens",
        help="token counts of the training regimes, comma-separated "
        f"(default 4096,16384, quick {QUICK[0].num_tokens})",
    )
    p.add_argument("--dtypes", default="bf16,fp32", help=f"comma-separated, from {list(DTYPES)}")
    p.add_argument("--repeats", type=positive_int, help="timed rounds (default 20, quick 3)")
    args = p.parse_args(argv)
    fill_defaults(args, tokens=("4096,16384", str(QUICK[0].num_tokens)), repeats=(20, 3))
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        p.error(f"--dtypes: unknown {bad}; choose from {list(DTYPES)}")
    if not dtypes:
        p.error(f"--dtypes names no dtype ({args.dtypes!r}); choose from {list(DTYPES)}")
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        p.error(f"--tokens takes comma-separated positive ints, got {args.tokens!r}")
    if not tokens or min(tokens) <= 0:
        p.error(f"--tokens takes comma-separated positive ints, got {args.tokens!r}")
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        emit_json({"benchmark": "layer_cuda", "unavailable": "no CUDA device"})
        return 0
    repeats = args.repeats
    regimes = QUICK if args.quick else REGIMES
    started = time.perf_counter()
    bandwidth = copy_bandwidth(2**26 if args.quick else 2**30)
    results: list[dict[str, object]] = []
    for name in dtypes:
        for regime in regimes:
            counts = tokens if regime.backward else [regime.num_tokens]
            for n in counts:
                shaped = dataclasses.replace(regime, num_tokens=n)
                if regime.backward:
                    res = training_regime(shaped, DTYPES[name], repeats)
                else:
                    res = decode_regime(shaped, DTYPES[name], repeats, bandwidth)
                results.append({"regime": regime.name, "tokens": n, "dtype": name, **res})
                torch.cuda.empty_cache()
    print(
        f"MoE layer vs dense SwiGLU (width K*F) on {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}, median of {repeats} rounds; copy bandwidth "
        f"{bandwidth / 1e12:.2f} TB/s"
    )
    report(results)
    runtime = time.perf_counter() - started
    print(f"runtime {runtime:.1f} s")
    emit_json(
        {
            "benchmark": "layer_cuda",
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "repeats": repeats,
            "copy_bandwidth_tb_s": bandwidth / 1e12,
            "results": results,
            "runtime_s": runtime,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
