"""Static configuration of the top-k kernels."""

from __future__ import annotations

import dataclasses

from hsae_jax import _shapes


@dataclasses.dataclass(frozen=True)
class TopKConfig:
    """Launch settings of the Triton top-k.

    chunk: columns a program of the first stage reduces (a power of two; raised to
      next_pow2(k) when smaller); None: 4096, or fewer for short rows.
    group: candidates a merge program reduces (a power of two; raised to 2 * next_pow2(k)).
    """

    chunk: int | None = None
    group: int = 4096
    num_warps: int = 8
    num_stages: int = 1

    def resolve(self, f: int, k: int) -> TopKConfig:
        k_pow2 = max(2, _shapes.next_power_of_2(k))
        for name in ("chunk", "group"):
            value = getattr(self, name)
            if value is not None and (value < 1 or value & (value - 1)):
                raise ValueError(f"TopKConfig.{name}={value} must be a power of two")
        chunk = max(k_pow2, self.chunk or min(4096, _shapes.next_power_of_2(f)))
        group = max(self.group, 2 * k_pow2)
        return dataclasses.replace(self, chunk=chunk, group=group)
