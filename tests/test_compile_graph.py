"""torch.compile traces the dropless MoE layer as one graph.

A graph break splits a compiled step: on CUDA the host waits at each break, and under
compile='reduce-overhead' every piece is a CUDA graph of its own (the tiny preset's
compiled training step took 1.9x as long with one break per layer). The layer's CUDA path
(grouped GEMM) is traced here on CPU, where torch has grouped_mm's forward; dynamo only
traces, so no GPU is needed.
"""

from __future__ import annotations

import pytest
import torch

import moekit.experts as experts_module
from moekit import MoE, MoEConfig
from moekit.lazy import computed_once


@pytest.mark.slow
@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_bias", "expert_choice"])
def test_the_dropless_layer_compiles_without_a_graph_break(router, monkeypatch):
    if not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("torch has no grouped_mm")
    # The CUDA path on CPU; D=24, F=20 also take the padding to 16-byte rows in bf16.
    monkeypatch.setattr(experts_module, "_grouped_mm_supported", lambda x: True)
    moe = MoE(MoEConfig(d_model=24, d_ff=20, num_experts=5, top_k=2, router=router))
    x = torch.randn(2, 7, 24, requires_grad=True)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(moe)(x)
    reasons = [r.reason.splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


def test_computed_once_computes_on_first_read_only():
    calls = []

    class Holder:
        @computed_once
        def value(self) -> int:
            """The doc travels."""
            calls.append(1)
            return 42

    h = Holder()
    assert calls == []
    assert h.value == 42 and h.value == 42
    assert calls == [1]
    assert Holder().value == 42 and len(calls) == 2  # per instance
    assert Holder.value.__doc__ == "The doc travels."


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_statistic_read_under_no_grad_keeps_the_graph_when_compiled(backend):
    # Statistics are computed in the grad mode of the forward that made them, whatever the
    # reader's (moekit.routing_stats); inside a compiled function too.
    moe = MoE(MoEConfig(d_model=24, d_ff=20, num_experts=5, top_k=2))  # seq aux coef 0

    def forward_then_read(x):
        y, out = moe(x)
        with torch.no_grad():
            return y, out.seq_aux_loss

    torch._dynamo.reset()
    x = torch.randn(2, 7, 24)
    _, eager = forward_then_read(x)
    _, compiled = torch.compile(forward_then_read, backend=backend)(x)
    assert eager.requires_grad and compiled.requires_grad
    torch.testing.assert_close(compiled, eager)
    # The graph it keeps is the router's: the loss's gradient reaches the router weight.
    (grad,) = torch.autograd.grad(compiled, moe.router.weight)
    (want,) = torch.autograd.grad(eager, moe.router.weight)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, want)
