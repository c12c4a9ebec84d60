"""Experts split across threads (moekit.fused_experts, split=True) equal the reference.

Shapes: T tokens, D model dim, F expert hidden, E experts, A assignments.
Odd sizes, float64, forward and every gradient, against ExpertBank.forward_expert with
plain autograd gather and index_add; the split result must not depend on thread timing.
"""

from __future__ import annotations

import pytest
import torch
from fused_common import reference_combined
from torch.testing import assert_close

import moekit.fused_experts as fused_experts_module
from moekit import MoEConfig
from moekit.expert_threads import auto_split, expert_groups
from moekit.experts import ExpertBank
from moekit.fused_experts import fused_experts

D, F, E, T = 24, 40, 7, 13


def _bank(activation: str, d_ff: int = F) -> ExpertBank:
    cfg = MoEConfig(d_model=D, d_ff=d_ff, num_experts=E, top_k=3, activation=activation)
    return ExpertBank(cfg).double()


def _combined(bank, x, rows, weight, counts, split):
    w = bank.w_gate_EFD
    return fused_experts(x, w, bank.w_up_EFD, bank.w_down_EDF, counts, rows, weight, split=split)


def _case(counts, seed=0):
    torch.manual_seed(seed)
    rows = torch.cat([torch.randperm(T)[:n] for n in counts])
    weight = (torch.rand(len(rows), dtype=torch.float64) + 0.1).requires_grad_(True)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    return rows, weight, x, torch.randn(T, D, dtype=torch.float64)


# The router weights scale whichever of h [N, F] and y [N, D] is narrower: both branches.
@pytest.mark.parametrize("d_ff", [F, 8], ids=["D<F", "D>F"])
@pytest.mark.parametrize("keep_rows", [True, False], ids=["rows-kept", "rows-gathered"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 2, 7, 1, 4], [T, 0, 0, 0, 0, 0, 2]])
def test_split_combined_equals_reference(activation, counts, keep_rows, monkeypatch, d_ff):
    if not keep_rows:  # large layers gather x's rows again in backward
        monkeypatch.setattr(fused_experts_module, "_KEEP_ROWS_BYTES", 0)
    bank = _bank(activation, d_ff)
    rows, weight, x, g = _case(counts)
    inputs = [x, weight, *bank.parameters()]
    y_ref = reference_combined(bank, x, rows, weight, counts)
    y = _combined(bank, x, rows, weight, counts, split=True)
    assert_close(y, y_ref)
    got = torch.autograd.grad((y * g).sum(), inputs)
    want = torch.autograd.grad((y_ref * g).sum(), inputs, allow_unused=True)
    for a, b, i in zip(got, want, inputs, strict=True):
        assert_close(a, torch.zeros_like(i) if b is None else b)
    with torch.no_grad():
        assert_close(_combined(bank, x, rows, weight, counts, split=True), y_ref)
    # Inference mode is per thread too: the workers update the caller's inference tensors.
    with torch.inference_mode():
        assert_close(_combined(bank, x, rows, weight, counts, split=True), y_ref.detach())


def test_split_grouped_rows_equal_reference():
    bank = _bank("swiglu")
    counts = [4, 0, 1, 6, 2, 3, 5]
    x = torch.randn(sum(counts), D, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(x)
    y = fused_experts(x, bank.w_gate_EFD, bank.w_up_EFD, bank.w_down_EDF, counts, split=True)
    y_ref = torch.cat([bank.forward_expert(e, c) for e, c in enumerate(x.split(counts))])
    assert_close(y, y_ref)
    inputs = [x, *bank.parameters()]
    got = torch.autograd.grad((y * g).sum(), inputs)
    want = torch.autograd.grad((y_ref * g).sum(), inputs, allow_unused=True)
    for a, b, i in zip(got, want, inputs, strict=True):
        assert_close(a, torch.zeros_like(i) if b is None else b)


def test_split_is_deterministic_and_restores_threads():
    bank = _bank("swiglu").float()
    counts = [5, 9, 2, 8, 1, 6, 4]
    rows, weight, x, g = _case(counts, seed=3)
    x, weight, g = x.float().detach(), weight.float().detach(), g.float()
    x.requires_grad_(True)
    threads = torch.get_num_threads()
    runs = []
    for _ in range(2):
        y = _combined(bank, x, rows, weight, counts, split=True)
        runs.append([y, *torch.autograd.grad((y * g).sum(), [x, *bank.parameters()])])
    assert torch.get_num_threads() == threads
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    # Grouping changes only the order in which token rows are summed: fp32 rounding.
    y_plain = _combined(bank, x, rows, weight, counts, split=False)
    assert_close(runs[0][0], y_plain, rtol=1e-5, atol=1e-5)


def test_groups_balance_rows_and_keep_expert_order():
    counts = [100, 0, 10, 10, 10, 70, 0, 0]
    groups = expert_groups(counts, True, D, F)
    assert groups == [[0], [2, 3, 4, 5]]
    assert expert_groups(counts, False, D, F) == [[0, 2, 3, 4, 5]]
    assert expert_groups([0, 0, 3], True, D, F) == [[2]]


def test_auto_split_by_regime():
    busy64 = list(range(64))
    # fine regime: 64 experts of ~512 rows x 1024 x 704 split; coarse and tiny do not.
    assert auto_split([512] * 64, busy64, 2, 1024, 704)
    assert not auto_split([1024] * 8, list(range(8)), 2, 1024, 2816)
    assert not auto_split([1024] * 8, list(range(8)), 2, 128, 128)
    # many experts of wide weights split; narrow ones or few experts do not, however many
    # rows (the tiny preset at batch 64 x 256, the small preset, 16 mid-sized experts).
    busy32 = list(range(32))
    assert auto_split([1024] * 32, busy32, 2, 768, 512)
    assert not auto_split([4096] * 8, list(range(8)), 2, 128, 128)
    assert not auto_split([2048] * 32, busy32, 2, 256, 256)
    assert not auto_split([1024] * 16, list(range(16)), 2, 1024, 704)
    # decoding: a few rows per expert; one thread: never.
    assert not auto_split([2] * 8, list(range(8)), 2, 1024, 2816)
    assert not auto_split([512] * 64, busy64, 1, 1024, 704)


def test_worker_error_reaches_caller():
    bank = _bank("swiglu")
    counts = [3, 0, 5, 2, 7, 1, 4]
    rows, weight, x, _ = _case(counts)
    bad = rows.clone()
    bad[-1] = T + 5  # out of range, in the last expert: the worker thread's group
    threads = torch.get_num_threads()
    with pytest.raises(IndexError, match="index out of range"), torch.no_grad():
        _combined(bank, x, bad, weight, counts, split=True)
    assert torch.get_num_threads() == threads
