"""The update after the gradients, a block of latents at a time (``--update-blocks N``).

:func:`hsae_jax.parallel.optim.apply_gradients` updates each parameter whole, and XLA keeps
float32 intermediates of whole [F/m, D] matrices while it does (on two H200s at F = 2^22 with
the low-memory options: 39 GB per device beside the 39 GB of gradients). Everything after
the global gradient norm is row-local: the W_dec gradient's projection, the clip's scaling,
Adam, the stochastically rounded bfloat16 store and the decoder rows' renormalisation. So
:func:`apply_gradients_in_row_blocks` checks every gradient for NaN / inf and sums their
squares for the norm first (a block at a time too), then runs the optimizer ``tx`` in a
``fori_loop`` over N blocks of latents, reading and writing
each block of W_enc, b_enc, W_dec and their Adam moments in place: the intermediates are
one block's. Every step and every metric is the whole update's to float32 rounding: the
arithmetic is the same row by row, but XLA may fuse it otherwise (last-bit differences,
which bfloat16 parameters can turn into one bfloat16 step, their stochastic rounding being
keyed on the update's bits). tests/test_row_blocks.py compares the two.

``tx`` must not clip (:func:`hsae_jax.train.step.make_optimizer` with ``update_blocks``
puts ``optax.identity`` where the clip was, so the optimizer state keeps its structure and
checkpoints move between the two): the clip's scaling is applied here, with the norm over
all of the gradients.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from hsae_jax.parallel.mesh import Axes
from hsae_jax.parallel.optim import (
    all_finite,
    apply_updates,
    normalize_decoder_sharded,
    project_decoder_grad_sharded,
)


@dataclasses.dataclass(frozen=True)
class RowBlocks:
    """The update in ``blocks`` blocks of latents, clipping at ``clip_norm`` (0: no clip)."""

    blocks: int
    clip_norm: float = 0.0


LATENT_ROWS = ("W_enc", "b_enc", "W_dec")
"""Arrays whose first axis is the latents (W_dec: all F of them, on its D slice)."""


def _latent(path) -> bool:
    return any(getattr(key, "key", None) in LATENT_ROWS for key in path)


def check_blocks(blocks: int, f_local: int, f: int) -> None:
    """``blocks`` must divide the latents of every device's blocks (F/m and F)."""
    if f_local % blocks or f % blocks:
        raise ValueError(f"--update-blocks={blocks} must divide the latents per device "
                         f"(F/m = {f_local}) and F = {f}")


def apply_gradients_in_row_blocks(tx: optax.GradientTransformation, update: RowBlocks,
                                  axes: Axes, params, opt_state, grads, loss):
    """:func:`~hsae_jax.parallel.optim.apply_gradients` in ``update.blocks`` blocks of
    latents: (params, opt_state, grad_norm). ``tx``: Adam without the clip (see the
    module)."""
    blocks, clip_norm = update.blocks, update.clip_norm
    latents = {params["W_enc"].shape[0], params["W_dec"].shape[0]}  # F/m and F

    def rows(leaf, i):
        """Block i of an array whose first axis is the latents."""
        if leaf.ndim < 1 or leaf.shape[0] not in latents:
            raise ValueError(f"an array of shape {leaf.shape} under a latent-indexed name: "
                             f"its first axis is not the latents ({sorted(latents)})")
        n = leaf.shape[0] // blocks
        return jax.lax.dynamic_slice_in_dim(leaf, i * n, n)

    # every gradient is checked here (the per-block optimizer sees one block at a time)
    finite = all_finite(axes, loss, grads, gradients=True)
    f32 = lambda g: jnp.where(finite, g.astype(jnp.float32), jnp.nan)  # noqa: E731

    def projected(g, w_dec):  # the W_dec gradient without its components along the rows
        return project_decoder_grad_sharded(axes, w_dec, f32(g))

    def squares(i, sums):  # the gradients' squares, a block at a time (no whole copy)
        split, whole = sums
        g = {k: rows(grads[k], i) for k in LATENT_ROWS}
        block_sum = (jnp.sum(jnp.square(f32(g["W_enc"]))) + jnp.sum(jnp.square(f32(g["b_enc"])))
                     + jnp.sum(jnp.square(projected(g["W_dec"], rows(params["W_dec"], i)))))
        if axes.model == 1:
            return split, whole + block_sum
        return split + block_sum, whole  # blocks of arrays split over model: summed there

    split, whole = jax.lax.fori_loop(0, blocks, squares, (jnp.float32(0), jnp.float32(0)))
    rest = sum(jnp.sum(jnp.square(f32(v))) for k, v in grads.items() if k not in LATENT_ROWS)
    norm = jnp.sqrt(axes.psum_model(split) + whole + rest)
    trigger = jnp.squeeze(norm < clip_norm) if clip_norm > 0 else jnp.bool_(True)

    def clip(t):  # optax.clip_by_global_norm's scaling, with the norm of all the gradients
        return jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * clip_norm)

    def block(tree, i):
        """The latent arrays' rows of block i (other arrays whole)."""
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: rows(leaf, i) if _latent(path) else leaf, tree)

    def put(tree, new, i):
        """``tree`` with block i of its latent arrays from ``new``; other arrays ``new``'s."""
        def place(path, leaf, value):
            if not _latent(path):
                return value
            start = i * (leaf.shape[0] // blocks)
            if leaf.dtype == jnp.bfloat16:  # stored as bits: XLA updates them in place
                bits = jax.lax.dynamic_update_slice_in_dim(
                    jax.lax.bitcast_convert_type(leaf, jnp.uint16),
                    jax.lax.bitcast_convert_type(value.astype(leaf.dtype), jnp.uint16),
                    start, 0)
                return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)
            return jax.lax.dynamic_update_slice_in_dim(leaf, value.astype(leaf.dtype), start, 0)
        return jax.tree_util.tree_map_with_path(place, tree, new)

    def whole_from(carried, original):
        """Latent arrays from the carried state (block i not yet written), the others
        (counters, b_dec and its moments) as they were before the step: every block's
        update starts from them, so each block computes the same new values."""
        return jax.tree_util.tree_map_with_path(
            lambda path, c, o: c if _latent(path) else o, carried, original)

    def update_block(i, carry):
        params_c, state_c = carry
        p = block(whole_from(params_c, params), i)
        s = block(whole_from(state_c, opt_state), i)
        g = block(grads, i)
        g = {**{k: f32(v) for k, v in g.items()}, "W_dec": projected(g["W_dec"], p["W_dec"])}
        g = jax.tree.map(clip, g)
        updates, s_new = tx.update(g, s, p)
        p_new = apply_updates(p, updates)
        p_new["W_dec"] = normalize_decoder_sharded(axes, p_new["W_dec"])
        p_new = jax.tree.map(lambda new, old: jnp.where(s_new.last_finite, new, old), p_new, p)
        return put(params_c, p_new, i), put(state_c, s_new, i)

    params, opt_state = jax.lax.fori_loop(0, blocks, update_block, (params, opt_state))
    return params, opt_state, norm
