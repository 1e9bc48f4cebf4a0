"""Pure-JAX decoder loss that never materialises [B, K, D]: the ``"xla"`` backend.

A ``lax.scan`` walks the K latents in chunks of ``chunk`` columns, carrying the running
reconstruction [B, D]; inside a chunk the prefixes are a cumsum over [B, chunk, D].
The backward walks the chunks in reverse from the final reconstruction, carrying the
suffix sum of the per-prefix residual gradients and scatter-adding ``vals * suffix``
into the [F, D] weight gradient (the seed's algorithm, chunked). Temporary memory is
O(B * chunk * D + F * D); runs on CPU, GPU and TPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hsae_jax.loss.config import XlaLossConfig
from hsae_jax.sparse_rows import chunk_latents, safe_indices, unchunk_latents


@dataclasses.dataclass(frozen=True)
class XlaLoss:
    """The xla backend, in the form :mod:`hsae_jax.loss.api`'s custom_vjp calls."""

    config: XlaLossConfig = XlaLossConfig()

    def _prepare(self, indices, weight, vals, coef=None):
        b, k = indices.shape
        f, d = weight.shape
        chunk = self.config.resolve(b, k, d)
        idx = chunk_latents(safe_indices(indices, f), chunk, f)  # padding selects no row
        v = chunk_latents(vals.astype(jnp.float32), chunk, 0.0)
        c = None
        if coef is not None:
            c = jnp.pad(coef, (0, -k % chunk)).reshape(-1, chunk)
        return idx, v, c

    def prefix_sse(self, indices, weight, vals, bias, target):
        """[B, K] float32 per-prefix SSE (forward only)."""
        return self._forward_scan(indices, weight, vals, bias, target)[0]

    def value(self, indices, weight, vals, bias, target, coef):
        """([B] float32 sum_k coef_k * ||recon_k - target||^2 per row, [B, D] float32 final
        reconstruction), forward only."""
        sse, final_recon = self._forward_scan(indices, weight, vals, bias, target)
        return sse @ coef, final_recon

    def forward(self, indices, weight, vals, bias, target, coef):
        """Returns ([B] loss per row, residuals for :meth:`backward`, [B, D] float32 final
        reconstruction recon_K)."""
        sse, final_recon = self._forward_scan(indices, weight, vals, bias, target)
        return sse @ coef, (indices, weight, vals, target, final_recon), final_recon

    def _forward_scan(self, indices, weight, vals, bias, target):
        """([B, K] per-prefix SSE, [B, D] final reconstruction), float32."""
        idx, v, _ = self._prepare(indices, weight, vals)
        t = target.astype(jnp.float32)
        b, d = t.shape

        def step(recon, xs):
            idx_c, v_c = xs
            rows = jnp.take(weight, idx_c, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
            prefix = recon[:, None, :] + jnp.cumsum(v_c[..., None] * rows, axis=1)
            diff = prefix - t[:, None, :]
            return prefix[:, -1, :], jnp.sum(diff * diff, axis=-1)

        recon0 = jnp.broadcast_to(bias.astype(jnp.float32), (b, d))
        final_recon, sse = jax.lax.scan(step, recon0, (idx, v))
        return unchunk_latents(sse, indices.shape[1]), final_recon

    def backward(self, residuals, coef, cotangent):
        """Returns (dweight [F, D], dvals [B, K], resid_sum [B, D]) float32, times cotangent.

        coef [K] float32 is d loss / d (r_k^2) per element; resid_sum is
        sum_k 2 * coef_k * r_k, the gradient of the loss with respect to the bias per row.
        """
        indices, weight, vals, target, final_recon = residuals
        idx, v, c = self._prepare(indices, weight, vals, coef * cotangent)
        t = target.astype(jnp.float32)
        f, d = weight.shape

        def step(carry, xs):
            recon_end, suffix, dweight = carry
            idx_c, v_c, c_c = xs
            rows = jnp.take(weight, idx_c, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
            contrib = v_c[..., None] * rows  # [B, chunk, D]
            recon_start = recon_end - jnp.sum(contrib, axis=1)
            prefix = recon_start[:, None, :] + jnp.cumsum(contrib, axis=1)
            grad = (2.0 * c_c)[None, :, None] * (prefix - t[:, None, :])
            suffix_c = suffix[:, None, :] + jnp.cumsum(grad[:, ::-1], axis=1)[:, ::-1]
            dvals = jnp.sum(rows * suffix_c, axis=-1)
            dweight = dweight.at[idx_c].add(v_c[..., None] * suffix_c, mode="drop")
            return (recon_start, suffix_c[:, 0, :], dweight), dvals

        init = (final_recon, jnp.zeros_like(final_recon), jnp.zeros((f, d), jnp.float32))
        (_, resid_sum, dweight), dvals = jax.lax.scan(step, init, (idx, v, c), reverse=True)
        return dweight, unchunk_latents(dvals, indices.shape[1]), resid_sum
