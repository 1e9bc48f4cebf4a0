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


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_coef_sums_also_sums_each_latents_coefficients(backend, rng_seed):
    """The encoder's db_enc: every latent's sum of coefs (0 for a latent with no pairs),
    written once per latent whatever the number of D tiles."""
    rng = np.random.default_rng(rng_seed)
    f, d, n_rows, pairs_per_row = 13, 40, 10, 3
    latents = rng.integers(-2, f + 2, size=n_rows * pairs_per_row)
    latents[:12] = 5  # a hot latent, longer than a block of pairs
    coefs = rng.standard_normal(latents.size).astype(np.float32)
    rows = rng.standard_normal((n_rows, d)).astype(np.float32)
    out, coef_sums = segment_row_sums(
        jnp.asarray(latents, jnp.int32), jnp.asarray(coefs), jnp.asarray(rows), f,
        pairs_per_row=pairs_per_row, backend=backend,
        config=SegmentSumConfig(block_pairs=4, block_d=16), with_coef_sums=True)
    expected = np.zeros(f)
    for latent, coef in zip(latents, coefs, strict=True):
        if 0 <= latent < f:
            expected[latent] += coef
    assert coef_sums.shape == (f,) and coef_sums.dtype == jnp.float32
    np.testing.assert_allclose(coef_sums, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, oracle(latents, coefs, rows, f, pairs_per_row, None),
                               rtol=1e-5, atol=1e-5)


def test_coef_sums_take_no_base():
    with pytest.raises(ValueError, match="with_coef_sums=True takes no base"):
        segment_row_sums(jnp.zeros(2, jnp.int32), jnp.ones(2), jnp.ones((2, 4)), 3,
                         pairs_per_row=1, backend="interpret", base=jnp.zeros((3, 4)),
                         with_coef_sums=True)
