"""Training throughput: the tiny MoE preset against its dense twin, full optimizer steps.

One case = one optimizer step exactly as `moekit train` runs it: forward, cross-entropy +
balancing losses, backward, gradient clipping, AdamW, the router-bias update. Both models
train on the same byte windows of the embedded corpus (the same window each round), fp32
on CPU, a fixed thread count (2 unless --threads); with --device cuda, bf16 autocast as
`moekit train` runs on a GPU. The dense twin has a dense FFN of the
MoE's active width in each MoE layer's place: equal FFN FLOPs per token, so the ratio of
tokens/s measures what routing, dispatch and the grouped experts cost in wall time.

Two ways to run the models (`--method`):
- `processes` (the default): each model alone in a fresh process, as `moekit train` runs
  one, a pair of processes (one per model) at a time, the pairs alternating which model
  goes first. A model's step time is the median over its processes of each process's
  median step; the ratio is MoE tokens/s over dense tokens/s from the same run, and each
  pair's own ratio is reported beside it (their spread is the run's noise). Measured with
  both models in one process, what one model leaves there (the heap, freed pages, the
  first batch shape's buffers) moved the other's step time by 10-20% (benchmarks/README.md).
- `interleaved`: both models in this process, their steps interleaved round by round
  (benchmarks/_common.py), one batch shape after another. Quicker; load from other
  processes falls on both alike, but each model's time depends on the other's.

Target: >= 0.9. Two batch shapes by default: 16 x 256 (the preset's whole context; the
headline) and 16 x 128 (`moekit train`'s default), where the MoE's extra time weighs more
(attention, equal in both models, is a smaller share of a shorter sequence's step).

    python benchmarks/bench_train.py                      # tiny preset, 16 x 256 and 16 x 128
    python benchmarks/bench_train.py --shapes 64x256      # other batch shapes
    python benchmarks/bench_train.py --quick              # small batches, few rounds (a smoke test)
    python benchmarks/bench_train.py --method interleaved # both models in one process
    python benchmarks/bench_train.py --device cuda --shapes 16x256,64x256   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from _common import (
    emit_json,
    fill_defaults,
    fmt_ms,
    machine,
    median,
    positive_int,
    print_table,
    run_in_fresh_process,
    set_threads,
    time_interleaved,
    trainable_presets,
)

from moekit.data import ByteTokenizer, TrainBatches, prepare_tokens
from moekit.model import Transformer, count_parameters, dense_twin, flops_per_token, get_preset
from moekit.train import TrainConfig
from moekit.train.compiling import compile_forward
from moekit.train.config import COMPILE_MODES
from moekit.train.optim import build_optimizer


def make_step(model: Transformer, config: TrainConfig, batches: TrainBatches, device: str):
    """A closure running one optimizer step on the next window of `batches`.

    On CUDA the forward runs in bf16 autocast, as `moekit train` runs it, and the step
    ends with a synchronization so that a host clock around it times the GPU's work.
    """
    model.to(device)
    forward = compile_forward(model, config.compile)
    optimizer = build_optimizer(model, config)
    # A few fixed batches, identical for both models, moved to the device once.
    windows = [tuple(t.to(device) for t in batches(i)) for i in range(4)]
    cuda = device == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    state = {"step": 0}

    def step() -> None:
        x, y = windows[state["step"] % len(windows)]
        state["step"] += 1
        with autocast:
            out = forward(x)
        ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1))
        (ce + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if out.moe:
            model.update_bias([o.routed_tokens_per_expert for o in out.moe])
        if cuda:
            torch.cuda.synchronize()

    return step


DEFAULT_SHAPES = "16x256,16x128"
"""Batch shapes timed by default: the preset's whole context (the headline ratio), and
`moekit train`'s default batch of 16 x 128."""
QUICK_SHAPES = "4x64,4x32"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'16x256,16x128' -> [(16, 256), (16, 128)]: batch size x sequence length."""
    shapes = []
    for item in text.split(","):
        b, sep, s = item.strip().partition("x")
        if not (sep and b.isdigit() and s.isdigit() and int(b) > 0 and int(s) > 0):
            raise ValueError(f"--shapes takes BxS[,BxS...] of positive ints, got {text!r}")
        shapes.append((int(b), int(s)))
    return shapes


MODELS = ("moe", "dense twin")
METHODS = ("processes", "interleaved")


def _model_config(preset: str, name: str):
    cfg = get_preset(preset)
    return cfg if name == "moe" else dense_twin(cfg)


def _prepared_split(cache: str):
    """The embedded corpus's training tokens (independent of the batch shape), in `cache`."""
    return prepare_tokens("embedded", ByteTokenizer(), cache, TrainConfig().val_fraction)["train"]


