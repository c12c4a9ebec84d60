"""What a run checks before it trains: memory, the run directory, and a resume's config and data.

Each check raises a ValueError or CheckpointError that names the problem. moekit.train.loop
runs the memory and run-directory checks and a resume's config and step checks before it
reads the text or writes anything, and a resume's data check once the tokens are read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.data.sources import absolute
from moekit.data.tokenizer import absolute_tokenizer
from moekit.devices import check_fits
from moekit.train import checkpoint as ckpt_io
from moekit.train.config import RESUMABLE_FIELDS, TrainConfig
from moekit.train.run_tokenizer import same_tokenizer


def config_differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """'name: saved != now' for every differing (nested) field."""
    diffs = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} (checkpoint) != {b!r} (now)")
    return diffs


def check_resumable(saved: dict, path: Path, model_config, train_config: TrainConfig) -> None:
    """CheckpointError naming every field in which the run now differs from the config
    `saved` of the checkpoint at `path`."""
    now_train = {k: v for k, v in train_config.to_dict().items() if k not in RESUMABLE_FIELDS}
    old_train = {k: v for k, v in saved["train"].items() if k not in RESUMABLE_FIELDS}
    if "tokenizer" in old_train:
        old_train["tokenizer"] = ckpt_io.resolve_tokenizer(old_train["tokenizer"], path)
    # Runs recorded data and tokenizer paths as typed before `moekit train` made them
    # absolute: such a path is read from the working directory, as it was then.
    for d in (now_train, old_train):
        if "tokenizer" in d:
            d["tokenizer"] = absolute_tokenizer(d["tokenizer"])
        if "data" in d:
            d["data"] = absolute(d["data"])
    old_tok = old_train.get("tokenizer", "bytes")
    if old_tok != "bytes" and not Path(old_tok).is_file():
        # Else the comparison below would call it a different tokenizer.
        kept = saved["train"]["tokenizer"].startswith(ckpt_io.IN_RUN)
        raise ckpt_io.CheckpointError(
            f"cannot resume from {path}: its tokenizer file {old_tok} is missing"
            + (" (the run's copy of the file it was trained with)" if kept else "")
            + "; put the same file back there: ids read by another tokenizer would not "
            "continue this run"
        )
    if "tokenizer" in old_train and same_tokenizer(old_train["tokenizer"], now_train["tokenizer"]):
        # The run's copy of its tokenizer file and the file it was given are one tokenizer.
        now_train["tokenizer"] = old_train["tokenizer"]
    diffs = config_differences(saved["model"], model_config.to_dict(), "model.")
    diffs += config_differences(old_train, now_train, "train.")
    if diffs:
        raise ckpt_io.CheckpointError(
            "cannot resume: the configuration differs from the checkpoint's in "
            f"{len(diffs)} field(s): " + "; ".join(diffs)
        )


def check_has_training_state(path: Path, state: dict) -> None:
    """CheckpointError when the checkpoint (state: its state.json) holds no optimizer state
    to continue from: a conversion's weights."""
    if "optimizer" not in state:
        raise ckpt_io.CheckpointError(
            f"checkpoint {path} holds weights only (no optimizer or data-position state, as "
            f"a conversion writes): nothing to resume; begin a new run from it with "
            f"--init-from {path} and another --run-dir"
        )


def resumed_split_rule(path: Path, state: dict, split_rule: str | None) -> str:
    """The split rule a resume of the checkpoint at `path` (state: its state.json) tokenizes
    with: the one its run began with. ValueError when the caller asks for another."""
    saved = ckpt_io.split_rule_of(state)
    if split_rule not in (None, saved):
        raise ValueError(
            f"split_rule {split_rule!r}: {path} was trained on the {saved!r} split of its "
            "text, which a resume keeps"
        )
    return saved


def check_steps_left(step: int, train_config: TrainConfig) -> None:
    """ValueError when a resumed checkpoint has already run every step."""
    if step >= train_config.steps:
        raise ValueError(
            f"the checkpoint is at step {step}; nothing left of steps={train_config.steps}"
        )


def check_seq_len(train_config: TrainConfig, model_config) -> None:
    """ValueError when the training windows are longer than the model's context."""
    if train_config.seq_len > model_config.max_seq_len:
        raise ValueError(
            f"seq_len ({train_config.seq_len}) must be <= the model's max_seq_len "
            f"({model_config.max_seq_len})"
        )


def check_router_learns(model_config) -> None:
    """ValueError when top-1 routing gives every token a combine weight of exactly 1.

    A single weight renormalised over K=1, or a softmax over one logit, is 1: the router
    then gets no gradient from the language-model loss, only from the balancing losses.
    Switch Transformer (Fedus et al. 2021) scales its one expert by the router probability.
    The layer itself computes such a config faithfully (a loaded checkpoint may have one);
    only training it is refused.
    """
    moe = model_config.moe
    if moe is None or model_config.moe_as_dense or moe.top_k != 1:
        return
    if moe.router == "topk_softmax":
        what, fix = "", "--set moe.router=softmax_topk --set moe.norm_topk_prob=false"
    elif moe.router in ("softmax_topk", "sigmoid_bias") and moe.norm_topk_prob:
        what, fix = " and moe.norm_topk_prob=True", "--set moe.norm_topk_prob=false"
    else:
        return
    raise ValueError(
        f"moe.top_k=1 with moe.router={moe.router!r}{what} gives every token a combine weight "
        "of exactly 1, so the router would learn from the balancing losses only, never from "
        f"the language-model loss; to scale the expert by the router's score, {fix}"
    )


