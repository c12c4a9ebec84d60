"""`moekit sample` on a Hugging Face checkpoint directory, decoding with its tokenizer.json."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import hf_models  # noqa: E402
from test_hf_convert import _write_char_tokenizer  # noqa: E402

import moekit  # noqa: E402
from moekit.cli import main  # noqa: E402
from moekit.generate import generate  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mixtral")
    hf_models.build("mixtral", directory, seed=5)
    _write_char_tokenizer(directory)
    return directory


def test_sample_reads_an_hf_directory(hf_dir, capsys):
    code = main(
        [
            "sample",
            str(hf_dir),
            "--prompt",
            "the cat",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out.rstrip("\n")
    tok = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    prompt = torch.tensor([tok.encode("the cat").ids])
    ids = generate(moekit.from_pretrained(hf_dir), prompt, 6, temperature=0)
    assert printed == "the cat" + tok.decode(ids[0, prompt.shape[1] :].tolist())
