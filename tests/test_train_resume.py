"""Interrupted-and-resumed training equals uninterrupted training, bitwise, on CPU."""

from __future__ import annotations

import pytest
import torch
from train_common import (  # noqa: F401
    MICRO,
    Crash,
    crash_at,
    micro_train,
    one_thread,
    write_corpus,
)

from moekit.train import CheckpointError, load_checkpoint, train
from moekit.train.checkpoint import list_checkpoints, save_checkpoint
from moekit.train.metrics import read_metrics

# Router noise draws from the global RNG every step and sigmoid_bias moves a buffer after
# every step: both must come back exactly from the checkpoint for the runs to agree.
NOISY = MICRO.replace(moe=MICRO.moe.replace(router="sigmoid_bias", router_noise=0.1))
_TIMING = ("tokens_per_s",)


def _history(run_dir):
    return [{k: v for k, v in r.items() if k not in _TIMING} for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def test_resumed_run_is_bitwise_equal(corpus, tmp_path):
    config = micro_train(corpus)
    cache = tmp_path / "cache"
    full = train(NOISY, config, tmp_path / "full", cache_dir=cache, plots=False)

    with crash_at(4), pytest.raises(Crash):
        train(NOISY, config, tmp_path / "cut", cache_dir=cache, plots=False)
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step_00000003"]
    assert max(r["step"] for r in read_metrics(tmp_path / "cut")) == 4

    resumed = train(
        NOISY, config, tmp_path / "cut", resume=tmp_path / "cut", cache_dir=cache, plots=False
    )
    assert resumed.val_loss == full.val_loss
    a = load_checkpoint(list_checkpoints(tmp_path / "full")[-1])
    b = load_checkpoint(list_checkpoints(tmp_path / "cut")[-1])
    assert a.step == b.step == 6
    assert a.model_state.keys() == b.model_state.keys()
    for name, t in a.model_state.items():
        assert torch.equal(t, b.model_state[name]), name
    assert any("expert_bias" in n and t.abs().sum() > 0 for n, t in a.model_state.items())
    for name, t in a.state_tensors.items():
        assert torch.equal(t, b.state_tensors[name]), name
    assert _history(tmp_path / "full") == _history(tmp_path / "cut")
    # The resumed run's throughput is over the steps it ran (4-6), not the whole run.
    ran = [r for r in read_metrics(tmp_path / "cut") if r["kind"] == "train" and r["step"] > 3]
    seconds = [config.tokens_per_step / r["tokens_per_s"] for r in ran]
    assert len(ran) == 3 and resumed.train_seconds == pytest.approx(sum(seconds))
    assert resumed.tokens_per_s == pytest.approx(3 * config.tokens_per_step / sum(seconds))


def test_a_run_keeps_the_split_rule_it_began_with(corpus, tmp_path):
    # Runs checkpointed before the sized rule split by name alone; at val_fraction 0.1 this
    # corpus splits differently under the two, and such a run must resume on its own tokens.
    from moekit.train.checkpoint import read_state, split_rule_of

    config = micro_train(corpus, steps=4, checkpoint_every=2, val_fraction=0.1)
    train(MICRO, config, tmp_path / "whole", plots=False, split_rule="by_name")
    train(MICRO, config, tmp_path / "sized", plots=False)
    digests = [
        read_state(list_checkpoints(tmp_path / n)[-1])["data_digest"] for n in ("whole", "sized")
    ]
    assert digests[0] != digests[1]
    with crash_at(3), pytest.raises(Crash):
        train(MICRO, config, tmp_path / "cut", plots=False, split_rule="by_name")
    with pytest.raises(ValueError, match="trained on the 'by_name' split of its text"):
        train(MICRO, config, tmp_path / "cut", resume=tmp_path / "cut", split_rule="sized")
    train(MICRO, config, tmp_path / "cut", resume=tmp_path / "cut", plots=False)
    assert _history(tmp_path / "cut") == _history(tmp_path / "whole")
    cut, whole = (load_checkpoint(list_checkpoints(tmp_path / n)[-1]) for n in ("cut", "whole"))
    assert all(torch.equal(cut.model_state[k], t) for k, t in whole.model_state.items())
    # A trained run's state.json from before the rule, and converted weights (never trained).
    assert split_rule_of({"step": 3, "optimizer": {}}) == "by_name"
    assert split_rule_of({"step": 0, "converted_from": "hf"}) == "sized"


def test_a_resume_checks_config_and_steps_before_tokenizing(corpus, tmp_path, monkeypatch):
    # A changed flag or a finished run must not first cost the corpus's tokenization.
    import moekit.train.loop as loop

    config = micro_train(corpus, steps=3)
    train(MICRO, config, tmp_path, plots=False)

    def tokenize(*args, **kwargs):
        raise AssertionError("tokenized before the checkpoint was checked")

    monkeypatch.setattr(loop, "prepare_tokens", tokenize)
    with pytest.raises(CheckpointError, match="train.lr"):
        train(MICRO, config.replace(lr=1e-3), tmp_path, resume=tmp_path, plots=False)
    with pytest.raises(ValueError, match="nothing left of steps=3"):
        train(MICRO, config, tmp_path, resume=tmp_path, plots=False)


def test_resuming_an_earlier_checkpoint_rewrites_the_history_after_it(corpus, tmp_path):
    # Later checkpoints of the old history would outrank the new ones: pruned ahead of
    # them, and taken by a plain --resume, leaving a gap in the metrics.
    import shutil

    config = micro_train(corpus, checkpoint_every=1, keep_checkpoints=1)
    full = tmp_path / "full"
    train(MICRO, config.replace(keep_checkpoints=6), full, plots=False)
    run_dir = tmp_path / "run"
    train(MICRO, config, run_dir, plots=False)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000006"]
    # Step 2 of an identical run, as if kept from earlier.
    shutil.copytree(list_checkpoints(full)[1], run_dir / "checkpoints" / "step_00000002")
    with crash_at(4), pytest.raises(Crash):
        train(MICRO, config, run_dir, resume=run_dir / "checkpoints" / "step_00000002")
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000004"]
    train(MICRO, config, run_dir, resume=run_dir, plots=False)
    assert _history(run_dir) == _history(full)
    a = load_checkpoint(list_checkpoints(run_dir)[-1])
    b = load_checkpoint(list_checkpoints(full)[-1])
    for name, t in a.model_state.items():
        assert torch.equal(t, b.model_state[name]), name


def test_a_resume_stopped_while_cutting_the_old_history_keeps_its_metrics(
    corpus, tmp_path, monkeypatch
):
    # Checkpoints go first: stopped between the two, every checkpoint left still has
    # its metrics, and a plain --resume from the newest continues the old history.
    from moekit.train import checkpoint

    config = micro_train(corpus, checkpoint_every=2)
    train(MICRO, config, tmp_path, plots=False)
    before = _history(tmp_path)

    def stopped(run_dir, step):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "drop_after", stopped)
    with pytest.raises(KeyboardInterrupt):
        train(MICRO, config, tmp_path, resume=list_checkpoints(tmp_path)[0], plots=False)
    assert _history(tmp_path) == before


