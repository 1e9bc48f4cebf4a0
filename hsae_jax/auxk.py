"""AuxK: the auxiliary loss that gives dead latents a gradient (OpenAI's TopK SAE recipe).

When some latents are dead (not fired for ``dead_tokens`` tokens), the residual of the main
reconstruction is reconstructed from the top ``aux_k`` dead latents of each token:

    a    = relu(top_{aux_k} over the dead latents f of pre[b, f])     (zero elsewhere)
    loss = min(n_dead / aux_k, 1) * mean_{b,d}(residual - a @ W_dec)^2 / var(residual)

``auxk_loss`` computes only the dead latents' columns: their pre-activations (a
[B, D] x [D, n] matmul over n columns), their top aux_k per token, and the
reconstruction as a dense [B, n] x [n, D] product; autodiff gives the gradients of the
dead latents' encoder and decoder rows, b_enc and b_dec. n is a static bucket that holds
every dead latent (F/64, F/16, F/4 or F; ``lax.switch`` takes the smallest that fits; with
``auxk_max_fraction`` < 1 the largest bucket is smaller, and beyond it the lowest-numbered
dead latents take part, the others when those have revived), so
a step with a few dead latents costs a few small matmuls instead of a second [B, F]
encoder pass, a top-k with k = aux_k over F and a decoder walk over aux_k rows per token.
``auxk_loss_reference`` is that definition written plainly (the full encoder with the live
latents masked off, then the TopK decoder loss); the tests check one against the other.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hsae_jax.encoder import topk_encode
from hsae_jax.kernel_settings import KernelSettings
from hsae_jax.loss import topk_sae_loss
from hsae_jax.sparse_rows import weighted_row_sum
from hsae_jax.topk import top_k

BUCKET_DIVISORS = (64, 16, 4, 1)  # column buckets F / q for the dead latents


def column_buckets(n_latents: int, max_fraction: float = 1.0) -> tuple[int, ...]:
    """The static column counts a step may compute AuxK on, smallest first: F / q for the
    divisors with 1 / q <= ``max_fraction`` (at least F / 64)."""
    kept = [q for q in BUCKET_DIVISORS if q * max_fraction >= 1] or [BUCKET_DIVISORS[0]]
    return tuple(sorted({max(1, n_latents // q) for q in kept}))


def _cast(compute_dtype: str, x):
    return x.astype(jnp.bfloat16) if compute_dtype == "bfloat16" else x


def main_residual(params, xs, vals, indices) -> jax.Array:
    """[B, D] float32: xs minus the main reconstruction from (vals, indices), constant."""
    recon0 = jnp.broadcast_to(params["b_dec"].astype(jnp.float32), xs.shape)
    recon = weighted_row_sum(params["W_dec"], indices, vals, 8, recon0)
    return jax.lax.stop_gradient(xs - recon)


def _normalized(err, residual, num_dead, aux_k):
    """err / var(residual), scaled down while fewer than aux_k latents are dead."""
    variance = jnp.mean((residual - jnp.mean(residual, axis=0)) ** 2)
    scale = jnp.minimum(num_dead / aux_k, 1.0)
    return jnp.where(variance > 0, scale * err / variance, 0.0)


def _dead_columns_loss(cfg, params, xs, vals, indices, dead, num_dead,
                       kernels: KernelSettings, columns: int):
    """The AuxK loss computed on ``columns`` >= num_dead columns holding the dead latents."""
    f, aux_k = cfg.n_latents, cfg.resolved_aux_k
    residual = main_residual(params, xs, vals, indices)
    latents = jnp.nonzero(dead, size=columns, fill_value=f)[0]  # [n] ascending; f: padding
    is_dead = latents < f
    w_enc = jnp.take(params["W_enc"], latents, axis=0, mode="fill", fill_value=0)  # [n, D]
    b_enc = jnp.take(params["b_enc"], latents, mode="fill", fill_value=0)  # [n]
    w_dec = jnp.take(params["W_dec"], latents, axis=0, mode="fill", fill_value=0)  # [n, D]
    # the encoder's arithmetic (hsae_jax.encoder.topk_encode) on the dead columns only
    x = _cast(cfg.compute_dtype, xs)
    xc = x - params["b_dec"].astype(x.dtype)
    pre = jnp.dot(xc, _cast(cfg.compute_dtype, w_enc).T.astype(x.dtype),
                  preferred_element_type=jnp.float32) + b_enc.astype(jnp.float32)
    pre = jnp.where(is_dead[None, :], pre, -jnp.inf)  # [B, n]; padding never contributes
    if columns <= aux_k:  # every dead latent is among a token's top aux_k
        acts = jax.nn.relu(pre)
    else:
        values, positions = top_k(pre, aux_k, backend=kernels.backend, config=kernels.topk)
        rows = jnp.arange(pre.shape[0])[:, None]
        acts = jnp.zeros_like(pre).at[rows, positions].set(jax.nn.relu(values))
    w_dec = _cast(cfg.compute_dtype, w_dec).astype(jnp.float32)
    recon = jnp.dot(acts, w_dec, preferred_element_type=jnp.float32)  # [B, D]
    err = jnp.mean((residual - recon) ** 2)
    return _normalized(err, residual, num_dead, aux_k)


def auxk_loss(cfg, params, xs, vals, indices, dead, kernels: KernelSettings) -> jax.Array:
    """Scalar float32 AuxK loss; 0 (and nothing computed) while no latent is dead.

    cfg: the SAEConfig (n_latents F, aux_k, compute_dtype). params: W_enc [F, D], b_enc [F],
    W_dec [F, D], b_dec [D]. xs: [B, D] float32 inputs in the model's space. vals, indices:
    [B, K] the main encoder's selection (its reconstruction's residual is the target, not
    differentiated). dead: [F] bool.
    """
    num_dead = jnp.sum(dead)
    buckets = column_buckets(cfg.n_latents, cfg.auxk_max_fraction)
    branches = [lambda *_: jnp.float32(0.0)] + [
        functools.partial(_dead_columns_loss, cfg, kernels=kernels, columns=n)
        for n in buckets]
    which = jnp.where(num_dead > 0, 1 + jnp.searchsorted(jnp.asarray(buckets), num_dead), 0)
    return jax.lax.switch(which, branches, params, xs, vals, indices, dead, num_dead)


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
