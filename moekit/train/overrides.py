"""Config dataclasses on the command line: `--set moe.top_k=4` overrides and per-field flags.

Help text comes from the attribute docstrings of the dataclass fields (read from the
source with `ast`, so the docstring is written once and serves both readers).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import typing

from moekit.config import MoEConfig
from moekit.train.config import TrainConfig
from moekit.validate import did_you_mean


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its attribute docstring} of a dataclass."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def parse_value(cls: type, name: str, text: str) -> object:
    """Convert `text` to the type of field `name` of `cls` (int, float, bool, str, None, tuple)."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else ()
    options = args or (hint,)
    if type(None) in options and text.strip().lower() == "none":
        return None
    for kind in options:
        if kind is type(None):
            continue
        try:
            return _convert(kind, text)
        except ValueError:
            continue
    names = " | ".join(getattr(k, "__name__", str(k)) for k in options)
    raise ValueError(f"{cls.__name__}.{name} takes {names}, got {text!r}")


_UnionType = type(int | None)


def _convert(kind: object, text: str) -> object:
    if kind is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(text)
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    if kind is str:
        return text
    if typing.get_origin(kind) is tuple:
        return tuple(int(v) for v in text.split(",") if v.strip())
    raise ValueError(text)


def _keys(model_cls: type) -> list[str]:
    top = [f.name for f in dataclasses.fields(model_cls)]
    return top + [f"moe.{f.name}" for f in dataclasses.fields(MoEConfig)]


def _unknown_key(key: str, model_cls: type) -> ValueError:
    if key in {f.name for f in dataclasses.fields(TrainConfig)}:
        # `--set batch_size=4` is a natural slip: --set is for the model only.
        flag = "--" + key.replace("_", "-")
        return ValueError(
            f"{key!r} is a training setting, not a model field: use {flag} {key.upper()}"
        )
    keys = _keys(model_cls)
    return ValueError(f"unknown override key {key!r}{did_you_mean(key, keys)}; valid keys: {keys}")


def apply_overrides(config, overrides: list[str]):
    """`config` (a ModelConfig) with `KEY=VALUE` overrides applied; `moe.KEY` for the MoE.

    Changing d_model also changes moe.d_model unless that is set too. `moe=None` makes
    the model dense (then set dense_d_ff). Unknown keys raise ValueError listing valid ones.
    """
    cls = type(config)
    top, moe = {}, {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        if key.startswith("moe."):
            name = key[len("moe.") :]
            if name not in {f.name for f in dataclasses.fields(MoEConfig)}:
                raise _unknown_key(key, cls)
            moe[name] = parse_value(MoEConfig, name, text)
        elif key in {f.name for f in dataclasses.fields(cls)}:
            if key == "moe":
                if text.strip().lower() != "none":
                    raise ValueError("moe can only be set to None (set moe.* fields instead)")
                top[key] = None
            else:
                top[key] = parse_value(cls, key, text)
        else:
            raise _unknown_key(key, cls)
    base_moe = top.get("moe", config.moe)
    if moe:
        if base_moe is None:
            raise ValueError("moe.* overrides need an MoE model, but moe is None")
        if "d_model" in top and "d_model" not in moe:
            moe["d_model"] = top["d_model"]
        top["moe"] = base_moe.replace(**moe)
    elif "d_model" in top and base_moe is not None:
        top["moe"] = base_moe.replace(d_model=top["d_model"])
    return config.replace(**top) if top else config


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()
) -> None:
    """One `--field-name` flag per dataclass field, help from its docstring, default unset."""
    docs = field_docs(cls)
    group = parser.add_argument_group(f"{cls.__name__} (defaults shown)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        group.add_argument(
            flag,
            dest=f"cfg_{f.name}",
            metavar=f.name.upper(),
            default=None,
            help=f"{docs.get(f.name, '')} (default: {f.default!r})",
        )


def config_from_flags(cls: type, args: argparse.Namespace, base=None):
    """An instance of `cls` from `add_config_flags` flags given on the command line."""
    changes = {}
    for f in dataclasses.fields(cls):
        text = getattr(args, f"cfg_{f.name}", None)
        if text is not None:
            changes[f.name] = parse_value(cls, f.name, text)
    if base is None:
        return cls(**changes)
    return base.replace(**changes) if changes else base
