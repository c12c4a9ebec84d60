"""The training loop against hand-computed references: first loss, bias update, accumulation."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from train_common import MICRO, micro_train, one_thread, write_corpus  # noqa: F401

from moekit.data import ByteTokenizer, TrainBatches, prepare_tokens
from moekit.model import Transformer
from moekit.train import load_checkpoint, preflight, train
from moekit.train.checkpoint import list_checkpoints
from moekit.train.metrics import read_metrics
from moekit.train.optim import lr_at


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def test_first_logged_loss_is_the_initial_model_on_the_step_0_batch(corpus, tmp_path):
    config = micro_train(corpus, steps=2, grad_accum=1, checkpoint_every=0)
    train(MICRO, config, tmp_path, plots=False)
    records = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]

    torch.manual_seed(config.seed)
    model = Transformer(MICRO)
    split = prepare_tokens(str(corpus), ByteTokenizer(), tmp_path / "cache", config.val_fraction)
    x, y = TrainBatches(split["train"], config.seq_len, config.batch_size, config.seed)(0)
    out = model(x)
    ce = F.cross_entropy(out.logits.reshape(-1, 256), y.reshape(-1))
    assert records[0]["loss"] == pytest.approx(ce.item(), rel=1e-6)
    assert records[0]["aux_loss"] == pytest.approx(out.aux_loss.item(), rel=1e-6)
    assert [r["lr"] for r in records] == pytest.approx([lr_at(s, config) for s in range(2)])
    loads = [o.tokens_per_expert.tolist() for o in out.moe]
    assert records[0]["tokens_per_expert"] == loads
    assert records[0]["imbalance"] == pytest.approx(max(max(t) / (sum(t) / 5) for t in loads))


def _first_step_grad_norm(cfg, config, corpus, cache) -> tuple[float, float]:
    """The first step's gradient norm, by hand: the sum over micro-batches of the gradient
    of (ce + balancing losses) / grad_accum; and the same norm without the balancing losses."""
    torch.manual_seed(config.seed)
    model = Transformer(cfg)
    split = prepare_tokens(str(corpus), ByteTokenizer(), cache, config.val_fraction)
    x, y = TrainBatches(split["train"], config.seq_len, config.batch_size, config.seed)(0)
    mb = config.batch_size // config.grad_accum
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    ce_only = [torch.zeros_like(p) for p in params]
    for m in range(config.grad_accum):
        out = model(x[m * mb : (m + 1) * mb])
        ce = F.cross_entropy(out.logits.reshape(-1, 256), y[m * mb : (m + 1) * mb].reshape(-1))
        g_ce = torch.autograd.grad(ce / config.grad_accum, params, retain_graph=True)
        g_aux = torch.autograd.grad(out.aux_loss / config.grad_accum, params, allow_unused=True)
        for i, (a, b) in enumerate(zip(g_ce, g_aux, strict=True)):
            ce_only[i] += a
            total[i] += a if b is None else a + b
    return _norm(total), _norm(ce_only)


def _norm(grads: list[torch.Tensor]) -> float:
    """The global 2-norm clip_grad_norm_ reports."""
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()


@pytest.mark.parametrize("grad_accum", [1, 4])
def test_logged_gradient_norm_is_that_of_the_mean_loss_with_its_balancing_terms(
    corpus, tmp_path, grad_accum
):
    # AdamW and global clipping are blind to a constant gradient scale, so the weights
    # alone would not notice a loss left undivided by grad_accum, or balancing losses left
    # out of the backward: the logged norm (before clipping) does.
    cfg = MICRO.replace(moe=MICRO.moe.replace(aux_loss_coef=0.05, z_loss_coef=0.01))
    config = micro_train(corpus, steps=1, grad_accum=grad_accum, checkpoint_every=0)
    train(cfg, config, tmp_path / "run", plots=False)
    (record,) = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    with_aux, without_aux = _first_step_grad_norm(cfg, config, corpus, tmp_path / "cache")
    assert abs(with_aux - without_aux) > 1e-4 * with_aux  # the balancing terms matter here
    assert record["grad_norm"] == pytest.approx(with_aux, rel=2e-6)


def test_bias_update_uses_the_load_summed_over_micro_batches(corpus, tmp_path):
    cfg = MICRO.replace(moe=MICRO.moe.replace(router="sigmoid_bias", bias_update_rate=0.25))
    config = micro_train(corpus, steps=1, grad_accum=2)
    train(cfg, config, tmp_path, plots=False)
    (record,) = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    state = load_checkpoint(list_checkpoints(tmp_path)[-1]).model_state
    for layer, load in enumerate(record["tokens_per_expert"]):
        load = torch.tensor(load)
        assert load.sum() == config.batch_size * config.seq_len * cfg.moe.top_k
        expected = 0.25 * torch.sign(load.mean() - load)
        bias = state[f"layers.{layer}.ffn.router.expert_bias"]
        torch.testing.assert_close(bias, expected, rtol=0, atol=0)


def test_gradient_accumulation_matches_one_big_batch(corpus, tmp_path):
    # Without balancing losses (computed per micro-batch, so not additive) the mean of the
    # micro-batch losses is the full-batch loss: the updates agree to rounding.
    cfg = MICRO.replace(moe=MICRO.moe.replace(aux_loss_coef=0.0, z_loss_coef=0.0))
    states = []
    for accum in (1, 4):
        run_dir = tmp_path / f"accum{accum}"
        train(cfg, micro_train(corpus, steps=2, grad_accum=accum), run_dir, plots=False)
        states.append(load_checkpoint(list_checkpoints(run_dir)[-1]).model_state)
    # The gradients agree to rounding (6e-8 of up to 0.27), but AdamW's first update is
    # lr * g / (|g| + 1e-8): where g is itself within rounding of 0, the rounding moves that
    # weight's update by a share of lr (4.9e-6 at worst on this corpus).
    for name, t in states[0].items():
        torch.testing.assert_close(states[1][name], t, rtol=1e-4, atol=2e-5, msg=name)
    torch.manual_seed(0)
    init = Transformer(cfg).state_dict()
    moved = [n for n, t in states[0].items() if (t - init[n]).abs().max() > 1e-4]
    assert len(moved) > len(init) // 2  # two steps really moved the weights


def test_validation_loss_is_the_mean_over_tokens_of_the_windows(tmp_path):
    # 45 windows in batches of 4: the last batch holds one, which a mean of batch means
    # would weigh as much as four.
    from moekit.data import val_batches
    from moekit.train import load_model

    text = "".join(f"line {i:03d} of a small file\n" for i in range(12))
    (tmp_path / "one.txt").write_text(text)
    # Trained a little, so the windows' losses differ (at initialisation all are ~ln 256).
    config = micro_train(
        tmp_path / "one.txt", steps=30, grad_accum=1, batch_size=4, seq_len=15, eval_every=30,
        eval_batches=100, checkpoint_every=30, lr=1e-2, warmup_steps=2,
    )  # fmt: skip
    train(MICRO, config, tmp_path / "run", plots=False)
    (record,) = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "val"]

    split = prepare_tokens(str(tmp_path / "one.txt"), ByteTokenizer(), tmp_path / "c", 0.2)
    batches = val_batches(split["val"], 15, 4, 100)
    assert [x.shape[0] for x, _ in batches][-2:] == [4, 1]
    model = load_model(tmp_path / "run")
    with torch.no_grad():
        ce = [
            F.cross_entropy(model(x).logits.transpose(1, 2), y, reduction="sum") for x, y in batches
        ]
    tokens = sum(y.numel() for _, y in batches)
    assert record["val_loss"] == pytest.approx((sum(ce) / tokens).item(), rel=1e-6)


def test_gradient_clipping_limits_the_update(corpus, tmp_path):
    # AdamW divides by the gradient's scale, so clipping shows once the clipped gradient
    # nears eps (1e-8): clipped to 1e-12, the first update all but vanishes (no decay).
    moved = {}
    for clip in (0.0, 1e-12):
        config = micro_train(
            corpus, steps=1, grad_accum=1, grad_clip=clip, warmup_steps=0, weight_decay=0.0
        )
        torch.manual_seed(config.seed)
        before = Transformer(MICRO).state_dict()
        train(MICRO, config, tmp_path / f"clip{clip}", plots=False)
        after = load_checkpoint(list_checkpoints(tmp_path / f"clip{clip}")[-1]).model_state
        name = "layers.0.attn.q_proj.weight"
        moved[clip] = (after[name] - before[name]).norm().item()
    assert moved[1e-12] < 1e-3 * moved[0.0]


def test_validation_runs_at_the_last_step_off_the_interval(corpus, tmp_path):
    train(MICRO, micro_train(corpus, steps=5, eval_every=3), tmp_path, plots=False)
    assert [r["step"] for r in read_metrics(tmp_path) if r["kind"] == "val"] == [3, 5]


def test_bias_update_in_training_follows_the_routed_load(corpus, tmp_path):
    # With capacity the computed load saturates at the capacity; the bias must move by
    # the load the router chose, before drops.
    moe = MICRO.moe.replace(router="sigmoid_bias", bias_update_rate=0.25, capacity_factor=0.5)
    cfg = MICRO.replace(moe=moe)
    config = micro_train(corpus, steps=1, grad_accum=1)
    train(cfg, config, tmp_path, plots=False)
    torch.manual_seed(config.seed)
    model = Transformer(cfg)
    split = prepare_tokens(str(corpus), ByteTokenizer(), tmp_path / "cache", config.val_fraction)
    x, _ = TrainBatches(split["train"], config.seq_len, config.batch_size, config.seed)(0)
    out = model(x)
    state = load_checkpoint(list_checkpoints(tmp_path)[-1]).model_state
    for layer, o in enumerate(out.moe):
        routed, kept = o.routed_tokens_per_expert, o.tokens_per_expert
        assert not torch.equal(routed, kept)  # capacity dropped some
        expected = 0.25 * torch.sign(routed.mean() - routed)
        bias = state[f"layers.{layer}.ffn.router.expert_bias"]
        torch.testing.assert_close(bias, expected, rtol=0, atol=0)


def test_metrics_reach_the_file_record_by_record(tmp_path):
    from moekit.train.metrics import MetricsLog, truncate_after

    log = MetricsLog(tmp_path)
    records = [{"kind": "train", "step": s, "loss": 5.0 - s} for s in (1, 2, 3)]
    for i, record in enumerate(records):
        log.write(record)
        # Readable before the log is closed: a crash loses at most the line being written.
        assert read_metrics(tmp_path) == records[: i + 1]
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a line cut short
    assert read_metrics(tmp_path) == records
    truncate_after(tmp_path, 2)  # resuming at step 2 repeats step 3
    assert read_metrics(tmp_path / "metrics.jsonl") == records[:2]


def test_a_model_larger_than_memory_is_refused_before_anything_is_written(corpus, tmp_path):
    from moekit.devices import memory_bytes
    from moekit.model import get_preset

    big = get_preset("deepseek-v3")  # 671B parameters: 10 TiB to train in fp32
    assert memory_bytes(torch.device("cpu")) < 16 * 671e9
    with pytest.raises(ValueError, match=r"671\.03B-parameter model .* needs about 9999\.\d GiB"):
        train(big, micro_train(corpus), tmp_path / "run", plots=False)
    assert not (tmp_path / "run").exists()


def _largest_router_grad(config) -> float:
    """The largest router-weight gradient of the language-model loss alone, at init."""
    torch.manual_seed(0)
    model = Transformer(config)
    ids = torch.randint(0, config.vocab_size, (2, 9))
    logits = model(ids[:, :-1]).logits
    F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    return max(moe.router.weight.grad.abs().max().item() for moe in model.moe_layers())


@pytest.mark.parametrize(
    "changes, fix",
    [
        ({"router": "softmax_topk"}, "--set moe.norm_topk_prob=false"),
        ({"router": "sigmoid_bias"}, "--set moe.norm_topk_prob=false"),
        ({"router": "topk_softmax"}, "--set moe.router=softmax_topk"),
    ],
)
def test_top1_routing_with_a_constant_weight_is_refused_for_training(
    corpus, tmp_path, changes, fix
):
    # Renormalised over one expert, the combine weight is 1 and the router never sees the
    # language-model loss: shown first, then refused before anything is written.
    config = MICRO.replace(
        moe=MICRO.moe.replace(top_k=1, aux_loss_coef=0.0, z_loss_coef=0.0, **changes)
    )
    assert _largest_router_grad(config) < 1e-9
    with pytest.raises(ValueError, match="combine weight of exactly 1") as err:
        train(config, micro_train(corpus), tmp_path / "run", plots=False)
    assert fix in str(err.value)
    assert not (tmp_path / "run").exists()
    # Unnormalised top-1 weights are the router's scores, which it learns through.
    if changes["router"] != "topk_softmax":
        learns = config.replace(moe=config.moe.replace(norm_topk_prob=False))
        assert _largest_router_grad(learns) > 1e-6
        train(learns, micro_train(corpus, steps=1), tmp_path / "ok", plots=False)


def test_a_layout_the_processes_cannot_split_is_refused_before_tokenizing(corpus, tmp_path):
    from types import SimpleNamespace

    from moekit.model import dense_twin

    def ranks(world, expert_parallel):
        return SimpleNamespace(
            world_size=world, expert_parallel=expert_parallel, local_world_size=world, is_main=True
        )

    one_row_each = micro_train(corpus, batch_size=4, grad_accum=4)
    cases = [
        # 4 rows in 4 micro-batches: one row each, which two processes cannot share.
        (one_row_each, ranks(2, 1), "4 / 4 = 1 rows per micro-batch must be divisible by the 2"),
        (
            micro_train(corpus),
            ranks(2, 2),
            "num_experts (5) must be divisible by --expert-parallel",
        ),
    ]
    for config, parallel, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            train(MICRO, config, tmp_path / "run", parallel=parallel, plots=False)
        assert not (tmp_path / "run").exists()  # no token cache, no metrics
    # A dense twin has no experts to split.
    preflight.check_layout(dense_twin(MICRO), micro_train(corpus), ranks(2, 2))


def test_the_memory_check_counts_each_ranks_share(monkeypatch):
    from types import SimpleNamespace

    from moekit.model import count_parameters
    from moekit.model.counting import expert_parameters

    checks = []
    monkeypatch.setattr(preflight, "check_fits", lambda *args: checks.append(args))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def need(device, parallel):
        preflight.check_memory(MICRO, device, parallel)
        return checks[-1][1]

    def ranks(expert_parallel, here):
        return SimpleNamespace(expert_parallel=expert_parallel, local_world_size=here)

    total, _ = count_parameters(MICRO)
    experts = expert_parameters(MICRO)
    assert experts == 2 * 5 * 3 * 24 * 20  # two MoE layers of five SwiGLU experts
    share = max(4 * total, 16 * (total - experts + experts // 5))
    # Data parallelism holds a whole replica on every rank; five expert-parallel ranks
    # one expert each (and the whole model while it is built).
    assert need(cpu, None) == need(cpu, ranks(1, 1)) == 16 * total
    assert need(cpu, ranks(5, 1)) == share
    # Ranks on one machine share its RAM; CUDA ranks each have a device.
    assert need(cpu, ranks(5, 5)) == 5 * share
    assert "on the 5 ranks of this machine" in checks[-1][0]
    assert need(cpu, ranks(1, 2)) == 2 * 16 * total
    assert need(cuda, ranks(5, 5)) == share


def test_validation_runs_in_micro_batches(corpus, tmp_path, monkeypatch):
    # --grad-accum is there to fit memory: evaluation must not run 4x the rows at once.
    from moekit.model import transformer

    rows = {True: set(), False: set()}
    forward = transformer.Transformer.forward

    def recording(self, ids_BS, *args, **kwargs):
        rows[torch.is_grad_enabled()].add(ids_BS.shape[0])
        return forward(self, ids_BS, *args, **kwargs)

    monkeypatch.setattr(transformer.Transformer, "forward", recording)
    config = micro_train(corpus, steps=2, batch_size=8, grad_accum=4, eval_every=2)
    train(MICRO, config, tmp_path / "run", plots=False)
    assert rows == {True: {2}, False: {2}}
