"""A layer built on `meta` and given storage by `to_empty` initialises as construction does."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig


@pytest.mark.parametrize(
    "changes",
    [
        dict(router="sigmoid_bias"),
        dict(num_shared_experts=1, shared_expert_gate=True),
        dict(activation="gelu", router="expert_choice"),
    ],
)
def test_reset_parameters_after_to_empty_equals_construction(changes):
    cfg = MoEConfig(d_model=24, d_ff=20, num_experts=5, top_k=2, **changes)
    torch.manual_seed(0)
    built = MoE(cfg)
    with torch.device("meta"):
        deferred = MoE(cfg)
    deferred.to_empty(device="cpu")  # uninitialised memory: NaNs and garbage biases
    torch.manual_seed(0)
    deferred.reset_parameters()
    want, got = built.state_dict(), deferred.state_dict()
    assert list(got) == list(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    x = torch.randn(2, 3, 24)
    torch.testing.assert_close(deferred(x)[0], built(x)[0], rtol=0, atol=0)
