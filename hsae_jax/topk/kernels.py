"""Exact row-wise top-k in Triton: order-preserving int64 keys and bitonic top-k.

Each float32 value and its column are packed into one int64 key whose signed order is
(value, then lower column first): the high word is the value's bits mapped to an
order-preserving int32, the low word is ``2**32 - 1 - column``. ``tl.topk`` (bitonic
top-k) on keys therefore selects values and indices together, exactly, with ties broken
by the lower index; NaN sorts above +inf.

Stages: ``topk_chunk_kernel`` reduces every CHUNK columns of a row to their top K_POW2
keys; ``topk_merge_kernel`` reduces groups of GROUP candidates the same way (as many
rounds as needed); ``topk_final_kernel`` takes the last <= GROUP candidates of a row to
its top K and unpacks values and indices.
"""

import triton
import triton.language as tl


@triton.jit
def _pack(values, columns):
    """float32 values, int64 columns -> int64 keys ordered by (value, -column)."""
    bits = values.to(tl.int32, bitcast=True)
    # negative floats: flip all bits; positive: flip the sign bit -> unsigned order;
    # then flip the sign bit again -> the same order as signed int32.
    ordered = tl.where(bits < 0, ~bits, bits ^ -2147483648) ^ -2147483648
    return (ordered.to(tl.int64) << 32) | (4294967295 - columns)


@triton.jit
def _unpack(keys):
    """int64 keys -> (float32 values, int32 columns)."""
    ordered = (keys >> 32).to(tl.int32) ^ -2147483648
    bits = tl.where(ordered < 0, ordered ^ -2147483648, ~ordered)
    columns = 4294967295 - (keys & 4294967295)
    return bits.to(tl.float32, bitcast=True), columns.to(tl.int32)


@triton.jit
def topk_chunk_kernel(
    x_ptr,  # [B, F] float32 / bfloat16 / float16
    keys_ptr,  # [B, N_CHUNKS * K_POW2] int64 (int32 pairs): each chunk's top keys
    F: tl.constexpr,
    K_POW2: tl.constexpr,
    CHUNK: tl.constexpr,
    N_CHUNKS: tl.constexpr,
):
    row = tl.program_id(axis=0).to(tl.int64)
    chunk = tl.program_id(axis=1).to(tl.int64)
    columns = chunk * CHUNK + tl.arange(0, CHUNK).to(tl.int64)
    x = tl.load(x_ptr + row * F + columns, mask=columns < F, other=float("-inf"))
    keys = _pack(x.to(tl.float32), columns)
    # padding columns: the smallest key, below every real value (-inf included)
    keys = tl.where(columns < F, keys, -9223372036854775807 - 1)
    top = tl.topk(keys, K_POW2)
    slots = tl.arange(0, K_POW2)
    out = keys_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
    tl.store(out + row * (N_CHUNKS * K_POW2) + chunk * K_POW2 + slots, top)


@triton.jit
def _top_keys(keys_ptr, row, group, N: tl.constexpr, GROUP: tl.constexpr,
              K_POW2: tl.constexpr):
    """The top K_POW2 keys of candidates [group * GROUP, (group + 1) * GROUP) of a row."""
    offsets = group * GROUP + tl.arange(0, GROUP).to(tl.int64)
    keys_ptr = keys_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
    keys = tl.load(keys_ptr + row * N + offsets, mask=offsets < N,
                   other=-9223372036854775807 - 1)
    return tl.topk(keys, K_POW2)


@triton.jit
def topk_merge_kernel(
    keys_ptr,  # [B, N] int64 (int32 pairs) candidate keys
    out_keys_ptr,  # [B, N_GROUPS * K_POW2] int64 (int32 pairs)
    N: tl.constexpr,
    K_POW2: tl.constexpr,
    GROUP: tl.constexpr,
    N_GROUPS: tl.constexpr,
):
    row = tl.program_id(axis=0).to(tl.int64)
    group = tl.program_id(axis=1).to(tl.int64)
    top = _top_keys(keys_ptr, row, group, N, GROUP, K_POW2)
    slots = tl.arange(0, K_POW2)
    out = out_keys_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
    tl.store(out + row * (N_GROUPS * K_POW2) + group * K_POW2 + slots, top)


@triton.jit
def topk_final_kernel(
    keys_ptr,  # [B, N] int64 (int32 pairs) candidate keys, N <= GROUP
    values_ptr,  # [B, K] output dtype
    indices_ptr,  # [B, K] int32
    N: tl.constexpr,
    K: tl.constexpr,
    K_POW2: tl.constexpr,
    GROUP: tl.constexpr,
):
    row = tl.program_id(axis=0).to(tl.int64)
    values, cols = _unpack(_top_keys(keys_ptr, row, 0, N, GROUP, K_POW2))
    slots = tl.arange(0, K_POW2)
    tl.store(values_ptr + row * K + slots, values.to(values_ptr.dtype.element_ty),
             mask=slots < K)
    tl.store(indices_ptr + row * K + slots, cols, mask=slots < K)
