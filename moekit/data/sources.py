"""Where text comes from: the embedded corpus, a file, a directory, or a Hugging Face dataset.

`--data` takes `embedded` (the default), a path to a text file or a directory of text files,
or `hf:NAME` / `hf:NAME:CONFIG` for the `text` column of a Hugging Face dataset's train
split, streamed (needs the `datasets` package and a network), e.g.
`hf:wikitext:wikitext-103-raw-v1`.
Documents are yielded one at a time so a multi-GB source never has to fit in memory:
large files are read in blocks of about `BLOCK_CHARS` characters, cut at a line end within
`LINE_CHARS` more (a file without line breaks is cut there). In a directory, files whose
first `PROBE_BYTES` hold a NUL byte are binary (images, checkpoints, archives) and skipped,
as git decides; hidden files and directories are skipped too. Text is read as UTF-8 and
bytes that are not UTF-8 (a Latin-1 file's accents) become U+FFFD. Neither is silent: once
a source has been read, one warning sums up the files with undecodable bytes and one the
files skipped as binary (a UTF-16 text file has NUL bytes, so it is skipped), each naming
the first such file.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from moekit.data.corpus import EMBEDDED, Document, embedded_corpus
from moekit.errors import MissingDependency

BLOCK_CHARS = 1 << 20
LINE_CHARS = 1 << 16
PROBE_BYTES = 8192
HF_PREFIX = "hf:"
# Read with errors="surrogateescape", each byte that is not UTF-8 becomes one lone surrogate
# in U+DC80..U+DCFF, which valid UTF-8 never decodes to: they can be counted, then replaced.
_ESCAPED = re.compile("[\udc80-\udcff]+")


def iter_documents(data: str) -> Iterator[Document]:
    """Yield the documents of `data` (see the module docstring), each labelled by domain.

    Raises FileNotFoundError for a missing path and ValueError when there is no text. Once
    the last document is read, warns of files with undecodable bytes, of binary files and
    of links to directories (not followed).
    """
    if data == EMBEDDED:
        yield from embedded_corpus()
        return
    if data.startswith(HF_PREFIX):
        yield from _hf_documents(data[len(HF_PREFIX) :])
        return
    files, binary, links = _sort_files(Path(data))
    damage = _Damage(binary=binary, dir_links=links)
    found = False
    for path in files:
        for doc in _file_blocks(path, Path(data), damage):
            found = True
            yield doc
    damage.warn()  # here, not per file: a directory can hold thousands
    if not found:
        raise ValueError(f"data path {data} contains no text")


@dataclass
class _Damage:
    """What reading a source had to change or leave out, for one warning of each kind."""

    undecodable: list[Path] = field(default_factory=list)
    """Files with bytes that are not UTF-8, read as U+FFFD."""
    replaced_bytes: int = 0
    binary: list[Path] = field(default_factory=list)
    """Files skipped as binary (a NUL byte in their first PROBE_BYTES)."""
    dir_links: list[Path] = field(default_factory=list)
    """Links to directories, not followed (a link could make a loop)."""

    def warn(self) -> None:
        if self.undecodable:
            warnings.warn(
                f"{_count_files(self.undecodable)} not valid UTF-8: {self.replaced_bytes} "
                f"undecodable byte(s) read as U+FFFD (first: {self.undecodable[0]}); "
                "convert them to UTF-8 (e.g. iconv -f latin1 -t utf-8) to train on their text",
                stacklevel=3,
            )
        if self.binary:
            warnings.warn(
                f"{_count_files(self.binary)} skipped as binary, with a NUL byte in the first "
                f"{PROBE_BYTES} bytes (first: {self.binary[0]}); UTF-16 or UTF-32 text looks "
                "binary too: convert it to UTF-8 to train on it",
                stacklevel=3,
            )
        if self.dir_links:
            n = len(self.dir_links)
            warnings.warn(
                f"{n} link(s) to directories not followed (first: {self.dir_links[0]}); name "
                "a linked directory with --data to train on its files",
                stacklevel=3,
            )


def _count_files(paths: list[Path]) -> str:
    return "1 file was" if len(paths) == 1 else f"{len(paths)} files were"


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
    # Hidden directories are never read (_sort_files): `--run-dir .runs/x` is fine.
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
        text_files, _, _ = _sort_files(root)
        for path in text_files:
            st = path.stat()
            parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]


def _sort_files(root: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(text files, binary files, links to directories left unread) of a data path; a
    binary file named on its own is refused."""
    if not root.exists():
        raise FileNotFoundError(f"data path not found: {root}")
    if root.is_file():
        if _is_binary(root):  # named on its own: an error, where a directory skips it
            raise ValueError(
                f"data file {root} looks binary (a NUL byte in its first {PROBE_BYTES} "
                "bytes); UTF-16 or UTF-32 text looks so too: convert it to UTF-8"
            )
        return [root], [], []
    if not root.is_dir():
        # A device, FIFO or socket: "contains no files" would blame an empty directory.
        raise ValueError(f"data path {root} is not a regular file or directory")
    # rglob follows no directory link (no loops); a link to a file is read as the file.
    files, hidden, links = [], 0, []
    for p in root.rglob("*"):
        if any(part.startswith(".") for part in p.relative_to(root).parts):
            hidden += p.is_file()
        elif p.is_symlink() and p.is_dir():
            links.append(p)
        elif p.is_file():
            files.append(p)
    files = _one_name_per_file(sorted(files))
    if not files:
        left = [f"{hidden} hidden file(s)"] if hidden else []
        left += [f"{len(links)} link(s) to directories, not followed"] if links else []
        raise ValueError(
            f"data directory {root} contains no files to read"
            + (f" ({'; '.join(left)})" if left else "")
        )
    binary = [p for p in files if _is_binary(p)]
    skipped = set(binary)
    return [p for p in files if p not in skipped], binary, sorted(links)


