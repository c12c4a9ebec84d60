"""Analysis figures are written as readable PNGs from hand-built routing counts."""

import pytest
import torch

from moekit.analysis import LayerCounts
from moekit.analysis import plots as aplots

pytest.importorskip("matplotlib")


def _counts(E, specialised: bool):
    c = LayerCounts(E, domains=("code", "prose"))
    if specialised:
        c.domain_expert[0, 0] = 60
        c.domain_expert[1, 1] = 40
    else:
        c.domain_expert[:] = 10
    c.tokens_per_expert = c.domain_expert.sum(0)
    c.co_selection = torch.diag(c.tokens_per_expert)
    c.co_selection[0, 1] = c.co_selection[1, 0] = 5
    c.num_tokens = int(c.tokens_per_expert.sum())
    return c


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_all_figures_are_written(tmp_path):
    counts = [_counts(6, True), _counts(6, False), _counts(6, True)]
    summaries = [c.summary(i) for i, c in enumerate(counts)]
    assert summaries[0].specialisation == pytest.approx(1.0)
    assert summaries[1].specialisation == pytest.approx(0.0, abs=1e-12)
    assert summaries[0].dead_experts == [2, 3, 4, 5]
    paths = [
        aplots.plot_load(summaries, tmp_path / "load.png"),
        aplots.plot_imbalance(summaries, tmp_path / "imbalance.png"),
        aplots.plot_specialisation(counts, tmp_path / "specialisation.png"),
        aplots.plot_co_selection(counts, tmp_path / "co_selection.png"),
    ]
    for p in paths:
        w, h = _png_size(p)
        assert w > 300 and h > 200


def test_figures_of_a_large_model_stay_a_readable_size(tmp_path):
    # 64 experts over 24 layers (OLMoE-sized): cells shrink instead of the canvas growing
    # with E^2 x L (at full cell size co_selection.png was ~7000 x 29000 px at 16 layers).
    g = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(24):
        c = LayerCounts(64, domains=("code", "prose"))
        c.domain_expert = torch.randint(0, 50, (2, 64), generator=g).long()
        c.tokens_per_expert = c.domain_expert.sum(0)
        c.co_selection = torch.diag(c.tokens_per_expert)
        c.num_tokens = int(c.tokens_per_expert.sum())
        counts.append(c)
    summaries = [c.summary(i) for i, c in enumerate(counts)]
    for p in (
        aplots.plot_load(summaries, tmp_path / "load.png"),
        aplots.plot_specialisation(counts, tmp_path / "specialisation.png"),
        aplots.plot_co_selection(counts, tmp_path / "co_selection.png"),
    ):
        w, h = _png_size(p)
        assert w <= 2400 and h <= 8000, (p.name, w, h)


def _drawn(monkeypatch, draw):
    """The axes of the figure `draw()` writes."""
    return _kept_figure(monkeypatch, draw).axes[0]


def test_collapse_is_drawn_at_e_over_k_and_a_collapsed_layer_reaches_it(monkeypatch, tmp_path):
    c = LayerCounts(8, top_k=2)
    c.tokens_per_expert = torch.tensor([64.0, 64.0] + [0.0] * 6, dtype=torch.float64)
    c.num_tokens = 64
    summary = c.summary(0)
    assert summary.imbalance == summary.collapsed_imbalance == 4.0
    ax = _drawn(monkeypatch, lambda: aplots.plot_imbalance([summary], tmp_path / "i.png"))
    lines = {line.get_label(): line.get_ydata()[0] for line in ax.get_lines()}
    assert lines == {"balanced": 1.0, "collapsed (E/K = 4)": 4.0}
    assert ax.get_ylim()[1] == pytest.approx(4.2)


def test_collapse_far_above_the_bars_is_named_not_drawn(monkeypatch, tmp_path):
    # 256 experts, top-8: collapse is E/K = 32; drawn, it would flatten bars of 1.2-1.5.
    summaries = []
    for i, hot in enumerate((1.5, 1.2)):
        c = LayerCounts(256, top_k=8)
        c.tokens_per_expert = torch.tensor([hot * 8.0] + [8.0] * 255, dtype=torch.float64)
        c.num_tokens = int(c.tokens_per_expert.sum()) // 8
        summaries.append(c.summary(i))
    assert summaries[0].collapsed_imbalance == 32.0
    ax = _drawn(monkeypatch, lambda: aplots.plot_imbalance(summaries, tmp_path / "i.png"))
    drawn = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert drawn == {"balanced": [1.0, 1.0], "collapsed (E/K = 32, off scale)": []}
    highest = max(s.imbalance for s in summaries)
    assert 1.49 < highest < 1.5 and ax.get_ylim()[1] == pytest.approx(highest * 1.4)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["balanced", "collapsed (E/K = 32, off scale)"]


