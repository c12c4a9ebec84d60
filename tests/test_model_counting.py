"""Parameter and FLOP counts: meta-device counts against materialised models and a FLOP
counter, the dense twin's equal FFN FLOPs, and the published sizes of the large presets."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moekit import MoEConfig
from moekit.mlp import MLP
from moekit.model import PRESETS, ModelConfig, Transformer, count_parameters, dense_twin
from moekit.model import flops_per_token as flops

MOE = MoEConfig(d_model=24, d_ff=20, num_experts=5, top_k=2)
CONFIGS = {
    "moe": ModelConfig(
        vocab_size=37, d_model=24, num_layers=3, num_heads=4, num_kv_heads=2, moe=MOE
    ),
    "shared+dense+tied": ModelConfig(
        vocab_size=37,
        d_model=24,
        num_layers=4,
        num_heads=3,
        head_dim=10,
        qkv_bias=True,
        qk_norm="full",
        tie_embeddings=True,
        first_k_dense=1,
        moe_every=2,
        dense_d_ff=44,
        moe=MOE.replace(num_shared_experts=2, shared_d_ff=12, shared_expert_gate=True),
    ),
    "dense": ModelConfig(vocab_size=37, d_model=24, num_layers=2, num_heads=4, dense_d_ff=40),
    "mla": ModelConfig(
        vocab_size=37,
        d_model=24,
        num_layers=2,
        num_heads=3,
        attention="mla",
        q_lora_rank=10,
        kv_lora_rank=8,
        qk_nope_head_dim=6,
        qk_rope_head_dim=4,
        v_head_dim=5,
        moe=MOE,
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_meta_counts_equal_a_materialised_model(name) -> None:
    cfg = CONFIGS[name]
    model = Transformer(cfg)
    total, active = count_parameters(cfg)
    assert total == sum(p.numel() for p in model.parameters())
    inactive = sum(
        p.numel() * (m.config.num_experts - m.config.top_k) // m.config.num_experts
        for m in model.moe_layers()
        for p in m.experts.parameters()
    )
    assert active == total - inactive
    # The twin holds exactly the parameters a token uses, minus the router's.
    twin_total, twin_active = count_parameters(dense_twin(cfg))
    routers = sum(
        p.numel()
        for m in model.moe_layers()
        for mod in (m.router, m.shared_expert_gate)
        if mod is not None
        for p in mod.parameters()
    )
    assert twin_total == twin_active == active - routers


def _measured_matmul_flops(cfg: ModelConfig, batch: int, seq_len: int) -> int:
    """The mm and addmm FLOPs torch counts for one forward of a [batch, seq_len] batch."""
    model = Transformer(cfg)
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.randint(0, cfg.vocab_size, (batch, seq_len)))
    counts = counter.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if op.__name__.split(".")[0] in ("mm", "addmm"))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_flops_match_a_flop_counter(name) -> None:
    # Every token of a dropless MoE runs exactly K experts, so the matmul FLOPs torch counts
    # for T tokens are T times our per-token projections, FFN, router and lm_head.
    cfg = CONFIGS[name]
    measured = _measured_matmul_flops(cfg, batch=2, seq_len=9)
    f = flops(cfg, seq_len=9)
    assert measured == 18 * (f.attention + f.ffn + f.router + f.lm_head)


@pytest.mark.parametrize("name", ["moe", "shared+dense+tied", "mla"])
def test_dense_twin_has_equal_ffn_flops_and_same_attention(name) -> None:
    cfg = CONFIGS[name]
    twin = dense_twin(cfg)
    f, ft = flops(cfg), flops(twin)
    assert f.ffn == ft.ffn and ft.router == 0
    assert (f.attention, f.attention_scores, f.lm_head) == (
        ft.attention,
        ft.attention_scores,
        ft.lm_head,
    )
    model, twin_model = Transformer(cfg), Transformer(twin)
    assert twin_model.moe_layers() == []
    shapes = {k: v.shape for k, v in model.state_dict().items() if ".ffn." not in k}
    twin_shapes = {k: v.shape for k, v in twin_model.state_dict().items() if ".ffn." not in k}
    assert shapes == twin_shapes
    for i in cfg.moe_layer_ids:
        ffn = twin_model.layers[i].ffn
        assert isinstance(ffn, MLP) and ffn.up_proj.out_features == cfg.moe.active_ffn_width


def test_expert_choice_counts_the_experts_its_capacity_gives_a_token() -> None:
    # Each expert takes C = cf * T * K / E tokens: a token runs cf * K experts on average
    # (here 2 * 2 = 4 of 5), not K; the counts and the twin had used K.
    cfg = CONFIGS["moe"].replace(moe=MOE.replace(router="expert_choice", capacity_factor=2.0))
    assert cfg.moe.experts_per_token == 4.0 and cfg.moe.active_ffn_width == 4 * 20
    measured = _measured_matmul_flops(cfg, batch=2, seq_len=10)  # T = 20: C = 2*20*2/5 = 16
    f = flops(cfg, seq_len=10)
    assert measured == 20 * (f.attention + f.ffn + f.router + f.lm_head)
    assert flops(dense_twin(cfg)).ffn == f.ffn
    total, active = count_parameters(cfg)
    bank = sum(p.numel() for m in Transformer(cfg).moe_layers() for p in m.experts.parameters())
    assert total - active == bank // 5  # one expert of five left out per token
    # Capped at every expert: cf * K past E runs each expert on every token.
    assert cfg.moe.replace(capacity_factor=4.0).experts_per_token == 5.0


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: flops(CONFIGS["moe"], seq_len=0), ValueError, "seq_len must be an int >= 1"),
        (lambda: flops(CONFIGS["moe"], seq_len=1.5), ValueError, "seq_len must be an int >= 1"),
        (lambda: flops(CONFIGS["moe"], seq_len=10**6), ValueError, "<= the model's max_seq_len"),
        (lambda: flops(MOE), TypeError, "config must be a ModelConfig, got MoEConfig"),
        (lambda: dense_twin(MOE), TypeError, "config must be a ModelConfig, got MoEConfig"),
    ],
)
def test_counting_names_a_bad_argument(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


# Published sizes (total, active) in billions: Mixtral paper (46.7B/12.9B), OLMoE paper
# (6.9B/1.3B), Qwen3-30B-A3B model card (30.5B/3.3B), DeepSeek-V3 report (671B/37B, without
# the multi-token-prediction module).
PUBLISHED = {
    "mixtral-8x7b": (46.7, 12.9),
    "olmoe-1b-7b": (6.9, 1.3),
    "qwen3-moe-30b-a3b": (30.5, 3.3),
    "deepseek-v3": (671, 37),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_large_presets_match_published_sizes(name) -> None:
    total, active = count_parameters(PRESETS[name])
    want_total, want_active = PUBLISHED[name]
    assert total / 1e9 == pytest.approx(want_total, rel=0.01)
    assert active / 1e9 == pytest.approx(want_active, rel=0.03)


@pytest.mark.parametrize("name", ["moe", "mla"])
def test_attention_score_flops_count_the_causal_pairs(name) -> None:
    # torch's flop counter does not count CPU attention: count the query-key pairs. A
    # causal sequence of S tokens has 1 + 2 + ... + S of them, each a q.k product of
    # qk_head_dim and a weighted sum of value_head_dim per head (MLA: 10 and 5).
    cfg, S = CONFIGS[name], 9
    pairs = sum(p + 1 for p in range(S))
    per_pair = 2 * (cfg.qk_head_dim + cfg.value_head_dim)
    want = cfg.num_layers * cfg.num_heads * pairs * per_pair / S
    assert flops(cfg, seq_len=S).attention_scores == pytest.approx(want)
