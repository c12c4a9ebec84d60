"""Balancing losses: closed forms, hand-built routings, padding invariance, gradients.

Shapes: B batch, S sequence, T tokens, D model dim, E experts, K top-k, A assignments.
Expected values are computed with plain Python loops, independently of the vectorised code.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from moekit import MoE, MoEConfig
from moekit.losses import sequence_aux_loss, switch_aux_loss, z_loss

D = 12


def _layer(**changes) -> MoE:
    cfg = dict(d_model=D, d_ff=20, num_experts=5, top_k=2, seq_aux_loss_coef=0.1)
    return MoE(MoEConfig(**{**cfg, **changes})).double()


def _balanced(T: int, E: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token t picks experts t, t+1, ..., t+K-1 (mod E): with E | T every expert gets T*K/E."""
    token_A = torch.arange(T).repeat_interleave(K)
    expert_A = (token_A + torch.arange(K).repeat(T)) % E
    return token_A, expert_A


def _py_switch(probs: list[list[float]], experts: list[int], E: int) -> float:
    T, A = len(probs), len(experts)
    f = [sum(1 for e in experts if e == j) / A for j in range(E)]
    P = [sum(p[j] for p in probs) / T for j in range(E)]
    return E * sum(f[j] * P[j] for j in range(E))


def _py_seq(probs, experts, tokens, seq_of_token, E: int, K: int) -> float:
    per_seq = []
    for s in sorted(set(seq_of_token)):
        mine = [t for t, q in enumerate(seq_of_token) if q == s]
        n = len(mine)
        count = [
            sum(1 for a, e in enumerate(experts) if e == j and tokens[a] in mine) for j in range(E)
        ]
        f = [E / (K * n) * c for c in count]
        P = [sum(probs[t][j] for t in mine) / n for j in range(E)]
        per_seq.append(sum(f[j] * P[j] for j in range(E)))
    return sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("E", [4, 8, 5, 6])
def test_uniform_router_scores_exactly_one(E, K):
    if K > E:
        pytest.skip("K > E")
    T = 3 * E
    token_A, expert_A = _balanced(T, E, K)
    probs_TE = torch.full((T, E), 1.0 / E, dtype=torch.float64)
    seq_T = torch.arange(T) // E  # three sequences of E tokens, each balanced on its own
    aux = switch_aux_loss(probs_TE, expert_A, E)
    seq = sequence_aux_loss(probs_TE, expert_A, token_A, seq_T, 3, E, K)
    if E & (E - 1) == 0:
        # 1/E is exact in binary for powers of two, so the closed form holds bit for bit.
        assert aux.item() == 1.0 and seq.item() == 1.0
    assert_close(aux, torch.tensor(1.0, dtype=torch.float64), rtol=1e-14, atol=0)
    assert_close(seq, torch.tensor(1.0, dtype=torch.float64), rtol=1e-14, atol=0)


def test_all_on_one_expert_scores_num_experts():
    E, T = 4, 6
    probs_TE = torch.zeros(T, E, dtype=torch.float64)
    probs_TE[:, 2] = 1.0
    expert_A = torch.full((T,), 2)
    assert switch_aux_loss(probs_TE, expert_A, E).item() == E


def test_losses_equal_hand_computed_values():
    E, K = 3, 2
    probs = [
        [0.5, 0.3, 0.2],
        [0.1, 0.6, 0.3],
        [0.25, 0.25, 0.5],
        [0.7, 0.2, 0.1],
        [0.2, 0.2, 0.6],
    ]
    experts = [0, 1, 1, 2, 2, 0, 0, 1, 2, 1]
    tokens = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    seq_of_token = [0, 0, 0, 1, 1]
    probs_TE = torch.tensor(probs, dtype=torch.float64)
    expert_A, token_A = torch.tensor(experts), torch.tensor(tokens)
    aux = switch_aux_loss(probs_TE, expert_A, E)
    # By hand: f = (3, 4, 3) / 10, P = (1.75, 1.55, 1.7) / 5, E * sum f P = 0.993.
    assert _py_switch(probs, experts, E) == pytest.approx(0.993, abs=1e-12)
    assert aux.item() == pytest.approx(0.993, abs=1e-12)
    seq = sequence_aux_loss(probs_TE, expert_A, token_A, torch.tensor(seq_of_token), 2, E, K)
    assert seq.item() == pytest.approx(
        _py_seq(probs, experts, tokens, seq_of_token, E, K), abs=1e-12
    )

    logits = [[0.5, -1.0, 2.0], [3.0, 0.0, -2.0]]
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / 2
    assert z_loss(torch.tensor(logits, dtype=torch.float64)).item() == pytest.approx(
        expected, abs=1e-12
    )


