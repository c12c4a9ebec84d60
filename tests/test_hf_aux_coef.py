"""router_aux_loss_coef read as the balancing weight transformers trains with.

transformers pools every MoE layer's statistics into one loss that scores K for a uniform
router; moekit scores each layer (1.0 when uniform) and sums them. The coefficient is
converted so that both weigh balancing alike (moekit.hf.families.base.with_aux_coef).
"""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import hf_config

tf = pytest.importorskip("transformers")

from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

from moekit.hf.families import FAMILIES, UnsupportedConfig  # noqa: E402
from moekit.losses import switch_aux_loss  # noqa: E402


def _hf_dict(family: str, **overrides) -> dict:
    return json.loads(hf_config(family, **overrides).to_json_string())


@pytest.mark.parametrize(("L", "K", "E"), [(3, 2, 5), (4, 1, 7), (2, 3, 4)])
def test_layers_alike_give_transformers_loss_and_gradient(L, K, E):
    """With the same routing in every layer, pooled and per-layer statistics agree, so the
    converted coefficient must give transformers' weighted loss and its gradient exactly."""
    torch.manual_seed(L * 10 + K)
    logits = torch.randn(13, E, dtype=torch.float64)
    hf_coef = 0.02
    cfg = FAMILIES["mixtral"].to_model_config(
        _hf_dict(
            "mixtral",
            num_hidden_layers=L,
            num_local_experts=E,
            num_experts_per_tok=K,
            router_aux_loss_coef=hf_coef,
        )
    )
    coef = cfg.moe.aux_loss_coef
    assert coef == pytest.approx(hf_coef * K / L, rel=1e-15)

    hf_leaves = [logits.clone().requires_grad_() for _ in range(L)]
    hf_loss = hf_coef * load_balancing_loss_func(tuple(hf_leaves), E, K)
    hf_loss.backward()

    ours_leaves = [logits.clone().requires_grad_() for _ in range(L)]
    ours = 0.0
    for leaf in ours_leaves:
        probs = leaf.softmax(-1)
        expert_A = probs.topk(K, dim=-1).indices.reshape(-1)
        ours = ours + coef * switch_aux_loss(probs, expert_A, E)
    ours.backward()

    torch.testing.assert_close(ours, hf_loss.to(ours.dtype), rtol=1e-6, atol=0)
    for a, b in zip(ours_leaves, hf_leaves, strict=True):
        torch.testing.assert_close(
            a.grad, b.grad, rtol=1e-5, atol=1e-10
        )  # transformers sums in float32


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_coefficient_counts_moe_layers_and_exports_back(family):
    hf = _hf_dict(family, num_hidden_layers=4, router_aux_loss_coef=0.03)
    if family == "qwen2_moe":
        hf.update(decoder_sparse_step=1, mlp_only_layers=[0, 2])  # two MoE layers of four
    cfg = FAMILIES[family].to_model_config(hf)
    layers = len(cfg.moe_layer_ids)
    assert layers == (2 if family == "qwen2_moe" else 4)
    assert cfg.moe.aux_loss_coef == pytest.approx(0.03 * cfg.moe.top_k / layers, rel=1e-15)
    back = FAMILIES[family].to_hf_config(cfg)["router_aux_loss_coef"]
    assert back == pytest.approx(0.03, rel=1e-15)


def test_a_coefficient_that_is_no_number_is_named():
    hf = {**_hf_dict("mixtral"), "router_aux_loss_coef": None}
    with pytest.raises(UnsupportedConfig, match="router_aux_loss_coef must be a number, got None"):
        FAMILIES["mixtral"].to_model_config(hf)
