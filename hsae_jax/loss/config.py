"""Static configuration of the decoder-loss kernels: block sizes, warps, stages.

One frozen, hashable dataclass per kernel; ``None`` fields are filled per shape by
``resolve``. Defaults are measured (benchmarks/sweep_loss.py, benchmarks/NOTES.md).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from hsae_jax import _shapes
from hsae_jax.segments import SegmentSumConfig

Variant = Literal["auto", "fused", "two_pass"]
VARIANTS = ("auto", "fused", "two_pass")

PREFIX_SSE_TILE_ELEMENTS = 4096  # [BLOCK_B, K_POW2, BLOCK_D] float32 elements per program
PREFIX_SSE_MAX_K_POW2 = 1024  # larger K computes the prefix SSE with the xla backend
TARGET_PROGRAMS = 1024  # D is split until a launch has about this many programs


@dataclasses.dataclass(frozen=True)
class SeedForwardConfig:
    """``hierarchical_sae_forward_kernel`` launch settings.

    The seed launches it with 1 x 64 tiles, 2 warps; with the software-pipelined walk
    4 x 128 tiles, 4 warps are 1.2-2.5x faster (benchmarks/sweep_loss.py on an H200).
    """

    block_b: int = 4
    block_d: int = 128
    loop_num_stages: int = 4
    num_warps: int = 4
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class SeedBackwardConfig:
    """``hierarchical_sae_backward_kernel`` launch settings (the seed's, except 4 loop
    stages: the pipelined walk with the seed's 16 is 1.1-1.3x slower)."""

    block_b: int = 16
    block_d: int = 32
    loop_num_stages: int = 4
    num_warps: int = 8
    num_stages: int = 8


@dataclasses.dataclass(frozen=True)
class FusedConfig:
    """``hierarchical_sae_fused_kernel`` launch settings.

    Defaults from benchmarks/sweep_loss.py on an H200 (B=4096, F=65536, D=2304, K in
    {32, 128}, uniform and Zipf indices): BLOCK_B=4, BLOCK_D=64, 2 warps, 4 loop stages
    was best or within 5% of best in every case.
    block_b: rows per program (None: 4, fewer for small B so the grid fills the GPU).
    """

    block_b: int | None = None
    block_d: int = 64
    loop_num_stages: int = 4
    num_warps: int = 2
    num_stages: int = 2

    def resolve(self, b: int, d: int) -> FusedConfig:
        block_b = self.block_b
        if block_b is None:
            block_b = 4
            while block_b > 1 and _shapes.cdiv(b, block_b) * _shapes.cdiv(d, self.block_d) < (
                    TARGET_PROGRAMS):
                block_b //= 2
        _check_power_of_two("FusedConfig", block_b=block_b, block_d=self.block_d)
        return dataclasses.replace(self, block_b=block_b)


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

    def resolve(self, b: int, k: int, d: int) -> PrefixSseConfig:
        k_pow2 = _shapes.next_power_of_2(k)
        block_d = self.block_d or min(
            128, _shapes.next_power_of_2(d), max(16, PREFIX_SSE_TILE_ELEMENTS // k_pow2)
        )
        block_b = self.block_b or min(
            16, _shapes.next_power_of_2(b),
            max(1, PREFIX_SSE_TILE_ELEMENTS // (k_pow2 * block_d)),
        )
        _check_power_of_two("PrefixSseConfig", block_b=block_b, block_d=block_d)
        d_tiles = _shapes.cdiv(d, block_d)
        d_split = self.d_split or max(
            1, min(d_tiles, _shapes.cdiv(TARGET_PROGRAMS, _shapes.cdiv(b, block_b)))
        )
        d_split = min(d_split, d_tiles)
        num_warps = self.num_warps or max(1, min(8, block_b * k_pow2 * block_d // 1024))
        return PrefixSseConfig(block_b, block_d, d_split, num_warps, self.num_stages)

    def tiles_per_split(self, d: int) -> int:
        return _shapes.cdiv(_shapes.cdiv(d, self.block_d), self.d_split)


def _check_power_of_two(owner: str, **values: int) -> None:
    for name, value in values.items():
        if value < 1 or value & (value - 1):
            raise ValueError(f"{owner}.{name}={value} must be a power of two")


@dataclasses.dataclass(frozen=True)
class TritonLossConfig:
    """Configuration of the ``"triton"`` and ``"interpret"`` backends.

    variant: ``"fused"`` (forward and backward walks in one kernel: one gather from
      memory, one scatter; the default), ``"two_pass"`` (the seed's forward kernel, then
      its backward kernel), or ``"auto"`` (fused).
    deterministic: loss and gradients bitwise the same on every run (no float atomics):
      the fused kernel stores each (row, latent) pair's gradient share, a chunk of rows
      at a time (at most F * D floats), and ``segment_row_sums`` adds them per latent in
      a fixed order. Slower (benchmarks/NOTES.md); needs the fused variant.
    """

    variant: Variant = "auto"
    deterministic: bool = False
    fused: FusedConfig = FusedConfig()
    seed_forward: SeedForwardConfig = SeedForwardConfig()
    seed_backward: SeedBackwardConfig = SeedBackwardConfig()
    prefix_sse: PrefixSseConfig = PrefixSseConfig()
    segment_sum: SegmentSumConfig = SegmentSumConfig()

    def resolve_variant(self) -> str:
        return "fused" if self.variant == "auto" else self.variant

    def validate(self) -> None:
        """Raises ValueError for a setting no kernel accepts (before anything runs)."""
        if self.variant not in VARIANTS:
            raise ValueError(f"TritonLossConfig.variant={self.variant!r} must be one of {VARIANTS}")
        if self.deterministic and self.variant == "two_pass":
            raise ValueError("TritonLossConfig.deterministic=True runs the fused kernel; "
                             "variant='two_pass' adds gradients with float atomics")
        self.segment_sum.validate("TritonLossConfig.segment_sum")
        for owner, cfg in (("FusedConfig", self.fused), ("SeedForwardConfig", self.seed_forward),
                           ("SeedBackwardConfig", self.seed_backward),
                           ("PrefixSseConfig", self.prefix_sse)):
            sizes = {n: getattr(cfg, n) for n in ("block_b", "block_d")
                     if getattr(cfg, n) is not None}
            _check_power_of_two(owner, **sizes)
            for name in ("num_warps", "num_stages", "loop_num_stages", "d_split"):
                value = getattr(cfg, name, None)
                if value is not None and value < 1:
                    raise ValueError(f"{owner}.{name}={value} must be >= 1")
