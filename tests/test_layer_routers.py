"""Routers: bias balancing, group-limited routing, expert choice, equivalent formulations.

Shapes: B batch, S sequence, T tokens, D model dim, E experts, K top-k, C capacity.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from moekit import MoE, MoEConfig

D = 24


def _layer(**changes) -> MoE:
    cfg = dict(d_model=D, d_ff=16, num_experts=8, top_k=2)
    return MoE(MoEConfig(**{**cfg, **changes})).double()


def _imbalance(tokens_per_expert: torch.Tensor) -> float:
    return (tokens_per_expert.max() / tokens_per_expert.mean()).item()


def test_bias_updates_balance_a_skewed_router():
    moe = _layer(router="sigmoid_bias", bias_update_rate=0.005)
    u = torch.randn(D, dtype=torch.float64)
    u = u / u.norm()
    with torch.no_grad():
        # Every token leans along u, and experts 0 and 1 score u highly: both are always chosen.
        moe.router.weight[:2] += 3 * u
    gen = torch.Generator().manual_seed(1)

    def batch(T: int = 512) -> torch.Tensor:
        return torch.randn(T, D, generator=gen, dtype=torch.float64) + u

    # Load measured on 4096 fresh tokens: a balanced router still shows ~sqrt(T*K/E) noise.
    before = _imbalance(moe(batch(4096))[1].tokens_per_expert)
    for _ in range(300):
        _, out = moe(batch())
        assert out.routed_tokens_per_expert is out.tokens_per_expert  # dropless
        moe.update_bias(out.routed_tokens_per_expert)
    after = _imbalance(moe(batch(4096))[1].tokens_per_expert)
    assert before > 2.5
    assert after < 1.3
    assert moe.router.expert_bias.dtype == torch.float64  # followed .double()
    assert moe.router.expert_bias[:2].max() < moe.router.expert_bias[2:].min()


def test_bias_follows_the_routed_load_not_the_capped_one():
    # Routed 50/14/8/8 (mean 20) with capacity 10: after drops the load reads 10/10/8/8,
    # where expert 1 looks overloaded although it is under the mean.
    cfg = MoEConfig(
        d_model=4,
        d_ff=8,
        num_experts=4,
        top_k=1,
        router="sigmoid_bias",
        capacity_factor=0.5,
        bias_update_rate=0.1,
    )
    moe = MoE(cfg).double()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4))
    want = torch.tensor([0] * 50 + [1] * 14 + [2] * 8 + [3] * 8)
    _, out = moe(5.0 * torch.nn.functional.one_hot(want, 4).double())
    assert out.tokens_per_expert.tolist() == [10, 10, 8, 8]
    assert out.routed_tokens_per_expert.tolist() == [50, 14, 8, 8]
    moe.update_bias(out.routed_tokens_per_expert)
    assert moe.router.expert_bias.tolist() == [-0.1, 0.1, 0.1, 0.1]


def test_update_bias_is_a_no_op_for_other_routers():
    moe = _layer(router="softmax_topk")
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    moe.update_bias(torch.arange(8.0))
    assert all(torch.equal(before[k], v) for k, v in moe.state_dict().items())


@pytest.mark.parametrize("norm", [True, False])
def test_bias_changes_selection_never_weights(norm):
    moe = _layer(router="sigmoid_bias", routed_scaling_factor=2.5, norm_topk_prob=norm)
    x = torch.randn(31, D, dtype=torch.float64)
    unbiased = moe.router(x)
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.linspace(-0.3, 0.4, 8, dtype=torch.float64))
    biased = moe.router(x)
    assert not torch.equal(unbiased.expert_A, biased.expert_A)

    scores_TE = torch.sigmoid(x @ moe.router.weight.t())
    ids_TK = biased.expert_A.view(31, 2)
    expected_ids = (scores_TE + moe.router.expert_bias).topk(2, dim=-1).indices
    assert torch.equal(ids_TK, expected_ids)
    w_TK = scores_TE.gather(1, ids_TK)
    if norm:
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
    assert_close(biased.weight_A.view(31, 2), 2.5 * w_TK)
    # The balancing statistics also ignore the bias.
    assert torch.equal(biased.probs_TE, unbiased.probs_TE)


@pytest.mark.parametrize(("E", "groups", "topk_groups", "K"), [(8, 4, 2, 3), (12, 3, 1, 4)])
def test_group_limited_routing(E, groups, topk_groups, K):
    moe = _layer(
        router="sigmoid_bias", num_experts=E, top_k=K, num_groups=groups, topk_groups=topk_groups
    )
    with torch.no_grad():
        moe.router.expert_bias.uniform_(-0.2, 0.2)
    T = 40
    x = torch.randn(T, D, dtype=torch.float64)
    ids_TK = moe.router(x).expert_A.view(T, K)
    per_group = E // groups
    choice = (torch.sigmoid(x @ moe.router.weight.t()) + moe.router.expert_bias).tolist()
    for t in range(T):
        used = {int(e) // per_group for e in ids_TK[t]}
        assert len(used) <= topk_groups
        # DeepSeek-V3: a group scores the sum of its two best biased scores.
        group_score = [
            sum(sorted(choice[t][g * per_group : (g + 1) * per_group])[-2:]) for g in range(groups)
        ]
        best = sorted(range(groups), key=lambda g: -group_score[g])[:topk_groups]
        allowed = [e for e in range(E) if e // per_group in best]
        expected = sorted(allowed, key=lambda e: -choice[t][e])[:K]
        assert sorted(ids_TK[t].tolist()) == sorted(expected)


@pytest.mark.parametrize("impl", ["reference", "grouped"])
@pytest.mark.parametrize("cf", [None, 0.5, 1.7, 50.0])
def test_expert_choice_fills_every_expert_exactly(cf, impl):
    E, K = 5, 2
    moe = _layer(router="expert_choice", num_experts=E, top_k=K, capacity_factor=cf, impl=impl)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[2, 3:] = True
    x = torch.randn(3, 7, D, dtype=torch.float64)
    _, out = moe(x, padding_mask=mask)
    T = int((~mask).sum())
    C = min(T, math.ceil((1.0 if cf is None else cf) * T * K / E))
    assert torch.equal(out.tokens_per_expert, torch.full((E,), float(C)))
    assert out.dropped_fraction == 0

    # Each expert's tokens are its C highest-probability real tokens.
    real = (~mask).reshape(-1).nonzero().squeeze(1)
    probs_TE = torch.softmax(x.reshape(-1, D)[real] @ moe.router.weight.t(), dim=-1)
    for e in range(E):
        mine = out.token_ids[out.expert_ids == e]
        assert not mask.reshape(-1)[mine].any()
        expected = real[probs_TE[:, e].topk(C).indices]
        assert sorted(mine.tolist()) == sorted(expected.tolist())


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_softmax_topk_with_norm_equals_topk_softmax(scale):
    a = _layer(router="softmax_topk", top_k=3, routed_scaling_factor=scale)
    b = _layer(router="topk_softmax", top_k=3, routed_scaling_factor=scale)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 9, D, dtype=torch.float64)
    ra, rb = a.router(x.reshape(-1, D)), b.router(x.reshape(-1, D))
    assert torch.equal(ra.expert_A, rb.expert_A)
    assert torch.equal(ra.token_A, rb.token_A)
    assert_close(ra.weight_A, rb.weight_A)
    assert_close(ra.weight_A.view(-1, 3).sum(-1), torch.full((18,), scale, dtype=torch.float64))
    (ya, oa), (yb, ob) = a(x), b(x)
    assert_close(ya, yb)
    assert_close(oa.loss, ob.loss)


def test_softmax_topk_without_norm_uses_softmax_probs():
    moe = _layer(router="softmax_topk", top_k=3, norm_topk_prob=False)
    x = torch.randn(11, D, dtype=torch.float64)
    routing = moe.router(x)
    probs_TE = torch.softmax(x @ moe.router.weight.t(), dim=-1)
    assert_close(routing.weight_A, probs_TE.gather(1, routing.expert_A.view(11, 3)).reshape(-1))
    assert (routing.weight_A.view(11, 3).sum(-1) < 1).all()


@pytest.mark.parametrize("option", [dict(router_jitter=0.3), dict(router_noise=0.5)])
def test_jitter_and_noise_only_in_training(option):
    quiet = _layer()
    noisy = _layer(**option)
    noisy.load_state_dict(quiet.state_dict())
    x = torch.randn(16, D, dtype=torch.float64)
    quiet.eval()
    noisy.eval()
    assert torch.equal(noisy.router(x).logits_TE, quiet.router(x).logits_TE)
    noisy.train()
    assert not torch.allclose(noisy.router(x).logits_TE, quiet.router(x).logits_TE)


def test_jitter_and_noise_have_their_configured_size():
    torch.manual_seed(0)
    T = 4000
    # Jitter multiplies the router's input by U(1 - j, 1 + j): with the router reading the
    # first E input features of an all-ones input, the logits are the factors themselves.
    jitter = _layer(router_jitter=0.3).train()
    with torch.no_grad():
        jitter.router.weight.copy_(torch.eye(8, D, dtype=torch.float64))
    factors = jitter.router(torch.ones(T, D, dtype=torch.float64)).logits_TE
    assert 0.7 <= factors.min() < 0.71 and 1.29 < factors.max() <= 1.3
    assert abs(factors.mean().item() - 1) < 0.01
    # Noise adds N(0, router_noise^2) to each logit.
    noisy = _layer(router_noise=0.5)
    quiet = _layer()
    quiet.load_state_dict(noisy.state_dict())
    x = torch.randn(T, D, dtype=torch.float64)
    added = noisy.train().router(x).logits_TE - quiet.eval().router(x).logits_TE
    assert abs(added.std().item() - 0.5) < 0.02 and abs(added.mean().item()) < 0.02


def test_bias_stays_float32_in_a_bf16_layer():
    moe = MoE(MoEConfig(d_model=D, d_ff=16, num_experts=4, top_k=2, router="sigmoid_bias"))
    moe = moe.to(torch.bfloat16)
    assert moe.router.weight.dtype == torch.bfloat16
    assert moe.router.expert_bias.dtype == torch.float32
    with torch.no_grad():
        moe.router.expert_bias.fill_(0.5)
    for _ in range(10):
        moe.update_bias(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    # In bf16 (8 bits of mantissa) steps of 1e-3 on 0.5 would round away entirely.
    expected = torch.tensor([0.49, 0.51, 0.51, 0.51])
    assert_close(moe.router.expert_bias, expected, rtol=0, atol=1e-6)
    y, _ = moe(torch.randn(5, D, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.parametrize("factor", [1.0, 1.5])
@pytest.mark.parametrize("num_experts", [1, 5, 8, 9, 16])
@pytest.mark.parametrize("router", ["softmax_topk", "topk_softmax"])
def test_routers_equal_the_textbook_formulas(num_experts, router, factor):
    # Up to 8 experts the CPU softmax runs on the [E, T] transpose, beyond on [T, E]; a
    # scaling factor other than 1 multiplies the weights, 1 skips the product. Each must
    # give what the plain formula gives, forward and backward.
    k = min(2, num_experts)
    moe = _layer(num_experts=num_experts, top_k=k, router=router, routed_scaling_factor=factor)
    x = torch.randn(37, D, dtype=torch.float64, requires_grad=True)
    routing = moe.router(x)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = moe.router.weight.detach().clone().requires_grad_()
    logits = x_ref @ w_ref.t()
    probs = logits.softmax(dim=-1)
    if router == "softmax_topk":
        weights, ids = probs.topk(k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
    else:
        top, ids = logits.topk(k, dim=-1)
        weights = top.softmax(dim=-1)
    assert torch.equal(routing.expert_A, ids.reshape(-1))
    assert_close(routing.logits_TE, logits)
    assert_close(routing.probs_TE, probs)
    assert_close(routing.weight_A, factor * weights.reshape(-1))

    probe = torch.randn(routing.weight_A.shape, dtype=torch.float64)
    z = routing.logits_TE.logsumexp(dim=-1).square().mean()
    ((routing.weight_A * probe).sum() + routing.probs_TE[:, 0].sum() + z).backward()
    z_ref = logits.logsumexp(dim=-1).square().mean()
    ((factor * weights.reshape(-1) * probe).sum() + probs[:, 0].sum() + z_ref).backward()
    assert_close(x.grad, x_ref.grad)
    assert_close(moe.router.weight.grad, w_ref.grad)


@pytest.mark.parametrize("num_experts", [4, 16])
def test_router_logits_stay_float32_under_autocast(num_experts):
    # Autocast would run the router's matmul in bf16, which collapses top-k margins.
    moe = MoE(MoEConfig(d_model=D, d_ff=16, num_experts=num_experts, top_k=2))
    x = torch.randn(29, D)
    plain = moe.router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = moe.router(x)
    assert cast.logits_TE.dtype == torch.float32
    assert torch.equal(cast.logits_TE, plain.logits_TE)
    assert torch.equal(cast.expert_A, plain.expert_A)
