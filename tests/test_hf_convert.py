"""`moekit convert` both ways with --verify against transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import hf_models  # noqa: E402
from train_common import MICRO, write_corpus  # noqa: E402

from moekit.cli import main  # noqa: E402
from moekit.hf.io import eos_token_ids  # noqa: E402
from moekit.model import Transformer  # noqa: E402
from moekit.train.checkpoint import (  # noqa: E402
    list_checkpoints,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from moekit.train.config import TrainConfig  # noqa: E402

CHARS = "abcdefghijklmnopqrstuvwxyz .,"


def _write_char_tokenizer(directory) -> tokenizers.Tokenizer:
    """A character-level tokenizer.json (no merges) with ids inside the model's vocabulary."""
    vocab = {c: i for i, c in enumerate(CHARS)}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.decoder = tokenizers.decoders.Fuse()
    tok.save(str(directory / "tokenizer.json"))
    return tok


def _micro_run(run_dir, tokenizer: str):
    """A run directory with one checkpoint of a random micro model that recorded `tokenizer`."""
    torch.manual_seed(0)
    config = {"model": MICRO.to_dict(), "train": TrainConfig(tokenizer=tokenizer).to_dict()}
    save_checkpoint(run_dir, 0, Transformer(MICRO).state_dict(), config, {}, {}, keep=1)
    return run_dir


