"""Exact row-wise top-k in Triton: order-preserving int64 keys and bitonic top-k.

Each float32 value and its column are packed into one int64 key whose signed order is
(value, then lower column first): the high word is the value's bits mapped to an
order-preserving int32, the low word is ``2**32 - 1 - column``. ``tl.topk`` (bitonic
top-k) on keys therefore selects values and indices together, exactly, with ties broken
by the lower index, in float total order (a NaN ranks by its sign bit: above +inf or below
-inf; -0.0 below +0.0).

Threshold method (two kernels, one program per row):
  ``topk_select_kernel`` reads the row once for the maxima of GROUPS strided column
  groups; the k-th largest of those maxima is a lower bound ``lo`` of the row's k-th
  value (k groups hold an entry >= it). A second read keeps every entry >= lo, in column
  order, as packed keys in a CANDIDATES-slot buffer. If more than CANDIDATES entries
  pass, the bound is raised by bisection on the int32 key (one counting read per step)
  until they fit, or until it is the exact k-th value, whose ties then fill the buffer
  lowest column first. ``topk_sort_kernel`` sorts the kept keys and writes the top K.
Bitonic method: ``topk_chunk_kernel`` reduces every CHUNK columns of a row to their top
K_POW2 keys; ``topk_merge_kernel`` reduces groups of GROUP candidates the same way (as
many rounds as needed); ``topk_final_kernel`` takes the last <= GROUP candidates of a
row to its top K and unpacks values and indices.
Selections without a sort (any K): ``topk_kth_key_kernel`` finds each row's K-th largest
key, ``topk_relu_kernel`` too and writes the row's top K through a ReLU, every other entry
0 (AuxK's activations). A row of at most ``TopKConfig.resident`` columns is read once and
the key found by bisection in registers; a longer one by a radix select (four histogram
passes over the row) and one more pass to write it.
"""

import triton
import triton.language as tl

INT32_MIN = tl.constexpr(-2147483648)
INT32_MAX = tl.constexpr(2147483647)
NEG_INF_KEY = tl.constexpr(-2139095041)  # _ordered(-inf); NaNs of negative sign are below it
INT64_MIN = tl.constexpr(-9223372036854775807 - 1)
NO_UPPER_BOUND = tl.constexpr(2147483648)  # above every int32 key


@triton.jit
def _ordered(values):
    """float32 values -> int32 keys in float total order (NaN by its sign bit)."""
    bits = values.to(tl.int32, bitcast=True)
    # negative floats: flip all bits; positive: flip the sign bit -> unsigned order;
    # then flip the sign bit again -> the same order as signed int32.
    return tl.where(bits < 0, ~bits, bits ^ INT32_MIN) ^ INT32_MIN


@triton.jit
def _pack_ordered(ordered, columns):
    """int32 ordered keys, int64 columns -> int64 keys ordered by (value, -column)."""
    return (ordered.to(tl.int64) << 32) | (4294967295 - columns)


@triton.jit
def _pack(values, columns):
    """float32 values, int64 columns -> int64 keys ordered by (value, -column)."""
    return _pack_ordered(_ordered(values), columns)


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
    keys = tl.where(columns < F, keys, INT64_MIN)
    top = tl.topk(keys, K_POW2)
    slots = tl.arange(0, K_POW2)
    out = keys_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
    tl.store(out + row * (N_CHUNKS * K_POW2) + chunk * K_POW2 + slots, top)


@triton.jit
def _top_keys(keys_ptr, row, group, n_valid, N: tl.constexpr, GROUP: tl.constexpr,
              K_POW2: tl.constexpr):
    """The top K_POW2 of a row's keys [group * GROUP, (group + 1) * GROUP) below n_valid."""
    offsets = group * GROUP + tl.arange(0, GROUP).to(tl.int64)
    keys_ptr = keys_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
    keys = tl.load(keys_ptr + row * N + offsets, mask=offsets < n_valid, other=INT64_MIN)
    return tl.topk(keys, K_POW2)


@triton.jit
def _store_top(values_ptr, indices_ptr, row, top, K: tl.constexpr, K_POW2: tl.constexpr):
    """Unpacks the sorted keys ``top`` [K_POW2] and stores the first K."""
    values, cols = _unpack(top)
    slots = tl.arange(0, K_POW2)
    tl.store(values_ptr + row * K + slots, values.to(values_ptr.dtype.element_ty),
             mask=slots < K)
    tl.store(indices_ptr + row * K + slots, cols, mask=slots < K)


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
    top = _top_keys(keys_ptr, row, group, N, N, GROUP, K_POW2)
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
    top = _top_keys(keys_ptr, row, 0, N, N, GROUP, K_POW2)
    _store_top(values_ptr, indices_ptr, row, top, K, K_POW2)


