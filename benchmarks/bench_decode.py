"""Sampling speed: a preset against its dense twin, token by token with the KV cache.

`moekit.generate` as `moekit sample` runs it: a prompt of 16 byte tokens, then --new
tokens sampled one at a time (temperature 1, seed 0), for a batch of 1 and of 8 prompts.
fp32 on CPU, a fixed thread count (1 unless --threads: decoding a small model is a chain
of tiny ops that a second thread hardly helps). Both models have random weights (speed
does not depend on them) and the same active FLOPs per token; the ratio is the dense
twin's ms per token over the MoE's, from interleaved rounds in one process. "ms per token"
is a whole `generate` call (the prompt's pass and the --new steps) over --new.

    python benchmarks/bench_decode.py               # tiny preset
    python benchmarks/bench_decode.py --quick       # a few tokens (the smoke test)
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import (
    emit_json,
    fill_defaults,
    machine,
    median,
    positive_int,
    print_table,
    set_threads,
    time_interleaved,
    trainable_presets,
)

from moekit.generate import generate
from moekit.model import Transformer, dense_twin, get_preset

PROMPT = 16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=trainable_presets())
    p.add_argument(
        "--new", type=positive_int, help="tokens sampled per call (default 128, quick 8)"
    )
    p.add_argument("--rounds", type=positive_int, help="timed rounds (default 5, quick 2)")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--quick", action="store_true", help="a smoke test: 8 new tokens, 2 rounds")
    args = p.parse_args()
    fill_defaults(args, new=(128, 8), rounds=(5, 2))
    set_threads(args.threads)
    moe_cfg = get_preset(args.preset)
    if PROMPT + args.new > moe_cfg.max_seq_len:
        p.error(f"--new: {PROMPT} + {args.new} tokens exceed max_seq_len {moe_cfg.max_seq_len}")
    started = time.perf_counter()
    models = {}
    for name, cfg in (("moe", moe_cfg), ("dense twin", dense_twin(moe_cfg))):
        torch.manual_seed(0)
        models[name] = Transformer(cfg).eval()
    results = []
    for batch in (1, 8):
        prompt = torch.randint(0, moe_cfg.vocab_size, (batch, PROMPT))
        cases = {
            name: lambda m=model, p=prompt: generate(m, p, args.new, seed=0)
            for name, model in models.items()
        }
        wall, _ = time_interleaved(cases, args.rounds, warmup=1)
        ms = {name: median(t) / args.new * 1e3 for name, t in wall.items()}
        results.append(
            {
                "batch": batch,
                "moe_ms_per_token": ms["moe"],
                "dense_ms_per_token": ms["dense twin"],
                "ratio_moe_over_dense": ms["dense twin"] / ms["moe"],
            }
        )
    print(
        f"sampling, preset {args.preset}, prompt {PROMPT} + {args.new} new tokens, fp32, "
        f"{args.threads} thread(s), median of {args.rounds} interleaved rounds"
    )
    rows = [
        [
            r["batch"],
            f"{r['moe_ms_per_token']:.2f}",
            f"{r['dense_ms_per_token']:.2f}",
            f"{r['ratio_moe_over_dense']:.2f}x",
        ]
        for r in results
    ]
    print_table(["batch", "MoE ms/new token", "dense ms/new token", "MoE / dense speed"], rows)
    runtime = time.perf_counter() - started
    print(f"runtime {runtime:.1f} s")
    emit_json(
        {
            "benchmark": "decode",
            "preset": args.preset,
            "new_tokens": args.new,
            "rounds": args.rounds,
            "quick": args.quick,
            "results": results,
            "machine": machine(),
            "runtime_s": runtime,
        }
    )


if __name__ == "__main__":
    main()
