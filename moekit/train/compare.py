"""MoE against its dense twin: same tokens, same seed, equal active FFN FLOPs per token.

Both runs share one TrainConfig (so one data order and one token cache) and one seed; the
twin replaces each MoE layer by a dense FFN of width top_k * d_ff (+ shared experts), so
the FFN FLOPs a token runs are equal and only the router's small matmul differs.
Training FLOPs count forward + backward matmuls as 3x the forward (Kaplan et al. 2020).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from moekit import atomic
from moekit.data.sources import check_outside
from moekit.train.config import TrainConfig
from moekit.train.loop import train
from moekit.train.metrics import read_metrics
from moekit.train.plots import can_plot, plot_compare


@dataclass
class CompareRow:
    """One trained model of a comparison."""

    name: str
    val_loss: float
    val_losses_by_domain: dict[str, float]
    train_flops: float
    tokens_per_s: float
    total_params: int
    active_params: int


def training_flops_per_step(model_config, config: TrainConfig) -> float:
    """Matmul FLOPs of one optimizer step: 3 x forward FLOPs per token x tokens per step."""
    from moekit.model import flops_per_token

    return 3 * flops_per_token(model_config, config.seq_len).total * config.tokens_per_step


def check_new_comparison(out_dir: Path) -> None:
    """ValueError when out_dir already holds a comparison's runs, or is a file."""
    from moekit.train.checkpoint import list_checkpoints

    check_not_file(out_dir)
    for name in MODELS:
        if list_checkpoints(out_dir / name):
            raise ValueError(
                f"{out_dir} already holds a comparison ({out_dir / name} has checkpoints); "
                "pass --resume to continue it, or choose another --out-dir"
            )


def check_comparison_to_resume(out_dir: Path) -> None:
    """ValueError unless out_dir holds a comparison with a checkpoint to continue from."""
    check_not_file(out_dir)
    if not has_runs(out_dir):
        raise ValueError(
            f"--resume: {out_dir} holds no comparison to continue (no checkpoint in "
            f"{out_dir / MODELS[0]} or {out_dir / MODELS[1]}); run without --resume to start one"
        )


def has_runs(out_dir: Path) -> bool:
    """Whether either model of a comparison in out_dir has a checkpoint."""
    from moekit.train.checkpoint import list_checkpoints

    return any(list_checkpoints(out_dir / name) for name in MODELS)


def check_not_file(out_dir: Path) -> None:
    """ValueError when a file stands where the comparison's directory goes."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file, not a directory")


MODELS = ("moe", "dense")
"""The comparison's two runs, out_dir/moe and out_dir/dense, trained in this order."""


def compare(
    model_config,
    config: TrainConfig,
    out_dir: str | Path,
    parallel=None,
    cache_dir: str | Path | None = None,
    resume: bool = False,
    split_rule: str | None = None,
) -> tuple[list[CompareRow], Path | None]:
    """Train `model_config` and its dense twin into out_dir/{moe,dense}.

    Returns the table rows (MoE first) and the path of `compare.png`, validation loss
    against training FLOPs (None without matplotlib); also writes `compare.json` with the
    rows and the curves.
    cache_dir: where token files go (default out_dir/cache).
    resume: continue an interrupted comparison in out_dir (`_train_or_continue`).
    split_rule: how new runs split the text (moekit.data.tokens; default the current
        rule); resuming, a model not yet begun takes the rule of the one already run, so
        both train on the same tokens.
    """
    from moekit.model import count_parameters, dense_twin

    if model_config.moe is None or model_config.moe_as_dense:
        raise ValueError("compare needs an MoE model config (moe set, moe_as_dense False)")
    if not model_config.moe_layer_ids:
        # Its twin would be the same dense model, trained twice.
        raise ValueError(
            f"compare needs an MoE layer: first_k_dense={model_config.first_k_dense}, "
            f"moe_every={model_config.moe_every} and dense_layers="
            f"{model_config.dense_layers} leave all {model_config.num_layers} layers dense"
        )
    out_dir = Path(out_dir)
    check_outside(config.data, out_dir, "--out-dir")  # named as given, not as out_dir/moe
    if resume:
        check_comparison_to_resume(out_dir)
    else:
        check_new_comparison(out_dir)
    rows, curves = [], {}
    plots = can_plot()  # one warning for the comparison, not one per model
    cache = Path(cache_dir or out_dir / "cache")
    if resume:
        split_rule = split_rule_of_runs([out_dir / name for name in MODELS]) or split_rule
    twins = dict(zip(MODELS, (model_config, dense_twin(model_config)), strict=True))
    for name, cfg in twins.items():
        run_dir = out_dir / name
        run = _Run(cfg, config, run_dir, parallel, cache, plots, split_rule)
        _train_or_continue(run, resume)
        per_step = training_flops_per_step(cfg, config)
        records = read_metrics(run_dir)
        val = [r for r in records if r.get("kind") == "val"]
        curves[name] = ([r["step"] * per_step for r in val], [r["val_loss"] for r in val])
        final = _final_val(val, config.steps, run_dir)
        total, active = count_parameters(cfg)
        rows.append(
            CompareRow(
                name=name,
                val_loss=final["val_loss"],
                val_losses_by_domain={
                    k[len("val_loss_") :]: v for k, v in final.items() if k.startswith("val_loss_")
                },
                train_flops=per_step * config.steps,
                tokens_per_s=_tokens_per_s(records, config.tokens_per_step),
                total_params=total,
                active_params=active,
            )
        )
    plot = plot_compare(curves, out_dir / "compare.png") if plots else None
    summary = {"rows": [asdict(r) for r in rows], "curves": curves, "train": config.to_dict()}
    atomic.write_json(out_dir / "compare.json", summary)
    return rows, plot


