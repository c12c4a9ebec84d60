"""Training under expert parallelism equals one process; its checkpoints load at any size.

The tiny model trains 20 steps on one process, on 2 gloo processes (expert parallel 2, data
parallel beside it), on 4 (two expert-parallel groups of 2) and on 2 with data parallelism
only, on the same global batches; the losses must agree to 1e-5.
The 2-process run's final checkpoint then travels 2 -> 1 -> 4 -> 2 processes and every
weight and AdamW moment must come back bitwise equal.
"""

from __future__ import annotations

import pytest
import torch
from parallel_cases import pool
from parallel_train_cases import (
    broken_source_worker,
    noisy_train_worker,
    read_losses,
    reshard_worker,
    short_val_configs,
    short_val_worker,
    tiny_train_configs,
    train_worker,
)

from moekit.train import checkpoint as ckpt_io

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from moekit.train import train

    root = tmp_path_factory.mktemp("parallel_train")
    model_config, train_config = tiny_train_configs()
    single = train(
        model_config, train_config, root / "single", cache_dir=root / "cache", plots=False
    )
    ranks = pool(2).run(train_worker, str(root / "ep2"), str(root / "cache"), 2, timeout_s=200)
    return root, single, ranks


def test_expert_parallel_training_matches_one_process(runs) -> None:
    root, single, ranks = runs
    expected = read_losses(root / "single")
    got = ranks[0]["losses"]
    assert len(expected) == len(got) == 20
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=0, atol=1e-5)
    for r in ranks:
        assert r["val_loss"] == pytest.approx(single.val_loss, abs=1e-5)
    # The loss fell: the agreement is not that of two runs that both stood still.
    assert expected[-1] < expected[0] - 0.5


@pytest.mark.parametrize(("world_size", "ep"), [(4, 2), (2, 1)], ids=["ep2xdp2", "dp2"])
def test_other_layouts_match_one_process(runs, world_size: int, ep: int) -> None:
    # ep2xdp2: two expert-parallel groups of 2, each expert on two ranks whose gradients
    # meet in the expert data-parallel all-reduce. dp2: every expert on every rank.
    # Either way the balancing losses are the global batch's.
    root, single, _ = runs
    out = root / f"w{world_size}_ep{ep}"
    ranks = pool(world_size).run(train_worker, str(out), str(root / "cache"), ep, timeout_s=200)
    expected = torch.tensor(read_losses(root / "single"))
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), expected, rtol=0, atol=1e-5)
    assert all(r["val_loss"] == pytest.approx(single.val_loss, abs=1e-5) for r in ranks)


def test_a_warm_start_under_expert_parallelism_matches_one_process(runs) -> None:
    # Every rank loads the full weights, then the context shards the experts.
    from moekit.hf.convert import load_init_source
    from moekit.train import train

    root, _, _ = runs
    model_config, train_config = tiny_train_configs()
    source = load_init_source(root / "single")
    train(
        model_config,
        train_config,
        root / "warm_single",
        cache_dir=root / "cache",
        plots=False,
        init_from=source,
    )
    ranks = pool(2).run(
        train_worker, str(root / "warm_ep2"), str(root / "cache"), 2, str(root / "single"),
        timeout_s=200,
    )  # fmt: skip
    expected = read_losses(root / "warm_single")
    torch.testing.assert_close(
        torch.tensor(ranks[0]["losses"]), torch.tensor(expected), rtol=0, atol=1e-5
    )
    # Both began from the trained weights, far below where the first run began.
    assert expected[0] < read_losses(root / "single")[0] - 1.0


