"""A run's own copy of its tokenizer file, so that a run directory needs nothing outside it.

A run that reads its token ids with a tokenizer.json (named by --tokenizer, or taken from
an --init-from source) keeps a copy at <run_dir>/tokenizer.json, recorded in its
checkpoints as run:tokenizer.json (`checkpoint.record_tokenizer`). Sampling, analysis,
conversion and --resume then work after the original is moved, edited or deleted, and
after the run directory itself moves. A file that already lies inside the run directory
travels with it and is not copied. Two tokenizer files are one tokenizer when their bytes
are equal, whatever their paths: a resume given the original again, or the run's copy,
continues the same run.
"""

from __future__ import annotations

from pathlib import Path

from moekit import atomic

RUN_TOKENIZER = "tokenizer.json"


def tokenizer_home(tokenizer: str, run_dir: str | Path) -> tuple[Path, Path] | None:
    """(the tokenizer file, the place of its copy in run_dir) when the run must keep a
    copy; None for the byte tokenizer or a file already inside run_dir.

    A different file already at that place is a ValueError, never overwritten. Checks
    only: `copy_tokenizer` writes, once the run's other checks have passed.
    """
    if tokenizer == "bytes":
        return None
    src, root = Path(tokenizer).resolve(), Path(run_dir).resolve()
    if root in src.parents:
        return None
    dst = root / RUN_TOKENIZER
    if dst.exists() and not same_tokenizer(str(src), str(dst)):
        raise ValueError(
            f"run directory {run_dir} already holds a {RUN_TOKENIZER} that differs from the "
            f"tokenizer {tokenizer}: a run keeps a copy of its tokenizer file there (and "
            "resumes only with the same one); move that file or choose another --run-dir"
        )
    return src, dst


def same_tokenizer(a: str, b: str) -> bool:
    """Whether the tokenizer settings a and b ("bytes" or a file's path) read ids alike."""
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.is_file() and pb.is_file() and pa.read_bytes() == pb.read_bytes()


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy src to dst through a temporary file and a rename: never a half-written dst."""
    if src == dst:
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(dst, src.read_bytes())
