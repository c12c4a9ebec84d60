"""Expert gradients and kept projections written into reused storage
(moekit.step_buffers) are never wrong.

Shapes: T tokens, D model dim, F expert hidden, E experts, A = T*K assignments.
Each test runs the CPU fast path (impl="grouped"), whose forward takes the gate and up
projections it keeps, and whose backward takes its weight gradients, from the bank's
StepBuffers, against a bank that holds nothing or against the reference path, in float64.
"""

from __future__ import annotations

import copy

import torch
from torch.testing import assert_close

import moekit.step_buffers as step_buffers_module
from moekit import MoE, MoEConfig
from moekit.experts import ExpertBank
from moekit.fused_experts import fused_experts
from moekit.step_buffers import StepBuffers

D, F, E, K, T = 24, 40, 5, 2, 17


def _moe(impl: str = "grouped") -> MoE:
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K, impl=impl)
    return MoE(cfg).double()


def _step(moe: MoE, seed: int) -> None:
    torch.manual_seed(seed)
    x = torch.randn(T, D, dtype=torch.float64)
    y, out = moe(x)
    torch.autograd.backward([y, out.loss], [torch.randn_like(y), None])


def _expert_grads(moe: MoE) -> list[torch.Tensor]:
    return [p.grad for p in moe.experts.parameters()]


def _clear(moe: MoE) -> None:
    for p in moe.parameters():
        p.grad = None


def test_storage_is_reused_once_gradients_are_dropped_and_values_match():
    moe, ref = _moe(), _moe("reference")
    _step(moe, 1)
    first = [g.data_ptr() for g in _expert_grads(moe)]
    _clear(moe)
    _step(moe, 2)
    assert [g.data_ptr() for g in _expert_grads(moe)] == first
    _step(ref, 2)
    for got, want in zip(_expert_grads(moe), _expert_grads(ref), strict=True):
        assert_close(got, want)


def test_kept_projections_are_reused_after_backward_and_values_match():
    moe, ref = _moe(), _moe("reference")
    held = moe.experts.step_buffers._held
    _step(moe, 1)
    first = {name: held[name].data_ptr() for name in ("gate_AF", "up_AF")}
    for seed in (2, 3):
        _clear(moe)
        _clear(ref)
        _step(moe, seed)
        _step(ref, seed)
        assert {name: held[name].data_ptr() for name in first} == first
        for got, want in zip(moe.parameters(), ref.parameters(), strict=True):
            assert_close(got.grad, want.grad)


def test_two_forwards_before_one_backward_keep_separate_projections():
    """The first graph still holds its projections when the second forward runs: the
    second must take new storage, or the first backward would read the second's."""
    moe, ref = _moe(), _moe("reference")
    _step(moe, 0)  # the holder now has projections to hand out
    _clear(moe)
    torch.manual_seed(5)
    xs = [torch.randn(T, D, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    gs = [torch.randn(T, D, dtype=torch.float64) for _ in range(2)]
    grads = {}
    for name, module in (("fast", moe), ("ref", ref)):
        outs = [module(x)[0] for x in xs]  # both graphs alive at once
        torch.autograd.backward(outs, gs)
        grads[name] = [x.grad.clone() for x in xs] + [p.grad for p in module.parameters()]
        for x in xs:
            x.grad = None
    for got, want in zip(grads["fast"], grads["ref"], strict=True):
        assert_close(got, want)


def test_a_gradient_kept_by_the_caller_is_never_overwritten():
    moe = _moe()
    _step(moe, 1)
    kept = moe.experts.w_up_EFD.grad
    view = moe.experts.w_down_EDF.grad[1]
    kept_before, view_before = kept.clone(), view.clone()
    _clear(moe)
    _step(moe, 2)
    assert torch.equal(kept, kept_before)
    assert torch.equal(view, view_before)
    for p, old in ((moe.experts.w_up_EFD, kept), (moe.experts.w_down_EDF, view)):
        assert p.grad.untyped_storage().data_ptr() != old.untyped_storage().data_ptr()


def test_gradients_left_attached_accumulate():
    """Without clearing (zero_grad(set_to_none=False) style), steps add up exactly."""
    moe, ref = _moe(), _moe("reference")
    _step(moe, 1)
    _step(moe, 2)
    for seed in (1, 2):
        _clear(ref)
        _step(ref, seed)
        if seed == 1:
            first = [g.clone() for g in _expert_grads(ref)]
    for got, a, b in zip(_expert_grads(moe), first, _expert_grads(ref), strict=True):
        assert_close(got, a + b)


def test_experts_without_rows_get_zero_in_reused_storage():
    """Expert 2 has rows in the first call and none in the second: its slice of the
    reused buffer must read zero, not the first call's values."""
    torch.manual_seed(0)
    bank = ExpertBank(MoEConfig(d_model=D, d_ff=F, num_experts=3, top_k=1)).double()
    buffers = StepBuffers()
    weights = list(bank.parameters())

    def grads(counts: list[int]) -> list[torch.Tensor]:
        x = torch.randn(sum(counts), D, dtype=torch.float64)
        y = fused_experts(x, *weights, counts, step_buffers=buffers)
        return list(torch.autograd.grad(y.square().sum(), weights))

    first = grads([3, 2, 4])
    ptrs = [g.data_ptr() for g in first]
    assert all(g[2].abs().sum() > 0 for g in first)
    del first
    second = grads([3, 2, 0])
    assert [g.data_ptr() for g in second] == ptrs
    for g in second:
        assert torch.equal(g[2], torch.zeros_like(g[2]))


def test_release_and_copies_hold_nothing():
    moe = _moe()
    _step(moe, 1)
    held = moe.experts.step_buffers
    projections = 2 * T * K * F * 8  # gate and up [A, F], float64
    assert held.nbytes == sum(p.numel() * 8 for p in moe.experts.parameters()) + projections
    twin = copy.deepcopy(moe)
    assert twin.experts.step_buffers.nbytes == 0
    _clear(twin)
    _step(twin, 1)
    for a, b in zip(_expert_grads(moe), _expert_grads(twin), strict=True):
        assert a.data_ptr() != b.data_ptr()
        assert torch.equal(a, b)
    held.release()
    assert held.nbytes == 0


def test_without_torchs_use_count_nothing_is_reused(monkeypatch):
    monkeypatch.setattr(step_buffers_module, "_storage_use_count", None)
    buffers = StepBuffers()
    like = torch.empty(4, 3)
    buffers.take("w", like)
    first = buffers._held["w"]
    buffers.take("w", like)
    assert buffers._held["w"] is not first


def test_a_free_buffer_is_handed_out_again():
    buffers = StepBuffers()
    like = torch.empty(4, 3)
    ptr = buffers.take("w", like).data_ptr()
    assert buffers.take("w", like).data_ptr() == ptr
    kept = buffers.take("w", like)
    assert buffers.take("w", like).data_ptr() != kept.data_ptr()
    assert buffers.take("w", torch.empty(5, 3)).shape == (5, 3)