# --------------------------------------------------------------------- threshold method


@triton.jit
def _row_keys(x_ptr, row, columns, F: tl.constexpr):
    """Ordered int32 keys of x[row, columns] (any shape of int64 columns); INT32_MIN past F."""
    x = tl.load(x_ptr + row * F + columns, mask=columns < F, other=0.0)
    return tl.where(columns < F, _ordered(x.to(tl.float32)), INT32_MIN)


@triton.jit
def _count_at_least(x_ptr, row, bound, F: tl.constexpr, BLOCK: tl.constexpr):
    """How many entries of the row have a key >= bound (an int64 scalar)."""
    count = tl.zeros((), tl.int32)
    for start in range(0, F, BLOCK):
        columns = start + tl.arange(0, BLOCK).to(tl.int64)
        keys = _row_keys(x_ptr, row, columns, F).to(tl.int64)
        count += tl.sum(((keys >= bound) & (columns < F)).to(tl.int32))
    return count


@triton.jit
def _keep(x_ptr, out_ptr, row, lo, hi, n_above, F: tl.constexpr, BLOCK: tl.constexpr,
          CANDIDATES: tl.constexpr):
    """Writes the row's packed keys >= hi to slots [0, n_above) and, in column order, those
    in [lo, hi) to the slots after them that fit in CANDIDATES. Returns how many entries
    have a key >= lo. Requires count(keys >= hi) == n_above <= CANDIDATES."""
    n_sure = tl.zeros((), tl.int32)
    n_maybe = tl.zeros((), tl.int32)
    for start in range(0, F, BLOCK):
        columns = start + tl.arange(0, BLOCK).to(tl.int64)
        ordered = _row_keys(x_ptr, row, columns, F)
        keys = ordered.to(tl.int64)
        sure = (keys >= hi) & (columns < F)
        maybe = (keys >= lo) & (keys < hi) & (columns < F)
        # one scan for both: sure counts in the low 16 bits, maybe counts above them
        ranks = tl.cumsum(sure.to(tl.int32) + (maybe.to(tl.int32) << 16), 0)
        sure_slot = n_sure + (ranks & 65535) - 1
        maybe_slot = n_above + n_maybe + (ranks >> 16) - 1
        slot = tl.where(sure, sure_slot, maybe_slot)
        keep = sure | (maybe & (maybe_slot < CANDIDATES))
        tl.store(out_ptr + row * CANDIDATES + slot, _pack_ordered(ordered, columns), mask=keep)
        n_sure += tl.sum(sure.to(tl.int32))
        n_maybe += tl.sum(maybe.to(tl.int32))
    return n_sure + n_maybe


@triton.jit
def topk_select_kernel(
    x_ptr,  # [B, F] float32 / bfloat16 / float16
    keys_ptr,  # [B, CANDIDATES] int64 (int32 pairs): kept packed keys, first count valid
    count_ptr,  # [B] int32: how many slots of keys are valid (>= K)
    F: tl.constexpr,
    K: tl.constexpr,
    K_POW2: tl.constexpr,
    GROUPS: tl.constexpr,
    ROWS: tl.constexpr,  # BLOCK = ROWS * GROUPS columns per step
    CANDIDATES: tl.constexpr,
):
    row = tl.program_id(axis=0).to(tl.int64)
    BLOCK: tl.constexpr = ROWS * GROUPS
    tile = tl.arange(0, ROWS)[:, None] * GROUPS + tl.arange(0, GROUPS)[None, :]
    # read 1: maxima of the column groups {c : c % GROUPS == g} (INT32_MIN if empty)
    best = tl.full((ROWS, GROUPS), INT32_MIN, tl.int32)
    for start in range(0, F, BLOCK):
        best = tl.maximum(best, _row_keys(x_ptr, row, start + tile.to(tl.int64), F))
    group_max = tl.topk(tl.max(best, axis=0), K_POW2)  # sorted descending
    # the K-th largest group maximum: K groups hold an entry >= it, so count(>= lo) >= K
    lo = tl.max(tl.where(tl.arange(0, K_POW2) == K - 1, group_max, INT32_MIN)).to(tl.int64)
    out_ptr = keys_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
    # read 2: keep every entry >= lo
    n_lo = _keep(x_ptr, out_ptr, row, lo, NO_UPPER_BOUND, 0, F, BLOCK, CANDIDATES)
    n_valid = n_lo
    if n_lo > CANDIDATES:
        # bisect on the key: count(>= lo) >= K > count(>= hi), until count(>= lo) fits or
        # hi == lo + 1 (lo is then the K-th key exactly and its ties fill the buffer)
        hi = tl.full((), NO_UPPER_BOUND, tl.int64)
        n_hi = tl.zeros((), tl.int32)
        while (n_lo > CANDIDATES) & (hi - lo > 1):
            mid = (lo + hi) >> 1
            n_mid = _count_at_least(x_ptr, row, mid, F, BLOCK)
            if n_mid >= K:
                lo = mid
                n_lo = n_mid
            else:
                hi = mid
                n_hi = n_mid
        tl.debug_barrier()  # the first read's stores land before these overwrite them
        if n_lo <= CANDIDATES:
            hi = tl.full((), NO_UPPER_BOUND, tl.int64)
            n_hi = tl.zeros((), tl.int32)
        _keep(x_ptr, out_ptr, row, lo, hi, n_hi, F, BLOCK, CANDIDATES)
        n_valid = tl.minimum(n_lo, CANDIDATES)
    tl.store(count_ptr + row, n_valid)


