"""moekit: a Mixture-of-Experts toolkit for PyTorch."""

from moekit.config import MoEConfig
from moekit.layer import MoE, MoEOutput

__all__ = ["MoE", "MoEConfig", "MoEOutput"]
__version__ = "0.1.0"
