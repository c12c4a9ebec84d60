"""The embedded corpus and user sources: real text, two labelled domains, stable splits."""

from __future__ import annotations

import os
import warnings

import pytest

from moekit.data import sources
from moekit.data.corpus import embedded_corpus, stable_fraction
from moekit.errors import MissingDependency


@pytest.fixture(scope="module")
def corpus():
    return embedded_corpus(code_bytes=300_000)


def test_embedded_corpus_has_code_and_prose(corpus):
    by_domain = {}
    for doc in corpus:
        by_domain.setdefault(doc.domain, []).append(doc)
    assert set(by_domain) == {"code", "prose"}
    code_bytes = sum(len(d.text.encode()) for d in by_domain["code"])
    assert 300_000 <= code_bytes < 300_000 + 128 * 1024
    assert all(d.name.startswith("code/") and d.name.endswith(".py") for d in by_domain["code"])
    assert any("def " in d.text for d in by_domain["code"])
    # Prose is the language reference: English sentences, not source code.
    prose = " ".join(d.text for d in by_domain["prose"])
    assert prose.count(" the ") > 1000
    assert "prose/if" in {d.name for d in by_domain["prose"]}
    assert len({d.name for d in corpus}) == len(corpus)


def test_embedded_corpus_is_deterministic(corpus):
    again = embedded_corpus(code_bytes=300_000)
    assert [(d.name, d.text) for d in again] == [(d.name, d.text) for d in corpus]


def test_stable_fraction_is_a_fixed_hash():
    # sha1-based, so it never changes between processes (Python's hash() is salted).
    assert stable_fraction("prose/if") == pytest.approx(0.642331198, abs=1e-9)
    values = [stable_fraction(f"doc{i}") for i in range(2000)]
    assert all(0 <= v < 1 for v in values)
    assert 0.45 < sum(v < 0.5 for v in values) / len(values) < 0.55


def test_missing_stdlib_gives_a_clear_error(tmp_path, monkeypatch):
    from moekit.data import corpus as corpus_mod

    monkeypatch.setattr(corpus_mod, "stdlib_root", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="standard library sources.*--data"):
        embedded_corpus()


def test_code_skips_tests_vendored_huge_and_empty_modules(tmp_path, monkeypatch):
    from moekit.data import corpus as corpus_mod

    files = {
        "argparse.py": "import sys\n",
        "json/decoder.py": "def f():\n    pass\n",
        "test/test_x.py": "def test(): pass\n",
        "idlelib/run.py": "x = 1\n",
        "site-packages/pkg/mod.py": "y = 2\n",
        "huge.py": "#" * (128 * 1024) + "\n",  # one byte over the limit
        "limit.py": "#" * (128 * 1024 - 1) + "\n",  # exactly at it
        "blank.py": "\n\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(corpus_mod, "stdlib_root", lambda: tmp_path)
    code = [d for d in embedded_corpus(code_bytes=10**9) if d.domain == "code"]
    assert [d.name for d in code] == ["code/argparse.py", "code/json/decoder.py", "code/limit.py"]
    assert code[1].text == files["json/decoder.py"]


def test_file_and_directory_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n" * 3)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta\n")
    (tmp_path / ".hidden").write_text("never read")
    docs = list(sources.iter_documents(str(tmp_path)))
    assert [(d.name, d.domain, d.text) for d in docs] == [
        ("a.txt#0", "text", "alpha\n" * 3),
        ("sub/b.md#0", "text", "beta\n"),
    ]
    single = list(sources.iter_documents(str(tmp_path / "a.txt")))
    assert [d.name for d in single] == ["a.txt#0"]


def test_large_files_are_read_in_blocks_cut_at_line_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "BLOCK_CHARS", 10)
    text = "".join(f"line {i}\n" for i in range(20))
    (tmp_path / "big.txt").write_text(text)
    docs = list(sources.iter_documents(str(tmp_path / "big.txt")))
    assert len(docs) > 5
    assert "".join(d.text for d in docs) == text
    assert all(d.text.endswith("\n") for d in docs)


