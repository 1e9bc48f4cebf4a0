"""Shared by the decoder-loss tests: the loss and its gradients in one jitted vjp, and
their comparison with the float64 oracle."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from conftest import assert_close_to_oracle
from oracle import decoder_loss_oracle

import hsae_jax
from hsae_jax import TritonLossConfig

FUSED = TritonLossConfig(variant="fused")
TWO_PASS = TritonLossConfig(variant="two_pass")
DETERMINISTIC = TritonLossConfig(deterministic=True)

GRAD_NAMES = ("weight", "vals", "bias", "target", "prefix_weights")


def loss_and_grads(backend, config, inputs, prefix_weights=None, cotangent=1.0):
    """jit(vjp) of the loss w.r.t. weight, vals, bias, target and, when given,
    prefix_weights (None: the default weights, whose kernels read one coefficient;
    grads["prefix_weights"] is then None)."""
    indices, *floats = inputs

    def loss(weight, vals, bias, target, *pw):
        return hsae_jax.hierarchical_sae_loss(
            indices, weight, vals, bias, target, prefix_weights=pw[0] if pw else None,
            backend=backend, config=config)

    @jax.jit
    def run(*args):
        value, vjp = jax.vjp(loss, *args)
        return value, vjp(jnp.asarray(cotangent, jnp.float32))

    pw = () if prefix_weights is None else (prefix_weights,)
    value, grads = run(*floats, *pw)
    return value, dict(zip(GRAD_NAMES, (*grads, None)[:len(GRAD_NAMES)], strict=True))


def check_against_oracle(value, grads, inputs, prefix_weights=None, cotangent=1.0):
    expected = decoder_loss_oracle(*inputs, prefix_weights=prefix_weights)
    chex.assert_shape(value, ())
    chex.assert_type(value, jnp.float32)
    assert_close_to_oracle("loss", value, expected["loss"], jnp.float32)
    for name, primal in zip(GRAD_NAMES, (*inputs[1:], prefix_weights), strict=True):
        if primal is None:
            continue
        chex.assert_equal_shape([grads[name], primal])
        chex.assert_type(grads[name], primal.dtype)
        assert_close_to_oracle(f"d{name}", grads[name], cotangent * expected[name], primal.dtype)
