"""The decoder loss on Triton kernels: the ``"triton"`` and ``"interpret"`` backends.

Both backends run this code; only the launcher differs (jax-triton on a CUDA GPU, or
Triton's interpreter on the CPU), so the interpreter tests exercise the same kernel
source, padding and custom_vjp wiring the GPU runs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hsae_jax import _shapes
from hsae_jax.loss.config import TritonLossConfig
from hsae_jax.triton_launch import kernel_module, launch

_SEED = "hsae_jax.loss.seed_kernels"
_FUSED = "hsae_jax.loss.fused_kernels"


def _f32(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


@dataclasses.dataclass(frozen=True)
class TritonLoss:
    """Kernel-backed implementation, in the form :mod:`hsae_jax.loss.api` calls.

    backend: ``"triton"`` or ``"interpret"``.
    """

    backend: str
    config: TritonLossConfig = TritonLossConfig()

    # ------------------------------------------------------------------ fused kernels

    def _fused_launch(self, kernel_name, args, outs, zeroed, b, f, k, d):
        cfg = self.config.fused.resolve(b, k, d)
        kernel = getattr(kernel_module(_FUSED, self.backend), kernel_name)
        return launch(
            kernel,
            *args,
            out_shape=outs,
            grid=(_shapes.cdiv(b, cfg.block_b), cfg.d_split),
            backend=self.backend,
            zeroed_outputs=zeroed,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            B=b, F=f, D=d, K=k,
            K_POW2=_shapes.next_power_of_2(k),
            BLOCK_B=cfg.block_b,
            BLOCK_D=cfg.block_d,
            TILES_PER_SPLIT=cfg.tiles_per_split(d),
        ), cfg

    # ------------------------------------------------------------------- seed kernels

    def _seed_forward(self, indices, weight, vals, bias, target):
        b, k = indices.shape
        f, d = weight.shape
        cfg = self.config.seed_forward
        kernel = kernel_module(_SEED, self.backend).hierarchical_sae_forward_kernel
        sse, final_recon = launch(
            kernel,
            indices, weight, bias, vals, target,
            out_shape=[_f32(b, k), _f32(b, d)],
            grid=(_shapes.cdiv(b, cfg.block_b), _shapes.cdiv(d, cfg.block_d)),
            backend=self.backend,
            zeroed_outputs=(0,),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            B=b, F=f, D=d, K=k,
            K_POW2=_shapes.next_power_of_2(k),
            BLOCK_B=cfg.block_b,
            BLOCK_D=cfg.block_d,
            LOOP_NUM_STAGES=cfg.loop_num_stages,
        )
        return sse, final_recon

    def _seed_backward(self, residuals, coef):
        indices, weight, vals, target, final_recon = residuals
        b, k = indices.shape
        f, d = weight.shape
        cfg = self.config.seed_backward
        kernel = kernel_module(_SEED, self.backend).hierarchical_sae_backward_kernel
        return tuple(launch(
            kernel,
            final_recon, indices, weight, vals, target, coef,
            out_shape=[_f32(f, d), _f32(b, k), _f32(b, d)],
            grid=(_shapes.cdiv(b, cfg.block_b), _shapes.cdiv(d, cfg.block_d)),
            backend=self.backend,
            zeroed_outputs=(0, 1),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            B=b, F=f, D=d, K=k,
            K_POW2=_shapes.next_power_of_2(k),
            BLOCK_B=cfg.block_b,
            BLOCK_D=cfg.block_d,
            LOOP_NUM_STAGES=cfg.loop_num_stages,
        ))

    # ------------------------------------------------------------------ the interface

    def variant(self, k: int) -> str:
        return self.config.resolve_variant(k)

    def prefix_sse(self, indices, weight, vals, bias, target):
        """[B, K] float32 per-prefix SSE (forward only)."""
        b, k = indices.shape
        f, d = weight.shape
        if self.variant(k) == "two_pass":
            return self._seed_forward(indices, weight, vals, bias, target)[0]
        split = self.config.fused.resolve(b, k, d).d_split
        (sse,), _ = self._fused_launch(
            "hierarchical_sae_prefix_sse_kernel",
            (indices, weight, bias, vals, target), [_f32(split, b, k)], (), b, f, k, d)
        return jnp.sum(sse, axis=0)

    def forward(self, indices, weight, vals, bias, target, coef):
        """Returns ([B, K] per-prefix SSE, residuals for :meth:`backward`).

        The fused variant computes the gradients here, in the same pass, and keeps them
        as the residuals; the two-pass variant keeps the final reconstruction.
        """
        b, k = indices.shape
        f, d = weight.shape
        if self.variant(k) == "two_pass":
            sse, final_recon = self._seed_forward(indices, weight, vals, bias, target)
            return sse, (indices, weight, vals, target, final_recon)
        split = self.config.fused.resolve(b, k, d).d_split
        (sse, dweight, dvals, resid_sum), _ = self._fused_launch(
            "hierarchical_sae_fused_kernel",
            (indices, weight, bias, vals, target, coef),
            [_f32(split, b, k), _f32(f, d), _f32(split, b, k), _f32(b, d)],
            (1,), b, f, k, d)
        return jnp.sum(sse, axis=0), (dweight, jnp.sum(dvals, axis=0), resid_sum)

    def backward(self, residuals, coef):
        """Returns (dweight [F, D], dvals [B, K], resid_sum [B, D]), all float32."""
        if len(residuals) == 3:  # fused: already computed in forward
            return residuals
        return self._seed_backward(residuals, coef)
