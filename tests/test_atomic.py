"""Files replaced whole (moekit.atomic), and summaries written as strict JSON."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from moekit import atomic


def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic.write_text(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError), atomic.replacing(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    atomic.write_bytes(path, b"new")
    assert path.read_text() == "new"


def test_json_summaries_hold_no_nan(tmp_path):
    path = atomic.write_json(tmp_path / "s.json", {"a": float("nan"), "b": [1.5, float("inf")]})
    assert _strict(path.read_text()) == {"a": None, "b": [1.5, None]}


def test_one_seed_writes_seeds_json_a_strict_parser_reads(tmp_path, monkeypatch):
    # One seed has no standard deviation: seeds.json had said NaN, which is not JSON.
    from moekit.model import get_preset
    from moekit.train import TrainConfig, compare_seeds

    rows = [SimpleNamespace(val_loss=1.25), SimpleNamespace(val_loss=1.5)]
    monkeypatch.setattr(compare_seeds, "compare", lambda *args, **kwargs: (rows, None))
    compare_seeds.compare_seeds(get_preset("tiny"), TrainConfig(), tmp_path, seeds=[0])
    record = _strict((tmp_path / "seeds.json").read_text())
    assert record["mean_diff"] == -0.25 and record["sd_diff"] is None and record["t"] is None
