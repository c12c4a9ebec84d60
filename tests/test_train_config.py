"""TrainConfig validation, --set overrides, the learning-rate schedule and decay groups."""

from __future__ import annotations

import math

import pytest
from train_common import MICRO

from moekit.model import Transformer, get_preset
from moekit.train import TrainConfig
from moekit.train.optim import build_optimizer, lr_at
from moekit.train.overrides import apply_overrides, field_docs, parse_value


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"steps": 0}, "steps must be >= 1, got 0"),
        ({"steps": -5}, "steps must be >= 1, got -5"),
        ({"batch_size": 6, "grad_accum": 4}, "batch_size \\(6\\) must be a multiple of grad_accum"),
        ({"lr": 0.0}, "lr must be in \\(0.0, 10.0\\], got 0.0"),
        ({"val_fraction": 0.9}, "val_fraction must be in"),
        ({"device": "tpu"}, "device must be one of"),
        ({"compile": "max"}, "compile must be one of .*, got 'max'"),
        ({"data": ""}, "data must be a non-empty string"),
        ({"beta1": 1.0}, "beta1 must be in \\[0.0, 1.0\\), got 1.0"),
        ({"beta2": 1.0}, "beta2 must be in \\[0.0, 1.0\\), got 1.0"),
        ({"grad_clip": float("inf")}, "grad_clip must be in \\[0.0, inf\\), got inf"),
        ({"seed": 2**64}, "seed must be <= 18446744073709551615, got 18446744073709551616"),
        ({"seed": -1}, "seed must be >= 0, got -1"),
    ],
)
def test_bad_train_config_names_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_wrong_types_are_type_errors():
    with pytest.raises(TypeError, match="steps must be an int, got float 1.5"):
        TrainConfig(steps=1.5)
    with pytest.raises(TypeError, match="progress must be a bool"):
        TrainConfig(progress="yes")


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = TrainConfig(steps=101, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(3)] == pytest.approx([1e-4, 2e-4, 3e-4])
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    # Half-way through the decay the cosine is at its mid-point.
    assert lr_at(55, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    no_warmup = TrainConfig(steps=5, warmup_steps=0, lr=1.0, min_lr_ratio=0.0)
    assert lr_at(0, no_warmup) == pytest.approx(1.0)


@pytest.mark.parametrize(("steps", "warmup"), [(21, 20), (10, 20), (2, 20), (1, 0), (1, 5)])
def test_the_last_step_is_at_the_floor_whatever_the_lengths(steps, warmup):
    # A one-step decay (steps = warmup + 1) held the peak; a run shorter than its warm-up
    # ended part-way up.
    cfg = TrainConfig(steps=steps, warmup_steps=warmup, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(steps)]
    assert lrs[-1] == pytest.approx(1e-4)
    if steps > 1:
        assert max(lrs) == pytest.approx(1e-3)  # the warm-up, shortened, still reaches the peak


def test_no_weight_decay_on_norms_biases_or_the_router_bias():
    cfg = MICRO.replace(qkv_bias=True, moe=MICRO.moe.replace(router="sigmoid_bias"))
    model = Transformer(cfg)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.3))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | plain == set(names.values())
    assert all("norm" in n or "bias" in n for n in plain) and plain
    assert not any("norm" in n or n.endswith("bias") for n in decayed)
    assert any("router.weight" in n for n in decayed)
    assert "expert_bias" not in " ".join(decayed | plain)  # a buffer, out of the optimizer
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )


def test_overrides_change_nested_fields_and_keep_d_model_consistent():
    tiny = get_preset("tiny")
    cfg = apply_overrides(tiny, ["moe.top_k=4", "d_model=64", "dense_layers=0,2"])
    assert (cfg.d_model, cfg.moe.d_model, cfg.moe.top_k) == (64, 64, 4)
    assert cfg.dense_layers == (0, 2)
    assert cfg.num_layers == tiny.num_layers
    assert apply_overrides(tiny, ["moe.capacity_factor=None"]).moe.capacity_factor is None
    assert apply_overrides(tiny, ["moe.capacity_factor=1.25"]).moe.capacity_factor == 1.25
    assert apply_overrides(tiny, []) is tiny


def test_unknown_or_malformed_overrides_are_clear_errors():
    tiny = get_preset("tiny")
    with pytest.raises(
        ValueError, match=r"unknown override key 'moe.nope'; valid keys: \[.*moe.top_k"
    ):
        apply_overrides(tiny, ["moe.nope=1"])
    with pytest.raises(ValueError, match="unknown override key 'widht'.*'d_model'"):
        apply_overrides(tiny, ["widht=3"])
    with pytest.raises(ValueError, match=r"'moe.num_expert' \(did you mean 'moe.num_experts'\?\)"):
        apply_overrides(tiny, ["moe.num_expert=4"])
    with pytest.raises(ValueError, match="expects KEY=VALUE"):
        apply_overrides(tiny, ["d_model"])
    with pytest.raises(ValueError, match="'batch_size' is a training setting.*--batch-size"):
        apply_overrides(tiny, ["batch_size=4"])
    with pytest.raises(ValueError, match="ModelConfig.d_model takes int, got 'wide'"):
        apply_overrides(tiny, ["d_model=wide"])
    with pytest.raises(ValueError, match="top_k must be <= num_experts"):
        apply_overrides(tiny, ["moe.top_k=99"])


def test_help_text_comes_from_field_docstrings():
    docs = field_docs(TrainConfig)
    assert docs["steps"] == "Optimizer steps to train for."
    assert set(docs) == set(TrainConfig.__dataclass_fields__)
    assert parse_value(TrainConfig, "progress", "false") is False
    assert parse_value(TrainConfig, "lr", "2e-3") == 2e-3


def test_optimizer_takes_the_configs_betas_in_order():
    cfg = TrainConfig(beta1=0.8, beta2=0.95)
    optimizer = build_optimizer(Transformer(MICRO), cfg)
    assert {g["betas"] for g in optimizer.param_groups} == {(0.8, 0.95)}


def test_cuda_rng_states_are_restored_in_device_order():
    import torch

    from moekit.train.state import cuda_rng_states

    # Sorted as strings, rng.cuda.10 would come before rng.cuda.2.
    tensors = {f"rng.cuda.{i}": torch.tensor([i]) for i in range(12)}
    tensors["rng.cpu"] = torch.tensor([-1])
    assert [int(t) for t in cuda_rng_states(tensors)] == list(range(12))
