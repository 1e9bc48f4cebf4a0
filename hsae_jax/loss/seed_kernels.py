# HierarchicalTopK SAE decoder Triton kernels
# Copyright 2025 T-Tech
# Modifications Copyright 2026 The hsae-jax authors.
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this
# file except in compliance with the License. You may obtain a copy of the License at
# http://www.apache.org/licenses/LICENSE-2.0. See NOTICE for what was changed.
"""The seed's two-pass decoder-loss kernels, ported to jax-triton's calling convention.

Changes from the seed (``../shared/seed/hierarchical_kernels.py``):
- parameters reordered: inputs first, outputs last (jax-triton's convention);
- any B, K, D: rows past B, columns past D and latents past K are masked, so K need not
  be a power of two (``K_POW2`` sizes the [BLOCK_B, K] register tiles), B need not be a
  multiple of BLOCK_B and D need not be a multiple of BLOCK_D;
- an index outside [0, F) selects no row: nothing is loaded or scattered for it;
- both kernels take per-prefix coefficients ``coef`` [K] (the seed: 1 / (B * K * D) for
  every k), so any weighting of the prefixes costs the same; the backward writes
  ``resid_sum`` [B, D] = sum_k of the residual gradients, from which the bias and target
  gradients follow without atomics;
- ``hierarchical_sae_fused_kernel`` runs the forward walk and the backward walk in one
  program, back to back, every step's loads (coefficient included) prefetched a step
  ahead.
"""

import triton
import triton.language as tl


