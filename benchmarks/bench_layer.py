"""MoE layer against a dense SwiGLU FFN of the same active FLOPs: time and peak memory.

The dense baseline is moekit's MLP with hidden width K*F over the same T tokens, so each
token meets the same matmul FLOPs in both (the router's T x D x E matmul aside). fp32,
a fixed thread count (2 unless --threads), one process. Three regimes:

  coarse        D=1024 F=2816 E=8  K=2, 4096 tokens: forward and forward+backward
  fine          D=1024 F=704  E=64 K=8, 4096 tokens: forward and forward+backward
  decode        D=1024 F=2816 E=8  K=2, 8 tokens: forward only, without autograd

"fwd" is a forward with autograd recording (as in training); "fwd+bwd" adds the backward
of (y * g).sum() for a fixed random g plus the layer's balancing loss, with the weight
gradients dropped before each call as `zero_grad(set_to_none=True)` does between training
steps: the dense layer's are allocated anew, and the MoE's expert bank writes its weight
gradients and kept projections into the storage it kept from the call before, as it
does in training (moekit.step_buffers).
Times are medians over interleaved rounds (benchmarks/_common.py); ratios are MoE over
dense from the same run.

Decode floor: the time to read, once, exactly the weight slices of the experts the 8
tokens select: at batch 8 the layer is memory bound, and no implementation can beat
reading its weights. Two kernels read them, a sum over each touched matrix and a one-row
matvec through it (MKL's dot-product path reads an [out, in] weight faster than the
sum's reduction does); the floor is the faster of their medians.

Peak memory: forward+backward of each layer once, after a warm-up call, in a fresh
process started for the memory cases alone, by resident memory (method in
benchmarks/_common.py). Two ratios: `mem_ratio` =
(MoE peak - MoE expert-weight gradients) / dense peak, the target's definition (MoE
must also hold gradients for E/K times more weights); `act_mem_ratio` = the same with
the dense layer's own weight gradients taken off too (activations and temporaries only).
Where the kernel's peak-RSS counter fails a probe of known size (some sandboxes), peak
memory is reported as not measured, with the reason, instead of as a wrong number.

Targets: fwd+bwd <= 1.00x dense (coarse) and <= 1.05x (fine); mem_ratio <= 1.2;
decode forward <= 1.3x its floor.

    python benchmarks/bench_layer.py            # full run
    python benchmarks/bench_layer.py --quick    # small shapes, seconds (the smoke test)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

import torch
from _common import (
    emit_json,
    fill_defaults,
    fmt_mib,
    fmt_ms,
    implausible_peak,
    machine,
    median,
    non_negative_int,
    peak_bytes_of,
    peak_rss_problem,
    positive_int,
    print_table,
    run_in_fresh_process,
    set_threads,
    time_interleaved,
)

from moekit import MoE, MoEConfig
from moekit.experts import ExpertBank
from moekit.mlp import MLP


@dataclass(frozen=True)
class Regime:
    name: str
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    num_tokens: int
    backward: bool
    target: float
    """Largest acceptable ratio: fwd+bwd over dense, or (decode) forward over the floor."""


REGIMES = (
    Regime("coarse", 1024, 2816, 8, 2, 4096, True, 1.00),
    Regime("fine", 1024, 704, 64, 8, 4096, True, 1.05),
    Regime("decode", 1024, 2816, 8, 2, 8, False, 1.30),
)
QUICK = (
    Regime("coarse", 64, 176, 8, 2, 256, True, 1.00),
    Regime("fine", 64, 44, 16, 4, 256, True, 1.05),
    Regime("decode", 64, 176, 8, 2, 8, False, 1.30),
)
MEM_TARGET = 1.2


def _key(case: str) -> str:
    return case.replace(" ", "_").replace("+", "")


def build(regime: Regime, kind: str, seed: int = 0):
    """(module, x, grad of the output) for kind "moe", "dense" or "reference"."""
    torch.manual_seed(seed)
    D = regime.d_model
    if kind == "dense":
        module = MLP(D, regime.top_k * regime.d_ff)
    else:
        impl = "reference" if kind == "reference" else "grouped"
        config = MoEConfig(
            d_model=D,
            d_ff=regime.d_ff,
            num_experts=regime.num_experts,
            top_k=regime.top_k,
            impl=impl,
        )
        module = MoE(config)
    # Tokens from their own generator: every kind of a regime gets the same x and g,
    # whatever its construction drew from the global one.
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(regime.num_tokens, D, generator=gen).requires_grad_(regime.backward)
    return module, x, torch.randn(regime.num_tokens, D, generator=gen)


def forward(module, x):
    out = module(x)
    return out if isinstance(out, tuple) else (out, None)


def forward_no_grad(module, x) -> None:
    """A forward as decoding runs it: no autograd recording."""
    with torch.no_grad():
        forward(module, x)


def forward_backward(module, x, g) -> None:
    for p in module.parameters():
        p.grad = None
    x.grad = None
    y, out = forward(module, x)
    if out is None:
        y.backward(g)
    else:
        torch.autograd.backward([y, out.loss], [g, None])


def release_held_buffers(module) -> None:
    for m in module.modules():
        if isinstance(m, ExpertBank):
            m.step_buffers.release()


def expert_grad_bytes(module: MoE) -> int:
    return sum(p.numel() * p.element_size() for p in module.experts.parameters())


def dense_grad_bytes(module: MLP) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def memory_cases(regimes: list[Regime]) -> dict[str, object]:
    """Run in a fresh process: peak bytes of one forward+backward of each (regime, kind).

    {"peaks": {"regime/kind": bytes}}, or {"unavailable": why} where this kernel's
    peak-RSS counter fails its probe. One warm-up call first (library workspaces are
    allocated on first use); then the gradients are dropped, with the storage the expert
    bank keeps for reuse (moekit.step_buffers), and the measured call starts from weights
    and inputs alone, so its peak counts the expert gradients and projections it
    allocates. Cases run one after another: every buffer of one is unmapped before the
    next starts.
    """
    problem = peak_rss_problem()
    if problem is not None:
        return {"unavailable": problem}
    peaks = {}
    for regime in regimes:
        for kind in ("moe", "dense"):
            module, x, g = build(regime, kind)
            forward_backward(module, x, g)
            for p in module.parameters():
                p.grad = None
            x.grad = None
            release_held_buffers(module)
            peaks[f"{regime.name}/{kind}"] = peak_bytes_of(
                lambda m=module, x=x, g=g: forward_backward(m, x, g)
            )
            del module, x, g
    return {"peaks": peaks}


def touched_weights(moe: MoE, x: torch.Tensor) -> list[torch.Tensor]:
    """The weight slices of exactly the experts x's tokens are routed to."""
    with torch.no_grad():
        _, out = moe(x)
    bank = moe.experts
    slices = []
    for e in out.expert_ids.unique().tolist():
        slices += [w[e] for w in (bank.w_gate_EFD, bank.w_up_EFD, bank.w_down_EDF) if w is not None]
    return slices


def run_training_regime(regime: Regime, args, peaks: dict[str, int]) -> dict[str, object]:
    moe, x, g = build(regime, "moe")
    dense, _, _ = build(regime, "dense")
    cases = {
        "moe fwd": lambda: forward(moe, x),
        "dense fwd": lambda: forward(dense, x),
        "moe fwd+bwd": lambda: forward_backward(moe, x, g),
        "dense fwd+bwd": lambda: forward_backward(dense, x, g),
    }
    if args.peer:
        ref, _, _ = build(regime, "reference")
        cases["reference fwd"] = lambda: forward(ref, x)
        cases["reference fwd+bwd"] = lambda: forward_backward(ref, x, g)
    wall, cpu = time_interleaved(cases, args.repeats, args.warmup)
    t = {k: median(v) for k, v in wall.items()}
    c = {k: median(v) for k, v in cpu.items()}
    result: dict[str, object] = {_key(k) + "_ms": seconds * 1e3 for k, seconds in t.items()}
    result.update({_key(k) + "_cpu_ms": seconds * 1e3 for k, seconds in c.items()})
    result["fwd_ratio"] = t["moe fwd"] / t["dense fwd"]
    result["fwdbwd_ratio"] = t["moe fwd+bwd"] / t["dense fwd+bwd"]
    result["fwd_cpu_ratio"] = c["moe fwd"] / c["dense fwd"]
    result["fwdbwd_cpu_ratio"] = c["moe fwd+bwd"] / c["dense fwd+bwd"]
    memory = dict.fromkeys(
        ("moe_peak_mib", "dense_peak_mib", "expert_grad_mib", "mem_ratio", "act_mem_ratio")
    )
    memory["meets_mem_target"] = None
    if peaks:
        moe_peak, dense_peak = peaks[f"{regime.name}/moe"], peaks[f"{regime.name}/dense"]
        moe_grads, dense_grads = expert_grad_bytes(moe), dense_grad_bytes(dense)
        problem = implausible_peak("MoE", moe_peak, moe_grads) or implausible_peak(
            "dense", dense_peak, dense_grads
        )
        if problem is not None:
            result["memory_unavailable"] = f"{regime.name}: {problem}"
        else:
            memory.update(
                moe_peak_mib=moe_peak / 2**20,
                dense_peak_mib=dense_peak / 2**20,
                expert_grad_mib=moe_grads / 2**20,
                mem_ratio=(moe_peak - moe_grads) / dense_peak,
                act_mem_ratio=(moe_peak - moe_grads) / (dense_peak - dense_grads),
            )
            memory["meets_mem_target"] = memory["mem_ratio"] <= MEM_TARGET
    # Always present, null where not measured: a reader gets None, not a KeyError.
    result.update(memory)
    result["meets_target"] = result["fwdbwd_ratio"] <= regime.target
    return result


