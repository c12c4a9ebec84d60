"""Plotting from moekit leaves the caller's pyplot alone: its backend and open figures."""

import pytest

from moekit.analysis import LayerCounts
from moekit.analysis import plots as aplots
from moekit.train import plots as tplots

pytest.importorskip("matplotlib")


def _counts(E):
    c = LayerCounts(E, domains=("code", "prose"))
    c.domain_expert[0, :2] = 30
    c.domain_expert[1, 1:] = 10
    c.tokens_per_expert = c.domain_expert.sum(0)
    c.co_selection = c.tokens_per_expert.diag()
    c.num_tokens = int(c.tokens_per_expert.sum())
    return c


def test_every_figure_leaves_the_callers_backend_and_figures_open(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_backend()
    # The caller works with another backend and has a figure open, as in a notebook.
    plt.switch_backend("svg")
    try:
        mine = plt.figure()
        counts = [_counts(5), _counts(5)]
        summaries = [c.summary(i) for i, c in enumerate(counts)]
        records = [
            {"kind": "train", "step": s, "loss": 3.0 - s / 10, "tokens_per_expert": [[4, 3, 1]]}
            for s in range(5)
        ] + [{"kind": "val", "step": 4, "val_loss": 2.7}]
        paths = [
            aplots.plot_load(summaries, tmp_path / "load.png"),
            aplots.plot_imbalance(summaries, tmp_path / "imbalance.png"),
            aplots.plot_specialisation(counts, tmp_path / "spec.png"),
            aplots.plot_co_selection(counts, tmp_path / "co.png"),
            tplots.plot_losses(records, tmp_path / "loss.png"),
            tplots.plot_expert_load(records, tmp_path / "load_over_training.png"),
            tplots.plot_compare({"moe": ([1.0, 2.0], [3.0, 2.5])}, tmp_path / "compare.png"),
        ]
        assert plt.get_backend() == "svg"
        assert plt.get_fignums() == [mine.number]
        for p in paths:
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        plt.close("all")
        plt.switch_backend(before)


def test_a_figure_that_fails_to_save_leaves_the_earlier_one(tmp_path, monkeypatch):
    # Written beside its name and renamed: a full disk or a plotting error mid-write had
    # left a cut-off PNG in place of the good one.
    from moekit.figures import new_figure, save_figure

    fig, _ = new_figure(2, 2)
    path = save_figure(fig, tmp_path / "f.png", dpi=50)
    before = path.read_bytes()

    def fail(self, target, **kwargs):
        with open(target, "wb") as f:
            f.write(b"\x89PNG cut")
        raise OSError(27, "File too large")

    monkeypatch.setattr(type(fig), "savefig", fail)
    with pytest.raises(OSError, match="too large"):
        save_figure(fig, path, dpi=50)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]


def _load_records(E: int, L: int) -> list[dict]:
    return [
        {"kind": "train", "step": s, "tokens_per_expert": [[1 + (e + s) % 5 for e in range(E)]] * L}
        for s in range(1, 6)
    ]


def test_every_expert_has_its_own_colour_and_a_name(monkeypatch, tmp_path):
    # matplotlib's default cycle has ten colours: with 16 experts bands shared them, and
    # no legend said which band was which expert.
    import moekit.train.plots as tp

    figures = []
    monkeypatch.setattr(tp, "save_figure", lambda fig, path, dpi: figures.append(fig) or path)
    tplots.plot_expert_load(_load_records(16, 2), tmp_path / "small.png")
    tplots.plot_expert_load(_load_records(64, 58), tmp_path / "deep.png")
    small, deep = figures
    bands = small.axes[0].collections
    assert len({tuple(b.get_facecolor()[0]) for b in bands}) == 16
    (legend,) = small.legends
    assert sorted(t.get_text() for t in legend.get_texts()) == sorted(
        f"expert {e}" for e in range(16)
    )
    assert len({tuple(b.get_facecolor()[0]) for b in deep.axes[0].collections}) == 64
    assert any(ax.get_label() == "<colorbar>" for ax in deep.axes)  # too many for a legend
    assert deep.get_figheight() <= 60
