"""Broken or unsupported Hugging Face checkpoints fail with one clear error naming the tensor
or option; nothing is loaded silently wrong. Checkpoints here are written by moekit's own
exporter (no transformers needed), then damaged."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import moekit
from moekit.config import MoEConfig
from moekit.hf import CheckpointError, UnsupportedConfig
from moekit.hf.export import save_pretrained
from moekit.hf.verify import VerificationError, compare_logits
from moekit.model import ModelConfig, Transformer

EXPERT = "model.layers.1.block_sparse_moe.experts.2.w1.weight"


@pytest.fixture
def checkpoint(tmp_path):
    moe = MoEConfig(d_model=24, d_ff=40, num_experts=5, top_k=3, aux_loss_coef=0.001)
    config = ModelConfig(
        vocab_size=53,
        d_model=24,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        moe=moe,
        max_seq_len=64,
    )
    model = Transformer(config).eval()
    save_pretrained(model, tmp_path / "ckpt", family="mixtral")
    return model, tmp_path / "ckpt"


def _rewrite(directory, change):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_intact_checkpoint_loads_equal(checkpoint):
    model, directory = checkpoint
    ids = torch.randint(0, 53, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(moekit.from_pretrained(directory)(ids).logits, model(ids).logits)


def test_truncated_file_names_the_cut_tensors(checkpoint):
    _, directory = checkpoint
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated") as err:
        moekit.from_pretrained(directory)
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header.pop("__metadata__", None)
    last = max(header, key=lambda k: header[k]["data_offsets"][1])
    assert f"{last} (bytes" in str(err.value)


def test_missing_expert_tensor_is_named(checkpoint):
    _, directory = checkpoint
    _rewrite(directory, lambda t: t.pop(EXPERT))
    with pytest.raises(CheckpointError, match="missing tensors") as err:
        moekit.from_pretrained(directory)
    assert EXPERT in str(err.value) and "(40, 24)" in str(err.value)


def test_transposed_tensor_is_named(checkpoint):
    _, directory = checkpoint
    _rewrite(directory, lambda t: t.update({EXPERT: t[EXPERT].t().contiguous()}))
    with pytest.raises(CheckpointError, match="shape mismatch") as err:
        moekit.from_pretrained(directory)
    assert f"{EXPERT}: shape (24, 40), config implies (40, 24) (transposed?)" in str(err.value)


def test_integer_tensor_is_named(checkpoint):
    _, directory = checkpoint
    _rewrite(directory, lambda t: t.update({EXPERT: t[EXPERT].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=f"{EXPERT}: dtype I32, expected a float dtype"):
        moekit.from_pretrained(directory)


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("config.json", "[1, 2]", "must hold a JSON object, got list"),
        ("config.json", "\udcff", "not valid JSON"),
        ("model.safetensors.index.json", '{"weight_map": ["a"]}', "not a valid index"),
        ("model.safetensors.index.json", '{"weight_map": {"a": 3}}', "not a valid index"),
    ],
)
def test_malformed_json_files_are_named(checkpoint, name, text, match):
    _, directory = checkpoint
    if name == "model.safetensors.index.json":  # read only where no single file is
        (directory / "model.safetensors").unlink()
    (directory / name).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(CheckpointError, match=match):
        moekit.from_pretrained(directory)


def test_config_disagreeing_with_shapes(checkpoint):
    _, directory = checkpoint
    _edit_config(directory, intermediate_size=36)
    with pytest.raises(CheckpointError, match="shape mismatch") as err:
        moekit.from_pretrained(directory)
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight: shape (40, 24)" in str(err.value)
    assert "config implies (36, 24)" in str(err.value)


def test_saved_rope_frequencies_are_ignored_as_transformers_ignores_them(checkpoint):
    # Older exporters wrote each layer's RoPE inv_freq; both libraries recompute it.
    model, directory = checkpoint

    def change(t):
        for i in range(2):
            t[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(3)

    _rewrite(directory, change)
    ids = torch.randint(0, 53, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(moekit.from_pretrained(directory)(ids).logits, model(ids).logits)

    def elsewhere(t):
        t["model.layers.0.mlp.rotary_emb.inv_freq"] = torch.rand(3)

    _rewrite(directory, elsewhere)  # only attention's own frequencies are skipped
    with pytest.raises(CheckpointError, match=r"unknown tensors[\s\S]*mlp.rotary_emb.inv_freq"):
        moekit.from_pretrained(directory)


def test_unknown_and_missing_listed_together(checkpoint):
    _, directory = checkpoint
    _edit_config(directory, num_local_experts=4)  # the checkpoint holds 5 experts

    def change(t):
        t["model.layers.0.extra.weight"] = torch.zeros(3)

    _rewrite(directory, change)
    with pytest.raises(CheckpointError) as err:
        moekit.from_pretrained(directory)
    msg = str(err.value)
    assert "model.layers.0.extra.weight" in msg and "unknown tensors" in msg
    assert "model.layers.1.block_sparse_moe.experts.4.w2.weight" in msg  # the fifth expert
    assert "model.layers.0.block_sparse_moe.gate.weight: shape (5, 24)" in msg


def test_sharded_index_with_missing_shard(checkpoint, tmp_path):
    model, _ = checkpoint
    save_pretrained(model, tmp_path / "sharded", family="mixtral", max_shard_bytes=20_000)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"shard {shards[1].name} is missing"):
        moekit.from_pretrained(tmp_path / "sharded")


def test_no_safetensors_means_no_pickle(checkpoint):
    _, directory = checkpoint
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        moekit.from_pretrained(directory)


@pytest.mark.parametrize(
    ("changes", "option"),
    [
        ({"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}}, "linear"),
        ({"sliding_window": 16}, "sliding_window=16"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rms_norm_eps": None}, "required field 'rms_norm_eps'"),
        ({"router_jitter_noise": 0.1}, "router_jitter_noise"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
        ({"quantization_config": "fp8"}, "quantization_config='fp8'"),
        # transformers refuses these too; int() would have truncated or parsed them.
        ({"num_experts_per_tok": 2.7}, "num_experts_per_tok=2.7 .*an integer"),
        ({"hidden_size": "24"}, "hidden_size='24' .*an integer"),
        ({"num_local_experts": True}, "num_local_experts=True .*an integer"),
        ({"model_type": "llama"}, "model_type"),
    ],
)
def test_unsupported_options_are_named(checkpoint, changes, option):
    _, directory = checkpoint
    _edit_config(directory, **changes)
    with pytest.raises(UnsupportedConfig, match=option):
        moekit.from_pretrained(directory)


def test_export_refuses_what_the_family_cannot_express(checkpoint, tmp_path):
    model, _ = checkpoint
    capped = Transformer(model.config.replace(moe=model.config.moe.replace(capacity_factor=1.0)))
    with pytest.raises(UnsupportedConfig, match="capacity_factor"):
        save_pretrained(capped, tmp_path / "x", family="mixtral")
    with pytest.raises(UnsupportedConfig, match="qk_norm"):
        save_pretrained(model, tmp_path / "y", family="qwen3_moe")


def test_olmoe_needs_heads_that_span_the_model_width(tmp_path):
    # transformers' OLMoE sizes its q/k norms from hidden_size: other head widths would
    # write a checkpoint it cannot load.
    cfg = ModelConfig(
        vocab_size=97,
        d_model=32,
        num_layers=2,
        num_heads=4,
        head_dim=12,
        max_seq_len=64,
        qk_norm="full",
        moe=MoEConfig(d_model=32, d_ff=24, num_experts=4, top_k=2),
    )
    with pytest.raises(UnsupportedConfig, match=r"head_dim=12 x 4 heads != hidden_size \(32\)"):
        save_pretrained(Transformer(cfg), tmp_path / "x", family="olmoe")
    with pytest.raises(UnsupportedConfig, match="no Hugging Face family"):
        save_pretrained(Transformer(cfg), tmp_path / "y")


@pytest.mark.parametrize("first_shards", [True, False])
def test_reexport_leaves_no_earlier_weight_files(checkpoint, tmp_path, first_shards):
    # A leftover index would make readers load the old shards; a leftover single file is
    # what transformers reads when the new save is sharded.
    old, _ = checkpoint
    torch.manual_seed(1)
    new = Transformer(old.config).eval()
    out = tmp_path / "out"
    save_pretrained(old, out, family="mixtral", max_shard_bytes=20_000 if first_shards else None)
    save_pretrained(new, out, family="mixtral", max_shard_bytes=None if first_shards else 20_000)
    names = sorted(p.name for p in out.iterdir())
    if first_shards:
        assert names == ["config.json", "model.safetensors"]
    else:
        assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    ids = torch.randint(0, 53, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(moekit.from_pretrained(out)(ids).logits, new(ids).logits)


def test_compare_logits_fails_loudly():
    a = torch.zeros(2, 3, 5)
    b = a.clone()
    b[1, 2, 4] = 0.5
    assert compare_logits(a, a, atol=1e-6) == 0.0
    with pytest.raises(VerificationError, match=r"0.5 > atol 0.0001 at \[b, s, v\] = \(1, 2, 4\)"):
        compare_logits(a, b, atol=1e-4)


def test_loader_never_imports_transformers():
    code = (
        "import sys, moekit\n"
        "lazy = 'moekit.hf' not in sys.modules\n"
        "import moekit.hf, moekit.hf.convert\n"
        "moekit.from_pretrained\n"
        "print(lazy, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_deepseek_mtp_layers_are_skipped_only_when_declared(tmp_path):
    moe = MoEConfig(
        d_model=24,
        d_ff=12,
        num_experts=8,
        top_k=3,
        router="sigmoid_bias",
        num_groups=4,
        topk_groups=2,
        routed_scaling_factor=2.5,
        num_shared_experts=1,
        aux_loss_coef=0.0,  # what a DeepSeek-V3 config reads back as (loss-free balancing)
        z_loss_coef=0.0,
    )
    config = ModelConfig(
        vocab_size=53,
        d_model=24,
        num_layers=2,
        num_heads=4,
        moe=moe,
        max_seq_len=64,
        first_k_dense=1,
        dense_d_ff=40,
        attention="mla",
        q_lora_rank=16,
        kv_lora_rank=12,
        qk_nope_head_dim=6,
        qk_rope_head_dim=4,
        v_head_dim=5,
        rope_interleave=True,
    )
    directory = tmp_path / "ds"
    save_pretrained(Transformer(config), directory)
    _rewrite(directory, lambda t: t.update({"model.layers.2.eh_proj.weight": torch.zeros(24, 48)}))
    with pytest.raises(CheckpointError, match=r"unknown tensors[\s\S]*model.layers.2.eh_proj"):
        moekit.from_pretrained(directory)
    _edit_config(directory, num_nextn_predict_layers=1)
    assert moekit.from_pretrained(directory).config == config


def _rewrite_header(path, change):
    """Rewrite a safetensors file's JSON header in place (the data stays as it is)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    change(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h: h.update({EXPERT: "oops"}), f"malformed header entry for tensor {EXPERT}"),
        (
            lambda h: h[EXPERT].update(shape=[40, 23]),
            f"tensor {EXPERT} of shape \\(40, 23\\) and dtype F32 needs 3680 bytes, "
            "its range holds 3840",
        ),
        (
            lambda h: h[EXPERT.replace(".2.", ".3.")].update(
                data_offsets=h[EXPERT]["data_offsets"]
            ),
            "overlap in the file",
        ),
    ],
)
def test_a_malformed_safetensors_header_names_the_file_and_tensor(checkpoint, change, message):
    _, directory = checkpoint
    _rewrite_header(directory / "model.safetensors", change)
    with pytest.raises(CheckpointError, match=f"model.safetensors: .*{message}"):
        moekit.from_pretrained(directory)


def test_every_broken_shard_is_listed(checkpoint, tmp_path):
    model, _ = checkpoint
    save_pretrained(model, tmp_path / "sharded", family="mixtral", max_shard_bytes=20_000)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    shards[2].unlink()
    shards[0].write_bytes(shards[0].read_bytes()[:-8])
    with pytest.raises(CheckpointError) as err:
        moekit.from_pretrained(tmp_path / "sharded")
    assert f"shard {shards[2].name} is missing" in str(err.value)
    assert f"{shards[0].name}: file is truncated" in str(err.value)
