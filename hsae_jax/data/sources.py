"""Choosing a training source, and the batches an evaluation uses."""

from __future__ import annotations

import jax

from hsae_jax.data.files import ActivationFile
from hsae_jax.data.synthetic import SyntheticActivations, SyntheticConfig

EVAL_STEP_OFFSET = 2**30  # synthetic evaluation batches come from steps no run reaches


def open_source(data: str | None, batch_size: int, *, seed: int = 0,
                data_key: str | None = None, synthetic: SyntheticConfig | None = None):
    """The activation source for ``data`` (a file path), or the synthetic generator.

    Returns an object with ``batch(step) -> [batch_size, D]``, ``d_model`` and
    ``describe()``.
    """
    if data:
        return ActivationFile(data, batch_size, seed=seed, tensor=data_key)
    return SyntheticActivations(synthetic or SyntheticConfig(seed=seed), batch_size)


def eval_batches(source, count: int) -> list[jax.Array]:
    """``count`` batches for evaluation: synthetic ones no training step draws; for files,
    the first batches of the data order."""
    if isinstance(source, SyntheticActivations):
        return [source.batch(EVAL_STEP_OFFSET + i) for i in range(count)]
    return [source.batch(i) for i in range(count)]
