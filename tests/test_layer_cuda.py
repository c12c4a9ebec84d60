"""On CUDA the grouped path runs torch's grouped GEMM: it must equal the reference loop.

Shapes: B batch, S sequence, D model dim, F expert hidden, E experts, K top-k.
Skipped without a CUDA device (see conftest.py).
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from torch.testing import assert_close

from moekit import MoE, MoEConfig

pytestmark = pytest.mark.gpu

# bf16 keeps 8 bits of mantissa; the two paths accumulate in different orders.
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("capacity_factor", [None, 0.75], ids=["dropless", "capacity"])
def test_grouped_mm_equals_reference_on_cuda(dtype, capacity_factor):
    # D, F multiples of 16: grouped GEMM needs aligned strides; E and K stay odd.
    cfg = MoEConfig(
        d_model=64,
        d_ff=96,
        num_experts=5,
        top_k=3,
        capacity_factor=capacity_factor,
        num_shared_experts=1,
        impl="reference",
    )
    ref = MoE(cfg).cuda().to(dtype)
    fast = MoE(cfg.replace(impl="grouped")).cuda().to(dtype)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 17, 64, device="cuda", dtype=dtype)
    mask = torch.zeros(3, 17, dtype=torch.bool, device="cuda")
    mask[2, 9:] = True
    g = torch.randn_like(x)
    results = []
    for moe in (ref, fast):
        xi = x.clone().requires_grad_(True)
        y, out = moe(xi, padding_mask=mask)
        ((y * g).sum() + out.loss).backward()
        grads = {n: p.grad.float() for n, p in moe.named_parameters()}
        results.append((y.float(), xi.grad.float(), grads, out))
    (y_r, gx_r, grads_r, out_r), (y_f, gx_f, grads_f, out_f) = results
    tol = TOLERANCE[dtype]
    assert_close(y_f, y_r, **tol)
    assert_close(gx_f, gx_r, **tol)
    for name, grad in grads_r.items():
        assert_close(grads_f[name], grad, **tol, msg=lambda m, name=name: f"{name}: {m}")
    assert torch.equal(out_f.tokens_per_expert, out_r.tokens_per_expert)
    assert out_f.aux_loss.dtype == torch.float32


def _layer_step(moe: MoE, x: torch.Tensor) -> None:
    y, out = moe(x)
    (y.float().square().sum() + out.loss).backward()
    moe.update_bias(out.routed_tokens_per_expert)


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_bias", "expert_choice"])
def test_dropless_layer_never_waits_for_the_gpu(router):
    # A host synchronization drains the stream: the host can no longer queue kernels
    # ahead of the GPU, and launch time adds to compute time instead of hiding behind it.
    # Without capacity or padding nothing needs a number back from the GPU, so forward,
    # backward and the bias update must run with synchronizations made errors: bf16
    # weights, and fp32 weights under bf16 autocast (as `moekit train` runs). (torch's
    # fp32 grouped_mm is another kernel, outside this promise.)
    cfg = MoEConfig(d_model=64, d_ff=96, num_experts=5, top_k=2, router=router)
    fp32, bf16 = MoE(cfg).cuda(), MoE(cfg).cuda().to(torch.bfloat16)
    x = torch.randn(3, 17, 64, device="cuda", requires_grad=True)
    x16 = x.detach().to(torch.bfloat16).requires_grad_(True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    for moe, xi, context in ((bf16, x16, nullcontext()), (fp32, x, autocast)):
        with context:
            _layer_step(moe, xi)  # first calls may set up library state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with context:
                _layer_step(moe, xi)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _reference_and_grouped(cfg: MoEConfig) -> tuple[MoE, MoE]:
    """The same weights on CUDA behind the reference loop and the grouped path."""
    ref = MoE(cfg.replace(impl="reference")).cuda()
    fast = MoE(cfg.replace(impl="grouped")).cuda()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def test_grouped_mm_runs_in_bf16_under_autocast():
    # torch's autocast has no rule for grouped_mm: fp32 weights under bf16 autocast must
    # still give bf16 experts, as the reference path's nn.functional.linear does.
    ref, fast = _reference_and_grouped(MoEConfig(d_model=64, d_ff=96, num_experts=5, top_k=3))
    x = torch.randn(3, 17, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_ref, _ = ref(x)
        y, _ = fast(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert_close(y.float(), y_ref.float(), **TOLERANCE[torch.bfloat16])


def test_rows_grouped_mm_refuses_are_padded_not_looped():
    # grouped_mm needs rows of a multiple of 16 bytes: D=24, F=20 pass in fp32 (96 and
    # 80 bytes) but not in bf16 (48 and 40), as under autocast. They are zero-padded, so
    # the grouped path still runs (no loop over experts, no synchronization) and equals
    # the reference, forward and backward, weights included.
    ref, fast = _reference_and_grouped(MoEConfig(d_model=24, d_ff=20, num_experts=5, top_k=2))
    x = torch.randn(3, 17, 24, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert fast.experts.uses_grouped_mm(x)
        results = []
        for moe in (ref, fast):
            xi = x.clone().requires_grad_(True)
            y, out = moe(xi)
            (y.float().square().sum() + out.loss).backward()
            results.append((y, xi.grad, [p.grad for p in moe.experts.parameters()]))
    (y_r, gx_r, gw_r), (y_f, gx_f, gw_f) = results
    assert y_f.dtype == torch.bfloat16
    assert_close(y_f, y_r, **TOLERANCE[torch.bfloat16])
    assert_close(gx_f, gx_r, **TOLERANCE[torch.bfloat16])
    for got, want in zip(gw_f, gw_r, strict=True):
        assert got.shape == want.shape
        assert_close(got, want, **TOLERANCE[torch.bfloat16])
