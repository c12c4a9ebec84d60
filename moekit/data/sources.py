"""Where text comes from: the embedded corpus, a file, a directory, or a Hugging Face dataset.

`--data` takes `embedded` (the default), a path to a text file or a directory of text files,
or `hf:NAME` / `hf:NAME:CONFIG` for the `text` column of a Hugging Face dataset's train
split, streamed (needs the `datasets` package and a network), e.g.
`hf:wikitext:wikitext-103-raw-v1`.
Documents are yielded one at a time so a multi-GB source never has to fit in memory:
large files are read in blocks of about `BLOCK_CHARS` characters, cut at a line end within
`LINE_CHARS` more (a file without line breaks is cut there). In a directory, files whose
first `PROBE_BYTES` hold a NUL byte are binary (images, checkpoints, archives) and skipped,
as git decides; hidden files and directories are skipped too.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from moekit.data.corpus import EMBEDDED, Document, embedded_corpus
from moekit.errors import MissingDependency

BLOCK_CHARS = 1 << 20
LINE_CHARS = 1 << 16
PROBE_BYTES = 8192
HF_PREFIX = "hf:"


def iter_documents(data: str) -> Iterator[Document]:
    """Yield the documents of `data` (see the module docstring), each labelled by domain.

    Raises FileNotFoundError for a missing path and ValueError when there is no text.
    """
    if data == EMBEDDED:
        yield from embedded_corpus()
        return
    if data.startswith(HF_PREFIX):
        yield from _hf_documents(data[len(HF_PREFIX) :])
        return
    found = False
    for path in _text_files(Path(data)):
        for doc in _file_blocks(path, Path(data)):
            found = True
            yield doc
    if not found:
        raise ValueError(f"data path {data} contains no text")


def check_outside(data: str, path: str | Path, what: str) -> None:
    """ValueError when `path` (where moekit writes) lies inside the data directory `data`.

    Its files would be read as training text, and change between runs: a run directory
    inside `--data .` had its own checkpoints and token cache tokenized into its corpus.
    A hidden path (a part starting with ".") is not read, so it may lie inside.
    """
    if data == EMBEDDED or data.startswith(HF_PREFIX) or not Path(data).is_dir():
        return
    root, inner = Path(data).resolve(), Path(path).resolve()
    inside = inner == root or root in inner.parents
    # Hidden directories are never read (_text_files): `--run-dir .runs/x` is fine.
    if inside and not any(part.startswith(".") for part in inner.relative_to(root).parts):
        raise ValueError(
            f"{what} {path} lies inside the data directory {data}: its files would be read "
            f"as training text; put it outside {data}"
        )


def fingerprint(data: str) -> str:
    """A short string that changes when the source's content may have changed (cache key)."""
    if data == EMBEDDED:
        parts = ["embedded", sys.version]
    elif data.startswith(HF_PREFIX):
        parts = [data]
    else:
        root = Path(data)
        parts = [str(root.resolve())]
        for path in _text_files(root):
            st = path.stat()
            parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]


def _text_files(root: Path) -> list[Path]:
    if not root.exists():
        raise FileNotFoundError(f"data path not found: {root}")
    if root.is_file():
        return [root]
    if not root.is_dir():
        # A device, FIFO or socket: "contains no files" would blame an empty directory.
        raise ValueError(f"data path {root} is not a regular file or directory")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise ValueError(f"data directory {root} contains no files")
    return [p for p in files if not _is_binary(p)]


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(PROBE_BYTES)


def _file_blocks(path: Path, root: Path) -> Iterator[Document]:
    name = path.name if root.is_file() else path.relative_to(root).as_posix()
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        index = 0
        while True:
            block = f.read(BLOCK_CHARS)
            if not block:
                return
            block += f.readline(LINE_CHARS)  # end the block at a line end, not mid-word
            if block.strip():
                yield Document(f"{name}#{index}", "text", block)
            index += 1


def _hf_documents(spec: str) -> Iterator[Document]:
    # Hub names are "owner/name" and never contain ":", so the first ":" starts the config.
    name, _, config = spec.partition(":")
    if not name:
        raise ValueError(
            f"--data {HF_PREFIX}{spec}: expected {HF_PREFIX}NAME or {HF_PREFIX}NAME:CONFIG"
        )
    try:
        import datasets
    except ImportError as err:
        raise MissingDependency(
            f"--data {HF_PREFIX}{spec} needs the `datasets` package: pip install datasets"
        ) from err
    try:
        stream = datasets.load_dataset(name, config or None, split="train", streaming=True)
    except Exception as err:  # noqa: BLE001 - network and hub errors come in many types
        raise ValueError(f"could not load Hugging Face dataset {spec!r}: {err}") from err
    found = False
    for index, row in enumerate(stream):
        text = row.get("text")
        if not isinstance(text, str):
            raise ValueError(f"dataset {spec!r} has no string column 'text' (columns: {list(row)})")
        if text.strip():
            found = True
            yield Document(f"{spec}#{index}", "text", text)
    if not found:
        raise ValueError(f"dataset {spec!r} contains no text in its train split")