def test_resume_with_a_different_config_names_the_fields(corpus, tmp_path):
    config = micro_train(corpus, steps=3)
    train(MICRO, config, tmp_path, plots=False)
    other = MICRO.replace(moe=MICRO.moe.replace(top_k=3))
    with pytest.raises(CheckpointError, match=r"model\.moe\.top_k: 2 \(checkpoint\) != 3") as err:
        train(other, config.replace(lr=1e-3), tmp_path, resume=tmp_path, plots=False)
    assert "train.lr" in str(err.value)


def test_resume_from_a_checkpoint_with_other_weight_names_names_them(corpus, tmp_path):
    config = micro_train(corpus, steps=3, checkpoint_every=1)
    train(MICRO, config, tmp_path / "run", plots=False)
    ckpt = load_checkpoint(list_checkpoints(tmp_path / "run")[-2])  # a step left to run
    name = next(k for k in ckpt.model_state if k.endswith("w_up_EFD"))
    # The same weights under an earlier build's name for the [in, out] layout.
    state = dict(ckpt.model_state)
    state[name.replace("w_up_EFD", "w_up_EDF")] = state.pop(name)
    old = tmp_path / "old"
    save_checkpoint(old, ckpt.step, state, ckpt.config, ckpt.state_tensors, ckpt.state, keep=1)
    with pytest.raises(CheckpointError, match=f"missing {name}") as err:
        train(MICRO, config, old, resume=old, plots=False)
    assert name.replace("w_up_EFD", "w_up_EDF") in str(err.value)


