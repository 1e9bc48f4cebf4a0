# HierarchicalTopK SAE decoder Triton kernels
# Copyright 2025 T-Tech
# Modifications Copyright 2026 The hsae-jax authors.
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this
# file except in compliance with the License. You may obtain a copy of the License at
# http://www.apache.org/licenses/LICENSE-2.0. See NOTICE for what was changed.
"""Decoder-loss kernels that walk the K selected latents of [BLOCK_B, BLOCK_D] tiles.

A program owns BLOCK_B rows and BLOCK_D columns of the [B, D] problem. The forward walk
adds ``vals_k * weight[indices_k]`` to the running reconstruction (starting at the bias)
for k = 1..K and accumulates ``coef_k * (recon_k - target)^2``; the backward walk starts
from the full reconstruction, walks k = K..1, carries the suffix sum of the residual
gradients ``2 * coef_k * (recon_k - target)``, adds ``vals_k * suffix`` into the weight
gradient row of latent k, writes dvals, and takes ``vals_k * W[indices_k]`` off again.

- ``hierarchical_sae_forward_kernel`` / ``hierarchical_sae_backward_kernel``: the seed's
  two kernels (the ``"two_pass"`` variant);
- ``hierarchical_sae_fused_kernel``: both walks in one program (the default);
- ``DETERMINISTIC``: no float atomics; each D tile stores its share of the row losses and
  dvals, and each (row, latent) pair its suffix sum, for the caller to add up in a fixed
  order (hsae_jax/loss/triton_loss.py).

Any B, K, D (rows past B, columns past D and latents past K are masked; ``K_POW2`` sizes
the [BLOCK_B, K] register tiles); an index outside [0, F) selects no row. Each step's
index, value, rows and coefficient are loaded at the top of the loop body,
unconditionally, so Triton's software pipeliner issues the gathers
``LOOP_NUM_STAGES - 1`` steps ahead. What changed from the seed's kernels is listed in
NOTICE.
"""

import triton
import triton.language as tl


