"""Hugging Face checkpoint files: safetensors only (nothing is unpickled), with strict accounting.

A checkpoint directory holds `config.json` and either `model.safetensors` or a sharded
`model.safetensors.index.json` naming one file per tensor. `TensorFiles` reads the headers
up front (so a truncated file is reported by the tensors it cuts off) and the data lazily.
`Ledger` records which tensors a loader took; `finish` raises one error that lists every
missing, unknown and misshapen tensor, so a broken checkpoint is diagnosed in one go.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moekit.errors import CheckpointError
from moekit.validate import check_int

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_SHARD_GLOB = "model-*-of-*.safetensors"
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_MAX_LISTED = 12


def read_config(directory: str | os.PathLike) -> dict:
    """The parsed `config.json` of a checkpoint directory."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(config).__name__}")
    return config


GENERATION_CONFIG_FILE = "generation_config.json"


def eos_token_ids(directory: str | os.PathLike) -> list[int]:
    """The ids that end generation for a checkpoint: `eos_token_id` of its
    generation_config.json, else of its config.json (an int or a list; none: [])."""
    directory = Path(directory)
    for name in (GENERATION_CONFIG_FILE, CONFIG_FILE):
        path = directory / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise CheckpointError(f"{path}: not a valid JSON object: {err}") from None
        if value is None:
            continue
        ids = value if isinstance(value, list) else [value]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise CheckpointError(f"{path}: eos_token_id must be ids (ints >= 0), got {value!r}")
        return ids
    return []


def _listing(items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return "".join(f"\n    {item}" for item in shown) + more


def _read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype) from a safetensors header; checks every tensor's bytes exist.

    The format is an 8-byte little-endian header length, a JSON header with each tensor's
    byte range, then the data; a file cut short loses the tensors whose range passes its end.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: truncated or not a safetensors file "
                f"(header of {header_len} bytes, file of {size} bytes)"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: unreadable safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: unreadable safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    _check_entries(path, header)
    cut = [
        f"{name} (bytes {info['data_offsets'][0]}..{info['data_offsets'][1]}, "
        f"data holds {data_size})"
        for name, info in sorted(header.items())
        if info["data_offsets"][1] > data_size
    ]
    if cut:
        raise CheckpointError(
            f"{path}: file is truncated; these tensors are cut off:{_listing(cut)}"
        )
    return {name: (tuple(info["shape"]), info["dtype"]) for name, info in header.items()}


_ITEM_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
"""Bytes per element of the safetensors dtypes; others are named later, when read."""


def _check_entries(path: Path, header: dict) -> None:
    """Each tensor's entry is well formed, its byte range fits its shape, and no two
    ranges overlap: otherwise safetensors fails later with a message naming neither the
    file nor the tensor (or reads one tensor's bytes as another's)."""
    spans = []
    for name, info in sorted(header.items()):
        entry = info if isinstance(info, dict) else {}
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (
            isinstance(entry.get("dtype"), str)
            and isinstance(shape, list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name}: {info!r}")
        item = _ITEM_BYTES.get(info["dtype"])
        if item is not None and offsets[1] - offsets[0] != math.prod(shape) * item:
            raise CheckpointError(
                f"{path}: tensor {name} of shape {tuple(shape)} and dtype {info['dtype']} "
                f"needs {math.prod(shape) * item} bytes, its range holds "
                f"{offsets[1] - offsets[0]}"
            )
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, first), (start, stop, second) in zip(spans, spans[1:], strict=False):
        if start < end and stop > start:
            raise CheckpointError(f"{path}: tensors {first} and {second} overlap in the file")


