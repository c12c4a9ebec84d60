"""`moekit sample`: generate text from a trained checkpoint (KV cache, temperature/top-k/top-p).

moekit sample runs/tiny --prompt "def " --max-new-tokens 200 --temperature 0.8 --top-k 40
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text from a checkpoint")
    p.add_argument(
        "checkpoint",
        help="a checkpoint directory, a run directory (newest one), or a Hugging Face "
        "checkpoint directory (config.json, safetensors, tokenizer.json)",
    )
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--num-samples", type=int, default=1, help="independent continuations")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    p.add_argument(
        "--device", default="cpu", help="cpu, cuda, cuda:N or auto (cuda when available)"
    )


def sample_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = 0,
    eos_ids: list[int] | None = None,
    add_special_tokens: bool = False,
) -> list[str]:
    """`num_samples` continuations of `prompt` (the generated text only, prompt excluded).

    eos_ids end a continuation; add_special_tokens frames the prompt with the tokens the
    tokenizer's post-processor adds (a Hugging Face model's BOS). A moekit run's text was
    tokenized without them, so its prompts are too; a run that holds a conversion's
    weights unchanged is sampled as its source was. A sample ends at its first EOS.
    """
    import torch

    from moekit.generate import generate

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples!r}")
    ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    if not ids:
        raise ValueError("the prompt must contain at least one token")
    device = next(model.parameters()).device
    prompt_ids = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    out = generate(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, eos_ids)
    return [
        continuation(tokenizer, ids, _until_eos(row[len(ids) :].tolist(), eos_ids))
        for row in out.cpu()
    ]


def _until_eos(new_ids: list[int], eos_ids: list[int] | None) -> list[int]:
    """new_ids up to and including the first end-of-sequence id. generate() repeats that
    id in a row that ended while others go on; decoded, an EOS that is not a special
    token would show as a run of it, longer the more samples were asked for."""
    if eos_ids:
        for i, token in enumerate(new_ids):
            if token in eos_ids:
                return new_ids[: i + 1]
    return new_ids


def continuation(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text `new_ids` add after the prompt.

    Decoded with the prompt, then the prompt's text cut off: decoded alone, a
    SentencePiece-style decoder (Metaspace, "▁the") drops the first piece's leading space.
    """
    head = tokenizer.decode(prompt_ids)
    full = tokenizer.decode(prompt_ids + new_ids)
    return full[len(head) :] if full.startswith(head) else tokenizer.decode(new_ids)


def run(args: argparse.Namespace) -> int:
    from moekit.data.tokenizer import load_tokenizer
    from moekit.devices import resolve_device
    from moekit.hf.convert import is_hf_dir
    from moekit.hf.io import GENERATION_CONFIG_FILE, eos_token_ids
    from moekit.train.checkpoint import (
        load_model,
        read_config,
        read_state,
        resolve,
        resolve_tokenizer,
        run_dir_of,
    )

    _check_flags(args)
    _check_utf8(args.prompt)
    device = resolve_device(args.device)
    eos_ids, special = None, False
    if is_hf_dir(args.checkpoint):
        # A Hugging Face checkpoint directory: its own tokenizer.json, via `tokenizers`,
        # its prompt framing (BOS) and its end-of-sequence ids, as transformers samples it.
        from pathlib import Path

        from moekit.hf import from_pretrained

        tokenizer = load_tokenizer(str(Path(args.checkpoint) / "tokenizer.json"))
        model = from_pretrained(args.checkpoint, device=device)
        eos_ids, special = eos_token_ids(args.checkpoint), True
    else:
        ckpt_dir = resolve(args.checkpoint)
        recorded = read_config(ckpt_dir)["train"]["tokenizer"]
        tokenizer = load_tokenizer(resolve_tokenizer(recorded, ckpt_dir))
        model = load_model(ckpt_dir, device=device)
        # A run imported from a Hugging Face checkpoint keeps its end-of-sequence ids in
        # the run's generation_config.json (moekit.hf.convert), and its weights, until
        # trained further, take prompts framed as their source's were.
        run_dir = run_dir_of(ckpt_dir)
        if run_dir is not None and (run_dir / GENERATION_CONFIG_FILE).is_file():
            eos_ids = eos_token_ids(run_dir) or None
        special = "converted_from" in read_state(ckpt_dir)
    texts = sample_text(
        model,
        tokenizer,
        args.prompt,
        args.max_new_tokens,
        args.num_samples,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        eos_ids,
        special,
    )
    for i, text in enumerate(texts):
        if args.num_samples > 1:
            print(f"--- sample {i} ---")
        print(args.prompt + text)
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    """The sampling flags, named as typed, before a checkpoint is read: generate() checks
    them again under its own parameter names, which a command-line user never typed."""
    from moekit.validate import check_int, check_non_negative, check_range, check_seed

    check_int("--max-new-tokens", args.max_new_tokens)
    check_int("--num-samples", args.num_samples)
    check_non_negative("--temperature", args.temperature)
    if args.top_k is not None:
        check_int("--top-k", args.top_k)
    if args.top_p is not None:
        check_range("--top-p", args.top_p, 0.0, 1.0, low_open=True)
    check_seed("--seed", args.seed)


def _check_utf8(prompt: str) -> None:
    # Python decodes argv with surrogateescape: bytes that are not UTF-8 arrive as lone
    # surrogates, which no tokenizer can encode.
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        byte = ord(prompt[err.start]) - 0xDC00
        shown = f"byte 0x{byte:02x}" if 0x80 <= byte <= 0xFF else repr(prompt[err.start])
        raise ValueError(
            f"--prompt is not valid UTF-8 ({shown} at position {err.start}); give it as UTF-8"
        ) from None
