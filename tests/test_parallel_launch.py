"""Launching: environment parsing, CLI flags, the hard time limit, and torchrun end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moekit import cli
from moekit.parallel.pool import WorkerPool
from moekit.parallel.process_group import read_env

ROOT = Path(__file__).resolve().parents[1]


def test_read_env_defaults_to_loopback_and_validates() -> None:
    assert read_env({}) is None
    env = read_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "1234"})
    # Without LOCAL_* every rank is taken to be on this machine.
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (1, 2, 1, 2)
    assert env.master_addr == "127.0.0.1" and not env.agent_store
    env = read_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (env.local_rank, env.local_world_size) == (1, 2)
    for local, error in [
        ({"LOCAL_WORLD_SIZE": "0"}, r"LOCAL_WORLD_SIZE must be in \[1, 2\], got 0"),
        ({"LOCAL_WORLD_SIZE": "8"}, r"LOCAL_WORLD_SIZE must be in \[1, 2\], got 8"),
        ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1"}, r"LOCAL_RANK must be in \[0, 1\), got 1"),
    ]:
        with pytest.raises(ValueError, match=error):
            read_env({"RANK": "1", "WORLD_SIZE": "2", **local})
    with pytest.raises(ValueError, match="RANK must be in \\[0, 2\\), got 2"):
        read_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE must be an int, got 'two'"):
        read_env({"RANK": "0", "WORLD_SIZE": "two"})


def test_expert_parallel_without_torchrun_is_a_clear_error(capsys, monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main(["train", "--expert-parallel", "2", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--expert-parallel 2 needs 2 processes" in err and "torchrun" in err


@pytest.mark.parametrize("value", ["1e300", "inf", "0"])
def test_a_timeout_torch_cannot_hold_is_refused_before_launch(capsys, monkeypatch, value) -> None:
    # 1e300 passed the old check and then overflowed in every rank's timedelta.
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main(["train", "--dist-timeout", value, "--steps", "1"]) == 2
    assert f"--dist-timeout must be in (0, 1000000000.0], got {float(value)!r}" in (
        capsys.readouterr().err
    )


def sleeper(rank: int, world_size: int, seconds: float) -> None:
    time.sleep(seconds)


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_a_hanging_task_is_killed_at_its_time_limit() -> None:
    pool = WorkerPool(1)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="sleeper on 1 processes did not finish within 2 s"):
        pool.run(sleeper, 600.0, timeout_s=2)
    assert not pool.alive
    assert time.monotonic() - start < 40  # start-up (one torch import) plus the 2 s limit


def _torchrun(tmp_path, *train_args: str) -> subprocess.CompletedProcess:
    """`moekit train` on 2 CPU processes (gloo) under torchrun, expert parallel 2."""
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"),
        "--standalone",
        *("-m", "moekit", "train", "--expert-parallel", "2", "--dist-timeout", "60"),
        # CPU and gloo on any machine: this test is about the launch, not the GPU.
        *("--dist-backend", "gloo", "--device", "cpu"),
        *("--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1"),
        *("--progress", "false", *train_args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # A session of its own, so a timeout kills torchrun's workers too, not only torchrun.
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=tmp_path,
        text=True,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_torchrun_trains_with_expert_parallel(tmp_path) -> None:
    run_dir = tmp_path / "run"
    tiny = ("--preset", "tiny", "--set", "num_layers=1")
    done = _torchrun(tmp_path, *tiny, "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("done: train loss") == 1  # one rank reports
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    saved = sorted((run_dir / "checkpoints").iterdir())
    assert saved and (saved[-1] / "model.safetensors").is_file()
    # A warm start from it with its weights cut short fails on the ranks' first read,
    # before rank 0 tokenizes anything into the new run directory.
    weights = saved[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    failed = _torchrun(tmp_path, "--init-from", str(run_dir), "--run-dir", str(tmp_path / "warm"))
    assert failed.returncode != 0
    assert "model.safetensors has" in failed.stderr
    assert not (tmp_path / "warm").exists()
