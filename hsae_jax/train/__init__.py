"""Training HierarchicalTopK SAEs: settings, the jitted step, the loop, checkpoints."""

from hsae_jax.train.config import TrainConfig
from hsae_jax.train.loop import train

__all__ = ["TrainConfig", "train"]