class TensorFiles:
    """The tensors of one checkpoint directory, single-file or sharded."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        single, index = self.directory / SINGLE_FILE, self.directory / INDEX_FILE
        self._file_of: dict[str, Path] = {}
        self._info: dict[str, tuple[tuple[int, ...], str]] = {}
        # The single file first where both exist, as transformers reads them: the two
        # libraries must never load different weights from one directory.
        if single.is_file():
            header = _read_header(single)
            self._info.update(header)
            self._file_of.update(dict.fromkeys(header, single))
        elif index.is_file():
            self._read_index(index)
        else:
            found = sorted(p.name for p in self.directory.glob("*"))
            hint = (
                " (.bin/.pt files are not read: safetensors only)"
                if any(n.endswith((".bin", ".pt", ".pth")) for n in found)
                else ""
            )
            raise FileNotFoundError(
                f"{self.directory}: neither {SINGLE_FILE} nor {INDEX_FILE}{hint}"
            )

    def _read_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CheckpointError(
                f"{index}: not a valid index (needs a 'weight_map' of tensor name -> file)"
            )
        problems = []
        for shard in sorted(set(weight_map.values())):
            path = self.directory / shard
            if not path.is_file():
                problems.append(f"shard {shard} is missing")
                continue
            try:
                header = _read_header(path)
            except CheckpointError as err:  # listed with the others, not alone
                problems.append(str(err))
                continue
            listed = {k for k, v in weight_map.items() if v == shard}
            problems += [
                f"{k}: listed in the index but absent from {shard}"
                for k in sorted(listed - set(header))
            ]
            problems += [
                f"{k}: in {shard} but not listed in the index" for k in sorted(set(header) - listed)
            ]
            for name in listed & set(header):
                self._info[name] = header[name]
                self._file_of[name] = path
        if problems:
            raise CheckpointError(f"{index}: inconsistent sharded checkpoint:{_listing(problems)}")

    def names(self) -> list[str]:
        return sorted(self._info)

    def first_float_dtype(self) -> str | None:
        """The dtype of the first floating-point tensor, by name, of the first file: what
        transformers loads a checkpoint in (dtype="auto") when its config names none."""
        first = min(self._file_of.values(), default=None)
        for name in sorted(k for k, path in self._file_of.items() if path == first):
            if self._info[name][1] in _FLOAT_DTYPES:
                return self._info[name][1]
        return None

    def __contains__(self, key: str) -> bool:
        return key in self._info

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key][0]

    def dtype(self, key: str) -> str:
        """The safetensors dtype name of a tensor (F32, BF16, I64, ...)."""
        return self._info[key][1]

    def same_values(self, a: str, b: str, rows: int = 1024) -> bool:
        """Whether tensors a and b hold equal values (shapes equal; dtypes may differ),
        compared a block of rows at a time: an embedding can be gigabytes."""
        shape = self.shape(a)
        if shape != self.shape(b):
            return False
        with (
            safe_open(self._file_of[a], framework="pt") as fa,
            safe_open(self._file_of[b], framework="pt") as fb,
        ):
            sa, sb = fa.get_slice(a), fb.get_slice(b)
            for start in range(0, shape[0] if shape else 1, rows):
                block = slice(start, start + rows)
                x, y = (sa[block], sb[block]) if shape else (sa[:], sb[:])
                # float64 holds every value of each float dtype exactly.
                if not torch.equal(x.to(torch.float64), y.to(torch.float64)):
                    return False
        return True

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read from its file (memory-mapped by safetensors)."""
        with safe_open(self._file_of[key], framework="pt") as f:
            return f.get_tensor(key)


class Ledger:
    """Strict key accounting: every tensor taken once, with the shape the config implies."""

    def __init__(self, files: TensorFiles, ignored: frozenset[str] = frozenset()) -> None:
        self.files = files
        self.ignored = ignored
        self.taken: set[str] = set()
        self.missing: list[str] = []
        self.misshapen: list[str] = []

    def take(self, key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The tensor `key` if present with `shape`; else records the problem and returns None."""
        if key not in self.files:
            self.missing.append(f"{key} (expected shape {tuple(shape)})")
            return None
        self.taken.add(key)
        got = self.files.shape(key)
        if got != tuple(shape):
            hint = " (transposed?)" if got == tuple(shape)[::-1] and len(got) == 2 else ""
            self.misshapen.append(f"{key}: shape {got}, config implies {tuple(shape)}{hint}")
            return None
        if self.files.dtype(key) not in _FLOAT_DTYPES:
            # Integer or bool data of the right shape is not a weight: quantized or broken.
            self.misshapen.append(f"{key}: dtype {self.files.dtype(key)}, expected a float dtype")
            return None
        return self.files.get(key)

    def finish(self) -> None:
        """Raise one CheckpointError listing every problem, if there is any."""
        unknown = sorted(set(self.files.names()) - self.taken - self.ignored)
        parts = []
        if self.misshapen:
            parts.append(f"shape mismatch:{_listing(self.misshapen)}")
        if self.missing:
            parts.append(f"missing tensors:{_listing(self.missing)}")
        if unknown:
            parts.append(f"unknown tensors (not used by this config):{_listing(unknown)}")
        if parts:
            raise CheckpointError(f"{self.files.directory}: " + "\n".join(parts))


def save_tensors(
    directory: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    max_shard_bytes: int | None = None,
) -> list[Path]:
    """Write tensors as `model.safetensors`, or as shards plus an index past max_shard_bytes.

    Weight files of an earlier save in `directory` are deleted first: a leftover single
    file is what readers (transformers and this one) load when the new save is sharded,
    and leftover shards would lie beside the new ones.
    """
    if max_shard_bytes is not None:
        check_int("max_shard_bytes", max_shard_bytes)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [directory / SINGLE_FILE, directory / INDEX_FILE, *directory.glob(_SHARD_GLOB)]:
        stale.unlink(missing_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        path = directory / SINGLE_FILE
        save_file(shards[0], path, metadata=meta)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata=meta)
        weight_map.update(dict.fromkeys(shard, name))
        paths.append(directory / name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return paths
