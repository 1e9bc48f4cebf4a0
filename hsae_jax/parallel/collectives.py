"""Collectives of the sharded step with the gradients they need, and the top-k merge.

Inside ``shard_map`` (with replication checks off) JAX transposes ``psum`` into another
``psum``, which is wrong for a value every device of the axis already holds whole. The
step never differentiates through a bare ``psum``; it uses the two Megatron-style pairs:

- :func:`grad_psum`: identity forward, ``psum`` of the cotangent backward. Marks a value
  that every device of the ``model`` axis uses for its own share of the work (``b_dec``,
  the selected latents' values), so its gradient is the sum of the shares.
- :func:`sum_over`: ``psum`` forward, identity backward: a loss made of per-device parts.

:func:`merge_top_k` is the distributed top-k: each device of the axis holds its top k
candidates (values and global indices); the global top k is the top k of the m·k
candidates per token, which an all-gather of [B, m·k] brings together (never [B, F]).
:func:`merge_top_k_mask` is the same selection as a mask over each device's columns, by
radix selects (:func:`hsae_jax.topk.top_k_mask`) instead of a sorted top-k (AuxK's
k = aux_k is large).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hsae_jax.parallel.mesh import MODEL
from hsae_jax.topk import TopKConfig, top_k_mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def grad_psum(x, size: int):
    """``x`` unchanged; its gradient is summed over the ``model`` axis (of ``size``)."""
    return x


def _grad_psum_fwd(x, size):
    return x, None


def _grad_psum_bwd(size, _, g):
    return (g if size == 1 else jax.lax.psum(g, MODEL),)


grad_psum.defvjp(_grad_psum_fwd, _grad_psum_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sum_over(x, size: int):
    """The sum of ``x`` over the ``model`` axis (of ``size``); each device's ``x`` gets the
    cotangent of the sum unchanged."""
    return x if size == 1 else jax.lax.psum(x, MODEL)


def _sum_over_fwd(x, size):
    return sum_over(x, size), None


def _sum_over_bwd(size, _, g):
    return (g,)


sum_over.defvjp(_sum_over_fwd, _sum_over_bwd)


def merge_top_k(values: jax.Array, indices: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The top ``k`` over the ``model`` axis of each device's candidates (not differentiated).

    values: [B, c] this device's candidates; indices: [B, c] their global indices. Among
    equal values the candidate of the lower global index must come first in each device's
    list (``top_k``'s order, or columns in index order), and devices along ``model`` must
    hold increasing index ranges: then the merged list keeps ``top_k``'s tie rule, since
    ``lax.top_k`` prefers the lower position among equal values. Returns (values [B, k],
    indices [B, k]), the same on every device of the axis.
    """
    values = jax.lax.stop_gradient(values)
    every_value = jax.lax.all_gather(values, MODEL, axis=1, tiled=True)  # [B, m * c]
    every_index = jax.lax.all_gather(indices, MODEL, axis=1, tiled=True)
    top, position = jax.lax.top_k(every_value, k)
    return top, jnp.take_along_axis(every_index, position, axis=1)


def merge_top_k_mask(values: jax.Array, k: int, size: int, *, backend: str = "auto",
                     config: TopKConfig | None = None) -> jax.Array:
    """[B, n] bool: which of this device's columns are among each row's ``k`` largest over
    the ``model`` axis (of ``size`` devices), ties to the lower global column as ``top_k``
    breaks them; not differentiated, never sorted.

    values: [B, n] float32, this device's columns; device j's columns come after device
    j-1's (global column j·n + c). Each device marks its own top k (all n when n <= k:
    :func:`top_k_mask`, a radix select), compacts its winners' values in column order to
    [B, c] (c = min(n, k)), the all-gather of those ([B, m·c], in global column order)
    gets its top k marked the same way, and each device reads its own c back. Every
    global winner is a winner of its device, so this is the top k of all m·n columns.
    ``backend`` / ``config``: :func:`top_k_mask`'s.
    """
    values = jax.lax.stop_gradient(values)
    b, n = values.shape
    local = top_k_mask(values, k, backend=backend, config=config) if n > k else None
    c = min(n, k)
    if size * c <= k:  # every candidate wins (one device: its own top k)
        return jnp.ones((b, n), jnp.bool_) if local is None else local
    if local is not None:
        slot = jnp.where(local, jnp.cumsum(local, axis=1, dtype=jnp.int32) - 1, k)  # [B, n]
        compact = jnp.zeros((b, k), values.dtype).at[jnp.arange(b)[:, None], slot].set(
            values, mode="drop")
    else:  # every column is a candidate already, in column order
        compact = values
        slot = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    every = jax.lax.all_gather(compact, MODEL, axis=1, tiled=True)  # [B, m * c]
    won = jax.lax.dynamic_slice_in_dim(
        top_k_mask(every, k, backend=backend, config=config),
        jax.lax.axis_index(MODEL) * c, c, axis=1)  # [B, c]: this device's candidates
    chosen = jnp.take_along_axis(won, jnp.minimum(slot, c - 1), axis=1)
    return chosen if local is None else chosen & local
