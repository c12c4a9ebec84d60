"""Files replaced whole: a reader (or a crash) sees the old file or the new one, never part.

Every output a person keeps (figures, summaries, metrics, a run's tokenizer copy) is
written beside its final name and renamed onto it (`os.replace`, atomic on POSIX): a full
disk, an error in a plotting library or Ctrl-C mid-write leaves the previous file as it
was. Checkpoints add fsyncs on top (moekit.train.checkpoint).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block ends
    without an error, removed when it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Replace the file at `path` by `text` (UTF-8), whole."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace the file at `path` by `data`, whole."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | Path, obj: object) -> Path:
    """Replace the file at `path` by `obj` as strict JSON (indented), whole: NaN and
    infinities, which Python writes as bare NaN / Infinity and strict parsers refuse,
    become null (a statistic with no value: one seed's standard deviation, an empty
    expert's share)."""
    return write_text(path, json.dumps(_finite(obj), indent=1, allow_nan=False))


def _finite(obj: object) -> object:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
