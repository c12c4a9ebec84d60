"""Routing statistics against hand-built routings with known answers and plain-loop references."""

import math

import pytest
import torch

from moekit.analysis import stats


def _mi_reference(joint):
    """I(D; E) = sum p(d, e) log p(d, e) / (p(d) p(e)), written out as a double loop."""
    total = sum(sum(row) for row in joint)
    p_d = [sum(row) / total for row in joint]
    p_e = [sum(joint[d][e] for d in range(len(joint))) / total for e in range(len(joint[0]))]
    mi = 0.0
    for d, row in enumerate(joint):
        for e, c in enumerate(row):
            if c:
                p = c / total
                mi += p * math.log(p / (p_d[d] * p_e[e]))
    return mi


def test_uniform_load_is_balanced():
    load = torch.full((7,), 30.0)
    assert stats.load_imbalance(load) == pytest.approx(1.0)
    assert stats.coefficient_of_variation(load) == pytest.approx(0.0)
    assert stats.load_entropy(load) == pytest.approx(1.0)
    assert stats.dead_experts(load, threshold=0.5) == []


def test_collapsed_load_has_extreme_values():
    E = 5
    load = torch.tensor([0.0, 0.0, 42.0, 0.0, 0.0])
    assert stats.load_imbalance(load) == pytest.approx(E)
    assert stats.coefficient_of_variation(load) == pytest.approx(math.sqrt(E - 1))
    assert stats.load_entropy(load) == pytest.approx(0.0)
    assert stats.dead_experts(load) == [0, 1, 3, 4]


def test_collapsed_top_k_load_has_the_top_k_extremes():
    # Top-2 of 8, every token on experts 0 and 1: each serves every token once, the mean
    # is T * K / E, so max / mean is E / K, not E.
    E, K = 8, 2
    load = torch.tensor([64.0, 64.0] + [0.0] * 6)
    assert stats.load_imbalance(load) == pytest.approx(E / K)
    assert stats.coefficient_of_variation(load) == pytest.approx(math.sqrt(E / K - 1))
    assert stats.load_entropy(load) == pytest.approx(math.log(K) / math.log(E))


def test_imbalance_and_cv_closed_form():
    load = torch.tensor([1.0, 2.0, 3.0, 6.0])
    mean = 3.0
    std = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 4)
    assert stats.load_imbalance(load) == pytest.approx(6.0 / mean)
    assert stats.coefficient_of_variation(load) == pytest.approx(std / mean)
    shares = [x / 12 for x in (1, 2, 3, 6)]
    ent = -sum(p * math.log(p) for p in shares) / math.log(4)
    assert stats.load_entropy(load) == pytest.approx(ent)


def test_dead_expert_threshold_is_relative_to_fair_share():
    # Fair share is 100 / 5 = 20 tokens; expert 1 has 1, expert 3 has 3, expert 4 none.
    load = torch.tensor([48.0, 1.0, 48.0, 3.0, 0.0])
    assert stats.dead_experts(load) == [4]
    assert stats.dead_experts(load, threshold=0.1) == [1, 4]
    assert stats.dead_experts(load, threshold=0.2) == [1, 3, 4]
    with pytest.raises(ValueError, match="threshold"):
        stats.dead_experts(load, threshold=2.0)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="tokens_per_expert"):
        stats.load_imbalance(torch.tensor([1.0, -1.0]))
    with pytest.raises(TypeError, match="expert_ids"):
        stats.expert_counts(torch.tensor([0.5]), 3)
    with pytest.raises(ValueError, match="expert_ids"):
        stats.expert_counts(torch.tensor([0, 3]), 3)


def test_co_selection_hand_built():
    # Token 0 -> experts {0, 2}, token 1 -> {0, 2}, token 2 -> {1, 2}; token ids unsorted.
    token_ids = torch.tensor([2, 0, 1, 0, 1, 2])
    expert_ids = torch.tensor([1, 0, 2, 2, 0, 2])
    expected = torch.tensor(
        [
            [2.0, 0.0, 2.0],
            [0.0, 1.0, 1.0],
            [2.0, 1.0, 3.0],
        ],
        dtype=torch.float64,
    )
    co = stats.co_selection(token_ids, expert_ids, 3)
    torch.testing.assert_close(co, expected)
    cond = stats.co_selection_conditional(co)
    torch.testing.assert_close(
        cond,
        torch.tensor([[0, 0, 1.0], [0, 0, 1.0], [2 / 3, 1 / 3, 0]], dtype=torch.float64),
    )


