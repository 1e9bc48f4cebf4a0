"""The update after the gradients, for parameters split over the ``model`` axis.

Adam is elementwise, so its moments simply follow their parameters' shardings; what
needs the whole of a parameter is a reduction, and each gets its ``psum`` here:

- the global gradient norm (clipping, the ``grad_norm`` metric): squares summed on each
  device, then over ``model`` for the split arrays (``b_dec`` is whole everywhere);
- the W_dec gradient's component along each row, and the rows' unit norm after the
  update: W_dec is split over D, so row dot products and norms are summed over ``model``;
- whether a step is finite: a non-finite gradient on one device skips the step on all.

:func:`adam`: moments in float32 (default) or bfloat16, for parameters in float32 or
bfloat16 (the memory options of ``hsae plan``); bfloat16 parameters take their float32
update with stochastic rounding (:func:`add_stochastically_rounded`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from hsae_jax.model import normalize_decoder, project_decoder_grad
from hsae_jax.parallel.mesh import Axes, model_sharded


def global_norm(axes: Axes, tree) -> jax.Array:
    """sqrt of the sum of squares of every array of ``tree`` over the whole mesh (arrays
    split over ``model`` are summed over it; ``tree`` is the same over ``data``)."""
    if axes.model == 1:
        return optax.tree.norm(tree) if hasattr(optax, "tree") else optax.global_norm(tree)
    split, whole = jnp.float32(0.0), jnp.float32(0.0)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        squares = jnp.sum(jnp.square(leaf.astype(jnp.float32)))
        if model_sharded(path, leaf):
            split = split + squares
        else:
            whole = whole + squares
    return jnp.sqrt(axes.psum_model(split) + whole)


def clip_by_global_norm(max_norm: float, axes: Axes) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` with the norm over the whole mesh (same state)."""
    if axes.model == 1:
        return optax.clip_by_global_norm(max_norm)

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        norm = global_norm(axes, updates)
        trigger = jnp.squeeze(norm < max_norm)
        updates = jax.tree.map(
            lambda t: jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * max_norm),
            updates)
        return updates, state

    return optax.GradientTransformation(init, update)


def scale_by_adam(moment_dtype, b1: float = 0.9, b2: float = 0.999,
                  eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam's scaling with both moments stored in ``moment_dtype`` (bfloat16: rounded
    stochastically) and computed in float32 (optax's ``scale_by_adam`` keeps nu in the
    parameters' dtype); the state is optax's ``ScaleByAdamState``, so checkpoints have the
    same structure."""

    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, moment_dtype)  # noqa: E731
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                      mu=jax.tree.map(zeros, params),
                                      nu=jax.tree.map(zeros, params))

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
        mu = jax.tree.map(lambda g, m: b1 * f32(m) + (1 - b1) * f32(g), updates, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * f32(v) + (1 - b2) * jnp.square(f32(g)), updates,
                          state.nu)
        c1 = 1 - b1 ** count.astype(jnp.float32)
        c2 = 1 - b2 ** count.astype(jnp.float32)
        out = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
        if moment_dtype == jnp.bfloat16:  # nu's increments are ~1e-3 of it: round fairly
            store = lambda t, g: round_stochastically(t, g)  # noqa: E731
        else:
            store = lambda t, g: t.astype(moment_dtype)  # noqa: E731
        return out, optax.ScaleByAdamState(count=count, mu=jax.tree.map(store, mu, updates),
                                           nu=jax.tree.map(store, nu, updates))

    return optax.GradientTransformation(init, update)


def adam(learning_rate, moment_dtype: str = "float32",
         param_dtype: str = "float32") -> optax.GradientTransformation:
    """``optax.adam`` (float32 parameters and moments), else :func:`scale_by_adam` with
    moments in ``moment_dtype``."""
    if moment_dtype == "float32" and param_dtype == "float32":
        return optax.adam(learning_rate)
    return optax.chain(scale_by_adam(jnp.dtype(moment_dtype)),
                       optax.scale_by_learning_rate(learning_rate))


def round_stochastically(x, source):
    """float32 ``x`` to bfloat16, up with the probability of the dropped fraction (so small
    increments survive on average, where round-to-nearest drops them). The random bits
    are a hash of ``source``'s bits (float32, x's shape): deterministic, and the same on
    every device that holds the array."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    noise = (jax.lax.bitcast_convert_type(source.astype(jnp.float32), jnp.uint32)
             * jnp.uint32(0x9E3779B1)) >> 16
    rounded = jax.lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32)
    return jnp.where(jnp.isfinite(x), rounded, x).astype(jnp.bfloat16)


