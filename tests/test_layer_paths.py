"""The grouped fast path equals the reference loop, forward and backward; degenerate inputs.

Shapes: B batch, S sequence, T tokens, D model dim, F expert hidden, E experts, K top-k.
Odd sizes (D=24, F=40, E=5, K=3) so transposes and off-by-ones show; float64 throughout.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from moekit import MoE, MoEConfig
from moekit.config import ROUTER_NAMES
from moekit.mlp import MLP

BASE = dict(d_model=24, d_ff=40, num_experts=5, top_k=3, seq_aux_loss_coef=0.1)


def _twins(**changes) -> tuple[MoE, MoE]:
    """A reference and a grouped layer with identical float64 weights."""
    cfg = MoEConfig(**{**BASE, **changes}, impl="reference")
    ref = MoE(cfg).double()
    fast = MoE(cfg.replace(impl="grouped")).double()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _run(moe: MoE, x: torch.Tensor, mask: torch.Tensor | None, g: torch.Tensor):
    """Forward, then backward of a random projection of y plus the balancing loss."""
    x = x.clone().requires_grad_(True)
    moe.zero_grad(set_to_none=True)
    y, out = moe(x, padding_mask=mask)
    ((y * g).sum() + out.loss).backward()
    grads = {n: p.grad for n, p in moe.named_parameters()}
    return y, out, x.grad, grads


def _assert_paths_equal(ref: MoE, fast: MoE, x: torch.Tensor, mask: torch.Tensor | None) -> None:
    g = torch.randn_like(x)
    y_r, out_r, gx_r, grads_r = _run(ref, x, mask, g)
    y_f, out_f, gx_f, grads_f = _run(fast, x, mask, g)
    assert_close(y_f, y_r)
    assert_close(gx_f, gx_r)
    if mask is not None:
        assert torch.equal(y_r[mask], torch.zeros_like(y_r[mask]))
        assert torch.equal(gx_r[mask], torch.zeros_like(gx_r[mask]))
    assert grads_f.keys() == grads_r.keys()
    for name, grad in grads_r.items():
        assert grad is not None and grads_f[name] is not None, name
        assert_close(grads_f[name], grad, msg=lambda m, name=name: f"{name}: {m}")
    assert_close(out_f.loss, out_r.loss)
    assert torch.equal(out_f.tokens_per_expert, out_r.tokens_per_expert)
    assert_close(out_f.dropped_fraction, out_r.dropped_fraction)
    # The output must depend on the experts at all: guards against a path returning zeros.
    assert y_r.abs().amax() > 1e-3


def _padding_mask(B: int, S: int) -> torch.Tensor:
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[0, -2:] = True  # right padding
    mask[1, :3] = True  # left padding
    return mask


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("capacity_factor", [None, 0.6], ids=["dropless", "capacity"])
@pytest.mark.parametrize("router", ROUTER_NAMES)
def test_grouped_equals_reference(router, capacity_factor, masked):
    extra = dict(routed_scaling_factor=2.5) if router == "sigmoid_bias" else {}
    ref, fast = _twins(router=router, capacity_factor=capacity_factor, **extra)
    B, S = 2, 7
    x = torch.randn(B, S, 24, dtype=torch.float64)
    mask = _padding_mask(B, S) if masked else None
    if capacity_factor is not None:
        _, out = ref(x, padding_mask=mask)
        if router != "expert_choice":
            assert out.dropped_fraction > 0, "the capacity case must actually drop"
    _assert_paths_equal(ref, fast, x, mask)


@pytest.mark.parametrize(
    "routing",
    [
        dict(router="softmax_topk"),
        dict(router="sigmoid_bias", num_groups=5, topk_groups=3, routed_scaling_factor=2.0),
    ],
    ids=["softmax_topk", "sigmoid_bias-groups"],
)
def test_grouped_equals_reference_gelu_shared_gate(routing):
    ref, fast = _twins(
        **routing,
        activation="gelu",
        num_shared_experts=2,
        shared_d_ff=12,
        shared_expert_gate=True,
        capacity_factor=0.8,
    )
    assert fast.shared_experts is not None and fast.shared_expert_gate is not None
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[2, 1:] = True
    _assert_paths_equal(ref, fast, x, mask)


@pytest.mark.parametrize("impl", ["reference", "grouped"])
def test_swiglu_shared_experts_add_the_gated_mlp(impl):
    cfg = MoEConfig(**BASE, num_shared_experts=1, shared_expert_gate=True, impl=impl)
    moe = MoE(cfg).double()
    x = torch.randn(9, 24, dtype=torch.float64)
    y, _ = moe(x)
    routed_only = MoE(cfg.replace(num_shared_experts=0, shared_expert_gate=False)).double()
    routed_only.load_state_dict(moe.state_dict(), strict=False)
    y_routed, _ = routed_only(x)
    shared = moe.shared_experts(x) * torch.sigmoid(moe.shared_expert_gate(x))
    assert_close(y, y_routed + shared)


@pytest.mark.parametrize("impl", ["reference", "grouped"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_one_expert_top1_equals_dense_mlp(activation, impl):
    D, Fh = 24, 40
    moe = MoE(MoEConfig(D, Fh, num_experts=1, top_k=1, activation=activation, impl=impl))
    moe = moe.double()
    mlp = MLP(D, Fh, activation).double()
    with torch.no_grad():
        # ExpertBank stores each expert as nn.Linear does: [out, in].
        if activation == "swiglu":
            mlp.gate_proj.weight.copy_(moe.experts.w_gate_EFD[0])
        mlp.up_proj.weight.copy_(moe.experts.w_up_EFD[0])
        mlp.down_proj.weight.copy_(moe.experts.w_down_EDF[0])
    x = torch.randn(2, 5, D, dtype=torch.float64)
    g = torch.randn_like(x)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_moe, _ = moe(x1)
    y_mlp = mlp(x2)
    assert_close(y_moe, y_mlp)
    (y_moe * g).sum().backward()
    (y_mlp * g).sum().backward()
    assert_close(x1.grad, x2.grad)
    assert_close(moe.experts.w_up_EFD.grad[0], mlp.up_proj.weight.grad)
    assert_close(moe.experts.w_down_EDF.grad[0], mlp.down_proj.weight.grad)
    if activation == "swiglu":
        assert_close(moe.experts.w_gate_EFD.grad[0], mlp.gate_proj.weight.grad)


NO_REAL_TOKENS = {
    "empty": lambda D: (torch.zeros(0, D, dtype=torch.float64), None),
    "empty3d": lambda D: (torch.zeros(2, 0, D, dtype=torch.float64), None),
    "allpad": lambda D: (torch.randn(2, 3, D, dtype=torch.float64), torch.ones(2, 3, dtype=bool)),
}


@pytest.mark.parametrize("router", ROUTER_NAMES)
@pytest.mark.parametrize("impl", ["reference", "grouped"])
@pytest.mark.parametrize("case", NO_REAL_TOKENS)
def test_no_real_tokens(case, impl, router):
    x, mask = NO_REAL_TOKENS[case](BASE["d_model"])
    moe = MoE(
        MoEConfig(**BASE, router=router, impl=impl, num_shared_experts=1, capacity_factor=1.0)
    ).double()
    x = x.clone().requires_grad_(True)
    y, out = moe(x, padding_mask=mask)
    assert y.shape == x.shape
    assert torch.equal(y, torch.zeros_like(y))
    for loss in (out.loss, out.aux_loss, out.seq_aux_loss, out.z_loss, out.router_entropy):
        assert torch.isfinite(loss).all()
    assert out.dropped_fraction == 0
    assert out.tokens_per_expert.sum() == 0 and out.token_ids.numel() == 0
    (y.sum() + out.loss).backward()
    for name, p in moe.named_parameters():
        # Optimizers and gradient all-reduce need every grad present, even for no tokens.
        assert p.grad is not None, name
        assert torch.equal(p.grad, torch.zeros_like(p)), name
    assert torch.equal(x.grad, torch.zeros_like(x))
    # The output alone reaches the router too (its combine weights), without the losses.
    moe.zero_grad(set_to_none=True)
    moe(x, padding_mask=mask)[0].sum().backward()
    assert torch.equal(moe.router.weight.grad, torch.zeros_like(moe.router.weight))


@pytest.mark.parametrize("router", ROUTER_NAMES)
def test_router_arithmetic_is_float32_for_bf16(router):
    cfg = MoEConfig(**BASE, router=router)
    moe = MoE(cfg).to(torch.bfloat16)
    x = torch.randn(4, 6, 24, dtype=torch.bfloat16)
    routing = moe.router(x.reshape(-1, 24))
    assert routing.logits_TE.dtype == torch.float32
    assert routing.probs_TE.dtype == torch.float32
    assert routing.weight_A.dtype == torch.float32
    # The float32 logits are those of the bf16 values, computed without rounding to bf16.
    expected = F.linear(x.reshape(-1, 24).float(), moe.router.weight.float())
    assert_close(routing.logits_TE, expected)
    y, out = moe(x)
    assert y.dtype == torch.bfloat16
    assert out.z_loss.dtype == torch.float32 and out.aux_loss.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(out.loss)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_equals_reference_under_bf16_autocast(activation):
    # Under autocast the experts compute in bf16 on every path, with fp32 weights: the
    # fused CPU loop (also the fallback under expert parallelism on CUDA where grouped_mm
    # refuses the shapes) casts as autocast casts nn.Linear, and returns what the
    # reference returns. Router arithmetic stays float32, so both route alike.
    cfg = MoEConfig(**BASE, activation=activation, impl="reference")
    ref, fast = MoE(cfg), MoE(cfg.replace(impl="grouped"))
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 24)
    g = torch.randn(2, 9, 24)
    results = []
    for moe in (ref, fast):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, out = moe(xi)
        ((y.float() * g).sum() + out.loss).backward()
        results.append((y, xi.grad, {n: p.grad for n, p in moe.named_parameters()}))
    (y_r, gx_r, grads_r), (y_f, gx_f, grads_f) = results
    assert y_r.dtype == y_f.dtype == torch.bfloat16

    def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
        # bf16 keeps 8 bits: compare whole tensors, summed in different orders, by norm.
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert rel_err(y_f, y_r) < 1e-2
    assert rel_err(gx_f, gx_r) < 1e-2
    for name, grad in grads_r.items():
        assert grads_f[name].dtype == torch.float32, name
        assert rel_err(grads_f[name], grad) < 2e-2, name


def test_torch_func_transforms_see_the_grouped_layer_as_the_reference():
    # torch.func needs autograd Functions written with setup_context; under a transform the
    # grouped path runs the reference loop, so grad and jvp give what autograd gives.
    ref, fast = _twins()
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    g = torch.randn_like(x)
    params = {n: p.detach() for n, p in fast.named_parameters()}

    def objective(p, x):
        y, out = torch.func.functional_call(fast, p, (x,))
        return (y * g).sum() + out.loss

    grads, gx = torch.func.grad(objective, argnums=(0, 1))(params, x)
    _, _, gx_r, grads_r = _run(ref, x, None, g)
    assert_close(gx, gx_r)
    for name, grad in grads_r.items():
        assert_close(grads[name], grad, msg=lambda m, name=name: f"{name}: {m}")
    tangent = torch.randn_like(x)
    _, dy = torch.func.jvp(lambda x: objective(params, x), (x,), (tangent,))
    assert_close(dy, (gx_r * tangent).sum())


def test_forward_mode_ad_sees_the_grouped_layer_as_the_reference():
    # The fused CPU loop has no forward derivative: with a tangent on its input the grouped
    # path runs the reference loop, whose tangent is the directional derivative.
    import torch.autograd.forward_ad as fwAD

    ref, fast = _twins()
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    g, tangent = torch.randn_like(x), torch.randn_like(x)
    _, _, gx_r, _ = _run(ref, x, None, g)
    with fwAD.dual_level():
        y, out = fast(fwAD.make_dual(x, tangent))
        d_objective = fwAD.unpack_dual((y * g).sum() + out.loss).tangent
    assert d_objective is not None
    assert_close(d_objective, (gx_r * tangent).sum())


def test_double_backward_is_exact_on_the_reference_path_and_refused_on_the_fused_one():
    # Gradient penalties differentiate the gradient: the reference loop supports it (checked
    # numerically), the fused CPU backward is once-differentiable and must say so rather
    # than return a second derivative that leaves out its own terms.
    torch.manual_seed(0)
    ref, fast = _twins(d_ff=6, num_experts=3, top_k=2)
    x = torch.randn(1, 3, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: ref(x)[0], (x,))
    # A constant upstream gradient (y.sum(), a Hessian of it) as well as one that carries a
    # graph: torch's once_differentiable let the first through, with the experts' second-
    # order terms left out (Hessian norm 0.007 against the reference's 1.6).
    for objective in (lambda y: y.square().sum(), lambda y: y.sum()):
        y, _ = fast(x)
        with pytest.raises(RuntimeError, match="cannot differentiate twice .* impl='reference'"):
            torch.autograd.grad(objective(y), x, create_graph=True)
    with pytest.raises(RuntimeError, match="cannot differentiate twice"):
        torch.autograd.functional.hessian(lambda x: fast(x)[0].sum(), x)
    # Once, as training differentiates, it runs as before.
    (gx,) = torch.autograd.grad(fast(x)[0].sum(), x)
    (gx_ref,) = torch.autograd.grad(ref(x)[0].sum(), x)
    assert_close(gx, gx_ref)


@pytest.mark.parametrize("router", ROUTER_NAMES)
def test_grouped_equals_reference_when_d_model_exceeds_d_ff(router):
    # The fused loop scales whichever of h [N, F] or y [N, D] is narrower by the router
    # weights: with D > F the other branch, in forward and in the down weight's gradient.
    ref, fast = _twins(d_ff=8, router=router)
    _assert_paths_equal(ref, fast, torch.randn(2, 7, 24, dtype=torch.float64), None)


def _expert_grads(impl: str, in_place: bool) -> list[torch.Tensor]:
    """Expert gradients of (h + y).sum() + loss, the residual written into h or not."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(**BASE, impl=impl)).to(torch.bfloat16)
    h = torch.randn(2, 3, BASE["d_model"], dtype=torch.bfloat16, requires_grad=True) * 1.0
    y, out = moe(h)
    h = h.add_(y) if in_place else h + y
    (h.float().sum() + out.loss).backward()
    return [p.grad.float() for p in moe.experts.parameters()]