def _py_topk(row: list[float], K: int) -> list[int]:
    return sorted(range(len(row)), key=lambda j: -row[j])[:K]


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_layer_losses_match_python_over_real_tokens(capacity_factor):
    moe = _layer(capacity_factor=capacity_factor)
    E, K = 5, 2
    x = torch.randn(2, 6, D, dtype=torch.float64)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 4:] = True
    mask[1, 0] = True
    _, out = moe(x, padding_mask=mask)

    real = [(b, s) for b in range(2) for s in range(6) if not mask[b, s]]
    logits = [F.linear(x[b, s], moe.router.weight).tolist() for b, s in real]
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    experts = [e for p in probs for e in _py_topk(p, K)]
    tokens = [t for t in range(len(real)) for _ in range(K)]
    seqs = [b for b, _ in real]
    # Capacity drops change what is computed, never what the losses see (the router's choice).
    assert out.aux_loss.item() == pytest.approx(_py_switch(probs, experts, E), abs=1e-12)
    assert out.seq_aux_loss.item() == pytest.approx(
        _py_seq(probs, experts, tokens, seqs, E, K), abs=1e-12
    )
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / len(real)
    assert out.z_loss.item() == pytest.approx(z, abs=1e-12)
    cfg = moe.config
    weighted = (
        cfg.aux_loss_coef * out.aux_loss
        + cfg.seq_aux_loss_coef * out.seq_aux_loss
        + cfg.z_loss_coef * out.z_loss
    )
    assert_close(out.loss, weighted, rtol=0, atol=0)


@pytest.mark.parametrize("router", ["softmax_topk", "topk_softmax", "expert_choice"])
def test_zero_router_weight_is_uniform(router):
    moe = _layer(router=router)
    with torch.no_grad():
        moe.router.weight.zero_()
    _, out = moe(torch.randn(3, 7, D, dtype=torch.float64))
    one = torch.tensor(1.0, dtype=torch.float64)
    # Ties make the picks lopsided, but with P_e = 1/E the Switch loss is sum_e f_e = 1.
    assert_close(out.aux_loss, one, rtol=1e-14, atol=0)
    assert_close(out.z_loss, one.new_tensor(math.log(5) ** 2), rtol=1e-14, atol=0)
    assert_close(out.router_entropy, one.new_tensor(math.log(5)), rtol=1e-14, atol=0)


# Capacity is sized from the real tokens and padding must never take a slot: with 0.5,
# tokens are dropped, and the same ones with and without padding.
_CAPACITIES = [
    ("softmax_topk", {}),
    ("sigmoid_bias", {}),
    ("expert_choice", {}),
    ("softmax_topk", {"capacity_factor": 0.5}),
    ("softmax_topk", {"capacity_factor": 0.5, "drop_policy": "position"}),
    ("sigmoid_bias", {"capacity_factor": 0.5}),
]


