"""AuxK (:mod:`hsae_jax.auxk`) with the latents split over ``model`` and W_dec over D.

The dead latents live on different devices: device j finds its own (its block of the
``tokens_since_fired`` counters), computes their pre-activations with its ``W_enc``
rows in a static column bucket n (F/m/64 ... F/m, the smallest that holds the most
dead latents any device has: ``lax.switch`` takes the same branch on every device), and
takes its top aux_k; the global top aux_k per token is merged from the m candidate
lists like the main top-K (never [B, F]). The largest bucket (every column) uses the
blocks themselves instead of gathered copies of their rows. Each device keeps the winners
among its own columns as a dense [B, n] activation matrix. The reconstruction needs the winners'
decoder rows over all of D, which lie across the devices (W_dec is split over D): an
all-to-all brings each device the rows of its own dead latents ([n, D], not [F, D]),
each device multiplies its [B, n] activations by them, and a reduce-scatter over D sums
the m partial reconstructions into the device's D slice. The squared error is summed
over the slices; the residual's variance and the number of dead latents are taken over
the whole batch and dictionary, so the loss equals the one-device AuxK on the same
global batch. With m = 1 and one device on ``data`` this is :func:`hsae_jax.auxk.auxk_loss`
step for step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hsae_jax.auxk import column_buckets
from hsae_jax.parallel.collectives import merge_top_k, sum_over
from hsae_jax.parallel.mesh import MODEL, Axes
from hsae_jax.sparse_rows import weighted_row_sum
from hsae_jax.topk import top_k

# Coarser than the one-device buckets: with buckets of F/m/2 and F/m/8 as well, XLA's CPU
# runtime (jaxlib 0.10) crashed (SIGSEGV) running the step on a (2, 4) mesh; these are
# the buckets the multi-device tests run.
SHARDED_BUCKET_DIVISORS = (64, 16, 4, 1)


def _cast(compute_dtype: str, x):
    return x.astype(jnp.bfloat16) if compute_dtype == "bfloat16" else x


def residual_slice(params, xs_slice, b_dec_slice, vals, indices) -> jax.Array:
    """[B, D/m] float32: this device's D slice of xs minus the main reconstruction
    (W_dec's block of columns), constant."""
    recon0 = jnp.broadcast_to(b_dec_slice.astype(jnp.float32), xs_slice.shape)
    recon = weighted_row_sum(params["W_dec"], indices, vals, 8, recon0)
    return jax.lax.stop_gradient(xs_slice - recon)


def _variance(axes: Axes, residual, batch: int, d_model: int):
    """mean over the global batch and all of D of (residual - its mean over the batch)^2."""
    if axes.data == 1 and axes.model == 1:
        return jnp.mean((residual - jnp.mean(residual, axis=0)) ** 2)
    mean = axes.psum_data(jnp.sum(residual, axis=0)) / batch
    return axes.psum_all(jnp.sum((residual - mean) ** 2)) / (batch * d_model)


def _winners(cfg, axes: Axes, kernels, pre):
    """[B, n] bool: the columns of ``pre`` among each token's global top aux_k (None: all)."""
    aux_k = cfg.resolved_aux_k
    b, n = pre.shape
    if axes.model * n <= aux_k:  # every dead latent is among a token's top aux_k
        return None
    pre = jax.lax.stop_gradient(pre)  # which columns win is not differentiated
    rows = jnp.arange(b)[:, None]
    if axes.model == 1:
        _, positions = top_k(pre, aux_k, backend=kernels.backend, config=kernels.topk)
        return jnp.zeros(pre.shape, jnp.bool_).at[rows, positions].set(True)
    if n > aux_k:
        values, positions = top_k(pre, aux_k, backend=kernels.backend, config=kernels.topk)
    else:  # columns in index order are candidates in tie order already
        values, positions = pre, jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), pre.shape)
    offset = axes.model_index() * n
    _, columns = merge_top_k(values, positions + offset, aux_k)  # global column numbers
    local = columns - offset
    local = jnp.where((local >= 0) & (local < n), local, n)  # other devices' winners: dropped
    return jnp.zeros(pre.shape, jnp.bool_).at[rows, local].set(True, mode="drop")


def _dead_rows(axes: Axes, w_dec, latents, is_dead):
    """[n, D]: W_dec rows of this device's dead latents over all of D (w_dec: [F, D/m])."""
    if axes.model == 1:
        return jnp.take(w_dec, latents, axis=0, mode="fill", fill_value=0)
    n = latents.shape[0]
    f = w_dec.shape[0]
    block = f // axes.model
    wanted = jnp.where(is_dead, latents + axes.model_index() * block, f)  # global; f: none
    every = jax.lax.all_gather(wanted, MODEL, axis=0, tiled=True)  # [m * n]: each device's
    rows = jnp.take(w_dec, every, axis=0, mode="fill", fill_value=0)  # [m * n, D/m]
    rows = jax.lax.all_to_all(rows, MODEL, 0, 0, tiled=True)  # [m (D block), n, D/m] mine
    return rows.reshape(axes.model, n, -1).transpose(1, 0, 2).reshape(n, -1)


