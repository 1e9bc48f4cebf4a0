"""Per-latent sums of coefficient-weighted rows: one program per (latent, D tile).

The caller sorts P (row, latent) pairs by latent (stably), so latent l owns the run
``order[starts[l]:starts[l + 1]]`` of pair positions; pair p contributes
``coefs[p] * rows[p // PAIRS_PER_ROW]``. A program sums its latent's run in pair order
and writes its [BLOCK_D] tile once: no atomics, no zero-initialised buffer, and the
same sums in the same order on every run (bitwise reproducible). ``segment_sum_kernel``
also writes each latent's sum of coefficients (the encoder's db_enc), from its first D
tile's program. Used by the sparse
encoder backward (dW_enc: pairs are (token, selected latent), rows are x - b_dec) and
by the decoder loss's deterministic mode (dW: rows are each pair's suffix sum).
"""

import triton
import triton.language as tl


@triton.jit
def _run_sum(order_ptr, starts_ptr, coefs_ptr, rows_ptr, D: tl.constexpr,
             PAIRS_PER_ROW: tl.constexpr, BLOCK_PAIRS: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's latent, columns [BD], their mask, its run's sum [BD] float32 and
    the sum of its run's coefficients (float32, in the same pair order)."""
    latent = tl.program_id(axis=0).to(tl.int64)
    offs_d = tl.program_id(axis=1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    start = tl.load(starts_ptr + latent)
    end = tl.load(starts_ptr + latent + 1)
    acc = tl.zeros([BLOCK_PAIRS, BLOCK_D], dtype=tl.float32)
    coef_acc = tl.zeros([BLOCK_PAIRS], dtype=tl.float32)
    for first in range(start, end, BLOCK_PAIRS):
        p = first + tl.arange(0, BLOCK_PAIRS)
        in_run = p < end
        pair = tl.load(order_ptr + p, mask=in_run, other=0).to(tl.int64)
        coef = tl.load(coefs_ptr + pair, mask=in_run, other=0.0)
        rows = tl.load(rows_ptr + (pair // PAIRS_PER_ROW)[:, None] * D + offs_d[None, :],
                       mask=in_run[:, None] & d_mask[None, :], other=0.0)
        acc += coef[:, None] * rows.to(tl.float32)
        coef_acc += coef
    return latent, offs_d, d_mask, tl.sum(acc, axis=0), tl.sum(coef_acc, axis=0)


@triton.jit
def segment_sum_kernel(
    order_ptr,  # [P] int32: pair positions sorted by latent (stable)
    starts_ptr,  # [F + 1] int32: latent l's pairs are order[starts[l]:starts[l + 1]]
    coefs_ptr,  # [P] float32: each pair's coefficient
    rows_ptr,  # [P / PAIRS_PER_ROW, D] float32 / bfloat16 / float16
    out_ptr,  # [F, D] float32: every element written
    coef_sums_ptr,  # [F] float32: each latent's sum of coefficients, every element written
    D: tl.constexpr,
    PAIRS_PER_ROW: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    latent, offs_d, d_mask, total, coef_total = _run_sum(
        order_ptr, starts_ptr, coefs_ptr, rows_ptr, D, PAIRS_PER_ROW, BLOCK_PAIRS, BLOCK_D)
    tl.store(out_ptr + latent * D + offs_d, total, mask=d_mask)
    if tl.program_id(axis=1) == 0:
        tl.store(coef_sums_ptr + latent, coef_total)


@triton.jit
def segment_sum_add_kernel(
    order_ptr,  # [P] int32: pair positions sorted by latent (stable)
    starts_ptr,  # [F + 1] int32: latent l's pairs are order[starts[l]:starts[l + 1]]
    coefs_ptr,  # [P] float32: each pair's coefficient
    rows_ptr,  # [P / PAIRS_PER_ROW, D] float32 / bfloat16 / float16
    base_ptr,  # [F, D] float32: what the sums are added to
    out_ptr,  # [F, D] float32: base + the sums, every element written
    D: tl.constexpr,
    PAIRS_PER_ROW: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``segment_sum_kernel`` added onto ``base`` (one read of base, one write)."""
    latent, offs_d, d_mask, total, _ = _run_sum(order_ptr, starts_ptr, coefs_ptr, rows_ptr, D,
                                                PAIRS_PER_ROW, BLOCK_PAIRS, BLOCK_D)
    base = tl.load(base_ptr + latent * D + offs_d, mask=d_mask, other=0.0)
    tl.store(out_ptr + latent * D + offs_d, base + total, mask=d_mask)
