"""Conversion between Hugging Face checkpoint directories and moekit training checkpoints.

- Hugging Face -> moekit: DST becomes a run directory whose `checkpoints/step_00000000`
  is in the format of moekit.train.checkpoint (so `moekit sample DST`, analysis and
  fine-tuning read it like a trained run); tokenizer files are copied to DST.
- moekit -> Hugging Face: SRC is a checkpoint or run directory; DST gets config.json and
  safetensors that transformers loads, and the run's own tokenizer (the tokenizer.json it
  recorded, or the byte tokenizer written as one), replacing any from an earlier export.
  DST may be an earlier export, never a moekit run or checkpoint directory.

`verify=True` runs a probe batch through source and result and raises VerificationError
on any logit difference above atol.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moekit.data.tokenizer import ByteTokenizer
from moekit.hf.export import save_pretrained
from moekit.hf.io import CONFIG_FILE, GENERATION_CONFIG_FILE, read_config
from moekit.hf.load import from_pretrained, load_state, read_model_config
from moekit.hf.verify import (
    DEFAULT_ATOL,
    compare_logits,
    moekit_logits,
    probe_ids,
    reference_for_hf_dir,
)
from moekit.model.config import ModelConfig
from moekit.validate import check_non_negative

if TYPE_CHECKING:
    from moekit.model.transformer import Transformer
    from moekit.train.init_from import InitSource

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


@dataclass
class ConvertResult:
    """Where the converted checkpoint went and, when verified, how closely it agrees."""

    path: Path
    direction: str
    max_abs_diff: float | None = None
    reference: str | None = None


def is_hf_dir(path: str | Path) -> bool:
    """Whether path is a Hugging Face checkpoint directory (config.json with a model_type)."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except json.JSONDecodeError:
        return False


def _copy_tokenizer(src_dirs: list[Path], dst: Path) -> None:
    for name in TOKENIZER_FILES:
        for d in src_dirs:
            if (d / name).is_file():
                shutil.copyfile(d / name, dst / name)
                break


_SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _keep_special_token_ids(src: Path, dst: Path) -> None:
    """A source whose special-token ids live only in its config.json keeps them in the
    run's generation_config.json, which an export copies back: the exported config.json
    is rebuilt from the model and holds none, and without them generation (here or in
    transformers) would never stop at end-of-sequence."""
    if (dst / GENERATION_CONFIG_FILE).exists():
        return
    hf = read_config(src)
    ids = {k: hf[k] for k in _SPECIAL_TOKEN_IDS if hf.get(k) is not None}
    if ids:
        (dst / GENERATION_CONFIG_FILE).write_text(json.dumps(ids, indent=2) + "\n")


def _check_export_dst(src: Path, dst: Path) -> None:
    """ValueError unless dst may receive a Hugging Face export of the checkpoint src."""
    from moekit.train.checkpoint import MANIFEST, checkpoint_dir
    from moekit.train.metrics import FILENAME as METRICS

    if dst.resolve() == src.resolve():
        raise ValueError(f"dst {dst} is the source itself; export into another directory")
    # `moekit sample` and `analyze` read a directory with a config.json as a Hugging Face
    # one: the export's weights would silently stand in for the run's.
    if checkpoint_dir(dst).exists() or (dst / METRICS).exists():
        raise ValueError(
            f"dst {dst} is a moekit run directory (it has checkpoints/ or {METRICS}); "
            "export into another directory"
        )
    if (dst / MANIFEST).exists():
        raise ValueError(f"dst {dst} is a moekit checkpoint; export into another directory")
    if dst.resolve().parent.name == "checkpoints":
        # A run's checkpoints/ lists its step_<n> directories: an export named like one
        # would be taken for the run's newest checkpoint, without a manifest.
        raise ValueError(
            f"dst {dst} lies in a run's checkpoints/ directory; export into another directory"
        )


