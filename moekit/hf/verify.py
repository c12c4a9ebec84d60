"""Parity checks: run one probe batch through two models and fail loudly if logits differ.

Shapes: B batch, S sequence, V vocab.

The reference for a Hugging Face directory is transformers itself when it is installed
(the check then proves parity, not self-consistency); without it, moekit's own loader.
transformers is imported only inside `hf_reference_logits`, never by moekit.hf itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

from moekit.hf.load import from_pretrained

# float32 parity measured on the tiny test models is ~1e-6; bf16/fp16 roundings are ~1e-2.
# float64 weights are compared as float32 logits: float32's tolerance.
DEFAULT_ATOL = {
    torch.float64: 1e-4,
    torch.float32: 1e-4,
    torch.bfloat16: 1e-1,
    torch.float16: 5e-2,
}


class VerificationError(ValueError):
    """Two models that should agree do not; the message gives the size of the disagreement."""


def probe_ids(vocab_size: int, batch: int = 2, seq: int = 13, seed: int = 0) -> Tensor:
    """A fixed random batch of token ids [B, S], the same for every call with these args."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=g)


def compare_logits(
    reference_BSV: Tensor, candidate_BSV: Tensor, atol: float, what: str = "logits"
) -> float:
    """Max |reference - candidate|; raises VerificationError above atol or on a shape change."""
    if reference_BSV.shape != candidate_BSV.shape:
        raise VerificationError(
            f"{what}: shapes differ, {tuple(reference_BSV.shape)} vs {tuple(candidate_BSV.shape)}"
        )
    diff = (reference_BSV.float() - candidate_BSV.float()).abs()
    worst = float(diff.max())
    if not worst <= atol:  # also catches NaN
        pos = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        agree = (reference_BSV.argmax(-1) == candidate_BSV.argmax(-1)).float().mean()
        raise VerificationError(
            f"{what}: max |difference| {worst:.3g} > atol {atol:g} at [b, s, v] = {pos}; "
            f"top-1 agreement {float(agree):.1%}"
        )
    return worst


@torch.no_grad()
def moekit_logits(model: torch.nn.Module, ids_BS: Tensor) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(ids_BS).logits.float()
    finally:
        model.train(was_training)


@torch.no_grad()
def hf_reference_logits(directory: str | os.PathLike, ids_BS: Tensor) -> Tensor | None:
    """transformers' logits for a checkpoint directory, or None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, experts_implementation="eager"
    ).eval()
    return model(input_ids=ids_BS, use_cache=False).logits.float()


def reference_for_hf_dir(directory: str | os.PathLike) -> tuple[str, Callable[[Tensor], Tensor]]:
    """(name, ids -> logits) of the best available reference for a Hugging Face directory."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        model = from_pretrained(directory, dtype=torch.float32)
        return "moekit.hf.from_pretrained", lambda ids: moekit_logits(model, ids)
    return "transformers", lambda ids: hf_reference_logits(directory, ids)
