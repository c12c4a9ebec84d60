"""Token files: a corpus tokenized once into flat binary files, then memory-mapped.

Layout of a cache entry `<cache_dir>/<key>/`: `train.bin` and `val.bin` (token ids,
native-endian uint8/uint16/uint32 by vocabulary size) and `meta.json`, written last: an
entry without `meta.json` is incomplete and is rebuilt. The key hashes the source, the
tokenizer (its file's bytes) and the split, so changing any of them never reuses stale
tokens. `meta.json` also holds a SHA-1 of each split's tokens: `TokenSplit.digest`, which
a checkpoint records so that resuming on other text is refused.

Documents go to validation when `stable_fraction(name) < val_fraction` (a stable hash of
the name, fixed across machines and runs). Under the "sized" split rule, where that holds
out under half or over twice val_fraction of the tokens (a single file, or a few of very
different sizes), the training documents then the validation ones are cut by position
instead, the last val_fraction becoming validation. The "by_name" rule, of runs
checkpointed before "sized" existed, cuts by position only when a split is empty; a
resumed run keeps the rule it began with (its checkpoint records it), so its tokens stay
its own.
"""

from __future__ import annotations

import array
import contextlib
import glob
import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.data import sources
from moekit.data.corpus import stable_fraction
from moekit.data.tokenizer import Tokenizer, token_dtype
from moekit.validate import check_range

SPLITS = ("train", "val")
SPLIT_RULES = ("sized", "by_name")
SPLIT_RULE = "sized"
"""The split rule of new runs (see the module docstring)."""
_FORMAT = 3
_ARRAY_CODES = {torch.uint8: "B", torch.uint16: "H", torch.uint32: "I"}
_DTYPE_NAMES = {torch.uint8: "uint8", torch.uint16: "uint16", torch.uint32: "uint32"}


@dataclass(frozen=True)
class TokenSplit:
    """One split on disk: `num_tokens` ids in `path`, and the token ranges of each domain."""

    path: Path
    dtype: torch.dtype
    num_tokens: int
    domains: tuple[tuple[str, int, int], ...]
    """(domain, start, end) runs of consecutive documents of the same domain."""
    digest: str = ""
    """SHA-1 of the split's token file: equal digests, equal tokens ("" when not known)."""

    def tokens(self) -> torch.Tensor:
        """The ids as a 1-D tensor memory-mapped from disk (read lazily, never written)."""
        if self.num_tokens == 0:
            return torch.empty(0, dtype=self.dtype)
        return torch.from_file(str(self.path), shared=False, size=self.num_tokens, dtype=self.dtype)

    def domain_names(self) -> list[str]:
        return sorted({d for d, _, _ in self.domains})


def prepare_tokens(
    data: str,
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    val_fraction: float,
    split_rule: str = SPLIT_RULE,
) -> dict[str, TokenSplit]:
    """Tokenize `data` into `cache_dir` once (reusing a complete earlier entry) and map it.

    split_rule: "sized" (new runs) or "by_name" (runs checkpointed before it; see the
    module docstring)."""
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    if not isinstance(data, str):
        raise TypeError(f"data must be a path or a name (str), got {type(data).__name__}")
    check_range("val_fraction", val_fraction, 0, 1, low_open=True, high_open=True)
    if split_rule not in SPLIT_RULES:
        raise ValueError(f"split_rule must be one of {SPLIT_RULES}, got {split_rule!r}")
    sources.check_outside(data, cache_dir, "the token cache")
    dtype = token_dtype(tokenizer.vocab_size)
    key_src = [
        _FORMAT,
        sources.fingerprint(data),
        tokenizer.fingerprint,
        tokenizer.vocab_size,
        val_fraction,
        split_rule,
    ]
    key = hashlib.sha1(json.dumps(key_src).encode()).hexdigest()[:16]
    entry = Path(cache_dir) / key
    meta_path = entry / "meta.json"
    meta = _intact_meta(entry, dtype)
    if meta is None:
        _build(entry, data, tokenizer, dtype, val_fraction, split_rule)
        meta = json.loads(meta_path.read_text())
    return {
        split: TokenSplit(
            entry / f"{split}.bin",
            dtype,
            meta[split]["num_tokens"],
            tuple(tuple(d) for d in meta[split]["domains"]),
            meta[split]["sha1"],
        )
        for split in SPLITS
    }