def test_resume_on_changed_text_is_an_error(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    config = micro_train(corpus, steps=2, checkpoint_every=1)
    train(MICRO, config, tmp_path / "run", plots=False)
    (corpus / "prose.txt").write_text("Other words entirely, and more of them. " * 60)
    first = list_checkpoints(tmp_path / "run")[0]  # a step left to run
    with pytest.raises(CheckpointError, match="tokens of data .* differ from the checkpoint"):
        train(MICRO, config, tmp_path / "run", resume=first, plots=False)


def test_a_run_directory_inside_the_data_directory_is_refused(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    with pytest.raises(ValueError, match="the run directory .* inside the data directory"):
        train(MICRO, micro_train(corpus, steps=2), corpus / "runs" / "micro", plots=False)


def test_a_run_directory_inside_another_runs_checkpoints_is_refused(corpus, tmp_path):
    # Its rotation would delete the checkpoint, and the run nested in it, without a word.
    config = micro_train(corpus)  # 6 steps, checkpoints at 3 and 6
    cache = tmp_path / "cache"
    train(MICRO, config, tmp_path / "a", cache_dir=cache, plots=False)
    first = list_checkpoints(tmp_path / "a")[0]
    before = sorted(p.name for p in first.iterdir())
    for run_dir, resume in (
        (first, first),  # --run-dir CHECKPOINT for --resume CHECKPOINT
        (first, None),
        (first / "nested", None),
        (tmp_path / "a" / "checkpoints", None),
    ):
        with pytest.raises(ValueError, match="lies inside .* deletes old checkpoints"):
            train(MICRO, config.replace(steps=8), run_dir, resume=resume, cache_dir=cache)
    assert sorted(p.name for p in first.iterdir()) == before
    # A directory merely named checkpoints, holding no run's checkpoints, is fine.
    train(MICRO, config.replace(steps=2), tmp_path / "checkpoints" / "r", cache_dir=cache)


def test_resume_of_a_finished_run_is_an_error(corpus, tmp_path):
    config = micro_train(corpus, steps=3)
    train(MICRO, config, tmp_path, plots=False)
    with pytest.raises(ValueError, match="nothing left"):
        train(MICRO, config, tmp_path, resume=tmp_path, plots=False)


def test_resuming_another_runs_checkpoint_into_a_run_directory_is_refused(corpus, tmp_path):
    config = micro_train(corpus)  # 6 steps, checkpoints at 3 and 6
    cache = tmp_path / "cache"
    train(MICRO, config, tmp_path / "a", cache_dir=cache, plots=False)
    train(MICRO, config.replace(seed=7), tmp_path / "b", cache_dir=cache, plots=False)
    before = (list_checkpoints(tmp_path / "a"), read_metrics(tmp_path / "a"))
    other = list_checkpoints(tmp_path / "b")[0]
    with pytest.raises(ValueError, match=r"holds checkpoints .*--resume alone.*--run-dir"):
        train(MICRO, config.replace(seed=7), tmp_path / "a", resume=other, cache_dir=cache)
    assert (list_checkpoints(tmp_path / "a"), read_metrics(tmp_path / "a")) == before
    # Into a directory without checkpoints it branches the other run: its history up to
    # the checkpoint is b's, whatever an interrupted run had logged there before.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 9}\n')
    train(MICRO, config.replace(seed=7), tmp_path / "c", resume=other, cache_dir=cache)
    assert [p.name for p in list_checkpoints(tmp_path / "c")] == ["step_00000006"]
    assert _history(tmp_path / "c") == _history(tmp_path / "b")


def test_resume_of_a_checkpoint_continues_in_its_own_run_directory(corpus, tmp_path, monkeypatch):
    from train_common import micro_flags

    from moekit.cli import main

    monkeypatch.chdir(tmp_path)
    flags = micro_flags(corpus, "--checkpoint-every", "2")
    assert main(["train", *flags, "--run-dir", "exp"]) == 0
    first = list_checkpoints("exp")[0]
    assert first.name == "step_00000002"
    # Without --run-dir the run continues in exp, not in the preset's runs/tiny.
    assert main(["train", *flags, "--resume", str(first)]) == 0
    assert not (tmp_path / "runs").exists()
    assert [r["step"] for r in read_metrics("exp") if r["kind"] == "train"] == [1, 2, 3, 4]


def test_a_run_with_its_tokenizer_inside_resumes_after_being_moved(corpus, tmp_path):
    import json
    import shutil

    from moekit.data.tokenizer import ByteTokenizer

    run_dir, moved = tmp_path / "run", tmp_path / "elsewhere" / "run"
    run_dir.mkdir()
    (run_dir / "tokenizer.json").write_text(json.dumps(ByteTokenizer.tokenizer_json()))
    config = micro_train(corpus, tokenizer=str((run_dir / "tokenizer.json").resolve()))
    train(MICRO, config, run_dir, plots=False)
    first = list_checkpoints(run_dir)[0]
    assert load_checkpoint(first).config["train"]["tokenizer"] == "run:tokenizer.json"
    moved.parent.mkdir()
    shutil.move(run_dir, moved)
    config = config.replace(tokenizer=str((moved / "tokenizer.json").resolve()))
    resume = moved / "checkpoints" / first.name
    train(MICRO, config, moved, resume=resume, plots=False)
    assert load_checkpoint(list_checkpoints(moved)[-1]).step == config.steps


def test_runs_behind_symlinks_keep_their_directory(corpus, tmp_path):
    import json

    from moekit.data.tokenizer import ByteTokenizer
    from moekit.train.checkpoint import resolve_tokenizer, run_dir_of

    # checkpoints/ a link to other storage: the run is still the directory holding the link,
    # and a tokenizer recorded inside it is found there.
    run_dir, storage = tmp_path / "run", tmp_path / "scratch" / "ckpts"
    storage.mkdir(parents=True)
    run_dir.mkdir()
    (run_dir / "checkpoints").symlink_to(storage, target_is_directory=True)
    (run_dir / "tokenizer.json").write_text(json.dumps(ByteTokenizer.tokenizer_json()))
    config = micro_train(corpus, tokenizer=str(run_dir / "tokenizer.json"))
    train(MICRO, config, run_dir, plots=False)
    first = list_checkpoints(run_dir)[0]
    assert run_dir_of(first) == run_dir
    assert resolve_tokenizer("run:tokenizer.json", first) == str(run_dir / "tokenizer.json")
    # A link to a checkpoint: its run is the one the checkpoint lies in.
    step = tmp_path / "plain" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    (tmp_path / "best").symlink_to(step, target_is_directory=True)
    assert run_dir_of(tmp_path / "best") == tmp_path / "plain"


def test_a_run_keeps_a_copy_of_the_tokenizer_file_it_was_given(corpus, tmp_path, capsys):
    import json

    from moekit.cli import main
    from moekit.data.tokenizer import ByteTokenizer

    given = tmp_path / "tokenizers" / "mine.json"  # outside the run, under another name
    given.parent.mkdir()
    given.write_text(json.dumps(ByteTokenizer.tokenizer_json()))
    run_dir = tmp_path / "run"
    config = micro_train(corpus, tokenizer=str(given))
    train(MICRO, config, run_dir, plots=False)
    assert (run_dir / "tokenizer.json").read_bytes() == given.read_bytes()
    last = load_checkpoint(list_checkpoints(run_dir)[-1])
    assert last.config["train"]["tokenizer"] == "run:tokenizer.json"
    # The same flags resume (the given file and the run's copy are one tokenizer), bitwise.
    first = list_checkpoints(run_dir)[0]
    train(MICRO, config, run_dir, resume=first, plots=False)
    again = load_checkpoint(list_checkpoints(run_dir)[-1])
    assert again.config["train"]["tokenizer"] == "run:tokenizer.json"
    for name, tensor in last.model_state.items():
        assert torch.equal(tensor, again.model_state[name]), name
    # Without the run's copy the checkpoint cannot be continued, and the error says so
    # (it had called the copy a different tokenizer).
    copy = (run_dir / "tokenizer.json").read_bytes()
    (run_dir / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is missing \(the run's copy"):
        train(MICRO, config, run_dir, resume=first, plots=False)
    (run_dir / "tokenizer.json").write_bytes(copy)
    # A branch into a directory of its own keeps a copy of its own.
    train(MICRO, config, tmp_path / "branch", resume=first, plots=False)
    assert (tmp_path / "branch" / "tokenizer.json").read_bytes() == given.read_bytes()
    branch_last = load_checkpoint(list_checkpoints(tmp_path / "branch")[-1])
    assert branch_last.config["train"]["tokenizer"] == "run:tokenizer.json"
    # The run needs nothing from the given file once it is gone.
    given.unlink()
    args = ["sample", str(run_dir), "--prompt", "ab", "--max-new-tokens", "3", "--seed", "0"]
    assert main(args) == 0, capsys.readouterr().err
    config = config.replace(tokenizer=str(run_dir / "tokenizer.json"))
    train(MICRO, config, run_dir, resume=first, plots=False)
    # Another tokenizer file is refused before anything is written.
    given.write_text(json.dumps(ByteTokenizer.tokenizer_json(), indent=1))
    with pytest.raises(CheckpointError, match="train.tokenizer: .* != .*mine.json"):
        train(MICRO, config.replace(tokenizer=str(given)), run_dir, resume=first, plots=False)
    assert json.loads((run_dir / "tokenizer.json").read_text()) == ByteTokenizer.tokenizer_json()


def test_a_run_directory_is_neither_a_file_nor_a_hugging_face_checkpoint(corpus, tmp_path):
    # sample, analyze and --init-from read a directory with a Hugging Face config.json as
    # that checkpoint: a run trained into it would never be read back.
    import json

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(ValueError, match="is a Hugging Face checkpoint directory"):
        train(MICRO, micro_train(corpus), hf_dir, plots=False)
    assert sorted(p.name for p in hf_dir.iterdir()) == ["config.json"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        train(MICRO, micro_train(corpus), tmp_path / "file", plots=False)
    # Nor for a branch of another run's checkpoint.
    config = micro_train(corpus, checkpoint_every=2)
    train(MICRO, config, tmp_path / "run", plots=False)
    first = list_checkpoints(tmp_path / "run")[0]
    with pytest.raises(ValueError, match="is a Hugging Face checkpoint directory"):
        train(MICRO, config, hf_dir, resume=first, plots=False)
    assert sorted(p.name for p in hf_dir.iterdir()) == ["config.json"]
    with pytest.raises(ValueError, match="is a file, not a directory"):
        train(MICRO, config, tmp_path / "file", resume=first, plots=False)


def test_a_converted_checkpoint_is_refused_by_resume_and_named_for_init_from(corpus, tmp_path):
    # A conversion writes weights only: resuming it had ended in KeyError 'optimizer'.
    from moekit.model import Transformer

    run_dir = tmp_path / "converted"
    model = Transformer(MICRO)
    config = {"model": MICRO.to_dict(), "train": micro_train(corpus).to_dict()}
    save_checkpoint(run_dir, 0, model.state_dict(), config, {}, {"converted_from": "x"}, keep=1)
    (ckpt,) = list_checkpoints(run_dir)
    with pytest.raises(CheckpointError, match="holds weights only .* --init-from"):
        train(MICRO, micro_train(corpus), run_dir, resume=ckpt, plots=False)
    with pytest.raises(ValueError, match="a converted checkpoint, weights only, begins a new run"):
        train(MICRO, micro_train(corpus), run_dir, plots=False)


def test_a_run_directory_named_like_a_checkpoint_resolves_to_its_newest(corpus, tmp_path):
    from moekit.cli import main
    from moekit.train.checkpoint import resolve

    run_dir = tmp_path / "step_1"
    config = micro_train(corpus)
    train(MICRO, config, run_dir, plots=False)
    assert resolve(run_dir) == list_checkpoints(run_dir)[-1]
    args = ["sample", str(run_dir), "--prompt", "ab", "--max-new-tokens", "2"]
    assert main(args) == 0
    # A checkpoint cut short (no manifest) is still named as one.
    cut = run_dir / "checkpoints" / "step_00000009"
    cut.mkdir()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load_checkpoint(resolve(cut))
