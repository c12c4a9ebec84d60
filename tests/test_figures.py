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
