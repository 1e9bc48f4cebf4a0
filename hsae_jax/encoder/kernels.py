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
def _run_sum(order_ptr, starts_ptr, dpre_ptr, xc_ptr, D: tl.constexpr, K: tl.constexpr,
             BLOCK_PAIRS: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's latent, columns [BD], their mask and sum over its run [BD] fp32."""
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
    return latent, offs_d, d_mask, tl.sum(acc, axis=0)


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
    latent, offs_d, d_mask, total = _run_sum(order_ptr, starts_ptr, dpre_ptr, xc_ptr, D, K,
                                             BLOCK_PAIRS, BLOCK_D)
    tl.store(weight_grad_ptr + latent * D + offs_d, total, mask=d_mask)


@triton.jit
def segment_sum_add_kernel(
    order_ptr,  # [P] int32: pair positions sorted by latent (stable)
    starts_ptr,  # [F + 1] int32: latent f's pairs are order[starts[f]:starts[f + 1]]
    dpre_ptr,  # [P] float32: each pair's coefficient
    xc_ptr,  # [P / K, D] rows (row of pair p: p // K)
    base_ptr,  # [F, D] float32: what the sums are added to (may alias the output)
    out_ptr,  # [F, D] float32: base + the sums, every element written
    D: tl.constexpr,
    K: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``encoder_weight_grad_kernel`` that adds onto ``base`` (one read, one write)."""
    latent, offs_d, d_mask, total = _run_sum(order_ptr, starts_ptr, dpre_ptr, xc_ptr, D, K,
                                             BLOCK_PAIRS, BLOCK_D)
    base = tl.load(base_ptr + latent * D + offs_d, mask=d_mask, other=0.0)
    tl.store(out_ptr + latent * D + offs_d, base + total, mask=d_mask)
