"""Static configuration of the TopK encoder's sparse backward."""

from __future__ import annotations

import dataclasses

from hsae_jax import _shapes
from hsae_jax.segments import SegmentSumConfig


@dataclasses.dataclass(frozen=True)
class SparseEncoderConfig:
    """Settings of the TopK encoder (mostly its sparse backward), for every backend but
    ``"reference"``.

    segment_sum: launch settings of the per-latent segment sum that makes dW_enc
      (``"triton"`` / ``"interpret"``).
    xla_chunk: latents per step of the XLA scans (dW_enc on ``"xla"``; dx everywhere).
    forward_rows: rows of the batch the forward scores at once (None: all); fewer keep
      the [rows, F] pre-activations small (the same result).
    """

    segment_sum: SegmentSumConfig = SegmentSumConfig()
    xla_chunk: int = 4
    forward_rows: int | None = None

    def __post_init__(self):
        if not isinstance(self.segment_sum, SegmentSumConfig):
            raise TypeError("SparseEncoderConfig.segment_sum must be a SegmentSumConfig, got "
                            f"{type(self.segment_sum).__name__}")
        _shapes.check_positive("SparseEncoderConfig", xla_chunk=self.xla_chunk)
        if self.forward_rows is not None:
            _shapes.check_positive("SparseEncoderConfig", forward_rows=self.forward_rows)
