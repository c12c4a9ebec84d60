"""Expert parallelism over NCCL against one process, on every GPU of this machine.

    torchrun --standalone --nproc-per-node NUM_GPUS scripts/nccl_check.py
    torchrun --standalone --nproc-per-node 2 scripts/nccl_check.py --backend gloo   # on CPU

Shapes: B batch, S sequence, D model dim, E experts, W ranks (one per GPU).

Every rank builds the same layer and global batch from a seed, runs its rows [rank*B/W,
(rank+1)*B/W) through the expert-parallel layer (all-to-all over NCCL, with counts that
differ per rank and an expert that gets no tokens), and compares its output, input
gradient and its experts' weight gradients with the full layer run on the whole batch on
its own GPU, in float32. A world of one still goes through the all-to-all path and its
NCCL collectives. Prints one line per rank and exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from moekit import MoE, MoEConfig
from moekit.parallel import apply_expert_parallel, close_distributed, init_distributed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    backend = p.parse_args().backend
    init_distributed(backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = backend == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    cfg = MoEConfig(d_model=64, d_ff=96, num_experts=4 * world, top_k=2)
    B, S = 2 * world, 9
    torch.manual_seed(0)
    full = MoE(cfg).to(device)
    x = torch.randn(B, S, cfg.d_model, device=device)
    g = torch.randn(B, S, cfg.d_model, device=device)
    with torch.no_grad():
        # Feature 0 large and positive, and the last expert's router weight on it very
        # negative: that expert receives no token.
        x[..., 0] = 3.0 + x[..., 0].abs()
        full.router.weight[-1, 0] = -20.0
    # Each rank's loss includes the group-wide balancing loss once: W of them in all.
    x_full = x.clone().requires_grad_(True)
    y_full, out_full = full(x_full)
    ((y_full * g).sum() + world * out_full.loss).backward()

    sharded = MoE(cfg).to(device)
    sharded.load_state_dict(full.state_dict())
    apply_expert_parallel(sharded)
    rows = slice(rank * B // world, (rank + 1) * B // world)
    x_local = x[rows].clone().requires_grad_(True)
    y, out = sharded(x_local)
    ((y * g[rows]).sum() + out.loss).backward()
    if cuda:
        torch.cuda.synchronize()

    bank = sharded.experts
    local = slice(bank.expert_offset, bank.expert_offset + bank.num_experts)
    errors = {
        "y": (y - y_full[rows]).abs().max().item(),
        "dx": (x_local.grad - x_full.grad[rows]).abs().max().item(),
        "loss": (out.loss - out_full.loss).abs().item(),
    }
    for name, p in bank.named_parameters():
        want = getattr(full.experts, name).grad[local]
        errors[f"d{name}"] = (p.grad - want).abs().max().item()
    starved = int(out_full.tokens_per_expert[-1].item())
    ok = starved == 0 and all(err <= 1e-4 for err in errors.values())
    shown = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    where = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(
        f"rank {rank}/{world} ({backend}, {where}), tokens of expert {cfg.num_experts - 1}: "
        f"{starved}; max |diff| {shown}"
    )
    print(f"rank {rank}: {'ok' if ok else 'MISMATCH'}", flush=True)
    close_distributed()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
