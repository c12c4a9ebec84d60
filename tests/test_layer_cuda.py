"""On CUDA the grouped path runs torch's grouped GEMM: it must equal the reference loop.

Shapes: B batch, S sequence, D model dim, F expert hidden, E experts, K top-k.
Skipped without a CUDA device (see conftest.py).
"""

from __future__ import annotations

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
