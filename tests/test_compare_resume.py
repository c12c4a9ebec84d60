"""`moekit compare --resume`: an interrupted comparison continues to the uninterrupted result."""

from __future__ import annotations

import json

import pytest
from train_common import Crash, crash_at, micro_flags, one_thread, write_corpus  # noqa: F401

from moekit.cli import main
from moekit.train import compare as compare_mod


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def flags(corpus, out_dir, *extra):
    return ["compare", *micro_flags(corpus, "--out-dir", str(out_dir), "--checkpoint-every", "2"),
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    """compare.json of the comparison run in one go."""
    out_dir = tmp_path_factory.mktemp("whole") / "cmp"
    assert main(flags(corpus, out_dir)) == 0
    return json.loads((out_dir / "compare.json").read_text())


def crash_in_run(monkeypatch, run: int, step: int) -> None:
    """The comparison's `run`-th training (1: the MoE, 2: the dense twin) stops at `step`."""
    real, calls = compare_mod.train, []

    def train(*args, **kwargs):
        calls.append(args)
        if len(calls) != run:
            return real(*args, **kwargs)
        with crash_at(step):
            return real(*args, **kwargs)

    monkeypatch.setattr(compare_mod, "train", train)


def same_result(summary: dict, expected: dict) -> None:
    """Losses and curves bitwise equal; tokens/s are the resumed run's own times."""
    assert summary["curves"] == expected["curves"]
    for row, want in zip(summary["rows"], expected["rows"], strict=True):
        assert {k: v for k, v in row.items() if k != "tokens_per_s"} == {
            k: v for k, v in want.items() if k != "tokens_per_s"
        }
        assert row["tokens_per_s"] > 0


@pytest.mark.parametrize("run", [1, 2], ids=["in the moe run", "in the dense run"])
def test_an_interrupted_comparison_resumes_to_the_uninterrupted_result(
    corpus, tmp_path, monkeypatch, capsys, uninterrupted, run
):
    out_dir = tmp_path / "cmp"
    with monkeypatch.context() as m:
        crash_in_run(m, run, step=3)
        with pytest.raises(Crash):
            main(flags(corpus, out_dir))
    assert not (out_dir / "compare.json").exists()
    # Started again without --resume: refused, and the way on is named.
    assert main(flags(corpus, out_dir)) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err

    finished_moe = (out_dir / "moe" / "metrics.jsonl").read_bytes() if run == 2 else None
    assert main(flags(corpus, out_dir, "--resume")) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[0] == "moe"
    same_result(json.loads((out_dir / "compare.json").read_text()), uninterrupted)
    if finished_moe is not None:  # the finished MoE was read back, not trained again
        assert (out_dir / "moe" / "metrics.jsonl").read_bytes() == finished_moe
    # A finished comparison resumed again trains nothing and reports the same.
    assert main(flags(corpus, out_dir, "--resume")) == 0
    assert capsys.readouterr().out == out
    same_result(json.loads((out_dir / "compare.json").read_text()), uninterrupted)


def test_resume_refuses_what_it_cannot_continue(corpus, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "cmp"
    assert main(flags(corpus, out_dir, "--resume")) == 2
    err = capsys.readouterr().err
    assert f"--resume: {out_dir} holds no comparison to continue" in err
    assert err.count("\n") == 1

    with monkeypatch.context() as m:
        crash_in_run(m, 2, step=3)
        with pytest.raises(Crash):
            main(flags(corpus, out_dir))
    # Other flags than the first run's: the finished MoE is not the model they describe.
    assert main(flags(corpus, out_dir, "--resume", "--lr", "0.001")) == 2
    err = capsys.readouterr().err
    assert "cannot resume: the configuration differs" in err and "train.lr" in err
    assert not (out_dir / "compare.json").exists()


def test_resume_of_seeds_continues_each_and_summarises(corpus, tmp_path, monkeypatch, capsys):
    whole = tmp_path / "whole"
    assert main(flags(corpus, whole, "--seeds", "0,1")) == 0
    expected = json.loads((whole / "seeds.json").read_text())

    out_dir = tmp_path / "seeds"
    with monkeypatch.context() as m:
        crash_in_run(m, 3, step=1)  # the second seed's MoE, before its first checkpoint
        with pytest.raises(Crash):
            main(flags(corpus, out_dir, "--seeds", "0,1"))
    # --seeds must name the interrupted run's seeds.
    assert main(flags(corpus, out_dir, "--seeds", "1,2", "--resume")) == 2
    assert "holds comparisons of seeds not in --seeds (seed_0)" in capsys.readouterr().err
    assert main(flags(corpus, out_dir, "--seeds", "0,1", "--resume")) == 0
    record = json.loads((out_dir / "seeds.json").read_text())
    assert record["seeds"] == expected["seeds"]
    assert record["mean_diff"] == expected["mean_diff"]


def test_resume_refuses_a_finished_model_trained_on_other_text(
    corpus, tmp_path, monkeypatch, capsys
):
    # The dense twin had not begun: it would have trained on the new text, the MoE on the old.
    import shutil

    text = tmp_path / "text"
    shutil.copytree(corpus, text)
    out_dir = tmp_path / "cmp"
    with monkeypatch.context() as m:
        crash_in_run(m, 2, step=1)
        with pytest.raises(Crash):
            main(flags(text, out_dir))
    (text / "prose.txt").write_text("Other prose now, for the test's sake.\n" * 60)
    capsys.readouterr()
    assert main(flags(text, out_dir, "--resume")) == 2
    err = capsys.readouterr().err
    assert "the tokens of data" in err and "differ from the checkpoint's" in err
    assert not (out_dir / "dense" / "checkpoints").exists()


def test_a_model_not_begun_splits_the_text_as_the_finished_one_did(corpus, tmp_path, monkeypatch):
    # A comparison whose MoE was trained under the by_name split rule (runs checkpointed
    # before the sized rule existed) trains its dense twin on the same split.
    from train_common import MICRO, micro_train

    from moekit.data.tokens import SPLIT_RULE
    from moekit.train.checkpoint import list_checkpoints, read_state
    from moekit.train.compare import compare

    out_dir = tmp_path / "cmp"
    config = micro_train(corpus, steps=2, checkpoint_every=2, val_fraction=0.1)
    with monkeypatch.context() as m:
        crash_in_run(m, 2, step=1)
        with pytest.raises(Crash):
            compare(MICRO, config, out_dir, split_rule="by_name")
    compare(MICRO, config, out_dir, resume=True)
    states = [read_state(list_checkpoints(out_dir / name)[-1]) for name in ("moe", "dense")]
    assert [s["split_rule"] for s in states] == ["by_name", "by_name"] != [SPLIT_RULE] * 2
    assert states[0]["data_digest"] == states[1]["data_digest"]


def test_a_model_with_no_moe_layer_is_not_compared(tmp_path, capsys):
    # Its dense twin is the same model: the comparison would train one model twice.
    flags = micro_flags(
        tmp_path / "unused", "--out-dir", str(tmp_path / "c"), "--set", "moe_every=5"
    )
    assert main(["compare", *flags]) == 2
    err = capsys.readouterr().err
    assert "compare needs an MoE layer: first_k_dense=0, moe_every=5" in err
    assert not (tmp_path / "c").exists()
