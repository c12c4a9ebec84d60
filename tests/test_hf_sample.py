"""`moekit sample` on a Hugging Face checkpoint directory, decoding with its tokenizer.json."""

from __future__ import annotations

import json

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
    eos = json.loads((hf_dir / "config.json").read_text())["eos_token_id"]
    ids = generate(moekit.from_pretrained(hf_dir), prompt, 6, temperature=0, eos_id=eos)
    assert printed == "the cat" + tok.decode(ids[0, prompt.shape[1] :].tolist())


def test_sample_adds_the_tokenizers_bos_and_stops_at_generation_eos(hf_dir, tmp_path, capsys):
    # As transformers samples a Mixtral directory: the tokenizer's post-processor puts a
    # BOS before the prompt, and generation_config.json's eos_token_id (a list) ends it.
    import shutil

    from test_hf_convert import CHARS
    from tokenizers.processors import TemplateProcessing

    directory = tmp_path / "mixtral"
    shutil.copytree(hf_dir, directory)
    # Characters, then a visible token for every other id of the model, so that the
    # printed text shows every sampled id; "<s>" right after the characters.
    bos = len(CHARS)
    vocab = {c: i for i, c in enumerate(CHARS)} | {"<s>": bos}
    vocab.update({f"<{i}>": i for i in range(bos + 1, hf_models.VOCAB)})
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.decoder = tokenizers.decoders.Fuse()
    tok.add_special_tokens(["<s>"])  # already in the vocabulary: marked special, same id
    assert tok.token_to_id("<s>") == bos
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok.save(str(directory / "tokenizer.json"))
    model = moekit.from_pretrained(directory)
    prompt = torch.tensor([[bos, *tok.encode("the cat", add_special_tokens=False).ids]])
    greedy = generate(model, prompt, 6, temperature=0)
    new = greedy[0, prompt.shape[1] :].tolist()
    end = new[2]  # the third new token ends the sample
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [96, end]}))
    code = main(["sample", str(directory), "--prompt", "the cat", "--max-new-tokens", "6",
                 "--temperature", "0"])  # fmt: skip
    assert code == 0
    new = new[: new.index(end) + 1]
    assert len(new) < 6
    assert capsys.readouterr().out.rstrip("\n") == "the cat" + tok.decode(new)
    # Imported as a moekit run, the same weights sample the same text: the BOS, and the
    # end-of-sequence ids the run keeps (it had sampled past them, without a BOS).
    assert main(["convert", str(directory), str(tmp_path / "run")]) == 0
    capsys.readouterr()
    code = main(["sample", str(tmp_path / "run"), "--prompt", "the cat", "--max-new-tokens",
                 "6", "--temperature", "0"])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.rstrip("\n") == "the cat" + tok.decode(new)
