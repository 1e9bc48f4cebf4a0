"""Static configuration of the TopK encoder's sparse backward."""

from __future__ import annotations

import dataclasses

from hsae_jax import _shapes
from hsae_jax.segments import SegmentSumConfig


@dataclasses.dataclass(frozen=True)
class SparseEncoderConfig:
    """Settings of the sparse encoder backward, for every backend but ``"reference"``.

    segment_sum: launch settings of the per-latent segment sum that makes dW_enc
      (``"triton"`` / ``"interpret"``).
    xla_chunk: latents per step of the XLA scans (dW_enc on ``"xla"``; dx everywhere).
    """

    segment_sum: SegmentSumConfig = SegmentSumConfig()
    xla_chunk: int = 4

    def __post_init__(self):
        if not isinstance(self.segment_sum, SegmentSumConfig):
            raise TypeError("SparseEncoderConfig.segment_sum must be a SegmentSumConfig, got "
                            f"{type(self.segment_sum).__name__}")
        _shapes.check_positive("SparseEncoderConfig", xla_chunk=self.xla_chunk)
