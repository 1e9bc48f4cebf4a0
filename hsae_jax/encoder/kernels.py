"""Sparse backward of the TopK encoder: only the B x K selected pre-activations count.

With ``xc = x - b_dec`` and ``pre = xc @ W_enc.T + b_enc`` (W_enc stored [F, D], one row
per latent), the gradient of anything that depends on the top-k of ``pre`` has only
B x K non-zero entries ``dpre[b, j]`` at columns ``indices[b, j]``, so

    dW_enc[indices[b, j]] += dpre[b, j] * xc[b]          (a scatter of B*K rows)
    dxc[b]                = sum_j dpre[b, j] * W_enc[indices[b, j]]   (a gather)

instead of the dense [D, B] x [B, F] and [B, F] x [F, D] products. Per (block of
BLOCK_B rows, D tile) a program walks the K selected latents once, gathering and
scattering each row tile, with the next step's loads issued a step ahead.
"""

import triton
import triton.language as tl


@triton.jit
def sparse_encoder_backward_kernel(
    indices_ptr,  # [B, K] int32/int64
    weight_ptr,  # [F, D] W_enc
    dpre_ptr,  # [B, K] float32: gradient of the selected pre-activations
    xc_ptr,  # [B, D]: x - b_dec
    weight_grad_ptr,  # [F, D] float32, zeroed
    xc_grad_ptr,  # [B, D] float32
    B: tl.constexpr,
    F: tl.constexpr,
    D: tl.constexpr,
    K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LOOP_NUM_STAGES: tl.constexpr,
):
    pid_b = tl.program_id(axis=0).to(tl.int64)
    pid_d = tl.program_id(axis=1).to(tl.int64)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_mask = rows < B
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    d_mask = offs_d < D
    tile = rows[:, None] * D + offs_d[None, :]
    tile_mask = row_mask[:, None] & d_mask[None, :]

    xc = tl.load(xc_ptr + tile, mask=tile_mask, other=0.0).to(tl.float32)
    xc_grad = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)

    idx = tl.load(indices_ptr + rows * K, mask=row_mask, other=0).to(tl.int64)
    ok = row_mask & (idx >= 0) & (idx < F)
    dpre = tl.load(dpre_ptr + rows * K, mask=row_mask, other=0.0)
    w = tl.load(weight_ptr + idx[:, None] * D + offs_d[None, :],
                mask=ok[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    for t in tl.range(0, K, num_stages=LOOP_NUM_STAGES):
        xc_grad += w * dpre[:, None]
        tl.atomic_add(weight_grad_ptr + idx[:, None] * D + offs_d[None, :], xc * dpre[:, None],
                      mask=ok[:, None] & d_mask[None, :], sem="relaxed")
        if t + 1 < K:  # prefetch step t + 1
            idx = tl.load(indices_ptr + rows * K + t + 1, mask=row_mask, other=0).to(tl.int64)
            ok = row_mask & (idx >= 0) & (idx < F)
            dpre = tl.load(dpre_ptr + rows * K + t + 1, mask=row_mask, other=0.0)
            w = tl.load(weight_ptr + idx[:, None] * D + offs_d[None, :],
                        mask=ok[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    tl.store(xc_grad_ptr + tile, xc_grad, mask=tile_mask)
