"""The embedded default corpus: real code and real English prose from Python's own install.

Every machine that runs moekit has a Python standard library, so the default corpus needs
no download. It holds two labelled domains:

- `code`: `.py` sources of the standard library (tests, GUI toolkits and vendored
  packages excluded), a deterministic subset chosen by a stable hash of each file's path
  until `code_bytes` is reached;
- `prose`: the Python Language Reference topics shipped as `pydoc_data/topics.py` (the
  text `help("if")` prints), one document per topic.

The corpus depends only on the Python version: the same interpreter gives the same bytes.
Train and validation are split by a stable hash of each document's name.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

DOMAINS = ("code", "prose")
EMBEDDED = "embedded"
# Parts of the standard library that are tests, GUI code or vendored third-party code.
_EXCLUDED_PARTS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "pydoc_data",
    }
)
_MAX_FILE_BYTES = 128 * 1024  # skip the few huge modules so no single file dominates


@dataclass(frozen=True)
class Document:
    """One text of a corpus with its domain label (e.g. "code", "prose" or "text")."""

    name: str
    domain: str
    text: str


def stable_fraction(name: str) -> float:
    """A number in [0, 1) fixed by `name` alone (sha1; Python's hash() is salted per process)."""
    # surrogateescape: a file name that is not UTF-8 (read by os.listdir as lone
    # surrogates) hashes by its bytes; a UTF-8 name gives the same bytes either way.
    digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def stdlib_root() -> Path:
    """The directory of this interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def embedded_corpus(code_bytes: int = 2_000_000) -> list[Document]:
    """The default corpus: about `code_bytes` of stdlib code plus the reference docs as prose.

    Raises FileNotFoundError naming what is missing when this Python ships without its
    library sources (some minimal container images strip them).
    """
    if code_bytes < 1:
        raise ValueError(f"code_bytes must be >= 1, got {code_bytes!r}")
    return _code_documents(stdlib_root(), code_bytes) + _prose_documents()


def _code_documents(root: Path, budget: int) -> list[Document]:
    if not (root / "argparse.py").is_file():
        raise FileNotFoundError(
            f"the embedded corpus needs Python's standard library sources, not found in {root}; "
            "pass --data PATH with your own text instead"
        )
    candidates = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _EXCLUDED_PARTS.intersection(rel.parts) or path.stat().st_size > _MAX_FILE_BYTES:
            continue
        candidates.append(rel.as_posix())
    docs, used = [], 0
    for rel in sorted(candidates, key=lambda r: (stable_fraction(r), r)):
        text = (root / rel).read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        docs.append(Document(f"code/{rel}", "code", text))
        used += len(text.encode("utf-8"))
        if used >= budget:
            break
    return sorted(docs, key=lambda d: d.name)


def _prose_documents() -> list[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError as err:
        raise FileNotFoundError(
            "the embedded corpus needs pydoc_data.topics (the Python reference documentation), "
            "which this Python lacks; pass --data PATH with your own text instead"
        ) from err
    return [Document(f"prose/{name}", "prose", text) for name, text in sorted(topics.items())]
