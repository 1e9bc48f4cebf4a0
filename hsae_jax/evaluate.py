"""Evaluation of an SAE: FVU at every budget k, MSE, L0, dead latents, dictionary recovery."""

from __future__ import annotations

import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from hsae_jax.kernel_settings import DEFAULT_KERNELS, KernelSettings
from hsae_jax.loss import hierarchical_sae_prefix_sse
from hsae_jax.model import SAEConfig, encode_arrays, fired_latents, scale_inputs


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _batch_sums(cfg: SAEConfig, params, stats, x, k_eval: int, kernels: KernelSettings):
    xs = scale_inputs(stats, x)
    vals, indices = encode_arrays(cfg, params, stats, x, k_eval, kernels)
    sse = hierarchical_sae_prefix_sse(indices, params["W_dec"], vals, params["b_dec"], xs,
                                      backend=kernels.backend, config=kernels.loss)
    fired = fired_latents(indices[:, :cfg.k], vals[:, :cfg.k], cfg.n_latents)
    return {
        "sse": jnp.sum(sse, axis=0),  # [k_eval]
        "sum_x": jnp.sum(xs, axis=0),
        "sum_x2": jnp.sum(xs * xs),
        "l0": jnp.sum(vals[:, :cfg.k] > 0),
        "fired": fired,
    }


def evaluate(cfg: SAEConfig, params, stats, batches: Iterable[jax.Array],
             true_features: jax.Array | None = None, k_eval: int | None = None,
             kernels: KernelSettings = DEFAULT_KERNELS) -> dict:
    """Metrics over ``batches`` of raw activations [B, D].

    Returns a dict with ``fvu_per_k`` (k_eval floats: FVU of the reconstruction from
    the first k latents, k = 1..k_eval; k_eval defaults to K and may exceed it),
    ``fvu`` (at K), ``mse`` (at K, in the scaled space where E||x||^2 = D), ``l0``
    (mean non-zero latents per token), ``dead_fraction`` (latents that never fired in
    the evaluation), ``tokens``, and with ``true_features`` [n, D]
    ``mean_max_cosine``: the mean over true features of the best cosine similarity with
    any decoder row.
    """
    k_eval = k_eval or cfg.k
    totals = None
    n = 0
    for x in batches:
        sums = _batch_sums(cfg, params, stats, x, k_eval, kernels)
        n += x.shape[0]
        totals = sums if totals is None else jax.tree.map(
            lambda a, b: a | b if a.dtype == jnp.bool_ else a + b, totals, sums)
    if totals is None:
        raise ValueError("evaluate() needs at least one batch")
    return summarize(cfg, totals, n, k_eval, params["W_dec"], true_features)


def summarize(cfg: SAEConfig, totals: dict, n: int, k_eval: int, w_dec: jax.Array,
              true_features: jax.Array | None = None) -> dict:
    """:func:`evaluate`'s metrics from the sums over ``n`` tokens (``sse`` [k_eval],
    ``sum_x`` [D], ``sum_x2``, ``l0``, ``fired`` [F] bool, which may be sharded)."""
    sse = np.asarray(totals["sse"], np.float64)
    mean = np.asarray(totals["sum_x"], np.float64) / n
    total_var = float(totals["sum_x2"]) - n * float(mean @ mean)
    fvu_per_k = (sse / total_var).tolist()
    metrics = {
        "fvu_per_k": fvu_per_k,
        "fvu": fvu_per_k[min(cfg.k, k_eval) - 1],
        "mse": float(sse[min(cfg.k, k_eval) - 1] / (n * cfg.d_model)),
        "l0": float(totals["l0"]) / n,
        "dead_fraction": 1.0 - int(jnp.sum(totals["fired"], dtype=jnp.int32))
        / totals["fired"].shape[0],
        "tokens": n,
    }
    if true_features is not None:
        metrics["mean_max_cosine"] = mean_max_cosine(w_dec, true_features)
    return metrics


COSINE_ROWS = 8192
"""Decoder rows compared with the true features at a time by :func:`mean_max_cosine`."""


def mean_max_cosine(w_dec: jax.Array, true_features: jax.Array,
                    rows: int = COSINE_ROWS) -> float:
    """Mean over true features of max_f cos(true feature, decoder row f).

    w_dec [F, D] float32 (any sharding), true_features [n, D] float32; a Python float.
    The decoder rows are taken ``rows`` at a time with a running maximum, so only an
    [n, rows] block of similarities exists at once (the whole [n, F] is 64 GiB at
    n = 2^14, F = 2^20)."""
    return float(_mean_max_cosine(w_dec, true_features, min(rows, w_dec.shape[0])))


@functools.partial(jax.jit, static_argnums=(2,))
def _mean_max_cosine(w_dec, true_features, rows):
    f = w_dec.shape[0]
    t = true_features / jnp.linalg.norm(true_features, axis=1, keepdims=True)

    def best_so_far(i, best):
        # the last block ends at row F, overlapping rows already seen (a max does not mind)
        start = jnp.minimum(i * rows, f - rows)
        w = jax.lax.dynamic_slice_in_dim(w_dec, start, rows)
        w = w / jnp.linalg.norm(w, axis=1, keepdims=True)
        return jnp.maximum(best, jnp.max(t @ w.T, axis=1))  # [n]

    start = jnp.full((t.shape[0],), -jnp.inf, t.dtype)
    return jnp.mean(jax.lax.fori_loop(0, -(-f // rows), best_so_far, start))
