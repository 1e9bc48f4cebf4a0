"""Sums of rows over (row, latent) pairs grouped by latent: no atomics, reproducible.

``segment_row_sums`` sorts the pairs by latent (stably), so each latent owns one run,
and launches ``encoder_weight_grad_kernel`` or ``segment_sum_add_kernel``
(hsae_jax/encoder/kernels.py): one program per (latent, D tile) sums its run in a fixed
order and writes its tile once. The sparse encoder backward (dW_enc) and the decoder
loss's deterministic mode (dW) both use it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hsae_jax import _shapes
from hsae_jax.triton_launch import kernel_module, launch

_KERNELS = "hsae_jax.encoder.kernels"


@dataclasses.dataclass(frozen=True)
class SegmentSumConfig:
    """Launch settings of the segment-sum kernel.

    block_pairs: pairs of one latent a program sums per step.
    block_d: columns of D per program.
    """

    block_pairs: int = 8
    block_d: int = 256
    num_warps: int = 2
    num_stages: int = 2

    def validate(self, owner: str = "SegmentSumConfig") -> None:
        for name in ("block_pairs", "block_d"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{owner}.{name}={value} must be a power of two")
        for name in ("num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{owner}.{name}={getattr(self, name)} must be >= 1")


def segment_row_sums(latents: jax.Array, coefs: jax.Array, rows: jax.Array, f: int, *,
                     pairs_per_row: int, backend: str,
                     config: SegmentSumConfig = SegmentSumConfig(),
                     base: jax.Array | None = None) -> jax.Array:
    """[F, D] float32: ``out[l] = base[l] + sum of coefs[p] * rows[p // pairs_per_row]``
    over the pairs p with ``latents[p] == l``, summed in pair order (bitwise
    reproducible); no base: zeros.

    latents: [P] int32/int64; a latent outside [0, F) belongs to no row of the output.
    coefs: [P] float32. rows: [P // pairs_per_row, D] float32/bfloat16/float16.
    base: optional [F, D] float32, updated in place where XLA can (aliased to the output).
    Every element of the output is written.
    """
    d = rows.shape[1]
    latents = jnp.where((latents >= 0) & (latents < f), latents, f)  # f: past the end
    order = jnp.argsort(latents, stable=True).astype(jnp.int32)
    counts = jnp.bincount(latents, length=f + 1)[:f]
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts).astype(jnp.int32)])
    kernels = kernel_module(_KERNELS, backend)
    args = (order, starts, coefs.astype(jnp.float32), rows)
    if base is None:
        kernel, aliases = kernels.encoder_weight_grad_kernel, {}
    else:
        kernel, aliases, args = kernels.segment_sum_add_kernel, {4: 0}, (*args, base)
    (out,) = launch(
        kernel, *args, out_shape=[jax.ShapeDtypeStruct((f, d), jnp.float32)],
        grid=(f, _shapes.cdiv(d, config.block_d)), backend=backend, aliases=aliases,
        num_warps=config.num_warps, num_stages=config.num_stages, D=d, K=pairs_per_row,
        BLOCK_PAIRS=config.block_pairs, BLOCK_D=config.block_d)
    return out
