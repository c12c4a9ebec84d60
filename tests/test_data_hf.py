"""`--data hf:NAME[:CONFIG]` against a stand-in `datasets` package: no network needed.

The stand-in records how `load_dataset` was called and streams rows as the real one's
streaming mode does (an iterable of dicts), so the whole path from rows to token files
runs here.
"""

from __future__ import annotations

import sys
import types

import pytest

from moekit.data import ByteTokenizer, prepare_tokens, sources
from moekit.data.corpus import stable_fraction

TOK = ByteTokenizer()


def _fake_datasets(monkeypatch, rows):
    calls = []

    def load_dataset(name, config=None, *, split, streaming):
        calls.append((name, config, split, streaming))
        return iter(rows)

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def test_rows_stream_as_documents_with_the_config_passed_on(monkeypatch):
    rows = [
        {"text": "first row\n"},
        {"text": "   \n"},
        {"text": "third row\n", "id": 3},
        {"text": None},  # a missing value: an empty row (it had been "no column 'text'")
    ]
    calls = _fake_datasets(monkeypatch, rows)
    docs = list(sources.iter_documents("hf:owner/corpus:clean-v1"))
    assert calls == [("owner/corpus", "clean-v1", "train", True)]
    # Blank and null rows are skipped; names keep each row's index, so they are stable.
    assert [(d.name, d.domain, d.text) for d in docs] == [
        ("owner/corpus:clean-v1#0", "text", "first row\n"),
        ("owner/corpus:clean-v1#2", "text", "third row\n"),
    ]


def test_a_name_without_config_asks_for_the_default_config(monkeypatch):
    calls = _fake_datasets(monkeypatch, [{"text": "x"}])
    list(sources.iter_documents("hf:corpus"))
    assert calls == [("corpus", None, "train", True)]


def test_token_files_hold_the_rows_of_each_split(monkeypatch, tmp_path):
    rows = [{"text": f"row {i}: " + "wörds " * (i % 7 + 1) + "\n"} for i in range(60)]
    _fake_datasets(monkeypatch, rows)
    splits = prepare_tokens("hf:owner/corpus", TOK, tmp_path / "cache", 0.2)
    for split in ("train", "val"):
        expected = "".join(
            r["text"]
            for i, r in enumerate(rows)
            if (stable_fraction(f"owner/corpus#{i}") < 0.2) == (split == "val")
        )
        assert expected  # both splits hold rows, so the check below compares something
        assert TOK.decode(splits[split].tokens().tolist()) == expected


@pytest.mark.parametrize(
    ("data", "rows", "error", "match"),
    [
        ("hf:", [], ValueError, "expected hf:NAME or hf:NAME:CONFIG"),
        ("hf::cfg", [], ValueError, "expected hf:NAME or hf:NAME:CONFIG"),
        ("hf:corpus", [{"content": "code"}], ValueError, r"no column 'text' .*'content'"),
        ("hf:corpus", [{"text": "a"}, {"text": 7}], ValueError, "'text' holds int in row 1"),
        ("hf:corpus", [{"text": " "}, {"text": ""}], ValueError, "contains no text"),
    ],
)
def test_bad_datasets_are_clear_errors(monkeypatch, data, rows, error, match):
    _fake_datasets(monkeypatch, rows)
    with pytest.raises(error, match=match):
        list(sources.iter_documents(data))


def test_load_failures_name_the_dataset(monkeypatch):
    module = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise ConnectionError("no route to the Hub")

    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    with pytest.raises(ValueError, match=r"could not load Hugging Face dataset 'a/b:c'.*no route"):
        list(sources.iter_documents("hf:a/b:c"))
