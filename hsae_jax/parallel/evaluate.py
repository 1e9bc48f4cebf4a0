"""Evaluation of a sharded SAE on the training mesh (:func:`hsae_jax.evaluate.evaluate`'s
metrics, no [F, D] matrix gathered).

Each batch is split over ``data`` (padded to a multiple of it with rows that count for
nothing); every device encodes its rows with the merged top k and computes the
per-prefix squared errors of its D slice, summed over ``model`` and the rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from hsae_jax.evaluate import summarize
from hsae_jax.kernel_settings import DEFAULT_KERNELS, KernelSettings
from hsae_jax.loss import hierarchical_sae_prefix_sse
from hsae_jax.model import SAEConfig, scale_inputs
from hsae_jax.parallel.loss import d_slice, encode_local, local_fired
from hsae_jax.parallel.mesh import DATA, MODEL, Layout, tree_specs


@functools.lru_cache(maxsize=16)
def _batch_sums(cfg: SAEConfig, layout: Layout, k_eval: int, kernels: KernelSettings):
    axes = layout.axes

    def local(params, stats, x, valid):
        xs = scale_inputs(stats, x)
        vals, indices = encode_local(cfg, axes, params, stats, x, kernels, k=k_eval)
        sse = hierarchical_sae_prefix_sse(indices, params["W_dec"], vals,
                                          d_slice(axes, params["b_dec"]), d_slice(axes, xs),
                                          backend=kernels.backend, config=kernels.loss)
        keep = valid[:, None]
        vals_k = jnp.where(keep, vals[:, :cfg.k], 0.0)
        fired = local_fired(axes, indices[:, :cfg.k], vals_k, params["b_enc"].shape[0])
        return {
            "sse": axes.psum_all(jnp.sum(jnp.where(keep, sse, 0.0), axis=0)),
            "sum_x": axes.psum_data(jnp.sum(jnp.where(keep, xs, 0.0), axis=0)),
            "sum_x2": axes.psum_data(jnp.sum(jnp.where(keep, xs * xs, 0.0))),
            "l0": axes.psum_data(jnp.sum(vals_k > 0)),
            "fired": axes.psum_data(fired.astype(jnp.int32)) > 0,
        }

    def sums(params, stats, x, valid):
        specs = tree_specs((params, stats))
        out = {"sse": P(), "sum_x": P(), "sum_x2": P(), "l0": P(), "fired": P(MODEL)}
        return jax.shard_map(local, mesh=layout.mesh, in_specs=(*specs, P(DATA), P(DATA)),
                             out_specs=out, check_vma=False)(params, stats, x, valid)

    return jax.jit(sums)


def evaluate_sharded(cfg: SAEConfig, layout: Layout, params, stats, batches,
                     true_features=None, k_eval: int | None = None,
                     kernels: KernelSettings = DEFAULT_KERNELS) -> dict:
    """:func:`hsae_jax.evaluate.evaluate` on parameters laid out by ``layout``; ``batches``
    of raw activations [n, D] (whole batches, on any device or host)."""
    k_eval = k_eval or cfg.k
    fn = _batch_sums(cfg, layout, k_eval, kernels)
    totals, n = None, 0
    for x in batches:
        rows = x.shape[0]
        padded = -rows % layout.axes.data
        host = np.asarray(x)
        if padded:
            host = np.concatenate([host, np.zeros((padded, host.shape[1]), host.dtype)])
        valid = np.arange(rows + padded) < rows
        sums = fn(params, stats, layout.put_batch(host, rows + padded),
                  layout.put_batch(valid, rows + padded))
        n += rows
        totals = sums if totals is None else jax.tree.map(
            lambda a, b: a | b if a.dtype == jnp.bool_ else a + b, totals, sums)
    if totals is None:
        raise ValueError("evaluate() needs at least one batch")
    if true_features is not None:  # beside W_dec on the mesh (with several processes too)
        true_features = jax.device_put(np.asarray(true_features), layout.replicated())
    return summarize(cfg, totals, n, k_eval, params["W_dec"], true_features)
