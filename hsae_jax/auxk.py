"""AuxK: the auxiliary loss that gives dead latents a gradient (OpenAI's TopK SAE recipe).

When some latents are dead (not fired for ``dead_tokens`` tokens), the residual of the main
reconstruction is reconstructed from the top ``aux_k`` dead latents of each token:

    a    = relu(top_{aux_k} over the dead latents f of pre[b, f])     (zero elsewhere)
    loss = min(n_dead / aux_k, 1) * mean_{b,d}(residual - a @ W_dec)^2 / var(residual)

Only the dead latents' columns are computed: their rows of W_enc, b_enc and W_dec are
gathered, their pre-activations are one [B, D] x [D, n] matmul, each token's top aux_k of
them kept through the ReLU (:func:`hsae_jax.topk.top_k_relu`: a radix select, no sort,
ties to the lower latent as ``top_k`` breaks them; one kernel writes the activations), and
the reconstruction a dense [B, n] x [n, D] product of those activations (the operands in
``SAEConfig.auxk_dtype``: :func:`auxk_dot`). n is a static bucket that holds every dead
latent (F/64, F/32, ..., F; ``lax.switch`` takes the smallest that fits), so a step costs a
few matmuls over at most twice the dead latents' columns, instead of a second [B, F]
encoder pass, a top-k with k = aux_k over F and a decoder walk over aux_k rows per token.
With ``auxk_max_fraction`` < 1 the largest bucket is smaller (its memory is compiled in
whether or not latents are dead), and beyond it the lowest-numbered dead latents take part,
the others once those have revived.

Two entry points:
- :func:`auxk_loss`: the value, differentiable (for a model's ``loss``);
- :func:`auxk_loss_and_add_grads`: what the trainer calls after the main gradients: the
  value, and ``auxk_coef`` times its gradient added in place to the dead latents' rows of
  the gradients, in the bucket the caller names (the trainer's step: chosen on the host
  from a bound on the dead count, no conditional) or else inside two-way ``lax.cond``s
  (one switch would make XLA copy the [F, D] gradients in every branch;
  :func:`loss_and_grads_in_bucket`), so a step with no dead latent does nothing at all and
  one with some touches only their rows.
``auxk_loss_reference`` is the definition written plainly (the full encoder with the live
latents masked off, then the TopK decoder loss); the tests check both against it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hsae_jax.encoder import topk_encode
from hsae_jax.kernel_settings import KernelSettings
from hsae_jax.loss import topk_sae_loss
from hsae_jax.sparse_rows import weighted_row_sum
from hsae_jax.topk import top_k_relu

BUCKET_DIVISORS = (64, 32, 16, 8, 4, 2, 1)  # column buckets F / q for the dead latents
ROW_PARAMS = ("W_enc", "b_enc", "W_dec")  # the parameters with one row per latent


def column_buckets(n_latents: int, max_fraction: float = 1.0,
                   divisors: tuple[int, ...] = BUCKET_DIVISORS) -> tuple[int, ...]:
    """The static column counts a step may compute AuxK on, smallest first: F / q for the
    ``divisors`` q with 1 / q <= ``max_fraction`` (at least the largest divisor's)."""
    kept = [q for q in divisors if q * max_fraction >= 1] or [divisors[0]]
    return tuple(sorted({max(1, n_latents // q) for q in kept}))


def _cast(compute_dtype: str, x):
    return x.astype(jnp.bfloat16) if compute_dtype == "bfloat16" else x


def auxk_dot(auxk_dtype: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` [M, N] float32 for AuxK (``SAEConfig.auxk_dtype``): ``"float32"``, the
    operands as they are; ``"bfloat16"``, both operands rounded to bfloat16 and, in the
    backward pass, the cotangent too, so that all three products are bfloat16 x bfloat16
    with float32 accumulation (half the time of TF32 on a Hopper GPU)."""
    if auxk_dtype == "bfloat16":
        return _bf16_dot(a.astype(jnp.float32), b.astype(jnp.float32))
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _bf16_dot(a, b):  # float32 a, b
    return _bf16_dot_fwd(a, b)[0]


def _dot16(a16, b16):
    """bfloat16 a16 @ b16 with float32 accumulation. On the CPU, whose runtime cannot run
    every bfloat16 x bfloat16 -> float32 dot ("Unsupported element type for
    DotThunk::Execute" in the sharded step), the same products in float32: a product of
    two bfloat16 values is exact in float32."""
    if jax.default_backend() == "cpu":
        return jnp.dot(a16.astype(jnp.float32), b16.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return jnp.dot(a16, b16, preferred_element_type=jnp.float32)


def _bf16_dot_fwd(a, b):
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    return _dot16(a16, b16), (a16, b16)


def _bf16_dot_bwd(saved, g):
    a16, b16 = saved
    g16 = g.astype(jnp.bfloat16)
    return _dot16(g16, b16.T), _dot16(a16.T, g16)


_bf16_dot.defvjp(_bf16_dot_fwd, _bf16_dot_bwd)


def main_residual(params, xs, vals, indices, b_dec=None) -> jax.Array:
    """[B, D] float32: xs minus the main reconstruction from (vals, indices), constant.
    ``b_dec``: the decoder bias to use (default ``params["b_dec"]``; a D slice of it when
    ``xs`` and ``params["W_dec"]`` are that slice's columns)."""
    b_dec = params["b_dec"] if b_dec is None else b_dec
    recon0 = jnp.broadcast_to(b_dec.astype(jnp.float32), xs.shape)
    recon = weighted_row_sum(params["W_dec"], indices, vals, 8, recon0)
    return jax.lax.stop_gradient(xs - recon)


def _normalized(err, residual, num_dead, aux_k):
    """err / var(residual), scaled down while fewer than aux_k latents are dead."""
    variance = jnp.mean((residual - jnp.mean(residual, axis=0)) ** 2)
    scale = jnp.minimum(num_dead / aux_k, 1.0)
    return jnp.where(variance > 0, scale * err / variance, 0.0)


def distinct_padding(indices: jax.Array, f: int) -> jax.Array:
    """``indices`` [n] with each one >= f (padding) replaced by f + its position: off the
    end of [0, f) and all distinct, so a scatter onto them can say ``unique_indices``
    (which a GPU runs without atomics, and XLA's deterministic mode leaves as it is)."""
    return jnp.where(indices < f, indices, f + jnp.arange(indices.shape[0], dtype=indices.dtype))


def _dead_rows(params, dead, columns: int):
    """(latents [n] ascending, padded past F; their rows of W_enc, b_enc, W_dec; b_dec)."""
    f = params["W_enc"].shape[0]
    latents = distinct_padding(jnp.nonzero(dead, size=columns, fill_value=f)[0], f)
    rows = {name: jnp.take(params[name], latents, axis=0, mode="fill", fill_value=0)
            for name in ROW_PARAMS}
    return latents, {**rows, "b_dec": params["b_dec"]}


def dead_preactivations(compute_dtype: str, xs, w_enc, b_enc, b_dec, is_dead,
                        auxk_dtype: str = "float32") -> jax.Array:
    """[B, n] float32 pre-activations of the columns ``w_enc`` [n, D] / ``b_enc`` [n] (the
    encoder's arithmetic, :func:`hsae_jax.encoder.topk_encode`, on them only; the product
    through :func:`auxk_dot`), -inf where ``is_dead`` [n] is False (padding). xs [B, D]
    float32; b_dec [D], differentiable.

    b_dec's gradient through ``xs - b_dec`` is -(sum_b d_pre[b]) @ w_enc: it is taken as one
    mat-vec through a term that is exactly zero, instead of a [B, n] x [n, D] product summed
    over B.
    """
    x = _cast(compute_dtype, xs)
    xc = x - jax.lax.stop_gradient(b_dec).astype(x.dtype)
    zero = jnp.dot(w_enc.astype(jnp.float32), b_dec - jax.lax.stop_gradient(b_dec))
    pre = auxk_dot(auxk_dtype, xc, _cast(compute_dtype, w_enc).T.astype(x.dtype)
                   ) + b_enc.astype(jnp.float32)
    return jnp.where(is_dead[None, :], pre - zero, -jnp.inf)


def given_preactivations(compute_dtype: str, scores, xs, w_enc, b_enc, b_dec,
                         auxk_dtype: str = "float32") -> jax.Array:
    """:func:`dead_preactivations` whose values are given: ``scores`` [B, n] float32, these
    columns of the main encoder's pre-activations (the same arithmetic, computed once), -inf
    already in the columns that are not dead latents. Differentiated as computed here:
    w_enc's gradient d^T @ xc (operands in ``auxk_dtype``), b_enc's the sum of d over B,
    b_dec's -(that sum) @ w_enc, with xc = xs - b_dec."""
    xc = _cast(compute_dtype, xs)
    xc = xc - jax.lax.stop_gradient(b_dec).astype(xc.dtype)
    return _valued_preactivations(auxk_dtype, scores, xc, w_enc, b_enc, b_dec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _valued_preactivations(auxk_dtype, scores, xc, w_enc, b_enc, b_dec):
    return scores


def _valued_fwd(auxk_dtype, scores, xc, w_enc, b_enc, b_dec):
    return scores, (xc, w_enc, b_enc, b_dec)


def _valued_bwd(auxk_dtype, saved, d):
    xc, w_enc, b_enc, b_dec = saved
    d_bias = jnp.sum(d, axis=0)
    d_w_enc = auxk_dot(auxk_dtype, d.T, xc.astype(jnp.float32))
    d_b_dec = -jnp.dot(d_bias, w_enc.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (jnp.zeros_like(d), jnp.zeros_like(xc), d_w_enc.astype(w_enc.dtype),
            d_bias.astype(b_enc.dtype), d_b_dec.astype(b_dec.dtype))


_valued_preactivations.defvjp(_valued_fwd, _valued_bwd)


def _loss_on_rows(cfg, kernels: KernelSettings, rows, xs, residual, is_dead, num_dead):
    """The AuxK loss from the dead latents' rows (W_enc [n, D], b_enc [n], W_dec [n, D]) and
    b_dec; ``is_dead`` [n] marks the real ones (the rest is padding)."""
    aux_k = cfg.resolved_aux_k
    pre = dead_preactivations(cfg.compute_dtype, xs, rows["W_enc"], rows["b_enc"],
                              rows["b_dec"], is_dead, cfg.auxk_dtype)
    if pre.shape[1] > aux_k:  # else every dead latent is among a token's top aux_k
        acts = top_k_relu(pre, aux_k, backend=kernels.backend, config=kernels.topk)
    else:
        acts = jax.nn.relu(pre)
    w_dec = _cast(cfg.compute_dtype, rows["W_dec"]).astype(jnp.float32)
    recon = auxk_dot(cfg.auxk_dtype, acts, w_dec)  # [B, D]
    err = jnp.mean((residual - recon) ** 2)
    return _normalized(err, residual, num_dead, aux_k)


def _bucket_loss(cfg, kernels, columns, params, xs, vals, indices, dead, num_dead):
    latents, rows = _dead_rows(params, dead, columns)
    residual = main_residual(params, xs, vals, indices)
    return _loss_on_rows(cfg, kernels, rows, xs, residual, latents < cfg.n_latents, num_dead)


def _bucket_loss_and_grads(cfg, kernels, columns, grads, params, xs, vals, indices, dead,
                           num_dead):
    latents, rows = _dead_rows(params, dead, columns)
    residual = main_residual(params, xs, vals, indices)
    is_dead = latents < cfg.n_latents
    loss, vjp = jax.vjp(
        lambda r: _loss_on_rows(cfg, kernels, r, xs, residual, is_dead, num_dead), rows)
    (d,) = vjp(jnp.float32(cfg.auxk_coef))
    grads = dict(grads)
    for name in ROW_PARAMS:  # padding rows (latent F) fall off the end
        grads[name] = grads[name].at[latents].add(d[name].astype(grads[name].dtype),
                                                  mode="drop", unique_indices=True)
    grads["b_dec"] = grads["b_dec"] + d["b_dec"].astype(grads["b_dec"].dtype)
    return loss, grads


def bucket_index(buckets: tuple[int, ...], count: jax.Array) -> jax.Array:
    """int32: 0 while ``count`` is 0, else 1 + the index of the smallest of ``buckets``
    (ascending) that holds ``count`` columns (len(buckets) + 1 beyond the largest). A count
    of the buckets below it, not ``jnp.searchsorted``, whose scan is a loop."""
    below = jnp.sum(jnp.asarray(buckets) < count, dtype=jnp.int32)
    return jnp.where(count > 0, 1 + below, 0)


def static_bucket_index(buckets: tuple[int, ...], count: int) -> int:
    """:func:`bucket_index` on the host, clamped to the largest bucket: the static
    ``bucket`` that holds ``count`` dead latents (0: none)."""
    if count <= 0:
        return 0
    return min(1 + sum(1 for n in buckets if n < count), len(buckets))


def _branch(dead, cfg):
    """(dead latents, :func:`bucket_index` of their count: 0 while none is dead, beyond
    the largest bucket the largest, ``lax.switch`` clamping)."""
    num_dead = jnp.sum(dead)
    return num_dead, bucket_index(column_buckets(cfg.n_latents, cfg.auxk_max_fraction),
                                  num_dead)


def auxk_loss(cfg, params, xs, vals, indices, dead, kernels: KernelSettings) -> jax.Array:
    """Scalar float32 AuxK loss; 0 (and nothing computed) while no latent is dead.

    cfg: the SAEConfig (n_latents F, aux_k, compute_dtype). params: W_enc [F, D], b_enc [F],
    W_dec [F, D], b_dec [D]. xs: [B, D] float32 inputs in the model's space. vals, indices:
    [B, K] the main encoder's selection (its reconstruction's residual is the target, not
    differentiated). dead: [F] bool.
    """
    num_dead, which = _branch(dead, cfg)
    branches = [lambda *_: jnp.float32(0.0)] + [
        functools.partial(_bucket_loss, cfg, kernels, n)
        for n in column_buckets(cfg.n_latents, cfg.auxk_max_fraction)]
    return jax.lax.switch(which, branches, params, xs, vals, indices, dead, num_dead)


def auxk_loss_and_add_grads(cfg, params, xs, vals, indices, dead, grads,
                            kernels: KernelSettings, bucket: int | None = None):
    """(AuxK loss, ``grads`` plus ``cfg.auxk_coef`` times the AuxK gradient).

    Arguments as :func:`auxk_loss`; ``grads``: the gradients of the rest of the objective
    (a dict like ``params``). Only the dead latents' rows (and b_dec) change; with no dead
    latent the gradients pass through untouched. ``bucket``: a static bucket index
    (:func:`static_bucket_index` of a bound on the dead count) instead of the one the
    device finds (:func:`loss_and_grads_in_bucket`).
    """
    num_dead, which = _branch(dead, cfg)
    buckets = column_buckets(cfg.n_latents, cfg.auxk_max_fraction)
    return loss_and_grads_in_bucket(
        which if bucket is None else bucket, buckets,
        functools.partial(_bucket_loss_and_grads, cfg, kernels), grads,
        params, xs, vals, indices, dead, num_dead)


def loss_and_grads_in_bucket(which, buckets: tuple[int, ...], bucket_loss_and_grads, grads,
                             *args):
    """(loss, grads) of ``bucket_loss_and_grads(n, grads, *args)`` for the bucket n that
    ``which`` names: 0 none ((0, grads) untouched), i the i-th of ``buckets`` (beyond the
    last: the last, more dead latents than it holds).

    ``which`` a Python int (a static bucket, chosen on the host from a bound on the dead
    count: :class:`hsae_jax.train.auxk_buckets.AuxKBuckets`): that bucket's function
    alone, no conditional. The bucket must hold every dead latent (or be the last): a
    larger one gives the same loss and gradients (its extra columns are padding).

    ``which`` an array (found on the device): one two-way ``lax.cond`` per bucket rather
    than one ``lax.switch``: XLA then updates the gradients in place (through a switch
    whose branches scatter into them, or pass them through, it copies every [F, D]
    gradient first, even in the branch without dead latents). On a GPU each cond is a
    round trip to the host (its predicate is read there): 0.3-0.38 ms each after an
    encoder-sized matmul on an H100 (benchmarks/cond_cost.py), and the seven of an idle
    AuxK cost the trainer's step 0.65 ms: the trainer picks the bucket on the host.
    """
    if isinstance(which, int):
        if which <= 0:
            return jnp.float32(0.0), grads
        return bucket_loss_and_grads(buckets[min(which, len(buckets)) - 1], grads, *args)
    which = jnp.minimum(which, len(buckets))
    loss = jnp.float32(0.0)
    for i, n in enumerate(buckets):
        part, grads = jax.lax.cond(
            which == i + 1, functools.partial(bucket_loss_and_grads, n),
            lambda grads, *_: (jnp.float32(0.0), grads), grads, *args)
        loss = loss + part
    return loss, grads


def auxk_loss_reference(cfg, params, xs, vals, indices, dead,
                        kernels: KernelSettings) -> jax.Array:
    """:func:`auxk_loss` by its definition: the whole encoder with every live latent's
    pre-activation pushed to -1e30, its top aux_k, and the TopK decoder loss on them."""
    num_dead = jnp.sum(dead)
    residual = main_residual(params, xs, vals, indices)
    aux_k = cfg.resolved_aux_k
    only_dead = jnp.where(dead, 0.0, -1e30).astype(jnp.float32)
    aux_vals, aux_indices = topk_encode(_cast(cfg.compute_dtype, xs),
                                        _cast(cfg.compute_dtype, params["W_enc"]),
                                        params["b_enc"] + only_dead, params["b_dec"], aux_k,
                                        backend=kernels.backend, topk_config=kernels.topk,
                                        config=kernels.encoder)
    zero_bias = jnp.zeros((cfg.d_model,), jnp.float32)
    err = topk_sae_loss(aux_indices, _cast(cfg.compute_dtype, params["W_dec"]), aux_vals,
                        zero_bias, residual, backend=kernels.backend, config=kernels.loss)
    return jnp.where(num_dead > 0, _normalized(err, residual, num_dead, aux_k), 0.0)
