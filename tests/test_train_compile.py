"""`TrainConfig.compile`: the training forward through torch.compile gives eager's losses."""

from __future__ import annotations

import pytest
import torch
from train_common import MICRO, micro_train, write_corpus

from moekit.train import train
from moekit.train.metrics import read_metrics


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_training_matches_eager(tmp_path, mode):
    # Inductor's fused kernels round differently from eager ops, so the losses agree to
    # float32 rounding, not bitwise. Two micro-batches per step: their loads are summed
    # after both forwards, so each must survive the other's (copies, see the loop). Under
    # reduce-overhead the gradients accumulate into zeros kept between steps; CPU has no
    # CUDA graphs, so this checks that zeros in place of None change nothing (the crash
    # they prevent on CUDA is tests/test_train_gpu.py's).
    corpus = write_corpus(tmp_path / "corpus")
    config = micro_train(corpus, steps=3, eval_every=3, checkpoint_every=3)
    eager = train(MICRO, config, tmp_path / "eager", plots=False)
    compiled = train(MICRO, config.replace(compile=mode), tmp_path / "compiled", plots=False)
    assert torch.allclose(
        torch.tensor(_losses(tmp_path / "compiled")),
        torch.tensor(_losses(tmp_path / "eager")),
        rtol=1e-4,
        atol=1e-5,
    )
    assert compiled.steps == eager.steps == 3


def test_compile_is_refused_with_torch_distributed(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    config = micro_train(corpus, compile="default")
    with pytest.raises(ValueError, match="compile='default' is not supported with torch"):
        train(MICRO, config, tmp_path / "run", parallel=object(), plots=False)