def split_rule_of_runs(run_dirs: list[Path]) -> str | None:
    """The token split rule of the first of these runs that has a checkpoint (None if
    none has): the rule the runs of one comparison share."""
    from moekit.train import checkpoint as ckpt_io

    for run_dir in run_dirs:
        found = ckpt_io.list_checkpoints(run_dir)
        if found:
            return ckpt_io.split_rule_of(ckpt_io.read_state(found[-1]))
    return None


@dataclass(frozen=True)
class _Run:
    """One model of a comparison and how to train it."""

    model_config: object
    config: TrainConfig
    run_dir: Path
    parallel: object
    cache: Path
    plots: bool
    split_rule: str | None


def _train_or_continue(run: _Run, resume: bool) -> None:
    """Train one model of the comparison; with `resume`, only what it lacks.

    A run without checkpoints trains from the start; one whose newest checkpoint is short
    of config.steps continues from it exactly (as `moekit train --resume`, which checks its
    config and tokens); a finished one is checked as a resume would be: the comparison
    must be of the models and tokens it names.
    """
    from moekit.train import checkpoint as ckpt_io
    from moekit.train import preflight

    config = run.config
    kwargs = dict(parallel=run.parallel, cache_dir=run.cache, plots=run.plots)
    found = ckpt_io.list_checkpoints(run.run_dir) if resume else []
    if not found:
        train(run.model_config, config, run.run_dir, split_rule=run.split_rule, **kwargs)
        return
    newest = found[-1]
    state = ckpt_io.read_state(newest)
    if state["step"] < config.steps:
        train(run.model_config, config, run.run_dir, resume=newest, **kwargs)
        return
    preflight.check_resumable(ckpt_io.read_config(newest), newest, run.model_config, config)
    if state["step"] > config.steps:  # steps is in the config checked above: a corrupt state
        raise ValueError(f"{newest} is at step {state['step']}, past steps={config.steps}")
    preflight.check_same_data(
        state.get("data_digest"), _data_digest(config, run.cache, state), config.data
    )


def _data_digest(config: TrainConfig, cache: Path, state: dict) -> str:
    """The digest of the tokens config.data gives now, split by the checkpoint's rule."""
    from moekit.data.tokenizer import load_tokenizer
    from moekit.data.tokens import data_digest, prepare_tokens
    from moekit.train.checkpoint import split_rule_of

    tokenizer = load_tokenizer(config.tokenizer)
    splits = prepare_tokens(
        config.data, tokenizer, cache, config.val_fraction, split_rule_of(state)
    )
    return data_digest(splits)


def _final_val(val: list[dict], steps: int, run_dir: Path) -> dict:
    """The validation record of the last step (every run evaluates at its end)."""
    for record in reversed(val):
        if record.get("step") == steps and "val_loss" in record:
            return record
    raise ValueError(
        f"{run_dir / 'metrics.jsonl'} has no validation loss at step {steps}, the run's "
        "last: its metrics were changed or lost"
    )


def _tokens_per_s(records: list[dict], tokens_per_step: int) -> float:
    """Training tokens/s over the run's logged steps, however many processes ran them:
    the tokens of those steps over the sum of their times (each record's tokens_per_s
    is one step's tokens over that step's time)."""
    rates = [r["tokens_per_s"] for r in records if r.get("kind") == "train"]
    if not rates:
        return float("nan")
    return len(rates) * tokens_per_step / sum(tokens_per_step / t for t in rates)


def format_table(rows: list[CompareRow]) -> str:
    """A plain-text table of the rows (one line per model)."""
    domains = sorted({d for r in rows for d in r.val_losses_by_domain})
    head = ["model", "val loss", *[f"val {d}" for d in domains]]
    head += ["train FLOPs", "tokens/s", "params", "active"]
    lines = [head]
    for r in rows:
        lines.append(
            [
                r.name,
                f"{r.val_loss:.4f}",
                *[f"{r.val_losses_by_domain.get(d, float('nan')):.4f}" for d in domains],
                f"{r.train_flops:.3e}",
                f"{r.tokens_per_s:.0f}",
                f"{r.total_params / 1e6:.3f}M",
                f"{r.active_params / 1e6:.3f}M",
            ]
        )
    return text_table(lines)


def text_table(lines: list[list[str]]) -> str:
    """Rows of cells as right-aligned columns; the first row is the header."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )
