"""Rows of a [F, D] matrix selected by [B, K] latent indices: masking, gathers, chunks.

The decoder loss, the encoder's backward and the model's decode all select rows of a
weight matrix by latent index; this module holds the pieces they share, so every op
treats an out-of-range index the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def valid_indices(indices: jax.Array, num_rows: int) -> jax.Array:
    """[B, K] bool: which indices select a row of a [num_rows, D] weight.

    Out-of-range indices (negative or >= F) select no row: that latent contributes
    nothing to any reconstruction, its ``vals`` gradient is 0 and no row of the weight
    gradient receives anything from it. Every backend implements this rule.
    """
    return (indices >= 0) & (indices < num_rows)


def safe_indices(indices: jax.Array, num_rows: int) -> jax.Array:
    """[B, K] int32/int64: ``indices`` with every out-of-range entry replaced by ``num_rows``.

    ``num_rows`` is past the end, so ``jnp.take(..., mode="fill")`` reads zeros for it and
    ``.at[...].add(..., mode="drop")`` drops it (a negative index would wrap instead).
    """
    return jnp.where(valid_indices(indices, num_rows), indices, num_rows)


def gather_rows(weight: jax.Array, indices: jax.Array) -> jax.Array:
    """[B, K, D] float32: ``weight[indices]``, with zero rows for out-of-range indices.

    The weight is upcast before the gather so that autodiff's scatter-add of the weight
    gradient accumulates in float32 (in bfloat16 a row picked by thousands of tokens
    would lose most of its gradient to rounding).
    """
    safe = safe_indices(indices, weight.shape[0])
    return jnp.take(weight.astype(jnp.float32), safe, axis=0, mode="fill", fill_value=0)


def chunk_latents(x: jax.Array, chunk: int, fill) -> jax.Array:
    """[B, K] -> [ceil(K / c), B, c] with c = min(chunk, K): K in scan-sized chunks, the
    last one padded with ``fill``."""
    b, k = x.shape
    chunk = max(1, min(chunk, k))
    x = jnp.pad(x, ((0, 0), (0, -k % chunk)), constant_values=fill)
    return x.reshape(b, -(-k // chunk), chunk).transpose(1, 0, 2)  # (no -1: B may be 0)


def weighted_row_sum(weight: jax.Array, indices: jax.Array, coefs: jax.Array, chunk: int,
                     init: jax.Array) -> jax.Array:
    """[B, D] float32: ``init + sum_j coefs[b, j] * weight[indices[b, j]]``.

    weight [F, D], indices [B, K] (out-of-range ones add nothing), coefs [B, K]; a scan
    over chunks of ``chunk`` latents, so no [B, K, D] tensor is built.
    """
    f = weight.shape[0]

    def step(acc, xs):
        idx_c, coef_c = xs
        rows = jnp.take(weight, idx_c, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
        return acc + jnp.einsum("bc,bcd->bd", coef_c, rows), None

    xs = (chunk_latents(safe_indices(indices, f), chunk, f),
          chunk_latents(coefs.astype(jnp.float32), chunk, 0.0))
    out, _ = jax.lax.scan(step, init, xs)
    return out


def unchunk_latents(x: jax.Array, k: int) -> jax.Array:
    """[n, B, chunk] -> [B, K]: undoes :func:`chunk_latents`."""
    n, b, chunk = x.shape
    return x.transpose(1, 0, 2).reshape(b, n * chunk)[:, :k]
