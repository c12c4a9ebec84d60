"""Metrics as JSON Lines: one object per line in `<run_dir>/metrics.jsonl`.

Each record has a "kind" ("train" or "val") and a "step"; train records carry
per-layer tokens per expert so the plots can show load over training.
"""

from __future__ import annotations

import json
from pathlib import Path

from moekit import atomic

FILENAME = "metrics.jsonl"


class MetricsLog:
    """Append-only JSONL writer; flushed per record so a crash loses at most one line."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path) -> list[dict]:
    """Every record of a metrics file (a run directory or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return records


def truncate_after(run_dir: str | Path, step: int) -> None:
    """Drop records after `step` (resuming at a checkpoint repeats those steps)."""
    path = Path(run_dir) / FILENAME
    if path.is_file():
        _write(path, [r for r in read_metrics(path) if r.get("step", 0) <= step])


def copy_until(source: str | Path, run_dir: str | Path, step: int) -> None:
    """Replace run_dir's records by those of `source` (a run directory) up to `step`: the
    history of a run branched from source's checkpoint at `step`."""
    path = Path(run_dir) / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, [r for r in read_metrics(source) if r.get("step", 0) <= step])


def _write(path: Path, kept: list[dict]) -> None:
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
