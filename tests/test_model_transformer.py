"""The transformer: KV-cache parity, padding, losses, bias updates, init, bad input, learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from moekit import MoEConfig
from moekit.model import ModelConfig, Transformer

V = 37


def _cfg(**changes) -> ModelConfig:
    base = ModelConfig(
        vocab_size=V,
        d_model=24,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=16,
        moe=MoEConfig(d_model=24, d_ff=20, num_experts=5, top_k=2, num_shared_experts=1),
        first_k_dense=1,
        dense_d_ff=28,
        init_std=0.2,
    )
    return base.replace(**changes)


def _model(cfg: ModelConfig) -> Transformer:
    return Transformer(cfg).double().eval()


@pytest.mark.parametrize("qk_norm", [None, "head", "full"])
@pytest.mark.parametrize("dense", [False, True])
def test_kv_cache_decode_equals_full_forward(qk_norm, dense) -> None:
    changes = {"qk_norm": qk_norm, "tie_embeddings": True}
    if dense:
        changes["moe"] = None
    model = _model(_cfg(**changes))
    ids = torch.randint(0, V, (2, 11))
    full = model(ids).logits
    cache = model.new_cache(2, 11)
    parts = [model(ids[:, :5], cache=cache).logits]
    for t in range(5, 11):
        parts.append(model(ids[:, t : t + 1], cache=cache).logits)
    assert cache.pos == 11
    assert_close(torch.cat(parts, dim=1), full)
    # A second chunk of several tokens against a filled cache takes the explicit-mask branch.
    cache.reset()
    chunked = [model(ids[:, :4], cache=cache).logits, model(ids[:, 4:], cache=cache).logits]
    assert_close(torch.cat(chunked, dim=1), full)


def test_left_padding_leaves_real_tokens_unchanged() -> None:
    # RoPE scores depend on relative positions only, so a sequence shifted right by padding
    # gives the same logits at its real tokens; padding is routed nowhere.
    model = _model(_cfg())
    ids = torch.randint(0, V, (1, 7))
    alone = model(ids)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    pad = torch.zeros(1, 10, dtype=torch.bool)
    pad[:, :3] = True
    out = model(padded, padding_mask=pad)
    assert_close(out.logits[:, 3:], alone.logits)
    for o in out.moe:
        assert o.tokens_per_expert.sum() == 7 * 2
    # The same through the cache, padding given once at prefill.
    cache = model.new_cache(1, 10)
    first = model(padded[:, :5], padding_mask=pad[:, :5], cache=cache).logits
    rest = [model(padded[:, t : t + 1], cache=cache).logits for t in range(5, 10)]
    assert_close(torch.cat([first, *rest], dim=1)[:, 3:], alone.logits)


def test_aux_loss_sums_weighted_layer_losses_and_trains_router() -> None:
    model = Transformer(_cfg())
    out = model(torch.randint(0, V, (2, 9)))
    assert len(out.moe) == len(model.moe_layers()) == 2
    assert_close(out.aux_loss, out.moe[0].loss + out.moe[1].loss)
    out.aux_loss.backward()
    router = model.moe_layers()[0].router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    dense_out = Transformer(_cfg(moe=None))(torch.randint(0, V, (2, 9)))
    assert dense_out.moe == [] and dense_out.aux_loss.item() == 0.0


def test_update_bias_moves_every_sigmoid_router() -> None:
    moe = MoEConfig(d_model=24, d_ff=20, num_experts=5, top_k=2, router="sigmoid_bias")
    model = Transformer(_cfg(moe=moe, first_k_dense=0))
    loads = [torch.tensor([9.0, 1, 1, 1, 1]), torch.ones(5), torch.tensor([1.0, 1, 1, 1, 9])]
    model.update_bias(loads)
    rate = moe.bias_update_rate
    biases = [m.router.expert_bias for m in model.moe_layers()]
    assert_close(biases[0], torch.tensor([-rate, rate, rate, rate, rate]))
    assert_close(biases[1], torch.zeros(5))
    assert_close(biases[2], torch.tensor([rate, rate, rate, rate, -rate]))
    with pytest.raises(ValueError, match="3.*got 2"):
        model.update_bias(loads[:2])


def test_parameter_names_follow_the_contract() -> None:
    names = set(dict(Transformer(_cfg(qk_norm="head")).named_parameters()))
    for expected in (
        "embed.weight",
        "layers.0.attn_norm.weight",
        "layers.0.attn.q_proj.weight",
        "layers.0.attn.k_proj.weight",
        "layers.0.attn.v_proj.weight",
        "layers.0.attn.o_proj.weight",
        "layers.0.attn.q_norm.weight",
        "layers.0.ffn_norm.weight",
        "layers.0.ffn.gate_proj.weight",
        "layers.1.ffn.router.weight",
        "layers.1.ffn.experts.w_up_EFD",
        "layers.2.ffn.shared_experts.down_proj.weight",
        "norm.weight",
        "lm_head.weight",
    ):
        assert expected in names, expected
    tied = Transformer(_cfg(tie_embeddings=True))
    assert tied.lm_head.weight is tied.embed.weight


def test_init_weights_gives_documented_std() -> None:
    cfg = ModelConfig(
        vocab_size=300,
        d_model=96,
        num_layers=4,
        num_heads=4,
        max_seq_len=8,
        qkv_bias=True,
        moe=MoEConfig(d_model=96, d_ff=64, num_experts=4, top_k=2, router="sigmoid_bias"),
        init_std=0.05,
    )
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
        model.moe_layers()[0].router.expert_bias.fill_(3.0)
    model.init_weights()
    out_std = 0.05 / math.sqrt(2 * 4)
    p = dict(model.named_parameters())
    for name, std in [
        ("embed.weight", 0.05),
        ("lm_head.weight", 0.05),
        ("layers.1.attn.q_proj.weight", 0.05),
        ("layers.1.attn.o_proj.weight", out_std),
        ("layers.1.ffn.router.weight", 0.05),
        ("layers.1.ffn.experts.w_gate_EFD", 0.05),
        ("layers.1.ffn.experts.w_down_EDF", out_std),
    ]:
        # Four standard errors of the sample std (std / sqrt(2n)) and of the mean.
        n = p[name].numel()
        assert abs(p[name].std().item() - std) < 4 * std / math.sqrt(2 * n), name
        assert abs(p[name].mean().item()) < 4 * std / math.sqrt(n), name
    assert torch.equal(p["layers.1.attn.q_proj.bias"], torch.zeros(96))
    assert torch.equal(p["layers.1.attn_norm.weight"], torch.ones(96))
    assert torch.equal(model.moe_layers()[0].router.expert_bias, torch.zeros(4))


@pytest.mark.parametrize("tie", [False, True])
def test_meta_build_materialises_with_init_weights(tie) -> None:
    cfg = _cfg().replace(tie_embeddings=tie)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    ref = Transformer(cfg)
    assert torch.equal(model.rope.cos, ref.rope.cos)
    assert torch.isfinite(model(torch.randint(0, V, (1, 4))).logits).all()
    # to_empty gives the tied head a storage of its own: init_weights ties it again.
    assert (model.lm_head.weight is model.embed.weight) == tie
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    assert (
        abs(model.lm_head.weight.std() - ref.lm_head.weight.std()) < 0.1 * ref.lm_head.weight.std()
    )


@pytest.mark.parametrize(
    ("ids", "error", "match"),
    [
        (torch.tensor([[1, V]]), ValueError, rf"vocab_size={V}.*\[1, {V}\]"),
        (torch.tensor([[-1, 2]]), ValueError, "vocab_size"),
        (torch.zeros(1, 17, dtype=torch.long), ValueError, "max_seq_len.*16.*17"),
        (torch.zeros(1, 3), TypeError, "int64 or int32"),
        (torch.zeros(1, 3, dtype=torch.uint8), TypeError, "int64 or int32.*uint8"),
        (torch.zeros(1, 3, dtype=torch.int16), TypeError, "int64 or int32.*int16"),
        (torch.zeros(3, dtype=torch.long), ValueError, r"\[B, S\]"),
    ],
)
def test_bad_ids(ids, error, match) -> None:
    with pytest.raises(error, match=match):
        Transformer(_cfg())(ids)


@pytest.mark.parametrize("yarn", [False, True])
def test_rope_tables_survive_a_round_trip_through_bf16(yarn) -> None:
    # .to(bf16) had rounded the tables (by up to 2e-3) and .float() kept the rounding:
    # the logits differed from those with the tables computed afresh.
    changes = dict(rope_type="yarn", rope_factor=4.0, rope_original_max_seq_len=4) if yarn else {}
    torch.manual_seed(0)
    model = Transformer(_cfg(**changes))
    cos = model.rope.cos.clone()
    model.bfloat16()
    assert model.rope.cos.dtype == torch.float32 and torch.equal(model.rope.cos, cos)
    ids = torch.randint(0, V, (2, 9))
    got = model.float()(ids).logits
    model.rope.reset_parameters()
    torch.testing.assert_close(got, model(ids).logits, rtol=0, atol=0)
    assert model.double().rope.cos.dtype == torch.float64


def test_a_batch_of_no_rows_gives_empty_logits() -> None:
    # The MoE layer takes B = 0; the model had failed in its id range check (min() of
    # nothing) and then in attention's reshape of 0 elements.
    model = Transformer(_cfg())
    out = model(torch.zeros(0, 3, dtype=torch.long))
    assert out.logits.shape == (0, 3, V) and float(out.aux_loss.detach()) == 0.0
    (out.logits.sum() + out.aux_loss).backward()
    from moekit.generate import generate

    with pytest.raises(ValueError, match=r"prompt_ids must hold at least one token .* \(0, 3\)"):
        generate(model, torch.zeros(0, 3, dtype=torch.long), 2)


def test_bad_cache_and_padding() -> None:
    model = Transformer(_cfg())
    cache = model.new_cache(1, 6)
    model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="6 positions"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="batch size 1"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.new_cache(1, 17)
    with pytest.raises(TypeError, match="bool"):
        model(torch.zeros(1, 3, dtype=torch.long), padding_mask=torch.zeros(1, 3))
    with pytest.raises(TypeError, match="ModelConfig"):
        Transformer({"d_model": 24})


def _train(model: Transformer, ids: torch.Tensor, steps: int, lr: float) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        out = model(ids[:, :-1])
        ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        (ce + out.aux_loss).backward()
        opt.step()
        losses.append(ce.item())
    return losses


def test_loss_falls_on_a_fixed_batch() -> None:
    model = Transformer(_cfg(init_std=0.02))
    losses = _train(model, torch.randint(0, V, (4, 16)), steps=8, lr=1e-2)
    assert losses[0] == pytest.approx(math.log(V), abs=0.1)
    assert losses[-1] < losses[0] - 0.5


def test_overfits_a_repeated_string() -> None:
    text = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. " * 3
    data = torch.tensor(list(text[:200]))
    cfg = ModelConfig(
        vocab_size=256,
        d_model=48,
        num_layers=2,
        num_heads=4,
        max_seq_len=64,
        moe=MoEConfig(d_model=48, d_ff=48, num_experts=4, top_k=2),
    )
    model = Transformer(cfg)
    starts = torch.arange(0, 200 - 49, 10)
    ids = torch.stack([data[s : s + 49] for s in starts])
    losses = _train(model, ids, steps=120, lr=1e-2)
    assert losses[-1] < 0.1, losses[-10:]


def test_padding_given_in_a_later_chunk_and_after_reset() -> None:
    model = _model(_cfg())
    ids = torch.randint(0, V, (2, 8))
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[1, 4:6] = True  # padding inside the second chunk only
    with torch.no_grad():
        full = model(ids, padding_mask=pad).logits
        cache = model.new_cache(2, 8)
        first = model(ids[:, :4], cache=cache).logits
        second = model(ids[:, 4:], padding_mask=pad[:, 4:], cache=cache).logits
        real = ~pad
        assert_close(torch.cat([first, second], dim=1)[real], full[real])
        # After a reset the cache forgets that padding: as a fresh cache.
        cache.reset()
        again = model(ids, cache=cache).logits
        assert_close(again, model(ids, cache=model.new_cache(2, 8)).logits)
