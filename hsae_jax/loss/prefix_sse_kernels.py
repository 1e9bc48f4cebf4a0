"""The squared error of every prefix reconstruction, [B, K], in one gather.

Per (block of BLOCK_B rows, split of the D axis) a program loads the rows' indices and
values once, then walks its D tiles. For each tile it gathers the K selected weight rows
as one [BLOCK_B, K_POW2, BLOCK_D] register tile and computes every prefix at once:

    recon_k = bias + cumsum_k(vals_k * W[idx_k])
    sse_k  += sum_d (recon_k - target)^2

The per-k reduction over D happens once per tile for all k together (a walk over k
would need one cross-thread reduction per step). Partial sums over D splits
([SPLIT, B, K]) are added by the caller. Latents past K (K_POW2 padding), rows past B,
columns past D and indices outside [0, F) are masked: they load zeros and store nothing.
Used for evaluation (FVU at every budget) and the gradient of the prefix weights.
"""

import triton
import triton.language as tl


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
    bk_mask = row_mask[:, None] & (k_offsets < K)[None, :]
    bk_offsets = rows[:, None] * K + k_offsets[None, :]

    idx = tl.load(indices_ptr + bk_offsets, mask=bk_mask, other=-1).to(tl.int64)  # [BB, KP]
    selects = bk_mask & (idx >= 0) & (idx < F)
    vals = tl.load(vals_ptr + bk_offsets, mask=bk_mask, other=0.0).to(tl.float32)

    sse = tl.zeros([BLOCK_B, K_POW2], dtype=tl.float32)
    for tile in tl.range(0, TILES_PER_SPLIT):
        offs_d = (pid_s * TILES_PER_SPLIT + tile) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        weight = tl.load(  # [BB, KP, BD]
            weight_ptr + idx[:, :, None] * D + offs_d[None, None, :],
            mask=selects[:, :, None] & d_mask[None, None, :],
            other=0.0,
        ).to(tl.float32)
        bias = tl.load(bias_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        target = tl.load(  # [BB, BD]
            target_ptr + rows[:, None] * D + offs_d[None, :],
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        recon = tl.cumsum(weight * vals[:, :, None], axis=1) + bias[None, None, :]
        resid = recon - target[:, None, :]
        sse += tl.sum(resid * resid, axis=2)

    tl.store(sse_ptr + pid_s * B * K + bk_offsets, sse, mask=bk_mask)
