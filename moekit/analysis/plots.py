"""Routing figures a person can read: load, imbalance, specialisation, co-selection.

Shapes: L MoE layers, E experts, N domains.

Each function takes `LayerCounts` (or their summaries), writes one PNG and returns its
path. Figures come from moekit.figures: matplotlib (the `plots` extra) is imported on
first use, plotting works on a headless machine, and the caller's pyplot backend and open
figures are left as they were.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from moekit.analysis import stats
from moekit.analysis.counts import LayerCounts, LayerSummary
from moekit.figures import MAX_TALL, new_figure, panel_grid, save_figure, tick_step

# Cell values are printed on heatmaps up to this many cells per axis; beyond, they blur.
_ANNOTATE_MAX = 16
# Values that would print as 0.00 are left blank so the cells that matter stand out.
_ANNOTATE_BELOW = 0.005
# Bars carry their values up to this many layers; beyond, the labels run together.
_BAR_LABELS_MAX = 16
# The collapse line (E/K) is drawn up to this many times the highest bar; above, it is off
# the axis and named in the legend, since a trained router's imbalance stays near 1-3.
_COLLAPSED_IN_VIEW = 3.0


# Figure sizes grow with experts and layers only so far: a 256-expert, 58-layer model
# (DeepSeek-V3) drawn at full cell size asked for a canvas of hundreds of millions of
# pixels and ran out of memory. Cells shrink instead; values are not printed past 16 anyway.
_MAX_PANEL = 8.0  # inches, one heatmap panel
_MIN_PANEL = 3.0  # inches: a square panel smaller than this is unreadable


def _panel_side(cells: int, rows: int) -> float:
    """Inches per square heatmap panel of `cells` per side, in a figure of `rows` rows
    (at most MAX_TALL / _MIN_PANEL rows, as panel_grid makes them)."""
    return max(_MIN_PANEL, min(1.5 + 0.45 * max(cells, 6), _MAX_PANEL, MAX_TALL / rows))


def _annotate(ax, values, fmt: str, dark_below: float, skip=frozenset()) -> None:
    """Print cell values; white on cells below dark_below (the dark end of the colour map)."""
    rows, cols = len(values), len(values[0]) if values else 0
    if rows > _ANNOTATE_MAX or cols > _ANNOTATE_MAX:
        return
    for i in range(rows):
        for j in range(cols):
            v = values[i][j]
            if (i, j) in skip or abs(v) < _ANNOTATE_BELOW:
                continue
            colour = "white" if v < dark_below else "black"
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7, color=colour)


def _expert_ticks(ax, num_experts: int, inches: float, axis: str = "x") -> None:
    """Expert numbers along an axis of `inches`, as many as have room."""
    ticks = range(0, num_experts, tick_step(num_experts, inches))
    if axis == "x":
        ax.set_xticks(ticks)
        ax.set_xlabel("expert")
    else:
        ax.set_yticks(ticks)


def _save(fig, path: str | Path) -> Path:
    return save_figure(fig, path, dpi=120, tight=True)


def plot_load(summaries: list[LayerSummary], path: str | Path, title: str = "") -> Path:
    """Heatmap layers x experts of each expert's load relative to the mean (1 = fair share).

    Dead experts are marked "dead" where cell values are printed (up to 16 x 16 cells),
    else with a cross; the colour scale is centred on 1 so overloaded experts are red and
    starved ones blue.
    """
    rel = []
    for s in summaries:
        E = len(s.load_share)
        rel.append([share * E for share in s.load_share])
    L, E = len(rel), len(rel[0])
    top = max(2.0, max(max(r) for r in rel))
    width = min(0.6 * max(E, 8), 16.0)
    fig, axes = new_figure(2.5 + width, 2.0 + min(0.45 * L, MAX_TALL))
    ax = axes[0][0]
    from matplotlib.colors import TwoSlopeNorm

    im = ax.imshow(
        rel, cmap="coolwarm", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top), aspect="auto"
    )
    dead = {(i, e) for i, s in enumerate(summaries) for e in s.dead_experts}
    if L <= _ANNOTATE_MAX and E <= _ANNOTATE_MAX:
        for i in range(L):
            for e in range(E):
                v = rel[i][e]
                # coolwarm is dark at both ends: white text there, black near the centre.
                colour = "white" if v < 0.35 or v > 1 + 0.7 * (top - 1) else "black"
                text = "dead" if (i, e) in dead else f"{v:.2f}"
                weight = "bold" if (i, e) in dead else "normal"
                ax.text(
                    e, i, text, ha="center", va="center", fontsize=7, color=colour, weight=weight
                )
    elif dead:  # too many cells for words: a cross on each dead one
        rows, cols = zip(*sorted(dead), strict=True)
        ax.scatter(cols, rows, marker="x", s=12, color="black", linewidths=1, label="dead")
        ax.legend(fontsize=8, loc="upper right")
    _expert_ticks(ax, E, width)
    ax.set_yticks(range(L))
    ax.set_yticklabels([f"MoE {s.layer}" for s in summaries])
    ax.set_ylabel("MoE layer")
    fig.colorbar(im, ax=ax, label="load / mean load (1 = balanced)")
    ax.set_title(title or "Expert load per MoE layer")
    return _save(fig, path)


def plot_imbalance(summaries: list[LayerSummary], path: str | Path, title: str = "") -> Path:
    """Bars per layer: load imbalance (max / mean, 1 = balanced) and specialisation score."""
    layers = [s.layer for s in summaries]
    spec = [s.specialisation for s in summaries]
    has_spec = any(not math.isnan(v) for v in spec)
    # Each panel widens with the layers (up to 12 inches), values are printed on the bars
    # while they have room, and layer numbers thinned to what fits.
    width = min(max(4.5, 1.5 + 0.3 * len(layers)), 12.0)
    labelled = len(layers) <= _BAR_LABELS_MAX
    fig, grid = new_figure(
        width * (2 if has_spec else 1), 3.6, 1, 2 if has_spec else 1, layout="constrained"
    )
    axes = grid[0]
    ax = axes[0]
    bars = ax.bar(layers, [s.imbalance for s in summaries], color="tab:orange")
    if labelled:
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(1.0, color="black", lw=1, ls="--", label="balanced")
    # Every token on the same K experts: max / mean = E / K, the most top-K routing can reach.
    # Drawn while it stays near the bars; far above them (E/K = 32 for 256 experts, top-8)
    # it would flatten every bar, so the legend names it instead.
    collapsed = max(s.collapsed_imbalance for s in summaries)
    highest = max([1.0, *(s.imbalance for s in summaries if math.isfinite(s.imbalance))])
    if collapsed <= _COLLAPSED_IN_VIEW * highest:
        label = f"collapsed (E/K = {collapsed:g})"
        ax.axhline(collapsed, color="tab:red", lw=1, ls=":", label=label)
        ax.set_ylim(0, max(collapsed, highest) * 1.05)
    else:
        label = f"collapsed (E/K = {collapsed:g}, off scale)"
        ax.plot([], [], color="tab:red", lw=1, ls=":", label=label)
        ax.set_ylim(0, highest * 1.4)  # headroom for the bar labels and the legend
    layer_ticks = layers[:: tick_step(len(layers), width)]
    ax.set_xticks(layer_ticks)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("max load / mean load")
    ax.set_title("Load imbalance")
    ax.legend(fontsize=8, loc="upper right")
    if has_spec:
        ax = axes[1]
        bars = ax.bar(layers, [0.0 if math.isnan(v) else v for v in spec], color="tab:green")
        if labelled:
            ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_ylim(0, 1.08)
        ax.set_xticks(layer_ticks)
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("I(domain; expert) / H(domain)")
        ax.set_title("Domain specialisation (0 = none, 1 = total)")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_specialisation(counts: list[LayerCounts], path: str | Path, title: str = "") -> Path:
    """Per layer, a domains x experts heatmap of P(expert | domain), with the layer's score.

    A row is how one domain spreads its tokens over the experts; rows that differ mean the
    layer routes by domain. Uniform routing is 1/E everywhere.
    """
    E, N = counts[0].num_experts, len(counts[0].domains)
    rows, cols = panel_grid(len(counts), min_height=1.5)
    width = min(1.0 + 0.45 * max(E, 6), _MAX_PANEL)
    height = max(1.5, min(1.4 + 0.4 * N, MAX_TALL / rows))
    # Constrained layout keeps room for the title above the panels (tight_layout let it
    # run into the first row from 16 layers on).
    fig, axes = new_figure(cols * width, rows * height, rows, cols, layout="constrained")
    vmax = max(2.0 / E, max(_row_norm(c.domain_expert).max().item() for c in counts))
    for i, c in enumerate(counts):
        ax = axes[i // cols][i % cols]
        cond = _row_norm(c.domain_expert)
        im = ax.imshow(cond.numpy(), cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        _annotate(ax, cond.tolist(), ".2f", vmax * 0.6)
        score = stats.specialisation_score(c.domain_expert) if N > 1 else math.nan
        ax.set_title(f"MoE layer {i}: specialisation {score:.3f}", fontsize=9)
        _expert_ticks(ax, E, width - 1.5)  # less the colour bar
        ax.set_yticks(range(N))
        ax.set_yticklabels(c.domains)
        ax.set_ylabel("domain")
        fig.colorbar(im, ax=ax, label="P(expert | domain)")
    for j in range(len(counts), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(title or f"Expert use by domain (uniform = 1/E = {1 / E:.3f})")
    return _save(fig, path)


def plot_co_selection(counts: list[LayerCounts], path: str | Path, title: str = "") -> Path:
    """Per layer, experts x experts heatmap of P(token also chose j | it chose i).

    Bright off-diagonal cells are experts that work as a pair; with top-1 routing the map
    is empty. Under independent choices each cell would be about (K-1)/(E-1).
    """
    E = counts[0].num_experts
    rows, cols = panel_grid(len(counts), min_height=_MIN_PANEL)
    side = _panel_side(E, rows)
    fig, axes = new_figure(cols * side, rows * side, rows, cols, layout="constrained")
    conds = [stats.co_selection_conditional(c.co_selection) for c in counts]
    vmax = max(1e-9, max(m.max().item() for m in conds))
    for i, cond in enumerate(conds):
        ax = axes[i // cols][i % cols]
        im = ax.imshow(cond.numpy(), cmap="magma", vmin=0.0, vmax=vmax)
        _annotate(ax, cond.tolist(), ".2f", vmax * 0.5, skip={(e, e) for e in range(E)})
        ax.set_title(f"MoE layer {i}", fontsize=9)
        _expert_ticks(ax, E, side - 1.5)  # less the colour bar
        ax.set_xlabel("expert j (also chosen)")
        _expert_ticks(ax, E, side - 1.0, axis="y")  # less the title
        ax.set_ylabel("expert i (chosen)")
        fig.colorbar(im, ax=ax, label="P(j | i)")
    for j in range(len(conds), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(title or "Expert co-selection: which experts serve the same token")
    return _save(fig, path)


def _row_norm(counts_NE: torch.Tensor) -> torch.Tensor:
    return counts_NE / counts_NE.sum(dim=1, keepdim=True).clamp(min=1)
