"""The triton backend at realistic sizes on a CUDA GPU (skipped elsewhere).

The small-shape oracle tests of test_loss.py also run the triton backend on a GPU;
these add the seed's own workload (B=4096, F=65536, D=2304) against the jnp reference
and moderate shapes against the float64 oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_inputs, relative_error, requires_gpu
from loss_checks import DETERMINISTIC, FUSED, TWO_PASS, check_against_oracle, loss_and_grads

pytestmark = requires_gpu

VARIANTS = [pytest.param(FUSED, id="fused"), pytest.param(TWO_PASS, id="two_pass"),
            pytest.param(DETERMINISTIC, id="deterministic")]


@pytest.mark.parametrize("config", VARIANTS)
@pytest.mark.parametrize("shape", [(256, 32, 4096, 256), (100, 50, 1000, 200),
                                   (33, 128, 5000, 2304), (2048, 7, 300, 96)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_moderate_shapes_match_float64_oracle(config, shape, dtype, rng_seed):
    inputs = make_inputs(rng_seed, *shape, dtypes=(dtype,) * 4)
    pw = jnp.asarray(np.random.default_rng(rng_seed).uniform(0.2, 1.0, shape[1]), jnp.float32)
    value, grads = loss_and_grads("triton", config, inputs, pw, cotangent=0.5)
    check_against_oracle(value, grads, inputs, pw, cotangent=0.5)


@pytest.mark.parametrize("config", VARIANTS)
@pytest.mark.parametrize("k", [32, 128])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_seed_workload_matches_reference(config, k, dtype):
    b, f, d = 4096, 65536, 2304
    key = jax.random.key(k)
    kw, kv, kb, kt, ki = jax.random.split(key, 5)
    indices = jax.random.randint(ki, (b, k), 0, f, jnp.int32)
    weight = (jax.random.normal(kw, (f, d)) / np.sqrt(d)).astype(dtype)
    vals = jax.random.uniform(kv, (b, k), minval=0.1, maxval=2.0).astype(dtype)
    bias = (0.1 * jax.random.normal(kb, (d,))).astype(dtype)
    target = jax.random.normal(kt, (b, d)).astype(dtype)
    inputs = (indices, weight, vals, bias, target)
    value, grads = loss_and_grads("triton", config, inputs)
    ref_value, ref_grads = loss_and_grads("reference", None, inputs)
    tol = 1e-5 if dtype == "float32" else 1e-2
    assert relative_error(value, ref_value) <= 1e-5
    for name in ("weight", "vals", "bias", "target"):
        got = np.asarray(grads[name].astype(jnp.float32))
        assert np.all(np.isfinite(got)), name
        err = relative_error(got, ref_grads[name].astype(jnp.float32))
        assert err <= tol, f"d{name}: {err:.3g} > {tol}"
