"""`moekit analyze` end to end on a saved checkpoint and the embedded corpus."""

import json

import pytest
import torch

from moekit import MoEConfig
from moekit.analysis import collect_routing, labelled_batches
from moekit.cli import main
from moekit.data import load_tokenizer, prepare_tokens
from moekit.model import ModelConfig, Transformer
from moekit.train import TrainConfig, load_model
from moekit.train.checkpoint import save_checkpoint

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    moe = MoEConfig(d_model=16, d_ff=24, num_experts=5, top_k=2)
    config = ModelConfig(d_model=16, num_layers=2, num_heads=2, max_seq_len=32, moe=moe)
    train = TrainConfig(seq_len=24, batch_size=2, steps=1)
    run = tmp_path_factory.mktemp("run")
    model = Transformer(config)
    save_checkpoint(
        run,
        1,
        model.state_dict(),
        {"model": config.to_dict(), "train": train.to_dict()},
        {},
        {},
        keep=1,
    )
    return run


def _direct_counts(run_dir):
    model = load_model(run_dir)
    split = prepare_tokens("embedded", load_tokenizer("bytes"), run_dir / "cache", 0.1)["val"]
    domains, batches = labelled_batches(split, 24, 3, 2)
    assert all(ids.shape == (3, 24) for ids, _ in batches)
    return collect_routing(model, batches, domains)


def test_analyze_command_writes_table_figures_and_json(run_dir, capsys):
    out = run_dir / "report"
    code = main(["analyze", str(run_dir), "--out", str(out), "--batches", "2", "--batch-size", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "imbalance" in printed and "domains: code, prose" in printed
    assert str(out) in printed
    summary = json.loads((out / "routing.json").read_text())
    assert summary["domains"] == ["code", "prose"]
    assert len(summary["layers"]) == 2
    for name in ("load", "imbalance", "co_selection", "specialisation"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    assert (run_dir / "cache").is_dir()  # tokens shared with the training run's cache

    # The same windows through the checkpoint's model, counted directly, agree.
    counts = _direct_counts(run_dir)
    for layer, c in zip(summary["layers"], counts, strict=True):
        assert layer["tokens_per_expert"] == c.tokens_per_expert.tolist()
        assert layer["num_tokens"] == 2 * 2 * 3 * 24
    assert summary["domain_expert"][1] == counts[1].domain_expert.tolist()


def test_analyze_reports_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "moekit analyze: error:" in err and "nothing" in err


def test_a_window_longer_than_the_model_context_is_refused(run_dir, tmp_path, capsys):
    # It had been cut to max_seq_len (32) without a word.
    args = ["analyze", str(run_dir), "--out", str(tmp_path / "a"), "--seq-len", "33"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "seq_len 33" in err and "max_seq_len 32" in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists()  # refused before any text is tokenized


def test_an_out_path_that_is_a_file_is_refused_in_one_line(run_dir, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["analyze", str(run_dir), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and err.count("\n") == 1
    # Inside the data directory: its routing.json and figures would become training text.
    data = tmp_path / "text"
    data.mkdir()
    (data / "a.txt").write_text("alpha beta gamma\n" * 20)
    out = data / "analysis"
    assert main(["analyze", str(run_dir), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"out_dir {out} lies inside the data directory" in err and err.count("\n") == 1
    assert not out.exists()


def test_an_out_dir_that_cannot_be_made_fails_before_any_routing(
    run_dir, tmp_path, capsys, monkeypatch
):
    # It used to be made after every batch had been routed.
    import moekit.data

    def no_text(*args, **kwargs):
        raise AssertionError("the text was read before out_dir was checked")

    monkeypatch.setattr(moekit.data, "prepare_tokens", no_text)
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" / "analysis"
    assert main(["analyze", str(run_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"out_dir {out} cannot be made" in err and err.count("\n") == 1
    # The threshold by its flag, before the text too.
    assert main(["analyze", str(run_dir), "--dead-threshold", "2"]) == 2
    err = capsys.readouterr().err
    assert "--dead-threshold must be in [0.0, 1.0], got 2.0" in err


def test_a_new_analysis_replaces_the_old_one_whole(run_dir, tmp_path, monkeypatch):
    import moekit.analysis.report as report

    out = tmp_path / "analysis"
    flags = ["--out", str(out), "--batches", "1", "--batch-size", "2"]
    assert main(["analyze", str(run_dir), *flags]) == 0
    assert (out / "specialisation.png").is_file()
    first = (out / "routing.json").read_bytes()
    # One domain: no specialisation figure, and the two-domain one must not stay beside
    # the new results.
    data = tmp_path / "text"
    data.mkdir()
    (data / "a.txt").write_text("alpha beta gamma delta\n" * 200)
    assert main(["analyze", str(run_dir), "--data", str(data), *flags]) == 0
    assert not (out / "specialisation.png").exists()
    assert json.loads((out / "routing.json").read_text())["domains"] == ["text"]
    # A write that fails (a full disk) leaves the last summary whole.
    (out / "routing.json").write_bytes(first)

    def full_disk(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report.atomic, "write_text", full_disk)
    assert main(["analyze", str(run_dir), *flags]) == 2
    assert (out / "routing.json").read_bytes() == first


def test_the_default_window_is_the_training_length_within_the_context():
    from moekit.analysis.report import _window

    assert _window(None, {"seq_len": 24}, 32) == 24
    assert _window(None, {}, 32) == 32  # no training length (HF): 128, cut to the context
    assert _window(32, {"seq_len": 24}, 32) == 32
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match=f"seq_len must be an int >= 1, got {bad}"):
            _window(bad, {}, 32)


def test_hugging_face_directory_routes_like_the_model_it_came_from(run_dir, tmp_path, capsys):
    from moekit.hf.export import save_pretrained

    model = load_model(run_dir)
    hf_dir = save_pretrained(model, tmp_path / "hf", family="mixtral")
    assert main(["analyze", str(hf_dir), "--out", str(tmp_path / "a")]) == 2
    assert "--tokenizer" in capsys.readouterr().err  # no tokenizer.json: it says what to pass
    args = ["analyze", str(hf_dir), "--tokenizer", "bytes", "--out", str(tmp_path / "a")]
    args += ["--seq-len", "24", "--batches", "2", "--batch-size", "3"]
    args += ["--cache-dir", str(run_dir / "cache")]
    assert main(args) == 0
    hf = json.loads((tmp_path / "a" / "routing.json").read_text())
    for layer, c in zip(hf["layers"], _direct_counts(run_dir), strict=True):
        assert layer["tokens_per_expert"] == c.tokens_per_expert.tolist()
