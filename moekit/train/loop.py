"""The training loop: data -> model -> loss (+ balancing losses) -> AdamW, with checkpoints.

Shapes: B batch, S sequence, V vocab, E experts.

One process by default; with a `parallel` context (moekit.parallel.ParallelContext) it
uses only that object (prepare, shard_batch, mean, clip_grad_norm_, full_state_dict,
load_state_dict, shard_optimizer_state, full_optimizer_state, barrier, is_main,
world_size) and never torch.distributed itself.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.data.batches import TrainBatches, val_batches
from moekit.data.sources import check_outside
from moekit.data.tokenizer import load_tokenizer
from moekit.data.tokens import SPLIT_RULE, data_digest, prepare_tokens
from moekit.devices import resolve_device
from moekit.train import checkpoint as ckpt_io
from moekit.train import metrics as metrics_io
from moekit.train import preflight
from moekit.train import state as state_io
from moekit.train.compiling import compile_forward
from moekit.train.config import TrainConfig
from moekit.train.init_from import InitSource, check_initial_weights
from moekit.train.optim import build_optimizer, lr_at, set_lr
from moekit.train.plots import can_plot, plot_run
from moekit.train.run_tokenizer import copy_tokenizer, tokenizer_home


@dataclass
class TrainResult:
    """Summary of a finished run (the full history is in run_dir/metrics.jsonl)."""

    run_dir: Path
    steps: int
    train_loss: float
    val_loss: float
    val_losses_by_domain: dict[str, float]
    tokens_per_s: float
    """Training tokens per second of pure training time (evaluation and saving excluded)."""
    train_seconds: float
    plots: list[Path] = field(default_factory=list)


_IGNORED = -100
"""The target F.cross_entropy leaves out (its ignore_index): padding rows of validation."""


def _even_rows(x_BS: Tensor, y_BS: Tensor, world_size: int) -> tuple[Tensor, Tensor]:
    """A validation batch with rows enough for every rank to get as many: copies of its
    last window, whose targets are ignored. The last batch may be short (val_batches),
    and shards must be even; the summed loss and token count stay those of the batch."""
    pad = -x_BS.shape[0] % world_size
    if not pad:
        return x_BS, y_BS
    x_BS = torch.cat([x_BS, x_BS[-1:].expand(pad, -1)])
    return x_BS, torch.cat([y_BS, y_BS.new_full((pad, y_BS.shape[1]), _IGNORED)])


def _cross_entropy(logits_BSV: Tensor, y_BS: Tensor, reduction: str = "mean") -> Tensor:
    return F.cross_entropy(
        logits_BSV.reshape(-1, logits_BSV.shape[-1]), y_BS.reshape(-1), reduction=reduction
    )


def train(
    model_config,
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: str | Path | None = None,
    parallel=None,
    cache_dir: str | Path | None = None,
    plots: bool = True,
    init_from: InitSource | None = None,
    split_rule: str | None = None,
) -> TrainResult:
    """Train a `Transformer(model_config)` per `config`, writing everything under run_dir.

    resume: a checkpoint directory, or a run directory (its newest checkpoint), to continue
    from exactly where it stopped. init_from: weights to begin a new run from
    (`moekit.hf.convert.load_init_source`; read after the memory check, and not at all
    when resuming, where the checkpoint has the weights).
    cache_dir: where token files go (default run_dir/cache).
    split_rule: how a new run splits its text (moekit.data.tokens; default the current
        rule); a resumed run keeps its checkpoint's, and giving another is an error.
    Returns a TrainResult; metrics.jsonl, checkpoints/ and the PNG plots are in run_dir.
    """
    from moekit.model import Transformer

    if config.compile != "none" and parallel is not None:
        raise ValueError(
            f"compile={config.compile!r} is not supported with torch.distributed runs "
            "(expert or data parallelism); use compile='none'"
        )
    run_dir = Path(run_dir)
    is_main = parallel is None or parallel.is_main
    device = resolve_device(config.device)
    preflight.check_memory(model_config, device, parallel)
    preflight.check_layout(model_config, config, parallel)
    preflight.check_seq_len(config, model_config)
    preflight.check_router_learns(model_config)
    tokenizer = load_tokenizer(config.tokenizer)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"tokenizer {config.tokenizer!r} has {tokenizer.vocab_size} tokens, more than the "
            f"model's vocab_size ({model_config.vocab_size})"
        )
    check_outside(config.data, run_dir, "the run directory")
    preflight.check_not_in_checkpoints(run_dir)
    branched_from = None
    if resume is None:
        preflight.check_new_run_dir(run_dir)
        split_rule = SPLIT_RULE if split_rule is None else split_rule
    else:
        # The checkpoint's config and step before the text is tokenized: a changed flag
        # must not cost a multi-GB corpus's tokenization first.
        resume = ckpt_io.resolve(resume)
        branched_from = preflight.resume_source(resume, run_dir)
        # Weights only first: a conversion records a default config, whose differences
        # would send the user matching flags for a checkpoint that cannot resume at all.
        resumed_state = ckpt_io.read_state(resume)
        preflight.check_has_training_state(resume, resumed_state)
        preflight.check_resumable(ckpt_io.read_config(resume), resume, model_config, config)
        preflight.check_steps_left(resumed_state["step"], config)
        split_rule = preflight.resumed_split_rule(resume, resumed_state, split_rule)
    home = tokenizer_home(config.tokenizer, run_dir)
    # Read after the memory check (a source too large to train is never read) and before
    # tokenizing, so a broken source fails before anything is written. A resumed run's
    # weights are its checkpoint's.
    init_state = None if init_from is None or resume is not None else init_from.read_state()
    if init_state is not None:
        # Shapes against a model on meta now: a --set that changes them fails before the
        # text is tokenized, not after.
        with torch.device("meta"):
            check_initial_weights(Transformer(model_config), init_state, init_from.path)
    cache_dir = cache_dir or run_dir / "cache"
    if parallel is not None:
        # Rank 0 tokenizes into the shared cache while the others wait, then all reuse it.
        if is_main:
            prepare_tokens(config.data, tokenizer, cache_dir, config.val_fraction, split_rule)
        parallel.barrier()
    splits = prepare_tokens(config.data, tokenizer, cache_dir, config.val_fraction, split_rule)
    digest = data_digest(splits)
    batches = TrainBatches(splits["train"], config.seq_len, config.batch_size, config.seed)
    evals = {"": val_batches(splits["val"], config.seq_len, config.batch_size, config.eval_batches)}
    domains = splits["val"].domain_names()
    if len(domains) > 1:
        for d in domains:
            evals[d] = val_batches(
                splits["val"], config.seq_len, config.batch_size, config.eval_batches, d
            )

    saved = None
    if resume is not None:
        saved = ckpt_io.load_checkpoint(resume)
        preflight.check_same_data(saved.state.get("data_digest"), digest, config.data)
    elif is_main:
        metrics_io.truncate_after(run_dir, 0)  # records of a run that never checkpointed
    torch.manual_seed(config.seed)
    base = Transformer(model_config)
    if init_state is not None:
        # Names and shapes were checked above. Before `prepare`, which shards these full
        # weights under expert parallelism.
        base.load_state_dict(init_state, strict=True)
        del init_state  # the model holds its own copy
    base = base.to(device)
    model = parallel.prepare(base) if parallel is not None else base
    forward = compile_forward(model, config.compile)
    optimizer = build_optimizer(base, config)
    start = 0
    if saved is not None:
        # Names first, whichever way the weights load: a checkpoint of another layout
        # gets the same error on one process and under expert parallelism.
        ckpt_io.check_model_names(base, saved.model_state)
        if parallel is not None:
            parallel.load_state_dict(base, saved.model_state)
        else:
            base.load_state_dict(saved.model_state, strict=True)
        state_tensors = saved.state_tensors
        if parallel is not None:  # full expert moments in the file; this rank's slice here
            state_tensors = parallel.shard_optimizer_state(base, state_tensors)
        state_io.restore(base, optimizer, state_tensors, saved.state)
        start = saved.step
        if is_main and branched_from is None:
            # Checkpoints first: stopped in between, the metrics still hold the history
            # of every checkpoint left, and the next resume cuts them.
            ckpt_io.drop_after(run_dir, start)
            metrics_io.truncate_after(run_dir, start)
        elif is_main:  # a branch's history up to its start is the run it came from
            metrics_io.copy_until(branched_from, run_dir, start)
    run_dir.mkdir(parents=True, exist_ok=True)
    if home is not None:
        # Every check has passed. Recorded as run:tokenizer.json (`_recorded_train`): the
        # run no longer needs the file it was given (see moekit.train.run_tokenizer).
        if is_main:
            copy_tokenizer(*home)
        config = config.replace(tokenizer=str(home[1]))
    log = metrics_io.MetricsLog(run_dir) if is_main else None
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    shard = parallel.shard_batch if parallel is not None else (lambda t: t)
    world = 1 if parallel is None else parallel.world_size
    mb = config.micro_batch_size
    reduce = parallel.mean if parallel is not None else (lambda t: t)

    def evaluate() -> dict[str, float]:
        model.eval()
        out = {}
        with torch.no_grad(), autocast:
            for name, batches_ in evals.items():
                if not batches_:
                    continue
                # A mean over tokens, not over batches: the last batch may be short.
                total = torch.zeros(2, dtype=torch.float64, device=device)
                for x_BS, y_BS in batches_:
                    # In micro-batches, as training runs: --grad-accum is there to fit memory.
                    for i in range(0, x_BS.shape[0], mb):
                        x, y = _even_rows(x_BS[i : i + mb], y_BS[i : i + mb], world)
                        y = shard(y).to(device)
                        ce = _cross_entropy(model(shard(x).to(device)).logits, y, "sum")
                        counted = (y != _IGNORED).sum()
                        total += torch.stack([ce.double(), counted.to(total.dtype)])
                total = reduce(total)  # the mean over ranks of both: their ratio is the sum's
                out[f"val_loss_{name}" if name else "val_loss"] = float(total[0] / total[1])
        model.train()
        return out

    from tqdm.auto import tqdm

    bar = tqdm(
        total=config.steps, initial=start, disable=not (config.progress and is_main), unit="step"
    )
    params = [p for p in base.parameters() if p.requires_grad]
    # With CUDA graphs (compile='reduce-overhead') a backward's gradients live in memory
    # that the next micro-batch's replay overwrites. A first gradient is kept as it is
    # (not copied) when .grad is None, so summed over micro-batches they must go into
    # gradients of our own: zeros, not None, between steps.
    grads_as_zeros = config.compile == "reduce-overhead" and config.grad_accum > 1
    if grads_as_zeros:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    train_seconds, last_loss, last_val = 0.0, float("nan"), {}
    model.train()
    for step in range(start, config.steps):
        t0 = time.perf_counter()
        if world > 1:
            # Router noise and jitter come from the global generator: seeded alike, every
            # rank would give its tokens rank 0's noise rows. A seed of (seed, step, rank)
            # keeps the draws independent, and a resume exact on every rank, though only
            # rank 0's generator state is saved.
            torch.manual_seed(_rank_step_seed(config.seed, step, parallel.rank, world))
        set_lr(optimizer, lr_at(step, config))
        x_BS, y_BS = batches(step)
        ce_sum = aux_sum = 0.0
        loads = routed = None
        for m in range(config.grad_accum):
            x = shard(x_BS[m * mb : (m + 1) * mb]).to(device)
            y = shard(y_BS[m * mb : (m + 1) * mb]).to(device)
            with autocast:
                out = forward(x)
            ce = _cross_entropy(out.logits, y)
            ((ce + out.aux_loss) / config.grad_accum).backward()
            ce_sum, aux_sum = ce_sum + ce.detach(), aux_sum + out.aux_loss.detach()
            # Copies: with CUDA graphs (compile='reduce-overhead') the next micro-batch's
            # replay writes its outputs into the same memory.
            # Computed loads are logged; routed ones (before capacity drops) move the bias.
            step_loads = [o.tokens_per_expert.detach().clone() for o in out.moe]
            step_routed = [o.routed_tokens_per_expert.detach().clone() for o in out.moe]
            if loads is None:
                loads, routed = step_loads, step_routed
            else:
                loads = [a + b for a, b in zip(loads, step_loads, strict=True)]
                routed = [a + b for a, b in zip(routed, step_routed, strict=True)]
        # Under expert parallelism the norm must count every rank's experts.
        clip = parallel.clip_grad_norm_ if parallel is not None else torch.nn.utils.clip_grad_norm_
        grad_norm = clip(params, config.grad_clip if config.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=not grads_as_zeros)
        if routed:
            if parallel is not None:  # data-parallel ranks must move the bias identically
                routed = list(parallel.mean(torch.stack(routed)))
            base.update_bias(routed)
        # Read before the clock stops: on CUDA it waits for the step's queued kernels.
        last_loss = float(reduce(ce_sum / config.grad_accum))
        dt = time.perf_counter() - t0
        train_seconds += dt
        record = {
            "kind": "train",
            "step": step + 1,
            "loss": last_loss,
            "aux_loss": float(reduce(aux_sum / config.grad_accum)),
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm),
            "tokens_per_s": config.tokens_per_step / dt,
        }
        if loads:
            per_layer = [t.float().cpu() for t in loads]
            record["imbalance"] = max(float(t.max() / t.mean().clamp_min(1e-9)) for t in per_layer)
            record["tokens_per_expert"] = [t.tolist() for t in per_layer]
        last_step = step + 1 == config.steps
        if (step + 1) % config.eval_every == 0 or last_step:
            last_val = evaluate()
        if log is not None:
            log.write(record)
            if (step + 1) % config.eval_every == 0 or last_step:
                log.write({"kind": "val", "step": step + 1, **last_val})
        bar.update(1)
        bar.set_postfix(
            loss=f"{last_loss:.3f}",
            tok_s=f"{record['tokens_per_s']:.0f}",
            aux=f"{record['aux_loss']:.3f}",
            imb=f"{record.get('imbalance', 1.0):.2f}",
            **({"val": f"{last_val['val_loss']:.3f}"} if last_val else {}),
        )
        every = config.checkpoint_every
        if last_step or (every and (step + 1) % every == 0):
            _save(
                run_dir, step + 1, base, optimizer, model_config, config, parallel, digest,
                split_rule,
            )  # fmt: skip
    bar.close()
    if log is not None:
        log.close()
    result = TrainResult(
        run_dir=run_dir,
        steps=config.steps,
        train_loss=last_loss,
        val_loss=last_val.get("val_loss", float("nan")),
        val_losses_by_domain={
            k[len("val_loss_") :]: v for k, v in last_val.items() if k.startswith("val_loss_")
        },
        tokens_per_s=config.tokens_per_step * (config.steps - start) / max(train_seconds, 1e-9),
        train_seconds=train_seconds,
    )
    if plots and is_main and can_plot():
        result.plots = plot_run(run_dir)
    return result


def _rank_step_seed(seed: int, step: int, rank: int, world: int) -> int:
    """A distinct seed for every (step, rank) of a run, and for every run seed."""
    return (seed * 0x9E3779B97F4A7C15 + step * world + rank) % 2**63


def _recorded_train(config: TrainConfig, run_dir: Path) -> dict:
    # A tokenizer inside the run directory is recorded relative to it: the run may move.
    tokenizer = ckpt_io.record_tokenizer(config.tokenizer, run_dir)
    return {**config.to_dict(), "tokenizer": tokenizer}


def _save(
    run_dir, step, base, optimizer, model_config, config, parallel, digest, split_rule
) -> None:
    full = parallel.full_state_dict(base) if parallel is not None else base.state_dict()
    tensors, scalars = state_io.capture(base, optimizer)
    if parallel is not None:  # gather expert moments: a collective, on every rank
        tensors = parallel.full_optimizer_state(base, tensors)
    if parallel is None or parallel.is_main:
        world = 1 if parallel is None else parallel.world_size
        ckpt_io.save_checkpoint(
            run_dir,
            step,
            full,
            {"model": model_config.to_dict(), "train": _recorded_train(config, run_dir)},
            tensors,
            {**scalars, "world_size": world, "data_digest": digest, "split_rule": split_rule},
            keep=config.keep_checkpoints,
        )
    if parallel is not None:
        parallel.barrier()