@triton.jit
def topk_sort_kernel(
    keys_ptr,  # [B, CANDIDATES] int64 (int32 pairs) from topk_select_kernel
    count_ptr,  # [B] int32 valid slots per row
    values_ptr,  # [B, K] output dtype
    indices_ptr,  # [B, K] int32
    K: tl.constexpr,
    K_POW2: tl.constexpr,
    CANDIDATES: tl.constexpr,
):
    row = tl.program_id(axis=0).to(tl.int64)
    n_valid = tl.load(count_ptr + row)
    top = _top_keys(keys_ptr, row, 0, n_valid, CANDIDATES, CANDIDATES, K_POW2)
    _store_top(values_ptr, indices_ptr, row, top, K, K_POW2)


@triton.jit
def _kth_key(x_ptr, row, F: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
    """(the ordered key of row ``row``'s K-th largest value, how many entries equal to it
    are among the row's top K): :func:`topk_kth_key_kernel`'s radix select."""
    bins = tl.arange(0, 256)
    prefix = tl.zeros((), dtype=tl.uint32)  # the key's bits found so far
    found = tl.zeros((), dtype=tl.uint32)  # which bits those are
    remaining = tl.zeros((), dtype=tl.int32) + K  # rank still to go, among the matches
    for shift in tl.static_range(24, -1, -8):
        counts = tl.zeros([256], dtype=tl.int32)
        for start in tl.range(0, F, BLOCK):
            columns = start + tl.arange(0, BLOCK)
            valid = columns < F
            x = tl.load(x_ptr + row * F + columns, mask=valid, other=0.0)
            keys = (_ordered(x.to(tl.float32)) ^ INT32_MIN).to(tl.uint32, bitcast=True)
            match = valid & ((keys & found) == prefix)
            counts += tl.histogram(((keys >> shift) & 255).to(tl.int32), 256, mask=match)
        at_least = tl.sum(counts) - tl.cumsum(counts, axis=0) + counts
        digit = tl.sum((at_least >= remaining).to(tl.int32)) - 1
        above = tl.sum(tl.where(bins > digit, counts, 0))
        remaining -= above
        prefix |= digit.to(tl.uint32) << shift
        found |= tl.full((), 255, tl.uint32) << shift
    return (prefix.to(tl.int32, bitcast=True)) ^ INT32_MIN, remaining


@triton.jit
def _count_keys(keys, valid, bound):
    """How many valid entries of register-resident ``keys`` are >= bound (an int32)."""
    return tl.sum(((keys >= bound) & valid).to(tl.int32))


@triton.jit
def _kth_key_resident(keys, valid, K: tl.constexpr, RELU: tl.constexpr):
    """:func:`_kth_key` of a row held in registers: ``keys`` [F_POW2] int32 ordered keys,
    ``valid`` [F_POW2] the row's columns. Bisection on the key between the row's minimum
    and maximum (one compare and one sum per round, no histogram), stopping early at a
    bound with exactly K entries at or above it. RELU: a row with at most K positive
    entries (and no NaN of negative sign, which would rank below every other value) returns
    (0, 0), the key of +0.0: the entries above it are exactly what a ReLU of its top K keeps.
    """
    lo = tl.min(tl.where(valid, keys, INT32_MAX)).to(tl.int64)  # count(>= lo) >= K
    hi = tl.max(tl.where(valid, keys, INT32_MIN)).to(tl.int64)  # the K-th key <= hi
    exact = tl.zeros((), tl.int32)  # 1: count(>= lo) == K
    if RELU:
        if (_count_keys(keys, valid, 1) <= K) & (lo >= NEG_INF_KEY):
            exact = exact + 2
    while (lo < hi) & (exact == 0):
        mid = lo + ((hi - lo + 1) >> 1)
        n_mid = _count_keys(keys, valid, mid.to(tl.int32))
        if n_mid >= K:
            lo = mid
            exact = (n_mid == K).to(tl.int32)
        else:
            hi = mid - 1
    kth = lo.to(tl.int32)
    if exact == 1:  # the K entries >= lo: the K-th is their least, all its equals among them
        kth = tl.min(tl.where(valid & (keys >= kth), keys, INT32_MAX))
    ties = K - tl.sum(((keys > kth) & valid).to(tl.int32))
    if exact == 2:
        kth = tl.zeros((), tl.int32)
        ties = tl.zeros((), tl.int32)
    return kth, ties


@triton.jit
def _resident_row(x_ptr, row, F: tl.constexpr, F_POW2: tl.constexpr):
    """(columns, valid, values as loaded, their float32 ordered keys) of a whole row."""
    columns = tl.arange(0, F_POW2)
    valid = columns < F
    x = tl.load(x_ptr + row * F + columns, mask=valid, other=0.0)
    keys = tl.where(valid, _ordered(x.to(tl.float32)), INT32_MIN)
    return columns, valid, x, keys


@triton.jit
def topk_kth_key_kernel(
    x_ptr,  # [B, F] float32 / bfloat16 / float16
    kth_ptr,  # [B] int32: the ordered key (_ordered) of each row's K-th largest value
    ties_ptr,  # [B] int32: how many entries equal to it are among the row's top K
    F: tl.constexpr,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    RESIDENT: tl.constexpr,  # the row (F_POW2 columns) is held in registers
    F_POW2: tl.constexpr,
):
    """The K-th largest key of a row. RESIDENT: one read, then bisection in registers
    (``_kth_key_resident``); else a radix select, 8 bits at a time from the top: each of
    four passes over the row counts, in a 256-bin histogram, the next 8 bits of the keys
    that share the bits found so far, and takes the digit at which the count from the top
    reaches K. No sort and no candidate buffer: any K <= F.
    """
    row = tl.program_id(axis=0).to(tl.int64)
    if RESIDENT:
        _, valid, _, keys = _resident_row(x_ptr, row, F, F_POW2)
        kth, ties = _kth_key_resident(keys, valid, K, False)
    else:
        kth, ties = _kth_key(x_ptr, row, F, K, BLOCK)
    tl.store(kth_ptr + row, kth)
    tl.store(ties_ptr + row, ties)


@triton.jit
def _store_relu(out_ptr, row, columns, valid, x, keys, kth, ties, taken, F: tl.constexpr):
    """Writes relu(x) where a key is above kth or is among the first ``ties`` - ``taken``
    entries equal to it (column order), 0 elsewhere; returns ``taken`` plus this tile's
    entries equal to kth."""
    value = x.to(tl.float32)  # (the interpreter compares bfloat16 by its bits)
    equal = valid & (keys == kth)
    rank = taken + tl.cumsum(equal.to(tl.int32), axis=0)  # 1-based among the ties
    chosen = valid & ((keys > kth) | (equal & (rank <= ties)))
    # NaN stays NaN, as through jax.nn.relu
    relu = tl.where(value > 0, value, tl.where(value == value, 0.0, value))
    tl.store(out_ptr + row * F + columns, tl.where(chosen, relu, 0.0).to(x.dtype), mask=valid)
    return taken + tl.sum(equal.to(tl.int32))


@triton.jit
def topk_relu_kernel(
    x_ptr,  # [B, F] float32 / bfloat16 / float16
    out_ptr,  # [B, F] x's dtype: relu(x) at each row's top K entries, 0 elsewhere
    F: tl.constexpr,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    RESIDENT: tl.constexpr,  # the row (F_POW2 columns) is held in registers
    F_POW2: tl.constexpr,
):
    """Each row's K largest entries (ties to the lower column, float total order) kept
    through a ReLU, every other entry 0. RESIDENT: the row is read once and selected in
    registers (``_kth_key_resident``, which skips the search for a row with at most K
    positive entries); else the radix select of ``_kth_key`` (four passes over the row,
    which stays in L2), then one pass that writes the row. The entries equal to the K-th
    value are counted in column order so that only the first ``ties`` of them are kept."""
    row = tl.program_id(axis=0).to(tl.int64)
    if RESIDENT:
        columns, valid, x, keys = _resident_row(x_ptr, row, F, F_POW2)
        kth, ties = _kth_key_resident(keys, valid, K, True)
        _store_relu(out_ptr, row, columns, valid, x, keys, kth, ties, 0, F)
    else:
        kth, ties = _kth_key(x_ptr, row, F, K, BLOCK)
        taken = tl.zeros((), dtype=tl.int32)  # entries equal to kth kept so far
        for start in tl.range(0, F, BLOCK):
            columns = start + tl.arange(0, BLOCK)
            valid = columns < F
            x = tl.load(x_ptr + row * F + columns, mask=valid, other=0.0)
            keys = _ordered(x.to(tl.float32))
            taken = _store_relu(out_ptr, row, columns, valid, x, keys, kth, ties, taken, F)
