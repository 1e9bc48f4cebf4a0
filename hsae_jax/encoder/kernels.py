"""Sparse backward of the TopK encoder: the W_enc gradient as per-latent segment sums.

With ``xc = x - b_dec`` and ``pre = xc @ W_enc.T + b_enc`` (W_enc stored [F, D], one row
per latent), the gradient of anything that depends on the top-k of ``pre`` has only
B x K non-zero entries ``dpre[b, j]`` at columns ``indices[b, j]``, so

    dW_enc[f] = sum over pairs (b, j) with indices[b, j] == f of dpre[b, j] * xc[b]

instead of the dense [D, B] x [B, F] product. The caller sorts the B*K pairs by latent
(stably), so latent f owns the run ``order[starts[f]:starts[f + 1]]``; one program per
(latent, D tile) sums its run's rows of ``xc`` (which stays in L2) and writes its tile
of dW_enc once: no atomics, no zero-initialised buffer, and the same sums in the same
order on every run (bitwise reproducible).
"""

import triton
import triton.language as tl


@triton.jit
def encoder_weight_grad_kernel(
    order_ptr,  # [B * K] int32: pair positions b * K + j, sorted by latent (stable)
    starts_ptr,  # [F + 1] int32: latent f's pairs are order[starts[f]:starts[f + 1]]
    dpre_ptr,  # [B * K] float32: gradient of the selected pre-activations
    xc_ptr,  # [B, D] float32 / bfloat16 / float16: x - b_dec
    weight_grad_ptr,  # [F, D] float32: every element written
    D: tl.constexpr,
    K: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    latent = tl.program_id(axis=0).to(tl.int64)
    offs_d = tl.program_id(axis=1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    start = tl.load(starts_ptr + latent)
    end = tl.load(starts_ptr + latent + 1)
    acc = tl.zeros([BLOCK_PAIRS, BLOCK_D], dtype=tl.float32)
    for first in range(start, end, BLOCK_PAIRS):
        p = first + tl.arange(0, BLOCK_PAIRS)
        in_run = p < end
        pos = tl.load(order_ptr + p, mask=in_run, other=0).to(tl.int64)
        coef = tl.load(dpre_ptr + pos, mask=in_run, other=0.0)
        rows = tl.load(xc_ptr + (pos // K)[:, None] * D + offs_d[None, :],
                       mask=in_run[:, None] & d_mask[None, :], other=0.0)
        acc += coef[:, None] * rows.to(tl.float32)
    tl.store(weight_grad_ptr + latent * D + offs_d, tl.sum(acc, axis=0), mask=d_mask)
