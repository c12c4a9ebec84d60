"""Expert parallelism over 2 and 4 gloo processes equals the single-process layer.

Forward outputs, every balancing statistic, and the gradients of the input, router,
shared and expert weights, for the softmax top-k and sigmoid-bias routers; including a
rank that sends zero tokens, an expert that receives none, and every token on one expert.
The grouped-GEMM branch the path takes on CUDA, forced on CPU, equals one process too.
With capacity drops and expert-choice routing, which decide over each rank's own tokens,
the layer equals one process fed each rank's rows alone (its losses: the whole batch's).
"""

from __future__ import annotations

import pytest
import torch
from parallel_cases import (
    LayerCase,
    build_case,
    derivatives_single_process,
    derivatives_worker,
    errors_worker,
    layer_worker,
    per_rank_reference,
    pool,
    rank_rows,
    single_process_reference,
)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(150)]

BASE = dict(d_model=12, d_ff=20, num_experts=8, aux_loss_coef=0.5, z_loss_coef=0.1)

CASES = [
    LayerCase(
        "softmax_topk fp32, last rank empty, dead expert, shared expert",
        dict(BASE, top_k=3, num_shared_experts=1, shared_d_ff=6, seq_aux_loss_coef=0.3),
        empty_last_rank=True,
        dead_expert=2,
    ),
    LayerCase(
        "softmax_topk fp64, gelu",
        dict(BASE, top_k=2, activation="gelu", seq_aux_loss_coef=0.3),
        dtype=torch.float64,
        empty_last_rank=True,
        dead_expert=7,
    ),
    LayerCase(
        "sigmoid_bias fp32, groups, bias",
        dict(BASE, top_k=2, router="sigmoid_bias", num_groups=2, topk_groups=1),
        bias=[0.1, -0.2, 0.0, 0.3, -0.1, 0.05, 0.0, -0.3],
    ),
    LayerCase(
        "sigmoid_bias fp64, last rank empty, dead expert",
        dict(BASE, top_k=3, router="sigmoid_bias", seq_aux_loss_coef=0.3),
        dtype=torch.float64,
        empty_last_rank=True,
        dead_expert=4,
    ),
    LayerCase(
        "softmax_topk fp64, [T, D] rows: one sequence over all ranks",
        dict(BASE, top_k=2, seq_aux_loss_coef=0.3),
        dtype=torch.float64,
        empty_last_rank=True,
        flat=True,
    ),
    LayerCase(
        "sigmoid_bias fp32, [T, D] rows: one sequence over all ranks",
        dict(BASE, top_k=3, router="sigmoid_bias", seq_aux_loss_coef=0.3),
        flat=True,
    ),
    LayerCase(
        "softmax_topk fp64, every token to one expert",
        dict(BASE, top_k=1),
        dtype=torch.float64,
        hot_expert=5,
    ),
    LayerCase(
        "sigmoid_bias fp32, every token to one expert",
        dict(BASE, top_k=1, router="sigmoid_bias"),
        hot_expert=3,
        random_padding=False,
    ),
    LayerCase(
        "softmax_topk fp32, every token to one expert",
        dict(BASE, top_k=1, norm_topk_prob=False),
        hot_expert=6,
        random_padding=False,
    ),
]


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    # 1e-6 (float32) / 1e-12 (float64) relative to the tensor's largest entry: the ranks
    # sum the same terms in another order, so an entry that cancels to near zero carries
    # the rounding of the large terms it came from.
    eps = 1e-12 if dtype == torch.float64 else 1e-6
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=eps, atol=eps * scale, msg=msg or None)


def _check(case: LayerCase, ranks: list[dict], world_size: int, reference=None) -> None:
    ref = (reference or single_process_reference)(case, world_size)
    dt = case.dtype
    num_local = case.config["num_experts"] // world_size
    _close(torch.cat([r["y"] for r in ranks]), ref["y"], dt, "y")
    _close(torch.cat([r["x_grad"] for r in ranks]), ref["x_grad"], dt, "x.grad")
    for rank, r in enumerate(ranks):
        for name, value in ref["stats"].items():
            _close(r["stats"][name], value, dt, f"{name} on rank {rank}")
    _close_grads(ref["grads"], [r["grads"] for r in ranks], num_local, dt)