def test_dead_experts_of_a_large_layer_are_crossed(monkeypatch, tmp_path):
    c = LayerCounts(32)
    c.tokens_per_expert = torch.tensor([100.0] * 30 + [0.0, 1.0], dtype=torch.float64)
    summary = c.summary(0, dead_threshold=0.1)
    assert summary.dead_experts == [30, 31]
    ax = _drawn(monkeypatch, lambda: aplots.plot_load([summary], tmp_path / "load.png"))
    (crosses,) = ax.collections
    assert crosses.get_offsets().tolist() == [[30.0, 0.0], [31.0, 0.0]]


def _random_counts(E: int, L: int) -> list[LayerCounts]:
    g = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(L):
        c = LayerCounts(E, domains=("code", "prose"))
        c.domain_expert = torch.randint(0, 50, (2, E), generator=g).long()
        c.tokens_per_expert = c.domain_expert.sum(0)
        c.co_selection = torch.diag(c.tokens_per_expert)
        c.num_tokens = int(c.tokens_per_expert.sum())
        counts.append(c)
    return counts


def _kept_figure(monkeypatch, draw):
    """The figure `draw()` writes, drawn (so text has its final place), not saved."""
    figures = []

    def keep(fig, path):
        figures.append(fig)
        return path

    monkeypatch.setattr(aplots, "_save", keep)
    draw()
    fig = figures[0]
    fig.canvas.draw()
    return fig


def _overlaps(boxes) -> int:
    return sum(a.overlaps(b) for a, b in zip(boxes, boxes[1:], strict=False))


@pytest.mark.parametrize("which", ["specialisation", "co_selection"])
def test_the_title_of_a_deep_model_stays_above_its_panels(monkeypatch, tmp_path, which):
    # Sixteen layers (OLMoE's depth): tight_layout had put the title over the first row.
    counts = _random_counts(16, 16)
    draw = getattr(aplots, f"plot_{which}")
    fig = _kept_figure(monkeypatch, lambda: draw(counts, tmp_path / "f.png", "a title"))
    renderer = fig.canvas.get_renderer()
    title = fig.get_suptitle() and fig._suptitle.get_window_extent(renderer)
    panels = [ax.get_tightbbox(renderer) for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert title and not any(title.overlaps(p) for p in panels)


@pytest.mark.parametrize(("which", "E"), [("specialisation", 64), ("co_selection", 128)])
def test_expert_numbers_do_not_run_into_each_other(monkeypatch, tmp_path, which, E):
    counts = _random_counts(E, 2)
    draw = getattr(aplots, f"plot_{which}")
    fig = _kept_figure(monkeypatch, lambda: draw(counts, tmp_path / "f.png"))
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        boxes = [t.get_window_extent(renderer) for t in labels if t.get_text()]
        assert _overlaps(boxes) == 0, which


def test_imbalance_of_many_layers_stays_readable(monkeypatch, tmp_path):
    # 58 layers (DeepSeek-V3): the bar values and every layer's number had run together.
    summaries = [c.summary(i) for i, c in enumerate(_random_counts(8, 58))]
    fig = _kept_figure(monkeypatch, lambda: aplots.plot_imbalance(summaries, tmp_path / "i.png"))
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        assert not ax.texts, "no values printed on 58 bars"
        boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
        assert len(boxes) >= 8 and _overlaps(boxes) == 0


def test_the_tallest_figure_is_capped(tmp_path):
    # 256 experts over 58 layers: a floor of 3 inches per panel had made it 87 inches tall.
    p = aplots.plot_co_selection(_random_counts(256, 58), tmp_path / "co.png")
    w, h = _png_size(p)
    assert h <= 60 * 120 + 50 and w < 3000, (w, h)
