"""Tiny random Hugging Face MoE models, built with transformers inside the tests (no download).

Each family gets distinct odd sizes so a transpose or a swapped dimension cannot hide.
Weights are re-drawn with larger spread than transformers' std-0.02 init, and norm weights
away from 1, so routing is decisive (no near-ties) and a mis-mapped norm changes the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
VOCAB = 97


def hf_config(family: str, **overrides):
    """The transformers config of one tiny model of `family`."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=3, num_attention_heads=4)
    if family == "mixtral":
        kw = dict(
            intermediate_size=40,
            num_key_value_heads=2,
            num_local_experts=5,
            num_experts_per_tok=3,
            rope_theta=5000.0,
        )
        cls = tf.MixtralConfig
    elif family == "qwen2_moe":
        kw = dict(
            intermediate_size=44,
            moe_intermediate_size=20,
            shared_expert_intermediate_size=36,
            num_key_value_heads=2,
            num_experts=7,
            num_experts_per_tok=3,
            norm_topk_prob=False,
            mlp_only_layers=[1],
        )
        cls = tf.Qwen2MoeConfig
    elif family == "qwen3_moe":
        kw = dict(
            intermediate_size=44,
            moe_intermediate_size=20,
            num_key_value_heads=2,
            head_dim=10,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        )
        cls = tf.Qwen3MoeConfig
    elif family == "olmoe":
        kw = dict(
            hidden_size=30,
            num_attention_heads=5,
            intermediate_size=20,
            num_key_value_heads=5,
            num_experts=5,
            num_experts_per_tok=3,
            clip_qkv=2.5,
            eos_token_id=VOCAB - 1,
        )
        cls = tf.OlmoeConfig
    elif family == "deepseek_v3":
        kw = dict(
            intermediate_size=40,
            moe_intermediate_size=12,
            first_k_dense_replace=1,
            num_key_value_heads=4,
            n_routed_experts=8,
            n_group=4,
            topk_group=2,
            num_experts_per_tok=3,
            n_shared_experts=2,
            routed_scaling_factor=1.7,
            q_lora_rank=16,
            kv_lora_rank=12,
            qk_rope_head_dim=4,
            qk_nope_head_dim=6,
            v_head_dim=5,
        )
        cls = tf.DeepseekV3Config
    else:
        raise ValueError(family)
    kw = {**common, **kw, **overrides}
    if "rope_theta" in kw:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
    # The eager loop over experts: transformers' grouped_mm path needs 16-byte strides.
    return cls(**kw, experts_implementation="eager")


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Redraw every weight: matrices N(0, 0.15^2), norms 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        if "norm" in name:
            p.copy_(1 + 0.1 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(0.15 * noise)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            # Signed, so some biased scores are negative and group masking is exercised.
            b.copy_(0.3 * torch.randn(b.shape, generator=g, dtype=torch.float64).to(b.dtype))


def build(family: str, directory: Path, seed: int = 0, **overrides):
    """Build, randomize and save one tiny model; returns the transformers model in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_config(family, **overrides))
    model = model.float().eval()
    randomize(model, seed)
    model.save_pretrained(directory)
    return model


def load_hf(directory: Path):
    """A saved checkpoint loaded back by transformers (float32, eval, eager experts)."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, experts_implementation="eager"
    )
    return model.eval()


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def random_ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    """[batch, seq] token ids below VOCAB, drawn from their own seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def moekit_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits
