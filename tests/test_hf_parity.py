"""Hugging Face parity: tiny random checkpoints built by transformers load into moekit with
equal logits and identical greedy generations, and export back with equal logits."""

from __future__ import annotations

import functools
import json
import re

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("transformers")

import hf_models  # noqa: E402

import moekit  # noqa: E402
from moekit.generate import generate  # noqa: E402
from moekit.hf.export import infer_family, save_pretrained  # noqa: E402
from moekit.hf.io import INDEX_FILE, TensorFiles, save_tensors  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=hf_models.FAMILIES)
def checkpoint(request, tmp_path_factory):
    family = request.param
    directory = tmp_path_factory.mktemp(family)
    hf = hf_models.build(family, directory, seed=len(family))
    return family, directory, hf


_ids = functools.partial(hf_models.random_ids, batch=3, seq=11, seed=1)
_logits = hf_models.moekit_logits


def test_logits_equal_transformers(checkpoint):
    family, directory, hf = checkpoint
    model = moekit.from_pretrained(directory)
    ids = _ids()
    torch.testing.assert_close(_logits(model, ids), hf_models.hf_logits(hf, ids), **TOL)
    assert type(model).__name__ == "Transformer" and model.config.moe_layer_ids
    assert infer_family(model.config).model_type == family


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_exact_router_ties_are_broken_as_transformers_breaks_them(family, tmp_path):
    # Router rows of experts 0 and 1, and of 2 and 3, made equal: every token scores each
    # pair exactly alike, and a top-k cut between a pair must keep the expert torch.topk
    # keeps in transformers. DeepSeek pairs every group's two experts (and its score
    # correction bias, so the biased scores tie): 3 of the 4 experts of the two chosen
    # groups always cut one pair. The paired experts' own weights differ, so another
    # choice changes the logits (by 0.3 when ties went to the higher index). In bf16,
    # ties like these are common.
    hf = hf_models.build(family, tmp_path, seed=3)
    routers = 0
    with torch.no_grad():
        for name, t in [*hf.named_parameters(), *hf.named_buffers()]:
            if name.endswith(("mlp.gate.weight", "e_score_correction_bias")):
                end = t.shape[0] // 2 * 2 if family == "deepseek_v3" else 4
                t[1:end:2] = t[0:end:2]
                routers += name.endswith("weight")
    assert routers >= 2
    hf.save_pretrained(tmp_path)
    ids = _ids()
    model = moekit.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(model, ids), hf_models.hf_logits(hf, ids), **TOL)


def test_greedy_generation_identical(checkpoint):
    _, directory, hf = checkpoint
    model = moekit.from_pretrained(directory)
    prompt = _ids(batch=2, seq=5, seed=2)
    hf.generation_config.eos_token_id = None  # run every step, as moekit does without eos_id
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=8, do_sample=False)
    got = generate(model, prompt, max_new_tokens=8, temperature=0)
    assert torch.equal(got, want)


def test_export_reloads_in_transformers(checkpoint, tmp_path):
    family, directory, hf = checkpoint
    model = moekit.from_pretrained(directory)
    save_pretrained(model, tmp_path / "out")
    back = hf_models.load_hf(tmp_path / "out")
    assert back.config.model_type == family
    ids = _ids(seed=3)
    torch.testing.assert_close(hf_models.hf_logits(back, ids), _logits(model, ids), **TOL)
    torch.testing.assert_close(hf_models.hf_logits(back, ids), hf_models.hf_logits(hf, ids), **TOL)


@pytest.mark.parametrize("placement", [dict(moe_every=2), dict(dense_layers=(1,))])
def test_export_of_dense_layers_at_the_default_width(placement, tmp_path):
    # dense_d_ff None means the MoE's active width; the export writes it out.
    config = moekit.ModelConfig(
        vocab_size=hf_models.VOCAB,
        d_model=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=64,
        qk_norm="head",
        moe=moekit.MoEConfig(d_model=32, d_ff=24, num_experts=4, top_k=2),
        **placement,
    )
    model = moekit.Transformer(config).eval()
    save_pretrained(model, tmp_path / "out")
    back = hf_models.load_hf(tmp_path / "out")
    assert back.config.model_type == "qwen3_moe"
    ids = _ids(seed=5)
    torch.testing.assert_close(hf_models.hf_logits(back, ids), _logits(model, ids), **TOL)


def test_cached_decoding_equals_full_forward(checkpoint):
    # One token at a time through the KV cache (MLA caches the latent) equals one pass.
    _, directory, _ = checkpoint
    model = moekit.from_pretrained(directory)
    ids = _ids(batch=2, seq=7, seed=4)
    cache = model.new_cache(2, 7)
    with torch.no_grad():
        steps = [model(ids[:, :3], cache=cache).logits]
        steps += [model(ids[:, s : s + 1], cache=cache).logits for s in range(3, 7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), _logits(model, ids), **TOL)


