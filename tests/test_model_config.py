"""ModelConfig: validation, JSON round trips, presets, layer placement, the dense twin."""

from __future__ import annotations

import json

import pytest

from moekit import MoEConfig
from moekit.model import PRESETS, ModelConfig, dense_twin, get_preset


def _cfg(**changes) -> ModelConfig:
    base = ModelConfig(
        vocab_size=37,
        d_model=24,
        num_layers=3,
        num_heads=3,
        num_kv_heads=1,
        max_seq_len=16,
        moe=MoEConfig(d_model=24, d_ff=20, num_experts=5, top_k=2),
    )
    return base.replace(**changes)


@pytest.mark.parametrize(
    ("changes", "error", "words"),
    [
        ({"num_heads": 5}, ValueError, ["num_heads", "5"]),
        ({"num_kv_heads": 2}, ValueError, ["num_kv_heads", "2"]),
        ({"d_model": 0}, ValueError, ["d_model", "0"]),
        ({"num_layers": -1}, ValueError, ["num_layers", "-1"]),
        ({"vocab_size": 0}, ValueError, ["vocab_size", "0"]),
        ({"max_seq_len": 0}, ValueError, ["max_seq_len", "0"]),
        ({"num_heads": 2.0}, TypeError, ["num_heads", "2.0"]),
        ({"head_dim": 7}, ValueError, ["head_dim", "7"]),
        ({"norm_eps": 0.0}, ValueError, ["norm_eps", "0.0"]),
        ({"rope_theta": float("nan")}, ValueError, ["rope_theta", "nan"]),
        ({"qk_norm": "layer"}, ValueError, ["qk_norm", "layer"]),
        ({"clip_qkv": -1.0}, ValueError, ["clip_qkv", "-1.0"]),
        ({"attention": "flash"}, ValueError, ["attention", "flash"]),
        ({"activation": "relu"}, ValueError, ["activation", "relu"]),
        ({"moe_every": 0}, ValueError, ["moe_every", "0"]),
        ({"first_k_dense": -2}, ValueError, ["first_k_dense", "-2"]),
        ({"first_k_dense": 4}, ValueError, ["first_k_dense", "4"]),
        ({"dense_layers": (5,)}, ValueError, ["dense_layers", "5"]),
        ({"dense_layers": [0]}, TypeError, ["dense_layers", "[0]"]),
        ({"moe": None}, ValueError, ["dense_d_ff", "None"]),
        ({"tie_embeddings": 1}, TypeError, ["tie_embeddings", "1"]),
        ({"attention": "mla", "num_kv_heads": None}, ValueError, ["kv_lora_rank", "None"]),
        # Settings the chosen attention or RoPE would ignore, silently.
        ({"attention": "mla"}, ValueError, ["num_kv_heads applies to attention='gqa'", "1"]),
        ({"kv_lora_rank": 8}, ValueError, ["kv_lora_rank apply to attention='mla'", "8"]),
        ({"rope_interleave": True}, ValueError, ["rope_interleave apply to attention='mla'"]),
        ({"rope_factor": 4.0}, ValueError, ["rope_factor apply to rope_type='yarn'", "4.0"]),
        ({"rope_theta": 1.0}, ValueError, ["rope_theta must be > 1", "1.0"]),
    ],
)
def test_bad_values_name_field_and_value(changes, error, words) -> None:
    with pytest.raises(error) as info:
        _cfg(**changes)
    for word in words:
        assert word in str(info.value)


def test_moe_width_must_match_model() -> None:
    with pytest.raises(ValueError, match=r"moe.d_model.*24.*32"):
        _cfg(moe=MoEConfig(d_model=32, d_ff=20, num_experts=5))


def test_mla_fields_validated_only_for_mla() -> None:
    assert _cfg(kv_lora_rank=None, v_head_dim=None).attention == "gqa"
    mla = _cfg(
        attention="mla",
        num_kv_heads=None,
        kv_lora_rank=8,
        qk_nope_head_dim=6,
        qk_rope_head_dim=4,
        v_head_dim=5,
    )
    assert (mla.rope_dim, mla.qk_head_dim, mla.value_head_dim) == (4, 10, 5)
    with pytest.raises(ValueError, match="qk_rope_head_dim.*3"):
        mla.replace(qk_rope_head_dim=3)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'nope'.*tiny"):
        get_preset("nope")
    assert get_preset("tiny") is PRESETS["tiny"]


def test_json_round_trip_every_preset() -> None:
    for name, cfg in PRESETS.items():
        back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg, name
    cfg = _cfg(dense_layers=(0, 2), moe=None, dense_d_ff=40)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_from_dict_rejects_unknown_keys() -> None:
    data = _cfg().to_dict()
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({**data, "bogus": 1})
    with pytest.raises(ValueError, match="extra"):
        ModelConfig.from_dict({**data, "moe": {**data["moe"], "extra": 1}})


def test_replace_rejects_unknown_field() -> None:
    with pytest.raises(ValueError, match="heads"):
        _cfg().replace(heads=4)


def test_derived_head_sizes() -> None:
    cfg = _cfg(num_kv_heads=None)
    assert (cfg.kv_heads, cfg.head_size) == (3, 8)
    assert _cfg(head_dim=6).head_size == 6


@pytest.mark.parametrize("step", [1, 2, 3])
@pytest.mark.parametrize("mlp_only", [(), (1,), (0, 5)])
def test_placement_follows_qwen_rule(step, mlp_only) -> None:
    # Qwen2/3-MoE: sparse iff not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
    cfg = _cfg(num_layers=7, moe_every=step, dense_layers=mlp_only)
    expected = tuple(i for i in range(7) if i not in mlp_only and (i + 1) % step == 0)
    assert cfg.moe_layer_ids == expected


def test_placement_follows_deepseek_rule() -> None:
    # DeepSeek-V3: sparse iff layer_idx >= first_k_dense_replace.
    cfg = _cfg(num_layers=6, first_k_dense=3, dense_d_ff=44)
    assert cfg.moe_layer_ids == (3, 4, 5)
    assert PRESETS["deepseek-v3"].moe_layer_ids == tuple(range(3, 61))


def test_dense_twin_config() -> None:
    cfg = _cfg(first_k_dense=1, dense_d_ff=44)
    twin = dense_twin(cfg)
    assert twin.moe_layer_ids == ()
    assert [twin.is_sparse_place(i) for i in range(3)] == [False, True, True]
    assert dense_twin(twin) == twin
    dense = _cfg(moe=None, dense_d_ff=30)
    assert dense_twin(dense) is dense
    with pytest.raises(ValueError, match="moe_as_dense"):
        dense.replace(moe_as_dense=True)
