"""Training on CUDA: bf16 autocast forward, fp32 weights and checkpoints that load on CPU."""

from __future__ import annotations

import pytest
import torch
from train_common import MICRO, micro_train, write_corpus

from moekit.train import load_model, train
from moekit.train.metrics import read_metrics


@pytest.mark.gpu
def test_training_on_cuda_with_bf16_autocast(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    train(MICRO, micro_train(corpus, steps=4, device="cuda"), tmp_path / "run", plots=False)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    model = load_model(tmp_path / "run")
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
