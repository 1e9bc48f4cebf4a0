"""Per-latent segment sums over (row, latent) pairs: reproducible, without atomics."""

from hsae_jax.segments.api import SegmentSumConfig, segment_row_sums

__all__ = ["SegmentSumConfig", "segment_row_sums"]