def test_a_broken_source_fails_on_every_rank_before_anything_is_written(runs, tmp_path) -> None:
    import shutil

    root, _, _ = runs
    src = tmp_path / "src"
    shutil.copytree(root / "single", src)
    weights = ckpt_io.list_checkpoints(src)[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    errors = pool(2).run(broken_source_worker, str(tmp_path / "run"), str(src), timeout_s=200)
    assert all("model.safetensors has" in e for e in errors), errors
    # Not even the token cache, which rank 0 writes for all ranks.
    assert not (tmp_path / "run").exists()


def _assert_bitwise(a: ckpt_io.Checkpoint, b: ckpt_io.Checkpoint) -> None:
    assert a.model_state.keys() == b.model_state.keys()
    for name, t in a.model_state.items():
        assert torch.equal(t, b.model_state[name]), name
    moments = {k for k in a.state_tensors if k.startswith("optim.")}
    assert moments == {k for k in b.state_tensors if k.startswith("optim.")}
    assert any(".experts." in k and k.endswith("exp_avg_sq") for k in moments)
    for key in moments:
        assert torch.equal(a.state_tensors[key], b.state_tensors[key]), key


def test_checkpoint_reshards_2_to_1_to_4_to_2(runs, tmp_path) -> None:
    from moekit.model import Transformer
    from moekit.train import state as state_io
    from moekit.train.optim import build_optimizer

    root, _, _ = runs
    from_2 = ckpt_io.load_checkpoint(ckpt_io.resolve(root / "ep2"))
    num_experts = tiny_train_configs()[0].moe.num_experts
    expert_weights = [t for k, t in from_2.model_state.items() if k.endswith(".experts.w_up_EFD")]
    assert expert_weights and all(t.shape[0] == num_experts for t in expert_weights)

    # 2 -> 1: a plain single-process model and optimizer take the file as it is.
    model_config, train_config = tiny_train_configs()
    model = Transformer(model_config)
    model.load_state_dict(from_2.model_state, strict=True)
    optimizer = build_optimizer(model, train_config)
    state_io.restore(model, optimizer, from_2.state_tensors, from_2.state)
    tensors, scalars = state_io.capture(model, optimizer)
    ckpt_io.save_checkpoint(
        tmp_path / "one", from_2.step, model.state_dict(), from_2.config, tensors, scalars, keep=1
    )
    from_1 = ckpt_io.load_checkpoint(ckpt_io.resolve(tmp_path / "one"))
    _assert_bitwise(from_1, from_2)

    # 1 -> 4 -> 2: each world slices on load and gathers on save.
    src = ckpt_io.resolve(tmp_path / "one")
    pool(4).run(reshard_worker, str(src), str(tmp_path / "four"), timeout_s=120)
    from_4 = ckpt_io.load_checkpoint(ckpt_io.resolve(tmp_path / "four"))
    _assert_bitwise(from_4, from_2)
    src = ckpt_io.resolve(tmp_path / "four")
    pool(2).run(reshard_worker, str(src), str(tmp_path / "two"), timeout_s=120)
    _assert_bitwise(ckpt_io.load_checkpoint(ckpt_io.resolve(tmp_path / "two")), from_2)


def test_a_short_validation_batch_is_shared_over_the_ranks(tmp_path) -> None:
    # 370 bytes, the last tenth validation: 37 tokens, 5 windows of 32 -> batches of 4 and
    # 1 rows. Ranks get even shards (the lone row and an ignored copy), and the loss is the
    # one process's.
    from moekit.data import ByteTokenizer, prepare_tokens
    from moekit.data.batches import val_batches
    from moekit.train import train

    data = tmp_path / "small.txt"
    data.write_text(("the cat sat on the mat. " * 16)[:370])
    model_config, train_config = short_val_configs(str(data))
    split = prepare_tokens(str(data), ByteTokenizer(), tmp_path / "c", 0.1)["val"]
    assert [len(x) for x, _ in val_batches(split, 32, 4, 2)] == [4, 1]
    single = train(model_config, train_config, tmp_path / "single", plots=False)
    ranks = pool(2).run(short_val_worker, str(tmp_path / "dp2"), str(data), timeout_s=200)
    assert ranks == [pytest.approx(single.val_loss, abs=1e-5)] * 2


def test_ranks_draw_their_own_router_noise_and_resume_exactly(tmp_path) -> None:
    # One generator seeded alike on every rank had given rank 1's tokens rank 0's noise.
    full = pool(2).run(noisy_train_worker, str(tmp_path / "full"), None, timeout_s=200)
    assert full[0]["noise"].shape == full[1]["noise"].shape
    assert full[0]["noise"].abs().mean() > 0.5  # noise of std 1 was drawn
    assert not torch.allclose(full[0]["noise"], full[1]["noise"])
    # Seeded by (seed, step, rank), the draws of a resumed run are the uninterrupted run's.
    half = ckpt_io.list_checkpoints(tmp_path / "full")[0]
    assert half.name.endswith("2")
    pool(2).run(noisy_train_worker, str(tmp_path / "resumed"), str(half), timeout_s=200)
    _assert_bitwise(
        ckpt_io.load_checkpoint(ckpt_io.resolve(tmp_path / "resumed")),
        ckpt_io.load_checkpoint(ckpt_io.resolve(tmp_path / "full")),
    )
