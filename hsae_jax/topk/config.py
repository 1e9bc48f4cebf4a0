"""Static configuration of the top-k kernels (one place for every launch setting)."""

from __future__ import annotations

import dataclasses

from hsae_jax import _shapes

METHODS = ("auto", "threshold", "bitonic")
# "auto" uses the threshold method while its candidate buffer stays this small; beyond
# that the final sort would not fit in one program's registers and bitonic merging wins.
MAX_AUTO_CANDIDATES = 2048
# the longest row a resident select holds: 64 columns per thread of 16 warps
MAX_RESIDENT = 32768


@dataclasses.dataclass(frozen=True)
class TopKConfig:
    """Launch settings of the Triton top-k.

    Defaults from benchmarks/sweep_topk.py on an H200 ([4096, 65536], k in 32..256,
    float32 and bfloat16): the threshold method with block=2048 and 4 warps was best or
    within 10% of best everywhere (1.1-1.5 ms; the bitonic method 5.1-15.6 ms).
    num_warps: None: 4 for the threshold method, 8 for the bitonic one (each its best).

    method: ``"threshold"`` (a lower bound for the k-th largest value from strided group
      maxima, one filtering pass that keeps the few entries above it, a small sort),
      ``"bitonic"`` (bitonic top-k over chunks of every row, merged), or ``"auto"``
      (threshold while ``candidates <= 2048``, i.e. k <= 512 by default).
    Threshold method (powers of two, raised to next_pow2(k); None: 4 * next_pow2(k), at
    most next_pow2(F)):
      groups: strided column groups whose maxima bound the k-th value.
      candidates: entries a row may keep for the final sort (at most 32768); a row with
        more entries above the bound narrows it by bisection (exact, slower).
      block: columns a program reads per step (raised to ``groups``).
    Selections without a sort (``top_k_mask``, ``top_k_relu``):
      resident: rows of at most this many columns (rounded up to a power of two; default
        16384) are held in registers by one program and selected there (one read,
        bisection on the key); longer rows, or 0, use the radix select that reads the
        row five times. The resident program has 32 columns per thread (4 to 16 warps).
        H100, [4096, 8192], k = 1152: ``top_k_relu`` 0.35 ms resident, 0.99 ms radix;
        ``top_k_mask`` 0.56 / 1.05 ms (benchmarks/auxk_pieces.py).
    Bitonic method:
      chunk: columns a program of the first stage reduces (raised to next_pow2(k));
        None: 4096, or fewer for short rows.
      group: candidates a merge program reduces (raised to 2 * next_pow2(k)).
    """

    method: str = "auto"
    groups: int | None = None
    candidates: int | None = None
    block: int = 2048
    chunk: int | None = None
    group: int = 4096
    num_warps: int | None = None
    num_stages: int = 1
    resident: int = 16384

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"TopKConfig.method={self.method!r} must be one of {METHODS}")
        _shapes.check_power_of_two("TopKConfig", groups=self.groups,
                                   candidates=self.candidates, block=self.block,
                                   chunk=self.chunk, group=self.group)
        if not 0 <= self.resident <= MAX_RESIDENT:
            raise ValueError(f"TopKConfig.resident={self.resident} must be in "
                             f"[0, {MAX_RESIDENT}] (a row in one program's registers)")
        _shapes.check_positive("TopKConfig", num_warps=self.num_warps,
                               num_stages=self.num_stages)

    def resolve(self, f: int, k: int) -> TopKConfig:
        """Concrete settings for rows of ``f`` columns and ``k`` outputs; checks the limits
        that depend on them."""
        k_pow2 = max(2, _shapes.next_power_of_2(k))
        f_pow2 = max(k_pow2, _shapes.next_power_of_2(f))
        groups = max(k_pow2, self.groups or min(4 * k_pow2, f_pow2))
        candidates = max(k_pow2, self.candidates or min(4 * k_pow2, f_pow2))
        if candidates > 32768:  # the kept-slot ranks are counted in 16 bits per step
            raise ValueError(f"TopKConfig.candidates={candidates} must be <= 32768")
        method = self.method
        if method == "auto":
            method = "threshold" if candidates <= MAX_AUTO_CANDIDATES else "bitonic"
        chunk = max(k_pow2, self.chunk or min(4096, _shapes.next_power_of_2(f)))
        block = max(self.block, groups)
        if method == "threshold" and block > 32768:
            raise ValueError(f"TopKConfig.block={block} (>= groups) must be <= 32768 for the "
                             "threshold method (ranks are counted in 16 bits per step)")
        num_warps = self.num_warps or (4 if method == "threshold" else 8)
        return dataclasses.replace(
            self, method=method, groups=groups, candidates=candidates, block=block,
            chunk=chunk, group=max(self.group, 2 * k_pow2), num_warps=num_warps)

    def select_launch(self, f: int) -> dict:
        """The constexprs and warps of ``topk_kth_key_kernel`` / ``topk_relu_kernel`` for
        rows of ``f`` columns (the resident select while next_pow2(f) <= ``resident``)."""
        f_pow2 = _shapes.next_power_of_2(f)
        resident = f_pow2 <= self.resident
        warps = min(16, max(4, f_pow2 // (32 * 32))) if resident else self.num_warps
        return dict(BLOCK=min(self.block, f_pow2), RESIDENT=resident, F_POW2=f_pow2,
                    num_warps=warps, num_stages=self.num_stages)
