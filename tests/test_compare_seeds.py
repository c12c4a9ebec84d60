"""`moekit compare --seeds`: one comparison per seed, and whether the difference beats the draw."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from train_common import micro_flags, one_thread, write_corpus  # noqa: F401

from moekit.cli import main
from moekit.train.compare_seeds import SeedResult, sign_test_p, summarize

# The tiny preset's 1500-step comparison over seeds 0-6 (README).
MOE = [1.5356, 1.4601, 1.4401, 1.4716, 1.4651, 1.4636, 1.4579]
DENSE = [1.4753, 1.5060, 1.4764, 1.4842, 1.4927, 1.4906, 1.5139]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize(
    ("wins", "losses", "p"),
    [(6, 1, 16 / 128), (7, 0, 2 / 128), (1, 6, 16 / 128), (3, 3, 1.0), (2, 1, 1.0), (0, 0, 1.0)],
)
def test_sign_test_is_the_exact_two_sided_binomial(wins, losses, p):
    assert sign_test_p(wins, losses) == pytest.approx(p)


def test_summary_statistics_match_the_statistics_module():
    s = summarize([SeedResult(i, m, d) for i, (m, d) in enumerate(zip(MOE, DENSE, strict=True))])
    diffs = [m - d for m, d in zip(MOE, DENSE, strict=True)]
    assert s.mean_diff == pytest.approx(statistics.mean(diffs))
    assert s.sd_diff == pytest.approx(statistics.stdev(diffs))
    assert s.stderr == pytest.approx(statistics.stdev(diffs) / math.sqrt(7))
    assert s.t == pytest.approx(-1.43, abs=0.005)
    assert (s.moe_wins, s.dense_wins, s.sign_test_p) == (6, 1, pytest.approx(0.125))


def test_one_seed_and_ties_give_no_false_precision():
    one = summarize([SeedResult(0, 1.0, 1.5)])
    assert one.mean_diff == -0.5 and math.isnan(one.sd_diff) and math.isnan(one.t)
    tied = summarize([SeedResult(0, 1.0, 1.0), SeedResult(1, 1.0, 1.0)])
    assert (tied.moe_wins, tied.dense_wins, tied.sign_test_p) == (0, 0, 1.0)
    assert math.isnan(tied.t)


def test_compare_over_seeds_reports_each_and_summarises(corpus, tmp_path, capsys):
    out_dir = tmp_path / "seeds"
    assert main(["compare", *micro_flags(corpus, "--out-dir", str(out_dir), "--seeds", "0,3")]) == 0
    out = capsys.readouterr().out
    record = json.loads((out_dir / "seeds.json").read_text())
    assert [r["seed"] for r in record["seeds"]] == [0, 3]
    for r in record["seeds"]:
        moe, dense = json.loads((out_dir / f"seed_{r['seed']}" / "compare.json").read_text())[
            "rows"
        ]
        assert (r["moe_val_loss"], r["dense_val_loss"]) == (moe["val_loss"], dense["val_loss"])
        assert f"{r['diff']:+.4f}" in out
    assert record["mean_diff"] == pytest.approx(statistics.mean(r["diff"] for r in record["seeds"]))
    assert "seeds, dense in" in out and "sign test p =" in out
    # One token cache for every seed and model.
    assert len(list((out_dir / "cache").iterdir())) == 1
    # Each seed's comparison is the one `--seed` gives.
    single = tmp_path / "single"
    assert main(["compare", *micro_flags(corpus, "--out-dir", str(single), "--seed", "3")]) == 0
    rows = json.loads((single / "compare.json").read_text())["rows"]
    assert record["seeds"][1]["moe_val_loss"] == rows[0]["val_loss"]
    # Different seeds drew different runs.
    assert record["seeds"][0]["moe_val_loss"] != record["seeds"][1]["moe_val_loss"]
    # A list whose last seed's directory holds a comparison is refused before any training.
    flags = micro_flags(corpus, "--out-dir", str(out_dir), "--seeds", "1-3")
    assert main(["compare", *flags]) == 2
    assert f"{out_dir / 'seed_3'} already holds a comparison" in capsys.readouterr().err
    assert not (out_dir / "seed_1").exists()


def test_an_out_dir_that_is_a_file_is_an_error(corpus, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["compare", *micro_flags(corpus, "--out-dir", str(tmp_path / "f"))]) == 2
    assert "--out-dir" in (err := capsys.readouterr().err) and "is a file" in err
    # Inside the data directory: named as given, not as the model's run directory in it.
    inside = corpus / "cmp"
    assert main(["compare", *micro_flags(corpus, "--out-dir", str(inside))]) == 2
    assert f"--out-dir {inside} lies inside the data directory" in capsys.readouterr().err
    assert not inside.exists()


def test_seed_and_seeds_together_is_an_error(corpus, tmp_path, capsys):
    flags = micro_flags(corpus, "--out-dir", str(tmp_path / "x"), "--seeds", "0,1", "--seed", "2")
    assert main(["compare", *flags]) == 2
    assert "give --seed or --seeds, not both" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("seeds", "message"),
    [("1,1", "seeds must be distinct and at least one"), (f"0,{2**64}", "seed must be <=")],
)
def test_bad_seeds_are_an_error_before_any_training(corpus, tmp_path, capsys, seeds, message):
    out_dir = tmp_path / "x"
    assert main(["compare", *micro_flags(corpus, "--out-dir", str(out_dir), "--seeds", seeds)]) == 2
    assert message in capsys.readouterr().err
    assert not out_dir.exists()


@pytest.mark.parametrize(
    ("text", "seeds"), [("0-6", list(range(7))), ("0,2,5", [0, 2, 5]), ("0-2,7", [0, 1, 2, 7])]
)
def test_seed_lists_parse(text, seeds):
    from moekit.commands.compare import parse_seeds

    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["0-", "-", "a", "1,,2", "0-x", "5-2", "0,5-2"])
def test_malformed_seed_lists_are_refused(text):
    import argparse

    from moekit.commands.compare import parse_seeds

    with pytest.raises(argparse.ArgumentTypeError, match="seeds must look like"):
        parse_seeds(text)
