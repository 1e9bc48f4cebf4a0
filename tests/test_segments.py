"""segment_row_sums: per-latent sums of coefficient-weighted rows, in pair order."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import requires_gpu, requires_interpreter

from hsae_jax.segments import SegmentSumConfig, segment_row_sums

BACKENDS = [
    pytest.param("interpret", marks=requires_interpreter, id="interpret"),
    pytest.param("triton", marks=requires_gpu, id="triton"),
]


def oracle(latents, coefs, rows, f, pairs_per_row, base):
    out = np.zeros((f, rows.shape[1])) if base is None else np.asarray(base, np.float64).copy()
    for p, latent in enumerate(latents):
        if 0 <= latent < f:
            out[latent] += coefs[p] * rows[p // pairs_per_row]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pairs_per_row", [1, 3])
@pytest.mark.parametrize("with_base", [False, True])
def test_sums_every_latents_pairs_onto_its_row(backend, pairs_per_row, with_base, rng_seed):
    """Hot latents (runs longer than a block of pairs), latents with no pairs, indices
    outside [0, F), several D tiles and a partial one."""
    rng = np.random.default_rng(rng_seed)
    f, d, n_rows = 11, 40, 9
    p = n_rows * pairs_per_row
    latents = rng.integers(-2, f + 2, size=p)
    latents[: p // 2] = 3  # a hot latent
    coefs = rng.standard_normal(p).astype(np.float32)
    rows = rng.standard_normal((n_rows, d)).astype(np.float32)
    base = rng.standard_normal((f, d)).astype(np.float32) if with_base else None
    out = segment_row_sums(jnp.asarray(latents, jnp.int32), jnp.asarray(coefs), jnp.asarray(rows),
                           f, pairs_per_row=pairs_per_row, backend=backend,
                           config=SegmentSumConfig(block_pairs=2, block_d=16),
                           base=None if base is None else jnp.asarray(base))
    np.testing.assert_allclose(out, oracle(latents, coefs, rows, f, pairs_per_row, base),
                               rtol=1e-5, atol=1e-5)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="SegmentSumConfig.block_d=48 must be a power of two"):
        SegmentSumConfig(block_d=48)
