"""A byte-level run exported to Hugging Face carries the byte tokenizer as a tokenizer.json,
read by `tokenizers`, transformers and `moekit sample` exactly as moekit reads bytes."""

from __future__ import annotations

import json
import random

import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from train_common import MICRO, micro_train, one_thread, write_corpus  # noqa: E402, F401

from moekit.cli import main  # noqa: E402
from moekit.data.tokenizer import ByteTokenizer, HFTokenizer  # noqa: E402
from moekit.train import train  # noqa: E402

TEXTS = [
    "plain ascii words",
    "  leading spaces, two  inside,\ttabs\nand\r\nline ends\n",
    "Latin-1 é ß ÿ, symbols ✓ → ∑, CJK 日本語, emoji 🙂",
    "\x00\x01\x7f control bytes and ¬ ­ (soft hyphen) ®",
]


@pytest.fixture(scope="module")
def byte_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(json.dumps(ByteTokenizer.tokenizer_json()))
    return path


def test_tokenizer_json_encodes_every_text_to_its_utf8_bytes(byte_json):
    tok, ref = HFTokenizer(byte_json), ByteTokenizer()
    assert tok.vocab_size == 256
    rng = random.Random(0)
    random_text = "".join(
        chr(rng.choice([rng.randrange(32, 0x800), rng.randrange(0x4E00, 0xA000)]))
        for _ in range(300)
    )
    for text in [*TEXTS, random_text]:
        assert tok.encode(text) == ref.encode(text)
        assert tok.decode(ref.encode(text)) == text


def test_tokenizer_json_decodes_any_byte_sequence_as_moekit_does(byte_json):
    # Sampled bytes need not be valid UTF-8: both replace the broken parts alike.
    tok, ref = HFTokenizer(byte_json), ByteTokenizer()
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(256) for _ in range(rng.randrange(1, 12))]
        assert tok.decode(ids) == ref.decode(ids), ids
    assert tok.decode(list(range(256))) == ref.decode(list(range(256)))


def test_exported_byte_run_samples_and_tokenizes_as_the_run(tmp_path, capsys):
    data = write_corpus(tmp_path / "text")
    run_dir, hf_dir = tmp_path / "run", tmp_path / "hf"
    train(MICRO, micro_train(data, steps=3), run_dir, plots=False)
    assert main(["convert", str(run_dir), str(hf_dir), "--verify"]) == 0
    capsys.readouterr()

    auto = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in TEXTS:
        assert auto(text, add_special_tokens=False)["input_ids"] == list(text.encode("utf-8"))
        assert auto.decode(list(text.encode("utf-8"))) == text

    args = ["--prompt", "def é", "--max-new-tokens", "24", "--seed", "3", "--top-k", "20"]
    assert main(["sample", str(run_dir), *args]) == 0
    from_run = capsys.readouterr().out
    assert main(["sample", str(hf_dir), *args]) == 0
    assert capsys.readouterr().out == from_run
    assert from_run.startswith("def é") and len(from_run) > len("def é\n")
