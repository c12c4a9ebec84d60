"""`moekit convert SRC DST [--verify]`: Hugging Face checkpoint <-> moekit checkpoint.

The direction follows SRC: a Hugging Face directory (config.json with a model_type)
becomes a moekit run directory DST; a moekit checkpoint or run directory becomes a
Hugging Face directory DST.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a Hugging Face MoE checkpoint to a moekit checkpoint, or back",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="Hugging Face directory, or moekit checkpoint/run directory")
    p.add_argument("dst", help="output directory")
    p.add_argument("--verify", action="store_true", help="compare logits of source and result")
    p.add_argument("--atol", type=float, default=None, help="largest logit difference accepted")
    p.add_argument(
        "--family",
        default=None,
        help="export: Hugging Face model_type (mixtral, qwen2_moe, qwen3_moe, olmoe, "
        "deepseek_v3); default: inferred from the config",
    )
    p.add_argument("--dtype", default=None, help="import: float64, float32, bfloat16 or float16")
    p.add_argument("--shard-mb", type=int, default=None, help="export: shard size limit in MB")


def run(args: argparse.Namespace) -> int:
    from moekit.hf.convert import convert
    from moekit.hf.verify import VerificationError
    from moekit.validate import check_int

    if args.shard_mb is not None:
        # At 0 or less every tensor would go to a shard of its own.
        check_int("--shard-mb", args.shard_mb)
    shard = None if args.shard_mb is None else args.shard_mb * 2**20
    try:
        result = convert(
            args.src,
            args.dst,
            family=args.family,
            dtype=args.dtype,
            verify=args.verify,
            atol=args.atol,
            max_shard_bytes=shard,
        )
    except VerificationError as err:
        print(f"moekit convert: VERIFICATION FAILED: {err}")
        return 1
    print(f"{result.direction}: wrote {result.path}")
    if result.max_abs_diff is not None:
        print(
            f"verified against {result.reference}: max |logit difference| {result.max_abs_diff:.3g}"
        )
    return 0
