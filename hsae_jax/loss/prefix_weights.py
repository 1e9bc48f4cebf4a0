"""The weighting of the K prefix losses, shared by every backend of the decoder loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def normalized_prefix_weights(prefix_weights: jax.Array | None, k: int) -> jax.Array:
    """[K] float32 weights of the K prefix losses, summing to 1 (uniform for None).

    Weights that sum to 0 (refused by the ops' argument checks, but possible under
    ``jax.jit``, where values cannot be checked) weight nothing: all zeros, so the loss
    is 0 and every gradient but the prefix weights' is 0; never NaN.
    """
    if prefix_weights is None:
        return jnp.full((k,), 1.0 / k, jnp.float32)
    w = prefix_weights.astype(jnp.float32)
    total = jnp.sum(w)
    return w / jnp.where(total > 0, total, 1.0)


def combine_prefix_sse(prefix_sse: jax.Array, weights: jax.Array, d: int) -> jax.Array:
    """Scalar float32 loss from [B, K] per-prefix SSE and normalised [K] weights.

    loss = sum_k weights_k * mean_{b, d}(r_k^2).
    """
    b = prefix_sse.shape[0]
    return jnp.sum(jnp.sum(prefix_sse, axis=0) * weights) / (b * d)