def _intact_meta(entry: Path, dtype: torch.dtype) -> dict | None:
    """A cache entry's meta.json when it and the token files it describes look whole (the
    sizes the entry says), else None: a damaged entry is built again, not mapped."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        itemsize = torch.empty(0, dtype=dtype).element_size()
        whole = all(
            (entry / f"{s}.bin").stat().st_size == meta[s]["num_tokens"] * itemsize for s in SPLITS
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if whole else None


def _remove_dead_builds(entry: Path, host: str) -> None:
    """Delete the half-built copies of this entry left by processes of this host that are
    gone (killed mid-build): each can be gigabytes. A live process's build, or another
    host's on shared storage, is left alone."""
    prefix = f"{entry.name}.tmp-"
    for tmp in entry.parent.glob(f"{glob.escape(prefix)}*"):
        # tmp-<host>-<pid>; tmp-<pid> as earlier builds named it, on one host.
        pid = tmp.name.removeprefix(prefix).removeprefix(f"{host}-")
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _build(
    entry: Path,
    data: str,
    tokenizer: Tokenizer,
    dtype: torch.dtype,
    val_fraction: float,
    split_rule: str,
):
    host = socket.gethostname()
    _remove_dead_builds(entry, host)
    tmp = entry.with_name(f"{entry.name}.tmp-{host}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = {s: 0 for s in SPLITS}
    domains: dict[str, list[list]] = {s: [] for s in SPLITS}
    try:
        with contextlib.ExitStack() as stack:
            files = {s: stack.enter_context(open(tmp / f"{s}.bin", "wb")) for s in SPLITS}
            for doc in sources.iter_documents(data):
                split = "val" if stable_fraction(doc.name) < val_fraction else "train"
                ids = tokenizer.encode(doc.text)
                if not ids:
                    continue
                files[split].write(_to_bytes(ids, dtype))
                start, counts[split] = counts[split], counts[split] + len(ids)
                runs = domains[split]
                if runs and runs[-1][0] == doc.domain and runs[-1][2] == start:
                    runs[-1][2] = counts[split]
                else:
                    runs.append([doc.domain, start, counts[split]])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed build leaves no half-written entry
        raise
    if counts["train"] + counts["val"] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"data {data} contains no text")
    if split_rule == "sized":
        by_position = not _share_near(counts, val_fraction)
    else:
        by_position = counts["train"] == 0 or counts["val"] == 0
    if by_position:
        _split_by_position(tmp, counts, domains, dtype, val_fraction)
    meta = {
        "format": _FORMAT,
        "split_rule": split_rule,
        "data": data,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "dtype": _DTYPE_NAMES[dtype],
        **{
            s: {"num_tokens": counts[s], "domains": domains[s], "sha1": _sha1(tmp / f"{s}.bin")}
            for s in SPLITS
        },
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    _publish(tmp, entry, dtype)


def _publish(tmp: Path, entry: Path, dtype: torch.dtype) -> None:
    """Rename the built copy into place, unless another process building the same entry
    (the same key: the same tokens) got there first. Its entry may be in use by it, so it
    stays and this copy goes; only a damaged entry is replaced."""
    if _intact_meta(entry, dtype) is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    shutil.rmtree(entry, ignore_errors=True)
    try:
        os.replace(tmp, entry)
    except OSError:
        # The other process published between the check and the rename.
        shutil.rmtree(tmp, ignore_errors=True)
        if _intact_meta(entry, dtype) is None:
            raise


def _share_near(counts: dict[str, int], val_fraction: float) -> bool:
    """Whether the documents' split holds out between half and twice val_fraction of the
    tokens. Documents split by name, whatever their sizes: with a few large files (or the
    ~1 MiB blocks of one) the share held out can be anything from nothing to most of it."""
    share = counts["val"] / (counts["train"] + counts["val"])
    return val_fraction / 2 <= share <= 2 * val_fraction


def _split_by_position(tmp: Path, counts, domains, dtype: torch.dtype, val_fraction: float):
    """The training documents, then the validation ones, as one text: its head for
    training, its last val_fraction for validation."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    with open(tmp / "train.bin", "ab") as f, open(tmp / "val.bin", "rb") as val:
        shutil.copyfileobj(val, f)
    offset = counts["train"]
    runs: list[list] = []
    for d, s, e in domains["train"] + [[d, s + offset, e + offset] for d, s, e in domains["val"]]:
        if runs and runs[-1][0] == d and runs[-1][2] == s:
            runs[-1][2] = e  # one run where a domain's tokens now meet
        else:
            runs.append([d, s, e])
    n = counts["train"] + counts["val"]
    cut = n - max(1, round(n * val_fraction))
    # Streamed: the tail of a single large file is val_fraction of the corpus.
    with open(tmp / "train.bin", "r+b") as f, open(tmp / "val.bin", "wb") as val:
        f.seek(cut * itemsize)
        shutil.copyfileobj(f, val)
        f.truncate(cut * itemsize)
    counts["train"], counts["val"] = cut, n - cut
    domains["train"] = [[d, s, min(e, cut)] for d, s, e in runs if s < cut]
    domains["val"] = [[d, max(s, cut) - cut, e - cut] for d, s, e in runs if e > cut]


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def data_digest(splits: dict[str, TokenSplit]) -> str:
    """One digest of every split's tokens (what a checkpoint records of its data)."""
    return hashlib.sha1(" ".join(splits[s].digest for s in SPLITS).encode()).hexdigest()[:16]


def _to_bytes(ids: list[int], dtype: torch.dtype) -> bytes:
    if dtype == torch.uint8:
        return bytes(ids)
    return array.array(_ARRAY_CODES[dtype], ids).tobytes()
