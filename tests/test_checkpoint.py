"""Checkpoints: exact round trip, corruption and truncation detected, atomic under SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from train_common import MICRO, micro_train, one_thread, write_corpus  # noqa: F401

from moekit.model import Transformer
from moekit.train import CheckpointError, checkpoint, load_checkpoint, load_model, train
from moekit.train import state as state_io
from moekit.train.checkpoint import (
    list_checkpoints,
    model_from_weights,
    record_tokenizer,
    resolve,
    resolve_tokenizer,
    save_checkpoint,
)
from moekit.train.optim import build_optimizer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished micro run with checkpoints at steps 3 and 6."""
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
    run_dir = tmp_path_factory.mktemp("run")
    config = micro_train(corpus, steps=6)
    train(MICRO, config, run_dir, plots=False)
    return run_dir, config


def _save(run_dir, step, model, optimizer, keep=5, hook=None):
    tensors, scalars = state_io.capture(model, optimizer)
    config = {"model": model.config.to_dict(), "train": {}}
    return save_checkpoint(
        run_dir, step, model.state_dict(), config, tensors, scalars, keep, on_file_written=hook
    )


def _trained_model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = Transformer(MICRO)
    optimizer = build_optimizer(model, micro_train("unused"))
    model(torch.randint(0, 256, (2, 7))).logits.square().mean().backward()
    optimizer.step()
    return model, optimizer


def test_round_trip_is_exact(tmp_path):
    model, optimizer = _trained_model_and_optimizer()
    path = _save(tmp_path, 1, model, optimizer)
    loaded = load_model(path)
    for name, t in model.state_dict().items():
        assert torch.equal(t, loaded.state_dict()[name]), name

    fresh_model, _ = _trained_model_and_optimizer(seed=1)
    fresh_model.load_state_dict(loaded.state_dict())
    fresh_opt = build_optimizer(fresh_model, micro_train("unused"))
    ckpt = load_checkpoint(path)
    state_io.restore(fresh_model, fresh_opt, ckpt.state_tensors, ckpt.state)
    a, b = optimizer.state_dict(), fresh_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for index, per_param in a["state"].items():
        for key, value in per_param.items():
            assert torch.equal(value, b["state"][index][key]), (index, key)


def test_checkpoint_of_another_layout_names_what_differs(tmp_path):
    model, optimizer = _trained_model_and_optimizer()
    ckpt = load_checkpoint(_save(tmp_path, 1, model, optimizer))
    name = next(k for k in ckpt.model_state if k.endswith("w_up_EFD"))
    # A bank saved under other names (an earlier build's [in, out] layout, say).
    ckpt.model_state[name.replace("w_up_EFD", "w_up_EDF")] = ckpt.model_state.pop(name)
    with pytest.raises(CheckpointError) as err:
        model_from_weights(ckpt.config["model"], ckpt.model_state)
    message = str(err.value)
    assert f"missing {name}" in message
    assert name.replace("w_up_EFD", "w_up_EDF") in message


def test_keeps_the_newest_n(tmp_path):
    model, optimizer = _trained_model_and_optimizer()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, optimizer, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert resolve(tmp_path).name == "step_00000004"


def _interrupted_rmtree(path, ignore_errors=False):
    """shutil.rmtree stopped by Ctrl-C after deleting one file (the manifest, which
    rmtree may reach first or last)."""
    (Path(path) / "manifest.json").unlink()
    raise KeyboardInterrupt


@pytest.mark.parametrize("how", ["drop_after", "pruning"])
def test_a_removal_stopped_part_way_leaves_only_complete_checkpoints(tmp_path, monkeypatch, how):
    # A step directory that lost some files would be the newest, and --resume would
    # take it and fail; its metrics were already gone.
    model, optimizer = _trained_model_and_optimizer()
    for step in (1, 2, 3):
        _save(tmp_path, step, model, optimizer)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", _interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        if how == "drop_after":
            checkpoint.drop_after(tmp_path, 1)
        else:
            _save(tmp_path, 4, model, optimizer, keep=1)
    monkeypatch.undo()
    listed = list_checkpoints(tmp_path)
    assert listed, "the removal took every checkpoint"
    for path in listed:
        load_checkpoint(path)  # complete and verified
    # What was being deleted is out of sight, and the next save removes it.
    _save(tmp_path, 5, model, optimizer)
    assert not [p for p in checkpoint.checkpoint_dir(tmp_path).iterdir() if ".tmp-" in p.name]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fds through /proc")
def test_every_file_is_synced_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    # Without the syncs a power cut after the rename could leave a complete-looking
    # directory of empty files; without the last one, the rename itself could be lost.
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    model, optimizer = _trained_model_and_optimizer()
    final = _save(tmp_path, 1, model, optimizer)
    root = str(final.parent)
    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    assert len(renames) == 1
    _, tmp, dst = events[renames[0]]
    assert dst == str(final)
    synced_before = {e[1] for e in events[: renames[0]]}
    names = sorted(p.name for p in final.iterdir())
    assert len(names) == 5 and synced_before == {tmp, *(f"{tmp}/{n}" for n in names)}
    assert ("sync", root) in events[renames[0] :]


