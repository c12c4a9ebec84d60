"""PNG plots of training runs: loss curves, expert load over training, MoE-vs-dense comparisons.

Figures come from moekit.figures: matplotlib (the `plots` extra) is imported on first use,
and no display or pyplot state is involved.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from moekit.figures import (
    INSTALL_HINT,
    have_matplotlib,
    new_figure,
    panel_grid,
    save_figure,
    tick_step,
)
from moekit.train.metrics import read_metrics

_DPI = 110


def can_plot() -> bool:
    """Whether training's figures can be drawn; warns when matplotlib is missing.

    Training and comparing do not need matplotlib: a finished run without its figures is
    better than one that ends in an error after its last checkpoint.
    """
    if have_matplotlib():
        return True
    warnings.warn(f"plots skipped: matplotlib is not installed ({INSTALL_HINT})", stacklevel=3)
    return False


def _figure(width: float, height: float, nrows: int = 1, ncols: int = 1):
    return new_figure(width, height, nrows, ncols, layout="constrained")


def plot_losses(records: list[dict], path: str | Path) -> Path:
    """Training loss (raw and smoothed) and validation loss (overall and per domain) by step."""
    fig, axes = _figure(7, 4.2)
    ax = axes[0][0]
    train = [r for r in records if r.get("kind") == "train"]
    if train:
        steps = [r["step"] for r in train]
        losses = [r["loss"] for r in train]
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(steps, _ema(losses, 0.9), color="tab:blue", label="train (EMA 0.9)")
    val = [r for r in records if r.get("kind") == "val"]
    keys = sorted({k for r in val for k in r if k.startswith("val_loss")})
    domain_colors = iter(["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"] * 9)
    for key in keys:
        pts = [(r["step"], r[key]) for r in val if key in r]
        label = "validation" if key == "val_loss" else f"validation: {key[len('val_loss_') :]}"
        style = (
            {"color": "black", "ls": "-"}
            if key == "val_loss"
            else {"ls": "--", "color": next(domain_colors)}
        )
        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=label, **style)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path, _DPI)


def plot_expert_load(records: list[dict], path: str | Path) -> Path | None:
    """Share of routed tokens per expert over training, one panel per MoE layer.

    Returns None for a dense run (no MoE layer, nothing to plot).
    """
    train = [r for r in records if r.get("kind") == "train" and r.get("tokens_per_expert")]
    if not train:
        return None
    num_layers = len(train[0]["tokens_per_expert"])
    E = len(train[0]["tokens_per_expert"][0])
    rows, cols = panel_grid(num_layers, min_height=3.2)
    fig, axes = _figure(5.5 * cols, 3.2 * rows, rows, cols)
    colors = _expert_colors(E)
    steps = [r["step"] for r in train]
    for layer in range(rows * cols):
        ax = axes[layer // cols][layer % cols]
        if layer >= num_layers:
            ax.set_visible(False)
            continue
        loads = [r["tokens_per_expert"][layer] for r in train]
        shares = [[v / max(sum(row), 1e-9) for v in row] for row in loads]
        per_expert = list(zip(*shares, strict=True))
        ax.stackplot(
            steps,
            *[_ema(list(s), 0.8) for s in per_expert],
            colors=colors,
            labels=[f"expert {e}" for e in range(E)],
            lw=0,
        )
        ax.set(
            xlabel="step",
            ylabel="share of tokens",
            ylim=(0, 1),
            title=f"MoE layer {layer}: {E} experts (uniform = 1/{E} each)",
        )
    fig.suptitle("Tokens per expert over training (stacked, EMA 0.8; expert 0 at the bottom)")
    if E <= _LEGEND_MAX:
        # Reversed: top to bottom, as the bands are stacked.
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles[::-1], labels[::-1], loc="outside right upper", fontsize=8)
    else:
        _expert_colorbar(fig, axes, colors)
    return save_figure(fig, path, _DPI)


_LEGEND_MAX = 16
"""Experts named one by one in a legend up to this many; beyond, a colour bar of indices."""


def _expert_colors(num_experts: int) -> list:
    """One colour per expert, every one distinct (matplotlib's default cycle repeats
    after ten): tab10 / tab20 while they suffice, else samples of a continuous map."""
    from matplotlib import colormaps

    if num_experts <= 20:
        cmap = colormaps["tab10" if num_experts <= 10 else "tab20"]
        return [cmap(e) for e in range(num_experts)]
    cmap = colormaps["turbo"]
    return [cmap(e / (num_experts - 1)) for e in range(num_experts)]


def _expert_colorbar(fig, axes, colors: list) -> None:
    """A colour bar from expert index to band colour, for more experts than a legend holds."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm, ListedColormap

    E = len(colors)
    norm = BoundaryNorm(range(E + 1), E)
    bar = fig.colorbar(
        ScalarMappable(norm=norm, cmap=ListedColormap(colors)),
        ax=[ax for row in axes for ax in row],
        label="expert",
        shrink=min(1.0, 6.0 / fig.get_figheight()),  # about 6 inches tall, and thin
        aspect=30,
    )
    labelled = range(0, E, tick_step(E, 6.0))
    bar.set_ticks([e + 0.5 for e in labelled])  # the middle of each expert's band
    bar.set_ticklabels([str(e) for e in labelled])


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png and expert_load.png (MoE runs) into run_dir; returns the paths."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    paths = [plot_losses(records, run_dir / "loss.png")]
    load = plot_expert_load(records, run_dir / "expert_load.png")
    if load is not None:
        paths.append(load)
    return paths


def plot_compare(curves: dict[str, tuple[list[float], list[float]]], path: str | Path) -> Path:
    """Validation loss against cumulative training FLOPs, one line per run name."""
    fig, axes = _figure(7, 4.2)
    ax = axes[0][0]
    for name, (flops, losses) in curves.items():
        ax.plot(flops, losses, "-o", ms=3, label=name)
    ax.set(
        xlabel="training FLOPs (forward + backward matmuls)",
        ylabel="validation loss (nats/token)",
        title="Validation loss against training compute",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path, _DPI)


def _ema(values: list[float], decay: float) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else decay * avg + (1 - decay) * v
        out.append(avg)
    return out
