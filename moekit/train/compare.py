"""MoE against its dense twin: same tokens, same seed, equal active FFN FLOPs per token.

Both runs share one TrainConfig (so one data order and one token cache) and one seed; the
twin replaces each MoE layer by a dense FFN of width top_k * d_ff (+ shared experts), so
the FFN FLOPs a token runs are equal and only the router's small matmul differs.
Training FLOPs count forward + backward matmuls as 3x the forward (Kaplan et al. 2020).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

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

    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file, not a directory")
    for name in ("moe", "dense"):
        if list_checkpoints(out_dir / name):
            raise ValueError(
                f"{out_dir} already holds a comparison ({out_dir / name} has checkpoints); "
                "choose another --out-dir"
            )


def compare(
    model_config,
    config: TrainConfig,
    out_dir: str | Path,
    parallel=None,
    cache_dir: str | Path | None = None,
) -> tuple[list[CompareRow], Path | None]:
    """Train `model_config` and its dense twin into out_dir/{moe,dense}.

    Returns the table rows (MoE first) and the path of `compare.png`, validation loss
    against training FLOPs (None without matplotlib); also writes `compare.json` with the
    rows and the curves.
    cache_dir: where token files go (default out_dir/cache).
    """
    from moekit.model import count_parameters, dense_twin

    if model_config.moe is None or model_config.moe_as_dense:
        raise ValueError("compare needs an MoE model config (moe set, moe_as_dense False)")
    out_dir = Path(out_dir)
    check_new_comparison(out_dir)
    rows, curves = [], {}
    plots = can_plot()  # one warning for the comparison, not one per model
    cache = cache_dir or out_dir / "cache"
    for name, cfg in (("moe", model_config), ("dense", dense_twin(model_config))):
        result = train(cfg, config, out_dir / name, parallel=parallel, cache_dir=cache, plots=plots)
        per_step = training_flops_per_step(cfg, config)
        val = [r for r in read_metrics(out_dir / name) if r.get("kind") == "val"]
        curves[name] = ([r["step"] * per_step for r in val], [r["val_loss"] for r in val])
        total, active = count_parameters(cfg)
        rows.append(
            CompareRow(
                name=name,
                val_loss=result.val_loss,
                val_losses_by_domain=result.val_losses_by_domain,
                train_flops=per_step * config.steps,
                tokens_per_s=result.tokens_per_s,
                total_params=total,
                active_params=active,
            )
        )
    plot = plot_compare(curves, out_dir / "compare.png") if plots else None
    summary = {"rows": [asdict(r) for r in rows], "curves": curves, "train": config.to_dict()}
    (out_dir / "compare.json").write_text(json.dumps(summary, indent=1))
    return rows, plot


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
