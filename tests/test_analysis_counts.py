"""LayerCounts over a bare MoE layer, checked against the router's own top-k recomputed here."""

import math

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.analysis import LayerCounts


def _reference_topk(moe, x_TD, k):
    logits = x_TD.double() @ moe.router.weight.double().t()
    return logits.topk(k, dim=-1).indices


def test_counts_over_batches_match_router_topk_with_padding():
    torch.manual_seed(0)
    D, E, K, B, S = 24, 5, 3, 3, 7
    moe = MoE(MoEConfig(d_model=D, d_ff=40, num_experts=E, top_k=K)).double().eval()
    counts = LayerCounts(E, domains=("code", "prose"))
    ref_load = torch.zeros(E, dtype=torch.float64)
    ref_co = torch.zeros(E, E, dtype=torch.float64)
    ref_dom = torch.zeros(2, E, dtype=torch.float64)
    total_real = 0
    for step in range(2):
        x = torch.randn(B, S, D, dtype=torch.float64)
        pad = torch.zeros(B, S, dtype=torch.bool)
        pad[1, 4:] = True
        pad[2, 6:] = True
        domain_BS = torch.tensor([0, 1, step % 2]).repeat_interleave(S).view(B, S)
        domain_BS = domain_BS.masked_fill(pad, -1)
        with torch.no_grad():
            _, out = moe(x, padding_mask=pad)
        real = int((~pad).sum())
        counts.add(out, real, domain_BS.reshape(-1))
        total_real += real

        ids_TK = _reference_topk(moe, x.reshape(-1, D), K)
        for t in range(B * S):
            if pad.reshape(-1)[t]:
                continue
            chosen = ids_TK[t].tolist()
            for i in chosen:
                ref_load[i] += 1
                ref_dom[domain_BS.reshape(-1)[t], i] += 1
                for j in chosen:
                    ref_co[i, j] += 1

    torch.testing.assert_close(counts.tokens_per_expert, ref_load)
    torch.testing.assert_close(counts.co_selection, ref_co)
    torch.testing.assert_close(counts.domain_expert, ref_dom)

    s = counts.summary(layer=0)
    assert s.num_tokens == total_real
    assert sum(s.tokens_per_expert) == total_real * K
    assert s.imbalance == pytest.approx(ref_load.max().item() / ref_load.mean().item())
    assert s.dropped_fraction == 0.0
    assert 0 < s.router_entropy < math.log(E)
    assert set(s.domain_js) == {"code|prose"}
    d = s.to_dict()
    assert d["tokens_per_expert"] == ref_load.tolist()


def test_router_entropy_is_token_weighted_and_dropped_fraction_summed():
    torch.manual_seed(1)
    D, E = 16, 4
    moe = MoE(MoEConfig(d_model=D, d_ff=8, num_experts=E, top_k=2, capacity_factor=0.5)).eval()
    counts = LayerCounts(E)
    outs = []
    for T in (5, 19):
        with torch.no_grad():
            _, out = moe(torch.randn(T, D))
        counts.add(out, T)
        outs.append((T, out))
    s = counts.summary(layer=3)
    ent = sum(T * float(o.router_entropy) for T, o in outs) / 24
    assert s.router_entropy == pytest.approx(ent, rel=1e-6)
    kept = sum(o.expert_ids.numel() for _, o in outs)
    assert s.dropped_fraction == pytest.approx(1 - kept / (24 * 2), rel=1e-6)
    assert s.dropped_fraction > 0
    assert math.isnan(s.specialisation)
    assert s.to_dict()["specialisation"] is None


def test_counts_reject_wrong_expert_count():
    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=3, top_k=1))
    with torch.no_grad():
        _, out = moe(torch.randn(4, 8))
    with pytest.raises(ValueError, match="experts"):
        LayerCounts(5).add(out, 4)
    with pytest.raises(ValueError, match="num_experts"):
        LayerCounts(0)
    for k in (0, 6, True, 1.5):
        with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 5\]"):
            LayerCounts(5, top_k=k)
