"""A config.json that leaves keys out loads as transformers reads it: the family's defaults.

Each family's config class in transformers has its own defaults (rms_norm_eps 1e-5 in
Mixtral, DeepSeek-V3's routed_scaling_factor 2.5, ...). Built from the installed
transformers' classes; nothing is downloaded.
"""

from __future__ import annotations

import json
import re

import pytest

tf = pytest.importorskip("transformers")

from moekit.hf.families import FAMILIES, UnsupportedConfig  # noqa: E402

CLASSES = {
    "mixtral": "MixtralConfig",
    "qwen2_moe": "Qwen2MoeConfig",
    "qwen3_moe": "Qwen3MoeConfig",
    "olmoe": "OlmoeConfig",
    "deepseek_v3": "DeepseekV3Config",
}


def _class_defaults(family: str) -> dict:
    return json.loads(getattr(tf, CLASSES[family])().to_json_string())


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_defaults_are_transformers_defaults(family):
    full = _class_defaults(family)
    defaults = FAMILIES[family].defaults
    assert defaults, f"{family} declares no defaults"
    assert {k: full[k] for k in defaults} == dict(defaults)


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_config_with_only_required_keys_loads_as_transformers_defaults(family):
    # Start from model_type alone and add each key moekit asks for by name: what is left
    # out must read as the transformers class would fill it in.
    full = _class_defaults(family)
    to_model_config = FAMILIES[family].to_model_config
    trimmed = {"model_type": family}
    for _ in range(len(full)):
        try:
            got = to_model_config(trimmed)
            break
        except UnsupportedConfig as err:
            key = re.search(r"required field '(\w+)'", str(err)).group(1)
            trimmed[key] = full[key] if key in full else full["num_local_experts"]
    assert len(trimmed) < len(full) / 2  # most keys really were left out
    assert got == to_model_config(full)


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_a_null_field_loads_or_is_named(family):
    # Each key of a full config set to null in turn: it loads (the family allows null
    # there) or the error names the key, never a bare int(None) TypeError.
    full = _class_defaults(family)
    to_model_config = FAMILIES[family].to_model_config
    for key in sorted(full):
        if key == "model_type" or full[key] is None:
            continue
        try:
            to_model_config({**full, key: None})
        except (UnsupportedConfig, ValueError) as err:
            assert key in str(err), (key, str(err))
