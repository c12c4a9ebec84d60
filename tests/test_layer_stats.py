"""Balancing losses and routing statistics are computed when needed, with the same values.

Shapes: B batch, S sequence, D model dim, E experts.
"""

from __future__ import annotations

import pytest
import torch
from train_common import MICRO

from moekit import MoE, MoEConfig, losses
from moekit.model import Transformer
from moekit.paths import GroupedPath
from moekit.routing_stats import STATISTICS

D, E = 24, 5
FUNCTIONS = ("switch_aux_loss", "sequence_aux_loss", "z_loss", "router_entropy")


@pytest.fixture
def calls(monkeypatch) -> dict[str, int]:
    """How often each loss function of moekit.losses has run."""
    counts = dict.fromkeys(FUNCTIONS, 0)
    for name in FUNCTIONS:
        original = getattr(losses, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(losses, name, counted)
    return counts


def _moe(**overrides) -> MoE:
    cfg = dict(d_model=D, d_ff=20, num_experts=E, top_k=2, aux_loss_coef=0.01)
    return MoE(MoEConfig(**{**cfg, **overrides}))


def test_a_no_grad_forward_computes_nothing_until_read(calls):
    moe = _moe(z_loss_coef=0.001)
    with torch.no_grad():
        _, out = moe(torch.randn(2, 7, D))
    assert calls == dict.fromkeys(FUNCTIONS, 0)
    z = out.z_loss
    assert calls["z_loss"] == 1 and out.z_loss is z  # kept once computed
    out.loss  # noqa: B018 - the weighted terms: Switch and z (already there)
    assert calls == {"switch_aux_loss": 1, "sequence_aux_loss": 0, "z_loss": 1, "router_entropy": 0}
    assert not out.loss.requires_grad


def test_a_training_forward_computes_only_the_weighted_terms(calls):
    moe = _moe(seq_aux_loss_coef=0.0, z_loss_coef=0.0)
    _, out = moe(torch.randn(2, 7, D))
    assert calls == {"switch_aux_loss": 1, "sequence_aux_loss": 0, "z_loss": 0, "router_entropy": 0}
    assert out.loss.requires_grad


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("name", ["seq_aux_loss", "z_loss"])
def test_a_statistic_read_under_no_grad_keeps_the_forwards_graph(mode, name):
    # Logging inside torch.no_grad() or inference_mode() must not strip a loss a caller
    # adds to training later.
    moe = _moe()
    _, out = moe(torch.randn(2, 7, D))
    with mode():
        value = getattr(out, name)
    assert value.requires_grad
    (grad,) = torch.autograd.grad(value, moe.router.weight)
    assert grad.abs().sum() > 0


def test_an_inference_mode_forward_computes_statistics_without_graph():
    moe = _moe()
    with torch.inference_mode():
        _, out = moe(torch.randn(2, 7, D))
    for name in ("loss", "seq_aux_loss", "z_loss"):
        assert not getattr(out, name).requires_grad


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"capacity_factor": 0.6},
        {"router": "sigmoid_bias", "z_loss_coef": 0.001, "seq_aux_loss_coef": 0.01},
        {"router": "expert_choice"},
        {"aux_loss_coef": 0.0},
    ],
    ids=["softmax", "capacity", "sigmoid_bias", "expert_choice", "no_weighted_term"],
)
def test_values_read_later_equal_values_computed_in_the_forward(overrides):
    moe = _moe(**overrides)
    x = torch.randn(3, 9, D)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[1, 4:] = True
    _, eager = moe(x, padding_mask=mask)
    eager._stats.compute_all()
    with torch.no_grad():
        _, lazy = moe(x, padding_mask=mask)
    for name in STATISTICS:
        assert torch.equal(getattr(lazy, name), getattr(eager, name).detach()), name
    assert torch.equal(lazy.tokens_per_expert, eager.tokens_per_expert)


def test_a_collective_path_computes_every_statistic_in_the_forward():
    # With group_sum a collective, every rank must run each all-reduce in the same order,
    # whatever its caller reads: nothing may be left for a later read.
    sums = []

    class CollectivePath(GroupedPath):
        collective_stats = True

        def group_sum(self, t):
            sums.append(tuple(t.shape))
            return t

    moe = _moe(seq_aux_loss_coef=0.01, z_loss_coef=0.001)
    moe.path = CollectivePath()
    with torch.no_grad():
        _, out = moe(torch.randn(2, 7, D))
    done = len(sums)
    assert done > 0
    for name in STATISTICS:
        getattr(out, name)
    assert len(sums) == done


def test_the_models_aux_loss_follows_its_layers():
    model = Transformer(MICRO)
    ids = torch.randint(0, MICRO.vocab_size, (2, 11))
    trained = model(ids)
    assert trained.aux_loss.requires_grad
    with torch.no_grad():
        decoded = model(ids)
    assert "aux_loss" not in vars(decoded)  # not summed unless read
    assert torch.equal(decoded.aux_loss, trained.aux_loss.detach())
    assert decoded.aux_loss > 0