def _close_grads(ref: dict, ranks: list[dict], num_local: int, dt, what: str = "") -> None:
    """Each rank's expert gradients are its slice of the whole layer's; the replicated
    weights' gradients over the ranks add up to the whole batch's."""
    for name, grad in ref.items():
        if ".experts." in f".{name}":
            for rank, r in enumerate(ranks):
                local = grad[rank * num_local : (rank + 1) * num_local]
                _close(r[name], local, dt, f"{what}{name}.grad on rank {rank}")
        else:
            _close(sum(r[name] for r in ranks), grad, dt, f"{what}{name}.grad")


@pytest.mark.parametrize("world_size", [2, 4])
def test_expert_parallel_equals_single_process(world_size: int) -> None:
    ranks = pool(world_size).run(layer_worker, CASES, timeout_s=120)
    for i, case in enumerate(CASES):
        per_rank = [ranks[r][i] for r in range(world_size)]
        _check(case, per_rank, world_size)


GROUPED = [
    # grouped_mm has no float64. D=10, F=14 are zero-padded to 16-byte rows (12, 16); the
    # last rank's experts receive rows from rank 0 only, and an expert none.
    LayerCase(
        "grouped GEMM fp32, padded rows, last rank empty, dead expert, shared expert",
        dict(BASE, d_model=10, d_ff=14, top_k=3, num_shared_experts=1, seq_aux_loss_coef=0.3),
        empty_last_rank=True,
        dead_expert=1,
        grouped_mm=True,
    ),
    # Every rank but the hot expert's receives zero rows.
    LayerCase(
        "grouped GEMM fp32, gelu, sigmoid_bias, every token to one expert",
        dict(BASE, top_k=1, activation="gelu", router="sigmoid_bias"),
        hot_expert=2,
        grouped_mm=True,
    ),
    LayerCase(
        "grouped GEMM fp32, softmax_topk",
        dict(BASE, top_k=2),
        batch=6,
        grouped_mm=True,
    ),
]


def test_grouped_gemm_branch_equals_single_process() -> None:
    # The all-to-all path regroups the received rows by local expert for the grouped GEMMs
    # and undoes that after; only CUDA takes the branch, so no other test runs it.
    if not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("torch has no grouped_mm")
    world_size = 2
    ranks = pool(world_size).run(layer_worker, GROUPED, timeout_s=120)
    for i, case in enumerate(GROUPED):
        per_rank = [ranks[r][i] for r in range(world_size)]
        assert all(r["grouped_mm_calls"] > 0 for r in per_rank), case.name
        _check(case, per_rank, world_size)


CAPACITY = [
    LayerCase(
        "softmax_topk fp64, capacity 0.5, probs policy, shared expert",
        dict(BASE, top_k=2, capacity_factor=0.5, num_shared_experts=1, seq_aux_loss_coef=0.3),
        dtype=torch.float64,
        batch=8,
    ),
    LayerCase(
        "sigmoid_bias fp32, capacity 0.6, position policy, last rank empty",
        dict(BASE, top_k=3, router="sigmoid_bias", capacity_factor=0.6, drop_policy="position"),
        bias=[0.1, -0.2, 0.0, 0.3, -0.1, 0.05, 0.0, -0.3],
        batch=8,
        empty_last_rank=True,
    ),
    LayerCase(
        "softmax_topk fp64, capacity 0.5, [T, D] rows",
        dict(BASE, top_k=2, capacity_factor=0.5, seq_aux_loss_coef=0.3),
        dtype=torch.float64,
        batch=8,
        flat=True,
    ),
    LayerCase(
        "expert_choice fp64, capacity 0.5",
        dict(BASE, top_k=2, router="expert_choice", capacity_factor=0.5),
        dtype=torch.float64,
        batch=8,
    ),
]


@pytest.mark.parametrize("world_size", [2, 4])
def test_capacity_and_expert_choice_equal_each_rank_alone(world_size: int) -> None:
    ranks = pool(world_size).run(layer_worker, CAPACITY, timeout_s=120)
    for i, case in enumerate(CAPACITY):
        per_rank = [ranks[r][i] for r in range(world_size)]
        _check(case, per_rank, world_size, reference=per_rank_reference)


