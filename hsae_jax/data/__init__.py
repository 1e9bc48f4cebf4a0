"""Activation sources for training and evaluation.

Every source is deterministic in (seed, step): ``batch(step)`` always returns the same
rows, so a resumed run sees exactly the batches an uninterrupted one would.
The sharded activation cache (``cache.py``, docs/activation-cache.md) is the on-disk
format ``hsae harvest`` writes: :class:`CacheWriter` and :class:`ActivationCache`.
"""

from hsae_jax.data.cache import ActivationCache, CacheWriter, read_manifest
from hsae_jax.data.files import ActivationFile
from hsae_jax.data.synthetic import SyntheticActivations, SyntheticConfig

__all__ = ["ActivationCache", "ActivationFile", "CacheWriter", "SyntheticActivations",
           "SyntheticConfig", "read_manifest"]
