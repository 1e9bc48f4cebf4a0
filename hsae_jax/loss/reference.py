"""The jnp cumsum reference of the HierarchicalTopK decoder loss: the checker.

It materialises the [B, K, D] tensor of every prefix reconstruction, exactly as the
seed's ``hierarchical_sae_loss`` does in torch, and is differentiated by plain JAX
autodiff. Everything else in :mod:`hsae_jax.loss` is checked against it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hsae_jax.sparse_rows import gather_rows


def prefix_sse_reference(
    indices: jax.Array,  # [B, K] int
    weight: jax.Array,  # [F, D]
    vals: jax.Array,  # [B, K]
    bias: jax.Array,  # [D]
    target: jax.Array,  # [B, D]
    *,
    with_reconstruction: bool = False,
):
    """[B, K] float32: sum over D of (bias + sum_{j<=k} vals_j * weight[indices_j] - target)^2;
    ``with_reconstruction``: also the full reconstruction recon_K [B, D] float32."""
    rows = gather_rows(weight, indices)  # [B, K, D] float32
    recon = bias.astype(jnp.float32) + jnp.cumsum(vals.astype(jnp.float32)[..., None] * rows, 1)
    diff = recon - target.astype(jnp.float32)[:, None, :]
    sse = jnp.sum(diff * diff, axis=-1)
    return (sse, recon[:, -1, :]) if with_reconstruction else sse
