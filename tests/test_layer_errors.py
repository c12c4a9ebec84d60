"""Bad inputs fail early with TypeError/ValueError naming the argument and the value."""

from __future__ import annotations

import math
import re

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.config import IMPLS

GOOD = dict(d_model=24, d_ff=40, num_experts=8, top_k=2)


def _names(name: str, value: str) -> str:
    """A pattern requiring the argument's name, then later the offending value."""
    return rf"{re.escape(name)}.*{re.escape(value)}"


CONFIG_ERRORS = [
    # (changes, exception, argument, value as printed)
    (dict(top_k=9), ValueError, "top_k", "9"),
    (dict(top_k=0), ValueError, "top_k", "0"),
    (dict(d_model=0), ValueError, "d_model", "0"),
    (dict(d_ff=-3), ValueError, "d_ff", "-3"),
    (dict(num_experts=0), ValueError, "num_experts", "0"),
    (dict(d_model=24.0), TypeError, "d_model", "24.0"),
    (dict(num_experts=True), TypeError, "num_experts", "True"),
    (dict(router="softmax"), ValueError, "router", "'softmax'"),
    (dict(activation="relu"), ValueError, "activation", "'relu'"),
    (dict(impl="triton"), ValueError, "impl", "'triton'"),
    (dict(drop_policy="random"), ValueError, "drop_policy", "'random'"),
    (dict(router="sigmoid_bias", num_groups=3), ValueError, "num_groups", "3"),
    (dict(router="sigmoid_bias", num_groups=2, topk_groups=3), ValueError, "topk_groups", "3"),
    (dict(router="softmax_topk", num_groups=2), ValueError, "router", "'softmax_topk'"),
    (dict(router="sigmoid_bias", num_groups=4, topk_groups=1, top_k=3), ValueError, "top_k", "3"),
    (dict(capacity_factor=0.0), ValueError, "capacity_factor", "0.0"),
    (dict(capacity_factor=-1.5), ValueError, "capacity_factor", "-1.5"),
    (dict(capacity_factor="1"), TypeError, "capacity_factor", "'1'"),
    (dict(aux_loss_coef=-0.01), ValueError, "aux_loss_coef", "-0.01"),
    (dict(seq_aux_loss_coef=-1.0), ValueError, "seq_aux_loss_coef", "-1.0"),
    (dict(z_loss_coef=float("nan")), ValueError, "z_loss_coef", "nan"),
    (dict(router_jitter=1.0), ValueError, "router_jitter", "1.0"),
    (dict(router_noise=-0.1), ValueError, "router_noise", "-0.1"),
    (dict(router="expert_choice", router_noise=0.5), ValueError, "router_noise", "0.5"),
    (dict(routed_scaling_factor=0.0), ValueError, "routed_scaling_factor", "0"),
    (dict(bias_update_rate=-1e-3), ValueError, "bias_update_rate", "-0.001"),
    (dict(num_shared_experts=-1), ValueError, "num_shared_experts", "-1"),
    (dict(num_shared_experts=True), TypeError, "num_shared_experts", "True"),
    (dict(num_shared_experts=2.0), TypeError, "num_shared_experts", "2.0"),
    (dict(num_shared_experts=1, shared_d_ff=0), ValueError, "shared_d_ff", "0"),
    (dict(shared_expert_gate=True), ValueError, "num_shared_experts", "0"),
    (dict(shared_d_ff=16), ValueError, "shared_d_ff=16 needs num_shared_experts", "0"),
    (dict(norm_topk_prob="yes"), TypeError, "norm_topk_prob", "'yes'"),
    # Settings the router or a dropless layer would silently ignore.
    (dict(router="topk_softmax", norm_topk_prob=False), ValueError, "norm_topk_prob", "False"),
    (dict(router="expert_choice", norm_topk_prob=False), ValueError, "norm_topk_prob", "False"),
    (dict(drop_policy="position"), ValueError, "drop_policy", "'position'"),
    (
        dict(router="expert_choice", capacity_factor=1.0, drop_policy="position"),
        ValueError,
        "drop_policy",
        "'position'",
    ),
]


@pytest.mark.parametrize(
    ("changes", "exc", "name", "value"),
    CONFIG_ERRORS,
    ids=[f"{c[2]}={c[3]}" for c in CONFIG_ERRORS],
)
def test_bad_config_names_field_and_value(changes, exc, name, value):
    with pytest.raises(exc, match=_names(name, value)):
        MoEConfig(**{**GOOD, **changes})


def test_replace_validates_and_rejects_unknown_fields():
    cfg = MoEConfig(**GOOD)
    with pytest.raises(ValueError, match=_names("top_k", "0")):
        cfg.replace(top_k=0)
    with pytest.raises(ValueError, match=_names("field", "topk")):
        cfg.replace(topk=3)


def test_moe_needs_a_config():
    with pytest.raises(TypeError, match=_names("config", "{'d_model': 24}")):
        MoE({"d_model": 24})
    with pytest.raises(TypeError, match=_names("config", "None")):
        MoE(None)


@pytest.fixture(scope="module")
def moe() -> MoE:
    return MoE(MoEConfig(**GOOD))


@pytest.mark.parametrize(
    ("x", "exc", "name", "value"),
    [
        (torch.randn(2, 3, 7), ValueError, "x", "(2, 3, 7)"),
        (torch.randn(5, 25), ValueError, "x", "(5, 25)"),
        (torch.randn(1, 2, 3, 24), ValueError, "x", "(1, 2, 3, 24)"),
        (torch.randn(24), ValueError, "x", "(24,)"),
        (torch.ones(2, 3, 24, dtype=torch.long), TypeError, "x", "torch.int64"),
        (torch.ones(2, 3, 24, dtype=torch.bool), TypeError, "x", "torch.bool"),
        ([[0.0] * 24], TypeError, "x", "list"),
    ],
    ids=["last-dim", "last-dim-2d", "ndim-4", "ndim-1", "int", "bool", "list"],
)
def test_bad_input_names_x_and_value(moe, x, exc, name, value):
    with pytest.raises(exc, match=_names(name, value)):
        moe(x)


@pytest.mark.parametrize(
    ("mask", "exc", "value"),
    [
        (torch.zeros(2, 3), TypeError, "torch.float32"),
        (torch.zeros(2, 3, dtype=torch.long), TypeError, "torch.int64"),
        (torch.zeros(3, 2, dtype=torch.bool), ValueError, "(3, 2)"),
        (torch.zeros(6, dtype=torch.bool), ValueError, "(6,)"),
        (torch.zeros(2, 3, 24, dtype=torch.bool), ValueError, "(2, 3, 24)"),
        ([[False] * 3] * 2, TypeError, "list"),
    ],
    ids=["float", "long", "transposed", "flat", "per-feature", "list"],
)
def test_bad_padding_mask_names_mask_and_value(moe, mask, exc, value):
    with pytest.raises(exc, match=_names("padding_mask", value)):
        moe(torch.randn(2, 3, 24), padding_mask=mask)


def test_input_of_another_dtype_than_the_weights_is_named():
    moe = MoE(MoEConfig(**GOOD))
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 and the layer's weights"):
        moe(torch.randn(3, 24, dtype=torch.float64))
    # Under autocast the layer casts as nn.Linear does.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = moe(torch.randn(3, 24))
    assert y.dtype == torch.bfloat16
    # ... and leaves float64 alone, as autocast does: on every path, with or without
    # shared experts, the mismatch is named instead of failing inside a matmul.
    for impl in IMPLS:
        for shared in (0, 1):
            layer = MoE(MoEConfig(**GOOD, impl=impl, num_shared_experts=shared))
            with (
                torch.autocast("cpu", dtype=torch.bfloat16),
                pytest.raises(TypeError, match="autocast leaves float64 as it is"),
            ):
                layer(torch.randn(3, 24, dtype=torch.float64))


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_bias"])
def test_update_bias_names_a_load_of_the_wrong_shape(router):
    moe = MoE(MoEConfig(**{**GOOD, "router": router}))
    for load in (torch.tensor(5.0), torch.ones(3), torch.ones(2, 8)):
        with pytest.raises(ValueError, match=r"tokens_per_expert must have shape \[8\]"):
            moe.update_bias(load)
    with pytest.raises(TypeError, match="tokens_per_expert must be a .* got list"):
        moe.update_bias([1.0] * 8)
    # A NaN would make the mean NaN and skip the step for every expert, silently.
    for bad in (math.nan, math.inf, -1.0):
        load = torch.ones(8)
        load[3] = bad
        with pytest.raises(ValueError, match=r"tokens_per_expert must be finite counts >= 0"):
            moe.update_bias(load)
    moe.update_bias(torch.zeros(8))  # no tokens routed: a valid load


def test_the_config_cannot_be_replaced_in_part():
    # Assigned, it had changed the capacity but not the router's noise or the path.
    moe = MoE(MoEConfig(**GOOD))
    with pytest.raises(AttributeError, match="MoE.config is read-only"):
        moe.config = moe.config.replace(impl="reference")
    assert moe.config == MoEConfig(**GOOD)


def test_dropless_must_be_a_bool():
    moe = MoE(MoEConfig(**{**GOOD, "capacity_factor": 0.5}))
    with pytest.raises(TypeError, match="dropless must be a bool, got str 'no'"):
        moe(torch.randn(2, 3, 24), dropless="no")


def test_dropless_is_refused_by_expert_choice_which_has_no_such_form():
    moe = MoE(MoEConfig(**{**GOOD, "router": "expert_choice"}))
    with pytest.raises(ValueError, match="dropless=True cannot apply to router='expert_choice'"):
        moe(torch.randn(2, 3, 24), dropless=True)
    moe(torch.randn(2, 3, 24))  # routed as configured
