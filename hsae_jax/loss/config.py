"""Static configuration of the decoder-loss kernels: block sizes, warps, stages.

One frozen, hashable dataclass per kernel; ``None`` fields are filled per shape by
``resolve``. The defaults of the two seed kernels are the seed's own launch settings.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from hsae_jax import _shapes

Variant = Literal["auto", "fused", "two_pass"]

FUSED_TILE_ELEMENTS = 4096  # [BLOCK_B, K_POW2, BLOCK_D] float32 elements held per program
FUSED_MAX_K_POW2 = 1024  # larger K runs the two-pass kernels
TARGET_PROGRAMS = 1024  # D is split until a launch has about this many programs


@dataclasses.dataclass(frozen=True)
class SeedForwardConfig:
    """``hierarchical_sae_forward_kernel`` launch settings (the seed's)."""

    block_b: int = 1
    block_d: int = 64
    loop_num_stages: int = 4
    num_warps: int = 2
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class SeedBackwardConfig:
    """``hierarchical_sae_backward_kernel`` launch settings (the seed's)."""

    block_b: int = 16
    block_d: int = 32
    loop_num_stages: int = 16
    num_warps: int = 8
    num_stages: int = 8


@dataclasses.dataclass(frozen=True)
class FusedConfig:
    """``hierarchical_sae_fused_kernel`` / ``..._prefix_sse_kernel`` launch settings.

    Any field left None is chosen per shape by :meth:`resolve`.
    """

    block_b: int | None = None
    block_d: int | None = None
    d_split: int | None = None
    num_warps: int | None = None
    num_stages: int = 1

    def resolve(self, b: int, k: int, d: int) -> FusedConfig:
        k_pow2 = _shapes.next_power_of_2(k)
        block_d = self.block_d or min(
            128, _shapes.next_power_of_2(d), max(16, FUSED_TILE_ELEMENTS // k_pow2)
        )
        block_b = self.block_b or min(
            16, _shapes.next_power_of_2(b),
            max(1, FUSED_TILE_ELEMENTS // (k_pow2 * block_d)),
        )
        for name, value in (("block_b", block_b), ("block_d", block_d)):
            if value < 1 or value & (value - 1):
                raise ValueError(f"FusedConfig.{name}={value} must be a power of two")
        d_tiles = _shapes.cdiv(d, block_d)
        d_split = self.d_split or max(
            1, min(d_tiles, _shapes.cdiv(TARGET_PROGRAMS, _shapes.cdiv(b, block_b)))
        )
        d_split = min(d_split, d_tiles)
        num_warps = self.num_warps or max(1, min(8, block_b * k_pow2 * block_d // 1024))
        return FusedConfig(block_b, block_d, d_split, num_warps, self.num_stages)

    def tiles_per_split(self, d: int) -> int:
        return _shapes.cdiv(_shapes.cdiv(d, self.block_d), self.d_split)


@dataclasses.dataclass(frozen=True)
class TritonLossConfig:
    """Configuration of the ``"triton"`` and ``"interpret"`` backends.

    variant: ``"fused"`` (one gather, one scatter; K up to 1024), ``"two_pass"`` (the
      seed's forward and backward kernels), or ``"auto"`` (fused when K allows).
    """

    variant: Variant = "auto"
    fused: FusedConfig = FusedConfig()
    seed_forward: SeedForwardConfig = SeedForwardConfig()
    seed_backward: SeedBackwardConfig = SeedBackwardConfig()

    def resolve_variant(self, k: int) -> str:
        if self.variant not in ("auto", "fused", "two_pass"):
            raise ValueError(
                f"TritonLossConfig.variant={self.variant!r} must be 'auto', 'fused' or "
                "'two_pass'"
            )
        fits = _shapes.next_power_of_2(k) <= FUSED_MAX_K_POW2
        if self.variant == "fused" and not fits:
            raise ValueError(
                f"variant='fused' supports K <= {FUSED_MAX_K_POW2}, got K={k}; use 'two_pass'"
            )
        if self.variant == "auto":
            return "fused" if fits else "two_pass"
        return self.variant
