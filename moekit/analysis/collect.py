"""Run a model over domain-labelled text and gather each MoE layer's routing.

Shapes: B batch, S sequence, N domains, E experts.

The model is anything whose call `model(ids_BS)` returns an object with `.moe`, one
`MoEOutput` per MoE layer in layer order (moekit's `Transformer` and `ModelOutput`), and
that lists its layers with `model.moe_layers()`. Only counts are kept, so the cost in
memory does not grow with the amount of text.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from moekit.analysis.counts import LayerCounts
from moekit.data.batches import val_batches
from moekit.data.tokens import TokenSplit

Batch = tuple[Tensor, Tensor | None]
"""ids_BS (long) and domain_BS (long index into the domain names, or None). A label of -1
means no domain: the token is routed and counted in the layer's load statistics like any
other, and only the domain-by-expert table leaves it out."""


def labelled_batches(
    split: TokenSplit, seq_len: int, batch_size: int, batches_per_domain: int
) -> tuple[tuple[str, ...], list[Batch]]:
    """Fixed windows from each domain of a split, labelled by domain: (domain names, batches).

    Windows lie wholly inside one domain's documents (moekit.data.val_batches), and each
    domain gets the same number of windows when it has the text, so the domains weigh
    alike in the specialisation score. A split with a single domain gives one label.
    """
    domains = tuple(split.domain_names())
    out: list[Batch] = []
    for index, name in enumerate(domains):
        for ids_BS, _ in val_batches(split, seq_len, batch_size, batches_per_domain, name):
            out.append((ids_BS, torch.full_like(ids_BS, index)))
    if not out:
        raise ValueError(
            f"no domain of the split has a document of at least seq_len + 1 = {seq_len + 1} "
            "tokens; use a smaller --seq-len or more text"
        )
    return domains, out


@torch.no_grad()
def collect_routing(
    model: nn.Module,
    batches: Iterable[Batch],
    domains: tuple[str, ...] = (),
    progress: bool = False,
) -> list[LayerCounts]:
    """Routing counts of every MoE layer of `model` over `batches` (see `Batch`).

    The model is put in eval mode (no router noise or jitter) and restored afterwards.
    Returns one LayerCounts per MoE layer, in layer order.
    """
    layers = model.moe_layers()
    if not layers:
        raise ValueError("the model has no MoE layer to analyse (it is dense)")
    counts = [
        LayerCounts(layer.config.num_experts, domains, top_k=layer.config.top_k) for layer in layers
    ]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for ids_BS, domain_BS in _progress(batches, progress):
            out = model(ids_BS.to(device))
            if len(out.moe) != len(counts):
                raise ValueError(
                    f"the model returned {len(out.moe)} MoE outputs for {len(counts)} MoE layers"
                )
            labels = None if domain_BS is None else domain_BS.reshape(-1)
            for layer_counts, moe_out in zip(counts, out.moe, strict=True):
                layer_counts.add(moe_out, ids_BS.numel(), labels)
    finally:
        model.train(was_training)
    return counts


def _progress(batches: Iterable[Batch], show: bool) -> Iterator[Batch]:
    if not show:
        yield from batches
        return
    from tqdm import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None
    yield from tqdm(batches, total=total, desc="routing", unit="batch", leave=False)
