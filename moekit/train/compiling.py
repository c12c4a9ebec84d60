"""compile_forward: the training forward through torch.compile, ready for CUDA graphs."""

from __future__ import annotations

import torch


def compile_forward(model, mode: str):
    """The model's training forward, through torch.compile unless mode is "none".

    On CUDA the MoE step launches about twice the kernels of its dense twin and is bound
    by launching them (benchmarks/README.md); the dropless layer has no host
    synchronization, so a compiled step can run as one CUDA graph ("reduce-overhead").
    Evaluation and sampling stay eager.
    """
    if mode == "none":
        return model
    compiled = torch.compile(model, mode=None if mode == "default" else mode)
    if mode != "reduce-overhead":
        return compiled

    def forward(*args, **kwargs):
        # Each call begins a new iteration of CUDA-graph replays, as torch advises for
        # loops that call a compiled model more than once per step: the previous call's
        # outputs may then be overwritten (the loop copies what it keeps of them).
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    return forward
