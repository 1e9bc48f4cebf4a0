"""The jnp reference itself: a low-precision weight still gets a float32-accumulated gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from oracle import decoder_loss_oracle

import hsae_jax


def test_bf16_weight_gradient_of_a_hot_row_is_accumulated_in_float32():
    b, k, f, d = 2048, 4, 8, 16
    rng = np.random.default_rng(0)
    indices = jnp.asarray(np.tile([0, 1, 2, 3], (b, 1)), jnp.int32)  # every token: rows 0..3
    weight = jnp.asarray(rng.normal(size=(f, d)), jnp.bfloat16)
    vals = jnp.asarray(rng.uniform(0.5, 1.5, size=(b, k)), jnp.float32)
    bias = jnp.zeros((d,), jnp.float32)
    target = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
    dweight = jax.grad(lambda w: hsae_jax.hierarchical_sae_loss(
        indices, w, vals, bias, target, backend="reference"))(weight)
    expected = decoder_loss_oracle(indices, weight, vals, bias, target)["weight"]
    got = np.asarray(dweight, np.float64)
    err = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert err < 1e-2, err  # bfloat16 rounding of the result only
