"""Token files and batches: exact tokens on disk, stable splits, deterministic windows."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from moekit.data import ByteTokenizer, TrainBatches, prepare_tokens, val_batches
from moekit.data.batches import step_seed
from moekit.data.corpus import stable_fraction
from moekit.data.tokenizer import HFTokenizer, load_tokenizer, token_dtype

TOK = ByteTokenizer()


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "text"
    root.mkdir()
    for i in range(12):
        (root / f"doc{i:02d}.txt").write_text(f"document {i}: " + "héllo wörld " * (5 + i))
    return root


def _expected(root, split, val_fraction):
    parts = []
    for path in sorted(root.iterdir()):
        is_val = stable_fraction(f"{path.name}#0") < val_fraction
        if is_val == (split == "val"):
            parts.append(path.read_text())
    return "".join(parts)


def test_token_files_hold_exactly_the_documents_of_each_split(corpus, tmp_path):
    splits = prepare_tokens(str(corpus), TOK, tmp_path / "cache", 0.3)
    for split in ("train", "val"):
        s = splits[split]
        assert s.dtype == torch.uint8 and s.num_tokens > 0
        assert TOK.decode(s.tokens().tolist()) == _expected(corpus, split, 0.3)
        assert s.domains == (("text", 0, s.num_tokens),)


def test_cache_is_reused_and_invalidated_by_changes(corpus, tmp_path):
    cache = tmp_path / "cache"
    first = prepare_tokens(str(corpus), TOK, cache, 0.3)["train"]
    mtime = first.path.stat().st_mtime_ns
    again = prepare_tokens(str(corpus), TOK, cache, 0.3)["train"]
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime
    (corpus / "doc00.txt").write_text("changed text, changed size")
    changed = prepare_tokens(str(corpus), TOK, cache, 0.3)["train"]
    assert changed.path != first.path


@pytest.mark.parametrize("damage", ["truncate", "remove", "meta"])
def test_a_damaged_cache_entry_is_built_again(corpus, tmp_path, damage):
    cache = tmp_path / "cache"
    first = prepare_tokens(str(corpus), TOK, cache, 0.3)
    want = {s: first[s].tokens().clone() for s in first}
    train_bin = first["train"].path
    if damage == "truncate":
        train_bin.write_bytes(train_bin.read_bytes()[:100])
    elif damage == "remove":
        first["val"].path.unlink()
    else:
        (train_bin.parent / "meta.json").write_text("{")
    again = prepare_tokens(str(corpus), TOK, cache, 0.3)
    for s in again:
        assert torch.equal(again[s].tokens(), want[s])
        assert again[s].digest == first[s].digest


def test_builds_left_by_dead_processes_are_removed(corpus, tmp_path):
    # A process killed mid-build leaves its partial copy (gigabytes, for a large corpus).
    import shutil
    import socket
    import subprocess
    import sys

    cache = tmp_path / "cache"
    entry = prepare_tokens(str(corpus), TOK, cache, 0.3)["train"].path.parent
    shutil.rmtree(entry)
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    host = socket.gethostname()
    left = {
        "dead": f"{entry.name}.tmp-{host}-{gone.pid}",
        "dead, as earlier builds named it": f"{entry.name}.tmp-{gone.pid}",
        "alive": f"{entry.name}.tmp-{host}-{os.getppid()}",
        "another host's": f"{entry.name}.tmp-elsewhere.example-{gone.pid}",
    }
    for name in left.values():
        (cache / name).mkdir()
    prepare_tokens(str(corpus), TOK, cache, 0.3)
    kept = {what for what, name in left.items() if (cache / name).exists()}
    assert kept == {"alive", "another host's"}
    assert entry.is_dir()


def test_cache_inside_the_data_directory_is_refused(corpus):
    with pytest.raises(ValueError, match="the token cache .* lies inside the data directory"):
        prepare_tokens(str(corpus), TOK, corpus / "cache", 0.3)


def test_editing_the_tokenizer_file_rebuilds_the_cache(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("a b c d " * 50)

    def save(vocab):
        model = tokenizers.models.WordLevel(vocab | {"[UNK]": len(vocab)}, unk_token="[UNK]")
        tok = tokenizers.Tokenizer(model)
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        tok.save(str(path))

    def ids():
        splits = prepare_tokens(str(tmp_path / "t"), load_tokenizer(str(path)), tmp_path / "c", 0.2)
        return torch.cat([splits[s].tokens() for s in ("train", "val")])[:4].tolist()

    save({"a": 0, "b": 1, "c": 2, "d": 3})
    assert ids() == [0, 1, 2, 3]
    save({"a": 3, "b": 2, "c": 1, "d": 0})  # same path, same vocabulary size
    assert ids() == [3, 2, 1, 0]


def test_byte_decoding_shows_ids_that_are_no_byte():
    # A byte-level model may be wider than 256 ids; sampling must not fail on the others.
    assert TOK.decode([104, 300, 105, 0xE2, 0x82, 0xAC]) == "h\ufffdi\u20ac"
    assert TOK.decode([0xE2, 0x82]) == "\ufffd"


def test_a_malformed_tokenizer_file_is_a_clear_error(tmp_path):
    pytest.importorskip("tokenizers")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a valid tokenizer.json"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_single_small_file_is_split_by_position(tmp_path):
    text = "".join(f"line {i}\n" for i in range(100))
    (tmp_path / "one.txt").write_text(text)
    splits = prepare_tokens(str(tmp_path / "one.txt"), TOK, tmp_path / "cache", 0.1)
    train, val = (TOK.decode(splits[s].tokens().tolist()) for s in ("train", "val"))
    assert train + val == text
    assert len(val) == round(len(text) * 0.1)


def test_a_large_file_is_split_by_position_whatever_its_blocks_hash_to(tmp_path):
    # 3 MB: three blocks of ~1 MiB, documents to the hash. It had held out 37% at 0.1.
    line = "".join(chr(97 + i % 26) for i in range(99)) + "\n"
    text = line * 30_000
    (tmp_path / "one.txt").write_text(text)
    splits = prepare_tokens(str(tmp_path / "one.txt"), TOK, tmp_path / "cache", 0.1)
    train, val = (TOK.decode(splits[s].tokens().tolist()) for s in ("train", "val"))
    assert train + val == text
    assert len(val) == round(len(text) * 0.1)


@pytest.mark.parametrize(("val_doc", "position"), [("a", True), ("b", False)])
def test_documents_split_by_name_unless_their_sizes_skew_the_share(
    tmp_path, monkeypatch, val_doc, position
):
    # The 60-token document alone in validation holds out 60% at val_fraction 0.25: the
    # text is split by position instead. The 30-token one holds out 30%: kept as it is.
    from moekit.data import tokens as tokens_mod
    from moekit.data.corpus import Document

    docs = [Document("a", "code", "a" * 60), Document("b", "prose", "b" * 30)]
    docs.append(Document("c", "code", "c" * 10))
    monkeypatch.setattr(tokens_mod.sources, "iter_documents", lambda data: iter(docs))
    monkeypatch.setattr(tokens_mod, "stable_fraction", lambda name: 0.0 if name == val_doc else 0.9)
    (tmp_path / "src.txt").write_text("stand-in")
    splits = prepare_tokens(str(tmp_path / "src.txt"), TOK, tmp_path / "cache", 0.25)
    train, val = (TOK.decode(splits[s].tokens().tolist()) for s in ("train", "val"))
    if position:  # the training documents, then the validation ones, cut at 75 of 100
        assert (train, val) == ("b" * 30 + "c" * 10 + "a" * 35, "a" * 25)
        assert splits["train"].domains == (("prose", 0, 30), ("code", 30, 75))
        assert splits["val"].domains == (("code", 0, 25),)
    else:
        assert (train, val) == ("a" * 60 + "c" * 10, "b" * 30)


def test_undecodable_text_is_warned_of_when_read_not_when_the_cache_is_reused(tmp_path):
    root = tmp_path / "text"
    root.mkdir()
    (root / "latin1.txt").write_text("café " * 50 + "\n", encoding="latin-1")
    with pytest.warns(UserWarning, match="1 file was not valid UTF-8: 50 undecodable byte"):
        prepare_tokens(str(root), TOK, tmp_path / "cache", 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cached entry: no text is read, nothing to say
        prepare_tokens(str(root), TOK, tmp_path / "cache", 0.3)


@pytest.mark.parametrize("landed_in", ["train", "val"])
def test_split_by_position_keeps_each_domains_tokens(tmp_path, monkeypatch, landed_in):
    # Three documents of two domains, all hashed into one split: the cut at 75 of 100
    # tokens falls inside the prose document, which is then in both splits.
    from moekit.data import tokens as tokens_mod
    from moekit.data.corpus import Document

    docs = [Document("a", "code", "a" * 60), Document("b", "prose", "b" * 30)]
    docs.append(Document("c", "code", "c" * 10))
    monkeypatch.setattr(tokens_mod.sources, "iter_documents", lambda data: iter(docs))
    fraction = 0.9 if landed_in == "train" else 0.0
    monkeypatch.setattr(tokens_mod, "stable_fraction", lambda name: fraction)
    (tmp_path / "src.txt").write_text("stand-in")
    splits = prepare_tokens(str(tmp_path / "src.txt"), TOK, tmp_path / "cache", 0.25)
    train, val = splits["train"], splits["val"]
    assert TOK.decode(train.tokens().tolist()) == "a" * 60 + "b" * 15
    assert TOK.decode(val.tokens().tolist()) == "b" * 15 + "c" * 10
    assert train.domains == (("code", 0, 60), ("prose", 60, 75))
    assert val.domains == (("prose", 0, 15), ("code", 15, 25))
    # A cut on a document boundary leaves no empty run on either side.
    splits = prepare_tokens(str(tmp_path / "src.txt"), TOK, tmp_path / "cache", 0.4)
    assert splits["train"].domains == (("code", 0, 60),)
    assert splits["val"].domains == (("prose", 0, 30), ("code", 30, 40))


def test_hf_tokenizer_writes_uint16_tokens(corpus, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    model = tokenizers.models.WordLevel(
        {f"w{i}": i for i in range(300)} | {"[UNK]": 300}, unk_token="[UNK]"
    )
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("w1 w299 w5 nope " * 50)
    hf = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert isinstance(hf, HFTokenizer) and hf.vocab_size == 301
    splits = prepare_tokens(str(tmp_path / "t"), hf, tmp_path / "cache", 0.2)
    assert splits["train"].dtype == torch.uint16
    ids = torch.cat([splits["train"].tokens(), splits["val"].tokens()]).long()
    assert ids[:4].tolist() == [1, 299, 5, 300]
    assert token_dtype(256) == torch.uint8 and token_dtype(70_000) == torch.uint32
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_a_vocabulary_with_unused_ids_counts_up_to_its_largest(tmp_path):
    # Four tokens, the largest id 300: the model's embedding and the token file's dtype
    # must take id 300, so the size is 301, not 4.
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "the": 1, "fox": 2, "dog": 300}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert hf.encode("the dog") == [1, 300]
    assert hf.vocab_size == 301
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("the fox the dog " * 50)
    splits = prepare_tokens(str(tmp_path / "t"), hf, tmp_path / "cache", 0.2)
    assert splits["train"].dtype == torch.uint16
    assert int(splits["train"].tokens().long().max()) == 300


def test_train_batches_are_a_function_of_seed_and_step(corpus, tmp_path):
    split = prepare_tokens(str(corpus), TOK, tmp_path / "cache", 0.3)["train"]
    tokens = split.tokens().long()
    a = TrainBatches(split, seq_len=9, batch_size=5, seed=3)
    b = TrainBatches(split, seq_len=9, batch_size=5, seed=3)
    x, y = a(7)
    assert x.shape == (5, 9) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y, strict=True):  # each row is a real window of the file
        starts = [o for o in range(tokens.numel() - 9) if torch.equal(tokens[o : o + 9], row_x)]
        assert any(tokens[o + 9] == row_y[-1] for o in starts)
    assert torch.equal(b(7)[0], x)  # a fresh sampler at the same step: resume needs no state
    assert not torch.equal(a(8)[0], x)
    assert not torch.equal(TrainBatches(split, 9, 5, seed=4)(7)[0], x)
    assert step_seed(0, 1) != step_seed(1, 0)


def test_validation_windows_are_fixed_and_respect_domains(tmp_path):
    from moekit.data.tokens import TokenSplit

    data = bytes(range(60)) + bytes(range(100, 140))
    path = tmp_path / "v.bin"
    path.write_bytes(data)
    split = TokenSplit(path, torch.uint8, 100, (("code", 0, 60), ("prose", 60, 100)), "")
    prose = val_batches(split, seq_len=7, batch_size=4, num_batches=2, domain="prose")
    rows = torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in prose])
    assert rows.shape == (8, 8)
    assert bool((rows >= 100).all())  # never reaches into the code range
    assert val_batches(split, 7, 4, 2, domain="prose")[0][0].equal(prose[0][0])
    assert val_batches(split, 7, 4, 2, domain="none") == []
    everything = val_batches(split, 7, 4, 2)
    assert len(everything) == 2


def test_corpus_shorter_than_the_context_is_an_error(tmp_path):
    (tmp_path / "short.txt").write_text("tiny text\n" * 3)
    splits = prepare_tokens(str(tmp_path / "short.txt"), TOK, tmp_path / "cache", 0.1)
    with pytest.raises(ValueError, match=r"train split has 27 tokens.*seq_len \+ 1 = 65"):
        TrainBatches(splits["train"], seq_len=64, batch_size=2, seed=0)


def test_val_fraction_is_part_of_the_cache_key(corpus, tmp_path):
    small = prepare_tokens(str(corpus), TOK, tmp_path / "cache", 0.1)["val"]
    large = prepare_tokens(str(corpus), TOK, tmp_path / "cache", 0.5)["val"]
    assert large.num_tokens > small.num_tokens


def test_a_split_of_exactly_one_window(tmp_path):
    text = "0123456789abcdef"  # 16 tokens
    (tmp_path / "one.txt").write_text(text * 10)
    split = prepare_tokens(str(tmp_path / "one.txt"), TOK, tmp_path / "c", 0.1)["train"]
    seq_len = split.num_tokens - 1
    x, y = TrainBatches(split, seq_len, 2, seed=0)(0)  # the only window, twice
    tokens = split.tokens().long()
    assert torch.equal(x[0], tokens[:-1]) and torch.equal(y[0], tokens[1:])
    with pytest.raises(ValueError, match="seq_len \\+ 1"):
        TrainBatches(split, seq_len + 1, 2, seed=0)


def test_step_seeds_do_not_collide_across_seed_and_step():
    assert step_seed(1, 23) != step_seed(12, 3)
    assert len({step_seed(s, t) for s in range(20) for t in range(20)}) == 400


def test_a_file_reached_through_a_link_is_read_once(tmp_path):
    # Split by name, a file and a link to it had put the same text in training and in
    # validation whenever their names hashed to different sides.
    data = tmp_path / "data"
    data.mkdir()
    for i in range(30):
        (data / f"doc{i:02d}.txt").write_text(f"document {i}\n" * 40)
    for i in range(30):
        (data / f"link{i:02d}.txt").symlink_to(data / f"doc{i:02d}.txt")
    with pytest.warns(UserWarning, match="30 file.s. read once only"):
        splits = prepare_tokens(str(data), TOK, tmp_path / "cache", 0.2, "by_name")
    texts = {s: TOK.decode(splits[s].tokens().tolist()) for s in ("train", "val")}
    assert sum(t.count("document 7\n") for t in texts.values()) == 40


def test_a_build_that_finds_the_entry_published_leaves_it_alone(corpus, tmp_path):
    # Two processes building one entry: the second's rename had deleted the first's
    # entry while the first was reading it.
    from moekit.data import tokens

    splits = prepare_tokens(str(corpus), TOK, tmp_path / "cache", 0.1)
    entry = splits["train"].path.parent
    before = {p.name: p.stat().st_ino for p in entry.iterdir()}
    late = entry.with_name(entry.name + ".tmp-other-1")
    late.mkdir()
    (late / "train.bin").write_bytes(b"")
    tokens._publish(late, entry, token_dtype(TOK.vocab_size))
    assert not late.exists()
    assert {p.name: p.stat().st_ino for p in entry.iterdir()} == before


def test_bad_arguments_are_named(corpus, tmp_path):
    from pathlib import Path

    # A Path is a path (it had failed with AttributeError on str methods).
    assert prepare_tokens(Path(corpus), TOK, tmp_path / "cache", 0.1)["train"].num_tokens > 0
    with pytest.raises(TypeError, match="data must be a path or a name"):
        prepare_tokens(3, TOK, tmp_path / "cache", 0.1)
    with pytest.raises(TypeError, match="val_fraction must be a number, got str '0.1'"):
        prepare_tokens(str(corpus), TOK, tmp_path / "cache", "0.1")
    split = prepare_tokens(str(corpus), TOK, tmp_path / "cache", 0.1)["train"]
    with pytest.raises(ValueError, match="seq_len must be >= 1, got 0"):
        TrainBatches(split, 0, 2, seed=0)
