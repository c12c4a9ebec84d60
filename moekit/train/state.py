"""Optimizer and RNG state as named tensors plus JSON scalars, for safetensors checkpoints.

AdamW moments are stored under the *parameter name* (`optim.<name>.exp_avg`), not the
optimizer's positional index, so a checkpoint stays readable when parameters are reordered
and a mismatch names the parameter.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.train.checkpoint import CheckpointError

_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def capture(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """(tensors, scalars) that restore `optimizer` and the RNGs exactly."""
    sd = optimizer.state_dict()
    names = _param_names(model, optimizer)
    tensors: dict[str, Tensor] = {}
    for index, per_param in sd["state"].items():
        for key, value in per_param.items():
            tensors[f"optim.{names[index]}.{key}"] = torch.as_tensor(value)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    groups = [{k: g[k] for k in _GROUP_KEYS if k in g} for g in sd["param_groups"]]
    return tensors, {"optimizer": {"param_names": names, "param_groups": groups}}


def restore(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], state: dict
) -> None:
    """Load what `capture` saved into a freshly built optimizer of the same model."""
    names = _param_names(model, optimizer)
    saved = state["optimizer"]["param_names"]
    if saved != names:
        missing = sorted(set(saved) ^ set(names))
        raise CheckpointError(
            f"optimizer state does not fit the model: parameters differ ({missing[:5]})"
            if missing
            else "optimizer state does not fit the model: parameter order differs"
        )
    sd = optimizer.state_dict()
    by_name = dict(zip(names, range(len(names)), strict=True))
    new_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        name, field = key[len("optim.") :].rsplit(".", 1)
        if name not in by_name:
            raise CheckpointError(f"optimizer state for unknown parameter {name!r}")
        new_state.setdefault(by_name[name], {})[field] = value
    sd["state"] = new_state
    for group, saved_group in zip(
        sd["param_groups"], state["optimizer"]["param_groups"], strict=True
    ):
        group.update({k: tuple(v) if k == "betas" else v for k, v in saved_group.items()})
    optimizer.load_state_dict(sd)
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = cuda_rng_states(tensors)
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)


def cuda_rng_states(tensors: dict[str, Tensor]) -> list[Tensor]:
    """The saved CUDA RNG states in device order: by index, so rng.cuda.10 follows .9."""
    found = {int(k.rsplit(".", 1)[1]): t for k, t in tensors.items() if k.startswith("rng.cuda.")}
    return [found[i] for i in sorted(found)]