def add_stochastically_rounded(param, update):
    """``param + update`` in float32, stored in bfloat16 by :func:`round_stochastically`
    (updates far below a bfloat16 step still move the weights on average)."""
    return round_stochastically(param.astype(jnp.float32) + update.astype(jnp.float32), update)


def apply_updates(params, updates):
    """``optax.apply_updates``, with bfloat16 parameters rounded stochastically."""
    if all(p.dtype == jnp.float32 for p in jax.tree.leaves(params)):
        return optax.apply_updates(params, updates)
    return jax.tree.map(lambda p, u: add_stochastically_rounded(p, u)
                        if p.dtype == jnp.bfloat16 else (p + u).astype(p.dtype), params, updates)


def all_finite(axes: Axes, loss, grads, *, gradients: bool | None = None):
    """Whether ``loss`` and, on every device of ``model``, every gradient are finite.
    ``gradients``: check the gradients (default: with the dictionary split over ``model``;
    on one block optax.apply_if_finite checks the whole gradients itself)."""
    finite = jnp.isfinite(loss)
    if not (axes.model > 1 if gradients is None else gradients):
        return finite
    local = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    return finite & (axes.psum_model(1 - local.astype(jnp.int32)) == 0)


def project_decoder_grad_sharded(axes: Axes, w_dec, grad):
    """:func:`hsae_jax.model.project_decoder_grad` on W_dec's columns [F, D/m]."""
    if axes.model == 1:
        return project_decoder_grad(w_dec, grad)
    w = w_dec.astype(jnp.float32)
    dots = axes.psum_model(jnp.sum(grad.astype(jnp.float32) * w, axis=1, keepdims=True))
    return (grad - dots * w).astype(grad.dtype)


def normalize_decoder_sharded(axes: Axes, w_dec):
    """:func:`hsae_jax.model.normalize_decoder` on W_dec's columns [F, D/m]."""
    if axes.model == 1 and w_dec.dtype == jnp.float32:
        return normalize_decoder(w_dec)
    w = w_dec.astype(jnp.float32)
    norm = jnp.sqrt(axes.psum_model(jnp.sum(w * w, axis=1, keepdims=True)))
    return (w / jnp.maximum(norm, 1e-12)).astype(w_dec.dtype)


def apply_gradients(tx: optax.GradientTransformation, axes: Axes, params, opt_state, grads,
                    loss):
    """The step after the gradients on this device's blocks: (params, opt_state, grad_norm).

    The W_dec gradient's component along each row is removed, clip + Adam run (an update
    is skipped when ``loss`` or any gradient on any device is not finite), and W_dec rows
    are renormalised; a skipped update leaves ``params`` unchanged. ``tx`` must clip with
    the norm over the mesh (:func:`hsae_jax.train.step.make_optimizer` given the layout).
    """
    finite = all_finite(axes, loss, grads)
    # gradients of bfloat16 parameters: the update is computed in float32
    grads = jax.tree.map(lambda g: jnp.where(finite, g.astype(jnp.float32), jnp.nan), grads)
    grads["W_dec"] = project_decoder_grad_sharded(axes, params["W_dec"], grads["W_dec"])
    updates, opt_state = tx.update(grads, opt_state, params)
    new_params = apply_updates(params, updates)
    new_params["W_dec"] = normalize_decoder_sharded(axes, new_params["W_dec"])
    finite = opt_state.last_finite
    params = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_params, params)
    return params, opt_state, global_norm(axes, grads)
