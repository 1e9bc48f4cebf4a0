"""Property tests: any shape, any prefix weights, the loss equals the float64 oracle."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import KERNEL_BACKEND, assert_close_to_oracle, make_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_checks import FUSED, loss_and_grads
from oracle import decoder_loss_oracle

import hsae_jax

shapes = st.tuples(
    st.integers(1, 9),  # B
    st.integers(1, 40),  # K
    st.integers(1, 30),  # F
    st.integers(1, 80),  # D
)


@pytest.mark.parametrize("backend, config", [
    ("xla", None),
    ("xla", hsae_jax.XlaLossConfig(chunk=4)),
    (KERNEL_BACKEND, FUSED),
])
@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), weighted=st.booleans())
def test_any_shape_matches_oracle(backend, config, shape, seed, weighted):
    inputs = make_inputs(seed, *shape)
    k = shape[1]
    pw = None
    if weighted:
        pw = np.random.default_rng(seed).uniform(0.0, 1.0, k)
        pw[np.random.default_rng(seed + 1).integers(k)] += 0.5  # positive sum
        pw = jnp.asarray(pw, jnp.float32)
    value, grads = loss_and_grads(backend, config, inputs, pw)
    expected = decoder_loss_oracle(*inputs, prefix_weights=pw)
    assert_close_to_oracle("loss", value, expected["loss"], jnp.float32)
    for name in ("weight", "vals", "bias", "target"):
        assert_close_to_oracle(f"d{name}", grads[name], expected[name], jnp.float32)