@triton.jit
def hierarchical_sae_forward_kernel(
    indices_ptr,  # [B, K] int32/int64
    weight_ptr,  # [F, D]
    bias_ptr,  # [D]
    vals_ptr,  # [B, K]
    target_ptr,  # [B, D]
    coef_ptr,  # [K] float32: d loss / d (squared error of one element of prefix k)
    loss_ptr,  # [B] float32, zeroed: sum_k coef_k * ||r_k||^2 of each row
    final_recon_ptr,  # [B, D] float32
    B: tl.constexpr,
    F: tl.constexpr,
    D: tl.constexpr,
    K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LOOP_NUM_STAGES: tl.constexpr,
):
    tl.static_assert((BLOCK_D & (BLOCK_D - 1)) == 0, f"{BLOCK_D=} must be a power of 2")
    tl.static_assert((BLOCK_B & (BLOCK_B - 1)) == 0, f"{BLOCK_B=} must be a power of 2")

    pid_b = tl.program_id(axis=0).to(tl.int64)
    pid_d = tl.program_id(axis=1).to(tl.int64)

    batch_offsets = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    batch_mask = batch_offsets < B
    offset_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    d_mask = offset_d < D
    tl.max_contiguous(tl.multiple_of(offset_d, BLOCK_D), BLOCK_D)

    batch_d_offset = batch_offsets[:, None] * D + offset_d[None, :]
    tile_mask = batch_mask[:, None] & d_mask[None, :]

    bias_tile = tl.load(bias_ptr + offset_d, mask=d_mask, other=0.0).to(tl.float32)
    recon = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    recon += bias_tile[None, :]
    target = tl.load(target_ptr + batch_d_offset, mask=tile_mask, other=0.0).to(tl.float32)

    loss_accum = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)

    row_idx_ptr = indices_ptr + batch_offsets * K
    row_val_ptr = vals_ptr + batch_offsets * K

    idx = tl.load(row_idx_ptr, mask=batch_mask, other=0).to(tl.int64)
    row_ok = batch_mask & (idx >= 0) & (idx < F)
    val = tl.load(row_val_ptr, mask=batch_mask, other=0.0).to(tl.float32)
    weight_tile = tl.load(
        weight_ptr + idx[:, None] * D + offset_d[None, :],
        mask=row_ok[:, None] & d_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    coef = tl.load(coef_ptr)

    for t in tl.range(0, K, num_stages=LOOP_NUM_STAGES):
        recon += weight_tile * val[:, None]
        diff = recon - target  # padded D lanes hold 0 - 0
        loss_accum += diff * diff * coef

        if t + 1 < K:  # prefetch step t + 1, coefficient included, off the critical path
            idx = tl.load(row_idx_ptr + (t + 1), mask=batch_mask, other=0).to(tl.int64)
            row_ok = batch_mask & (idx >= 0) & (idx < F)
            val = tl.load(row_val_ptr + (t + 1), mask=batch_mask, other=0.0).to(tl.float32)
            weight_tile = tl.load(
                weight_ptr + idx[:, None] * D + offset_d[None, :],
                mask=row_ok[:, None] & d_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            coef = tl.load(coef_ptr + (t + 1))

    tl.atomic_add(loss_ptr + batch_offsets, tl.sum(loss_accum, axis=1), mask=batch_mask,
                  sem="relaxed")
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
    LOOP_NUM_STAGES: tl.constexpr,
):
    tl.static_assert((BLOCK_D & (BLOCK_D - 1)) == 0, f"{BLOCK_D=} must be a power of 2")
    tl.static_assert((BLOCK_B & (BLOCK_B - 1)) == 0, f"{BLOCK_B=} must be a power of 2")

    pid_b = tl.program_id(axis=0).to(tl.int64)
    pid_d = tl.program_id(axis=1).to(tl.int64)

    batch_offsets = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    batch_mask = batch_offsets < B
    offset_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    d_mask = offset_d < D
    tl.max_contiguous(tl.multiple_of(offset_d, BLOCK_D), BLOCK_D)

    batch_d_offset = batch_offsets[:, None] * D + offset_d[None, :]
    tile_mask = batch_mask[:, None] & d_mask[None, :]

    recon = tl.load(final_recon_ptr + batch_d_offset, mask=tile_mask, other=0.0)
    target = tl.load(target_ptr + batch_d_offset, mask=tile_mask, other=0.0).to(tl.float32)

    suffix = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)

    row_idx_ptr = indices_ptr + batch_offsets * K
    row_val_ptr = vals_ptr + batch_offsets * K
    k_offsets = tl.arange(0, K_POW2)
    val_grad_tile = tl.zeros([BLOCK_B, K_POW2], dtype=tl.float32)

    step = K - 1
    idx = tl.load(row_idx_ptr + step, mask=batch_mask, other=0).to(tl.int64)
    row_ok = batch_mask & (idx >= 0) & (idx < F)
    val = tl.load(row_val_ptr + step, mask=batch_mask, other=0.0).to(tl.float32)
    weight_tile = tl.load(
        weight_ptr + idx[:, None] * D + offset_d[None, :],
        mask=row_ok[:, None] & d_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    coef2 = 2.0 * tl.load(coef_ptr + step)

    for _ in tl.range(0, K, num_stages=LOOP_NUM_STAGES):
        curr_step = step

        diff = recon - target
        suffix += diff * coef2

        val_broadcast = val[:, None]
        tl.atomic_add(
            weight_grad_ptr + idx[:, None] * D + offset_d[None, :],
            suffix * val_broadcast,
            mask=row_ok[:, None] & d_mask[None, :],
            sem="relaxed",
        )

        dot_partial = tl.sum(weight_tile * suffix, axis=1)
        val_grad_tile = tl.where(k_offsets[None, :] == curr_step, dot_partial[:, None],
                                 val_grad_tile)

        recon -= weight_tile * val_broadcast

        if curr_step > 0:
            step = curr_step - 1
            idx = tl.load(row_idx_ptr + step, mask=batch_mask, other=0).to(tl.int64)
            row_ok = batch_mask & (idx >= 0) & (idx < F)
            val = tl.load(row_val_ptr + step, mask=batch_mask, other=0.0).to(tl.float32)
            weight_tile = tl.load(
                weight_ptr + idx[:, None] * D + offset_d[None, :],
                mask=row_ok[:, None] & d_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            coef2 = 2.0 * tl.load(coef_ptr + step)

    tl.store(resid_sum_ptr + batch_d_offset, suffix, mask=tile_mask)
    tl.atomic_add(
        vals_grad_ptr + batch_offsets[:, None] * K + k_offsets[None, :],
        val_grad_tile,
        mask=batch_mask[:, None] & (k_offsets[None, :] < K),
        sem="relaxed",
    )


@triton.jit
def _load_step(indices_ptr, vals_ptr, weight_ptr, coef_ptr, batch_offsets, batch_mask,
               offset_d, d_mask, t, F: tl.constexpr, D: tl.constexpr, K: tl.constexpr):
    """Step t of a walk: indices [BB], selects-a-row [BB], vals [BB], rows [BB, BD], coef."""
    idx = tl.load(indices_ptr + batch_offsets * K + t, mask=batch_mask, other=0).to(tl.int64)
    row_ok = batch_mask & (idx >= 0) & (idx < F)
    val = tl.load(vals_ptr + batch_offsets * K + t, mask=batch_mask, other=0.0).to(tl.float32)
    weight_tile = tl.load(weight_ptr + idx[:, None] * D + offset_d[None, :],
                          mask=row_ok[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    return idx, row_ok, val, weight_tile, tl.load(coef_ptr + t)


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
    B: tl.constexpr,
    F: tl.constexpr,
    D: tl.constexpr,
    K: tl.constexpr,
    K_POW2: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LOOP_NUM_STAGES: tl.constexpr,
):
    """The forward walk and the backward walk of one (row block, D tile) in one program.

    The backward walk starts from registers (the last step's rows, the full
    reconstruction) and re-reads the rows the forward walk gathered; rows of frequent
    latents come from L2, the rest from memory (see benchmarks/NOTES.md for what that
    costs). No [B, D] reconstruction is written or read back, and there is one launch.
    """
    pid_b = tl.program_id(axis=0).to(tl.int64)
    pid_d = tl.program_id(axis=1).to(tl.int64)

    batch_offsets = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    batch_mask = batch_offsets < B
    offset_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    d_mask = offset_d < D
    tl.max_contiguous(tl.multiple_of(offset_d, BLOCK_D), BLOCK_D)
    batch_d_offset = batch_offsets[:, None] * D + offset_d[None, :]
    tile_mask = batch_mask[:, None] & d_mask[None, :]

    bias_tile = tl.load(bias_ptr + offset_d, mask=d_mask, other=0.0).to(tl.float32)
    recon = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32) + bias_tile[None, :]
    target = tl.load(target_ptr + batch_d_offset, mask=tile_mask, other=0.0).to(tl.float32)
    loss_accum = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)

    idx, row_ok, val, weight_tile, coef = _load_step(
        indices_ptr, vals_ptr, weight_ptr, coef_ptr, batch_offsets, batch_mask, offset_d,
        d_mask, 0, F, D, K)
    for t in tl.range(0, K, num_stages=LOOP_NUM_STAGES):
        recon += weight_tile * val[:, None]
        diff = recon - target
        loss_accum += diff * diff * coef
        if t + 1 < K:  # prefetch step t + 1 off the critical path
            idx, row_ok, val, weight_tile, coef = _load_step(
                indices_ptr, vals_ptr, weight_ptr, coef_ptr, batch_offsets, batch_mask,
                offset_d, d_mask, t + 1, F, D, K)

    # recon is now the full reconstruction and the registers hold step K - 1: walk back.
    k_offsets = tl.arange(0, K_POW2)
    suffix = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    val_grad_tile = tl.zeros([BLOCK_B, K_POW2], dtype=tl.float32)
    step = K - 1
    for _ in tl.range(0, K, num_stages=LOOP_NUM_STAGES):
        curr_step = step
        suffix += (recon - target) * (2.0 * coef)
        tl.atomic_add(weight_grad_ptr + idx[:, None] * D + offset_d[None, :],
                      suffix * val[:, None], mask=row_ok[:, None] & d_mask[None, :],
                      sem="relaxed")
        val_grad_tile = tl.where(k_offsets[None, :] == curr_step,
                                 tl.sum(weight_tile * suffix, axis=1)[:, None], val_grad_tile)
        recon -= weight_tile * val[:, None]
        if curr_step > 0:  # prefetch the step before (from L2: the forward walk read it)
            step = curr_step - 1
            idx, row_ok, val, weight_tile, coef = _load_step(
                indices_ptr, vals_ptr, weight_ptr, coef_ptr, batch_offsets, batch_mask,
                offset_d, d_mask, step, F, D, K)

    tl.store(resid_sum_ptr + batch_d_offset, suffix, mask=tile_mask)
    tl.atomic_add(loss_ptr + batch_offsets, tl.sum(loss_accum, axis=1), mask=batch_mask,
                  sem="relaxed")
    tl.atomic_add(vals_grad_ptr + batch_offsets[:, None] * K + k_offsets[None, :],
                  val_grad_tile, mask=batch_mask[:, None] & (k_offsets[None, :] < K),
                  sem="relaxed")
