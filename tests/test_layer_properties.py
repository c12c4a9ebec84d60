"""Property tests over random shapes, routers and both implementations.

Shapes: B batch, S sequence, T tokens, D model dim, F expert hidden, E experts, K top-k.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from moekit import MoE, MoEConfig
from moekit.config import ROUTER_NAMES

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


@st.composite
def layers(draw):
    E = draw(st.integers(1, 6))
    router = draw(st.sampled_from(ROUTER_NAMES))
    # Only softmax_topk and sigmoid_bias take norm_topk_prob=False (the others refuse it).
    renormalisable = router in ("softmax_topk", "sigmoid_bias")
    cfg = MoEConfig(
        d_model=draw(st.integers(1, 9)),
        d_ff=draw(st.integers(1, 7)),
        num_experts=E,
        top_k=draw(st.integers(1, E)),
        router=router,
        norm_topk_prob=draw(st.booleans()) if renormalisable else True,
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
        activation=draw(st.sampled_from(["swiglu", "gelu"])),
        impl=draw(st.sampled_from(["reference", "grouped"])),
        capacity_factor=draw(st.sampled_from([None, None, 0.5, 1.25])),
    )
    B, S = draw(st.integers(1, 3)), draw(st.integers(0, 6))
    masked = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return cfg, B, S, masked, seed


def _inputs(cfg: MoEConfig, B: int, S: int, masked: bool, seed: int):
    torch.manual_seed(seed)
    moe = MoE(cfg).double()
    x = torch.randn(B, S, cfg.d_model, dtype=torch.float64)
    mask = torch.rand(B, S) < 0.3 if masked else None
    return moe, x, mask


def _expected_weights(cfg: MoEConfig, logits_TE: torch.Tensor, ids_TK: torch.Tensor):
    """Combine weights as the config specifies them, for token-choice routers."""
    if cfg.router == "sigmoid_bias":
        w = logits_TE.sigmoid().gather(1, ids_TK)
    else:
        w = logits_TE.softmax(dim=-1).gather(1, ids_TK)
    if cfg.norm_topk_prob or cfg.router == "topk_softmax":
        w = w / w.sum(dim=-1, keepdim=True)
    return w * cfg.routed_scaling_factor


@SETTINGS
@given(layers())
def test_outputs_finite_and_paths_agree(case):
    cfg, B, S, masked, seed = case
    moe, x, mask = _inputs(cfg, B, S, masked, seed)
    y, out = moe(x, padding_mask=mask)
    assert y.shape == x.shape and torch.isfinite(y).all()
    for t in (out.loss, out.aux_loss, out.seq_aux_loss, out.z_loss, out.router_entropy):
        assert torch.isfinite(t)
    if mask is not None:
        assert torch.equal(y[mask], torch.zeros_like(y[mask]))
    other = MoE(cfg.replace(impl="grouped" if cfg.impl == "reference" else "reference"))
    other = other.double()
    other.load_state_dict(moe.state_dict())
    x_other = x.detach().clone().requires_grad_(True)
    y_other, out_other = other(x_other, padding_mask=mask)
    assert_close(y_other, y)
    # Backward too: the input's and every parameter's gradient of the output and the loss.
    x.requires_grad_(True)
    y, out = moe(x, padding_mask=mask)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum() + out.loss, [x, *moe.parameters()], allow_unused=True)
    grads_other = torch.autograd.grad(
        (y_other * g).sum() + out_other.loss, [x_other, *other.parameters()], allow_unused=True
    )
    for got, want in zip(grads_other, grads, strict=True):
        if got is None or want is None:  # nothing routed reaches this tensor in either path
            assert got is None or not got.any()
            assert want is None or not want.any()
        else:
            assert_close(got, want)


@SETTINGS
@given(layers())
def test_combine_weights_as_specified(case):
    cfg, B, S, masked, seed = case
    moe, x, _ = _inputs(cfg, B, S, masked, seed)
    x_TD = x.reshape(-1, cfg.d_model)
    T = x_TD.shape[0]
    routing = moe.router(x_TD)
    logits_TE = x_TD @ moe.router.weight.t()
    if cfg.router == "expert_choice":
        probs_TE = logits_TE.softmax(dim=-1)
        expected = probs_TE[routing.token_A, routing.expert_A] * cfg.routed_scaling_factor
        assert_close(routing.weight_A, expected)
        return
    ids_TK = routing.expert_A.view(T, cfg.top_k)
    expected_TK = _expected_weights(cfg, logits_TE, ids_TK)
    assert_close(routing.weight_A.view(T, cfg.top_k), expected_TK)
    if cfg.norm_topk_prob or cfg.router == "topk_softmax":
        sums = routing.weight_A.view(T, cfg.top_k).sum(-1)
        assert_close(sums, torch.full_like(sums, cfg.routed_scaling_factor))

    # Layer level: with every expert identical, y = (sum of a token's weights) * expert(x).
    if cfg.capacity_factor is None and T > 0:
        with torch.no_grad():
            for w in moe.experts.parameters():
                w.copy_(w[:1].expand_as(w))
        y, _ = moe(x)
        single = moe.experts.forward_expert(0, x_TD)
        assert_close(y.reshape(T, -1), expected_TK.sum(-1, keepdim=True) * single)


@SETTINGS
@given(layers())
def test_no_token_lost_when_dropless(case):
    cfg, B, S, masked, seed = case
    cfg = cfg.replace(capacity_factor=None)
    moe, x, mask = _inputs(cfg, B, S, masked, seed)
    _, out = moe(x, padding_mask=mask)
    real = torch.ones(B * S, dtype=torch.bool) if mask is None else ~mask.reshape(-1)
    T = int(real.sum())
    seen = torch.bincount(out.token_ids, minlength=B * S)
    assert (seen[~real] == 0).all(), "padding was routed"
    assert out.dropped_fraction == 0
    if cfg.router == "expert_choice":
        C = min(T, math.ceil(T * cfg.top_k / cfg.num_experts))
        assert torch.equal(out.tokens_per_expert, torch.full((cfg.num_experts,), float(C)))
    else:
        assert torch.equal(seen[real], torch.full((T,), cfg.top_k))
        # A token's K experts are distinct.
        pairs = out.token_ids * cfg.num_experts + out.expert_ids
        assert pairs.unique().numel() == pairs.numel()
        assert out.tokens_per_expert.sum().item() == T * cfg.top_k