def check_layout(model_config, train_config: TrainConfig, parallel) -> None:
    """ValueError, before the text is tokenized, when the batch or the experts do not split
    over the processes (each would otherwise fail only in the first step)."""
    if parallel is None:
        return
    world, mb = parallel.world_size, train_config.micro_batch_size
    if mb % world:
        raise ValueError(
            f"batch_size / grad_accum = {train_config.batch_size} / {train_config.grad_accum} "
            f"= {mb} rows per micro-batch must be divisible by the {world} processes "
            "(--batch-size, --grad-accum)"
        )
    ep = parallel.expert_parallel
    if ep > 1 and model_config.moe_layer_ids and model_config.moe.num_experts % ep:
        raise ValueError(
            f"num_experts ({model_config.moe.num_experts}) must be divisible by "
            f"--expert-parallel ({ep})"
        )


def check_memory(model_config, device: torch.device, parallel) -> None:
    """ValueError, before anything is built or read, when training cannot fit in memory."""
    # fp32 weights, gradients and AdamW's two moments: 16 bytes a parameter, on each rank
    # for its share: all of it under data parallelism, 1/N of the experts under expert
    # parallelism over N ranks (which first builds the full model: 4 bytes a parameter).
    # Ranks on one machine's CPU share its RAM; each CUDA rank has a device of its own.
    from moekit.model.counting import count_parameters, expert_parameters

    total, _ = count_parameters(model_config)
    need = 16 * total
    if parallel is not None and parallel.expert_parallel > 1:
        experts = expert_parameters(model_config)
        need = max(4 * total, 16 * (total - experts + experts // parallel.expert_parallel))
    what = f"training this {total / 1e9:.2f}B-parameter model"
    ranks_here = 1 if parallel is None or device.type != "cpu" else parallel.local_world_size
    if ranks_here > 1:
        need *= ranks_here
        what += f" on the {ranks_here} ranks of this machine"
    check_fits(
        f"{what} (weights, gradients and AdamW state; the large presets are for counting "
        "parameters: shrink one with --set)",
        need,
        device,
    )


def check_new_run_dir(run_dir: Path) -> None:
    """ValueError when a new run would write into a directory holding another's checkpoints,
    into a Hugging Face checkpoint directory, or where a file stands."""
    check_run_dir_kind(run_dir)
    if ckpt_io.list_checkpoints(run_dir):
        # A fresh run here would interleave its checkpoints and metrics with the old run's.
        raise ValueError(
            f"run directory {run_dir} already holds checkpoints; pass --resume to continue "
            "that run, or choose another --run-dir (a converted checkpoint, weights only, "
            "begins a new run with --init-from)"
        )


def check_run_dir_kind(run_dir: Path) -> None:
    """ValueError when a file stands at run_dir, or it is a Hugging Face checkpoint
    directory: for a new run and for a branch of another run alike."""
    from moekit.hf.convert import is_hf_dir

    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} is a file, not a directory")
    if is_hf_dir(run_dir):
        # sample, analyze and --init-from read such a directory as the Hugging Face
        # checkpoint: the run written into it would never be read back.
        raise ValueError(
            f"run directory {run_dir} is a Hugging Face checkpoint directory (config.json "
            "with a model_type); choose another --run-dir"
        )


def check_not_in_checkpoints(run_dir: Path) -> None:
    """ValueError when run_dir lies in another run's checkpoints/ (a checkpoint directory or
    below one): that run's rotation of old checkpoints would delete it, this run and all."""
    path = Path(run_dir).resolve()
    for p in (path, *path.parents):
        in_checkpoint = p.parent.name == "checkpoints" and (p / ckpt_io.MANIFEST).is_file()
        if in_checkpoint or (p.name == "checkpoints" and ckpt_io.list_checkpoints(p.parent)):
            raise ValueError(
                f"run directory {run_dir} lies inside {p}, part of the run in {p.parent}: "
                "that run deletes old checkpoints as it saves new ones; to continue from a "
                f"checkpoint pass --resume {p if in_checkpoint else 'CHECKPOINT'} with a "
                "--run-dir of its own"
            )


def resume_source(checkpoint: Path, run_dir: Path) -> Path | None:
    """The run a resumed checkpoint branches from (None when it is run_dir's own).

    Resuming rewrites the run directory's later checkpoints and metrics: those must be the
    resumed run's own. A directory without checkpoints may take a branch of another run.
    """
    owner = ckpt_io.run_dir_of(checkpoint)
    if owner is not None and owner.resolve() == run_dir.resolve():
        return None
    check_run_dir_kind(run_dir)
    if ckpt_io.list_checkpoints(run_dir):
        raise ValueError(
            f"cannot resume {checkpoint} into run directory {run_dir}: it holds checkpoints "
            "that resuming would overwrite; to continue the run in it pass --resume alone, "
            f"to continue the checkpoint's own run pass --run-dir "
            f"{owner if owner is not None else 'DIR'}, or branch into a new directory"
        )
    return owner if owner is not None else checkpoint


def check_same_data(saved: str | None, now: str, data: str) -> None:
    """CheckpointError unless the tokens' digest is the checkpoint's `saved` one."""
    # The data setting can name the same path while the text behind it changed; the
    # tokens' digest cannot. (None: a checkpoint from before digests were recorded.)
    if saved is not None and saved != now:
        raise ckpt_io.CheckpointError(
            f"cannot resume: the tokens of data {data!r} differ from the checkpoint's "
            f"(digest {now}, checkpoint {saved}); the text changed since the run began"
        )
