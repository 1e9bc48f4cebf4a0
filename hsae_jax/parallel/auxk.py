"""AuxK (:mod:`hsae_jax.auxk`) with the latents split over ``model`` and W_dec over D.

The dead latents live on different devices: device j finds its own (its block of the
``tokens_since_fired`` counters) and takes their pre-activations in a static column bucket n
(F/m/q for the divisors q of :func:`bucket_divisors`, the smallest that holds the most dead
latents any device has: ``lax.switch`` takes the same branch on every device): read from the
main encoder's [B, F/m] pre-activations when the step kept them, else computed with its
``W_enc`` rows, differentiated the same way either way. Each token's global top aux_k is a
mask over the device's columns (:func:`~hsae_jax.parallel.collectives.merge_top_k_mask`:
radix selects, no sorted top-k; on one device :func:`hsae_jax.topk.top_k_relu`, one kernel,
as in :mod:`hsae_jax.auxk`), and the device keeps its winners as a dense [B, n] activation
matrix (the products' operands in ``SAEConfig.auxk_dtype``).
The largest bucket (every column) uses the blocks themselves instead of gathered copies of
their rows. The reconstruction needs the winners' decoder rows over all of D, which lie
across the devices (W_dec is split over D): an all-to-all brings each device the rows of its
own dead latents ([n, D], not [F, D]), each device multiplies its [B, n] activations by
them, and a reduce-scatter over D sums the m partial reconstructions into the device's D
slice. The squared error is summed over the slices; the residual's variance and the number
of dead latents are taken over the whole batch and dictionary, so the loss equals the
one-device AuxK on the same global batch.

Two entry points, as in :mod:`hsae_jax.auxk`:

- :func:`sharded_auxk_loss`: the value, differentiable (the specification the tests
  differentiate);
- :func:`sharded_auxk_loss_and_add_grads`: what the sharded step calls after the main
  gradients: the value, and ``auxk_coef`` times its gradient added in place to the dead
  latents' rows of this device's gradient blocks (and to b_dec's, summed over ``model``),
  in the bucket the step names (chosen on the host from a bound on the dead count) or else
  one found on the device, so a step with no dead latent does no AuxK work at all.

With m = 1 and one device on ``data`` this is :func:`hsae_jax.auxk.auxk_loss_and_add_grads`
step for step (same buckets, same mask, same b_dec mat-vec).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hsae_jax.auxk import (
    BUCKET_DIVISORS,
    ROW_PARAMS,
    auxk_dot,
    bucket_index,
    column_buckets,
    dead_preactivations,
    distinct_padding,
    given_preactivations,
    loss_and_grads_in_bucket,
    main_residual,
)
from hsae_jax.parallel.collectives import merge_top_k_mask, sum_over
from hsae_jax.parallel.mesh import MODEL, Axes
from hsae_jax.topk import top_k_relu

# With latents on ``model`` the buckets are coarser than the one-device ones: with buckets
# of F/m/2 and F/m/8 as well, XLA's CPU runtime (jaxlib 0.10) crashed (SIGSEGV) running
# the step on a (2, 4) mesh; these are the buckets the multi-device tests run.
SHARDED_BUCKET_DIVISORS = (64, 16, 4, 1)


def bucket_divisors(axes: Axes) -> tuple[int, ...]:
    """The column buckets' divisors q (buckets F/m/q): the one-device ones
    (:data:`hsae_jax.auxk.BUCKET_DIVISORS`) while nothing is on ``model``, else
    :data:`SHARDED_BUCKET_DIVISORS`."""
    return BUCKET_DIVISORS if axes.model == 1 else SHARDED_BUCKET_DIVISORS


def _cast(compute_dtype: str, x):
    return x.astype(jnp.bfloat16) if compute_dtype == "bfloat16" else x


def _residual(axes: Axes, params, xs, vals, indices, reconstruction=None) -> jax.Array:
    """[B, D/m] float32: this device's D slice of xs minus the main reconstruction
    (W_dec's block of columns), constant: from ``reconstruction`` [B, D/m] (the main loss's
    recon_K of that slice) when given, else :func:`hsae_jax.auxk.main_residual`."""
    d_local = xs.shape[1] // axes.model
    start = axes.model_index() * d_local
    xs_slice = jax.lax.dynamic_slice_in_dim(xs, start, d_local, axis=1)
    if reconstruction is not None:
        return jax.lax.stop_gradient(xs_slice - reconstruction)
    return main_residual(params, xs_slice, vals, indices,
                         b_dec=jax.lax.dynamic_slice_in_dim(params["b_dec"], start, d_local))


def _variance(axes: Axes, residual, batch: int, d_model: int):
    """mean over the global batch and all of D of (residual - its mean over the batch)^2."""
    if axes.data == 1 and axes.model == 1:
        return jnp.mean((residual - jnp.mean(residual, axis=0)) ** 2)
    mean = axes.psum_data(jnp.sum(residual, axis=0)) / batch
    return axes.psum_all(jnp.sum((residual - mean) ** 2)) / (batch * d_model)


def _activations(cfg, axes: Axes, kernels, pre):
    """[B, n] float32: relu(pre) at the columns among each token's global top aux_k, 0
    elsewhere (one device: :func:`hsae_jax.topk.top_k_relu`, one kernel; several on
    ``model``: :func:`merge_top_k_mask`)."""
    aux_k = cfg.resolved_aux_k
    if axes.model * pre.shape[1] <= aux_k:  # every dead latent is among a token's top aux_k
        return jax.nn.relu(pre)
    if axes.model == 1:
        return top_k_relu(pre, aux_k, backend=kernels.backend, config=kernels.topk)
    winners = merge_top_k_mask(pre, aux_k, axes.model, backend=kernels.backend,
                               config=kernels.topk)
    return jnp.where(winners, jax.nn.relu(pre), 0.0)


def _over_d(axes: Axes, rows):
    """[m·n, D/m] -> [n, D]: from this device's D block of the rows of every device's n
    columns (device by device), the rows of its own n columns over all of D (an
    all-to-all over ``model``; nothing with m = 1)."""
    if axes.model == 1:
        return rows
    d_local = rows.shape[1]
    n = rows.shape[0] // axes.model
    rows = jax.lax.all_to_all(rows, MODEL, 0, 0, tiled=True)  # [m (D block) x n, D/m] mine
    return rows.reshape(axes.model, n, d_local).transpose(1, 0, 2).reshape(n, -1)


def _bucket_rows(axes: Axes, params, dead, columns: int):
    """This device's ``columns`` columns for a bucket: (is_dead [n] (the rest padding),
    rows, where) with rows W_enc [n, D], b_enc [n] (its columns' rows) and W_dec
    [m·n, D/m] (its D block of every device's columns' rows, device by device), and
    where = (local latents [n], global W_dec rows [m·n]) they are in the blocks (padding:
    from F/m and from F on, off the end and distinct); None for the every-column bucket,
    whose rows are the blocks themselves (no gathered copies)."""
    f_local = dead.shape[0]
    if columns == f_local:
        return dead, {name: params[name] for name in ROW_PARAMS}, None
    latents = distinct_padding(jnp.nonzero(dead, size=columns, fill_value=f_local)[0], f_local)
    is_dead = latents < f_local  # [n] ascending
    f = params["W_dec"].shape[0]
    wanted = jnp.where(is_dead, latents + axes.model_index() * f_local, f)  # global; f: none
    if axes.model > 1:
        wanted = jax.lax.all_gather(wanted, MODEL, axis=0, tiled=True)  # [m * n]: each device's
    wanted = distinct_padding(wanted, f)
    rows = {"W_enc": jnp.take(params["W_enc"], latents, axis=0, mode="fill", fill_value=0),
            "b_enc": jnp.take(params["b_enc"], latents, mode="fill", fill_value=0),
            "W_dec": jnp.take(params["W_dec"], wanted, axis=0, mode="fill", fill_value=0)}
    return is_dead, rows, (latents, wanted)


def _loss_on_rows(cfg, axes: Axes, kernels, rows, b_dec, xs, residual, is_dead, num_dead,
                  scores=None):
    """The AuxK loss from a bucket's rows (:func:`_bucket_rows`) and b_dec [D] (this
    device's share of its gradient); xs [B, D] this device's rows, residual [B, D/m];
    scores: the bucket's columns [B, n] of the main encoder's pre-activations, -inf where
    ``is_dead`` is False, if the step kept them (else computed from the rows)."""
    aux_k, d_model = cfg.resolved_aux_k, xs.shape[1]
    if scores is None:  # [B, n]; padding never contributes
        pre = dead_preactivations(cfg.compute_dtype, xs, rows["W_enc"], rows["b_enc"], b_dec,
                                  is_dead, cfg.auxk_dtype)
    else:
        pre = given_preactivations(cfg.compute_dtype, scores, xs, rows["W_enc"],
                                   rows["b_enc"], b_dec, cfg.auxk_dtype)
    acts = _activations(cfg, axes, kernels, pre)
    w_dec = _cast(cfg.compute_dtype, _over_d(axes, rows["W_dec"])).astype(jnp.float32)
    recon = auxk_dot(cfg.auxk_dtype, acts, w_dec)  # [B, D]: my latents'
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


def _bucket_loss(cfg, axes, kernels, columns, params, b_dec, xs, vals, indices, dead,
                 num_dead):
    is_dead, rows, _ = _bucket_rows(axes, params, dead, columns)
    residual = _residual(axes, params, xs, vals, indices)
    return _loss_on_rows(cfg, axes, kernels, rows, b_dec, xs, residual, is_dead, num_dead)


def _bucket_loss_and_grads(cfg, axes, kernels, columns, grads, params, xs, vals, indices,
                           dead, num_dead, reconstruction, scores):
    is_dead, rows, where = _bucket_rows(axes, params, dead, columns)
    residual = _residual(axes, params, xs, vals, indices, reconstruction)
    if scores is not None:  # the bucket's columns, -inf where no dead latent is
        scores = (jnp.where(is_dead[None, :], scores, -jnp.inf) if where is None else
                  jnp.take(scores, where[0], axis=1, mode="fill", fill_value=-jnp.inf))
    loss, vjp = jax.vjp(lambda r, b_dec: _loss_on_rows(cfg, axes, kernels, r, b_dec, xs,
                                                      residual, is_dead, num_dead, scores),
                        rows, params["b_dec"])
    d, d_b_dec = vjp(jnp.float32(cfg.auxk_coef))
    grads = dict(grads)
    for name in ROW_PARAMS:
        g = d[name].astype(grads[name].dtype)
        if where is None:  # the blocks themselves: dense (zero in the live latents' rows)
            grads[name] = grads[name] + g
        else:  # padding rows (F/m, F) fall off the end
            at = where[1] if name == "W_dec" else where[0]
            grads[name] = grads[name].at[at].add(g, mode="drop", unique_indices=True)
    d_b_dec = axes.psum_model(d_b_dec)  # this device's columns' share, summed
    grads["b_dec"] = grads["b_dec"] + d_b_dec.astype(grads["b_dec"].dtype)
    return loss, grads


# the step's bound on the dead count is for the state this many steps after the one it
# takes (:func:`dead_bound`): the trainer reads it then, with one step still queued
BOUND_LAG_STEPS = 2


def dead_bound(cfg, axes: Axes, tokens_since_fired, tokens_per_step: int, steps_ahead: int):
    """int32: the most latents any device of ``model`` can have dead ``steps_ahead`` steps
    of ``tokens_per_step`` after counters ``tokens_since_fired`` [F/m] (none fires in
    between: firing only revives), a bound on the dead count a later step's static AuxK
    bucket must hold. Called inside ``shard_map``."""
    soon = tokens_since_fired >= cfg.dead_tokens - steps_ahead * tokens_per_step
    return axes.pmax_model(jnp.sum(soon, dtype=jnp.int32))


def fits_bucket(cfg, axes: Axes, most, bucket: int | None):
    """bool: the static ``bucket`` (1-based into :func:`auxk_buckets`, 0 none) holds
    ``most``, the most dead latents any device has (:func:`dead_bound` 0 steps ahead), or
    is the largest, or the device chooses (None). Called inside ``shard_map``."""
    buckets = auxk_buckets(cfg, axes)
    if bucket is None or bucket >= len(buckets):
        return jnp.bool_(True)
    return most <= (0 if bucket <= 0 else buckets[bucket - 1])


def auxk_buckets(cfg, axes: Axes) -> tuple[int, ...]:
    """The static column counts of a device's AuxK buckets (ascending; F/m/q for the
    divisors q of :func:`bucket_divisors`)."""
    return column_buckets(cfg.n_latents // axes.model, cfg.auxk_max_fraction,
                          bucket_divisors(axes))


def _branch(cfg, axes: Axes, dead):
    """(num_dead over the dictionary, the buckets, the switch index: 0 while none is dead,
    else 1 + the index of the smallest bucket that holds the most dead latents any device
    of ``model`` has (the largest when none does, ``lax.switch`` clamping))."""
    local = jnp.sum(dead)
    num_dead = axes.psum_model(local)
    most = axes.pmax_model(local)  # the same bucket on every device of the axis
    buckets = auxk_buckets(cfg, axes)
    return num_dead, buckets, bucket_index(buckets, most)


def sharded_auxk_loss(cfg, axes: Axes, params, b_dec, xs, vals, indices, dead,
                      kernels) -> jax.Array:
    """Scalar float32 AuxK loss inside ``shard_map``; 0 (nothing computed) while no
    latent is dead anywhere. Differentiable (the definition the in-place gradients of
    :func:`sharded_auxk_loss_and_add_grads` are checked against).

    params: this device's blocks (W_enc [F/m, D], b_enc [F/m], W_dec [F, D/m]); b_dec [D]
    (differentiable: this device's share of its gradient); xs [B/d, D] float32 this
    device's rows in the model's space; vals, indices [B/d, K] the merged main selection
    (its reconstruction's residual is the target, not differentiated); dead [F/m] bool,
    this device's latents. Its mean over ``data`` is the loss of the global batch.
    """
    num_dead, buckets, which = _branch(cfg, axes, dead)
    branches = [lambda *_: jnp.float32(0.0)] + [
        functools.partial(_bucket_loss, cfg, axes, kernels, n) for n in buckets]
    return jax.lax.switch(which, branches, params, b_dec, xs, vals, indices, dead, num_dead)


def sharded_auxk_loss_and_add_grads(cfg, axes: Axes, params, xs, vals, indices, dead, grads,
                                    kernels, reconstruction=None, scores=None,
                                    bucket: int | None = None):
    """(AuxK loss, ``grads`` plus ``cfg.auxk_coef`` times the AuxK gradient) inside
    ``shard_map``.

    Arguments as :func:`sharded_auxk_loss` (b_dec is ``params["b_dec"]``); ``grads``: this
    device's gradients of the rest of the objective (a dict like ``params``, before the
    mean over ``data``); ``reconstruction``: the main loss's recon_K [B/d, D/m] float32 of
    (vals, indices) on this device's D slice, if it has it (else the residual's
    reconstruction is gathered again from W_dec); ``scores``: the main encoder's
    pre-activations [B/d, F/m] float32 of this device's block, if the step kept them (the
    dead latents' columns are then read from them, not computed again with a
    [B, D] x [D, n] product). Only the dead latents' rows of the
    W_enc / b_enc / W_dec blocks change, and b_dec's by the sum over ``model`` of the
    devices' shares; with no dead latent the gradients pass through untouched.
    ``bucket``: a static bucket index (1-based into :func:`auxk_buckets`; 0: no AuxK) that
    holds the most dead latents any device has, chosen on the host (no conditional); None:
    found on the device (:func:`~hsae_jax.auxk.loss_and_grads_in_bucket`).
    """
    num_dead, buckets, which = _branch(cfg, axes, dead)
    return loss_and_grads_in_bucket(
        which if bucket is None else bucket, buckets,
        functools.partial(_bucket_loss_and_grads, cfg, axes, kernels), grads,
        params, xs, vals, indices, dead, num_dead, reconstruction, scores)