def test_a_file_without_line_breaks_is_cut_too(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "BLOCK_CHARS", 10)
    monkeypatch.setattr(sources, "LINE_CHARS", 7)
    text = "x" * 100
    (tmp_path / "one_line.txt").write_text(text)
    docs = list(sources.iter_documents(str(tmp_path / "one_line.txt")))
    assert "".join(d.text for d in docs) == text
    assert max(len(d.text) for d in docs) == 17


def test_binary_files_in_a_directory_are_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.warns(UserWarning, match="2 files were skipped as binary"):
        assert [d.name for d in sources.iter_documents(str(tmp_path))] == ["a.txt#0"]
    (tmp_path / "a.txt").unlink()
    with pytest.raises(ValueError, match="contains no text"), pytest.warns(UserWarning):
        list(sources.iter_documents(str(tmp_path)))
    # Named on its own, a binary file is an error rather than text full of NUL bytes.
    (tmp_path / "utf16.txt").write_text("hello\n", encoding="utf-16")
    for name in ("picture.png", "utf16.txt"):
        with pytest.raises(ValueError, match=f"{name} looks binary .* convert it to UTF-8"):
            list(sources.iter_documents(str(tmp_path / name)))


def _read_warnings(data: str) -> tuple[list, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = list(sources.iter_documents(data))
    return docs, [str(w.message) for w in caught]


def test_undecodable_and_binary_files_are_summed_up_in_one_warning_each(tmp_path):
    # Both had been silent: a Latin-1 file's accents became U+FFFD, a UTF-16 file was left out.
    (tmp_path / "a_utf8.txt").write_text("café \ufffd\n", encoding="utf-8")
    for i in range(3):
        (tmp_path / f"latin1_{i}.txt").write_text("café crème\n", encoding="latin-1")
    (tmp_path / "notes_utf16.txt").write_text("hello\n", encoding="utf-16")
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    docs, messages = _read_warnings(str(tmp_path))
    assert [d.name for d in docs] == ["a_utf8.txt#0"] + [f"latin1_{i}.txt#0" for i in range(3)]
    assert docs[1].text == "caf\ufffd cr\ufffdme\n"  # replaced, as before
    assert len(messages) == 2
    assert messages[0].startswith(
        f"3 files were not valid UTF-8: 6 undecodable byte(s) read as U+FFFD "
        f"(first: {tmp_path / 'latin1_0.txt'}); convert them to UTF-8"
    )
    assert messages[1].startswith(
        f"2 files were skipped as binary, with a NUL byte in the first 8192 bytes "
        f"(first: {tmp_path / 'notes_utf16.txt'}); UTF-16"
    )


def test_undecodable_bytes_are_replaced_as_errors_replace_would(tmp_path):
    # A truncated sequence, an encoded surrogate (not UTF-8) and bytes UTF-8 never uses.
    raw = b"ok \xe2\x82 x \xed\xa0\x80 y \xff\xfe z\n" * 3 + "\ufffd\n".encode()
    (tmp_path / "mixed.txt").write_bytes(raw)
    docs, messages = _read_warnings(str(tmp_path / "mixed.txt"))
    assert "".join(d.text for d in docs) == raw.decode("utf-8", "replace")
    assert messages == [
        f"1 file was not valid UTF-8: 21 undecodable byte(s) read as U+FFFD (first: "
        f"{tmp_path / 'mixed.txt'}); convert them to UTF-8 (e.g. iconv -f latin1 -t utf-8) "
        "to train on their text"
    ]
    # A U+FFFD written in valid UTF-8 is text like any other: nothing to warn of.
    (tmp_path / "mixed.txt").write_text("\ufffd\n", encoding="utf-8")
    assert _read_warnings(str(tmp_path / "mixed.txt"))[1] == []


def test_paths_written_by_moekit_must_lie_outside_a_data_directory(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    for inside in (tmp_path, tmp_path / "runs" / "tiny"):
        with pytest.raises(ValueError, match="inside the data directory"):
            sources.check_outside(str(tmp_path), inside, "the run directory")
    sources.check_outside(str(tmp_path), tmp_path.parent / "elsewhere", "the run directory")
    sources.check_outside(str(tmp_path), tmp_path / ".runs" / "tiny", "the run directory")
    sources.check_outside(str(tmp_path / "a.txt"), tmp_path / "runs", "the run directory")
    sources.check_outside("embedded", tmp_path, "the run directory")


def test_bad_sources_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data path not found"):
        list(sources.iter_documents(str(tmp_path / "missing.txt")))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="contains no text"):
        list(sources.iter_documents(str(tmp_path / "empty.txt")))
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match=r"d contains no files to read$"):
        list(sources.iter_documents(str(tmp_path / "d")))


