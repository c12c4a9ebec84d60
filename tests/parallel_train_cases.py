"""Training workers for the multi-process tests (run under moekit.parallel.spawn).

Module-level so spawned interpreters can import them by name. Each runs `moekit.train`
on its rank, from the configs below, and returns what the tests compare with a single
process (tests/test_parallel_train.py). The layer-level cases are in parallel_cases.py.
"""

from __future__ import annotations


def tiny_train_configs():
    """A two-layer tiny model (sigmoid-bias router, so the bias update is exercised too) and
    20 short steps."""
    from moekit.model import get_preset
    from moekit.train import TrainConfig

    base = get_preset("tiny")
    moe = base.moe.replace(router="sigmoid_bias", bias_update_rate=1e-2)
    model_config = base.replace(num_layers=2, max_seq_len=32, moe=moe)
    train_config = TrainConfig(
        steps=20,
        batch_size=4,
        seq_len=32,
        warmup_steps=3,
        eval_every=20,
        eval_batches=1,
        checkpoint_every=0,
        progress=False,
        device="cpu",
    )
    return model_config, train_config


def read_losses(run_dir) -> list[float]:
    import json
    from pathlib import Path

    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r["loss"] for r in records if r.get("kind") == "train"]


def train_worker(
    rank: int, world_size: int, run_dir: str, cache_dir: str, ep: int, init_from: str | None = None
) -> dict:
    """20 steps of the tiny model with expert parallel `ep` (and data parallel beside it),
    from the weights of the run or checkpoint `init_from` when given."""
    from moekit.hf.convert import load_init_source
    from moekit.parallel.context import ParallelContext
    from moekit.train import train

    model_config, train_config = tiny_train_configs()
    ctx = ParallelContext(expert_parallel=ep)
    source = load_init_source(init_from) if init_from is not None else None
    result = train(
        model_config,
        train_config,
        run_dir,
        parallel=ctx,
        cache_dir=cache_dir,
        plots=False,
        init_from=source,
    )
    return {"val_loss": result.val_loss, "losses": read_losses(run_dir) if rank == 0 else None}


def noisy_train_worker(rank: int, world_size: int, run_dir: str, resume: str | None) -> dict:
    """4 data-parallel steps of the tiny model with router noise, or the same run resumed
    from `resume`; returns the noise this rank's routers drew at their first training call."""
    import torch.nn.functional as F

    from moekit.parallel.context import ParallelContext
    from moekit.router import Router
    from moekit.train import train

    model_config, train_config = tiny_train_configs()
    model_config = model_config.replace(moe=model_config.moe.replace(router_noise=1.0))
    train_config = train_config.replace(steps=4, eval_every=4, checkpoint_every=2)
    noise = []
    logits = Router.logits

    def spy(router, x_TD):
        out = logits(router, x_TD)
        if router.training and not noise:
            noise.append(out.detach() - F.linear(x_TD.detach().float(), router.weight.detach()))
        return out

    Router.logits = spy
    try:
        ctx = ParallelContext(expert_parallel=1)
        train(model_config, train_config, run_dir, parallel=ctx, plots=False, resume=resume)
    finally:
        Router.logits = logits
    return {"noise": noise[0]}


def short_val_configs(data: str):
    """The tiny configs on a small text whose validation holds 5 windows: batches of 4 and
    1 rows, the second too short to split evenly over 2 ranks."""
    model_config, train_config = tiny_train_configs()
    train_config = train_config.replace(
        data=data, val_fraction=0.1, steps=2, eval_every=2, eval_batches=2, warmup_steps=1
    )
    return model_config, train_config


def short_val_worker(rank: int, world_size: int, run_dir: str, data: str) -> float:
    """The validation loss of 2 data-parallel steps on `short_val_configs(data)`."""
    from moekit.parallel.context import ParallelContext
    from moekit.train import train

    model_config, train_config = short_val_configs(data)
    ctx = ParallelContext(expert_parallel=1)
    return train(model_config, train_config, run_dir, parallel=ctx, plots=False).val_loss


def broken_source_worker(rank: int, world_size: int, run_dir: str, init_from: str) -> str:
    """A warm start from a broken source under expert parallelism: the error it raises."""
    from moekit.hf.convert import load_init_source
    from moekit.parallel.context import ParallelContext
    from moekit.train import CheckpointError, train

    model_config, train_config = tiny_train_configs()
    ctx = ParallelContext(expert_parallel=world_size)
    source = load_init_source(init_from)
    try:
        train(model_config, train_config, run_dir, parallel=ctx, plots=False, init_from=source)
    except CheckpointError as err:
        return str(err)
    return "no error"


def reshard_worker(rank: int, world_size: int, src: str, dst: str) -> None:
    """Load checkpoint `src` at expert parallel `world_size`, write it back out as `dst`.

    Uses the train loop's own pieces: checkpoint files, optimizer capture/restore, and
    the parallel context's gather/slice of model and optimizer state.
    """
    from moekit.model import Transformer
    from moekit.parallel.context import ParallelContext
    from moekit.train import checkpoint as ckpt_io
    from moekit.train import state as state_io
    from moekit.train.optim import build_optimizer

    model_config, train_config = tiny_train_configs()
    ctx = ParallelContext(expert_parallel=world_size)
    model = Transformer(model_config)
    ctx.prepare(model)
    optimizer = build_optimizer(model, train_config)
    saved = ckpt_io.load_checkpoint(src)
    ctx.load_state_dict(model, saved.model_state)
    tensors = ctx.shard_optimizer_state(model, saved.state_tensors)
    state_io.restore(model, optimizer, tensors, saved.state)
    full = ctx.full_state_dict(model)
    tensors, scalars = state_io.capture(model, optimizer)
    tensors = ctx.full_optimizer_state(model, tensors)
    if ctx.is_main:
        ckpt_io.save_checkpoint(dst, saved.step, full, saved.config, tensors, scalars, keep=1)
    ctx.barrier()