def test_capacity_cases_drop_and_decide_per_rank() -> None:
    # The test above proves little unless assignments are dropped, the ranks drop
    # different shares (so the group's fraction is none of theirs), and deciding over each
    # rank's tokens gives another output than deciding over the whole batch.
    for case in CAPACITY:
        for world_size in (2, 4):
            moe, x, mask, _ = build_case(case, world_size)
            if case.flat:
                x, mask = x.flatten(0, 1), mask.flatten()
            with torch.no_grad():
                whole, _ = moe(x, padding_mask=mask)
                alone = [
                    moe(rank_rows(x, r, world_size), padding_mask=rank_rows(mask, r, world_size))
                    for r in range(world_size)
                ]
            what = f"{case.name}, {world_size} ranks"
            # (Over 2 ranks with the last one empty, rank 0's tokens are the whole batch.)
            if not (case.empty_last_rank and world_size == 2):
                assert not torch.allclose(torch.cat([y for y, _ in alone]), whole), what
            if case.config.get("router") == "expert_choice":
                continue
            dropped = [out.dropped_fraction.item() for _, out in alone]
            assert max(dropped) > 0 and len(set(dropped)) > 1, (what, dropped)


HIGHER_ORDER = [
    # impl="reference": the gradient penalty too (the fused loop refuses create_graph).
    LayerCase(
        "reference fp64, last rank empty, dead expert",
        dict(BASE, top_k=2, impl="reference", seq_aux_loss_coef=0.3),
        dtype=torch.float64,
        empty_last_rank=True,
        dead_expert=6,
    ),
    # The default path falls back to the reference loop for tangents and torch.func.
    LayerCase(
        "grouped fp64, shared expert",
        dict(BASE, top_k=3, num_shared_experts=1),
        dtype=torch.float64,
    ),
]


def test_second_derivatives_tangents_and_torch_func_equal_single_process() -> None:
    # They used to fail under expert parallelism: the all-to-all path ran the fused loop
    # whatever the layer's impl, and its collectives had neither a differentiable
    # backward, nor a jvp, nor the setup_context torch.func needs.
    world_size = 2
    ranks = pool(world_size).run(derivatives_worker, HIGHER_ORDER, timeout_s=120)
    for i, case in enumerate(HIGHER_ORDER):
        ref = derivatives_single_process(case, world_size)
        per_rank = [ranks[r][i] for r in range(world_size)]
        for key in ("tangent", "func_grad", "penalty_x_grad"):
            if key in ref:
                got = torch.cat([r[key] for r in per_rank])
                _close(got, ref[key], case.dtype, f"{case.name}: {key}")
        if "penalty_grads" in ref:
            num_local = case.config["num_experts"] // world_size
            ranks_grads = [r["penalty_grads"] for r in per_rank]
            _close_grads(ref["penalty_grads"], ranks_grads, num_local, case.dtype, "penalty ")


def test_cases_exercise_the_edge_cases() -> None:
    # The forcing in the cases must do what their names say, or the test above proves less.
    from parallel_cases import build_case

    for case in CASES:
        moe, x, mask, _ = build_case(case, 4)
        _, out = moe(x, padding_mask=mask)
        if case.dead_expert is not None:
            assert out.tokens_per_expert[case.dead_expert] == 0, case.name
        if case.hot_expert is not None:
            others = out.tokens_per_expert.sum() - out.tokens_per_expert[case.hot_expert]
            assert others == 0 and out.tokens_per_expert[case.hot_expert] > 0, case.name
        if case.empty_last_rank:
            assert mask[-1:].all(), case.name


def test_misuse_is_refused_with_the_value() -> None:
    messages = pool(2).run(errors_worker, timeout_s=60)[0]
    assert "ValueError" in messages["indivisible"] and "(3)" in messages["indivisible"]
    assert "group size 2" in messages["indivisible"]
    assert "already expert-parallel" in messages["twice"]
    assert "no MoE layer" in messages["no_moe"] and "Linear" in messages["no_moe"]
    assert "ValueError" in messages["bad_ep"] and "got 3" in messages["bad_ep"]
    # These had been AttributeErrors, or (timeouts) an OverflowError or a bare comparison
    # TypeError, none naming the argument.
    assert messages["group_name"].startswith("TypeError: group must be a torch.distributed")
    assert messages["stats_group"].startswith("TypeError: stats_group must be")
    assert messages["not_module"] == "TypeError: module must be an nn.Module, got Tensor"
    assert messages["inf_timeout"].startswith("ValueError: timeout_s must be in (0, ")
    assert messages["str_timeout"].startswith("TypeError: timeout_s must be a number")
