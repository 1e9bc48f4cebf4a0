"""Static configuration of the decoder-loss backends: block sizes, warps, stages.

One frozen, hashable dataclass per kernel, validated when it is made; ``None`` fields
are filled per shape by ``resolve``. Defaults are measured (benchmarks/sweep_loss.py,
benchmarks/NOTES.md).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from hsae_jax import _shapes
from hsae_jax.segments import SegmentSumConfig

Variant = Literal["fused", "two_pass"]
VARIANTS = ("fused", "two_pass")

PREFIX_SSE_TILE_ELEMENTS = 4096  # [BLOCK_B, K_POW2, BLOCK_D] float32 elements per program
PREFIX_SSE_MAX_K_POW2 = 1024  # larger K computes the prefix SSE with the xla backend
TARGET_PROGRAMS = 1024  # walks: BLOCK_B shrinks for small B until about this many programs


@dataclasses.dataclass(frozen=True)
class WalkConfig:
    """Launch settings of a kernel that walks the K latents of [BLOCK_B, BLOCK_D] tiles.

    block_b: rows per program (a power of two; None: 4, fewer for small B so that a
      launch keeps about 1024 programs).
    block_d: columns of D per program (a power of two).
    loop_num_stages: software-pipelining depth of the walk over K (the gathers are issued
      this many steps minus one ahead).
    num_warps, num_stages: Triton's launch settings.
    """

    block_b: int | None = None
    block_d: int = 64
    loop_num_stages: int = 4
    num_warps: int = 2
    num_stages: int = 2

    def __post_init__(self):
        _shapes.check_power_of_two("WalkConfig", block_b=self.block_b, block_d=self.block_d)
        _shapes.check_positive("WalkConfig", loop_num_stages=self.loop_num_stages,
                               num_warps=self.num_warps, num_stages=self.num_stages)

    def resolve(self, b: int, d: int) -> WalkConfig:
        """These settings with ``block_b`` chosen for B rows of D columns."""
        if self.block_b is not None:
            return self
        block_b = 4
        while block_b > 1 and _shapes.cdiv(b, block_b) * _shapes.cdiv(d, self.block_d) < (
                TARGET_PROGRAMS):
            block_b //= 2
        return dataclasses.replace(self, block_b=block_b)


# Defaults from benchmarks/sweep_loss.py on an H200 (B=4096, F=65536, D=2304, K in
# {32, 128}, uniform and Zipf indices).
FUSED_WALK = WalkConfig(block_b=None, block_d=64, loop_num_stages=4, num_warps=2)
"""The fused kernel: 4 x 64 tiles, 2 warps, 4 loop stages were best or within 5% of best."""
FORWARD_WALK = WalkConfig(block_b=4, block_d=128, loop_num_stages=4, num_warps=4)
"""The two-pass forward kernel: the seed's 1 x 64 tiles, 2 warps are 1.2-2.5x slower with
the software-pipelined walk than 4 x 128 tiles, 4 warps."""
BACKWARD_WALK = WalkConfig(block_b=16, block_d=32, loop_num_stages=4, num_warps=8,
                           num_stages=8)
"""The two-pass backward kernel: the seed's settings, except 4 loop stages (with the
seed's 16 the pipelined walk is 1.1-1.3x slower)."""


