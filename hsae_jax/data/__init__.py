"""Activation sources for training and evaluation.

Every source is deterministic in (seed, step): ``batch(step)`` always returns the same
rows, so a resumed run sees exactly the batches an uninterrupted one would.

- ``synthetic.py``: a generator with a known dictionary (the default data);
- ``cache.py``: the sharded activation cache ``hsae harvest`` writes
  (docs/activation-cache.md): :class:`CacheWriter`, :class:`ActivationCache`;
- ``layout.py``, ``rows.py``: files, globs and caches read by row id from memory maps;
- ``sampler.py``: which rows each step reads, and the held-out split;
- ``sources.py``: :class:`RowSource` (training and evaluation batches from rows);
- ``loader.py``: :class:`Prefetcher`, batches on the device ahead of the step.
"""

from hsae_jax.data.cache import ActivationCache, CacheWriter, read_manifest
from hsae_jax.data.loader import Prefetcher
from hsae_jax.data.rows import MappedRows, open_rows
from hsae_jax.data.sampler import RowSampler
from hsae_jax.data.sources import NonFiniteRowsError, RowSource, eval_batches, open_source
from hsae_jax.data.synthetic import SyntheticActivations, SyntheticConfig

__all__ = ["ActivationCache", "CacheWriter", "MappedRows", "NonFiniteRowsError", "Prefetcher",
           "RowSampler", "RowSource", "SyntheticActivations", "SyntheticConfig",
           "eval_batches", "open_rows", "open_source", "read_manifest"]