def test_deepseek_routing_is_exercised(tmp_path):
    """The parity above is meaningful for DeepSeek-V3's router: group limiting and the
    correction bias each change the logits of the test model."""
    hf = hf_models.build("deepseek_v3", tmp_path, seed=11)
    model = moekit.from_pretrained(tmp_path)
    ids = _ids(seed=5)
    base = _logits(model, ids)
    torch.testing.assert_close(base, hf_models.hf_logits(hf, ids), **TOL)
    router = model.moe_layers()[0].router
    assert router.expert_bias.dtype == torch.float32 and router.expert_bias.abs().min() > 0
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.router.expert_bias.zero_()
    assert (_logits(model, ids) - base).abs().max() > 1e-3
    ungrouped = model.config.replace(moe=model.config.moe.replace(num_groups=1, topk_groups=1))
    flat = type(model)(ungrouped).eval()
    flat.load_state_dict(moekit.from_pretrained(tmp_path).state_dict())
    assert (_logits(flat, ids) - base).abs().max() > 1e-3


def test_sharded_and_fused_layouts_load(tmp_path):
    """A sharded index, and experts fused into 3-D gate_up_proj/down_proj tensors (the
    in-memory layout of transformers 5), load to the same logits."""
    hf = hf_models.build("qwen3_moe", tmp_path / "src", seed=7)
    files = TensorFiles(tmp_path / "src")
    tensors = {k: files.get(k) for k in files.names()}
    E, prefix = hf.config.num_experts, "model.layers.{}.mlp.experts"
    for i in range(hf.config.num_hidden_layers):
        p = prefix.format(i)
        gate = [tensors.pop(f"{p}.{j}.gate_proj.weight") for j in range(E)]
        up = [tensors.pop(f"{p}.{j}.up_proj.weight") for j in range(E)]
        down = [tensors.pop(f"{p}.{j}.down_proj.weight") for j in range(E)]
        tensors[f"{p}.gate_up_proj"] = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)
        tensors[f"{p}.down_proj"] = torch.stack(down)
    out = tmp_path / "fused"
    save_tensors(out, tensors, max_shard_bytes=30_000)
    (out / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    assert (out / INDEX_FILE).is_file() and len(json.loads((out / INDEX_FILE).read_text())) > 0
    ids = _ids(seed=6)
    torch.testing.assert_close(
        _logits(moekit.from_pretrained(out), ids), hf_models.hf_logits(hf, ids), **TOL
    )


def test_a_directory_with_both_layouts_loads_the_weights_transformers_loads(tmp_path):
    # model.safetensors beside an index of other shards: transformers reads the single file.
    hf_models.build("mixtral", tmp_path, seed=0)
    files = TensorFiles(tmp_path)
    tensors = {k: files.get(k) for k in files.names()}
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 3
    shard = "model-00001-of-00001.safetensors"
    save_file(tensors, tmp_path / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, shard)}
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    ids = _ids(seed=2)
    want = hf_models.hf_logits(hf_models.load_hf(tmp_path), ids)
    torch.testing.assert_close(_logits(moekit.from_pretrained(tmp_path), ids), want, **TOL)


def test_transformers_own_saved_layout_loads(checkpoint, tmp_path):
    # save_original_format=False keeps transformers 5's module names and fused experts
    # (Mixtral's MoE block is then `mlp`, not `block_sparse_moe`).
    family, _, hf = checkpoint
    hf.save_pretrained(tmp_path, save_original_format=False)
    ids = _ids(seed=5)
    torch.testing.assert_close(
        _logits(moekit.from_pretrained(tmp_path), ids), hf_models.hf_logits(hf, ids), **TOL
    )


