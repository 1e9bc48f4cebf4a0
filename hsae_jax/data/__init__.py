"""Activation sources for training and evaluation.

Every source is deterministic in (seed, step): ``batch(step)`` always returns the same
rows, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from hsae_jax.data.files import ActivationFile
from hsae_jax.data.sources import eval_batches, open_source
from hsae_jax.data.synthetic import SyntheticActivations, SyntheticConfig

__all__ = ["ActivationFile", "SyntheticActivations", "SyntheticConfig", "eval_batches",
           "open_source"]
