"""The decoder loss on Triton kernels: the ``"triton"`` and ``"interpret"`` backends.

Both backends run this code; only the launcher differs (jax-triton on a CUDA GPU, or
Triton's interpreter on the CPU), so the interpreter tests exercise the same kernel
source, masking and custom_vjp wiring the GPU runs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hsae_jax import _shapes, backends
from hsae_jax.loss.config import PREFIX_SSE_MAX_K_POW2, TritonLossConfig, WalkConfig
from hsae_jax.loss.xla import XlaLoss
from hsae_jax.segments import segment_row_sums
from hsae_jax.triton_launch import launch


def _f32(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


@dataclasses.dataclass(frozen=True)
class TritonLoss:
    """Kernel-backed implementation, in the form :mod:`hsae_jax.loss.api` calls.

    backend: ``"triton"`` or ``"interpret"``.
    uniform_coef: the caller promises every coefficient ``coef_k`` is the same (the
      default prefix weights); the kernels then read one instead of one per step.
    """

    backend: str
    config: TritonLossConfig = TritonLossConfig()
    uniform_coef: bool = False

    def _kernels(self):
        """walk_kernels.py, imported once Triton's mode for this backend is fixed."""
        backends.import_triton_for(self.backend)
        from hsae_jax.loss import walk_kernels

        return walk_kernels

    def _walk(self, kernel, args, out_shape, zeroed, cfg: WalkConfig, b, f, k, d,
              **constexprs):
        """Launches ``kernel``, one of the walks of walk_kernels.py (``cfg`` resolved)."""
        return launch(
            kernel, *args, out_shape=out_shape,
            grid=(_shapes.cdiv(b, cfg.block_b), _shapes.cdiv(d, cfg.block_d)),
            backend=self.backend, zeroed_outputs=zeroed, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, B=b, F=f, D=d, K=k, BLOCK_B=cfg.block_b,
            BLOCK_D=cfg.block_d, UNIFORM_COEF=self.uniform_coef,
            LOOP_NUM_STAGES=cfg.loop_num_stages, **constexprs)

    def _two_pass_forward(self, indices, weight, vals, bias, target, coef):
        """([B] loss per row, [B, D] float32 final reconstruction): the forward kernel."""
        b, k = indices.shape
        f, d = weight.shape
        cfg = self.config.forward.resolve(b, d)
        args = (indices, weight, bias, vals, target, coef)
        kernel = self._kernels().hierarchical_sae_forward_kernel
        if not self.config.deterministic:
            return self._walk(kernel, args, [_f32(b), _f32(b, d)], (0,), cfg, b, f, k, d,
                              DETERMINISTIC=False)
        loss_parts, final_recon = self._walk(
            kernel, args, [_f32(_shapes.cdiv(d, cfg.block_d), b), _f32(b, d)], (), cfg,
            b, f, k, d, DETERMINISTIC=True)
        return jnp.sum(loss_parts, axis=0), final_recon

    def _fused(self, indices, weight, vals, bias, target, coef):
        """([B] loss per row, (dweight [F, D], dvals [B, K], resid_sum [B, D]), [B, D] final
        reconstruction), float32."""
        b, k = indices.shape
        f, d = weight.shape
        cfg = self.config.fused.resolve(b, d)
        loss_rows, dweight, dvals, resid_sum, final_recon = self._walk(
            self._kernels().hierarchical_sae_fused_kernel,
            (indices, weight, bias, vals, target, coef),
            [_f32(b), _f32(f, d), _f32(b, k), _f32(b, d), _f32(b, d)], (0, 1, 2), cfg,
            b, f, k, d, K_POW2=_shapes.next_power_of_2(k), DETERMINISTIC=False)
        return loss_rows, (dweight, dvals, resid_sum), final_recon

    def _fused_deterministic(self, indices, weight, vals, bias, target, coef):
        """:meth:`_fused` without float atomics, bitwise reproducible.

        A scan over chunks of R rows (R * K <= max(F, BLOCK_B * K): the pair buffer is
        at most the size of dweight): the fused kernel stores every D tile's share of the
        row losses and dvals and every pair's suffix sum [R * K, D]; XLA sums the shares,
        ``segment_row_sums`` sums vals * suffix per latent in pair order, and the chunks
        add into dweight one after another. B is padded to a multiple of R with rows
        whose indices select nothing; their outputs are dropped.
        """
        b, k = indices.shape
        f, d = weight.shape
        cfg = self.config.fused.resolve(b, d)
        rows = max(cfg.block_b, (f // k) // cfg.block_b * cfg.block_b)
        rows = min(rows, _shapes.cdiv(b, cfg.block_b) * cfg.block_b)
        chunks = _shapes.cdiv(b, rows)
        pad = chunks * rows - b

        def split(x, fill):
            x = jnp.pad(x, ((0, pad), (0, 0)), constant_values=fill)
            return x.reshape(chunks, rows, x.shape[1])

        d_tiles = _shapes.cdiv(d, cfg.block_d)

        def chunk(dweight, xs):
            idx_c, vals_c, target_c = xs
            loss_parts, pair_suffix, dvals_parts, resid_sum, final_recon = self._walk(
                self._kernels().hierarchical_sae_fused_kernel,
                (idx_c, weight, bias, vals_c, target_c, coef),
                [_f32(d_tiles, rows), _f32(rows * k, d), _f32(d_tiles, rows, k),
                 _f32(rows, d), _f32(rows, d)], (), cfg, rows, f, k, d,
                K_POW2=_shapes.next_power_of_2(k), DETERMINISTIC=True)
            dweight = segment_row_sums(
                idx_c.reshape(-1), vals_c.reshape(-1).astype(jnp.float32), pair_suffix, f,
                pairs_per_row=1, backend=self.backend, config=self.config.segment_sum,
                base=dweight)
            return dweight, (jnp.sum(loss_parts, axis=0), jnp.sum(dvals_parts, axis=0),
                             resid_sum, final_recon)

        dweight, (loss_rows, dvals, resid_sum, final_recon) = jax.lax.scan(
            chunk, jnp.zeros((f, d), jnp.float32),
            (split(indices, -1), split(vals, 0), split(target, 0)))
        return loss_rows.reshape(-1)[:b], (dweight, dvals.reshape(-1, k)[:b],
                                           resid_sum.reshape(-1, d)[:b]), \
            final_recon.reshape(-1, d)[:b]

    # ------------------------------------------------------------------ the interface

    def value(self, indices, weight, vals, bias, target, coef):
        """([B] float32 sum_k coef_k * ||recon_k - target||^2 per row, [B, D] float32 final
        reconstruction), forward only: the forward kernel."""
        return self._two_pass_forward(indices, weight, vals, bias, target, coef)

    def forward(self, indices, weight, vals, bias, target, coef):
        """Returns ([B] loss per row, residuals for :meth:`backward`, [B, D] float32 final
        reconstruction recon_K).

        The fused variant computes the gradients here, in the same kernel, and keeps them
        as the residuals; the two-pass variant keeps the final reconstruction.
        """
        if self.config.variant == "two_pass":
            loss_rows, final_recon = self._two_pass_forward(indices, weight, vals, bias,
                                                            target, coef)
            return loss_rows, (indices, weight, vals, target, final_recon), final_recon
        if self.config.deterministic:
            return self._fused_deterministic(indices, weight, vals, bias, target, coef)
        return self._fused(indices, weight, vals, bias, target, coef)

    def backward(self, residuals, coef, cotangent):
        """Returns (dweight [F, D], dvals [B, K], resid_sum [B, D]) float32, times cotangent."""
        if self.config.variant == "fused":
            return tuple(cotangent * g for g in residuals)
        indices, weight, vals, target, final_recon = residuals
        b, k = indices.shape
        f, d = weight.shape
        return tuple(self._walk(  # the cotangent rides in the coefficients: no extra pass
            self._kernels().hierarchical_sae_backward_kernel,
            (final_recon, indices, weight, vals, target, coef * cotangent),
            [_f32(f, d), _f32(b, k), _f32(b, d)], (0, 1), self.config.backward.resolve(b, d),
            b, f, k, d, K_POW2=_shapes.next_power_of_2(k)))

    def prefix_sse(self, indices, weight, vals, bias, target):
        """[B, K] float32 per-prefix SSE (forward only)."""
        b, k = indices.shape
        f, d = weight.shape
        if _shapes.next_power_of_2(k) > PREFIX_SSE_MAX_K_POW2:
            return XlaLoss().prefix_sse(indices, weight, vals, bias, target)
        cfg = self.config.prefix_sse.resolve(b, k, d)
        backends.import_triton_for(self.backend)
        from hsae_jax.loss import prefix_sse_kernels

        (sse,) = launch(
            prefix_sse_kernels.hierarchical_sae_prefix_sse_kernel,
            indices, weight, bias, vals, target, out_shape=[_f32(cfg.d_split, b, k)],
            grid=(_shapes.cdiv(b, cfg.block_b), cfg.d_split), backend=self.backend,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            B=b, F=f, D=d, K=k, K_POW2=_shapes.next_power_of_2(k), BLOCK_B=cfg.block_b,
            BLOCK_D=cfg.block_d, TILES_PER_SPLIT=cfg.tiles_per_split(d))
        return jnp.sum(sse, axis=0)