@pytest.mark.parametrize("head", ["copy", "other", "alone"])
def test_a_tied_config_with_a_stored_head_loads_as_transformers_loads_it(head, tmp_path):
    # Some exporters write the tied head anyway: a copy keeps the model tied; a head of
    # other values is kept apart by transformers, and its logits use it.
    hf_models.build("qwen3_moe", tmp_path, seed=0, tie_word_embeddings=True)
    files = TensorFiles(tmp_path)
    tensors = {k: files.get(k) for k in files.names()}
    embed = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = embed.clone() if head == "copy" else torch.randn_like(embed)
    if head == "alone":  # only the head stored: transformers ties the embedding to it
        del tensors["model.embed_tokens.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = _ids(seed=3)
    want = hf_models.hf_logits(hf_models.load_hf(tmp_path), ids)
    model = moekit.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(model, ids), want, **TOL)
    assert model.config.tie_embeddings == (head != "other")


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        # Full-rank queries, rotary dims not interleaved, no renormalisation, no dense layer.
        (
            "deepseek_v3",
            dict(
                q_lora_rank=None,
                rope_interleave=False,
                norm_topk_prob=False,
                first_k_dense_replace=0,
                n_group=1,
                topk_group=1,
            ),
        ),
        # No shared expert: transformers stores one of width 0.
        ("deepseek_v3", dict(n_shared_experts=0)),
        ("qwen3_moe", dict(tie_word_embeddings=True, attention_bias=True, mlp_only_layers=[0])),
        ("qwen2_moe", dict(decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=True)),
        ("mixtral", dict(num_key_value_heads=4, head_dim=10, tie_word_embeddings=True)),
        # Layer indices past the last layer: every layer dense, or an entry of no layer.
        ("deepseek_v3", dict(num_hidden_layers=2, first_k_dense_replace=3)),
        ("qwen3_moe", dict(mlp_only_layers=[1, 5, 1])),
    ],
)
def test_config_variants(family, overrides, tmp_path):
    hf = hf_models.build(family, tmp_path / "src", seed=13, **overrides)
    model = moekit.from_pretrained(tmp_path / "src")
    ids = _ids(seed=8)
    torch.testing.assert_close(_logits(model, ids), hf_models.hf_logits(hf, ids), **TOL)
    save_pretrained(model, tmp_path / "out")
    back = hf_models.load_hf(tmp_path / "out")
    torch.testing.assert_close(hf_models.hf_logits(back, ids), hf_models.hf_logits(hf, ids), **TOL)