def _steps(args: argparse.Namespace, names, batch_size: int, seq_len: int, split) -> dict:
    """One step closure per named model, each built from seed 0 on the same windows."""
    config = TrainConfig(
        batch_size=batch_size, seq_len=seq_len, progress=False, compile=args.compile
    )
    batches = TrainBatches(split, seq_len, batch_size, seed=0)
    steps = {}
    for name in names:
        torch.manual_seed(0)
        model = Transformer(_model_config(args.preset, name))
        steps[name] = make_step(model, config, batches, args.device)
    return steps


def _warmup(compile: str) -> int:
    # A compiled step recompiles over its first rounds (dynamic shapes, then guards).
    return 2 if compile == "none" else 6


def time_interleaved_shape(
    args: argparse.Namespace, batch_size: int, seq_len: int, split
) -> dict[str, tuple[list[float], list[float]]]:
    """name -> ([step wall s], [step CPU s]): both models in this process, interleaved."""
    steps = _steps(args, MODELS, batch_size, seq_len, split)
    times, cpu_times = time_interleaved(steps, repeats=args.rounds, warmup=_warmup(args.compile))
    return {name: (times[name], cpu_times[name]) for name in MODELS}


def _worker_argv(args: argparse.Namespace, name: str, batch_size: int, seq_len: int) -> list[str]:
    return [
        __file__,
        "--worker",
        name,
        "--preset",
        args.preset,
        "--shapes",
        f"{batch_size}x{seq_len}",
        "--rounds",
        str(args.rounds),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--compile",
        args.compile,
    ]


def time_in_processes(
    args: argparse.Namespace, batch_size: int, seq_len: int
) -> tuple[dict[str, tuple[list[float], list[float]]], list[float]]:
    """name -> ([median step wall s], [median step CPU s]) over `args.pairs` processes
    per model, and each pair's MoE/dense tokens/s ratio."""
    per_process: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in MODELS}
    pair_ratios = []
    for pair in range(args.pairs):
        order = MODELS if pair % 2 == 0 else MODELS[::-1]
        pair_times = {}
        for name in order:
            argv = _worker_argv(args, name, batch_size, seq_len)
            measured = json.loads(run_in_fresh_process(argv, fixed_malloc_threshold=False))
            wall, cpu = median(measured["wall"]), median(measured["cpu"])
            per_process[name][0].append(wall)
            per_process[name][1].append(cpu)
            pair_times[name] = wall
        pair_ratios.append(pair_times["dense twin"] / pair_times["moe"])
    return per_process, pair_ratios


def run_worker(args: argparse.Namespace) -> None:
    """One model alone at one batch shape: its step times as the last line of output."""
    (batch_size, seq_len), name = parse_shapes(args.shapes)[0], args.worker
    set_threads(args.threads)
    with tempfile.TemporaryDirectory() as cache:
        step = _steps(args, [name], batch_size, seq_len, _prepared_split(cache))[name]
        warmup = _warmup(args.compile)
        wall, cpu = time_interleaved({name: step}, repeats=args.rounds, warmup=warmup)
    print(json.dumps({"wall": wall[name], "cpu": cpu[name]}), flush=True)


def shape_result(
    preset: str,
    batch_size: int,
    seq_len: int,
    times: dict[str, tuple[list[float], list[float]]],
    pair_ratios: list[float] | None,
) -> dict:
    """The JSON record of one batch shape from each model's step times."""
    tokens = batch_size * seq_len
    result: dict = {"batch_size": batch_size, "seq_len": seq_len}
    for name in MODELS:
        cfg = _model_config(preset, name)
        t = median(times[name][0])
        total, active = count_parameters(cfg)
        gflop = 3 * flops_per_token(cfg, seq_len).total * tokens / 1e9
        result[name.replace(" ", "_")] = {
            "step_s": t,
            "tokens_per_s": tokens / t,
            "gflop_per_s": gflop / t,
            "params": total,
            "active_params": active,
        }
    result["ratio_moe_over_dense"] = (
        result["moe"]["tokens_per_s"] / result["dense_twin"]["tokens_per_s"]
    )
    result["cpu_time_ratio_moe_over_dense"] = median(times["dense twin"][1]) / median(
        times["moe"][1]
    )
    result["pair_ratios"] = pair_ratios
    return result


