"""One-pass decoder-loss kernels: each gathered weight row is read from memory once.

Per (block of BLOCK_B rows, split of the D axis) a program loads the rows' indices,
values and prefix coefficients once, then walks its D tiles. For each tile it gathers
the K selected weight rows as one [BLOCK_B, K_POW2, BLOCK_D] register tile and computes

    recon_k = bias + cumsum_k(vals_k * W[idx_k])            (every prefix at once)
    r_k     = recon_k - target
    sse_k  += sum_d r_k^2
    g_k     = 2 coef_k r_k                                   (d loss / d recon_k)
    S_k     = sum_{j >= k} g_j                               (reverse cumsum)
    dvals_k += sum_d W[idx_k] * S_k
    dW[idx_k] += vals_k * S_k                                (one atomic scatter)
    resid_sum = sum_k g_k                                    (bias / target gradient)

so the forward and the whole backward come out of one gather and one scatter: the seed
makes two gathers and one scatter. ``hierarchical_sae_prefix_sse_kernel`` is the same
walk without the gradient, for evaluation.

Partial sums over D splits ([SPLIT, B, K]) are reduced by the caller, so only the
weight gradient needs atomics. Latents past K (K_POW2 padding), rows past B, columns
past D and indices outside [0, F) are masked: they load zeros and store nothing.
"""

import triton
import triton.language as tl


@triton.jit
def _load_row_block(indices_ptr, vals_ptr, rows, row_mask, k_offsets, k_mask,
                    F: tl.constexpr, K: tl.constexpr):
    """[BLOCK_B, K_POW2] indices (int64), whether each selects a row, and vals (f32)."""
    bk_mask = row_mask[:, None] & k_mask[None, :]
    bk_offsets = rows[:, None] * K + k_offsets[None, :]
    idx = tl.load(indices_ptr + bk_offsets, mask=bk_mask, other=-1).to(tl.int64)
    selects = bk_mask & (idx >= 0) & (idx < F)
    vals = tl.load(vals_ptr + bk_offsets, mask=bk_mask, other=0.0).to(tl.float32)
    return idx, selects, vals


@triton.jit
def _prefix_residuals(weight_ptr, bias_ptr, target_ptr, idx, selects, vals, rows, row_mask,
                      offs_d, d_mask, D: tl.constexpr):
    """Gathered rows W[idx] and residuals r_k of every prefix: two [BLOCK_B, K_POW2, BLOCK_D]."""
    weight = tl.load(
        weight_ptr + idx[:, :, None] * D + offs_d[None, None, :],
        mask=selects[:, :, None] & d_mask[None, None, :],
        other=0.0,
    ).to(tl.float32)
    bias = tl.load(bias_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    target = tl.load(
        target_ptr + rows[:, None] * D + offs_d[None, :],
        mask=row_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    recon = tl.cumsum(weight * vals[:, :, None], axis=1) + bias[None, None, :]
    return weight, recon - target[:, None, :]


@triton.jit
def hierarchical_sae_fused_kernel(
    indices_ptr,  # [B, K] int32/int64
    weight_ptr,  # [F, D]
    bias_ptr,  # [D]
    vals_ptr,  # [B, K]
    target_ptr,  # [B, D]
    coef_ptr,  # [K] float32: d loss / d (squared error of one element of prefix k)
    sse_ptr,  # [SPLIT, B, K] float32: partial sums over this split's columns
    weight_grad_ptr,  # [F, D] float32, zeroed
    vals_grad_ptr,  # [SPLIT, B, K] float32: partial sums over this split's columns
    resid_sum_ptr,  # [B, D] float32: sum_k 2 * coef_k * r_k
    B: tl.constexpr,
    F: tl.constexpr,
    D: tl.constexpr,
    K: tl.constexpr,
    K_POW2: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILES_PER_SPLIT: tl.constexpr,
):
    pid_b = tl.program_id(axis=0).to(tl.int64)
    pid_s = tl.program_id(axis=1).to(tl.int64)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_mask = rows < B
    k_offsets = tl.arange(0, K_POW2)
    k_mask = k_offsets < K

    idx, selects, vals = _load_row_block(indices_ptr, vals_ptr, rows, row_mask, k_offsets,
                                         k_mask, F, K)
    coef2 = 2.0 * tl.load(coef_ptr + k_offsets, mask=k_mask, other=0.0)
    sse = tl.zeros([BLOCK_B, K_POW2], dtype=tl.float32)
    vals_grad = tl.zeros([BLOCK_B, K_POW2], dtype=tl.float32)

    for tile in tl.range(0, TILES_PER_SPLIT):
        offs_d = (pid_s * TILES_PER_SPLIT + tile) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        weight, resid = _prefix_residuals(weight_ptr, bias_ptr, target_ptr, idx, selects,
                                          vals, rows, row_mask, offs_d, d_mask, D)
        sse += tl.sum(resid * resid, axis=2)
        grad = coef2[None, :, None] * resid
        suffix = tl.cumsum(grad, axis=1, reverse=True)
        vals_grad += tl.sum(weight * suffix, axis=2)
        tl.atomic_add(
            weight_grad_ptr + idx[:, :, None] * D + offs_d[None, None, :],
            vals[:, :, None] * suffix,
            mask=selects[:, :, None] & d_mask[None, None, :],
            sem="relaxed",
        )
        tl.store(
            resid_sum_ptr + rows[:, None] * D + offs_d[None, :],
            tl.sum(grad, axis=1),
            mask=row_mask[:, None] & d_mask[None, :],
        )

    out_offsets = pid_s * B * K + rows[:, None] * K + k_offsets[None, :]
    out_mask = row_mask[:, None] & k_mask[None, :]
    tl.store(sse_ptr + out_offsets, sse, mask=out_mask)
    tl.store(vals_grad_ptr + out_offsets, vals_grad, mask=out_mask)


@triton.jit
def hierarchical_sae_prefix_sse_kernel(
    indices_ptr,  # [B, K] int32/int64
    weight_ptr,  # [F, D]
    bias_ptr,  # [D]
    vals_ptr,  # [B, K]
    target_ptr,  # [B, D]
    sse_ptr,  # [SPLIT, B, K] float32: partial sums over this split's columns
    B: tl.constexpr,
    F: tl.constexpr,
    D: tl.constexpr,
    K: tl.constexpr,
    K_POW2: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILES_PER_SPLIT: tl.constexpr,
):
    pid_b = tl.program_id(axis=0).to(tl.int64)
    pid_s = tl.program_id(axis=1).to(tl.int64)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_mask = rows < B
    k_offsets = tl.arange(0, K_POW2)
    k_mask = k_offsets < K

    idx, selects, vals = _load_row_block(indices_ptr, vals_ptr, rows, row_mask, k_offsets,
                                         k_mask, F, K)
    sse = tl.zeros([BLOCK_B, K_POW2], dtype=tl.float32)
    for tile in tl.range(0, TILES_PER_SPLIT):
        offs_d = (pid_s * TILES_PER_SPLIT + tile) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        _, resid = _prefix_residuals(weight_ptr, bias_ptr, target_ptr, idx, selects, vals,
                                     rows, row_mask, offs_d, d_mask, D)
        sse += tl.sum(resid * resid, axis=2)

    out_offsets = pid_s * B * K + rows[:, None] * K + k_offsets[None, :]
    tl.store(sse_ptr + out_offsets, sse, mask=row_mask[:, None] & k_mask[None, :])