def _inference_input_grads(impl: str, inference: bool) -> list[torch.Tensor]:
    """Expert gradients with a frozen router, from an input made in inference mode or not."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(**BASE, impl=impl))
    moe.router.weight.requires_grad_(False)
    x = torch.randn(2, 3, BASE["d_model"])
    if inference:
        with torch.inference_mode():
            x = x.clone()
        assert x.is_inference()
    moe(x)[0].sum().backward()
    return [p.grad for p in moe.experts.parameters()]


@pytest.mark.parametrize("impl", ["reference", "grouped"])
def test_the_layer_input_may_change_after_the_forward(impl):
    # Neither path keeps the input itself for backward at these sizes (the grouped path
    # keeps its gathered rows): an in-place residual on it after the forward, and an input
    # made under inference mode with a frozen router, train as the plain input does.
    in_place = _expert_grads(impl, in_place=True)
    for got, want in zip(in_place, _expert_grads(impl, in_place=False), strict=True):
        assert torch.equal(got, want)
    if impl != "reference":
        for got, want in zip(in_place, _expert_grads("reference", False), strict=True):
            assert_close(got, want, rtol=2e-2, atol=2e-2)
    plain = _inference_input_grads(impl, inference=False)
    assert all(g.abs().sum() > 0 for g in plain)
    for got, want in zip(_inference_input_grads(impl, inference=True), plain, strict=True):
        assert torch.equal(got, want)
