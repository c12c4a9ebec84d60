"""`moekit demo`: a short demonstration of the MoE layer (replaced by training once it lands)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded default")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit import MoE, MoEConfig

    torch.manual_seed(args.seed)
    moe = MoE(MoEConfig(d_model=64, d_ff=128, num_experts=8, top_k=2))
    x = torch.randn(4, 32, 64)
    y, out = moe(x)
    print(f"y {tuple(y.shape)}  aux loss {out.aux_loss.item():.4f}")
    print("tokens per expert:", out.tokens_per_expert.tolist())
    return 0
