"""YaRN rotary scaling: frequencies against a float64 transcription of the paper's formulas,
config validation, and tiny random DeepSeek-V3 / Qwen3-MoE checkpoints with yarn rope
parameters that load with transformers' logits over sequences longer than the original
context, generate identically and export back unchanged."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from moekit.model.config import ModelConfig
from moekit.model.rope import RotaryEmbedding, Yarn, yarn_mscale

TOL = dict(atol=1e-5, rtol=1e-5)
ORIGINAL = 16
SEQ = 40
# DeepSeek-V3's release settings, with a context short enough to test past.
DEEPSEEK_YARN = dict(
    rope_type="yarn",
    factor=4.0,
    original_max_position_embeddings=ORIGINAL,
    beta_fast=32,
    beta_slow=1,
    mscale=1.0,
    mscale_all_dim=1.0,
    rope_theta=10000.0,
)
# Qwen3's plain YaRN: the cos/sin factor comes from factor alone (0.1 ln 4 + 1).
QWEN_YARN = dict(
    rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL, rope_theta=10000.0
)


def _reference_inv_freq(dim, theta, factor, original, beta_fast, beta_slow):
    """YaRN §3.2 NTK-by-parts in float64, written from the paper, with truncated ramp ends."""

    def pair(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(pair(beta_fast)), 0)
    high = min(math.ceil(pair(beta_slow)), dim - 1)
    out = []
    for d in range(dim // 2):
        base = theta ** (-2 * d / dim)
        ramp = min(max((d - low) / (high - low), 0.0), 1.0)
        out.append(base / factor * ramp + base * (1 - ramp))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(("dim", "theta", "original"), [(10, 10000.0, 16), (64, 1e6, 4096)])
def test_yarn_frequencies_match_float64_formula(dim, theta, original):
    yarn = Yarn(factor=40.0, original_max_seq_len=original, beta_fast=32.0, beta_slow=1.0)
    got = yarn.inv_freq(dim, theta).double()
    want = _reference_inv_freq(dim, theta, 40.0, original, 32.0, 1.0)
    torch.testing.assert_close(got, want, atol=0, rtol=1e-6)
    # Both regimes occur: the fastest pair is kept, the slowest divided by the factor.
    assert got[0] == pytest.approx(1.0, rel=1e-6)
    assert got[-1] == pytest.approx(theta ** (-(dim - 2) / dim) / 40.0, rel=1e-6)


def test_yarn_tables_scale_and_softmax_factor():
    plain = Yarn(factor=4.0, original_max_seq_len=16)
    assert plain.table_scale == pytest.approx(0.1 * math.log(4.0) + 1)
    assert plain.softmax_scale_factor == 1.0
    deepseek = Yarn(factor=40.0, original_max_seq_len=16, mscale=1.0, mscale_all_dim=1.0)
    assert deepseek.table_scale == 1.0
    assert deepseek.softmax_scale_factor == pytest.approx(0.1 * math.log(40.0) + 1)
    assert Yarn(factor=4.0, original_max_seq_len=16, attention_factor=0.7).table_scale == 0.7
    assert yarn_mscale(1.0, 5.0) == 1.0
    rope = RotaryEmbedding(10, 500.0, 24, yarn=plain)
    pos = torch.arange(24, dtype=torch.float64)[:, None]
    angles = pos * _reference_inv_freq(10, 500.0, 4.0, 16, 32.0, 1.0)[None, :]
    want = torch.cat((angles, angles), -1).cos() * plain.table_scale
    torch.testing.assert_close(rope.cos.double(), want, atol=1e-5, rtol=0)


def test_default_rope_unchanged_by_yarn_fields():
    # Only rope_type switches YaRN on: YaRN fields without it are refused (they used to be
    # ignored silently), and plain RoPE is the textbook one.
    with pytest.raises(ValueError, match="rope_factor, rope_mscale_all_dim apply to rope_type"):
        ModelConfig(dense_d_ff=32, rope_factor=8.0, rope_mscale_all_dim=1.0)
    cfg = ModelConfig(dense_d_ff=32)
    assert cfg.yarn is None
    rope = RotaryEmbedding(cfg.rope_dim, cfg.rope_theta, cfg.max_seq_len, yarn=cfg.yarn)
    exponent = torch.arange(0, cfg.rope_dim, 2, dtype=torch.float32) / cfg.rope_dim
    inv_freq = 1.0 / (cfg.rope_theta**exponent)
    freqs = torch.arange(cfg.max_seq_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
    assert torch.equal(rope.cos, torch.cat((freqs, freqs), -1).cos())


@pytest.mark.parametrize(
    ("changes", "error", "words"),
    [
        ({"rope_type": "linear"}, ValueError, ["rope_type", "linear"]),
        ({"rope_type": "yarn"}, ValueError, ["rope_original_max_seq_len", "None"]),
        (
            {"rope_type": "yarn", "rope_original_max_seq_len": 8, "rope_factor": 0.5},
            ValueError,
            ["rope_factor", "0.5"],
        ),
        ({"rope_factor": float("inf")}, ValueError, ["rope_factor", "inf"]),
        ({"rope_original_max_seq_len": 8.0}, TypeError, ["rope_original_max_seq_len", "8.0"]),
        ({"rope_beta_fast": -1.0}, ValueError, ["rope_beta_fast", "-1.0"]),
        (
            {"rope_type": "yarn", "rope_original_max_seq_len": 8, "rope_beta_fast": 0.5},
            ValueError,
            ["rope_beta_fast", "0.5"],
        ),
        ({"rope_mscale": -0.5}, ValueError, ["rope_mscale", "-0.5"]),
        ({"rope_mscale_all_dim": "1"}, TypeError, ["rope_mscale_all_dim", "'1'"]),
        ({"rope_attention_factor": 0.0}, ValueError, ["rope_attention_factor", "0.0"]),
        ({"rope_truncate": 1}, TypeError, ["rope_truncate", "1"]),
    ],
)
def test_rope_config_errors_name_field_and_value(changes, error, words):
    with pytest.raises(error) as info:
        ModelConfig(dense_d_ff=32, **changes)
    for word in words:
        assert word in str(info.value)


def test_yarn_config_round_trips_through_dict():
    cfg = ModelConfig(
        dense_d_ff=32,
        rope_type="yarn",
        rope_factor=40.0,
        rope_original_max_seq_len=64,
        rope_mscale=1.0,
        rope_mscale_all_dim=0.707,
        rope_truncate=False,
    )
    back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.yarn == cfg.yarn


# Hugging Face parity -------------------------------------------------------------------

transformers = pytest.importorskip("transformers")

import hf_models  # noqa: E402

import moekit  # noqa: E402
from moekit.generate import generate  # noqa: E402
from moekit.hf.export import save_pretrained  # noqa: E402

CASES = {
    "deepseek_v3": dict(rope_parameters=DEEPSEEK_YARN, max_position_embeddings=64),
    "qwen3_moe": dict(rope_parameters=QWEN_YARN, max_position_embeddings=64),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    family = request.param
    directory = tmp_path_factory.mktemp(f"yarn_{family}")
    hf = hf_models.build(family, directory, seed=7, **CASES[family])
    assert hf.config.rope_parameters["rope_type"] == "yarn"
    return family, directory, hf


_ids = functools.partial(hf_models.random_ids, batch=2, seq=SEQ, seed=1)
_logits = hf_models.moekit_logits


def test_yarn_config_is_mapped(checkpoint):
    family, directory, _ = checkpoint
    cfg = moekit.from_pretrained(directory).config
    assert cfg.rope_type == "yarn" and cfg.rope_factor == 4.0
    assert cfg.rope_original_max_seq_len == ORIGINAL
    want_mscale = 1.0 if family == "deepseek_v3" else None
    assert cfg.rope_mscale == want_mscale and cfg.rope_mscale_all_dim == want_mscale


def test_yarn_logits_equal_transformers_past_original_context(checkpoint):
    _, directory, hf = checkpoint
    model = moekit.from_pretrained(directory)
    ids = _ids()
    got, want = _logits(model, ids), hf_models.hf_logits(hf, ids)
    torch.testing.assert_close(got, want, **TOL)
    # Without YaRN the same weights give other logits: the scaling is really exercised.
    plain = moekit.from_pretrained(directory)
    plain.rope.yarn = None
    plain.rope.reset_parameters()
    assert (_logits(plain, ids) - want).abs().max() > 1e-3


def test_yarn_greedy_generation_identical(checkpoint):
    _, directory, hf = checkpoint
    model = moekit.from_pretrained(directory)
    prompt = _ids(batch=2, seq=ORIGINAL + 4, seed=2)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=12, do_sample=False)
    got = generate(model, prompt, max_new_tokens=12, temperature=0)
    assert torch.equal(got, want)


def test_yarn_export_round_trip(checkpoint, tmp_path):
    _, directory, hf = checkpoint
    model = moekit.from_pretrained(directory)
    save_pretrained(model, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())["rope_parameters"]
    source = hf.config.rope_parameters
    for key, value in source.items():
        if key != "truncate":
            assert written[key] == value, key
    assert moekit.from_pretrained(tmp_path / "out").config == model.config
    back = hf_models.load_hf(tmp_path / "out")
    ids = _ids(seed=3)
    torch.testing.assert_close(hf_models.hf_logits(back, ids), hf_models.hf_logits(hf, ids), **TOL)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_release_sized_yarn_matches_transformers_tables_and_scale(family):
    # DeepSeek-V3's released rope settings (factor 40 over 4096 positions, rotary width 64)
    # and a Qwen3-style 32k -> 128k yarn: frequencies and factors equal transformers' bitwise.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    from moekit.hf.families import FAMILIES

    if family == "deepseek_v3":
        params = dict(DEEPSEEK_YARN, factor=40, original_max_position_embeddings=4096)
        overrides = dict(qk_rope_head_dim=64, qk_nope_head_dim=128, max_position_embeddings=163840)
    else:
        params = dict(QWEN_YARN, factor=4.0, original_max_position_embeddings=32768)
        params["rope_theta"] = 1e6
        overrides = dict(head_dim=128, max_position_embeddings=131072)
    hf_cfg = hf_models.hf_config(family, rope_parameters=params, **overrides)
    want_inv_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    cfg = FAMILIES[family].to_model_config(hf_cfg.to_dict())
    got_inv_freq = cfg.yarn.inv_freq(cfg.rope_dim, cfg.rope_theta)
    assert torch.equal(got_inv_freq, want_inv_freq)
    assert cfg.yarn.table_scale == want_factor
    if family == "deepseek_v3":
        from moekit.model.mla import MultiHeadLatentAttention

        want_scale = yarn_apply_mscale(hf_cfg.rope_parameters, cfg.qk_head_dim**-0.5)
        small = cfg.replace(d_model=24, num_heads=1, kv_lora_rank=4, q_lora_rank=None)
        assert MultiHeadLatentAttention(small, 0).scale == want_scale
        assert want_scale != cfg.qk_head_dim**-0.5


@pytest.mark.parametrize(
    ("params", "top"),
    [
        (dict(original_max_position_embeddings=4096), {}),  # ramp end past the last pair
        (dict(mscale=0.707, mscale_all_dim=1.0), {}),
        (dict(truncate=False), {}),
        (dict(beta_fast=None, beta_slow=0), {}),  # transformers' defaults for null and 0
        ({}, dict(original_max_position_embeddings=8)),  # the top-level value wins
        # Both ramp ends at pair 0, a one-point ramp (0 / 0 at that pair), widened by 0.001
        # as transformers does.
        (dict(original_max_position_embeddings=4), {}),
        # Equal betas (Kimi-K2's config): a one-point ramp away from pair 0.
        (dict(beta_fast=1.0, beta_slow=1.0), {}),
    ],
)
def test_yarn_edge_settings_match_transformers(params, top):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from moekit.hf.families import FAMILIES

    rope = dict(QWEN_YARN, factor=4.0, original_max_position_embeddings=16, rope_theta=1e4)
    rope.update(params)
    hf_cfg = hf_models.hf_config(
        "qwen3_moe", rope_parameters=rope, max_position_embeddings=64, head_dim=16, **top
    )
    want_inv_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    cfg = FAMILIES["qwen3_moe"].to_model_config(hf_cfg.to_dict())
    assert torch.equal(cfg.yarn.inv_freq(cfg.rope_dim, cfg.rope_theta), want_inv_freq)
    assert cfg.yarn.table_scale == pytest.approx(want_factor, rel=1e-12)


def test_legacy_rope_scaling_wins_over_rope_parameters_as_in_transformers():
    from moekit.hf.families import FAMILIES
    from moekit.hf.families.base import UnsupportedConfig

    hf_cfg = hf_models.hf_config("qwen3_moe", max_position_embeddings=64, head_dim=16)
    base = hf_cfg.to_dict()
    assert base["rope_parameters"]["rope_type"] == "default"
    legacy = dict(base, rope_scaling=dict(QWEN_YARN))
    want = type(hf_cfg)(**legacy).rope_parameters
    assert want["rope_type"] == "yarn"
    cfg = FAMILIES["qwen3_moe"].to_model_config(legacy)
    assert (cfg.rope_type, cfg.rope_factor) == ("yarn", want["factor"])
    assert cfg.rope_original_max_seq_len == want["original_max_position_embeddings"]
    linear = dict(base, rope_scaling={"type": "linear", "factor": 2.0})
    assert type(hf_cfg)(**linear).rope_parameters["rope_type"] == "linear"
    with pytest.raises(UnsupportedConfig, match="'linear'"):
        FAMILIES["qwen3_moe"].to_model_config(linear)