def run_decode_regime(regime: Regime, args, peaks: dict[str, int]) -> dict[str, object]:
    moe, x, _ = build(regime, "moe")
    dense, _, _ = build(regime, "dense")
    slices = touched_weights(moe, x)

    def floor_sum() -> None:
        with torch.no_grad():  # as the layer's decode call: no autograd record either side
            for w in slices:
                w.sum()

    rows = {w.shape[1]: torch.randn(1, w.shape[1]) for w in slices}

    def floor_matvec() -> None:
        with torch.no_grad():
            for w in slices:
                torch.nn.functional.linear(rows[w.shape[1]], w)

    cases = {
        "moe fwd": lambda: forward_no_grad(moe, x),
        "dense fwd": lambda: forward_no_grad(dense, x),
        "weight read floor sum": floor_sum,
        "weight read floor matvec": floor_matvec,
    }
    # Four times the rounds: a decode call takes milliseconds, its noise is relatively larger.
    wall, cpu = time_interleaved(cases, args.repeats * 4, args.warmup)
    t = {k: median(v) for k, v in wall.items()}
    c = {k: median(v) for k, v in cpu.items()}
    floor = min(t["weight read floor sum"], t["weight read floor matvec"])
    per_expert = 3 if moe.experts.w_gate_EFD is not None else 2
    touched = len({w.data_ptr() for w in slices}) // per_expert
    return {
        "moe_fwd_ms": t["moe fwd"] * 1e3,
        "dense_fwd_ms": t["dense fwd"] * 1e3,
        "moe_fwd_cpu_ms": c["moe fwd"] * 1e3,
        "dense_fwd_cpu_ms": c["dense fwd"] * 1e3,
        "floor_ms": floor * 1e3,
        "floor_sum_ms": t["weight read floor sum"] * 1e3,
        "floor_matvec_ms": t["weight read floor matvec"] * 1e3,
        "touched_experts": touched,
        "touched_weight_mib": sum(w.numel() * w.element_size() for w in slices) / 2**20,
        "floor_ratio": t["moe fwd"] / floor,
        "floor_cpu_ratio": c["moe fwd"]
        / min(c["weight read floor sum"], c["weight read floor matvec"]),
        "fwd_ratio": t["moe fwd"] / t["dense fwd"],
        "meets_target": t["moe fwd"] / floor <= regime.target,
    }


