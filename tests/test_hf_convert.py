"""`moekit convert` both ways with --verify against transformers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import hf_models  # noqa: E402

from moekit.cli import main  # noqa: E402
from moekit.train.checkpoint import load_model  # noqa: E402

CHARS = "abcdefghijklmnopqrstuvwxyz .,"


def _write_char_tokenizer(directory) -> tokenizers.Tokenizer:
    """A character-level tokenizer.json (no merges) with ids inside the model's vocabulary."""
    vocab = {c: i for i, c in enumerate(CHARS)}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.decoder = tokenizers.decoders.Fuse()
    tok.save(str(directory / "tokenizer.json"))
    return tok


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