def test_co_selection_matches_loop_reference():
    g = torch.Generator().manual_seed(3)
    T, E, K = 37, 7, 3
    ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    token_ids = torch.arange(T).repeat_interleave(K)
    ref = torch.zeros(E, E, dtype=torch.float64)
    for t in range(T):
        for i in ids_TK[t].tolist():
            for j in ids_TK[t].tolist():
                ref[i, j] += 1
    co = stats.co_selection(token_ids, ids_TK.reshape(-1), E)
    torch.testing.assert_close(co, ref)
    torch.testing.assert_close(co.sum(dim=1), K * co.diagonal())


def test_top1_co_selection_has_empty_off_diagonal():
    expert_ids = torch.tensor([3, 1, 1, 0])
    co = stats.co_selection(torch.arange(4), expert_ids, 4)
    torch.testing.assert_close(co, torch.diag(torch.tensor([1.0, 2.0, 0.0, 1.0])).double())


def test_domain_expert_counts_and_padding_label():
    token_ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    expert_ids = torch.tensor([0, 1, 0, 2, 1, 2, 0, 1])
    domain_of_token = torch.tensor([0, 1, -1, 1])  # token 2 is padding
    counts = stats.domain_expert_counts(token_ids, expert_ids, domain_of_token, 2, 3)
    torch.testing.assert_close(
        counts, torch.tensor([[1.0, 1.0, 0.0], [2.0, 1.0, 1.0]], dtype=torch.float64)
    )


def test_perfect_specialisation_code_to_0_prose_to_1():
    # Code tokens all go to expert 0, prose to expert 1 (top-1, E = 4, uneven domain sizes).
    joint = torch.tensor([[30.0, 0.0, 0.0, 0.0], [0.0, 70.0, 0.0, 0.0]])
    h = -(0.3 * math.log(0.3) + 0.7 * math.log(0.7))
    assert stats.mutual_information(joint) == pytest.approx(h)
    assert stats.specialisation_score(joint) == pytest.approx(1.0)
    assert stats.js_divergence(joint[0], joint[1]) == pytest.approx(1.0)


def test_top2_disjoint_expert_sets_are_fully_specialised():
    joint = torch.tensor([[50.0, 50.0, 0.0, 0.0], [0.0, 0.0, 20.0, 20.0]])
    assert stats.specialisation_score(joint) == pytest.approx(1.0)


def test_uniform_routing_has_zero_specialisation():
    joint = torch.full((3, 6), 11.0)
    assert stats.mutual_information(joint) == pytest.approx(0.0, abs=1e-12)
    assert stats.specialisation_score(joint) == pytest.approx(0.0, abs=1e-12)
    assert stats.js_divergence(joint[0], joint[2]) == pytest.approx(0.0, abs=1e-12)
    # Same expert distribution in every domain, even if unbalanced: still no specialisation.
    skewed = torch.tensor([[8.0, 1.0, 1.0], [16.0, 2.0, 2.0]])
    assert stats.specialisation_score(skewed) == pytest.approx(0.0, abs=1e-12)


def test_mutual_information_matches_reference_and_weighted_jsd():
    g = torch.Generator().manual_seed(0)
    joint = torch.randint(0, 20, (3, 5), generator=g).double()
    mi = stats.mutual_information(joint)
    assert mi == pytest.approx(_mi_reference(joint.tolist()), rel=1e-10)
    # Generalised JSD with weights = domain shares (Lin 1991) is the same quantity.
    w = joint.sum(1) / joint.sum()
    rows = joint / joint.sum(1, keepdim=True)
    mix = (w[:, None] * rows).sum(0)

    def h(p):
        return -sum(x * math.log(x) for x in p.tolist() if x > 0)

    jsd = h(mix) - sum(w[i].item() * h(rows[i]) for i in range(3))
    assert mi == pytest.approx(jsd, rel=1e-10)
    h_dom = h(w)
    assert stats.specialisation_score(joint) == pytest.approx(mi / h_dom, rel=1e-10)


def test_js_divergence_matches_kl_reference():
    p = torch.tensor([0.1, 0.4, 0.5, 0.0], dtype=torch.float64)
    q = torch.tensor([0.3, 0.3, 0.0, 0.4], dtype=torch.float64)
    m = (p + q) / 2

    def kl(a, b):
        return sum(x * math.log2(x / y) for x, y in zip(a.tolist(), b.tolist(), strict=True) if x)

    ref = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    assert stats.js_divergence(p * 10, q * 3) == pytest.approx(ref, rel=1e-10)


def test_specialisation_needs_two_domains():
    assert math.isnan(stats.specialisation_score(torch.tensor([[1.0, 2.0], [0.0, 0.0]])))
    assert math.isnan(stats.load_imbalance(torch.zeros(3)))