def report(regimes: tuple[Regime, ...], results: dict[str, dict[str, object]]) -> None:
    rows = []
    for r in regimes:
        res = results[r.name]
        shape = f"D={r.d_model} F={r.d_ff} E={r.num_experts} K={r.top_k} T={r.num_tokens}"
        if r.backward:
            mem = "-"
            if res["mem_ratio"] is not None:
                mem = f"{res['mem_ratio']:.2f}x ({res['act_mem_ratio']:.2f}x act)"
            rows.append(
                [
                    r.name,
                    shape,
                    f"{res['moe_fwd_ms']:.1f} / {res['dense_fwd_ms']:.1f}",
                    f"{res['fwd_ratio']:.2f}x",
                    f"{res['moe_fwdbwd_ms']:.1f} / {res['dense_fwdbwd_ms']:.1f}",
                    f"{res['fwdbwd_ratio']:.2f}x (<= {r.target:.2f})",
                    mem + f" (<= {MEM_TARGET})" if mem != "-" else mem,
                ]
            )
        else:
            rows.append(
                [
                    r.name,
                    shape,
                    f"{res['moe_fwd_ms']:.2f} / {res['dense_fwd_ms']:.2f}",
                    f"{res['fwd_ratio']:.2f}x",
                    f"floor {res['floor_ms']:.2f} ms",
                    f"{res['floor_ratio']:.2f}x floor (<= {r.target:.2f})",
                    "-",
                ]
            )
    header = [
        "regime",
        "shape",
        "fwd ms moe/dense",
        "fwd",
        "fwd+bwd ms moe/dense",
        "fwd+bwd (decode: vs floor)",
        "peak mem vs dense",
    ]
    print_table(header, rows)
    for r in regimes:
        res = results[r.name]
        if res.get("moe_peak_mib") is not None:
            print(
                f"{r.name}: peak MiB moe {fmt_mib(res['moe_peak_mib'] * 2**20)}, dense "
                f"{fmt_mib(res['dense_peak_mib'] * 2**20)}, expert grads "
                f"{fmt_mib(res['expert_grad_mib'] * 2**20)}"
            )
        if "reference_fwdbwd_ms" in res:
            print(
                f"{r.name}: reference path fwd {fmt_ms(res['reference_fwd_ms'] / 1e3)} ms, "
                f"fwd+bwd {fmt_ms(res['reference_fwdbwd_ms'] / 1e3)} ms"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes, for a smoke test")
    p.add_argument("--threads", type=positive_int, help="torch threads (default 2, quick 1)")
    p.add_argument("--repeats", type=positive_int, help="timed rounds (default 7, quick 2)")
    p.add_argument("--warmup", type=non_negative_int, default=1)
    p.add_argument("--regimes", default="coarse,fine,decode", help="comma-separated subset")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--peer", action="store_true", help="also time the reference path")
    p.add_argument("--memory-cases", metavar="REGIMES", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # One thread for the smoke test: on a busy machine, each of the many tiny parallel
    # regions of small shapes can wait a whole scheduler slice.
    fill_defaults(args, threads=(2, 1), repeats=(7, 2))
    set_threads(args.threads)
    table = {r.name: r for r in (QUICK if args.quick else REGIMES)}
    if args.memory_cases:
        print(json.dumps(memory_cases([table[n] for n in args.memory_cases.split(",")])))
        return 0
    names = [n for n in args.regimes.split(",") if n]
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"--regimes: unknown {unknown}; choose from {sorted(table)}")
    if not names:
        p.error(f"--regimes names no regime ({args.regimes!r}); choose from {sorted(table)}")
    regimes = tuple(table[n] for n in names)
    info = machine()
    print(
        f"MoE layer vs dense SwiGLU (width K*F), fp32, {info['threads']} threads, "
        f"median of {args.repeats} rounds ({4 * args.repeats} for decode); {info['cpu']}, "
        f"torch {info['torch']}"
    )
    start = time.perf_counter()
    peaks: dict[str, int] = {}
    memory_unavailable = None
    trained = ",".join(r.name for r in regimes if r.backward)
    if not trained:
        memory_unavailable = "no training regime was run"
    elif args.no_memory:
        memory_unavailable = "not requested (--no-memory)"
    else:
        child = [__file__, "--memory-cases", trained, "--threads", str(args.threads)]
        measured = json.loads(run_in_fresh_process(child + (["--quick"] if args.quick else [])))
        peaks, memory_unavailable = measured.get("peaks", {}), measured.get("unavailable")
    results = {}
    for r in regimes:
        run = run_training_regime if r.backward else run_decode_regime
        results[r.name] = run(r, args, peaks)
    implausible = [
        res.pop("memory_unavailable") for res in results.values() if "memory_unavailable" in res
    ]
    if implausible and memory_unavailable is None:
        memory_unavailable = "; ".join(implausible)
    report(regimes, results)
    if memory_unavailable is not None:
        print(f"peak memory not measured: {memory_unavailable}")
    runtime = time.perf_counter() - start
    print(f"runtime {runtime:.1f} s")
    emit_json(
        {
            "benchmark": "layer",
            "dtype": "float32",
            "quick": args.quick,
            "repeats": args.repeats,
            "machine": info,
            "regimes": {r.name: {**asdict(r), **results[r.name]} for r in regimes},
            "ratios": {
                r.name: results[r.name]["fwdbwd_ratio" if r.backward else "floor_ratio"]
                for r in regimes
            },
            "memory_unavailable": memory_unavailable,
            "runtime_s": runtime,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
