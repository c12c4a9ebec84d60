"""Training throughput: the tiny MoE preset against its dense twin, full optimizer steps.

One case = one optimizer step exactly as `moekit train` runs it: forward, cross-entropy +
balancing losses, backward, gradient clipping, AdamW, the router-bias update. Both models
train on the same byte windows of the embedded corpus (the same window each round), fp32
on CPU, a fixed thread count (2 unless --threads). The dense twin has a dense FFN of the
MoE's active width in each MoE layer's place: equal FFN FLOPs per token, so the ratio of
tokens/s measures what routing, dispatch and the grouped experts cost in wall time.

Times are medians over interleaved rounds (benchmarks/_common.py); the ratio is MoE
tokens/s over dense tokens/s from the same run. Target: >= 0.9.

    python benchmarks/bench_train.py             # tiny preset, batch 16 x 256
    python benchmarks/bench_train.py --quick     # small batch, few rounds (a smoke test)
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F
from _common import emit_json, fmt_ms, machine, median, print_table, set_threads, time_interleaved

from moekit.data import ByteTokenizer, TrainBatches, prepare_tokens
from moekit.model import Transformer, count_parameters, dense_twin, flops_per_token, get_preset
from moekit.train import TrainConfig
from moekit.train.optim import build_optimizer


def make_step(model: Transformer, config: TrainConfig, batches: TrainBatches):
    """A closure running one optimizer step on the next window of `batches`."""
    optimizer = build_optimizer(model, config)
    state = {"step": 0}

    def step() -> None:
        x, y = batches(state["step"] % 4)  # a few fixed batches, identical for both models
        state["step"] += 1
        out = model(x)
        ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1))
        (ce + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if out.moe:
            model.update_bias([o.tokens_per_expert for o in out.moe])

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="batch 4 x 64, 3 rounds")
    args = p.parse_args()
    if args.quick:
        args.batch_size, args.seq_len, args.rounds = 4, 64, 3
    set_threads(args.threads)
    started = time.perf_counter()
    config = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, progress=False)
    with tempfile.TemporaryDirectory() as cache:
        split = prepare_tokens("embedded", ByteTokenizer(), cache, config.val_fraction)["train"]
        batches = TrainBatches(split, config.seq_len, config.batch_size, seed=0)
        moe_cfg = get_preset(args.preset)
        configs = {"moe": moe_cfg, "dense twin": dense_twin(moe_cfg)}
        steps = {}
        for name, cfg in configs.items():
            torch.manual_seed(0)
            steps[name] = make_step(Transformer(cfg), config, batches)
        timed = time_interleaved(steps, repeats=args.rounds, warmup=2)
    # (wall, cpu) seconds where the helper also measures process CPU time, else wall only.
    times, cpu_times = timed if isinstance(timed, tuple) else (timed, None)

    tokens = config.batch_size * config.seq_len
    rows, result = [], {}
    for name, cfg in configs.items():
        t = median(times[name])
        total, active = count_parameters(cfg)
        gflop = 3 * flops_per_token(cfg, config.seq_len).total * tokens / 1e9
        rows.append(
            [
                name,
                f"{total / 1e6:.2f}M",
                f"{active / 1e6:.2f}M",
                fmt_ms(t),
                f"{tokens / t:.0f}",
                f"{gflop / t:.2f}",
            ]  # fmt: skip
        )
        result[name.replace(" ", "_")] = {"step_s": t, "tokens_per_s": tokens / t}
    ratio = result["moe"]["tokens_per_s"] / result["dense_twin"]["tokens_per_s"]
    cpu_ratio = None
    if cpu_times is not None:
        cpu_ratio = median(cpu_times["dense twin"]) / median(cpu_times["moe"])
    print(
        f"training step, preset {args.preset}, batch {config.batch_size} x {config.seq_len} "
        f"byte tokens, fp32, {args.threads} threads, median of {args.rounds} interleaved rounds"
    )
    print(f"machine: {machine()}")
    print_table(["model", "params", "active", "step ms", "tokens/s", "GFLOP/s"], rows)
    print(f"MoE / dense twin throughput: {ratio:.2f}x (target >= 0.90)")
    if cpu_ratio is not None:
        print(f"by process CPU time (less sensitive to other load): {cpu_ratio:.2f}x")
    print(f"runtime {time.perf_counter() - started:.1f} s")
    emit_json(
        {
            "benchmark": "train",
            "preset": args.preset,
            "batch_size": config.batch_size,
            "seq_len": config.seq_len,
            "threads": args.threads,
            "rounds": args.rounds,
            "ratio_moe_over_dense": ratio,
            "cpu_time_ratio_moe_over_dense": cpu_ratio,
            **result,
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