@pytest.mark.parametrize(
    ("family", "changes", "dropped"),
    [
        # Qwen's window is off unless use_sliding_window says otherwise: full attention.
        ("qwen3_moe", {"sliding_window": 4}, "use_sliding_window"),
        ("qwen2_moe", {"sliding_window": 4}, "use_sliding_window"),
        # transformers' activation table reads "swish" as SiLU.
        ("mixtral", {"hidden_act": "swish"}, None),
        # A null dtype names none: float32 weights load in float32.
        ("mixtral", {"dtype": None}, "torch_dtype"),
        ("olmoe", {"torch_dtype": None}, "dtype"),
    ],
)
def test_config_json_variants_read_as_transformers_reads_them(family, changes, dropped, tmp_path):
    hf_models.build(family, tmp_path, seed=5)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(changes)
    config.pop(dropped, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = _ids(seed=4)
    want = hf_models.hf_logits(hf_models.load_hf(tmp_path), ids)
    torch.testing.assert_close(_logits(moekit.from_pretrained(tmp_path), ids), want, **TOL)


@pytest.mark.parametrize(
    ("family", "built", "dropped", "check"),
    [
        # DeepseekV3Config's default of 3 dense layers, in a model of two: all dense.
        (
            "deepseek_v3",
            dict(num_hidden_layers=2, first_k_dense_replace=3),
            "first_k_dense_replace",
            lambda config: config.moe_layer_ids == (),
        ),
        # Qwen's dense layers at the class default width, not the MoE's active width.
        (
            "qwen2_moe",
            dict(intermediate_size=5632, mlp_only_layers=[1]),
            "intermediate_size",
            lambda config: config.dense_width == 5632,
        ),
        (
            "qwen3_moe",
            dict(intermediate_size=6144, mlp_only_layers=[1]),
            "intermediate_size",
            lambda config: config.dense_width == 6144,
        ),
    ],
)
def test_a_key_left_out_takes_the_class_default(family, built, dropped, check, tmp_path):
    hf_models.build(family, tmp_path, seed=6, **built)
    config = json.loads((tmp_path / "config.json").read_text())
    del config[dropped]
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = _ids(seed=2)
    want = hf_models.hf_logits(hf_models.load_hf(tmp_path), ids)
    model = moekit.from_pretrained(tmp_path)
    assert check(model.config)
    torch.testing.assert_close(_logits(model, ids), want, **TOL)


@pytest.mark.parametrize(
    ("family", "changes"),
    [
        ("mixtral", {"sliding_window": 0}),
        ("qwen3_moe", {"sliding_window": 0, "use_sliding_window": True}),
        ("qwen2_moe", {"sliding_window": 0, "use_sliding_window": True}),
    ],
)
def test_a_window_of_zero_is_a_window(family, changes, tmp_path):
    # transformers masks every key then; loaded as full attention it had differed by 3-4.
    hf_models.build(family, tmp_path, seed=5, max_window_layers=3)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(changes)
    config.pop("layer_types", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(moekit.hf.UnsupportedConfig, match="sliding_window=0"):
        moekit.from_pretrained(tmp_path)


def test_without_a_config_dtype_the_stored_weights_dtype_loads(tmp_path):
    # transformers' dtype="auto": the config's dtype, else the first stored weights'.
    hf_models.build("mixtral", tmp_path, seed=1)
    files = TensorFiles(tmp_path)
    tensors = {k: files.get(k).to(torch.bfloat16) for k in files.names()}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert next(hf.parameters()).dtype == torch.bfloat16
    assert moekit.from_pretrained(tmp_path).embed.weight.dtype == torch.bfloat16
    assert moekit.from_pretrained(tmp_path, dtype="float32").embed.weight.dtype == torch.float32
    config["dtype"] = "float8_e4m3fn"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"got 'float8_e4m3fn' \(config.json's dtype\); pass"):
        moekit.from_pretrained(tmp_path)


def test_a_mixtral_window_applies_whatever_use_sliding_window_says(tmp_path):
    # Mixtral has no such switch (a key copied from a Qwen config): transformers runs the
    # window, which moekit does not, so the checkpoint is refused, not loaded as full attention.
    hf_models.build("mixtral", tmp_path, seed=5)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(sliding_window=4, use_sliding_window=False)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert hf_models.load_hf(tmp_path).config.sliding_window == 4
    with pytest.raises(moekit.hf.UnsupportedConfig, match="sliding_window=4"):
        moekit.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("family", "changes"),
    [
        # Switched on, but layer_types gives every layer full attention.
        ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 4, "layer_types": "full"}),
        # transformers' Mixtral never reads layer_types; without sliding_window, no window.
        ("mixtral", {"sliding_window": None, "layer_types": "sliding"}),
        # Nor does its Qwen3-MoE: the switch is off.
        ("qwen3_moe", {"sliding_window": 4, "layer_types": "sliding"}),
    ],
)
def test_windows_no_layer_uses_are_not_refused(family, changes, tmp_path):
    hf_models.build(family, tmp_path, seed=5)
    config = json.loads((tmp_path / "config.json").read_text())
    kind = changes.pop("layer_types")
    config.update(changes, layer_types=[f"{kind}_attention"] * config["num_hidden_layers"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = _ids(seed=3)
    want = hf_models.hf_logits(hf_models.load_hf(tmp_path), ids)
    torch.testing.assert_close(_logits(moekit.from_pretrained(tmp_path), ids), want, **TOL)


@pytest.mark.parametrize(
    ("layer_types", "refused"),
    [
        (["sliding_attention", "full_attention"], "layer_types='sliding_attention'"),
        # Without layer_types, transformers 4.x and 5.x read max_window_layers in opposite
        # ways: switched on, the window is taken to apply.
        (None, "sliding_window=4"),
    ],
)
def test_a_qwen2_moe_window_some_layer_uses_is_refused(layer_types, refused, tmp_path):
    hf_models.build("qwen2_moe", tmp_path, seed=5, num_hidden_layers=2)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=4, layer_types=layer_types)
    if layer_types is None:
        del config["layer_types"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(moekit.hf.UnsupportedConfig, match=re.escape(refused)):
        moekit.from_pretrained(tmp_path)


def test_export_records_the_dtype_and_skips_training_only_settings(tmp_path):
    # Router jitter is a training setting: the export drops it rather than refusing.
    moe = moekit.MoEConfig(d_model=32, d_ff=24, num_experts=4, top_k=2, router_jitter=0.1)
    config = moekit.ModelConfig(
        vocab_size=hf_models.VOCAB, d_model=32, num_layers=2, num_heads=4, moe=moe
    )
    model = moekit.Transformer(config).to(torch.bfloat16).eval()
    save_pretrained(model, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["dtype"] == "bfloat16"
    back = moekit.from_pretrained(tmp_path / "out")
    assert back.embed.weight.dtype == torch.bfloat16
    # float64 as well (it had been written as float32 and read back so); non-float refused.
    save_pretrained(model.double(), tmp_path / "f64")
    assert json.loads((tmp_path / "f64" / "config.json").read_text())["dtype"] == "float64"
    assert moekit.from_pretrained(tmp_path / "f64").embed.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="dtype must be one of .* got torch.int64"):
        moekit.from_pretrained(tmp_path / "f64", dtype=torch.int64)


def test_mixtral_reads_num_experts_when_num_local_experts_is_absent(tmp_path):
    hf_models.build("mixtral", tmp_path / "src", seed=2)
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["num_experts"] = config.pop("num_local_experts")
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    assert moekit.from_pretrained(tmp_path / "src").config.moe.num_experts == 5
