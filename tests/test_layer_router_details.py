"""Router details that the layer-level comparisons do not pin down on their own.

Shapes: T tokens, D model dim, E experts, K top-k, A assignments.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from moekit import MoE, MoEConfig
from moekit.experts import ExpertBank

D, E = 24, 5


def _layer(**changes) -> MoE:
    torch.manual_seed(0)
    return MoE(
        MoEConfig(**{**dict(d_model=D, d_ff=40, num_experts=E, top_k=2), **changes})
    ).double()


@pytest.mark.parametrize(
    "router", ["softmax_topk", "topk_softmax", "sigmoid_bias", "expert_choice"]
)
def test_router_distribution_rows_sum_to_one(router):
    x = torch.randn(11, D, dtype=torch.float64)
    probs = _layer(router=router).router(x).probs_TE
    assert_close(probs.sum(-1), torch.ones(11, dtype=torch.float64))


def test_a_zero_sigmoid_router_is_uniform_for_every_statistic():
    moe = _layer(router="sigmoid_bias", seq_aux_loss_coef=0.1)
    with torch.no_grad():
        moe.router.weight.zero_()
    _, out = moe(torch.randn(2, 10, D, dtype=torch.float64))
    assert_close(out.seq_aux_loss.double(), torch.tensor(1.0, dtype=torch.float64))
    assert_close(out.router_entropy.double(), torch.tensor(math.log(E), dtype=torch.float64))


def test_slots_count_choices_within_each_token():
    routing = _layer(top_k=3).router(torch.randn(4, D, dtype=torch.float64))
    assert routing.slot_A.tolist() == [0, 1, 2] * 4
    assert routing.token_A.tolist() == [t for t in range(4) for _ in range(3)]


def test_topk_softmax_scores_are_the_router_probabilities():
    # The probs drop policy ranks by these: probabilities, not logits.
    x = torch.randn(9, D, dtype=torch.float64)
    a = _layer(router="topk_softmax").router(x)
    b = _layer(router="softmax_topk").router(x)
    assert torch.equal(a.expert_A, b.expert_A)
    assert_close(a.score_A, b.score_A)


def test_expert_choice_applies_the_routed_scaling_factor():
    x = torch.randn(12, D, dtype=torch.float64)
    one = _layer(router="expert_choice")
    scaled = _layer(router="expert_choice", routed_scaling_factor=2.5)
    scaled.load_state_dict(one.state_dict())
    assert_close(scaled(x)[0], 2.5 * one(x)[0])


def test_expert_choice_sequence_loss_counts_each_sequences_real_tokens():
    # Expert choice gives a sequence any number of assignments, not K per token: f_se
    # divides by K times the sequence's real tokens, as for token choice (DeepSeek-V2
    # eq. 12), whatever the sequence received.
    moe = _layer(router="expert_choice", seq_aux_loss_coef=0.1)
    x = torch.randn(3, 9, D, dtype=torch.float64)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 5:] = True
    _, out = moe(x, padding_mask=pad)
    probs = torch.softmax(x.reshape(-1, D) @ moe.router.weight.t(), dim=-1)
    seq_of = torch.arange(3).repeat_interleave(9)
    real = ~pad.reshape(-1)
    losses = []
    for s in range(3):
        rows = real & (seq_of == s)
        n = int(rows.sum())
        counts = torch.zeros(E, dtype=torch.float64)
        for tok, e in zip(out.token_ids.tolist(), out.expert_ids.tolist(), strict=True):
            if seq_of[tok] == s:
                counts[e] += 1
        f = counts * E / (2 * n)
        losses.append((f * probs[rows].mean(0)).sum())
    assert_close(out.seq_aux_loss, torch.stack(losses).mean())


def test_expert_weights_start_at_fan_in_scale():
    bank = ExpertBank(MoEConfig(d_model=64, d_ff=256, num_experts=4, top_k=2))
    assert bank.w_gate_EFD.std().item() == pytest.approx(64**-0.5, rel=0.05)
    assert bank.w_up_EFD.std().item() == pytest.approx(64**-0.5, rel=0.05)
    assert bank.w_down_EDF.std().item() == pytest.approx(256**-0.5, rel=0.05)


@pytest.mark.parametrize("impl", ["reference", "grouped"])
def test_a_float64_layer_stays_float64_under_autocast(impl):
    moe = _layer(impl=impl)
    x = torch.randn(10, D, dtype=torch.float64)
    plain = moe(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = moe(x)[0]
    assert inside.dtype == torch.float64
    assert_close(inside, plain)