@dataclasses.dataclass(frozen=True)
class PrefixSseConfig:
    """``hierarchical_sae_prefix_sse_kernel`` launch settings.

    Any field left None is chosen per shape by :meth:`resolve`.
    """

    block_b: int | None = None
    block_d: int | None = None
    d_split: int | None = None
    num_warps: int | None = None
    num_stages: int = 2

    def __post_init__(self):
        _shapes.check_power_of_two("PrefixSseConfig", block_b=self.block_b,
                                   block_d=self.block_d)
        _shapes.check_positive("PrefixSseConfig", d_split=self.d_split,
                               num_warps=self.num_warps, num_stages=self.num_stages)

    def resolve(self, b: int, k: int, d: int) -> PrefixSseConfig:
        k_pow2 = _shapes.next_power_of_2(k)
        block_d = self.block_d or min(
            128, _shapes.next_power_of_2(d), max(16, PREFIX_SSE_TILE_ELEMENTS // k_pow2)
        )
        block_b = self.block_b or min(
            16, _shapes.next_power_of_2(b),
            max(1, PREFIX_SSE_TILE_ELEMENTS // (k_pow2 * block_d)),
        )
        d_tiles = _shapes.cdiv(d, block_d)
        d_split = self.d_split or max(
            1, min(d_tiles, _shapes.cdiv(TARGET_PROGRAMS, _shapes.cdiv(b, block_b)))
        )
        d_split = min(d_split, d_tiles)
        num_warps = self.num_warps or max(1, min(8, block_b * k_pow2 * block_d // 1024))
        return PrefixSseConfig(block_b, block_d, d_split, num_warps, self.num_stages)

    def tiles_per_split(self, d: int) -> int:
        return _shapes.cdiv(_shapes.cdiv(d, self.block_d), self.d_split)


@dataclasses.dataclass(frozen=True)
class TritonLossConfig:
    """Configuration of the ``"triton"`` and ``"interpret"`` backends of the decoder loss.

    variant: ``"fused"`` (forward and backward walks in one kernel: one gather from
      memory, one scatter; the default) or ``"two_pass"`` (the seed's forward kernel,
      then its backward kernel).
    deterministic: loss and gradients bitwise the same on every run (no float atomics):
      the fused kernel stores each (row, latent) pair's gradient share, a chunk of rows
      at a time (at most F * D floats), and ``segment_row_sums`` adds them per latent in
      a fixed order. Slower (benchmarks/NOTES.md); needs the fused variant.
    fused, forward, backward: the walks' launch settings (fused kernel; two-pass forward
      and backward kernels).
    prefix_sse: the per-prefix SSE kernel (evaluation, prefix-weight gradients).
    segment_sum: the per-latent sums of the deterministic mode.
    """

    variant: Variant = "fused"
    deterministic: bool = False
    fused: WalkConfig = FUSED_WALK
    forward: WalkConfig = FORWARD_WALK
    backward: WalkConfig = BACKWARD_WALK
    prefix_sse: PrefixSseConfig = PrefixSseConfig()
    segment_sum: SegmentSumConfig = SegmentSumConfig()

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"TritonLossConfig.variant={self.variant!r} must be one of "
                             f"{VARIANTS}")
        if self.deterministic and self.variant == "two_pass":
            raise ValueError("TritonLossConfig.deterministic=True runs the fused kernel; "
                             "variant='two_pass' adds gradients with float atomics")
        for name, kind in (("fused", WalkConfig), ("forward", WalkConfig),
                           ("backward", WalkConfig), ("prefix_sse", PrefixSseConfig),
                           ("segment_sum", SegmentSumConfig)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"TritonLossConfig.{name} must be a {kind.__name__}, got "
                                f"{type(getattr(self, name)).__name__}")


_CHUNK_ELEMENTS = 1 << 25  # float32 elements of one [B, chunk, D] temporary (128 MiB)
_MAX_CHUNK = 8


@dataclasses.dataclass(frozen=True)
class XlaLossConfig:
    """Configuration of the ``"xla"`` backend of the decoder loss.

    chunk: latents processed per scan step (the [B, chunk, D] tile); None picks
      ``min(K, 8, 2**25 // (B * D))``, at least 1.
    """

    chunk: int | None = None

    def __post_init__(self):
        _shapes.check_positive("XlaLossConfig", chunk=self.chunk)

    def resolve(self, b: int, k: int, d: int) -> int:
        if self.chunk is not None:
            return min(self.chunk, k)
        return max(1, min(k, _MAX_CHUNK, _CHUNK_ELEMENTS // (b * d)))
