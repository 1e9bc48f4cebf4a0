"""Shared test machinery: which backends run here, random inputs, tolerances."""

from __future__ import annotations

import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import settings

from hsae_jax import backends

# the same examples on every run (a landing's CI must not turn red on a newly drawn one);
# HYPOTHESIS_PROFILE=explore draws fresh examples
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ON_GPU = backends.cuda_available()
KERNEL_BACKEND = "triton" if ON_GPU else "interpret"  # what runs the Triton kernels here

# Triton compiles or interprets per process: on a CUDA machine the kernel tests run
# compiled ("triton"), elsewhere through the interpreter ("interpret").
requires_gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU with jax-triton"),
]
requires_interpreter = [
    pytest.mark.interpret,
    pytest.mark.skipif(ON_GPU, reason="this process compiles Triton kernels for the GPU"),
]

DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}
# Norm-relative error allowed for an output of each dtype against the float64 oracle
# (the oracle sees the same rounded inputs, so this covers float32 accumulation plus the
# final rounding of a gradient to its primal's dtype).
TOLERANCE = {
    jnp.dtype(jnp.float32): 2e-5,
    jnp.dtype(jnp.bfloat16): 1e-2,
    jnp.dtype(jnp.float16): 2e-3,
}


def relative_error(actual, expected) -> float:
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(expected, np.float64)
    scale = max(np.linalg.norm(expected), 1e-30)
    return float(np.linalg.norm(actual - expected) / scale)


def assert_close_to_oracle(name, actual, expected, dtype, factor=1.0):
    """Asserts finiteness (poisoned outputs show up as NaN) and a norm-relative bound."""
    actual_np = np.asarray(jnp.asarray(actual, jnp.float32))
    assert np.all(np.isfinite(actual_np)), f"{name}: non-finite entries (an unwritten output?)"
    assert actual_np.shape == np.shape(expected), (
        f"{name}: {actual_np.shape} != {np.shape(expected)}")
    # The best a `dtype` output can be is the oracle rounded to `dtype` (float16 gradients
    # are often subnormal, where rounding alone costs far more than 1e-3): measure the
    # error beyond that rounding, relative to the oracle's norm.
    rounded = np.asarray(jnp.asarray(expected, dtype).astype(jnp.float32), np.float64)
    err = relative_error(actual, rounded) * max(np.linalg.norm(rounded), 1e-30) / max(
        np.linalg.norm(expected), 1e-30)
    tol = TOLERANCE[jnp.dtype(dtype)] * factor
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g}"


def make_inputs(key_or_seed, b, k, f, d, dtypes=("float32",) * 4, index_dtype=jnp.int32):
    """Fresh random inputs (never zeros): indices, weight, vals, bias, target.

    Indices are drawn without replacement per row when F allows (as top-k gives), with
    repeats otherwise; vals are positive like ReLU'd top-k values.
    """
    rng = np.random.default_rng(key_or_seed)
    if k <= f:
        indices = np.argsort(rng.random((b, f)), axis=1)[:, :k]
    else:
        indices = rng.integers(0, f, (b, k))
    w_dt, v_dt, b_dt, t_dt = (DTYPES[x] if isinstance(x, str) else x for x in dtypes)
    weight = rng.normal(size=(f, d)) / np.sqrt(d)
    vals = rng.uniform(0.1, 2.0, size=(b, k))
    bias = rng.normal(size=d) * 0.1
    target = rng.normal(size=(b, d))
    return (
        jnp.asarray(indices, index_dtype),
        jnp.asarray(weight, w_dt),
        jnp.asarray(vals, v_dt),
        jnp.asarray(bias, b_dt),
        jnp.asarray(target, t_dt),
    )


def enable_x64():
    """Context manager turning on 64-bit types (its home moved between JAX versions)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    return jax.experimental.enable_x64()  # pragma: no cover - older JAX


@pytest.fixture
def rng_seed(request) -> int:
    """A seed that differs per test (fresh data) but is reproducible."""
    return zlib.crc32(request.node.nodeid.encode())
