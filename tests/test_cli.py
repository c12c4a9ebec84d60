"""The train, sample and compare commands, in-process, on a micro model for a few steps."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_common import MICRO_SETS, micro_flags, one_thread, write_corpus  # noqa: F401

from moekit.cli import main
from moekit.train import load_model
from moekit.train.metrics import read_metrics


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def test_train_then_sample(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *micro_flags(corpus, "--run-dir", str(run_dir))]) == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and "plot:" in out
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["kind"] == "val"] == [2, 4]
    assert len(records[0]["tokens_per_expert"]) == 2  # one list per MoE layer
    assert len(records[0]["tokens_per_expert"][0]) == 5
    for name in ("loss.png", "expert_load.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((run_dir / "checkpoints" / "step_00000004" / "config.json").read_text())
    assert config["model"]["moe"]["num_experts"] == 5 and config["train"]["steps"] == 4
    assert load_model(run_dir).config.d_model == 24

    args = ["sample", str(run_dir), "--prompt", "def ", "--max-new-tokens", "8"]
    assert main([*args, "--num-samples", "2", "--top-k", "5", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert first.count("def ") == 2 and "--- sample 1 ---" in first
    assert main([*args, "--num-samples", "2", "--top-k", "5", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first  # seeded: reproducible

    bad = [
        ([*args, "--device", d], "device must be auto, cpu, cuda or cuda:N")
        for d in ("bogus", "meta")
    ]
    bad += [
        (["analyze", str(run_dir), flag, "0"], f"{flag} must be >= 1, got 0")
        for flag in ("--seq-len", "--batches", "--batch-size")
    ]
    # argv bytes that are not UTF-8 (decoded with surrogateescape by Python).
    not_utf8 = ["sample", str(run_dir), "--prompt", os.fsdecode(b"caf\xe9")]
    bad += [(not_utf8, "--prompt is not valid UTF-8 (byte 0xe9 at position 3)")]
    # Named as typed on the command line, not as generate()'s parameters.
    bad += [
        (["sample", str(run_dir), flag, value], f"{flag} must {rule}, got {shown}")
        for flag, value, rule, shown in [
            ("--max-new-tokens", "0", "be >= 1", "0"),
            ("--num-samples", "0", "be >= 1", "0"),
            ("--temperature", "inf", "be a finite number >= 0", "inf"),
            ("--top-k", "0", "be >= 1", "0"),
            ("--top-p", "1.5", "be in (0.0, 1.0]", "1.5"),
            ("--seed", "-1", "be >= 0", "-1"),
        ]
    ]
    if not torch.cuda.is_available():
        bad += [([*args, "--device", "cuda"], "no CUDA device is available")]
        bad += [(["analyze", str(run_dir), "--device", "cuda"], "no CUDA device is available")]
    for argv, message in bad:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_train_resume_flag_continues_the_run(corpus, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert (
        main(["train", *micro_flags(corpus, "--run-dir", run_dir, "--checkpoint-every", "2")]) == 0
    )
    capsys.readouterr()
    rc = main(["train", *micro_flags(corpus, "--run-dir", run_dir, "--resume")])
    assert rc == 2
    assert "nothing left of steps=4" in capsys.readouterr().err
    rc = main(["train", *micro_flags(corpus, "--run-dir", run_dir, "--lr", "0.1", "--resume")])
    assert rc == 2
    assert "train.lr: 0.003 (checkpoint) != 0.1 (now)" in capsys.readouterr().err
    rc = main(["train", *micro_flags(corpus, "--run-dir", run_dir)])
    assert rc == 2
    assert "already holds checkpoints; pass --resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "huge"], "unknown preset 'huge'; known presets"),
        (["--preset", "smal"], "unknown preset 'smal' \\(did you mean 'small'\\?\\); known"),
        (["--set", "moe.topk=2"], "'moe.topk' \\(did you mean 'moe.top_k'\\?\\); valid keys"),
        (["--steps", "0"], "steps must be >= 1, got 0"),
        (["--steps", "-3"], "steps must be >= 1, got -3"),
        (["--data", "{missing}"], "data path not found"),
        (["--data", "{empty}"], "contains no text"),
        (["--seq-len", "64"], "seq_len \\(64\\) must be <= the model's max_seq_len \\(32\\)"),
        (["--run-dir", "{file}"], "is a file, not a directory"),
        (["--dist-timeout", "-1"], r"--dist-timeout must be in \(0, 1000000000.0\], got -1.0"),
        (["--dist-init-timeout", "nan"], r"--dist-init-timeout must be in \(0, .*got nan"),
    ],
)
def test_bad_input_is_a_one_line_error(args, message, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    files = dict(missing=tmp_path / "nope.txt", empty=tmp_path / "empty.txt", file=tmp_path / "f")
    (tmp_path / "f").write_text("a file where a directory belongs")
    args = [a.format(**files) for a in args]
    base = [a for s in ["d_model=24", "max_seq_len=32"] for a in ("--set", s)]
    common = ["--seq-len", "16", "--run-dir", str(tmp_path / "run"), "--progress", "false"]
    rc = main(["train", *base, *common, *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("moekit train: error:") and err.count("\n") == 1
    assert re.search(message, err), err


def test_without_matplotlib_train_and_compare_finish_and_skip_their_plots(
    corpus, tmp_path, capsys, monkeypatch
):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    run_dir = tmp_path / "run"
    assert main(["train", *micro_flags(corpus, "--run-dir", str(run_dir))]) == 0
    captured = capsys.readouterr()
    assert "plot:" not in captured.out and not list(run_dir.glob("*.png"))
    warning = "moekit train: warning: plots skipped: matplotlib is not installed"
    assert captured.err.startswith(warning) and captured.err.count("\n") == 1
    assert load_model(run_dir).config.d_model == 24
    out_dir = tmp_path / "cmp"
    assert main(["compare", *micro_flags(corpus, "--out-dir", str(out_dir))]) == 0
    captured = capsys.readouterr()
    assert "plot:" not in captured.out
    assert captured.err.startswith("moekit compare: warning: plots skipped")
    assert captured.err.count("\n") == 1  # one warning for both models
    assert (out_dir / "compare.json").is_file() and not list(out_dir.rglob("*.png"))
    # The demo ends with its figures: refused before it trains.
    assert main(["demo", "--steps", "2", "--run-dir", str(tmp_path / "demo")]) == 2
    assert "demo draws figures and needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
    # analyze is all figures: there a missing matplotlib stays an error.
    assert main(["analyze", str(run_dir), "--out", str(tmp_path / "an"), "--batches", "1"]) == 2
    assert "analyze draws figures and needs matplotlib" in capsys.readouterr().err


def test_train_warns_of_undecodable_and_binary_text_in_one_line_each(corpus, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    (data / "latin1.txt").write_text("café crème\n" * 20, encoding="latin-1")
    (data / "notes_utf16.txt").write_text("hello\n", encoding="utf-16")
    assert main(["train", *micro_flags(data, "--run-dir", str(tmp_path / "run"))]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("moekit train: warning: 1 file was not valid UTF-8: 40 undecodable")
    assert err[1].startswith("moekit train: warning: 1 file was skipped as binary")


def test_corpus_shorter_than_the_context_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("x = 1\n" * 4)
    flags = [a for s in MICRO_SETS for a in ("--set", s)]
    rc = main(["train", *flags, "--data", str(tmp_path / "short.txt"), "--seq-len", "16",
               "--run-dir", str(tmp_path / "run"), "--progress", "false"])  # fmt: skip
    assert rc == 2
    assert "shorter than the context" in capsys.readouterr().err


def test_compare_trains_both_and_reports(corpus, tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    assert main(["compare", *micro_flags(corpus, "--out-dir", str(out_dir))]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["model", "val", "loss"]
    assert lines[1].split()[0] == "moe" and lines[2].split()[0] == "dense"
    summary = json.loads((out_dir / "compare.json").read_text())
    moe, dense = summary["rows"]
    # Equal FFN FLOPs per token; the MoE pays only for its router (2 * D * E per layer).
    router_flops = 3 * 2 * 24 * 5 * 2 * (2 * 16) * 4
    assert moe["train_flops"] - dense["train_flops"] == pytest.approx(router_flops)
    assert moe["active_params"] < moe["total_params"]
    assert dense["active_params"] == dense["total_params"]
    assert (out_dir / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # Validation at steps 2 and 4, placed at the FLOPs spent by then; the last point is the
    # table's row.
    for row in (moe, dense):
        flops, losses = summary["curves"][row["name"]]
        assert flops == pytest.approx([row["train_flops"] / 2, row["train_flops"]])
        assert losses[-1] == row["val_loss"]
    # Same tokens, same seed: the two runs read one token cache.
    assert len(list((out_dir / "cache").iterdir())) == 1
    # Again into the same directory: refused before anything is trained or overwritten.
    assert main(["compare", *micro_flags(corpus, "--out-dir", str(out_dir))]) == 2
    assert "already holds a comparison" in capsys.readouterr().err


def test_demo_trains_samples_and_replaces_only_its_own_runs(corpus, tmp_path, capsys):
    demo = ["demo", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--no-progress"]
    run_dir = tmp_path / "demo"
    assert main([*demo, "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "samples (temperature 0.8, top-k 40):" in out and "--- 'def '" in out
    assert (run_dir / "loss.png").is_file() and (run_dir / "analysis" / "load.png").is_file()
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000002"]
    # Again: the demo's own run, known by its settings, is replaced, not refused as
    # `moekit train` would.
    assert main([*demo, "--steps", "1", "--run-dir", str(run_dir)]) == 0
    assert f"removing the previous demo run in {run_dir}" in capsys.readouterr().out
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000001"]
    # A flag the run would refuse is refused before the last demo is removed.
    assert main([*demo, "--seq-len", "1000", "--run-dir", str(run_dir)]) == 2
    assert "seq_len (1000) must be <=" in capsys.readouterr().err
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000001"]
    # A run the demo did not write is left alone: elsewhere, and in the demo's own
    # directory once its checkpoints are gone and another run trained there.
    other = tmp_path / "mine"
    shutil.rmtree(run_dir / "checkpoints")
    for directory in (other, run_dir):
        assert main(["train", *micro_flags(corpus, "--run-dir", str(directory))]) == 0
        capsys.readouterr()
        assert main([*demo, "--run-dir", str(directory)]) == 2
        assert "moekit demo did not write" in capsys.readouterr().err
        assert [p.name for p in (directory / "checkpoints").iterdir()] == ["step_00000004"]
    # Nor a `moekit train` run that shares the demo's preset, corpus, shape and
    # checkpoint_every 0 but not its other settings (here the learning rate).
    lookalike = tmp_path / "lookalike"
    train = ["train", "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16"]
    train += ["--checkpoint-every", "0", "--lr", "1e-3", "--seed", "0"]
    assert main([*train, "--run-dir", str(lookalike)]) == 0
    capsys.readouterr()
    assert main([*demo, "--run-dir", str(lookalike)]) == 2
    assert "moekit demo did not write" in capsys.readouterr().err
    assert [p.name for p in (lookalike / "checkpoints").iterdir()] == ["step_00000002"]


def test_a_run_records_its_data_path_absolute(corpus, tmp_path, monkeypatch):
    import shutil

    from moekit.train.checkpoint import list_checkpoints, load_checkpoint

    work = tmp_path / "work"
    shutil.copytree(corpus, work / "text")
    monkeypatch.chdir(work)
    flags = [a if a != str(corpus) else "text" for a in micro_flags(corpus)]
    assert main(["train", *flags, "--run-dir", "run", "--checkpoint-every", "2"]) == 0
    first = list_checkpoints("run")[0]
    assert load_checkpoint(first).config["train"]["data"] == str(work / "text")
    # From elsewhere, where `text` names other text, the same data spelt absolute resumes
    # (the recorded path is compared, and the tokens' digest).
    (tmp_path / "other" / "text").mkdir(parents=True)
    (tmp_path / "other" / "text" / "a.txt").write_text("other words " * 200)
    monkeypatch.chdir(tmp_path / "other")
    absolute = [a if a != "text" else str(work / "text") for a in flags]
    run_dir = str(work / "run")
    assert main(["train", *absolute, "--run-dir", run_dir, "--resume", str(work / first)]) == 0


def test_ctrl_c_is_one_line_that_says_how_to_resume(corpus, tmp_path, capsys, monkeypatch):
    from moekit.train import loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", interrupted)
    assert main(["train", *micro_flags(corpus, "--run-dir", str(tmp_path / "run"))]) == 130
    err = capsys.readouterr().err
    assert err == "moekit train: interrupted; the same command plus --resume continues from " \
        "the last checkpoint, if any\n"  # fmt: skip
    from moekit.train import compare

    monkeypatch.setattr(compare, "train", interrupted)
    assert main(["compare", *micro_flags(corpus, "--out-dir", str(tmp_path / "cmp"))]) == 130
    assert capsys.readouterr().err == (
        "moekit compare: interrupted; the same command plus --resume continues the comparison "
        "from its checkpoints, if any\n"
    )


def test_a_closed_pipe_ends_quietly():
    # `moekit sample ... | head -1`: the reader going away is not a user error.
    code = (
        "import moekit.cli, moekit.commands.sample as s\n"
        "def run(args): raise BrokenPipeError(32, 'Broken pipe')\n"
        "s.run = run\n"
        "raise SystemExit(moekit.cli.main(['sample', 'x', '--prompt', 'a']))\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