def test_corrupted_checkpoint_is_detected_and_previous_still_loads(run, tmp_path):
    import shutil

    run_dir, _ = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir / "checkpoints", copy / "checkpoints")
    previous, latest = list_checkpoints(copy)[-2:]
    # The latest intact, an earlier one (with steps left to run) damaged.
    weights = previous / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF  # one flipped bit pattern inside tensor data: safetensors alone can't tell
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="model.safetensors fails its sha256 check"):
        load_model(previous)
    with pytest.raises(CheckpointError, match="corrupted"):
        train(MICRO, run[1], copy, resume=previous, plots=False)
    assert isinstance(load_model(latest), Transformer)


def test_truncated_checkpoint_is_detected(run, tmp_path):
    import shutil

    run_dir, _ = run
    latest = tmp_path / "latest"
    shutil.copytree(list_checkpoints(run_dir)[-1], latest)
    state = latest / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="state.safetensors has 100 bytes.*truncated"):
        load_checkpoint(latest)
    (latest / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete: manifest.json is missing"):
        load_checkpoint(latest)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nowhere")


def test_config_and_weights_alone_are_verified_alone(run, tmp_path):
    import shutil

    from moekit.train.checkpoint import load_weights, read_config

    run_dir, _ = run
    latest = tmp_path / "latest"
    shutil.copytree(list_checkpoints(run_dir)[-1], latest)
    full = load_checkpoint(latest)
    # A warm start reads the config, then the weights; the optimizer state is not its
    # business, so damage there does not stop it.
    (latest / "state.safetensors").write_bytes(b"")
    assert read_config(latest) == full.config
    weights = load_weights(latest)
    assert weights.keys() == full.model_state.keys()
    assert all(torch.equal(weights[k], full.model_state[k]) for k in weights)
    # So do sampling and analysis (load_model): they never read the optimizer state.
    model = load_model(latest)
    assert all(torch.equal(t, full.model_state[k]) for k, t in model.state_dict().items())
    # Damage to either file is named before its content is parsed.
    (latest / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="config.json has 2 bytes"):
        read_config(latest)
    (latest / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="model.safetensors has 0 bytes"):
        load_weights(latest)


@pytest.mark.parametrize(
    "manifest",
    [b"\xff\xfe not text", b"[]", b'{"files": []}', b'{"files": {"model.safetensors": 5}}'],
)
def test_malformed_manifest_is_a_checkpoint_error(run, tmp_path, manifest):
    import shutil

    run_dir, _ = run
    latest = tmp_path / "latest"
    shutil.copytree(list_checkpoints(run_dir)[-1], latest)
    (latest / "manifest.json").write_bytes(manifest)
    with pytest.raises(CheckpointError, match=f"{latest} is corrupted: unreadable manifest.json"):
        load_checkpoint(latest)


_KILLED_SAVE = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from test_checkpoint import _save, _trained_model_and_optimizer
model, optimizer = _trained_model_and_optimizer()
_save({run_dir!r}, 1, model, optimizer)
def hang(name):
    if name == "model.safetensors":
        print("writing", flush=True)
        time.sleep(60)
optimizer.step()
_save({run_dir!r}, 2, model, optimizer, hook=hang)
"""


def test_kill_during_save_keeps_the_last_good_checkpoint(tmp_path):
    script = _KILLED_SAVE.format(tests=os.path.dirname(__file__), run_dir=str(tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "writing"  # blocks until mid-save
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    leftovers = list((tmp_path / "checkpoints").glob(".step_00000002.tmp-*"))
    assert leftovers and (leftovers[0] / "model.safetensors").is_file()
    model = load_model(tmp_path)
    assert isinstance(model, Transformer)
    # The next save sweeps the half-written directory away.
    fresh, optimizer = _trained_model_and_optimizer()
    _save(tmp_path, 2, fresh, optimizer)
    assert not list((tmp_path / "checkpoints").glob(".step_*"))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]


def test_a_tokenizer_inside_the_run_is_recorded_relative_to_it(tmp_path):
    run_dir = tmp_path / "run"
    inside, outside = run_dir / "tok" / "t.json", tmp_path / "t.json"
    assert record_tokenizer(str(inside), run_dir) == "run:tok/t.json"
    for spec in ("bytes", str(outside), "relative/t.json"):
        assert record_tokenizer(spec, run_dir) == spec
    ckpt = run_dir / "checkpoints" / "step_00000003"
    assert resolve_tokenizer("run:tok/t.json", ckpt) == str(inside.resolve())
    # Anything else as recorded: old runs' relative paths are read from the working directory.
    for spec in ("bytes", str(outside), "relative/t.json"):
        assert resolve_tokenizer(spec, ckpt) == spec
    with pytest.raises(CheckpointError, match="lies outside one"):
        resolve_tokenizer("run:tok/t.json", tmp_path / "step_00000003")