def _one_name_per_file(files: list[Path]) -> list[Path]:
    """Each file once, under the first of its names in sorted order. Documents split by
    name: a file reached through a link as well had its text on both sides of the split,
    validation text trained on."""
    seen: dict[Path, Path] = {}
    for p in files:
        seen.setdefault(p.resolve(), p)
    kept = set(seen.values())
    dropped = [p for p in files if p not in kept]
    if dropped:
        warnings.warn(
            f"{len(dropped)} file(s) read once only, under one name: links to files read "
            f"under another name (e.g. {dropped[0]} -> {dropped[0].resolve()})",
            stacklevel=4,
        )
    return [p for p in files if p in kept]


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(PROBE_BYTES)


def _file_blocks(path: Path, root: Path, damage: _Damage) -> Iterator[Document]:
    name = path.name if root.is_file() else path.relative_to(root).as_posix()
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        index = 0
        while True:
            block = f.read(BLOCK_CHARS)
            if not block:
                return
            block += f.readline(LINE_CHARS)  # end the block at a line end, not mid-word
            block = _replace_undecodable(block, path, damage)
            if block.strip():
                yield Document(f"{name}#{index}", "text", block)
            index += 1


def _replace_undecodable(block: str, path: Path, damage: _Damage) -> str:
    def replace(run: re.Match) -> str:
        raw = run.group().encode("utf-8", "surrogateescape")
        damage.replaced_bytes += len(raw)
        if not damage.undecodable or damage.undecodable[-1] != path:
            damage.undecodable.append(path)
        return raw.decode("utf-8", "replace")  # the U+FFFDs errors="replace" would give

    try:
        block.encode("utf-8")  # fails only on an escaped byte; 10x faster than the regex
    except UnicodeEncodeError:
        return _ESCAPED.sub(replace, block)
    return block


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
        if "text" not in row:
            raise ValueError(f"dataset {spec!r} has no column 'text' (columns: {list(row)})")
        text = row["text"]
        if text is None:  # a missing value: an empty row, as a blank one
            continue
        if not isinstance(text, str):
            raise ValueError(
                f"dataset {spec!r}: column 'text' holds {type(text).__name__} in row {index}, "
                "not a string"
            )
        if text.strip():
            found = True
            yield Document(f"{spec}#{index}", "text", text)
    if not found:
        raise ValueError(f"dataset {spec!r} contains no text in its train split")


def absolute(data: str) -> str:
    """`data` with a file or directory path made absolute: a run records it, and sampling,
    analysis and --resume may run from another working directory."""
    if data == EMBEDDED or data.startswith(HF_PREFIX):
        return data
    return str(Path(data).resolve())
