"""``segment_row_sums``: sums of rows over (row, latent) pairs, grouped by latent.

The pairs are sorted by latent (stably), so each latent owns one run, and
``segment_sum_kernel`` / ``segment_sum_add_kernel`` (kernels.py beside this) sum each
run in pair order: no atomics, bitwise reproducible. The sparse encoder backward
(dW_enc) and the decoder loss's deterministic mode (dW) both use it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hsae_jax import _shapes, backends
from hsae_jax.triton_launch import launch


@dataclasses.dataclass(frozen=True)
class SegmentSumConfig:
    """Launch settings of the segment-sum kernels.

    block_pairs: pairs of one latent a program sums per step (a power of two).
    block_d: columns of D per program (a power of two).
    """

    block_pairs: int = 8
    block_d: int = 256
    num_warps: int = 2
    num_stages: int = 2

    def __post_init__(self):
        _shapes.check_power_of_two("SegmentSumConfig", block_pairs=self.block_pairs,
                                   block_d=self.block_d)
        _shapes.check_positive("SegmentSumConfig", num_warps=self.num_warps,
                               num_stages=self.num_stages)


def segment_row_sums(latents: jax.Array, coefs: jax.Array, rows: jax.Array, f: int, *,
                     pairs_per_row: int, backend: str,
                     config: SegmentSumConfig = SegmentSumConfig(),
                     base: jax.Array | None = None, with_coef_sums: bool = False):
    """[F, D] float32: ``out[l] = base[l] + sum of coefs[p] * rows[p // pairs_per_row]``
    over the pairs p with ``latents[p] == l``, summed in pair order (bitwise
    reproducible); no base: zeros. ``with_coef_sums`` (no base): ``(out, coef_sums)``
    with coef_sums [F] float32 the sum of each latent's coefs, also in pair order.

    latents: [P] int32/int64; a latent outside [0, F) belongs to no row of the output.
    coefs: [P] float32. rows: [P // pairs_per_row, D] float32/bfloat16/float16.
    base: optional [F, D] float32. backend: ``"triton"`` or ``"interpret"``.
    Every element of the output is written.
    """
    if with_coef_sums and base is not None:
        raise ValueError("segment_row_sums: with_coef_sums=True takes no base")
    backends.import_triton_for(backend)
    from hsae_jax.segments import kernels

    d = rows.shape[1]
    latents = jnp.where((latents >= 0) & (latents < f), latents, f)  # f: past the end
    order = jnp.argsort(latents, stable=True).astype(jnp.int32)
    counts = jnp.bincount(latents, length=f + 1)[:f]
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts).astype(jnp.int32)])
    args = (order, starts, coefs.astype(jnp.float32), rows)
    out_shape = [jax.ShapeDtypeStruct((f, d), jnp.float32)]
    if base is None:
        kernel = kernels.segment_sum_kernel
        out_shape.append(jax.ShapeDtypeStruct((f,), jnp.float32))
    else:
        kernel, args = kernels.segment_sum_add_kernel, (*args, base)
    out, *coef_sums = launch(
        kernel, *args, out_shape=out_shape,
        grid=(f, _shapes.cdiv(d, config.block_d)), backend=backend,
        num_warps=config.num_warps, num_stages=config.num_stages, D=d,
        PAIRS_PER_ROW=pairs_per_row, BLOCK_PAIRS=config.block_pairs, BLOCK_D=config.block_d)
    return (out, coef_sums[0]) if with_coef_sums else out