def _pair_range(ratios: list[float] | None) -> str:
    """The lowest and highest of the pairs' ratios ('' when interleaved in one process)."""
    if not ratios:
        return ""
    lo, hi = min(ratios), max(ratios)
    return f"{lo:.2f}x" if len(ratios) == 1 else f"{lo:.2f}-{hi:.2f}x"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=trainable_presets())
    p.add_argument(
        "--shapes",
        help=f"batch shapes BxS, comma-separated; the first is the headline ({DEFAULT_SHAPES}, "
        f"quick {QUICK_SHAPES})",
    )
    p.add_argument(
        "--rounds",
        type=positive_int,
        help="timed steps per process, or interleaved rounds (default 8, quick 3)",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default="processes",
        help="each model alone in fresh processes (default), or both interleaved in this one",
    )
    p.add_argument(
        "--pairs",
        type=positive_int,
        help="processes per model with --method processes (default 4, quick 1)",
    )
    # Internal: one model alone at one shape, started by --method processes.
    p.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke test: defaults of batch {QUICK_SHAPES} and 3 rounds",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu (fp32) or cuda (bf16 autocast, as moekit train); default cpu",
    )
    p.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="none",
        help="torch.compile the forward, as moekit train --compile (default none)",
    )
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    fill_defaults(args, shapes=(DEFAULT_SHAPES, QUICK_SHAPES), rounds=(8, 3), pairs=(4, 1))
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as err:
        p.error(str(err))
    max_seq_len = get_preset(args.preset).max_seq_len
    if any(s > max_seq_len for _, s in shapes):
        p.error(f"--shapes {args.shapes}: preset {args.preset}'s max_seq_len is {max_seq_len}")
    if args.worker is not None:
        run_worker(args)
        return
    set_threads(args.threads)
    started = time.perf_counter()
    results = []
    if args.method == "processes":
        for b, s in shapes:
            times, pair_ratios = time_in_processes(args, b, s)
            results.append(shape_result(args.preset, b, s, times, pair_ratios))
    else:
        with tempfile.TemporaryDirectory() as cache:
            split = _prepared_split(cache)
            for b, s in shapes:
                times = time_interleaved_shape(args, b, s, split)
                results.append(shape_result(args.preset, b, s, times, None))

    rows = []
    for r in results:
        for key, name in (("moe", "moe"), ("dense_twin", "dense twin")):
            m = r[key]
            rows.append(
                [
                    f"{r['batch_size']} x {r['seq_len']}",
                    name,
                    f"{m['params'] / 1e6:.2f}M",
                    f"{m['active_params'] / 1e6:.2f}M",
                    fmt_ms(m["step_s"]),
                    f"{m['tokens_per_s']:.0f}",
                    f"{m['gflop_per_s']:.2f}",
                    f"{r['ratio_moe_over_dense']:.2f}x" if key == "moe" else "",
                    _pair_range(r["pair_ratios"]) if key == "moe" else "",
                ]
            )
    where = (
        f"bf16 autocast on {torch.cuda.get_device_name()}"
        if args.device == "cuda"
        else f"fp32, {args.threads} threads"
    )
    if args.compile != "none":
        where += f", torch.compile mode {args.compile}"
    how = (
        f"each model alone in {args.pairs} fresh process(es), median of {args.rounds} steps "
        "in each, median over the processes"
        if args.method == "processes"
        else f"both models in one process, median of {args.rounds} interleaved rounds"
    )
    print(f"training step, preset {args.preset}, byte tokens, {where}; {how}")
    print(f"machine: {machine()}")
    header = ["batch", "model", "params", "active", "step ms", "tokens/s", "GFLOP/s"]
    header += ["MoE/dense", "per pair"]
    print_table(header, rows)
    head = results[0]
    headline = (
        f"MoE / dense twin throughput at {head['batch_size']} x {head['seq_len']}: "
        f"{head['ratio_moe_over_dense']:.2f}x (target >= 0.90)"
    )
    if args.device == "cpu":
        # On a GPU the host's CPU time is launches plus spinning in synchronize: no check.
        cpu_ratio = head["cpu_time_ratio_moe_over_dense"]
        headline += f"; by process CPU time (less sensitive to other load): {cpu_ratio:.2f}x"
    if args.quick:
        headline += " [--quick: a smoke test, not a measurement]"
    print(headline)
    print(f"runtime {time.perf_counter() - started:.1f} s")
    emit_json(
        {
            "benchmark": "train",
            "preset": args.preset,
            "device": args.device,
            "compile": args.compile,
            "threads": args.threads,
            "rounds": args.rounds,
            "method": args.method,
            "pairs": args.pairs if args.method == "processes" else None,
            "quick": args.quick,
            "batch_size": head["batch_size"],
            "seq_len": head["seq_len"],
            "ratio_moe_over_dense": head["ratio_moe_over_dense"],
            "cpu_time_ratio_moe_over_dense": head["cpu_time_ratio_moe_over_dense"],
            "moe": head["moe"],
            "dense_twin": head["dense_twin"],
            "shapes": results,
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