@triton.jit
def _tile(B: tl.constexpr, D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows [BB] and columns [BD] (int64), their masks, [BB, BD] offsets."""
    pid_b = tl.program_id(axis=0).to(tl.int64)
    pid_d = tl.program_id(axis=1).to(tl.int64)
    batch_offsets = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    offset_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    offset_d = tl.max_contiguous(tl.multiple_of(offset_d, BLOCK_D), BLOCK_D)
    batch_mask = batch_offsets < B
    d_mask = offset_d < D
    return (batch_offsets, batch_mask, offset_d, d_mask,
            batch_offsets[:, None] * D + offset_d[None, :], batch_mask[:, None] & d_mask[None, :])


@triton.jit
def _load_step(indices_ptr, vals_ptr, weight_ptr, batch_offsets, batch_mask, offset_d, d_mask,
               t, F: tl.constexpr, D: tl.constexpr, K: tl.constexpr):
    """Step t of a walk: indices [BB], selects-a-row [BB], vals [BB], rows [BB, BD]."""
    idx = tl.load(indices_ptr + batch_offsets * K + t, mask=batch_mask, other=0).to(tl.int64)
    row_ok = batch_mask & (idx >= 0) & (idx < F)
    val = tl.load(vals_ptr + batch_offsets * K + t, mask=batch_mask, other=0.0).to(tl.float32)
    weight_tile = tl.load(weight_ptr + idx[:, None] * D + offset_d[None, :],
                          mask=row_ok[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    return idx, row_ok, val, weight_tile


@triton.jit
def _forward_walk(indices_ptr, weight_ptr, vals_ptr, coef_ptr, recon, target, batch_offsets,
                  batch_mask, offset_d, d_mask, F: tl.constexpr, D: tl.constexpr,
                  K: tl.constexpr, UNIFORM_COEF: tl.constexpr, LOOP_NUM_STAGES: tl.constexpr):
    """Adds the K steps to recon [BB, BD]; returns it and the [BB] weighted row losses."""
    loss_accum = tl.zeros(recon.shape, dtype=tl.float32)
    coef = tl.load(coef_ptr)
    for t in tl.range(0, K, num_stages=LOOP_NUM_STAGES):
        _, _, val, weight_tile = _load_step(indices_ptr, vals_ptr, weight_ptr, batch_offsets,
                                            batch_mask, offset_d, d_mask, t, F, D, K)
        if not UNIFORM_COEF:
            coef = tl.load(coef_ptr + t)
        recon += weight_tile * val[:, None]
        diff = recon - target  # padded lanes hold 0 - 0
        loss_accum += diff * diff * coef
    return recon, tl.sum(loss_accum, axis=1)


@triton.jit
def _backward_walk(indices_ptr, weight_ptr, vals_ptr, coef_ptr, weight_grad_ptr, recon, target,
                   batch_offsets, batch_mask, offset_d, d_mask, F: tl.constexpr,
                   D: tl.constexpr, K: tl.constexpr, K_POW2: tl.constexpr,
                   UNIFORM_COEF: tl.constexpr, DETERMINISTIC: tl.constexpr,
                   LOOP_NUM_STAGES: tl.constexpr):
    """Walks k = K-1..0 from the full reconstruction recon [BB, BD]: adds each pair's
    dweight share vals * suffix into weight_grad_ptr [F, D] (float atomics), or with
    DETERMINISTIC stores the pair's suffix into row b * K + k of weight_grad_ptr
    [B * K, D] (the caller sums them per latent in a fixed order); returns the
    residual-gradient sum [BB, BD] and dvals [BB, K_POW2]."""
    k_offsets = tl.arange(0, K_POW2)
    suffix = tl.zeros(recon.shape, dtype=tl.float32)
    val_grad_tile = tl.zeros([recon.shape[0], K_POW2], dtype=tl.float32)
    coef = tl.load(coef_ptr)
    for i in tl.range(0, K, num_stages=LOOP_NUM_STAGES):
        step = K - 1 - i
        idx, row_ok, val, weight_tile = _load_step(indices_ptr, vals_ptr, weight_ptr,
                                                   batch_offsets, batch_mask, offset_d, d_mask,
                                                   step, F, D, K)
        if not UNIFORM_COEF:
            coef = tl.load(coef_ptr + step)
        suffix += (recon - target) * (2.0 * coef)
        if DETERMINISTIC:
            tl.store(weight_grad_ptr + (batch_offsets * K + step)[:, None] * D
                     + offset_d[None, :], suffix, mask=batch_mask[:, None] & d_mask[None, :])
        else:
            tl.atomic_add(weight_grad_ptr + idx[:, None] * D + offset_d[None, :],
                          suffix * val[:, None], mask=row_ok[:, None] & d_mask[None, :],
                          sem="relaxed")
        val_grad_tile = tl.where(k_offsets[None, :] == step,
                                 tl.sum(weight_tile * suffix, axis=1)[:, None], val_grad_tile)
        recon -= weight_tile * val[:, None]
    return suffix, val_grad_tile


@triton.jit
def hierarchical_sae_forward_kernel(
    indices_ptr,  # [B, K] int32/int64
    weight_ptr,  # [F, D]
    bias_ptr,  # [D]
    vals_ptr,  # [B, K]
    target_ptr,  # [B, D]
    coef_ptr,  # [K] float32: d loss / d (squared error of one element of prefix k)
    loss_ptr,  # [B] float32, zeroed: sum_k coef_k * ||r_k||^2 of each row (DETERMINISTIC:
    #            [D tiles, B], each tile's share, every element written)
    final_recon_ptr,  # [B, D] float32
    B: tl.constexpr,
    F: tl.constexpr,
    D: tl.constexpr,
    K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UNIFORM_COEF: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    LOOP_NUM_STAGES: tl.constexpr,
):
    tl.static_assert((BLOCK_D & (BLOCK_D - 1)) == 0, f"{BLOCK_D=} must be a power of 2")
    tl.static_assert((BLOCK_B & (BLOCK_B - 1)) == 0, f"{BLOCK_B=} must be a power of 2")
    batch_offsets, batch_mask, offset_d, d_mask, batch_d_offset, tile_mask = _tile(
        B, D, BLOCK_B, BLOCK_D)
    bias_tile = tl.load(bias_ptr + offset_d, mask=d_mask, other=0.0).to(tl.float32)
    recon = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32) + bias_tile[None, :]
    target = tl.load(target_ptr + batch_d_offset, mask=tile_mask, other=0.0).to(tl.float32)
    recon, loss_rows = _forward_walk(indices_ptr, weight_ptr, vals_ptr, coef_ptr, recon, target,
                                     batch_offsets, batch_mask, offset_d, d_mask, F, D, K,
                                     UNIFORM_COEF, LOOP_NUM_STAGES)
    _add_over_d_tiles(loss_ptr, loss_rows, batch_offsets, batch_mask, B, DETERMINISTIC)
    tl.store(final_recon_ptr + batch_d_offset, recon, mask=tile_mask)


@triton.jit
def hierarchical_sae_backward_kernel(
    final_recon_ptr,  # [B, D] float32
    indices_ptr,  # [B, K] int32/int64
    weight_ptr,  # [F, D]
    vals_ptr,  # [B, K]
    target_ptr,  # [B, D]
    coef_ptr,  # [K] float32: d loss / d (squared error of one element of prefix k)
    weight_grad_ptr,  # [F, D] float32, zeroed
    vals_grad_ptr,  # [B, K] float32, zeroed
    resid_sum_ptr,  # [B, D] float32: sum_k 2 * coef_k * r_k
    B: tl.constexpr,
    F: tl.constexpr,
    D: tl.constexpr,
    K: tl.constexpr,
    K_POW2: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UNIFORM_COEF: tl.constexpr,
    LOOP_NUM_STAGES: tl.constexpr,
):
    tl.static_assert((BLOCK_D & (BLOCK_D - 1)) == 0, f"{BLOCK_D=} must be a power of 2")
    tl.static_assert((BLOCK_B & (BLOCK_B - 1)) == 0, f"{BLOCK_B=} must be a power of 2")
    batch_offsets, batch_mask, offset_d, d_mask, batch_d_offset, tile_mask = _tile(
        B, D, BLOCK_B, BLOCK_D)
    recon = tl.load(final_recon_ptr + batch_d_offset, mask=tile_mask, other=0.0)
    target = tl.load(target_ptr + batch_d_offset, mask=tile_mask, other=0.0).to(tl.float32)
    suffix, val_grad_tile = _backward_walk(
        indices_ptr, weight_ptr, vals_ptr, coef_ptr, weight_grad_ptr, recon, target,
        batch_offsets, batch_mask, offset_d, d_mask, F, D, K, K_POW2, UNIFORM_COEF, False,
        LOOP_NUM_STAGES)
    _store_gradients(suffix, val_grad_tile, resid_sum_ptr, vals_grad_ptr, batch_offsets,
                     batch_mask, batch_d_offset, tile_mask, B, K, K_POW2, False)


@triton.jit
def _add_over_d_tiles(ptr, values, offsets, mask, tile_stride, DETERMINISTIC: tl.constexpr):
    """Adds this D tile's share into ptr[offsets] (float atomics), or with DETERMINISTIC
    stores it at ptr[d_tile * tile_stride + offsets] for the caller to sum in order."""
    if DETERMINISTIC:
        tl.store(ptr + tl.program_id(axis=1).to(tl.int64) * tile_stride + offsets, values,
                 mask=mask)
    else:
        tl.atomic_add(ptr + offsets, values, mask=mask, sem="relaxed")


@triton.jit
def _store_gradients(suffix, val_grad_tile, resid_sum_ptr, vals_grad_ptr, batch_offsets,
                     batch_mask, batch_d_offset, tile_mask, B: tl.constexpr, K: tl.constexpr,
                     K_POW2: tl.constexpr, DETERMINISTIC: tl.constexpr):
    """Writes this tile's residual-gradient sum and its share of dvals (over D tiles)."""
    k_offsets = tl.arange(0, K_POW2)
    tl.store(resid_sum_ptr + batch_d_offset, suffix, mask=tile_mask)
    _add_over_d_tiles(vals_grad_ptr, val_grad_tile,
                      batch_offsets[:, None] * K + k_offsets[None, :],
                      batch_mask[:, None] & (k_offsets[None, :] < K), B * K, DETERMINISTIC)


@triton.jit
def hierarchical_sae_fused_kernel(
    indices_ptr,  # [B, K] int32/int64
    weight_ptr,  # [F, D]
    bias_ptr,  # [D]
    vals_ptr,  # [B, K]
    target_ptr,  # [B, D]
    coef_ptr,  # [K] float32: d loss / d (squared error of one element of prefix k)
    loss_ptr,  # [B] float32, zeroed: sum_k coef_k * ||r_k||^2 of each row
    weight_grad_ptr,  # [F, D] float32, zeroed
    vals_grad_ptr,  # [B, K] float32, zeroed
    resid_sum_ptr,  # [B, D] float32: sum_k 2 * coef_k * r_k
    recon_ptr,  # [B, D] float32: the full reconstruction recon_K, every element written
    # DETERMINISTIC (no float atomics): loss [D tiles, B] and dvals [D tiles, B, K] hold each
    # D tile's share, weight_grad [B * K, D] each pair's suffix sum; every element written.
    B: tl.constexpr,
    F: tl.constexpr,
    D: tl.constexpr,
    K: tl.constexpr,
    K_POW2: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UNIFORM_COEF: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    LOOP_NUM_STAGES: tl.constexpr,
):
    """The forward walk and the backward walk of one (row block, D tile) in one program.

    The backward walk starts from registers (the full reconstruction) and re-reads the
    rows the forward walk gathered, most recent first: rows of frequent latents and the
    last steps' rows come from L2, the rest from memory (see benchmarks/NOTES.md for what
    that costs). The full reconstruction is written once (AuxK's residual comes from it)
    and never read back, and there is one launch.
    """
    batch_offsets, batch_mask, offset_d, d_mask, batch_d_offset, tile_mask = _tile(
        B, D, BLOCK_B, BLOCK_D)
    bias_tile = tl.load(bias_ptr + offset_d, mask=d_mask, other=0.0).to(tl.float32)
    recon = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32) + bias_tile[None, :]
    target = tl.load(target_ptr + batch_d_offset, mask=tile_mask, other=0.0).to(tl.float32)
    recon, loss_rows = _forward_walk(indices_ptr, weight_ptr, vals_ptr, coef_ptr, recon, target,
                                     batch_offsets, batch_mask, offset_d, d_mask, F, D, K,
                                     UNIFORM_COEF, LOOP_NUM_STAGES)
    tl.store(recon_ptr + batch_d_offset, recon, mask=tile_mask)
    suffix, val_grad_tile = _backward_walk(
        indices_ptr, weight_ptr, vals_ptr, coef_ptr, weight_grad_ptr, recon, target,
        batch_offsets, batch_mask, offset_d, d_mask, F, D, K, K_POW2, UNIFORM_COEF,
        DETERMINISTIC, LOOP_NUM_STAGES)
    _add_over_d_tiles(loss_ptr, loss_rows, batch_offsets, batch_mask, B, DETERMINISTIC)
    _store_gradients(suffix, val_grad_tile, resid_sum_ptr, vals_grad_ptr, batch_offsets,
                     batch_mask, batch_d_offset, tile_mask, B, K, K_POW2, DETERMINISTIC)
