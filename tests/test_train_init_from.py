"""`--init-from`: a new run begins from the weights of a moekit run or a Hugging Face checkpoint."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from train_common import (  # noqa: F401
    MICRO,
    Crash,
    crash_at,
    micro_train,
    one_thread,
    write_corpus,
)

from moekit.cli import main
from moekit.data import TrainBatches, load_tokenizer, prepare_tokens
from moekit.hf.convert import load_init_source
from moekit.train import CheckpointError, load_checkpoint, load_model, train
from moekit.train.checkpoint import list_checkpoints
from moekit.train.metrics import read_metrics

_TIMING = ("tokens_per_s",)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def source_run(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("source")
    train(MICRO, micro_train(corpus, steps=6, seed=1), run_dir, plots=False)
    return run_dir


@pytest.fixture
def hf_dir(source_run, tmp_path):
    """The source run converted to a Hugging Face directory (its own copy: tests edit it)."""
    pytest.importorskip("transformers")
    directory = tmp_path / "hf"
    assert main(["convert", str(source_run), str(directory)]) == 0
    return directory


def _first_batch_loss(model, config, cache):
    """Cross-entropy of `model` on the first training batch of a run with `config`."""
    tokenizer = load_tokenizer(config.tokenizer)
    split = prepare_tokens(config.data, tokenizer, cache, config.val_fraction)["train"]
    x, y = TrainBatches(split, config.seq_len, config.batch_size, config.seed)(0)
    mb = config.micro_batch_size
    model.train()
    with torch.no_grad():
        losses = [
            F.cross_entropy(
                model(x[i : i + mb]).logits.flatten(0, 1).float(), y[i : i + mb].flatten()
            )
            for i in range(0, config.batch_size, mb)
        ]
    return float(torch.stack(losses).mean())


def test_a_run_begins_from_the_source_weights_with_a_fresh_optimizer(corpus, source_run, tmp_path):
    config = micro_train(corpus, steps=3)
    cache = tmp_path / "cache"
    source = load_init_source(source_run)
    result = train(MICRO, config, tmp_path / "ft", cache_dir=cache, plots=False, init_from=source)
    first = read_metrics(tmp_path / "ft")[0]
    assert first["step"] == 1
    # The first step's loss is the source model's on that batch: its weights, not new ones.
    want = _first_batch_loss(load_model(source_run), config, cache)
    assert first["loss"] == pytest.approx(want, rel=1e-6)
    fresh = train(MICRO, config, tmp_path / "fresh", cache_dir=cache, plots=False)
    assert result.val_loss < fresh.val_loss
    # A new run: step counter, schedule and optimizer moments start afresh.
    state = load_checkpoint(list_checkpoints(tmp_path / "ft")[-1]).state
    assert state["step"] == 3
    assert first["lr"] == pytest.approx(config.lr / config.warmup_steps)


def test_an_interrupted_warm_started_run_resumes_bitwise(corpus, source_run, tmp_path):
    config = micro_train(corpus)
    cache = tmp_path / "cache"
    source = load_init_source(source_run)
    train(MICRO, config, tmp_path / "full", cache_dir=cache, plots=False, init_from=source)
    with crash_at(4), pytest.raises(Crash):
        train(MICRO, config, tmp_path / "cut", cache_dir=cache, plots=False, init_from=source)
    # As the command line does it: the same flags, --init-from included, plus --resume.
    train(
        MICRO,
        config,
        tmp_path / "cut",
        resume=tmp_path / "cut",
        cache_dir=cache,
        plots=False,
        init_from=source,
    )
    a = load_checkpoint(list_checkpoints(tmp_path / "full")[-1]).model_state
    b = load_checkpoint(list_checkpoints(tmp_path / "cut")[-1]).model_state
    for name, t in a.items():
        assert torch.equal(t, b[name]), name
    strip = [
        {k: v for k, v in r.items() if k not in _TIMING} for r in read_metrics(tmp_path / "cut")
    ]
    assert strip == [
        {k: v for k, v in r.items() if k not in _TIMING} for r in read_metrics(tmp_path / "full")
    ]


def test_a_changed_shape_names_the_weights(corpus, source_run, tmp_path):
    wider = MICRO.replace(moe=MICRO.moe.replace(d_ff=28))
    with pytest.raises(CheckpointError, match=r"another shape.*w_\w+_E\w+: \(5, 20, 24\)"):
        train(
            wider,
            micro_train(corpus),
            tmp_path / "run",
            plots=False,
            init_from=load_init_source(source_run),
        )


def _cli_args(corpus, run_dir):
    return ["--data", str(corpus), "--run-dir", str(run_dir), "--steps", "2", "--seq-len", "16",
            "--batch-size", "4", "--eval-every", "2", "--progress", "false"]  # fmt: skip


def test_the_command_takes_config_and_tokenizer_from_the_source(corpus, source_run, tmp_path):
    run_dir = tmp_path / "ft"
    code = main(["train", "--init-from", str(source_run), "--set", "moe.aux_loss_coef=0.05",
                 *_cli_args(corpus, run_dir)])  # fmt: skip
    assert code == 0
    saved = load_checkpoint(list_checkpoints(run_dir)[-1]).config
    want = MICRO.replace(moe=MICRO.moe.replace(aux_loss_coef=0.05))
    assert saved["model"] == want.to_dict()
    assert saved["train"]["tokenizer"] == "bytes"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--preset", "tiny"], "takes the model from .*; drop --preset"),
        (["--dense-twin"], "drop --dense-twin"),
        (["--set", "moe.num_experts=6"], "another shape"),
    ],
)
def test_the_command_refuses_what_cannot_fit(corpus, source_run, tmp_path, capsys, extra, message):
    code = main(
        ["train", "--init-from", str(source_run), *extra, *_cli_args(corpus, tmp_path / "x")]
    )
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x").exists()  # refused before the text was tokenized into it


def test_a_hugging_face_source_without_tokenizer_asks_for_one(corpus, hf_dir, tmp_path, capsys):
    (hf_dir / "tokenizer.json").unlink()
    code = main(["train", "--init-from", str(hf_dir), *_cli_args(corpus, tmp_path / "a")])
    assert code == 2
    assert "has no tokenizer.json" in capsys.readouterr().err
    code = main(["train", "--init-from", str(hf_dir), "--tokenizer", "bytes",
                 *_cli_args(corpus, tmp_path / "b")])  # fmt: skip
    assert code == 0


def test_a_hugging_face_source_begins_from_its_weights(corpus, hf_dir, tmp_path):
    import moekit

    source = load_init_source(hf_dir)
    assert source.tokenizer == str((hf_dir / "tokenizer.json").resolve())
    config = micro_train(corpus, steps=2, tokenizer=source.tokenizer)
    cache = tmp_path / "cache"
    train(source.config, config, tmp_path / "ft", cache_dir=cache, plots=False, init_from=source)
    want = _first_batch_loss(moekit.from_pretrained(hf_dir), config, cache)
    assert read_metrics(tmp_path / "ft")[0]["loss"] == pytest.approx(want, rel=1e-6)


def test_either_kind_of_broken_checkpoint_raises_the_one_checkpoint_error(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    import moekit
    import moekit.hf

    assert moekit.CheckpointError is moekit.hf.CheckpointError is CheckpointError
    tensors = load_file(hf_dir / "model.safetensors")
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(dropped)):
        load_init_source(hf_dir).read_state()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_init_source(tmp_path / "empty")


def test_a_broken_source_fails_before_anything_is_written(corpus, source_run, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(source_run, src)
    weights = list_checkpoints(src)[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    code = main(["train", "--init-from", str(src), *_cli_args(corpus, tmp_path / "run")])
    assert code == 2
    assert "model.safetensors has" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_damaged_source_config_is_named_before_it_is_parsed(corpus, source_run, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(source_run, src)
    (list_checkpoints(src)[-1] / "config.json").write_text('{"model": {}}')
    code = main(["train", "--init-from", str(src), *_cli_args(corpus, tmp_path / "run")])
    assert code == 2
    assert "config.json has 13 bytes" in capsys.readouterr().err


def test_a_source_too_large_to_train_is_refused_before_its_weights_are_read(
    corpus, source_run, tmp_path, monkeypatch
):
    from dataclasses import replace

    import moekit.devices

    def read_state():
        raise AssertionError("the weights were read")

    source = replace(load_init_source(source_run), read_state=read_state)
    config = micro_train(corpus, steps=1)
    monkeypatch.setattr(moekit.devices, "memory_bytes", lambda device: 1024)
    with pytest.raises(ValueError, match="needs about .* more than the 0.0 GiB"):
        train(source.config, config, tmp_path / "a", plots=False, init_from=source)
    monkeypatch.undo()
    # With memory to spare, the same source is read (and here refuses to be).
    with pytest.raises(AssertionError, match="the weights were read"):
        train(source.config, config, tmp_path / "b", plots=False, init_from=source)


def test_resuming_a_warm_started_run_does_not_need_the_source(corpus, source_run, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(source_run, src)
    run_dir = tmp_path / "ft"
    args = ["train", "--init-from", str(src), *_cli_args(corpus, run_dir)]
    args += ["--checkpoint-every", "1"]
    assert main(args) == 0
    shutil.rmtree(src)
    # The same command, longer and resumed: weights, config and tokenizer are all in the
    # checkpoint.
    first = list_checkpoints(run_dir)[0]
    assert first.name == "step_00000001"
    assert main([*args, "--resume", str(first)]) == 0
    assert load_checkpoint(list_checkpoints(run_dir)[-1]).step == 2


def test_a_warm_start_keeps_its_sources_tokenizer_and_outlives_the_source(
    corpus, hf_dir, tmp_path, capsys
):
    import shutil

    from moekit.train.checkpoint import IN_RUN

    run_dir = tmp_path / "ft"
    args = ["train", "--init-from", str(hf_dir), *_cli_args(corpus, run_dir)]
    args += ["--checkpoint-every", "1"]
    assert main(args) == 0
    assert (run_dir / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    first = list_checkpoints(run_dir)[0]
    assert load_checkpoint(first).config["train"]["tokenizer"] == IN_RUN + "tokenizer.json"
    shutil.rmtree(hf_dir)
    capsys.readouterr()
    # Sampling decodes with the run's copy; resuming reads nothing from SRC either.
    assert main(["sample", str(run_dir), "--prompt", "ab", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    assert main([*args, "--resume", str(first)]) == 0
    assert load_checkpoint(list_checkpoints(run_dir)[-1]).step == 2


def test_a_run_dir_holding_another_tokenizer_is_refused_before_training(
    corpus, hf_dir, tmp_path, capsys
):
    run_dir = tmp_path / "ft"
    run_dir.mkdir()
    (run_dir / "tokenizer.json").write_text("mine")
    code = main(["train", "--init-from", str(hf_dir), *_cli_args(corpus, run_dir)])
    assert code == 2
    assert "already holds a tokenizer.json" in capsys.readouterr().err
    assert (run_dir / "tokenizer.json").read_text() == "mine"
    assert sorted(p.name for p in run_dir.iterdir()) == ["tokenizer.json"]
