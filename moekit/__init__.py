"""moekit: a Mixture-of-Experts toolkit for PyTorch."""

from moekit.config import MoEConfig
from moekit.errors import CheckpointError
from moekit.layer import MoE, MoEOutput
from moekit.model import ModelConfig, Transformer

__all__ = [
    "CheckpointError",
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "ModelConfig",
    "Transformer",
    "from_pretrained",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: the Hugging Face loader is imported on first use, keeping `import moekit` cheap.
    if name == "from_pretrained":
        from moekit.hf import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")
