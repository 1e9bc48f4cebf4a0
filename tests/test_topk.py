"""top_k: exact values and indices, ties to the lower index, gradient into the selected slots."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import KERNEL_BACKEND, requires_gpu, requires_interpreter

from hsae_jax.topk import TopKConfig, top_k

BACKENDS = [
    pytest.param("xla", None, id="xla"),
    pytest.param("interpret", None, marks=requires_interpreter, id="interpret"),
    pytest.param("interpret", TopKConfig(chunk=32, group=64), marks=requires_interpreter,
                 id="interpret-multilevel"),
    pytest.param("triton", None, marks=requires_gpu, id="triton"),
    pytest.param("triton", TopKConfig(chunk=1024, group=2048), marks=requires_gpu,
                 id="triton-multilevel"),
]


def numpy_top_k(x, k):
    """Oracle: stable sort on (-value, index); NaN first."""
    x = np.asarray(x, np.float32)
    key = np.where(np.isnan(x), -np.inf, -x)
    order = np.argsort(key, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(x, order, axis=-1), order


@pytest.mark.parametrize("backend, config", BACKENDS)
@pytest.mark.parametrize("shape, k", [((4, 100), 7), ((3, 513), 64), ((2, 5), 5), ((6, 33), 1),
                                      ((2, 3, 40), 8), ((1, 1000), 100)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_values_and_indices_are_exact(backend, config, shape, k, dtype, rng_seed):
    x = jnp.asarray(np.random.default_rng(rng_seed).normal(size=shape), dtype)
    values, indices = jax.jit(lambda x: top_k(x, k, backend=backend, config=config))(x)
    chex.assert_shape([values, indices], (*shape[:-1], k))
    chex.assert_type([values, indices], [x.dtype, jnp.int32])
    expected_values, expected_indices = numpy_top_k(np.asarray(x, np.float32), k)
    np.testing.assert_array_equal(np.asarray(indices), expected_indices)
    np.testing.assert_array_equal(np.asarray(values, np.float32), expected_values)


@pytest.mark.parametrize("backend, config", BACKENDS)
def test_ties_go_to_the_lower_index_and_specials_are_ordered(backend, config):
    x = np.array([[1.0, 3.0, 3.0, -0.0, 0.0, 3.0, -np.inf, np.inf, -2.0, 2.0]] * 2, np.float32)
    x[1, 2] = np.nan
    values, indices = top_k(jnp.asarray(x), 6, backend=backend, config=config)
    np.testing.assert_array_equal(np.asarray(indices[0]), [7, 1, 2, 5, 9, 0])
    np.testing.assert_array_equal(np.asarray(indices[1]), [2, 7, 1, 5, 9, 0])
    assert np.isnan(values[1, 0]) and values[1, 1] == np.inf


@pytest.mark.parametrize("backend, config", BACKENDS)
def test_all_equal_rows_select_the_first_k_columns(backend, config):
    values, indices = top_k(jnp.full((3, 70), -1.5), 9, backend=backend, config=config)
    np.testing.assert_array_equal(np.asarray(indices), np.tile(np.arange(9), (3, 1)))
    assert np.all(np.asarray(values) == -1.5)


@pytest.mark.parametrize("backend, config", BACKENDS)
def test_gradient_scatters_into_the_selected_positions(backend, config, rng_seed):
    rng = np.random.default_rng(rng_seed)
    x = jnp.asarray(rng.normal(size=(5, 50)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(top_k(x, 6, backend=backend, config=config)[0] * w))(x)
    _, idx = numpy_top_k(x, 6)
    expected = np.zeros((5, 50), np.float32)
    np.put_along_axis(expected, idx, np.asarray(w), axis=1)
    np.testing.assert_array_equal(np.asarray(grad), expected)


@pytest.mark.parametrize("x, k, error, message", [
    (jnp.ones((3, 4)), 5, ValueError, r"k=5 must be in \[1, F=4\]"),
    (jnp.ones((3, 4)), 0, ValueError, r"k=0 must be in"),
    (jnp.ones((3, 4)), 2.0, TypeError, "k must be a Python int"),
    (jnp.ones((3, 4), jnp.int32), 2, TypeError, "x has dtype int32"),
    (jnp.float32(1.0), 1, ValueError, r"x must have shape \[..., F\]"),
])
def test_bad_arguments_are_rejected(x, k, error, message):
    with pytest.raises(error, match=message):
        top_k(x, k, backend=KERNEL_BACKEND)


def test_bad_config_is_rejected_before_launch():
    with pytest.raises(ValueError, match="chunk=48 must be a power of two"):
        top_k(jnp.ones((2, 100)), 4, backend=KERNEL_BACKEND, config=TopKConfig(chunk=48))