def _export_tokenizer_files(recorded: str, beside: list[Path]) -> dict[str, bytes]:
    """name -> contents of the tokenizer files an export of a run writes: its recorded
    tokenizer.json (or the byte tokenizer as one) and the configs found beside the run."""
    files = {}
    for name in TOKENIZER_FILES[1:]:
        found = [d / name for d in beside if (d / name).is_file()]
        if found:
            files[name] = found[0].read_bytes()
    if recorded == "bytes":
        # A byte-level run has no tokenizer file to copy: write the byte tokenizer as one,
        # so `moekit sample`, `tokenizers` and transformers' AutoTokenizer read DST as
        # moekit does.
        files["tokenizer.json"] = (json.dumps(ByteTokenizer.tokenizer_json()) + "\n").encode()
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        files["tokenizer_config.json"] = (json.dumps(config, indent=2) + "\n").encode()
        return files
    # The file the run was trained with, wherever it lies (not one that happens to be
    # named tokenizer.json beside it).
    files["tokenizer.json"] = Path(recorded).read_bytes()
    return files


def hf_to_moekit(src: str | Path, dst: str | Path, dtype: str | None = None) -> Path:
    """Write the Hugging Face checkpoint src as a moekit run directory dst; returns the
    checkpoint directory inside it."""
    from moekit.train.checkpoint import list_checkpoints, record_tokenizer, save_checkpoint
    from moekit.train.config import TrainConfig

    src, dst = Path(src), Path(dst)
    if not (src / "tokenizer.json").is_file():
        # A run records what its token ids mean; guessing bytes would let sample, analyze
        # and --init-from read a 32k-id model's ids as bytes.
        raise ValueError(
            f"{src} has no tokenizer.json to say what its token ids mean; put the model's "
            "tokenizer.json beside its config.json"
        )
    if is_hf_dir(dst):
        # `moekit sample` and `analyze` read a directory with a Hugging Face config.json
        # as one: the run written beside it would never be read.
        same = " (the source itself)" if dst.resolve() == src.resolve() else ""
        raise ValueError(
            f"dst {dst} is a Hugging Face checkpoint directory{same}; convert into a new directory"
        )
    if list_checkpoints(dst):
        # Step 0 would be pruned at once as the oldest of the run's checkpoints, and the
        # run's tokenizer replaced by the converted model's.
        raise ValueError(f"{dst} already holds checkpoints; convert into a new directory")
    model = from_pretrained(src, dtype=dtype)
    dst.mkdir(parents=True, exist_ok=True)
    _copy_tokenizer([src], dst)
    _keep_special_token_ids(src, dst)
    # The run's tokenizer is the checkpoint's own, so `moekit sample DST` decodes right;
    # recorded relative to DST, so DST may be moved.
    train = TrainConfig(tokenizer=record_tokenizer(str(dst / "tokenizer.json"), dst))
    config = {"model": model.config.to_dict(), "train": train.to_dict()}
    return save_checkpoint(
        dst, 0, model.state_dict(), config, {}, {"converted_from": str(src.resolve())}, keep=1
    )


