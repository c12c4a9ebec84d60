"""moekit: a Mixture-of-Experts toolkit for PyTorch."""

from moekit.config import MoEConfig
from moekit.layer import MoE, MoEOutput
from moekit.model import ModelConfig, Transformer

__all__ = ["MoE", "MoEConfig", "MoEOutput", "ModelConfig", "Transformer"]
__version__ = "0.1.0"