def _files(directory) -> dict[str, bytes]:
    """Every file under directory by relative path, with its contents."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("olmoe")
    hf_models.build("olmoe", directory, seed=3)
    _write_char_tokenizer(directory)
    return directory


def test_convert_hf_to_moekit_and_back(hf_dir, tmp_path, capsys):
    run_dir, back = tmp_path / "run", tmp_path / "hf"
    assert main(["convert", str(hf_dir), str(run_dir), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "hf->moekit" in out and "verified against transformers" in out
    assert (run_dir / "tokenizer.json").is_file()
    assert main(["convert", str(run_dir), str(back), "--verify"]) == 0
    assert "verified against transformers" in capsys.readouterr().out
    ids = torch.randint(0, hf_models.VOCAB, (2, 9))
    want = hf_models.hf_logits(hf_models.load_hf(hf_dir), ids)
    with torch.no_grad():
        torch.testing.assert_close(load_model(run_dir)(ids).logits, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        hf_models.hf_logits(hf_models.load_hf(back), ids), want, atol=1e-5, rtol=1e-5
    )


def test_convert_refuses_unrepresentable_family(hf_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["convert", str(hf_dir), str(run_dir)]) == 0
    code = main(["convert", str(run_dir), str(tmp_path / "x"), "--family", "mixtral"])
    assert code == 2
    assert "qk_norm" in capsys.readouterr().err


def test_convert_refuses_a_run_directory_with_checkpoints(hf_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["convert", str(hf_dir), str(run_dir)]) == 0
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert main(["convert", str(hf_dir), str(run_dir)]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_export_takes_the_tokenizer_file_the_run_recorded(hf_dir, tmp_path):
    from moekit.hf.convert import moekit_to_hf

    assert main(["convert", str(hf_dir), str(tmp_path / "run")]) == 0
    ckpt = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    elsewhere = tmp_path / "tokenizers" / "mine.json"  # not beside the run, not so named
    elsewhere.parent.mkdir()
    elsewhere.write_bytes((hf_dir / "tokenizer.json").read_bytes())
    config = {**ckpt.config, "train": {**ckpt.config["train"], "tokenizer": str(elsewhere)}}
    config.pop("format")
    save_checkpoint(
        tmp_path / "moved", ckpt.step, ckpt.model_state, config, ckpt.state_tensors, {}, keep=1
    )
    out = moekit_to_hf(tmp_path / "moved", tmp_path / "hf")
    assert (out / "tokenizer.json").read_bytes() == elsewhere.read_bytes()


def _flip_last_byte(file) -> None:
    blob = bytearray(file.read_bytes())
    blob[-1] ^= 0xFF
    file.write_bytes(bytes(blob))


def test_export_needs_the_weights_intact_not_the_optimizer_state(tmp_path, capsys):
    # An export reads the config and the weights; a damaged resume state must not keep
    # a model from being exported, and damaged weights must still be refused.
    run = _micro_run(tmp_path / "run", "bytes")
    ckpt = list_checkpoints(run)[-1]
    _flip_last_byte(ckpt / "state.safetensors")
    assert main(["convert", str(run), str(tmp_path / "hf"), "--verify"]) == 0
    assert "verified against transformers" in capsys.readouterr().out
    _flip_last_byte(ckpt / "model.safetensors")
    assert main(["convert", str(run), str(tmp_path / "hf2")]) == 2
    assert "model.safetensors fails its sha256 check" in capsys.readouterr().err
    assert not (tmp_path / "hf2").exists()


def test_a_hf_directory_without_tokenizer_is_refused(hf_dir, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(hf_dir, bare)
    (bare / "tokenizer.json").unlink()
    assert main(["convert", str(bare), str(tmp_path / "run")]) == 2
    assert "has no tokenizer.json to say what its token ids mean" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_reexport_replaces_the_tokenizer_of_an_earlier_export(hf_dir, tmp_path):
    chars = tmp_path / "tokenizers" / "chars.json"  # not beside the run
    chars.parent.mkdir()
    chars.write_bytes((hf_dir / "tokenizer.json").read_bytes())
    byte_run = _micro_run(tmp_path / "bytes", "bytes")
    char_run = _micro_run(tmp_path / "chars", str(chars))
    assert main(["convert", str(char_run), str(tmp_path / "fresh")]) == 0
    used = tmp_path / "used"
    assert main(["convert", str(byte_run), str(used)]) == 0
    assert main(["convert", str(char_run), str(used), "--verify"]) == 0
    assert _files(used) == _files(tmp_path / "fresh")
    assert (used / "tokenizer.json").read_bytes() == chars.read_bytes()


def test_export_refuses_the_source_and_moekit_directories_as_dst(hf_dir, tmp_path, capsys):
    run_dir, other = tmp_path / "run", tmp_path / "other"
    for d in (run_dir, other):
        assert main(["convert", str(hf_dir), str(d)]) == 0
    ckpt = list_checkpoints(run_dir)[-1]
    logs = tmp_path / "logs"  # a run that has written metrics but no checkpoint yet
    logs.mkdir()
    (logs / "metrics.jsonl").write_text("")
    before = _files(tmp_path)
    for src, dst, message in [
        (run_dir, run_dir, "is the source itself"),
        (ckpt, ckpt, "is the source itself"),
        (run_dir, other, "is a moekit run directory"),
        (run_dir, logs, "is a moekit run directory"),
        (ckpt, run_dir, "is a moekit run directory"),
        (run_dir, ckpt, "is a moekit checkpoint"),
        # Not there yet, named like a checkpoint: the run would take it for its newest.
        (run_dir, ckpt.parent / "step_00000099", "lies in a run's checkpoints/ directory"),
    ]:
        assert main(["convert", str(src), str(dst)]) == 2
        err = capsys.readouterr().err
        assert f"dst {dst} {message}" in err
    assert _files(tmp_path) == before
    # An earlier export may be written over.
    assert main(["convert", str(run_dir), str(tmp_path / "hf")]) == 0
    assert main(["convert", str(run_dir), str(tmp_path / "hf")]) == 0


def test_import_refuses_a_hugging_face_directory_as_dst(hf_dir, tmp_path, capsys):
    import shutil

    src, other = tmp_path / "src", tmp_path / "other"
    shutil.copytree(hf_dir, src)
    shutil.copytree(hf_dir, other)
    before = _files(tmp_path)
    assert main(["convert", str(src), str(src)]) == 2
    assert f"dst {src} is a Hugging Face checkpoint directory (the source itself)" in (
        capsys.readouterr().err
    )
    assert main(["convert", str(src), str(other)]) == 2
    assert f"dst {other} is a Hugging Face checkpoint directory;" in capsys.readouterr().err
    assert _files(tmp_path) == before


@pytest.mark.parametrize("dtype", ["float64", "bfloat16", "float16"])
def test_an_import_in_another_dtype_verifies_within_its_tolerance(hf_dir, tmp_path, capsys, dtype):
    run_dir = tmp_path / "run"
    assert main(["convert", str(hf_dir), str(run_dir), "--dtype", dtype, "--verify"]) == 0
    assert "verified against transformers" in capsys.readouterr().out
    ckpt = load_checkpoint(list_checkpoints(run_dir)[-1])
    assert {t.dtype for t in ckpt.model_state.values()} == {getattr(torch, dtype)}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_import_with_swapped_experts_fails_verification(
    hf_dir, tmp_path, capsys, monkeypatch, dtype
):
    import moekit.hf.convert as convert_module

    load = convert_module.from_pretrained

    def swapped(src, dtype=None):
        # A loader that mixed up two experts of one layer: logits move by ~0.5.
        model = load(src, dtype=dtype)
        with torch.no_grad():
            w = model.layers[1].ffn.experts.w_down_EDF
            w[[0, 1]] = w[[1, 0]].clone()
        return model

    monkeypatch.setattr(convert_module, "from_pretrained", swapped)
    code = main(["convert", str(hf_dir), str(tmp_path / "run"), "--dtype", dtype, "--verify"])
    assert code == 1
    assert "VERIFICATION FAILED" in capsys.readouterr().out


def test_a_converted_run_reads_its_tokenizer_after_being_moved(hf_dir, tmp_path, capsys):
    import shutil

    from moekit.analysis import analyze_checkpoint
    from moekit.hf.convert import load_init_source

    data = write_corpus(tmp_path / "text")
    run_dir, moved = tmp_path / "run", tmp_path / "elsewhere" / "run"
    assert main(["convert", str(hf_dir), str(run_dir)]) == 0
    sample = ["--prompt", "the cat", "--max-new-tokens", "8", "--temperature", "0"]

    def outputs(run):
        capsys.readouterr()
        assert main(["sample", str(run), *sample]) == 0
        text = capsys.readouterr().out
        summary = analyze_checkpoint(run, data=str(data), seq_len=16, batches_per_domain=1)
        return text, summary["layers"]

    before = outputs(run_dir)
    assert before[0].startswith("the cat") and before[1]
    moved.parent.mkdir()
    shutil.move(run_dir, moved)
    assert outputs(moved) == before
    assert load_init_source(moved).tokenizer == str(moved.resolve() / "tokenizer.json")
    assert main(["convert", str(moved), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (
        hf_dir / "tokenizer.json"
    ).read_bytes()


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("converted") / "run"
    assert main(["convert", str(hf_dir), str(run_dir)]) == 0
    return run_dir


@pytest.mark.parametrize(
    "from_hf, options, message",
    [
        (False, ["--shard-mb", "0"], "--shard-mb must be >= 1, got 0"),
        (False, ["--shard-mb", "-2"], "--shard-mb must be >= 1, got -2"),
        (False, ["--verify", "--atol", "-1"], "--atol must be a finite number >= 0, got -1.0"),
        (False, ["--verify", "--atol", "nan"], "--atol must be a finite number >= 0, got nan"),
        (True, ["--verify", "--atol", "inf"], "--atol must be a finite number >= 0, got inf"),
        (True, ["--atol", "0.5"], "--atol applies with --verify only"),
        (False, ["--dtype", "bfloat16"], "--dtype applies to Hugging Face -> moekit conversion"),
        (True, ["--family", "olmoe"], "--family applies to moekit -> Hugging Face conversion"),
        (True, ["--shard-mb", "5"], "--shard-mb applies to moekit -> Hugging Face conversion"),
    ],
)
def test_options_that_do_not_apply_are_refused_by_name(
    hf_dir, converted, tmp_path, capsys, from_hf, options, message
):
    src, dst = (hf_dir if from_hf else converted), tmp_path / "out"
    assert main(["convert", str(src), str(dst), *options]) == 2
    assert message in capsys.readouterr().err
    assert not dst.exists()


def test_save_tensors_refuses_a_shard_limit_below_one_byte(tmp_path):
    from moekit.hf.io import save_tensors

    with pytest.raises(ValueError, match="max_shard_bytes must be >= 1, got 0"):
        save_tensors(tmp_path / "out", {"w": torch.zeros(3)}, max_shard_bytes=0)
    assert not (tmp_path / "out").exists()


def test_special_token_ids_of_config_json_survive_a_round_trip(hf_dir, tmp_path):
    # A source that keeps its end-of-sequence id only in config.json: the export's
    # config.json is rebuilt from the model, so the run keeps the ids beside its tokenizer.
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    (src / "generation_config.json").unlink(missing_ok=True)
    config = json.loads((src / "config.json").read_text())
    config.update(eos_token_id=5, bos_token_id=1, pad_token_id=None)
    (src / "config.json").write_text(json.dumps(config))
    run_dir, back = tmp_path / "run", tmp_path / "hf"
    assert main(["convert", str(src), str(run_dir)]) == 0
    assert main(["convert", str(run_dir), str(back)]) == 0
    assert eos_token_ids(back) == [5]
    generation = json.loads((back / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 5}
