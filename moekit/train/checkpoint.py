"""Checkpoints: safetensors + JSON, written atomically, verified when read. No pickle anywhere.

A checkpoint is a directory `<run_dir>/checkpoints/step_<n>/` holding

- `model.safetensors`: the full, unsharded model state dict;
- `config.json`: {"model": ModelConfig, "train": TrainConfig} as plain JSON, where a
  tokenizer file inside the run directory is recorded as `run:NAME` (record_tokenizer)
  so that the run can be moved; `resolve_tokenizer` gives the path to read;
- `state.safetensors`: optimizer moments by parameter name and the RNG states;
- `state.json`: step, optimizer hyper-parameters and other scalars;
- `manifest.json`: size and sha256 of every file above, written last.

Everything is written into a temporary sibling directory, each file fsynced, then the
directory is renamed into place with `os.replace` (atomic on POSIX). So a `step_<n>`
directory exists only once it is complete, a process killed mid-save leaves at most a
`.tmp-` directory (removed by the next save), and the manifest's hashes catch a checkpoint
truncated or corrupted afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from moekit.errors import CheckpointError

FORMAT = 1
FILES = ("model.safetensors", "config.json", "state.safetensors", "state.json")
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Prefix of a recorded tokenizer that is a file of the run directory, named relative to it.
# Anything else recorded is "bytes" or a path: absolute, or relative to the working
# directory as runs recorded it before `moekit train` made it absolute.
IN_RUN = "run:"


@dataclass
class Checkpoint:
    """What `load_checkpoint` read: tensors and plain JSON, nothing executed."""

    path: Path
    step: int
    config: dict
    """{"model": ModelConfig dict, "train": TrainConfig dict}."""
    model_state: dict[str, Tensor]
    state_tensors: dict[str, Tensor]
    state: dict


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def run_dir_of(checkpoint: str | Path) -> Path | None:
    """The run directory a checkpoint directory lies in (None if not under checkpoints/).

    The path as given comes first, so a run whose checkpoints/ is a link to other storage
    keeps its directory; then with links resolved, so a link to a checkpoint finds its run.
    """
    for path in (Path(os.path.abspath(checkpoint)), Path(checkpoint).resolve()):
        if path.parent.name == "checkpoints":
            return path.parent.parent
    return None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (renamed into place), oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def drop_after(run_dir: str | Path, step: int) -> None:
    """Delete the run's checkpoints after `step`: a resume from `step` rewrites its history
    from there (its metrics are cut at the same step, after this), and a later checkpoint
    of the old history would be kept by the pruning ahead of the new ones and taken by
    --resume. Newest first, each one whole (`_remove`): stopped part way, the run keeps
    complete checkpoints of its old history up to some step, and its metrics all of it."""
    for path in reversed(list_checkpoints(run_dir)):
        if int(_STEP_DIR.match(path.name).group(1)) > step:
            _remove(path)


def _remove(path: Path) -> None:
    """Delete a checkpoint directory so that it is never seen half deleted.

    It is first renamed out of the listing (atomic), then deleted: a process stopped in
    the deletion leaves a `.tmp-` directory, which the next save removes, and never a
    `step_<n>` directory that lost some of its files (--resume would take it as the
    newest and fail on it).
    """
    doomed = path.with_name(f".{path.name}.tmp-drop-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, Tensor],
    config: dict,
    state_tensors: dict[str, Tensor],
    state: dict,
    keep: int,
    on_file_written: Callable[[str], None] | None = None,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep`.

    on_file_written(name) is called after each file is on disk (tests use it to kill a
    process mid-save). Returns the final directory.
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step_*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    blobs = {
        "model.safetensors": st_save(_contiguous(model_state)),
        "config.json": json.dumps({"format": FORMAT, **config}, indent=1).encode(),
        "state.safetensors": st_save(_contiguous(state_tensors)),
        "state.json": json.dumps({"format": FORMAT, "step": step, **state}, indent=1).encode(),
    }
    manifest = {"format": FORMAT, "step": step, "files": {}}
    for name, blob in blobs.items():
        _write_synced(tmp / name, blob)
        manifest["files"][name] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        if on_file_written is not None:
            on_file_written(name)
    _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    _fsync_dir(tmp)
    if final.exists():  # a step re-run after resuming from an earlier checkpoint
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        _remove(old)
    return final


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify one checkpoint directory; CheckpointError says what is wrong."""
    path = Path(path)
    blobs = _verified_files(path, FILES)
    try:
        config = json.loads(blobs["config.json"])
        state = json.loads(blobs["state.json"])
        model_state = st_load(blobs["model.safetensors"])
        state_tensors = st_load(blobs["state.safetensors"])
    except (json.JSONDecodeError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupted: {err}") from err
    return Checkpoint(path, int(state["step"]), config, model_state, state_tensors, state)


def read_config(path: str | Path) -> dict:
    """A checkpoint's config.json alone ({"model": ..., "train": ...}), verified against the
    manifest: what a caller needs before the weights."""
    blob = _verified_files(Path(path), ("config.json",))["config.json"]
    try:
        return json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupted: config.json ({err})") from err


def read_state(path: str | Path) -> dict:
    """A checkpoint's verified state.json: step, optimizer layout (absent in a checkpoint
    converted from Hugging Face, which holds weights only), data digest and split rule."""
    blob = _verified_files(Path(path), ("state.json",))["state.json"]
    try:
        state = json.loads(blob)
        state["step"] = int(state["step"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupted: state.json ({err})") from err
    return state


def split_rule_of(state: dict) -> str:
    """The token split rule a checkpointed run began with (moekit.data.tokens): "by_name"
    for a run saved before runs recorded one; the current rule for a checkpoint that was
    never trained (converted weights, without optimizer state)."""
    from moekit.data.tokens import SPLIT_RULE

    if "split_rule" in state:
        return state["split_rule"]
    return "by_name" if "optimizer" in state else SPLIT_RULE


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """A checkpoint's model weights alone, verified: a warm start needs no optimizer state."""
    blob = _verified_files(Path(path), ("model.safetensors",))["model.safetensors"]
    try:
        return st_load(blob)
    except SafetensorError as err:
        raise CheckpointError(f"checkpoint {path} is corrupted: {err}") from err


def _verified_files(path: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """The bytes of the checkpoint's files `names`, each checked against the manifest."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {MANIFEST} is missing")
    try:
        expected = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        expected = None
    if not isinstance(expected, dict) or not all(
        isinstance(expected.get(name, {}), dict) for name in FILES
    ):
        raise CheckpointError(f"checkpoint {path} is corrupted: unreadable {MANIFEST}")
    blobs = {}
    for name in names:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        blob = file.read_bytes()
        want = expected.get(name, {})
        if len(blob) != want.get("bytes"):
            cut = isinstance(want.get("bytes"), int) and len(blob) < want["bytes"]
            raise CheckpointError(
                f"checkpoint {path} is corrupted: {name} has {len(blob)} bytes, "
                f"expected {want.get('bytes')}" + (" (truncated?)" if cut else "")
            )
        if hashlib.sha256(blob).hexdigest() != want.get("sha256"):
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} fails its sha256 check")
        blobs[name] = blob
    return blobs


def resolve(path: str | Path) -> Path:
    """A checkpoint directory as given, or the newest complete checkpoint of a run directory."""
    path = Path(path)
    # A step directory without its manifest is a checkpoint cut short (load_checkpoint
    # says so); a run directory may itself be named step_<n>.
    if (path / MANIFEST).is_file() or (_STEP_DIR.match(path.name) and run_dir_of(path)):
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"no checkpoint found in {path}")
    return found[-1]


def record_tokenizer(spec: str, run_dir: str | Path) -> str:
    """How a checkpoint of run_dir records the tokenizer `spec` ("bytes" or a path): a file
    inside run_dir as IN_RUN + its path there, which survives moving the run; else as is."""
    if spec == "bytes":
        return spec
    path, root = Path(spec).resolve(), Path(run_dir).resolve()
    if root not in path.parents:
        return spec
    return IN_RUN + path.relative_to(root).as_posix()


def resolve_tokenizer(recorded: str, ckpt_dir: str | Path) -> str:
    """What `load_tokenizer` takes for the tokenizer the checkpoint ckpt_dir recorded: a
    file of its run directory (IN_RUN + name) as a path; anything else as recorded."""
    if not recorded.startswith(IN_RUN):
        return recorded
    run_dir = run_dir_of(ckpt_dir)
    if run_dir is None:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} records its tokenizer as {recorded!r}, a file of its run "
            "directory, but lies outside one (<run_dir>/checkpoints/step_<n>)"
        )
    return str(run_dir / recorded.removeprefix(IN_RUN))


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """The trained `Transformer` of a checkpoint (or of a run directory's newest one).

    Reads (and verifies) the config and the weights only: the optimizer state, twice the
    weights' size, is for resuming."""
    ckpt_dir = resolve(path)
    return model_from_weights(read_config(ckpt_dir)["model"], load_weights(ckpt_dir), device)


def model_from_weights(
    model_config: dict, state: dict[str, Tensor], device: str | torch.device = "cpu"
):
    """The `Transformer` of a checkpoint's model config and weights, in eval mode."""
    from moekit.model import ModelConfig, Transformer

    model = Transformer(ModelConfig.from_dict(model_config))
    load_model_state(model, state)
    return model.to(device).eval()


def load_model_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load weights whose names must be exactly the model's, or say which differ and how."""
    check_model_names(model, state)
    model.load_state_dict(state, strict=True)


def check_model_names(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Raise CheckpointError naming what differs unless state's names are the model's.

    An expert-parallel model keeps the single-process names (its banks hold fewer
    experts under the same names), so one check serves every way a state is loaded.
    """
    want, have = set(model.state_dict()), set(state)
    if want != have:
        missing, unknown = sorted(want - have), sorted(have - want)
        raise CheckpointError(
            f"checkpoint does not fit this model: missing {_some(missing)}, "
            f"unknown {_some(unknown)} (written by another version of moekit, or for "
            "another model?)"
        )


def _some(names: list[str], shown: int = 3) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _contiguous(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses views and tensors sharing storage (tied embeddings): copy those.
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(key)
        out[name] = t.contiguous()
    return out


def _write_synced(path: Path, blob: bytes) -> None:
    with open(path, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