def _all_rows(axes: Axes, w_dec):
    """[F/m, D]: W_dec rows of this device's latents over all of D (w_dec: [F, D/m])."""
    if axes.model == 1:
        return w_dec
    f, d_local = w_dec.shape
    rows = jax.lax.all_to_all(w_dec, MODEL, 0, 0, tiled=True)  # [m (D block) x F/m, D/m]
    return rows.reshape(axes.model, f // axes.model, d_local).transpose(1, 0, 2).reshape(
        f // axes.model, -1)


def _dead_columns_loss(cfg, axes: Axes, kernels, columns: int, params, b_dec, xs, vals,
                       indices, dead, num_dead):
    """The AuxK loss on ``columns`` local columns holding this device's dead latents."""
    f_local, aux_k = dead.shape[0], cfg.resolved_aux_k
    d_model = xs.shape[1]
    d_local = d_model // axes.model
    start = axes.model_index() * d_local
    xs_slice = jax.lax.dynamic_slice_in_dim(xs, start, d_local, axis=1)
    b_dec_slice = jax.lax.dynamic_slice_in_dim(b_dec, start, d_local)
    residual = residual_slice(params, xs_slice, b_dec_slice, vals, indices)  # [B, D/m]
    if columns == f_local:  # every column: the blocks themselves, no gathered copies
        is_dead, w_enc, b_enc = dead, params["W_enc"], params["b_enc"]
        w_dec = _all_rows(axes, params["W_dec"])
    else:
        latents = jnp.nonzero(dead, size=columns, fill_value=f_local)[0]  # [n] ascending
        is_dead = latents < f_local
        w_enc = jnp.take(params["W_enc"], latents, axis=0, mode="fill", fill_value=0)  # [n, D]
        b_enc = jnp.take(params["b_enc"], latents, mode="fill", fill_value=0)  # [n]
        w_dec = _dead_rows(axes, params["W_dec"], latents, is_dead)  # [n, D]
    # the encoder's arithmetic (hsae_jax.encoder.topk_encode) on the dead columns only
    x = _cast(cfg.compute_dtype, xs)
    xc = x - b_dec.astype(x.dtype)
    pre = jnp.dot(xc, _cast(cfg.compute_dtype, w_enc).T.astype(x.dtype),
                  preferred_element_type=jnp.float32) + b_enc.astype(jnp.float32)
    pre = jnp.where(is_dead[None, :], pre, -jnp.inf)  # [B, n]; padding never contributes
    winners = _winners(cfg, axes, kernels, pre)
    acts = jax.nn.relu(pre) if winners is None else jnp.where(winners, jax.nn.relu(pre), 0.0)
    w_dec = _cast(cfg.compute_dtype, w_dec).astype(jnp.float32)
    recon = jnp.dot(acts, w_dec, preferred_element_type=jnp.float32)  # [B, D]: my latents'
    if axes.model > 1:  # sum the devices' parts, each device keeping its D slice
        recon = jax.lax.psum_scatter(recon, MODEL, scatter_dimension=1, tiled=True)
    batch = xs.shape[0] * axes.data
    if axes.data == 1 and axes.model == 1:
        err = jnp.mean((residual - recon) ** 2)
    else:  # this device's rows' mean: the mean over ``data`` is the global batch's
        err = sum_over(jnp.sum((residual - recon) ** 2), axes.model) / (xs.shape[0] * d_model)
    variance = _variance(axes, residual, batch, d_model)
    scale = jnp.minimum(num_dead / aux_k, 1.0)
    return jnp.where(variance > 0, scale * err / variance, 0.0)


def sharded_auxk_loss(cfg, axes: Axes, params, b_dec, xs, vals, indices, dead,
                      kernels) -> jax.Array:
    """Scalar float32 AuxK loss inside ``shard_map``; 0 (nothing computed) while no
    latent is dead anywhere.

    params: this device's blocks (W_enc [F/m, D], b_enc [F/m], W_dec [F, D/m]); b_dec [D]
    (differentiable: this device's share of its gradient); xs [B/d, D] this device's rows
    in the model's space; vals, indices [B/d, K] the merged main selection; dead [F/m]
    bool, this device's latents. Its mean over ``data`` is the loss of the global batch.
    """
    local_dead = jnp.sum(dead)
    num_dead = axes.psum_model(local_dead)
    most = axes.pmax_model(local_dead)  # the same bucket on every device of the axis
    buckets = column_buckets(dead.shape[0], cfg.auxk_max_fraction, SHARDED_BUCKET_DIVISORS)
    branches = [lambda *_: jnp.float32(0.0)] + [
        functools.partial(_dead_columns_loss, cfg, axes, kernels, n) for n in buckets]
    which = jnp.where(num_dead > 0, 1 + jnp.searchsorted(jnp.asarray(buckets), most), 0)
    return jax.lax.switch(which, branches, params, b_dec, xs, vals, indices, dead, num_dead)
