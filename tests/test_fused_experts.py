"""The fused expert loop (moekit.fused_experts) equals the per-expert definition.

Shapes: T tokens, D model dim, F expert hidden, E experts, A assignments.
Odd sizes, float64, forward and every gradient, against ExpertBank.forward_expert
composed with plain autograd gather and index_add (the reference path's arithmetic).
"""

from __future__ import annotations

import pytest
import torch
from fused_common import reference_combined
from torch.testing import assert_close

import moekit.fused_experts as fused_experts_module
from moekit import MoEConfig
from moekit.experts import ExpertBank
from moekit.fused_experts import fused_experts

D, F, E, T = 24, 40, 5, 13


def _bank(activation: str, d_ff: int = F) -> ExpertBank:
    cfg = MoEConfig(d_model=D, d_ff=d_ff, num_experts=E, top_k=3, activation=activation)
    return ExpertBank(cfg).double()


def _assignments(counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows grouped by expert (repeats allowed across experts) and combine weights."""
    rows = torch.cat([torch.randperm(T)[:n] for n in counts])
    return rows, torch.rand(len(rows), dtype=torch.float64) + 0.1


def _grads(y, g, inputs):
    if not y.requires_grad:  # the reference with no assignments at all
        return [torch.zeros_like(i) for i in inputs]
    grads = torch.autograd.grad((y * g).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(i) if gr is None else gr for i, gr in zip(inputs, grads, strict=True)]


# The router weights scale whichever of h [N, F] and y [N, D] is narrower: both branches.
@pytest.mark.parametrize("d_ff", [F, 8], ids=["D<F", "D>F"])
@pytest.mark.parametrize("keep_rows", [True, False], ids=["rows-kept", "rows-gathered"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 2, 7], [0, 0, 0, 0, 0], [T, 1, 0, 0, 4]])
def test_combined_equals_reference(activation, counts, keep_rows, monkeypatch, d_ff):
    if not keep_rows:  # large layers gather x's rows again in backward
        monkeypatch.setattr(fused_experts_module, "_KEEP_ROWS_BYTES", 0)
    bank = _bank(activation, d_ff)
    rows, weight = _assignments(counts)
    weight.requires_grad_(True)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(T, D, dtype=torch.float64)
    inputs = [x, weight, *bank.parameters()]
    y_ref = reference_combined(bank, x, rows, weight, counts)
    y = bank.forward_combined(x, rows, weight, torch.tensor(counts))
    assert_close(y, y_ref)
    for got, want in zip(_grads(y, g, inputs), _grads(y_ref, g, inputs), strict=True):
        assert_close(got, want)
    if sum(counts):
        assert y_ref.abs().amax() > 1e-3
    else:
        # No assignments: gradients are zeros, not None, so optimizers see every weight.
        assert all(p.grad is None for p in bank.parameters())
        bank.forward_combined(x, rows, weight, torch.tensor(counts)).sum().backward()
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in bank.parameters())


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_rows_equal_reference(activation):
    bank = _bank(activation)
    counts = [4, 0, 1, 6, 2]
    x = torch.randn(sum(counts), D, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(x)
    y = bank.forward_grouped(x, torch.tensor(counts))
    y_ref = torch.cat([bank.forward_expert(e, c) for e, c in enumerate(x.split(counts))])
    assert_close(y, y_ref)
    inputs = [x, *bank.parameters()]
    for got, want in zip(_grads(y, g, inputs), _grads(y_ref, g, inputs), strict=True):
        assert_close(got, want)


@pytest.mark.parametrize("pad_to", [None, 32], ids=["as_is", "padded"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_mm_arithmetic_equals_reference(activation, pad_to, monkeypatch):
    # The CUDA path's arithmetic (grouped GEMM over transposed [out, in] weights), run
    # forward on CPU where torch has it, so its shapes and transposes are checked off CUDA.
    # On CUDA, D and F that grouped_mm refuses are zero-padded to 16-byte rows; padding
    # every row here (to a multiple of 32 elements: D 24 -> 32, F 40 -> 64) runs that
    # arithmetic too.
    if not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("torch has no grouped_mm")
    padded = []
    if pad_to is not None:
        import moekit.experts as experts_module

        def aligned(n: int, dtype: torch.dtype) -> int:
            padded.append(n)
            return -(-n // pad_to) * pad_to

        monkeypatch.setattr(experts_module, "_aligned", aligned)
    bank = _bank(activation).float()
    counts = [4, 0, 1, 6, 2]
    x = torch.randn(sum(counts), D)
    with torch.no_grad():
        y = bank.grouped_mm_experts(x, torch.tensor(counts))
        y_ref = torch.cat([bank.forward_expert(e, c) for e, c in enumerate(x.split(counts))])
    assert sorted(padded) == ([] if pad_to is None else [D, F])
    assert y.shape == y_ref.shape == (sum(counts), D)
    assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert y_ref.abs().amax() > 1e-3


def test_grouped_mm_runs_in_the_autocast_dtype():
    # torch's autocast has no rule for grouped_mm: under bf16 autocast the grouped path
    # must cast itself, as nn.Linear (and so the reference path's experts) is cast.
    # Checked under CPU autocast, where torch has grouped_mm's forward.
    if not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("torch has no grouped_mm")
    bank = _bank("swiglu").float()
    counts = [4, 0, 1, 6, 2]
    x = torch.randn(sum(counts), D)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = bank.grouped_mm_experts(x, torch.tensor(counts))
        y_ref = torch.cat([bank.forward_expert(e, c) for e, c in enumerate(x.split(counts))])
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        assert bank.grouped_mm_experts(x, torch.tensor(counts)).dtype == torch.float32


def test_partial_requires_grad_and_no_grad_agree():
    bank = _bank("swiglu")
    counts = [2, 3, 0, 4, 1]
    rows, weight = _assignments(counts)
    x = torch.randn(T, D, dtype=torch.float64)
    # Only the down projection trains: x and the combine weights are constants.
    for p in bank.parameters():
        p.requires_grad_(p is bank.w_down_EDF)
    y = bank.forward_combined(x, rows, weight, torch.tensor(counts))
    (grad,) = torch.autograd.grad(y.square().sum(), [bank.w_down_EDF])
    y_ref = reference_combined(bank, x, rows, weight, counts)
    (grad_ref,) = torch.autograd.grad(y_ref.square().sum(), [bank.w_down_EDF])
    assert_close(grad, grad_ref)
    with torch.no_grad():
        assert_close(bank.forward_combined(x, rows, weight, torch.tensor(counts)), y_ref)


def test_float32_matches_float64_reference():
    # The fp32 benchmark dtype: the fused arithmetic must stay within fp32 rounding.
    bank = _bank("swiglu")
    counts = [3, 1, 4, 1, 5]
    rows, weight = _assignments(counts)
    x = torch.randn(T, D, dtype=torch.float64)
    y_ref = reference_combined(bank, x, rows, weight, counts)
    y = bank.float().forward_combined(x.float(), rows, weight.float(), torch.tensor(counts))
    assert_close(y, y_ref.float(), rtol=1e-5, atol=1e-5)


def test_weights_without_rows_rejected():
    bank = _bank("swiglu")
    x = torch.randn(4, D, dtype=torch.float64)
    w = torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="weight_A needs rows_A"):
        fused_experts(x, bank.w_gate_EFD, bank.w_up_EFD, bank.w_down_EDF, [4, 0, 0, 0, 0], None, w)