def test_hidden_files_and_directory_links_are_counted_when_nothing_else_is_read(tmp_path):
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "a.txt").write_text("alpha\n")
    root = tmp_path / "root"
    (root / ".x").mkdir(parents=True)
    (root / ".x" / "b.txt").write_text("beta\n")
    (root / "mycorpus").symlink_to(linked, target_is_directory=True)
    with pytest.raises(ValueError, match=r"contains no files to read \(1 hidden file\(s\); "
                       r"1 link\(s\) to directories, not followed\)"):  # fmt: skip
        list(sources.iter_documents(str(root)))
    # Beside a file that is read, the link is warned of: its text would be missed silently.
    (root / "c.txt").write_text("gamma\n")
    with pytest.warns(UserWarning, match=r"1 link\(s\) to directories not followed .*mycorpus"):
        assert [d.name for d in sources.iter_documents(str(root))] == ["c.txt#0"]


def test_a_file_name_that_is_not_utf8_hashes_by_its_bytes(tmp_path):
    # os.listdir reads such a name with lone surrogates, which plain UTF-8 cannot encode.
    import hashlib

    def by_bytes(raw: bytes) -> float:
        return int.from_bytes(hashlib.sha1(raw).digest()[:8], "big") / 2**64

    assert stable_fraction(os.fsdecode(b"caf\xe9.txt")) == by_bytes(b"caf\xe9.txt")
    assert stable_fraction("café.txt") == by_bytes("café.txt".encode())  # UTF-8 as before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes (POSIX)")
def test_a_path_that_is_neither_file_nor_directory_is_named_as_such(tmp_path):
    # It had been reported as a directory that "contains no files".
    os.mkfifo(tmp_path / "pipe")
    for path in (os.devnull, str(tmp_path / "pipe")):
        with pytest.raises(ValueError, match=f"{path} is not a regular file or directory"):
            list(sources.iter_documents(path))
        with pytest.raises(ValueError, match="not a regular file or directory"):
            sources.fingerprint(path)


def test_hf_dataset_without_the_datasets_package_says_how_to_install(monkeypatch, capsys, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(MissingDependency, match="hf:someone/corpus needs the `datasets` package"):
        list(sources.iter_documents("hf:someone/corpus"))
    # The command line reports it in one line, as any user error.
    from moekit.cli import main

    argv = ["train", "--data", "hf:someone/corpus", "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs the `datasets` package" in err and err.count("\n") == 1


def test_hidden_directories_and_late_nul_bytes(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.txt").write_text("never read\n")
    (tmp_path / "late_nul.bin").write_bytes(b"x" * 100 + b"\x00" + b"y" * 100)
    with pytest.warns(UserWarning, match="1 file was skipped as binary.*late_nul.bin"):
        assert [d.name for d in sources.iter_documents(str(tmp_path))] == ["a.txt#0"]


def test_a_same_size_edit_changes_the_fingerprint(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("alpha\n")
    before = sources.fingerprint(str(tmp_path))
    path.write_text("bravo\n")  # same size
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert sources.fingerprint(str(tmp_path)) != before
