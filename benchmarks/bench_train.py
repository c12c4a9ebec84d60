"""Training throughput: the tiny MoE preset against its dense twin, full optimizer steps.

One case = one optimizer step exactly as `moekit train` runs it: forward, cross-entropy +
balancing losses, backward, gradient clipping, AdamW, the router-bias update. Both models
train on the same byte windows of the embedded corpus (the same window each round), fp32
on CPU, a fixed thread count (2 unless --threads); with --device cuda, bf16 autocast as
`moekit train` runs on a GPU. The dense twin has a dense FFN of the
MoE's active width in each MoE layer's place: equal FFN FLOPs per token, so the ratio of
tokens/s measures what routing, dispatch and the grouped experts cost in wall time.

Times are medians over interleaved rounds (benchmarks/_common.py); the ratio is MoE
tokens/s over dense tokens/s from the same run. Target: >= 0.9. Two batch shapes by
default: 16 x 256 (the preset's whole context; the headline) and 16 x 128 (`moekit
train`'s default), where the MoE's extra time weighs more.

    python benchmarks/bench_train.py                      # tiny preset, 16 x 256 and 16 x 128
    python benchmarks/bench_train.py --shapes 64x256      # other batch shapes
    python benchmarks/bench_train.py --quick              # small batches, few rounds (a smoke test)
    python benchmarks/bench_train.py --device cuda --shapes 16x256,64x256   # on a GPU
"""

from __future__ import annotations

import argparse
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


def time_shape(
    preset: str, batch_size: int, seq_len: int, rounds: int, split, device: str, compile: str
) -> dict:
    """Interleaved step times of the preset and its dense twin at one batch shape, on
    windows of `split` (the embedded corpus's training tokens)."""
    config = TrainConfig(batch_size=batch_size, seq_len=seq_len, progress=False, compile=compile)
    batches = TrainBatches(split, seq_len, batch_size, seed=0)
    moe_cfg = get_preset(preset)
    configs = {"moe": moe_cfg, "dense twin": dense_twin(moe_cfg)}
    steps = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        steps[name] = make_step(Transformer(cfg), config, batches, device)
    # A compiled step recompiles over its first rounds (dynamic shapes, then guards).
    warmup = 2 if compile == "none" else 6
    times, cpu_times = time_interleaved(steps, repeats=rounds, warmup=warmup)
    tokens = batch_size * seq_len
    result: dict = {"batch_size": batch_size, "seq_len": seq_len}
    for name, cfg in configs.items():
        t = median(times[name])
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
    result["cpu_time_ratio_moe_over_dense"] = median(cpu_times["dense twin"]) / median(
        cpu_times["moe"]
    )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=trainable_presets())
    p.add_argument(
        "--shapes",
        help=f"batch shapes BxS, comma-separated; the first is the headline ({DEFAULT_SHAPES}, "
        f"quick {QUICK_SHAPES})",
    )
    p.add_argument("--rounds", type=positive_int, help="timed rounds (default 8, quick 3)")
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
    fill_defaults(args, shapes=(DEFAULT_SHAPES, QUICK_SHAPES), rounds=(8, 3))
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as err:
        p.error(str(err))
    max_seq_len = get_preset(args.preset).max_seq_len
    if any(s > max_seq_len for _, s in shapes):
        p.error(f"--shapes {args.shapes}: preset {args.preset}'s max_seq_len is {max_seq_len}")
    set_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        # The token split does not depend on the batch shape: prepared once for all.
        val_fraction = TrainConfig().val_fraction
        split = prepare_tokens("embedded", ByteTokenizer(), cache, val_fraction)["train"]
        results = [
            time_shape(args.preset, b, s, args.rounds, split, args.device, args.compile)
            for b, s in shapes
        ]

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
                ]
            )
    where = (
        f"bf16 autocast on {torch.cuda.get_device_name()}"
        if args.device == "cuda"
        else f"fp32, {args.threads} threads"
    )
    if args.compile != "none":
        where += f", torch.compile mode {args.compile}"
    print(
        f"training step, preset {args.preset}, byte tokens, {where}, "
        f"median of {args.rounds} interleaved rounds per batch shape"
    )
    print(f"machine: {machine()}")
    header = ["batch", "model", "params", "active", "step ms", "tokens/s", "GFLOP/s", "MoE/dense"]
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
