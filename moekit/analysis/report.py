"""Analyse a trained model's routing end to end: table, figures and a JSON summary.

`analyze_model` works on any built model and labelled batches; `analyze_checkpoint`
loads a moekit checkpoint (or a Hugging Face directory), takes the validation split of
the text it was trained on and calls it. Both return the summary that is written to
`routing.json`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from torch import nn

from moekit import atomic
from moekit.analysis import plots
from moekit.analysis.collect import Batch, collect_routing, labelled_batches
from moekit.analysis.counts import LayerCounts, LayerSummary

SUMMARY_FILE = "routing.json"
FIGURES = ("load", "imbalance", "specialisation", "co_selection")


def analyze_model(
    model: nn.Module,
    batches: list[Batch],
    domains: tuple[str, ...],
    out_dir: str | Path | None = None,
    dead_threshold: float = 0.1,
    title: str = "",
    progress: bool = False,
) -> dict:
    """Route `batches` through `model`; write figures and routing.json to out_dir if given.

    dead_threshold: an expert is dead under this fraction of its fair share (1/E) of the
    assignments (see moekit.analysis.stats.dead_experts). Returns the summary dict:
    {"domains", "num_tokens", "layers": [LayerSummary as dict], "co_selection",
    "domain_expert", "figures": {name: path}}.
    """
    if not 0 <= dead_threshold <= 1:
        raise ValueError(f"dead_threshold must be in [0, 1], got {dead_threshold!r}")
    if not batches:
        raise ValueError("no batches of text to analyse")
    counts = collect_routing(model, batches, domains, progress=progress)
    summaries = [c.summary(i, dead_threshold) for i, c in enumerate(counts)]
    summary = {
        "domains": list(domains),
        "num_tokens": summaries[0].num_tokens,
        "dead_threshold": dead_threshold,
        "layers": [s.to_dict() for s in summaries],
        "co_selection": [c.co_selection.tolist() for c in counts],
        "domain_expert": [c.domain_expert.tolist() for c in counts],
        "figures": {},
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # The numbers first: a figure that fails (memory, a plotting backend) loses no
        # forward pass. Written again with the figures' paths once they are drawn.
        atomic.write_json(out / SUMMARY_FILE, summary)
        summary["figures"] = _write_figures(counts, summaries, out, title)
        atomic.write_json(out / SUMMARY_FILE, summary)
    return summary


def analyze_checkpoint(
    path: str | Path,
    out_dir: str | Path | None = None,
    data: str | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    batches_per_domain: int = 8,
    dead_threshold: float = 0.1,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    progress: bool = False,
    tokenizer: str | None = None,
) -> dict:
    """Analyse the routing of a checkpoint on the validation split of its own text.

    path: a moekit checkpoint (or run directory: its newest checkpoint) or a Hugging Face
    model directory. data: text to use instead of the one the model was trained on (see
    moekit.data.sources). Windows of seq_len tokens (default: the training length; longer
    than the model's max_seq_len is a ValueError), the same number from each domain.
    out_dir: where the PNGs and routing.json go (default: `<run_dir>/analysis` for a
    checkpoint of a training run, else `<path>/analysis`).
    tokenizer: "bytes" or a tokenizer.json, instead of the checkpoint's own. Returns the
    summary of `analyze_model` plus "checkpoint", "data" and "out_dir".
    """
    from moekit.data import load_tokenizer, prepare_tokens
    from moekit.data.sources import check_outside
    from moekit.data.tokens import SPLIT_RULE
    from moekit.devices import resolve_device
    from moekit.train.checkpoint import run_dir_of

    for name, value in (("batch_size", batch_size), ("batches_per_domain", batches_per_domain)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    device = str(resolve_device(device))
    model, train, source = _load(Path(path), device)
    seq_len = _window(seq_len, train, model.config.max_seq_len)
    data = data or train.get("data", "embedded")
    spec = tokenizer or train.get("tokenizer")
    if spec is None:
        raise FileNotFoundError(
            f"{source} has no tokenizer.json to turn text into token ids; pass a tokenizer "
            "(--tokenizer PATH, or bytes for a byte-level model)"
        )
    tok = load_tokenizer(spec)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer {tok.name!r} has {tok.vocab_size} ids, the model only "
            f"{model.config.vocab_size}"
        )
    run_dir = run_dir_of(source)
    out_dir = Path(out_dir) if out_dir is not None else (run_dir or source) / "analysis"
    if out_dir.exists() and not out_dir.is_dir():  # before the text is read and routed
        raise ValueError(f"out_dir {out_dir} is a file, not a directory")
    # Its routing.json and figures would be read as text by the next run on this data.
    check_outside(data, out_dir, "out_dir")
    try:  # made now: a place that cannot be written fails before minutes of routing
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"out_dir {out_dir} cannot be made: {err.strerror or err}") from err
    if cache_dir is None:
        # The training run's token cache when there is one (same key: nothing is redone).
        cache_dir = run_dir / "cache" if run_dir is not None else out_dir / "cache"
    val_fraction = float(train.get("val_fraction", 0.1))
    rule = train.get("split_rule", SPLIT_RULE)
    split = prepare_tokens(data, tok, cache_dir, val_fraction, rule)["val"]
    domains, batches = labelled_batches(split, seq_len, batch_size, batches_per_domain)
    summary = analyze_model(
        model,
        batches,
        domains,
        out_dir,
        dead_threshold,
        title=f"{source.name}, {data} validation",
        progress=progress,
    )
    return {"checkpoint": str(source), "data": data, "out_dir": str(out_dir), **summary}


def format_table(layers: list[dict]) -> str:
    """A per-layer text table of a summary's "layers" (LayerSummary dicts)."""
    head = (
        f"{'MoE':>5}  {'imbalance':>9}  {'cv':>6}  {'load H':>6}  {'router H':>8}  "
        f"{'dropped':>7}  {'special.':>8}  dead experts"
    )
    lines = [head, "-" * len(head)]
    for s in layers:
        dead = ",".join(str(e) for e in s["dead_experts"]) or "-"
        lines.append(
            f"{s['layer']:>5}  {_num(s['imbalance'], 2):>9}  {_num(s['cv'], 3):>6}  "
            f"{_num(s['load_entropy'], 3):>6}  {_num(s['router_entropy'], 3):>8}  "
            f"{_num(s['dropped_fraction'], 3):>7}  {_num(s['specialisation'], 3):>8}  {dead}"
        )
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    """The text `moekit analyze` prints for a summary of analyze_checkpoint."""
    domains = ", ".join(summary["domains"]) or "-"
    lines = [
        f"routing of {summary['checkpoint']} on {summary['data']} validation: "
        f"{summary['num_tokens']} tokens, domains: {domains}",
        format_table(summary["layers"]),
        "MoE = index among the MoE layers (dense layers not counted); imbalance = max/mean "
        "load (1 balanced, E/K collapsed); cv = std/mean; load H, router H = entropy of the "
        "load (/ log E) and of the router (nats)",
        "special. = I(domain; expert) / H(domain): 0 = experts ignore the domain, 1 = they "
        f"reveal it; dead = under {summary['dead_threshold']:g} x fair share (1/E)",
        f"figures and routing.json in {summary['out_dir']}:",
    ]
    lines += [f"  {name}: {path}" for name, path in summary["figures"].items()]
    return "\n".join(lines)


def _num(value: float | None, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _write_figures(
    counts: list[LayerCounts], summaries: list[LayerSummary], out: Path, title: str
) -> dict[str, str]:
    suffix = f" ({title})" if title else ""
    paths = {
        "load": plots.plot_load(summaries, out / "load.png", "Expert load per MoE layer" + suffix),
        "imbalance": plots.plot_imbalance(summaries, out / "imbalance.png", title),
        "co_selection": plots.plot_co_selection(
            counts,
            out / "co_selection.png",
            "Expert co-selection: which experts serve the same token" + suffix,
        ),
    }
    if len(counts[0].domains) > 1:
        E = counts[0].num_experts
        paths["specialisation"] = plots.plot_specialisation(
            counts,
            out / "specialisation.png",
            f"Expert use by domain (uniform = 1/E = {1 / E:.3f})" + suffix,
        )
    for name in FIGURES:
        if name not in paths:
            # An earlier analysis's figure (of two-domain text, say) would be read as this one's.
            (out / f"{name}.png").unlink(missing_ok=True)
    return {name: str(p) for name, p in paths.items()}


def _load(path: Path, device: str) -> tuple[nn.Module, dict, Path]:
    """(model, training settings as a dict, directory read) from a checkpoint or HF dir."""
    config_path = path / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if "model_type" in config:  # a Hugging Face model directory
            return (*_load_hf(path, device), path)
    from moekit.train.checkpoint import (
        load_model,
        read_config,
        read_state,
        resolve,
        resolve_tokenizer,
        split_rule_of,
    )

    ckpt_dir = resolve(path)
    # Config and weights only (each verified against the manifest), no optimizer state.
    model = load_model(ckpt_dir, device)
    train = dict(read_config(ckpt_dir).get("train", {}))
    # The validation split the run held out: split as the run split its text.
    train["split_rule"] = split_rule_of(read_state(ckpt_dir))
    if "tokenizer" in train:
        train["tokenizer"] = resolve_tokenizer(train["tokenizer"], ckpt_dir)
    return model, train, ckpt_dir


def _load_hf(path: Path, device: str) -> tuple[nn.Module, dict]:
    import moekit

    if not hasattr(moekit, "from_pretrained"):
        raise ValueError(f"{path} is a Hugging Face model directory; this moekit cannot read it")
    tokenizer = path / "tokenizer.json"
    model = moekit.from_pretrained(path, device=device)
    return model, {"tokenizer": str(tokenizer)} if tokenizer.is_file() else {}


def _window(seq_len: int | None, train: dict, max_seq_len: int) -> int:
    """The window length: seq_len, checked against the model's context, else the training one.

    Only the default is cut to the context (a Hugging Face model has no training length);
    a longer seq_len asked for is refused, not silently shortened.
    """
    if seq_len is None:
        return min(int(train.get("seq_len", 128)), max_seq_len)
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    if seq_len > max_seq_len:
        raise ValueError(
            f"seq_len {seq_len} is longer than the model's context (max_seq_len {max_seq_len})"
        )
    return seq_len