@pytest.mark.parametrize("router, capacity", _CAPACITIES)
def test_padding_changes_no_loss(router, capacity):
    moe = _layer(router=router, **capacity)
    B, S, n_real = 2, 6, 4
    x_real = torch.randn(B, n_real, D, dtype=torch.float64)
    # Each row keeps its 4 real tokens in order, padding interleaved at different places and
    # filled with NaN: padding must never reach the router or the experts.
    mask = torch.tensor([[0, 0, 0, 0, 1, 1], [1, 0, 1, 0, 0, 0]], dtype=torch.bool)
    x_pad = torch.full((B, S, D), float("nan"), dtype=torch.float64)
    x_pad[~mask] = x_real.reshape(-1, D)

    y_pad, out_pad = moe(x_pad, padding_mask=mask)
    y_real, out_real = moe(x_real)
    # Same tokens in the same sequences: every loss and statistic is bitwise identical.
    names = ("loss", "aux_loss", "seq_aux_loss", "z_loss", "tokens_per_expert")
    for name in (*names, "routed_tokens_per_expert", "dropped_fraction"):
        assert torch.equal(getattr(out_pad, name), getattr(out_real, name)), name
    if capacity:
        assert out_real.dropped_fraction > 0
    assert torch.equal(y_pad[~mask], y_real.reshape(-1, D))
    assert torch.equal(y_pad[mask], torch.zeros_like(y_pad[mask]))
    assert torch.equal(out_pad.expert_ids, out_real.expert_ids)
    flat_real = (~mask).reshape(-1).nonzero().squeeze(1)
    assert torch.equal(out_pad.token_ids, flat_real[out_real.token_ids])


def test_padding_with_unequal_lengths():
    moe = _layer(router="softmax_topk")
    lengths = (5, 2)
    seqs = [torch.randn(n, D, dtype=torch.float64) for n in lengths]
    x_pad = torch.zeros(2, 7, D, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    for b, s in enumerate(seqs):
        x_pad[b, : len(s)] = s
        mask[b, : len(s)] = False
    _, out_pad = moe(x_pad, padding_mask=mask)

    # The token-level losses pool all real tokens: the same as one flat [T, D] batch.
    _, out_flat = moe(torch.cat(seqs))
    assert torch.equal(out_pad.aux_loss, out_flat.aux_loss)
    assert torch.equal(out_pad.z_loss, out_flat.z_loss)
    # The sequence-level loss averages per sequence: the mean over separate calls.
    per_seq = [moe(s[None])[1].seq_aux_loss for s in seqs]
    assert_close(out_pad.seq_aux_loss, sum(per_seq) / 2, rtol=1e-14, atol=0)
    assert not torch.allclose(out_pad.seq_aux_loss, out_flat.seq_aux_loss)


def test_fully_padded_sequence_is_left_out_of_the_sequence_mean():
    moe = _layer()
    x = torch.randn(3, 4, D, dtype=torch.float64)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1] = True
    _, out = moe(x, padding_mask=mask)
    _, out_kept = moe(x[[0, 2]])
    assert torch.equal(out.seq_aux_loss, out_kept.seq_aux_loss)
    assert torch.equal(out.aux_loss, out_kept.aux_loss)


@pytest.mark.parametrize("name", ["aux_loss", "seq_aux_loss", "z_loss"])
def test_loss_gradient_reaches_router(name):
    moe = _layer()
    _, out = moe(torch.randn(2, 5, D, dtype=torch.float64))
    (grad,) = torch.autograd.grad(getattr(out, name), moe.router.weight)
    assert grad.abs().sum() > 1e-6


def test_zero_coefficient_contributes_no_gradient():
    x = torch.randn(2, 5, D, dtype=torch.float64)
    moe = _layer(aux_loss_coef=0.0, seq_aux_loss_coef=0.3, z_loss_coef=0.01)
    _, out = moe(x)
    w = moe.router.weight
    (g_loss,) = torch.autograd.grad(out.loss, w, retain_graph=True)
    (g_seq,) = torch.autograd.grad(out.seq_aux_loss, w, retain_graph=True)
    (g_z,) = torch.autograd.grad(out.z_loss, w, retain_graph=True)
    (g_aux,) = torch.autograd.grad(out.aux_loss, w)
    assert g_aux.abs().sum() > 1e-6  # the aux loss has a gradient, its zero weight removes it
    assert_close(g_loss, 0.3 * g_seq + 0.01 * g_z)

    silent = _layer(aux_loss_coef=0.0, seq_aux_loss_coef=0.0, z_loss_coef=0.0)
    _, out = silent(x)
    (g,) = torch.autograd.grad(out.loss, silent.router.weight)
    assert torch.equal(g, torch.zeros_like(g))
