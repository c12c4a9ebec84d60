"""Collecting routing from a model over domain-labelled windows, checked against references."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from moekit import MoE, MoEConfig
from moekit.analysis.collect import collect_routing, labelled_batches
from moekit.analysis.report import analyze_model, format_table
from moekit.data.tokens import TokenSplit
from moekit.model.config import ModelConfig
from moekit.model.transformer import Transformer


def _split(tmp_path, runs):
    """A TokenSplit on disk with the given (domain, ids) runs, one after another."""
    ids, domains, pos = [], [], 0
    for name, run in runs:
        ids += run
        domains.append((name, pos, pos + len(run)))
        pos += len(run)
    path = tmp_path / "val.bin"
    path.write_bytes(bytes(ids))
    return TokenSplit(path, torch.uint8, len(ids), tuple(domains), "")


class _EmbedMoE(nn.Module):
    """Embedding straight into one MoE layer: routing is a function of the token id alone."""

    def __init__(self, moe_config, vocab=256):
        super().__init__()
        self.embed = nn.Embedding(vocab, moe_config.d_model)
        self.moe = MoE(moe_config)

    def moe_layers(self):
        return [self.moe]

    def forward(self, ids_BS):
        _, out = self.moe(self.embed(ids_BS))
        return SimpleNamespace(moe=[out])


def test_labelled_batches_keep_domains_apart(tmp_path):
    split = _split(tmp_path, [("code", [1] * 50), ("prose", [200] * 37)])
    domains, batches = labelled_batches(split, seq_len=8, batch_size=3, batches_per_domain=2)
    assert domains == ("code", "prose")
    assert len(batches) == 4
    for ids, dom in batches:
        # Every window holds only its own domain's tokens and carries that domain's label.
        expected = torch.where(dom == 0, 1, 200)
        torch.testing.assert_close(ids, expected)
    with pytest.raises(ValueError, match="seq_len"):
        labelled_batches(split, seq_len=60, batch_size=2, batches_per_domain=1)


def test_domain_routed_model_is_fully_specialised(tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=6, d_ff=8, num_experts=5, top_k=1)
    model = _EmbedMoE(cfg)
    with torch.no_grad():
        # Ids < 128 point along axis 0, the rest along axis 1; expert 3 and 1 watch them.
        model.embed.weight.zero_()
        model.embed.weight[:128, 0] = 1.0
        model.embed.weight[128:, 1] = 1.0
        model.moe.router.weight.zero_()
        model.moe.router.weight[3, 0] = 5.0
        model.moe.router.weight[1, 1] = 5.0
    g = torch.Generator().manual_seed(1)
    code = torch.randint(0, 128, (90,), generator=g).tolist()
    prose = torch.randint(128, 256, (70,), generator=g).tolist()
    split = _split(tmp_path, [("code", code), ("prose", prose)])
    domains, batches = labelled_batches(split, seq_len=9, batch_size=4, batches_per_domain=2)
    summary = analyze_model(model, batches, domains, tmp_path / "out", dead_threshold=0.0)
    layer = summary["layers"][0]
    assert layer["specialisation"] == pytest.approx(1.0)
    assert layer["domain_js"]["code|prose"] == pytest.approx(1.0)
    assert layer["dead_experts"] == [0, 2, 4]
    assert layer["imbalance"] == pytest.approx(5 / 2)  # two experts share the work equally
    assert summary["domain_expert"][0] == [[0, 0, 0, 72, 0], [0, 72, 0, 0, 0]]
    written = json.loads((tmp_path / "out" / "routing.json").read_text())
    assert written["layers"][0]["dead_experts"] == [0, 2, 4]
    assert set(written["figures"]) == {"load", "imbalance", "co_selection", "specialisation"}
    table = format_table(summary["layers"])
    assert "1.000" in table and "0,2,4" in table
    assert model.training  # collect_routing restores the mode it found

    # A figure that fails loses no numbers: routing.json is written before any is drawn.
    import moekit.analysis.plots as aplots

    def fail(*args, **kwargs):
        raise MemoryError("figure too large")

    monkeypatch.setattr(aplots, "plot_co_selection", fail)
    with pytest.raises(MemoryError):
        analyze_model(model, batches, domains, tmp_path / "again", dead_threshold=0.0)
    kept = json.loads((tmp_path / "again" / "routing.json").read_text())
    assert kept["domain_expert"] == summary["domain_expert"]


def test_transformer_routing_matches_router_recomputed_from_layer_inputs(tmp_path):
    torch.manual_seed(0)
    E, K = 5, 2
    moe = MoEConfig(d_model=24, d_ff=16, num_experts=E, top_k=K)
    config = ModelConfig(d_model=24, num_layers=3, num_heads=2, max_seq_len=16, moe=moe)
    config = config.replace(dense_layers=(1,))
    model = Transformer(config).double()
    g = torch.Generator().manual_seed(2)
    split = _split(
        tmp_path,
        [
            ("code", torch.randint(0, 256, (60,), generator=g).tolist()),
            ("prose", torch.randint(0, 256, (45,), generator=g).tolist()),
        ],
    )
    domains, batches = labelled_batches(split, seq_len=7, batch_size=3, batches_per_domain=2)

    inputs = []
    hooks = [
        m.register_forward_hook(lambda m, a, o: inputs.append((m, a[0])))
        for m in model.moe_layers()
    ]
    counts = collect_routing(model, batches, domains)
    for h in hooks:
        h.remove()
    assert len(counts) == 2  # layers 0 and 2; layer 1 is dense

    ref = [torch.zeros(2, E, dtype=torch.float64) for _ in counts]
    ref_co = [torch.zeros(E, E, dtype=torch.float64) for _ in counts]
    layers = model.moe_layers()
    for b, (_, dom_BS) in enumerate(batches):
        for i, layer in enumerate(layers):
            m, x_BSD = inputs[b * len(layers) + i]
            assert m is layer
            ids_TK = (x_BSD.reshape(-1, 24) @ layer.router.weight.t()).topk(K, dim=-1).indices
            for t, chosen in enumerate(ids_TK.tolist()):
                for e in chosen:
                    ref[i][dom_BS.reshape(-1)[t], e] += 1
                    for f in chosen:
                        ref_co[i][e, f] += 1
    for c, r, rc in zip(counts, ref, ref_co, strict=True):
        torch.testing.assert_close(c.domain_expert, r)
        torch.testing.assert_close(c.co_selection, rc)
        torch.testing.assert_close(c.tokens_per_expert, r.sum(0))
        assert c.num_tokens == sum(ids.numel() for ids, _ in batches)
        assert c.top_k == K and c.summary(0).collapsed_imbalance == E / K


def test_dense_model_is_refused():
    config = ModelConfig(d_model=8, num_layers=1, num_heads=2, dense_d_ff=8)
    with pytest.raises(ValueError, match="dense"):
        collect_routing(Transformer(config), [])
