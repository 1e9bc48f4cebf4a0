"""top_k: exact values and indices, ties to the lower index, gradient into the selected slots."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import KERNEL_BACKEND, requires_gpu, requires_interpreter

from hsae_jax.topk import TopKConfig, top_k, top_k_mask, top_k_relu

# the threshold method with the loosest bound and the smallest buffer (both are raised to
# next_pow2(k)): rows often overflow the buffer and take the bisection
NARROW = TopKConfig(method="threshold", groups=1, candidates=1, block=64)
KERNEL_CONFIGS = [
    pytest.param(None, id="auto"),
    pytest.param(NARROW, id="threshold-bisect"),
    pytest.param(TopKConfig(method="bitonic"), id="bitonic"),
    pytest.param(TopKConfig(method="bitonic", chunk=32, group=64), id="bitonic-multilevel"),
]
BACKENDS = [pytest.param("xla", None, id="xla")] + [
    pytest.param(backend, p.values[0], marks=mark, id=f"{backend}-{p.id}")
    for backend, mark in (("interpret", requires_interpreter), ("triton", requires_gpu))
    for p in KERNEL_CONFIGS
]


def numpy_top_k(x, k):
    """Oracle: NaN first, then descending values, equal values by lower index (stable)."""
    x = np.asarray(x, np.float32)
    x2 = x.reshape(-1, x.shape[-1])
    finite_nan = np.nan_to_num(x2, nan=0.0, posinf=np.inf, neginf=-np.inf)
    order = np.stack([np.lexsort((-v, ~np.isnan(r))) for v, r in zip(finite_nan, x2, strict=True)])
    order = order.reshape(x.shape)[..., :k]
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


@pytest.mark.parametrize("backend, config", BACKENDS)
@pytest.mark.parametrize("pattern", ["periodic", "few-values", "specials"])
def test_rows_that_defeat_the_group_bound_are_still_exact(backend, config, pattern, rng_seed):
    """Rows built so that far more than `candidates` entries pass the first bound."""
    rng = np.random.default_rng(rng_seed)
    f, k = 600, 20
    if pattern == "periodic":  # every strided group holds the same values
        x = np.tile(np.arange(f) % 128, (3, 1)).astype(np.float32)
    elif pattern == "few-values":  # heavy ties at the k-th value
        x = rng.integers(0, 3, size=(3, f)).astype(np.float32)
    else:
        x = rng.choice(np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 1.0], np.float32),
                       size=(3, f))
    values, indices = top_k(jnp.asarray(x, jnp.bfloat16), k, backend=backend, config=config)
    expected_values, expected_indices = numpy_top_k(np.asarray(jnp.asarray(x, jnp.bfloat16),
                                                               np.float32), k)
    if pattern == "specials":  # the oracle does not order -0.0 below +0.0; compare values
        np.testing.assert_array_equal(np.asarray(values, np.float32), expected_values)
        return
    np.testing.assert_array_equal(np.asarray(indices), expected_indices)
    np.testing.assert_array_equal(np.asarray(values, np.float32), expected_values)


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


@pytest.mark.parametrize("settings, message", [
    (dict(chunk=48), "TopKConfig.chunk=48 must be a power of two"),
    (dict(method="radix"), "TopKConfig.method='radix' must be one of"),
    (dict(groups=0), "TopKConfig.groups=0 must be a power of two"),
    (dict(num_warps=0), "TopKConfig.num_warps=0 must be an int >= 1"),
    (dict(resident=-1), r"TopKConfig.resident=-1 must be in \[0, 32768\]"),
    (dict(resident=65536), r"TopKConfig.resident=65536 must be in \[0, 32768\]"),
])
def test_bad_config_is_rejected_when_made(settings, message):
    with pytest.raises(ValueError, match=message):
        TopKConfig(**settings)


@pytest.mark.parametrize("config, message", [
    (TopKConfig(candidates=65536), "candidates=65536 must be <= 32768"),
    (TopKConfig(method="threshold", block=65536), "block=65536"),
])
def test_config_beyond_the_kernels_limits_is_rejected_before_launch(config, message):
    with pytest.raises(ValueError, match=message):
        top_k(jnp.ones((2, 100)), 4, backend=KERNEL_BACKEND, config=config)


@pytest.mark.parametrize("f, resident, warps", [
    (300, 16384, 4), (8192, 16384, 8), (16384, 16384, 16), (16385, 16384, 4), (8192, 0, 4)])
def test_the_resident_select_holds_32_columns_a_thread(f, resident, warps):
    launch = TopKConfig(resident=resident).resolve(f, 64).select_launch(f)
    assert launch["RESIDENT"] == (f <= resident)
    assert launch["num_warps"] == warps and launch["F_POW2"] >= f


def test_a_kernel_config_does_not_configure_xla():
    with pytest.raises(TypeError, match="does not configure backend='xla'"):
        top_k(jnp.ones((2, 100)), 4, backend="xla", config=TopKConfig())
    values, _ = top_k(jnp.arange(8.0)[None], 2, backend="auto", config=TopKConfig())
    np.testing.assert_array_equal(values, [[7.0, 6.0]])


@pytest.mark.parametrize("k, method", [(1, "threshold"), (256, "threshold"), (512, "threshold"),
                                       (513, "bitonic"), (4096, "bitonic")])
def test_auto_uses_the_threshold_method_while_its_buffer_is_small(k, method):
    resolved = TopKConfig().resolve(65536, k)
    assert resolved.method == method
    assert resolved.num_warps == (4 if method == "threshold" else 8)
    if method == "threshold":
        assert resolved.candidates == resolved.groups == 4 * max(2, 1 << (k - 1).bit_length())


@pytest.mark.parametrize("backend, config", BACKENDS)
def test_nan_sign_orders_like_lax_top_k(backend, config):
    x = np.array([[1.0, -np.inf, 2.0, 0.5, np.inf, -0.0, 0.0]], np.float32)
    x[0, 3] = np.array([0xFFC00000], np.uint32).view(np.float32)[0]  # NaN, sign bit set
    x = np.concatenate([x, np.where(np.arange(7) == 3, np.float32(np.nan), x)])  # positive NaN
    _, indices = top_k(jnp.asarray(x), 7, backend=backend, config=config)
    np.testing.assert_array_equal(np.asarray(indices), [[4, 2, 0, 6, 5, 1, 3],
                                                        [3, 4, 2, 0, 6, 5, 1]])


# the selections without a sort: lax.top_k on xla; on the kernel backends the row held in
# registers (short rows, the default) or the radix select over the row (resident=0)
BACKENDS_FOR_MASK = [pytest.param("xla", None, id="xla")] + [
    pytest.param(backend, select, marks=mark, id=f"{backend}-{select}")
    for backend, mark in (("interpret", requires_interpreter), ("triton", requires_gpu))
    for select in ("resident", "radix")]


def select_config(select, block):
    """TopKConfig of a BACKENDS_FOR_MASK entry (None on xla)."""
    if select is None:
        return None
    return TopKConfig(block=block, resident=16384 if select == "resident" else 0)


@pytest.mark.parametrize("backend, select", BACKENDS_FOR_MASK)
@pytest.mark.parametrize("ties", ["none", "many", "-inf and signed zeros"])
def test_top_k_mask_selects_what_top_k_selects(backend, select, ties, rng_seed):
    rng = np.random.default_rng(rng_seed)
    for _ in range(6):
        b, n = int(rng.integers(1, 5)), int(rng.integers(1, 300))
        k = int(rng.integers(1, n + 1))
        x = rng.normal(size=(b, n)).astype(np.float32)
        if ties == "many":
            x = np.round(x * 2) / 2
        elif ties != "none":
            x[:, rng.integers(0, n, size=n // 3)] = -np.inf
            x[:, : n // 3] = 0.0
            x[:, 0] = -0.0
        _, idx = jax.lax.top_k(jnp.asarray(x), k)
        expected = np.zeros((b, n), bool)
        np.put_along_axis(expected, np.asarray(idx), True, axis=1)
        got = top_k_mask(jnp.asarray(x), k, backend=backend, config=select_config(select, 64))
        np.testing.assert_array_equal(got, expected, err_msg=f"n={n} k={k}")


@pytest.mark.parametrize("backend, select", BACKENDS_FOR_MASK)
def test_top_k_mask_cuts_ties_only_where_the_kth_value_repeats(backend, select):
    """Rows whose k-th value is unique take every entry >= it; a row that must leave some
    equal entries out takes the lowest columns, whatever the other rows hold."""
    unique = jnp.asarray([[0.5, 3.0, -1.0, 2.0, 0.0]], jnp.float32)
    cut = jnp.asarray([[1.0, 3.0, 1.0, 1.0, 0.0]], jnp.float32)  # k=2: one of three 1.0s
    for x, expected in [
            (unique, [[False, True, False, True, False]]),
            (cut, [[True, True, False, False, False]]),
            (jnp.concatenate([unique, cut]), [[False, True, False, True, False],
                                              [True, True, False, False, False]])]:
        got = top_k_mask(x, 2, backend=backend,
                         config=select_config(select, 64))
        np.testing.assert_array_equal(got, np.asarray(expected))


def numpy_top_k_relu(x, k):
    """Oracle of top_k_relu in float64: relu at each row's top k (numpy_top_k's order)."""
    _, order = numpy_top_k(x, k)
    x64 = np.asarray(x, np.float64)
    out = np.zeros_like(x64)
    rows = np.arange(x64.shape[0])[:, None]
    out[rows, order] = np.maximum(x64[rows, order], 0.0)
    return out


@pytest.mark.parametrize("backend, select", BACKENDS_FOR_MASK)
@pytest.mark.parametrize("ties", ["none", "many", "cut in the middle of a tie"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_top_k_relu_keeps_the_top_k_through_a_relu(backend, select, ties, dtype, rng_seed):
    """Every element written: relu(x) at the row's top k, exactly 0 elsewhere, also when
    a run of equal values straddles the k-th place (the lower columns are kept)."""
    rng = np.random.default_rng(rng_seed)
    for _ in range(5):
        b, n = int(rng.integers(1, 5)), int(rng.integers(2, 300))
        k = int(rng.integers(1, n))
        x = rng.normal(size=(b, n)).astype(np.float32)
        if ties == "many":
            x = np.round(x * 2) / 2
        elif ties != "none":  # the k-th and its neighbours equal, spread over the row
            x[:, rng.permutation(n)[: min(n, k + 3)]] = 0.25
        x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))  # what the op sees
        got = top_k_relu(jnp.asarray(x, dtype), k, backend=backend,
                         config=select_config(select, 64))
        assert got.dtype == jnp.dtype(dtype) and got.shape == (b, n)
        np.testing.assert_array_equal(np.asarray(got, np.float64), numpy_top_k_relu(x, k),
                                      err_msg=f"n={n} k={k}")


@pytest.mark.parametrize("backend, select", BACKENDS_FOR_MASK)
def test_top_k_relu_gradient_passes_only_where_the_output_is_positive(backend, select, rng_seed):
    rng = np.random.default_rng(rng_seed)
    x = jnp.asarray(rng.normal(size=(3, 77)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(3, 77)), jnp.float32)
    config = select_config(select, 32)
    grad = jax.grad(lambda x: jnp.sum(weights * top_k_relu(x, 20, backend=backend,
                                                           config=config)))(x)
    kept = numpy_top_k_relu(np.asarray(x), 20) > 0
    np.testing.assert_array_equal(grad, np.where(kept, weights, 0.0))


@pytest.mark.parametrize("backend, select", BACKENDS_FOR_MASK)
def test_top_k_relu_and_top_k_mask_of_no_rows_are_empty(backend, select):
    x = jnp.zeros((0, 8), jnp.float32)
    config = select_config(select, 64)
    assert top_k_relu(x, 3, backend=backend, config=config).shape == (0, 8)
    assert top_k_mask(x, 3, backend=backend, config=config).shape == (0, 8)


def _bits(*words):
    return np.array(words, np.uint32).view(np.float32)


@pytest.mark.parametrize("backend, select", BACKENDS_FOR_MASK[1:])
def test_selections_of_special_rows_equal_lax_top_k(backend, select):
    """NaNs of either sign (the largest payload too), infinities and signed zeros, a row
    with fewer positive entries than k (the ReLU needs no search), exactly k, one whose
    NaN of negative sign is kept because the row has nothing else, all equal: the kernels
    select what lax.top_k does (xla) and write relu there, NaN included."""
    nan_neg, nan_max = _bits(0xFFC00000, 0x7FFFFFFF)
    rows = np.array([
        [1.0, nan_neg, -2.0, np.inf, nan_max, 0.0, -0.0, -np.inf, 3.0, -1.0],
        [-1.0, -2.0, 0.5, -3.0, -0.0, -4.0, -5.0, -6.0, -7.0, -8.0],  # one positive
        [2.0, 1.0, 3.0, -1.0, 4.0, -2.0, -3.0, -4.0, -5.0, -6.0],  # k = 4 positives
        [nan_neg, nan_neg, nan_neg, -1.0, nan_neg, nan_neg, nan_neg, nan_neg, nan_neg, 0.5],
        [-1.5] * 10,
        [-np.inf] * 9 + [nan_neg],
    ], np.float32)
    config = select_config(select, 4)
    for k in (1, 4, 7, 10):
        x = jnp.asarray(rows)
        np.testing.assert_array_equal(top_k_mask(x, k, backend=backend, config=config),
                                      top_k_mask(x, k, backend="xla"), err_msg=f"k={k}")
        np.testing.assert_array_equal(top_k_relu(x, k, backend=backend, config=config),
                                      top_k_relu(x, k, backend="xla"), err_msg=f"k={k}")


@pytest.mark.parametrize("backend, select", BACKENDS_FOR_MASK[1:])
@pytest.mark.parametrize("n, k", [(8192, 1152), (20000, 3000)])
def test_selections_of_long_rows_equal_lax_top_k(backend, select, n, k, rng_seed):
    """AuxK-sized rows (8192 columns: held in registers by 8 warps unless radix) and rows
    past the default resident size (20000 columns: the radix select either way)."""
    rng = np.random.default_rng(rng_seed)
    x = jnp.asarray(rng.normal(size=(3, n)), jnp.float32)
    config = TopKConfig(resident=16384 if select == "resident" else 0)
    np.testing.assert_array_equal(top_k_mask(x, k, backend=backend, config=config),
                                  top_k_mask(x, k, backend="xla"))
    np.testing.assert_array_equal(top_k_relu(x, k, backend=backend, config=config),
                                  top_k_relu(x, k, backend="xla"))


@pytest.mark.parametrize("backend, select", BACKENDS_FOR_MASK)
def test_top_k_relu_has_a_forward_mode_derivative(backend, select, rng_seed):
    rng = np.random.default_rng(rng_seed)
    x, dx = (jnp.asarray(rng.normal(size=(2, 40)), jnp.float32) for _ in range(2))
    config = select_config(select, 16)
    out, tangent = jax.jvp(lambda x: top_k_relu(x, 9, backend=backend, config=config), (x,),
                           (dx,))
    np.testing.assert_array_equal(tangent, np.where(np.asarray(out) > 0, dx, 0.0))


def test_top_k_relu_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"k=9 must be in \[1, F=8\]"):
        top_k_relu(jnp.zeros((2, 8)), 9, backend="xla")
    with pytest.raises(ValueError, match=r"x must have shape \[B, F\]"):
        top_k_relu(jnp.zeros((2, 3, 8)), 2, backend="xla")
    with pytest.raises(TypeError, match="x has dtype int32"):
        top_k_relu(jnp.zeros((2, 8), jnp.int32), 2, backend="xla")