def moekit_to_hf(
    src: str | Path,
    dst: str | Path,
    family: str | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write the moekit checkpoint (or run directory's newest checkpoint) src as a Hugging
    Face checkpoint directory dst.

    Reads (and verifies) the checkpoint's config and weights only: a damaged optimizer
    state, which an export never uses, does not keep the model from being exported."""
    return _export(src, dst, family, max_shard_bytes)[0]


def _export(
    src: str | Path, dst: str | Path, family: str | None, max_shard_bytes: int | None
) -> tuple[Path, Transformer]:
    """`moekit_to_hf`, returning the model it read from src too (what --verify checks)."""
    from moekit.train.checkpoint import (
        load_weights,
        model_from_weights,
        read_config,
        resolve,
        resolve_tokenizer,
    )

    src, dst = Path(src), Path(dst)
    ckpt_dir = resolve(src)
    _check_export_dst(src, dst)
    config = read_config(ckpt_dir)
    recorded = resolve_tokenizer(config["train"]["tokenizer"], ckpt_dir)
    if recorded != "bytes" and not Path(recorded).is_file():
        raise FileNotFoundError(f"tokenizer file not found: {recorded} (recorded by {src})")
    # Read before anything is written: the recorded file may lie in dst itself.
    tokenizer = _export_tokenizer_files(recorded, [src, ckpt_dir, ckpt_dir.parent.parent])
    model = model_from_weights(config["model"], load_weights(ckpt_dir))
    save_pretrained(model, dst, family=family, max_shard_bytes=max_shard_bytes)
    # An earlier export's tokenizer goes, whatever this run brings: a byte-level
    # tokenizer.json left in place would read this model's ids as bytes, and --verify
    # compares logits only.
    for name in TOKENIZER_FILES:
        (dst / name).unlink(missing_ok=True)
    for name, blob in tokenizer.items():
        (dst / name).write_bytes(blob)
    return dst, model


def convert(
    src: str | Path,
    dst: str | Path,
    family: str | None = None,
    dtype: str | None = None,
    verify: bool = False,
    atol: float | None = None,
    max_shard_bytes: int | None = None,
) -> ConvertResult:
    """Convert in the direction src implies (see the module docstring); optionally verify.

    An option that does not apply is a ValueError naming it: family or max_shard_bytes
    with a Hugging Face src, dtype with a moekit one, atol without verify."""
    from moekit.train.checkpoint import load_weights, model_from_weights, read_config

    src_is_hf = is_hf_dir(src)
    _check_options(src_is_hf, family, dtype, max_shard_bytes, verify, atol)
    if src_is_hf:
        result = ConvertResult(hf_to_moekit(src, dst, dtype), "hf->moekit")
        if verify:
            name, reference = reference_for_hf_dir(src)
            weights = load_weights(result.path)
            candidate = model_from_weights(read_config(result.path)["model"], weights)
            ids = probe_ids(candidate.config.vocab_size)
            # Loaded back, the weights are float32 but rounded to the dtype they were saved
            # in: the tolerance is that dtype's, else no bf16 conversion would verify.
            saved = weights["embed.weight"].dtype
            tol = atol if atol is not None else DEFAULT_ATOL[saved]
            result.max_abs_diff = compare_logits(
                reference(ids), moekit_logits(candidate, ids), tol, f"{dst} vs {name}({src})"
            )
            result.reference = name
        return result
    path, source = _export(src, dst, family, max_shard_bytes)
    result = ConvertResult(path, "moekit->hf")
    if verify:
        # The model the export was written from, not src read and verified a second time.
        ids = probe_ids(source.config.vocab_size)
        name, candidate = reference_for_hf_dir(dst)
        tol = atol if atol is not None else DEFAULT_ATOL[torch.float32]
        result.max_abs_diff = compare_logits(
            moekit_logits(source, ids), candidate(ids), tol, f"{name}({dst}) vs {src}"
        )
        result.reference = name
    return result


def _check_options(
    src_is_hf: bool,
    family: str | None,
    dtype: str | None,
    max_shard_bytes: int | None,
    verify: bool,
    atol: float | None,
) -> None:
    # An option that does not apply would otherwise be ignored without a word.
    if src_is_hf:
        other, src_kind = {"--family": family, "--shard-mb": max_shard_bytes}, "Hugging Face"
        direction = "moekit -> Hugging Face"
    else:
        other, src_kind = {"--dtype": dtype}, "moekit"
        direction = "Hugging Face -> moekit"
    for option, value in other.items():
        if value is not None:
            raise ValueError(
                f"{option} applies to {direction} conversion only; SRC is a {src_kind} checkpoint"
            )
    if atol is not None:
        check_non_negative("--atol", atol)
        if not verify:
            raise ValueError(f"--atol applies with --verify only, got --atol {atol!r}")


def load_init_source(src: str | Path) -> InitSource:
    """What `moekit train --init-from SRC` starts from (moekit.train.init_from): SRC is a
    moekit checkpoint, a run directory (its newest checkpoint) or a Hugging Face checkpoint
    directory. Reads SRC's config now and its weights when `read_state` is called. Raises
    CheckpointError or UnsupportedConfig naming what is wrong."""
    from moekit.train.checkpoint import load_weights, read_config, resolve, resolve_tokenizer
    from moekit.train.init_from import InitSource

    path = Path(src)
    if is_hf_dir(path):
        family, config, hf = read_model_config(path)
        tokenizer = path / "tokenizer.json"
        spec = str(tokenizer.resolve()) if tokenizer.is_file() else None
        return InitSource(path, config, spec, lambda: load_state(path, family, config, hf))
    ckpt = resolve(path)
    saved = read_config(ckpt)
    config = ModelConfig.from_dict(saved["model"])
    tokenizer = resolve_tokenizer(saved["train"]["tokenizer"], ckpt)
    return InitSource(path, config, tokenizer, lambda: load_weights(ckpt))
