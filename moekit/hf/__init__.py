"""Hugging Face MoE checkpoints: load (`from_pretrained`), export (`save_pretrained`), verify.

transformers is never imported here: checkpoints are read with safetensors and JSON only.
"""

from moekit.hf.families import FAMILIES, UnsupportedConfig
from moekit.hf.io import CheckpointError
from moekit.hf.load import from_pretrained, read_model_config

__all__ = [
    "FAMILIES",
    "CheckpointError",
    "UnsupportedConfig",
    "from_pretrained",
    "read_model_config",
]
